r"""HuBERT's targets: k-means cluster ids of every frame of every utterance, and HuBERTopic's
utterance topic labels, written to the .npz a HuBERT config reads (mim_jax/data/targets.py).

  # iteration 1: MFCC (39-d) of the config's data, to the config's data.targets.path
  python -m mim_jax.tools.kmeans --config=configs/hubert_conformer.py:runlocal
  # iteration 2: block 2 of a trained encoder (a HuBERT, BEST-RQ, ... workdir of this model)
  python -m mim_jax.tools.kmeans \
      --config=configs/hubert_conformer.py:runlocal,k=500,features=/tmp/hubert_local@block_2

Give it the --config (and overrides) of the training run: the file is written for that config's
data and its `data.targets` section (features, num_clusters, num_topics, path), and the run
checks the file's header against that section. The flags --features, --k, --topics and --out
replace those four values; a run on such a file needs the same values in its config.

What it does:
  1. frame features at the encoder's frame rate (40 ms: HuBERT predicts one target per output
     frame). 'mfcc': 39-d MFCC with deltas (data/mfcc.py) at 10 ms, averaged over the 4 frames
     of each encoder frame (HuBERT itself subsamples its 100 Hz MFCC labels to its 50 Hz output;
     averaging lets each id describe the whole 40 ms). '<workdir>@<layer>': the output of
     `layer` (e.g. block_2, block_-2) of the workdir's Conformer (pretrained.load_encoder_params)
     on the config's log-mel front end, as every speech method's `features` runs it; the
     workdir's encoder must be the config's model. Every utterance is read whole (not cropped
     to the clip length), padded to a multiple of the clip length, so there are few compiled
     shapes; only real frames are used;
  2. k-means on the frames of a random --fit_fraction of the training split's utterances
     (HuBERT sec. IV-B fits on 10% of LibriSpeech 960 h): k-means++ seeding, then full-batch
     Lloyd iterations or Sculley's (2010) minibatch updates, the frames sharded over every
     device of the mesh (mim_jax/sharding.py), per-device sums added with psum;
  3. the nearest centroid of every frame of every utterance of the train and eval splits;
  4. with --topics=n > 0, HuBERTopic's topic model: scikit-learn's LatentDirichletAllocation
     with n topics, fit on the training utterances' bags of cluster ids (counts per id), and
     every utterance's label, the argmax of its topic distribution.

Single process: run it on one host (its devices form the mesh).
"""

import json
import time
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_jax import errors
from mim_jax import models
from mim_jax import pretrained
from mim_jax import sharding
from mim_jax.data import logmel
from mim_jax.data import mfcc
from mim_jax.data import sources
from mim_jax.data import targets
from mim_jax.evaluators import features as features_lib


def define_flags() -> None:
  """The command line's flags, defined only when the tool runs as a program: tests import this
  module's k-means next to other tools that define their own --config."""
  config_flags.DEFINE_config_file("config", None, "The HuBERT config whose data the "
                                            "targets are for, e.g. configs/hubert_conformer.py:"
                                            "runlocal.", lock_config=True)
  flags.DEFINE_string("features", None, "'mfcc' or '<workdir>@<layer>' (e.g. "
                                  "/tmp/hubert_local@block_2); default: data.targets.features.")
  flags.DEFINE_integer("k", None, "Clusters; default: data.targets.num_clusters.")
  flags.DEFINE_integer("topics", None, "LDA topics for HuBERTopic, 0 = none; default: "
                                 "data.targets.num_topics.")
  flags.DEFINE_string("out", None, "Output .npz; default: data.targets.path.")
  flags.DEFINE_enum("algorithm", "lloyd", ["lloyd", "minibatch"], "Full-batch Lloyd "
                                 "iterations, or Sculley's minibatch updates (for more frames "
                                 "than the devices hold).")
  flags.DEFINE_integer("iterations", 100, "Lloyd iterations (fewer if the "
                                     "centroids stop moving), or minibatch steps.")
  flags.DEFINE_integer("batch_frames", 10_000, "Frames per minibatch step.")
  flags.DEFINE_float("fit_fraction", 1.0, "Share of the training utterances whose "
                                     "frames fit k-means (HuBERT: 0.1 of LibriSpeech 960 h).")
  flags.DEFINE_integer("batch_size", 64, "Utterances per feature batch.")
  flags.DEFINE_integer("seed", 0, "Seed of the fit sample, k-means++ and the LDA.")
  flags.mark_flags_as_required(["config"])


