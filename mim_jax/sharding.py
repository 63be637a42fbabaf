"""Device mesh and parameter shardings.

One mesh axis, 'data', over every device of every process. Batches are split over it. Parameters
are replicated (data parallel) unless FSDP is on: then each parameter that matches an FSDP rule
and is large enough is split along its largest dimension divisible by the number of devices
(of one layer, for the stacked [depth, ...] parameters of scanned layers);
one that is large enough but has no such dimension is refused (`checked_fsdp_spec`).
Rules are regexes on the '/'-joined parameter path, first match wins, so a fork can pin a
specific tensor without touching the trainer.
"""

import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_jax import layer_layout
from mim_jax import tree_paths

AXIS = "data"

# (regex on parameter path, rule). 'replicate' or 'fsdp'.
FSDP_RULES: tuple[tuple[str, str], ...] = (
    (r".*", "fsdp"),
)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The data axis over `devices`, every device of every process by default (the devices of a
  TPU topology with no TPU attached, when mim_jax.tools.dryrun plans for one). jax.make_mesh
  orders them as the hardware links them, for a topology's as for attached devices."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: jit's sharding propagation places intermediates; only inputs, outputs and
  # parameters carry explicit shardings (JAX's default for make_mesh is now Explicit).
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
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


def checked_fsdp_spec(name: str, shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
  """`fsdp_spec`, but a leaf of at least min_size elements that no dimension of splits over the
  devices raises ValueError (naming it, its shape, the device count and the fixes): replicated,
  it would cost every device the whole tensor, which FSDP was switched on to avoid. A scalar
  (the step, Adam's count) can never be split and is exempt."""
  spec = fsdp_spec(shape, num_devices, min_size)
  if spec == P() and shape and np.prod(shape, dtype=np.int64) >= min_size:
    raise ValueError(
        f"FSDP cannot split {name} of shape {tuple(shape)} over {num_devices} devices (no "
        f"dimension is a multiple of {num_devices}), so every device would hold it whole; run on "
        f"a device count that divides one of its dimensions, raise sharding.fsdp_min_size above "
        f"{int(np.prod(shape, dtype=np.int64))}, or give it a 'replicate' rule in "
        f"sharding.FSDP_RULES")
  return spec


def _fsdp_spec_of(name: str, shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
  """`checked_fsdp_spec`; a scanned loop's stacked leaf [depth, ...] (mim_jax/layer_layout.py) is
  split as one layer's slice is, its [depth] axis unsharded: the scan slices one layer out of
  it per step, and from an array split over the layers the partitioner may gather the whole
  stack first, every layer on every device. Scan on or off, a layer's weights are then sharded
  alike, and the size threshold is per layer."""
  if not layer_layout.is_stacked(name):
    return checked_fsdp_spec(name, shape, num_devices, min_size)
  return P(None, *checked_fsdp_spec(name, shape[1:], num_devices, min_size))


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
          return NamedSharding(mesh, _fsdp_spec_of(name, leaf.shape, n,
                                                   config.sharding.fsdp_min_size))
        return replicated(mesh)
    return replicated(mesh)

  return tree_paths.map_with_names(rule_for, abstract_state)
