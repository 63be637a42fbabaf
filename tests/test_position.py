"""Tests of masked position prediction (MP3, Zhai et al. 2022; mim_jax/methods/position.py):
it learns on real digits, the sharded step equals the 1-device step, keys and values really come
from the context patches only, no position information reaches the encoder, the encoder is the
config's vit.ViT(posemb='none'), the analytic FLOPs match the traced matmuls, and bad configs
fail with a clear message. (layers.Attention's kv_ids, which carries the context, is checked
against a brute-force masked attention in tests/test_models.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import position_vit
from mim_jax import config_validation
from mim_jax import flops
from mim_jax import methods
from mim_jax import models
from mim_jax import optim
from mim_jax import sharding
from mim_jax import train
from mim_jax.data import pipeline
from mim_jax.evaluators import features
from mim_jax.models import layers
from mim_jax.models import vit
from conftest import assert_trees_close, mesh_of, random_images, to_host

# Micro ViT, 16 px digits, patch 4: 16 positions, 4 of them (plus cls) in the context.
ARG = "variant=Mu/4,data=digits,image_size=16,batch_size=16"
LR = 3e-3


def make_config(arg: str = ARG):
  config = position_vit.get_config(arg)
  config.total_steps = 100
  config.optim.warmup_steps = 0   # So the first steps already move every parameter.
  config.optim.base_lr = LR * config.optim.lr_batch_base / config.batch_size  # peak lr LR
  return config


# ---------------------------------------------------------------------------------------------
# Training: real steps on digits, and on 8 devices.
# ---------------------------------------------------------------------------------------------

class Trainer:
  """One initial state and one compiled step per mesh, shared by the tests below: on CPU the
  compilation, not the steps, is what costs time."""

  def __init__(self):
    self.config = make_config()
    self.model, self.tx = methods.build(self.config), optim.build(self.config)
    self.rng = jax.random.key(0)
    state, _, shardings = train.create_state(self.model, self.tx, self.config,
                                             mesh_of(jax.devices()[:1]), self.rng)
    self.init = to_host(state)
    self._steps = {}

  def run(self, devices, batches) -> tuple[object, list[dict[str, float]]]:
    """From the shared initial state, one step per batch on a mesh of `devices`."""
    mesh = mesh_of(devices)
    if len(devices) not in self._steps:
      _, shardings = train.abstract_state(self.model, self.tx, self.config, mesh, self.rng)
      self._steps[len(devices)] = (train.make_train_step(self.model, self.tx, shardings, mesh),
                                   shardings)
    step, shardings = self._steps[len(devices)]
    state = jax.device_put(self.init, shardings)
    metrics = []
    for images in batches:
      batch = jax.device_put({"image": images}, sharding.batch_sharding(mesh))
      state, m = step(state, batch, self.rng)
      metrics.append(to_host(m))
    return state, metrics


@pytest.fixture(scope="module")
def trainer():
  return Trainer()


@pytest.fixture(scope="module")
def digits(trainer):
  iterator = pipeline.train_iterator(trainer.config, process_index=0, process_count=1)
  return [next(iterator)["image"] for _ in range(100)]


def test_loss_falls_and_position_accuracy_rises_on_digits(trainer, digits):
  state, metrics = trainer.run(jax.devices()[:1], digits)
  loss = np.array([m["loss"] for m in metrics])
  acc = np.array([m["position_accuracy"] for m in metrics])
  assert np.isfinite(loss).all()
  # Chance is a cross-entropy of ln(16) = 2.77 and an accuracy of 1/16. The first steps are at
  # or above it; the last ones well below and above it, i.e. positions are read from content.
  assert loss[:3].mean() > np.log(16) - 0.1, loss[:3]
  # Measured here: loss 3.18 -> 2.46, accuracy 0.086 -> 0.152 (first 10 / last 20 steps).
  assert loss[-20:].mean() < np.log(16) - 0.15, loss
  assert acc[-20:].mean() > 1.5 / 16 and acc[-20:].mean() > 1.3 * acc[:10].mean(), acc
  for m in metrics:  # Accuracy over all patches is the mix of the context and hidden ones.
    assert m["position_accuracy"] == pytest.approx(
        (4 * m["position_accuracy_context"] + 12 * m["position_accuracy_hidden"]) / 16, abs=1e-6)

  # The linear-probe path: features() of the full image, with no 'mask' rng needed.
  spec = trainer.config.eval.linear_probe.feature
  extract = features.FeatureExtractor(trainer.model, [spec], mesh_of(jax.devices()[:1]),
                                      trainer.config.batch_size)
  feats = extract(state.params, {"image": np.concatenate(digits[:2])[:20]})[spec]
  assert feats.shape == (20, 64) and np.isfinite(feats).all()


def test_sharded_step_matches_one_device(trainer, digits):
  assert jax.device_count() == 8, "tests/conftest.py must give 8 fake devices"
  state_1, metrics_1 = trainer.run(jax.devices()[:1], digits[:2])
  state_8, metrics_8 = trainer.run(jax.devices(), digits[:2])
  assert state_8.params["head"]["kernel"].sharding.is_fully_replicated
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state_8.params))

  for m8, m1 in zip(metrics_8, metrics_1):
    for key in ("loss", "grad_norm", "position_accuracy"):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
  # The tolerances of tests/test_sharding.py (see there): Adam turns near-zero gradients into
  # updates that follow the summation order, in a tiny share of elements.
  params_1, params_8 = to_host(state_1.params), to_host(state_8.params)
  assert_trees_close(params_8, params_1, 1e-5, 1e-6, max_outliers=1e-4, outlier_atol=LR / 10)
  for before, after in zip(jax.tree.leaves(trainer.init.params), jax.tree.leaves(params_1)):
    assert np.abs(after - before).max() > LR  # every parameter moved: not a vacuous comparison


# ---------------------------------------------------------------------------------------------
# The encoder: keys/values restricted to the context, no position information.
# ---------------------------------------------------------------------------------------------

ENCODER = vit.ViT(32, 2, 2, 64, 4, posemb="none")
# Jitted once each: one compiled program per input signature, not one per primitive.
encode = jax.jit(lambda params, images, context: ENCODER.apply({"params": params}, images,
                                                                  context_ids=context))
VIT_SINCOS = vit.ViT(32, 2, 2, 64, 4, posemb="sincos")
sincos_encode = jax.jit(lambda params, images: VIT_SINCOS.apply({"params": params}, images))
CONTEXT = np.array([[2, 7, 9, 14], [0, 5, 10, 15]], np.int32)  # patch ids, one row per image


@pytest.fixture(scope="module")
def params():
  return jax.jit(ENCODER.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


def test_encoder_is_the_configs_vit_without_position_embedding():
  """MP3 runs the shared encoder, built from the config: a pretrained MP3 encoder is a plain
  vit.ViT(posemb='none') (e.g. to fine-tune with position embeddings added), and the method
  adds only the position head."""
  config = make_config()
  model = methods.build(config)
  assert model.encoder == models.build_encoder(config)
  assert isinstance(model.encoder, vit.ViT) and model.encoder.posemb == "none"
  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x), rng,
                          images)["params"]
  encoder_params = jax.eval_shape(model.encoder.init, rng, images)["params"]
  assert set(params) == {"encoder", "head"}
  assert jax.tree.map(np.shape, params["encoder"]) == jax.tree.map(np.shape, encoder_params)


def perturb_patch(images: np.ndarray, row: int, patch_id: int, patch: int = 4) -> np.ndarray:
  out = images.copy()
  side = images.shape[1] // patch
  r, c = divmod(patch_id, side)
  out[row, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 3.0
  return out


def test_hidden_patches_reach_no_other_token(params):
  """Changing a patch outside the context changes that patch's own output only, through every
  layer; changing a context patch changes every token. Full attention would fail the first
  check, attention that ignored the context the second."""
  images = random_images((2, 16, 16, 3), seed=1)
  base = np.asarray(encode(params, images, CONTEXT)[0])

  hidden = 11  # not in image 0's context
  out = np.asarray(encode(params, perturb_patch(images, 0, hidden), CONTEXT)[0])
  others = np.ones(17, bool)
  others[1 + hidden] = False
  np.testing.assert_array_equal(out[0, others], base[0, others])
  assert np.abs(out[0, 1 + hidden] - base[0, 1 + hidden]).max() > 1e-2
  np.testing.assert_array_equal(out[1], base[1])  # nor any other image

  out = np.asarray(encode(params, perturb_patch(images, 0, 7), CONTEXT)[0])  # 7: in the context
  assert (np.abs(out[0] - base[0]).max(-1) > 1e-4).all()  # cls and every patch moved


def test_no_position_information_reaches_the_encoder(params):
  """Permuting the image's patches permutes the encoder's patch outputs the same way and leaves
  cls unchanged, with full attention and with a context (carried along by the permutation).
  The same parameters in a ViT with sin-cos position embeddings fail this."""
  images = random_images((2, 16, 16, 3), seed=2)
  perm = np.random.default_rng(0).permutation(16)  # new patch i is old patch perm[i]
  inverse = np.argsort(perm).astype(np.int32)
  permuted = np.asarray(layers.unpatchify(layers.patchify(images, 4)[:, perm], 4, (4, 4), 3))

  for context, context_permuted in ((None, None), (CONTEXT, inverse[CONTEXT])):
    out, _ = encode(params, images, context)
    out_p, _ = encode(params, permuted, context_permuted)
    np.testing.assert_allclose(out_p[:, 1:], out[:, 1 + perm], atol=1e-5)
    np.testing.assert_allclose(out_p[:, 0], out[:, 0], atol=1e-5)

  out, _ = sincos_encode(params, images)
  out_p, _ = sincos_encode(params, permuted)
  assert np.abs(np.asarray(out_p[:, 1:]) - np.asarray(out[:, 1 + perm])).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# FLOPs and config.
# ---------------------------------------------------------------------------------------------

def test_analytic_flops_match_the_traced_matmuls():
  """Walk the jaxpr of the real forward and backward and add up every matmul. The forward
  matches train_flops_per_example / 3 exactly; forward + backward is that times 3 minus the
  patch embedding's input gradient, which is never computed."""
  config = make_config("variant=Mu/8,data=synthetic,image_size=64,batch_size=2")
  model = methods.build(config)
  batch = 2
  images = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda r, x: model.init({"params": r, "mask": r}, x), rng,
                          images)["params"]
  loss = lambda p, x, r: model.apply({"params": p}, x, rngs={"mask": r})[0]
  analytic = methods.train_flops_per_example(config)
  forward = flops.jaxpr_matmul_flops(jax.make_jaxpr(loss)(params, images, rng))
  assert forward * flops.TRAIN_MULTIPLIER == batch * analytic
  train_flops = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params, images, rng))
  assert train_flops == batch * (analytic - flops.dense(64, 8 * 8 * 3, 64))

  # Keys/values on all tokens is the plain transformer; the context saves the kv projections
  # and 3/4 of the attention (ViT-B/16 at 224 px: 197 queries, 50 keys/values).
  assert flops.transformer(197, 768, 12, 3072, 197) == flops.transformer(197, 768, 12, 3072)
  saving = flops.transformer(197, 768, 12, 3072) / flops.transformer(197, 768, 12, 3072, 50)
  assert saving == pytest.approx(1.17, abs=0.01)


