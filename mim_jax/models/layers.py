"""Building blocks shared by the image transformers: the one attention function every model
calls, the dense/norm factories, patch embedding, fixed 2D sin-cos position embeddings, the
token embedding of ViT-like encoders (mask, position and cls tokens), pre-norm transformer
blocks and the patchify helpers used by losses and decoders.

It imports only jax, flax, numpy, absl logging and the bottom-floor registry (and its sibling
layer_loop.py): every model file builds on it.
"""

from typing import Any, Callable

import flax.linen as nn
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.models import layer_loop
from mim_jax.registry import Registry

Dtype = Any

# Config names of the compute/parameter dtypes and of the attention implementations
# (`dot_product_attention`'s `implementation`; 'auto' lets it choose, i.e. the einsums).
DTYPES = Registry("dtype", {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                            "float16": jnp.float16})
ATTENTION_IMPLS = Registry("attention_impl", {"auto": None, "xla": "xla", "cudnn": "cudnn"})
POSEMBS = ("sincos", "learned", "none")


def dtype(name: str) -> Dtype:
  """Config value ('float32', 'bfloat16', 'float16') -> jnp dtype."""
  return DTYPES[name]


def attention_impl(name: str) -> str | None:
  """Config value -> `dot_product_attention` implementation (None for 'auto')."""
  return ATTENTION_IMPLS[name]


def rows(x: jax.Array) -> jax.Array:
  """[..., d] -> [tokens, d], the 2-D operand every dense matmul here takes. The reshape is
  free (a bitcast), and it decides the form of the weight gradient. For an input of rank 3 or
  more, jax's gradient is one dot contracting two dims ([B, N] of x and of dy), and XLA's CPU
  backend runs it on a transposed copy of dy. On [B*N, d] rows it is one plain dot, with no
  copy."""
  return x.reshape(-1, x.shape[-1])


class Dense(nn.Dense):
  """nn.Dense (same parameters, same math) that runs its matmul on `rows` of the input.

  On the bench's MAE step (Ti/4, decoder 4x128, 32 px, batch 128; `make bench`) this removes
  67 of the compiled step's 132 copy fusions, one per dense layer, each a transpose of up to
  [8320, 512] floats. Measured in one process, against nn.Dense, interleaved over 10 rounds on
  a shared 2-core CPU: 1.085x less CPU time per step and 1.10x the throughput (medians of the
  paired ratios)."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return super().__call__(rows(inputs)).reshape(*inputs.shape[:-1], self.features)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, *, use_bias: bool = True,
          kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
          ) -> Dense:
  """`Dense` with a xavier-uniform kernel (MAE's and CRATE's init of every Linear) and a zero
  bias, unless `kernel_init` says otherwise (Swin's truncated normal)."""
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
               kernel_init=kernel_init, name=name)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, *, eps: float = 1e-6,
               use_bias: bool = True) -> nn.LayerNorm:
  """LayerNorm, eps 1e-6 as in ViT and MAE (PyTorch's default 1e-5 where a reference keeps it).
  Flax computes its statistics in float32 even when `dtype` is bf16."""
  return nn.LayerNorm(epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      name=name)


