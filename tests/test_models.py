"""Tests of the ViT encoder, the MAE decoder and the MAE method: shapes and parameter counts of
every variant (by eval_shape, so nothing is allocated), position embeddings, patchify, each
reference's patch-embedding init, the visible-only encoder and the decoder's un-shuffle, the
loss, FLOP counting and bf16 compute."""

import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_vit
from mim_jax import flops
from mim_jax import masking
from mim_jax import methods
from mim_jax import models
from mim_jax.methods import mae
from mim_jax.models import layers
from mim_jax.models import vit
from mim_jax.models.mae_decoder import MAEDecoder


def make_config(arg: str = "variant=Mu/4,decoder=1x32,image_size=16,batch_size=16", **model):
  config = mae_vit.get_config(arg + ",data=synthetic")
  config.model.update(model)
  return config


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def random_images(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Variants: shapes and parameter counts, with eval_shape (no allocation, only tracing).
# ---------------------------------------------------------------------------------------------

def vit_param_formula(size: vit.VitSize, patch: int, channels: int = 3) -> int:
  """Hand count: patch embedding (p*p*C*D + D), cls (D), per block qkv (3D^2+3D), proj
  (D^2+D), MLP (2DM+M+D) and two LayerNorms (4D), then the final LayerNorm (2D). No position
  embedding: it is a fixed sin-cos constant, not a parameter."""
  d, m = size.width, size.mlp_dim
  per_block = 4 * d * d + 2 * d * m + 9 * d + m
  return patch * patch * channels * d + d + d + size.depth * per_block + 2 * d


# variant -> (tokens at 224 incl. cls, published parameter count of that ViT with a learned
# position embedding and a 1000-class head). Ti/S from DeiT (5.7M, 22.1M as listed by timm),
# B/16 86.6M, L/16 304.3M and H/14 632.0M (ViT paper table 1 rounds these to 86M and 632M).
PUBLISHED = {"Ti/16": (197, 5.717e6), "S/16": (197, 22.05e6), "B/16": (197, 86.57e6),
             "L/16": (197, 304.33e6), "H/14": (257, 632.05e6), "H/16": (197, None)}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_variant_shapes_and_param_counts(variant):
  config = make_config(f"variant={variant}")
  encoder = models.build_encoder(config)
  size, patch = vit.parse_variant(variant)
  n = (224 // patch) ** 2
  keep = masking.num_visible(n, 0.75)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  ids_keep = jax.ShapeDtypeStruct((2, keep), jnp.int32)

  def run(rng, images, ids_keep):
    (full, aux), variables = encoder.init_with_output(rng, images)
    visible, _ = encoder.apply(variables, images, ids_keep)
    return full, aux, visible, variables["params"]

  full, aux, visible, params = jax.eval_shape(run, jax.random.key(0), images, ids_keep)
  d = size.width
  assert full.shape == (2, 1 + n, d) and full.dtype == jnp.float32
  assert visible.shape == (2, 1 + keep, d)
  assert aux["cls"].shape == (2, d) and aux["gap"].shape == (2, d)
  assert sorted(k for k in aux if k.startswith("block_")) == sorted(
      f"block_{i}" for i in range(size.depth))
  assert aux[f"block_{size.depth - 1}"].shape == (2, 1 + n, d)

  count = num_params(params)
  assert count == vit_param_formula(size, patch), (variant, count)
  tokens, published = PUBLISHED[variant]
  assert tokens == 1 + n
  if published:
    # Adding what our encoder lacks (a learned [tokens, D] position embedding and a 1000-way
    # head) recovers the published size of the same ViT.
    with_posemb_and_head = count + tokens * d + (d * 1000 + 1000)
    assert with_posemb_and_head == pytest.approx(published, rel=2e-3), (variant, count)


def test_vit_b16_and_mae_b16_param_counts():
  """ViT-B/16 encoder: 85,647,360 parameters. With a learned 197x768 position embedding it would
  be 85,798,656, the usual '85.8M' of ViT-B/16 without a head. MAE ViT-B/16 with the 8x512
  decoder has 111,655,680 trainable parameters; MAE's released PyTorch model reports 111.9M
  because it stores the fixed sin-cos tables of encoder (197x768) and decoder (197x512) as frozen
  nn.Parameters: 111,655,680 + 252,160 = 111,907,840."""
  config = make_config("variant=B/16,decoder=8x512")
  model = methods.build(config)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x),
                          jax.random.key(0), images)["params"]
  encoder, decoder = num_params(params["encoder"]), num_params(params["decoder"])
  assert encoder == 85_647_360
  assert encoder + 197 * 768 == 85_798_656
  assert encoder + 197 * 768 == pytest.approx(85.8e6, rel=1e-3)
  # Decoder: embed 768->512, mask token, 8 blocks of width 512 (MLP 2048), norm, pred 512->768.
  per_block = 4 * 512 ** 2 + 2 * 512 * 2048 + 9 * 512 + 2048
  assert decoder == (768 * 512 + 512) + 512 + 8 * per_block + 2 * 512 + (512 * 768 + 768)
  assert encoder + decoder == 111_655_680
  assert encoder + decoder + 197 * 768 + 197 * 512 == pytest.approx(111.9e6, rel=1e-3)
  assert config.method.decoder_heads == 16  # 512 / 32, as in the paper


