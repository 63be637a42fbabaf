"""Log-mel filterbank features in jnp, computed on the device inside the jitted train step, and
SpecAugment on them.

The host only batches raw audio ([B, L] float samples plus each utterance's length); the
features come from `log_mel`, which is pure jnp with static shapes, so it fuses into the step
and a change of front-end settings needs no new dataset. The defaults are the speech papers'
front end: 80 mel bins from a 25 ms window every 10 ms (Conformer, Gulati et al. 2020, sec. 3.1).

It matches `librosa.feature.melspectrogram(..., center=False, htk=False, norm='slaney')`
followed by log(max(., floor)), with one difference of convention: librosa cuts frames of
n_fft samples and centres the shorter window inside them, we cut frames of `win` samples and
zero-pad them at the end to n_fft. The power spectrum of a frame is the same either way (a
circular shift changes only the phase), so our frame t equals librosa's frame t on the audio
delayed by (n_fft - win) / 2 samples; tests/test_logmel.py checks it that way.

Padding: frame t of an utterance is valid iff t * hop + win <= its length, so a valid frame
reads no padded sample. Normalisation uses valid frames only, and invalid frames are 0 on
output, so nothing downstream depends on how (or how much) a batch was padded.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

NORMALIZE = ("utterance", "global", "none")
# Added to the per-utterance standard deviation, so a constant bin (silence at the log floor)
# normalises to 0 instead of 0/0.
STD_EPS = 1e-5

# Slaney's mel scale (Auditory Toolbox, the scale of librosa's default htk=False): linear below
# 1 kHz at 200/3 Hz per mel (so 1 kHz is mel 15), logarithmic above, 27 mels per factor 6.4.
_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _HZ_PER_MEL
_MELS_PER_LOG_HZ = 27.0 / np.log(6.4)


class FrontEnd(NamedTuple):
  """Log-mel settings. A NamedTuple of numbers and strings: hashable, so a flax module or a
  jitted function can hold it as a static field.

  sample_rate: Hz (from config.data.sample_rate); window_ms / hop_ms: frame length and step,
    rounded to whole samples (`win`, `hop`);
  n_fft: FFT size (>= win: the frame is zero-padded to it); num_mels, fmin, fmax (0 = Nyquist):
    the Slaney mel filterbank;
  log_floor: features are log(max(mel power, log_floor));
  preemphasis: a in y[n] = x[n] - a x[n-1] (0 = off; 0.97 is the classic value);
  normalize: 'utterance' (each utterance and mel bin to zero mean, unit variance over its valid
    frames), 'global' ((x - global_mean) / global_std, dataset constants from the config) or
    'none';
  spec_augment: whether training applies `spec_augment` with freq_masks bands of up to
    freq_width bins and time_masks spans of up to time_width frames. The defaults are
    SpecAugment's LibriSpeech "LD" policy (Park et al. 2019, table 1: m_F = 2, F = 27,
    m_T = 2, T = 100); the Conformer paper keeps F = 27 with ten time masks of up to 5% of
    the utterance. The knobs live here so the config's front end is one section; `log_mel`
    itself never augments (the caller applies `spec_augment` when training).
  """
  sample_rate: int = 16000
  window_ms: float = 25.0
  hop_ms: float = 10.0
  n_fft: int = 512
  num_mels: int = 80
  fmin: float = 0.0
  fmax: float = 0.0
  log_floor: float = 1e-6
  preemphasis: float = 0.0
  normalize: str = "utterance"
  global_mean: float = 0.0
  global_std: float = 1.0
  spec_augment: bool = False
  freq_masks: int = 2
  freq_width: int = 27
  time_masks: int = 2
  time_width: int = 100

  @property
  def win(self) -> int:
    """Window length in samples."""
    return round(self.sample_rate * self.window_ms / 1000)

  @property
  def hop(self) -> int:
    """Hop in samples."""
    return round(self.sample_rate * self.hop_ms / 1000)

  @property
  def upper_hz(self) -> float:
    """The top edge of the filterbank: fmax, or the Nyquist frequency when fmax is 0."""
    return self.fmax or self.sample_rate / 2

  @classmethod
  def from_config(cls, frontend_cfg: ml_collections.ConfigDict, sample_rate: int
                  ) -> "FrontEnd":
    """The front end of `config.frontend` (every field but sample_rate, which comes from
    config.data.sample_rate), validated."""
    fields = set(cls._fields) - {"sample_rate"}
    given = set(frontend_cfg.keys())
    if given - fields:
      raise ValueError(f"config.frontend has unknown fields {sorted(given - fields)}; "
                       f"valid: {sorted(fields)}")
    if fields - given:
      raise ValueError(f"config.frontend lacks fields {sorted(fields - given)}")
    return cls(sample_rate=sample_rate, **{f: frontend_cfg[f] for f in fields}).validate()

  def validate(self) -> "FrontEnd":
    """Returns self, or raises ValueError naming the first bad value and what is valid."""
    nyquist = self.sample_rate / 2
    checks = [
        (self.sample_rate > 0, f"sample_rate must be positive, got {self.sample_rate}"),
        (self.win >= 1 and self.hop >= 1,
         f"window_ms {self.window_ms} and hop_ms {self.hop_ms} must each be at least one "
         f"sample at {self.sample_rate} Hz"),
        (self.n_fft >= self.win, f"n_fft {self.n_fft} is shorter than the window of {self.win} "
                                 f"samples ({self.window_ms} ms); use n_fft >= {self.win}"),
        (self.num_mels >= 1, f"num_mels must be at least 1, got {self.num_mels}"),
        (0 <= self.fmax <= nyquist, f"fmax {self.fmax} must be in [0, {nyquist}] "
                                    f"(0 = Nyquist of sample_rate {self.sample_rate})"),
        (0 <= self.fmin < self.upper_hz, f"fmin {self.fmin} must be in [0, {self.upper_hz})"),
        (self.log_floor > 0, f"log_floor must be positive, got {self.log_floor}"),
        (0 <= self.preemphasis < 1, f"preemphasis must be in [0, 1), got {self.preemphasis}"),
        (self.normalize in NORMALIZE,
         f"unknown normalize {self.normalize!r}; valid: {list(NORMALIZE)}"),
        (self.global_std > 0, f"global_std must be positive, got {self.global_std}"),
        (min(self.freq_masks, self.freq_width, self.time_masks, self.time_width) >= 0,
         f"spec-augment counts and widths must be >= 0, got freq_masks {self.freq_masks}, "
         f"freq_width {self.freq_width}, time_masks {self.time_masks}, "
         f"time_width {self.time_width}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)
    empty = np.flatnonzero(mel_filterbank(self).max(axis=0) == 0)
    if empty.size:
      raise ValueError(f"num_mels {self.num_mels} is too many for n_fft {self.n_fft} between "
                       f"{self.fmin} and {self.upper_hz} Hz: mel filter {empty[0]} covers no "
                       f"FFT bin; use fewer mels or a larger n_fft")
    return self


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney mel of frequencies in Hz."""
  hz = np.asarray(hz, np.float64)
  log_part = _BREAK_MEL + np.log(np.maximum(hz, _BREAK_HZ) / _BREAK_HZ) * _MELS_PER_LOG_HZ
  return np.where(hz < _BREAK_HZ, hz / _HZ_PER_MEL, log_part)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
  """Inverse of `hz_to_mel`."""
  mel = np.asarray(mel, np.float64)
  log_part = _BREAK_HZ * np.exp((np.maximum(mel, _BREAK_MEL) - _BREAK_MEL) / _MELS_PER_LOG_HZ)
  return np.where(mel < _BREAK_MEL, mel * _HZ_PER_MEL, log_part)


