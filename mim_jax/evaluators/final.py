"""Evaluations at the end of pretraining: the reconstruction PNG, then the evaluator suite
(k-NN, linear probe, few-shot; suite.py) on the pretrained encoder next to its baselines: the
same encoder at the random init the run started from, and raw pixels."""

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from mim_jax.data import pipeline
from mim_jax.evaluators import reconstruction
from mim_jax.evaluators import suite


def run(config: ml_collections.ConfigDict, workdir: str, model: nn.Module, params,
        evaluators: suite.Suite, init_params: Callable[[jax.Array], Any], init_rng: jax.Array
        ) -> dict[str, float]:
  """`evaluators` is the run's suite, so the data it read and the feature extractor it compiled
  for the periodic evals serve these too. `init_params(init_rng)` gives the params the run
  started from (the random-init baseline), placed like `params`, so the feature extractor
  compiled for them serves it too: the run's own jitted init (train.param_initializer)."""
  e = config.eval
  if e.reconstruction_png and jax.process_index() == 0:
    inputs, _ = pipeline.eval_arrays(config, config.data.eval_split,
                                     max_examples=e.num_png_images)
    images = inputs["image"]
    path = reconstruction.write_png(
        os.path.join(workdir, "reconstruction.png"), model, params, images, config.data.mean,
        config.data.std, jax.random.key(config.seed + 1))
    logging.info("wrote %s (rows: original, masked, reconstruction)", path)
  # The same initialisation the run started from, so the comparison isolates pretraining.
  return evaluators.run_with_baselines(params, lambda: init_params(init_rng))
