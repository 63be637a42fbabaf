"""Pretrained parameters from outside the current run, as numpy trees that fit a config's model.

`load_params(source, config)` returns the method's full parameter tree and
`load_encoder_params(source, config)` the tree under 'encoder'. A source is one of:
  - a mim_jax workdir: the params of the newest committed checkpoint in <workdir>/checkpoints
    (only the params are read: no optimizer state, data iterator or device mesh is needed);
  - an official MAE PyTorch checkpoint (`.pth`, facebookresearch/mae, timm-style names), the
    encoder-only release or the full one with the decoder, read without torch (mim_jax/pth.py);
  - an `.npz` written by `python -m mim_jax.tools.export` (flat '/'-joined names).

Whatever the source, and whichever layer layout it has (a workdir of a run with scanned layers
holds them stacked: mim_jax/layer_layout.py), the result is in the layout of the model the config
builds, checked name by name and shape by shape against it (in the unrolled layout's names), and
a mismatch raises `checkpoint.CheckpointMismatchError` listing the missing, unexpected and
mis-shaped names. Position embeddings are fitted to the config's patch grid:
a learned table (`model.posemb='learned'`) is resampled bicubically when the checkpoint's grid
differs (fine-tuning at another resolution), and fixed sin-cos ones are recomputed.
"""

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mim_jax import checkpoint
from mim_jax import layer_layout
from mim_jax import methods
from mim_jax import models
from mim_jax import pth
from mim_jax import tree_paths
from mim_jax.models import layers

ENCODER_POSEMB = "encoder/pos_embedding"  # The learned table of ViT(posemb='learned'), [1, N, D].


# ---------------------------------------------------------------------------------------------
# Public interface.
# ---------------------------------------------------------------------------------------------

