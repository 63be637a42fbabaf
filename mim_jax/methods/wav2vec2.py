"""wav2vec 2.0 (Baevski et al. 2020, "wav2vec 2.0: A Framework for Self-Supervised Learning of
Speech Representations") on a Conformer: a contrastive task over masked spans, whose targets
are Gumbel-softmax quantizations of the unmasked local features.

From raw audio, inside the jitted step:
  1. log-mel features (data/logmel.py), normalised per utterance;
  2. local features z: every 4 frames stacked into one vector (bestrq.stack_frames), so z_t
     covers exactly the input frames that the Conformer's 4x subsampling turns into its output
     frame t (the frames it starts from, valid[:, ::4]);
  3. quantized targets q_t from z_t (gumbel_quantizer.py: G = 2 groups of V = 320 entries,
     temperature annealed from 2 to 0.5 by 0.999995 per update, sec. 4.2), unmasked;
  4. masking: spans over the encoder's frames (frame_masking 'span': p = 0.065, M = 10, sec.
     4.2); every input frame of a masked encoder frame is replaced by a learned mask embedding
     (sec. 3.1);
  5. the Conformer encodes the masked features into context vectors c_t; the contrastive loss
     (eq. 3) at each masked real frame t: -log softmax over {q_t, K = 100 distractors} of
     cos(W c_t, q) / kappa, kappa = 0.1 (sec. 3.2, 4.2), the distractors drawn uniformly from
     the other masked real frames of the same utterance;
  6. loss = contrastive + alpha * diversity (eq. 2 and 4, alpha = 0.1, sec. 4.2).

Departures from the paper, and why:
  - Local features. The paper's z is a CNN's output, shared by the quantizer and (masked) the
    Transformer. conformer.py's subsampling runs inside the encoder, on whatever it is given,
    so it cannot both see the unmasked input (for the targets) and the masked one without a
    second encoder pass or a change to the encoder. z is therefore the stacked log-mel frames
    themselves, and the quantizer's logits are a learned linear map of them (a learned
    projection before the logits layer would compose into it). BEST-RQ (Chiu et al. 2022)
    finds such stacked, normalised frames enough to quantize into targets.
  - Masking happens on the input, not on z (masking z would need the same encoder change): an
    encoder frame is masked by masking its 4 input frames. The spans are drawn over encoder
    frames so that the input frames of a masked encoder frame, exactly its target's, are
    hidden from the whole encoder; spans over input frames would leave part of some masked
    frames' input, and so of their targets, in view.
    Encoder frames are 40 ms against the paper's 20 ms: p and M keep their values in frames,
    which keeps the masked share (about 49%, sec. 4.2) and doubles the span duration.
  - Distractors are sampled with replacement (the paper says "uniformly sampled"), so an
    utterance with fewer than K + 1 masked frames repeats some; an utterance with fewer than 2
    masked real frames has none and is left out of the loss. A distractor whose code equals the
    positive's stays a distractor.
  - The diversity loss averages the softmax over every real frame of the global batch, masked
    or not.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax import frame_masking
from mim_jax import models
from mim_jax.data import logmel
from mim_jax.methods import bestrq
from mim_jax.methods import gumbel_quantizer
from mim_jax.models import conformer
from mim_jax.models import layers

SUBSAMPLING = bestrq.SUBSAMPLING  # The Conformer's two stride-2 convolutions.
MASK_FILLS = ("learned", "noise")

# The method's inputs are BEST-RQ's: raw audio and its real length; the log-mel runs on device.
inputs = bestrq.inputs
num_samples = bestrq.num_samples
frontend = bestrq.frontend


def encoder_frame_mask(rng: jax.Array, valid: jax.Array, spec: frame_masking.FrameMaskSpec
                       ) -> tuple[jax.Array, jax.Array]:
  """Spans drawn over the encoder's frames: (mask over encoder frames [B, ceil(T/4)], the same
  mask over input frames [B, T]: all 4 input frames of a masked encoder frame, never padding)."""
  frames = valid.shape[1]
  encoder_mask = frame_masking.draw(rng, valid[:, ::SUBSAMPLING], spec)
  input_mask = jnp.repeat(encoder_mask, SUBSAMPLING, axis=1)[:, :frames] & valid
  return encoder_mask, input_mask


def sample_distractors(rng: jax.Array, mask: jax.Array, num: int) -> jax.Array:
  """For every frame t, `num` frames (int32 [B, T, num]) drawn uniformly, with replacement,
  among the OTHER masked frames of the same row (`mask` [B, T], True = masked real frame).

  Static shapes: each row lists its masked frames first (a stable sort), and t, the r-th masked
  frame of its row, draws list indices from the n - 1 others: a uniform j in [0, n - 1), then
  j + 1 where j >= r, which skips t itself. Draws for unmasked frames, and for rows with fewer
  than 2 masked frames, are meaningless: the loss leaves those frames out."""
  batch, frames = mask.shape
  order = jnp.argsort(~mask, axis=1, stable=True)            # masked frames first, in order
  others = jnp.maximum(mask.sum(1) - 1, 1)[:, None, None]    # n - 1 (>= 1 for randint)
  rank = (jnp.cumsum(mask, axis=1) - 1)[:, :, None]          # r: t's place among the masked
  j = jax.random.randint(rng, (batch, frames, num), 0, others)
  j = j + (j >= rank)
  return jnp.take_along_axis(order, j.reshape(batch, -1), axis=1).reshape(batch, frames, num)


def contrastive_loss(context: jax.Array, targets: jax.Array, distractors: jax.Array,
                     weight: jax.Array, kappa: float) -> tuple[jax.Array, jax.Array]:
  """wav2vec 2.0's eq. 3 averaged over the frames `weight` [B, T] marks: -log of the softmax,
  over {targets_t} + {targets_d : d in distractors_t}, of cos(context_t, .) / kappa. Returns
  (loss, accuracy: the share of those frames whose positive scores above every distractor).

  The cosines of every context with every target of its utterance are one [B, T, T] matmul, and
  the distractors' are gathered from it: cheaper than gathering K target vectors per frame."""
  c, q = (bestrq.l2_normalize(x.astype(jnp.float32)) for x in (context, targets))
  cosines = jnp.einsum("btd,bsd->bts", c, q) / kappa
  positive = jnp.diagonal(cosines, axis1=1, axis2=2)[..., None]
  negative = jnp.take_along_axis(cosines, distractors, axis=2)
  logits = jnp.concatenate([positive, negative], axis=-1)
  per_frame = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
  weight = weight.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  correct = (positive[..., 0] > negative.max(-1)).astype(jnp.float32)
  return (per_frame * weight).sum() / count, (correct * weight).sum() / count


