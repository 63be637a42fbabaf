"""Tests of HuBERT and its targets: k-means (against scikit-learn's, its seeding, sharded over 8
devices), MFCC, the k-means tool writing a target file that a HuBERTopic run trains on (its
first steps on 8 fake devices equal to one device), the one-line error of a missing or
mismatched file, and the analytic FLOP count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from configs import hubert_conformer
from conftest import mesh_of
from conftest import set_peak_lr
from conftest import speech_batches
from conftest import to_host
from conftest import traced_matmul_flops
from conftest import train_checking_8_devices
from mim_jax import flops
from mim_jax import methods
from mim_jax import models
from mim_jax import pretrained
from mim_jax import tree_paths
from mim_jax.data import logmel
from mim_jax.data import mfcc
from mim_jax.data import pipeline
from mim_jax.data import sources
from mim_jax.data import targets
from mim_jax.methods import hubert
from mim_jax.tools import kmeans

# The micro HuBERT: a Mu Conformer (2 blocks of width 32) on 0.5-s clips, 16 clusters.
MICRO = "runlocal,variant=Mu,clip_seconds=0.5,batch_size=16,k=16"


def micro_config(path, topics: int = 0):
  config = hubert_conformer.get_config(f"{MICRO},topics={topics},targets={path}")
  config.model.dropout = 0.0
  return config


def blobs(n, centers=8, seed=0):
  x, _ = make_blobs(n, n_features=6, centers=centers, cluster_std=2.0, random_state=seed)
  return x.astype(np.float32)


def seed(mesh, x, k, rng=0):
  rows, weight = kmeans._sharded_rows(mesh, x)
  init, ok = jax.jit(kmeans.kmeans_plusplus, static_argnums=3)(jax.random.key(rng), rows,
                                                              weight, k)
  return np.asarray(init), bool(ok)


# ---------------------------------------------------------------------------------------------
# k-means.
# ---------------------------------------------------------------------------------------------

def test_lloyd_matches_scikit_learn():
  """Full-batch Lloyd from the same seeds: the same assignments, centroids within 1e-4."""
  x = blobs(3001)
  mesh = mesh_of(jax.devices()[:1])
  init, ok = seed(mesh, x, 8)
  assert ok
  ours, _, done = kmeans.lloyd(mesh, x, init, iterations=4)
  theirs = KMeans(8, init=init, n_init=1, max_iter=4, tol=0, algorithm="lloyd").fit(x)
  assert done == theirs.n_iter_ == 4  # neither has converged: the comparison is after 4 steps
  np.testing.assert_allclose(ours, theirs.cluster_centers_, atol=1e-4)
  ids, _ = kmeans.assign(x, ours)
  np.testing.assert_array_equal(np.asarray(ids), theirs.labels_)


def test_kmeans_plusplus_draws_distinct_points():
  """k-means++ never draws a point equal to a centroid: 30 distinct rows, each 10 times, give
  30 distinct centroids (uniform draws would repeat some); a 31st cannot be drawn."""
  points = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
  x = points[np.random.default_rng(1).permutation(np.repeat(np.arange(30), 10))]
  mesh = mesh_of(jax.devices()[:1])
  init, ok = seed(mesh, x, 30)
  assert ok
  drawn = {tuple(row) for row in init}
  assert drawn == {tuple(row) for row in points}
  with pytest.raises(ValueError, match="fewer than k=31 distinct"):
    kmeans.fit(mesh, x, 31, algorithm="lloyd", iterations=1, batch_frames=0, seed=0)


def test_kmeans_on_8_devices_matches_one_and_minibatch_comes_close():
  x = blobs(3001)  # not a multiple of 8: padded rows of weight 0 on 8 devices
  one, eight = mesh_of(jax.devices()[:1]), mesh_of(jax.devices())
  init, _ = seed(one, x, 8)
  np.testing.assert_array_equal(seed(eight, x, 8)[0], init)
  c1, inertia, _ = kmeans.lloyd(one, x, init, iterations=20)
  c8, inertia_8, _ = kmeans.lloyd(eight, x, init, iterations=20)
  np.testing.assert_allclose(c8, c1, atol=1e-5)
  np.testing.assert_allclose(inertia_8, inertia, rtol=1e-5)
  # Sculley's minibatch updates reach about Lloyd's mean squared distance.
  mb, _ = kmeans.minibatch(eight, x, init, steps=50, batch_frames=256, seed=0)
  mb_inertia = float(np.asarray(kmeans.assign(x, mb)[1]).mean())
  assert mb_inertia < 1.05 * inertia / len(x)


# ---------------------------------------------------------------------------------------------
# MFCC.
# ---------------------------------------------------------------------------------------------

def test_mfcc_is_the_dct_of_the_log_mel_with_deltas():
  logmel = np.random.default_rng(0).normal(size=(5, 80)).astype(np.float32)
  np.testing.assert_allclose(logmel @ mfcc.dct_matrix(80, 13),
                             scipy.fft.dct(logmel, norm="ortho")[:, :13], atol=1e-5)
  # Deltas, checked by the formula with the edges repeated, row 1 padded after 7 frames.
  x = np.random.default_rng(1).normal(size=(2, 10, 3)).astype(np.float32)
  valid = np.arange(10)[None] < np.array([[10], [7]])
  got = np.asarray(mfcc.deltas(x, valid))
  for row, length in enumerate((10, 7)):
    at = lambda t: x[row, min(max(t, 0), length - 1)]
    want = [sum(n * (at(t + n) - at(t - n)) for n in (1, 2)) / 10 for t in range(length)]
    np.testing.assert_allclose(got[row, :length], want, atol=1e-6)
    assert not got[row, length:].any()


# ---------------------------------------------------------------------------------------------
# The tool and training on its targets.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target_file(tmp_path_factory):
  """The k-means tool on spoken digits: 16 clusters of MFCC frames, 4 LDA topics."""
  path = str(tmp_path_factory.mktemp("targets") / "digits_k16.npz")
  config = micro_config(path, topics=4)
  meta = kmeans.make_targets(config, iterations=10, mesh=mesh_of(jax.devices()[:1]))
  return path, meta


def test_tool_writes_every_utterance_frames_ids(target_file):
  path, meta = target_file
  assert meta["splits"] == {"train": 500, "test": 170}
  assert (meta["k"], meta["features"], meta["topics"], meta["frame_samples"]) == (16, "mfcc",
                                                                                  4, 640)
  config = micro_config(path, topics=4)
  with np.load(path) as data:
    for split, size in meta["splits"].items():
      offsets, ids = data[f"{split}/offsets"], data[f"{split}/ids"]
      assert len(offsets) == size + 1 and offsets[-1] == len(ids)
      assert ids.min() >= 0 and ids.max() < 16 and len(np.unique(ids)) == 16
      assert data[f"{split}/topic"].shape == (size,) and data[f"{split}/topic"].max() < 4
    # One id per encoder frame of the whole utterance.
    source = sources.get_source(config.data, "test", 0)
    lengths = np.diff(data["test/offsets"])
    fe = targets.frontend(config)
    for i in (0, 7, 169):
      assert lengths[i] == targets.num_targets(len(source[i]["audio"]), fe) > 0


def test_hubertopic_loss_falls_on_the_tools_targets_and_8_devices_match_one(target_file):
  lr = 2e-3
  config = set_peak_lr(micro_config(target_file[0], topics=4), lr)
  batches = speech_batches(config, 4)
  assert batches[0]["targets"].shape == (16, 12) and batches[0]["topic"].shape == (16,)
  metrics = train_checking_8_devices(config, [batches[i % 4] for i in range(80)],
                                     jax.random.key(1), lr)
  curve = lambda key: np.array([m[key] for m in metrics])
  masked, topic, accuracy = curve("masked_loss"), curve("topic_loss"), curve("accuracy")
  # Measured over the first 4 and the last 8 steps: masked loss 2.85 -> 1.76 (chance ln 16 =
  # 2.77), accuracy 0.08 -> 0.44, topic loss 1.49 -> 0.64 (chance ln 4 = 1.39).
  assert masked[-8:].mean() < 0.85 * masked[:4].mean(), masked
  assert accuracy[-8:].mean() > 2 * accuracy[:4].mean(), accuracy
  assert topic[-8:].mean() < 0.85 * topic[:4].mean(), topic
  assert 0.3 < metrics[0]["masked_share"] < 0.8


def test_iteration_2_clusters_a_block_of_a_pretrained_encoder(tmp_path):
  """HuBERT's second iteration: features '<encoder>@block_0' (an .npz export here; a workdir
  loads through the same pretrained.load_encoder_params) are that block's output on the log-mel
  front end; an utterance read whole and padded into a batch gets the same features as alone,
  and the written ids cover every encoder frame."""
  config = micro_config(str(tmp_path / "it2.npz"))
  config.data.targets.num_clusters = 8
  model = methods.build(config)

  # An encoder's parameters, as python -m mim_jax.tools.export writes them.
  params = jax.jit(lambda rng: methods.init_params(model, config, rng))(jax.random.key(0))
  params = tree_paths.flatten(to_host(params))
  np.savez(tmp_path / "encoder.npz", **{k: v for k, v in params.items()
                                        if k.startswith("encoder/")})
  config.data.targets.features = f"{tmp_path / 'encoder.npz'}@block_0"
  mesh = mesh_of(jax.devices()[:1])
  extractor = kmeans.Extractor(config, config.data.targets.features, mesh, batch_size=4)
  source = sources.get_source(config.data, "test", 0)
  got = dict(extractor.features(source, np.array([0, 7, 169])))
  params = pretrained.load_encoder_params(config.data.targets.features.split("@")[0], config)
  encoder, fe = models.build_encoder(config), targets.frontend(config)

  @jax.jit
  def alone(audio):  # block 0 of the encoder on one utterance, unpadded
    feats, valid = logmel.log_mel(audio[None], jnp.array([audio.shape[0]]), fe)
    return encoder.apply({"params": params}, feats, valid)[1]["block_0"][0]
  for i in (7, 169):
    audio = np.asarray(source[i]["audio"])
    want = alone(audio)
    assert got[i].shape == want.shape == (targets.num_targets(len(audio), fe), 32)
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)

  meta = kmeans.make_targets(config, iterations=5, mesh=mesh)
  assert meta["features"] == config.data.targets.features and meta["k"] == 8
  with np.load(config.data.targets.path) as data:
    ids, offsets = data["test/ids"], data["test/offsets"]
  assert offsets[170] == len(ids) and ids.max() < 8 and len(np.unique(ids)) > 1
  assert np.diff(offsets)[7] == len(got[7])


def test_missing_or_mismatched_target_file_names_the_command(target_file, tmp_path):
  path, meta = target_file
  command = (f"python -m mim_jax.tools.kmeans --config=configs/hubert_conformer.py:{MICRO},"
             f"topics=4,targets={{path}} --features=mfcc --k=16 --topics=4 --out={{path}}")
  missing = str(tmp_path / "none.npz")
  with pytest.raises(ValueError, match="does not exist") as error:
    pipeline.train_iterator(micro_config(missing, topics=4), process_index=0, process_count=1)
  assert command.format(path=missing) in str(error.value) and "\n" not in str(error.value)
  # The same file, less one training utterance.
  short = str(tmp_path / "short.npz")
  with np.load(path) as data:
    splits = {s: {"ids": data[f"{s}/ids"], "offsets": data[f"{s}/offsets"],
                  "topic": data[f"{s}/topic"]} for s in meta["splits"]}
  train = splits["train"]
  train.update(ids=train["ids"][:train["offsets"][-2]], offsets=train["offsets"][:-1],
               topic=train["topic"][:-1])
  targets.write(short, {**meta, "splits": {"train": 499, "test": 170}}, splits)
  with pytest.raises(ValueError, match="499 utterances in split 'train', the data has 500"
                     ) as error:
    pipeline.train_iterator(micro_config(short, topics=4), process_index=0, process_count=1)
  assert command.format(path=short) in str(error.value) and "\n" not in str(error.value)
  # Another k than the config's.
  with pytest.raises(ValueError, match="made with k 16, this run needs 32"):
    config = micro_config(path, topics=4)
    config.data.targets.num_clusters = 32
    pipeline.train_iterator(config, process_index=0, process_count=1)


def test_bad_config_is_a_clear_error(target_file):
  config = micro_config(target_file[0])
  config.method.topic_weight = 0.5
  with pytest.raises(ValueError, match="num_topics >= 2"):
    methods.validate(config)
  config = micro_config(target_file[0])
  config.method.unmasked_weight = 1.5
  with pytest.raises(ValueError, match="unmasked_weight must be in"):
    methods.validate(config)


def test_analytic_flops_match_the_traced_matmuls(tmp_path):
  """At batch 1 the traced forward (HuBERTopic: with the topic head) is the analytic count
  plus the log-mel filterbank matmul, which the analytic count leaves out."""
  config = micro_config(str(tmp_path / "unused.npz"), topics=4)
  forward, _ = traced_matmul_flops(config, batch=1)
  fe = hubert.frontend(config)
  filterbank = flops.dense(logmel.num_frames(hubert.num_samples(config), fe),
                           fe.n_fft // 2 + 1, fe.num_mels)
  assert flops.TRAIN_MULTIPLIER * (forward - filterbank) == (
      methods.train_flops_per_example(config))
