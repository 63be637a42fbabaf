"""`python -m mim_jax.bench` prints one JSON line whose figures agree with each other: the
throughput is the batch over the step time, MFU the achieved over the peak FLOP/s, and the
mask's share its own time over the step's; --profile writes a trace; --mode=data prints one line
per input source. The PyTorch peer of `make bench` (benchmarks/torch_mae.py) is the same model
and optimizer as mim_jax's MAE, and benchmarks/compare.py times both in alternating rounds. (The numbers are measurements, so
only their relations are tested; bench figures go in notes, not tests.)"""

import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mae_vit
from conftest import MICRO_MAE
from conftest import run_module
from conftest import set_peak_lr
from mim_jax import masking
from mim_jax import methods
from mim_jax import optim
from mim_jax import pretrained
from mim_jax import timed_rounds


def stdout_of(result) -> str:
  """The output of a subprocess run, which must have succeeded."""
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


def last_json(result) -> dict:
  return json.loads(stdout_of(result).splitlines()[-1])


def test_bench_prints_consistent_figures_with_the_masks_share_and_writes_a_trace(tmp_path):
  row = last_json(run_module("mim_jax.bench", f"--config=configs/mae_vit.py:{MICRO_MAE}",
                             "--config.mask.name=green_noise", "--steps=2", "--warmup=1",
                             f"--profile={tmp_path}"))
  assert row["overrides"] == ["--config.mask.name=green_noise"] and row["devices"] == 1
  assert row["images_per_sec"] == pytest.approx(16 / (row["step_ms"] / 1e3), rel=0.01)
  assert row["mfu"] == pytest.approx(row["achieved_flops_per_sec"] / row["peak_flops_per_sec"],
                                     abs=1e-4)
  assert row["achieved_flops_per_sec"] == pytest.approx(
      row["images_per_sec"] * row["train_flops_per_image"], rel=0.01)
  assert 0 < row["mask_ms"] and row["mask_share"] == pytest.approx(
      row["mask_ms"] / row["step_ms"], rel=0.01, abs=1e-4)
  # The trace, read back by kind of op: every step traced, the shares of a partition.
  rows = [json.loads(line) for line in stdout_of(
      run_module("benchmarks.trace_breakdown", f"--profile={tmp_path}")).splitlines()]
  *kinds, summary, dense, batched, dots = rows
  assert summary["steps"] == 3 and summary["wall_ms_per_step"] > 0
  assert 0 < summary["busy_ms_per_step"] <= min(summary["wall_ms_per_step"],
                                                summary["instructions_ms_per_step"]) + 0.01
  assert sum(k["share"] for k in kinds) == pytest.approx(1, abs=1e-3)
  assert {k["kind"] for k in kinds if k["share"] > 0} >= {"matmul", "layer norm", "optimizer"}
  # The matmuls' FLOPs read from the compiled HLO are the analytic count of mim_jax/flops.py
  # within 1%, two independent counts of the same work: the analytic one takes every matmul of
  # the forward pass three times, while autodiff never computes a gradient nothing needs, such
  # as the patch embedding's with respect to the images (0.7% here, 0.13% at the bench config).
  # The dots' busy time lies within the step's.
  assert [r["dots"] for r in (dense, batched, dots)] == ["dense", "batched", "all"]
  assert dots["gflop_per_step"] == pytest.approx(row["train_flops_per_image"] * 16 / 1e9, rel=0.01)
  assert dots["gflop_per_step"] == pytest.approx(dense["gflop_per_step"]
                                                 + batched["gflop_per_step"], abs=2e-4)
  assert 0 < batched["gflop_per_step"] < dense["gflop_per_step"]
  assert max(dense["busy_ms_per_step"], batched["busy_ms_per_step"]) <= dots["busy_ms_per_step"]
  assert dots["busy_ms_per_step"] <= summary["busy_ms_per_step"] + 0.01
  assert dots["gflop_per_s"] == pytest.approx(dots["gflop_per_step"] / dots["busy_ms_per_step"]
                                              * 1e3, rel=0.01)


def test_data_mode_prints_one_line_per_source_and_worker_count():
  """Worker processes are left out (--data_workers=0): starting them costs seconds, and
  tests/test_data.py runs the pipeline with workers already."""
  result = run_module("mim_jax.bench", f"--config=configs/mae_vit.py:{MICRO_MAE}", "--mode=data",
                      "--data_workers=0", "--steps=2", "--warmup=0", "--data_seconds=0",
                      "--jpeg_files=8", "--jpeg_side=24")
  rows = [json.loads(line) for line in stdout_of(result).splitlines()]
  assert [(r["source"], r["num_workers"]) for r in rows] == [
      ("digits", 0), ("folder", 0), ("synthetic", 0)]
  for row in rows:
    assert row["host_batch"] == 16 and row["first_batch_s"] > 0
    assert row["examples_per_sec"] > 0 and row["batch_ms"] > 0


# ---------------------------------------------------------------------------------------------
# The PyTorch peer (benchmarks/torch_mae.py) is the same model and optimizer.
# ---------------------------------------------------------------------------------------------

# Three channels and two heads in encoder and decoder, so pixel order and head split are checked.
PEER_ARG = "variant=Mu/4,decoder=2x64,image_size=16,batch_size=16,data=synthetic"


