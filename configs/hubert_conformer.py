r"""HuBERT pretraining of a Conformer on speech (Hsu et al. 2021, "HuBERT: Self-Supervised Speech
Representation Learning by Masked Prediction of Hidden Units"), and HuBERTopic (Maekaku et al.
2023) with topics=<n>.

HuBERT trains on targets made before the run: k-means cluster ids of every frame, written by
`python -m mim_jax.tools.kmeans` to data.targets.path. A run whose file is missing or made for
other data stops at once with a one-line error giving the command that makes it.

Run on a laptop CPU (eSpeak NG spoken digits, synthesized on first use and cached; the micro
Conformer Mu, 2 blocks of width 32; 175 steps of batch 64): iteration 1, k-means of MFCC frames
(k = 100, about 7 s), then pretraining (under two minutes):

  python -m mim_jax.tools.kmeans --config=configs/hubert_conformer.py:runlocal
  python -m mim_jax.main --config=configs/hubert_conformer.py:runlocal --workdir=/tmp/hubert_local

Expected (measured with the data and targets cached: 33 s on an idle 2-core machine, 50 s of
CPU, start-up and evaluations included; 107 s of CPU at load 20; the former runlocal's Ti
Conformer took 2.6 min wall there): the loss falls from 4.9 (ln(100) = 4.6) to 3.3, the masked
accuracy rises to 0.27; top-1 on the 170 test utterances (unseen speakers) from the mean of
block -2 over real frames:

  |              | pretrained | random init | log-mel mean + std |
  | k-NN         | 0.800      | 0.435       | 0.776              |
  | linear probe | 0.847      | 0.624       | 0.888              |
  | 10-shot      | 0.771      | 0.529       | 0.759              |

The Ti Conformer (4 blocks of width 96; add `variant=Ti` to each command, about 3 minutes a
run) reaches k-NN 0.906, linear probe 0.941, 10-shot 0.965 (random init 0.518 / 0.759 /
0.624); HuBERTopic and iteration 2 were measured with it. HuBERTopic: the same with
`runlocal,variant=Ti,topics=10` in both commands (10 LDA topics, weight 1): measured k-NN 0.924,
linear probe 0.947, 10-shot 0.918.

Iteration 2 clusters a block of the iteration-1 encoder (HuBERT BASE: 500 clusters of its 6th of
12 layers), into a file of its own; from a `runlocal,variant=Ti` iteration 1 in /tmp/hb_ti
(measured: k-NN 0.912, linear probe 0.941, 10-shot 0.929):

  python -m mim_jax.tools.kmeans \
      --config=configs/hubert_conformer.py:runlocal,variant=Ti,k=500,features=/tmp/hb_ti@block_2
  python -m mim_jax.main \
      --config=configs/hubert_conformer.py:runlocal,variant=Ti,k=500,features=/tmp/hb_ti@block_2 \
      --workdir=/tmp/hb_ti_it2

A LibriSpeech-scale recipe (a GPU host or TPU pod, tfds' librispeech prepared as ArrayRecord;
HuBERT fits k-means on 10% of the utterances):

  python -m mim_jax.tools.kmeans \
      --config=configs/hubert_conformer.py:variant=L,data=tfds:librispeech \
      --fit_fraction=0.1 --algorithm=minibatch --iterations=2000
  python -m mim_jax.main --config=configs/hubert_conformer.py:variant=L,data=tfds:librispeech \
      --workdir=/ckpt/hubert_l

The argument after ':' is a comma-separated list:
  variant=<S|M|L|Ti|Mu>          Conformer size (Gulati et al. 2020, table 1; Ti/Mu are tiny)
  data=<source>                  spoken_digits | synthetic | tfds:<name> | folder:<path>
  clip_seconds=<float>           utterance length after crop/pad (default 16; 1 with runlocal)
  batch_size=<int>               global batch (default 2048; 64 with runlocal)
  k=<int>                        k-means clusters (default 100, HuBERT's first iteration)
  topics=<int>                   HuBERTopic: LDA topics of the targets and the topic loss (0 = off)
  features=<mfcc|workdir@layer>  what k-means clustered (default mfcc)
  targets=<path>                 the target file (default /tmp/hubert_<data>_k<k>[_t<topics>].npz)
  runlocal                       tiny model and run on spoken digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>; the k-means tool reads
the same config, so give it the same overrides.
"""

import re

import ml_collections

from configs import common
from configs import speech

