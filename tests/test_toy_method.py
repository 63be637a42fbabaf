"""The trainer is modality-agnostic: a test-only method on 1-D sequences with a padding mask
(no image anywhere) trains through the real trainer on 8 fake devices, with its own data
source, and resumes exactly. It is registered by name, as any new method or source would be:
one method module and one source in the registries, no trainer change."""

import json
import shutil
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import mae_vit
from mim_jax import masking
from mim_jax import methods
from mim_jax import train
from mim_jax.data import sources

FRAMES, FEATURES, SOURCE_SIZE = 16, 4, 64


class MaskedFrames(nn.Module):
  """Masked frame modeling: half the valid frames become a learned token, a per-frame MLP over
  each frame and its two neighbours predicts them, MSE on masked valid frames only."""

  @nn.compact
  def __call__(self, frames: jax.Array, frame_mask: jax.Array, *, train: bool = True):
    del train
    b, t, f = frames.shape
    mask = masking.random_mask(self.make_rng("mask"), b, (t, 1), 0.5).mask  # 1 = hidden
    hidden = mask * frame_mask
    token = self.param("mask_token", nn.initializers.normal(0.02), (f,))
    x = frames * (1 - hidden[..., None]) + token * hidden[..., None]
    x = x * frame_mask[..., None]  # padding reads as zeros, whatever the data holds there
    neighbours = [jnp.roll(x, 1, axis=1), x, jnp.roll(x, -1, axis=1)]
    h = nn.gelu(nn.Dense(32)(jnp.concatenate(neighbours, -1)))
    pred = nn.Dense(f)(h)
    per_frame = ((pred - frames) ** 2).mean(-1)
    loss = (per_frame * hidden).sum() / jnp.maximum(hidden.sum(), 1)
    return loss, {"hidden_frames": hidden.sum(1).mean()}


TOY_METHOD = SimpleNamespace(
    build=lambda config: MaskedFrames(),
    inputs=lambda config: {"frames": jax.ShapeDtypeStruct((FRAMES, FEATURES), jnp.float32),
                           "frame_mask": jax.ShapeDtypeStruct((FRAMES,), jnp.bool_)},
    train_flops_per_example=lambda config: 3 * 2 * FRAMES * (3 * FEATURES * 32 + 32 * FEATURES),
    validate=lambda config: None,
)


class SequenceSource:
  """Noisy sinusoids of random frequency and phase, padded after a random length."""

  def __init__(self, split: str):
    self._seed = 0 if split == "train" else 1

  def __len__(self) -> int:
    return SOURCE_SIZE

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self._seed, index))
    t = np.arange(FRAMES)[:, None]
    freq, phase = rng.uniform(0.2, 0.6, FEATURES), rng.uniform(0, 6.3, FEATURES)
    frames = np.sin(freq * t + phase) + 0.05 * rng.normal(size=(FRAMES, FEATURES))
    length = rng.integers(FRAMES // 2, FRAMES + 1)
    frames[length:] = 0.0
    return {"frames": frames.astype(np.float32), "frame_mask": np.arange(FRAMES) < length,
            "label": np.int32(0)}

  def train_transform(self, config: ml_collections.ConfigDict):
    del config
    return lambda record, rng: record  # no augmentation


def register_toy(monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setitem(methods.METHODS, "toy_frames", TOY_METHOD)
  monkeypatch.setitem(sources.SOURCES, "toy_sequences",
                      lambda arg, data, split, image_size: SequenceSource(split))


@pytest.fixture
def toy_registered(monkeypatch):
  register_toy(monkeypatch)


def toy_config(total_steps: int) -> ml_collections.ConfigDict:
  config = mae_vit.get_config("variant=Mu/4,decoder=1x32,data=digits,image_size=16,"
                              "batch_size=16")
  config.method.name = "toy_frames"
  config.data.name = "toy_sequences"
  config.total_steps = total_steps
  config.log_every_steps = 1
  config.optim.warmup_steps = 2
  config.optim.base_lr = 4.0  # peak 0.25
  config.checkpoint.every_steps = 10
  config.checkpoint.async_save = False
  for name in ("knn", "linear_probe", "few_shot"):
    config.eval[name].enabled = False
  config.eval.baselines = ()
  config.eval.reconstruction_png = False
  return config


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_non_image_method_trains_and_resumes_exactly_on_8_devices(toy_registered, tmp_path):
  assert jax.device_count() == 8
  workdir = tmp_path / "toy"
  results = train.train_and_evaluate(toy_config(40), str(workdir))
  first = losses(workdir)
  assert sorted(first) == list(range(1, 41))
  assert np.mean([first[s] for s in range(31, 41)]) < 0.6 * np.mean([first[s] for s in
                                                                      range(1, 11)]), first
  assert results["loss"] == first[40] and 0 < results["mfu"]

  # Interrupt after step 30: drop the newest checkpoint (step 40) and the finished mark; the
  # rerun resumes at step 30 and must log exactly the losses it logged the first time.
  shutil.rmtree(workdir / "checkpoints" / "40")
  (workdir / "results.json").unlink()
  train.train_and_evaluate(toy_config(40), str(workdir))
  assert losses(workdir) == first
