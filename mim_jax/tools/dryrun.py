r"""Will a config fit? Compiles the real train step for N devices and prints its memory per
device, without allocating a parameter.

  python -m mim_jax.tools.dryrun --config=configs/mae_vit.py:variant=H/14,batch_size=1024 \
      --devices=8 --fsdp --device_memory=80GiB
  # any config override applies, as in training: here the blocks scanned and rematerialised
  python -m mim_jax.tools.dryrun --config=configs/mae_vit.py:variant=H/14,batch_size=1024 \
      --devices=8 --fsdp --config.model.scan_layers=True --config.model.remat=full
  # on 8 TPU v5e chips, compiled by TPU's own compiler on this (TPU-less) host: `make libtpu`
  python -m mim_jax.tools.dryrun --config=configs/mae_vit.py:variant=L/16,batch_size=256 \
      --topology=v5e:2x4 --fsdp --device_memory=16GiB --config.model.remat=full

The state is traced only (train.abstract_state: eval_shape, then the sharding rules of
mim_jax/sharding.py), and the step is the trainer's own (train.make_train_step, state donated),
lowered on those shapes and shardings and compiled, never run. It prints:
  - parameters and optimizer state: their count, their bytes per device under the shardings,
    and the largest parameter left unsharded (with --fsdp, those under sharding.fsdp_min_size);
  - XLA's memory analysis of one device's program (compiled.memory_analysis()):
      arguments     the device's shard of everything the step takes: state and batch;
      outputs       its shard of what the step returns: the new state and the metrics;
      aliased       the part of the outputs written into donated argument buffers (the state),
                    counted in both lines above and so subtracted once;
      temporaries   every intermediate (activations saved for the backward pass, gradients,
                    FSDP's gathered parameters), packed by XLA's buffer assignment into one block
                    as large as their peak under its schedule;
      total         arguments + outputs - aliased + temporaries: the memory the step needs on a
                    device while it runs, state and batch resident. It leaves out the runtime's
                    own reserve (cuDNN workspaces, allocator fragmentation; on GPU, XLA's client
                    also preallocates 75% of memory by default) and a prefetched next batch;
  - whether the total fits --device_memory;
  - the time to lower and to compile, and the analytic training FLOPs per step
    (methods.train_flops_per_example times the batch).

Devices, by where the step is compiled for:
  --platform=cpu (the default): --devices fake CPU devices (8 unless given). The tool sets
    JAX's CPU device count itself before JAX starts (jax_num_cpu_devices, which takes
    precedence over XLA_FLAGS' --xla_force_host_platform_device_count), so it runs on any
    host, a laptop included. Shapes and shardings, hence arguments, outputs and the parameter
    and optimizer figures, are the same on every backend; temporaries are the CPU compiler's,
    whose fusion and scheduling differ from a GPU's or TPU's. In particular it ignores
    rematerialisation (config.model.remat): it drops the optimisation barriers that keep the
    recomputation apart and merges it back into the forward pass (measured on a 12-block MLP:
    95 matmuls lowered, 71 compiled, the same temporaries with and without remat), so the
    report says so when remat is on.
  --topology=v5e:2x4 (v4:2x2x1, v5p:2x2x2, v6e:4x4, ...): a TPU slice of that shape, compiled
    by TPU's own compiler with no TPU attached (JAX's deviceless ahead-of-time compilation:
    jax.experimental.topologies). Its temporaries are the TPU's, remat included. It needs
    libtpu, the TPU runtime and compiler, which is not in requirements.txt (installed, it makes
    every JAX process on a TPU-less host look for a TPU first): `make libtpu` installs the
    version the pinned JAX takes into .libtpu/, which the tool finds; an installed libtpu
    package or TPU_LIBRARY_PATH (a libtpu.so) take precedence. A chip count that is not a
    whole number of 2x2 hosts is refused by libtpu (v5e:2x2 is the smallest v5e slice).
  --platform=gpu or tpu: this host's own accelerators, all of them, nothing allocated either.

Bad input is one line (mim_jax/errors.py): with --fsdp, a parameter of at least
sharding.fsdp_min_size elements that no dimension of can be split over the devices is named,
with its shape and what to change.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

from mim_jax import config_validation
from mim_jax import errors
from mim_jax import methods
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax import tree_paths


UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
         "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}


def parse_bytes(text: str) -> int:
  """'16GiB' -> 17179869184, '40GB' -> 4e10, '1024' -> 1024. Raises ValueError naming the forms."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B|)\s*", text)
  if not match:
    raise ValueError(f"--device_memory={text!r} is not a size: expected a number with a unit "
                     f"of {sorted(u for u in UNITS if u)} or none (bytes), e.g. 80GiB")
  return int(float(match.group(1)) * UNITS[match.group(2)])


def human(num_bytes: float) -> str:
  for unit in ("TiB", "GiB", "MiB", "KiB"):
    if abs(num_bytes) >= UNITS[unit]:
      return f"{num_bytes / UNITS[unit]:.2f} {unit}"
  return f"{int(num_bytes)} B"


