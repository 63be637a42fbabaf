"""spoken_digits: the embedded speech dataset, "zero".."nine" synthesized by eSpeak NG.

The `espeakng-loader` wheel ships libespeak-ng and its voice data, so the first run needs no
download, root or apt: the words are synthesized once, through ctypes, into a local cache, and
later runs read the cache. A speaker is one eSpeak voice setting: an English accent, a voice
variant, a pitch and a speed. Each utterance gets a random lead-in and a little noise (30-40 dB
SNR), so no two are alike. The test split's voice variants never occur in train, so the split
measures generalisation to unseen speakers. 50 train speakers and 17 test speakers say every
digit once: 500 and 170 utterances, each under 1 s.

Cache: `$MIM_JAX_CACHE`, else `$XDG_CACHE_HOME/mim_jax`, else `~/.cache/mim_jax`; then
`spoken_digits/<hash of every generator setting>/<split>.npz` holding the split's audio
concatenated, its offsets, labels and speaker names.
"""

import ctypes
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
import time
import zlib

from absl import logging
import numpy as np

from mim_jax.data import audio_sources

Record = dict[str, np.ndarray]

SPLITS = ("train", "test")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# eSpeak NG's English accents, as espeak_SetVoiceByName names them.
ACCENTS = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc")
# Voice variants (espeak-ng-data/voices/!v), male, female and Klatt-synthesized in both lists.
# Left out: the novelty voices (robots, 'Demonic', 'croak'), 'Marco', whose echo and stress
# stretch a digit to almost 1 s, and 'Reed' and 'caleb', whose breath noise comes from libc's
# rand(), which no eSpeak seed controls.
TRAIN_VARIANTS = (
    "m1", "m2", "m4", "m5", "m6", "m8", "f1", "f3", "f4", "klatt", "klatt2", "klatt4", "klatt5",
    "Alex", "Alicia", "Andy", "Annie", "Denis", "Diogo", "Gene", "Henrique", "Lee", "rob",
    "Michael", "Mike", "Nguyen", "adam", "anika", "antonio", "aunty", "belinda", "boris", "david",
    "edward", "gustave", "ian", "john", "linda", "norbert", "paul", "quincy", "robert", "steph",
    "travis", "grandpa", "whisper")
TEST_VARIANTS = ("m3", "m7", "f2", "f5", "klatt3", "Andrea", "Mario", "benjamin", "iven", "max",
                 "pedro", "steph2", "grandma")

# eSpeak NG's C API (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH = 1, 2, 3  # espeak_PARAMETER
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.c_void_p)

