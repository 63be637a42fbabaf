r"""Masked position prediction (MP3) pretraining of a ViT (Zhai et al. 2022, "Position Prediction
as an Effective Pretraining Strategy").

The ViT gets no position embedding; a random 25% of the patches form the context (keys and
values of every attention layer, ratio eta = 0.75), every patch is a query, and a linear head
classifies each patch's position among all N with cross-entropy. No pixels are reconstructed.

Run (ViT-B/16 on ImageNet-1k; on a GPU host or TPU pod):

  python -m mim_jax.main --config=configs/position_vit.py:variant=B/16,data=tfds:imagenet2012 \
      --workdir=/tmp/mp3_b16

The paper's recipe: pretraining follows DeiT's training setup (MP3 sec. 4.2): AdamW
(0.9, 0.999), lr 5e-4 x batch / 512, weight decay 0.05, cosine schedule with 5 warmup epochs,
batch 1024, eta = 0.75. The 300 epochs here are DeiT's schedule; the paper's pretraining length
per experiment is in its tables (not verified here). Fine-tuning adds learnable absolute
position embeddings and restores full attention (a separate trainer config, not this file).
Expected: MP3 beats the same ViT trained from scratch with labels (DeiT) and, on ImageNet-1k
fine-tuning, lands close to but below MAE (83.6% for MAE ViT-B/16 at 1600 epochs); its
headline is that a ViT pretrained without position embeddings fine-tunes better than a
supervised one with them. The paper's exact ImageNet numbers could not be read here, so none is
quoted. During pretraining this codebase reports `position_accuracy` (top-1 over all N
positions), also split into the context patches and the hidden ones.

Run on a CPU (embedded digits, the micro ViT Mu/8 at 32 px: 16 positions, 4 in the context; 440
steps at batch 128; 29 s on an idle 2-core machine, start-up and evaluations included; earlier,
about 77 s of CPU; measured: 75 s user + 1.5 s system, 9.4 min wall on a 2-core machine at load
20. The former Ti/8 runlocal took 266 s on an idle 2-core machine):

  python -m mim_jax.main --config=configs/position_vit.py:runlocal --workdir=/tmp/mp3_local

Expected (measured): the loss falls from 3.2 (chance is ln 16 = 2.77) to about 2.0, position
accuracy rises from chance (1/16) to about 0.29; top-1 on the 297 test digits from the
mean-pooled patch feature ('gap'), pretrained / the same encoder at random init / raw pixels:
k-NN 0.741 / 0.559 / 0.983, linear probe 0.828 / 0.764 / 0.973, 10-shot 0.697 / 0.582 / 0.879.

The argument after ':' is a comma-separated list (big_vision style):
  variant=<Mu|Ti|S|B|L|H>/<patch>  encoder size and patch, e.g. B/16, Ti/4 (default B/16; Mu/8
                                 with runlocal)
  data=<source>                  digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>               input resolution (default 224; 32 with runlocal)
  batch_size=<int>               global batch (default 1024; 128 with runlocal)
  runlocal                       tiny model and run on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common

ARGS = {"variant", "data", "image_size", "batch_size", "runlocal"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  image_size = common.int_arg(args, "image_size", 32 if runlocal else 224)
  batch_size = common.int_arg(args, "batch_size", 128 if runlocal else 1024)  # DeiT: 1024.

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  # Run length: DeiT's 300 epochs with 5 warmup epochs (runlocal: 40 and 4, as MAE's).
  epochs, warmup_epochs = (40, 4) if runlocal else (300, 5)
  steps_per_epoch = common.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  # MP3: no position embeddings in the encoder (methods/position.py builds it).
  c.model = common.vit_model_config(args.get("variant", "Mu/8" if runlocal else "B/16"),
                                   posemb="none")

  c.init_from = ""               # Start from these params instead of random init: a workdir, an
                                 # MAE .pth or an .npz (mim_jax/init_from.py); '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "position"

  # DeiT's AdamW, which MP3 follows: betas (0.9, 0.999), wd 0.05, lr = 5e-4 * batch / 512.
  # runlocal: 440 steps at batch 128 on digits need a larger step (peak lr 1e-3, not 1.25e-4).
  # No weight decay on the cls token, as DeiT's timm optimizer (the ViT's no_weight_decay()).
  c.optim = common.adamw_config(base_lr=4e-3 if runlocal else 5e-4, lr_batch_base=512,
                                b2=0.999, warmup_steps=warmup_epochs * steps_per_epoch,
                                no_decay_tokens=("cls",))
  c.data = common.data_config(data)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # The cls token gets no position target, so the probe reads the mean patch feature ('gap');
  # MP3 predicts positions, not pixels, so there is no reconstruction grid.
  c.eval = common.eval_config(runlocal, feature="gap", reconstruction_png=False)
  # Draws the context patches; ratio eta: the share of patches left out of every layer's keys
  # and values (MP3's 0.75).
  c.mask = common.mask_config("random", 0.75)
  return c
