"""Tests of CRATE (models/crate.py) and CRATE-MAE (methods/crate_mae.py): the layer formulas
against a direct numpy transcription of the papers' equations, parameter counts against the
papers' tables, the analytic FLOPs against the traced matmuls, a sharded step on 8 devices
against one device, and the loss falling on digits. Also MAE's `encoder_mask_tokens` option,
which CRATE-MAE runs on."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import crate_mae as crate_mae_config
from configs import mae_vit
from mim_jax import config_validation
from mim_jax import flops
from mim_jax import methods
from mim_jax import models
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax.data import pipeline
from mim_jax.models import crate
from test_sharding import assert_trees_close, mesh_of, to_host


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(config, image_size: int = 224):
  """The real init's parameter tree, traced only (nothing is allocated)."""
  model = methods.build(config)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, config.data.channels), jnp.float32)
  return jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x),
                        jax.random.key(0), images)["params"]


# ---------------------------------------------------------------------------------------------
# Layer math: the modules against the papers' formulas, written out in float64 numpy.
# ---------------------------------------------------------------------------------------------

def ref_layer_norm(x, p, eps=crate.LAYER_NORM_EPS):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_mssa(z, p, heads):
  """Yu et al.'s MSSA: per head k, SSA(z | U_k) = (U_k^T z) softmax((U_k^T z)^T (U_k^T z)
  / sqrt(p)), heads concatenated, then the output projection. Tokens are rows here, so U_k^T z
  is z @ U_k with U_k the k-th column block of the (bias-free) projection."""
  u = p["u"]["kernel"]
  dh = u.shape[1] // heads
  outs = []
  for k in range(heads):
    w = z @ u[:, k * dh:(k + 1) * dh]                      # [B, N, dh]
    logits = w @ np.swapaxes(w, -1, -2) / np.sqrt(dh)      # [B, N, N]
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    outs.append(attn @ w)
  return np.concatenate(outs, -1) @ p["proj"]["kernel"] + p["proj"]["bias"]


def ref_ista(z, d, eta, lam):
  """Yu et al.'s ISTA block in the released code's form:
  ReLU(z + eta (D^T z - D^T D z) - eta lambda).
  D is [out, in], so with row tokens D z is z @ D^T and D^T z is z @ D."""
  dz = z @ d.T
  return np.maximum(z + eta * (z @ d - dz @ d) - eta * lam, 0.0)


