"""The Hugging Face export (python -m mim_jax.tools.export --format=hf): transformers'
ViTMAEForPreTraining and ViTMAEModel load the directory and compute mim_jax's loss, predictions
and encoder output on the same images and the same masking noise; an encoder-only export is a
ViTMAEModel; configs other than MAE on a ViT are refused in one line.

transformers and torch are imported once, in the module's fixture: they take seconds to import.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from configs import hubert_conformer
from configs import mae_vit
from configs import simmim_vit
from conftest import MICRO_MAE
from conftest import random_images
from mim_jax import hf_export
from mim_jax import masking
from mim_jax import methods
from mim_jax import pretrained
from mim_jax import tree_paths
from mim_jax.models import layers
from mim_jax.tools import export

# Three channels (synthetic data), so the patch embedding's channel order is exercised, and a
# 64-wide decoder, so its two heads are (the encoder has two too).
ARG = MICRO_MAE.replace("decoder=1x32", "decoder=1x64").replace("data=digits", "data=synthetic")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A micro MAE with random params, none at its init value (non-zero biases, norm scales off
  1, so a mix-up would show), saved as an .npz source and exported with --format=hf twice: the
  whole MAE ('all') and the encoder alone ('encoder'). Drawn in numpy on the model's shapes:
  quicker than compiling its init."""
  transformers = pytest.importorskip("transformers")
  config = mae_vit.get_config(ARG)
  rng = np.random.default_rng(0)
  flat = {k: (k.endswith("/scale") + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
          for k, v in pretrained.expected_shapes(config).items()}
  root = tmp_path_factory.mktemp("hf")
  source = str(root / "mae.npz")
  pretrained.save_npz(source, flat, {})
  dirs = {what: root / what for what in ("all", "encoder")}
  for what, out in dirs.items():
    meta = export.export(source, config, str(out), what, "hf")
    assert meta["what"] == what and meta["format"] == export.FORMATS["hf"]
  return transformers, config, tree_paths.unflatten(flat), dirs


def load(cls, directory):
  """(model in eval mode, its loading report) from transformers' from_pretrained."""
  hf, info = cls.from_pretrained(str(directory), output_loading_info=True)
  return hf.eval(), info


def test_transformers_computes_mim_jax_loss_and_encoder_output(exported):
  import torch  # pylint: disable=g-import-not-at-top
  transformers, config, params, dirs = exported
  mae = methods.build(config)
  images = random_images((3, 16, 16, 3), seed=1)
  noise = np.random.default_rng(2).uniform(size=(3, 16)).astype(np.float32)
  mask = masking.keep_lowest(jnp.asarray(noise), masking.num_visible(16, config.mask.ratio))

  @jax.jit  # One compile: quicker than running the three eagerly.
  def forward(params, images, mask):
    variables = {"params": params}
    loss, _ = mae.apply(variables, images, mask=mask)
    pred, _ = mae.apply(variables, images, mask, method=mae.predict)
    latent = mae.apply(variables, images, mask.ids_keep,
                       method=lambda m, x, ids: m.encoder(x, ids)[0])
    return loss, pred, latent

  loss, pred, latent = forward(params, images, mask)

  pretraining, info = load(transformers.ViTMAEForPreTraining, dirs["all"])
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  encoder, info = load(transformers.ViTMAEModel, dirs["all"])
  assert not info["missing_keys"]
  assert info["unexpected_keys"] and all(k.startswith("decoder.") for k in info["unexpected_keys"])
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    out = pretraining(pixels, noise=torch.from_numpy(noise))
    hidden = encoder(pixels, noise=torch.from_numpy(noise)).last_hidden_state

  np.testing.assert_array_equal(out.mask.numpy(), mask.mask)
  np.testing.assert_array_equal(out.ids_restore.numpy(), mask.ids_restore)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-5)
  close(latent, hidden)  # cls and the visible patches, after the final norm
  close(pred, out.logits)
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)


