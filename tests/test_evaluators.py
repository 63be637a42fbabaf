"""Tests of the evaluators (mim_jax/evaluators/): k-NN against a brute-force reference, the
BatchNorm linear probe on 8 devices against 1, few-shot sampling and its closed-form ridge,
big_vision's few-shot protocol against the same formula in numpy and its seed mean / std,
feature specs (cls / gap of any block), accuracies on digits well above chance (raw pixels and
a random-init micro ViT), periodic evals in a pretraining run's metrics.jsonl, and config
errors. Everything runs on the 8 fake CPU devices of conftest.py.

The digits are the embedded 8x8 set at 16 px: 1500 train / 297 test examples, 10 classes
(chance 0.1). The accuracy bounds sit a little below what was measured (given next to each).
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from configs import mae_vit
from conftest import MICRO_MAE
from conftest import mesh_of
from mim_jax import config_validation
from mim_jax import methods
from mim_jax import sharding
from mim_jax import train
from mim_jax.evaluators import features
from mim_jax.evaluators import few_shot
from mim_jax.evaluators import knn
from mim_jax.evaluators import linear_probe
from mim_jax.evaluators import suite

ARG = "runlocal,variant=Mu/4,decoder=1x32,batch_size=64"


@pytest.fixture(scope="module")
def setup():
  """The runlocal evaluators (k-NN, probe, few-shot; pretrained / random init / pixels) with
  the micro ViT, its random-init params, and a suite on all 8 devices."""
  config = mae_vit.get_config(ARG)
  model = methods.build(config)
  params = jax.jit(model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                               np.zeros((1, 16, 16, 1), np.float32))["params"]
  return config, model, params, suite.Suite(config, model, sharding.make_mesh())


# ---------------------------------------------------------------------------------------------
# Accuracies on digits.
# ---------------------------------------------------------------------------------------------

def test_pixels_on_digits(setup):
  *_, evals = setup
  (train_x, _), (test_x, _) = evals.data
  assert (len(train_x["image"]), len(test_x["image"])) == (1500, 297)
  r = evals.run_raw()
  assert set(r) == {"knn/pixels", "linear_probe/pixels", "few_shot/1shot/pixels",
                    "few_shot/5shot/pixels", "few_shot/10shot/pixels", "few_shot/25shot/pixels"}
  # Measured: k-NN 0.983, probe 0.973, few-shot 0.650 / 0.869 / 0.879 / 0.916 (1/5/10/25).
  assert r["knn/pixels"] > 0.95, r
  assert r["linear_probe/pixels"] > 0.94, r
  assert r["few_shot/1shot/pixels"] > 0.55 and r["few_shot/10shot/pixels"] > 0.82, r
  assert r["few_shot/25shot/pixels"] > r["few_shot/5shot/pixels"] > r["few_shot/1shot/pixels"]


def test_random_init_encoder_on_digits(setup):
  """A random ViT's cls token already separates digits: the baseline pretraining must beat."""
  _, _, params, evals = setup
  r = evals.run(params, "random_init")
  # Measured: k-NN 0.586, probe 0.865, few-shot 0.242 / 0.741 / 0.801 / 0.899.
  assert r["knn/random_init"] > 0.45, r
  assert r["linear_probe/random_init"] > 0.8, r
  assert r["few_shot/10shot/random_init"] > 0.7 and r["few_shot/1shot/random_init"] > 0.17, r


# ---------------------------------------------------------------------------------------------
# k-NN.
# ---------------------------------------------------------------------------------------------

