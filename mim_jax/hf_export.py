"""MAE (a ViT encoder and its decoder) as a Hugging Face transformers checkpoint: a directory
holding config.json and model.safetensors, which `transformers.ViTMAEForPreTraining` loads with
`from_pretrained`, or `ViTMAEModel` when only the encoder was written. The export needs numpy
and safetensors only, neither torch nor transformers.

Names are those of the ViTMAE checkpoints on the Hub (facebook/vit-mae-base), e.g.
'vit.encoder.layer.0.attention.attention.query.weight': transformers 4.x reads them as they are
and 5.x renames them as it loads (to q_proj and so on). Arrays are float32 in torch's layouts:
Linear weights [out, in], the patch embedding a Conv2d weight [D, C, p, p]. mim_jax's fused qkv
projection ([d, 3d] kernel, [3d] bias) becomes separate query, key and value, split in that
order as layers.QKV splits it; each head's channels stay contiguous in both.

transformers' ViTMAE then computes mim_jax's MAE, because config.json says how:
  - layer_norm_eps 1e-6, mim_jax's and MAE's (transformers' default is 1e-12);
  - hidden_act 'gelu' (erf) or 'gelu_pytorch_tanh', following model.exact_gelu; qkv_bias true;
  - the position tables are written out rather than left to transformers' initialisation:
    'position_embeddings' [1, 1+N, D] and 'decoder_pos_embed' [1, 1+N, d], a zero row for cls
    (mim_jax gives cls no position) then the patches in row-major order. The encoder's is the
    sin-cos table, the learned one with model.posemb='learned', or zeros with 'none';
  - mask_ratio and norm_pix_loss come from the config. transformers keeps
    int(N * (1 - mask_ratio)) patches, as masking.num_visible does, picked by uniform noise:
    another scheme (config.mask.name) does not carry over, and the export warns.
"""

import json
import re
from typing import Any

import ml_collections
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath

from mim_jax import models
from mim_jax import tree_paths
from mim_jax.models import layers

SUPPORTED = ("MAE on a ViT encoder (configs/mae_vit.py: method.name='mae', model.name='vit', "
             "method.encoder_mask_tokens=False)")
LAYER_NORM_EPS = 1e-6  # layers.layer_norm's default, which every ViT and MAE decoder norm uses.

# Inside a transformer block: mim_jax module path -> transformers module path (qkv is split).
_BLOCK_PARTS = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                "attn/proj": "attention.output.dense", "mlp/fc1": "intermediate.dense",
                "mlp/fc2": "output.dense"}
# Outside the blocks; '{vit}' is the encoder's prefix ('vit.' beside a decoder, else '').
_TOP_PARTS = {"encoder/patch_embed": "{vit}embeddings.patch_embeddings.projection",
              "encoder/norm": "{vit}layernorm", "decoder/embed": "decoder.decoder_embed",
              "decoder/norm": "decoder.decoder_norm", "decoder/pred": "decoder.decoder_pred"}
_TOKENS = {"encoder/cls": "{vit}embeddings.cls_token", "decoder/mask_token": "decoder.mask_token"}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK = re.compile(r"(encoder|decoder)/blocks/block_(\d+)/(.+)/(kernel|scale|bias)")
_TOP = re.compile(r"(.+)/(kernel|scale|bias)")


