"""Tests of the Conformer encoder (mim_jax/models/conformer.py): parameter counts against the
paper's table 1, the relative-position attention against a brute-force numpy version, padding
invariance, the analytic FLOPs against the traced program, and a jitted forward and gradient
with dropout."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim_jax import flops
from mim_jax import models
from mim_jax.models import conformer

MELS = 80


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def model_of(variant: str, **kwargs) -> conformer.Conformer:
  s = conformer.SIZES[variant]
  return conformer.Conformer(s.width, s.depth, s.heads, s.conv_kernel, **kwargs)


def random_feats(frames: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(frames, MELS)).astype(np.float32)


def random_params(module, *args, seed: int = 0):
  """Parameters of the right shapes filled with random numbers (norm scales near 1, the rest
  of a size that keeps activations O(1)), without compiling the module's init: its random
  initialisers take longer to compile than the model."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 25
    x = rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(fan_in)
    return x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x
  return jax.tree_util.tree_map_with_path(fill, shapes)


def padded_batch(utterances: list[np.ndarray], frames: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """[B, frames, M] features, each utterance followed by random garbage (not zeros), and the
  [B, frames] valid mask."""
  garbage = np.random.default_rng(seed).normal(size=(len(utterances), frames, MELS)) * 5
  feats = garbage.astype(np.float32)
  valid = np.zeros((len(utterances), frames), bool)
  for i, u in enumerate(utterances):
    feats[i, :len(u)], valid[i, :len(u)] = u, True
  return feats, valid


# ---------------------------------------------------------------------------------------------
# Parameter counts: the paper's table 1.
# ---------------------------------------------------------------------------------------------

def encoder_params(d: int, depth: int, kernel: int, mels: int = MELS, ff: int = 4) -> int:
  """The encoder's parameters by hand. Subsampling: conv 3x3x1xd and 3x3xdxd with biases, then
  the (19 d) -> d linear. Per block: two FFNs (LN 2d, d -> ff d -> d with biases), attention
  (LN, qkv 3d^2 + 3d, output d^2 + d, bias-free positional d^2, u and v 2d), conv module (LN,
  pointwise d -> 2d, depthwise K d + d, its norm 2d, pointwise d -> d) and the final LN."""
  f2 = conformer.subsampled_mels(mels)
  subsampling = (9 * d + d) + (9 * d * d + d) + (f2 * d * d + d)
  ffn = 2 * d + (d * ff * d + ff * d) + (ff * d * d + d)
  attention = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + d * d + 2 * d
  conv = 2 * d + (2 * d * d + 2 * d) + (kernel * d + d) + 2 * d + (d * d + d)
  return subsampling + depth * (2 * ffn + attention + conv + 2 * d)


# Table 1 counts the whole transducer: the encoder, a one-layer LSTM decoder of 320 / 640 / 640
# cells and a joint network, whose other sizes the paper does not give. This accounting matches
# all three totals: the 1k word-piece vocabulary of the paper's LibriSpeech setup (V = 1024),
# a 320-d token embedding into the LSTM, an LSTM with one bias per gate, and a 320-d joint
# (encoder and LSTM outputs each projected to 320 with a bias, tanh, then 320 -> V with a bias).
# The paper's one-decimal rounding leaves slack: other (embedding, joint) sizes also land within
# 1-2% (e.g. 128 and 640), so this pins the totals, not the paper's exact decoder.
VOCAB, EMBED, JOINT = 1024, 320, 320
PAPER = {"S": (320, 10.3e6), "M": (640, 30.7e6), "L": (640, 118.8e6)}


def decoder_and_joint_params(width: int, lstm: int) -> int:
  embedding = VOCAB * EMBED
  lstm_layer = 4 * lstm * (EMBED + lstm + 1)  # input, forget, cell and output gates
  joint = (width + 1) * JOINT + (lstm + 1) * JOINT + (JOINT + 1) * VOCAB
  return embedding + lstm_layer + joint


@pytest.mark.parametrize("variant", ["S", "M", "L"])
def test_param_counts_match_the_paper(variant):
  """Measured: S 10.32M (+0.18%), M 30.67M (-0.10%), L 118.35M (-0.38%)."""
  model = model_of(variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, MELS)),
                          jnp.ones((1, 16), bool))
  encoder = num_params(shapes)
  s = conformer.SIZES[variant]
  assert encoder == encoder_params(s.width, s.depth, s.conv_kernel)
  lstm, paper = PAPER[variant]
  total = encoder + decoder_and_joint_params(s.width, lstm)
  assert abs(total - paper) / paper < 0.01, (variant, total)


