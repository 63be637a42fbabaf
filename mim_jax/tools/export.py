r"""Writes a pretrained encoder (or the whole model) to a standalone .npz, or to a Hugging Face
transformers directory, for use elsewhere.

  python -m mim_jax.tools.export --source=/tmp/mae_local \
      --config=configs/mae_vit.py:runlocal --out=/tmp/encoder.npz
  python -m mim_jax.tools.export --source=mae_pretrain_vit_base.pth \
      --config=configs/mae_vit.py:variant=B/16 --out=/tmp/vit_b16.npz
  python -m mim_jax.tools.export --source=/tmp/mae_local --config=configs/mae_vit.py:runlocal \
      --format=hf --what=all --out=/tmp/mae_hf

`--source` is anything `mim_jax.pretrained.load_params` reads: a workdir, an MAE .pth, an .npz.

`--format=npz` (the default): the file maps flat '/'-joined names
('encoder/blocks/block_0/attn/qkv/kernel', flax layouts: Dense kernels [in, out], the patch
embedding [p, p, C, D]) to float arrays. Two extra entries, skipped when mim_jax reads the file
back: '__meta__', a JSON string (model config, image size, patch grid, position-embedding kind,
source), and, for fixed sin-cos position embeddings, '__posemb__' [1 + N, D], the table added to
the tokens (a zero row for cls, then the patches in row-major order), which is not a parameter
but is needed to run the encoder elsewhere.

`--format=hf`: `--out` is a directory with config.json and model.safetensors
(mim_jax/hf_export.py), for an MAE on a ViT (configs/mae_vit.py) only. With `--what=all`
`transformers.ViTMAEForPreTraining.from_pretrained(out)` loads it and computes mim_jax's loss;
with `--what=encoder` it holds the encoder alone, for `transformers.ViTMAEModel`.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from mim_jax import errors
from mim_jax import hf_export
from mim_jax import layer_layout
from mim_jax import models
from mim_jax import pretrained
from mim_jax import tree_paths
from mim_jax.models import layers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the model, e.g. "
                                          "configs/mae_vit.py:runlocal.", lock_config=True)
_SOURCE = flags.DEFINE_string("source", None, "A mim_jax workdir, an MAE .pth or an .npz.")
_OUT = flags.DEFINE_string("out", None, "Output .npz file, or directory with --format=hf.")
_WHAT = flags.DEFINE_enum("what", "encoder", ["encoder", "all"], "The encoder alone, or every "
                          "parameter of the pretraining model (with its decoder).")
_FORMAT = flags.DEFINE_enum("format", "npz", ["npz", "hf"], "npz: mim_jax's names and layouts. "
                            "hf: a Hugging Face transformers ViTMAE directory (MAE on a ViT).")
flags.mark_flags_as_required(["config", "source", "out"])


FORMATS = {"npz": "mim_jax params, flat '/'-joined names",
           "hf": "transformers ViTMAE: config.json, model.safetensors"}


def export(source: str, config, out: str, what: str = "encoder",
           output_format: str = "npz") -> dict:
  """Writes `out` (an .npz, or a transformers directory with output_format='hf') and returns
  the export's description, the .npz's '__meta__' dict."""
  if output_format == "hf":
    hf_export.check_supported(config)  # Before reading a source that may be large.
  if what == "encoder":
    tree = {"encoder": pretrained.load_encoder_params(source, config)}
  else:
    tree = pretrained.load_params(source, config)
  tree = layer_layout.unstack_blocks(tree)  # Scanned layers are written one entry per layer.
  encoder = models.build_encoder(config)
  side = config.image_size // encoder.patch
  posemb = getattr(encoder, "posemb", "sincos")
  meta = {"format": FORMATS[output_format], "what": what, "source": source,
          "model": config.model.to_dict(), "image_size": config.image_size,
          "channels": config.data.channels, "patch": encoder.patch, "grid": [side, side],
          "posemb": posemb}
  if output_format == "hf":
    hf_export.save(out, tree, config, provenance=meta)
    return meta
  extra = {}
  if posemb == "sincos":
    extra["__posemb__"] = layers.sincos_posemb_2d((side, side), encoder.width, with_cls=True)
  pretrained.save_npz(out, tree_paths.flatten(tree), meta, extra)
  return meta


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  meta = export(_SOURCE.value, _CONFIG.value, _OUT.value, _WHAT.value, _FORMAT.value)
  print(f"wrote {_OUT.value}: " + json.dumps({k: meta[k] for k in ("what", "grid", "posemb")}))
  if _FORMAT.value == "hf" and _WHAT.value == "encoder":
    print("the encoder alone, for transformers.ViTMAEModel; --what=all adds the decoder that "
          "ViTMAEForPreTraining needs")


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