# One generation at a time in a process: a second thread asking for the same cache waits for
# the first, then reads what it wrote.
_GENERATE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every setting of the generator. The cache key hashes all of them, so changing one
  (or the format, through `version`) generates a new cache rather than reading a stale one."""
  sample_rate: int
  seed: int = 0
  words: tuple[str, ...] = WORDS
  accents: tuple[str, ...] = ACCENTS
  train_variants: tuple[str, ...] = TRAIN_VARIANTS
  test_variants: tuple[str, ...] = TEST_VARIANTS
  train_speakers: int = 50
  test_speakers: int = 17
  pitch: tuple[int, int] = (20, 80)     # eSpeak's 0..100 scale; 50 is the voice's own.
  speed: tuple[int, int] = (130, 220)   # Words per minute; eSpeak's default is 175.
  # eSpeak's 0..200 scale: at its default 100 a few loud variants overflow int16 and clip.
  volume: int = 50
  peak: tuple[float, float] = (0.25, 0.9)  # Each utterance is scaled to a random loudness.
  snr_db: tuple[float, float] = (30.0, 40.0)
  lead_seconds: tuple[float, float] = (0.0, 0.1)
  trim_threshold: float = 0.02          # Of the peak: quieter ends are silence.
  trim_margin_seconds: float = 0.01     # Kept beyond the threshold, for soft onsets and decays.
  version: int = 1

  def key(self) -> str:
    text = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir(settings: Settings) -> pathlib.Path:
  """The folder of the cached splits for `settings`."""
  root = os.environ.get("MIM_JAX_CACHE") or pathlib.Path(
      os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache", "mim_jax")
  return pathlib.Path(root) / "spoken_digits" / settings.key()


class _Espeak:
  """A private copy of libespeak-ng, initialized for synchronous synthesis.

  Private, because eSpeak NG keeps state that outlives espeak_Terminate (wavegen.c's pitch
  flutter index is a function static), so what it says depends on everything the process
  said before. A fresh copy of the library file is loaded as a separate library with fresh
  state, which makes each generation depend on its settings alone.
  """

  def __init__(self, folder: pathlib.Path):
    try:
      # Imported here: reading a cache written earlier needs no eSpeak NG.
      import espeakng_loader
      library = pathlib.Path(espeakng_loader.get_library_path())
      data_path = espeakng_loader.get_data_path()
      shutil.copyfile(library, folder / library.name)
      self._lib = ctypes.CDLL(str(folder / library.name))
      self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                              ctypes.c_int]
      self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
      self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
      self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
      self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                         ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                         ctypes.c_void_p, ctypes.c_void_p]
      # Synchronous: espeak_Synth calls back on this thread and returns when the text is said.
      self.rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(),
                                              0)
    except (ImportError, OSError, RuntimeError, AttributeError) as e:
      raise ValueError(f"spoken_digits: cannot load eSpeak NG ({e}); "
                       f"`pip install espeakng-loader` provides it.") from e
    if self.rate <= 0:
      raise ValueError(f"spoken_digits: eSpeak NG failed to initialize with data {data_path}; "
                       f"`pip install espeakng-loader` provides it.")
    self._chunks: list[np.ndarray] = []
    # Kept on self: ctypes must not free the callback while the library can call it.
    self._callback = _SynthCallback(self._collect)
    self._lib.espeak_SetSynthCallback(self._callback)

  def _collect(self, wav, num_samples: int, events) -> int:
    del events
    if wav and num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
    return 0  # Continue synthesis.

  def say(self, text: str, voice: str, pitch: int, speed: int, volume: int,
          seed: int) -> np.ndarray:
    """Returns int16 [n] audio at self.rate of `text` said by `voice` ('en-us+f2')."""
    if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise ValueError(f"spoken_digits: eSpeak NG has no voice {voice!r}.")
    self._lib.espeak_SetParameter(_RATE, speed, 0)
    self._lib.espeak_SetParameter(_PITCH, pitch, 0)
    self._lib.espeak_SetParameter(_VOLUME, volume, 0)
    self._lib.espeak_ng_SetRandSeed(seed)  # Breath and whisper noise.
    self._chunks.clear()
    data = text.encode()
    if self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None,
                              None) != 0:
      raise RuntimeError(f"spoken_digits: eSpeak NG failed to say {text!r} as {voice!r}.")
    self._lib.espeak_Synchronize()
    return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

  def close(self) -> None:
    self._lib.espeak_Terminate()


def _speakers(split: str, settings: Settings, rng: np.random.Generator) -> list[tuple]:
  """The split's speakers: (voice, pitch, speed). Variants are dealt out in a shuffled cycle,
  so every one of the split's variants speaks before any speaks twice."""
  variants = settings.train_variants if split == "train" else settings.test_variants
  count = settings.train_speakers if split == "train" else settings.test_speakers
  order = rng.permutation(len(variants))
  return [(f"{settings.accents[rng.integers(len(settings.accents))]}+"
           f"{variants[order[i % len(variants)]]}",
           int(rng.integers(settings.pitch[0], settings.pitch[1] + 1)),
           int(rng.integers(settings.speed[0], settings.speed[1] + 1)))
          for i in range(count)]


