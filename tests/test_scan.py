"""Scanned layers (config.model.scan_layers) and remat policies by name (config.model.remat), as
models/layer_loop.py runs them: scanned layers store the unrolled parameters stacked
(mim_jax/layer_layout.py) and compute, beyond rounding, what the unrolled ones do; checkpoints,
pretrained sources and exports move between the layouts; layer-wise lr decay, weight decay and
FSDP treat a stacked layer as its block; the traced FLOPs still match the analytic count; every
policy gives the gradients of no remat."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safetensors.numpy
from jax.sharding import PartitionSpec as P

from configs import crate_mae as crate_mae_config
from configs import finetune_vit
from configs import mae_vit
from conftest import MICRO_MAE
from conftest import abstract_params
from conftest import mesh_of
from conftest import random_images
from conftest import to_host
from conftest import traced_matmul_flops
from mim_jax import checkpoint
from mim_jax import config_validation
from mim_jax import flops
from mim_jax import layer_layout
from mim_jax import methods
from mim_jax import optim
from mim_jax import pretrained
from mim_jax import sharding
from mim_jax import train
from mim_jax import tree_paths
from mim_jax.data import pipeline
from mim_jax.models import layer_loop
from mim_jax.models import vit
from mim_jax.tools import export

# MICRO_MAE on synthetic images (they need no dataset loaded), and with a 2-block decoder, so
# that both of MAE's stacks scan more than one block where that costs only tracing.
MICRO_ARG = MICRO_MAE.replace("digits", "synthetic")
MAE_ARG = MICRO_ARG.replace("decoder=1x32", "decoder=2x32")
CRATE_ARG = "variant=micro/4,decoder_depth=2,image_size=16,batch_size=16,data=synthetic"
FINETUNE_ARG = "runlocal,variant=Mu/4,batch_size=16"


def fsdp(config):
  """`config` with FSDP on, for parameters of at least 2 ** 12 elements (Mu's larger kernels)."""
  config.sharding.fsdp = True
  config.sharding.fsdp_min_size = 2 ** 12
  return config


def configs(module, arg: str):
  """(unrolled, scanned) configs of one experiment."""
  unrolled, scanned = module.get_config(arg), module.get_config(arg)
  scanned.model.scan_layers = True
  return unrolled, scanned


def assert_close_to_largest(got, want, share: float) -> None:
  """Every element within `share` of want's largest: the sums behind gradients round
  differently scanned and unrolled, and a leaf whose gradient nearly cancels (MAE decoder's
  embedding bias on random weights: 3e-7, against 1e-1 elsewhere) keeps only that noise."""
  largest = max(np.abs(w).max() for w in jax.tree.leaves(want))
  for (name, g), w in zip(tree_paths.flatten(got).items(), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=share * largest, err_msg=name)


@pytest.mark.parametrize("module,arg", [(mae_vit, MAE_ARG), (crate_mae_config, CRATE_ARG)],
                         ids=["mae_vit", "crate_mae"])
def test_scanned_layers_store_the_unrolled_parameters_stacked(module, arg):
  """Init draws each scanned layer's parameters as the unrolled loop does and stores them
  stacked, the encoder's and the decoder's: unstacked, they are the unrolled init bit for bit.
  With them the scanned CRATE and CRATE-MAE decoder give the unrolled loss within 1e-5, its
  gradients, unstacked, within 1e-5 of the largest, and its features, every
  layer's output ('block_i') included, within 1e-5. (MAE's loss and gradients: scanned on 8
  devices with FSDP in test_a_checkpoint_moves_between_scanned_and_unrolled_runs; ViT's block
  outputs: test_scanned_drop_path_rises_over_the_blocks.)"""
  configs_ = configs(module, arg)
  models = [methods.build(c) for c in configs_]
  images = random_images((4, 16, 16, 3))
  computes = module is crate_mae_config

  @jax.jit
  def run(rng):
    out = []
    for model, config in zip(models, configs_):
      params = methods.init_params(model, config, rng)
      loss = lambda p, model=model: model.apply({"params": p}, images,
                                                 rngs={"mask": jax.random.key(1)})[0]
      out.append((params, jax.value_and_grad(loss)(params),
                  model.apply({"params": params}, images, method=model.features))
                 if computes else (params,))
    return out

  (params, *computed), (scanned, *scanned_computed) = run(jax.random.key(0))
  stacked = [n for n in tree_paths.flatten(scanned) if layer_layout.is_stacked(n)]
  assert stacked and not any(map(layer_layout.is_stacked, tree_paths.flatten(params)))
  assert {n.split("/")[0] for n in stacked} == {"encoder", "decoder"}
  jax.tree.map(np.testing.assert_array_equal, layer_layout.unstack_blocks(scanned), params)
  if not computes:
    return
  ((loss, grads), features), ((scanned_loss, scanned_grads), scanned_features) = (
      computed, scanned_computed)
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
  assert_close_to_largest(layer_layout.unstack_blocks(scanned_grads), grads, 1e-5)
  assert {"block_0", "block_1"} <= set(scanned_features)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
               scanned_features, features)