def load_params(source: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The full parameter tree of `methods.build(config)` as numpy arrays, read from `source`
  (a workdir, an MAE `.pth` or an exported `.npz`). Raises CheckpointMismatchError when the
  source does not hold exactly the model's parameters."""
  return tree_paths.unflatten(_load(source, config, encoder_only=False))


def load_encoder_params(source: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The tree under 'encoder' of `load_params`. Sources without a decoder (MAE's encoder-only
  release, an encoder export) load here; anything outside the encoder in the source is ignored."""
  return tree_paths.unflatten(_load(source, config, encoder_only=True))["encoder"]


def expected_shapes(config: ml_collections.ConfigDict, *, encoder_only: bool = False
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """{'encoder/blocks/block_0/attn/qkv/kernel': ShapeDtypeStruct, ...} of the config's method
  (with `encoder_only`, of its encoder alone, built by `models.build_encoder`, so a fine-tuning
  config without a method works too), computed with `jax.eval_shape`: nothing is allocated.
  A speech encoder's shapes are read off its method's (the encoder has no image input)."""
  rngs = lambda rng: {"params": rng, "mask": rng, "dropout": rng}
  if encoder_only and _is_image(config):
    images = jax.ShapeDtypeStruct(
        (1, config.image_size, config.image_size, config.data.channels), jnp.float32)
    encoder = models.build_encoder(config)
    init = lambda rng, images: {"encoder": encoder.init(rngs(rng), images)["params"]}
    return tree_paths.flatten(jax.eval_shape(init, jax.random.key(0), images))
  model = methods.build(config)
  flat = tree_paths.flatten(jax.eval_shape(lambda rng: methods.init_params(model, config, rng),
                                           jax.random.key(0)))
  return {k: v for k, v in flat.items() if k.startswith("encoder/") or not encoder_only}


def _is_image(config: ml_collections.ConfigDict) -> bool:
  return config.data.get("modality", "image") == "image"


def resample_posemb(table: np.ndarray, new_grid: tuple[int, int],
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """Resamples a position-embedding table [N, D] (or [1, N, D]) laid out row-major on
  `old_grid` (default: square) to `new_grid`, bicubically, as when fine-tuning at another
  resolution. Sample points are patch centres over the same image extent (half-pixel centres),
  so the interior reproduces any table that is linear in position exactly; near the border
  the cubic kernel is renormalised over the grid (jax.image.resize), which is not exact there.
  Downsampling is antialiased."""
  squeeze = table.ndim == 2
  t = np.asarray(table)[None] if squeeze else np.asarray(table)
  n, d = t.shape[1:]
  if old_grid is None:
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise ValueError(f"a table of {n} positions is not a square grid; pass old_grid")
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f"old_grid {old_grid} does not hold the table's {n} positions")
  if tuple(old_grid) == tuple(new_grid):
    return np.array(table)
  grid = t.reshape(old_grid[0], old_grid[1], d).astype(np.float32)
  out = np.asarray(jax.image.resize(grid, (*new_grid, d), "bicubic"))
  out = out.reshape(1, new_grid[0] * new_grid[1], d).astype(t.dtype)
  return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# Loading and checking.
# ---------------------------------------------------------------------------------------------

def _load(source: str, config: ml_collections.ConfigDict, *, encoder_only: bool
          ) -> dict[str, np.ndarray]:
  source = str(source)  # Also a pathlib.Path.
  check_source(source)
  # Sources are read, checked and named in the unrolled layer layout; the result is returned
  # in the config's (scanned layers stacked: mim_jax/layer_layout.py).
  layout = expected_shapes(config, encoder_only=encoder_only)
  expected = _unrolled(layout)
  encoder = models.build_encoder(config)
  # The patch grid, for position tables (a speech encoder has none).
  grid = ((config.image_size // encoder.patch,) * 2) if _is_image(config) else None
  if epath.Path(source).is_dir():
    flat, origin = _unrolled(_read_workdir(source)), f"the workdir {source}"
    flat = _fit_learned_posemb(flat, flat.pop(ENCODER_POSEMB, None), expected, grid)
  elif source.endswith(".npz"):
    flat, origin = _unrolled(_read_npz(source)), f"the export {source}"
    flat = _fit_learned_posemb(flat, flat.pop(ENCODER_POSEMB, None), expected, grid)
  else:  # .pth / .pt: check_source admits no other kind
    flat = _read_mae_pth(source, expected, grid, getattr(encoder, "posemb", "sincos"))
    origin = f"the MAE checkpoint {source}"
  if encoder_only:
    # The rest of a pretraining model, and the encoder's mask token (SimMIM-style methods use
    # it only to pretrain), are not part of the encoder.
    flat = {k: v for k, v in flat.items()
            if k.startswith("encoder/") and (k in expected or k != "encoder/mask_token")}
  _check(flat, expected, origin, config, encoder_only)
  flat = tree_paths.unflatten({k: np.asarray(v, dtype=expected[k].dtype) for k, v in flat.items()})
  return tree_paths.flatten(layer_layout.stack_blocks(flat, layout))


def _unrolled(flat: dict[str, Any]) -> dict[str, Any]:
  """Flat parameters (or shapes) in the unrolled layer layout."""
  return tree_paths.flatten(layer_layout.unstack_blocks(tree_paths.unflatten(flat)))


def _check(flat: dict[str, np.ndarray], expected: dict[str, Any], origin: str,
           config: ml_collections.ConfigDict, encoder_only: bool) -> None:
  saved = {k: list(np.shape(v)) for k, v in flat.items()}
  current = {k: list(v.shape) for k, v in expected.items()}
  if saved == current:
    return
  hints = []
  missing = set(current) - set(saved)
  if not encoder_only and missing and all(k.startswith("decoder/") for k in missing):
    hints.append("it holds no decoder (an encoder-only checkpoint?): load_encoder_params "
                 "reads just the encoder")
  if ENCODER_POSEMB in saved and ENCODER_POSEMB not in current:
    hints.append("it has learned position embeddings: set model.posemb='learned' to use them")
  at = f" at {config.image_size} px" if _is_image(config) else ""
  raise checkpoint.CheckpointMismatchError(
      f"{origin} does not fit the model of this config ({config.model.name} "
      f"{config.model.variant}{at}): "
      f"{checkpoint.describe_mismatch(saved, current)}"
      + "".join(f". Hint: {h}" for h in hints))


def _square_grid(num_positions: int, what: str) -> tuple[int, int]:
  side = int(round(np.sqrt(num_positions)))
  if side * side != num_positions:
    raise checkpoint.CheckpointMismatchError(
        f"{what} has {num_positions} positions, not a square patch grid")
  return (side, side)


def _fit_learned_posemb(flat: dict[str, np.ndarray], table: np.ndarray | None,
                        expected: dict[str, Any], grid: tuple[int, int]
                        ) -> dict[str, np.ndarray]:
  """Puts the encoder's learned position table [1, N, D] in `flat`, fitted to `grid`.

  A model with learned embeddings (model.posemb='learned') takes the source's table, resampled
  when its grid differs; a source with fixed sin-cos embeddings (no table) gives the sin-cos
  table it was trained with, MAE's starting point for fine-tuning. A model without a learned
  table leaves the source's table in place, for the mismatch check to name.
  """
  if ENCODER_POSEMB not in expected:
    if table is not None:
      flat[ENCODER_POSEMB] = table
    return flat
  width = expected[ENCODER_POSEMB].shape[-1]
  if table is None:
    if not any(k.startswith("encoder/") for k in flat):
      return flat  # Nothing of the encoder: let the mismatch check list it all.
    logging.info("the source has fixed sin-cos position embeddings: the learned table "
                 "(model.posemb='learned') starts from that sin-cos table on grid %s", grid)
    table = layers.sincos_posemb_2d(grid, width)[None]
  table = np.asarray(table).reshape(1, -1, np.shape(table)[-1])
  old = _square_grid(table.shape[1], "the source's encoder position embedding")
  if old != grid and table.shape[-1] == width:
    logging.warning("resampling the encoder's learned position embeddings from a %dx%d to a "
                    "%dx%d patch grid (bicubic)", *old, *grid)
    table = resample_posemb(table, grid, old)
  flat[ENCODER_POSEMB] = table
  return flat


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------

def check_source(source: str) -> None:
  """Raises FileNotFoundError or ValueError, naming `source`, unless it is a workdir with a
  committed checkpoint, an existing `.pth`/`.pt` or an existing `.npz` (cheap: nothing is read)."""
  path = epath.Path(str(source))
  if not path.exists():
    raise FileNotFoundError(f"pretrained source {str(source)!r} does not exist: pass a mim_jax "
                            f"workdir, an MAE .pth or an exported .npz")
  if path.is_dir():
    if latest_checkpoint_step(str(source)) is None:
      raise FileNotFoundError(f"pretrained source {str(source)!r} has no committed checkpoint "
                              f"under {path / 'checkpoints'}")
  elif not str(source).endswith((".pth", ".pt", ".npz")):
    raise ValueError(f"pretrained source {str(source)!r}: expected a mim_jax workdir, an MAE "
                     f".pth or an exported .npz")


def latest_checkpoint_step(workdir: str) -> int | None:
  """The newest committed checkpoint step under <workdir>/checkpoints, or None (orbax's own
  notion of committed: saves still in flight or interrupted are not counted)."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  steps = ocp.path.step.checkpoint_steps(directory)
  return max(steps) if steps else None


def _read_workdir(workdir: str) -> dict[str, np.ndarray]:
  """The params of the newest checkpoint, restored as host numpy arrays (no mesh needed)."""
  step = latest_checkpoint_step(workdir)
  if step is None:
    raise FileNotFoundError(f"{workdir} has no committed checkpoint under "
                            f"{epath.Path(workdir) / 'checkpoints'}")
  # orbax takes absolute paths only: a relative workdir (`init_from=workdirs/demo`) is made
  # absolute here; a URL (gs://...) already is.
  root = workdir if "://" in str(workdir) else os.path.abspath(workdir)
  path = epath.Path(root) / "checkpoints" / str(step) / "state"
  # The item's handler, not a Checkpointer: the step's metadata lives one level up.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = dict(handler.metadata(path))
    if "params" not in saved:
      raise checkpoint.CheckpointMismatchError(
          f"{path} holds no 'params' (found {sorted(saved)})")
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved["params"])
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": saved["params"]}, restore_args={"params": as_numpy},
        partial_restore=True))
  finally:
    handler.close()
  logging.info("read the params of step %d from %s", step, path)
  return tree_paths.flatten(restored["params"])


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
    return {k: data[k] for k in data.files if not k.startswith("__")}


