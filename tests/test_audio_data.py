"""Tests of mim_jax's audio sources on real files and real synthesis, in seconds: the spoken
digits (eSpeak NG, cached), audio folders, tfds speech, synthetic waveforms, and the crop/pad
transform."""

import importlib.util
import pathlib

import grain
import ml_collections
import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from mim_jax.data import audio_sources
from mim_jax.data import get_source
from mim_jax.data import sources
from mim_jax.data import spoken_digits


def make_config(name: str = "spoken_digits", **data) -> ml_collections.ConfigDict:
  """The config fields the audio sources read."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      name=name, modality="audio", sample_rate=16000, clip_seconds=1.0, num_classes=10,
      on_corrupt="error", tfds_data_dir="", channels=1))
  c.lock()  # A misspelt field in `data` raises instead of being added.
  c.data.update(data)
  return c


def audio_source(config: ml_collections.ConfigDict, split: str = "train"):
  return get_source(config.data, split, image_size=0)  # Audio sources have no image size.


# ---------------------------------------------------------------- spoken digits


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """An empty MIM_JAX_CACHE for this module: the first construction generates, later ones read."""
  path = tmp_path_factory.mktemp("cache")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIM_JAX_CACHE", str(path))
    yield path


@pytest.fixture(scope="module")
def digits(cache):
  return {split: audio_source(make_config(), split) for split in ("train", "test")}


def test_spoken_digits_splits(digits):
  train, test = digits["train"], digits["test"]
  assert (len(train), len(test)) == (500, 170)
  for source in (train, test):
    records = [source[i] for i in range(len(source))]
    assert np.bincount([r["label"] for r in records]).tolist() == [len(source) // 10] * 10
    assert all(r["label"].dtype == np.int32 for r in records)
    audio = [r["audio"] for r in records]
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in audio)
    assert max(np.abs(a).max() for a in audio) <= 1.0
    assert min(np.sqrt(np.mean(a**2)) for a in audio) > 0.01  # None silent.
    assert max(len(a) for a in audio) < 16000  # Every word fits in 1 s at 16 kHz.


def test_spoken_digits_speakers_differ_between_splits(digits):
  speakers = {split: set(source.speakers) for split, source in digits.items()}
  assert len(speakers["train"]) == 50 and len(speakers["test"]) == 17
  # 'en-us+f2 pitch=48 speed=171': the test split's voice variants never speak in train.
  variants = {split: {name.split()[0].split("+")[1] for name in names}
              for split, names in speakers.items()}
  assert not variants["train"] & variants["test"]
  assert len(variants["test"]) == 13


def test_spoken_digits_second_construction_reads_the_cache(digits, cache, monkeypatch):
  files = sorted(cache.glob("spoken_digits/*/*"))
  assert [f.name for f in files] == ["test.npz", "train.npz"]  # No temporary files left.
  mtimes = [f.stat().st_mtime_ns for f in files]

  def no_synthesis(*args):
    raise AssertionError(f"synthesized {args} although the cache has it")

  monkeypatch.setattr(spoken_digits, "synthesize", no_synthesis)
  again = audio_source(make_config(), "test")
  assert [f.stat().st_mtime_ns for f in files] == mtimes
  for i in range(len(again)):
    np.testing.assert_array_equal(again[i]["audio"], digits["test"][i]["audio"])
  np.testing.assert_array_equal(again.speakers, digits["test"].speakers)


def test_spoken_digits_generation_is_deterministic(digits):
  # This process has synthesized before: the library copy's fresh state must make that moot.
  arrays = spoken_digits.synthesize("test", spoken_digits.Settings(sample_rate=16000))
  test = digits["test"]
  assert len(arrays["labels"]) == len(test)
  for i in range(len(test)):
    start, end = arrays["offsets"][i:i + 2]
    np.testing.assert_array_equal(arrays["audio"][start:end], test[i]["audio"])


def test_spoken_digits_sample_rate_has_its_own_cache(digits, cache):
  source = audio_source(make_config(sample_rate=8000), "test")
  assert len(list(cache.glob("spoken_digits/*/test.npz"))) == 2
  lengths = [len(source[i]["audio"]) for i in range(5)]
  expected = [round(len(digits["test"][i]["audio"]) / 2) for i in range(5)]
  assert all(abs(a - b) <= 1 for a, b in zip(lengths, expected)), (lengths, expected)


def test_spoken_digits_unknown_split(cache):
  with pytest.raises(ValueError, match=r"unknown split 'validation'; valid: 'train', 'test'"):
    audio_source(make_config(), "validation")


def test_spoken_digits_without_espeak(tmp_path, monkeypatch):
  monkeypatch.setenv("MIM_JAX_CACHE", str(tmp_path))  # Empty: it must synthesize.
  monkeypatch.setattr("espeakng_loader.get_library_path", lambda: str(tmp_path / "missing.so"))
  with pytest.raises(ValueError) as error:
    audio_source(make_config(), "test")
  message = str(error.value)
  assert "cannot load eSpeak NG" in message and "pip install espeakng-loader" in message
  assert len(message.splitlines()) == 1
  assert not list(tmp_path.glob("spoken_digits/*/*.npz"))


# ---------------------------------------------------------------- audio folder


def sine(seconds: float, rate: int, amplitude: float = 0.5, hz: float = 300) -> np.ndarray:
  return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)
          ).astype(np.float32)


@pytest.fixture
def audio_folder(tmp_path):
  """tmp/train/{one: a.wav (16 kHz mono 0.25 s), two: b.FLAC (8 kHz stereo 0.5 s)},
  tmp/test/one/c.ogg (16 kHz, 0.1 s)."""
  for folder in ("train/one", "train/two", "test/one"):
    (tmp_path / folder).mkdir(parents=True)
  soundfile.write(tmp_path / "train/one/a.wav", sine(0.25, 16000), 16000)
  # Left at 0.5 and right at 0.25 amplitude: their mono mix is a sine of amplitude 0.375.
  stereo = np.stack([sine(0.5, 8000, 0.5), sine(0.5, 8000, 0.25)], axis=1)
  soundfile.write(tmp_path / "train/two/b.FLAC", stereo, 8000, format="FLAC")
  soundfile.write(tmp_path / "test/one/c.ogg", sine(0.1, 16000), 16000)
  return tmp_path


def test_folder_labels_mono_and_resampling(audio_folder):
  source = audio_source(make_config(f"folder:{audio_folder}"))
  assert source.class_names == ["one", "two"] and source.num_corrupt == 0
  a, b = source[0], source[1]
  assert (int(a["label"]), int(b["label"])) == (0, 1)
  assert a["audio"].shape == (4000,) and a["audio"].dtype == np.float32
  np.testing.assert_allclose(a["audio"], sine(0.25, 16000), atol=1e-4)  # 16-bit PCM.
  # 0.5 s at 8 kHz -> 8000 samples at 16 kHz, one channel.
  assert b["audio"].shape == (8000,) and b["audio"].dtype == np.float32
  assert abs(np.abs(b["audio"][100:-100]).max() - 0.375) < 0.01
  test = audio_source(make_config(f"folder:{audio_folder}"), "test")
  assert len(test) == 1 and test[0]["audio"].shape == (1600,)


def test_folder_corrupt_file(audio_folder):
  (audio_folder / "train/two/bad.wav").write_bytes(b"RIFF, but not really a wave file")
  with pytest.raises(ValueError, match=r"cannot decode audio file .*bad\.wav"):
    audio_source(make_config(f"folder:{audio_folder}"))
  source = audio_source(make_config(f"folder:{audio_folder}", on_corrupt="skip"))
  assert source.num_corrupt == 1 and len(source) == 2


def test_folder_damage_found_on_access(tmp_path):
  # A truncated FLAC keeps its header, so the upfront check passes; decoding then fails.
  soundfile.write(tmp_path / "0.flac", sine(1.0, 16000), 16000)
  data = (tmp_path / "0.flac").read_bytes()
  (tmp_path / "0.flac").write_bytes(data[:len(data) // 2])
  soundfile.write(tmp_path / "1.wav", sine(0.1, 16000), 16000)
  source = audio_source(make_config(f"folder:{tmp_path}"))
  with pytest.raises(ValueError, match=r"cannot decode audio file .*0\.flac"):
    source[0]
  source = audio_source(make_config(f"folder:{tmp_path}", on_corrupt="skip"))
  np.testing.assert_array_equal(source[0]["audio"], source[1]["audio"])  # The next file.


def test_folder_without_audio_files(tmp_path):
  (tmp_path / "notes.txt").write_text("no audio here")
  with pytest.raises(ValueError, match=r"no audio files \(.flac, .ogg, .wav\) under"):
    audio_source(make_config(f"folder:{tmp_path}"))


# ---------------------------------------------------------------- tfds


class MimJaxTestSpeech(tfds.core.GeneratorBasedBuilder):
  """Int16 'speech' and no label, as LibriSpeech names it, written as ArrayRecord without
  TensorFlow. A plain Tensor feature stands in for tfds.features.Audio, which tfds builds and
  reads only with TensorFlow installed (see test_tfds_audio_feature_needs_tensorflow)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "speech": tfds.features.Tensor(shape=(None,), dtype=np.int16)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"speech": speech_example(i)}


