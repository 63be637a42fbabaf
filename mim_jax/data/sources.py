"""Random-access image and audio sources, picked by `config.data.name` and `config.data.modality`.

Every source has `len()` and integer indexing. Image sources (data.modality 'image', the
default) return records `{"image": uint8 [H, W, C], "label": int32}` with
C = `config.data.channels`; audio sources (data.modality 'audio') return
`{"audio": float32 [n] mono in [-1, 1] at data.sample_rate, "label": int32}`.
The forms of `config.data.name`:

  digits          scikit-learn's bundled 8x8 handwritten digits: 1797 images, no
                  download. Split by a fixed seeded permutation: 'train' is its
                  first 1500 images, 'test' the last 297. Images only.
  spoken_digits   the words "zero".."nine", synthesized once by eSpeak NG into a local
                  cache (spoken_digits.py): no download. Audio only.
  synthetic       deterministic random images of `image_size`, or waveforms of
                  data.clip_seconds, for benchmarks.
  tfds:<name>     a prepared tfds dataset read through `tfds.data_source`
                  (ArrayRecord, no TensorFlow); features 'image' and 'label', or
                  'audio' / 'speech' and an optional 'label' (tfds reads its
                  tfds.features.Audio type only with TensorFlow installed).
  folder:<path>   image (JPEG/PNG) or audio (WAV/FLAC/OGG) files under <path>/<split>
                  if that folder exists, else under <path>. Files in class subfolders
                  get the sorted class index as label, otherwise label 0.
"""

from concurrent import futures
import dataclasses
import difflib
import os
import pathlib
from typing import Any, Callable
import zlib

from absl import logging
import grain
import ml_collections
import numpy as np
from PIL import Image

from mim_jax import registry

Record = dict[str, np.ndarray]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
DIGITS_TRAIN_SIZE = 1500
SYNTHETIC_SIZE = 10_000
# Folder names that mark a folder as split into train/test rather than classes.
SPLIT_FOLDERS = ("train", "test", "val", "validation")
_PIL_MODES = {1: "L", 3: "RGB"}
MODALITIES = ("image", "audio")


def _record(image: np.ndarray, label: int) -> Record:
  return {"image": image, "label": np.int32(label)}


# Pillow modes of 16-bit grayscale ('I': 32-bit ints, how older Pillow opens 16-bit PNGs).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
  """An 8-bit image ('L', 'RGB' or another mode Pillow converts to them correctly) of the same
  content. Pillow's own conversions get two cases wrong for training: 16-bit grayscale becomes
  L by clipping at 255 (a 16-bit PNG turns all white), and dropping alpha keeps the colour of
  transparent pixels. So 16-bit values are scaled to 8 bits (v / 257, 65535 -> 255), and images
  with alpha (RGBA, LA, palettes with transparency) are composited on black. CMYK and the rest
  go through Pillow's conversion."""
  if image.mode in _SIXTEEN_BIT:
    array = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(array / 257), 0, 255).astype(np.uint8), "L")
  if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "RGBa", "La"):
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    rgb = rgba[..., :3] * (rgba[..., 3:] / 255)  # over black
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
  return image


def _pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(to_8bit(image).convert(_PIL_MODES[channels]), dtype=np.uint8)
  return array.reshape(array.shape[:2] + (channels,))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Returns a uint8 [H, W, channels] image from [H, W] or [H, W, C] input."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == channels:
    return image
  # PIL's L <-> RGB(A) conversions define luma and alpha handling for us.
  squeezed = image[..., 0] if image.shape[-1] == 1 else image
  return _pil_to_array(Image.fromarray(squeezed), channels)