def shard_bytes(tree: Any) -> int:
  """Bytes of one device's shard of a tree of ShapeDtypeStructs with shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def largest_unsharded(params: Any) -> dict[str, Any] | None:
  """The largest parameter every device holds whole: its name, shape and bytes (None if all are
  split)."""
  whole = {name: x for name, x in tree_paths.flatten(params).items()
           if x.sharding.shard_shape(x.shape) == x.shape}
  if not whole:
    return None
  name, x = max(whole.items(), key=lambda item: item[1].size * item[1].dtype.itemsize)
  return {"name": name, "shape": list(x.shape), "bytes": x.size * x.dtype.itemsize}


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of the method's inputs, as shapes split over the data axis."""
  return {name: jax.ShapeDtypeStruct((config.batch_size,) + spec.shape, spec.dtype,
                                     sharding=sharding.batch_sharding(mesh))
          for name, spec in methods.inputs(config).items()}


def plan(config: ml_collections.ConfigDict, device_memory: int,
         devices: list[jax.Device] | None = None, topology: str | None = None
         ) -> dict[str, Any]:
  """Compiles the config's train step for `devices` (every device of this process by default;
  a TPU `topology`'s from `topology_devices`) and returns the figures the module docstring lists
  (bytes are per device)."""
  mesh = sharding.make_mesh(devices)
  model, tx = methods.build(config), optim.build(config)
  rng = jax.eval_shape(jax.random.key, 0)
  state, state_shardings = train.abstract_state(model, tx, config, mesh, rng)
  step = train.make_train_step(model, tx, state_shardings, mesh)

  start = time.perf_counter()
  lowered = step.lower(state, abstract_batch(config, mesh), rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  memory = compiled.memory_analysis()
  xla = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
         "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes}
  total = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
  return {
      "model": f"{config.method.name} {config.model.name} {config.model.variant}",
      "devices": mesh.size, "platform": mesh.devices.flat[0].platform,
      "device_kind": mesh.devices.flat[0].device_kind, "topology": topology,
      "fsdp": config.sharding.fsdp, "batch_size": config.batch_size,
      "params": sum(x.size for x in jax.tree.leaves(state.params)),
      "param_bytes": shard_bytes(state.params), "opt_bytes": shard_bytes(state.opt_state),
      "largest_unsharded": largest_unsharded(state.params),
      **xla, "total": total, "device_memory": device_memory, "fits": total <= device_memory,
      "remat": str(config.model.remat), "lower_s": round(lower_s, 2),
      "compile_s": round(compile_s, 2),
      "train_flops_per_step": methods.train_flops_per_example(config) * config.batch_size,
  }


def report(row: dict[str, Any]) -> str:
  """The figures of `plan` as a readable report."""
  largest = row["largest_unsharded"]
  largest = ("none" if largest is None else
             f"{largest['name']} {tuple(largest['shape'])}, {human(largest['bytes'])}")
  share = row["total"] / row["device_memory"]
  where = (f" ({row['device_kind']}, topology {row['topology']}, compiled without them)"
           if row["topology"] else "")
  lines = [
      f"{row['model']}, batch {row['batch_size']} on {row['devices']} {row['platform']} devices"
      f"{where}, FSDP {'on' if row['fsdp'] else 'off'}",
      f"parameters        {row['params'] / 1e6:.1f}M: {human(row['param_bytes'])} per device",
      f"optimizer state   {human(row['opt_bytes'])} per device",
      f"largest unsharded {largest}",
      "XLA memory per device:",
      *(f"  {key:<15} {human(row[key])}" for key in ("arguments", "outputs", "aliased",
                                                     "temporaries")),
      f"  {'total':<15} {human(row['total'])}  (arguments + outputs - aliased + temporaries)",
      f"fits {human(row['device_memory'])}: {'yes' if row['fits'] else 'NO'} ({share:.0%})",
      *([f"  (remat {row['remat']} is not in the temporaries: XLA's CPU compiler merges the "
         f"recomputation back into the forward pass; plan it with --topology or on the "
         f"accelerator)"]
        if row["platform"] == "cpu" and row["remat"] not in ("False", "none") else []),
      f"lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s",
      f"training FLOPs per step {row['train_flops_per_step']:.3g} (analytic)",
  ]
  return "\n".join(lines)


# Where `make libtpu` installs libtpu (pip --target): the repository's .libtpu/.
LOCAL_LIBTPU = pathlib.Path(__file__).resolve().parents[2] / ".libtpu" / "libtpu" / "libtpu.so"
TOPOLOGY_EXAMPLES = "v5e:2x4, v5p:2x2x2, v4:2x2x1, v6e:4x4"


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of TPU slice `topology` ('v5e:2x4'), to compile for without a TPU; before JAX
  starts a backend. JAX itself runs on the CPU. Raises ValueError when libtpu is missing or
  rejects the name."""
  given = os.environ.get("TPU_LIBRARY_PATH")
  if given and not os.path.isfile(given):
    raise ValueError(f"--topology={topology}: TPU_LIBRARY_PATH={given} is not a file; point it at "
                     f"a libtpu.so, or unset it to use {LOCAL_LIBTPU} (`make libtpu`)")
  if not given and importlib.util.find_spec("libtpu") is None:
    if not LOCAL_LIBTPU.exists():
      raise ValueError(f"--topology={topology} needs libtpu, TPU's compiler: run `make libtpu` "
                       f"(installs it into {LOCAL_LIBTPU.parents[1]}), or pip install the libtpu "
                       f"that jax {jax.__version__} names in its [tpu] extra")
    os.environ["TPU_LIBRARY_PATH"] = str(LOCAL_LIBTPU)
  # libtpu admits one process per host unless told otherwise; a plan only compiles, so several
  # may run at once (the test workers), beside a training job on a TPU VM too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  jax.config.update("jax_platforms", "cpu")
  try:
    with _quiet_stderr():  # libtpu's start-up warnings about the TPU VM metadata it cannot find
      return list(topologies.get_topology_desc(topology, "tpu").devices)
  except RuntimeError as error:  # jax.errors.JaxRuntimeError: libtpu's INVALID_ARGUMENT
    reason = str(error).strip().splitlines()[0]
    raise ValueError(f"--topology={topology}: {reason}; a TPU generation and its chips, e.g. "
                     f"{TOPOLOGY_EXAMPLES}") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
  """Sends what native code writes to stderr (file descriptor 2) to /dev/null meanwhile."""
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def use_devices(platform: str, count: int | None) -> None:
  """Makes `count` devices of `platform` JAX's devices (8 fake CPU devices, or all the host's
  accelerators, when None); before JAX starts a backend. Raises ValueError when the host has no
  such accelerator, or another number of them."""
  if count is not None and count <= 0:
    raise ValueError(f"--devices must be positive, got {count}")
  jax.config.update("jax_platforms", platform)
  if platform == "cpu":
    jax.config.update("jax_num_cpu_devices", count or 8)
    return
  try:
    jax.devices()
  except RuntimeError as error:
    raise ValueError(f"--platform={platform}: this host has no {platform} JAX can use "
                     f"({error}); pass --platform=cpu to plan for --devices fake devices") from None
  if count is not None and jax.device_count() != count:
    raise ValueError(f"--devices={count} but this host has {jax.device_count()} {platform} "
                     f"devices: pass --devices={jax.device_count()}, or --platform=cpu to plan "
                     f"for {count} fake devices")


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  device_memory = parse_bytes(flags.FLAGS.device_memory)
  topology, devices = flags.FLAGS.topology, None
  if topology:
    if flags.FLAGS.platform != "cpu":
      raise ValueError(f"--topology={topology} compiles for a TPU slice from this host; drop "
                       f"--platform={flags.FLAGS.platform}, which plans for this host's devices")
    devices = topology_devices(topology)
    if flags.FLAGS.devices not in (None, len(devices)):
      raise ValueError(f"--devices={flags.FLAGS.devices} but --topology={topology} has "
                       f"{len(devices)} devices: drop --devices, or pick the topology of that many")
  else:
    use_devices(flags.FLAGS.platform, flags.FLAGS.devices)
  config = flags.FLAGS.config
  if flags.FLAGS.fsdp:
    config.sharding.fsdp = True
  config_validation.validate(config)
  row = plan(config, device_memory, devices, topology)
  print(json.dumps(row) if flags.FLAGS.json else report(row))


if __name__ == "__main__":
  # Defined here, not at import, so importing this module next to other tools that define
  # --config (tests, the notebook) does not clash with their flags.
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                  "configs/mae_vit.py:variant=L/16.", lock_config=True)
  flags.DEFINE_integer("devices", None, "Devices to plan for (the mesh's size): 8 fake CPU "
                       "devices by default, all of the host's accelerators with --platform=gpu "
                       "or tpu, the slice's with --topology.")
  flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over the "
                    "devices (sets config.sharding.fsdp).")
  flags.DEFINE_string("device_memory", "80GiB", "Memory of one device, e.g. "
                      "16GiB, 80GiB, 141GiB, 40GB or a number of bytes.")
  flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "cpu: --devices fake "
                    "CPU devices; gpu, tpu: this host's accelerators.")
  flags.DEFINE_string("topology", None, "A TPU slice to compile for with TPU's own compiler "
                      f"and no TPU, e.g. {TOPOLOGY_EXAMPLES} (needs libtpu: `make libtpu`).")
  flags.DEFINE_bool("json", False, "Print one JSON line instead of the report.")
  flags.mark_flags_as_required(["config"])
  jax.config.config_with_absl()
  app.run(main, flags_parser=errors.parse_flags)
