"""Top-1 accuracy of a classifier's own predictions on the whole eval split (fine-tuning).

Unlike the probes, which fit on cached features of small splits, this reads a feature that is
already a prediction ('logits' of a fine-tuned model, argmax over classes), so it needs no
training split and streams the eval split batch by batch: ImageNet's 50k validation images never
sit in memory at once (30 GB as float32 at 224 px).
"""

from typing import Callable, Iterable

import ml_collections
import numpy as np

STREAMED = True  # The suite feeds `evaluate` batches of the eval split, not cached features.


def evaluate(cfg: ml_collections.ConfigDict,
             extract: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
             batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray]]) -> dict[str, float]:
  """{'top1': accuracy} of argmax(feature `cfg.feature`) against the labels, over `batches` of
  (inputs, labels); `extract(inputs)` gives the model's features of a batch."""
  correct, total = 0, 0
  for inputs, labels in batches:
    predictions = extract(inputs)[cfg.feature].argmax(axis=-1)
    correct += int((predictions == labels).sum())
    total += len(labels)
  if not total:
    raise ValueError("top1: the eval split is empty")
  return {"top1": correct / total}
