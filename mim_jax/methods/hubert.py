"""HuBERT (Hsu et al. 2021, "HuBERT: Self-Supervised Speech Representation Learning by Masked
Prediction of Hidden Units"): masked prediction of offline k-means cluster ids; with a topic
weight, HuBERTopic (Maekaku et al. 2023, "HuBERTopic: Enhancing Semantic Representation of
HuBERT through Self-supervision Utilizing Topic Model"): an utterance-level topic label as an
auxiliary target.

The targets are data, made before training by `python -m mim_jax.tools.kmeans` (k-means of
MFCC frames in iteration 1, of a trained encoder's block in iteration 2) and read by the
pipeline (data/targets.py): every batch carries `targets` [B, T'] int32, one cluster id per
encoder frame (-1 past the audio), and, for HuBERTopic, `topic` [B] int32.

Inside the jitted step, from raw audio:
  1. log-mel features (data/logmel.py), normalised per utterance;
  2. masking at the encoder's frame rate (40 ms), so a target frame is wholly masked or not:
     span masks (frame_masking.py 'span') over the encoder frames, each masked frame's 4 log-mel
     frames replaced by a learned mask embedding (HuBERT replaces masked CNN features by a
     learned embedding, sec. II-B). HuBERT masks at its 20 ms frame rate with p = 8% of frames
     starting a span of l = 10 frames (sec. IV-C); at 40 ms frames the same 200 ms spans
     starting 4 times a second are p = 0.16, l = 5 (configs/hubert_conformer.py);
  3. the Conformer encodes the masked features; the paper's head (sec. II-E) scores cluster c
     at frame t by the cosine similarity of a projection A o_t and a learned embedding e_c,
     divided by a temperature of 0.1, softmax over the k clusters;
  4. loss (sec. II-B): (1 - w) L_m + w L_u, the mean cross-entropy over the masked (L_m) and
     the unmasked (L_u) real frames; the paper's alpha = 1 - w, best at 1 in its ablations
     (sec. V; w = 0, method.unmasked_weight);
  5. HuBERTopic: a linear head on the mean of the encoder's output over the real frames predicts
     the utterance's topic label (LDA over its bag of cluster ids, made by the k-means tool);
     its cross-entropy times method.topic_weight is added to the loss.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax import flops
from mim_jax import frame_masking
from mim_jax import models
from mim_jax.data import logmel
from mim_jax.data import targets as targets_lib
from mim_jax.methods import bestrq
from mim_jax.models import conformer
from mim_jax.models import layers

SUBSAMPLING = targets_lib.STRIDE  # log-mel frames per encoder frame (and per target)


def l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def masked_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean of x over the entries weight marks (0 when none)."""
  weight = weight.astype(jnp.float32)
  return (x * weight).sum() / jnp.maximum(weight.sum(), 1.0)