def test_torch_peer_matches_mim_jax_loss_gradients_and_adamw_step(tmp_path):
  """The peer's state_dict, saved as MAE's releases are, loads into mim_jax's MAE through
  pretrained.load_params (the official-checkpoint mapping). On the same images and masking
  noise both give the same loss and gradient norm, and after one AdamW step at the config's
  peak lr (weight decay on all but biases and norms) the same loss again."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_mae  # pylint: disable=g-import-not-at-top
  config = set_peak_lr(mae_vit.get_config(PEER_ARG), 1e-2)
  sizes = torch_mae.Sizes.from_config(config)
  torch.manual_seed(0)
  peer = torch_mae.MAE(sizes)
  with torch.no_grad():  # Non-zero biases, norms off 1: a swapped or dropped tensor would show.
    for p in peer.parameters():
      p.add_(0.1 * torch.randn_like(p))
  torch.save({"model": peer.state_dict()}, tmp_path / "peer.pth")
  params = pretrained.load_params(str(tmp_path / "peer.pth"), config)

  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  noise = rng.uniform(size=(4, 16)).astype(np.float32)
  mask = masking.keep_lowest(jnp.asarray(noise), sizes.keep)
  model, tx = methods.build(config), optim.build(config)

  @jax.jit
  def loss_grads_and_next_loss(params):
    loss_fn = lambda p: model.apply({"params": p}, images, mask=mask)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return loss, optax.tree.norm(grads), loss_fn(optax.apply_updates(params, updates))

  loss, grad_norm, next_loss = loss_grads_and_next_loss(params)
  images_t, noise_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(noise)
  opt = torch_mae.adamw(peer, sizes)
  loss_t = peer(images_t, noise_t)
  loss_t.backward()
  grad_norm_t = torch.sqrt(sum((p.grad ** 2).sum() for p in peer.parameters()))
  opt.step()
  with torch.no_grad():
    next_loss_t = peer(images_t, noise_t)
  np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
  np.testing.assert_allclose(grad_norm, grad_norm_t.item(), rtol=1e-4)
  assert abs(next_loss - loss) > 1e-3  # the step moved the loss, so comparing after it tells
  np.testing.assert_allclose(next_loss, next_loss_t.item(), rtol=1e-4)


def test_compare_alternates_rounds_of_mim_jax_and_the_torch_peer():
  """`make bench`'s driver: both benchmarks print their own line, then each round times every
  contender, and the last line's figures are the medians of the rounds'."""
  result = run_module("benchmarks.compare", f"--config=configs/mae_vit.py:{PEER_ARG}",
                      "--modes=eager", "--rounds=3", "--steps=1", "--warmup=0", timeout=240)
  mim_jax, eager, *rounds, last = [json.loads(line) for line in stdout_of(result).splitlines()]
  assert mim_jax["devices"] == 1 and mim_jax["images_per_sec"] > 0
  assert eager["mode"] == "eager" and eager["threads"] >= 1
  assert eager["images_per_sec"] == pytest.approx(16 / (eager["step_ms"] / 1e3), rel=0.02)
  assert [r["round"] for r in rounds] == [0, 1, 2] and last["rounds"] == 3
  assert all(r["mim_jax"] > 0 and r["torch_eager"] > 0 for r in rounds)
  ratios = sorted(r["mim_jax"] / r["torch_eager"] for r in rounds)
  assert last["mim_jax_over_torch_eager"] == pytest.approx(ratios[1], rel=0.01)
  assert (last["mim_jax_over_torch_eager_min"], last["mim_jax_over_torch_eager_max"]) == (
      pytest.approx(ratios[0], rel=0.01), pytest.approx(ratios[2], rel=0.01))
  for name in ("mim_jax", "torch_eager"):
    assert last[f"{name}_images_per_sec"] == pytest.approx(
        sorted(r[name] for r in rounds)[1], rel=0.01)


def test_timed_rounds_answer_each_count_with_its_time_per_step():
  calls = []
  answers = io.StringIO()
  timed_rounds.serve(lambda steps: calls.append(steps) or time.sleep(0.01 * steps),
                     stdin=io.StringIO("2\n3\n"), stdout=answers)
  rows = [json.loads(line) for line in answers.getvalue().splitlines()]
  assert calls == [2, 3] and [r["steps"] for r in rows] == [2, 3]
  assert all(0.01 <= r["step_s"] < 0.5 for r in rows)
  with pytest.raises(ValueError, match="positive number of steps.*'two'"):
    timed_rounds.serve(lambda steps: None, stdin=io.StringIO("two\n"), stdout=io.StringIO())


def test_serve_refuses_what_it_cannot_time():
  bench = run_module("mim_jax.bench", f"--config=configs/mae_vit.py:{MICRO_MAE}", "--mode=data",
                     "--serve")
  assert bench.returncode == 1 and "--serve times rounds of the train step" in bench.stderr
  peer = run_module("benchmarks.torch_mae", f"--config=configs/mae_vit.py:{PEER_ARG}",
                    "--modes=eager,compiled", "--serve")
  assert peer.returncode == 1 and "--serve times one mode per process" in peer.stderr
  assert "Traceback" not in bench.stderr + peer.stderr


def test_torch_peer_refuses_what_it_does_not_implement():
  pytest.importorskip("torch")
  from benchmarks import torch_mae  # pylint: disable=g-import-not-at-top
  config = mae_vit.get_config(PEER_ARG)
  config.mask.name = "block"
  with pytest.raises(ValueError, match="mask.name='block'"):
    torch_mae.Sizes.from_config(config)
