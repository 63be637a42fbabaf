r"""BEST-RQ pretraining of a Conformer on speech (Chiu et al. 2022, "Self-supervised Learning with
Random-projection Quantizer for Speech Recognition").

Run (a LibriSpeech-scale recipe; on a GPU host or TPU pod, with tfds' librispeech prepared as
ArrayRecord):

  python -m mim_jax.main --config=configs/bestrq_conformer.py:variant=L,data=tfds:librispeech \
      --workdir=/tmp/bestrq_l

Expected: BEST-RQ reports WERs after fine-tuning a 0.6B Conformer for ASR (its table 2), which
mim_jax does not fine-tune yet; pretraining alone gives the masked-prediction loss and accuracy
in metrics.jsonl.

Run on a laptop CPU in under two minutes (eSpeak NG spoken digits, synthesized on first use
and cached; the micro Conformer Mu, 2 blocks of width 32; 175 steps of batch 64):

  python -m mim_jax.main --config=configs/bestrq_conformer.py:runlocal --workdir=/tmp/bestrq_local

Expected (measured with the data cached: 32 s on an idle 2-core machine; earlier, 87 s of CPU,
evaluations included (82 s user + 5 s system; 12 min wall on a 2-core machine at load 15), so
under 2 minutes on an idle 2-core machine; the former runlocal's Ti Conformer took 2.6 min wall
there): the loss falls from 7.4 to 5.7 and the masked-frame accuracy rises from 0 to 0.10; top-1
on the test speakers' digits (README's Speech section), for the pretrained encoder / the same
encoder at random init / log-mel statistics: k-NN 0.694 / 0.435 / 0.776, linear probe 0.776 /
0.624 / 0.888, 10-shot 0.700 / 0.529 / 0.759. The Ti Conformer (variant=Ti) reaches k-NN 0.853,
probe 0.935 and 10-shot 0.894 in 70 steps (--config.total_steps=70
--config.optim.warmup_steps=14), past log-mel, at 125 s of CPU.

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
  c.method.name = "bestrq"
  # BEST-RQ sec. 4.1: a codebook of 8192 entries of dimension 16. A 500-utterance set has far
  # fewer distinct frames, so runlocal uses 1024.
  c.method.codebook_size = 1024 if runlocal else 8192
  c.method.codebook_dim = 16
  c.method.num_codebooks = 1     # > 1: the multi-codebook variant, one head per codebook.
  c.method.noise_std = 0.1       # Masked frames become N(0, 0.1^2) noise (BEST-RQ sec. 3.1).

  c.mask = speech.frame_mask_config("bestrq")
  if runlocal:
    # A spoken digit is about 0.5 s: one 400-ms span would hide nearly all of it. Shorter
    # spans, started more often, mask about the same share over more places.
    c.mask.bestrq.length = 10
    c.mask.bestrq.start_prob = 0.04

  # AdamW with warmup and cosine decay to 0, peak lr = base_lr * batch / 256 (5e-4 at 64;
  # runlocal on the Ti Conformer measured 0.92 k-NN against 0.82 with a quarter of that lr and
  # 280 steps). BEST-RQ itself trains with Adam and a Transformer (inverse square root) schedule.
  c.optim = common.adamw_config(base_lr=2e-3, warmup_steps=warmup_epochs * steps_per_epoch,
                                b2=0.98, weight_decay=0.01, grad_clip_norm=1.0)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # Utterance features: the mean over real frames of a block's output. Intermediate blocks of
  # a masked-prediction encoder carry more of the input's content than the last, which
  # specialises in the targets.
  c.eval = common.eval_config(runlocal, feature="gap@block_-2", reconstruction_png=False)
  c.eval.baselines = ("random_init", "logmel") if runlocal else ()
  return c