def test_unknown_variant_lists_valid_sizes():
  for bad in ("X/16", "B16", "b/16", "B/"):
    with pytest.raises(ValueError) as info:
      vit.parse_variant(bad)
    message = str(info.value)
    assert repr(bad) in message
    for size in vit.SIZES:
      assert f"'{size}'" in message
  with pytest.raises(ValueError, match="unknown ViT variant 'Q/8'"):
    models.build_encoder(make_config("variant=Q/8"))


# ---------------------------------------------------------------------------------------------
# Position embeddings and patches.
# ---------------------------------------------------------------------------------------------

def test_sincos_posemb_properties():
  grid, dim = (3, 5), 16  # Not square, so rows and columns cannot be confused.
  emb = layers.sincos_posemb_2d(grid, dim)
  assert emb.shape == (15, dim) and emb.dtype == np.float32
  assert np.abs(emb).max() <= 1.0
  with_cls = layers.sincos_posemb_2d(grid, dim, with_cls=True)
  assert with_cls.shape == (16, dim)
  np.testing.assert_array_equal(with_cls[0], 0.0)
  np.testing.assert_array_equal(with_cls[1:], emb)
  # Hand formula, MAE's layout: [sin(x w), cos(x w), sin(y w), cos(y w)] with x the column,
  # y the row, w_k = 10000^(-k / (dim/4)); patch index = y * width + x.
  w = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
  for y, x in [(0, 0), (0, 4), (2, 1), (1, 3)]:
    want = np.concatenate([np.sin(x * w), np.cos(x * w), np.sin(y * w), np.cos(y * w)])
    np.testing.assert_allclose(emb[y * grid[1] + x], want, atol=1e-6)
  # sin a sin b + cos a cos b = cos(a - b): the similarity of two positions depends only on
  # their offset, which is what makes the embedding relative-position friendly.
  gram = emb @ emb.T
  idx = lambda y, x: y * grid[1] + x
  np.testing.assert_allclose(gram[idx(0, 0), idx(1, 2)], gram[idx(1, 1), idx(2, 3)], atol=1e-5)
  np.testing.assert_allclose(np.diag(gram), dim / 2, atol=1e-4)
  with pytest.raises(ValueError, match="divisible by 4, got 18"):
    layers.sincos_posemb_2d(grid, 18)


def test_patchify_layout_and_unpatchify_roundtrip():
  images = random_images((2, 12, 8, 3))
  patches = np.asarray(layers.patchify(jnp.asarray(images), 4))
  assert patches.shape == (2, 6, 48)
  # Patch (row 2, col 1) is index 2 * 2 + 1, pixels flattened in (py, px, c) order.
  np.testing.assert_array_equal(patches[:, 5], images[:, 8:12, 4:8, :].reshape(2, -1))
  back = layers.unpatchify(jnp.asarray(patches), 4, (3, 2), 3)
  np.testing.assert_array_equal(np.asarray(back), images)