class Wav2Vec2(nn.Module):
  """wav2vec 2.0's contrastive task with a Conformer context network (see the module
  docstring). w2v_bert.W2VBert extends it."""
  encoder: nn.Module
  frontend: logmel.FrontEnd
  mask_spec: frame_masking.FrameMaskSpec = frame_masking.FrameMaskSpec("span")
  groups: int = 2              # wav2vec 2.0 sec. 4.2: G = 2 codebooks of V = 320 entries,
  entries: int = 320           # 128 wide each for BASE (codevector_dim 256).
  codevector_dim: int = 256
  final_dim: int = 256         # Width of the projected context and quantized vectors.
  temperature: gumbel_quantizer.TemperatureSchedule = gumbel_quantizer.TemperatureSchedule()
  num_distractors: int = 100   # K = 100 (sec. 4.2).
  kappa: float = 0.1           # Temperature of the contrastive softmax (sec. 4.2).
  diversity_weight: float = 0.1  # alpha (sec. 4.2).
  mask_fill: str = "learned"   # learned: a trained mask embedding (sec. 3.1); noise: N(0, 1).

  def setup(self):
    dtype, param_dtype = self.encoder.dtype, self.encoder.param_dtype
    self.quantizer = gumbel_quantizer.GumbelQuantizer(
        self.groups, self.entries, self.codevector_dim, self.final_dim, dtype, param_dtype)
    self.context_proj = layers.dense(self.final_dim, "context_proj", dtype, param_dtype)
    if self.mask_fill == "learned":
      # On the input side (see the module docstring), so one value per mel bin. The paper
      # leaves its init open; a small normal starts it near the normalised features' mean.
      self.mask_embedding = self.param("mask_embedding", nn.initializers.normal(0.02),
                                       (self.frontend.num_mels,), param_dtype)

  def encode_masked(self, audio: jax.Array, audio_len: jax.Array, *, train: bool,
                    step: jax.Array | int) -> dict[str, jax.Array]:
    """Everything both losses need: the quantized targets of the unmasked features, the
    encoder's output and aux on the masked ones, the mask over encoder frames, the temperature."""
    feats, valid = logmel.log_mel(audio, audio_len, self.frontend)
    mask_rng, gumbel_rng, fill_rng, augment_rng, distractor_rng = jax.random.split(
        self.make_rng("mask"), 5)
    temperature = self.temperature(step)
    stacked, _ = bestrq.stack_frames(feats, valid, SUBSAMPLING)
    quantized = self.quantizer(stacked, temperature=temperature, train=train, rng=gumbel_rng)
    fe = self.frontend
    if train and fe.spec_augment:
      feats = logmel.spec_augment(augment_rng, feats, valid, freq_masks=fe.freq_masks,
                                  freq_width=fe.freq_width, time_masks=fe.time_masks,
                                  time_width=fe.time_width)
    mask, input_mask = encoder_frame_mask(mask_rng, valid, self.mask_spec)
    if self.mask_fill == "learned":
      fill = self.mask_embedding.astype(feats.dtype)
    else:
      fill = jax.random.normal(fill_rng, feats.shape, feats.dtype)
    out, aux = self.encoder(jnp.where(input_mask[..., None], fill, feats), valid, train=train)
    # Rows with fewer than 2 masked frames have no distractor to draw: left out of the loss.
    weight = mask & (mask.sum(1, keepdims=True) >= 2)
    return {"quantized": quantized, "out": out, "aux": aux, "mask": mask, "weight": weight,
            "temperature": temperature,
            "distractors": sample_distractors(distractor_rng, mask, self.num_distractors)}

  def contrastive_terms(self, context: jax.Array, enc: dict[str, jax.Array]
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(contrastive + alpha * diversity, metrics) for the context vectors [B, T', D]."""
    quantized, valid = enc["quantized"], enc["aux"]["valid"]
    contrastive, accuracy = contrastive_loss(self.context_proj(context), quantized.vectors,
                                             enc["distractors"], enc["weight"], self.kappa)
    diversity = gumbel_quantizer.diversity_loss(quantized.probs, valid)
    used = jax.nn.one_hot(quantized.ids, self.entries, dtype=jnp.float32)
    metrics = {
        "contrastive": contrastive, "diversity": diversity, "accuracy": accuracy,
        "temperature": enc["temperature"],
        # exp(entropy) of the codes the quantizer assigns over the batch (its argmax ids),
        # summed over groups: at most G * V.
        "code_perplexity": gumbel_quantizer.perplexity(used, valid).sum(),
        "masked_share": enc["mask"].sum() / jnp.maximum(valid.sum(), 1)}
    return contrastive + self.diversity_weight * diversity, metrics

  def __call__(self, audio: jax.Array, audio_len: jax.Array, *, train: bool = True,
               step: jax.Array | int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) on raw audio [B, L] with audio_len [B] real samples per row; `step`
    (the trainer's update count) sets the Gumbel temperature."""
    enc = self.encode_masked(audio, audio_len, train=train, step=step)
    loss, metrics = self.contrastive_terms(enc["out"], enc)
    return loss, {"loss": loss, **metrics}

  def features(self, audio: jax.Array, audio_len: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the whole, unmasked utterance (for probes and k-NN)."""
    feats, valid = logmel.log_mel(audio, audio_len, self.frontend)
    _, aux = self.encoder(feats, valid)
    return aux


def module_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The Wav2Vec2 fields from the config (w2v_bert.py adds its own)."""
  m = config.method
  return dict(encoder=models.build_encoder(config), frontend=frontend(config),
              mask_spec=frame_masking.FrameMaskSpec.from_config(config.mask),
              groups=m.groups, entries=m.entries, codevector_dim=m.codevector_dim,
              final_dim=m.final_dim,
              temperature=gumbel_quantizer.TemperatureSchedule.from_config(m.temperature),
              num_distractors=m.num_distractors, kappa=m.kappa,
              diversity_weight=m.diversity_weight, mask_fill=m.mask_fill)


def build(config: ml_collections.ConfigDict) -> Wav2Vec2:
  return Wav2Vec2(**module_kwargs(config))


def validate(config: ml_collections.ConfigDict, method: str = "wav2vec 2.0") -> None:
  bestrq.check_speech(config, method)
  frames = logmel.num_frames(num_samples(config), frontend(config))
  if frames < SUBSAMPLING:
    raise ValueError(f"data.clip_seconds {config.data.clip_seconds} gives {frames} log-mel "
                     f"frames; {method} needs at least {SUBSAMPLING}")
  frame_masking.validate(config.mask, encoder_frames(config))  # spans over encoder frames
  m = config.method
  for field in ("groups", "entries", "codevector_dim", "final_dim", "num_distractors"):
    if m[field] < 1:
      raise ValueError(f"method.{field} must be positive, got {m[field]}")
  if m.codevector_dim % m.groups:
    raise ValueError(f"method.codevector_dim {m.codevector_dim} must be divisible by "
                     f"method.groups {m.groups}")
  if m.kappa <= 0 or m.diversity_weight < 0:
    raise ValueError(f"method.kappa must be > 0 and method.diversity_weight >= 0, got "
                     f"{m.kappa}, {m.diversity_weight}")
  if m.mask_fill not in MASK_FILLS:
    raise ValueError(f"method.mask_fill {m.mask_fill!r} is not one of {MASK_FILLS}")
  gumbel_quantizer.TemperatureSchedule.from_config(m.temperature).validate("method.temperature")


def encoder_frames(config: ml_collections.ConfigDict) -> int:
  """Frames per utterance after the Conformer's 4x subsampling."""
  return -(-logmel.num_frames(num_samples(config), frontend(config)) // SUBSAMPLING)


def contrastive_flops(config: ml_collections.ConfigDict) -> int:
  """Forward FLOPs of one utterance outside the Conformer, shared with w2v-BERT: the quantizer
  (logits of the stacked frames, the one-hot pick of the entries, the projection), the context
  projection and the [T', T'] cosines of the contrastive loss."""
  size = conformer.parse_variant(config.model.variant)
  m = config.method
  n = encoder_frames(config)
  quantizer = (flops.dense(n, SUBSAMPLING * config.frontend.num_mels, m.groups * m.entries)
               + flops.dense(n, m.entries, m.codevector_dim)  # G picks of V x (d / G)
               + flops.dense(n, m.codevector_dim, m.final_dim))
  return quantizer + flops.dense(n, size.width, m.final_dim) + 2 * n * n * m.final_dim


def conformer_flops(config: ml_collections.ConfigDict) -> int:
  """Forward FLOPs of the Conformer on one utterance (flops.conformer)."""
  size = conformer.parse_variant(config.model.variant)
  frames = logmel.num_frames(num_samples(config), frontend(config))
  return flops.conformer(frames, config.frontend.num_mels, size.width, size.depth, size.heads,
                         size.conv_kernel)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one utterance: the Conformer and the contrastive parts, times
  3 (everything trains, the quantizer included). The log-mel front end is left out."""
  return flops.TRAIN_MULTIPLIER * (conformer_flops(config) + contrastive_flops(config))