AXIS = sharding.AXIS
ASSIGN_CHUNK = 4096  # Frames per distance block: [chunk, k] floats at a time.


# ---------------------------------------------------------------------------------------------
# k-means in JAX.
# ---------------------------------------------------------------------------------------------

def assign(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The nearest centroid of each row of x [N, D] (int32 [N]) and its squared distance [N],
  |x|^2 - 2 x.c + |c|^2 in blocks of ASSIGN_CHUNK rows."""
  c_sq = jnp.square(centroids).sum(-1)

  def nearest(row: jax.Array) -> tuple[jax.Array, jax.Array]:
    # HIGHEST: a TPU's default float32 matmul runs in bfloat16 passes, enough to flip ids.
    dots = jnp.matmul(centroids, row, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.square(row).sum() - 2 * dots + c_sq
    return jnp.argmin(d2).astype(jnp.int32), jnp.maximum(d2.min(), 0.0)

  return jax.lax.map(nearest, x, batch_size=min(ASSIGN_CHUNK, max(x.shape[0], 1)))


def kmeans_plusplus(rng: jax.Array, x: jax.Array, weight: jax.Array, k: int
                    ) -> tuple[jax.Array, jax.Array]:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): the first centroid is a row drawn with
  probability proportional to `weight`, each next one with probability proportional to weight
  times its squared distance to the nearest centroid so far. A row equal to a centroid has
  distance 0, so the k centroids are distinct rows. Returns (centroids [k, D], ok): ok is False
  when the rows have fewer than k distinct values (then the draws ran out)."""
  keys = jax.random.split(rng, k)
  dist = lambda c: jnp.square(x - c).sum(-1)  # exact 0 for a duplicate, unlike the expansion
  first = x[jax.random.categorical(keys[0], jnp.log(weight))]
  start = (jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first), dist(first), jnp.array(True))

  def draw(i, state):
    centroids, d2, ok = state
    p = weight * d2
    c = x[jax.random.categorical(keys[i], jnp.log(p))]
    return centroids.at[i].set(c), jnp.minimum(d2, dist(c)), ok & (p.max() > 0)

  centroids, _, ok = jax.lax.fori_loop(1, k, draw, start)
  return centroids, ok


def cluster_stats(mesh: jax.sharding.Mesh) -> Callable:
  """(x [N, D], weight [N], centroids [k, D]) -> (weighted sums [k, D], weights [k], inertia):
  each device assigns its rows of x; psum adds the devices' sums."""
  def local(x, weight, centroids):
    ids, d2 = assign(x, centroids)
    k = centroids.shape[0]
    sums = jax.ops.segment_sum(x * weight[:, None], ids, num_segments=k)
    counts = jax.ops.segment_sum(weight, ids, num_segments=k)
    return jax.lax.psum((sums, counts, (weight * d2).sum()), AXIS)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()),
                       out_specs=(P(), P(), P()))


def _sharded_rows(mesh: jax.sharding.Mesh, x: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """x [N, D] on the mesh, split by rows, padded to a multiple of the devices with rows of
  weight 0; and the weights."""
  pad = -len(x) % mesh.size
  weight = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
  x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
  rows = NamedSharding(mesh, P(AXIS))
  return jax.device_put(x, rows), jax.device_put(weight, rows)


def lloyd(mesh: jax.sharding.Mesh, x: np.ndarray, centroids: np.ndarray, iterations: int
          ) -> tuple[np.ndarray, float, int]:
  """Full-batch Lloyd iterations from `centroids` on the rows of x: assign every row, move
  each centroid to the mean of its rows (a centroid without rows stays). Stops early when no
  centroid moves. Returns (centroids, inertia of the last assignment, iterations run)."""
  stats = cluster_stats(mesh)

  @jax.jit
  def step(x, weight, c):
    sums, counts, inertia = stats(x, weight, c)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1e-30)[:, None], c), inertia

  x, weight = _sharded_rows(mesh, x)
  c = jax.device_put(jnp.asarray(centroids), NamedSharding(mesh, P()))
  inertia, done = float("nan"), 0
  while done < iterations:
    new, inertia = step(x, weight, c)
    done += 1
    moved = bool(jnp.any(new != c))
    c = new
    if not moved:
      break
  return np.asarray(c), float(inertia), done