def test_patch_embed_is_the_strided_conv():
  """The matmul form equals ViT's conv with a [p, p, C, D] (HWIO) kernel and stride p."""
  images = jnp.asarray(random_images((2, 8, 12, 3)))
  module = layers.PatchEmbed(4, 8)
  params = jax.jit(module.init)(jax.random.key(0), images)["params"]
  params = {**params, "bias": jnp.arange(8, dtype=jnp.float32)}
  out = jax.jit(module.apply)({"params": params}, images)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))(images, params["kernel"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(conv.reshape(2, 6, 8) + params["bias"]),
                             rtol=1e-5, atol=1e-5)


def _truncated_normal_std(std: float, cut: float) -> float:
  """Std of N(0, std^2) cut at +-cut standard deviations."""
  density = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
  return std * math.sqrt(1 - 2 * cut * density / math.erf(cut / math.sqrt(2)))


# Config -> (kernel shape, kernel std, kernel bound, bias bound or 0 for a zero bias) of its
# reference's patch embedding, from the reference's formula with fan_in = p*p*C, fan_out = D.
XAVIER = lambda fan_in, fan_out: math.sqrt(6 / (fan_in + fan_out))
PATCH_INIT_CASES = {
    # MAE: xavier_uniform_ on the [D, p*p*C] view, at two patch sizes.
    "mae_vit:variant=Mu/16": ((16, 16, 3, 64), XAVIER(768, 64) / math.sqrt(3), XAVIER(768, 64),
                              0.0),
    "mae_vit:variant=Mu/4": ((4, 4, 3, 64), XAVIER(48, 64) / math.sqrt(3), XAVIER(48, 64), 0.0),
    # CRATE-MAE (micro/4): MAE's.
    "crate_mae:runlocal": ((4, 4, 3, 64), XAVIER(48, 64) / math.sqrt(3), XAVIER(48, 64), 0.0),
    # Swin (Mu, patch 4): PyTorch's Conv2d default, U(+-1/sqrt(fan_in)), the bias too.
    "simmim_swin:runlocal": ((4, 4, 3, 32), 48 ** -0.5 / math.sqrt(3), 48 ** -0.5, 48 ** -0.5),
    # CAE (Mu/4): trunc_normal_(std=0.02, a=-0.02, b=0.02).
    "cae_vit:runlocal": ((4, 4, 3, 64), _truncated_normal_std(0.02, 1.0), 0.02, 0.0),
}


@pytest.mark.parametrize("case", list(PATCH_INIT_CASES))
def test_patch_embedding_init_follows_each_reference(case):
  """The initialised kernel's std is the reference's (within 5%: the smallest kernel, Swin's,
  has 1536 entries) and its values stay inside the reference's bound."""
  shape, std, bound, bias_bound = PATCH_INIT_CASES[case]
  name, arg = case.split(":")
  config = importlib.import_module(f"configs.{name}").get_config(arg + ",image_size=16")
  images = jnp.zeros((1, 16, 16, 3))
  encoder = models.build_encoder(config)
  # The whole encoder's init, jitted; XLA drops all but the patch embedding's part of it.
  init = jax.jit(lambda rng: encoder.init(rng, images)["params"]["patch_embed"])
  params = jax.device_get(init(jax.random.key(0)))
  kernel, bias = params["kernel"], params["bias"]
  assert kernel.shape == shape
  assert abs(kernel.std() / std - 1) < 0.05, (kernel.std(), std)
  assert np.abs(kernel).max() <= bound
  if bias_bound:
    assert 0 < np.abs(bias).max() <= bias_bound
  else:
    assert not bias.any()


# ---------------------------------------------------------------------------------------------
# Visible-only encoding and the decoder's un-shuffle.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_encoder():
  """Two images, the Mu/4 encoder's variables, a jitted apply (eager flax compiles op by op)
  and the full encoder's output."""
  images = jnp.asarray(random_images((2, 16, 16, 3), seed=1))
  encoder = models.build_encoder(make_config())
  variables = jax.jit(encoder.init)(jax.random.key(0), images)
  apply = jax.jit(encoder.apply)
  return images, variables, apply, apply(variables, images)


def test_encoder_with_all_ids_in_order_equals_full_encoder(tiny_encoder):
  images, variables, apply, (full, aux) = tiny_encoder
  ids = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
  same, aux_same = apply(variables, images, ids)
  np.testing.assert_allclose(np.asarray(same), np.asarray(full), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aux_same["cls"]), np.asarray(aux["cls"]), atol=1e-6)


def test_encoder_gathers_after_adding_position_embeddings(tiny_encoder):
  """Self-attention without a causal mask is permutation-equivariant, so encoding all patches in
  a shuffled order must give the full encoder's tokens in that order. This only holds if each
  patch carries its own position embedding, i.e. the gather comes after the posemb is added."""
  images, variables, apply, (full, _) = tiny_encoder
  perm = np.stack([np.random.default_rng(s).permutation(16) for s in (0, 1)]).astype(np.int32)
  shuffled, _ = apply(variables, images, jnp.asarray(perm))
  want = np.take_along_axis(np.asarray(full)[:, 1:], perm[..., None], 1)
  np.testing.assert_allclose(np.asarray(shuffled)[:, 1:], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(shuffled)[:, 0], np.asarray(full)[:, 0], atol=1e-5)
  # And a real subset gives a different (shorter) sequence than the full one.
  sub, _ = apply(variables, images, jnp.asarray(perm[:, :4]))
  assert sub.shape == (2, 5, 64)
  assert not np.allclose(np.asarray(sub)[:, 1:], want[:, :4], atol=1e-3)


