r"""MaskAlign pretraining of a ViT (Xue et al. 2023, "Stare at What You See: Masked Image
Modeling without Reconstruction", CVPR 2023): the student sees 30% of the patches and aligns its
features to a frozen teacher's features of the whole image (mim_jax/methods/maskalign.py).

Run on a laptop CPU (embedded digits, Ti/4 student at 16 px, 132 steps of batch 128). The
teacher is `make demo`'s MAE (workdirs/demo: configs/mae_vit.py:runlocal, a Ti/4), so run
`make demo` first; without it the run stops at once with "the teacher (method.teacher):
pretrained source 'workdirs/demo' does not exist":

  python -m mim_jax.main --config=configs/maskalign_vit.py:runlocal --workdir=/tmp/maskalign_local

Expected (measured with that teacher: 96 s on an idle 2-core CPU, 150 CPU-s, start-up and
evaluations included): the loss (2 x smooth-L1 on the teacher's last 5 blocks) falls from about
3.8 to about 0.16. Top-1 on the 297 test digits, cls feature, for the student / the same encoder
at random init / raw pixels: k-NN 0.737 / 0.589 / 0.983, linear probe 0.919 / 0.912 / 0.973,
10-shot 0.805 / 0.835 / 0.879, 25-shot 0.909 / 0.912 / 0.916 (the teacher's, as
configs/mae_vit.py gives them: 0.717, 0.919, 0.869, 0.902). (The former 275-step runlocal, from
the former 275-step teacher, read k-NN 0.795, probe 0.929, 10-shot 0.808.)
The metric attention_kept stays at 0.25, a random mask's share: the MAE teacher's cls token,
which no MAE loss reads, attends almost evenly (5.7% to 7.0% per patch against 6.25%), so this
teacher's attention mask is close to uniform; the official CLIP and DINO teachers' cls tokens
are trained to summarise the image. The same teacher-attention mask serves MAE, CRATE-MAE and
SimMIM through `mask.teacher` (configs/mae_vit.py); MaskAlign's reads `method.teacher` and
leaves `mask.teacher` empty.

Run at full scale (the official ViT-B/16 recipe; on a GPU host or TPU pod) with any teacher
mim_jax loads, e.g. an MAE ViT-B/16 workdir or MAE's released mae_pretrain_vit_base.pth:

  python -m mim_jax.main --config=configs/maskalign_vit.py:variant=B/16,data=tfds:imagenet2012 \
      --config.method.teacher=/ckpt/mae_b16 --workdir=/tmp/maskalign_b16

The official recipe (README, ViT-B/16): teacher CLIP-B/16; the teacher's last 5 layers aligned
through Dynamic Alignment, smooth-L1 on whitened teacher features; attention-guided mask of
ratio 0.7; AdamW (0.9, 0.95), weight decay 0.05 (none on the mixing weights), base lr 1.5e-4
per 256 at batch 1024, min lr 1e-5, 200 epochs with 20 of warmup, drop path 0.1.
Expected: the official ViT-B/16 fine-tunes to 85.4% top-1 on ImageNet-1k (200 epochs, CLIP-B/16
teacher; the repository's ModelCard.md). mim_jax cannot load CLIP, so a run with an MAE teacher
does not reproduce that number; it has not been measured at full scale.

The argument after ':' is a comma-separated list (big_vision style):
  variant=<Ti|S|B|L|H>/<patch>   student size and patch, e.g. B/16 (default B/16; Ti/4 runlocal)
  teacher=<Ti|S|B|L|H>/<patch>   the teacher's size and patch (default: the student's); the
                                 teacher itself is --config.method.teacher
  data=<source>                  digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>               input resolution (default 224; 16 with runlocal)
  batch_size=<int>               global batch (default 1024; 128 with runlocal)
  runlocal                       tiny model and run on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common

ARGS = {"variant", "teacher", "data", "image_size", "batch_size", "runlocal"}
DEMO_WORKDIR = "workdirs/demo"  # The Makefile's DEMO_DIR: `make demo` pretrains MAE there.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  variant = args.get("variant", "Ti/4" if runlocal else "B/16")
  image_size = common.int_arg(args, "image_size", 16 if runlocal else 224)
  batch_size = common.int_arg(args, "batch_size", 128 if runlocal else 1024)

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  # Run length: 200 epochs, 20 of them warmup (the official README's ViT-B command). runlocal:
  # 12 epochs (132 steps), under 2 minutes on a 2-core CPU.
  epochs, warmup_epochs = (12, 3) if runlocal else (200, 20)
  steps_per_epoch = common.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  # The student. The teacher is built from the same section at method.teacher_variant.
  c.model = common.vit_model_config(variant, posemb="sincos")

  c.init_from = ""               # Start the student from these params instead of random init:
                                 # a workdir, an MAE .pth or an .npz; '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "maskalign"
  # The frozen teacher: a mim_jax workdir, an MAE .pth or an exported .npz, read when a run
  # starts (a resumed run restores it from its checkpoint). The official teachers (CLIP-B/16,
  # CLIP-L/14, DINO ViT-B/16) are not in a format mim_jax reads.
  c.method.teacher = DEMO_WORKDIR if runlocal else ""
  c.method.teacher_variant = args.get("teacher", variant)  # Its patch must be the student's.
  # The teacher's last K blocks are aligned (--loss_weights top5), each from a learnable mix of
  # every student block (--fusion_type linear).
  c.method.align_layers = 5
  # Stochastic depth of the student, rising linearly over its blocks to this rate (--drop_path
  # 0.1 for ViT-B, 0.2 for ViT-L). Off for runlocal's tiny student and short run.
  c.method.drop_path = 0.0 if runlocal else 0.1

  c.optim = common.adamw_config(base_lr=1.5e-4, warmup_steps=warmup_epochs * steps_per_epoch,
                                min_lr=0.0 if runlocal else 1e-5)
  # The teacher's cls attention picks the visible patches; 70% masked (--mask_ratio 0.7).
  c.mask = common.mask_config("attention", 0.7)
  c.data = common.data_config(data)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  c.eval = common.eval_config(runlocal, feature="cls", reconstruction_png=False)
  return c
