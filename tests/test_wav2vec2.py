"""Tests of wav2vec 2.0 (methods/wav2vec2.py) and w2v-BERT (methods/w2v_bert.py): the Gumbel
quantizer's straight-through gradient and temperature schedule, the diversity loss, the
distractors (never the positive, never padding), the contrastive loss against a hand
computation, the losses falling on spoken digits, and a train step on 8 fake devices equal to
one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import w2v_bert_conformer
from configs import wav2vec2_conformer
from conftest import set_peak_lr
from conftest import speech_batches
from conftest import traced_matmul_flops
from conftest import train_checking_8_devices
from mim_jax import flops
from mim_jax import frame_masking
from mim_jax import methods
from mim_jax.data import logmel
from mim_jax.methods import gumbel_quantizer
from mim_jax.methods import wav2vec2
from mim_jax.models import conformer

# The micro configs: a Mu Conformer (2 blocks of width 32) on 0.5-s clips, batch 16; w2v-BERT
# splits it 1 contrastive + 1 masked prediction block.
MICRO = "runlocal,variant=Mu,clip_seconds=0.5,batch_size=16"
CONFIGS = {"wav2vec2": wav2vec2_conformer.get_config, "w2v_bert": w2v_bert_conformer.get_config}


# The peak lr of the training tests: the loss needs 2e-3 to fall in 40 steps.
LR = 2e-3


def micro_config(name="wav2vec2"):
  config = set_peak_lr(CONFIGS[name](MICRO), LR)
  config.method.entries = 32         # 2 x 32 codes for 16 utterances of ~6 encoder frames
  config.method.codevector_dim = 64
  config.method.final_dim = 64
  return config


def lengths_to_valid(lengths, frames):
  return jnp.arange(frames)[None, :] < jnp.asarray(lengths)[:, None]


# ---------------------------------------------------------------------------------------------
# The quantizer.
# ---------------------------------------------------------------------------------------------

def test_straight_through_gumbel_is_one_hot_with_the_soft_gradient():
  logits = jax.random.normal(jax.random.key(0), (5, 2, 7))
  weights = jax.random.normal(jax.random.key(1), (5, 2, 7))
  rng, tau = jax.random.key(2), 0.7
  quantize = lambda l: gumbel_quantizer.straight_through_gumbel(rng, l, tau)
  noise = jax.random.gumbel(rng, logits.shape)  # the same draw
  # Forward: exactly the one-hot of argmax(logits + noise).
  want = np.eye(7)[np.asarray(logits + noise).argmax(-1)]
  np.testing.assert_allclose(jax.jit(quantize)(logits), want, atol=1e-6)
  # Backward: the gradient of the soft sample softmax((logits + noise) / tau).
  grad = jax.jit(jax.grad(lambda l: (weights * quantize(l)).sum()))(logits)
  soft = jax.jit(jax.grad(lambda l: (weights * jax.nn.softmax((l + noise) / tau)).sum()))(logits)
  np.testing.assert_allclose(grad, soft, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grad)).max() > 1e-2  # not vacuous


def test_temperature_schedule():
  schedule = gumbel_quantizer.TemperatureSchedule(2.0, 0.5, 0.999995)  # wav2vec 2.0 sec. 4.2
  assert float(schedule(0)) == 2.0
  np.testing.assert_allclose(schedule(100_000), 2.0 * 0.999995 ** 100_000, rtol=1e-5)
  # It reaches the floor after ln 4 / -ln 0.999995 = 277,258 updates, and stays there.
  assert float(schedule(277_000)) > 0.5 and float(schedule(277_600)) == 0.5
  assert float(schedule(10_000_000)) == 0.5
  # runlocal anneals over 3/4 of its run.
  config = wav2vec2_conformer.get_config("runlocal")
  runlocal = gumbel_quantizer.TemperatureSchedule.from_config(config.method.temperature)
  steps = config.total_steps
  assert float(runlocal(int(0.7 * steps))) > 0.5 and float(runlocal(int(0.76 * steps))) == 0.5
  with pytest.raises(ValueError, match="end <= start"):
    gumbel_quantizer.TemperatureSchedule(0.5, 2.0, 0.9).validate("method.temperature")


def test_diversity_loss_is_0_for_uniform_use_and_1_minus_1_over_v_for_collapse():
  groups, entries, frames = 2, 8, 24
  valid = jnp.arange(frames) < 20
  uniform = jnp.full((frames, groups, entries), 1 / entries)
  np.testing.assert_allclose(gumbel_quantizer.diversity_loss(uniform, valid), 0.0, atol=1e-6)
  # Every frame picks entry 3 in both groups: each group's perplexity is 1, so the loss is
  # (GV - G) / GV = 1 - 1/V.
  collapsed = jax.nn.one_hot(jnp.full((frames, groups), 3), entries)
  np.testing.assert_allclose(gumbel_quantizer.diversity_loss(collapsed, valid),
                             1 - 1 / entries, rtol=1e-6)
  # Frame i picks entry i mod V: the 16 real frames use every entry twice (uniform use), the 8
  # padded ones all pick entry 3, which would count if padding did.
  real = jnp.arange(frames) < 16
  spread = jax.nn.one_hot(jnp.repeat(jnp.arange(frames)[:, None] % entries, groups, 1), entries)
  spread = jnp.where(real[:, None, None], spread, collapsed)
  np.testing.assert_allclose(gumbel_quantizer.diversity_loss(spread, real), 0.0, atol=1e-6)
  assert float(gumbel_quantizer.diversity_loss(spread, jnp.ones(frames, bool))) > 0.01


# ---------------------------------------------------------------------------------------------
# Masks, distractors and the contrastive loss.
# ---------------------------------------------------------------------------------------------

def test_masks_cover_whole_encoder_frames_and_distractors_are_other_masked_frames():
  lengths = np.array([200, 123, 61, 40, 9, 4, 1, 0] * 4)  # log-mel frames, padded to 200
  valid = lengths_to_valid(lengths, 200)
  spec = frame_masking.FrameMaskSpec.from_config(wav2vec2_conformer.get_config().mask)
  num = 400  # many draws per frame

  @jax.jit
  def draw(rng):
    mask, input_mask = wav2vec2.encoder_frame_mask(rng, valid, spec)
    return mask, input_mask, wav2vec2.sample_distractors(jax.random.fold_in(rng, 1), mask, num)

  mask, input_mask, drawn = (np.asarray(x) for x in draw(jax.random.key(0)))
  valid = np.asarray(valid)
  assert mask.shape == (32, 50) and not (mask & ~valid[:, ::4]).any()
  np.testing.assert_array_equal(input_mask, np.repeat(mask, 4, axis=1) & valid)
  assert drawn.shape == (32, 50, num)
  for b in range(32):
    masked = np.flatnonzero(mask[b])
    if len(masked) < 2:
      continue  # no distractor exists: the loss leaves these rows out
    for t in masked:
      got = drawn[b, t]
      assert (got != t).all()                       # never the positive
      assert mask[b, got].all()                     # always a masked real frame, so never padding
      others = np.setdiff1d(masked, [t])
      counts = np.array([(got == o).sum() for o in others])
      assert counts.sum() == num and counts.min() > 0  # all the others, roughly uniformly
      assert counts.max() < 3 * num / len(others) + 10
  assert sum(len(np.flatnonzero(m)) >= 2 for m in mask) >= 16  # not vacuous


def test_contrastive_loss_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  context, targets = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 5))
  mask = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], bool)
  drawn = wav2vec2.sample_distractors(jax.random.key(0), jnp.asarray(mask), 3)
  loss, accuracy = jax.jit(wav2vec2.contrastive_loss, static_argnums=4)(
      context, targets, drawn, mask, 0.1)
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  losses, wins = [], []
  for b, t in zip(*np.nonzero(mask)):
    scores = np.array([cos(context[b, t], targets[b, d])
                       for d in [t, *np.asarray(drawn[b, t])]]) / 0.1
    losses.append(np.log(np.exp(scores).sum()) - scores[0])
    wins.append(scores[0] > scores[1:].max())
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(accuracy, np.mean(wins), rtol=1e-6)


def test_bad_configs_are_clear_errors():
  config = micro_config()
  config.method.codevector_dim = 63
  with pytest.raises(ValueError, match="codevector_dim 63 must be divisible by method.groups 2"):
    methods.validate(config)
  config = micro_config()
  config.method.mask_fill = "zeros"
  with pytest.raises(ValueError, match="mask_fill 'zeros'"):
    methods.validate(config)
  config = micro_config("w2v_bert")
  config.method.contrastive_layers = 2  # Mu has 2 blocks: none left for masked prediction
  with pytest.raises(ValueError, match="contrastive_layers 2 gives 2 contrastive blocks"):
    methods.validate(config)


def test_analytic_flops_match_the_traced_matmuls():
  """The jaxpr of the real loss, matmuls counted one by one, equals the analytic count plus what
  the analytic count leaves out: the log-mel front end's matmuls, and the relative-position
  projection, which a batch computes once, not per utterance (flops.conformer)."""
  batch = 2
  for name in CONFIGS:
    config = micro_config(name)
    forward, _ = traced_matmul_flops(config, batch)
    fe = wav2vec2.frontend(config)
    audio = jax.ShapeDtypeStruct((batch, wav2vec2.num_samples(config)), jnp.float32)
    front = flops.jaxpr_matmul_flops(jax.make_jaxpr(lambda a, n: logmel.log_mel(a, n, fe))(
        audio, jax.ShapeDtypeStruct((batch,), jnp.int32)))
    size = conformer.parse_variant(config.model.variant)
    n = wav2vec2.encoder_frames(config)
    shared = (batch - 1) * size.depth * flops.dense(2 * n - 1, size.width, size.width)
    assert (flops.TRAIN_MULTIPLIER * (forward - front + shared)
            == batch * methods.train_flops_per_example(config)), name


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
  return speech_batches(micro_config(), 4)


def check_loss_falls(config, metrics):
  losses = np.array([m["loss"] for m in metrics])
  assert losses[-8:].mean() < 0.9 * losses[:4].mean(), losses
  assert 0.2 < metrics[0]["masked_share"] < 0.8
  schedule = gumbel_quantizer.TemperatureSchedule.from_config(config.method.temperature)
  for step in (0, len(metrics) - 1):  # the trainer passes its step
    np.testing.assert_allclose(metrics[step]["temperature"], schedule(step), rtol=1e-6)


@pytest.mark.parametrize("name", ["wav2vec2", "w2v_bert"])
def test_loss_falls_and_8_devices_match_one_device(digits, name):
  config = micro_config(name)
  # w2v-BERT's masked prediction targets are the argmax of the quantizer's logits, which the
  # summation-order noise can flip where two codes nearly tie: a flipped target moves more than
  # noise. Measured after two steps: 27 to 138 of its 109,568 parameters outside the usual
  # tolerance (1 in 10,000 allowed), one of them 23% of the lr apart (10% allowed). It is
  # allowed 1 in 200, within 50% of the lr.
  w2v_bert = name == "w2v_bert"
  metrics = train_checking_8_devices(config, [digits[i % 4] for i in range(40)],
                                     jax.random.key(1), LR,
                                     max_outliers=5e-3 if w2v_bert else 1e-4,
                                     outlier_lr_share=0.5 if w2v_bert else 0.1)
  check_loss_falls(config, metrics)
  if w2v_bert:
    assert np.mean([m["mlm"] for m in metrics[-8:]]) < np.mean([m["mlm"] for m in metrics[:4]])
