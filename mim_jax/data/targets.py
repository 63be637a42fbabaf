"""Per-utterance training targets read from a file and attached to the audio records: HuBERT's
k-means cluster ids (one per encoder frame) and HuBERTopic's utterance topic label.

`python -m mim_jax.tools.kmeans` writes the file (`write`); a config names it in the section
`config.data.targets` (path, features, num_clusters, num_topics, kmeans_config), and the train
pipeline wraps the split's source with `attach`, which checks the file against the config and
the source, and adds to every record

  targets  int32 [T']  the cluster id of each encoder frame of the clip, -1 past the audio;
  topic    int32 []    the utterance's topic label (0 when the file has no topics).

The file (.npz) holds, for each split, every utterance's ids concatenated ('<split>/ids'), their
offsets ('<split>/offsets', [N + 1]) and topics ('<split>/topic', [N], with topics), and the
header '__meta__' (JSON): data name, split sizes, clip length, sample rate, samples per target
frame, k, the feature source, the number of topics. The ids cover each whole utterance, not
just its first clip, so a random crop in training takes the ids of the frames it keeps: crops
start on a target-frame boundary (every STRIDE * hop samples, 40 ms) for that.
"""

import dataclasses
import json
from typing import Any

from etils import epath
import grain
import ml_collections
import numpy as np

from mim_jax.data import logmel

Record = dict[str, np.ndarray]

# Log-mel frames per target frame: the Conformer's two stride-2 subsampling convs
# (models/conformer.py), so HuBERT predicts one target per encoder output frame.
STRIDE = 4
FORMAT = "mim_jax k-means targets"
IGNORE = -1  # The target of frames past the audio: never scored.


def frame_samples(config: ml_collections.ConfigDict) -> int:
  """Audio samples per target frame: the log-mel hop times STRIDE (640 = 40 ms at 16 kHz)."""
  return frontend(config).hop * STRIDE


def frontend(config: ml_collections.ConfigDict) -> logmel.FrontEnd:
  return logmel.FrontEnd.from_config(config.frontend, config.data.sample_rate)


