"""Scanned layers (config.model.scan_layers) and remat policies by name (config.model.remat), as
models/layer_loop.py runs them: scanning changes neither the parameters nor, beyond rounding,
what the model computes; a checkpoint moves between scanned and unrolled runs; the traced FLOPs
still match the analytic count; every policy gives the gradients of no remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import crate_mae as crate_mae_config
from configs import mae_vit
from conftest import MICRO_MAE
from conftest import Trainer
from conftest import mesh_of
from conftest import random_images
from conftest import set_peak_lr
from conftest import to_host
from conftest import traced_matmul_flops
from mim_jax import checkpoint
from mim_jax import config_validation
from mim_jax import flops
from mim_jax import methods
from mim_jax import optim
from mim_jax import train
from mim_jax import tree_paths
from mim_jax.data import pipeline
from mim_jax.models import layer_loop
from mim_jax.models import vit

# MICRO_MAE on synthetic images (they need no dataset loaded), and with a 2-block decoder, so
# that both of MAE's stacks scan more than one block where that costs only tracing.
MICRO_ARG = MICRO_MAE.replace("digits", "synthetic")
MAE_ARG = MICRO_ARG.replace("decoder=1x32", "decoder=2x32")
CRATE_ARG = "variant=micro/4,decoder_depth=2,image_size=16,batch_size=16,data=synthetic"


def configs(module, arg: str):
  """(unrolled, scanned) configs of one experiment."""
  unrolled, scanned = module.get_config(arg), module.get_config(arg)
  scanned.model.scan_layers = True
  return unrolled, scanned


def init_program(config) -> str:
  """The traced program of the config's init, as text."""
  model = methods.build(config)
  return str(jax.make_jaxpr(lambda r: methods.init_params(model, config, r))(jax.random.key(0)))


def test_scanned_crate_has_the_unrolled_parameters_and_outputs():
  """Init runs the same program scanned or not, so a seed gives the same parameters; CRATE's
  encoder and CRATE-MAE's decoder layers then predict the same patches and give the same
  features, every layer's output included, within 1e-5."""
  configs_ = configs(crate_mae_config, CRATE_ARG)
  assert init_program(configs_[1]) == init_program(configs_[0])
  models = [methods.build(c) for c in configs_]
  params = jax.jit(lambda r: methods.init_params(models[0], configs_[0], r))(jax.random.key(0))
  images = random_images((4, 16, 16, 3))

  @jax.jit
  def outputs(params):
    def of(model):
      pred, _ = model.apply({"params": params}, images, rngs={"mask": jax.random.key(1)},
                            method=model.predict)
      return pred, model.apply({"params": params}, images, method=model.features)
    return [of(m) for m in models]

  want, got = outputs(params)
  assert {"block_0", "block_1"} <= set(got[1])
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)


def test_scanned_drop_path_rises_over_the_blocks():
  """drop_path 1 over 2 blocks gives block 0 rate 0 (never dropped) and block 1 rate 1 (always
  dropped): deterministic, so the scanned blocks, which draw their own keys, must give the
  unrolled ones' outputs. The restriction of keys and values (context_ids) reaches them too."""
  encoder = vit.ViT(32, 2, 2, 64, 4, posemb="none", drop_path=1.0)
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  variables = jax.jit(encoder.init)(jax.random.key(0), images)
  context = jnp.array([[2, 7, 9, 14], [0, 5, 10, 15]], jnp.int32)

  @jax.jit
  def aux(variables):
    run = lambda model, train: model.apply(variables, images, context_ids=context, train=train,
                                           rngs={"dropout": jax.random.key(1)})[1]
    scanned = encoder.clone(scan_layers=True)
    return run(encoder, True), run(scanned, True), run(scanned, False)

  unrolled, scanned, evaluation = aux(variables)
  for name in ("block_0", "block_1", "cls"):
    np.testing.assert_allclose(scanned[name], unrolled[name], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(scanned["block_1"], scanned["block_0"])
  np.testing.assert_allclose(scanned["block_0"], evaluation["block_0"], rtol=1e-6, atol=1e-6)
  assert np.abs(evaluation["block_1"] - evaluation["block_0"]).max() > 1e-2


def test_a_checkpoint_moves_between_scanned_and_unrolled_runs(tmp_path):
  """MAE's train state has one layout, scanned or not: the same abstract state (names, shapes,
  dtypes, shardings), and init is the same program, so a seed gives the same state. A state
  saved from one restores into the other's abstract state bit for bit, and there the scanned
  and the unrolled model give the same loss. (That the scanned gradient reaches every block's
  parameters: test_every_remat_policy_gives_the_gradients_of_none.)"""
  configs_ = [set_peak_lr(c, 1e-3) for c in configs(mae_vit, MICRO_ARG)]
  assert init_program(configs_[1]) == init_program(configs_[0])
  models = [methods.build(c) for c in configs_]
  mesh = mesh_of(jax.devices()[:1])
  abstract = [train.abstract_state(m, optim.build(c), c, mesh, jax.random.key(0))[0]
              for m, c in zip(models, configs_)]
  assert jax.tree.structure(abstract[0]) == jax.tree.structure(abstract[1])
  assert jax.tree.leaves(abstract[0]) == jax.tree.leaves(abstract[1])
  # A state with distinct values in every leaf (a trained one's stand-in: no step to compile).
  gen = np.random.default_rng(0)
  saved = jax.tree.map(lambda a: jax.device_put(gen.normal(size=a.shape).astype(a.dtype),
                                                a.sharding), abstract[0])
  iterator = pipeline.train_iterator(configs_[0], process_index=0, process_count=1)
  images = next(iterator)["image"]
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(1, saved, iterator)
  ckpt.wait()
  restored = ckpt.restore(1, abstract[1], iterator)  # unrolled -> scanned
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, to_host(restored), to_host(saved))

  @jax.jit
  def losses(params):
    return [m.apply({"params": params}, images, rngs={"mask": jax.random.key(2)})[0]
            for m in models]
  unrolled_loss, scanned_loss = losses(restored.params)
  np.testing.assert_allclose(unrolled_loss, scanned_loss, rtol=1e-5)