def brute_force_knn(train_x, train_y, test_x, num_classes, k, temperature):
  """Weighted k-NN written out in float64 numpy: cosine similarity, top k, exp(s / T) votes."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(test_x.astype(np.float64)) @ unit(train_x.astype(np.float64)).T
  idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(test_x), num_classes))
  for i, row in enumerate(idx):
    for j in row:
      votes[i, train_y[j]] += np.exp(sims[i, j] / temperature)
  return votes, idx


def test_knn_matches_brute_force():
  rng = np.random.default_rng(0)
  train_x, test_x = rng.normal(size=(60, 12)), rng.normal(size=(37, 12))  # 37: a ragged chunk
  train_y = rng.integers(0, 5, 60)
  votes, idx = knn.votes(train_x, train_y, test_x, 5, sharding.make_mesh(), k=7,
                         temperature=0.07, chunk=16)
  ref_votes, ref_idx = brute_force_knn(train_x, train_y, test_x, 5, 7, 0.07)
  np.testing.assert_array_equal(idx, ref_idx)  # the same neighbours, in the same order
  np.testing.assert_allclose(votes, ref_votes, rtol=2e-5)  # float32 vs float64 sums
  np.testing.assert_array_equal(votes.argmax(1), ref_votes.argmax(1))
  # A query equal to a training row has it as its nearest neighbour, at similarity 1.
  _, idx = knn.votes(train_x, train_y, train_x[[3, 41]] * 5.0, 5, sharding.make_mesh(), k=1)
  np.testing.assert_array_equal(idx[:, 0], [3, 41])


# ---------------------------------------------------------------------------------------------
# Linear probe.
# ---------------------------------------------------------------------------------------------

def probe_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(mae_vit.get_config(ARG).eval.linear_probe.to_dict())
  cfg.update(overrides)
  return cfg


def test_probe_on_8_devices_equals_1(setup):
  """Features sharded by rows over 8 devices train the same probe as on 1 device (the runlocal
  recipe on digit pixels: 90 epochs of 5 steps); the BatchNorm's running statistics end at the
  features' statistics."""
  config, *_, evals = setup
  (train_x, train_y), (test_x, test_y) = evals.data
  train_f, test_f = features.pixels(train_x["image"]), features.pixels(test_x["image"])
  meshes = [mesh_of(jax.devices()[:1]), mesh_of(jax.devices())]
  cfg = config.eval.linear_probe  # on 8 devices, test_pixels_on_digits' compiled program
  (p1, s1, loss1), (p8, s8, loss8) = [linear_probe.fit(cfg, train_f, train_y, 10, m)
                                      for m in meshes]
  assert loss8[-1] < 0.2 * loss8[0], loss8  # it trains
  # Measured: differences of at most 5e-7 (the batch statistics sum in another order).
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=5e-6)
  pred8 = linear_probe.predict(p8, s8, test_f, meshes[1])
  np.testing.assert_array_equal(pred8, linear_probe.predict(p1, s1, test_f, meshes[0]))
  assert (pred8 == test_y).mean() > 0.94
  np.testing.assert_allclose(np.asarray(s8["mean"]), train_f.mean(0), atol=0.05)
  np.testing.assert_allclose(np.asarray(s8["var"]), train_f.var(0), atol=0.05)
  assert linear_probe.recipe(cfg, 1500, 10, meshes[1]).steps_per_epoch == 5
  assert linear_probe.recipe(probe_config(batch_size=16384), 1500, 10,
                             meshes[1]).batch_size == 1496  # capped, a multiple of 8


def test_paper_probe_recipe_in_config():
  """MAE table 10 for ImageNet (He et al. 2021); peak lr = 0.1 x 16384 / 256 = 6.4."""
  p = mae_vit.get_config("").eval.linear_probe
  assert (p.optimizer, p.base_lr, p.momentum, p.weight_decay) == ("lars", 0.1, 0.9, 0.0)
  assert (p.batch_size, p.epochs, p.warmup_epochs, p.lr_batch_base) == (16384, 90, 10, 256)
  r = linear_probe.recipe(p, 1_281_167, 1000, mesh_of(jax.devices()))
  assert r.peak_lr == pytest.approx(6.4) and r.steps_per_epoch == 78  # 1281167 // 16384
  k = mae_vit.get_config("").eval.knn
  assert (k.k, k.temperature) == (20, 0.07)


# ---------------------------------------------------------------------------------------------
# Few-shot.
# ---------------------------------------------------------------------------------------------

def few_shot_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(mae_vit.get_config(ARG).eval.few_shot.to_dict())
  cfg.update(overrides)
  return cfg


