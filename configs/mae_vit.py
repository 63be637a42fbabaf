r"""MAE pretraining of a ViT (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

Run (the paper's ViT-B/16 ImageNet recipe, 800 epochs at batch 4096; on a GPU host or TPU pod):

  python -m mim_jax.main --config=configs/mae_vit.py:variant=B/16,data=tfds:imagenet2012 \
      --workdir=/tmp/mae_b16

Expected: the paper reports 83.6% top-1 after fine-tuning and 68.0% linear probe for ViT-B/16
(MAE tables 3 and 9, 1600 epochs; 800 epochs lands a few tenths below on fine-tuning).

Run on a laptop CPU in under 2 minutes (embedded digits, tiny ViT; `make demo` starts with it):

  python -m mim_jax.main --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae_local

Expected (Ti/4 at 16 px, 198 steps, block masks; 110 s on an idle 2-core CPU, 172 CPU-s,
start-up and evaluations included): the loss falls from about 2.1 to about 0.74. Top-1 on the
297 test digits, cls feature, for the pretrained encoder / the same encoder at random init / raw
pixels: k-NN 0.717 / 0.589 / 0.983, linear probe 0.919 / 0.913 / 0.973, 10-shot 0.869 / 0.835 /
0.879, 25-shot 0.902 / 0.912 / 0.916. At seed 1 (--config.seed=1): k-NN 0.677 / 0.606, probe
0.909 / 0.882, 10-shot 0.849 / 0.811, 25-shot 0.906 / 0.882. Pretraining this short moves the
encoder past its random init on k-NN, the probe and 10-shot; pixels, on 8x8 digits, remain the
stronger features (the paper's gains need hundreds of ImageNet epochs). Fine-tuning shows it
(`make demo` runs it): 165 steps of configs/finetune_vit.py:runlocal reach 0.828 top-1 from this
encoder and 0.710 from random init.

runlocal masks with BEiT's blocks (mask.name=block, blocks of 4 patches at least on the 4x4
grid), not MAE's uniform masks: on digits they give the cls feature the clearer k-NN gain
(rows below); MAE's ImageNet ablation (sec. 4, fig. 6) finds uniform masks best at scale.
  mask, steps   seed 0: k-NN, probe, 10-shot, 25-shot     seed 1: the same
  random, 275   0.673 0.926 0.865 0.899                   0.623 0.916 0.842 0.906
  random, 220   0.697 0.929 0.865 0.906                   0.633 0.902 0.842 0.902
  block, 220    0.731 0.923 0.869 0.906                   0.660 0.902 0.845 0.906
  block, 198    0.717 0.919 0.869 0.902 (runlocal)        0.677 0.909 0.849 0.906
  random init   0.589 0.913 0.835 0.912                   0.606 0.882 0.811 0.882
198 steps rather than 220 or 275 keep the run under 2 minutes.

Earlier trials (runlocal with random masks, seed 0, 275 steps unless said; pretrained / random
init, pixels being 0.983 k-NN, 0.879 10-shot, 0.916 25-shot):
  feature read by the evaluators, on the same run   k-NN           10-shot        25-shot
    cls (the default)                                0.673 / 0.589  0.865 / 0.835  0.899 / 0.912
    gap                                              0.636 / 0.579  0.862 / 0.781  0.916 / 0.909
    cls@block_-1 (last block, before the norm)       0.677 / 0.603  0.865 / 0.835  0.896 / 0.916
    gap@block_-1                                     0.643 / 0.576  0.859 / 0.785  0.913 / 0.906
    gap@block_-4                                     0.677 / 0.606  0.855 / 0.788  0.909 / 0.913
  mask (mask.ratio 0.75; block: min_patches 4; coarse: cell 2)   k-NN    probe   10-shot
    random 0.673 0.926 0.865; block 0.714 0.906 0.859; coarse 0.707 0.902 0.832;
    green_noise 0.687 0.926 0.865; red_noise 0.710 0.912 0.852; blue_noise 0.673 0.929 0.865;
    purple_noise 0.660 0.933 0.865
  Ti/2 at 16 px, 600 steps, gap (before the patch-embedding init fix; the issue's lead): k-NN
    0.87 / 0.72 but 10-shot 0.879 / 0.886, and 10 minutes on 2 cores, past the demo's budget.
None of these reaches the targets of a 10-point k-NN gain over random init at two seeds and a
10- and 25-shot win over both random init and pixels at the demo's cost: block masks at 198
steps reach the k-NN gain at seed 0 (+12.8 points) and miss it at seed 1 (+7.1); 10-shot stays
1.0 point (seed 0) and 3.0 points (seed 1) below pixels, and 25-shot 1.4 and 1.0 below.

Model-scored masks by config: HPM's hard patches (configs/hpm_vit.py:
--config.method.hpm.enabled=True --config.mask.name=hard_patch), and MaskAlign's mask, a frozen
ViT teacher's cls attention (mim_jax/methods/teacher_attention.py). The teacher is any
pretrained source (a workdir, an MAE .pth, an .npz; mask.teacher_variant its size, default the
student's), read before anything compiles, frozen, and run on the whole image in the step:

  python -m mim_jax.main --config=configs/mae_vit.py:runlocal --config.mask.name=attention \
      --config.mask.teacher=/tmp/mae_local --workdir=/tmp/mae_attention

Measured (seed 0, 275 steps, one run each, the teacher this runlocal's own result): the loss
falls from 2.09 to 0.71 (random masks: 2.08 to 0.72); k-NN 0.690, linear probe 0.926, 10-shot
0.872 against 0.673, 0.926 and 0.865 with random masks. An MAE teacher's cls token attends
almost evenly (configs/maskalign_vit.py), so the mask stays close to uniform.

The argument after ':' is a comma-separated list (big_vision style):
  variant=<Ti|S|B|L|H>/<patch>   encoder size and patch, e.g. B/16, H/14, Ti/4 (default B/16)
  decoder=<depth>x<width>        MAE decoder, e.g. 8x512 (the paper's default)
  data=<source>                  digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>               input resolution (default 224; 16 with runlocal)
  batch_size=<int>               global batch (default 4096; 128 with runlocal)
  runlocal                       tiny model and run on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common

ARGS = {"variant", "decoder", "data", "image_size", "batch_size", "runlocal"}
parse_decoder = common.parse_decoder


def parse_arg(arg: str | None) -> dict[str, str]:
  """'variant=B/16,runlocal' -> {'variant': 'B/16', 'runlocal': ''}."""
  return common.parse_arg(arg, ARGS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  decoder_depth, decoder_width = parse_decoder(args.get("decoder", "2x128" if runlocal else "8x512"))
  # Digits are 8x8: 16 px keeps every pixel at a cost a laptop CPU runs in about a minute.
  image_size = common.int_arg(args, "image_size", 16 if runlocal else 224)
  batch_size = common.int_arg(args, "batch_size", 128 if runlocal else 4096)

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  # Run length. The paper: 800 epochs with 40 warmup epochs (MAE sec. A.1, table 8). runlocal:
  # 18 epochs of the digits (198 steps), the docstring's table.
  epochs, warmup_epochs = (18, 3) if runlocal else (800, 40)
  steps_per_epoch = common.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  c.model = common.vit_model_config(args.get("variant", "Ti/4" if runlocal else "B/16"),
                                   posemb="sincos")

  c.init_from = ""               # Start from these params instead of random init: a workdir, an
                                 # MAE .pth or an .npz (mim_jax/init_from.py); '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "mae"
  c.method.norm_pix_loss = True  # MAE table 1d (per-patch normalised pixel targets).
  # False: the encoder sees only the visible patches (MAE). True: it sees every patch, masked
  # ones replaced by a learned mask token (SimMIM style): MAE tables 1c and 2 find that less
  # accurate and several times slower.
  c.method.encoder_mask_tokens = False
  c.method.decoder_depth = decoder_depth
  c.method.decoder_width = decoder_width
  c.method.decoder_heads = max(1, decoder_width // 32)  # 512 -> 16 heads, as in the paper.
  c.method.hpm = common.hpm_config()  # HPM's loss predictor, off (configs/hpm_vit.py: on).

  # MAE table 8: AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4 (lr = base_lr * batch / 256),
  # decaying the cls and mask tokens as main_pretrain.py does.
  # MAE sec. 4, fig. 5-6: uniform, 75%. runlocal: blocks of 4 patches or more (the docstring).
  c.mask = common.mask_config("block" if runlocal else "random", 0.75,
                              block_min_patches=4 if runlocal else 16)
  c.optim = common.adamw_config(base_lr=1.5e-4, warmup_steps=warmup_epochs * steps_per_epoch)
  c.data = common.data_config(data)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  c.eval = common.eval_config(runlocal, feature="cls", reconstruction_png=True)
  return c
