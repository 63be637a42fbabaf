"""The Conformer encoder (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer for
Speech Recognition"), on log-mel frames with padding.

  subsampling: two 3x3 stride-2 convs (ReLU) over (time, mel), 4x fewer frames, then a linear
    to the width and dropout (the paper's fig. 1 "convolution subsampling, linear, dropout");
  block (macaron, paper eq. 1):  x + 1/2 FFN(x);  x + MHSA(x);  x + Conv(x);  x + 1/2 FFN(x);
    LayerNorm;
  FFN: LN, Linear(4d), swish, dropout, Linear(d), dropout (fig. 4);
  MHSA: LN, self-attention with Transformer-XL's relative sinusoidal positions (Dai et al.
    2019), dropout (fig. 3);
  Conv: LN, pointwise Linear(2d), GLU, depthwise 1-D conv, norm, swish, pointwise Linear(d),
    dropout (fig. 2).

Padding: `valid` [B, T] marks real frames. Padded frames are zeroed before every convolution
(the subsampling convs and the depthwise conv, the only places frames mix besides attention),
attention masks padded keys, and every block's output is zeroed there, so the outputs on valid
frames do not depend on how far a batch was padded. Frame t' after subsampling is valid iff
input frame 4t' is (`valid[:, ::4]`).

Departure from the paper: the conv module normalises with LayerNorm over channels (per frame)
instead of BatchNorm. BatchNorm's statistics would mix utterances and padded frames and need
mutable running statistics in the train state; LayerNorm ignores padding by construction and
has the same parameter count (a scale and a bias per channel; BatchNorm's running mean and
variance are buffers, not parameters). DESIGN.md asks for a padding-aware norm here.

The paper gives no initialisation: Linear layers are xavier-uniform with zero bias (every
model here), the convs PyTorch's default kaiming-uniform(a=sqrt 5), i.e. U(+-1/sqrt(fan_in)),
with zero bias, and the positional biases u, v normal(0.02) (Transformer-XL's init std).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.models import layer_loop
from mim_jax.models import layers

Dtype = Any
# PyTorch's Conv default, kaiming_uniform(a=sqrt(5)): variance 1/(3 fan_in), U(+-1/sqrt(fan_in)).
CONV_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
SUBSAMPLE_CONVS = 2  # each halves time (and, roughly, frequency): 4x in time.


@dataclasses.dataclass(frozen=True)
class ConformerSize:
  width: int
  depth: int
  heads: int
  conv_kernel: int


# S, M, L: the Conformer paper's table 1 (encoder dim, layers, heads; conv kernel 32 for all).
# Ti and Mu are not from the paper: Ti for a CPU run of a couple of minutes, Mu for unit tests.
SIZES = {
    "Mu": ConformerSize(32, 2, 2, 7),
    "Ti": ConformerSize(96, 4, 4, 15),
    "S": ConformerSize(144, 16, 4, 32),
    "M": ConformerSize(256, 16, 4, 32),
    "L": ConformerSize(512, 17, 8, 32),
}


def parse_variant(variant: str) -> ConformerSize:
  """'S' -> SIZES['S']. Raises ValueError naming the valid variants."""
  if variant not in SIZES:
    raise ValueError(f"unknown Conformer variant {variant!r}; valid: {sorted(SIZES)}")
  return SIZES[variant]


def subsampled_mels(num_mels: int) -> int:
  """Mel bins left after the subsampling convs: each is 3 wide, stride 2, unpadded (80 -> 19)."""
  for _ in range(SUBSAMPLE_CONVS):
    num_mels = (num_mels - 3) // 2 + 1
  return num_mels


def relative_posemb(length: int, dim: int) -> np.ndarray:
  """Sinusoidal embeddings [2 * length - 1, dim] of the relative distances i - j of a sequence
  of `length`, row p holding distance p - (length - 1): [sin, cos] of the distance times the
  frequencies 1 / 10000^(2k / dim), k < dim / 2 (Transformer-XL's R, "Attention is all you
  need"'s frequencies). A numpy constant."""
  if dim % 2:
    raise ValueError(f"relative position embeddings need an even width, got {dim}")
  distance = np.arange(-(length - 1), length, dtype=np.float64)
  angles = distance[:, None] / 10000 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def _zero_padded(x: jax.Array, valid: jax.Array) -> jax.Array:
  """x [B, T, ...] with frames where valid [B, T] is False set to 0."""
  return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


class Subsampling(nn.Module):
  """Two Conv2D (3x3, stride 2, `width` channels, ReLU) over (time, mel), then Linear(width).
  Time is padded by one frame each side, so T frames become ceil(T / 2), then ceil(T / 4);
  frequency is unpadded (80 mels -> 39 -> 19)."""
  width: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = feats.astype(self.dtype)[..., None]  # [B, T, M, 1]: one input channel
    for i in range(SUBSAMPLE_CONVS):
      x = _zero_padded(x, valid)
      x = nn.Conv(self.width, (3, 3), strides=(2, 2), padding=((1, 1), (0, 0)),
                  kernel_init=CONV_INIT, dtype=self.dtype, param_dtype=self.param_dtype,
                  name=f"conv_{i}")(x)
      valid = valid[:, ::2]
      x = _zero_padded(nn.relu(x), valid)
    b, t, f, c = x.shape
    x = layers.dense(self.width, "proj", self.dtype, self.param_dtype)(x.reshape(b, t, f * c))
    x = nn.Dropout(self.dropout, deterministic=self.dropout == 0)(x)
    return _zero_padded(x, valid), valid


class FeedForward(nn.Module):
  """LN, Linear(hidden), swish, dropout, Linear(d), dropout."""
  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    drop = nn.Dropout(self.dropout, deterministic=self.dropout == 0)
    y = layers.layer_norm("norm", self.dtype, self.param_dtype)(x)
    y = drop(nn.swish(layers.dense(self.hidden, "fc1", self.dtype, self.param_dtype)(y)))
    return drop(layers.dense(x.shape[-1], "fc2", self.dtype, self.param_dtype)(y))


class RelPosSelfAttention(nn.Module):
  """LN, multi-head self-attention with Transformer-XL relative positions, output projection,
  dropout. Parameters: 'qkv' (layers.QKV), 'pos' (bias-free Linear on the sinusoidal
  embeddings), 'pos_bias_u', 'pos_bias_v' [H, hd], 'proj'.

  The logit of query i and key j is ((q_i + u) . k_j + (q_i + v) . W R_{i-j}) / sqrt(hd)
  (Dai et al. 2019, sec. 3.3, terms (a)+(c) and (b)+(d)). The position term is computed against
  all 2T - 1 distances, [B, H, T, 2T - 1], then gathered by i - j into a [B, H, T, T] bias for
  `layers.dot_product_attention`, which scales only its q . k by 1 / sqrt(hd), so the bias
  carries its own scale.
  """
  heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    b, t, d = x.shape
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads {self.heads}")
    hd = d // self.heads
    y = layers.layer_norm("norm", self.dtype, self.param_dtype)(x)
    q, k, v = (z.reshape(b, t, self.heads, hd)
               for z in layers.QKV(self.dtype, self.param_dtype, name="qkv")(y))
    bias = lambda name: self.param(name, nn.initializers.normal(0.02), (self.heads, hd),
                                   self.param_dtype).astype(self.dtype)
    u, v_bias = bias("pos_bias_u"), bias("pos_bias_v")
    r = layers.dense(d, "pos", self.dtype, self.param_dtype, use_bias=False)(
        jnp.asarray(relative_posemb(t, d), self.dtype)).reshape(2 * t - 1, self.heads, hd)
    by_distance = jnp.einsum("bqhd,phd->bhqp", (q + v_bias) * jnp.asarray(hd ** -0.5, q.dtype),
                             r, preferred_element_type=jnp.float32)
    # Row p of r is distance p - (T - 1), so logit (i, j) reads column i - j + T - 1.
    rows = np.arange(t)[:, None]
    position = by_distance[:, :, rows, rows - rows.T + t - 1]
    out = layers.dot_product_attention(q + u, k, v, bias=position,
                                       mask=valid[:, None, None, :],
                                       implementation=self.attention_impl)
    out = layers.dense(d, "proj", self.dtype, self.param_dtype)(out.reshape(b, t, d))
    return nn.Dropout(self.dropout, deterministic=self.dropout == 0)(out)


class ConvModule(nn.Module):
  """LN, pointwise Linear(2d), GLU, depthwise conv (kernel `kernel`, SAME), LayerNorm (see the
  module docstring), swish, pointwise Linear(d), dropout. Padded frames are zeroed before the
  depthwise conv, the one place frames mix."""
  kernel: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    d = x.shape[-1]
    y = layers.layer_norm("norm", self.dtype, self.param_dtype)(x)
    content, gate = jnp.split(layers.dense(2 * d, "pointwise_1", self.dtype,
                                           self.param_dtype)(y), 2, axis=-1)
    y = _zero_padded(content * nn.sigmoid(gate), valid)
    y = nn.Conv(d, (self.kernel,), padding="SAME", feature_group_count=d,
                kernel_init=CONV_INIT, dtype=self.dtype, param_dtype=self.param_dtype,
                name="depthwise")(y)
    y = nn.swish(layers.layer_norm("conv_norm", self.dtype, self.param_dtype)(y))
    y = layers.dense(d, "pointwise_2", self.dtype, self.param_dtype)(y)
    return nn.Dropout(self.dropout, deterministic=self.dropout == 0)(y)


class ConformerBlock(nn.Module):
  """x + 1/2 FFN(x); x + MHSA(x); x + Conv(x); x + 1/2 FFN(x); LayerNorm; padded frames 0.
  `dropout` is the rate in force (0 at evaluation): it draws from the 'dropout' rng."""
  heads: int
  conv_kernel: int
  ff_mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    d = x.shape[-1]
    ffn = lambda name: FeedForward(self.ff_mult * d, self.dropout, self.dtype, self.param_dtype,
                                   name=name)
    x = x + 0.5 * ffn("ffn_1")(x)
    x = x + RelPosSelfAttention(self.heads, self.dropout, self.dtype, self.param_dtype,
                                self.attention_impl, name="attn")(x, valid)
    x = x + ConvModule(self.conv_kernel, self.dropout, self.dtype, self.param_dtype,
                       name="conv")(x, valid)
    x = x + 0.5 * ffn("ffn_2")(x)
    return _zero_padded(layers.layer_norm("norm", self.dtype, self.param_dtype)(x), valid)


class Conformer(nn.Module):
  """Conformer encoder: feats [B, T, M] and valid [B, T] (bool) -> (out [B, T', D], aux),
  T' = ceil(T / 4), padded frames of out 0.

  aux: 'block_i' (each block's output, [B, T', D]), 'valid' ([B, T'] bool) and 'gap' (the mean
  of out over valid frames, [B, D]). `dropout` (the paper's P_drop, 0.1) applies only with
  train=True and then draws from the 'dropout' rng.
  """
  width: int
  depth: int
  heads: int
  conv_kernel: int
  ff_mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat: bool | str = "none"  # layer_loop.REMAT_POLICIES; True / False: 'full' / 'none'.

  @nn.compact
  def __call__(self, feats: jax.Array, valid: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    rate = self.dropout if train else 0.0
    x, valid = Subsampling(self.width, rate, self.dtype, self.param_dtype,
                           name="subsampling")(feats, valid)
    block_cls = layer_loop.remat(ConformerBlock, self.remat)
    aux = {}
    for i in range(self.depth):
      x = block_cls(self.heads, self.conv_kernel, self.ff_mult, rate, self.dtype,
                    self.param_dtype, self.attention_impl, name=f"block_{i}")(x, valid)
      aux[f"block_{i}"] = x
    count = jnp.maximum(valid.sum(axis=1, keepdims=True), 1).astype(jnp.float32)
    aux["valid"] = valid
    aux["gap"] = (x.astype(jnp.float32).sum(axis=1) / count).astype(x.dtype)
    return x, aux


def build(config: ml_collections.ConfigDict) -> Conformer:
  """The Conformer of config.model: variant, dropout, dtype, param_dtype, attention_impl, remat."""
  m = config.model
  size = parse_variant(m.variant)
  return Conformer(size.width, size.depth, size.heads, size.conv_kernel, dropout=m.dropout,
                   dtype=layers.dtype(m.dtype), param_dtype=layers.dtype(m.param_dtype),
                   attention_impl=layers.attention_impl(m.attention_impl), remat=m.remat)