class HuBERT(nn.Module):
  """Masked prediction of k-means cluster ids with a Conformer encoder (and HuBERTopic's
  utterance topic head when topic_weight > 0)."""
  encoder: nn.Module
  frontend: logmel.FrontEnd
  mask_spec: frame_masking.FrameMaskSpec = frame_masking.FrameMaskSpec("span")
  num_clusters: int = 100      # HuBERT sec. IV-B: 100 MFCC clusters, then 500.
  proj_dim: int = 256          # The projection A's output (HuBERT BASE's final dimension).
  temperature: float = 0.1     # HuBERT sec. II-E.
  unmasked_weight: float = 0.0  # w = 1 - alpha; alpha = 1 is best (HuBERT's ablations, sec. V).
  num_topics: int = 0
  topic_weight: float = 0.0

  def setup(self):
    # wav2vec 2.0 / HuBERT draw the mask embedding uniformly from [0, 1).
    self.mask_embedding = self.param("mask_embedding", nn.initializers.uniform(1.0),
                                     (self.frontend.num_mels,))
    dense = lambda n, name: layers.Dense(n, dtype=self.encoder.dtype,
                                         param_dtype=self.encoder.param_dtype, name=name)
    self.projection = dense(self.proj_dim, "projection")
    # Only their directions matter (cosine similarity): random directions.
    self.code_embeddings = self.param("code_embeddings", nn.initializers.normal(1.0),
                                      (self.num_clusters, self.proj_dim))
    if self.topic_weight > 0:
      self.topic_head = dense(self.num_topics, "topic_head")

  def features_and_valid(self, audio: jax.Array, audio_len: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    return logmel.log_mel(audio, audio_len, self.frontend)

  def __call__(self, audio: jax.Array, audio_len: jax.Array, targets: jax.Array,
               topic: jax.Array | None = None, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) on raw audio [B, L] with audio_len [B] real samples per row, the
    cluster id of every encoder frame targets [B, T'] (-1 = none) and, for HuBERTopic, the
    topic label of every utterance topic [B]."""
    feats, valid = self.features_and_valid(audio, audio_len)
    mask_rng, augment_rng = jax.random.split(self.make_rng("mask"))
    fe = self.frontend
    if train and fe.spec_augment:
      feats = logmel.spec_augment(augment_rng, feats, valid, freq_masks=fe.freq_masks,
                                  freq_width=fe.freq_width, time_masks=fe.time_masks,
                                  time_width=fe.time_width)
    frames = feats.shape[1]
    mask = frame_masking.draw(mask_rng, valid[:, ::SUBSAMPLING], self.mask_spec)  # [B, T']
    input_mask = jnp.repeat(mask, SUBSAMPLING, axis=1)[:, :frames] & valid
    masked = jnp.where(input_mask[..., None], self.mask_embedding.astype(feats.dtype), feats)
    out, aux = self.encoder(masked, valid, train=train)

    projected = l2_normalize(self.projection(out).astype(jnp.float32))
    codes = l2_normalize(self.code_embeddings.astype(jnp.float32))
    logits = jnp.einsum("btd,kd->btk", projected, codes) / self.temperature
    per_frame = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                jnp.maximum(targets, 0))
    real = aux["valid"] & (targets >= 0)
    on_masked, on_unmasked = real & mask, real & ~mask
    masked_loss = masked_mean(per_frame, on_masked)
    unmasked_loss = masked_mean(per_frame, on_unmasked)
    loss = (1 - self.unmasked_weight) * masked_loss + self.unmasked_weight * unmasked_loss
    correct = logits.argmax(-1) == targets
    metrics = {"masked_loss": masked_loss, "unmasked_loss": unmasked_loss,
               "accuracy": masked_mean(correct, on_masked),
               "unmasked_accuracy": masked_mean(correct, on_unmasked),
               "masked_share": on_masked.sum() / jnp.maximum(real.sum(), 1)}
    if self.topic_weight > 0:
      # aux['gap']: the mean of the output over the real frames.
      topic_logits = self.topic_head(aux["gap"]).astype(jnp.float32)
      topic_loss = optax.softmax_cross_entropy_with_integer_labels(topic_logits, topic).mean()
      loss = loss + self.topic_weight * topic_loss
      metrics.update(topic_loss=topic_loss,
                     topic_accuracy=(topic_logits.argmax(-1) == topic).mean())
    return loss, {"loss": loss, **metrics}

  def features(self, audio: jax.Array, audio_len: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the whole, unmasked utterance (for probes, k-NN and the next
    k-means iteration)."""
    feats, valid = self.features_and_valid(audio, audio_len)
    _, aux = self.encoder(feats, valid)
    return aux


num_samples = bestrq.num_samples  # every utterance cropped or zero-padded to the clip length
frontend = bestrq.frontend


def num_targets(config: ml_collections.ConfigDict) -> int:
  """Target (encoder) frames of a clip."""
  return targets_lib.num_targets(num_samples(config), frontend(config))


def inputs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Raw audio, its real length and a cluster id per encoder frame; and the utterance's
  topic label for HuBERTopic."""
  spec = {"audio": jax.ShapeDtypeStruct((num_samples(config),), jnp.float32),
          "audio_len": jax.ShapeDtypeStruct((), jnp.int32),
          "targets": jax.ShapeDtypeStruct((num_targets(config),), jnp.int32)}
  if config.method.topic_weight > 0:
    spec["topic"] = jax.ShapeDtypeStruct((), jnp.int32)
  return spec


def validate(config: ml_collections.ConfigDict) -> None:
  """The config's values; the target file itself is checked when the pipeline reads it
  (data/targets.py), which names the k-means command that makes it."""
  bestrq.check_speech(config, "HuBERT")
  if "targets" not in config.data or not config.data.targets.path:
    raise ValueError("HuBERT trains on k-means targets: set data.targets.path to the .npz "
                     "that python -m mim_jax.tools.kmeans writes")
  t, m = config.data.targets, config.method
  if t.num_clusters < 2:
    raise ValueError(f"data.targets.num_clusters must be >= 2, got {t.num_clusters}")
  out_frames = num_targets(config)
  if out_frames < 1:
    raise ValueError(f"data.clip_seconds {config.data.clip_seconds} is shorter than one "
                     f"log-mel window")
  frame_masking.validate(config.mask, out_frames)
  if m.proj_dim < 1 or m.temperature <= 0:
    raise ValueError(f"method.proj_dim must be >= 1 and method.temperature > 0, got "
                     f"{m.proj_dim} and {m.temperature}")
  if not 0 <= m.unmasked_weight <= 1:
    raise ValueError(f"method.unmasked_weight must be in [0, 1], got {m.unmasked_weight}")
  if m.topic_weight < 0:
    raise ValueError(f"method.topic_weight must be >= 0 (0 = plain HuBERT), got "
                     f"{m.topic_weight}")
  if m.topic_weight > 0 and t.num_topics < 2:
    raise ValueError(f"method.topic_weight {m.topic_weight} needs topic labels: set "
                     f"data.targets.num_topics >= 2 (the k-means tool's --topics), got "
                     f"{t.num_topics}")


def build(config: ml_collections.ConfigDict) -> HuBERT:
  m, t = config.method, config.data.targets
  return HuBERT(encoder=models.build_encoder(config), frontend=frontend(config),
                mask_spec=frame_masking.FrameMaskSpec.from_config(config.mask),
                num_clusters=t.num_clusters, proj_dim=m.proj_dim, temperature=m.temperature,
                unmasked_weight=m.unmasked_weight, num_topics=t.num_topics,
                topic_weight=m.topic_weight)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one utterance: the Conformer, the projection, the cosine
  scores against every cluster embedding and the topic head, times 3. The log-mel FFT is left
  out (not a matmul)."""
  size = conformer.parse_variant(config.model.variant)
  m, t = config.method, config.data.targets
  frames = logmel.num_frames(num_samples(config), frontend(config))
  out_frames = num_targets(config)
  forward = (flops.conformer(frames, config.frontend.num_mels, size.width, size.depth,
                             size.heads, size.conv_kernel)
             + flops.dense(out_frames, size.width, m.proj_dim)
             + flops.dense(out_frames, m.proj_dim, t.num_clusters))
  if m.topic_weight > 0:
    forward += flops.dense(1, size.width, t.num_topics)
  return flops.TRAIN_MULTIPLIER * forward
