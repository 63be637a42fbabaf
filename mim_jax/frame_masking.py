"""Masks over time frames for speech, drawn on the device inside the jitted step, picked by
`config.mask.name`: the speech counterpart of masking.py's patch masks.

A frame mask is bool [B, T], True = masked. Unlike the image masks it has no static count of
kept frames: a Conformer cannot drop frames (it convolves over time), so it takes the whole
sequence with the masked frames replaced, and a mask may cover a different number of frames in
every row. Every generator has the form `(rng, valid, **knobs) -> mask`, `valid` being the
bool [B, T] padding mask (True = a real frame); the knobs are the config section
`config.mask.<name>`. A generator never masks a padded frame.

A second registry, ALTERATIONS, holds alterations of the features themselves, for methods that
corrupt the input rather than (only) mask frames, e.g. TERA's frequency band and noise: each is
`(rng, feats, valid, **knobs) -> (altered feats, targets)`, feats [B, T, M] and targets bool
[B, T, M], the positions that a reconstruction loss scores for that alteration, as its paper
scores them. Their knobs are config sections too (`config.mask.<name>`); an alteration never
changes a padded frame either. `alter_frames` fills the frames of a frame mask the way TERA
(and BERT before it) does: zero, a random other segment, or unchanged.
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


def tera_mask(rng: jax.Array, valid: jax.Array, *, share: float = 0.15, length: int = 7,
              min_spans: int = 0) -> jax.Array:
  """The frames of TERA's time alteration (Liu et al. 2021, sec. III-A): spans of W_T = 7
  frames covering P_T = 15% of the real frames, the spans allowed to overlap (the authors'
  released config, mask_allow_overlap), so slightly less is covered.

  TERA takes round(P_T * L / W_T) distinct span starts; here span_mask's stochastic rounding of
  share / length * L keeps that count in expectation, and also gives utterances shorter than
  24 frames (where the rounding gives none) their 15% on average. A row may get no span
  (min_spans 0), as in TERA. `alter_frames` then zeroes, replaces or keeps the chosen frames.
  """
  if not 0.0 < share <= 1.0 or length < 1:
    raise ValueError(f"mask share must be in (0, 1] and length >= 1, got {share}, {length}")
  return span_mask(rng, valid, start_prob=share / length, length=length, min_spans=min_spans)


FrameMaskFn = Callable[..., jax.Array]  # (rng, valid, **knobs) -> bool [B, T]

GENERATORS: Registry = Registry("frame mask generator", {
    "span": wav2vec2_mask,
    "bestrq": bestrq_mask,
    "tera": tera_mask,
})


def alter_frames(rng: jax.Array, feats: jax.Array, valid: jax.Array, mask: jax.Array, *,
                 zero_prob: float = 0.8, replace_prob: float = 0.1) -> jax.Array:
  """TERA's treatment of the masked frames (sec. III-A, after BERT): with probability
  zero_prob the masked frames of an utterance become 0 (the mean of normalised features), with
  replace_prob each contiguous run of them becomes a random segment of as many real frames of
  the same utterance, and otherwise they stay unchanged; the loss still scores them. As in the
  authors' code, one draw per utterance decides for all of its spans.

  feats [B, T, M], valid and mask bool [B, T] (mask within valid). Vectorised: every masked
  frame finds the start and end of its run with a cumulative max / min, the run's source start
  is uniform over the starts where it fits before the padding, and the frames are gathered.
  Runs where overlapping spans merged are replaced as one segment.
  """
  if min(zero_prob, replace_prob) < 0 or zero_prob + replace_prob > 1:
    raise ValueError(f"zero_prob {zero_prob} and replace_prob {replace_prob} must be >= 0 "
                     f"with a sum <= 1")
  batch, frames, _ = feats.shape
  dice_rng, source_rng = jax.random.split(rng)
  dice = jax.random.uniform(dice_rng, (batch, 1))
  zero = mask & (dice < zero_prob)
  replace = mask & (dice >= zero_prob) & (dice < zero_prob + replace_prob)
  t = jnp.arange(frames)[None, :]
  prev = jnp.pad(mask, ((0, 0), (1, 0)))[:, :frames]
  after = jnp.pad(mask, ((0, 0), (0, 1)))[:, 1:]
  run_start = jax.lax.cummax(jnp.where(mask & ~prev, t, 0), axis=1)
  run_end = jax.lax.cummin(jnp.where(mask & ~after, t, frames), axis=1, reverse=True)
  slack = valid.sum(axis=1, keepdims=True) - (run_end - run_start)  # source starts that fit
  u = jnp.take_along_axis(jax.random.uniform(source_rng, (batch, frames)), run_start, axis=1)
  source_start = jnp.clip(jnp.floor(u * slack).astype(jnp.int32), 0, jnp.maximum(slack - 1, 0))
  source = jnp.where(replace, source_start + t - run_start, t)
  replaced = jnp.take_along_axis(feats, source[..., None], axis=1)
  feats = jnp.where(replace[..., None], replaced, feats)
  return jnp.where(zero[..., None], jnp.zeros((), feats.dtype), feats)


def tera_frequency(rng: jax.Array, feats: jax.Array, valid: jax.Array, *,
                   max_share: float = 0.2) -> tuple[jax.Array, jax.Array]:
  """TERA's frequency alteration (sec. III-B): one band of consecutive mel bins per utterance,
  of width W ~ U{0..floor(max_share * M)} (the authors' config: 20%, so 0..16 of 80 bins) at a
  start ~ U{0..M - W}, set to 0 over all its real frames. Targets: the band at the real frames.
  """
  if not 0.0 <= max_share <= 1.0:
    raise ValueError(f"tera_frequency max_share must be in [0, 1], got {max_share}")
  batch, _, bins = feats.shape
  width_rng, start_rng = jax.random.split(rng)
  width = jax.random.randint(width_rng, (batch, 1), 0, int(bins * max_share) + 1)
  start = jax.random.randint(start_rng, (batch, 1), 0, bins - width + 1)
  m = jnp.arange(bins)[None, :]
  band = (m >= start) & (m < start + width)  # [B, M]
  targets = band[:, None, :] & valid[..., None]
  return jnp.where(targets, jnp.zeros((), feats.dtype), feats), targets


def tera_magnitude(rng: jax.Array, feats: jax.Array, valid: jax.Array, *, prob: float = 0.15,
                   std: float = 0.2) -> tuple[jax.Array, jax.Array]:
  """TERA's magnitude alteration (sec. III-C): with probability `prob` an utterance gets
  Gaussian noise on every value of its real frames. The authors' config: prob 0.15 (their
  noise_proportion, drawn once per batch there, per utterance here) and Normal(0, 0.2), 0.2
  being the standard deviation. No targets: TERA's loss scores the time- and
  frequency-altered positions only (its released code labels no noise-only position)."""
  if not 0.0 <= prob <= 1.0 or std < 0:
    raise ValueError(f"tera_magnitude prob must be in [0, 1] and std >= 0, got {prob}, {std}")
  coin_rng, noise_rng = jax.random.split(rng)
  noisy = jax.random.bernoulli(coin_rng, prob, (feats.shape[0], 1)) & valid  # [B, T]
  noise = std * jax.random.normal(noise_rng, feats.shape, feats.dtype)
  return jnp.where(noisy[..., None], feats + noise, feats), jnp.zeros(feats.shape, bool)


AlterationFn = Callable[..., tuple[jax.Array, jax.Array]]  # (rng, feats, valid, **knobs)

ALTERATIONS: Registry = Registry("feature alteration", {
    "tera_frequency": tera_frequency,
    "tera_magnitude": tera_magnitude,
})


class FrameMaskSpec(NamedTuple):
  """A frame-mask generator by name and its knobs: hashable, so a flax module can hold it."""
  name: str = "bestrq"
  knobs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, mask_config: ml_collections.ConfigDict, name: str | None = None
                  ) -> "FrameMaskSpec":
    """`config.mask`: its `name` (or the generator or alteration `name`) and the knobs of that
    section."""
    name = name or mask_config.name
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


def alter(rng: jax.Array, feats: jax.Array, valid: jax.Array, spec: FrameMaskSpec
          ) -> tuple[jax.Array, jax.Array]:
  """The ALTERATIONS entry `spec` names on feats [B, T, M]: (altered feats, targets [B, T, M])."""
  return ALTERATIONS[spec.name](rng, feats, valid, **dict(spec.knobs))


def validate_alteration(mask_config: ml_collections.ConfigDict, name: str, frames: int,
                        bins: int) -> None:
  """Raises ValueError on an unknown alteration `name` or a bad knob in config.mask.<name>
  (the alteration is traced, nothing is computed)."""
  spec = FrameMaskSpec.from_config(mask_config, name)
  feats = jax.ShapeDtypeStruct((1, frames, bins), jnp.float32)
  try:
    jax.eval_shape(lambda rng, x: alter(rng, x, jnp.ones((1, frames), bool), spec),
                   jax.random.key(0), feats)
  except TypeError as e:  # a knob the alteration does not take
    raise ValueError(f"config.mask.{spec.name}: {e}") from None
