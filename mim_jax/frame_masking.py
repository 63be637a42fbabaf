"""Masks over time frames for speech, drawn on the device inside the jitted step, picked by
`config.mask.name`: the speech counterpart of masking.py's patch masks.

A frame mask is bool [B, T], True = masked. Unlike the image masks it has no static count of
kept frames: a Conformer cannot drop frames (it convolves over time), so it takes the whole
sequence with the masked frames replaced, and a mask may cover a different number of frames in
every row. Every generator has the form `(rng, valid, **knobs) -> mask`, `valid` being the
bool [B, T] padding mask (True = a real frame); the knobs are the config section
`config.mask.<name>`. A generator never masks a padded frame.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.registry import Registry


def span_mask(rng: jax.Array, valid: jax.Array, *, start_prob: float, length: int,
              min_spans: int = 1) -> jax.Array:
  """wav2vec 2.0's span masking (Baevski et al. 2020, sec. 3.1), fixed-count variant: each row
  gets floor(start_prob * L + u) span starts, u ~ U[0, 1) (stochastic rounding keeps the paper's
  expected count; at least `min_spans`), L being the row's number of real frames. The starts are
  distinct frames drawn uniformly among those where a whole span fits before the padding (any
  real frame when the row is shorter than a span); each masks `length` frames from its start.
  Spans may overlap, as in the paper, so the masked share is below start_prob * length.

  Vectorised with static shapes: one uniform score per frame, the `count` lowest-scoring
  allowed frames of each row start a span, and a cumulative sum paints the spans.
  """
  if not 0.0 < start_prob <= 1.0:
    raise ValueError(f"mask start_prob must be in (0, 1], got {start_prob}")
  if length < 1 or min_spans < 0:
    raise ValueError(f"mask length must be >= 1 and min_spans >= 0, got {length}, {min_spans}")
  batch, frames = valid.shape
  k_count, k_where = jax.random.split(rng)
  lengths = valid.sum(axis=1)
  last_start = jnp.maximum(lengths - length, 0)
  t = jnp.arange(frames)
  allowed = valid & (t[None, :] <= last_start[:, None])
  count = jnp.floor(start_prob * lengths + jax.random.uniform(k_count, (batch,)))
  count = jnp.minimum(jnp.maximum(count, min_spans), allowed.sum(axis=1))
  scores = jnp.where(allowed, jax.random.uniform(k_where, (batch, frames)), 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  starts = (rank < count[:, None]) & allowed
  # Frame t is masked when a span starts in (t - length, t]: a difference of cumulative counts.
  started = jnp.cumsum(starts.astype(jnp.int32), axis=1)
  before = jnp.pad(started, ((0, 0), (length, 0)))[:, :frames]
  return (started - before > 0) & valid


def wav2vec2_mask(rng: jax.Array, valid: jax.Array, *, start_prob: float = 0.065,
                  length: int = 10, min_spans: int = 1) -> jax.Array:
  """Span masking with wav2vec 2.0's defaults (p = 0.065, M = 10 frames, sec. 4.2; HuBERT uses
  p = 0.08): about half of the frames masked."""
  return span_mask(rng, valid, start_prob=start_prob, length=length, min_spans=min_spans)


def bestrq_mask(rng: jax.Array, valid: jax.Array, *, start_prob: float = 0.01,
                length: int = 40, min_spans: int = 1) -> jax.Array:
  """BEST-RQ's masking (Chiu et al. 2022, sec. 3.1): spans of 400 ms (40 frames at a 10 ms hop)
  starting with probability 0.01 per frame. The method fills the masked frames with noise."""
  return span_mask(rng, valid, start_prob=start_prob, length=length, min_spans=min_spans)


FrameMaskFn = Callable[..., jax.Array]  # (rng, valid, **knobs) -> bool [B, T]

GENERATORS: Registry = Registry("frame mask generator", {
    "span": wav2vec2_mask,
    "bestrq": bestrq_mask,
})


class FrameMaskSpec(NamedTuple):
  """A frame-mask generator by name and its knobs: hashable, so a flax module can hold it."""
  name: str = "bestrq"
  knobs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, mask_config: ml_collections.ConfigDict) -> "FrameMaskSpec":
    """`config.mask`: its `name` and the knobs of that generator's section."""
    name = mask_config.name
    knobs = mask_config[name].to_dict() if name in mask_config else {}
    return cls(name, tuple(sorted(knobs.items())))


def draw(rng: jax.Array, valid: jax.Array, spec: FrameMaskSpec) -> jax.Array:
  """A bool [B, T] mask (True = masked) over the real frames `valid` marks."""
  return GENERATORS[spec.name](rng, valid, **dict(spec.knobs))


def validate(mask_config: ml_collections.ConfigDict, frames: int) -> None:
  """Raises ValueError on a `config.mask` that cannot mask `frames` frames: an unknown name or
  a bad knob (the generator is traced, nothing is computed)."""
  spec = FrameMaskSpec.from_config(mask_config)
  try:
    jax.eval_shape(lambda rng: draw(rng, jnp.ones((1, frames), bool), spec), jax.random.key(0))
  except TypeError as e:  # a knob the generator does not take
    raise ValueError(f"config.mask.{spec.name}: {e}") from None
