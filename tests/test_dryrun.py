"""The dry-run memory planner (mim_jax/tools/dryrun.py): MAE ViT-L/16 and ViT-H/14 at 224 px
compile for the 8 fake devices with FSDP, nothing allocated, and the memory XLA reports per
device holds what a hand count of the parameters and Adam's state says; FSDP refuses a large
parameter it cannot split, in one line from the command line. A TPU slice is planned by TPU's
own compiler with no TPU (libtpu, which `make test` installs into .libtpu/)."""

import json
import re

import jax
import pytest

from configs import mae_vit
from conftest import abstract_params
from conftest import mesh_of
from conftest import run_module
from mim_jax import sharding
from mim_jax.models import vit
from mim_jax.tools import dryrun

DEVICES = 8
# 8 images a device. Not fewer: at one image a device XLA's CPU compiler emits the matmuls as
# inline loops instead of library calls, and compiling L/16 took 64 CPU-s instead of 28.
BATCH = 64
F32 = 4


def mae_vit_params(variant: str, decoder_depth: int = 8, decoder_width: int = 512,
                   channels: int = 3) -> int:
  """MAE's parameters counted by hand (He et al. 2021: a ViT encoder, sin-cos position tables
  that are not parameters, an 8-block 512-wide decoder with MLP ratio 4)."""
  size, patch = vit.parse_variant(variant)
  pixels = patch * patch * channels

  def blocks(depth: int, d: int, m: int) -> int:
    # Two LayerNorms (2d each), qkv (3d^2 + 3d), output projection (d^2 + d), MLP (2dm + m + d).
    return depth * (4 * d * d + 2 * d * m + m + 9 * d)

  d, dd = size.width, decoder_width
  encoder = pixels * d + d + d + blocks(size.depth, d, size.mlp_dim) + 2 * d  # patch, cls, norm
  decoder = (d * dd + dd + dd + blocks(decoder_depth, dd, 4 * dd) + 2 * dd    # embed, mask, norm
             + dd * pixels + pixels)                                          # pixel prediction
  return encoder + decoder


# Layers scanned, as runs this big would be: the plan of a scanned step compiles in 7-9 s against
# 19-22 s unrolled (on one idle core; 30-50 s beside another test worker). The counts below hold
# for either layout; tests/test_sharding.py runs FSDP on unrolled layers.
@pytest.mark.parametrize("variant", ["L/16", "H/14"])
def test_mae_plan_with_fsdp_matches_a_hand_count(variant):
  config = mae_vit.get_config(f"variant={variant},batch_size={BATCH},data=synthetic")
  config.sharding.fsdp = True
  config.model.scan_layers = True
  row = dryrun.plan(config, device_memory=80 * 2 ** 30)
  params = mae_vit_params(variant)
  assert row["devices"] == DEVICES and row["params"] == params

  # Resident per device: an eighth of the parameters and of Adam's two moments, in float32,
  # and an eighth of the batch of 224 px images.
  state = 3 * params * F32 / DEVICES
  images = BATCH // DEVICES * 224 * 224 * 3 * F32
  assert row["param_bytes"] == pytest.approx(params * F32 / DEVICES, rel=0.1)
  assert row["opt_bytes"] == pytest.approx(2 * params * F32 / DEVICES, rel=0.1)
  assert row["arguments"] == pytest.approx(state + images, rel=0.1)
  # The state is donated: the new state is written over it; only the metrics and the output
  # tuple's table of buffers (8 bytes a leaf) are new.
  assert 0 < row["outputs"] - row["aliased"] < 1e-3 * row["aliased"]
  assert row["total"] == row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
  assert row["temporaries"] > 0 and row["fits"]
  # Only small leaves (biases, norms, tokens) stay whole on every device; a scanned loop's
  # stacked leaf [depth, ...] is held to that size per layer (sharding._fsdp_spec_of).
  largest = row["largest_unsharded"]
  assert "stacked_blocks" in largest["name"], largest
  assert largest["bytes"] // largest["shape"][0] < config.sharding.fsdp_min_size * F32, largest
  assert row["train_flops_per_step"] > 0 and row["compile_s"] > 0

  lines = dryrun.report(row).splitlines()
  assert lines[0] == f"mae vit {variant}, batch {BATCH} on 8 cpu devices, FSDP on"
  assert "fits 80.00 GiB: yes" in "\n".join(lines)


