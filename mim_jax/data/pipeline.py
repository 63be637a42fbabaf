"""grain pipelines: the infinite, checkpointable train iterator and whole-split eval arrays."""

import os
from typing import Any, Callable, Iterator

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from mim_jax.data import augment
from mim_jax.data import sources
from mim_jax.data import targets


def check_channels(config: ml_collections.ConfigDict) -> None:
  d = config.data
  if d.get("modality", "image") != "image":
    return
  if not len(d.mean) == len(d.std) == d.channels:
    raise ValueError(f"data.mean {d.mean} and data.std {d.std} need one value per channel "
                     f"(data.channels={d.channels}).")


def train_transform(source: Any, config: ml_collections.ConfigDict
                    ) -> Callable[[dict, np.random.Generator], dict]:
  """The random per-example transform of training records. Image sources get MAE's
  augmentation (random resized crop, flip, normalisation); a source of another modality brings
  its own as `source.train_transform(config)`."""
  if hasattr(source, "train_transform"):
    return source.train_transform(config)
  d = config.data
  return augment.TrainTransform(config.image_size, tuple(d.crop_scale), tuple(d.crop_ratio),
                                d.hflip, tuple(d.mean), tuple(d.std))


def eval_transform(source: Any, config: ml_collections.ConfigDict
                   ) -> Callable[[dict], dict]:
  """The deterministic per-example transform of eval records: images are resized and
  normalised; a source of another modality brings its own as `source.eval_transform(config)`."""
  if hasattr(source, "eval_transform"):
    return source.eval_transform(config)
  d = config.data
  return augment.EvalTransform(config.image_size, tuple(d.mean), tuple(d.std))


def _eval_source(config: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """The split's records, eval-transformed."""
  check_channels(config)
  source = sources.get_source(config.data, split, config.get("image_size", 0))
  return grain.MapDataset.source(source).map(eval_transform(source, config))


def _split_labels(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """A batch of records -> (the model's inputs, labels int32)."""
  inputs = {k: v for k, v in batch.items() if k != "label"}
  return inputs, batch["label"].astype(np.int32)


MAX_READ_THREADS = 16  # grain.ReadOptions' default thread count


def read_options(data: ml_collections.ConfigDict) -> grain.ReadOptions:
  """The train stream's read-ahead: `data.read_threads` threads (0 = one per CPU core, at most
  16), `data.prefetch_batches` batches ahead (0 = one per thread). The batches are the stream's
  elements, so grain's default buffer of 500 elements would augment and hold 500 batches (all
  of a short run, 77 GB of ImageNet at batch 256 and 224 px) while the first step compiles."""
  for field in ("read_threads", "prefetch_batches"):
    if data[field] < 0:
      raise ValueError(f"data.{field}={data[field]} must be >= 0 (0 = automatic)")
  threads = data.read_threads or min(os.cpu_count() or 1, MAX_READ_THREADS)
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=data.prefetch_batches or threads)


def train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """Returns this process's infinite iterator of augmented train batches.

  Batches are dicts of arrays with a leading axis B = batch_size // process_count: for images
  {"image": float32 [B, S, S, C] normalised, "label": int32 [B]}; for audio {"audio": float32
  [B, L], "audio_len": int32 [B] (real samples), "label": int32 [B]}. The global batches are
  one stream, the source reshuffled each epoch and augmented, that is a function of config.seed
  alone; process i reads the i-th of the process_count equal slices of each global batch. So
  any number of processes sees the same global batches, in the same order, as one process does
  (tests/test_multiprocess.py). The iterator's get_state() / set_state() resume it exactly.
  The process defaults are read at call time, i.e. after jax.distributed.initialize.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                     f"processes ({process_count}).")
  check_channels(config)
  d = config.data
  source = sources.get_source(d, d.split, config.get("image_size", 0))
  # Per-utterance training targets (HuBERT's k-means ids) when the config names a target file.
  source = targets.attach(source, config, d.split)
  if not len(source):
    raise ValueError(f"data.name={d.name!r} split {d.split!r} has no examples")
  transform = train_transform(source, config)
  # One seed for every process ([seed, 0] is the one a single process has always used, so its
  # stream is unchanged): grain draws each example's augmentation from the seed and the
  # example's position in the stream, so every process sees the same global stream.
  seed = int(np.random.SeedSequence([config.seed, 0]).generate_state(1)[0])
  ds = (grain.MapDataset.source(source).seed(seed)
        .shuffle()      # Before repeat: repeat reseeds it, so every epoch has a new order.
        .repeat()
        .random_map(transform)
        .batch(config.batch_size // process_count, drop_remainder=True)
        # Global batch g is the slices g*process_count .. (g+1)*process_count-1 of this
        # stream; this process's is the process_index-th. A MapDataset is lazy, so a process
        # reads and augments only its own examples.
        [process_index::process_count])
  it_ds = ds.to_iter_dataset(read_options(d))
  if d.num_workers > 0:
    # grain's workers read absl flags, unparsed outside absl.app (tests, Colab): use defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return iter(it_ds)


def eval_batches(config: ml_collections.ConfigDict, split: str, batch_size: int
                 ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Yields (inputs, labels) of a whole split in order, `batch_size` at a time (the last batch
  may be smaller), transformed without augmentation as in `eval_arrays`, but never holding more
  than a batch: for splits too large for memory (ImageNet's validation set is 30 GB as
  float32 at 224 px). Every process gets the same batches."""
  ds = _eval_source(config, split)
  for batch in ds.batch(batch_size, drop_remainder=False).to_iter_dataset():
    yield _split_labels(batch)


def eval_arrays(config: ml_collections.ConfigDict, split: str, max_examples: int | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Returns (inputs, labels int32 [N]) of a split, transformed without augmentation: the
  inputs are the method's arrays, e.g. {'image': float32 [N, S, S, C]} resized and normalised,
  or {'audio': float32 [N, L], 'audio_len': int32 [N]}.

  N is the split's size, or its first max_examples examples. Every process gets the same arrays.
  """
  records = list(_eval_source(config, split)[:max_examples].to_iter_dataset())  # grain decodes
  if not records:                                                                 # in threads.
    raise ValueError(f"data.name={config.data.name!r} split {split!r} has no examples")
  return _split_labels({k: np.stack([r[k] for r in records]) for k in records[0]})
