"""Few-shot linear evaluation: a closed-form linear classifier from n examples per class.

For each n in `cfg.shots`, draw n training examples of every class, regress their frozen
features onto {-1, 1}^K targets (the ViT paper's protocol, Dosovitskiy et al. 2021, sec. 4.1)
and report top-1 of the argmax on the whole test set. With few labels, this is where
pretraining shows most clearly. `cfg.protocol` picks how the regression is set up:

  - 'big_vision': big_vision's evaluator (big_vision/evaluators/fewshot_lsr.py). Each feature
    dimension is whitened with the n-shot set's mean and std (+ 1e-5), a constant feature of
    100 is appended as the bias (so large that the l2 barely touches it), and one fixed l2
    (2^10) serves every source. Per seed s, each class's examples are shuffled once by
    np.random.default_rng(s) and every n takes the first n, so the n-shot sets are nested.
  - 'ridge_loo' (the default, mim_jax's own): features are centred on the n-shot set's mean
    (the fit has an unregularised bias) and scaled to a mean squared norm of 1, and the l2 is
    picked from `l2_regs` by leave-one-out squared error on the n-shot set, which ridge
    regression gives in closed form from the hat matrix (one SVD serves every strength): the
    test set never chooses it. The best strength differs a lot between sources (about 1e-2
    for a random-init encoder, 1 to 10 for pixels, on digits). For n = 1, leaving one out
    removes a whole class and the error then favours the strongest l2 (a constant
    prediction), so 1-shot uses the strength chosen on the largest n-shot set. Each n is drawn
    independently of the others, from the seed and n.

Seeds are `cfg.seed`, `cfg.seed + 1`, ... (`num_seeds` of the protocol's section); with seed 0
and 'big_vision' they are big_vision's seeds, and on the same labels its draws. A draw depends
on the labels and the seed only, so every feature source (pretrained, random init, pixels) is
fitted on the same images. 'few_shot/<n>shot' is the mean top-1 over the seeds and, with more
than one seed, 'few_shot/<n>shot_std' their sample std (big_vision logs each seed's top-1 and
leaves the averaging to its readers).

This runs on the host in float64 (big_vision: float32 on the host CPU); the n-shot sets are
small (n x classes rows).
"""

import jax
import ml_collections
import numpy as np
from absl import logging

from mim_jax.registry import Registry

# big_vision/evaluators/fewshot_lsr.py: BIAS_CONSTANT, and the 1e-5 added to the std.
BIAS_FEATURE = 100.0
STD_EPSILON = 1e-5


def pm1_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """One-hot targets mapped to {-1, 1}: [N, num_classes]."""
  return 2 * np.eye(num_classes)[labels] - 1


# ---------------------------------------------------------------------------------------------
# 'ridge_loo'
# ---------------------------------------------------------------------------------------------

def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
  """Indices of `shots` examples of each class, drawn without replacement (grouped by class)."""
  rng = np.random.default_rng([seed, shots])
  return np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                         for c in range(num_classes)])


def fit_ridge(x: np.ndarray, targets: np.ndarray, l2_regs) -> dict:
  """Ridge regression with a bias, for each l2 strength; returns the one with the lowest
  leave-one-out squared error: {'mean', 'scale', 'w' [D, C], 'bias' [C], 'l2', 'loo_error'}."""
  x = np.asarray(x, np.float64)
  mean = x.mean(0)
  xc = x - mean
  scale = np.sqrt((xc ** 2).sum(1).mean()) or 1.0
  xc /= scale
  bias = targets.mean(0)
  yc = targets - bias
  u, s, vt = np.linalg.svd(xc, full_matrices=False)
  uty = u.T @ yc
  best = None
  for l2 in l2_regs:
    shrink = s ** 2 / (s ** 2 + l2)
    fitted = u @ (shrink[:, None] * uty)                 # = xc @ w
    leverage = 1 / len(x) + (u ** 2) @ shrink           # diagonal of the hat matrix
    loo = (yc - fitted) / np.maximum(1 - leverage, 1e-12)[:, None]
    error = float((loo ** 2).mean())
    if best is None or error < best["loo_error"]:
      w = vt.T @ ((s / (s ** 2 + l2))[:, None] * uty)
      best = {"mean": mean, "scale": scale, "w": w, "bias": bias, "l2": l2, "loo_error": error}
  return best


def predict(model: dict, x: np.ndarray) -> np.ndarray:
  """Class predictions [N] of a fitted ridge classifier."""
  x = (np.asarray(x, np.float64) - model["mean"]) / model["scale"]
  return (x @ model["w"] + model["bias"]).argmax(-1)


