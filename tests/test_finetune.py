"""Tests of fine-tuning, a method of the one trainer (mim_jax/methods/finetune.py): the
layer-wise lr decay of the optimizer, drop path, Mixup/CutMix, loading a pretrained encoder
(config.init_from), a sharded step on 8 devices against 1, and a real fine-tune on digits (the
trainer end to end with the top-1 evaluator, then rerun when finished)."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune_vit
from configs import mae_vit
from mim_jax import checkpoint
from mim_jax import config_validation
from mim_jax import init_from
from mim_jax import methods
from mim_jax import mixup
from mim_jax import optim
from mim_jax import pretrained
from mim_jax import sharding
from mim_jax import train
from mim_jax import tree_paths
from mim_jax.models import layers
from mim_jax.models import vit


def make_config(arg: str = "runlocal,variant=Mu/4,batch_size=16"):
  return finetune_vit.get_config(arg)


def mesh_of(devices) -> jax.sharding.Mesh:
  return jax.make_mesh((len(devices),), (sharding.AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


flat, unflatten = tree_paths.flatten, tree_paths.unflatten


def to_host(tree):
  return jax.tree.map(np.array, tree)


def test_config_validation():
  config_validation.validate(make_config())
  bad = make_config()
  bad.method.drop_path, bad.method.mix_prob = 1.0, 2.0
  with pytest.raises(ValueError, match=r"method.drop_path=1.0, method.mix_prob=2.0"):
    config_validation.validate(bad)
  bad = make_config()
  bad.method.pool = "max"
  with pytest.raises(ValueError, match="method.pool"):
    config_validation.validate(bad)
  bad = make_config()
  bad.optim.layer_decay = 1.5
  with pytest.raises(ValueError, match=r"optim.layer_decay must be in \(0, 1\]"):
    config_validation.validate(bad)


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay.
# ---------------------------------------------------------------------------------------------

def test_layer_decay_scales_and_optimizer_update():
  """MAE's rule on a Mu (depth 2) classifier: lr x decay^(depth + 1 - layer), layer 0 = patch
  embedding, cls and position embedding, block i = i + 1, head and fc_norm = depth + 1; and
  the built optimizer applies it to the Adam step and to the weight decay alike."""
  config = make_config()
  config.optim.warmup_steps = 0
  config.optim.layer_decay = decay = 0.5
  model = methods.build(config)
  shapes = jax.eval_shape(lambda r: methods.init_params(model, config, r), jax.random.key(0))
  names = set(flat(shapes))
  assert "encoder/norm/scale" not in names  # gap pooling: fc_norm instead of the final norm
  assert {"fc_norm/scale", "head/kernel", "encoder/pos_embedding", "encoder/cls"} <= names

  def expected_scale(name: str) -> float:
    if name.startswith(("encoder/patch_embed/", "encoder/cls", "encoder/pos_embedding")):
      return decay ** 3
    if name.startswith("encoder/blocks/block_0/"):
      return decay ** 2
    if name.startswith("encoder/blocks/block_1/"):
      return decay
    assert name.startswith(("fc_norm/", "head/")), name
    return 1.0

  scales = flat(optim.layer_decay_scales(shapes, decay))
  assert scales == {name: expected_scale(name) for name in names}

  tx = optim.build(config)
  peak = float(optim.learning_rate(config)(0))
  assert peak == pytest.approx(config.optim.base_lr * 16 / 256)
  first_update = jax.jit(lambda grads, params: tx.update(grads, tx.init(params), params)[0])
  # Unit gradient, zero params: Adam's first step is lr * g / (|g| + eps) (1 up to float32
  # rounding of the bias corrections: 7e-6 relative), and weight decay adds 0.
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  ones = jax.tree.map(jnp.ones_like, zeros)
  for name, u in flat(first_update(ones, zeros)).items():
    np.testing.assert_allclose(u, -peak * expected_scale(name), rtol=2e-5, err_msg=name)
  # Zero gradient, unit params: only the weight decay moves, on kernels, scaled per layer too.
  for name, u in flat(first_update(zeros, ones)).items():
    wd = 0.05 if name.endswith("kernel") else 0.0
    np.testing.assert_allclose(u, -peak * wd * expected_scale(name), rtol=1e-6, err_msg=name)


def test_layer_ids():
  assert optim.layer_id("encoder/patch_embed/kernel", 12) == 0
  assert optim.layer_id("encoder/cls", 12) == 0
  assert optim.layer_id("encoder/pos_embedding", 12) == 0
  assert optim.layer_id("encoder/blocks/block_0/mlp/fc1/kernel", 12) == 1
  assert optim.layer_id("encoder/blocks/block_11/norm1/scale", 12) == 12
  assert optim.layer_id("encoder/norm/scale", 12) == 13
  assert optim.layer_id("head/kernel", 12) == 13
  # Only the encoder's blocks are layers: a decoder's get the full lr.
  assert optim.layer_id("decoder/blocks/block_0/mlp/fc1/kernel", 12) == 13
  assert optim.layer_id("decoder/mask_token", 12) == 13
  assert optim.encoder_depth(["encoder/blocks/block_3/x", "encoder/blocks/block_11/y",
                              "decoder/blocks/block_20/z"]) == 12


# ---------------------------------------------------------------------------------------------
# Drop path.
# ---------------------------------------------------------------------------------------------

def test_stochastic_depth_drops_whole_samples():
  x = jnp.ones((4000, 3, 2))
  assert layers.stochastic_depth(x, 0.0, jax.random.key(0)) is x
  y = np.asarray(layers.stochastic_depth(x, 0.25, jax.random.key(0)))
  per_sample = y.reshape(len(y), -1)
  assert np.all(per_sample == per_sample[:, :1])  # each sample is dropped or kept whole
  assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
  dropped = float((per_sample[:, 0] == 0).mean())
  # Binomial(4000, 0.25): std 0.0068; 4 std.
  assert abs(dropped - 0.25) < 0.028
  assert abs(y.mean() - 1.0) < 0.04  # unbiased: kept samples are scaled by 1 / (1 - rate)


def test_drop_path_rates_over_depth():
  """Block i gets rate * i / (depth - 1), only with train=True; drop_path 0 is the identity
  and no parameter changes."""
  encoder = vit.ViT(32, 4, 2, 64, 4, drop_path=0.3)
  no_drop = vit.ViT(32, 4, 2, 64, 4, drop_path=0.0)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 1)), jnp.float32)
  variables = jax.jit(encoder.init)(jax.random.key(0), images)
  plain = jax.eval_shape(vit.ViT(32, 4, 2, 64, 4).init, jax.random.key(0), images)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, plain)

  rates = []  # each Block's rate, recorded while tracing

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Block) and context.method_name == "__call__":
      rates.append(context.module.drop_path)
    return next_fun(*args, **kwargs)

  @jax.jit
  def forwards(variables, images):
    with nn.intercept_methods(record):
      return (encoder.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)}),
              encoder.apply(variables, images),  # evaluation: no dropout rng needed
              no_drop.apply(variables, images, train=True))

  (train_out, _), (eval_out, _), (no_drop_out, _) = forwards(variables, images)
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3] + [0.0] * 8, rtol=1e-6)
  assert not np.allclose(train_out, eval_out)
  # Rate 0 in training is exactly the evaluation forward.
  np.testing.assert_array_equal(no_drop_out, eval_out)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix.
# ---------------------------------------------------------------------------------------------

BATCH, CLASSES = 8, 10


def labelled_batch():
  """Sample i is the constant image i, so every output pixel tells whose it is."""
  images = jnp.broadcast_to(jnp.arange(BATCH, dtype=jnp.float32)[:, None, None, None],
                            (BATCH, 16, 16, 1))
  targets = optax.smooth_labels(jax.nn.one_hot(jnp.arange(BATCH), CLASSES), 0.1)
  return images, targets


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "both", "off"])
def test_mix(kind):
  alphas = {"mixup": (0.8, 0.0), "cutmix": (0.0, 1.0), "both": (0.8, 1.0), "off": (0.8, 1.0)}
  mix = jax.jit(functools.partial(
      mixup.mix, mixup_alpha=alphas[kind][0], cutmix_alpha=alphas[kind][1], switch_prob=0.5,
      prob=0.0 if kind == "off" else 1.0))
  images, targets = labelled_batch()
  own = np.arange(BATCH, dtype=np.float32)[:, None, None, None]
  partner = own[::-1]
  kinds = set()
  for seed in range(24):
    out, mixed, lam = (np.asarray(a) for a in mix(jax.random.key(seed), images, targets))
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)  # label mass sums to 1
    np.testing.assert_allclose(mixed, lam * targets + (1 - lam) * targets[::-1], atol=1e-7)
    if kind == "off":
      assert lam == 1.0 and np.array_equal(out, images)
      continue
    assert 0.0 <= lam <= 1.0
    from_partner = np.isclose(out, partner) & ~np.isclose(out, own)
    if np.all(np.isclose(out, own) | from_partner):  # every pixel whole: CutMix
      kinds.add("cutmix")
      # The pasted area is exactly 1 - lam, the same box in every sample.
      for i in range(BATCH):
        if i != BATCH - 1 - i:
          assert from_partner[i].mean() == pytest.approx(1 - lam, abs=1e-6)
      box = from_partner[0, :, :, 0]
      if box.any():
        rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
    else:
      kinds.add("mixup")
      np.testing.assert_allclose(out, np.broadcast_to(lam * own + (1 - lam) * partner, out.shape),
                                 rtol=1e-5, atol=1e-5)
  if kind != "off":
    assert kinds == ({"mixup", "cutmix"} if kind == "both" else {kind})


# ---------------------------------------------------------------------------------------------
# A pretrained encoder into the classifier; a sharded step.
# ---------------------------------------------------------------------------------------------

LR = 1e-3


def step_config():
  config = make_config()
  # No warmup and a visible lr, so a step moves every parameter (by about lr x its layer scale).
  config.optim.warmup_steps = 0
  config.optim.base_lr = LR * 256 / config.batch_size
  # The paper's Mixup / CutMix, which runlocal turns off.
  config.method.mixup_alpha, config.method.cutmix_alpha = 0.8, 1.0
  return config


@pytest.fixture(scope="module")
def eight_devices():
  """A Mu classifier's state on 8 devices. Tests copy it before any donating step."""
  config = step_config()
  model = methods.build(config)
  tx = optim.build(config)
  state, _, shardings = train.create_state(model, tx, config, mesh_of(jax.devices()),
                                           jax.random.key(0))
  return config, model, tx, state, shardings