def test_decoder_puts_visible_tokens_at_their_positions():
  """With no blocks the decoder is a per-token map, pred(LN(token + posemb)), so its output can be
  checked position by position: visible patch j gets the embedded latent that the shuffle sent
  to it, masked patches get the mask token."""
  b, grid, d_in, width, out_dim = 3, (2, 3), 8, 12, 5
  n = grid[0] * grid[1]
  m = masking.random_mask(jax.random.key(1), b, grid, 0.5)
  k = m.ids_keep.shape[1]
  latent = jnp.asarray(random_images((b, 1 + k, d_in)))
  decoder = MAEDecoder(width, 0, 1, 4 * width, grid, out_dim)
  params = jax.jit(decoder.init)(jax.random.key(2), latent, m.ids_restore)["params"]
  params["mask_token"] = jnp.full((1, 1, width), 0.7)  # far from any embedded latent
  out, _ = jax.jit(decoder.apply)({"params": params}, latent, m.ids_restore)
  assert out.shape == (b, n, out_dim)

  p = jax.tree.map(np.asarray, params)
  pos = layers.sincos_posemb_2d(grid, width)
  embedded = np.asarray(latent) @ p["embed"]["kernel"] + p["embed"]["bias"]

  def head(x):
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    return x @ p["pred"]["kernel"] + p["pred"]["bias"]

  ids_keep, mask = np.asarray(m.ids_keep), np.asarray(m.mask)
  for i in range(b):
    for j in range(n):
      if mask[i, j]:
        token = p["mask_token"][0, 0]
      else:
        token = embedded[i, 1 + list(ids_keep[i]).index(j)]  # latent row 1+r encodes ids_keep[r]
      np.testing.assert_allclose(np.asarray(out[i, j]), head(token + pos[j]), rtol=1e-4,
                                 atol=1e-5)


def test_decoder_is_invariant_to_the_order_of_visible_latents():
  """Re-ordering the visible latents, with ids_restore re-ordered to match, changes nothing: the
  decoder uses positions only through ids_restore and the position embedding."""
  b, grid = 2, (4, 4)
  m = masking.random_mask(jax.random.key(3), b, grid, 0.75)
  k = m.ids_keep.shape[1]
  latent = jnp.asarray(random_images((b, 1 + k, 16), seed=2))
  decoder = MAEDecoder(16, 1, 2, 64, grid, 7)
  variables = jax.jit(decoder.init)(jax.random.key(4), latent, m.ids_restore)
  apply = jax.jit(decoder.apply)
  out, _ = apply(variables, latent, m.ids_restore)
  sigma = np.array([2, 0, 3, 1])  # new visible slot r holds old slot sigma[r]
  inverse = np.argsort(sigma)
  latent2 = jnp.concatenate([latent[:, :1], latent[:, 1 + sigma]], 1)
  restore = np.asarray(m.ids_restore)
  restore2 = np.where(restore < k, inverse[np.minimum(restore, k - 1)], restore)
  out2, _ = apply(variables, latent2, jnp.asarray(restore2, jnp.int32))
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-5, atol=1e-5)
  # Whereas sending a latent to the wrong patch does change the output.
  out3, _ = apply(variables, latent2, m.ids_restore)
  assert not np.allclose(np.asarray(out3), np.asarray(out), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------

def test_norm_pix_targets_are_standardised_per_patch():
  images = jnp.asarray(random_images((2, 16, 16, 3)) * 3.0 + 5.0)
  target = np.asarray(mae.patch_targets(images, 4, norm_pix=True))
  assert target.shape == (2, 16, 48)
  np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-5)
  # Unit variance with the unbiased (n - 1) estimator: MAE's loss calls torch's Tensor.var,
  # which is unbiased by default.
  np.testing.assert_allclose(target.var(-1, ddof=1), 1.0, atol=1e-4)
  raw = np.asarray(mae.patch_targets(images, 4, norm_pix=False))
  np.testing.assert_array_equal(raw, np.asarray(layers.patchify(images, 4)))
  # A flat patch has zero variance: the 1e-6 eps keeps it finite (all zeros).
  flat = np.asarray(mae.patch_targets(jnp.full((1, 4, 4, 3), 0.3), 4, norm_pix=True))
  np.testing.assert_allclose(flat, 0.0, atol=1e-3)


def test_masked_mse_counts_only_masked_patches():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 5))
  mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], np.float32)
  loss = float(mae.masked_mse(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                              jnp.asarray(mask)))
  per_patch = ((pred - target) ** 2).mean(-1)
  assert loss == pytest.approx(per_patch[mask == 1].mean(), rel=1e-5)
  # Any prediction at a visible patch leaves the loss unchanged; at a masked one it does not.
  changed = pred + 100.0 * (1 - mask)[..., None]
  assert float(mae.masked_mse(jnp.asarray(changed, jnp.float32), jnp.asarray(target, jnp.float32),
                              jnp.asarray(mask))) == pytest.approx(loss, rel=1e-6)
  changed = pred + 1.0 * mask[..., None]
  assert float(mae.masked_mse(jnp.asarray(changed, jnp.float32), jnp.asarray(target, jnp.float32),
                              jnp.asarray(mask))) != pytest.approx(loss, rel=1e-3)


