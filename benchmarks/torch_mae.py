r"""The PyTorch peer of mim_jax's MAE train step: the same model, batch and mask ratio, timed in
eager mode and under torch.compile the way `python -m mim_jax.bench` times mim_jax's step.

  python -m benchmarks.torch_mae \
      --config=configs/mae_vit.py:variant=Ti/4,decoder=4x128,image_size=32,batch_size=128 \
      [--steps=20] [--warmup=5] [--modes=eager,compiled] [--serve]

`make bench` runs mim_jax's bench and this, one process per mode, on the same config argument,
in alternating rounds (`python -m benchmarks.compare`, through --serve), and ends with the
ratios of their throughputs. The sizes are read from that config file (ml_collections) and from
mim_jax's own variant table, so the two cannot drift apart: encoder variant, decoder depth and
width, heads, image size, channels, batch, mask ratio, norm-pix loss, exact or tanh GELU and
the AdamW hyper-parameters.

The model is written from the paper (He et al. 2021, "Masked Autoencoders Are Scalable Vision
Learners", sec. 3 and A.1), as a PyTorch user would write it today:
  - a ViT encoder on the visible patches only: strided-conv patch embedding plus fixed 2D
    sin-cos position embeddings, a random 75% of patches dropped (uniform noise, argsort, keep
    the lowest), a cls token, pre-norm blocks (LayerNorm eps 1e-6, multi-head attention through
    F.scaled_dot_product_attention, an MLP with exact GELU), a final LayerNorm;
  - a narrow decoder: a linear embedding, a shared mask token at every dropped position put
    back in patch order with the inverse permutation, its own sin-cos table, pre-norm blocks,
    LayerNorm and a linear pixel predictor;
  - the loss: mean squared error on the masked patches only, against per-patch normalised
    pixels (norm_pix_loss, table 1d; the variance unbiased, eps 1e-6, as MAE's code has it);
  - AdamW (table 8: betas (0.9, 0.95), weight decay 0.05 on everything but biases and norm
    parameters) at the config's peak learning rate; the schedule costs nothing and is left out.
Its parameter names are those of MAE's released checkpoints (timm's ViT naming), so
mim_jax.pretrained.load_params reads its state_dict as it reads an official .pth:
tests/test_bench.py checks that both compute the same loss and gradient norm on the same
parameters and mask, and the same loss again after one AdamW step.

Both modes run on the CPU with torch.set_num_threads(the cores this process may use, unless
--threads says otherwise), on a fixed standard-normal batch, a fresh mask every step, as
mim_jax.bench does (this model trains at the peak lr from the first step, where mim_jax's bench
follows the warmup: the losses printed differ, the work does not). Prints one JSON line
per mode: images_per_sec, step_ms, first_step_s (the untimed first step, which compiles under
torch.compile), loss, threads and torch's version. With --serve (one mode), it then times more
steps on request (mim_jax/timed_rounds.py).
"""

import dataclasses
import json
import os
import sys
import time
from typing import Callable

import ml_collections
import torch
from absl import app
from absl import flags
from ml_collections import config_flags
from torch import nn
from torch.nn import functional as F

from mim_jax import errors
from mim_jax import masking
from mim_jax import timed_rounds
from mim_jax.models import layers
from mim_jax.models import vit