def sincos_posemb_2d(grid: tuple[int, int], dim: int, *, with_cls: bool = False) -> np.ndarray:
  """Fixed 2D sin-cos position embedding, shape [(1+)gh*gw, dim] (MAE, He et al. 2021, sec. A.1).

  The first half of the channels encodes the column (x), the second half the row (y): the
  order of MAE's released models, so imported weights see the positions they were trained with.
  Each half is [sin, cos] of the coordinate times frequencies 1/10000^(k/(dim/4)) as in
  "Attention is all you need". The cls token, when present, gets a zero embedding. Computed in
  numpy: it is a constant, not a param.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  gh, gw = grid
  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                           indexing="ij")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def encode(pos: np.ndarray) -> np.ndarray:
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  emb = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
  if with_cls:
    emb = np.concatenate([np.zeros((1, dim), np.float32), emb], axis=0)
  return emb


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order, pixels (py, px, c)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int], channels: int) -> jax.Array:
  """Inverse of `patchify`: [B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C]."""
  b = patches.shape[0]
  gh, gw = grid
  x = patches.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch, gw * patch, channels)


# How a patch embedding is initialised: (fan_in, fan_out) -> (kernel init, bias init), with
# fan_in = p*p*C and fan_out = D, the fans of the [D, p*p*C] linear map that the strided conv is.
# Flax's own fans for a 4-D [p, p, C, D] kernel fold the p*p receptive field into both, so its
# xavier_uniform() would take fan_out = p*p*D: at B/16 a kernel 11x smaller than MAE's.
Initializer = nn.initializers.Initializer
PatchInit = Callable[[int, int], tuple[Initializer, Initializer]]


def _symmetric_uniform(bound: float) -> Initializer:
  """U(-bound, bound)."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def xavier_patch_init(fan_in: int, fan_out: int) -> tuple[Initializer, Initializer]:
  """MAE's (models_mae.py, initialize_weights: xavier_uniform_ on the conv weight viewed as
  [D, p*p*C], "like nn.Linear"), which CRATE-MAE's code (crate_ae.py) copies: kernel
  U(+-sqrt(6 / (fan_in + fan_out))), zero bias."""
  return _symmetric_uniform((6 / (fan_in + fan_out)) ** 0.5), nn.initializers.zeros


def pytorch_patch_init(fan_in: int, fan_out: int) -> tuple[Initializer, Initializer]:
  """PyTorch's default for nn.Conv2d (reset_parameters: kaiming_uniform_ with a = sqrt(5) on the
  weight, the bias from the same fan_in), which Swin's PatchEmbed keeps (Swin-Transformer's and
  SimMIM's _init_weights touch only Linear and LayerNorm): kernel and bias U(+-1/sqrt(fan_in))."""
  del fan_out
  return _symmetric_uniform(fan_in ** -0.5), _symmetric_uniform(fan_in ** -0.5)


def truncated_normal_patch_init(fan_in: int, fan_out: int) -> tuple[Initializer, Initializer]:
  """CAE's (lxtGH/CAE, modeling_cae_helper.py, VisionTransformerEncoder._init_weights):
  trunc_normal_(std=0.02) on the conv weight, cut at +-1 std (its trunc_normal_ passes a=-std,
  b=std), zero bias; the outer model's re-init (xavier) touches only Linear and LayerNorm."""
  del fan_in, fan_out
  return nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0), nn.initializers.zeros


PATCH_INITS = Registry("patch_init", {"xavier": xavier_patch_init,
                                      "pytorch": pytorch_patch_init,
                                      "truncated_normal": truncated_normal_patch_init})