# ---------------------------------------------------------------------------------------------
# Official MAE checkpoints (facebookresearch/mae): timm-style names -> mim_jax's tree.
# ---------------------------------------------------------------------------------------------

# Inside a transformer block: torch module path -> mim_jax path and kind (LayerNorm or Linear).
_BLOCK_PARTS = {"norm1": ("norm1", "norm"), "norm2": ("norm2", "norm"),
                "attn.qkv": ("attn/qkv", "linear"), "attn.proj": ("attn/proj", "linear"),
                "mlp.fc1": ("mlp/fc1", "linear"), "mlp.fc2": ("mlp/fc2", "linear")}
# Outside the blocks.
_TOP_PARTS = {"patch_embed.proj": ("encoder/patch_embed", "conv"),
              "norm": ("encoder/norm", "norm"),
              "decoder_embed": ("decoder/embed", "linear"),
              "decoder_norm": ("decoder/norm", "norm"),
              "decoder_pred": ("decoder/pred", "linear")}
_TOKENS = {"cls_token": "encoder/cls", "mask_token": "decoder/mask_token"}
_IGNORED = ("head.weight", "head.bias")  # The fine-tuned release's classifier.


def _convert(kind: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """A torch weight/bias -> (flax leaf name, array in flax layout)."""
  if leaf == "bias":
    return "bias", value
  if kind == "norm":
    return "scale", value
  if kind == "linear" and value.ndim == 2:
    return "kernel", value.T  # torch Linear [out, in] -> flax [in, out]
  if kind == "conv" and value.ndim == 4:
    return "kernel", value.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]
  return "kernel", value  # A wrong rank: left for the shape check to report.


