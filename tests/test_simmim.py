"""Tests of SimMIM (Xie et al. 2022) on Swin and ViT: the coarse mask generator, the L1 loss on
masked pixels only, training on digits (the loss falls), the sharded step on 8 fake devices
against the 1-device step, analytic FLOPs against the traced matmuls, parameter counts at the
paper's sizes, and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simmim_swin
from configs import simmim_vit
from conftest import Trainer
from conftest import abstract_params
from conftest import assert_trees_close
from conftest import mesh_of
from conftest import num_params
from conftest import random_images
from conftest import set_peak_lr
from conftest import to_host
from conftest import traced_matmul_flops
from mim_jax import config_validation
from mim_jax import flops
from mim_jax import masking
from mim_jax import methods
from mim_jax import optim
from mim_jax import tree_paths
from mim_jax.data import pipeline
from mim_jax.methods import simmim
from mim_jax.models import swin


# ---------------------------------------------------------------------------------------------
# The coarse mask.
# ---------------------------------------------------------------------------------------------

coarse_mask = jax.jit(masking.coarse_mask, static_argnums=(1, 2, 3), static_argnames="cell")


@pytest.mark.parametrize("grid,cell,ratio,masked_cells", [
    ((48, 48), 8, 0.6, 22),   # Swin at 192 px, 32-px cells: ceil(36 * 0.6) = 22 of 36 cells
    ((14, 14), 2, 0.6, 30),   # ViT-B/16 at 224 px: ceil(49 * 0.6) = 30 of 49
    ((8, 8), 2, 0.6, 10),     # runlocal, 32 px, 8-px cells: ceil(16 * 0.6) = 10 of 16
    ((2, 5), 1, 0.6, 6),      # ceil(10 * 0.6) is 6, not float's ceil(6.000000000000001) = 7
    ((12, 8), 2, 0.5, 12),    # not square
])
def test_coarse_mask_exact_count_and_whole_cells(grid, cell, ratio, masked_cells):
  batch = 64
  m = jax.tree.map(np.asarray, coarse_mask(jax.random.key(0), batch, grid, ratio, cell=cell))
  gh, gw = grid
  n = gh * gw
  assert m.mask.shape == (batch, n) and m.ids_keep.shape == (batch, n - masked_cells * cell ** 2)
  np.testing.assert_array_equal(m.mask.sum(1), masked_cells * cell * cell)
  # The mask is the coarse grid repeated: constant inside each cell ...
  blocks = m.mask.reshape(batch, gh // cell, cell, gw // cell, cell)
  coarse = blocks[:, :, :1, :, :1]
  np.testing.assert_array_equal(blocks, np.broadcast_to(coarse, blocks.shape))
  np.testing.assert_array_equal(coarse.sum((1, 2, 3, 4)), masked_cells)
  # ... ids_keep are exactly the visible patches, and ids_restore inverts the order.
  for row_mask, row_keep in zip(m.mask, m.ids_keep):
    np.testing.assert_array_equal(np.sort(row_keep), np.flatnonzero(row_mask == 0))
  np.testing.assert_array_equal(np.sort(m.ids_restore, 1), np.tile(np.arange(n), (batch, 1)))
  # Rows differ.
  assert len({row.tobytes() for row in m.mask}) > batch // 2


def test_coarse_mask_marginal_is_uniform_over_cells():
  """Each of the 16 cells is masked with probability 10/16. Over 2000 rows a cell's frequency
  has sd 0.011; a position bias would push some cell beyond 5 sd."""
  rows = 2000
  m = np.asarray(coarse_mask(jax.random.key(1), rows, (8, 8), 0.6, cell=2).mask)
  freq = m.reshape(rows, 4, 2, 4, 2)[:, :, 0, :, 0].reshape(rows, 16).mean(0)
  p = 10 / 16
  assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / rows), freq


def test_coarse_mask_rejects_a_cell_that_does_not_tile_the_grid():
  with pytest.raises(ValueError, match=r"mask.coarse.cell 3 \(in patches\) must tile the 8x8"):
    masking.coarse_mask(jax.random.key(0), 2, (8, 8), 0.6, cell=3)


# ---------------------------------------------------------------------------------------------
# The loss: L1 on masked pixels only.
# ---------------------------------------------------------------------------------------------

def test_masked_l1_normalisation_and_visible_pixels_do_not_count():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 4, 6, 3)), rng.normal(size=(2, 4, 6, 3))
  mask = (rng.uniform(size=(2, 4, 6)) < 0.5).astype(np.float32)
  loss = float(simmim.masked_l1(*(jnp.asarray(a, jnp.float32) for a in (pred, target, mask))))
  # SimMIM: sum of |error| over masked pixels and channels / (masked pixels * channels).
  want = np.abs(pred - target)[mask == 1].sum() / (mask.sum() * 3)
  assert loss == pytest.approx(want, rel=1e-5)
  moved = pred + 100.0 * (1 - mask)[..., None]
  assert float(simmim.masked_l1(jnp.asarray(moved, jnp.float32), jnp.asarray(target, jnp.float32),
                                jnp.asarray(mask))) == pytest.approx(loss, rel=1e-6)
  np.testing.assert_array_equal(
      np.asarray(simmim.pixel_mask(jnp.asarray([[1.0, 0.0, 0.0, 1.0]]), (2, 2), 3))[0],
      np.kron(np.array([[1, 0], [0, 1]]), np.ones((3, 3))))


def vit_config():
  config = simmim_vit.get_config("variant=Mu/4,image_size=16,batch_size=16,mask_patch=8,"
                                 "data=synthetic")
  return config


def test_vit_simmim_loss_gradient_features_and_reconstruction():
  """End to end on ViT: the loss is masked_l1 of the model's own prediction against the input,
  its gradient w.r.t. the prediction is zero at every visible pixel and non-zero at every masked
  one; features give 'gap' and 'cls'; the reconstruction pastes the prediction into the masked
  area only."""
  config = vit_config()
  model = methods.build(config)
  images = jnp.asarray(random_images((2, 16, 16, 3)))

  @jax.jit
  def run(images):
    rngs = {"mask": jax.random.key(1)}
    variables = model.init({"params": jax.random.key(0), **rngs}, images)
    pred, mask = model.apply(variables, images, rngs=rngs, method=model.predict)
    loss, _ = model.apply(variables, images, rngs=rngs)
    pixels = simmim.pixel_mask(mask.mask, model.grid, 4)
    loss_of_pred = lambda p: simmim.masked_l1(p, images, pixels)
    feats = model.apply(variables, images, method=model.features)
    recon = model.apply(variables, images, rngs=rngs, method=model.reconstruct)
    return loss, loss_of_pred(pred), jax.grad(loss_of_pred)(pred), pixels, feats, recon

  loss, recomputed, grad, pixels, feats, recon = jax.tree.map(np.asarray, run(images))
  assert float(loss) == pytest.approx(float(recomputed), rel=1e-6)
  grad = np.abs(grad).sum(-1)
  assert (grad[pixels == 0] == 0).all() and (grad[pixels == 1] > 0).all()
  # 16 px, 8-px cells: 4 cells, ceil(2.4) = 3 masked, i.e. 3 * 64 pixels per image.
  np.testing.assert_array_equal(pixels.sum((1, 2)), 3 * 64)
  assert feats["gap"].shape == (2, 64) and feats["cls"].shape == (2, 64)
  m = pixels[..., None]
  np.testing.assert_array_equal(recon["pasted"] * (1 - m), np.asarray(images) * (1 - m))
  np.testing.assert_array_equal(recon["pasted"] * m, recon["prediction"] * m)
  np.testing.assert_array_equal(recon["masked"] * m, 0.0)


# ---------------------------------------------------------------------------------------------
# Training on digits (Swin), and the same steps sharded over 8 devices.
# ---------------------------------------------------------------------------------------------

LR = 1e-3
TRAIN_STEPS = 30


def swin_config():
  """The runlocal config (micro Swin, digits at 32 px, window 4, 8-px mask cells) at batch 16,
  with no warmup and peak lr 1e-3 so that a few steps visibly train."""
  config = simmim_swin.get_config("runlocal,batch_size=16")
  config.total_steps = 100
  return set_peak_lr(config, LR)


def run_steps(config, mesh, batches, initial_state=None):
  """Train steps on `mesh`, from a fresh init or from `initial_state` (host arrays) placed onto
  the mesh with the trainer's shardings. Returns the initial state (host), the params after
  steps 0, 1, 2 (host) and every step's metrics."""
  init_rng, step_rng = jax.random.split(jax.random.key(0))
  trainer = Trainer(config, mesh, init_rng, initial_state)
  params, metrics = [trainer.initial_state.params], []
  for images in batches:
    metrics.append(trainer.step({"image": images}, step_rng))
    if len(metrics) <= 2:
      params.append(to_host(trainer.state.params))
  return trainer.initial_state, params, metrics


