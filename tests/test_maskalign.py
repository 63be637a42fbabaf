"""MaskAlign (mim_jax/methods/maskalign.py): the attention-guided mask, the teacher's attention,
training through the real trainer on 1 and 8 devices with a frozen teacher read from an .npz,
and the errors a missing or mismatched teacher gives before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskalign_vit
from conftest import Trainer
from conftest import assert_trees_close
from conftest import mesh_of
from conftest import set_peak_lr
from conftest import to_host
from mim_jax import checkpoint
from mim_jax import config_validation
from mim_jax import errors
from mim_jax import flops
from mim_jax import masking
from mim_jax import methods
from mim_jax import optim
from mim_jax import pretrained
from mim_jax import train
from mim_jax import tree_paths
from mim_jax.data import pipeline
from mim_jax.methods import maskalign
from mim_jax.models import layers

# The micro MaskAlign: a Mu/4 student and a Mu/4 teacher (2 blocks of width 64) on 16-px digits.
MICRO = "variant=Mu/4,image_size=16,batch_size=16,data=digits"
LR = 1e-3


def micro_config(teacher: str):
  config = set_peak_lr(maskalign_vit.get_config(MICRO), LR)
  config.method.teacher = teacher
  config.method.align_layers = 2
  config.method.drop_path = 0.0
  return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """(path, flat params) of a Mu/4 teacher exported to .npz. Its weights are random (a
  trained teacher is not needed to test the plumbing) but large enough to attend unevenly."""
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
  config = maskalign.teacher_config(micro_config(path))
  rng = np.random.default_rng(0)
  flat = {k: (k.endswith("/scale") + 0.3 * rng.normal(size=v.shape)).astype(v.dtype)
          for k, v in pretrained.expected_shapes(config, encoder_only=True).items()}
  pretrained.save_npz(path, flat, {"what": "a random Mu/4 teacher"})
  return path, {k.removeprefix("encoder/"): v for k, v in flat.items()}


# ---------------------------------------------------------------------------------------------
# The attention-guided mask.
# ---------------------------------------------------------------------------------------------

def test_attention_mask_keeps_exact_count_and_samples_by_attention():
  grid, batch = (4, 4), 4096
  weights = np.arange(16, dtype=np.float32) % 5  # patches 0, 5, 10, 15 weigh 0
  guide = jnp.broadcast_to(jnp.asarray(weights), (batch, 16))
  draw = jax.jit(lambda rng, ratio: masking.attention_mask(rng, batch, grid, ratio,
                                                           attention=guide), static_argnums=1)
  m = draw(jax.random.key(0), 0.7)
  ids, mask = np.asarray(m.ids_keep), np.asarray(m.mask)
  assert ids.shape == (batch, 4)  # int(16 * 0.3)
  np.testing.assert_array_equal(mask.sum(1), 12)
  assert not np.take_along_axis(mask, ids, 1).any()  # ids_keep are exactly the visible patches
  assert not np.isin(ids, [0, 5, 10, 15]).any()  # zero attention is never kept
  # One kept patch is one draw of the official torch.multinomial: proportional to the weights.
  first = np.asarray(draw(jax.random.key(1), 0.9).ids_keep[:, 0])
  freq = np.bincount(first, minlength=16) / batch
  p = weights / weights.sum()
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / batch).max())
  with pytest.raises(ValueError, match=r"attention of shape \(4096, 15\) does not weigh"):
    masking.attention_mask(jax.random.key(0), batch, grid, 0.7, attention=guide[:, :15])


def test_teacher_attention_is_the_cls_row_of_its_last_block(teacher, monkeypatch):
  """The attention guiding the mask equals the cls query's softmax that the teacher's last
  block computes itself (recorded from the q and k it hands layers.dot_product_attention)."""
  path, flat = teacher
  model = methods.build(micro_config(path))
  calls = []
  attend = layers.dot_product_attention

  def spy(q, k, v, **kw):
    calls.append((q, k))
    return attend(q, k, v, **kw)
  monkeypatch.setattr(layers, "dot_product_attention", spy)

  @jax.jit
  def attention_and_recorded(params, images):
    hidden, attention = model.apply({"params": params}, images,
                                    method=maskalign.MaskAlign.teacher)
    q, k = calls[-1]  # the teacher's last block
    logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], k) / np.sqrt(q.shape[-1])
    return len(hidden), attention, jax.nn.softmax(logits, -1).mean(1)[:, 1:]

  images = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16, 16, 1)), jnp.float32)
  depth, attention, want = attention_and_recorded(
      {"frozen_teacher": tree_paths.unflatten(flat)}, images)
  np.testing.assert_allclose(attention, want, rtol=1e-5, atol=1e-7)
  assert depth == 2 and attention.shape == (3, 16)
  assert float(jnp.std(attention)) > 0.1 * float(jnp.mean(attention))  # it attends unevenly


def test_mixing_starts_at_the_official_identity_plus_001():
  """--fusion_type linear: I + 0.01 over equal depths, here the rows of the last K layers."""
  eye = np.eye(12) + 0.01
  np.testing.assert_allclose([maskalign.mixing_init(12, 5, j) for j in range(5)], eye[7:])
  # A deeper student: each aligned teacher layer starts from the student layer as far from
  # the top.
  assert maskalign.mixing_init(4, 2, 1) == (0.01, 0.01, 0.01, 1.01)


# ---------------------------------------------------------------------------------------------
# Training through the trainer's own state creation and step.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(teacher):
  """Two steps on 1 device and on 8 with FSDP, from the same state (the 1-device one from
  train.create_state, which loads the teacher), then 14 more 1-device steps on digits.
  Returns a dict: the 1-device trainer 'one' and its 'metrics' of every step, 'params_1' after
  its 2 first steps, and the 8-device 'params_8', 'metrics_8' and parameter 'shardings_8'."""
  config = micro_config(teacher[0])
  iterator = pipeline.train_iterator(config, process_index=0, process_count=1)
  batches = [{"image": next(iterator)["image"]} for _ in range(4)]
  one = Trainer(config, mesh_of(jax.devices()[:1]), jax.random.key(0))
  fsdp = config.copy_and_resolve_references()
  fsdp.sharding.fsdp = True
  fsdp.sharding.fsdp_min_size = 256  # so that the micro model's kernels are split too
  eight = Trainer(fsdp, mesh_of(jax.devices()), jax.random.key(0),
                  initial_state=one.initial_state)
  rng = jax.random.key(1)
  out = {"one": one, "metrics": one.run(batches[:2], rng), "params_1": to_host(one.state.params),
         "metrics_8": eight.run(batches[:2], rng), "params_8": to_host(eight.state.params),
         "shardings_8": eight.shardings.params}
  out["metrics"] += one.run([batches[i % 4] for i in range(2, 16)], rng)
  return out


def test_8_devices_match_one_device(trained):
  """The batch split over 8 fake devices, the student, adapters and frozen teacher split by
  the same FSDP rules: losses and parameters after 2 steps as on 1 device, within
  tests/test_sharding.py's tolerances (lr / 1000, but Adam's noisy first updates: at most 1e-4
  of the elements, within 10% of the lr)."""
  for m1, m8 in zip(trained["metrics"], trained["metrics_8"]):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  teacher_kernel = trained["shardings_8"]["frozen_teacher"]["blocks"]["block_0"]["mlp"]["fc1"]
  assert "data" in teacher_kernel["kernel"].spec
  assert set(trained["params_8"]) == {"adapter_0", "adapter_1", "encoder", "frozen_teacher"}
  assert_trees_close(trained["params_8"], trained["params_1"], 1e-5, LR / 1e3,
                     max_outliers=1e-4, outlier_atol=0.1 * LR)


def test_loss_falls_on_digits_and_the_step_compiles_once(trained):
  one, metrics = trained["one"], trained["metrics"]
  losses = np.array([m["loss"] for m in metrics])
  assert np.isfinite(losses).all() and losses[-6:].mean() < 0.8 * losses[:4].mean(), losses
  assert one._step._cache_size() == 1  # pylint: disable=protected-access
  # The teacher's attention guides the mask: more of it is visible than a random 25%.
  kept = np.array([m["attention_kept"] for m in metrics])
  assert kept.mean() > 0.3, kept


def test_frozen_teacher_is_the_export_bit_for_bit_and_has_no_optimizer_state(trained, teacher):
  one, (_, flat) = trained["one"], teacher
  got = tree_paths.flatten(to_host(one.state.params["frozen_teacher"]))
  assert got.keys() == flat.keys()
  for name, value in flat.items():
    assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name
  # No Adam moments for it, and the trained parameters did move (the mixing weights too).
  assert not any("frozen_teacher" in name for name in tree_paths.flatten(one.state.opt_state))
  initial = tree_paths.flatten(one.initial_state.params)
  trained_now = tree_paths.flatten(to_host(one.state.params))
  for name in ("adapter_0/layer_weights", "adapter_1/proj/kernel",
               "encoder/blocks/block_0/mlp/fc1/kernel"):
    assert not np.allclose(trained_now[name], initial[name]), name
  # The official code exempts the mixing weights from weight decay (skip_list).
  assert not optim.decay_mask(one.state.params)["adapter_0"]["layer_weights"]


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------

def test_analytic_flops_match_the_traced_matmuls(teacher):
  """3x the trained part (everything but the teacher) plus 1x the teacher's forward, each
  counted one matmul at a time in the traced programs, is the analytic count."""
  config = micro_config(teacher[0])
  config.method.teacher_variant = "Ti/4"  # a teacher of another width and depth
  model = methods.build(config)
  params = jax.eval_shape(lambda r: methods.init_params(model, config, r), jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)

  def count(**method) -> int:  # the matmul FLOPs of the traced forward (or of `method`)
    apply = lambda p, x: model.apply({"params": p}, x, rngs={"mask": jax.random.key(0)},
                                     **method)
    return flops.jaxpr_matmul_flops(jax.make_jaxpr(apply)(params, images))
  total, frozen = count(), count(method=maskalign.MaskAlign.teacher)
  assert flops.TRAIN_MULTIPLIER * (total - frozen) + frozen == (
      2 * methods.train_flops_per_example(config))


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------

def create_state_before_compiling(config, monkeypatch):
  """train.create_state, which must fail before tracing or compiling anything."""
  def compiled(*_):
    raise AssertionError("traced the model before reading the teacher")
  monkeypatch.setattr(train, "abstract_state", compiled)
  model, tx = methods.build(config), optim.build(config)
  train.create_state(model, tx, config, mesh_of(jax.devices()[:1]), jax.random.key(0))


def test_missing_or_mismatched_teacher_is_one_line_before_compiling(teacher, tmp_path,
                                                                   monkeypatch):
  config = micro_config(str(tmp_path / "none.npz"))
  with pytest.raises(FileNotFoundError) as missing:
    create_state_before_compiling(config, monkeypatch)
  assert errors.describe(missing.value) == (
      f"the teacher (method.teacher): pretrained source '{tmp_path / 'none.npz'}' does not "
      f"exist: pass a mim_jax workdir, an MAE .pth or an exported .npz")
  # The trainer checks the source before it writes anything: a typo leaves no workdir behind.
  with pytest.raises(FileNotFoundError, match=r"^the teacher \(method.teacher\): pretrained"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config = micro_config(teacher[0])
  config.method.teacher_variant = "Ti/4"
  with pytest.raises(checkpoint.CheckpointMismatchError) as mismatch:
    create_state_before_compiling(config, monkeypatch)
  line = errors.describe(mismatch.value)
  assert line.startswith(f"the teacher (method.teacher): the export {teacher[0]} does not fit "
                         f"the model of this config (vit Ti/4 at 16 px): "), line
  assert "missing from checkpoint: encoder/blocks/block_10/" in line, line  # Ti has 12 blocks
  assert "shape mismatch: " in line and "\n" not in str(mismatch.value), line


@pytest.mark.parametrize("field, value, message", [
    ("method.teacher", "", r"method.teacher is empty: name the frozen teacher"),
    ("method.teacher_variant", "Q/4", r"method.teacher_variant: unknown ViT variant 'Q/4'"),
    ("method.teacher_variant", "Mu/8", r"has patch 8, the student 'Mu/4' patch 4: .* use a "
                                       r"teacher with patch 4"),
    ("method.align_layers", 3, r"method.align_layers 3 must be in 1 .. 2 \(the student has 2 "
                               r"blocks, the teacher 2\)"),
    ("method.drop_path", 1.0, r"method.drop_path must be in \[0, 1\), got 1.0"),
    ("mask.ratio", 1.0, r"mask.ratio must be in \(0, 1\), got 1.0"),
])
def test_bad_configs_name_the_value(field, value, message):
  config = micro_config("/unused.npz")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)
