"""Reads PyTorch checkpoint files (`.pth`, `.pt`) into numpy arrays, without PyTorch.

`torch.save` (PyTorch >= 1.6) writes a zip archive whose entries share one top-level folder:
  <folder>/data.pkl      a pickle of the saved object (dicts, lists, numbers, tensors);
  <folder>/data/<key>    the raw bytes of each tensor storage, in the writer's byte order;
  <folder>/byteorder     'little' or 'big' (absent in older files: little).
Inside the pickle a tensor is the call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`, and a storage is a persistent id ('storage', torch.<Type>Storage, key, location,
numel) naming its file in data/.

The unpickler here is restricted: it resolves only the few names a state dict needs (the tensor
rebuild functions, the storage types, OrderedDict) and turns every other global into an inert
placeholder, so reading a file never runs code from it, which plain pickle would. Tensors stay
lazy until asked for, so the optimizer state that training checkpoints also hold is never read.

A file that cannot be read is told apart by its first bytes: a zip archive without its end
(a download or copy cut short) is not the legacy format of PyTorch < 1.6, and each gets its own
advice.
"""

import collections
import os
import pickle
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# Every zip archive, torch.save's included, starts with a local file header.
_ZIP_MAGIC = b"PK\x03\x04"


class UnsupportedFormatError(ValueError):
  """The file is not a zip-format PyTorch checkpoint."""


class CorruptFileError(ValueError):
  """The file is cut short or damaged, e.g. by an interrupted download."""


class _StorageType:
  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise UnsupportedFormatError(f"tensor storage type torch.{name} is not supported; "
                                   f"supported: {sorted(_STORAGE_DTYPES)}")
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """One storage file of the archive, read on first use."""

  def __init__(self, archive: zipfile.ZipFile, entry: str, dtype: np.dtype, big_endian: bool):
    self._archive, self._entry, self._big_endian = archive, entry, big_endian
    self.dtype = dtype
    self._data: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self._data is None:
      dtype = self.dtype.newbyteorder(">") if self._big_endian else self.dtype
      self._data = np.frombuffer(self._archive.read(self._entry), dtype).astype(self.dtype)
    return self._data


class LazyTensor:
  """A tensor of the file: shape and dtype now, values on `.numpy()`."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self._storage, self._offset, self._stride = storage, offset, tuple(stride)
    self.shape = tuple(size)
    self.dtype = storage.dtype

  def numpy(self) -> np.ndarray:
    flat = self._storage.array()
    itemsize = flat.dtype.itemsize
    # as_strided trusts its arguments: a corrupt file must not make it read past the storage.
    last = self._offset + sum((n - 1) * s for n, s in zip(self.shape, self._stride))
    if (len(self.shape) != len(self._stride) or min(self._stride, default=0) < 0
        or self._offset < 0 or (0 not in self.shape and last >= flat.size)):
      raise UnsupportedFormatError(f"tensor of shape {self.shape}, stride {self._stride}, "
                                   f"offset {self._offset} lies outside its storage "
                                   f"({flat.size} elements): a corrupt file")
    if 0 in self.shape:
      return np.zeros(self.shape, flat.dtype)
    view = np.lib.stride_tricks.as_strided(flat[self._offset:], shape=self.shape,
                                           strides=[s * itemsize for s in self._stride])
    return np.array(view)  # A contiguous copy that owns its memory.

  def __repr__(self) -> str:
    return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


class _Opaque:
  """Stands in for any class or function the file names that a state dict does not need
  (argparse.Namespace in training checkpoints, numpy scalars, ...). Calls and state are recorded,
  never executed."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  return LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _rebuild_from_type(func, new_type, args, state):
  del new_type, state  # Tensor subclasses load as plain tensors.
  return func(*args)


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
    super().__init__(file)
    self._archive, self._prefix, self._big_endian = archive, prefix, big_endian
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    return type(name, (_Opaque,), {"__module__": f"opaque.{module}"})

  def persistent_load(self, pid: Any) -> _Storage:
    kind, storage_type, key, *unused = pid
    del unused  # location (the device it was saved from), element count
    if kind != "storage":
      raise UnsupportedFormatError(f"unknown persistent id kind {kind!r}")
    if key not in self._storages:
      self._storages[key] = _Storage(self._archive, f"{self._prefix}data/{key}",
                                     storage_type.dtype, self._big_endian)
    return self._storages[key]


def read_state_dict(path: str, pick: Callable[[Any], Any] = lambda obj: obj
                    ) -> dict[str, np.ndarray]:
  """The tensors of the state dict saved in `path`, as {name: numpy array}.

  `pick` maps the saved object to the state dict (e.g. `lambda obj: obj['model']` for MAE's
  releases); it sees every tensor as a `LazyTensor`, and only the tensors of what it returns are
  read. Entries that are not tensors are skipped. Raises FileNotFoundError for a missing file,
  CorruptFileError for one cut short or damaged, and UnsupportedFormatError for files that are
  not zip-format PyTorch checkpoints (PyTorch < 1.6's legacy format).
  """
  _check_archive(path)
  try:
    return _read_archive(path, pick)
  except zipfile.BadZipFile as error:  # a complete archive whose contents are damaged
    raise CorruptFileError(f"{path} is corrupt ({error}): download or copy it again") from error


def _check_archive(path: str) -> None:
  """Raises, naming `path`, unless it is a complete zip archive."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: check the path")
  if zipfile.is_zipfile(path):
    return
  with open(path, "rb") as f:
    head = f.read(len(_ZIP_MAGIC))
  if _ZIP_MAGIC.startswith(head):  # a zip's start (or nothing at all), but no end
    raise CorruptFileError(
        f"{path} is truncated ({os.path.getsize(path)} bytes: a zip archive without its end, as "
        f"an interrupted download or copy leaves it): download or copy it again")
  raise UnsupportedFormatError(
      f"{path} is not a zip-format PyTorch checkpoint (files from PyTorch < 1.6 use another "
      f"format): re-save it with a recent torch, torch.save(torch.load(path), path)")


def _read_archive(path: str, pick: Callable[[Any], Any]) -> dict[str, np.ndarray]:
  with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise UnsupportedFormatError(f"{path} has no single <folder>/data.pkl entry: not a "
                                   f"torch.save checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
    big_endian = (f"{prefix}byteorder" in archive.namelist()
                  and archive.read(f"{prefix}byteorder").decode().strip() == "big")
    with archive.open(pickles[0]) as pkl:
      state = pick(_Unpickler(pkl, archive, prefix, big_endian).load())
    if not isinstance(state, dict):
      raise UnsupportedFormatError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {name: value.numpy() for name, value in state.items()
            if isinstance(value, LazyTensor)}