def mel_filterbank(fe: FrontEnd) -> np.ndarray:
  """The Slaney mel filterbank [n_fft // 2 + 1, num_mels], float32: triangles whose num_mels + 2
  corner frequencies are equally spaced in mel from fmin to the top edge, each scaled by
  2 / (upper corner - lower corner) in Hz so every filter has the same area (Slaney's
  normalisation). Built once in float64 numpy; a constant of the compiled step."""
  corners = mel_to_hz(np.linspace(hz_to_mel(fe.fmin), hz_to_mel(fe.upper_hz), fe.num_mels + 2))
  bins_hz = np.arange(fe.n_fft // 2 + 1) * fe.sample_rate / fe.n_fft
  lower, centre, upper = corners[:-2], corners[1:-1], corners[2:]
  rising = (bins_hz[:, None] - lower) / (centre - lower)
  falling = (upper - bins_hz[:, None]) / (upper - centre)
  triangles = np.maximum(0.0, np.minimum(rising, falling))
  return (triangles * (2.0 / (upper - lower))).astype(np.float32)


def hann_window(length: int) -> np.ndarray:
  """The periodic Hann window, 0.5 - 0.5 cos(2 pi n / length): the DFT-even window
  scipy/librosa give for spectral analysis (get_window('hann'))."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


def num_frames(num_samples: int, fe: FrontEnd) -> int:
  """Frames of `num_samples` samples, without centring: 1 + (L - win) // hop, or 0 if L < win."""
  return 0 if num_samples < fe.win else 1 + (num_samples - fe.win) // fe.hop


def log_mel(audio: jax.Array, audio_len: jax.Array, fe: FrontEnd
            ) -> tuple[jax.Array, jax.Array]:
  """Log-mel features of a padded batch of audio.

  audio [B, L] float samples; audio_len [B] int, each utterance's length (samples past it are
  padding). Returns feats float32 [B, T, num_mels] with T = num_frames(L), and valid bool
  [B, T], True where frame t * hop + win <= audio_len. Invalid frames of feats are 0.
  Raises ValueError when L is shorter than one window.
  """
  x = audio.astype(jnp.float32)
  if fe.preemphasis:
    x = jnp.concatenate([x[:, :1], x[:, 1:] - fe.preemphasis * x[:, :-1]], axis=1)
  t = num_frames(x.shape[1], fe)
  if not t:
    raise ValueError(f"audio of {x.shape[1]} samples is shorter than one window of {fe.win} "
                     f"samples ({fe.window_ms} ms at {fe.sample_rate} Hz)")
  # One gather with a static [T, win] index: frame t is samples t*hop .. t*hop + win - 1.
  index = np.arange(t)[:, None] * fe.hop + np.arange(fe.win)[None]
  frames = x[:, index] * hann_window(fe.win)
  spectrum = jnp.fft.rfft(frames, n=fe.n_fft)  # zero-pads each frame at its end to n_fft
  power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
  # HIGHEST: at DEFAULT precision a TPU runs float32 matmuls in bfloat16 passes and a GPU may
  # use TF32 (8- and 10-bit mantissas), errors of 1e-3 to 1e-2 per bin; the FFT's are ~1e-7.
  mel = jnp.matmul(power, mel_filterbank(fe), precision=jax.lax.Precision.HIGHEST)
  feats = jnp.log(jnp.maximum(mel, fe.log_floor))
  valid = jnp.asarray(np.arange(t) * fe.hop + fe.win) <= audio_len[:, None]
  feats = _normalize(feats, valid, fe)
  return jnp.where(valid[..., None], feats, 0.0), valid


def _normalize(feats: jax.Array, valid: jax.Array, fe: FrontEnd) -> jax.Array:
  """`fe.normalize` applied to feats [B, T, M], statistics over valid frames only."""
  if fe.normalize == "global":
    return (feats - fe.global_mean) / fe.global_std
  if fe.normalize == "none":
    return feats
  weight = valid[..., None].astype(jnp.float32)
  count = jnp.maximum(weight.sum(axis=1, keepdims=True), 1.0)
  mean = (feats * weight).sum(axis=1, keepdims=True) / count
  centred = (feats - mean) * weight
  std = jnp.sqrt(jnp.square(centred).sum(axis=1, keepdims=True) / count)
  return centred / (std + STD_EPS)


def spec_augment(rng: jax.Array, feats: jax.Array, valid: jax.Array, *, freq_masks: int,
                 freq_width: int, time_masks: int, time_width: int) -> jax.Array:
  """SpecAugment's frequency and time masking (Park et al. 2019), per utterance.

  feats [B, T, M], valid [B, T]. Each utterance gets `freq_masks` bands of f ~ U{0..freq_width}
  consecutive mel bins starting at f0 ~ U{0..M - f}, and `time_masks` spans of
  t = min(U{0..time_width}, n) frames starting at t0 ~ U{0..n - t}, n its valid frames, so a
  span lies inside the utterance. Masked values become 0, the mean of normalised features
  (Park et al. mask with the mean). Padded frames are never touched. Vectorised over the batch
  and the masks, with static shapes; the same rng gives the same masks.
  """
  b, t, m = feats.shape
  f_rng, t_rng = jax.random.split(rng)
  freq = _bands(f_rng, (b, freq_masks), jnp.full((b, 1), m), freq_width, m)  # [B, M]
  n = valid.sum(axis=1, keepdims=True)
  time = _bands(t_rng, (b, time_masks), n, time_width, t)  # [B, T]
  masked = (freq[:, None, :] | time[:, :, None]) & valid[..., None]
  return jnp.where(masked, jnp.zeros((), feats.dtype), feats)


def _bands(rng: jax.Array, shape: tuple[int, int], extent: jax.Array, max_width: int,
           size: int) -> jax.Array:
  """Union of shape[1] random bands per row, as bool [shape[0], size]: each band has width
  w = min(U{0..max_width}, extent) and start s ~ U{0..extent - w}, extent [B, 1] being the
  row's usable length (<= size)."""
  w_rng, s_rng = jax.random.split(rng)
  width = jnp.minimum(jax.random.randint(w_rng, shape, 0, max_width + 1), extent)
  start = jax.random.randint(s_rng, shape, 0, extent - width + 1)
  pos = jnp.arange(size)[None, None, :]
  inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
  return inside.any(axis=1)
