"""TERA (Liu et al. 2021, "TERA: Self-Supervised Learning of Transformer Encoder Representation
for Speech"): reconstruction of log-mel frames from an altered copy of them.

From raw audio, inside the jitted step:
  1. log-mel features (data/logmel.py), normalised per utterance (TERA's inputs and targets are
     mean- and variance-normalised log-mels);
  2. the alterations, in TERA's order (frame_masking.py):
     time (sec. III-A): spans of 7 frames over 15% of the real frames (the frame mask
       `config.mask.name`, 'tera'); per utterance they are zeroed (80%), replaced by random
       segments of the same utterance (10%) or kept (10%) (`frame_masking.alter_frames`);
     then the feature alterations of `method.alterations` (frame_masking.ALTERATIONS):
       frequency (sec. III-B): one band of 0 to 20% of the mel bins set to 0;
       magnitude (sec. III-C): Gaussian noise on 15% of the utterances;
  3. the encoder reads the altered features; TERA's prediction network (a dense layer, GELU,
     LayerNorm, a dense layer) maps each encoder frame back to log-mel frames;
  4. L1 between the prediction and the original (unaltered) features, averaged over the altered
     positions: the time-altered frames (all bins, kept ones included) and the frequency-altered
     bins, on real frames only. Noise alone makes no position a target, as in TERA.

Departures from the paper:
  - The encoder is the Conformer (models/conformer.py), the encoder of this codebase's speech
    family, where TERA uses a Transformer encoder. The Conformer subsamples time 4x, so the head
    predicts the 4 stacked frames (4 x 80 values) each encoder frame covers, as Mockingjay, TERA's
    predecessor, predicted its stacked frames when it downsampled.
  - Span counts are stochastically rounded and the noise is drawn per utterance, not per batch
    (frame_masking.tera_mask, tera_magnitude).
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
from mim_jax.models import conformer
from mim_jax.models import layers

SUBSAMPLING = bestrq.SUBSAMPLING  # The Conformer's two stride-2 convolutions.


class Tera(nn.Module):
  """Reconstruction of the original log-mel frames from altered ones, with a Conformer."""
  encoder: nn.Module
  frontend: logmel.FrontEnd
  mask_spec: frame_masking.FrameMaskSpec = frame_masking.FrameMaskSpec("tera")
  alterations: tuple[frame_masking.FrameMaskSpec, ...] = ()
  zero_prob: float = 0.8     # TERA sec. III-A: 80% zeroed, 10% replaced, 10% unchanged.
  replace_prob: float = 0.1

  def setup(self):
    kw = {"dtype": self.encoder.dtype, "param_dtype": self.encoder.param_dtype}
    # TERA's prediction network: two feed-forward layers, GELU and LayerNorm between them.
    self.head_hidden = layers.Dense(self.encoder.width, **kw)
    self.head_norm = nn.LayerNorm(**kw)
    self.head_out = layers.Dense(SUBSAMPLING * self.frontend.num_mels, **kw)

  def alter(self, rng: jax.Array, feats: jax.Array, valid: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """(altered feats [B, T, M], targets bool [B, T, M]: the positions the loss scores)."""
    time_rng, fill_rng, rng = jax.random.split(rng, 3)
    frames = frame_masking.draw(time_rng, valid, self.mask_spec)
    altered = frame_masking.alter_frames(fill_rng, feats, valid, frames,
                                         zero_prob=self.zero_prob, replace_prob=self.replace_prob)
    targets = jnp.broadcast_to(frames[..., None], feats.shape)
    for spec, key in zip(self.alterations, jax.random.split(rng, len(self.alterations))):
      altered, more = frame_masking.alter(key, altered, valid, spec)
      targets = targets | more
    return altered, targets & valid[..., None]

  def predict(self, out: jax.Array, frames: int) -> jax.Array:
    """Encoder output [B, T', D] -> predicted log-mel frames [B, frames, M], float32."""
    x = self.head_out(self.head_norm(nn.gelu(self.head_hidden(out), approximate=False)))
    batch, groups, _ = x.shape
    return x.reshape(batch, groups * SUBSAMPLING, -1)[:, :frames].astype(jnp.float32)

  def __call__(self, audio: jax.Array, audio_len: jax.Array, *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) on raw audio [B, L] with audio_len [B] real samples per row."""
    feats, valid = logmel.log_mel(audio, audio_len, self.frontend)
    altered, targets = self.alter(self.make_rng("mask"), feats, valid)
    out, _ = self.encoder(altered, valid, train=train)
    predicted = self.predict(out, feats.shape[1])
    weight = targets.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (jnp.abs(predicted - feats.astype(jnp.float32)) * weight).sum() / count
    real = jnp.maximum(valid.sum() * feats.shape[-1], 1)
    return loss, {"loss": loss, "altered_share": weight.sum() / real}

  def features(self, audio: jax.Array, audio_len: jax.Array) -> dict[str, jax.Array]:
    """Encoder features of the whole, unaltered utterance (for probes and k-NN)."""
    feats, valid = logmel.log_mel(audio, audio_len, self.frontend)
    _, aux = self.encoder(feats, valid)
    return aux


inputs = bestrq.inputs  # raw audio [L] and audio_len: the log-mel runs on the device


def validate(config: ml_collections.ConfigDict) -> None:
  bestrq.check_speech(config, "TERA")
  fe = bestrq.frontend(config)
  if fe.spec_augment:
    raise ValueError("TERA alters time and frequency itself: set frontend.spec_augment False")
  frames = logmel.num_frames(bestrq.num_samples(config), fe)
  if frames < SUBSAMPLING:
    raise ValueError(f"data.clip_seconds {config.data.clip_seconds} gives {frames} log-mel "
                     f"frames; TERA needs at least {SUBSAMPLING}")
  frame_masking.validate(config.mask, frames)
  for name in config.method.alterations:
    frame_masking.validate_alteration(config.mask, name, frames, fe.num_mels)
  m = config.method
  if min(m.zero_prob, m.replace_prob) < 0 or m.zero_prob + m.replace_prob > 1:
    raise ValueError(f"method.zero_prob {m.zero_prob} and method.replace_prob "
                     f"{m.replace_prob} must be >= 0 with a sum <= 1")


def build(config: ml_collections.ConfigDict) -> Tera:
  m = config.method
  return Tera(encoder=models.build_encoder(config), frontend=bestrq.frontend(config),
              mask_spec=frame_masking.FrameMaskSpec.from_config(config.mask),
              alterations=tuple(frame_masking.FrameMaskSpec.from_config(config.mask, name)
                                for name in m.alterations),
              zero_prob=m.zero_prob, replace_prob=m.replace_prob)


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one utterance: the Conformer and the two-layer prediction head,
  times 3. The log-mel FFT is left out (not a matmul)."""
  size = conformer.parse_variant(config.model.variant)
  frames = logmel.num_frames(bestrq.num_samples(config), bestrq.frontend(config))
  out_frames = -(-frames // SUBSAMPLING)
  mels = config.frontend.num_mels
  forward = (flops.conformer(frames, mels, size.width, size.depth, size.heads, size.conv_kernel)
             + flops.dense(out_frames, size.width, size.width)
             + flops.dense(out_frames, size.width, SUBSAMPLING * mels))
  return flops.TRAIN_MULTIPLIER * forward
