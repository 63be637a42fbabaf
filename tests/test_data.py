"""Tests of mim_jax.data: sources, augmentation and the grain pipelines, on CPU in seconds."""

import io
import logging
import os
import pathlib
import re
import sys
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mim_jax import errors
from mim_jax.data import augment
from mim_jax.data import eval_arrays
from mim_jax.data import get_source
from mim_jax.data import pipeline
from mim_jax.data import train_iterator


def make_config(name: str = "digits", channels: int = 1, **data) -> ml_collections.ConfigDict:
  """The config fields the data package reads (SPEC), sized for CPU tests."""
  c = ml_collections.ConfigDict()
  c.image_size = 16
  c.batch_size = 8
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name=name, split="train", eval_split="test", channels=channels, num_classes=10,
      crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, on_corrupt="error",
      holdout=0.0, tfds_data_dir="", num_workers=0, read_threads=0,
      prefetch_batches=0, mean=(0.5,) * channels,
      std=(0.5,) * channels))
  c.lock()  # A misspelt field in `data` raises instead of being added.
  c.data.update(data)
  return c


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ---------------------------------------------------------------- train iterator on digits


def test_digits_train_batch():
  batch = next(train_iterator(make_config(), process_index=0, process_count=1))
  assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  # Ink 0..255 normalised with mean 0.5 and std 0.5 lies in [-1, 1]; digits use the full range.
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert set(batch["label"]) <= set(range(10))


def test_same_seed_same_batches_other_seed_other_batches():
  config = make_config()
  first = take(train_iterator(config, process_index=0, process_count=1), 3)
  assert_batches_equal(first, take(train_iterator(config, process_index=0, process_count=1), 3))
  config.seed = 1
  other = next(train_iterator(config, process_index=0, process_count=1))
  assert not np.array_equal(first[0]["image"], other["image"])


def test_set_state_resumes_exactly():
  config = make_config()
  it = train_iterator(config, process_index=0, process_count=1)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 2)
  resumed = train_iterator(config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), expected)


def test_read_ahead_is_bounded(monkeypatch):
  """The train stream augments at most data.prefetch_batches batches ahead of the reader. With
  grain's default buffer (500 elements, which are batches here) it would augment hundreds of
  batches while the first step compiles."""
  config = make_config(read_threads=2, prefetch_batches=2)
  config.image_size = 12  # counts this stream's crops, not those of another test's live stream
  crops, real_crop = [], augment.random_resized_crop
  monkeypatch.setattr(augment, "random_resized_crop",
                      lambda image, rng, size, *a: crops.append(size == 12) or real_crop(
                          image, rng, size, *a))
  it = train_iterator(config, process_index=0, process_count=1)
  take(it, 2)
  time.sleep(0.5)  # time enough to read ahead as far as it may
  # grain keeps prefetch_batches futures besides the batch being returned.
  assert 2 * 8 <= sum(crops) <= (2 + 2) * 8


def test_read_options():
  auto = pipeline.read_options(make_config().data)
  assert auto.num_threads == min(os.cpu_count(), 16)
  assert auto.prefetch_buffer_size == auto.num_threads
  given = pipeline.read_options(make_config(read_threads=3, prefetch_batches=5).data)
  assert (given.num_threads, given.prefetch_buffer_size) == (3, 5)
  with pytest.raises(ValueError, match=r"data.prefetch_batches=-1 must be >= 0"):
    pipeline.read_options(make_config(prefetch_batches=-1).data)


def test_worker_processes_give_the_same_batches_and_resume():
  config = make_config()
  expected = take(train_iterator(config, process_index=0, process_count=1), 3)
  config.data.num_workers = 1
  it = train_iterator(config, process_index=0, process_count=1)
  assert_batches_equal(take(it, 2), expected[:2])
  state = it.get_state()
  it.close()
  resumed = train_iterator(config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 1), expected[2:])
  resumed.close()


