"""Tests of CAE (mim_jax/methods/cae.py) and of BEiT's block-wise masking (masking.block_*):
the blocks are rectangles of the configured areas and aspect ratios, the count is exact, the
generator jits; the regressor's cross-attention and the blocks' parameter names; CAE trains on
digits, its sharded step equals the one-device step, the alignment target gets no gradient, and
the analytic FLOP count matches the traced matmuls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cae_vit
from mim_jax import config_validation
from mim_jax import flops
from mim_jax import masking
from mim_jax import methods
from mim_jax import optim
from mim_jax.data import pipeline
from mim_jax.methods import cae
from mim_jax.models import layer_loop
from mim_jax.models import layers
from mim_jax.models import vit
from conftest import Trainer, assert_trees_close, mesh_of, to_host

# ---------------------------------------------------------------------------------------------
# Block masking. Few distinct static shapes, so few compiled programs.
# ---------------------------------------------------------------------------------------------

STATIC = ("min_patches", "max_patches", "min_aspect", "attempts")
rectangles = jax.jit(masking.block_rectangles, static_argnums=(1, 4))
union_fn = jax.jit(masking.block_union, static_argnums=(1, 2, 3), static_argnames=STATIC)
fill_fn = jax.jit(masking.fill_to_count, static_argnums=2)
block_mask = jax.jit(masking.block_mask, static_argnums=(1, 2, 3), static_argnames=STATIC)


def check_rectangles(top, left, h, w, grid):
  """Each painted rectangle is the full, contiguous h x w box at (top, left), inside the grid."""
  painted = np.asarray(masking.paint_rectangles(*map(jnp.asarray, (top, left, h, w)), grid))
  rows, cols = painted.any(2), painted.any(1)
  for i in range(len(top)):
    np.testing.assert_array_equal(np.flatnonzero(rows[i]), np.arange(top[i], top[i] + h[i]))
    np.testing.assert_array_equal(np.flatnonzero(cols[i]), np.arange(left[i], left[i] + w[i]))
  np.testing.assert_array_equal(painted.sum((1, 2)), h * w)  # Bounding box full: no holes.
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= grid[0]).all() and (left + w <= grid[1]).all()
  return painted


def consistent_with(h, w, min_area, max_area, min_aspect):
  """Whether integer sides h, w can come from h = round(sqrt(a r)), w = round(sqrt(a / r)) with
  area a in [min_area, max_area] and aspect r in [min_aspect, 1 / min_aspect]: rounding puts
  a r in [(h - 1/2)^2, (h + 1/2)^2] and a / r likewise, so a lies in [(h-.5)(w-.5), (h+.5)(w+.5)]
  and r in [(h-.5)/(w+.5), (h+.5)/(w-.5)], and each interval must meet the configured one."""
  h, w = h.astype(np.float64), w.astype(np.float64)
  area_ok = ((h - .5) * (w - .5) <= max_area) & ((h + .5) * (w + .5) >= min_area)
  aspect_ok = ((h - .5) / (w + .5) <= 1 / min_aspect) & ((h + .5) / (w - .5) >= min_aspect)
  return area_ok & aspect_ok


def test_block_rectangles_have_the_configured_areas_and_aspect_ratios():
  grid, min_area, max_area, min_aspect = (14, 14), 16.0, 98.0, 0.3
  u = np.random.default_rng(0).random((4096, 4), dtype=np.float32)
  top, left, h, w, fits = map(np.asarray, rectangles(u, grid, min_area, max_area, min_aspect))
  # BEiT rejects blocks as wide or as tall as the grid; the others are kept.
  np.testing.assert_array_equal(fits, (h < 14) & (w < 14))
  assert 0.8 < fits.mean() < 1.0
  top, left, h, w = top[fits], left[fits], h[fits], w[fits]
  check_rectangles(top, left, h, w, grid)
  assert consistent_with(h, w, min_area, max_area, min_aspect).all()
  # A narrower configuration is really narrower: these sides are not all consistent with it.
  assert not consistent_with(h, w, 16.0, 30.0, 0.7).all()
  # The draws cover the range: tall and wide blocks, small and large ones, every position.
  aspect, area = h / w, h * w
  assert aspect.min() < 0.45 and aspect.max() > 2.2
  assert area.min() <= 18 and area.max() >= 90
  assert top.min() == 0 and left.min() == 0
  assert (top + h).max() == 14 and (left + w).max() == 14


@pytest.mark.parametrize("grid,num_masked,min_patches,attempts,exact", [
    ((14, 14), 98, 16, 64, 0.95),  # CAE: 98 of 196, blocks of >= 16. Measured 0.982 exact.
    ((6, 9), 22, 6, 64, 0.95),     # A non-square grid, ratio 0.4. Measured 1.0.
    ((14, 14), 98, 16, 4, 0.0),    # Few attempts: most rows come out short.
])
def test_block_union_is_the_accepted_rectangles_and_never_overshoots(grid, num_masked,
                                                                     min_patches, attempts,
                                                                     exact):
  batch = 512
  union, rects, accepted = map(np.asarray, union_fn(jax.random.key(1), batch, grid, num_masked,
                                                    min_patches=min_patches, attempts=attempts))
  counts = union.sum((1, 2))
  assert counts.max() <= num_masked          # BEiT's acceptance rule never overshoots.
  assert (counts == num_masked).mean() >= exact
  top, left, h, w = rects[accepted].T
  painted = check_rectangles(top, left, h, w, grid)
  assert (h < grid[0]).all() and (w < grid[1]).all()
  # A row's first accepted block was drawn with area in [min_patches, num_masked]; later ones
  # with area between min_patches and what the row still needed. All: aspect in range.
  assert consistent_with(h, w, 1, num_masked, 0.3).all()
  first, has = np.argmax(accepted, axis=1), accepted.any(1)
  assert has.mean() > 0.9
  assert consistent_with(rects[has, first[has], 2], rects[has, first[has], 3], min_patches,
                         num_masked, 0.3).all()
  # The union is exactly the union of the accepted rectangles.
  rebuilt = np.zeros_like(union)
  np.logical_or.at(rebuilt, np.nonzero(accepted)[0], painted)
  np.testing.assert_array_equal(rebuilt, union)
  if attempts == 64:
    assert accepted.sum(1).mean() >= 2  # Several blocks per row, not one.


def test_fill_to_count_is_exact_masks_the_union_first_then_its_border():
  """The count-fixing step on its own, on unions of every size: empty, short, exact, over."""
  batch, grid, num_keep = 512, (14, 14), 98
  n = 196
  gen = np.random.default_rng(2)
  sizes = gen.integers(0, n + 1, (batch, 1))
  union = (gen.random((batch, n)).argsort(1).argsort(1) < sizes).reshape(batch, *grid)
  m = fill_fn(jax.random.key(4), jnp.asarray(union), num_keep)
  mask, ids_keep = np.asarray(m.mask).astype(bool), np.asarray(m.ids_keep)
  np.testing.assert_array_equal(mask.sum(1), n - num_keep)  # Exact, every row.
  for row_mask, row_keep in zip(mask, ids_keep):
    np.testing.assert_array_equal(np.sort(row_keep), np.flatnonzero(~row_mask))
  flat, counts = union.reshape(batch, n), union.sum((1, 2))
  short, over = counts <= n - num_keep, counts > n - num_keep
  assert short.sum() > 100 and over.sum() > 100
  assert (mask[short] >= flat[short]).all()  # A short union is masked whole ...
  assert (mask[over] <= flat[over]).all()    # ... an oversized one is cut to a subset.
  pad = np.pad(union, ((0, 0), (1, 1), (1, 1)))
  border = ((pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:])
            & ~union).reshape(batch, n)
  extra = mask & ~flat
  grows = short & (border.sum(1) >= extra.sum(1))
  assert grows.sum() > 50
  assert (extra[grows] <= border[grows]).all()  # Grown along the border while it suffices.
  rest = short & ~grows
  assert (mask[rest] >= (flat | border)[rest]).all()  # Else union and whole border, then more.


def test_block_mask_is_the_union_filled_to_count_and_jits():
  batch, grid, ratio = 512, (14, 14), 0.5
  assert masking.GENERATORS["block"] is masking.block_mask
  rng = jax.random.key(5)
  m = block_mask(rng, batch, grid, ratio)
  mask = np.asarray(m.mask)
  np.testing.assert_array_equal(mask.sum(1), 98)
  k_blocks, k_fill = jax.random.split(rng)
  union = union_fn(k_blocks, batch, grid, 98, min_patches=16, attempts=64)[0]
  want = fill_fn(k_fill, union, 98)
  for got, expected in zip(m, want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  # Finished rows are BEiT's blocks only; short rows are few (measured 1.8%).
  flat = np.asarray(union).reshape(batch, -1)
  exact = flat.sum(1) == 98
  assert exact.mean() > 0.95
  np.testing.assert_array_equal(mask[exact], flat[exact])
  # Static shapes under jit with a traced rng; the same rng gives the same mask, another not.
  again, other = block_mask(rng, batch, grid, ratio), block_mask(jax.random.key(6), batch,
                                                                 grid, ratio)
  np.testing.assert_array_equal(np.asarray(again.mask), mask)
  assert not np.array_equal(np.asarray(other.mask), mask)
  shapes = jax.eval_shape(lambda r: masking.block_mask(r, 4, (8, 8), 0.5), rng)
  assert shapes.ids_keep.shape == (4, 32) and shapes.mask.shape == (4, 64)


# ---------------------------------------------------------------------------------------------
# The regressor's and decoder's blocks: parameter names and the shared attention.
# ---------------------------------------------------------------------------------------------

def test_cross_attention_is_the_shared_attention_on_its_own_projections():
  """CrossAttention projects queries, keys (no bias) and values separately, then runs
  layers.dot_product_attention: the same as jax.nn.dot_product_attention on those projections."""
  b, n, m, d, heads = 2, 3, 5, 16, 2
  rng = np.random.default_rng(0)
  queries, keys, values = (rng.normal(size=(b, t, d)).astype(np.float32) for t in (n, m, m))
  attn = cae.CrossAttention(heads)
  params = jax.jit(attn.init)(jax.random.key(0), queries, keys, values)["params"]
  assert {k: set(v) for k, v in params.items()} == {
      "q": {"kernel", "bias"}, "k": {"kernel"}, "v": {"kernel", "bias"},
      "proj": {"kernel", "bias"}}
  got = jax.jit(attn.apply)({"params": params}, queries, keys, values)
  p = params
  split = lambda x: x.reshape(b, x.shape[1], heads, d // heads)
  out = jax.nn.dot_product_attention(split(queries @ p["q"]["kernel"] + p["q"]["bias"]),
                                     split(keys @ p["k"]["kernel"]),
                                     split(values @ p["v"]["kernel"] + p["v"]["bias"]))
  want = out.reshape(b, n, d) @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_block_parameters_keep_their_names_and_layer_scale_init():
  """The decoder block is layers.Block with layer scale: CAE's names (checkpoints load) and
  gamma initialised to the configured 0.1; the regressor block has its three input norms."""
  x = jnp.zeros((1, 3, 16))
  decoder = jax.eval_shape(cae.DecoderBlock(2, 64, layer_scale=0.1).init, jax.random.key(0), x)
  assert set(decoder["params"]) == {"norm1", "attn", "gamma_1", "norm2", "mlp", "gamma_2"}
  regressor = cae.RegressorBlock(2, 64, layer_scale=0.1)
  params = jax.jit(regressor.init)(jax.random.key(0), x, x, x, x)["params"]
  assert set(params) == {"norm_q", "norm_k", "norm_v", "cross_attn", "gamma_1", "norm2", "mlp",
                         "gamma_2"}
  assert set(params["norm_k"]) == {"scale"}  # no bias: softmax would ignore it
  np.testing.assert_array_equal(params["gamma_1"], np.full(16, 0.1, np.float32))
  plain = jax.eval_shape(cae.DecoderBlock(2, 64).init, jax.random.key(0), x)["params"]
  assert "gamma_1" not in plain  # layer scale 0: no parameter, the plain block


# ---------------------------------------------------------------------------------------------
# CAE. One small config: Mu/4 encoder (width 64) at 16 px = a 4x4 grid, 8 of 16 masked in
# blocks of >= 4, regressor 1 and decoder 1 block at width 32 (so the projection runs too).
# ---------------------------------------------------------------------------------------------

ARG = "variant=Mu/4,decoder=1x32,regressor=1,image_size=16,batch_size=16,data=digits"
LR = 1e-3


def make_config(arg: str = ARG):
  config = cae_vit.get_config(arg)
  config.mask.block.min_patches = 4
  config.total_steps = 100
  config.optim.warmup_steps = 0   # Peak lr from step 0, so the first steps move every param.
  config.optim.base_lr = LR * config.optim.lr_batch_base / config.batch_size
  config.optim.grad_clip_norm = 0.0
  return config


FIRST = 2  # Steps compared between one and eight devices.
RNG = jax.random.key(1)


@pytest.fixture(scope="module")
def digits():
  config = make_config()
  iterator = pipeline.train_iterator(config, process_index=0, process_count=1)
  return [{"image": next(iterator)["image"]} for _ in range(30)]


@pytest.fixture(scope="module")
def one_device(digits):
  """One device, the first FIRST steps taken: their metrics and the params after them."""
  trainer = Trainer(make_config(), mesh_of(jax.devices()[:1]), jax.random.key(0))
  trainer.first_metrics = trainer.run(digits[:FIRST], RNG)
  trainer.first_params = to_host(trainer.state.params)
  return trainer


def test_cae_loss_falls_on_digits(one_device, digits):
  metrics = one_device.first_metrics + one_device.run(digits[FIRST:], RNG)
  loss = np.array([m["loss"] for m in metrics])
  rec = np.array([m["loss_rec"] for m in metrics])
  align = np.array([m["loss_align"] for m in metrics])
  assert np.isfinite(loss).all()
  np.testing.assert_allclose(loss, rec + 2.0 * align, rtol=1e-5)  # lambda = 2
  assert loss[-5:].mean() < 0.7 * loss[:5].mean(), loss
  assert rec[-5:].mean() < rec[:5].mean(), rec


def test_sharded_step_matches_one_device(one_device, digits):
  """Data parallel on the 8 fake devices: the same losses, grad norms and updated parameters
  as one device, to fp32 tolerance (the gradient is summed in another order)."""
  assert jax.device_count() == 8
  # The trainer's born-sharded init is tested in tests/test_sharding.py; here the state is
  # placed from the one-device initial state, which saves compiling init for 8 devices.
  eight = Trainer(make_config(), mesh_of(jax.devices()), jax.random.key(0),
                  one_device.initial_state)
  m8, m1 = eight.run(digits[:FIRST], RNG), one_device.first_metrics
  for a, b in zip(m1, m8):
    for key in ("loss", "loss_rec", "loss_align", "grad_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  assert m1[0]["loss"] != m1[1]["loss"]
  # Within fp32 tolerance after two Adam steps of lr 1e-3 from the same state, except a few
  # elements whose gradient is within Adam's eps of zero (see tests/test_sharding.py): at most
  # 1 in 10,000, each within lr / 10.
  p1, p8 = one_device.first_params, to_host(eight.state.params)
  assert_trees_close(p8, p1, 1e-5, 1e-6, max_outliers=1e-4, outlier_atol=LR / 10)
  for before, after in zip(jax.tree.leaves(one_device.initial_state.params),
                           jax.tree.leaves(p1)):
    assert np.abs(after - before).max() > LR / 2  # Every parameter moved: not vacuous.
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(eight.state.params))


def test_stop_gradient_blocks_the_alignment_target(one_device):
  """Forward-mode derivatives along a random direction in parameter space: the alignment
  target's is exactly zero (the stop-gradient), while the predicted latents, computed by the
  same encoder from the visible patches, move. A zero JVP for every direction is a zero VJP: no
  gradient of the loss flows into the target branch. (tests of the FLOP count check the same
  from the other side: the gradient's program has no backward matmuls for the target.)"""
  config = make_config()
  model = methods.build(config)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 1)), jnp.float32)
  rngs = {"mask": jax.random.key(4)}
  params = one_device.initial_state.params
  gen = np.random.default_rng(5)  # numpy: no program to compile per parameter shape.
  direction = jax.tree.map(lambda x: gen.normal(size=x.shape).astype(np.float32), params)

  @jax.jit
  def run(params, direction):
    def forward(p):
      out = model.apply({"params": p}, images, rngs=rngs, method=model.predict)
      return out["latent_pred"], out["latent_target"], out
    (_, target, out), (d_pred, d_target, _) = jax.jvp(forward, (params,), (direction,))
    # The target is the encoder's own latents of the masked patches, projected to the width.
    latent = model.apply({"params": params}, images, out["ids_masked"],
                         method=lambda m, x, ids: m.encoder(x, ids)[0][:, 1:])
    to_width = nn.Dense(32).apply({"params": params["to_width"]}, latent)
    free = nn.LayerNorm(epsilon=1e-6).apply({"params": params["to_width_norm"]}, to_width)
    feats = model.apply({"params": params}, images, method=model.features)
    # What CAE.reconstruct returns, from this prediction (one forward less to compile).
    rec = cae.reconstruction_images(images, out, 4, config.method.norm_pix_loss)
    return target, free, d_pred, d_target, feats, rec

  target, free, d_pred, d_target, feats, rec = run(params, direction)
  np.testing.assert_allclose(np.asarray(target), np.asarray(free), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(d_target) == 0)
  assert np.abs(np.asarray(d_pred)).mean() > 1e-2

  # The same program checks features (for the probe) and the reconstruction grid.
  assert feats["cls"].shape == (4, 64) and feats["gap"].shape == (4, 64)
  patches = lambda x: np.asarray(layers.patchify(jnp.asarray(x), 4))
  masked, pasted, pred = (patches(rec[k]) for k in ("masked", "pasted", "prediction"))
  hidden = np.abs(masked).sum(-1) == 0  # The masked patches are blanked: 8 of 16 per image.
  np.testing.assert_array_equal(hidden.sum(1), 8)
  original = patches(images)
  np.testing.assert_allclose(pasted[~hidden], original[~hidden], atol=1e-6)
  np.testing.assert_allclose(pasted[hidden], pred[hidden], atol=1e-6)
  assert (pred[~hidden] == 0).all() and np.abs(pred[hidden]).mean() > 0