# ---------------------------------------------------------------------------------------------
# Relative-position attention against a brute-force version.
# ---------------------------------------------------------------------------------------------

def brute_force_attention(x: np.ndarray, valid: np.ndarray, p, heads: int) -> np.ndarray:
  """float64, one (query, key) pair at a time: logit = ((q_i + u) . k_j + (q_i + v) . (W R(i-j))
  ) / sqrt(hd), R(delta) = [sin(delta w_k), cos(delta w_k)], w_k = 10000^(-2k/d); padded keys
  excluded."""
  b, t, d = x.shape
  hd = d // heads
  f64 = lambda a: np.asarray(a, np.float64)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + 1e-6) * f64(p["norm"]["scale"]) + f64(p["norm"]["bias"])
  qkv = y @ f64(p["qkv"]["kernel"]) + f64(p["qkv"]["bias"])
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, heads, hd) for i in range(3))
  u, vb = f64(p["pos_bias_u"]), f64(p["pos_bias_v"])
  freqs = 10000.0 ** (-np.arange(0, d, 2) / d)
  out = np.zeros((b, t, heads, hd))
  for bi in range(b):
    for h in range(heads):
      for i in range(t):
        logits = np.full(t, -np.inf)
        for j in range(t):
          if not valid[bi, j]:
            continue
          r = np.concatenate([np.sin((i - j) * freqs), np.cos((i - j) * freqs)])
          rw = (r @ f64(p["pos"]["kernel"])).reshape(heads, hd)[h]
          logits[j] = ((q[bi, i, h] + u[h]) @ k[bi, j, h] + (q[bi, i, h] + vb[h]) @ rw)
        w = np.exp((logits - logits.max()) / np.sqrt(hd))
        out[bi, i, h] = (w / w.sum()) @ v[bi, :, h]
  return out.reshape(b, t, d) @ f64(p["proj"]["kernel"]) + f64(p["proj"]["bias"])


def test_relative_position_attention_matches_brute_force():
  b, t, d, heads = 2, 9, 16, 2
  x = np.random.default_rng(0).normal(size=(b, t, d)).astype(np.float32)
  valid = np.arange(t)[None] < np.array([[9], [6]])
  attn = conformer.RelPosSelfAttention(heads)
  params = random_params(attn, x, valid)
  got = np.asarray(attn.apply({"params": params}, x, valid))
  want = brute_force_attention(x.astype(np.float64), valid, params, heads)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Padding invariance and shapes.
# ---------------------------------------------------------------------------------------------

def test_padding_and_batch_mates_change_no_valid_output():
  """One 37-frame utterance at T = 40 and T = 64, each beside other utterances, with garbage
  in the padding: equal outputs on its ceil(37/4) = 10 valid frames, every block's and the
  pooled feature, within 1e-5 (the shapes change only XLA's order of summation)."""
  model = model_of("Mu")
  utt = random_feats(37, seed=1)
  feats_a, valid_a = padded_batch([utt, random_feats(23, seed=2)], 40, seed=3)
  feats_b, valid_b = padded_batch([random_feats(64, seed=4), utt], 64, seed=5)
  params = {"params": random_params(model, feats_a, valid_a)}
  apply = jax.jit(model.apply)
  out_a, aux_a = apply(params, feats_a, valid_a)
  out_b, aux_b = apply(params, feats_b, valid_b)
  assert out_a.shape == (2, 10, 32) and out_b.shape == (2, 16, 32)
  np.testing.assert_array_equal(aux_a["valid"], valid_a[:, ::4])
  np.testing.assert_array_equal(aux_b["valid"].sum(1), [16, 10])
  for name in ["block_0", "block_1"]:
    np.testing.assert_allclose(aux_a[name][0], aux_b[name][1, :10], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out_a[0], out_b[1, :10], rtol=0, atol=1e-5)
  np.testing.assert_allclose(aux_a["gap"][0], aux_b["gap"][1], rtol=0, atol=1e-5)
  np.testing.assert_allclose(aux_a["gap"][0], out_a[0].mean(0), rtol=0, atol=1e-6)
  assert not np.asarray(out_a)[~np.asarray(aux_a["valid"])].any()  # padded frames are 0