@pytest.fixture(scope="module")
def digits_run():
  config = swin_config()
  iterator = pipeline.train_iterator(config)
  batches = [next(iterator)["image"] for _ in range(TRAIN_STEPS)]
  assert batches[0].shape == (16, 32, 32, 1)
  initial_state, params, metrics = run_steps(config, mesh_of(jax.devices()[:1]), batches)
  return config, batches, initial_state, params, metrics


def test_swin_simmim_loss_falls_on_digits(digits_run):
  _, _, _, _, metrics = digits_run
  losses = np.array([float(m["loss"]) for m in metrics])
  assert np.isfinite(losses).all()
  # Digits normalised to [-1, 1] are mostly background at -1 and the untrained head predicts
  # about 0, so the L1 starts near 1. Measured: 1.07, 0.99, 0.77 in the first steps, about 0.61
  # over the last five (a ratio of 0.64).
  assert losses[-5:].mean() < 0.75 * losses[:3].mean(), losses


def test_sharded_step_matches_one_device(digits_run):
  """Data parallel over the 8 fake devices (2 images each), from the same initial state (that
  init itself does not depend on the sharding is tested in tests/test_sharding.py): the same
  losses, gradient norms and parameters after two steps as on one device, to fp32 tolerance
  (tolerances as there: Adam's first steps amplify rounding only where a gradient is ~0)."""
  assert jax.device_count() == 8
  config, batches, initial_state, params_1, metrics_1 = digits_run
  _, params_8, metrics_8 = run_steps(config, mesh_of(jax.devices()), batches[:2], initial_state)
  for m8, m1 in zip(metrics_8, metrics_1):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert metrics_1[0]["loss"] != metrics_1[1]["loss"]  # different masks, different batches
  for p8, p1 in zip(params_8, params_1):
    assert_trees_close(p8, p1, 1e-5, 1e-6, max_outliers=1e-4, outlier_atol=LR / 10)
  # Not vacuous: two steps moved every parameter by about the lr.
  for before, after in zip(jax.tree.leaves(params_1[0]), jax.tree.leaves(params_1[2])):
    assert np.abs(after - before).max() > LR


