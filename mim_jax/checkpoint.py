"""Checkpoints with orbax: the train state, the grain iterator position and a signature of the
model, saved together as one step directory.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a crash mid-save leaves the previous checkpoint as the newest valid one. Restore
reads straight into the target shardings. Before restoring, the saved parameter signature is
compared with the model being trained, so a workdir from a different model is refused rather
than silently overwritten.
"""

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mim_jax import tree_paths

# Orbax saves a replicated array cooperatively: each replica writes a slice of it, cut by a
# small jitted slice, compiled once per array shape. For small arrays that costs more than it
# saves: a 0.1M-parameter Conformer on 8 CPU devices compiled 144 slices, 8 s of its first
# save. Only arrays of at least 1 MiB per replica's slice are split; smaller ones are written
# whole by one replica, as orbax does for arrays that are not replicated.
MIN_REPLICA_SLICE_BYTES = 2 ** 20
_absl_logger = logging.getLogger("absl")
_level = _absl_logger.level
_absl_logger.setLevel(logging.ERROR)  # orbax warns on every override; this one is on purpose
try:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
finally:
  _absl_logger.setLevel(_level)


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model."""


def param_signature(params: Any) -> dict[str, list[int]]:
  """{'encoder/blocks/block_0/attn/qkv/kernel': [192, 576], ...} for every parameter."""
  return {name: list(leaf.shape) for name, leaf in tree_paths.flatten(params).items()}


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

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
    if saved != current:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model: "
          f"{describe_mismatch(saved, current)}. Use a new --workdir, or the config that "
          f"wrote it; the checkpoint was left untouched.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