@pytest.mark.parametrize("arg", [
    "variant=Mu/8,decoder=2x32,regressor=2,image_size=64,data=synthetic",   # projected width
    "variant=Mu/8,decoder=1x64,regressor=3,image_size=64,data=synthetic",   # encoder's width
])
def test_analytic_flops_match_the_traced_matmuls(arg):
  """The forward jaxpr's matmuls = trained forward + target forward. The gradient's jaxpr =
  3x the trained forward + 1x the target forward (nothing flows back through the stop-gradient),
  minus the patch embedding's input gradient, which is never needed (images get no gradient)."""
  config = make_config(arg)
  config.mask.block.min_patches = 16
  batch = 2
  model = methods.build(config)
  images = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x), rng,
                          images)["params"]
  loss = lambda p, x, r: model.apply({"params": p}, x, rngs={"mask": r, "dropout": r})[0]
  analytic = methods.train_flops_per_example(config)
  size, patch = vit.parse_variant(config.model.variant)
  n, keep = 64, masking.num_visible(64, 0.5)
  patch_embed = flops.dense(n, patch * patch * 3, size.width)
  target = (patch_embed + flops.transformer(1 + n - keep, size.width, size.depth, size.mlp_dim)
            + (flops.dense(n - keep, size.width, 32) if config.method.width != size.width else 0))
  trained = (analytic - target) // flops.TRAIN_MULTIPLIER
  assert trained * flops.TRAIN_MULTIPLIER + target == analytic
  forward = flops.jaxpr_matmul_flops(jax.make_jaxpr(loss)(params, images, rng).jaxpr)
  assert forward == batch * (trained + target)
  grad = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params, images, rng).jaxpr)
  assert grad == batch * (analytic - patch_embed)