# ---------------------------------------------------------------------------------------------
# FLOPs and parameter counts.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_fn,arg", [
    (simmim_swin.get_config, "variant=T,image_size=64,window=4,mask_patch=16,data=synthetic"),
    (simmim_swin.get_config, "variant=Mu,image_size=48,window=3,mask_patch=8,data=synthetic"),
    (simmim_vit.get_config, "variant=Mu/8,image_size=64,mask_patch=16,data=synthetic"),
])
def test_analytic_flops_match_the_traced_matmuls(config_fn, arg):
  """The jaxpr of the real forward, matmuls counted one by one, equals the analytic count: for
  Swin-T at 64 px with window 4 that covers the windowed attention of shifted and unshifted
  stages (4 r^2 M^2 d per block, linear in tokens), a stage smaller than the window (2x2 at the
  end: M = 2), patch merging and the pixel-shuffle head."""
  config = config_fn(arg)
  batch = 2
  forward, _ = traced_matmul_flops(config, batch)
  assert forward * flops.TRAIN_MULTIPLIER == batch * methods.train_flops_per_example(config)


def test_swin_attention_flops_are_linear_in_tokens():
  """Liu et al. 2021, eq. 1-2: global MSA costs 4 h w C^2 + 2 (h w)^2 C, window MSA
  4 h w C^2 + 2 M^2 h w C (the paper counts a multiply-add as one). Doubling the image side
  quadruples the tokens and, with fixed windows, quadruples the attention FLOPs too."""
  size = swin.SIZES["B"]
  cost = lambda image: flops.swin_encoder(image, size, 4, 6, 3)
  big, small = cost(384), cost(192)
  assert big == 4 * small
  # Stage 0 of Swin-B at 192 px, window 6: 48x48 tokens of width 128, 2 blocks.
  n, d, m = 48 * 48, 128, 6
  per_block = 2 * (4 * n * d * d + 2 * m * m * n * d) + 2 * 8 * n * d * d
  patch_embed = flops.dense(n, 48, d)
  assert (flops.swin_encoder(192, swin.SwinSize(128, (2,), (4,)), 4, 6, 3)
          == patch_embed + 2 * per_block)


def test_param_counts_at_the_paper_sizes():
  """SimMIM Swin-B at 192 px, window 6: the encoder (Swin-B's 86,743,224 at window 7, less the
  smaller bias tables: 376 head-blocks x (13^2 - 11^2) rows), the mask token and the 1x1 head
  1024 -> 32*32*3: 89,874,104, the 89.87M mmpretrain lists for this model. ViT-B/16: the
  85,647,360 encoder + mask token + the 768 -> 16*16*3 head."""
  for config, want in [(simmim_swin.get_config("variant=B,data=synthetic"), 89_874_104),
                       (simmim_vit.get_config("variant=B/16,data=synthetic"), 86_238_720)]:
    assert num_params(abstract_params(config)) == want
  assert 86_743_224 - 376 * (169 - 121) + 128 + (1024 * 3072 + 3072) == 89_874_104
  assert 85_647_360 + 768 + (768 * 768 + 768) == 86_238_720


# ---------------------------------------------------------------------------------------------
# Configs and validation.
# ---------------------------------------------------------------------------------------------

