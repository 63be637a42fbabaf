r"""wav2vec 2.0 pretraining of a Conformer on speech (Baevski et al. 2020, "wav2vec 2.0: A
Framework for Self-Supervised Learning of Speech Representations"; mim_jax/methods/wav2vec2.py
describes where it departs from the paper).

Run (a LibriSpeech-scale recipe; on a GPU host or TPU pod, with tfds' librispeech prepared as
ArrayRecord):

  python -m mim_jax.main --config=configs/wav2vec2_conformer.py:variant=L,data=tfds:librispeech \
      --workdir=/tmp/wav2vec2_l

Expected: the paper reports WERs after fine-tuning for ASR (its tables 1-2), which mim_jax does
not fine-tune yet; pretraining alone gives the contrastive loss (from ln 101 = 4.6), its
accuracy and the codebook perplexity in metrics.jsonl.

Run on a laptop CPU in under two minutes (eSpeak NG spoken digits, synthesized on first use
and cached; the micro Conformer Mu, 2 blocks of width 32; 175 steps of batch 64):

  python -m mim_jax.main --config=configs/wav2vec2_conformer.py:runlocal \
      --workdir=/tmp/wav2vec2_local

Expected (measured with the data cached: 46 s on an idle 2-core machine; earlier, 96 s of CPU,
evaluations included (92 s user + 3 s system; 7.2 min wall on a 2-core machine at load 15), so
under 2 minutes on an idle 2-core machine; the former runlocal's Ti Conformer took 2.6 min wall
there): the loss falls from 4.72 (about ln 101, chance among the positive and K = 100
distractors) to 3.73, the contrastive accuracy rises from 0.20 to 0.45; top-1 on the test
speakers' digits, from the mean of the second-to-last block's output over the real frames:

                 pretrained   random init   log-mel mean + std
  k-NN              0.688        0.435          0.776
  linear probe      0.794        0.624          0.888
  10-shot           0.759        0.529          0.759

The Ti Conformer (variant=Ti: 4 blocks of width 96) reached k-NN 0.859, linear probe 0.918,
10-shot 0.888 (random init 0.518 / 0.759 / 0.624).

The argument after ':' is a comma-separated list:
  variant=<S|M|L|Ti|Mu>          Conformer size (Gulati et al. 2020, table 1; Ti/Mu are tiny)
  data=<source>                  spoken_digits | synthetic | tfds:<name> | folder:<path>
  clip_seconds=<float>           utterance length after crop/pad (default 16; 1 with runlocal)
  batch_size=<int>               global batch (default 2048; 64 with runlocal)
  runlocal                       tiny model and run on spoken digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common
from configs import speech

ARGS = {"variant", "data", "clip_seconds", "batch_size", "runlocal"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "spoken_digits" if runlocal else "tfds:librispeech")
  batch_size = common.int_arg(args, "batch_size", 64 if runlocal else 2048)
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
  c.frontend = speech.frontend_config()
  c.model = speech.conformer_model_config(args.get("variant", "Mu" if runlocal else "L"))
  if runlocal:
    c.model.dropout = 0.0        # 175 steps on 500 utterances: nothing to regularise yet.
  c.init_from = ""               # Start from these params instead of random init: a workdir
                                 # (mim_jax/init_from.py); '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "wav2vec2"
  wav2vec2_method_config(c.method, runlocal=runlocal, steps=c.total_steps)

  # Spans over the encoder's 40-ms frames (wav2vec2.py): p = 0.065, M = 10 (sec. 4.2).
  c.mask = speech.frame_mask_config("span")
  if runlocal:
    # A spoken digit is about 12 encoder frames: one 10-frame span would hide nearly all of
    # it. Shorter spans, started more often, mask about the paper's half over more places.
    c.mask.span.length = 3
    c.mask.span.start_prob = 0.2

  # AdamW with warmup and cosine decay to 0, peak lr = base_lr * batch / 256; wav2vec 2.0
  # trains with Adam, a linear warmup and linear decay (sec. 4.2).
  c.optim = common.adamw_config(base_lr=2e-3, warmup_steps=warmup_epochs * steps_per_epoch,
                                b2=0.98, weight_decay=0.01, grad_clip_norm=1.0)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # Utterance features: the mean over real frames of a block's output.
  c.eval = common.eval_config(runlocal, feature="gap@block_-2", reconstruction_png=False)
  c.eval.baselines = ("random_init", "logmel") if runlocal else ()
  return c


def wav2vec2_method_config(m: ml_collections.ConfigDict, *, runlocal: bool, steps: int) -> None:
  """The quantizer and contrastive-loss fields of config.method, shared with
  configs/w2v_bert_conformer.py."""
  # Product quantizer: G = 2 codebooks of V = 320 entries, 128 wide each for BASE (sec. 4.2).
  m.groups = 2
  m.entries = 320
  m.codevector_dim = 256
  m.final_dim = 256              # Width of the projected context and quantized vectors.
  # Gumbel temperature max(end, start * decay^step): 2 -> 0.5 by 0.999995 per update (sec.
  # 4.2; LARGE ends at 0.1). That decay needs 277k updates; runlocal reaches 0.5 at about
  # 3/4 of its run instead.
  m.temperature = ml_collections.ConfigDict()
  m.temperature.start = 2.0
  m.temperature.end = 0.5
  m.temperature.decay = 0.25 ** (1 / (0.75 * steps)) if runlocal else 0.999995
  m.num_distractors = 100        # K (sec. 4.2).
  m.kappa = 0.1                  # Contrastive softmax temperature (sec. 4.2).
  m.diversity_weight = 0.1       # alpha (sec. 4.2).
  m.mask_fill = "learned"        # learned: a trained mask embedding (sec. 3.1) | noise: N(0, 1).