def patch_init(name: str) -> PatchInit:
  """Config value ('xavier', 'pytorch', 'truncated_normal') -> the patch embedding's init."""
  return PATCH_INITS[name]


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection, the strided conv of ViT written as patchify + matmul.

  The kernel keeps the conv layout [p, p, C, D] so released conv weights load by a transpose,
  but runs as one [B*N, p*p*C] x [p*p*C, D] matmul, which XLA's CPU backend runs faster than a
  strided convolution. `patch_init` is the reference's init (see PatchInit), MAE's by default.
  """
  patch: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  patch_init: PatchInit = xavier_patch_init

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = images.shape[-1]
    kernel_init, bias_init = self.patch_init(self.patch * self.patch * c, self.width)
    kernel = self.param("kernel", kernel_init, (self.patch, self.patch, c, self.width),
                        self.param_dtype)
    bias = self.param("bias", bias_init, (self.width,), self.param_dtype)
    x = patchify(images.astype(self.dtype), self.patch)
    w = kernel.reshape(-1, self.width).astype(self.dtype)
    return (rows(x) @ w + bias.astype(self.dtype)).reshape(*x.shape[:-1], self.width)


def embed_tokens(module: nn.Module, x: jax.Array, grid: tuple[int, int], posemb: str,
                 ids_keep: jax.Array | None = None, token_mask: jax.Array | None = None
                 ) -> jax.Array:
  """Patch embeddings [B, N, D] -> the tokens a ViT-like encoder (ViT, CRATE) runs on,
  [B, 1+N, D], or [B, 1+k, D] with ids_keep:
    token_mask [B, N] (1 = masked): masked patches are replaced by a learned 'mask_token';
    `posemb` (POSEMBS) is added to the patches: 'sincos' the fixed table, 'learned' a parameter
      'pos_embedding' initialised to it, 'none' nothing;
    ids_keep [B, k]: only these patches are kept, gathered after the position embedding, so each
      keeps its own;
    a learned 'cls' token is prepended, with no position embedding (MAE gives it a zero one).
  The parameters are created on `module` (the encoder), in this order, so they sit at its top
  level and initialise as they always have."""
  b, _, width = x.shape
  if token_mask is not None:
    m = token_mask[..., None].astype(module.dtype)
    x = x * (1 - m) + mask_token(module, width) * m
  if posemb == "sincos":
    x = x + jnp.asarray(sincos_posemb_2d(grid, width), module.dtype)[None]
  elif posemb == "learned":
    sincos = lambda _, shape, dtype: jnp.asarray(sincos_posemb_2d(grid, width)[None], dtype)
    pos = module.param("pos_embedding", sincos, (1, grid[0] * grid[1], width),
                       module.param_dtype)
    x = x + pos.astype(module.dtype)
  elif posemb != "none":
    raise ValueError(f"unknown posemb {posemb!r}; valid: {POSEMBS}")
  if ids_keep is not None:
    x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
  cls = module.param("cls", nn.initializers.normal(0.02), (1, 1, width), module.param_dtype)
  return jnp.concatenate([jnp.broadcast_to(cls.astype(module.dtype), (b, 1, width)), x], 1)


def mask_token(module: nn.Module, width: int) -> jax.Array:
  """`module`'s learned 'mask_token' [1, 1, width], normal(0.02) as in MAE, in its compute dtype."""
  token = module.param("mask_token", nn.initializers.normal(0.02), (1, 1, width),
                       module.param_dtype)
  return token.astype(module.dtype)


def insert_mask_tokens(x: jax.Array, token: jax.Array, ids_restore: jax.Array) -> jax.Array:
  """[B, 1+k, D] (cls, then the visible tokens in shuffled order) -> [B, 1+N, D] in patch order,
  with `token` [1, 1, D] at every masked position (MAE's decoder input)."""
  b, n = ids_restore.shape
  visible = x[:, 1:]
  fill = jnp.broadcast_to(token, (b, n - visible.shape[1], x.shape[-1]))
  # Visible tokens first, then mask tokens: this is the shuffled order, so one gather with
  # ids_restore puts every token back at its patch position.
  x_full = jnp.take_along_axis(jnp.concatenate([visible, fill], 1), ids_restore[..., None], 1)
  return jnp.concatenate([x[:, :1], x_full], 1)


_LOGGED_CHOICES: set[tuple[str, str]] = set()


