"""Pretrained weights: mim_jax workdirs, official MAE .pth files and .npz exports load into the
config's model; the import is proved against a PyTorch MAE written here; mismatches name the
parameters; position embeddings are resampled for another grid.

The PyTorch MAE below is written for this test from the paper (He et al. 2021) and the names of
the released checkpoints (timm's ViT naming): patch_embed.proj, cls_token, pos_embed,
blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, decoder_embed,
mask_token, decoder_pos_embed, decoder_blocks.i..., decoder_norm, decoder_pred.
"""

import argparse
import copy
import json
import math
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_vit
from conftest import MICRO_MAE
from conftest import REPO
from conftest import no_evals
from conftest import random_images
from conftest import run_module
from mim_jax import checkpoint
from mim_jax import errors
from mim_jax import evaluate
from mim_jax import masking
from mim_jax import methods
from mim_jax import optim
from mim_jax import pretrained
from mim_jax import pth
from mim_jax import sharding
from mim_jax import train
from mim_jax import tree_paths
from mim_jax.data import pipeline
from mim_jax.models import layers
from mim_jax.tools import export

# Three channels (synthetic data) so the patch-embedding and pixel orders are exercised; two
# heads in encoder and decoder so the head split is.
ARG = "variant=Mu/4,decoder=2x64,image_size=16,batch_size=16,data=synthetic"


def make_config(arg: str = ARG, **model):
  config = mae_vit.get_config(arg)
  config.model.update(model)
  return config


# ---------------------------------------------------------------------------------------------
# A PyTorch MAE, written for this test.
# ---------------------------------------------------------------------------------------------