@pytest.fixture(scope="module")
def mae_encoder():
  """The encoder params of an MAE Mu model as pretraining initialises them (numpy): the
  sin-cos ViT of configs/mae_vit.py, with its final norm."""
  config = mae_vit.get_config("variant=Mu/4,decoder=1x32,image_size=16,batch_size=16,data=digits")
  encoder = methods.build(config).encoder
  params = jax.jit(encoder.init)(jax.random.key(7), jnp.zeros((1, 16, 16, 1)))["params"]
  return to_host(params)


def test_with_encoder_loads_pretrained_params(eight_devices, mae_encoder):
  _, _, _, state, shardings = eight_devices
  # The fine-tuning encoder learns its position embedding (MAE's fine-tuning starts it from the
  # pretrained sin-cos table; mim_jax.pretrained adds it, as here).
  table = layers.sincos_posemb_2d((4, 4), 64)[None]
  given = {**mae_encoder, "pos_embedding": table}
  loaded = init_from.with_encoder(state.params, given, shardings.params)
  got = flat(to_host(loaded["encoder"]))
  want = {k: v for k, v in flat(given).items() if not k.startswith("norm/")}
  assert sorted(got) == sorted(want)  # the pretrained final norm is dropped (gap pooling)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  jax.tree.map(np.testing.assert_array_equal, to_host(loaded["head"]),
               to_host(state.params["head"]))  # the head is untouched
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(loaded),
                                             jax.tree.leaves(shardings.params)))

  # Another encoder: a clear error naming what differs.
  broken = flat(given)
  del broken["blocks/block_1/mlp/fc2/bias"]
  broken["blocks/block_9/mlp/fc2/bias"] = np.zeros(64, np.float32)
  broken["cls"] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"x.npz.*missing.*blocks/block_1/mlp/fc2/bias.*unexpected.*block_9.*"
                           r"shape mismatch: cls: saved \[1, 1, 32\] vs model \[1, 1, 64\]"):
    init_from.with_encoder(state.params, unflatten(broken), shardings.params, source="x.npz")