class DigitsSource:
  """scikit-learn's 8x8 digits, 0..16 ink scaled to 0..255."""

  def __init__(self, split: str, channels: int):
    if split not in ("train", "test"):
      raise ValueError(f"digits: unknown split {split!r}; valid: 'train', 'test'.")
    # Imported here: scikit-learn takes 0.7 s to import, which only the digits runs need.
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    digits = sk_datasets.load_digits()
    # A fixed permutation, so both splits sample the whole file whatever its order.
    order = np.random.default_rng(0).permutation(len(digits.target))
    order = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
    images = np.round(digits.images[order] * (255 / 16)).astype(np.uint8)
    self._images = [to_channels(image, channels) for image in images]
    self._labels = digits.target[order].astype(np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Record:
    return _record(self._images[index], self._labels[index])


class SyntheticSource:
  """Uniform random images, generated on access so any length costs no memory."""

  def __init__(self, split: str, image_size: int, channels: int, num_classes: int):
    self._shape = (image_size, image_size, channels)
    self._num_classes = num_classes
    # crc32, unlike hash(), is stable across processes, so every host agrees.
    self._split_seed = zlib.crc32(split.encode())

  def __len__(self) -> int:
    return SYNTHETIC_SIZE

  def __getitem__(self, index: int) -> Record:
    rng = np.random.default_rng((self._split_seed, index))
    image = rng.integers(0, 256, self._shape, dtype=np.uint8)
    return _record(image, rng.integers(self._num_classes))


def open_tfds(name: str, split: str, data_dir: str | None) -> Any:
  """Returns `tfds.data_source(name, split=split)`, or a one-line ValueError saying what to do."""
  # Imported here, not at the top: only tfds:<name> sources need tfds, and its import was 15% of
  # `import mim_jax.main` (0.25 of 1.6 CPU-s), paid by every run on digits, folders or synthetic.
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered as tfds_registered
  try:
    # No download: every host of a pod would fetch at once, and preparing needs TensorFlow.
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, KeyError) as e:
    # tfds' errors for data not prepared as ArrayRecord, and for a dataset whose description it
    # ships but whose data was never generated (imagenet2012: "splits is empty").
    if isinstance(e, KeyError) and "not been generated" not in str(e):
      raise
    raise ValueError(f"tfds:{name} is not prepared as ArrayRecord in data_dir={data_dir}; "
                     f"run `tfds build {name} --file_format=array_record` once.") from e
  except tfds_registered.DatasetNotFoundError:
    # tfds lists every registered dataset (hundreds of lines): name the closest few instead.
    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, tfds_registered.list_imported_builders(), n=5)
    raise ValueError(f"data.name tfds:{name}: tfds has no dataset {base!r}"
                     + (f"; closest: {', '.join(close)}" if close else "")) from None
  except ModuleNotFoundError as e:
    # tfds re-raises the import error with its own message: its cause names the module.
    if "tensorflow" not in (e.name, getattr(e.__cause__, "name", None)):
      raise
    # Some feature types still build TensorFlow dtypes when tfds loads the dataset's info, even
    # for data_source: tfds.features.Audio does (LibriSpeech, speech_commands).
    raise ValueError(f"tfds:{name} has features that tfds reads only with TensorFlow installed "
                     f"(tfds.features.Audio is one); install tensorflow-cpu, or export the data "
                     f"as WAV/FLAC files and use data.name=folder:<path>.") from e


class TfdsSource:
  """A tfds ArrayRecord dataset; tfds decodes the images to numpy for us."""

  def __init__(self, name: str, split: str, data_dir: str | None, channels: int):
    self._source = open_tfds(name, split, data_dir)
    features = set(self._source.dataset_info.features.keys())
    if missing := {"image", "label"} - features:
      raise ValueError(f"tfds:{name} lacks features {sorted(missing)}; it has {sorted(features)}.")
    self._channels = channels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    example = self._source[index]
    return _record(to_channels(np.asarray(example["image"]), self._channels), example["label"])