ARGS = {"variant", "data", "clip_seconds", "batch_size", "k", "topics", "features", "targets",
        "runlocal"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "spoken_digits" if runlocal else "tfds:librispeech")
  batch_size = common.int_arg(args, "batch_size", 64 if runlocal else 2048)
  k = common.int_arg(args, "k", 100)
  topics = common.int_arg(args, "topics", 0)
  try:
    clip_seconds = float(args.get("clip_seconds", 1.0 if runlocal else 16.0))
  except ValueError:
    raise ValueError(f"config argument clip_seconds={args['clip_seconds']!r} must be a number "
                     f"of seconds, e.g. clip_seconds=1.0") from None

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = batch_size      # Global, over all processes and devices.

  # Run length in epochs of the training set (spoken digits: 500 utterances).
  epochs, warmup_epochs = (25, 3) if runlocal else (200, 20)
  steps_per_epoch = speech.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  c.data = speech.audio_data_config(data, clip_seconds=clip_seconds)
  # The targets (mim_jax/data/targets.py): a file of `python -m mim_jax.tools.kmeans`, whose
  # header must match this section and the data.
  t = c.data.targets = ml_collections.ConfigDict()
  name = re.sub(r"[^A-Za-z0-9]+", "_", data).strip("_")
  t.path = args.get("targets") or f"/tmp/hubert_{name}_k{k}{f'_t{topics}' if topics else ''}.npz"
  t.features = args.get("features", "mfcc")  # What was clustered: 'mfcc' (iteration 1) or
                                 # '<workdir>@<layer>' (a trained encoder's block).
  t.num_clusters = k             # HuBERT sec. IV-B: 100 MFCC clusters, then 500.
  t.num_topics = topics          # HuBERTopic's LDA topics (0 = no topic labels).
  t.kmeans_config = f"configs/hubert_conformer.py{':' + arg if arg else ''}"  # The --config
                                 # of the command that makes the file (named in its errors).

  c.frontend = speech.frontend_config()
  c.model = speech.conformer_model_config(args.get("variant", "Mu" if runlocal else "L"))
  if runlocal:
    c.model.dropout = 0.0        # 175 steps on 500 utterances: nothing to regularise yet.
  c.init_from = ""               # Start from these params instead of random init: a workdir
                                 # (mim_jax/init_from.py); '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "hubert"
  c.method.proj_dim = 256        # The projection before the cosine scores (HuBERT BASE: 256).
  c.method.temperature = 0.1     # Cosine similarity / 0.1 (HuBERT sec. II-E).
  c.method.unmasked_weight = 0.0  # Loss (1 - w) L_masked + w L_unmasked; the paper's alpha =
                                 # 1 - w = 1 (only masked frames) is its best (sec. V).
  # HuBERTopic's auxiliary utterance topic loss, weight lambda (0 = plain HuBERT). Its paper's
  # method and experiment sections were not reachable when this was written: 1.0 (the topic
  # cross-entropy as much as the masked one) is this codebase's default, not the paper's.
  c.method.topic_weight = 1.0 if topics else 0.0

  # HuBERT sec. IV-C: spans of l = 10 frames started at p = 8% of the frames, at its 20 ms frame
  # rate. The mask is drawn here at the encoder's 40 ms rate (every target frame wholly masked
  # or not): the same 200 ms spans started as often per second are l = 5, p = 0.16.
  c.mask = speech.frame_mask_config("span")
  c.mask.span.start_prob = 0.16
  c.mask.span.length = 5
  if runlocal:
    # A spoken digit is about 0.5 s (12 encoder frames): at the paper's rate 2/3 of it is
    # masked. Half as many spans (about half of it masked) measured (Ti) k-NN 0.888 against 0.841.
    c.mask.span.start_prob = 0.08

  # AdamW with warmup and cosine decay to 0, peak lr = base_lr * batch / lr_batch_base: HuBERT
  # BASE's peak 5e-4 at the default batch (sec. IV-C; it uses Adam, 8% warmup and a linear
  # decay). runlocal: 1e-3 at batch 64 (measured on Ti: k-NN 0.906 against 0.888 with 5e-4).
  c.optim = common.adamw_config(base_lr=4e-3 if runlocal else 5e-4,
                                lr_batch_base=256 if runlocal else 2048,
                                warmup_steps=warmup_epochs * steps_per_epoch, b2=0.98,
                                weight_decay=0.01, grad_clip_norm=1.0)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # Utterance features: the mean over real frames of the second-to-last block's output.
  c.eval = common.eval_config(runlocal, feature="gap@block_-2", reconstruction_png=False)
  c.eval.baselines = ("random_init", "logmel") if runlocal else ()
  return c
