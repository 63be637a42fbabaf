"""Model-scored masks beyond their first homes: HPM's hard patches with SimMIM (a twin of its head
predicts each patch's L1; hard cells), and the attention mask with MAE, CRATE-MAE and SimMIM
(a frozen ViT teacher named by `mask.teacher`, mim_jax/methods/teacher_attention.py). Real steps
through the trainer's state creation and jitted step on digits: exact kept counts, falling
losses, one compile, the teacher untouched; the FLOP counts; and the one-line errors, raised
before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import crate_mae
from configs import mae_vit
from configs import simmim_vit
from conftest import MICRO_MAE
from conftest import Trainer
from conftest import abstract_params
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
from mim_jax.methods import teacher_attention

LR = 1e-3
# Each student on a 4x4 patch grid (16 px, patch 4), as the Mu/4 teacher.
CONFIGS = {
    "mae": lambda: mae_vit.get_config(MICRO_MAE),
    "crate_mae": lambda: crate_mae.get_config("runlocal,variant=micro/4,batch_size=16"),
    "simmim": lambda: simmim_vit.get_config("variant=Mu/4,data=digits,image_size=16,"
                                            "batch_size=16,mask_patch=8"),
}
KEPT = {"mae": 4, "crate_mae": 4, "simmim": 6}  # int(16 x 0.25), int(16 x 0.4)


def with_teacher(method: str, teacher: str):
  config = set_peak_lr(CONFIGS[method](), LR)
  config.mask.name = "attention"
  config.mask.teacher = teacher
  config.mask.teacher_variant = "Mu/4"
  return config


def simmim_hpm():
  """SimMIM with HPM: hard 2x2-patch cells, the share 0.5 from step 4 on."""
  config = set_peak_lr(CONFIGS["simmim"](), LR)
  config.method.hpm.enabled = True
  config.method.hpm.ramp_fraction = 0.25
  config.mask.name = "hard_patch"
  config.total_steps = 16
  return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """(path, flat params) of a random Mu/4 ViT exported to .npz, uneven enough to attend
  unevenly (a trained teacher is not needed to test the plumbing)."""
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
  config = teacher_attention.teacher_config(CONFIGS["mae"](), "Mu/4")
  rng = np.random.default_rng(0)
  flat = {k: (k.endswith("/scale") + 0.3 * rng.normal(size=v.shape)).astype(v.dtype)
          for k, v in pretrained.expected_shapes(config, encoder_only=True).items()}
  pretrained.save_npz(path, flat, {"what": "a random Mu/4 teacher"})
  return path, {k.removeprefix("encoder/"): v for k, v in flat.items()}


@pytest.fixture(scope="module")
def batches():
  config = CONFIGS["mae"]()
  iterator = pipeline.train_iterator(config, process_index=0, process_count=1)
  return [{"image": next(iterator)["image"]} for _ in range(4)]


def train_steps(config, batches, steps: int):
  """`steps` steps on one device, through the trainer's state creation (which reads a teacher)
  and jitted step; returns the trainer and its metrics. The step must compile once.

  No 8-device run here: each would cost another step compile, and what it would prove is
  proven elsewhere: a frozen teacher split by the student's FSDP rules (tests/test_maskalign.py,
  the same hook) and HPM's loss predictor (tests/test_hpm.py)."""
  trainer = Trainer(config, mesh_of(jax.devices()[:1]), jax.random.key(0))
  metrics = trainer.run([batches[i % len(batches)] for i in range(steps)], jax.random.key(1))
  assert trainer._step._cache_size() == 1  # pylint: disable=protected-access
  return trainer, metrics


def drawn_mask(config, params, images, scores) -> tuple[np.ndarray, np.ndarray]:
  """The method's own mask on `images` (the teacher's or predictor's pass included), and
  `scores(module, images)`, in one compiled program."""
  model = methods.build(config)
  draw = jax.jit(lambda p, x: (
      model.apply({"params": p}, x, method="draw_mask", rngs={"mask": jax.random.key(2)}),
      model.apply({"params": p}, x, method=scores)))
  mask, scored = draw(params, images)
  masked = np.asarray(mask.mask)
  assert not np.take_along_axis(masked, np.asarray(mask.ids_keep), axis=1).any()
  return masked, np.asarray(scored)


# ---------------------------------------------------------------------------------------------
# HPM with SimMIM.
# ---------------------------------------------------------------------------------------------