def randomise(params, seed):
  """Moves LayerNorm scales and biases off their (1, 0) init, so the test sees them used."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x, np.float64)
                      + (0.3 * rng.normal(size=x.shape) if x.ndim == 1 else 0.0), params)


def test_layers_match_the_papers_formulas():
  b, n, d, heads, eta, lam = 2, 7, 16, 4, 0.1, 0.5
  z = np.random.default_rng(0).normal(size=(b, n, d)).astype(np.float32)
  mods = {"mssa": crate.MSSA(heads), "ista": crate.ISTA(eta, lam),
          "layer": crate.CrateLayer(heads, eta, lam), "decoder": crate.CrateDecoderLayer(heads)}

  @jax.jit  # One compiled program for the four inits.
  def init(z):
    keys = jax.random.split(jax.random.key(0), len(mods))
    return {name: m.init(k, z)["params"] for (name, m), k in zip(mods.items(), keys)}

  params = randomise(jax.device_get(init(z)), 1)
  outputs = jax.jit(lambda p, z: {name: m.apply({"params": p[name]}, z)
                                  for name, m in mods.items()})(
                                      jax.tree.map(lambda x: x.astype(np.float32), params), z)
  z64 = z.astype(np.float64)

  # Shapes: one bias-free U per head (all heads in one [d, d] kernel), a biased output
  # projection, a square dictionary.
  p = params["layer"]
  assert set(p) == {"norm1", "mssa", "norm2", "ista"}
  assert set(p["mssa"]["u"]) == {"kernel"} and p["mssa"]["u"]["kernel"].shape == (d, d)
  assert set(p["mssa"]["proj"]) == {"kernel", "bias"}
  assert p["ista"]["dictionary"].shape == (d, d)

  want = {
      "mssa": ref_mssa(z64, params["mssa"], heads),
      "ista": ref_ista(z64, params["ista"]["dictionary"], eta, lam),
  }
  # z' = ISTA(LN(z + MSSA(LN(z)))): a residual around MSSA, none around ISTA.
  z_half = z64 + ref_mssa(ref_layer_norm(z64, p["norm1"]), p["mssa"], heads)
  want["layer"] = ref_ista(ref_layer_norm(z_half, p["norm2"]), p["ista"]["dictionary"], eta, lam)
  # Pai et al.: y = D LN(x), x' = y - MSSA(LN(y)).
  q = params["decoder"]
  y = ref_layer_norm(z64, q["norm1"]) @ q["dictionary"].T
  want["decoder"] = y - ref_mssa(ref_layer_norm(y, q["norm2"]), q["mssa"], heads)
  for name, value in want.items():
    np.testing.assert_allclose(outputs[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  # The ISTA output is a non-negative sparse code: the threshold eta * lambda zeroes entries.
  assert (outputs["layer"] >= 0).all() and 0.05 < (outputs["layer"] == 0).mean() < 0.95


def test_defaults_are_the_papers():
  """eta 0.1 and lambda 0.1 for CRATE (Yu et al.); lambda 0.5 in CRATE-MAE's encoder and
  a decoder as deep as the encoder with mask tokens through the encoder (Pai et al., and the
  released crate_ae code)."""
  assert crate.Crate.ista_eta == 0.1 and crate.Crate.ista_lambda == 0.1
  assert crate.ISTA.eta == 0.1 and crate.ISTA.lam == 0.1
  config = crate_mae_config.get_config("variant=base/16")
  assert (config.model.ista_eta, config.model.ista_lambda) == (0.1, 0.5)
  assert config.method.decoder_depth == 12 and config.method.encoder_mask_tokens is True
  assert (config.mask.name, config.mask.ratio) == ("random", 0.75)
  assert crate_mae_config.get_config("variant=large/16").method.decoder_depth == 24


# ---------------------------------------------------------------------------------------------
# Parameter counts, from the real init's parameter tree.
# ---------------------------------------------------------------------------------------------

# Yu et al. 2023, table 1: CRATE-T/S/B/L at 224 px, patch 16, with a learned position embedding
# and a 1000-way head, supervised CRATE's LN-linear-LN tokenizer.
CRATE_TABLE_1 = {"tiny": 6.09e6, "small": 13.12e6, "base": 22.80e6, "large": 77.64e6}


@pytest.mark.parametrize("size", list(CRATE_TABLE_1))
def test_crate_param_counts_match_the_paper(size):
  config = crate_mae_config.get_config(f"variant={size}/16,data=synthetic")
  config.model.patch_norm = True
  encoder = models.build_encoder(config)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  (out, aux), variables = jax.eval_shape(encoder.init_with_output, jax.random.key(0), images)
  width, depth = crate.SIZES[size].width, crate.SIZES[size].depth
  assert out.shape == (1, 197, width) and aux["cls"].shape == aux["gap"].shape == (1, width)
  assert sum(k.startswith("block_") for k in aux) == depth
  count = num_params(variables["params"])
  # Per layer: U, output projection (+ bias), D, two LayerNorms.
  assert count == (2 * 768 + 768 * width + width + 2 * width + width
                   + depth * (3 * width ** 2 + width + 4 * width) + 2 * width)
  # What our encoder lacks, a learned 197-token position embedding and the head's linear layer
  # (its LayerNorm is our final norm), recovers the published size.
  published = count + 197 * width + width * 1000 + 1000
  assert round(published / 1e4) == round(CRATE_TABLE_1[size] / 1e4), (size, published)


def test_crate_mae_base_is_about_30_percent_of_mae_base():
  """Pai et al.: CRATE-MAE-Base 44.6M, MAE-Base 143.8M ("~30%"). Their MAE-Base (the released
  crate_ae.py) has the ViT-B/16 encoder and a decoder of 8 blocks at width 768. Both released
  models also store the fixed sin-cos tables of encoder and decoder (2 x 197 x 768) as
  parameters, and CRATE-MAE defines a 768x768 decoder_embed its forward never uses; with those
  added our trees give exactly the published sizes."""
  crate_params = abstract_params(crate_mae_config.get_config("variant=base/16,data=synthetic"))
  mae_params = abstract_params(mae_vit.get_config("variant=B/16,decoder=8x768,data=synthetic"))
  crate_count, mae_count = num_params(crate_params), num_params(mae_params)
  assert (crate_count, mae_count) == (43_745_280, 143_533_824)
  assert num_params(crate_params["encoder"]) == 21_873_408
  sincos_tables = 2 * 197 * 768
  unused_decoder_embed = 768 * 768 + 768
  assert round((crate_count + sincos_tables + unused_decoder_embed) / 1e5) == 446
  assert round((mae_count + sincos_tables) / 1e5) == 1438
  assert crate_count / mae_count == pytest.approx(0.305, abs=1e-3)
  # Against an MAE decoder as deep as the encoder (12 blocks of 768), it is a quarter.
  mae_12 = num_params(abstract_params(
      mae_vit.get_config("variant=B/16,decoder=12x768,data=synthetic")))
  assert crate_count / mae_12 == pytest.approx(0.2545, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# FLOPs: the analytic count against every matmul of the traced program.
# ---------------------------------------------------------------------------------------------

def traced_matmul_flops(config, batch=2):
  model = methods.build(config)
  images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size,
                                 config.data.channels), jnp.float32)
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x), rng,
                          images)["params"]
  loss = lambda p, x, r: model.apply({"params": p}, x, rngs={"mask": r})[0]
  forward = flops.jaxpr_matmul_flops(jax.make_jaxpr(loss)(params, images, rng))
  train_step = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params, images, rng))
  return forward, train_step


@pytest.mark.parametrize("method,arg,mask_tokens", [
    ("crate_mae", "variant=micro/8,decoder_depth=3", True),
    ("crate_mae", "variant=micro/8,decoder_depth=3", False),
    ("mae", "variant=Mu/8,decoder=1x64", True),
], ids=["crate_mae", "crate_mae_visible_only", "mae_encoder_mask_tokens"])
def test_analytic_flops_match_the_traced_matmuls(method, arg, mask_tokens):
  """Forward: exactly the analytic count / 3. Forward + backward: 3x forward minus the
  patch embedding's input gradient, which is never computed (images need no gradient)."""
  module = crate_mae_config if method == "crate_mae" else mae_vit
  config = module.get_config(arg + ",image_size=64,data=synthetic")
  config.method.encoder_mask_tokens = mask_tokens
  batch = 2
  analytic = methods.train_flops_per_example(config)
  forward, train_step = traced_matmul_flops(config, batch)
  assert forward * flops.TRAIN_MULTIPLIER == batch * analytic
  width = 64
  assert train_step == batch * (analytic - flops.dense(64, 8 * 8 * 3, width))


