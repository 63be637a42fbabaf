"""Masks by name: every registered generator works with every method, by config alone.

The full matrix is traced, not compiled (compilation is what costs time on CPU): for each method
on its encoder and each mask in masking.GENERATORS, the method's loss traces to a scalar with
the mask drawn through `masking.draw` with exactly the configured spec. A few pairs, covering
every generator on a method whose default it is not, then run for real: finite losses, and the
generator's exact count. The mask gallery (python -m mim_jax.tools.mask_gallery) draws them all."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cae_vit
from configs import crate_mae
from configs import mae_vit
from configs import position_vit
from configs import simmim_swin
from configs import simmim_vit
from conftest import MICRO_MAE
from conftest import Trainer
from conftest import mesh_of
from conftest import run_module
from conftest import set_peak_lr
from mim_jax import config_validation
from mim_jax import masking
from mim_jax import methods
from mim_jax.data import pipeline
from mim_jax.tools import mask_gallery

# Tiny configs, each on a 4x4 patch grid (16 px, patch 4) where every generator fits: blocks
# of >= 4 patches (BEiT's 16 cannot fit under 4x4) and coarse cells of 2x2 patches.
CONFIGS = {
    "mae": lambda: mae_vit.get_config("variant=Mu/4,decoder=1x32,data=digits,image_size=16,"
                                      "batch_size=8"),
    "simmim_vit": lambda: simmim_vit.get_config("variant=Mu/4,data=digits,image_size=16,"
                                                "batch_size=8,mask_patch=8"),
    "simmim_swin": lambda: simmim_swin.get_config("variant=Mu,window=2,data=digits,"
                                                  "image_size=16,batch_size=8,mask_patch=8"),
    "cae": lambda: cae_vit.get_config("runlocal,variant=Mu/4,batch_size=8"),
    "crate_mae": lambda: crate_mae.get_config("runlocal,variant=micro/4,batch_size=8"),
    "position": lambda: position_vit.get_config("variant=Mu/4,data=digits,image_size=16,"
                                                "batch_size=8"),
}
# The generators any method can draw by config alone; the model-scored ones (masking.SCORED)
# are tested with the methods that feed them (tests/test_hpm.py, tests/test_maskalign.py,
# tests/test_mask_teachers.py).
MASKS = [name for name in masking.GENERATORS.names() if name not in masking.SCORED]


def config_with(method: str, mask: str):
  config = CONFIGS[method]()
  config.mask.name = mask
  config.mask.ratio = 0.5
  config.mask.block.min_patches = 4
  config.mask.coarse.cell = 2
  return config


def loss_fn(config):
  model = methods.build(config)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, config.data.channels)),
                       jnp.float32)

  def loss(rng):
    params = methods.init_params(model, config, rng)
    return model.apply({"params": params}, images, train=True, rngs={"mask": rng})[0]
  return loss


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_mask_traces_through_every_method(method, monkeypatch):
  drawn = []
  draw = masking.draw

  def spy(rng, batch, grid, spec):
    drawn.append((batch, grid, spec))
    return draw(rng, batch, grid, spec)
  monkeypatch.setattr(masking, "draw", spy)
  for mask in MASKS:
    config = config_with(method, mask)
    config_validation.validate(config)
    drawn.clear()
    loss = jax.eval_shape(loss_fn(config), jax.random.key(0))
    assert loss.shape == () and loss.dtype == jnp.float32, (method, mask)
    assert drawn and all(spec == masking.MaskSpec.from_config(config.mask)
                         and grid == (4, 4) for _, grid, spec in drawn), (method, mask, drawn)
    assert masking.num_kept(config.mask, (4, 4)) == 8


@pytest.mark.parametrize("method, mask", [("mae", "block"), ("simmim_vit", "random"),
                                          ("position", "coarse"), ("cae", "random"),
                                          ("crate_mae", "purple_noise")])
def test_masks_run_with_other_methods(method, mask):
  config = config_with(method, mask)
  loss = jax.jit(loss_fn(config))(jax.random.key(0))
  assert np.isfinite(loss), (method, mask, loss)


@pytest.mark.parametrize("mask", MASKS)
def test_each_generator_masks_exactly_the_promised_count(mask):
  config = config_with("mae", mask)
  spec = masking.MaskSpec.from_config(config.mask)
  m = jax.jit(lambda r: masking.draw(r, 16, (4, 4), spec))(jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(m.mask).sum(1), 8)
  kept = np.take_along_axis(np.asarray(m.mask), np.asarray(m.ids_keep), axis=1)
  assert not kept.any()  # ids_keep are exactly the visible patches


@pytest.mark.parametrize("mask", MASKS)
def test_each_generator_draws_every_step_without_retracing(mask):
  spec = masking.MaskSpec.from_config(config_with("mae", mask).mask)
  traces = []

  @jax.jit
  def step_masks(rng):
    traces.append(1)
    return masking.draw(rng, 4, (4, 4), spec).mask
  masks = [np.asarray(step_masks(jax.random.key(step))) for step in range(3)]
  assert len(traces) == 1, mask
  assert not all((m == masks[0]).all() for m in masks[1:]), mask  # a new mask every step


@pytest.fixture(scope="module")
def digits_start():
  """The micro MAE's config, 4 digit batches and its initial state on 8 devices: the state does
  not depend on the mask, so each generator's run starts from it without compiling init."""
  config = set_peak_lr(mae_vit.get_config(MICRO_MAE), 1e-3)
  config.mask.block.min_patches = 4  # as config_with: BEiT's 16 cannot fit under 4x4
  config.mask.coarse.cell = 2
  iterator = pipeline.train_iterator(config, process_index=0, process_count=1)
  batches = [{"image": next(iterator)["image"]} for _ in range(4)]
  return config, batches, Trainer(config, mesh_of(jax.devices()), jax.random.key(0)).initial_state


