"""Two processes on localhost form one 4-device mesh (gloo collectives on CPU), the way a
multi-host GPU or TPU run does: each process reads its own shard of the data, the step is one
jit over the global mesh, and only process 0 writes metrics."""

import json
import os
import subprocess
import sys

import portpicker

from conftest import MICRO_MAE
from conftest import REPO
from conftest import subprocess_env


def test_two_processes_train_and_checkpoint(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mim_jax.main", f"--config=configs/mae_vit.py:{MICRO_MAE}",
       f"--workdir={tmp_path}", "--config.total_steps=6",
       "--config.log_every_steps=2", "--config.checkpoint.every_steps=3",
       "--config.eval.linear_probe.enabled=False", "--config.eval.reconstruction_png=False",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=subprocess_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "on 4 devices (2 processes)" in outputs[0][1]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 4, 6]
  assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, positive
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  # The grain iterator position is saved per process.
  data_files = sorted(f for f in os.listdir(tmp_path / "checkpoints" / "6" / "data")
                      if f.endswith(".json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