def test_encoder_only_export_is_a_vitmae_model(exported):
  import torch  # pylint: disable=g-import-not-at-top
  transformers, _, _, dirs = exported
  assert json.loads((dirs["encoder"] / "config.json").read_text())["architectures"] == [
      "ViTMAEModel"]
  with safetensors.safe_open(str(dirs["encoder"] / "model.safetensors"), "np") as f:
    provenance = json.loads(f.metadata()["mim_jax"])
  source = str(dirs["encoder"].parent / "mae.npz")
  assert (provenance["what"], provenance["source"]) == ("encoder", source)
  encoder, info = load(transformers.ViTMAEModel, dirs["encoder"])
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  whole, _ = load(transformers.ViTMAEModel, dirs["all"])
  pixels = torch.from_numpy(random_images((2, 3, 16, 16), seed=3))
  noise = torch.rand(2, 16)
  with torch.no_grad():
    np.testing.assert_array_equal(encoder(pixels, noise=noise).last_hidden_state.numpy(),
                                  whole(pixels, noise=noise).last_hidden_state.numpy())
  # Asked for the pretraining model, transformers loads the encoder and names the decoder as
  # missing (left at its random initialisation): nothing is silently half-loaded.
  _, info = load(transformers.ViTMAEForPreTraining, dirs["encoder"])
  assert info["missing_keys"] and all(k.startswith("decoder.") for k in info["missing_keys"])
  assert not info["unexpected_keys"] and not info["mismatched_keys"]


def test_config_json_carries_what_mim_jax_computes():
  config = mae_vit.get_config(ARG)
  hf = hf_export.hf_config(config, with_decoder=True)
  assert hf["layer_norm_eps"] == layers.layer_norm("norm", jnp.float32, jnp.float32).epsilon
  assert (hf["hidden_act"], hf["mask_ratio"], hf["norm_pix_loss"]) == ("gelu", 0.75, True)
  assert (hf["num_channels"], hf["decoder_num_attention_heads"]) == (3, 2)
  config.model.exact_gelu = False
  assert hf_export.hf_config(config, with_decoder=True)["hidden_act"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize("posemb", ["sincos", "learned", "none"])
def test_position_table_is_written_and_unknown_params_are_refused(posemb):
  """The encoder's table is what mim_jax adds: a zero row for cls, then the patches' rows (the
  sin-cos layout itself is proved by the loss above)."""
  config = mae_vit.get_config(ARG)
  config.model.posemb = posemb
  flat = {k: np.full(v.shape, 0.5, np.float32)
          for k, v in pretrained.expected_shapes(config, encoder_only=True).items()}
  patches = {"sincos": layers.sincos_posemb_2d((4, 4), 64), "none": np.zeros((16, 64)),
             "learned": np.arange(16 * 64, dtype=np.float32).reshape(16, 64)}[posemb]
  if posemb == "learned":
    flat["encoder/pos_embedding"] = patches[None]
  tensors = hf_export.state_dict(flat, config)
  np.testing.assert_array_equal(tensors["embeddings.position_embeddings"],
                                np.concatenate([np.zeros((1, 64)), patches])[None])
  assert "embeddings.cls_token" in tensors and not any(k.startswith("vit.") for k in tensors)
  flat["encoder/blocks/block_0/gamma_1"] = np.ones(64, np.float32)
  with pytest.raises(ValueError, match=r"no place for \['encoder/blocks/block_0/gamma_1'\]"):
    hf_export.state_dict(flat, config)


@pytest.mark.parametrize("name", ["simmim_vit", "hubert_conformer", "mae_encoder_mask_tokens"])
def test_other_methods_are_refused_before_reading(name, tmp_path):
  if name == "mae_encoder_mask_tokens":
    config = mae_vit.get_config(ARG)
    config.method.encoder_mask_tokens = True
  else:
    config = {"simmim_vit": simmim_vit, "hubert_conformer": hubert_conformer}[name].get_config(
        "runlocal")
  out = tmp_path / "hf"
  # The source does not exist: the refusal comes before anything is read.
  with pytest.raises(ValueError, match=r"^the Hugging Face export \(--format=hf\) supports MAE "
                     r"on a ViT encoder \(configs/mae_vit.py.*\) only; this config has "):
    export.export(str(tmp_path / "missing.npz"), config, str(out), "all", "hf")
  assert not out.exists()