def _is_readable(path: pathlib.Path) -> bool:
  try:
    with Image.open(path) as image:
      image.verify()
    return True
  except Exception:  # PIL raises many types (OSError, SyntaxError, ...).
    return False


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The readable files of a folder source in sorted order, and their labels."""
  files: list[pathlib.Path]
  labels: list[int]
  class_names: list[str]  # Empty for a flat folder, whose files all have label 0.
  num_corrupt: int        # Files left out because `is_readable` rejected them.


@dataclasses.dataclass(frozen=True)
class Holdout:
  """How a folder without split folders serves an evaluation split: `share` of each class
  (0 = refuse) is held out of `train_split` and forms every other split."""
  share: float = 0.0
  train_split: str = "train"

  @classmethod
  def from_config(cls, d: ml_collections.ConfigDict) -> "Holdout":
    share = d.get("holdout", 0.0)
    if not 0.0 <= share < 1.0:
      raise ValueError(f"data.holdout must be in [0, 1), got {share}")
    return cls(share, d.get("split", "train"))


def held_out(files: list[pathlib.Path], labels: list[int], root: pathlib.Path,
             share: float) -> list[bool]:
  """A deterministic, stratified hold-out: in each class, the round(share * n) files (at least
  one when share > 0 and the class has two or more) whose relative paths hash lowest. A hash
  rather than a position keeps a file on its side when others are added or removed."""
  out = [False] * len(files)
  by_class: dict[int, list[int]] = {}
  for i, label in enumerate(labels):
    by_class.setdefault(label, []).append(i)
  for members in by_class.values():
    count = min(max(round(share * len(members)), 1 if len(members) > 1 else 0),
                len(members) - 1)
    key = lambda i: zlib.crc32(str(files[i].relative_to(root)).encode())
    for i in sorted(members, key=key)[:count]:
      out[i] = True
  return out


def list_folder(path: str, split: str, what: str, extensions: tuple[str, ...],
                is_readable: Callable[[pathlib.Path], bool], on_corrupt: str,
                holdout: Holdout = Holdout()) -> FolderListing:
  """Lists the `what` files ('image', 'audio') with `extensions` of split `split` under `path`.

  The files are those under <path>/<split> if that folder exists, else under <path>; labels are
  the sorted class subfolder index. A folder without split folders is never evaluated on its own
  training files: `holdout.share` of each class is held out of the training split and is every
  other split (logged), or, with a share of 0, any other split is refused. Every file is checked upfront with `is_readable` (a cheap
  header check) rather than on access: that keeps the index -> file map fixed and identical on
  every host, which sharding and exact resume rely on, and it gives the corrupt count before
  training starts. Unreadable files raise (on_corrupt='error') or are left out ('skip').
  """
  if on_corrupt not in ("skip", "error"):
    raise ValueError(f"on_corrupt={on_corrupt!r}; valid: 'skip', 'error'.")
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise ValueError(f"folder source: {root} is not an existing directory.")
  unsplit = False
  if (root / split).is_dir():
    root = root / split
  elif split_dirs := sorted(d.name for d in root.iterdir() if d.name in SPLIT_FOLDERS):
    # Reading such a folder whole would turn its split folders into classes.
    raise ValueError(f"folder source: {root} has split folders {split_dirs} "
                     f"but none for split {split!r}.")
  else:
    unsplit = True
    if split != holdout.train_split and not holdout.share:
      raise ValueError(f"folder source: {root} has no {split!r} folder, and evaluating on the "
                       f"training files would measure memory, not generalisation: set "
                       f"data.holdout (e.g. 0.05 holds out 5% of each class) or add "
                       f"{root / split}")
  # os.walk, unlike Path.rglob, follows symlinked class folders, a common way to build subsets.
  files = sorted(pathlib.Path(folder, name)
                 for folder, _, names in os.walk(root, followlinks=True) for name in names
                 if os.path.splitext(name)[1].lower() in extensions)
  if not files:
    raise ValueError(f"folder source: no {what} files ({', '.join(extensions)}) under {root}.")

  # Class folders only when every file sits in one; a flat folder is unlabeled. Labels come
  # from all files, so a class whose files are all corrupt does not shift the others.
  relative = [f.relative_to(root).parts for f in files]
  if all(len(parts) > 1 for parts in relative):
    class_names = sorted({parts[0] for parts in relative})
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[parts[0]] for parts in relative]
  else:
    class_names = []
    labels = [0] * len(files)
  if unsplit and holdout.share:
    out = held_out(files, labels, root, holdout.share)
    keep = [o == (split != holdout.train_split) for o in out]
    logging.info("folder source: %s has no split folders: %d of its %d %s files (%.0f%% of "
                 "each class, data.holdout) are held out of %r as split %r.", root, sum(out),
                 len(files), what, 100 * holdout.share, holdout.train_split,
                 split if split != holdout.train_split else "the others")
    files = [f for f, k in zip(files, keep) if k]
    labels = [label for label, k in zip(labels, keep) if k]

  with futures.ThreadPoolExecutor(16) as pool:  # I/O bound: threads overlap the reads.
    readable = list(pool.map(is_readable, files))
  corrupt = [f for f, ok in zip(files, readable) if not ok]
  if corrupt and on_corrupt == "error":
    raise ValueError(f"folder source: cannot decode {what} file {corrupt[0]} "
                     f"({len(corrupt)} such files); set on_corrupt='skip' to skip them.")
  if len(corrupt) == len(files):
    raise ValueError(f"folder source: every {what} file under {root} is corrupt.")
  if corrupt:
    logging.warning("folder source: skipping %d corrupt of %d %s files under %s, e.g. %s.",
                    len(corrupt), len(files), what, root, corrupt[0])
  return FolderListing(files=[f for f, ok in zip(files, readable) if ok],
                       labels=[label for label, ok in zip(labels, readable) if ok],
                       class_names=class_names, num_corrupt=len(corrupt))


def read_first_decodable(files: list[pathlib.Path], index: int, what: str,
                         read: Callable[[pathlib.Path], Any],
                         errors: type[Exception], on_corrupt: str,
                         found: set[pathlib.Path]) -> tuple[int, Any]:
  """Returns (i, read(files[i])) for i = index, or, with on_corrupt='skip', the first file after
  it (wrapping around) whose read raises no `errors`: damage that the upfront header check
  cannot see. Skipping to the next file keeps the order deterministic, so a resumed run reads
  what an uninterrupted one would. `found` holds the files found corrupt so far; this adds to
  it, and warns once per file with the count."""
  for offset in range(len(files)):
    i = (index + offset) % len(files)
    try:
      return i, read(files[i])
    except errors as e:
      if on_corrupt == "error":
        raise ValueError(f"folder source: cannot decode {what} file {files[i]}: {e}; replace "
                         f"or remove it, or set data.on_corrupt='skip' to read the next file "
                         f"in its place") from e
      if files[i] not in found:
        found.add(files[i])
        logging.warning("folder source: skipping corrupt %s file %s (%s), which passed the "
                        "header check; the next file is read in its place, at every epoch "
                        "alike; %d such files met so far.", what, files[i], e, len(found))
  raise ValueError(f"folder source: no decodable {what} file among {len(files)}.")


class FolderSource:
  """JPEG/PNG files in a folder tree, decoded with Pillow on access.

  Files are checked upfront with `PIL.Image.verify`, which reads headers (and PNG checksums)
  but does not decode pixels, so it stays cheap for large folders (see `list_folder`). Damage
  that verify cannot see (truncated JPEG data) surfaces on access: 'error' raises, 'skip'
  substitutes the next file, so the order stays deterministic.
  """

  def __init__(self, path: str, split: str, channels: int, on_corrupt: str,
               holdout: Holdout = Holdout()):
    listing = list_folder(path, split, "image", IMAGE_EXTENSIONS, _is_readable, on_corrupt,
                          holdout)
    self.class_names = listing.class_names
    self.num_corrupt = listing.num_corrupt
    self._files = listing.files
    self._labels = listing.labels
    self._channels = channels
    self._on_corrupt = on_corrupt
    self.corrupt_on_read: set[pathlib.Path] = set()  # found by decoding (on_corrupt='skip')

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> Record:
    i, image = read_first_decodable(self._files, index, "image", self._decode, OSError,
                                    self._on_corrupt, self.corrupt_on_read)
    return _record(image, self._labels[i])

  def _decode(self, path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as image:
      return _pil_to_array(image, self._channels)


def _modality(d: ml_collections.ConfigDict) -> str:
  # Image configs written before audio existed have no data.modality.
  return d.get("modality", "image")


# The audio builders import their modules on use: those modules import this one's folder and
# tfds helpers, and image runs need not load scipy, libsndfile or eSpeak NG.


def _spoken_digits(arg, d, split, image_size):
  from mim_jax.data import spoken_digits
  return spoken_digits.SpokenDigitsSource(split, d.sample_rate)


def _synthetic(arg, d, split, image_size):
  if _modality(d) == "audio":
    from mim_jax.data import audio_sources
    return audio_sources.SyntheticAudioSource(split, d.clip_seconds, d.sample_rate,
                                              d.num_classes)
  return SyntheticSource(split, image_size, d.channels, d.num_classes)


def _tfds(arg, d, split, image_size):
  data_dir = d.tfds_data_dir or None  # '' or None both mean tfds' default data dir.
  if _modality(d) == "audio":
    from mim_jax.data import audio_sources
    return audio_sources.TfdsAudioSource(arg, split, data_dir, d.sample_rate)
  return TfdsSource(arg, split, data_dir, d.channels)


def _folder(arg, d, split, image_size):
  if _modality(d) == "audio":
    from mim_jax.data import audio_sources
    return audio_sources.AudioFolderSource(arg, split, d.sample_rate, d.on_corrupt,
                                           Holdout.from_config(d))
  return FolderSource(arg, split, d.channels, d.on_corrupt, Holdout.from_config(d))


# Source kind (the part of data.name before ':') -> builder(arg, data_config, split, image_size),
# where arg is the part after ':'. A builder serving both modalities picks by data.modality.
SOURCES = registry.Registry("data source", {
    "digits": lambda arg, d, split, image_size: DigitsSource(split, d.channels),
    "spoken_digits": _spoken_digits,
    "synthetic": _synthetic,
    "tfds": _tfds,
    "folder": _folder,
})
# The kinds that serve one modality only; the others serve both.
_ONLY_MODALITY = {"digits": "image", "spoken_digits": "audio"}
# The kinds that take an argument after ':', and what it is; the others take none.
_ARGUMENTS = {"tfds": "<name>", "folder": "<path>"}
VALID_NAMES = tuple(f"{kind}:{_ARGUMENTS[kind]}" if kind in _ARGUMENTS else kind
                    for kind in SOURCES)


def check_name(name: str) -> None:
  """Raises ValueError unless `name` has one of the forms in VALID_NAMES."""
  kind, colon, arg = name.partition(":")
  valid = bool(arg) if kind in _ARGUMENTS else kind in SOURCES and not colon
  if not valid:
    raise ValueError(f"Unknown data.name {name!r}; valid forms: {', '.join(VALID_NAMES)}.")


def get_source(data_config: ml_collections.ConfigDict, split: str,
               image_size: int) -> grain.sources.RandomAccessDataSource[Record]:
  """Returns the random-access source named by `data_config.name` for `split`, of the
  modality `data_config.modality` ('image' when absent)."""
  check_name(data_config.name)
  modality = _modality(data_config)
  if modality not in MODALITIES:
    raise ValueError(f"data.modality={modality!r}; valid: 'image', 'audio'.")
  kind, _, arg = data_config.name.partition(":")
  if _ONLY_MODALITY.get(kind, modality) != modality:
    raise ValueError(f"data.name {data_config.name!r} is {_ONLY_MODALITY[kind]} data but "
                     f"data.modality={modality!r}; set data.modality={_ONLY_MODALITY[kind]!r}.")
  if modality == "image" and data_config.channels not in _PIL_MODES:
    raise ValueError(f"data.channels={data_config.channels}; valid: 1 (grayscale), 3 (RGB).")
  return SOURCES[kind](arg, data_config, split, image_size)
