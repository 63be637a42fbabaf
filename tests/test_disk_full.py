"""A checkpoint save that meets a full disk: the trainer stops with one line naming the
checkpoint directory, the bytes one checkpoint needs and the step kept, and that step stays
intact and restorable.

No disk is filled: tensorstore's write, the lowest Python-visible call of orbax's array save,
fails as it does on a full disk (its error text measured on a full tmpfs, mim_jax/disk_full.py)
for the step being saved, so everything above it runs for real: orbax's async save, its error
reaching the trainer through the wait, and what is left on disk.
"""

import errno
import os

import jax
import numpy as np
import pytest
import tensorstore as ts

from mim_jax import checkpoint
from mim_jax import disk_full
from mim_jax import errors
from mim_jax import methods
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax.data import pipeline
from test_toy_method import toy_config, toy_registered  # pylint: disable=unused-import

TOTAL_STEPS, FULL_AT = 40, 20  # the toy run saves every 10 steps; step 20's meets a full disk


@pytest.fixture
def disk_full_at_step(monkeypatch):
  """Fails tensorstore's writes into step FULL_AT's directory as a full disk does."""
  write = ts.TensorStore.write

  def full_disk_write(self, *args, **kwargs):
    store = self.kvstore  # an OCDBT database in a directory (arrays), or a file (_sharding)
    path = (store.base or store).path if store is not None else ""
    if f"/{FULL_AT}.orbax-checkpoint-tmp/" not in path:
      return write(self, *args, **kwargs)
    what = (f'"{store.path}0" in OCDBT database at local file "{path}"' if store.base else
            f'local file "{path}"')
    raise ValueError(f"RESOURCE_EXHAUSTED: Error writing {what}: Failed to write 209757 bytes "
                     f"to file 4: No space left on device [os_error_code='28']")

  monkeypatch.setattr(ts.TensorStore, "write", full_disk_write)


# Tensorstore's writes still in flight when the save fails call back into orbax's event loop,
# closed by then ("Event loop is closed"); main keeps that off stderr (errors.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(
    toy_registered, disk_full_at_step, tmp_path):  # pylint: disable=redefined-outer-name
  config = toy_config(TOTAL_STEPS)  # test_toy_method.py's run: its compiled step is cached
  config.checkpoint.async_save = True  # as by default: the error surfaces in a later call
  model, tx = methods.build(config), optim.build(config)
  abstract, _ = train.abstract_state(model, tx, config, sharding.make_mesh(), jax.random.key(0))
  needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))

  with pytest.raises(errors.DiskFullError) as caught:
    train.train_and_evaluate(config, str(tmp_path))
  directory = tmp_path / "checkpoints"
  line = errors.describe(caught.value)
  assert line == (f"cannot save a checkpoint in {directory}: the disk is full; one checkpoint "
                  f"needs about {needed / 1e3:.3g} KB ({needed} bytes); the last good "
                  f"checkpoint, step 10, is kept; free that much space and rerun the same "
                  f"command to resume from it"), line

  # Step 10 is committed and whole; the unfinished step 20 is gone, not left taking space.
  assert sorted(os.listdir(directory)) == ["10"]
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  try:
    state = ckpt.restore(10, abstract, pipeline.train_iterator(config))
  finally:
    ckpt.close()
  assert int(state.step) == 10
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_only_a_full_disk_under_the_directory_is_reported(tmp_path):
  """Orbax's JSON files fail with a plain OSError, wrapped; another file's full disk (the
  metrics) and other errors pass unchanged."""
  directory = str(tmp_path / "checkpoints")
  for code in (errno.ENOSPC, errno.EDQUOT):
    with pytest.raises(errors.DiskFullError, match=r"no checkpoint was saved; free"):
      with disk_full.reported(directory, 1000):
        try:
          raise OSError(code, os.strerror(code), f"{directory}/7.orbax-checkpoint-tmp/x.json")
        except OSError as error:
          raise RuntimeError("orbax: save failed") from error
  metrics_full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
  for error in (metrics_full, OSError(errno.EIO, "I/O error", directory), ValueError("bad")):
    with pytest.raises(type(error)) as caught:
      with disk_full.reported(directory, 1000):
        raise error
    assert caught.value is error