def test_mae_loss_gradient_ignores_visible_predictions():
  """End to end: MAE's loss equals masked_mse of its own prediction, and has zero gradient
  w.r.t. the predictions at visible patches and non-zero gradient at every masked one."""
  model = methods.build(make_config())
  images = jnp.asarray(random_images((2, 16, 16, 3)))

  @jax.jit
  def run(images):
    params = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, images)
    mask_rng = {"mask": jax.random.key(1)}
    pred, mask = model.apply(params, images, rngs=mask_rng, method=model.predict)
    loss, _ = model.apply(params, images, rngs=mask_rng)
    loss_of_pred = lambda p: mae.masked_mse(p, mae.patch_targets(images, 4, True), mask.mask)
    return loss, loss_of_pred(pred), jax.grad(loss_of_pred)(pred), mask.mask

  loss, recomputed, grad, mask = jax.tree.map(np.asarray, run(images))
  assert float(loss) == pytest.approx(float(recomputed), rel=1e-6)
  grad = np.abs(grad).sum(-1)
  assert (grad[mask == 0] == 0).all() and (grad[mask == 1] > 0).all()
  assert mask.sum() == 2 * 12


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------

def _loss_fn(config, batch):
  model = methods.build(config)
  images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, 3), jnp.float32)
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x), rng,
                          images)["params"]
  loss = lambda p, x, r: model.apply({"params": p}, x, rngs={"mask": r})[0]
  return loss, (params, images, rng)


def test_analytic_flops_match_the_traced_matmuls():
  """Independent count: walk the jaxpr of the real forward and backward and add up every matmul.
  The forward matches train_flops_per_example / 3 exactly. Forward + backward is 3x forward
  minus one patch-embedding forward: the images need no gradient, so that one input-gradient
  matmul is never computed; the analytic 3x counts it (3.7% over for this config, 0.4% for
  MAE-B/16)."""
  config = make_config("variant=Mu/8,decoder=1x64,image_size=64")
  batch = 2
  loss, args = _loss_fn(config, batch)
  analytic = methods.train_flops_per_example(config)
  forward = flops.jaxpr_matmul_flops(jax.make_jaxpr(loss)(*args).jaxpr)
  assert forward * 3 == batch * analytic
  train = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(*args).jaxpr)
  size, patch = vit.parse_variant(config.model.variant)
  patch_embed = flops.dense((64 // patch) ** 2, patch * patch * 3, size.width)
  assert train == batch * (analytic - patch_embed)


def test_analytic_flops_agree_with_xla_cost_analysis():
  """XLA's count of the compiled forward is a little higher: it also counts the element-wise
  work (LayerNorm, softmax, GELU, residual adds, position embeddings, the per-patch target
  statistics and the loss), which the analytic count leaves out and which is O(tokens * width)
  against the matmuls' O(tokens * width^2). With tanh GELU it is about 4% over here; exact erf
  GELU expands into a polynomial of ~20 FLOPs per element and adds another ~10% at width 64."""
  config = make_config("variant=Mu/8,decoder=1x64,image_size=64", exact_gelu=False)
  batch = 2
  loss, args = _loss_fn(config, batch)
  xla = jax.jit(loss).lower(*args).compile().cost_analysis()["flops"]
  analytic_forward = batch * methods.train_flops_per_example(config) / flops.TRAIN_MULTIPLIER
  assert 1.0 <= xla / analytic_forward < 1.15, xla / analytic_forward


@pytest.mark.parametrize("variant,saving", [("B/16", 2.35), ("L/16", 3.23)])
def test_mae_flops_saving_from_visible_only_encoding(variant, saving):
  """DESIGN: skipping mask tokens in the encoder saves about 2.3x FLOPs for B/16 and 3.2x for
  L/16, and for MAE-B the 8x512 decoder is more than half the FLOPs. Check both against the
  analytic count, with the mask-token alternative counted by hand from flops.*."""
  config = make_config(f"variant={variant},decoder=8x512")
  size, patch = vit.parse_variant(variant)
  n, visible, patch_dim = 196, 1 + 49, patch * patch * 3
  mae_forward = methods.train_flops_per_example(config) / flops.TRAIN_MULTIPLIER
  decoder = (flops.dense(visible, size.width, 512) + flops.transformer(197, 512, 8, 2048)
             + flops.dense(197, 512, patch_dim))
  encoder = flops.dense(n, patch_dim, size.width) + flops.transformer(
      visible, size.width, size.depth, size.mlp_dim)
  assert encoder + decoder == mae_forward
  all_tokens = (flops.dense(n, patch_dim, size.width)
                + flops.transformer(197, size.width, size.depth, size.mlp_dim)
                + flops.dense(197, size.width, 512) + flops.transformer(197, 512, 8, 2048)
                + flops.dense(197, 512, patch_dim))
  assert all_tokens / mae_forward == pytest.approx(saving, abs=0.01)
  if variant == "B/16":
    assert 0.5 < decoder / mae_forward < 0.6  # 0.549


# ---------------------------------------------------------------------------------------------
# bf16 compute.
# ---------------------------------------------------------------------------------------------

def test_bf16_compute_keeps_f32_params_and_f32_loss():
  config = make_config(dtype="bfloat16", param_dtype="float32")
  model, model_f32 = methods.build(config), methods.build(make_config())
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}

  @jax.jit  # One compiled program: eager flax dispatches (and compiles) op by op.
  def run(images):
    params = model.init(rngs, images)["params"]
    mask_rng = {"mask": jax.random.key(1)}
    pred, _ = model.apply({"params": params}, images, rngs=mask_rng, method=model.predict)
    features = model.apply({"params": params}, images, method=model.features)
    loss_fn = lambda p, m: m.apply({"params": p}, images, rngs=mask_rng)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params, model)
    return params, pred, features["cls"], loss, loss_fn(params, model_f32), grads

  params, pred, cls, loss, f32_loss, grads = run(images)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert pred.dtype == jnp.bfloat16 and cls.dtype == jnp.bfloat16
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  # bf16 has an 8-bit mantissa: the loss is close to, but not the same as, the f32 loss.
  assert float(loss) == pytest.approx(float(f32_loss), rel=5e-2)
  assert float(loss) != float(f32_loss)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_cpu_friendly_gelu_and_attention_match_jax_reference():
  """layers.gelu and layers.dot_product_attention are rewritten for XLA CPU speed; the math
  must stay that of jax.nn.gelu(approximate=False) and jax.nn.dot_product_attention."""
  x = jax.random.normal(jax.random.key(0), (4096,)) * 4
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 3, 16)) for i in range(3))
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v),
                             jax.nn.dot_product_attention(q, k, v), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The one attention: bias and masks, key/value restriction, key padding, cuDNN.
