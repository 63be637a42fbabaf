"""Evaluations at the end of pretraining: the reconstruction PNG and the linear probe of the
pretrained encoder next to the same encoder at random init."""

import os
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from mim_jax.data import pipeline
from mim_jax.evaluators import features
from mim_jax.evaluators import linear_probe
from mim_jax.evaluators import reconstruction


def run(config: ml_collections.ConfigDict, workdir: str, model: nn.Module, params,
        mesh: jax.sharding.Mesh, init_fn: Callable, init_rng: jax.Array) -> dict[str, float]:
  results = {}
  e = config.eval
  if not (e.linear_probe or e.reconstruction_png):
    return results
  test_x, test_y = pipeline.eval_arrays(config, config.data.eval_split,
                                        max_examples=e.probe_max_examples)
  if e.reconstruction_png and jax.process_index() == 0:
    path = reconstruction.write_png(
        os.path.join(workdir, "reconstruction.png"), model, params,
        test_x[:e.num_png_images], config.data.mean, config.data.std,
        jax.random.key(config.seed + 1))
    logging.info("wrote %s (rows: original, masked, reconstruction)", path)
  if e.linear_probe:
    train_x, train_y = pipeline.eval_arrays(config, config.data.split,
                                            max_examples=e.probe_max_examples)
    # The same initialisation the run started from, so the comparison isolates pretraining.
    random_params = jax.jit(init_fn)(init_rng).params
    extract = features.FeatureExtractor(model, e.probe_feature, mesh, config.batch_size)
    for name, p in (("pretrained", params), ("random_init", random_params)):
      feats = [extract(p, x) for x in (train_x, test_x)]
      acc = linear_probe.fit_and_score(feats[0], train_y, feats[1], test_y,
                                       config.data.num_classes, steps=e.probe_steps)
      results[f"linear_probe/{name}"] = acc
    logging.info("linear probe top-1 on %s/%s (%s feature): pretrained %.4f, random init %.4f",
                 config.data.name, config.data.eval_split, e.probe_feature,
                 results["linear_probe/pretrained"], results["linear_probe/random_init"])
  return results