def test_crate_mae_flops_at_base():
  """Per image at 224 px (forward): encoder on all 197 tokens, 12 decoder layers on 197."""
  config = crate_mae_config.get_config("variant=base/16,data=synthetic")
  forward = methods.train_flops_per_example(config) // flops.TRAIN_MULTIPLIER
  n, d = 197, 768
  encoder = 12 * (8 * n * d * d + 4 * n * n * d)
  decoder = 12 * (6 * n * d * d + 4 * n * n * d)
  assert forward == 2 * 196 * 768 * d + encoder + decoder + 2 * n * d * 768
  config.method.encoder_mask_tokens = False
  visible_only = methods.train_flops_per_example(config) // flops.TRAIN_MULTIPLIER
  assert forward / visible_only == pytest.approx(1.73, abs=0.01)  # the decoder dominates


# ---------------------------------------------------------------------------------------------
# Config validation and the two encoder modes.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("model.variant", "huge/16", "unknown CRATE variant 'huge/16'"),
    ("model.variant", "tiny16", "unknown CRATE variant 'tiny16'"),
    ("model.name", "vit", "CRATE-MAE needs model.name 'crate', got 'vit'"),
    ("method.decoder_depth", 0, "decoder_depth must be at least 1, got 0"),
    ("image_size", 30, "image_size 30 is not divisible by the patch size 4"),
    ("model.ista_eta", 0.0, "ista_eta must be > 0"),
    ("mask.name", "bogus", "unknown mask generator 'bogus'"),
])
def test_bad_config_names_the_value(field, value, message):
  config = crate_mae_config.get_config("runlocal")
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    methods.validate(config)