def test_paper_recipe_in_config():
  config = position_vit.get_config("")
  assert config.method.name == "position" and config.model.variant == "B/16"
  assert (config.mask.name, config.mask.ratio) == ("random", 0.75)
  o = config.optim
  assert (o.b1, o.b2, o.weight_decay, o.base_lr, o.lr_batch_base) == (0.9, 0.999, 0.05, 5e-4, 512)
  assert config.total_steps == 60 * o.warmup_steps  # 300 epochs, 5 of warmup
  assert not config.eval.reconstruction_png and config.eval.linear_probe.feature == "gap"
  local = position_vit.get_config("runlocal")
  assert local.data.name == "digits" and local.eval.linear_probe.enabled
  config_validation.validate(local)


@pytest.mark.parametrize("field,value,message", [
    ("mask.ratio", 1.0, "mask.ratio must be in"),
    ("mask.name", "nope", "unknown mask generator 'nope'; valid"),
    ("image_size", 18, "image_size 18 is not divisible by the patch size 4"),
    ("model.variant", "Q/4", "unknown ViT variant 'Q/4'"),
    ("model.posemb", "sincos", "without position embeddings \\(model.posemb 'none'\\)"),
])
def test_bad_config_names_the_value(field, value, message):
  config = make_config()
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)


def test_bad_config_args():
  with pytest.raises(ValueError, match="unknown config argument 'decoder'.*valid"):
    position_vit.get_config("decoder=2x128")
  config = make_config()
  config.model.name = "crate"
  with pytest.raises(ValueError):
    methods.validate(config)
