"""Host-side image transforms in numpy and Pillow: MAE's train augmentation and the eval resize.

MAE pretrains with RandomResizedCrop(scale=(0.2, 1.0), bicubic) and a horizontal flip, and no
colour jitter (MAE sec. A.1). All randomness comes from an explicit np.random.Generator, which
grain's `random_map` seeds per element, so the pipeline is deterministic and resumable.
"""

import dataclasses
import math

import numpy as np
from PIL import Image

Record = dict[str, np.ndarray]


def _resize(image: np.ndarray, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
  """Bicubic-resizes the (left, top, right, bottom) box of a uint8 HWC image to size x size."""
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  # Resizing from a box crops and resizes in one pass, without a copy of the crop.
  out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, box=box))
  return out.reshape(size, size, channels)


def crop_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
             ratio: tuple[float, float], attempts: int = 10) -> tuple[int, int, int, int]:
  """Samples RandomResizedCrop's (left, top, right, bottom) box.

  The crop covers a uniform fraction `scale` of the image area with a log-uniform aspect ratio
  (width / height) in `ratio`. A draw that does not fit is retried; after `attempts` misses the
  crop is the largest centred box whose aspect ratio is clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, round(width / min(ratio))
  elif aspect > max(ratio):
    w, h = round(height * max(ratio)), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
  """MAE's train crop of a uint8 [H, W, C] image, bicubic-resized to [size, size, C]."""
  return _resize(image, size, crop_box(*image.shape[:2], rng, scale, ratio))


def center_resize(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """The eval transform: resize the shorter side to size / crop_fraction, then center crop.

  0.875 is the usual 256 -> 224 margin for photos. An image whose shorter side is below `size`
  (digits, CIFAR) has no margin to spare, so it is only resized: its center square -> size.
  """
  height, width = image.shape[:2]
  short = min(height, width)
  # The crop, in input pixels, that maps onto size x size output pixels.
  side = short * crop_fraction if short > size else short
  top, left = (height - side) / 2, (width - side) / 2
  return _resize(image, size, (left, top, left + side, top + side))


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """uint8 [..., C] -> float32 (x / 255 - mean) / std, with per-channel mean and std."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (image.astype(np.float32) / 255 - mean) / std


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Record -> augmented, normalised record; a picklable callable for grain's random_map."""
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  hflip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, record: Record, rng: np.random.Generator) -> Record:
    image = random_resized_crop(record["image"], rng, self.size, self.scale, self.ratio)
    if self.hflip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": normalize(image, self.mean, self.std), "label": record["label"]}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Record -> deterministically resized, normalised record."""
  size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, record: Record) -> Record:
    image = center_resize(record["image"], self.size)
    return {"image": normalize(image, self.mean, self.std), "label": record["label"]}
