"""Few-shot linear evaluation: a closed-form linear classifier from n examples per class.

The protocol of the ViT paper (Dosovitskiy et al. 2021, sec. 4.1: a regularised least-squares
regression from frozen features onto {-1, 1}^K targets), as big_vision evaluates it: for each n
in `cfg.shots`, draw n training examples of every class, fit the regression in closed form and
report top-1 of its argmax on the whole test set. With few labels, this is where pretraining
shows most clearly.

  - The draw depends on `cfg.seed` and n only, so every feature source (pretrained, random
    init, pixels) is fitted on the same images.
  - Features are centred on the n-shot set's mean (the fit has a bias) and scaled to a mean
    squared norm of 1, so one set of l2 strengths suits pixels and encoders of any width.
  - The l2 strength is picked from `cfg.l2_regs` by leave-one-out squared error on the n-shot
    set, which ridge regression gives in closed form from the hat matrix (one SVD serves every
    strength): the test set never chooses it. The best strength differs a lot between sources
    (about 1e-2 for a random-init encoder, 1 to 10 for pixels, on digits). For n = 1, leaving
    one out removes a whole class, and the error then favours the strongest l2 (a constant
    prediction); so 1-shot uses the strength chosen on the largest n-shot set.

This runs on the host in float64: the n-shot sets are small (n x classes rows).
"""

import jax
import ml_collections
import numpy as np
from absl import logging


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int
                 ) -> np.ndarray | None:
  """Indices of `shots` examples of each class, drawn without replacement (grouped by class);
  None when some class has fewer examples than that."""
  rng = np.random.default_rng([seed, shots])
  picked = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      return None
    picked.append(rng.choice(members, shots, replace=False))
  return np.concatenate(picked)


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


def evaluate(cfg: ml_collections.ConfigDict, train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], num_classes: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """{'few_shot/<n>shot': top-1} for each n in cfg.shots that every class has enough
  training examples for (the others are skipped with a warning)."""
  del mesh  # closed form on the host
  top1, largest_l2 = {}, None
  for n in sorted(cfg.shots, reverse=True):  # the largest first: 1-shot reuses its l2
    idx = sample_shots(train[1], n, num_classes, cfg.seed)
    if idx is None:
      logging.warning("few-shot: skipping %d-shot, some class has fewer than %d of the %d "
                      "training examples (raise eval.max_examples)", n, n, len(train[1]))
      continue
    if n == 1 and largest_l2 is None:
      raise ValueError("1-shot needs a larger n in eval.few_shot.shots to choose its l2")
    targets = 2 * np.eye(num_classes)[train[1][idx]] - 1
    model = fit_ridge(train[0][idx], targets, cfg.l2_regs if n > 1 else [largest_l2])
    largest_l2 = model["l2"] if largest_l2 is None else largest_l2
    top1[n] = float((predict(model, test[0]) == test[1]).mean())
  return {f"few_shot/{n}shot": top1[n] for n in cfg.shots if n in top1}