# random: tests/test_sharding.py and tests/test_train.py train it on 8 devices already.
@pytest.mark.parametrize("mask", [name for name in MASKS if name != "random"])
def test_each_generator_trains_mae_on_8_devices(mask, digits_start):
  """A real training run on digits, the batch and parameters sharded over 8 fake devices: the
  loss is finite and falls (the last steps' mean below 80% of the first steps')."""
  config, batches, initial_state = digits_start
  config = config.copy_and_resolve_references()
  config.mask.name = mask
  assert len(jax.devices()) == 8
  trainer = Trainer(config, mesh_of(jax.devices()), jax.random.key(0), initial_state)
  losses = np.array([m["loss"] for m in trainer.run([batches[i % 4] for i in range(24)],
                                                    jax.random.key(1))])
  assert np.isfinite(losses).all() and losses[-6:].mean() < 0.8 * losses[:4].mean(), (mask,
                                                                                       losses)


def test_a_bad_mask_config_names_the_value_and_the_valid_ones():
  config = config_with("mae", "checkerboard")
  with pytest.raises(ValueError, match=r"unknown mask generator 'checkerboard'; valid: "
                                       r"\['attention', 'block', 'blue_noise', 'coarse', "
                                       r"'green_noise', 'hard_patch', 'purple_noise', 'random', "
                                       r"'red_noise'\]"):
    config_validation.validate(config)
  # A model-scored mask where nothing feeds its scores would silently be uniform: refused.
  for method, mask, needs in [("mae", "attention", "a teacher's attention"),
                              ("mae", "hard_patch", "HPM's loss predictor"),
                              ("simmim_vit", "hard_patch", "HPM's loss predictor")]:
    with pytest.raises(ValueError, match=rf"mask.name='{mask}' needs {needs}.*valid here: "
                                         rf"\['block', 'blue_noise', 'coarse', 'green_noise', "
                                         rf"'purple_noise', 'random', 'red_noise'\]"):
      config_validation.validate(config_with(method, mask))
  config = config_with("simmim_vit", "coarse")
  config.mask.coarse.cell = 3
  with pytest.raises(ValueError, match=r"mask.coarse.cell 3 .*valid: \[1, 2\]"):
    config_validation.validate(config)


def test_gallery_greys_each_generators_masked_patches_and_the_tool_writes_it(tmp_path):
  config = config_with("mae", "random")
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1)).astype(np.uint8)
  images[images == mask_gallery.GREY] = 0  # so grey marks masked pixels only
  rows = mask_gallery.masked_rows(config, images)
  assert set(rows) == set(MASKS) | set(masking.SCORED)
  assert all(isinstance(rows.pop(name), str) for name in masking.SCORED)  # need a model
  for name, row in rows.items():
    assert isinstance(row, np.ndarray), (name, row)  # config_with's knobs fit the 4x4 grid
    masked = (row == mask_gallery.GREY).reshape(3, 4, 4, 4, 4).all(axis=(2, 4))  # per patch
    assert (masked.sum(axis=(1, 2)) == 8).all(), name  # ratio 0.5 of 16 patches
    np.testing.assert_array_equal(row[row != mask_gallery.GREY], images[row != mask_gallery.GREY])
  # The command line, on the digits config with BEiT's 16-patch blocks, which do not fit.
  out = tmp_path / "masks.png"
  result = run_module("mim_jax.tools.mask_gallery", "--config=configs/mae_vit.py:runlocal",
                      "--config.mask.block.min_patches=16", f"--out={out}", "--images=4")
  assert result.returncode == 0, result.stderr[-2000:]
  drawn = json.loads(result.stdout.split(": ", 1)[1])
  assert drawn == sorted(set(MASKS) - {"block"}) and out.stat().st_size > 10_000