def mae_names_to_mim(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                           dict[str, np.ndarray]]:
  """Maps an MAE state dict to mim_jax names. Returns (params, extras): extras holds the
  position tables ('pos_embed', 'decoder_pos_embed') and anything recognised but unused; names
  not recognised keep their torch name, so the mismatch check lists them as unexpected."""
  params, extras = {}, {}
  block = re.compile(r"(decoder_)?blocks\.(\d+)\.(.+)\.(weight|bias)")
  top = re.compile(r"(.+)\.(weight|bias)")
  for name, value in state.items():
    if name in _TOKENS:
      params[_TOKENS[name]] = value
    elif name in ("pos_embed", "decoder_pos_embed", "fc_norm.weight", "fc_norm.bias") + _IGNORED:
      extras[name] = value
    elif (m := block.fullmatch(name)) and m.group(3) in _BLOCK_PARTS:
      part, kind = _BLOCK_PARTS[m.group(3)]
      leaf, value = _convert(kind, m.group(4), value)
      scope = "decoder" if m.group(1) else "encoder"
      params[f"{scope}/blocks/block_{m.group(2)}/{part}/{leaf}"] = value
    elif (m := top.fullmatch(name)) and m.group(1) in _TOP_PARTS:
      path, kind = _TOP_PARTS[m.group(1)]
      leaf, value = _convert(kind, m.group(2), value)
      params[f"{path}/{leaf}"] = value
    else:
      params[name] = value
  return params, extras


def _pick_state_dict(obj: Any) -> Any:
  """MAE's releases save {'model': state_dict}; training checkpoints add optimizer state."""
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    return obj["model"]
  return obj