def test_init_from_export(eight_devices, mae_encoder, tmp_path):
  """config.init_from through mim_jax.pretrained: an MAE encoder exported to .npz (fixed
  sin-cos positions) starts the learned position embedding from the sin-cos table."""
  config, _, _, state, shardings = eight_devices
  path = str(tmp_path / "encoder.npz")
  pretrained.save_npz(path, {f"encoder/{k}": v for k, v in flat(mae_encoder).items()}, {})
  config = config.copy_and_resolve_references()
  config.init_from = path
  params = init_from.load(state.params, config, shardings.params)
  got = flat(to_host(params["encoder"]))
  for name, value in flat(mae_encoder).items():
    if not name.startswith("norm/"):
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  np.testing.assert_allclose(got["pos_embedding"][0], layers.sincos_posemb_2d((4, 4), 64),
                             atol=1e-6)


def run_steps(config, model, tx, state, shardings, mesh, batch, num_steps=2):
  step = train.make_train_step(model, tx, shardings, mesh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  metrics = []
  for _ in range(num_steps):
    state, m = step(state, batch, jax.random.key(1))
    metrics.append(to_host(m))
  return to_host(state.params), metrics


def test_sharded_step_matches_one_device(eight_devices):
  """Drop path, Mixup/CutMix (which pairs samples across devices) and the layer-scaled AdamW
  give the same step on 8 devices as on 1. Tolerances as in tests/test_sharding.py: the
  gradient sums run in another order, and Adam's first steps (about lr * sign(g)) follow that
  noise only where a gradient is within ~eps of zero."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 16, 16, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  config, model, tx, state_8, shardings_8 = eight_devices
  init = to_host(state_8.params)
  state_8 = jax.tree.map(jnp.copy, state_8)  # the step donates it
  # The same initial state on one device (data parallel: every leaf is replicated).
  mesh_1 = mesh_of(jax.devices()[:1])
  shardings_1 = jax.tree.map(lambda _: sharding.replicated(mesh_1), shardings_8)
  state_1 = jax.device_put(to_host(state_8), shardings_1)
  assert config.method.drop_path > 0 and config.method.mix_prob == 1
  params_1, metrics_1 = run_steps(config, model, tx, state_1, shardings_1, mesh_1, batch)
  params_8, metrics_8 = run_steps(config, model, tx, state_8, shardings_8,
                                  mesh_of(jax.devices()), batch)
  for m8, m1 in zip(metrics_8, metrics_1):
    assert np.isfinite(m8["loss"])
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m8["mix_lambda"] == m1["mix_lambda"]
  assert metrics_1[0]["mix_lambda"] != metrics_1[1]["mix_lambda"]  # a new draw each step
  outliers = total = 0
  for (path, p8), p1, p0 in zip(jax.tree_util.tree_leaves_with_path(params_8),
                                jax.tree.leaves(params_1), jax.tree.leaves(init)):
    name = tree_paths.name(path)
    if name.endswith("attn/qkv/bias"):  # the key bias has an exactly zero gradient (noise)
      d = p8.shape[-1] // 3
      p8, p1, p0 = (np.concatenate([a[..., :d], a[..., 2 * d:]], -1) for a in (p8, p1, p0))
    np.testing.assert_allclose(p8, p1, rtol=0, atol=LR / 10, err_msg=name)
    outliers += int((np.abs(p8 - p1) > 1e-6 + 1e-5 * np.abs(p1)).sum())
    total += p8.size
    # Not vacuous: every leaf moved by about lr x its layer scale (at least 0.75^3) per step.
    assert np.abs(p1 - p0).max() > LR * 0.75 ** 3 / 2, name
  assert outliers <= 1e-4 * total, f"{outliers} of {total}"


# ---------------------------------------------------------------------------------------------
# The trainer on digits.
# ---------------------------------------------------------------------------------------------

def test_finetune_digits_end_to_end_and_rerun(tmp_path):
  """The one trainer on digits (Mu, 8 devices, the runlocal recipe with a larger lr): the loss
  falls and top-1 (the top1 evaluator, periodic and final) is well above chance (0.1); rerun in
  the same workdir when finished, it reports the same results and writes no second row."""
  config = make_config("runlocal,variant=Mu/4,batch_size=64")
  config.total_steps = 80
  config.optim.warmup_steps = 5
  config.optim.base_lr = 4e-2  # peak 1e-2: a short run needs a large lr
  assert config.method.mixup_alpha == config.method.cutmix_alpha == 0.0  # runlocal: off
  config.log_every_steps = 10
  config.checkpoint.every_steps = 40
  config.eval.every_steps = 40
  workdir = tmp_path / "ft"
  results = train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 9 and np.mean(losses[-3:]) < losses[0] - 0.3, losses
  assert all(r["mfu"] > 0 for r in rows if "loss" in r and r["step"] > 1)  # MFU, as pretraining
  evals = [r["top1/finetuned"] for r in rows if "top1/finetuned" in r]
  assert len(evals) == 2 and evals[-1] == results["top1/finetuned"]
  # Measured 0.46 (chance 0.1): 80 steps of a 2-block ViT from random init, a short run.
  assert results["top1/finetuned"] > 0.3, results
  again = train.train_and_evaluate(config, str(workdir))
  assert again == results
  assert (workdir / "metrics.jsonl").read_text().splitlines() == [json.dumps(r) for r in rows]


@pytest.mark.parametrize("variant, epochs, base_lr, layer_decay, drop_path", [
    ("B/16", 100, 5e-4, 0.65, 0.1), ("L/16", 50, 1e-3, 0.75, 0.2), ("H/14", 50, 1e-3, 0.75, 0.3)])
def test_each_size_takes_maes_released_recipe(variant, epochs, base_lr, layer_decay, drop_path):
  """MAE's FINETUNE.md commands, per ViT size (5 warmup epochs each), at batch 1024."""
  c = finetune_vit.get_config(f"variant={variant},data=tfds:imagenet2012")
  steps_per_epoch = c.total_steps // epochs
  assert c.total_steps == epochs * steps_per_epoch and c.optim.warmup_steps == 5 * steps_per_epoch
  assert (c.optim.base_lr, c.optim.layer_decay, c.method.drop_path) == (base_lr, layer_decay,
                                                                        drop_path)
