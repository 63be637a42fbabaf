"""Tests of the jnp log-mel front end (mim_jax/data/logmel.py): the filterbank, the window and
the features against librosa (on a synthetic vowel and on eSpeak NG speech), padding invariance
and the valid-frame count, the three normalisations, SpecAugment's masks, and the config
checks."""

import jax
import jax.numpy as jnp
import librosa
import ml_collections
import numpy as np
import pytest

from mim_jax.data import logmel
from mim_jax.data import spoken_digits

SR = 16000
FE = logmel.FrontEnd(normalize="none").validate()


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
  """A vowel-like test signal with the spectral shape of speech: harmonics of a gliding f0
  (90-170 Hz) under three moving formant resonances, a syllable-rate envelope with near-silent
  gaps (so some mel bins sit near the log floor), and a little noise for the high bands."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  f0 = 130 + 40 * np.sin(2 * np.pi * 1.3 * t + seed)
  phase = 2 * np.pi * np.cumsum(f0) / SR
  formants = [(500 + 250 * np.sin(2 * np.pi * 0.7 * t), 80, 1.0),
              (1500 + 500 * np.sin(2 * np.pi * 0.5 * t + 1), 100, 0.5), (2600, 150, 0.25)]
  voiced = np.zeros_like(t)
  for h in range(1, 70):
    fh = h * f0
    gain = sum(a / (1 + ((fh - f) / bw) ** 2) for f, bw, a in formants) * (fh < 0.48 * SR)
    voiced += gain * np.sin(h * phase) / np.sqrt(h)
  envelope = np.clip(np.sin(2 * np.pi * 2.5 * t) * 1.5, 0.001, 1)  # syllables and pauses
  y = 0.5 * voiced * envelope / np.abs(voiced).max() + 0.003 * rng.normal(size=t.size)
  return y.astype(np.float32)


def librosa_log_mel(y: np.ndarray, floor: float = 1e-6) -> np.ndarray:
  """librosa's log-mel [T, 80] of float64 audio. librosa frames n_fft samples and centres the
  400-sample window in them; we frame 400 samples and pad at the end: the same power spectra
  once the audio is delayed by (512 - 400) / 2 samples (see logmel's docstring)."""
  delayed = np.concatenate([np.zeros((FE.n_fft - FE.win) // 2), y.astype(np.float64)])
  mel = librosa.feature.melspectrogram(
      y=delayed, sr=SR, n_fft=512, win_length=400, hop_length=160, window="hann",
      center=False, power=2.0, n_mels=80, htk=False, norm="slaney")
  return np.log(np.maximum(mel, floor)).T


def features(audio, lengths, fe=FE):
  feats, valid = jax.jit(logmel.log_mel, static_argnums=2)(
      jnp.asarray(audio), jnp.asarray(lengths, jnp.int32), fe)
  return np.asarray(feats), np.asarray(valid)


def test_filterbank_and_window_match_librosa():
  want = librosa.filters.mel(sr=SR, n_fft=512, n_mels=80, htk=False, norm="slaney").T
  np.testing.assert_allclose(logmel.mel_filterbank(FE), want, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(logmel.hann_window(400), librosa.filters.get_window("hann", 400),
                             atol=1e-7)
  assert (FE.win, FE.hop) == (400, 160)


def test_log_mel_matches_librosa():
  """Against librosa in float64, the max abs log-mel error measured 4.0e-5 here (mean 5e-7;
  1.5e-5 and 2.1e-5 on two other seeds); librosa's own float32 path is 7e-7 off its float64 one.
  The gap is XLA's float32 CPU FFT: on the same frames numpy's float32 FFT is 2.7e-7 off. Its
  rounding is absolute, about 1e-7 of a frame's energy, so it shows in relative (log) terms in
  the quietest bins: the largest error sits in a bin of power 3e-6, just above the 1e-6 floor.
  The tolerance, 2e-4, is 5x this measurement and 2x the worst of 170 eSpeak utterances (next
  test)."""
  y = speech_like(1.5)
  want = librosa_log_mel(y)
  got, valid = features(y[None], [y.size])
  assert got.shape[1] == logmel.num_frames(y.size, FE) == valid.sum()
  common = min(len(want), got.shape[1])  # librosa's delayed audio may end a frame earlier
  assert common >= got.shape[1] - 1
  assert want.min() < -8 and want.max() > 0  # quiet bins near the floor and loud ones
  np.testing.assert_allclose(got[0, :common], want[:common], rtol=0, atol=2e-4)


def test_log_mel_matches_librosa_on_spoken_digits():
  """eSpeak NG speech (mim_jax/data/spoken_digits.py): the 170 utterances of its test split,
  padded into one batch. Measured max abs error 1.0e-4 (median over utterances 2.9e-5). The
  worst errors sit in loud frames, in mel bins about 70 dB below the frame's loudest (power
  near 3e-6, just above the floor), where the FFT's absolute rounding is largest in log terms
  (see above); eSpeak's spectra have more such range than the synthetic vowel."""
  split = spoken_digits.synthesize("test", spoken_digits.Settings(sample_rate=SR))
  offsets = split["offsets"]
  lengths = np.diff(offsets)
  audio = np.zeros((len(lengths), lengths.max()), np.float32)
  for i, (start, length) in enumerate(zip(offsets, lengths)):
    audio[i, :length] = split["audio"][start:start + length]
  got, valid = features(audio, lengths)
  for i, length in enumerate(lengths):
    want = librosa_log_mel(audio[i, :length])
    common = min(len(want), valid[i].sum())
    np.testing.assert_allclose(got[i, :common], want[:common], rtol=0, atol=2e-4,
                               err_msg=f"utterance {i}")


def test_preemphasis_is_a_filter_on_the_audio():
  y = speech_like(0.5)
  filtered = np.concatenate([y[:1], y[1:] - 0.97 * y[:-1]])
  got, _ = features(y[None], [y.size], FE._replace(preemphasis=0.97))
  want, _ = features(filtered[None], [y.size])
  # The filter's float32 rounding (XLA may fuse it into one multiply-add) differs from numpy's.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", ["none", "utterance"])
def test_padding_and_batch_mates_change_no_valid_frame(normalize):
  """The same utterance padded to two lengths (garbage, not zeros, past its end), each in a
  batch with another utterance: identical valid frames; invalid frames exactly 0."""
  fe = FE._replace(normalize=normalize)
  y, other = speech_like(0.6, seed=1), speech_like(1.1, seed=2)
  noise = np.random.default_rng(3).normal(size=20000).astype(np.float32)

  def padded(x, length):
    return np.concatenate([x, noise[:length - x.size]])

  short = np.stack([padded(y, 11000), other[:11000]])
  long = np.stack([padded(other, 19000), padded(y, 19000)])
  a, valid_a = features(short, [y.size, 11000], fe)
  b, valid_b = features(long, [other.size, y.size], fe)
  n = logmel.num_frames(y.size, fe)
  assert valid_a[0].sum() == valid_b[1].sum() == n == 1 + (y.size - 400) // 160
  assert valid_a[0, :n].all() and valid_b[1, :n].all()
  # Different T changes only the order XLA sums the per-utterance statistics in.
  np.testing.assert_allclose(a[0, :n], b[1, :n], rtol=0, atol=1e-5)
  assert not a[0, n:].any() and not b[1, n:].any()


def test_num_frames():
  assert [logmel.num_frames(n, FE) for n in (0, 399, 400, 559, 560, 16000)] == [0, 0, 1, 1, 2, 98]
  with pytest.raises(ValueError, match="audio of 399 samples is shorter than one window of 400"):
    logmel.log_mel(jnp.zeros((2, 399)), jnp.array([399, 10]), FE)


def test_normalisations():
  y = speech_like(0.8)
  length = 10000
  audio = np.concatenate([y, np.zeros(2000, np.float32)])[None]
  raw, valid = features(audio, [length])
  n = valid.sum()
  utt, _ = features(audio, [length], FE._replace(normalize="utterance"))
  np.testing.assert_allclose(utt[0, :n].mean(0), 0, atol=1e-5)
  std = raw[0, :n].std(0)
  np.testing.assert_allclose(utt[0, :n].std(0), std / (std + logmel.STD_EPS), atol=1e-5)
  np.testing.assert_allclose(utt[0, :n].std(0), 1, atol=1e-3)
  glob, _ = features(audio, [length], FE._replace(normalize="global", global_mean=-3.0,
                                                   global_std=2.0))
  np.testing.assert_allclose(glob[0, :n], (raw[0, :n] + 3) / 2, atol=1e-6)
  assert not utt[0, n:].any() and not glob[0, n:].any()


def test_spec_augment_masks_valid_frames_only_and_is_deterministic():
  b, t, m = 4, 60, 80
  feats = np.random.default_rng(0).normal(size=(b, t, m)).astype(np.float32) + 10
  lengths = np.array([60, 45, 20, 3])
  valid = np.arange(t)[None] < lengths[:, None]
  knobs = dict(freq_masks=2, freq_width=27, time_masks=3, time_width=10)
  augment = jax.jit(lambda r, f, v: logmel.spec_augment(r, f, v, **knobs))
  rng = jax.random.key(0)
  out = np.asarray(augment(rng, feats, valid))
  np.testing.assert_array_equal(out, augment(rng, feats, valid))
  assert (out != augment(jax.random.key(1), feats, valid)).any()
  np.testing.assert_array_equal(out[~valid], feats[~valid])  # padded frames untouched
  zeroed = out == 0
  masked_spans = masked_bands = 0
  for i in range(b):
    rows = zeroed[i, :lengths[i]]
    spans = rows.all(axis=1)            # time spans zero every bin of a frame
    masked_spans += spans.sum()
    assert spans.sum() <= knobs["time_masks"] * knobs["time_width"]
    if spans.all():                     # a short utterance can be masked whole
      continue
    bands = rows[~spans].all(axis=0)    # frequency bands zero a bin in every other frame
    masked_bands += bands.sum()
    assert bands.sum() <= knobs["freq_masks"] * knobs["freq_width"]
    # Every zero is in a band or a span.
    np.testing.assert_array_equal(rows, bands[None] | spans[:, None])
  assert masked_spans and masked_bands
  no_masks = logmel.spec_augment(rng, feats, valid, freq_masks=0, freq_width=27, time_masks=0,
                                 time_width=10)
  np.testing.assert_array_equal(no_masks, feats)


def frontend_config(**overrides) -> ml_collections.ConfigDict:
  fields = logmel.FrontEnd()._asdict()
  del fields["sample_rate"]
  return ml_collections.ConfigDict({**fields, **overrides})


def test_from_config():
  fe = logmel.FrontEnd.from_config(frontend_config(num_mels=40), 8000)
  assert fe == logmel.FrontEnd(sample_rate=8000, num_mels=40)
  assert hash(fe) == hash(logmel.FrontEnd(sample_rate=8000, num_mels=40))
  with pytest.raises(ValueError, match=r"unknown fields \['n_mels'\]"):
    logmel.FrontEnd.from_config(frontend_config(n_mels=80), SR)
  cfg = frontend_config()
  del cfg["hop_ms"]
  with pytest.raises(ValueError, match=r"lacks fields \['hop_ms'\]"):
    logmel.FrontEnd.from_config(cfg, SR)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_fft=256), r"n_fft 256 is shorter than the window of 400 samples"),
    (dict(fmax=9000.0), r"fmax 9000.0 must be in \[0, 8000.0\]"),
    (dict(fmin=8000.0), r"fmin 8000.0 must be in \[0, 8000.0\)"),
    (dict(normalize="batch"), r"unknown normalize 'batch'; valid: \['utterance', 'global'"),
    (dict(log_floor=0.0), r"log_floor must be positive"),
    (dict(preemphasis=1.0), r"preemphasis must be in \[0, 1\)"),
    (dict(global_std=0.0), r"global_std must be positive"),
    (dict(hop_ms=0.01), r"hop_ms 0.01 must each be at least one sample"),
    (dict(time_width=-1), r"time_width -1"),
    (dict(num_mels=256), r"num_mels 256 is too many for n_fft 512"),
])
def test_validate_names_the_bad_value(overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    logmel.FrontEnd(**overrides).validate()
  assert "\n" not in str(error.value)