def test_few_shot_sampling():
  labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
  for n in (1, 5, 10, 25):
    idx = few_shot.sample_shots(labels, n, 10, seed=0)
    assert len(set(idx)) == len(idx) == 10 * n
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), [n] * 10)
    np.testing.assert_array_equal(idx, few_shot.sample_shots(labels, n, 10, seed=0))
  assert not np.array_equal(few_shot.sample_shots(labels, 5, 10, 0),
                            few_shot.sample_shots(labels, 5, 10, 1))
  cfg = few_shot_config(shots=(5, 31))
  cfg.ridge_loo.l2_regs = (1.0,)
  x = np.random.default_rng(1).normal(size=(300, 4))
  # Every class has 30 examples: 31-shot is skipped. By default ridge_loo runs one seed (no
  # std), big_vision three.
  for protocol, keys in (("ridge_loo", {"few_shot/5shot"}),
                         ("big_vision", {"few_shot/5shot", "few_shot/5shot_std"})):
    cfg.protocol = protocol
    assert set(few_shot.evaluate(cfg, (x, labels), (x, labels), 10, None)) == keys
  cfg.update(protocol="ridge_loo", shots=(1, 31))
  with pytest.raises(ValueError, match="1-shot needs a larger n"):
    few_shot.evaluate(cfg, (x, labels), (x, labels), 10, None)  # 31-shot skipped, then 1-shot


def test_ridge_closed_form_and_leave_one_out():
  """The SVD solution equals the normal equations; the leave-one-out error from the hat matrix
  equals refitting without each example."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(20, 6)) * 3 + 1, rng.normal(size=(20, 3))
  model = few_shot.fit_ridge(x, y, [0.5])
  xs = (x - model["mean"]) / model["scale"]
  w = np.linalg.solve(xs.T @ xs + 0.5 * np.eye(6), xs.T @ (y - y.mean(0)))
  np.testing.assert_allclose(model["w"], w, rtol=1e-10)
  errors = []
  for i in range(20):  # refit without example i, with the same centring and scale
    keep = np.arange(20) != i
    xk, yk = xs[keep], y[keep]
    wk = np.linalg.solve((xk - xk.mean(0)).T @ (xk - xk.mean(0)) + 0.5 * np.eye(6),
                         (xk - xk.mean(0)).T @ (yk - yk.mean(0)))
    pred = (xs[i] - xk.mean(0)) @ wk + yk.mean(0)
    errors.append(((y[i] - pred) ** 2).mean())
  assert model["loo_error"] == pytest.approx(np.mean(errors), rel=1e-9)
  assert few_shot.fit_ridge(x, y, [1e-3, 0.5, 1e3])["l2"] in (1e-3, 0.5, 1e3)


def test_big_vision_protocol_against_numpy():
  """'big_vision' = big_vision/evaluators/fewshot_lsr.py written out here: the draw (one
  default_rng(seed) permutation per class, the first n of each), per-dimension whitening by
  the n-shot set's mean and std + 1e-5, a constant feature of 100, {-1, 1} one-hot targets,
  a fixed l2 (solved here as least squares on the l2-augmented system), argmax on the test
  set; with fewer rows than dimensions (n = 2) and more (n = 12)."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16))
  train_y, test_y = rng.permutation(np.repeat(np.arange(4), 15)), rng.integers(0, 4, 50)
  # Dimensions of very different scales and offsets, which the whitening evens out.
  scales, offsets = rng.uniform(0.01, 100, 16), rng.normal(size=16) * 50
  feats = lambda y: (centres[y] + 1.5 * rng.normal(size=(len(y), 16))) * scales + offsets
  train_x, test_x = feats(train_y), feats(test_y)
  cfg = few_shot_config(protocol="big_vision", shots=(2, 12), seed=3)
  cfg.big_vision.update(l2_reg=8.0, num_seeds=1)
  got = few_shot.evaluate(cfg, (train_x, train_y), (test_x, test_y), 4, None)
  shuffle = np.random.default_rng(3)
  order = [shuffle.permutation(np.flatnonzero(train_y == c)) for c in range(4)]
  for n in (2, 12):
    idx = np.concatenate([o[:n] for o in order])
    x, y = train_x[idx], train_y[idx]
    mean, std = x.mean(0), np.sqrt(((x - x.mean(0)) ** 2).mean(0)) + 1e-5
    xb = np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
    targets = np.where(y[:, None] == np.arange(4), 1.0, -1.0)
    w = np.linalg.lstsq(np.vstack([xb, np.sqrt(8.0) * np.eye(17)]),
                        np.vstack([targets, np.zeros((17, 4))]), rcond=None)[0]
    model = few_shot.fit_whitened(x, few_shot.pm1_targets(y, 4), 8.0)
    np.testing.assert_allclose(model["w"], w, rtol=1e-8, atol=1e-10, err_msg=f"{n}-shot")
    test_b = np.hstack([(test_x - mean) / std, np.full((50, 1), 100.0)])
    top1 = ((test_b @ w).argmax(1) == test_y).mean()
    assert got[f"few_shot/{n}shot"] == top1 and 0.4 < top1 < 1, (n, top1)  # chance: 0.25
  assert set(got) == {"few_shot/2shot", "few_shot/12shot"}  # one seed: no std