MODES = ("eager", "compiled")
LN_EPS = 1e-6  # ViT's and MAE's LayerNorm epsilon (PyTorch's default is 1e-5).


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything of an MAE config that shapes the train step."""
  image_size: int
  channels: int
  patch: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  keep: int             # Visible patches per image.
  exact_gelu: bool
  norm_pix_loss: bool
  batch_size: int
  lr: float             # The peak learning rate: base_lr * batch_size / lr_batch_base.
  betas: tuple[float, float]
  weight_decay: float

  @property
  def side(self) -> int:
    return self.image_size // self.patch

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Sizes":
    """Raises ValueError, naming the value, for a config this peer does not implement."""
    m, method, o = config.model, config.method, config.optim
    # In this order: another method's config may lack the later fields.
    wanted = {"method.name": lambda: (method.name, "mae"), "model.name": lambda: (m.name, "vit"),
              "method.encoder_mask_tokens": lambda: (method.encoder_mask_tokens, False),
              "mask.name": lambda: (config.mask.name, "random"),
              "model.posemb": lambda: (m.posemb, "sincos"),
              "model.dtype": lambda: (m.dtype, "float32"),
              "optim.no_decay_tokens": lambda: (tuple(o.no_decay_tokens), ()),
              "optim.layer_decay": lambda: (o.layer_decay, 1.0),
              "optim.grad_clip_norm": lambda: (o.grad_clip_norm, 0.0)}
    for field, read in wanted.items():
      value, supported = read()
      if value != supported:
        raise ValueError(f"{field}={value!r}: the PyTorch MAE peer implements {supported!r} "
                         f"only (configs/mae_vit.py's default)")
    size, patch = vit.parse_variant(m.variant)
    side = config.image_size // patch
    return cls(config.image_size, config.data.channels, patch, size.width, size.depth,
               size.heads, size.mlp_dim, method.decoder_width, method.decoder_depth,
               method.decoder_heads, masking.num_visible(side * side, config.mask.ratio),
               m.exact_gelu, method.norm_pix_loss, config.batch_size,
               o.base_lr * config.batch_size / o.lr_batch_base, (o.b1, o.b2), o.weight_decay)


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------

def xavier_linear(d_in: int, d_out: int) -> nn.Linear:
  """MAE initialises every Linear xavier-uniform with a zero bias."""
  linear = nn.Linear(d_in, d_out)
  nn.init.xavier_uniform_(linear.weight)
  nn.init.zeros_(linear.bias)
  return linear


class Attention(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = xavier_linear(width, 3 * width)
    self.proj = xavier_linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, width: int, hidden: int, exact_gelu: bool):
    super().__init__()
    self.fc1, self.fc2 = xavier_linear(width, hidden), xavier_linear(hidden, width)
    self.approximate = "none" if exact_gelu else "tanh"

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, width: int, heads: int, hidden: int, exact_gelu: bool):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(width, eps=LN_EPS), nn.LayerNorm(width, eps=LN_EPS)
    self.attn, self.mlp = Attention(width, heads), Mlp(width, hidden, exact_gelu)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, channels: int, width: int, patch: int):
    super().__init__()
    self.proj = nn.Conv2d(channels, width, patch, stride=patch)
    # Xavier-uniform on the kernel viewed as the [width, p*p*C] linear map it is (MAE).
    nn.init.xavier_uniform_(self.proj.weight.view(width, -1))
    nn.init.zeros_(self.proj.bias)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    return self.proj(images).flatten(2).transpose(1, 2)  # [B, N, D], patches row-major


def _posemb(side: int, width: int) -> torch.Tensor:
  """The fixed sin-cos table [1, 1 + N, width], with the zero row of the cls token: the
  constant mim_jax adds, so both models see the same positions."""
  return torch.from_numpy(layers.sincos_posemb_2d((side, side), width, with_cls=True))[None]


class MAE(nn.Module):
  """forward(images [B, C, H, W], noise [B, N]) -> the loss; `noise` orders the patches, the
  `keep` lowest stay visible."""

  def __init__(self, s: Sizes):
    super().__init__()
    self.s = s
    blocks = lambda width, heads, hidden, depth: nn.ModuleList(
        Block(width, heads, hidden, s.exact_gelu) for _ in range(depth))
    self.patch_embed = PatchEmbed(s.channels, s.width, s.patch)
    self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, s.width))
    self.register_buffer("pos_embed", _posemb(s.side, s.width))
    self.blocks = blocks(s.width, s.heads, s.mlp_dim, s.depth)
    self.norm = nn.LayerNorm(s.width, eps=LN_EPS)
    self.decoder_embed = xavier_linear(s.width, s.decoder_width)
    self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, s.decoder_width))
    self.register_buffer("decoder_pos_embed", _posemb(s.side, s.decoder_width))
    self.decoder_blocks = blocks(s.decoder_width, s.decoder_heads, 4 * s.decoder_width,
                                 s.decoder_depth)
    self.decoder_norm = nn.LayerNorm(s.decoder_width, eps=LN_EPS)
    self.decoder_pred = xavier_linear(s.decoder_width, s.patch * s.patch * s.channels)

  def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    b, keep = images.shape[0], self.s.keep
    order = noise.argsort(1)        # the shuffle; its first `keep` patches stay visible
    restore = order.argsort(1)      # the inverse permutation
    x = self.patch_embed(images) + self.pos_embed[:, 1:]
    x = x.gather(1, order[:, :keep, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
    for block in self.blocks:
      x = block(x)
    x = self.decoder_embed(self.norm(x))
    fill = self.mask_token.expand(b, restore.shape[1] - keep, -1)
    patches = torch.cat([x[:, 1:], fill], 1).gather(
        1, restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], patches], 1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    masked = (restore >= keep).to(pred.dtype)
    per_patch = ((pred - self.targets(images)) ** 2).mean(-1)
    return (per_patch * masked).sum() / masked.sum()

  def targets(self, images: torch.Tensor) -> torch.Tensor:
    """[B, N, p*p*C] pixels per patch, (row, column, channel) inside a patch, normalised per
    patch with norm_pix_loss."""
    b, c, _, _ = images.shape
    p, side = self.s.patch, self.s.side
    t = images.reshape(b, c, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(b, side ** 2, -1)
    if self.s.norm_pix_loss:
      t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    return t


def adamw(model: nn.Module, s: Sizes) -> torch.optim.AdamW:
  """AdamW decaying all but biases and norm parameters (the 1-D ones), as MAE does."""
  params = list(model.parameters())
  groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": s.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------

def time_mode(s: Sizes, mode: str, steps: int, warmup: int
              ) -> tuple[dict[str, float], Callable[[int], torch.Tensor]]:
  """Trains a fresh model (seed 0) on a fixed batch: one untimed first step (compilation under
  torch.compile), `warmup` untimed steps, then `steps` timed ones. Returns the figures, and a
  function that runs more steps (what --serve times)."""
  torch.manual_seed(0)
  model = MAE(s)
  opt = adamw(model, s)
  forward, update = model, opt.step
  if mode == "compiled":
    # The model (forward, and its backward through AOTAutograd) and the optimizer step, each
    # compiled once; the backward call itself stays eager, as torch.compile leaves it.
    forward, update = torch.compile(model), torch.compile(opt.step)
  images = torch.randn(s.batch_size, s.channels, s.image_size, s.image_size)

  def step() -> torch.Tensor:
    loss = forward(images, torch.rand(s.batch_size, s.side * s.side))
    loss.backward()
    update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  def run_steps(count: int) -> torch.Tensor:
    for _ in range(count):
      loss = step()
    return loss

  start = time.perf_counter()
  step()
  first_step_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  start = time.perf_counter()
  loss = run_steps(steps)
  step_s = (time.perf_counter() - start) / steps
  return {"images_per_sec": round(s.batch_size / step_s, 2), "step_ms": round(1e3 * step_s, 2),
          "first_step_s": round(first_step_s, 2), "loss": loss.item()}, run_steps


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bad := [m for m in flags.FLAGS.modes if m not in MODES]:
    raise ValueError(f"--modes: unknown {bad}; valid: {', '.join(MODES)}")
  if flags.FLAGS.serve and len(flags.FLAGS.modes) != 1:
    raise ValueError(f"--serve times one mode per process; got --modes="
                     f"{','.join(flags.FLAGS.modes)}")
  sizes = Sizes.from_config(flags.FLAGS.config)
  threads = flags.FLAGS.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  config_arg = next((a.partition(":")[2] for a in sys.argv if a.startswith("--config=")), "")
  for mode in flags.FLAGS.modes:
    row, run_steps = time_mode(sizes, mode, flags.FLAGS.steps, flags.FLAGS.warmup)
    print(json.dumps({"impl": "torch", "mode": mode, "config": config_arg,
                      "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
                      "torch": torch.__version__, "threads": threads, **row}), flush=True)
  if flags.FLAGS.serve:
    timed_rounds.serve(run_steps)


if __name__ == "__main__":
  # Defined here, not at import, so importing this module next to other tools that define
  # --config (tests, the notebook) does not clash with their flags.
  config_flags.DEFINE_config_file("config", None, "An MAE config, e.g. "
                                  "configs/mae_vit.py:variant=Ti/4.", lock_config=True)
  flags.DEFINE_integer("steps", 20, "Timed steps per mode.")
  flags.DEFINE_integer("warmup", 5, "Untimed steps after the first (compiling) one.")
  flags.DEFINE_list("modes", "eager,compiled", "Any of: eager, compiled.")
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads; 0 = the cores this process "
                       "may use. On a busy machine 1 may time better: torch's OpenMP "
                       "threads wait for each other at every op.")
  flags.DEFINE_bool("serve", False, "After the JSON line, time more steps of the one mode "
                    "on request, one count per line of stdin (mim_jax/timed_rounds.py; "
                    "benchmarks/compare.py drives it).")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=errors.parse_flags)