def test_drop_path_reaches_encoder_target_regressor_and_decoder_in_training_only(monkeypatch):
  """With method.drop_path = 0.3 and two blocks in each part, the rates rise 0 -> 0.3 over each
  part's blocks, so the last block of each drops both its branches: the encoder on the visible
  patches and again for the alignment target (as CAE's teacher runs in train mode), the
  regressor and the decoder, 8 drops at rate 0.3. Evaluation (train=False) drops nothing and
  is the drop_path = 0 model."""
  config = make_config(ARG.replace("decoder=1x32,regressor=1", "decoder=2x32,regressor=2"))
  config.method.drop_path = 0.3
  model = methods.build(config)
  rates = []
  real = layers.stochastic_depth
  monkeypatch.setattr(layers, "stochastic_depth",
                      lambda x, rate, rng: rates.append(rate) or real(x, rate, rng))
  images = jnp.zeros((2, 16, 16, 1))
  params = jax.eval_shape(lambda: methods.init_params(model, config, jax.random.key(0)))
  loss = lambda train: lambda p: model.apply({"params": p}, images, train=train, rngs={
      "mask": jax.random.key(1), "dropout": jax.random.key(2)})[0]
  jax.eval_shape(loss(True), params)
  assert rates == [0.3] * 8
  rates.clear()
  jax.eval_shape(loss(False), params)
  assert rates == []
  assert layer_loop.drop_path_rates(0.1, 4) == pytest.approx([0, 0.1 / 3, 0.2 / 3, 0.1])
  assert cae_vit.get_config("batch_size=2048").method.drop_path == 0.1  # CAE's --drop_path