def test_few_shot_seed_mean_and_std():
  """num_seeds seeds from `seed` on, each with its own draw: the result is the mean of their
  top-1 and the sample std; a seed's n-shot sets are nested (big_vision) or not (ridge_loo)."""
  rng = np.random.default_rng(1)
  labels = rng.permutation(np.repeat(np.arange(5), 12))
  x = np.eye(5)[labels] @ rng.normal(size=(5, 8)) + 2 * rng.normal(size=(60, 8))
  for protocol in ("big_vision", "ridge_loo"):
    cfg = few_shot_config(protocol=protocol, shots=(2, 5), seed=7)
    cfg[protocol].num_seeds = 3
    got = few_shot.evaluate(cfg, (x, labels), (x, labels), 5, None)
    runs = [few_shot.PROTOCOLS[protocol](cfg[protocol], (x, labels), (x, labels), 5, [2, 5], s)
            for s in (7, 8, 9)]
    for n in (2, 5):
      top1 = [r[n] for r in runs]
      assert len(set(top1)) > 1, (protocol, n, top1)  # the draws differ: so do the results
      assert got[f"few_shot/{n}shot"] == pytest.approx(np.mean(top1), abs=1e-12)
      assert got[f"few_shot/{n}shot_std"] == pytest.approx(np.std(top1, ddof=1), abs=1e-12)
  draws = [set(few_shot.nested_shots(labels, 5, 5, s)) for s in (7, 8, 9)]
  assert draws[0] != draws[1] != draws[2] != draws[0]
  assert set(few_shot.nested_shots(labels, 2, 5, 7)) < draws[0]
  assert not set(few_shot.sample_shots(labels, 2, 5, 7)) < set(
      few_shot.sample_shots(labels, 5, 5, 7))


def test_few_shot_config_errors():
  config = mae_vit.get_config(ARG)
  config.eval.few_shot.protocol = "bigvision"
  with pytest.raises(ValueError) as error:
    config_validation.validate(config)
  assert str(error.value) == ("eval.few_shot.protocol must be one of ['big_vision', "
                              "'ridge_loo'], got 'bigvision'")
  config.eval.few_shot.protocol, config.eval.few_shot.shots = "big_vision", (1,)
  config_validation.validate(config)  # a fixed l2: 1-shot alone is fine
  config.eval.few_shot.protocol = "ridge_loo"
  with pytest.raises(ValueError, match="1-shot takes its l2 strength from the largest n"):
    config_validation.validate(config)
  config.eval.few_shot.shots, config.eval.few_shot.big_vision.num_seeds = (5,), 0
  with pytest.raises(ValueError, match="num_seeds must be positive"):
    config_validation.validate(config)


# ---------------------------------------------------------------------------------------------
# Feature specs.
# ---------------------------------------------------------------------------------------------