def test_scanned_drop_path_rises_over_the_blocks():
  """drop_path 1 over 2 blocks gives block 0 rate 0 (never dropped) and block 1 rate 1 (always
  dropped): deterministic, so the scanned blocks, which draw their own keys, must give the
  unrolled ones' outputs. The restriction of keys and values (context_ids) reaches them too."""
  encoder = vit.ViT(32, 2, 2, 64, 4, posemb="none", drop_path=1.0)
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  scanned = encoder.clone(scan_layers=True)
  variables = jax.jit(encoder.init)(jax.random.key(0), images)
  stacked = layer_layout.stack_blocks(
      variables, tree_paths.flatten(jax.eval_shape(scanned.init, jax.random.key(0), images)))
  context = jnp.array([[2, 7, 9, 14], [0, 5, 10, 15]], jnp.int32)

  @jax.jit
  def aux(variables, stacked):
    run = lambda model, variables, train: model.apply(
        variables, images, context_ids=context, train=train,
        rngs={"dropout": jax.random.key(1)})[1]
    return run(encoder, variables, True), run(scanned, stacked, True), run(scanned, stacked,
                                                                           False)

  unrolled, scanned, evaluation = aux(variables, stacked)
  for name in ("block_0", "block_1", "cls"):
    np.testing.assert_allclose(scanned[name], unrolled[name], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(scanned["block_1"], scanned["block_0"])
  np.testing.assert_allclose(scanned["block_0"], evaluation["block_0"], rtol=1e-6, atol=1e-6)
  assert np.abs(evaluation["block_1"] - evaluation["block_0"]).max() > 1e-2


def test_a_checkpoint_moves_between_scanned_and_unrolled_runs(tmp_path):
  """A checkpoint keeps its run's layer layout. MAE's train state saved by an unrolled run
  restores into a scanned run's abstract state, FSDP on 8 devices (its optimizer moments
  included), as the same values stacked, bit for bit, sharded as the scanned run's; saved from
  there, it restores into the unrolled run as it was. There the scanned MAE (ViT and decoder)
  gives the unrolled one's loss within 1e-5 and its gradients within 1e-5 of the largest.
  Either run's workdir loads as pretrained parameters into the other's layout
  (pretrained.load_params), and the scanned run's exports (.npz, Hugging Face) hold the
  unrolled run's arrays under the unrolled names; its .npz loads back into the scanned layout."""
  configs_ = [fsdp(c) for c in configs(mae_vit, MICRO_ARG)]
  models = [methods.build(c) for c in configs_]
  mesh = mesh_of(jax.devices())
  (abstract, _), (abstract_scanned, shardings) = [
      train.abstract_state(m, optim.build(c), c, mesh, jax.random.key(0))
      for m, c in zip(models, configs_)]
  # A state with distinct values in every leaf (a trained one's stand-in: no step to compile).
  gen = np.random.default_rng(0)
  saved = jax.tree.map(lambda a: jax.device_put(gen.normal(size=a.shape).astype(a.dtype),
                                                a.sharding), abstract)
  iterator = pipeline.train_iterator(configs_[0], process_index=0, process_count=1)
  workdirs = [tmp_path / "unrolled", tmp_path / "scanned"]
  ckpt = checkpoint.Checkpointer(str(workdirs[0]), keep=1, async_save=False)
  ckpt.save(1, saved, iterator)
  ckpt.wait()
  restored = ckpt.restore(1, abstract_scanned, iterator)  # unrolled -> scanned
  ckpt.close()
  want = layer_layout.stack_blocks(to_host(saved), tree_paths.flatten(abstract_scanned))
  jax.tree.map(np.testing.assert_array_equal, to_host(restored), want)
  assert jax.tree.map(lambda a: a.sharding, restored) == shardings
  # FSDP splits a weight axis of some stacked leaf, never [depth].
  stacked_specs = [s.spec for n, s in tree_paths.flatten(shardings).items()
                   if layer_layout.is_stacked(n)]
  assert any(map(any, stacked_specs)) and not any(spec[0] for spec in stacked_specs)
  ckpt = checkpoint.Checkpointer(str(workdirs[1]), keep=1, async_save=False)
  ckpt.save(1, restored, iterator)
  ckpt.wait()
  back = ckpt.restore(1, abstract, iterator)  # scanned -> unrolled
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, to_host(back), to_host(saved))

  # The scanned MAE's loss and gradients on the restored, sharded state are the unrolled one's.
  images = next(iterator)["image"]
  loss = lambda model, p: model.apply({"params": p}, images, rngs={"mask": jax.random.key(3)})[0]
  want_loss, want_grads = jax.jit(jax.value_and_grad(partial(loss, models[0])))(
      to_host(saved.params))
  got_loss, got_grads = jax.jit(jax.value_and_grad(partial(loss, models[1])))(restored.params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert_close_to_largest(layer_layout.unstack_blocks(to_host(got_grads)), want_grads, 1e-5)

  loaded = pretrained.load_params(str(workdirs[1]), configs_[0])
  jax.tree.map(np.testing.assert_array_equal, loaded, to_host(saved.params))
  loaded = pretrained.load_params(str(workdirs[0]), configs_[1])
  jax.tree.map(np.testing.assert_array_equal, loaded, want.params)
  for workdir, config in zip(workdirs, configs_):
    export.export(str(workdir), config, str(tmp_path / f"{workdir.name}.npz"), "all")
    export.export(str(workdir), config, str(tmp_path / f"{workdir.name}_hf"), "all", "hf")
  npz = []
  for workdir in workdirs:
    with np.load(tmp_path / f"{workdir.name}.npz") as data:
      npz.append({k: data[k] for k in data.files if k != "__meta__"})
  assert "encoder/blocks/block_1/attn/qkv/kernel" in npz[1]
  jax.tree.map(np.testing.assert_array_equal, npz[1], npz[0])
  loaded = pretrained.load_params(str(tmp_path / "scanned.npz"), configs_[1])
  jax.tree.map(np.testing.assert_array_equal, loaded, want.params)
  hf = [safetensors.numpy.load_file(tmp_path / f"{w.name}_hf" / "model.safetensors")
        for w in workdirs]
  jax.tree.map(np.testing.assert_array_equal, hf[1], hf[0])


def test_layer_decay_and_weight_decay_see_each_stacked_layer_as_its_block():
  """Fine-tuning's layer-wise lr decay gives each layer of a stacked leaf its block's factor,
  and weight decay picks the same parameters by name and per-layer rank: the first AdamW update
  (layer decay 0.5) of the scanned ViT classifier is the unrolled one's, stacked, bit for bit."""
  configs_ = configs(finetune_vit, FINETUNE_ARG)
  for config in configs_:
    config.optim.warmup_steps = 0
    config.optim.layer_decay = 0.5
  shapes = [abstract_params(c) for c in configs_]
  like = tree_paths.flatten(shapes[1])
  masks = [tree_paths.flatten(optim.decay_mask(s)) for s in shapes]
  for name, decays in masks[1].items():
    for i in range(2 if layer_layout.is_stacked(name) else 1):
      assert decays == masks[0][name.replace(layer_layout.STACKED, f"block_{i}")], name
  assert not masks[1][f"encoder/blocks/{layer_layout.STACKED}/attn/qkv/bias"]
  gen = np.random.default_rng(0)
  params, grads = [jax.tree.map(lambda a: gen.normal(size=a.shape).astype(a.dtype), shapes[0])
                   for _ in range(2)]
  updates = []
  for config, (p, g) in zip(configs_, [(params, grads), (layer_layout.stack_blocks(params, like),
                                                          layer_layout.stack_blocks(grads, like))]):
    tx = optim.build(config)
    updates.append(jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(g, p))
  jax.tree.map(np.testing.assert_array_equal, layer_layout.stack_blocks(updates[0], like),
               updates[1])


def test_fsdp_splits_a_weight_dimension_of_stacked_layers():
  """FSDP shards a stacked leaf as the unrolled run shards each of its layers, the [depth] axis
  unsharded, with the size threshold per layer; a leaf of which no layer dimension divides the
  devices is refused by name even when [depth] would. (A scanned step on those shardings:
  test_a_checkpoint_moves_between_scanned_and_unrolled_runs.)"""
  configs_ = [fsdp(c) for c in configs(mae_vit, MICRO_ARG)]
  mesh = mesh_of(jax.devices())
  unrolled, scanned = [tree_paths.flatten(train.abstract_state(
      methods.build(c), optim.build(c), c, mesh, jax.random.key(0))[1]) for c in configs_]
  stacked = {n: s.spec for n, s in scanned.items() if layer_layout.is_stacked(n)}
  assert len(stacked) == 3 * 2 * 12  # params, Adam's mu and nu; 2 loops of 12 leaves each
  for name, spec in stacked.items():
    per_layer = unrolled[name.replace(layer_layout.STACKED, "block_0")].spec
    assert spec == P(None, *per_layer), name
  # The 4 kernels of an encoder block, 2 of a decoder block (its 32x96 qkv and 32x32 proj have
  # fewer than 2 ** 12 elements per layer), in the parameters and both Adam moments.
  assert sum(any(spec) for spec in stacked.values()) == 3 * (4 + 2)
  bad = {"w": {layer_layout.STACKED: {"kernel": jax.ShapeDtypeStruct((8, 65, 67), jnp.float32)}}}
  with pytest.raises(ValueError, match=r"^FSDP cannot split w/stacked_blocks/kernel of shape "
                                       r"\(65, 67\) over 8 devices"):
    sharding.state_shardings(bad, mesh, configs_[1])


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

  stacked = layer_layout.stack_blocks(params, [f"blocks/{layer_layout.STACKED}/"])

  @jax.jit
  def gradients(params, stacked):
    def grad(name, scan):
      model = encoder.clone(remat=name, scan_layers=scan)
      loss = lambda p: jnp.sum(model.apply({"params": p}, images)[0] * readout)
      return layer_layout.unstack_blocks(jax.grad(loss)(stacked if scan else params))
    return [grad(*v) for v in variants]

  grads = dict(zip(variants, gradients(params, stacked)))
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