def auto_attention(backend: str, dtype: Dtype, ndim: int, head_dim: int, restricted: bool
                   ) -> str:
  """model.attention_impl='auto': cuDNN's fused flash attention where it applies, else the XLA
  einsums. It applies on a GPU, for bf16 or fp16 inputs of [B, N, H, hd] with hd a multiple of
  8 up to 128 (the head sizes cuDNN's flash kernel takes) and no bias or mask (ViT's and MAE's
  attention; Swin's windows and padded speech keep XLA, whose masking is exact). On an
  accelerator, logs each choice once per process, with the reason (on a CPU it is always XLA,
  and the tools' one-line error output stays one line)."""
  reasons = [why for why, bad in (
      (f"backend {backend}", backend != "gpu"),
      (f"dtype {jnp.dtype(dtype).name}", jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)),
      (f"{ndim}-D inputs", ndim != 4),
      (f"head dim {head_dim}", head_dim % 8 or head_dim > 128),
      ("a bias or mask", restricted)) if bad]
  choice = "xla" if reasons else "cudnn"
  why = "not for " + ", ".join(reasons) if reasons else "GPU, half precision, plain attention"
  if backend != "cpu" and (choice, why) not in _LOGGED_CHOICES:
    _LOGGED_CHOICES.add((choice, why))
    logging.info("attention_impl auto: %s (%s)", choice, why)
  return choice


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          implementation: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim) + bias) v over the keys `mask` allows: the attention of
  every model here. q [B, Nq, H, hd], k and v [B, Nk, H, hd]; returns [B, Nq, H, hd].

  bias: additive logits, broadcastable to [B, H, Nq, Nk] (Swin's relative position bias).
  mask: bool, True where a query may attend to a key, broadcastable to [B, H, Nq, Nk] (key
    padding, Swin's shifted windows). A masked logit becomes the most negative float32, so its
    weight is exactly 0 (a query allowed no key at all would weigh every key equally).
  Logits and softmax are float32 whatever the input dtype. The einsums also take more leading
  batch dims ([B, windows, N, H, hd] and bias/mask broadcastable to [B, windows, H, Nq, Nk]).

  implementation: None ('auto') picks with `auto_attention`; 'xla' runs the einsums below, the math of
  `jax.nn.dot_product_attention(implementation='xla')` written so that XLA's CPU backend runs it
  faster: the scale multiplies q, where it fuses into the copy that lays q out for the batched
  matmul, instead of the [B, H, Nq, Nk] logits. 'cudnn' hands the same arguments to that
  function's fused flash kernel (GPU, bf16/fp16, 4-D inputs).
  """
  if implementation is None:
    implementation = auto_attention(jax.default_backend(), q.dtype, q.ndim, q.shape[-1],
                                    bias is not None or mask is not None)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def gelu(x: jax.Array, exact: bool = True) -> jax.Array:
  """GELU, x * Phi(x). Exact: Phi = 0.5 (1 + erf(x / sqrt 2)), PyTorch's formula. It is the
  function of `jax.nn.gelu(approximate=False)`, which writes Phi with erfc, which XLA's CPU
  backend evaluates at about twice the cost of erf. Not exact: the tanh approximation."""
  if not exact:
    return nn.gelu(x, approximate=True)
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


def _linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias with nn.Dense's dot_general, on `rows` of x as `Dense` runs it."""
  y = jax.lax.dot_general(rows(x), kernel, (((1,), (0,)), ((), ()))) + bias
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


class QKV(nn.Module):
  """The q, k, v projections, stored as one nn.Dense(3d) ('kernel' [d, 3d], xavier-uniform;
  'bias' [3d], zeros): the layout of the released ViT/MAE weights. Returns q [B, N, d] from every
  token of x [B, N, d], and k, v from every token, or with kv_ids [B, k] from those tokens only
  (kernel columns d:), so a restricted context costs k/N of the k/v projection."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    d = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * d), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (3 * d,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if kv_ids is None:  # one fused matmul
      q, k, v = jnp.split(_linear(x, kernel, bias), 3, axis=-1)
      return q, k, v
    context = jnp.take_along_axis(x, kv_ids[..., None], axis=1)
    k, v = jnp.split(_linear(context, kernel[:, d:], bias[d:]), 2, axis=-1)
    return _linear(x, kernel[:, :d], bias[:d]), k, v


class Attention(nn.Module):
  """Multi-head attention; every token is a query. Parameters 'qkv' (QKV) and 'proj'.

  Optional restrictions, all combinable:
    kv_ids [B, k]: keys and values come from these tokens only (MP3's context); the attention
      then costs N x k, not N x N;
    kv_mask [B, Nk] bool (Nk = k with kv_ids): False marks a padded key, which no query sees;
    mask [B or 1, H or 1, N, Nk] bool: a general mask, True where a query may attend to a key.
  `implementation`: see `dot_product_attention`.
  """
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None,
               kv_mask: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    b, n, d = x.shape
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads {self.heads}")
    q, k, v = QKV(self.dtype, self.param_dtype, name="qkv")(x, kv_ids)
    split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads)
    if kv_mask is not None:
      kv_mask = kv_mask[:, None, None, :]
      mask = kv_mask if mask is None else mask & kv_mask
    out = dot_product_attention(split(q), split(k), split(v), mask=mask,
                                implementation=self.implementation)
    return dense(d, "proj", self.dtype, self.param_dtype)(out.reshape(b, n, d))


class Mlp(nn.Module):
  """Two-layer GELU MLP. `exact_gelu` picks erf (the papers' PyTorch default) over tanh."""
  hidden: int
  exact_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x)
    return dense(x.shape[-1], "fc2", self.dtype, self.param_dtype)(gelu(y, self.exact_gelu))


def drops(rate: float | jax.Array) -> bool:
  """Whether stochastic depth at `rate` may drop: a rate above 0, or a traced one (a scanned
  layer's, models/layer_loop.py), which is known only inside the step."""
  return isinstance(rate, jax.Array) or rate > 0


def stochastic_depth(x: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth (Huang et al. 2016), per sample: each example's residual branch `x`
  [B, ...] is zeroed with probability `rate`, and kept ones are scaled by 1 / (1 - rate), so
  the expectation is `x`."""
  if not drops(rate):
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def layer_scale(module: nn.Module, name: str, init: float, x: jax.Array) -> jax.Array:
  """CaiT's LayerScale: x [..., D] times `module`'s learned per-channel parameter `name` [D],
  initialised to `init`; x itself (and no parameter) when init is 0."""
  if init <= 0:
    return x
  return module.param(name, nn.initializers.constant(init), (x.shape[-1],),
                      module.param_dtype) * x


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Norms as `layer_norm`. `drop_path` > 0 drops each residual branch per sample (stochastic
  depth, as in DeiT and MAE fine-tuning), drawing from the 'dropout' rng; 0 (the default, and
  what evaluation uses) is the plain block. It adds no parameters. `layer_scale` > 0 scales each
  branch by a learned per-channel 'gamma_1' / 'gamma_2' with that init (CaiT; CAE's decoder).
  kv_ids, kv_mask and mask restrict the attention (see `Attention`).
  """
  heads: int
  mlp_dim: int
  exact_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  drop_path: float | jax.Array = 0.0  # Traced when the blocks are scanned (layers.Stack).
  layer_scale: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None,
               kv_mask: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    norm = lambda name: layer_norm(name, self.dtype, self.param_dtype)

    def branch(name: str, y: jax.Array) -> jax.Array:
      y = layer_scale(self, name, self.layer_scale, y)
      if drops(self.drop_path):
        y = stochastic_depth(y, self.drop_path, self.make_rng("dropout"))
      return y

    attn = Attention(self.heads, self.dtype, self.param_dtype, self.attention_impl, name="attn")
    x = x + branch("gamma_1", attn(norm("norm1")(x), kv_ids, kv_mask, mask))
    mlp = Mlp(self.mlp_dim, self.exact_gelu, self.dtype, self.param_dtype, name="mlp")
    return x + branch("gamma_2", mlp(norm("norm2")(x)))


class Stack(nn.Module):
  """`depth` transformer blocks named block_0 .. block_{depth-1}, every one with the same
  attention restriction (kv_ids, kv_mask, mask; see `Attention`), rematerialised under the
  `remat` policy and unrolled or, with `scan_layers`, scanned (models/layer_loop.py: then the
  blocks' parameters are stored stacked, as 'stacked_blocks').

  Returns the output and a dict of every block's output, so evaluators can read any layer.
  Unused intermediates cost nothing under jit: XLA removes them.

  `drop_path` is the stochastic-depth rate of the last block; block i gets
  drop_path * i / (depth - 1), rising linearly from 0 (the DeiT/MAE schedule).
  """
  depth: int
  heads: int
  mlp_dim: int
  exact_gelu: bool = True
  remat: bool | str = "none"  # A layer_loop.REMAT_POLICIES name; True / False: 'full' / 'none'.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  drop_path: float = 0.0
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, kv_ids: jax.Array | None = None,
               kv_mask: jax.Array | None = None, mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    fields = dict(heads=self.heads, mlp_dim=self.mlp_dim, exact_gelu=self.exact_gelu,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  attention_impl=self.attention_impl)
    return layer_loop.run(self, Block, fields, self.depth, x, kv_ids, kv_mask, mask,
                          scan=self.scan_layers, remat_policy=self.remat,
                          drop_path=self.drop_path)