@pytest.mark.parametrize("frames", [1, 4, 5, 38])
def test_subsampling_is_ceil_t_over_4(frames):
  model = model_of("Mu")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, frames, MELS)),
                          jnp.ones((1, frames), bool))
  out = jax.eval_shape(model.apply, shapes, jnp.zeros((1, frames, MELS)),
                       jnp.ones((1, frames), bool))[0]
  assert out.shape == (1, -(-frames // 4), 32)
  proj = shapes["params"]["subsampling"]["proj"]["kernel"]
  assert proj.shape == (conformer.subsampled_mels(MELS) * 32, 32) == (19 * 32, 32)


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, frames", [("Mu", 37), ("Ti", 50)])
def test_analytic_flops_equal_the_traced_program(variant, frames):
  """Forward: exact at batch 1; in a batch the positional projection runs once
  (flops.conformer). Gradient: every matmul and conv costs its forward twice more (weight and
  input gradients), except the two whose input is no function of the parameters: the first
  conv (on the features) and the positional projections (of constant embeddings), which have
  no input gradient; the latter, once per batch, cost 2x their forward in all. Ti's kernel 15
  is wider than its 13 frames, so the padded-edge count is exercised."""
  s = conformer.SIZES[variant]
  model = model_of(variant)
  analytic = flops.conformer(frames, MELS, s.width, s.depth, s.heads, s.conv_kernel)
  n = -(-frames // 4)
  positional = s.depth * flops.dense(2 * n - 1, s.width, s.width)
  for batch in (1, 2):
    args = (jnp.zeros((batch, frames, MELS)), jnp.ones((batch, frames), bool))
    params = jax.eval_shape(model.init, jax.random.key(0), *args)
    traced = flops.jaxpr_matmul_flops(jax.make_jaxpr(model.apply)(params, *args))
    assert traced == batch * analytic - (batch - 1) * positional
  loss = lambda p: jnp.sum(model.apply(p, *args)[0])
  gradient = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params))
  first_conv = 2 * s.width * flops.conv_taps(frames, 3, 2, (1, 1)) * flops.conv_taps(
      MELS, 3, 2, (0, 0))
  assert gradient == batch * (flops.TRAIN_MULTIPLIER * analytic - first_conv) - (
      flops.TRAIN_MULTIPLIER * batch - 2) * positional


# ---------------------------------------------------------------------------------------------
# Training: a jitted gradient, dropout, remat.
# ---------------------------------------------------------------------------------------------

def test_jitted_gradient_is_finite_and_dropout_only_in_training():
  model = model_of("Mu", dropout=0.1)
  feats, valid = padded_batch([random_feats(30, 1), random_feats(21, 2)], 32)
  params = random_params(model, feats, valid)
  # A fixed random readout: a function of out that LayerNorm does not make constant (the sum
  # of squares of a normalised frame is).
  readout = np.random.default_rng(3).normal(size=(2, 8, 32)).astype(np.float32)

  def loss(p, model, rng):
    out, aux = model.apply({"params": p}, feats, valid, train=True, rngs={"dropout": rng})
    return jnp.sum(out * readout) / aux["valid"].sum()

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = grad(params, model, jax.random.key(1))
  assert np.isfinite(value)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(bool(np.any(g != 0)) for g in leaves) == len(leaves)  # every parameter learns
  _, remat_grads = grad(params, model.clone(remat=True), jax.random.key(1))
  for g, r in zip(leaves, jax.tree.leaves(remat_grads)):  # measured within 1.2e-6 of max |g|
    np.testing.assert_allclose(r, g, rtol=0, atol=1e-5 * np.abs(g).max())

  # Dropout: the same rng gives the same loss, another rng another. Evaluation draws no
  # dropout rng (it would fail without one) and differs from training.
  assert grad(params, model, jax.random.key(1))[0] == value
  assert grad(params, model, jax.random.key(2))[0] != value
  out, aux = jax.jit(model.apply)({"params": params}, feats, valid)
  assert jnp.sum(out * readout) / aux["valid"].sum() != value


# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------

def model_config(**overrides) -> ml_collections.ConfigDict:
  model = dict(name="conformer", variant="Ti", dropout=0.1, dtype="bfloat16",
               param_dtype="float32", attention_impl="auto", remat=True)
  return ml_collections.ConfigDict({"model": {**model, **overrides}})


def test_build_from_config():
  model = models.build_encoder(model_config())
  assert isinstance(model, conformer.Conformer)
  assert (model.width, model.depth, model.heads, model.conv_kernel) == (96, 4, 4, 15)
  assert (model.dropout, model.dtype, model.param_dtype, model.remat) == (
      0.1, jnp.bfloat16, jnp.float32, True)
  assert model.attention_impl is None
  with pytest.raises(ValueError, match=r"unknown Conformer variant 'XL'; valid: \['L', 'M', "):
    models.build_encoder(model_config(variant="XL"))