def _read_mae_pth(path: str, expected: dict[str, Any], grid: tuple[int, int], posemb: str
                  ) -> dict[str, np.ndarray]:
  state = pth.read_state_dict(path, _pick_state_dict)
  flat, extras = mae_names_to_mim(state)
  if "encoder/norm/scale" not in flat and "fc_norm.weight" in extras:
    # The fine-tuned release (global pooling) replaces the final norm by fc_norm, applied to
    # the pooled tokens; mim_jax's encoder norms every token before pooling.
    logging.warning("%s is a fine-tuned checkpoint: its fc_norm becomes the encoder's final "
                    "norm (applied per token before pooling, so 'gap' features differ from "
                    "those of MAE's fine-tuned model)", path)
    flat["encoder/norm/scale"] = extras.pop("fc_norm.weight")
    flat["encoder/norm/bias"] = extras.pop("fc_norm.bias")
  ignored = [k for k in extras if k in _IGNORED or k.startswith("fc_norm")]
  if ignored:
    logging.warning("%s: ignoring %s (not part of the pretraining model)", path, ignored)

  if "pos_embed" in extras:
    table = extras["pos_embed"].reshape(-1, extras["pos_embed"].shape[-1])
    # MAE's cls token gets pos_embed[0] added (zero in pretraining, learned after fine-tuning);
    # mim_jax gives cls no position embedding, so folding it into the token is exact.
    if "encoder/cls" in flat and flat["encoder/cls"].shape[-1] == table.shape[-1]:
      flat["encoder/cls"] = flat["encoder/cls"] + table[0].reshape(flat["encoder/cls"].shape)
    patches = table[1:]
    old = _square_grid(patches.shape[0], f"{path}: pos_embed")
    if ENCODER_POSEMB in expected:
      flat = _fit_learned_posemb(flat, patches[None], expected, grid)
    else:
      _check_fixed_posemb(patches, old, grid, f"{path}: pos_embed", posemb)
  if "decoder_pos_embed" in extras and any(k.startswith("decoder/") for k in expected):
    table = extras["decoder_pos_embed"].reshape(-1, extras["decoder_pos_embed"].shape[-1])
    old = _square_grid(table.shape[0] - 1, f"{path}: decoder_pos_embed")
    _check_fixed_posemb(table[1:], old, grid, f"{path}: decoder_pos_embed", "sincos")
  return flat


def _check_fixed_posemb(table: np.ndarray, old: tuple[int, int], grid: tuple[int, int],
                        what: str, posemb: str) -> None:
  """A model with fixed position embeddings drops the checkpoint's table: say so when it is
  not the sin-cos table (then it was learned, e.g. fine-tuned) or when the grid changes."""
  if posemb == "none":
    logging.warning("%s is dropped: the model has no position embeddings (model.posemb='none')",
                    what)
    return
  fixed = layers.sincos_posemb_2d(old, table.shape[-1])
  if not np.allclose(table, fixed, atol=1e-4):
    logging.warning("%s is not the fixed sin-cos table (max difference %.3g): it was learned; "
                    "the model's fixed sin-cos embeddings are used instead (set "
                    "model.posemb='learned' to load it)", what, np.abs(table - fixed).max())
  if old != grid:
    logging.info("%s: fixed sin-cos position embeddings recomputed for a %dx%d patch grid "
                 "(the checkpoint's is %dx%d)", what, *grid, *old)


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------

def save_npz(path: str, flat: dict[str, np.ndarray], meta: dict[str, Any],
             extra: dict[str, np.ndarray] | None = None) -> None:
  """Writes `flat` ({'encoder/...': array}) to an .npz, with `meta` as a JSON string under
  '__meta__' and `extra` arrays, whose names must start with '__' (skipped on reading)."""
  if any(not k.startswith("__") for k in extra or {}):
    raise ValueError(f"extra entries must be named '__...', got {sorted(extra)}")
  arrays = {**flat, **(extra or {})}
  arrays["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
  with epath.Path(path).open("wb") as f:
    np.savez(f, **arrays)
