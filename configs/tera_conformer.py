r"""TERA pretraining of a Conformer on speech (Liu et al. 2021, "TERA: Self-Supervised Learning
of Transformer Encoder Representation for Speech"): L1 reconstruction of log-mel frames altered
in time, frequency and magnitude (mim_jax/methods/tera.py). TERA uses a Transformer encoder;
here the encoder is the Conformer of the speech family.

Run (a LibriSpeech-scale recipe; on a GPU host or TPU pod, with tfds' librispeech prepared as
ArrayRecord):

  python -m mim_jax.main --config=configs/tera_conformer.py:variant=S,data=tfds:librispeech \
      --workdir=/tmp/tera_s

Expected: TERA reports downstream results (phoneme classification, keyword spotting, speaker
recognition, ASR; its tables 2-7) that mim_jax does not evaluate yet; pretraining alone gives
the L1 reconstruction loss in metrics.jsonl.

Run on a laptop CPU in under two minutes (eSpeak NG spoken digits, synthesized on first use
and cached; the micro Conformer Mu, 2 blocks of width 32; 175 steps of batch 64):

  python -m mim_jax.main --config=configs/tera_conformer.py:runlocal --workdir=/tmp/tera_local

Expected (measured with the data cached: 31 s on an idle 2-core machine; earlier, 76 s of CPU,
evaluations included (73 s user + 3 s system; 6.6 min wall on a 2-core machine at load 15), so
under 2 minutes on an idle 2-core machine; the former runlocal's Ti Conformer took 2.7 min wall
there): the L1 loss on the altered positions falls from 1.11 to 0.71; top-1 on the 170 test
utterances (17 eSpeak voices none of which is in the training split), from the mean of the
second-to-last block's output over the real frames:

                     pretrained   random init   log-mel mean + std
    k-NN               0.818        0.435         0.776
    linear probe       0.888        0.624         0.888
    10-shot            0.835        0.529         0.759

The Ti Conformer (variant=Ti: 4 blocks of width 96) reached k-NN 0.894, linear probe 0.959,
10-shot 0.947 (random init 0.518 / 0.759 / 0.624).

The argument after ':' is a comma-separated list:
  variant=<S|M|L|Ti|Mu>          Conformer size (Gulati et al. 2020, table 1; Ti/Mu are tiny)
  data=<source>                  spoken_digits | synthetic | tfds:<name> | folder:<path>
  clip_seconds=<float>           utterance length after crop/pad (default 16; 1 with runlocal)
  batch_size=<int>               global batch (default 32; 64 with runlocal)
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
  # TERA pretrains with batch 32 (8 x 4 accumulated) for 1M steps (the authors' runner config).
  batch_size = common.int_arg(args, "batch_size", 64 if runlocal else 32)
  try:
    clip_seconds = float(args.get("clip_seconds", 1.0 if runlocal else 16.0))
  except ValueError:
    raise ValueError(f"config argument clip_seconds={args['clip_seconds']!r} must be a number "
                     f"of seconds, e.g. clip_seconds=1.0") from None

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = batch_size      # Global, over all processes and devices.

  steps_per_epoch = speech.steps_per_epoch(data, batch_size)
  if runlocal:                   # 25 epochs of the 500 training digits, 3 of warmup.
    c.total_steps, warmup_steps = 25 * steps_per_epoch, 3 * steps_per_epoch
  else:                          # TERA: 1M steps, linear warmup over the first 7%.
    c.total_steps, warmup_steps = 1_000_000, 70_000
  c.log_every_steps = 10 if runlocal else 100

  c.data = speech.audio_data_config(data, clip_seconds=clip_seconds)
  c.frontend = speech.frontend_config()
  c.model = speech.conformer_model_config(args.get("variant", "Mu" if runlocal else "S"))
  if runlocal:
    c.model.dropout = 0.0        # 175 steps on 500 utterances: nothing to regularise yet.
  c.init_from = ""               # Start from these params instead of random init: a workdir
                                 # (mim_jax/init_from.py); '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "tera"
  # The time alteration's frames are the frame mask config.mask.name; TERA sec. III-A fills
  # them, per utterance, with 0 (80%), a random segment (10%) or themselves (10%).
  c.method.zero_prob = 0.8
  c.method.replace_prob = 0.1
  # Then these feature alterations, in order (frame_masking.ALTERATIONS; knobs in config.mask):
  # the frequency band (sec. III-B) and the noise (sec. III-C). () = time alteration only.
  c.method.alterations = ("tera_frequency", "tera_magnitude")

  c.mask = speech.frame_mask_config("tera")  # 7-frame spans over 15% of the real frames.

  # AdamW with warmup and cosine decay to 0, peak lr = base_lr * batch / 256. TERA: AdamW at
  # 2e-4 for batch 32, 7% warmup, gradients clipped at norm 5 (its decay is linear, not cosine).
  # runlocal: BEST-RQ's runlocal recipe at twice its lr, 1e-3 at batch 64 (measured on the Ti
  # Conformer: k-NN 0.894, 10-shot 0.947, against 0.871 and 0.900 at 5e-4).
  if runlocal:
    c.optim = common.adamw_config(base_lr=4e-3, warmup_steps=warmup_steps, b2=0.98,
                                  weight_decay=0.01, grad_clip_norm=1.0)
  else:
    c.optim = common.adamw_config(base_lr=2e-4 * 256 / 32, warmup_steps=warmup_steps,
                                  b2=0.999, weight_decay=0.01, grad_clip_norm=5.0)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # Utterance features: the mean over real frames of a block's output.
  c.eval = common.eval_config(runlocal, feature="gap@block_-2", reconstruction_png=False)
  c.eval.baselines = ("random_init", "logmel") if runlocal else ()
  return c