def test_paper_recipes_in_configs():
  """SimMIM's ablation setting and released configs: Swin-B at 192 px, window 6, AdamW
  (0.9, 0.999), wd 0.05, lr 8e-4 at batch 2048, 10 of 100 epochs warmup, clip 5, the minimum
  lr 1e-5 per 512 images scaled like the peak (main_simmim.py); mask 32 px, ratio 0.6."""
  c = simmim_swin.get_config()
  assert (c.model.variant, c.image_size, c.model.window, c.batch_size) == ("B", 192, 6, 2048)
  assert (c.mask.name, c.mask.ratio, c.mask.coarse.cell * c.model.patch) == ("coarse", 0.6, 32)
  o = c.optim
  assert (o.b1, o.b2, o.weight_decay, o.grad_clip_norm) == (0.9, 0.999, 0.05, 5.0)
  assert o.min_lr == pytest.approx(1e-5 * 2048 / 512)
  assert float(optim.learning_rate(c)(o.warmup_steps)) == pytest.approx(8e-4)
  assert c.total_steps == 10 * o.warmup_steps
  assert c.data.crop_scale == (0.67, 1.0) and c.eval.linear_probe.feature == "gap"
  v = simmim_vit.get_config()
  assert (v.model.variant, v.image_size, v.mask.coarse.cell * 16) == ("B/16", 224, 32)
  assert float(optim.learning_rate(v)(v.optim.warmup_steps)) == pytest.approx(4e-4)
  for config in (c, v, simmim_swin.get_config("runlocal"), simmim_vit.get_config("runlocal")):
    config_validation.validate(config)


@pytest.mark.parametrize("make,overrides,expected", [
    (simmim_swin.get_config, {"mask.coarse.cell": 8},
     r"mask.coarse.cell 8 \(in patches\) must tile the 8x8 patch grid with more than one cell; "
     r"valid: \[1, 2, 4\]"),
    (simmim_swin.get_config, {"model.window": 3}, r"window 3 does not tile stage 0 \(8x8"),
    (simmim_swin.get_config, {"model.variant": "H"}, r"unknown Swin variant 'H'"),
    (simmim_swin.get_config, {"image_size": 36},
     r"image_size 36 must be divisible by Swin's total stride 8"),
    (simmim_vit.get_config, {"mask.coarse.cell": 3}, r"mask.coarse.cell 3 .*valid: \[1, 2, 4\]"),
    (simmim_vit.get_config, {"mask.ratio": 1.0}, r"mask.ratio must be in \(0, 1\), got 1.0"),
    (simmim_vit.get_config, {"model.name": "resnet"}, r"unknown model 'resnet'"),
])
def test_validation_names_the_bad_value(make, overrides, expected):
  config = make("runlocal")
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  with pytest.raises(ValueError, match=expected):
    config_validation.validate(config)


def test_simmim_needs_swin_or_vit():
  config = simmim_vit.get_config("runlocal")
  config.model.name = "crate"
  with pytest.raises(ValueError,
                     match=r"SimMIM needs model.name in \('swin', 'vit'\), got 'crate'"):
    simmim.validate(config)


def test_no_weight_decay_on_bias_tables_tokens_norms_and_biases():
  """As SimMIM's optimizer: Swin's relative position bias tables and mask token take no weight
  decay (no_weight_decay_keywords() and no_weight_decay()), nor do norms and biases; every kernel
  (head included) decays. SimMIM's ViT exempts its cls token but decays its mask token."""
  config = simmim_swin.get_config("runlocal")
  flat = tree_paths.flatten(optim.decay_mask(abstract_params(config),
                                             config.optim.no_decay_tokens))
  table = "encoder/stage_0_block_1/attn/relative_position_bias_table"
  assert flat[table] is False and flat["encoder/mask_token"] is False
  assert flat["head/kernel"] is True and flat["encoder/merge_1/reduction/kernel"] is True
  for name, decays in flat.items():
    assert decays == name.endswith("kernel"), name
  config = simmim_vit.get_config("runlocal")
  flat = tree_paths.flatten(optim.decay_mask(abstract_params(config),
                                             config.optim.no_decay_tokens))
  assert flat["encoder/cls"] is False and flat["encoder/mask_token"] is True


def test_mask_patch_argument_must_be_a_multiple_of_the_patch():
  """The config's `mask_patch` (pixels, as SimMIM states it) becomes mask.coarse.cell (patches)."""
  assert simmim_swin.get_config("runlocal,mask_patch=16").mask.coarse.cell == 4
  assert simmim_vit.get_config("variant=B/16,mask_patch=32").mask.coarse.cell == 2
  with pytest.raises(ValueError, match=r"mask_patch 6 must be a positive multiple of the "
                                       r"model's patch size 4"):
    simmim_swin.get_config("runlocal,mask_patch=6")