def test_fsdp_refuses_a_large_parameter_it_cannot_split():
  config = mae_vit.get_config("variant=Mu/4,decoder=1x32,image_size=16,batch_size=24,"
                              "data=digits")
  config.sharding.fsdp = True
  state = {"params": abstract_params(config)}
  mesh = mesh_of(jax.devices()[:3])  # The micro ViT's MLP kernels are 64 x 256: no multiple of 3.
  with pytest.raises(ValueError, match=r"params/encoder/blocks/block_0/mlp/fc1/kernel of shape "
                                       r"\(64, 256\) over 3 devices.*fsdp_min_size above 16384"):
    sharding.state_shardings(state, mesh, config)
  config.sharding.fsdp_min_size = 64 * 256 + 1  # the fix the message names
  sharding.state_shardings(state, mesh, config)

  # From the command line: one line, the device count taken from --devices.
  result = run_module("mim_jax.tools.dryrun", "--config=configs/mae_vit.py:variant=Mu/4,"
                      "decoder=1x32,image_size=16,batch_size=24,data=digits", "--devices=3",
                      "--fsdp")
  assert result.returncode == 1 and result.stderr.startswith("error: FSDP cannot split params/"), (
      result.stderr[-2000:])
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_device_memory_sizes():
  assert dryrun.parse_bytes("16GiB") == 16 * 2 ** 30
  assert dryrun.parse_bytes("141GiB") == 141 * 2 ** 30
  assert dryrun.parse_bytes("40GB") == 40 * 10 ** 9
  assert dryrun.parse_bytes("1024") == 1024
  with pytest.raises(ValueError, match="'16 gigs' is not a size"):
    dryrun.parse_bytes("16 gigs")


# A micro MAE, its blocks scanned and rematerialised as a big run's would be. Its TPU compile
# takes 12-15 s on 2 cores; README's remat table (L/16 on v5e:2x4) is measured, not run here:
# a plan of a model big enough for remat to show took 40-130 s.
MICRO = ("--config=configs/mae_vit.py:variant=Mu/4,decoder=1x32,image_size=16,batch_size=256,"
         "data=synthetic")


def test_plan_for_a_tpu_topology_without_a_tpu():
  """From the command line, as a user plans for a v5e slice from a laptop: the step compiles
  for the slice's 4 chips with TPU's compiler (libtpu, which `make test` installs), no TPU
  attached, and the report is the TPU's."""
  result = run_module("mim_jax.tools.dryrun", MICRO, "--topology=v5e:2x2", "--json",
                      "--config.model.scan_layers=True", "--config.model.remat=full",
                      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert (row["platform"], row["devices"], row["device_kind"], row["topology"]) == (
      "tpu", 4, "TPU v5 lite", "v5e:2x2")
  params = mae_vit_params("Mu/4", decoder_depth=1, decoder_width=32)
  assert row["params"] == params and row["remat"] == "full"
  # A TPU lays arrays out in tiles of 8 x 128, so the micro model's 64- and 32-wide arrays take
  # up to twice their bytes (at L/16, 1024 wide, they match the count: README, "Scale out").
  resident = 3 * params * F32 + 256 // 4 * 16 * 16 * 3 * F32
  assert resident <= row["arguments"] <= 2 * resident
  assert 0 < row["outputs"] - row["aliased"] < 0.01 * row["aliased"]  # the state donated
  assert row["temporaries"] > 0 and row["fits"] and row["compile_s"] > 0
  lines = dryrun.report(row).splitlines()
  assert lines[0] == ("mae vit Mu/4, batch 256 on 4 tpu devices (TPU v5 lite, topology "
                      "v5e:2x2, compiled without them), FSDP off")
  assert not any("remat full is not in the temporaries" in line for line in lines)


@pytest.mark.parametrize("flags, message", [
    (["--topology=v9z:2x2"], r"^error: --topology=v9z:2x2: .*TPU v9z.*; a TPU generation and its "
                             r"chips, e\.g\. v5e:2x4"),
    (["--topology=v5e:2x2", "--devices=8"], r"^error: --devices=8 but --topology=v5e:2x2 has 4 "
                                             r"devices"),
    (["--topology=v5e:2x2", "--platform=tpu"], r"^error: --topology=v5e:2x2 compiles for a TPU "
                                                r"slice from this host; drop --platform=tpu"),
])
def test_bad_topology_is_one_line(flags, message):
  result = run_module("mim_jax.tools.dryrun", MICRO, *flags)
  assert result.returncode == 1 and re.search(message, result.stderr.strip().splitlines()[-1]), (
      result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
