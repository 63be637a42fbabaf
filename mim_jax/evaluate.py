"""`--mode=eval`: the evaluator suite on saved params, without training.

  python -m mim_jax.main --mode=eval --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae_local
  python -m mim_jax.main --mode=eval --config=configs/mae_vit.py:variant=B/16 \\
      --config.eval.init_from=/path/mae_pretrain_vit_base.pth --config.eval.knn.enabled=True \\
      --workdir=/tmp/mae_b16_eval

The params come from `config.eval.init_from` (a workdir, an official MAE .pth or an exported
.npz; see mim_jax/pretrained.py) or, when it is '', from the newest checkpoint in --workdir.
The results, with the baselines `config.eval.baselines` names, are returned and written to
<workdir>/eval.json (metrics.jsonl belongs to the training run and is left alone).
"""

import json
import os

import jax
import ml_collections
from absl import logging

from mim_jax import checkpoint
from mim_jax import methods
from mim_jax import pretrained
from mim_jax import sharding
from mim_jax.evaluators import suite


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  source = config.eval.init_from or workdir
  mesh = sharding.make_mesh()
  model = methods.build(config)
  replicated = sharding.replicated(mesh)
  try:
    params = pretrained.load_params(source, config)
  except checkpoint.CheckpointMismatchError as full_error:
    # An encoder-only source (MAE's mae_pretrain_vit_*.pth): the evaluators read the encoder
    # alone. If the encoder does not fit either, the first error (the whole model's) is raised.
    try:
      params = {"encoder": pretrained.load_encoder_params(source, config)}
    except checkpoint.CheckpointMismatchError:
      raise full_error from None
    logging.info("%s holds an encoder only: evaluating the encoder", source)
  params = jax.device_put(params, replicated)
  logging.info("evaluating the params of %s", source)

  def random_init():
    # The initialisation a training run with this config starts from (train.py's rngs).
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    return jax.jit(lambda rng: methods.init_params(model, config, rng),
                   out_shardings=replicated)(init_rng)

  evaluators = suite.Suite(config, model, mesh)
  if not evaluators.names:
    raise ValueError(f"no evaluator is enabled; enable one of {sorted(suite.EVALUATORS)}, e.g. "
                     "--config.eval.knn.enabled=True")
  results = evaluators.run_with_baselines(params, random_init)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "eval.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"source": source, **results}, f, indent=1, sort_keys=True)
    logging.info("wrote %s", path)
  return results