# ---------------------------------------------------------------------------------------------

def test_attention_bias_and_mask_match_jax_reference():
  """Broadcast bias and mask of every shape the models use ([H, Nq, Nk], [B, 1, 1, Nk],
  [B, H, Nq, Nk]), against jax.nn.dot_product_attention; and extra leading batch dims (Swin's
  windows) give the same as the same rows folded into the batch."""
  b, nq, nk, h, hd = 2, 5, 7, 3, 8
  q = jax.random.normal(jax.random.key(0), (b, nq, h, hd))
  k, v = (jax.random.normal(jax.random.key(i), (b, nk, h, hd)) for i in (1, 2))
  bias = jax.random.normal(jax.random.key(3), (h, nq, nk))
  rng = np.random.default_rng(0)
  for mask in (rng.uniform(size=(b, 1, 1, nk)) < 0.6, rng.uniform(size=(b, h, nq, nk)) < 0.6):
    mask[..., 0] = True  # every query keeps a key
    got = jax.jit(lambda *a: layers.dot_product_attention(*a[:3], bias=a[3], mask=a[4]))(
        q, k, v, bias, mask)
    want = jax.nn.dot_product_attention(q, k, v, bias=jnp.broadcast_to(bias, (b, h, nq, nk)),
                                        mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, want, atol=1e-6)
    # A masked key's weight is exactly zero: changing its value changes nothing.
    if mask.shape[1] == 1:
      v2 = v.at[:, np.flatnonzero(~mask[0, 0, 0])].add(100.0)
      again = layers.dot_product_attention(q, k, v2, bias=bias, mask=mask)
      np.testing.assert_array_equal(np.asarray(again)[0], np.asarray(got)[0])
  windows = lambda x: x.reshape(1, b, *x.shape[1:])
  np.testing.assert_array_equal(
      layers.dot_product_attention(windows(q), windows(k), windows(v), bias=bias)[0],
      layers.dot_product_attention(q, k, v, bias=bias))