def test_processes_read_disjoint_shards():
  # Full-image crops at the source size without flips leave each image recognisable.
  config = make_config("synthetic", hflip=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  config.image_size = 8
  source = get_source(config.data, "train", config.image_size)
  index_of = {source[i]["image"].tobytes(): i for i in range(len(source))}
  read = []
  for process_index in (0, 1):
    it = train_iterator(config, process_index=process_index, process_count=2)
    for batch in take(it, 20):
      assert batch["image"].shape == (4, 8, 8, 1)  # batch_size 8 over 2 processes.
      pixels = np.round(batch["image"] * 127.5 + 127.5).astype(np.uint8)
      read += [index_of[image.tobytes()] for image in pixels]
  # Each process reads its slice of every global batch (tests/test_multiprocess.py): 20 global
  # batches of 8, within the first epoch of 10,000 examples, are 160 different examples.
  assert len(set(read)) == len(read) == 160


def test_batch_size_not_divisible_by_processes():
  with pytest.raises(ValueError, match="batch_size=8.*3"):
    train_iterator(make_config(), process_index=0, process_count=3)


# ---------------------------------------------------------------- eval arrays


def test_eval_arrays_digits_test_split():
  config = make_config()
  inputs, labels = eval_arrays(config, "test")
  images = inputs["image"]
  assert set(inputs) == {"image"}
  assert images.shape == (297, 16, 16, 1) and images.dtype == np.float32
  assert labels.shape == (297,) and labels.dtype == np.int32
  head_inputs, head_labels = eval_arrays(config, "test", max_examples=10)
  np.testing.assert_array_equal(head_inputs["image"], images[:10])
  np.testing.assert_array_equal(head_labels, labels[:10])


def test_digits_split_is_fixed_and_disjoint():
  config = make_config()
  train, test = (get_source(config.data, s, 16) for s in ("train", "test"))
  assert (len(train), len(test)) == (1500, 297)
  train_images = {train[i]["image"].tobytes() for i in range(len(train))}
  assert not any(test[i]["image"].tobytes() in train_images for i in range(len(test)))


# ---------------------------------------------------------------- augmentation


def test_crop_box_stays_within_scale_ratio_and_image():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = augment.crop_box(60, 80, rng, (0.2, 1.0), (3 / 4, 4 / 3))
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
    assert 0.19 <= w * h / (60 * 80) <= 1.0
    assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_crop_box_falls_back_to_center_crop():
  # A square crop of the whole area never fits a 10 x 40 image: the fallback is its centre square.
  box = augment.crop_box(10, 40, np.random.default_rng(0), (1.0, 1.0), (1.0, 1.0))
  assert box == (15, 0, 25, 10)


def test_center_resize_shapes():
  image = np.zeros((30, 50, 3), np.uint8)
  assert augment.center_resize(image, 16).shape == (16, 16, 3)
  assert augment.center_resize(image[:8, :8, :1], 16).shape == (16, 16, 1)


# ---------------------------------------------------------------- folder source


def write_image(path: pathlib.Path, seed: int, fmt: str = "PNG", size=(20, 24)) -> bytes:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  path.write_bytes(buffer.getvalue())
  return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
  """tmp/train/{cat: 2 PNG + 1 JPEG, dog: 2 PNG}, tmp/test/dog: 1 PNG."""
  for i in range(2):
    write_image(tmp_path / "train" / "cat" / f"{i}.png", i)
    write_image(tmp_path / "train" / "dog" / f"{i}.png", 10 + i)
  write_image(tmp_path / "train" / "cat" / "2.jpg", 2, fmt="JPEG")
  write_image(tmp_path / "test" / "dog" / "0.png", 20)
  return tmp_path


def test_folder_class_subfolders_give_labels(image_folder):
  config = make_config(f"folder:{image_folder}", channels=3)
  source = get_source(config.data, "train", 16)
  assert source.class_names == ["cat", "dog"] and source.num_corrupt == 0
  records = [source[i] for i in range(len(source))]
  assert [r["label"] for r in records] == [0, 0, 0, 1, 1]
  assert all(r["image"].shape == (20, 24, 3) and r["image"].dtype == np.uint8 for r in records)
  assert len(get_source(config.data, "test", 16)) == 1
  gray = get_source(make_config(f"folder:{image_folder}").data, "train", 16)
  assert gray[0]["image"].shape == (20, 24, 1)


def test_folder_train_iterator(image_folder):
  config = make_config(f"folder:{image_folder}", channels=3, crop_scale=(0.5, 1.0))
  batch = next(train_iterator(config, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert set(batch["label"]) <= {0, 1}


def test_flat_folder_has_label_zero(tmp_path):
  write_image(tmp_path / "a.png", 0)
  write_image(tmp_path / "b.JPEG", 1, fmt="JPEG")
  source = get_source(make_config(f"folder:{tmp_path}").data, "train", 16)
  assert len(source) == 2 and {int(source[i]["label"]) for i in range(2)} == {0}


def test_folder_errors(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(ValueError, match=str(missing)):
    get_source(make_config(f"folder:{missing}").data, "train", 16)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"no image files \(.jpeg, .jpg, .png\) under .*empty"):
    get_source(make_config(f"folder:{tmp_path / 'empty'}").data, "train", 16)
  write_image(tmp_path / "split" / "train" / "0.png", 0)
  with pytest.raises(ValueError, match=r"split folders \['train'\] but none for split 'test'"):
    get_source(make_config(f"folder:{tmp_path / 'split'}").data, "test", 16)


def test_folder_corrupt_file(image_folder):
  bad = image_folder / "train" / "dog" / "bad.png"
  bad.write_bytes(b"not an image")
  config = make_config(f"folder:{image_folder}", channels=3)
  with pytest.raises(ValueError, match="bad.png"):
    get_source(config.data, "train", 16)
  config.data.on_corrupt = "skip"
  source = get_source(config.data, "train", 16)
  assert source.num_corrupt == 1 and len(source) == 5


def test_folder_truncated_jpeg_found_on_access(tmp_path):
  # JPEG headers verify fine; the missing pixel data only shows when decoding.
  data = write_image(tmp_path / "0.jpg", 0, fmt="JPEG", size=(64, 64))
  (tmp_path / "0.jpg").write_bytes(data[: len(data) // 2])
  write_image(tmp_path / "1.png", 1)
  config = make_config(f"folder:{tmp_path}", channels=3)
  source = get_source(config.data, "train", 16)
  with pytest.raises(ValueError, match="0.jpg"):
    source[0]
  config.data.on_corrupt = "skip"
  source = get_source(config.data, "train", 16)
  np.testing.assert_array_equal(source[0]["image"], source[1]["image"])  # The next file.


def truncated_jpeg_folder(root: pathlib.Path) -> pathlib.Path:
  """Six JPEGs whose third is cut in half: its header passes the upfront check, its pixels do
  not decode (issue 10, case 6)."""
  for i in range(6):
    write_image(root / f"{i}.jpg", i, fmt="JPEG", size=(64, 64))
  data = (root / "2.jpg").read_bytes()
  (root / "2.jpg").write_bytes(data[: len(data) // 2])
  return root / "2.jpg"


def test_truncated_jpeg_stops_the_first_batch_in_one_line(tmp_path):
  bad = truncated_jpeg_folder(tmp_path)
  config = make_config(f"folder:{tmp_path}", channels=3)
  with pytest.raises(ValueError) as caught:
    next(train_iterator(config, process_index=0, process_count=1))  # 8 > 6: reads every file
  assert re.fullmatch(rf"folder source: cannot decode image file {re.escape(str(bad))}: [^;]+; "
                      r"replace or remove it, or set data.on_corrupt='skip' to read the next "
                      r"file in its place", errors.describe(caught.value)), caught.value


def test_truncated_jpeg_skipped_counted_and_resumed_exactly(tmp_path, caplog):
  bad = truncated_jpeg_folder(tmp_path)
  config = make_config(f"folder:{tmp_path}", channels=3, on_corrupt="skip")
  iterator = train_iterator(config, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    take(iterator, 2)
    state = iterator.get_state()
    rest = take(iterator, 3)  # five batches of 8 from 6 files: the bad one met every epoch
  warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
  assert len(warnings) == 1, warnings  # once per file, not per read
  assert str(bad) in warnings[0] and "1 such files met so far" in warnings[0], warnings
  resumed = train_iterator(config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), rest)


# ---------------------------------------------------------------- tfds source


class MimJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """A tiny tfds dataset, written as real ArrayRecord files without TensorFlow."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(12, 10, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      # PNG bytes, since encoding a numpy image would need TensorFlow.
      buffer = io.BytesIO()
      pixels = np.full((12, 10, 3), 40 * i, np.uint8)
      Image.fromarray(pixels).save(buffer, format="PNG")
      yield i, {"image": buffer.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  MimJaxTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_tfds_source_reads_array_record(tfds_dir):
  config = make_config("tfds:mim_jax_test_images", channels=3, tfds_data_dir=tfds_dir)
  source = get_source(config.data, "train", 16)
  assert len(source) == 6
  labels = sorted(int(source[i]["label"]) for i in range(6))
  assert labels == [0, 0, 1, 1, 2, 2] and source[0]["label"].dtype == np.int32
  assert source[0]["image"].shape == (12, 10, 3) and source[0]["image"].dtype == np.uint8
  config.data.channels = 1
  assert get_source(config.data, "test", 16)[0]["image"].shape == (12, 10, 1)


def test_tfds_train_iterator(tfds_dir):
  config = make_config("tfds:mim_jax_test_images", channels=3, tfds_data_dir=tfds_dir)
  batch = next(train_iterator(config, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 16, 16, 3) and set(batch["label"]) <= {0, 1, 2}


def test_tfds_unprepared_dataset(tmp_path):
  config = make_config("tfds:mnist", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds:mnist is not prepared as ArrayRecord"):
    get_source(config.data, "train", 16)


def test_tfds_half_built_dataset_is_not_prepared(tmp_path):
  """A version folder without its dataset_info.json (an interrupted `tfds build`) makes tfds
  raise a KeyError about empty splits: the same one-line advice."""
  version = str(tfds.builder_cls("mnist").VERSION)
  (tmp_path / "mnist" / version).mkdir(parents=True)
  config = make_config("tfds:mnist", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="tfds:mnist is not prepared as ArrayRecord"):
    get_source(config.data, "train", 16)


def test_tfds_unknown_dataset_names_the_closest_few(tmp_path):
  """Not tfds' list of every dataset (hundreds of lines): the name and a few close ones."""
  config = make_config("tfds:imagenet2013", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError) as error:
    get_source(config.data, "train", 16)
  message = str(error.value)
  assert message.startswith("data.name tfds:imagenet2013: tfds has no dataset 'imagenet2013'; "
                            "closest: imagenet2012"), message
  assert len(message.splitlines()) == 1 and message.count(",") < 5


def test_tfds_mock_data_mnist():
  # How trainer tests run on a named tfds dataset with no files: tfds.testing.mock_data.
  config = make_config("tfds:mnist", channels=3)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(train_iterator(config, process_index=0, process_count=1))
    inputs, labels = eval_arrays(config, "test")
  assert batch["image"].shape == (8, 16, 16, 3)
  assert inputs["image"].shape == (16, 16, 16, 3) and labels.dtype == np.int32


# ---------------------------------------------------------------- names


def test_unknown_name_lists_valid_forms():
  with pytest.raises(ValueError) as error:
    get_source(make_config("imagenet").data, "train", 16)
  message = str(error.value)
  assert "'imagenet'" in message
  for form in ("digits", "synthetic", "tfds:<name>", "folder:<path>"):
    assert form in message


def test_no_tensorflow_imported():
  # Runs after the tests above, which exercised every source: none may pull in TensorFlow.
  assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------- image modes and hold-out


def saved_png(path: pathlib.Path, image: Image.Image) -> pathlib.Path:
  image.save(path, format="PNG")
  return path


@pytest.mark.parametrize("channels", [1, 3])
def test_png_modes_decode_to_the_expected_pixels(tmp_path, channels):
  """16-bit grayscale is scaled to 8 bits (not clipped to white), alpha is composited on
  black, palettes keep their colours, CMYK goes through Pillow's conversion."""
  gray16 = np.array([[0, 257, 32896], [65535, 1000, 51400]], np.uint16)
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[0] = [[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]
  rgba[1] = [[10, 20, 30, 255], [255, 255, 255, 51], [0, 0, 0, 0]]
  palette = Image.new("P", (3, 2))
  palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
  palette.putdata([0, 1, 2, 2, 1, 0])
  cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in Pillow's conversion
  want_rgb = {
      "gray16": np.stack([np.round(gray16 / 257).astype(np.uint8)] * 3, -1),
      "rgba": np.round(rgba[..., :3] * (rgba[..., 3:] / 255)).astype(np.uint8),
      "palette": np.array([[[0, 0, 0], [255, 0, 0], [0, 0, 255]],
                           [[0, 0, 255], [255, 0, 0], [0, 0, 0]]], np.uint8),
      "cmyk": np.broadcast_to(np.array([255, 0, 0], np.uint8), (2, 3, 3)),
  }
  images = {"gray16": Image.fromarray(gray16), "rgba": Image.fromarray(rgba, "RGBA"),
            "palette": palette, "cmyk": cmyk}
  assert images["gray16"].mode.startswith("I")
  for i, (name, image) in enumerate(images.items()):
    folder = tmp_path / name
    folder.mkdir()
    if name == "cmyk":  # PNG has no CMYK: JPEG does (lossy, so compare loosely below).
      image.save(folder / "0.jpg", format="JPEG", quality=100)
    else:
      saved_png(folder / "0.png", image)
    got = get_source(make_config(f"folder:{folder}", channels=channels).data, "train",
                     16)[0]["image"]
    want = want_rgb[name]
    if channels == 1:
      want = np.asarray(Image.fromarray(want, "RGB").convert("L"))[..., None]
    tolerance = 3 if name == "cmyk" else 0
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=tolerance, err_msg=name)
  # The bug this guards against: Pillow's own conversion clips 16-bit values at 255.
  assert (np.asarray(images["gray16"].convert("L"))[1] == 255).all()


def test_unsplit_folder_holds_out_a_stratified_share_for_evaluation(tmp_path):
  """A folder without split folders is never evaluated on its training files: data.holdout of
  each class is held out of the training split, deterministically; with 0, evaluating is
  refused with a message naming the fix."""
  for label in ("cat", "dog"):
    for i in range(20):
      write_image(tmp_path / label / f"{i}.png", i, size=(4, 4))
  config = make_config(f"folder:{tmp_path}", channels=3)
  with pytest.raises(ValueError, match="data.holdout"):
    get_source(config.data, "test", 16)
  config = make_config(f"folder:{tmp_path}", channels=3, holdout=0.1)
  train, test = (get_source(config.data, split, 16) for split in ("train", "test"))
  assert (len(train), len(test)) == (36, 4)
  assert sorted(int(test[i]["label"]) for i in range(4)) == [0, 0, 1, 1]  # stratified
  train_files, test_files = set(map(str, train._files)), set(map(str, test._files))
  assert not train_files & test_files and len(train_files | test_files) == 40
  again = get_source(config.data, "test", 16)
  assert list(map(str, again._files)) == list(map(str, test._files))  # deterministic


def test_run_length_follows_a_folders_size(tmp_path):
  """runlocal on a folder: epochs turn into steps by the folder's file count, not ImageNet's."""
  from configs import mae_vit  # pylint: disable=g-import-not-at-top
  for i in range(300):
    write_image(tmp_path / "train" / str(i % 3) / f"{i}.png", i, size=(2, 2))
  config = mae_vit.get_config(f"runlocal,data=folder:{tmp_path}")
  # 18 epochs of 300 // 128 = 2 steps, 3 warmup epochs: not 180,162 steps and 30,027 warmup.
  assert (config.total_steps, config.optim.warmup_steps) == (36, 6)
