"""Training objectives, one file each, picked by `config.method.name`.

A method file defines four functions:
  build(config) -> flax module. Its `__call__(<inputs>, *, train)` takes the batch arrays as
      keyword arguments named as in `inputs` and returns `(loss, metrics)`, drawing randomness
      from the 'mask' (and 'dropout') rng streams; a `__call__` with a keyword argument `step`
      also gets the int32 training step (for annealed temperatures and ramps; methods must
      default it for evaluation). It also offers `features(**inputs) -> aux`
      for the evaluators, taking the eval records' arrays but the label as keywords (e.g.
      `image`, or `audio` and `audio_len`), and, where it reconstructs pixels,
      `reconstruct(images) -> dict of images` for the PNG grid;
  inputs(config) -> {name: jax.ShapeDtypeStruct}: the arrays the method consumes from each
      batch, with one example's shape (no batch axis), e.g. {'image': [S, S, C] float32} or
      {'audio': [L] float32, 'audio_len': [] int32}. An integer input `<x>_len` is the number of
      real (unpadded) entries of input `<x>`;
  train_flops_per_example(config) -> int, the analytic training FLOPs of one example;
  validate(config) -> None, raising ValueError on a config the method cannot run.
A method that reads a frozen encoder loaded from outside (MaskAlign's teacher; the attention
mask's teacher of MAE, CRATE-MAE and SimMIM, methods/teacher_attention.py) also defines
  frozen_encoders(config) -> {subtree: (source, encoder_config, label)}: the top-level parameter
      subtree ('frozen_<name>', which optim.skip_frozen never updates) that the trainer fills,
      before anything compiles, with the encoder that `encoder_config` builds, read from
      `source` (a workdir, an MAE .pth or an .npz: mim_jax/pretrained.py); `label` names the
      source's config field in errors. A resumed run restores it from its checkpoint instead.
The trainer knows nothing else about a method: it builds init inputs and batch shardings from
`inputs`, and never names a modality.
"""

from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.methods import bestrq
from mim_jax.methods import cae
from mim_jax.methods import crate_mae
from mim_jax.methods import finetune
from mim_jax.methods import hubert
from mim_jax.methods import mae
from mim_jax.methods import maskalign
from mim_jax.methods import position
from mim_jax.methods import simmim
from mim_jax.methods import tera
from mim_jax.methods import w2v_bert
from mim_jax.methods import wav2vec2
from mim_jax.registry import Registry

METHODS: Registry = Registry("method", {
    "bestrq": bestrq,
    "cae": cae,
    "crate_mae": crate_mae,
    "finetune": finetune,
    "hubert": hubert,
    "mae": mae,
    "maskalign": maskalign,
    "position": position,
    "simmim": simmim,
    "tera": tera,
    "w2v_bert": w2v_bert,
    "wav2vec2": wav2vec2,
})


def get(name: str) -> ModuleType:
  return METHODS[name]


def build(config: ml_collections.ConfigDict) -> nn.Module:
  return get(config.method.name).build(config)


def inputs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The arrays the method consumes, one example's shape each (see the module docstring)."""
  return get(config.method.name).inputs(config)


def example_batch(config: ml_collections.ConfigDict, batch: int = 1) -> dict[str, jax.Array]:
  """Zeros of the method's inputs with a leading batch axis: what `init` traces the model on."""
  return {name: jnp.zeros((batch,) + spec.shape, spec.dtype)
          for name, spec in inputs(config).items()}


def init_params(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
  """The method's parameters at initialisation (jit- and eval_shape-able)."""
  params_rng, mask_rng = jax.random.split(rng)
  # train=False: initialisation needs no 'dropout' rng, and no parameter depends on it.
  return model.init({"params": params_rng, "mask": mask_rng}, **example_batch(config),
                    train=False)["params"]


def frozen_encoders(config: ml_collections.ConfigDict
                    ) -> dict[str, tuple[str, ml_collections.ConfigDict, str]]:
  """The method's frozen encoders loaded from outside (see the module docstring); {} if none."""
  module = get(config.method.name)
  return module.frozen_encoders(config) if hasattr(module, "frozen_encoders") else {}


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs per example, counted from the architecture."""
  return get(config.method.name).train_flops_per_example(config)


def validate(config: ml_collections.ConfigDict) -> None:
  get(config.method.name).validate(config)