def test_block_features(setup):
  """'cls@block_i' / 'gap@block_i' pool block i's pre-norm output (token 0 / the rest);
  negative indices count from the last block; 'cls' and 'gap' are the normed final output."""
  _, model, params, _ = setup
  images = np.random.default_rng(0).normal(size=(20, 16, 16, 1)).astype(np.float32)
  specs = ["cls", "gap", "cls@block_0", "gap@block_0", "gap@block_-1", "cls@block_-2"]
  got = features.FeatureExtractor(model, specs, sharding.make_mesh(), 16)(params,
                                                                          {"image": images})
  aux = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.features))(params, images)
  want = {"cls": aux["cls"], "gap": aux["gap"], "cls@block_0": aux["block_0"][:, 0],
          "gap@block_0": aux["block_0"][:, 1:].mean(1),
          "gap@block_-1": aux["block_1"][:, 1:].mean(1),  # Mu has 2 blocks
          "cls@block_-2": aux["block_0"][:, 0]}
  for spec in specs:
    assert got[spec].shape == (20, 64)
    np.testing.assert_allclose(got[spec], np.asarray(want[spec]), rtol=1e-5, atol=1e-5,
                               err_msg=spec)
  assert not np.allclose(got["gap@block_-1"], got["gap"])  # pre-norm vs normed


def test_feature_spec_errors():
  tokens = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  swin_like = {"gap": tokens.mean(1), "stage_0": tokens}  # no cls token anywhere
  np.testing.assert_allclose(features.pool(swin_like, "gap@stage_0"), tokens.mean(1))
  np.testing.assert_allclose(features.pool(swin_like, "gap@stage_-1"), tokens.mean(1))
  with pytest.raises(ValueError, match="no cls token"):
    features.pool(swin_like, "cls@stage_0")
  with pytest.raises(ValueError, match=r"no \[B, T, D\] intermediate 'block_3'.*'stage_0'"):
    features.pool(swin_like, "gap@block_3")
  for bad in ("mean", "gap@", "cls@block 1", "pixels@block_0"):
    with pytest.raises(ValueError, match="bad feature"):
      features.parse(bad)
  config = mae_vit.get_config(ARG)
  config.eval.knn.feature = "avg@block_1"
  with pytest.raises(ValueError, match="bad feature 'avg@block_1'"):
    config_validation.validate(config)
  config = mae_vit.get_config(ARG)
  config.eval.linear_probe.optimizer = "adam"
  with pytest.raises(ValueError, match="optimizer must be one of"):
    config_validation.validate(config)


# ---------------------------------------------------------------------------------------------
# Periodic evals in a pretraining run, and the table.
# ---------------------------------------------------------------------------------------------

def test_periodic_evals_in_metrics(tmp_path):
  """Every eval.every_steps the suite runs on the pretrained params and writes to the run's
  metrics.jsonl; the last step gets the final evals, with the baselines."""
  config = mae_vit.get_config(MICRO_MAE)
  config.total_steps, config.log_every_steps = 6, 3
  config.eval.every_steps = 2
  config.eval.reconstruction_png = False
  config.eval.max_examples = 200
  config.eval.baselines = ("pixels",)
  config.eval.knn.enabled = config.eval.few_shot.enabled = True
  config.eval.few_shot.shots = (2, 5)
  config_validation.validate(config)
  results = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
  evals = {r["step"]: r for r in rows if "knn/pretrained" in r}
  assert sorted(evals) == [2, 4, 6], rows
  for r in evals.values():
    assert 0.1 < r["knn/pretrained"] <= 1 and "few_shot/5shot/pretrained" in r
    assert "linear_probe/pretrained" not in r
  assert "knn/pixels" in evals[6] and "knn/pixels" not in evals[4]
  assert results["knn/pretrained"] == evals[6]["knn/pretrained"]
  assert any(r.get("loss") for r in rows if r["step"] == 6)  # the training row is there too


def test_table():
  text = suite.table({"knn/pretrained": 0.9, "knn/pixels": 0.95, "few_shot/1shot/pixels": 0.5})
  lines = text.splitlines()
  assert lines[0].split() == ["pretrained", "pixels"]
  assert lines[1].split() == ["knn", "0.9000", "0.9500"]
  assert lines[2].split() == ["few_shot/1shot", "-", "0.5000"]