def test_runlocal_config_is_valid_and_unknown_args_are_refused():
  config_validation.validate(crate_mae_config.get_config("runlocal"))
  config_validation.validate(crate_mae_config.get_config("variant=base/16,data=tfds:imagenet2012"))
  with pytest.raises(ValueError, match="unknown config argument 'decoder'"):
    crate_mae_config.get_config("decoder=8x512")


@pytest.mark.parametrize("mask_tokens", [True, False], ids=["all_tokens", "visible_only"])
def test_encoder_modes_and_features(mask_tokens):
  """encoder_mask_tokens True (the paper's): the encoder owns the mask token and sees 1 + N
  tokens. False: it sees 1 + k, and the decoder inserts its own mask token. Either way
  features() encodes the whole image and offers cls and gap. Traced only."""
  config = crate_mae_config.get_config("variant=micro/4,image_size=16,data=synthetic")
  config.method.encoder_mask_tokens = mask_tokens
  model = methods.build(config)
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)

  def run(rng, images):
    params = model.init({"params": rng, "mask": rng}, images)["params"]
    loss, metrics = model.apply({"params": params}, images, rngs={"mask": rng})
    latent, _ = model.apply({"params": params}, images, rngs={"mask": rng},
                            method=lambda m, x: m.encoder(x, **encoder_args(m, x)))
    aux = model.apply({"params": params}, images, method=model.features)
    recon = model.apply({"params": params}, images, rngs={"mask": rng}, method=model.reconstruct)
    return params, loss, metrics, latent, aux, recon

  def encoder_args(m, x):
    mask = m.predict(x)[1]
    return {"token_mask": mask.mask} if mask_tokens else {"ids_keep": mask.ids_keep}

  params, loss, metrics, latent, aux, recon = jax.eval_shape(run, jax.random.key(0), images)
  owner, other = ("encoder", "decoder") if mask_tokens else ("decoder", "encoder")
  assert "mask_token" in params[owner] and "mask_token" not in params[other]
  assert loss.shape == () and set(metrics) == {"loss"}
  assert latent.shape == (2, 1 + (16 if mask_tokens else 4), 64)
  assert aux["cls"].shape == aux["gap"].shape == (2, 64) and aux["block_1"].shape == (2, 17, 64)
  assert {k: v.shape for k, v in recon.items()} == {k: (2, 16, 16, 3) for k in
                                                    ("masked", "prediction", "pasted")}


# ---------------------------------------------------------------------------------------------
# Training: 8 devices against 1, and the loss falling on digits.
# ---------------------------------------------------------------------------------------------

LR = 1e-3
TRAIN_STEPS = 16


def train_config():
  config = crate_mae_config.get_config("variant=micro/4,decoder_depth=1,image_size=16,"
                                       "batch_size=16,data=digits")
  config.total_steps = TRAIN_STEPS
  config.optim.warmup_steps = 0
  config.optim.base_lr = LR * 256 / config.batch_size  # peak lr 1e-3
  return config


