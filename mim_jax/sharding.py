"""Device mesh and parameter shardings.

One mesh axis, 'data', over every device of every process. Batches are split over it. Parameters
are replicated (data parallel) unless FSDP is on: then each parameter that matches an FSDP rule
and is large enough is split along its largest dimension divisible by the number of devices.
Rules are regexes on the '/'-joined parameter path, first match wins, so a fork can pin a
specific tensor without touching the trainer.
"""

import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_jax import tree_paths

AXIS = "data"

# (regex on parameter path, rule). 'replicate' or 'fsdp'.
FSDP_RULES: tuple[tuple[str, str], ...] = (
    (r".*", "fsdp"),
)


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: jit's sharding propagation places intermediates; only inputs, outputs and
  # parameters carry explicit shardings (JAX's default for make_mesh is now Explicit).
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data axis."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
  """Shards the largest dimension divisible by num_devices; replicates small or indivisible ones."""
  if np.prod(shape, dtype=np.int64) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_devices == 0:
      spec = [None] * len(shape)
      spec[dim] = AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict) -> Any:
  """NamedShardings for every leaf of a (shape-only) train state, from the rules above."""
  n = mesh.shape[AXIS]

  def rule_for(name: str, leaf) -> NamedSharding:
    if not config.sharding.fsdp:
      return replicated(mesh)
    for pattern, rule in FSDP_RULES:
      if re.fullmatch(pattern, name):
        if rule == "fsdp":
          return NamedSharding(mesh, fsdp_spec(leaf.shape, n, config.sharding.fsdp_min_size))
        return replicated(mesh)
    return replicated(mesh)

  return tree_paths.map_with_names(rule_for, abstract_state)