def speech_example(i: int) -> np.ndarray:
  return np.random.default_rng(i).integers(-20000, 20000, 1000 + 100 * i, dtype=np.int16)


class MimJaxTestLabels(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset with no audio feature at all."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(2):
      yield i, {"label": i % 2}


class MimJaxTestAudioFeature(tfds.core.GeneratorBasedBuilder):
  """tfds.features.Audio, as real speech datasets declare it: building its DatasetInfo needs
  TensorFlow (it makes TensorFlow dtypes), so tfds.data_source fails without it."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "speech": tfds.features.Audio(sample_rate=8000, dtype=np.int16)}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError("never prepared")

  def _generate_examples(self):
    raise NotImplementedError("never prepared")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  for builder in (MimJaxTestSpeech, MimJaxTestLabels):
    builder(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_tfds_speech_without_label(tfds_dir):
  source = audio_source(make_config("tfds:mim_jax_test_speech", tfds_data_dir=tfds_dir))
  assert len(source) == 3
  by_length = {len(source[i]["audio"]): source[i] for i in range(3)}
  for i in range(3):
    record = by_length[1000 + 100 * i]
    assert record["audio"].dtype == np.float32 and record["label"] == 0
    assert record["label"].dtype == np.int32
    np.testing.assert_array_equal(record["audio"], speech_example(i) / np.float32(32768))


def test_tfds_without_audio_feature(tfds_dir):
  with pytest.raises(ValueError, match=r"tfds:mim_jax_test_labels has no audio feature "
                                       r"'audio' or 'speech'; it has \['label'\]"):
    audio_source(make_config("tfds:mim_jax_test_labels", tfds_data_dir=tfds_dir))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed: tfds can read Audio features")
def test_tfds_audio_feature_needs_tensorflow(tmp_path):
  with pytest.raises(ValueError, match=r"tfds:mim_jax_test_audio_feature has features that "
                                       r"tfds reads only with TensorFlow installed"):
    audio_source(make_config("tfds:mim_jax_test_audio_feature", tfds_data_dir=str(tmp_path)))


# ---------------------------------------------------------------- transform


def test_transform_crops_and_pads():
  record = {"audio": np.arange(25, dtype=np.float32), "label": np.int32(3)}
  evaluated = audio_sources.AudioTransform(10, train=False).map(record)
  np.testing.assert_array_equal(evaluated["audio"], np.arange(10))
  assert evaluated["audio_len"] == 10 and evaluated["label"] == 3
  assert evaluated["audio_len"].dtype == np.int32 and evaluated["audio"].dtype == np.float32

  train = audio_sources.AudioTransform(10, train=True)
  starts = set()
  for seed in range(40):
    crop = train.random_map(record, np.random.default_rng(seed))["audio"]
    assert crop[0] in range(16)
    np.testing.assert_array_equal(crop, np.arange(10) + crop[0])  # A contiguous slice.
    starts.add(int(crop[0]))
  assert len(starts) > 5  # Random offsets, ...
  again = train.random_map(record, np.random.default_rng(0))["audio"]
  np.testing.assert_array_equal(again, train.random_map(record, np.random.default_rng(0))["audio"])

  short = {"audio": np.ones(4, np.float32), "label": np.int32(1)}
  for transform in (train, audio_sources.AudioTransform(10, train=False)):
    padded = transform.random_map(short, np.random.default_rng(0))
    np.testing.assert_array_equal(padded["audio"], [1] * 4 + [0] * 6)
    assert padded["audio_len"] == 4


def test_train_transform_needs_random_map():
  with pytest.raises(ValueError, match="random_map"):
    audio_sources.AudioTransform(10, train=True).map({"audio": np.zeros(3), "label": 0})


def test_source_transforms_in_grain(digits):
  config = make_config()
  source = digits["test"]
  train = grain.MapDataset.source(source).seed(0).random_map(source.train_transform(config))
  evaluated = grain.MapDataset.source(source).map(source.eval_transform(config))
  for ds in (train, evaluated):
    record = ds[0]
    assert record["audio"].shape == (16000,) and record["audio"].dtype == np.float32
    assert record["audio_len"] == len(source[0]["audio"])  # Words are shorter than 1 s.
    np.testing.assert_array_equal(record["audio"][:record["audio_len"]], source[0]["audio"])


# ---------------------------------------------------------------- synthetic and names


def test_synthetic_audio_is_deterministic():
  config = make_config("synthetic", clip_seconds=0.5, num_classes=4)
  a, b = audio_source(config), audio_source(config)
  assert len(a) == 10_000
  for i in (0, 1, 9999):
    np.testing.assert_array_equal(a[i]["audio"], b[i]["audio"])
    assert a[i]["audio"].shape == (8000,) and a[i]["audio"].dtype == np.float32
    assert np.abs(a[i]["audio"]).max() <= 1.0 and 0 <= a[i]["label"] < 4
  assert not np.array_equal(a[0]["audio"], a[1]["audio"])
  assert not np.array_equal(a[0]["audio"], audio_source(config, "test")[0]["audio"])


def test_modality_must_fit_the_source():
  assert "spoken_digits" in sources.VALID_NAMES
  with pytest.raises(ValueError, match=r"'digits' is image data but data.modality='audio'"):
    audio_source(make_config("digits"))
  with pytest.raises(ValueError, match=r"'spoken_digits' is audio data but "
                                       r"data.modality='image'; set data.modality='audio'"):
    audio_source(make_config(modality="image"))
  with pytest.raises(ValueError, match=r"data.modality='video'; valid: 'image', 'audio'"):
    audio_source(make_config(modality="video"))