@pytest.mark.parametrize("field,value,expected", [
    ("mask.block.min_patches", 10,
     r"mask.block.min_patches 10 cannot fit the 4x4 patch grid.*1 \.\. 9"),
    ("method.heads", 3, "width 32 is not divisible by method.heads 3"),
    ("mask.name", "blocky", "unknown mask generator 'blocky'.*'block'"),
    ("mask.ratio", 1.0, "mask.ratio must be in"),
    ("mask.block.min_aspect", 1.5, r"mask.block.min_aspect must be in \(0, 1\], got 1.5"),
    ("method.drop_path", 1.0, r"method.drop_path must be in \[0, 1\), got 1.0"),
])
def test_validation_names_the_bad_value(field, value, expected):
  config = make_config()
  *sections, key = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[key] = value
  with pytest.raises(ValueError, match=expected):
    config_validation.validate(config)


def test_paper_recipe_in_config():
  c = cae_vit.get_config("batch_size=2048")
  m, o = c.method, c.optim
  assert (m.regressor_depth, m.decoder_depth, m.width, m.heads) == (4, 4, 768, 12)
  k = c.mask
  assert (k.name, k.ratio, k.block.min_patches, k.block.min_aspect) == ("block", 0.5, 16, 0.3)
  assert m.align_weight == 2.0 and m.layer_scale == 0.1
  assert (o.b1, o.b2, o.weight_decay, o.grad_clip_norm, o.min_lr) == (0.9, 0.999, 0.05, 3.0, 1e-5)
  assert float(optim.learning_rate(c)(o.warmup_steps)) == pytest.approx(1.5e-3)
  assert c.total_steps == 40 * o.warmup_steps  # 800 epochs, 20 of warmup.
  assert masking.num_kept(c.mask, (14, 14)) == 98
  with pytest.raises(ValueError, match="unknown config argument 'decoderr'.*regressor"):
    cae_vit.get_config("decoderr=1x32")
