r"""SimMIM pretraining of a ViT (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image
Modeling"): the encoder sees every patch, masked ones replaced by a learned mask token.

Run (the paper's ViT-B/16 recipe: 224 px, 800 epochs at batch 2048; a GPU host or pod):

  python -m mim_jax.main --config=configs/simmim_vit.py:variant=B/16,data=tfds:imagenet2012 \
      --workdir=/tmp/simmim_vit_b16

The recipe (SimMIM and its released ViT-B config): mask cells of 32 px (2x2 patches)
with ratio 0.6, a linear head with pixel shuffle (stride 16), L1 loss on masked pixels; AdamW
(0.9, 0.999), weight decay 0.05, lr 4e-4 at batch 2048 (base 1e-4 per 512 images), 10 warmup
epochs, gradient clipping at norm 5; RandomResizedCrop scale (0.67, 1) and horizontal flips.
Differences from the paper's ViT: this encoder has fixed 2D sin-cos position embeddings and no
layer scale, where SimMIM's ViT uses a shared relative position bias and layer scale 0.1, and
no stochastic depth (the paper: 0.1); the lr decays by cosine, where the released config steps
it down x0.1 at epoch 700.

Expected: 83.8% top-1 after fine-tuning (SimMIM's abstract; 800 epochs). Fine-tuning is not part
of this config.

Run on a laptop CPU in under two minutes (embedded digits, micro ViT Mu/4, 32 px, 8-px mask
cells, 275 steps of batch 128; SimMIM encodes all 64 patches, 4x the tokens of MAE's runlocal
encoder, hence the smaller model):

  python -m mim_jax.main --config=configs/simmim_vit.py:runlocal --workdir=/tmp/simmim_vit_local

Expected (measured: 38 s on an idle 2-core machine, 60 s of CPU, start-up and evaluations
included; 107 s of CPU on a machine at load 7; the former 440-step runlocal took 124 s of CPU):
the L1 loss falls from about 1.30 to about 0.41; top-1 on the digits test split from the
mean-pooled patch tokens ('gap'; SimMIM trains no cls output), pretrained / the same encoder at
random init / raw pixels: linear probe 0.882 / 0.859 / 0.973, 10-shot 0.859 / 0.825 / 0.879,
k-NN 0.684 / 0.727 / 0.983 (random ViT features already do well on digits).

Masks that think (each a config switch; mim_jax/methods/hpm.py, methods/teacher_attention.py):

  # HPM's hard patches: a twin of the head learns to rank the patches' L1; the mask takes the
  # predicted-hardest of its cells (mask.hard_patch.cell, the coarse cell) for a share ramping
  # from 0 to 0.5 of the masked ones, the rest random
  python -m mim_jax.main --config=configs/simmim_vit.py:runlocal \
      --config.method.hpm.enabled=True --config.mask.name=hard_patch --workdir=/tmp/simmim_hpm
  # a frozen ViT teacher's cls attention picks the visible patches (any pretrained source: a
  # workdir, an MAE .pth, an .npz; its patch grid must be the student's)
  python -m mim_jax.main --config=configs/simmim_vit.py:runlocal --config.mask.name=attention \
      --config.mask.teacher=<source> --config.mask.teacher_variant=Ti/4 --workdir=/tmp/simmim_att

Measured (runlocal, seed 0, 440 steps, one run each on a loaded 2-core CPU; 'gap' feature):
with hard patches the L1 falls from 1.30 to 0.42 (the default mask's: 1.30 to 0.41) and the
ranking loss from 0.70 to 0.52; k-NN 0.616, linear probe 0.872, 10-shot 0.832, where the
default mask reads 0.714, 0.899 and 0.855: a run this short does not show HPM's gain.

Compare with MAE (encoder on visible tokens only) at the same encoder:

  python -m mim_jax.bench --config=configs/simmim_vit.py:variant=B/16,image_size=224,batch_size=8
  python -m mim_jax.bench --config=configs/mae_vit.py:variant=B/16,image_size=224,batch_size=8

The argument after ':' is a comma-separated list (big_vision style):
  variant=<Mu|Ti|S|B|L|H>/<patch>   encoder size and patch (default B/16; Mu/4 with runlocal)
  mask_patch=<int>            mask cell in pixels (default 32; 8 with runlocal): it must divide
                              image_size and be a multiple of the patch
  data=<source>               digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>            input resolution (default 224; 32 with runlocal)
  batch_size=<int>            global batch (default 2048; 128 with runlocal)
  epochs=<int>                pretraining epochs (default 800; 25 with runlocal)
  runlocal                    tiny model on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common
from configs import simmim_swin
from mim_jax.models import vit

ARGS = {"variant", "mask_patch", "data", "image_size", "batch_size", "epochs", "runlocal"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  image_size = common.int_arg(args, "image_size", 32 if runlocal else 224)
  batch_size = common.int_arg(args, "batch_size", 128 if runlocal else 2048)
  epochs = common.int_arg(args, "epochs", 25 if runlocal else 800)

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  steps_per_epoch = common.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  c.model = common.vit_model_config(args.get("variant", "Mu/4" if runlocal else "B/16"),
                                   posemb="sincos")

  c.init_from = ""               # Start from these params instead of random init: a workdir, an
                                 # MAE .pth or an .npz (mim_jax/init_from.py); '' = random init.
  c.method = ml_collections.ConfigDict({"name": "simmim"})
  c.method.hpm = common.hpm_config()  # HPM's loss predictor, off (configs/hpm_vit.py says how).
  c.mask = simmim_swin.simmim_mask(common.int_arg(args, "mask_patch", 8 if runlocal else 32),
                                   vit.parse_variant(c.model.variant)[1])

  # 10 warmup epochs, lr 1e-4 per 512 images (4e-4 at 2048).
  warmup_epochs = 4 if runlocal else 10
  # SimMIM's ViT: no_weight_decay() is {'pos_embed', 'cls_token'}, so its mask token decays.
  c.optim = simmim_swin.simmim_optim(1e-4 if not runlocal else 2e-3,
                                     warmup_epochs * steps_per_epoch, min_lr=0.0,
                                     no_decay_tokens=("cls",))
  c.data = simmim_swin.simmim_data(data)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # SimMIM trains no cls output: probes read the mean of the patch tokens.
  c.eval = common.eval_config(runlocal, feature="gap", reconstruction_png=True)
  return c
