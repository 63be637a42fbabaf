"""The evaluator suite: every evaluator `config.eval` enables, on features computed once.

  evals = Suite(config, model, mesh)
  evals.run(params, "pretrained")  # {'knn/pretrained': .., 'linear_probe/pretrained': ..,
                                   #  'few_shot/10shot/pretrained': .., ...}
  evals.run_raw()                  # the same with the raw input as features: '.../pixels'
                                   #  (images) or '.../logmel' (audio)

An evaluator is a module registered in EVALUATORS with a section `config.eval.<name>` holding
`enabled`, `feature` (a spec of evaluators/features.py) and its own settings, and either
  evaluate(cfg, train, test, num_classes, mesh) -> {metric: value}, train and test being
      (features [N, D], labels [N]) pairs of the cached splits (k-NN, probes, few-shot), or,
      with `STREAMED = True`, evaluate(cfg, extract, batches) -> {metric: value}, fed the whole
      eval split batch by batch (top-1 of a fine-tuned classifier).
The two cached splits are read once per Suite; a `run` computes the model's features once for
every evaluator. The trainer runs the suite every `eval.every_steps` and at the end (final.py),
and `--mode=eval` runs it on a checkpoint (mim_jax/evaluate.py).
"""

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from mim_jax.data import logmel
from mim_jax.data import pipeline
from mim_jax.evaluators import features
from mim_jax.evaluators import few_shot
from mim_jax.evaluators import knn
from mim_jax.evaluators import linear_probe
from mim_jax.evaluators import top1
from mim_jax.registry import Registry

EVALUATORS = Registry("evaluator", {"knn": knn, "linear_probe": linear_probe,
                                    "few_shot": few_shot, "top1": top1})


def raw_baseline(config: ml_collections.ConfigDict) -> str:
  """The name of the no-model baseline of the config's data: 'pixels' or, for audio, 'logmel'."""
  return "logmel" if config.data.get("modality", "image") == "audio" else "pixels"