def test_hard_cells_are_whole_exact_and_the_hardest():
  batch = 512
  predicted = jax.random.normal(jax.random.key(1), (batch, 16))
  m = jax.jit(lambda p: masking.hard_patch_mask(jax.random.key(0), batch, (4, 4), 0.6, cell=2,
                                                predicted_loss=p, hard_share=0.5))(predicted)
  cells = np.asarray(m.mask).reshape(batch, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4)
  cells = cells.reshape(batch, 4, 4)
  assert (cells.min(-1) == cells.max(-1)).all()  # whole cells only
  np.testing.assert_array_equal(cells[..., 0].sum(1), 3)  # ceil(4 x 0.6) cells masked
  # floor(3 x 0.5) = 1 hard cell: the one whose patches' mean predicted loss is highest.
  cell_loss = np.asarray(predicted).reshape(batch, 2, 2, 2, 2).mean((2, 4)).reshape(batch, 4)
  assert np.take_along_axis(cells[..., 0], cell_loss.argmax(1)[:, None], 1).all()
  with pytest.raises(ValueError, match=r"mask.hard_patch.cell 3 \(in patches\) must tile the "
                                       r"4x4 patch grid .*; valid: \[1, 2\]"):
    masking.hard_patch_mask(jax.random.key(0), 2, (4, 4), 0.6, cell=3)


def test_simmim_trains_with_hard_patches(batches):
  """SimMIM + HPM on digits: the L1 falls, the ranking loss is finite, the share ramps, one
  compile; the mask keeps one whole cell and covers the cell the trained predictor finds
  hardest on the whole image."""
  config = simmim_hpm()
  one, metrics = train_steps(config, batches, 16)
  rec = np.array([m["loss_rec"] for m in metrics])
  assert np.isfinite([m["loss_pred"] for m in metrics]).all()
  # Harder masks as the share ramps: measured 0.83 of the start at step 16.
  assert rec[-4:].mean() < 0.9 * rec[:4].mean(), rec
  np.testing.assert_allclose([m["hard_share"] for m in metrics],
                             [0.5 * min(1, (s + 1) / 4) for s in range(16)], rtol=1e-6)
  images = batches[0]["image"]
  masked, predicted = drawn_mask(config, one.state.params, images,
                                 lambda m, x: m.predicted_loss(m.encode(x)))
  np.testing.assert_array_equal(masked.sum(1), 12)  # 3 of the 4 cells of 2x2 patches
  cell_loss = predicted.reshape(-1, 2, 2, 2, 2).mean((2, 4)).reshape(-1, 4)
  hardest = np.unravel_index(cell_loss.argmax(1), (2, 2))
  assert masked.reshape(-1, 4, 4)[np.arange(len(images)), 2 * hardest[0], 2 * hardest[1]].all()


def traced_forward_flops(config, **method) -> int:
  """Matmul FLOPs of one example's forward (or of `method`), traced, nothing compiled."""
  model = methods.build(config)
  apply = lambda p, x: model.apply({"params": p}, x, rngs={"mask": jax.random.key(0)}, **method)
  image = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  return flops.jaxpr_matmul_flops(jax.make_jaxpr(apply)(abstract_params(config), image))


def test_flops_count_the_predictor_and_the_mask_pass():
  plain, predictor_only, hard = CONFIGS["simmim"](), simmim_hpm(), simmim_hpm()
  predictor_only.mask.name = "coarse"
  forward = [traced_forward_flops(c) for c in (plain, predictor_only, hard)]
  analytic = [methods.train_flops_per_example(c) for c in (plain, predictor_only, hard)]
  assert analytic[0] == flops.TRAIN_MULTIPLIER * forward[0]
  assert analytic[1] - analytic[0] == flops.TRAIN_MULTIPLIER * (forward[1] - forward[0]) > 0
  assert analytic[2] - analytic[1] == forward[2] - forward[1] > 0