@pytest.fixture(scope="module")
def digits_batches():
  iterator = pipeline.train_iterator(train_config())
  return [{"image": next(iterator)["image"]} for _ in range(TRAIN_STEPS)]


def run(mesh, batches):
  """Init on `mesh`, then one step per batch. Returns the initial params, the params after
  two steps, and every step's metrics."""
  config = train_config()
  model, tx = methods.build(config), optim.build(config)
  init_rng, step_rng = jax.random.split(jax.random.key(0))
  state, _, shardings = train.create_state(model, tx, config, mesh, init_rng)
  init_params = to_host(state.params)
  step = train.make_train_step(model, tx, shardings, mesh)
  metrics, after_two = [], None
  for i, batch in enumerate(batches):
    state, m = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)), step_rng)
    metrics.append(to_host(m))
    if i == 1:
      after_two = to_host(state.params)
  return init_params, after_two, metrics


@pytest.fixture(scope="module")
def eight_devices(digits_batches):
  assert jax.device_count() == 8, "tests/conftest.py must give this process 8 CPU devices"
  return run(mesh_of(jax.devices()), digits_batches)


def test_sharded_step_matches_one_device(digits_batches, eight_devices):
  init_8, params_8, metrics_8 = eight_devices
  init_1, params_1, metrics_1 = run(mesh_of(jax.devices()[:1]), digits_batches[:2])
  assert_trees_close(init_8, init_1, rtol=0, atol=0)
  for m8, m1 in zip(metrics_8[:2], metrics_1):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  # Tolerances as in tests/test_sharding.py: Adam's first steps follow sign(g), so elements whose
  # gradient is within rounding of zero may differ by a fraction of the lr.
  assert_trees_close(params_8, params_1, 1e-5, 1e-6, max_outliers=1e-4, outlier_atol=LR / 10)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(init_1),
                                                jax.tree.leaves(params_1))]
  assert min(moved) > LR  # Every parameter, the dictionaries included, was updated.


def test_loss_falls_on_digits(eight_devices):
  _, _, metrics = eight_devices
  losses = np.array([m["loss"] for m in metrics])
  assert np.isfinite(losses).all()
  assert losses[-4:].mean() < 0.8 * losses[:2].mean(), losses


def test_real_init_param_ratio_at_micro_size(eight_devices):
  """The ratio at a small size: CRATE-MAE micro/4 (encoder 2 layers of width 64, decoder 1),
  really initialised by the trainer, against MAE with a Mu/4 ViT (2 blocks of 64, MLP 256) and
  a 1x64 decoder (its init traced; test_models.py and test_sharding.py run it for real). A CRATE
  layer has 3 d^2 weights (U, output projection, D) where a ViT block has 12 d^2 (qkv,
  projection, a 4x MLP), so the ratio tends to 1/4 as the width grows."""
  crate_params = eight_devices[0]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(crate_params))
  assert (jax.tree.structure(crate_params)
          == jax.tree.structure(abstract_params(train_config(), 16)))
  mae_params = abstract_params(
      mae_vit.get_config("variant=Mu/4,decoder=1x64,image_size=16,data=digits"), 16)
  d, patch_dim = 64, 16
  crate_layer, vit_block = 3 * d * d + 5 * d, 12 * d * d + 13 * d
  embed = patch_dim * d + d
  head = 2 * d + d * patch_dim + patch_dim  # final norm and pixel prediction
  crate_count = num_params(crate_params)
  mae_count = num_params(mae_params)
  assert crate_count == embed + 2 * d + 3 * crate_layer + 2 * d + head  # cls and mask token
  assert mae_count == embed + d + 3 * vit_block + 2 * d + (d * d + d) + d + head
  assert crate_count / mae_count == pytest.approx(0.2575, abs=1e-3)