def _trim(audio: np.ndarray, margin: int, threshold: float) -> np.ndarray:
  """Cuts the silence before and after the word, keeping `margin` samples either side."""
  loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
  return audio[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def synthesize(split: str, settings: Settings) -> dict[str, np.ndarray]:
  """Synthesizes a split: {"audio": float32 concatenated, "offsets": int64 [n + 1], "labels":
  int32 [n], "speakers": str [n]}, a function of `split` and `settings` alone."""
  rng = np.random.default_rng([settings.seed, zlib.crc32(split.encode())])
  waves, labels, names = [], [], []
  with tempfile.TemporaryDirectory() as folder:
    espeak = _Espeak(pathlib.Path(folder))
    margin = round(settings.trim_margin_seconds * espeak.rate)
    try:
      for voice, pitch, speed in _speakers(split, settings, rng):
        for label, word in enumerate(settings.words):
          said = espeak.say(word, voice, pitch, speed, settings.volume,
                            int(rng.integers(2**31)))
          if not said.any():
            raise RuntimeError(f"spoken_digits: eSpeak NG said nothing for {word!r} "
                               f"as {voice!r}.")
          audio = _trim(said.astype(np.float64), margin, settings.trim_threshold)
          audio *= rng.uniform(*settings.peak) / np.abs(audio).max()
          lead = round(rng.uniform(*settings.lead_seconds) * espeak.rate)
          audio = np.concatenate([np.zeros(lead), audio])
          # Noise under the whole utterance, lead-in included, so no stretch is exact zeros.
          noise_rms = np.sqrt(np.mean(audio**2)) * 10 ** (-rng.uniform(*settings.snr_db) / 20)
          audio += rng.normal(0, noise_rms, len(audio))
          waves.append(audio_sources.standardize(audio, espeak.rate, settings.sample_rate))
          labels.append(label)
          names.append(f"{voice} pitch={pitch} speed={speed}")
    finally:
      espeak.close()
  return {"audio": np.concatenate(waves),
          "offsets": np.cumsum([0] + [len(w) for w in waves], dtype=np.int64),
          "labels": np.array(labels, np.int32), "speakers": np.array(names)}


def _write_atomically(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  # A temporary file in the same folder, renamed into place: a reader, or a second process
  # generating at the same time, never sees a half-written file.
  fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def load(split: str, settings: Settings) -> dict[str, np.ndarray]:
  """Returns the split's arrays (see `synthesize`) from the cache, generating them on a miss."""
  path = cache_dir(settings) / f"{split}.npz"
  with _GENERATE_LOCK:
    if not path.exists():
      start = time.perf_counter()
      arrays = synthesize(split, settings)
      path.parent.mkdir(parents=True, exist_ok=True)
      _write_atomically(path, arrays)
      logging.info("spoken_digits: synthesized %d %s utterances in %.1f s into %s.",
                   len(arrays["labels"]), split, time.perf_counter() - start, path)
  with np.load(path) as data:
    return {name: data[name] for name in data.files}


class SpokenDigitsSource(audio_sources.AudioSource):
  """The spoken digits of one split, at `sample_rate` Hz.

  `speakers[i]` names example i's speaker ('en-us+f2 pitch=48 speed=171').
  """

  def __init__(self, split: str, sample_rate: int):
    if split not in SPLITS:
      raise ValueError(f"spoken_digits: unknown split {split!r}; valid: 'train', 'test'.")
    arrays = load(split, Settings(sample_rate=sample_rate))
    self._audio = arrays["audio"]
    self._audio.flags.writeable = False  # Records are views of it: none may change another.
    self._offsets = arrays["offsets"]
    self._labels = arrays["labels"]
    self.speakers = arrays["speakers"]

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Record:
    audio = self._audio[self._offsets[index]:self._offsets[index + 1]]
    return {"audio": audio, "label": self._labels[index]}
