"""Checkpoints with orbax: the train state, the grain iterator position and a signature of the
model, saved together as one step directory.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a crash mid-save leaves the previous checkpoint as the newest valid one. Restore
reads straight into the target shardings. Before restoring, the saved parameter signature is
compared with the model being trained, so a workdir from a different model is refused rather
than silently overwritten. A checkpoint keeps the layer layout of the run that saved it (scanned
layers stored stacked, or one entry per layer: mim_jax/layer_layout.py), which costs a save
nothing; one saved with model.scan_layers the other way is read in its own layout, sharded as
the run's parameters are, and converted on the devices. A step damaged after it was committed
(a file cut short or deleted) is set aside, and the run resumes from the newest intact one
(mim_jax/checkpoint_damage.py).
"""

import logging as std_logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from mim_jax import checkpoint_damage
from mim_jax import layer_layout
from mim_jax import tree_paths

# Orbax saves a replicated array cooperatively: each replica writes a slice of it, cut by a
# small jitted slice, compiled once per array shape. For small arrays that costs more than it
# saves: a 0.1M-parameter Conformer on 8 CPU devices compiled 144 slices, 8 s of its first
# save. Only arrays of at least 1 MiB per replica's slice are split; smaller ones are written
# whole by one replica, as orbax does for arrays that are not replicated.
MIN_REPLICA_SLICE_BYTES = 2 ** 20
_absl_logger = std_logging.getLogger("absl")
_level = _absl_logger.level
_absl_logger.setLevel(std_logging.ERROR)  # orbax warns on every override; this one is on purpose
try:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
finally:
  _absl_logger.setLevel(_level)


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model."""


class NoIntactCheckpointError(ValueError):
  """Every checkpoint of the workdir is damaged."""


def param_signature(params: Any) -> dict[str, list[int]]:
  """{'encoder/blocks/block_0/attn/qkv/kernel': [192, 576], ...} for every parameter."""
  return {name: list(leaf.shape) for name, leaf in tree_paths.flatten(params).items()}


def unrolled_signature(signature: dict[str, list[int]]) -> dict[str, list[int]]:
  """A `param_signature` in the unrolled layer layout (mim_jax/layer_layout.py), so that the
  layouts of a scanned and an unrolled run of one model compare equal."""
  shapes = {name: jax.ShapeDtypeStruct(tuple(shape), "float32")
            for name, shape in signature.items()}
  return param_signature(layer_layout.unstack_blocks(tree_paths.unflatten(shapes)))


def describe_mismatch(saved: dict[str, list[int]], current: dict[str, list[int]]) -> str:
  missing = sorted(set(current) - set(saved))
  unexpected = sorted(set(saved) - set(current))
  shapes = sorted(f"{k}: saved {saved[k]} vs model {current[k]}"
                  for k in set(saved) & set(current) if saved[k] != current[k])
  parts = []
  for title, items in (("missing from checkpoint", missing),
                       ("unexpected in checkpoint", unexpected), ("shape mismatch", shapes)):
    if items:
      shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
      parts.append(f"{title}: {shown}")
  return "; ".join(parts)


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "signature": ocp.JsonCheckpointHandler()})

  def restore_newest(self, abstract_state: Any, iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest intact checkpoint (see `restore`) and returns (state, its step), or
    None when there is no checkpoint. Newer steps that are damaged are logged and, once an
    intact one is restored, moved to <workdir>/checkpoints_damaged. Raises
    NoIntactCheckpointError, moving nothing, when every step is damaged."""
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      step_dir = os.path.join(self.directory, str(step))
      try:
        state = self.restore(step, abstract_state, iterator)
      except Exception as error:  # pylint: disable=broad-except
        reason = checkpoint_damage.describe(error, step_dir)
        if reason is None:
          raise
        logging.warning("checkpoint step %d is damaged: %s", step, reason)
        damaged.append(step_dir)
        continue
      self._set_aside(damaged)
      return state, step
    if damaged:
      raise NoIntactCheckpointError(
          f"every checkpoint in {self.directory} is damaged (the warnings above say why); "
          f"nothing was moved or deleted: restore them from a backup, or pass another "
          f"--workdir to start afresh")
    return None

  def _set_aside(self, step_dirs: list[str]) -> None:
    """Moves damaged steps out of the manager's sight (by process 0, the others waiting), so
    that saving those steps again and keep-last-N never meet them."""
    if not step_dirs:
      return
    if jax.process_index() == 0:
      for step_dir in step_dirs:
        logging.warning("moved the damaged checkpoint %s to %s", step_dir,
                        checkpoint_damage.move_aside(step_dir))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoint_damage.move_aside")
    self._manager.reload()

  def save(self, step: int, state: Any, iterator: Any) -> None:
    """Starts an (async) save of `state` and the iterator position at `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(iterator),
        signature=ocp.args.JsonSave(param_signature(state.params))), force=True)

  def restore(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    """Restores `step` into the shardings of `abstract_state` (a tree of ShapeDtypeStructs)
    and moves `iterator` to the saved position. Raises CheckpointMismatchError when the saved
    parameters differ from the model's."""
    saved = self._manager.restore(step, args=ocp.args.Composite(
        signature=ocp.args.JsonRestore()))["signature"]
    current = param_signature(abstract_state.params)
    if unrolled_signature(saved) != unrolled_signature(current):
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model: "
          f"{describe_mismatch(saved, current)}. Use a new --workdir, or the config that "
          f"wrote it; the checkpoint was left untouched.")
    target = abstract_state
    if saved != current:  # Saved with model.scan_layers the other way: read in its layout.
      saved_names = tree_paths.flatten(self._manager.item_metadata(step)["state"])
      target = layer_layout.stack_blocks(abstract_state, saved_names)
      logging.info("checkpoint step %d has the other layer layout (model.scan_layers): "
                   "converting it", step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(iterator)))["state"]
    if target is abstract_state:
      return restored
    names = tree_paths.flatten(abstract_state)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
    return jax.jit(lambda state: layer_layout.stack_blocks(state, names),
                   out_shardings=shardings)(restored)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