def num_targets(num_samples: int, fe: logmel.FrontEnd) -> int:
  """Target frames of an utterance of `num_samples` samples: its encoder frames,
  ceil(log-mel frames / STRIDE) (a frame is real when its first log-mel frame is)."""
  return -(-logmel.num_frames(num_samples, fe) // STRIDE)


def kmeans_command(config: ml_collections.ConfigDict) -> str:
  """The command that writes the target file this config asks for."""
  t = config.data.targets
  return (f"python -m mim_jax.tools.kmeans --config={t.kmeans_config} --features={t.features} "
          f"--k={t.num_clusters} --topics={t.num_topics} --out={t.path}")


def header(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> dict[str, Any]:
  """The header of a file made for `config`, with `sizes` {split: utterances}."""
  t = config.data.targets
  return {"format": FORMAT, "data": config.data.name, "splits": sizes,
          "clip_seconds": config.data.clip_seconds, "sample_rate": config.data.sample_rate,
          "frame_samples": frame_samples(config), "k": t.num_clusters, "features": t.features,
          "topics": t.num_topics}


def write(path: str, meta: dict[str, Any], splits: dict[str, dict[str, np.ndarray]]) -> None:
  """Writes the file: `splits` {split: {'ids', 'offsets'[, 'topic']}}, `meta` as '__meta__'.
  Written to a temporary name and renamed over any earlier file (a rerun with other settings),
  so a reader never sees half a file."""
  arrays = {f"{split}/{name}": value for split, named in splits.items()
            for name, value in named.items()}
  arrays["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / (path.name + ".partial")
  with partial.open("wb") as f:
    np.savez(f, **arrays)
  partial.replace(path)


def read_header(path: str) -> dict[str, Any]:
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
    if "__meta__" not in data.files:
      raise ValueError(f"{path} is not a target file of mim_jax.tools.kmeans (no header)")
    return json.loads(str(data["__meta__"]))


def check(config: ml_collections.ConfigDict, split: str, size: int) -> dict[str, Any]:
  """The header of config.data.targets.path, after checking that the file exists and was
  made for this config and for `size` utterances in `split`; else a one-line ValueError
  naming the difference and the command that makes the right file."""
  t = config.data.targets
  remake = f"make it with `{kmeans_command(config)}`"
  if not epath.Path(t.path).exists():
    raise ValueError(f"data.targets.path {t.path} does not exist: {remake}")
  meta = read_header(t.path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{t.path} is not a target file of mim_jax.tools.kmeans: {remake}")
  want = header(config, {})
  # Not clip_seconds: the ids cover whole utterances, so any clip length can crop them. A
  # run without topics may read a file with them.
  fields = ("data", "sample_rate", "frame_samples", "k", "features") + (
      ("topics",) if t.num_topics else ())
  for field in fields:
    if meta[field] != want[field]:
      raise ValueError(f"{t.path} was made with {field} {meta[field]!r}, this run needs "
                       f"{want[field]!r}: {remake}")
  if meta["splits"].get(split) != size:
    raise ValueError(f"{t.path} has {meta['splits'].get(split)} utterances in split {split!r}, "
                     f"the data has {size}: {remake}")
  return meta


@dataclasses.dataclass(frozen=True)
class TargetsTransform(grain.transforms.RandomMap):
  """The audio source's train transform (crop or pad to num_samples) with the record's
  targets cut to the same frames: the crop starts at a multiple of `frame_samples`, drawn
  uniformly among those that keep it inside the audio, and the targets of the frames past the
  audio are IGNORE."""
  audio_transform: Any  # the source's own train transform (audio_sources.AudioTransform)
  num_samples: int
  frame_samples: int
  num_frames: int       # target frames of a clip of num_samples

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    excess = len(record["audio"]) - self.num_samples
    shift = int(rng.integers(excess // self.frame_samples + 1)) if excess > 0 else 0
    start = shift * self.frame_samples
    # The audio now fits the clip, so the inner transform pads without cropping again.
    cut = {"audio": record["audio"][start:start + self.num_samples], "label": record["label"]}
    out = self.audio_transform.random_map(cut, rng)
    ids = record["targets"][shift:shift + self.num_frames]
    targets = np.full(self.num_frames, IGNORE, np.int32)
    targets[:len(ids)] = ids
    return {**out, "targets": targets, "topic": record["topic"]}


class TargetsSource:
  """A random-access audio source whose records also carry their utterance's `targets` (every
  target frame of the whole utterance) and `topic`; its train transform crops both."""

  def __init__(self, source: Any, path: str, split: str, fe: logmel.FrontEnd):
    self._source = source
    self._path = path
    self._fe = fe
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
      self._ids = data[f"{split}/ids"]
      self._offsets = data[f"{split}/offsets"]
      topic = f"{split}/topic"
      self._topic = (data[topic] if topic in data.files
                     else np.zeros(len(self._offsets) - 1, np.int32))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    record = self._source[index]
    ids = self._ids[self._offsets[index]:self._offsets[index + 1]].astype(np.int32)
    want = num_targets(len(record["audio"]), self._fe)
    if len(ids) != want:
      # Same count of utterances, other audio (another version of the data, resampled).
      raise ValueError(f"{self._path}: utterance {index} has {len(ids)} target frames, its "
                       f"audio {want}: the file was made from other audio; make it again")
    return {**record, "targets": ids, "topic": np.int32(self._topic[index])}

  def train_transform(self, config: ml_collections.ConfigDict) -> TargetsTransform:
    num_samples = round(config.data.clip_seconds * config.data.sample_rate)
    return TargetsTransform(self._source.train_transform(config), num_samples,
                            self._fe.hop * STRIDE, num_targets(num_samples, self._fe))


def attach(source: Any, config: ml_collections.ConfigDict, split: str) -> Any:
  """`source` with the targets of config.data.targets.path attached (checked with `check`),
  or `source` itself when the config names no target file."""
  if "targets" not in config.data or not config.data.targets.path:
    return source
  check(config, split, len(source))
  return TargetsSource(source, config.data.targets.path, split, frontend(config))
