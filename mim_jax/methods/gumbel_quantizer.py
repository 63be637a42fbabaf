"""The Gumbel-softmax product quantizer of wav2vec 2.0 (Baevski et al. 2020, sec. 2 and 3.1),
its temperature schedule and its diversity loss (eq. 4): the targets of wav2vec2.py's
contrastive task and of w2v_bert.py's masked prediction.

A feature vector z gets, for each of G groups (codebooks), V logits from one linear layer. In
training, group g picks entry argmax_v (l_gv + n_v) with Gumbel noise n (a sample of
softmax(l_g)), and the gradient flows as if the pick were the soft probabilities
softmax((l_g + n) / tau) (straight-through Gumbel-softmax, Jang et al. 2016; sec. 3.1). At
evaluation the pick is argmax_v l_gv, without noise. The G picked entries (each d/G wide) are
concatenated and projected linearly to the output width (sec. 2, "Quantization module").
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.models import layers


class TemperatureSchedule(NamedTuple):
  """tau(step) = max(end, start * decay^step): wav2vec 2.0 anneals from 2 to a minimum of 0.5
  (BASE; 0.1 for LARGE) by a factor of 0.999995 per update (sec. 4.2). Hashable, so a flax
  module holds it as a field."""
  start: float = 2.0
  end: float = 0.5
  decay: float = 0.999995

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "TemperatureSchedule":
    return cls(c.start, c.end, c.decay)

  def __call__(self, step: jax.Array | int) -> jax.Array:
    # exp(step * log decay) with the log taken in float64 on the host: 0.999995 in float32 is
    # off by 1e-8, which is 0.2% of 1 - decay, and 0.07% of tau after 100k updates.
    step = jnp.asarray(step, jnp.float32)
    return jnp.maximum(self.end, self.start * jnp.exp(step * math.log(self.decay)))

  def validate(self, where: str) -> None:
    if not 0 < self.end <= self.start:
      raise ValueError(f"{where}: need 0 < end <= start, got start {self.start}, end {self.end}")
    if not 0 < self.decay <= 1:
      raise ValueError(f"{where}.decay must be in (0, 1], got {self.decay}")


def straight_through_gumbel(rng: jax.Array, logits: jax.Array, temperature: jax.Array
                            ) -> jax.Array:
  """One-hot [..., V] of argmax(logits + Gumbel noise) in the forward pass, with the gradient
  of softmax((logits + noise) / temperature), the soft sample it rounds."""
  noisy = logits + jax.random.gumbel(rng, logits.shape, logits.dtype)
  soft = jax.nn.softmax(noisy / temperature, axis=-1)
  hard = jax.nn.one_hot(noisy.argmax(-1), logits.shape[-1], dtype=soft.dtype)
  return hard + soft - jax.lax.stop_gradient(soft)


def perplexity(probs: jax.Array, weight: jax.Array) -> jax.Array:
  """exp(entropy) of each group's distribution averaged over the frames `weight` marks:
  probs [..., G, V], weight [...] -> [G]. V when every entry is used equally, 1 when one is."""
  weight = weight.astype(jnp.float32)[..., None, None]
  mean = (probs * weight).reshape(-1, *probs.shape[-2:]).sum(0) / jnp.maximum(weight.sum(), 1.0)
  return jnp.exp(-(mean * jnp.log(jnp.maximum(mean, 1e-12))).sum(-1))


def diversity_loss(probs: jax.Array, weight: jax.Array) -> jax.Array:
  """wav2vec 2.0's diversity loss, in the form its footnote to eq. 4 says the implementation
  uses: (GV - sum_g perplexity(p_g)) / GV, p_g the softmax over group g's entries (no noise,
  no temperature) averaged over the batch's real frames. 0 when every entry is used equally,
  1 - 1/V when each group always picks one entry; maximising the perplexity maximises the
  entropy, as eq. 4's -H(p_g) / GV does."""
  groups, entries = probs.shape[-2:]
  return (groups * entries - perplexity(probs, weight).sum()) / (groups * entries)


class Quantized(NamedTuple):
  vectors: jax.Array  # [..., out_dim]: the projected concatenation of the picked entries
  ids: jax.Array      # int32 [..., G]: each group's most likely entry, argmax of the logits
                      # without noise (what evaluation picks; w2v-BERT's prediction targets)
  probs: jax.Array    # float32 [..., G, V]: softmax of the logits (for the diversity loss)


class GumbelQuantizer(nn.Module):
  """Product quantizer with G groups of V entries of codevector_dim / G each (paper: G = 2,
  V = 320, entries 128 wide for BASE, sec. 4.2). Parameters: 'logits' (Linear to G*V),
  'codebook' [G, V, codevector_dim / G], 'proj' (Linear to out_dim)."""
  groups: int = 2
  entries: int = 320
  codevector_dim: int = 256
  out_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, *, temperature: jax.Array, train: bool,
               rng: jax.Array | None = None) -> Quantized:
    """z [..., F] -> Quantized. Training samples with Gumbel noise from `rng`."""
    g, v = self.groups, self.entries
    logits = layers.dense(g * v, "logits", self.dtype, self.param_dtype)(z)
    logits = logits.astype(jnp.float32).reshape(*z.shape[:-1], g, v)
    if train:
      one_hot = straight_through_gumbel(rng, logits, temperature)
    else:
      one_hot = jax.nn.one_hot(logits.argmax(-1), v, dtype=jnp.float32)
    # The paper leaves the codebook's init open; normal(1) gives entries of the scale of the
    # normalised inputs, and the projection after them is xavier like every Linear here.
    codebook = self.param("codebook", nn.initializers.normal(1.0),
                          (g, v, self.codevector_dim // g), self.param_dtype)
    picked = jnp.einsum("...gv,gvd->...gd", one_hot.astype(self.dtype),
                        codebook.astype(self.dtype))
    vectors = layers.dense(self.out_dim, "proj", self.dtype, self.param_dtype)(
        picked.reshape(*z.shape[:-1], self.codevector_dim))
    return Quantized(vectors, logits.argmax(-1).astype(jnp.int32),
                     jax.nn.softmax(logits, axis=-1))