def ridge_loo(settings: ml_collections.ConfigDict, train: tuple[np.ndarray, np.ndarray],
              test: tuple[np.ndarray, np.ndarray], num_classes: int, shots: list[int],
              seed: int) -> dict[int, float]:
  """{n: top-1} of one seed's draws, the l2 chosen by leave-one-out (1-shot: the largest n's)."""
  top1, largest_l2 = {}, None
  for n in sorted(shots, reverse=True):  # the largest first: 1-shot reuses its l2
    if n == 1 and largest_l2 is None:
      raise ValueError("1-shot needs a larger n in eval.few_shot.shots to choose its l2")
    idx = sample_shots(train[1], n, num_classes, seed)
    model = fit_ridge(train[0][idx], pm1_targets(train[1][idx], num_classes),
                      settings.l2_regs if n > 1 else [largest_l2])
    largest_l2 = model["l2"] if largest_l2 is None else largest_l2
    top1[n] = float((predict(model, test[0]) == test[1]).mean())
  return top1


# ---------------------------------------------------------------------------------------------
# 'big_vision'
# ---------------------------------------------------------------------------------------------

def nested_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
  """The first `shots` of each class's examples in one seeded shuffle per class, grouped by
  class: the n-shot sets of a seed are nested. The draws of big_vision on the same labels."""
  rng = np.random.default_rng(seed)
  shuffled = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  return np.concatenate([members[:shots] for members in shuffled])


def whiten_with_bias(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(x - mean) / std per dimension, with the constant bias feature appended: [N, D + 1]."""
  x = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)


def fit_whitened(x: np.ndarray, targets: np.ndarray, l2: float) -> dict:
  """Least squares with a fixed l2 on whitened features plus the bias feature:
  {'mean' [D], 'std' [D], 'w' [D + 1, C]}."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(0), x.std(0) + STD_EPSILON
  xb = whiten_with_bias(x, mean, std)
  n, d = xb.shape
  # The smaller of the two Gram matrices (as big_vision does): (X'X + l2 I)^-1 X'Y when
  # N >= D, else X' (XX' + l2 I)^-1 Y; the two are equal.
  if n >= d:
    w = np.linalg.solve(xb.T @ xb + l2 * np.eye(d), xb.T @ targets)
  else:
    w = xb.T @ np.linalg.solve(xb @ xb.T + l2 * np.eye(n), targets)
  return {"mean": mean, "std": std, "w": w}


def big_vision(settings: ml_collections.ConfigDict, train: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], num_classes: int, shots: list[int],
               seed: int) -> dict[int, float]:
  """{n: top-1} of one seed's nested draws, every n fitted with the fixed `settings.l2_reg`."""
  top1 = {}
  for n in shots:
    idx = nested_shots(train[1], n, num_classes, seed)
    model = fit_whitened(train[0][idx], pm1_targets(train[1][idx], num_classes),
                         settings.l2_reg)
    scores = whiten_with_bias(test[0], model["mean"], model["std"]) @ model["w"]
    top1[n] = float((scores.argmax(-1) == test[1]).mean())
  return top1


# name -> (settings, train, test, num_classes, shots, seed) -> {n: top-1}; each has a section
# `config.eval.few_shot.<name>` holding at least `num_seeds`.
PROTOCOLS = Registry("few-shot protocol", {"ridge_loo": ridge_loo, "big_vision": big_vision})


def evaluate(cfg: ml_collections.ConfigDict, train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], num_classes: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """{'few_shot/<n>shot': mean top-1 over the seeds (and '..._std' for more than one)} for
  each n in cfg.shots that every class has enough training examples for (the others are
  skipped with a warning)."""
  del mesh  # closed form on the host
  fewest = np.bincount(train[1], minlength=num_classes).min()
  shots = [n for n in cfg.shots if n <= fewest]
  if len(shots) < len(cfg.shots):
    logging.warning("few-shot: skipping %s-shot, some class has only %d of the %d training "
                    "examples (raise eval.max_examples)",
                    ", ".join(str(n) for n in cfg.shots if n > fewest), fewest, len(train[1]))
  settings = cfg[cfg.protocol]
  runs = [PROTOCOLS[cfg.protocol](settings, train, test, num_classes, shots, cfg.seed + s)
          for s in range(settings.num_seeds)]
  results = {}
  for n in shots:
    top1 = [run[n] for run in runs]
    results[f"few_shot/{n}shot"] = float(np.mean(top1))
    if len(top1) > 1:
      results[f"few_shot/{n}shot_std"] = float(np.std(top1, ddof=1))
  return results