def test_cudnn_implementation_forwards_the_same_arguments(monkeypatch):
  """CPU JAX has no cuDNN, so check what 'cudnn' hands to jax.nn.dot_product_attention: the
  same q, k, v, bias and mask as the einsum path uses, with implementation='cudnn', and a result
  of the einsum path's shape."""
  calls = []

  def fake(q, k, v, *, bias=None, mask=None, implementation=None):
    calls.append((q.shape, k.shape, None if bias is None else bias.shape,
                  None if mask is None else mask.shape, implementation))
    return jnp.zeros(q.shape[:-1] + v.shape[-1:], v.dtype)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  x = jnp.asarray(random_images((2, 9, 16)))
  kv_ids = jnp.array([[0, 3, 5], [0, 8, 1]], jnp.int32)
  kv_mask = jnp.array([[True, True, False], [True, True, True]])
  attn = layers.Attention(2, implementation="cudnn")
  params = attn.init(jax.random.key(0), x)
  out = attn.apply(params, x, kv_ids, kv_mask)
  assert out.shape == (2, 9, 16)
  assert calls[-1] == ((2, 9, 2, 8), (2, 3, 2, 8), None, (2, 1, 1, 3), "cudnn")


def attention_params_and_reference(x: np.ndarray, heads: int):
  """A layers.Attention's parameters and a reference: full attention over all N tokens from
  the same fused qkv parameters (jax.nn.dot_product_attention) with a key mask [B, N]."""
  b, n, d = x.shape
  attn = layers.Attention(heads)
  params = jax.jit(attn.init)(jax.random.key(1), x)["params"]

  def reference(allowed):
    qkv = x @ params["qkv"]["kernel"] + params["qkv"]["bias"]
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, d // heads) for i in range(3))
    out = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(allowed)[:, None, None, :])
    return out.reshape(b, n, d) @ params["proj"]["kernel"] + params["proj"]["bias"]
  return attn, params, reference


def test_attention_without_options_is_a_plain_dense_qkv():
  """The plain path computes the qkv projection with nn.Dense(3d)'s bits (MAE parity with the
  official weights rests on it), and its parameters are nn.Dense(3d)'s, init included."""
  x = jnp.asarray(random_images((2, 9, 16)))
  qkv = layers.QKV()
  params = jax.jit(qkv.init)(jax.random.key(0), x)
  dense = nn.Dense(48, kernel_init=nn.initializers.xavier_uniform())
  dense_params = jax.jit(dense.init)(jax.random.key(0), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, dense_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dense_params)):
    np.testing.assert_array_equal(a, b)
  got = jnp.concatenate(jax.jit(qkv.apply)(params, x), axis=-1)
  np.testing.assert_array_equal(got, jax.jit(dense.apply)(params, x))


def test_attention_kv_ids_equals_full_attention_with_a_key_mask():
  """Brute force: keys and values gathered from kv_ids equal attention over every token with
  the others masked out; adding kv_mask leaves out the keys it marks False as well."""
  b, n, d, heads = 2, 9, 16, 2
  x = random_images((b, n, d))
  kv_ids = np.array([[0, 3, 5], [0, 8, 1]], np.int32)
  kv_mask = np.array([[True, False, True], [True, True, True]])
  attn, params, reference = attention_params_and_reference(x, heads)
  apply = jax.jit(lambda *a: attn.apply({"params": params}, x, *a))
  allowed = np.zeros((b, n), bool)
  np.put_along_axis(allowed, kv_ids, True, axis=1)
  got = apply(kv_ids, None)
  np.testing.assert_allclose(got, reference(allowed), atol=1e-5)
  assert np.abs(np.asarray(apply(None, None)) - np.asarray(got)).max() > 1e-2  # not full
  np.put_along_axis(allowed, kv_ids, kv_mask, axis=1)
  np.testing.assert_allclose(apply(kv_ids, kv_mask), reference(allowed), atol=1e-5)


def test_kv_mask_makes_padded_keys_irrelevant():
  """Sequences padded at the end to one length: the real tokens' outputs equal attention over
  the unpadded sequence, and whatever the padding holds changes none of them. A general mask
  combines with kv_mask (here a diagonal-free one)."""
  b, n, d, heads = 2, 8, 16, 2
  lengths = np.array([5, 8])
  x = random_images((b, n, d), seed=3)
  kv_mask = np.arange(n)[None] < lengths[:, None]
  attn, params, reference = attention_params_and_reference(x, heads)
  apply = jax.jit(lambda x, mask: attn.apply({"params": params}, x, None, kv_mask, mask))
  padded = apply(x, None)
  junk = np.where(kv_mask[..., None], x, 50.0 * random_images(x.shape, seed=4))
  np.testing.assert_array_equal(np.asarray(apply(junk, None))[kv_mask], np.asarray(padded)[kv_mask])
  short = attn.apply({"params": params}, x[:1, :5])
  np.testing.assert_allclose(np.asarray(padded)[0, :5], short[0], atol=1e-5)
  np.testing.assert_allclose(padded, reference(kv_mask), atol=1e-5)

  # Brute force, one query at a time: with a mask that hides each token from itself, query i
  # sees the real keys other than itself.
  got = apply(x, ~np.eye(n, dtype=bool)[None, None])
  for i in range(n):
    allowed = kv_mask.copy()
    allowed[:, i] = False
    np.testing.assert_allclose(np.asarray(got)[:, i], np.asarray(reference(allowed))[:, i],
                               atol=1e-5)


