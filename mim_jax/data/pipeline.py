"""grain pipelines: the infinite, checkpointable train iterator and whole-split eval arrays."""

from typing import Any, Callable, Iterator

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from mim_jax.data import augment
from mim_jax.data import sources


def check_channels(config: ml_collections.ConfigDict) -> None:
  d = config.data
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


def train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """Returns this process's infinite iterator of augmented train batches.

  Batches are dicts of arrays with a leading axis B = batch_size // process_count: for images
  {"image": float32 [B, S, S, C] normalised, "label": int32 [B]}. Each process reads every process_count-th example of the
  source, reshuffled each epoch. The order is a function of config.seed and the process alone,
  and the iterator's get_state() / set_state() resume it exactly.
  The process defaults are read at call time, i.e. after jax.distributed.initialize.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                     f"processes ({process_count}).")
  check_channels(config)
  d = config.data
  source = sources.get_source(d, d.split, config.image_size)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if not len(ds):
    raise ValueError(f"data.name={d.name!r} split {d.split!r} has {len(source)} examples, "
                     f"too few for {process_count} processes.")
  transform = train_transform(source, config)
  # Folding in the process index gives each process its own augmentation stream; otherwise the
  # i-th example of every shard would be cropped and flipped alike.
  seed = int(np.random.SeedSequence([config.seed, process_index]).generate_state(1)[0])
  ds = (ds.seed(seed)
        .shuffle()      # Before repeat: repeat reseeds it, so every epoch has a new order.
        .repeat()
        .random_map(transform)
        .batch(config.batch_size // process_count, drop_remainder=True))
  it_ds = ds.to_iter_dataset()
  if d.num_workers > 0:
    # grain's workers read absl flags, unparsed outside absl.app (tests, Colab): use defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return iter(it_ds)


def eval_batches(config: ml_collections.ConfigDict, split: str, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images, labels) of a whole split in order, `batch_size` at a time (the last batch
  may be smaller), resized without augmentation as in `eval_arrays`, but never holding more
  than a batch: for splits too large for memory (ImageNet's validation set is 30 GB as
  float32 at 224 px). Every process gets the same batches."""
  check_channels(config)
  d = config.data
  ds = grain.MapDataset.source(sources.get_source(d, split, config.image_size))
  ds = ds.map(augment.EvalTransform(config.image_size, tuple(d.mean), tuple(d.std)))
  for batch in ds.batch(batch_size, drop_remainder=False).to_iter_dataset():
    yield batch["image"], batch["label"].astype(np.int32)


def eval_arrays(config: ml_collections.ConfigDict, split: str,
                max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images float32 [N, S, S, C], labels int32 [N]) of a split, resized without aug.

  N is the split's size, or its first max_examples examples. Every process gets the same arrays.
  """
  check_channels(config)
  d = config.data
  ds = grain.MapDataset.source(sources.get_source(d, split, config.image_size))
  ds = ds[:max_examples].map(augment.EvalTransform(config.image_size, tuple(d.mean),
                                                   tuple(d.std)))
  records = list(ds.to_iter_dataset())  # grain decodes in background threads.
  return (np.stack([r["image"] for r in records]),
          np.array([r["label"] for r in records], np.int32))
