"""`config.init_from`: a fresh run starts from pretrained parameters instead of its random init.

The source is anything mim_jax/pretrained.py reads: a mim_jax workdir, an official MAE `.pth`
or an exported `.npz`. When it holds exactly this run's parameters (continuing MAE pretraining
from MAE's full release, say), all of them are loaded. Otherwise its encoder is loaded into
`params['encoder']` (fine-tuning from a pretraining run) and the rest keeps its random init.
The optimizer state is left as is: Adam's moments start at zero either way. A resumed run
ignores `init_from`: its checkpoint already holds the loaded and trained parameters.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mim_jax import checkpoint
from mim_jax import pretrained
from mim_jax import tree_paths

# Pretrained encoder parameters a model may have no use for, dropped when loading (any other
# difference is an error): the final norm, when fine-tuning pools 'gap' (MAE replaces it by
# fc_norm), and the mask token of an encoder pretrained with mask tokens (SimMIM style).
UNUSED_PRETRAINED = ("norm", "mask_token")


def _place(tree: Any, flat: dict[str, Any], shardings: Any) -> Any:
  """The leaves of `tree` replaced by `flat`'s values of the same names, cast to the leaf's
  dtype and placed straight into `shardings`."""

  def place(path, leaf, leaf_sharding):
    value = np.asarray(flat[tree_paths.name(path)]).astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, leaf_sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(place, tree, shardings)


def with_encoder(params: Any, encoder_params: Any, param_shardings: Any, *,
                 source: str = "the given parameters") -> Any:
  """`params` with params['encoder'] replaced by `encoder_params` (a nested dict of arrays,
  e.g. numpy). Raises checkpoint.CheckpointMismatchError listing missing, unexpected and
  mis-shaped names when the encoders differ (beyond UNUSED_PRETRAINED)."""
  current = checkpoint.param_signature(params["encoder"])
  given = {name: leaf for name, leaf in tree_paths.flatten(encoder_params).items()
           if name in current or name.split("/")[0] not in UNUSED_PRETRAINED}
  given_signature = {name: list(np.shape(leaf)) for name, leaf in given.items()}
  if given_signature != current:
    raise checkpoint.CheckpointMismatchError(
        f"{source}: its encoder does not match this model's (check model.variant and "
        f"image_size): {checkpoint.describe_mismatch(given_signature, current)}")
  encoder = _place(params["encoder"], given, param_shardings["encoder"])
  return {**params, "encoder": encoder}


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises, naming the source, when a fresh run (no checkpoint in `workdir` yet) could not read
  `config.init_from`: called before anything is written, so a typo leaves no empty workdir."""
  if config.init_from and pretrained.latest_checkpoint_step(workdir) is None:
    pretrained.check_source(config.init_from)


def load(params: Any, config: ml_collections.ConfigDict, param_shardings: Any) -> Any:
  """`params` (a fresh init) with `config.init_from`'s parameters: all of them when the source
  fits the whole model, else its encoder (see the module docstring)."""
  source = config.init_from
  try:
    full = pretrained.load_params(source, config)
  except checkpoint.CheckpointMismatchError:
    params = with_encoder(params, pretrained.load_encoder_params(source, config),
                          param_shardings, source=source)
    logging.info("encoder initialised from %s (the rest of the model at random init)", source)
    return params
  logging.info("every parameter initialised from %s", source)
  return _place(params, tree_paths.flatten(full), param_shardings)
