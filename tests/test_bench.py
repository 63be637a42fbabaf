"""`python -m mim_jax.bench` prints one JSON line whose figures agree with each other: the
throughput is the batch over the step time, MFU the achieved over the peak FLOP/s, and the
mask's share its own time over the step's; --profile writes a trace; --mode=data prints one line
per input source. The PyTorch peer of `make bench` (benchmarks/torch_mae.py) is the same model
and optimizer as mim_jax's MAE, and prints the ratio line. (The numbers are measurements, so
only their relations are tested; bench figures go in notes, not tests.)"""

import json

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
  *kinds, summary = [json.loads(line) for line in stdout_of(
      run_module("benchmarks.trace_breakdown", f"--profile={tmp_path}")).splitlines()]
  assert summary["steps"] == 3 and summary["wall_ms_per_step"] > 0
  assert sum(k["share"] for k in kinds) == pytest.approx(1, abs=1e-3)
  assert {k["kind"] for k in kinds if k["share"] > 0} >= {"matmul", "layer norm", "optimizer"}


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


def test_torch_peer_cli_times_eager_and_prints_mim_jax_over_torch(tmp_path):
  (tmp_path / "bench.json").write_text('{"images_per_sec": 50.0}\n')
  result = run_module("benchmarks.torch_mae", f"--config=configs/mae_vit.py:{PEER_ARG}",
                      "--modes=eager", "--steps=1", "--warmup=0",
                      f"--against={tmp_path / 'bench.json'}")
  eager, ratio = [json.loads(line) for line in stdout_of(result).splitlines()]
  assert eager["mode"] == "eager" and eager["threads"] >= 1
  assert eager["images_per_sec"] == pytest.approx(16 / (eager["step_ms"] / 1e3), rel=0.02)
  assert ratio["mim_jax_over_torch_eager"] == pytest.approx(
      50.0 / eager["images_per_sec"], rel=0.01)


def test_torch_peer_refuses_what_it_does_not_implement():
  pytest.importorskip("torch")
  from benchmarks import torch_mae  # pylint: disable=g-import-not-at-top
  config = mae_vit.get_config(PEER_ARG)
  config.mask.name = "block"
  with pytest.raises(ValueError, match="mask.name='block'"):
    torch_mae.Sizes.from_config(config)
