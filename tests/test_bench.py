"""`python -m mim_jax.bench` prints one JSON line whose figures agree with each other: the
throughput is the batch over the step time, MFU the achieved over the peak FLOP/s, and the
mask's share its own time over the step's. (Its numbers are measurements, so only their
relations are tested; bench figures go in notes, not tests.)"""

import json

import pytest

from conftest import MICRO_MAE
from conftest import run_module


def test_bench_prints_consistent_figures_with_the_masks_share():
  result = run_module("mim_jax.bench", f"--config=configs/mae_vit.py:{MICRO_MAE}",
                      "--config.mask.name=green_noise", "--steps=2", "--warmup=1")
  assert result.returncode == 0, result.stderr[-2000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["overrides"] == ["--config.mask.name=green_noise"] and row["devices"] == 1
  assert row["images_per_sec"] == pytest.approx(16 / (row["step_ms"] / 1e3), rel=0.01)
  assert row["mfu"] == pytest.approx(row["achieved_flops_per_sec"] / row["peak_flops_per_sec"],
                                     abs=1e-4)
  assert row["achieved_flops_per_sec"] == pytest.approx(
      row["images_per_sec"] * row["train_flops_per_image"], rel=0.01)
  assert 0 < row["mask_ms"] and row["mask_share"] == pytest.approx(
      row["mask_ms"] / row["step_ms"], rel=0.01, abs=1e-4)
