"""BEST-RQ (Chiu et al. 2022, "Self-supervised Learning with Random-projection Quantizer for
Speech Recognition"): masked prediction of random-projection quantizer targets.

From raw audio, inside the jitted step:
  1. log-mel features (data/logmel.py), normalised (the paper finds input normalisation
     critical for the quantizer, sec. 3.1);
  2. targets: every `stack` frames (the encoder's 4x subsampling, so one target per encoder
     frame) are concatenated, projected by a frozen random matrix (xavier init) and l2-normalised;
     the target id is the nearest entry of a frozen random codebook (standard normal, then
     l2-normalised), i.e. the highest cosine similarity. With `num_codebooks` > 1 each codebook
     has its own projection and its own softmax head (the paper's multi-codebook variant);
  3. masking: spans of frames (frame_masking.py; 400 ms starting with probability 0.01 in the
     paper) replaced by noise ~ N(0, 0.1^2);
  4. the Conformer encodes the masked features; a linear softmax head per codebook predicts the
     target ids; cross-entropy over the encoder frames that a mask span touches and that are not
     padding.
The projection and codebook are parameters named `frozen_*`: the optimizer never updates them
(optim.skip_frozen), but checkpoints save them, so a resumed run computes the same targets.
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
from mim_jax.models import conformer

SUBSAMPLING = 4  # The Conformer's two stride-2 convolutions.


def stack_frames(feats: jax.Array, valid: jax.Array, stack: int) -> tuple[jax.Array, jax.Array]:
  """[B, T, M] -> [B, ceil(T/stack), stack*M], zero-padded at the end; a group is valid when its
  first frame is (the frames the encoder's output frame j starts from: valid[:, ::stack])."""
  batch, frames, mels = feats.shape
  groups = -(-frames // stack)
  feats = jnp.pad(feats, ((0, 0), (0, groups * stack - frames), (0, 0)))
  return feats.reshape(batch, groups, stack * mels), valid[:, ::stack]


def group_any(mask: jax.Array, stack: int) -> jax.Array:
  """bool [B, T] -> [B, ceil(T/stack)]: whether any frame of each group is set."""
  batch, frames = mask.shape
  groups = -(-frames // stack)
  mask = jnp.pad(mask, ((0, 0), (0, groups * stack - frames)))
  return mask.reshape(batch, groups, stack).any(-1)


def l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


class BestRQ(nn.Module):
  """Masked prediction of random-projection quantizer targets with a Conformer encoder."""
  encoder: nn.Module
  frontend: logmel.FrontEnd
  mask_spec: frame_masking.FrameMaskSpec = frame_masking.FrameMaskSpec("bestrq")
  codebook_size: int = 8192   # BEST-RQ sec. 4.1: 8192 entries of dimension 16.
  codebook_dim: int = 16
  num_codebooks: int = 1
  noise_std: float = 0.1      # BEST-RQ sec. 3.1: masked frames become N(0, 0.1^2) noise.

  def setup(self):
    stacked = SUBSAMPLING * self.frontend.num_mels
    # Xavier per codebook: the fans are the stacked frames and the codebook dimension.
    self.frozen_projection = self.param(
        "frozen_projection", nn.initializers.xavier_uniform(in_axis=1, out_axis=2,
                                                            batch_axis=(0,)),
        (self.num_codebooks, stacked, self.codebook_dim))
    self.frozen_codebook = self.param(
        "frozen_codebook", nn.initializers.normal(1.0),
        (self.num_codebooks, self.codebook_size, self.codebook_dim))
    self.head = nn.DenseGeneral((self.num_codebooks, self.codebook_size),
                                dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype)

  def quantize(self, feats: jax.Array, valid: jax.Array) -> jax.Array:
    """Target ids int32 [B, T', num_codebooks] of normalised log-mel features [B, T, M]."""
    stacked, _ = stack_frames(feats, valid, SUBSAMPLING)
    projection, codebook = jax.lax.stop_gradient((self.frozen_projection, self.frozen_codebook))
    projected = l2_normalize(jnp.einsum("btf,cfd->btcd", stacked, projection))
    similarity = jnp.einsum("btcd,cvd->btcv", projected, l2_normalize(codebook))
    return similarity.argmax(-1).astype(jnp.int32)

  def features_and_valid(self, audio: jax.Array, audio_len: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    return logmel.log_mel(audio, audio_len, self.frontend)

  def __call__(self, audio: jax.Array, audio_len: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) on raw audio [B, L] with audio_len [B] real samples per row."""
    feats, valid = self.features_and_valid(audio, audio_len)
    targets = self.quantize(feats, valid)  # from the clean features
    mask_rng, noise_rng, augment_rng = jax.random.split(self.make_rng("mask"), 3)
    fe = self.frontend
    if train and fe.spec_augment:
      feats = logmel.spec_augment(augment_rng, feats, valid, freq_masks=fe.freq_masks,
                                  freq_width=fe.freq_width, time_masks=fe.time_masks,
                                  time_width=fe.time_width)
    mask = frame_masking.draw(mask_rng, valid, self.mask_spec)
    noise = self.noise_std * jax.random.normal(noise_rng, feats.shape, feats.dtype)
    out, aux = self.encoder(jnp.where(mask[..., None], noise, feats), valid, train=train)
    logits = self.head(out).astype(jnp.float32)
    weight = (group_any(mask, SUBSAMPLING) & aux["valid"]).astype(jnp.float32)  # [B, T']
    per_frame = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (per_frame * weight).sum() / count
    correct = (logits.argmax(-1) == targets).mean(-1)
    return loss, {"loss": loss, "accuracy": (correct * weight).sum() / count,
                  "masked_share": weight.sum() / jnp.maximum(aux["valid"].sum(), 1)}

  def features(self, audio: jax.Array, audio_len: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the whole, unmasked utterance (for probes and k-NN)."""
    feats, valid = self.features_and_valid(audio, audio_len)
    _, aux = self.encoder(feats, valid)
    return aux


def num_samples(config: ml_collections.ConfigDict) -> int:
  """Samples per utterance: every utterance is cropped or zero-padded to data.clip_seconds."""
  return round(config.data.clip_seconds * config.data.sample_rate)


def frontend(config: ml_collections.ConfigDict) -> logmel.FrontEnd:
  return logmel.FrontEnd.from_config(config.frontend, config.data.sample_rate)


def inputs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Raw audio [L] float32 and its number of real samples: the log-mel runs on the device."""
  return {"audio": jax.ShapeDtypeStruct((num_samples(config),), jnp.float32),
          "audio_len": jax.ShapeDtypeStruct((), jnp.int32)}


def check_speech(config: ml_collections.ConfigDict, method: str) -> None:
  """Raises ValueError naming `method` unless the config pairs a Conformer with audio data: what
  every speech method here needs (TERA, HuBERT and wav2vec 2.0 call it too)."""
  if config.model.name != "conformer":
    raise ValueError(f"{method} needs model.name 'conformer', got {config.model.name!r}")
  if config.data.get("modality", "image") != "audio":
    raise ValueError(f"{method} needs audio data (data.modality 'audio'), got data.name "
                     f"{config.data.name!r} of modality {config.data.get('modality', 'image')!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  check_speech(config, "BEST-RQ")
  fe = frontend(config)
  frames = logmel.num_frames(num_samples(config), fe)
  if frames < SUBSAMPLING:
    raise ValueError(f"data.clip_seconds {config.data.clip_seconds} gives {frames} log-mel "
                     f"frames; BEST-RQ needs at least {SUBSAMPLING}")
  frame_masking.validate(config.mask, frames)
  m = config.method
  for field in ("codebook_size", "codebook_dim", "num_codebooks"):
    if m[field] < 1:
      raise ValueError(f"method.{field} must be positive, got {m[field]}")
  if m.noise_std < 0:
    raise ValueError(f"method.noise_std must be >= 0, got {m.noise_std}")


def build(config: ml_collections.ConfigDict) -> BestRQ:
  m = config.method
  return BestRQ(encoder=models.build_encoder(config), frontend=frontend(config),
                mask_spec=frame_masking.FrameMaskSpec.from_config(config.mask),
                codebook_size=m.codebook_size, codebook_dim=m.codebook_dim,
                num_codebooks=m.num_codebooks, noise_std=m.noise_std)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one utterance: the Conformer and the softmax heads, times 3;
  plus the quantizer's projection and codebook search, forward only (frozen, no gradient).
  The log-mel FFT is left out (not a matmul)."""
  size = conformer.parse_variant(config.model.variant)
  m = config.method
  frames = logmel.num_frames(num_samples(config), frontend(config))
  out_frames = -(-frames // SUBSAMPLING)
  mels = config.frontend.num_mels
  forward = (flops.conformer(frames, mels, size.width, size.depth, size.heads, size.conv_kernel)
             + flops.dense(out_frames, size.width, m.num_codebooks * m.codebook_size))
  quantizer = m.num_codebooks * (flops.dense(out_frames, SUBSAMPLING * mels, m.codebook_dim)
                                 + flops.dense(out_frames, m.codebook_dim, m.codebook_size))
  return flops.TRAIN_MULTIPLIER * forward + quantizer