# ---------------------------------------------------------------------------------------------
# The attention mask's teacher with MAE, CRATE-MAE and SimMIM.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["mae", "crate_mae", "simmim"])
def test_attention_mask_from_a_frozen_teacher_trains(method, teacher, batches):
  """Through train.create_state (which reads the teacher) and the jitted step: the loss falls,
  one compile, the teacher bit for bit the export with no optimizer state, and the mask keeps
  the configured count, guided by its attention."""
  path, flat = teacher
  config = with_teacher(method, path)
  one, metrics = train_steps(config, batches, 12)
  losses = np.array([m["loss"] for m in metrics])
  # SimMIM's L1 falls the least in 12 steps: measured 0.87 of the start (MAE's MSE 0.7).
  assert np.isfinite(losses).all() and losses[-4:].mean() < 0.9 * losses[:4].mean(), losses
  got = tree_paths.flatten(to_host(one.state.params[teacher_attention.SUBTREE]))
  assert got.keys() == flat.keys()
  assert all(got[k].tobytes() == v.tobytes() for k, v in flat.items())
  assert not any(teacher_attention.SUBTREE in k for k in tree_paths.flatten(one.state.opt_state))
  masked, attention = drawn_mask(config, one.state.params, batches[0]["image"],
                                 lambda m, x: teacher_attention.forward(m.frozen_teacher, x)[1])
  np.testing.assert_array_equal(masked.sum(1), 16 - KEPT[method])
  # The teacher's cls attention is uneven: what stays visible holds more of it than at random.
  kept = ((1 - masked) * attention).sum(1) / attention.sum(1)
  assert kept.mean() > 1.2 * KEPT[method] / 16, kept.mean()


def test_mask_teacher_flops_are_its_forward(teacher):
  config = with_teacher("simmim", teacher[0])
  plain = CONFIGS["simmim"]()
  model = methods.build(config)
  frozen = traced_forward_flops(
      config, method=lambda m, x: teacher_attention.forward(m.frozen_teacher, x)[1])
  assert frozen == teacher_attention.forward_flops(config, "Mu/4") > 0
  assert (methods.train_flops_per_example(config) - methods.train_flops_per_example(plain)
          == frozen)
  assert model.frozen_teacher is not None and methods.build(plain).frozen_teacher is None


# ---------------------------------------------------------------------------------------------
# Errors, all before anything compiles.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["mae", "crate_mae", "simmim"])
def test_attention_without_a_teacher_names_mask_teacher(method):
  config = with_teacher(method, "")
  with pytest.raises(ValueError, match=r"mask.name='attention' needs a teacher's attention "
                                       r"\(method mae, crate_mae or simmim with mask.teacher"):
    config_validation.validate(config)


@pytest.mark.parametrize("method, field, value, message", [
    ("mae", "teacher_variant", "Mu/8", r"mask.teacher_variant 'Mu/8' has patch 8, the student "
                                       r"'Mu/4' patch 4: .*use a teacher with patch 4"),
    ("simmim", "teacher_variant", "Q/4", r"mask.teacher_variant: unknown ViT variant 'Q/4'"),
    ("crate_mae", "teacher_variant", "", r"mask.teacher_variant is empty and the crate student "
                                         r"'micro/4' is no ViT to lend its own: .*'Ti/4'"),
    ("mae", "name", "random", r"mask.teacher '/t.npz' guides only mask.name='attention', not "
                              r"'random'"),
])
def test_bad_teacher_configs_are_one_line(method, field, value, message):
  config = with_teacher(method, "/t.npz")
  config.mask[field] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)


def test_simmim_hard_patch_without_the_predictor_is_refused():
  config = simmim_hpm()
  config.method.hpm.enabled = False
  with pytest.raises(ValueError, match=r"mask.name='hard_patch' needs HPM's loss predictor "
                                       r"\(method mae, crate_mae or simmim with "
                                       r"method.hpm.enabled=True\)"):
    config_validation.validate(config)


def test_missing_or_mismatched_teacher_source_is_one_line_before_compiling(teacher, tmp_path,
                                                                          monkeypatch):
  def compiled(*_):
    raise AssertionError("traced the model before reading the teacher")
  monkeypatch.setattr(train, "abstract_state", compiled)

  def create_state(config):
    train.create_state(methods.build(config), optim.build(config), config,
                       mesh_of(jax.devices()[:1]), jax.random.key(0))
  missing = str(tmp_path / "none.npz")
  with pytest.raises(FileNotFoundError) as error:
    create_state(with_teacher("simmim", missing))
  assert errors.describe(error.value) == (
      f"the mask's teacher (mask.teacher): pretrained source '{missing}' does not exist: pass "
      f"a mim_jax workdir, an MAE .pth or an exported .npz")
  with pytest.raises(FileNotFoundError, match=r"^the mask's teacher \(mask.teacher\): "):
    train.train_and_evaluate(with_teacher("mae", missing), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config = with_teacher("crate_mae", teacher[0])
  config.mask.teacher_variant = "Ti/4"  # not the export's size
  with pytest.raises(checkpoint.CheckpointMismatchError) as mismatch:
    create_state(config)
  line = errors.describe(mismatch.value)
  assert line.startswith(f"the mask's teacher (mask.teacher): the export {teacher[0]} does not "
                         f"fit the model of this config (vit Ti/4 at 16 px): "), line
  assert "\n" not in line