def check_supported(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming what the export supports, unless `config` is an MAE ViT."""
  method, model = config.method.get("name"), config.model.get("name")
  mask_tokens = bool(config.method.get("encoder_mask_tokens", False))
  if method != "mae" or model != "vit" or mask_tokens:
    got = f"method.name={method!r}, model.name={model!r}"
    if mask_tokens:
      got += ", encoder_mask_tokens=True (transformers' ViTMAE encodes visible patches only)"
    raise ValueError(f"the Hugging Face export (--format=hf) supports {SUPPORTED} only; this "
                     f"config has {got}")


def hf_config(config: ml_collections.ConfigDict, *, with_decoder: bool) -> dict[str, Any]:
  """The config.json of the config's MAE: ViTMAEForPreTraining's, or with `with_decoder`
  False ViTMAEModel's (the decoder fields then describe the decoder it would be given)."""
  check_supported(config)
  encoder = models.build_encoder(config)
  m = config.method
  return {
      "architectures": ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"],
      "model_type": "vit_mae",
      "image_size": config.image_size, "patch_size": encoder.patch,
      "num_channels": config.data.channels,
      "hidden_size": encoder.width, "num_hidden_layers": encoder.depth,
      "num_attention_heads": encoder.heads, "intermediate_size": encoder.mlp_dim,
      "decoder_hidden_size": m.decoder_width, "decoder_num_hidden_layers": m.decoder_depth,
      "decoder_num_attention_heads": m.decoder_heads,
      "decoder_intermediate_size": 4 * m.decoder_width,  # mae.build's decoder MLP
      "hidden_act": "gelu" if encoder.exact_gelu else "gelu_pytorch_tanh",
      "layer_norm_eps": LAYER_NORM_EPS, "qkv_bias": True,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "mask_ratio": config.mask.ratio, "norm_pix_loss": m.norm_pix_loss,
  }


def _to_torch(value: np.ndarray, kernel: bool = False) -> np.ndarray:
  if kernel:  # flax [in, out] -> torch [out, in]; [p, p, C, D] -> [D, C, p, p]
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return np.ascontiguousarray(value, np.float32)  # safetensors writes contiguous buffers


def state_dict(flat: dict[str, np.ndarray], config: ml_collections.ConfigDict
               ) -> dict[str, np.ndarray]:
  """mim_jax's flat params ('encoder/...', plus 'decoder/...' for the whole MAE) -> transformers'
  names and arrays: ViTMAEForPreTraining's with a decoder, else ViTMAEModel's. Raises ValueError
  on a parameter transformers' ViTMAE has no place for."""
  flat = dict(flat)
  learned = flat.pop("encoder/pos_embedding", None)
  with_decoder = any(k.startswith("decoder/") for k in flat)
  vit = "vit." if with_decoder else ""
  out, unplaced = {}, []
  for name, value in flat.items():
    value = np.asarray(value)
    if name in _TOKENS:
      out[_TOKENS[name].format(vit=vit)] = _to_torch(value)
    elif (m := _BLOCK.fullmatch(name)) and m.group(3) in (*_BLOCK_PARTS, "attn/qkv"):
      scope, index, part, leaf = m.groups()
      prefix = (f"{vit}encoder.layer.{index}." if scope == "encoder"
                else f"decoder.decoder_layers.{index}.")
      kernel = leaf == "kernel"
      if part == "attn/qkv":
        for which, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=-1)):
          out[f"{prefix}attention.attention.{which}.{_LEAVES[leaf]}"] = _to_torch(chunk, kernel)
      else:
        out[f"{prefix}{_BLOCK_PARTS[part]}.{_LEAVES[leaf]}"] = _to_torch(value, kernel)
    elif (m := _TOP.fullmatch(name)) and m.group(1) in _TOP_PARTS:
      path = _TOP_PARTS[m.group(1)].format(vit=vit)
      out[f"{path}.{_LEAVES[m.group(2)]}"] = _to_torch(value, m.group(2) == "kernel")
    else:
      unplaced.append(name)
  if unplaced:
    raise ValueError(f"transformers' ViTMAE has no place for {sorted(unplaced)}: "
                     f"the Hugging Face export supports {SUPPORTED}")

  encoder = models.build_encoder(config)
  side = config.image_size // encoder.patch
  if learned is not None:
    table = np.concatenate([np.zeros((1, encoder.width), np.float32),
                            np.asarray(learned).reshape(side * side, encoder.width)])
  elif encoder.posemb == "sincos":
    table = layers.sincos_posemb_2d((side, side), encoder.width, with_cls=True)
  else:  # posemb='none': a zero table adds nothing.
    table = np.zeros((1 + side * side, encoder.width), np.float32)
  out[f"{vit}embeddings.position_embeddings"] = _to_torch(table[None])
  if with_decoder:
    out["decoder.decoder_pos_embed"] = layers.sincos_posemb_2d(
        (side, side), config.method.decoder_width, with_cls=True)[None]
  return out


def save(directory: str, params: dict[str, Any], config: ml_collections.ConfigDict,
         provenance: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes config.json and model.safetensors under `directory` (created if needed) from
  `params`: the MAE's tree, or {'encoder': ...} alone for a ViTMAEModel. `provenance` is kept as
  JSON in the safetensors header (key 'mim_jax'). Returns the config.json dict."""
  tensors = state_dict(tree_paths.flatten(params), config)
  with_decoder = "decoder" in params
  hf = hf_config(config, with_decoder=with_decoder)
  if config.mask.name != "random":
    logging.warning("config.mask.name is %r, but transformers' ViTMAE masks uniformly at "
                    "random: only mask_ratio %s carries over", config.mask.name,
                    config.mask.ratio)
  metadata = {"format": "pt"}  # transformers 4.x refuses metadata without it
  if provenance is not None:
    metadata["mim_jax"] = json.dumps(provenance, sort_keys=True)
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  (path / "model.safetensors").write_bytes(safetensors.numpy.save(tensors, metadata))
  return hf