def test_stack_passes_the_restriction_to_every_block_also_rematerialised():
  """ViT's context_ids reach every layer: a context of all patches is full attention, and the
  remat stack gives the same tokens as the plain one."""
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  encoder = vit.ViT(32, 2, 2, 64, 4, posemb="none")
  variables = jax.jit(encoder.init)(jax.random.key(0), images)
  context = jnp.array([[2, 7, 9, 14], [0, 5, 10, 15]], jnp.int32)

  @jax.jit
  def run(variables, images):
    full, _ = encoder.apply(variables, images)
    everything, _ = encoder.apply(variables, images, context_ids=jnp.tile(jnp.arange(16), (2, 1)))
    restricted, _ = encoder.apply(variables, images, context_ids=context)
    remat, _ = encoder.clone(remat=True).apply(variables, images, context_ids=context)
    return full, everything, restricted, remat

  full, everything, restricted, remat = run(variables, images)
  np.testing.assert_allclose(everything, full, atol=1e-5)
  np.testing.assert_array_equal(remat, restricted)
  assert np.abs(np.asarray(restricted) - np.asarray(full)).max() > 1e-2


def test_a_given_matmul_peak_replaces_the_measurement(monkeypatch):
  """MIM_JAX_MATMUL_PEAK (a datasheet peak, or the test suite's one measurement) is returned as
  is; a value that is not a number is a clear error. (__wrapped__: past the per-process cache.)"""
  monkeypatch.setenv(flops.PEAK_ENV, "2.5e11")
  assert flops.matmul_peak.__wrapped__(jnp.float32) == 2.5e11
  monkeypatch.setenv(flops.PEAK_ENV, "fast")
  with pytest.raises(ValueError, match=r"MIM_JAX_MATMUL_PEAK='fast' is not a number of FLOP/s"):
    flops.matmul_peak.__wrapped__(jnp.float32)


def test_auto_attention_picks_cudnn_only_where_it_applies_and_logs_each_choice_once(caplog):
  """'auto' hands GPU bf16/fp16 plain attention of 4-D inputs with a head dim cuDNN's flash
  kernel takes to cuDNN, and everything else (CPU, float32, Swin's windows, biases and masks)
  to the XLA einsums; each choice on an accelerator is logged once, with its reason. (This host has no GPU: the
  GPU path itself runs in launch/gpu_bench.sh.)"""
  auto = layers.auto_attention
  layers._LOGGED_CHOICES.clear()  # pylint: disable=protected-access
  with caplog.at_level("INFO"):
    assert auto("gpu", jnp.bfloat16, 4, 64, False) == "cudnn"
    assert auto("gpu", jnp.float16, 4, 128, False) == "cudnn"
    assert auto("gpu", jnp.bfloat16, 4, 64, False) == "cudnn"  # logged once
    assert auto("cpu", jnp.bfloat16, 4, 64, False) == "xla"
    assert auto("gpu", jnp.float32, 4, 64, False) == "xla"
    assert auto("gpu", jnp.bfloat16, 5, 32, False) == "xla"   # Swin's [B, windows, N, H, hd]
    assert auto("gpu", jnp.bfloat16, 4, 160, False) == "xla"
    assert auto("gpu", jnp.bfloat16, 4, 64, True) == "xla"
  lines = [r.getMessage() for r in caplog.records if "attention_impl auto" in r.getMessage()]
  assert lines[0] == "attention_impl auto: cudnn (GPU, half precision, plain attention)"
  assert len(lines) == 5 and "xla (not for dtype float32)" in lines[1]  # none for the CPU
  assert "head dim 160" in lines[3] and "a bias or mask" in lines[4]
  # On this CPU, 'auto' is the XLA einsums: the same numbers as asking for them by name.
  q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 5, 2, 8)), jnp.float32)
             for i in range(3))
  np.testing.assert_array_equal(layers.dot_product_attention(q, k, v),
                                layers.dot_product_attention(q, k, v, implementation="xla"))
