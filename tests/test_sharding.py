"""Tests of sharding and of the optimizer: a real train step on the 8 fake CPU devices (data
parallel and FSDP) matches the same step on one device; the state is donated; parameter
shardings follow the FSDP rule; the weight-decay mask and the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import cae_vit
from configs import crate_mae
from configs import finetune_vit
from configs import mae_vit
from configs import position_vit
from configs import simmim_swin
from configs import simmim_vit
from conftest import Trainer
from conftest import abstract_params
from conftest import assert_trees_close
from conftest import mesh_of
from conftest import random_images
from conftest import set_peak_lr
from conftest import to_host
from mim_jax import optim
from mim_jax import sharding
from mim_jax import tree_paths


def make_config(fsdp: bool = False):
  config = mae_vit.get_config("variant=Mu/4,decoder=1x32,image_size=16,batch_size=16,"
                              "data=synthetic")
  config.total_steps = 10
  set_peak_lr(config, LR)
  config.sharding.fsdp = fsdp
  # Small enough that every matrix (and the larger vectors) is sharded, large enough that some
  # small leaves stay replicated, so both paths of the rule run.
  config.sharding.fsdp_min_size = 256
  return config


def run_steps(config, mesh, images: np.ndarray, num_steps: int = 2):
  """Init on `mesh`, then `num_steps` train steps on `images`. Returns the initial params, the
  params after the steps, the per-step losses and grad norms, and the state shardings."""
  init_rng, step_rng = jax.random.split(jax.random.key(0))
  trainer = Trainer(config, mesh, init_rng)
  batch = jax.device_put(images, sharding.batch_sharding(mesh))
  assert batch.addressable_shards[0].data.shape[0] == len(images) // mesh.size
  metrics = []
  for i in range(num_steps):
    old = trainer.state
    metrics.append(trainer.step({"image": batch}, step_rng))
    if i == 0:
      # Donated: the old state's buffers were reused for the new one.
      old_leaves = jax.tree.leaves(old)
      assert old_leaves and all(x.is_deleted() for x in old_leaves), [
          x.is_deleted() for x in old_leaves]
  assert int(trainer.state.step) == num_steps
  return trainer.initial_state.params, trainer.state, metrics, trainer.shardings


@pytest.fixture(scope="module")
def images():
  return random_images((16, 16, 16, 3))


@pytest.fixture(scope="module")
def one_device(images):
  return run_steps(make_config(), mesh_of(jax.devices()[:1]), images)


# Tolerances. The sharded step sums the per-device partial gradients in a different order than
# the single-device step, so loss and gradients differ in the last bits: measured 3e-7 relative
# on the loss, 1e-7 on the grad norm. Adam's first update is lr * g / (|g| + eps), about
# lr * sign(g), which hides those bits for almost every element: all but 4 of 119,600 agree
# within rtol 1e-5 / atol 1e-6 (FP32). The exceptions are elements whose gradient happens to be
# within ~eps (1e-8) of zero, where lr * g / (|g| + eps) follows the noise: measured up to
# 6.6e-6, i.e. 0.7% of the lr (1e-3). Another CPU (other vector width, other summation order)
# can land a few different elements there, so the test allows 1 in 10,000 elements outside fp32
# tolerance, each within 10% of the lr. A real divergence (another mask, another batch split, a
# missed gradient reduction) moves the loss by far more than 1e-5 and most elements by ~lr.
RTOL, ATOL = 1e-5, 1e-6
LR = 1e-3


@pytest.mark.parametrize("fsdp", [False, True], ids=["data_parallel", "fsdp"])
def test_sharded_step_matches_one_device(images, one_device, fsdp):
  assert jax.device_count() == 8, (
      f"this test needs 8 devices, got {jax.device_count()}: tests/conftest.py must set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported")
  config = make_config(fsdp=fsdp)
  init_1, state_1, metrics_1, _ = one_device
  init_8, state_8, metrics_8, shardings = run_steps(config, mesh_of(jax.devices()), images)

  specs = [s.spec for s in jax.tree.leaves(shardings.params)]
  leaves = jax.tree.leaves(state_8.params)
  if fsdp:
    # Every leaf of at least fsdp_min_size elements is split (all dims here are multiples of 8),
    # every smaller one (biases, norms, tokens of width <= 128) stays whole.
    for path, x in jax.tree_util.tree_leaves_with_path(state_8.params):
      big = x.size >= config.sharding.fsdp_min_size
      assert (x.sharding.spec != P()) == big, (jax.tree_util.keystr(path), x.sharding.spec)
      if big:  # Each device holds 1/8 of it.
        assert x.addressable_shards[0].data.size * 8 == x.size
    sharded = [x for x in leaves if x.sharding.spec != P()]
    assert len(sharded) >= 13 and len(sharded) < len(leaves), specs
    # Adam's moments follow their parameters' shardings.
    mu = state_8.opt_state[0].mu
    assert ([x.sharding.spec for x in jax.tree.leaves(mu)]
            == [x.sharding.spec for x in leaves])
  else:
    assert all(spec == P() for spec in specs)
    assert all(x.sharding.is_fully_replicated for x in leaves)
  assert all(len(x.sharding.device_set) == 8 for x in leaves)

  # Born identical: random init does not depend on the sharding (threefry is partitionable).
  assert_trees_close(init_8, init_1, rtol=0, atol=0)
  for m8, m1 in zip(metrics_8, metrics_1):
    assert np.isfinite(m8["loss"])
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=RTOL)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=RTOL)
  # Two different masks (fold_in(rng, step)) give two different losses.
  assert metrics_1[0]["loss"] != metrics_1[1]["loss"]

  params_1, params_8 = to_host(state_1.params), to_host(state_8.params)
  assert_trees_close(params_8, params_1, RTOL, ATOL, max_outliers=1e-4, outlier_atol=LR / 10)
  # The comparison is not vacuous: every parameter moved by about lr per step.
  for before, after in zip(jax.tree.leaves(init_1), jax.tree.leaves(params_1)):
    assert np.abs(after - before).max() > LR
  # Adam's moments: mu ~ 0.1 g (g ~ 1e-3 .. 1e-1 here), nu ~ 1e-3 g^2, compared likewise.
  assert_trees_close(to_host(state_8.opt_state), to_host(state_1.opt_state), RTOL, 1e-9,
                     max_outliers=1e-4, outlier_atol=1e-7)


def test_fsdp_spec_rule():
  assert sharding.fsdp_spec((64, 192), 8, 256) == P(None, sharding.AXIS)  # largest dim
  assert sharding.fsdp_spec((192, 64), 8, 256) == P(sharding.AXIS, None)
  assert sharding.fsdp_spec((12, 64), 8, 256) == P(None, sharding.AXIS)   # 12 % 8 != 0
  assert sharding.fsdp_spec((12, 20), 8, 16) == P()                         # none divisible
  assert sharding.fsdp_spec((64,), 8, 256) == P()                           # too small
  assert sharding.fsdp_spec((1, 1, 512), 8, 256) == P(None, None, sharding.AXIS)


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------

def test_weight_decay_mask():
  """MAE's rule: every kernel and the cls and mask tokens decay (main_pretrain.py skips only
  1-D parameters and biases); norms and biases do not."""
  config = make_config()
  flat = tree_paths.flatten(optim.decay_mask(abstract_params(config)))
  for name, decays in flat.items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("bias", "scale"):
      assert decays is False, name
    else:
      assert leaf in ("kernel", "cls", "mask_token") and decays is True, name
  # Every kernel, including the [p, p, C, D] patch embedding, decays.
  assert flat["encoder/patch_embed/kernel"] is True
  assert flat["decoder/pred/kernel"] is True
  assert flat["encoder/blocks/block_0/attn/qkv/kernel"] is True
  assert flat["encoder/blocks/block_0/norm1/scale"] is False
  assert flat["encoder/cls"] is True and flat["decoder/mask_token"] is True

  # The tokens `optim.no_decay_tokens` names are exempt, and only they.
  exempt = tree_paths.flatten(optim.decay_mask(abstract_params(config), ("mask_token",)))
  assert [name for name in flat if flat[name] != exempt[name]] == ["decoder/mask_token"]

  # And the built optimizer applies it: with zero gradients only decayed leaves move.
  real = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,)), "cls": jnp.ones((1, 1, 4))}
  moved = {}
  for tokens in ((), ("cls",)):
    config.optim.no_decay_tokens = tokens
    tx = optim.build(config)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, real), tx.init(real), real)
    moved[tokens] = {k: float(jnp.abs(u).max()) > 0 for k, u in updates.items()}
  assert moved[()] == {"w": True, "b": False, "cls": True}
  assert moved[("cls",)] == {"w": True, "b": False, "cls": False}


def test_each_config_decays_the_tokens_its_reference_decays():
  """MAE, CRATE-MAE (trained with MAE's script) and CAE decay their cls and mask tokens; the
  others exempt those their reference's no_weight_decay() names (see each config)."""
  expected = {mae_vit: (), crate_mae: (), cae_vit: (), simmim_swin: ("mask_token",),
              simmim_vit: ("cls",), finetune_vit: ("cls",), position_vit: ("cls",)}
  for module, tokens in expected.items():
    assert module.get_config("runlocal").optim.no_decay_tokens == tokens, module.__name__
  config = make_config()
  config.optim.no_decay_tokens = ("cls", "pos_embedding")
  with pytest.raises(ValueError, match=r"optim.no_decay_tokens names unknown tokens "
                                       r"\['pos_embedding'\]; valid: \['cls', 'mask_token'\]"):
    optim.validate(config)


def test_learning_rate_schedule():
  config = mae_vit.get_config("variant=Mu/4,batch_size=512,data=synthetic")
  config.total_steps = 1000
  config.optim.warmup_steps = 100
  config.optim.min_lr = 1e-6
  lr = optim.learning_rate(config)
  peak = 1.5e-4 * 512 / 256
  assert float(lr(0)) == 0.0
  assert float(lr(50)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(lr(100)) == pytest.approx(peak, rel=1e-6)
  # Cosine: halfway through the decay the lr is halfway between peak and min_lr.
  assert float(lr(550)) == pytest.approx((peak + 1e-6) / 2, rel=1e-4)
  assert float(lr(1000)) == pytest.approx(1e-6, rel=1e-4)
  values = [float(lr(s)) for s in range(100, 1001, 50)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_paper_recipe_in_config():
  """MAE sec. A.1: AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4 x batch / 256, 40 warmup epochs
  of 800, cosine."""
  config = mae_vit.get_config("batch_size=4096")
  o = config.optim
  assert (o.b1, o.b2, o.weight_decay, o.base_lr, o.lr_batch_base) == (0.9, 0.95, 0.05, 1.5e-4, 256)
  assert config.total_steps == 20 * o.warmup_steps
  assert float(optim.learning_rate(config)(o.warmup_steps)) == pytest.approx(1.5e-4 * 16)
