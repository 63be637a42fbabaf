"""Random-access audio sources (folders of audio files, tfds speech datasets, synthetic
waveforms) and the crop/pad transform that every audio source hands the pipeline.

Sources return records `{"audio": float32 [n] mono in [-1, 1] at the configured sample rate,
"label": int32}`, with n varying by example; `AudioTransform` makes them a fixed length. The
embedded speech set is in spoken_digits.py; sources.py picks among them by `data.name`.
"""

import dataclasses
import math
import pathlib
import zlib

import grain
import ml_collections
import numpy as np
from scipy import signal
import soundfile

from mim_jax.data import sources

Record = dict[str, np.ndarray]

AUDIO_EXTENSIONS = (".flac", ".ogg", ".wav")
# tfds stores 16-bit PCM as integers (int16, or int64 by default): full scale is 2**15.
_PCM16_SCALE = 1 / 32768


def standardize(audio: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
  """float [n] or [n, channels] audio at `rate` Hz -> float32 [m] mono in [-1, 1] at
  `sample_rate` Hz, channels mixed by their mean."""
  if audio.ndim == 2:
    audio = audio.mean(axis=1)
  if rate != sample_rate:
    # Polyphase resampling by the exact rational ratio, e.g. 22050 -> 16000 is 320 / 441.
    gcd = math.gcd(rate, sample_rate)
    audio = signal.resample_poly(audio, sample_rate // gcd, rate // gcd)
  # Resampling rings slightly past full scale near clipped peaks; records promise [-1, 1].
  return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _record(audio: np.ndarray, label: int) -> Record:
  return {"audio": audio, "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class AudioTransform(grain.transforms.Map, grain.transforms.RandomMap):
  """Record -> {"audio": float32 [num_samples], "audio_len": int32, "label": int32}.

  Longer audio is cropped to num_samples: in training at a random offset drawn from grain's
  per-element rng (`random_map`), in evaluation from the start (`map`). Shorter audio is
  zero-padded at the end; audio_len counts its real samples, so models can mask the padding.
  """
  num_samples: int
  train: bool

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    excess = len(record["audio"]) - self.num_samples
    start = int(rng.integers(excess + 1)) if self.train and excess > 0 else 0
    return self._crop(record, start)

  def map(self, record: Record) -> Record:
    if self.train:
      # Cropping every epoch from the start would silently drop the train augmentation.
      raise ValueError("AudioTransform(train=True) crops at random: apply it with random_map, "
                       "or use train=False.")
    return self._crop(record, 0)

  def _crop(self, record: Record, start: int) -> Record:
    audio = record["audio"][start:start + self.num_samples]
    padded = np.zeros(self.num_samples, np.float32)
    padded[:len(audio)] = audio
    return {"audio": padded, "audio_len": np.int32(len(audio)),
            "label": np.int32(record["label"])}


class AudioSource:
  """What every audio source shares: the pipeline asks it for its per-example transforms."""

  def train_transform(self, config: ml_collections.ConfigDict) -> AudioTransform:
    return AudioTransform(clip_samples(config), train=True)

  def eval_transform(self, config: ml_collections.ConfigDict) -> AudioTransform:
    return AudioTransform(clip_samples(config), train=False)


def clip_samples(config: ml_collections.ConfigDict) -> int:
  """The fixed example length in samples: data.clip_seconds at data.sample_rate."""
  return round(config.data.clip_seconds * config.data.sample_rate)


def _is_readable(path: pathlib.Path) -> bool:
  try:
    soundfile.info(str(path))  # The header only: cheap even for long recordings.
    return True
  except soundfile.SoundFileError:
    return False


class AudioFolderSource(AudioSource):
  """WAV/FLAC/OGG files in a folder tree, read with libsndfile (soundfile) on access.

  Listing, labels and the upfront header check follow the image folder source
  (`sources.list_folder`). Damage the header check cannot see (a truncated FLAC stream)
  surfaces on access: 'error' raises naming the file, 'skip' substitutes the next file.
  """

  def __init__(self, path: str, split: str, sample_rate: int, on_corrupt: str,
               holdout: sources.Holdout = sources.Holdout()):
    listing = sources.list_folder(path, split, "audio", AUDIO_EXTENSIONS, _is_readable,
                                  on_corrupt, holdout)
    self.class_names = listing.class_names
    self.num_corrupt = listing.num_corrupt
    self._files = listing.files
    self._labels = listing.labels
    self._sample_rate = sample_rate
    self._on_corrupt = on_corrupt
    self.corrupt_on_read: set[pathlib.Path] = set()  # found by decoding (on_corrupt='skip')

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> Record:
    i, audio = sources.read_first_decodable(self._files, index, "audio", self._read,
                                            soundfile.SoundFileError, self._on_corrupt,
                                            self.corrupt_on_read)
    return _record(audio, self._labels[i])

  def _read(self, path: pathlib.Path) -> np.ndarray:
    audio, rate = soundfile.read(str(path), dtype="float32")
    return standardize(audio, rate, self._sample_rate)


class TfdsAudioSource(AudioSource):
  """A tfds ArrayRecord speech dataset: feature 'audio' or 'speech' (LibriSpeech's name), and
  'label' if it has one, else label 0 (pretraining needs none).

  The audio feature's `sample_rate`, where it declares one, is resampled to `sample_rate`; a
  feature without one is taken to be at `sample_rate` already.
  """

  def __init__(self, name: str, split: str, data_dir: str | None, sample_rate: int):
    self._source = sources.open_tfds(name, split, data_dir)
    features = self._source.dataset_info.features
    keys = [key for key in ("audio", "speech") if key in features]
    if not keys:
      raise ValueError(f"tfds:{name} has no audio feature 'audio' or 'speech'; "
                       f"it has {sorted(features.keys())}.")
    self._key = keys[0]
    self._has_label = "label" in features
    self._rate = getattr(features[self._key], "sample_rate", None) or sample_rate
    self._sample_rate = sample_rate

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    example = self._source[index]
    audio = np.asarray(example[self._key])
    if np.issubdtype(audio.dtype, np.integer):
      audio = audio.astype(np.float32) * _PCM16_SCALE
    label = example["label"] if self._has_label else 0
    return _record(standardize(audio, self._rate, self._sample_rate), label)


class SyntheticAudioSource(AudioSource):
  """Deterministic random waveforms for benchmarks: a few sinusoids plus noise per example,
  generated on access so any length costs no memory."""

  def __init__(self, split: str, seconds: float, sample_rate: int, num_classes: int):
    self._num_samples = round(seconds * sample_rate)
    self._sample_rate = sample_rate
    self._num_classes = num_classes
    # crc32, unlike hash(), is stable across processes, so every host agrees.
    self._split_seed = zlib.crc32(split.encode())

  def __len__(self) -> int:
    return sources.SYNTHETIC_SIZE

  def __getitem__(self, index: int) -> Record:
    rng = np.random.default_rng((self._split_seed, index))
    seconds = np.arange(self._num_samples) / self._sample_rate
    # Three tones between 50 Hz and 0.4 x the sample rate (below Nyquist), summing to <= 0.9.
    freqs = rng.uniform(50, 0.4 * self._sample_rate, (3, 1))
    amplitudes = rng.uniform(0.05, 0.3, (3, 1))
    phases = rng.uniform(0, 2 * np.pi, (3, 1))
    audio = (amplitudes * np.sin(2 * np.pi * freqs * seconds + phases)).sum(axis=0)
    audio += rng.normal(0, 0.01, self._num_samples)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return _record(audio, rng.integers(self._num_classes))