def minibatch(mesh: jax.sharding.Mesh, x: np.ndarray, centroids: np.ndarray, steps: int,
              batch_frames: int, seed: int) -> tuple[np.ndarray, float]:
  """Sculley's (2010) minibatch k-means: each step draws batch_frames rows (with replacement),
  assigns them, and moves each centroid c towards each of its rows x with the per-centroid
  rate 1 / (rows it has received so far). Applied to a whole batch at once this is
  c <- (v c + sum of its new rows) / (v + their count), v its count before the batch: the same
  result as the per-row updates in order. Returns (centroids, the last batch's mean squared
  distance to its nearest centroid)."""
  stats = cluster_stats(mesh)

  @jax.jit
  def step(xb, weight, c, seen):
    sums, counts, inertia = stats(xb, weight, c)
    total = seen + counts
    moved = (c * seen[:, None] + sums) / jnp.maximum(total, 1e-30)[:, None]
    return jnp.where(counts[:, None] > 0, moved, c), total, inertia

  rng = np.random.default_rng(seed)
  c = jax.device_put(jnp.asarray(centroids), NamedSharding(mesh, P()))
  seen = jnp.zeros(len(centroids), jnp.float32)
  inertia = float("nan")
  for _ in range(steps):
    batch, weight = _sharded_rows(mesh, x[rng.integers(0, len(x), batch_frames)])
    c, seen, inertia = step(batch, weight, c, seen)
  return np.asarray(c), float(inertia) / batch_frames