@pytest.mark.parametrize("module,arg", [(mae_vit, MAE_ARG), (crate_mae_config, CRATE_ARG)],
                         ids=["mae_vit", "crate_mae"])
def test_traced_flops_of_scanned_layers_match_the_analytic_count(module, arg):
  """Both of the method's stacks are scans, whose bodies flops.jaxpr_matmul_flops counts once
  per layer: the forward is exactly the analytic count / 3, and forward + backward 3x that minus
  the patch embedding's input gradient (never computed), as for the unrolled model."""
  config = configs(module, arg)[1]
  model = methods.build(config)
  params = jax.eval_shape(lambda r: methods.init_params(model, config, r), jax.random.key(0))
  program = jax.make_jaxpr(lambda p: model.apply({"params": p}, jnp.zeros((2, 16, 16, 3)),
                                                 rngs={"mask": jax.random.key(0)}))(params)
  assert [e.params["length"] for e in program.eqns if e.primitive.name == "scan"] == [2, 2]
  batch = 2
  analytic = methods.train_flops_per_example(config)
  forward, gradient = traced_matmul_flops(config, batch)
  assert forward * flops.TRAIN_MULTIPLIER == batch * analytic
  width = 64  # Mu and micro
  assert gradient == batch * (analytic - flops.dense(16, 4 * 4 * config.data.channels, width))


def test_every_remat_policy_gives_the_gradients_of_none():
  """Each named policy, on the scan's body (jax.checkpoint), compiles and gives the unrolled,
  unrematerialised gradient: bit for bit at the suite's XLA optimisation level, within 8e-7 of
  its largest element at the default level (measured). The unrolled blocks' nn.remat (the path
  Swin, the Conformer and CAE take too) passes the policy the same way; tests/test_models.py
  checks it for 'full'."""
  encoder = vit.ViT(32, 2, 2, 64, 4)
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  params = jax.jit(encoder.init)(jax.random.key(0), images)["params"]
  readout = jnp.asarray(random_images((2, 17, 32), seed=1))
  variants = [("none", False)] + [(name, True) for name in layer_loop.REMAT_POLICIES.names()]

  @jax.jit
  def gradients(params):
    def grad(name, scan):
      model = encoder.clone(remat=name, scan_layers=scan)
      return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images)[0] * readout))(params)
    return [grad(*v) for v in variants]

  grads = dict(zip(variants, gradients(params)))
  want = grads["none", False]
  for variant, got in grads.items():
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=str(variant))


def test_remat_names_and_their_aliases():
  """True / False still mean full / none; an unknown name is one config error listing the valid
  ones."""
  assert (layer_loop.policy_name(True), layer_loop.policy_name(False)) == ("full", "none")
  assert layer_loop.policy_name("dots_saveable") == "dots_saveable"
  config = mae_vit.get_config(MAE_ARG)
  config.model.remat = "dots"
  with pytest.raises(ValueError, match=r"^unknown model.remat 'dots'; valid: \['dots_saveable', "
                                       r"'dots_with_no_batch_dims_saveable', 'full', 'none'\]"):
    config_validation.validate(config)