def _streamed(name: str) -> bool:
  return getattr(EVALUATORS[name], "STREAMED", False)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a bad `config.eval` (before anything compiles)."""
  e = config.eval
  for name in EVALUATORS:
    features.parse(e[name].feature)
  if e.every_steps < 0:
    raise ValueError(f"eval.every_steps must be >= 0 (0: only at the end), got {e.every_steps}")
  if not e.run_name or "/" in e.run_name:
    raise ValueError(f"eval.run_name must be a non-empty name without '/', got {e.run_name!r}")
  if e.top1.enabled and e.top1.feature != "logits":
    raise ValueError(f"eval.top1.feature must be 'logits' (a classifier's), got "
                     f"{e.top1.feature!r}")
  valid = ("random_init", raw_baseline(config))
  if set(e.baselines) - set(valid):
    raise ValueError(f"eval.baselines {e.baselines} may only hold {valid} for data.name "
                     f"{config.data.name!r}")
  if e.knn.k <= 0 or e.knn.temperature <= 0 or e.knn.chunk <= 0:
    raise ValueError("eval.knn.k, temperature and chunk must be positive")
  p = e.linear_probe
  if p.optimizer not in linear_probe.OPTIMIZERS:
    raise ValueError(f"eval.linear_probe.optimizer must be one of {linear_probe.OPTIMIZERS}, "
                     f"got {p.optimizer!r}")
  if p.batch_size <= 0 or p.epochs <= 0 or not 0 <= p.warmup_epochs <= p.epochs:
    raise ValueError("eval.linear_probe needs batch_size > 0 and 0 <= warmup_epochs <= epochs")
  f = e.few_shot
  if f.protocol not in few_shot.PROTOCOLS:
    raise ValueError(f"eval.few_shot.protocol must be one of {few_shot.PROTOCOLS.names()}, "
                     f"got {f.protocol!r}")
  shots, l2_regs = tuple(f.shots), tuple(f.ridge_loo.l2_regs)
  if not shots or min(shots) <= 0 or not l2_regs or min(l2_regs) <= 0 or f.big_vision.l2_reg <= 0:
    raise ValueError("eval.few_shot.shots, ridge_loo.l2_regs and big_vision.l2_reg must be "
                     "non-empty and positive")
  if min(f.ridge_loo.num_seeds, f.big_vision.num_seeds) <= 0:
    raise ValueError("eval.few_shot.<protocol>.num_seeds must be positive")
  if f.protocol == "ridge_loo" and 1 in shots and max(shots) == 1:
    raise ValueError("eval.few_shot.shots: 1-shot takes its l2 strength from the largest n, "
                     "so it needs an n > 1 next to it")


class Suite:
  """The enabled evaluators, their data (read on first use) and one compiled feature extractor
  for all of them."""

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module,
               mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.names = [name for name in EVALUATORS if config.eval[name].enabled]
    # Streamed evaluators read the eval split batch by batch; the others, the cached splits.
    self._streamed = [name for name in self.names if _streamed(name)]
    self._cached = [name for name in self.names if not _streamed(name)]
    specs = sorted({config.eval[name].feature for name in self.names} - {features.PIXELS})
    self._extract = (features.FeatureExtractor(model, specs, mesh, config.batch_size)
                     if specs else None)
    self._data = None
    self._raw_features = None

  def due(self, step: int) -> bool:
    """Whether the periodic evals run after `step` (the last step is final.py's)."""
    every = self.config.eval.every_steps
    return bool(self.names) and every > 0 and step % every == 0 and step < self.config.total_steps

  @property
  def data(self) -> tuple[tuple[dict[str, np.ndarray], np.ndarray],
                          tuple[dict[str, np.ndarray], np.ndarray]]:
    """((train inputs, labels), (test inputs, labels)), read once; inputs are the method's
    arrays, e.g. {'image': ...}."""
    if self._data is None:
      c, limit = self.config, self.config.eval.max_examples or None
      self._data = (pipeline.eval_arrays(c, c.data.split, max_examples=limit),
                    pipeline.eval_arrays(c, c.data.eval_split, max_examples=limit))
    return self._data

  def run(self, params: Any, name: str) -> dict[str, float]:
    """Every enabled evaluator on the model's `params`; keys end in '/<name>'."""
    results = {}
    for evaluator in self._streamed:
      start = time.perf_counter()
      c = self.config
      out = EVALUATORS[evaluator].evaluate(
          c.eval[evaluator], lambda inputs: self._extract(params, inputs),
          pipeline.eval_batches(c, c.data.eval_split, self._extract.batch_size))
      results.update({f"{key}/{name}": value for key, value in out.items()})
      logging.info("eval %s: %s on %s/%s in %.1fs: %s", name, evaluator, c.data.name,
                   c.data.eval_split, time.perf_counter() - start,
                   ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    if not self._cached:
      return results
    (train_x, _), (test_x, _) = self.data
    start = time.perf_counter()
    feats = {}
    if self._extract is not None:
      train_f, test_f = self._extract(params, train_x), self._extract(params, test_x)
      feats = {spec: (train_f[spec], test_f[spec]) for spec in self._extract.specs}
    (_, train_y), (_, test_y) = self.data
    logging.info("eval %s: features of %d + %d examples in %.1fs", name, len(train_y),
                 len(test_y), time.perf_counter() - start)
    results.update(self._evaluate(
        name, lambda spec: feats[spec] if spec in feats else self._raw()))
    return results

  def run_raw(self) -> dict[str, float]:
    """Every enabled evaluator of cached features on the raw input (features.py's 'pixels'):
    keys end in '/pixels', or '/logmel' for audio."""
    return self._evaluate(raw_baseline(self.config), lambda spec: self._raw())

  def run_with_baselines(self, params: Any, random_init: Callable[[], Any]) -> dict[str, float]:
    """The pretrained `params`, then the baselines `config.eval.baselines` names: the same
    encoder at random init (`random_init()` gives its params) and raw pixels. Logs a table."""
    results = self.run(params, self.config.eval.run_name)
    if "random_init" in self.config.eval.baselines:
      results.update(self.run(random_init(), "random_init"))
    if raw_baseline(self.config) in self.config.eval.baselines:
      results.update(self.run_raw())
    if results:
      logging.info("top-1 on %s/%s:\n%s", self.config.data.name, self.config.data.eval_split,
                   table(results))
    return results

  def _raw(self) -> tuple[np.ndarray, np.ndarray]:
    """The raw-input features of both splits, computed once."""
    if self._raw_features is None:
      self._raw_features = tuple(self._raw_of(inputs) for inputs, _ in self.data)
    return self._raw_features

  def _raw_of(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    if "image" in inputs:
      return features.pixels(inputs["image"])
    c = self.config
    return features.logmel_stats(inputs["audio"], inputs["audio_len"],
                                 logmel.FrontEnd.from_config(c.frontend, c.data.sample_rate))

  def _evaluate(self, name: str, source: Callable[[str], tuple[np.ndarray, np.ndarray]]
                ) -> dict[str, float]:
    (_, train_y), (_, test_y) = self.data
    results = {}
    for evaluator in self._cached:
      cfg = self.config.eval[evaluator]
      train_f, test_f = source(cfg.feature)
      start = time.perf_counter()
      out = EVALUATORS[evaluator].evaluate(cfg, (train_f, train_y), (test_f, test_y),
                                           self.config.data.num_classes, self.mesh)
      results.update({f"{key}/{name}": value for key, value in out.items()})
      logging.info("eval %s: %s in %.1fs: %s", name, evaluator, time.perf_counter() - start,
                   ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return results


def table(results: dict[str, float]) -> str:
  """'knn/pretrained': 0.9, 'knn/pixels': 0.8, ... -> a text table, a row per metric and a
  column per source."""
  rows, columns = {}, []
  for key, value in results.items():
    metric, _, source = key.rpartition("/")
    rows.setdefault(metric, {})[source] = value
    columns += [source] if source not in columns else []
  width = max(len(m) for m in rows)
  lines = [" " * width + "".join(f"  {c:>12}" for c in columns)]
  for metric, values in rows.items():
    lines.append(f"{metric:<{width}}" + "".join(
        f"  {values[c]:>12.4f}" if c in values else f"  {'-':>12}" for c in columns))
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
        mesh: jax.sharding.Mesh) -> dict[str, float]:
  """One-off: the enabled evaluators on `params`, keys ending in '/<config.eval.run_name>'."""
  return Suite(config, model, mesh).run(params, config.eval.run_name)