def fit(mesh: jax.sharding.Mesh, x: np.ndarray, k: int, *, algorithm: str, iterations: int,
        batch_frames: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
  """k-means++ seeding, then `algorithm` ('lloyd' or 'minibatch'); x [N, D] float32 rows.
  Returns (centroids [k, D], a summary: frames, iterations, mean squared distance of a frame to
  its centroid)."""
  if len(x) < k:
    raise ValueError(f"k-means with k={k} needs at least {k} frames, the fit sample has "
                     f"{len(x)}; lower --k or raise --fit_fraction")
  rows, weight = _sharded_rows(mesh, x)
  init, ok = jax.jit(kmeans_plusplus, static_argnums=3)(jax.random.key(seed), rows, weight, k)
  if not ok:
    raise ValueError(f"the {len(x)} fit frames have fewer than k={k} distinct values; lower --k")
  init = np.asarray(init)
  if algorithm == "lloyd":
    centroids, inertia, done = lloyd(mesh, x, init, iterations)
    inertia /= len(x)
  else:
    centroids, inertia = minibatch(mesh, x, init, iterations, batch_frames, seed)
    done = iterations
  return centroids, {"fit_frames": len(x), "iterations": done, "inertia_per_frame": inertia}


# ---------------------------------------------------------------------------------------------
# Frame features of whole utterances.
# ---------------------------------------------------------------------------------------------

def parse_features(spec: str) -> tuple[str, str] | None:
  """'mfcc' -> None; '<workdir>@<layer>' -> (workdir, layer). ValueError otherwise."""
  if spec == "mfcc":
    return None
  workdir, at, layer = spec.rpartition("@")
  if not (at and workdir and layer):
    raise ValueError(f"features {spec!r}: expected 'mfcc' or '<workdir>@<layer>', e.g. "
                     f"/tmp/hubert_local@block_2")
  return workdir, layer


def group_mean(x: jax.Array, valid: jax.Array, stride: int) -> jax.Array:
  """[B, T, D] -> [B, ceil(T / stride), D]: the mean of each group's real frames."""
  b, t, d = x.shape
  groups = -(-t // stride)
  pad = groups * stride - t
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, groups, stride, d)
  w = jnp.pad(valid, ((0, 0), (0, pad))).reshape(b, groups, stride, 1).astype(x.dtype)
  return (x * w).sum(2) / jnp.maximum(w.sum(2), 1.0)


def feature_fn(config: ml_collections.ConfigDict, spec: str
               ) -> tuple[Callable[..., tuple[jax.Array, jax.Array]], Any]:
  """(fn, params): fn(params, audio [B, L], audio_len [B]) -> (features [B, T', D] at the
  encoder's frame rate, valid [B, T'])."""
  fe = targets.frontend(config)
  source = parse_features(spec)
  if source is None:
    def from_mfcc(params, audio, audio_len):
      del params
      feats, valid = mfcc.mfcc(audio, audio_len, fe)
      return group_mean(feats, valid, targets.STRIDE), valid[:, ::targets.STRIDE]
    return from_mfcc, {}
  workdir, layer = source
  params = pretrained.load_encoder_params(workdir, config)
  encoder = models.build_encoder(config)

  def from_encoder(params, audio, audio_len):
    feats, valid = logmel.log_mel(audio, audio_len, fe)
    _, aux = encoder.apply({"params": params}, feats, valid)
    return aux[features_lib.resolve_layer(layer, aux)].astype(jnp.float32), aux["valid"]
  return from_encoder, params


def utterance_batches(source: Any, indices: np.ndarray, clip_samples: int, batch_size: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (indices [batch_size], audio [batch_size, L], audio_len [batch_size]) covering the
  utterances `indices` of `source` whole, L a multiple of clip_samples: utterances are grouped
  by that padded length, so the feature function compiles once per length. Rows past the
  utterances have index -1 and length 0."""
  def pack(length, rows):
    audio = np.zeros((batch_size, length), np.float32)
    lengths = np.zeros(batch_size, np.int32)
    index = np.full(batch_size, -1, np.int64)
    for r, (i, wave) in enumerate(rows):
      audio[r, :len(wave)], lengths[r], index[r] = wave, len(wave), i
    return index, audio, lengths

  buckets: dict[int, list] = {}
  # grain reads the records in threads, ahead of the device.
  records = grain.MapDataset.source(list(indices)).map(lambda i: (i, source[i]["audio"]))
  for i, wave in records.to_iter_dataset():
    length = max(1, -(-len(wave) // clip_samples)) * clip_samples
    bucket = buckets.setdefault(length, [])
    bucket.append((i, wave))
    if len(bucket) == batch_size:
      yield pack(length, bucket)
      bucket.clear()
  for length, bucket in sorted(buckets.items()):
    if bucket:
      yield pack(length, bucket)


class Extractor:
  """Runs the feature function (and the assignment to centroids) over utterances in sharded
  batches, returning each utterance's real frames."""

  def __init__(self, config: ml_collections.ConfigDict, spec: str, mesh: jax.sharding.Mesh,
               batch_size: int):
    self.fn, params = feature_fn(config, spec)
    self.mesh = mesh
    self.batch_size = -(-batch_size // mesh.size) * mesh.size
    self.clip_samples = round(config.data.clip_seconds * config.data.sample_rate)
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    self.params = jax.device_put(params, repl)
    self._features = jax.jit(self.fn, in_shardings=(repl, rows, rows), out_shardings=rows)

    def ids(params, centroids, audio, audio_len):
      feats, valid = self.fn(params, audio, audio_len)
      b, t, d = feats.shape
      return assign(feats.reshape(b * t, d), centroids)[0].reshape(b, t), valid

    self._ids = jax.jit(ids, in_shardings=(repl, repl, rows, rows), out_shardings=rows)

  def _run(self, fn, source, indices, *args) -> Iterator[tuple[int, np.ndarray]]:
    rows = NamedSharding(self.mesh, P(AXIS))
    for index, audio, audio_len in utterance_batches(source, indices, self.clip_samples,
                                                     self.batch_size):
      out, valid = jax.device_get(fn(self.params, *args, jax.device_put(audio, rows),
                                     jax.device_put(audio_len, rows)))
      for r in np.flatnonzero(index >= 0):
        yield int(index[r]), out[r, :valid[r].sum()]  # valid is a prefix of each row

  def features(self, source, indices) -> Iterator[tuple[int, np.ndarray]]:
    """(index, float32 [frames, D]) of every utterance in `indices`, in no fixed order."""
    return self._run(self._features, source, indices)

  def cluster_ids(self, source, indices, centroids: np.ndarray
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(index, int32 [frames]) nearest-centroid ids of every utterance in `indices`."""
    return self._run(self._ids, source, indices,
                     jax.device_put(centroids, NamedSharding(self.mesh, P())))


# ---------------------------------------------------------------------------------------------
# HuBERTopic's topic model.
# ---------------------------------------------------------------------------------------------

def bags(ids: np.ndarray, offsets: np.ndarray, k: int) -> Any:
  """Each utterance's counts of each cluster id, a sparse [utterances, k] matrix."""
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
  return sparse.csr_matrix((np.ones(len(ids), np.float32), (rows, ids.astype(np.int64))),
                           shape=(len(offsets) - 1, k))


def topic_labels(splits: dict[str, dict[str, np.ndarray]], fit_split: str, k: int,
                 topics: int, seed: int) -> dict[str, np.ndarray]:
  """LDA with `topics` topics on the bags of ids of `fit_split`'s utterances; every split's
  utterances' most probable topic (int32 [N])."""
  from sklearn.decomposition import LatentDirichletAllocation  # pylint: disable=g-import-not-at-top
  lda = LatentDirichletAllocation(n_components=topics, random_state=seed)
  lda.fit(bags(splits[fit_split]["ids"], splits[fit_split]["offsets"], k))
  return {split: lda.transform(bags(s["ids"], s["offsets"], k)).argmax(1).astype(np.int32)
          for split, s in splits.items()}


# ---------------------------------------------------------------------------------------------
# The tool.
# ---------------------------------------------------------------------------------------------

def make_targets(config: ml_collections.ConfigDict, *, algorithm: str = "lloyd",
                 iterations: int = 100, batch_frames: int = 10_000, fit_fraction: float = 1.0,
                 batch_size: int = 64, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Writes config.data.targets.path for the config's data (both splits) from
  config.data.targets' features, num_clusters and num_topics; returns the file's header."""
  t = config.data.targets
  k = t.num_clusters
  if k < 2 or t.num_topics < 0:
    raise ValueError(f"--k must be >= 2 and --topics >= 0, got {k} and {t.num_topics}")
  if not 0 < fit_fraction <= 1:
    raise ValueError(f"--fit_fraction must be in (0, 1], got {fit_fraction}")
  if k > np.iinfo(np.int16).max:
    raise ValueError(f"--k={k} is more clusters than the file's int16 ids hold (32767)")
  mesh = mesh or sharding.make_mesh()
  start = time.perf_counter()
  extractor = Extractor(config, t.features, mesh, batch_size)
  d = config.data
  split_sources = {split: sources.get_source(d, split, 0) for split in (d.split, d.eval_split)}

  train = split_sources[d.split]
  count = max(1, round(fit_fraction * len(train)))
  fit_indices = np.sort(np.random.default_rng(seed).permutation(len(train))[:count])
  frames = np.concatenate([f for _, f in extractor.features(train, fit_indices)])
  logging.info("features %s: %d frames of %d utterances, dimension %d, in %.1fs", t.features,
               len(frames), count, frames.shape[1], time.perf_counter() - start)
  centroids, summary = fit(mesh, frames.astype(np.float32), k, algorithm=algorithm,
                           iterations=iterations, batch_frames=batch_frames, seed=seed)
  del frames

  splits = {}
  for split, source in split_sources.items():
    ids = [np.zeros(0, np.int16)] * len(source)
    for index, utterance in extractor.cluster_ids(source, np.arange(len(source)), centroids):
      ids[index] = utterance.astype(np.int16)
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    splits[split] = {"ids": np.concatenate(ids), "offsets": offsets}
  if t.num_topics:
    for split, labels in topic_labels(splits, d.split, k, t.num_topics, seed).items():
      splits[split]["topic"] = labels
  meta = {**targets.header(config, {s: len(source) for s, source in split_sources.items()}),
          "algorithm": algorithm, "seed": seed, "fit_fraction": fit_fraction, **summary,
          "seconds": round(time.perf_counter() - start, 1)}
  targets.write(t.path, meta, splits)
  return meta


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  if "targets" not in config.data:
    raise ValueError("the config has no data.targets section (a HuBERT config, e.g. "
                     "configs/hubert_conformer.py, names the file and its settings there)")
  t = config.data.targets
  for field, flag in (("features", "features"), ("num_clusters", "k"),
                      ("num_topics", "topics"), ("path", "out")):
    if f[flag].value is not None:
      t[field] = f[flag].value
  parse_features(t.features)
  meta = make_targets(config, algorithm=f.algorithm, iterations=f.iterations,
                      batch_frames=f.batch_frames, fit_fraction=f.fit_fraction,
                      batch_size=f.batch_size, seed=f.seed)
  print(f"wrote {t.path}: " + json.dumps(meta, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  jax.config.config_with_absl()
  app.run(main, flags_parser=errors.parse_flags)
