"""Input: sources of images (digits, synthetic, tfds, folders) and audio (spoken digits, synthetic,
tfds, folders), augmentation, the log-mel front end, grain pipelines."""

from mim_jax.data.pipeline import eval_arrays
from mim_jax.data.pipeline import train_iterator
from mim_jax.data.sources import get_source

__all__ = ["eval_arrays", "get_source", "train_iterator"]