def torch_mae(width, depth, heads, dec_width, dec_depth, dec_heads, patch, grid, channels):
  """Returns (module, forward functions). Built lazily so only tests that need torch import it."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  def sincos(d, side):
    """[1 + side*side, d]: zero cls row, then [sin, cos] of the column, then of the row, with
    frequencies 1 / 10000^(k / (d/4)) (MAE sec. A.1)."""
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    row, col = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                              torch.arange(side, dtype=torch.float64), indexing="ij")
    enc = lambda pos: torch.cat([torch.sin(pos.reshape(-1, 1) * omega),
                                 torch.cos(pos.reshape(-1, 1) * omega)], 1)
    table = torch.cat([enc(col), enc(row)], 1).float()
    return torch.cat([torch.zeros(1, d), table])[None]

  class SelfAttention(nn.Module):
    def __init__(self, d, h):
      super().__init__()
      self.h = h
      self.qkv = nn.Linear(d, 3 * d)
      self.proj = nn.Linear(d, d)

    def forward(self, x):
      b, n, d = x.shape
      q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
      weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h), dim=-1)
      return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))

  class Mlp(nn.Module):
    def __init__(self, d):
      super().__init__()
      self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      return self.fc2(nn.functional.gelu(self.fc1(x)))

  class Block(nn.Module):
    def __init__(self, d, h):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
      self.attn, self.mlp = SelfAttention(d, h), Mlp(d)

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class PatchEmbed(nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(channels, width, patch, stride=patch)

  class MAE(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed()
      self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
      self.pos_embed = nn.Parameter(sincos(width, grid), requires_grad=False)
      self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.decoder_embed = nn.Linear(width, dec_width)
      self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dec_width))
      self.decoder_pos_embed = nn.Parameter(sincos(dec_width, grid), requires_grad=False)
      self.decoder_blocks = nn.ModuleList(Block(dec_width, dec_heads) for _ in range(dec_depth))
      self.decoder_norm = nn.LayerNorm(dec_width, eps=1e-6)
      self.decoder_pred = nn.Linear(dec_width, patch * patch * channels)
      with torch.no_grad():  # Non-zero biases and norm scales, so a mix-up would show.
        for name, p in self.named_parameters():
          if name.endswith(("bias", "norm1.weight", "norm2.weight", "norm.weight")):
            p.add_(0.1 * torch.randn_like(p))

    def encode(self, images, ids_keep=None):
      """images [B, C, H, W] -> (normed tokens, pre-norm last block output)."""
      x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
      if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
      cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
      x = torch.cat([cls, x], 1)
      for block in self.blocks:
        x = block(x)
      return self.norm(x), x

    def decode(self, latent, ids_restore):
      x = self.decoder_embed(latent)
      b, n = ids_restore.shape
      tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - x.shape[1] + 1, -1)], 1)
      tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
      x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
      for block in self.decoder_blocks:
        x = block(x)
      return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, images, pred, mask):
      b, c, h, w = images.shape
      t = images.reshape(b, c, h // patch, patch, w // patch, patch)
      t = t.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), -1)
      t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
      per_patch = ((pred - t) ** 2).mean(-1)
      return (per_patch * mask).sum() / mask.sum()

  return MAE()


def torch_random_mask(noise, keep):
  """MAE's masking from given noise: argsort, keep the first `keep`, restore by argsort."""
  import torch  # pylint: disable=g-import-not-at-top
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  mask = torch.ones_like(noise)
  mask[:, :keep] = 0
  return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """A PyTorch MAE with random weights, saved as the releases are ({'model': state_dict}),
  plus what MAE's training checkpoints also hold (optimizer state, the argparse namespace)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  config = make_config()
  model = torch_mae(64, 2, 2, 64, 2, 2, 4, 4, 3).eval()
  path = tmp_path_factory.mktemp("official") / "mae_full.pth"
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  torch.save({"model": state, "epoch": 1, "args": argparse.Namespace(model="mae_vit_mu"),
              "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}}, path)
  return config, model, state, path


# ---------------------------------------------------------------------------------------------
# Official MAE checkpoints.
# ---------------------------------------------------------------------------------------------

def test_official_mae_matches_pytorch_features_decoder_and_loss(official):
  import torch  # pylint: disable=g-import-not-at-top
  config, model, _, path = official
  params = pretrained.load_params(str(path), config)
  mae = methods.build(config)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  noise = rng.uniform(size=(3, 16)).astype(np.float32)
  keep = masking.num_visible(16, config.mask.ratio)
  mask = masking.keep_lowest(jnp.asarray(noise), keep)
  ids_keep_t, ids_restore_t, mask_t = torch_random_mask(torch.from_numpy(noise), keep)
  np.testing.assert_array_equal(mask.ids_keep, ids_keep_t.numpy())
  np.testing.assert_array_equal(mask.ids_restore, ids_restore_t.numpy())
  np.testing.assert_array_equal(mask.mask, mask_t.numpy())

  variables = {"params": params}  # Eager: faster than compiling for a model this small.
  features = mae.apply(variables, images, method=mae.features)
  latent = mae.apply(variables, images, mask.ids_keep,
                     method=lambda m, x, ids: m.encoder(x, ids)[0])
  pred, _ = mae.apply(variables, images, mask, method=mae.predict)
  loss, _ = mae.apply(variables, images, mask=mask)
  with torch.no_grad():
    full_t, last_block_t = model.encode(images_t)
    latent_t, _ = model.encode(images_t, ids_keep_t)
    pred_t = model.decode(latent_t, ids_restore_t)
    loss_t = model.loss(images_t, pred_t, mask_t)

  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=2e-5)
  close(features["block_1"], last_block_t)
  close(features["cls"], full_t[:, 0])
  close(features["gap"], full_t[:, 1:].mean(1))
  close(latent, latent_t)
  close(pred, pred_t)
  np.testing.assert_allclose(float(loss), float(loss_t), rtol=1e-5)


def test_learned_posemb_and_cls_position_load_exactly(official, tmp_path):
  """A fine-tuned-style checkpoint: learned pos_embed, non-zero at the cls position. With
  model.posemb='learned' the encoder matches PyTorch; cls's position folds into the token."""
  import torch  # pylint: disable=g-import-not-at-top
  config, model, state, _ = official
  state = dict(state, pos_embed=0.1 * torch.randn_like(state["pos_embed"]))
  path = tmp_path / "learned.pth"
  torch.save({"model": state}, path)
  config = make_config(posemb="learned")
  params = pretrained.load_encoder_params(str(path), config)
  assert params["pos_embedding"].shape == (1, 16, 64)
  encoder = methods.build(config).encoder
  images = random_images((2, 16, 16, 3), seed=1)
  _, aux = encoder.apply({"params": params}, images)
  model = copy.deepcopy(model)
  with torch.no_grad():
    model.pos_embed.copy_(state["pos_embed"])
    full_t, _ = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(aux["cls"], full_t[:, 0].numpy(), rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(aux["gap"], full_t[:, 1:].mean(1).numpy(), rtol=1e-5, atol=2e-5)

  # At 24 px (a 6x6 grid) the table is resampled from the checkpoint's 4x4 one.
  wide = pretrained.load_encoder_params(str(path), make_config(
      ARG.replace("image_size=16", "image_size=24"), posemb="learned"))
  np.testing.assert_allclose(wide["pos_embedding"], pretrained.resample_posemb(
      state["pos_embed"][:, 1:].numpy(), (6, 6)), rtol=1e-6)


def test_encoder_only_release_loads_as_encoder(official, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  config, _, state, full_path = official
  encoder_state = {k: v for k, v in state.items()
                   if not k.startswith(("decoder", "mask_token"))}
  path = tmp_path / "mae_pretrain.pth"
  torch.save({"model": encoder_state}, path)
  encoder = pretrained.load_encoder_params(str(path), config)
  expected = pretrained.load_params(str(full_path), config)["encoder"]
  jax.tree.map(np.testing.assert_array_equal, encoder, expected)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"missing from checkpoint: decoder/blocks.*load_encoder_params"):
    pretrained.load_params(str(path), config)
  # --mode=eval on the encoder-only file: the evaluators need the encoder alone.
  config.eval.init_from = str(path)
  config.eval.knn.enabled = True
  config.eval.max_examples = 64
  results = evaluate.run(config, str(tmp_path / "eval"))
  assert 0.0 <= results["knn/pretrained"] <= 1.0
  saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert saved["knn/pretrained"] == results["knn/pretrained"] and saved["source"] == str(path)


def test_wrong_names_and_shapes_are_listed(official, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  config, _, state, _ = official
  state = dict(state)
  state["blocks.1.mlp.fc_1.weight"] = state.pop("blocks.1.mlp.fc1.weight")
  state["norm.weight"] = torch.ones(32)
  path = tmp_path / "wrong.pth"
  torch.save({"model": state}, path)
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    pretrained.load_params(str(path), config)
  message = str(error.value)
  assert "missing from checkpoint: encoder/blocks/block_1/mlp/fc1/kernel" in message
  assert "unexpected in checkpoint: blocks.1.mlp.fc_1.weight" in message
  assert "encoder/norm/scale: saved [32] vs model [64]" in message
  # Another model's config: every difference is named.
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"missing from checkpoint: .*encoder/blocks/block_10/.*in all"):
    pretrained.load_params(str(path), make_config(ARG.replace("Mu/4", "Ti/4")))


def test_pth_reader_needs_no_torch_and_reads_every_layout(official):
  """The .pth reader matches torch.load on strided, offset, half and bf16 tensors, and never
  imports torch itself."""
  import torch  # pylint: disable=g-import-not-at-top
  _, _, state, path = official
  arrays = pth.read_state_dict(str(path), lambda obj: obj["model"])
  assert sorted(arrays) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(arrays[name], value.numpy())
  source = REPO / "mim_jax" / "pth.py"
  assert "import torch" not in source.read_text()

  odd = {"t": torch.arange(12.0).reshape(3, 4).t(), "view": torch.arange(10.0)[3:7],
         "half": torch.randn(2, 3).half(), "bf16": torch.randn(5).bfloat16(),
         "int": torch.tensor([1, 2], dtype=torch.int64)}
  odd_path = path.parent / "odd.pt"
  torch.save(odd, odd_path)
  got = pth.read_state_dict(str(odd_path))
  for name, value in odd.items():
    np.testing.assert_array_equal(got[name].astype(np.float32), value.float().numpy())


def test_unreadable_pth_files_are_told_apart_in_one_line(official, tmp_path):
  """A missing file, a download cut short, a damaged tensor and PyTorch < 1.6's legacy format
  each get their own advice, in one line, on --mode=eval's path as on pth's."""
  import torch  # pylint: disable=g-import-not-at-top
  config, _, state, path = official
  model_only = lambda obj: obj["model"]

  def refused(error_type, file, match):
    with pytest.raises(error_type) as raised:
      pth.read_state_dict(str(file), model_only)
    assert re.fullmatch(match, errors.describe(raised.value)), errors.describe(raised.value)

  refused(FileNotFoundError, tmp_path / "nope.pth", rf"{tmp_path}/nope.pth does not exist: .*")

  data = path.read_bytes()
  truncated = tmp_path / "truncated.pth"
  for size in (len(data) // 2, 2, 0):
    truncated.write_bytes(data[:size])
    refused(pth.CorruptFileError, truncated,
            rf"{truncated} is truncated \({size} bytes: .*\): download or copy it again")
  # --mode=eval's path: refused while loading, before any evaluator runs.
  truncated.write_bytes(data[:len(data) // 2])
  config = copy.deepcopy(config)
  config.eval.init_from = str(truncated)
  with pytest.raises(pth.CorruptFileError, match="is truncated"):
    evaluate.run(config, str(tmp_path / "eval"))

  # One byte flipped inside the largest tensor: the archive is whole, its CRC check fails.
  with zipfile.ZipFile(path) as archive:
    entry = max(archive.infolist(), key=lambda info: info.file_size)
  name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26:
                                                 entry.header_offset + 30])
  start = entry.header_offset + 30 + name_len + extra_len  # torch stores entries uncompressed
  flipped = bytearray(data)
  flipped[start + entry.file_size // 2] ^= 0xFF
  damaged = tmp_path / "damaged.pth"
  damaged.write_bytes(bytes(flipped))
  refused(pth.CorruptFileError, damaged,
          rf"{damaged} is corrupt \(Bad CRC-32 .*\): download or copy it again")

  legacy = tmp_path / "legacy.pth"
  torch.save({"model": state}, legacy, _use_new_zipfile_serialization=False)
  refused(pth.UnsupportedFormatError, legacy,
          rf"{legacy} is not a zip-format PyTorch checkpoint \(files from PyTorch < 1.6 .*\): "
          rf"re-save it with a recent torch, .*")


# ---------------------------------------------------------------------------------------------
# Position embeddings.
# ---------------------------------------------------------------------------------------------

def test_resample_posemb_is_exact_inside_for_linear_tables_and_identity_on_same_grid():
  old, new, d = 8, 12, 3
  rows, cols = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
  table = np.stack([rows, cols, 2 * rows - cols + 1], -1).reshape(old * old, d).astype(np.float32)
  np.testing.assert_array_equal(pretrained.resample_posemb(table, (old, old)), table)
  out = pretrained.resample_posemb(table[None], (new, new))
  assert out.shape == (1, new * new, d)
  # New patch centres in old-grid coordinates (same image extent, half-pixel centres).
  coord = (np.arange(new) + 0.5) * old / new - 0.5
  inside = (coord >= 1) & (coord <= old - 2)  # the whole cubic support lies in the grid
  r, c = np.meshgrid(coord, coord, indexing="ij")
  linear = np.stack([r, c, 2 * r - c + 1], -1)
  got = out[0].reshape(new, new, d)
  np.testing.assert_allclose(got[inside][:, inside], linear[inside][:, inside], atol=1e-5)


def test_learned_posemb_starts_as_sincos():
  """ViT(posemb='learned') at init computes exactly what the fixed sin-cos ViT computes."""
  learned = methods.build(make_config(posemb="learned")).encoder
  fixed = methods.build(make_config()).encoder
  images = random_images((2, 16, 16, 3), seed=2)
  params = learned.init(jax.random.key(0), images)["params"]
  np.testing.assert_array_equal(params["pos_embedding"][0], layers.sincos_posemb_2d((4, 4), 64))
  without = {k: v for k, v in params.items() if k != "pos_embedding"}
  np.testing.assert_allclose(learned.apply({"params": params}, images)[0],
                             fixed.apply({"params": without}, images)[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# mim_jax workdirs and exports.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Two steps of MAE pretraining on digits, with the trainer's own checkpointing."""
  config = make_config(MICRO_MAE)
  config.total_steps = 2
  config.checkpoint.async_save = False
  no_evals(config)
  path = tmp_path_factory.mktemp("pretrained")
  train.train_and_evaluate(config, str(path))
  return config, path


def test_workdir_params_load_bit_exactly(workdir):
  config, path = workdir
  params = pretrained.load_params(str(path), config)
  # The trainer's own restore (into the 8-device shardings) is the reference.
  model, tx = methods.build(config), optim.build(config)
  mesh = sharding.make_mesh()
  abstract, _ = train.abstract_state(model, tx, config, mesh, jax.random.key(0))
  ckpt = checkpoint.Checkpointer(str(path), keep=3, async_save=False)
  try:
    state = ckpt.restore(2, abstract, pipeline.train_iterator(config))
  finally:
    ckpt.close()
  leaves = tree_paths.flatten(params)
  reference = tree_paths.flatten(jax.device_get(state.params))
  assert sorted(leaves) == sorted(reference)
  for name, value in reference.items():
    assert isinstance(leaves[name], np.ndarray) and leaves[name].dtype == value.dtype
    np.testing.assert_array_equal(leaves[name], value, err_msg=name)
  encoder = pretrained.load_encoder_params(str(path), config)
  assert encoder.keys() == params["encoder"].keys()
  # A relative workdir, as `make demo` passes init_from=workdirs/demo (orbax wants absolute).
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(path.parent)
    relative = pretrained.load_encoder_params(path.name, config)
  jax.tree.map(np.testing.assert_array_equal, relative, encoder)

  # Into a learned-posemb model at 24 px: the table is the sin-cos the encoder was trained with.
  wide = make_config(MICRO_MAE.replace("image_size=16", "image_size=24"), posemb="learned")
  learned = pretrained.load_encoder_params(str(path), wide)
  np.testing.assert_array_equal(learned["pos_embedding"][0], layers.sincos_posemb_2d((6, 6), 64))

  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"encoder/patch_embed/kernel: "
                     r"saved \[4, 4, 1, 64\] vs model \[8, 8, 1, 64\]"):
    pretrained.load_params(str(path), make_config(MICRO_MAE.replace("Mu/4", "Mu/8")))


def test_export_npz_round_trip(workdir, tmp_path):
  config, path = workdir
  out = tmp_path / "encoder.npz"
  meta = export.export(str(path), config, str(out))
  assert meta["grid"] == [4, 4] and meta["posemb"] == "sincos"
  with np.load(out) as data:
    names = set(data.files)
    assert json.loads(str(data["__meta__"]))["what"] == "encoder"
    assert data["__posemb__"].shape == (17, 64)
  assert "encoder/blocks/block_0/attn/qkv/kernel" in names
  assert not any(n.startswith("decoder/") for n in names)
  jax.tree.map(np.testing.assert_array_equal, pretrained.load_encoder_params(str(out), config),
               pretrained.load_encoder_params(str(path), config))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="missing from checkpoint: decoder"):
    pretrained.load_params(str(out), config)


def test_export_command_line_on_an_official_checkpoint(official, tmp_path):
  _, _, _, path = official
  out = tmp_path / "vit.npz"
  result = run_module("mim_jax.tools.export", f"--source={path}", f"--out={out}",
                      f"--config={REPO / 'configs' / 'mae_vit.py'}:{ARG}", "--what=all")
  assert result.returncode == 0, result.stderr[-2000:]
  with np.load(out) as data:
    assert "decoder/pred/kernel" in data.files
    np.testing.assert_array_equal(
        data["encoder/patch_embed/kernel"],
        pretrained.load_params(str(path), make_config())["encoder"]["patch_embed"]["kernel"])
