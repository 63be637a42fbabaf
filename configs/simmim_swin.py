r"""SimMIM pretraining of a Swin Transformer (Xie et al. 2022, "SimMIM: A Simple Framework for
Masked Image Modeling"; Swin: Liu et al. 2021).

Run (the paper's Swin-B recipe: 192 px, window 6, 100 epochs at batch 2048; a GPU host or pod):

  python -m mim_jax.main --config=configs/simmim_swin.py:variant=B,data=tfds:imagenet2012 \
      --workdir=/tmp/simmim_swin_b

The recipe (SimMIM's ablation setting and its released Swin-B config): input 192x192, window 6, mask
cells of 32 px with ratio 0.6, a linear head with pixel shuffle, L1 loss on masked pixels;
AdamW (0.9, 0.999), weight decay 0.05, lr 8e-4 at batch 2048 (base 2e-4 per 512 images),
10 warmup epochs then cosine decay to 4e-5 (1e-5 per 512 images: main_simmim.py scales the
base, warmup and minimum lr alike by batch / 512), gradient clipping at norm 5, no stochastic depth
in pretraining; RandomResizedCrop scale (0.67, 1) and horizontal flips.
Differences: the warmup starts at 0 rather than 1e-6.

Expected: 100 epochs, fine-tuned: 82.8% top-1 at 192 px and 83.5% at 224 px (window 7).
800 epochs (epochs=800): 84.0% top-1 fine-tuned at 224 px; the released 800-epoch configs use
a step schedule (x0.1 at epoch 700) rather than cosine, which this trainer does not offer.
Fine-tuning is not part of this config.

Run on a laptop CPU in under two minutes (embedded digits, micro Swin, 32 px, window 4; 275
steps of batch 128):

  python -m mim_jax.main --config=configs/simmim_swin.py:runlocal --workdir=/tmp/simmim_swin_local

Expected (measured: 46 s on an idle 2-core machine, 71 s of CPU, start-up and evaluations
included; 101 s of CPU on a machine at load 7; the former 440-step runlocal took 125 s of CPU):
the L1 loss on normalised pixels falls from about 1.06 to about 0.42; top-1 on the digits test
split from the encoder's mean-pooled feature ('gap'), pretrained / the same encoder at random
init / raw pixels: k-NN 0.569 / 0.502 / 0.983, linear probe 0.707 / 0.636 / 0.973, 10-shot 0.552
/ 0.424 / 0.879. The reconstructions are still blurry at this size and length.

The argument after ':' is a comma-separated list (big_vision style):
  variant=<Mu|T|S|B|L>       Swin size (default B; Mu with runlocal)
  window=<int>               attention window (default 6, SimMIM's at 192 px; 7 at 224 px)
  mask_patch=<int>           mask cell in pixels (default 32; 8 with runlocal): it must divide
                             image_size and be a multiple of the patch (4)
  data=<source>              digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>           input resolution (default 192; 32 with runlocal)
  batch_size=<int>           global batch (default 2048; 128 with runlocal)
  epochs=<int>               pretraining epochs (default 100; 25 with runlocal)
  runlocal                   micro model on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import common

ARGS = {"variant", "window", "mask_patch", "data", "image_size", "batch_size", "epochs",
        "runlocal"}


def simmim_mask(mask_patch: int, patch: int) -> ml_collections.ConfigDict:
  """SimMIM's masking: cells of `mask_patch` pixels (32 in the paper) for a model of `patch`-px
  patches, ratio 0.6: ceil(0.6 * cells) cells masked per image (the paper's defaults)."""
  if mask_patch <= 0 or mask_patch % patch:
    raise ValueError(f"mask_patch {mask_patch} must be a positive multiple of the model's patch "
                     f"size {patch}")
  mask = common.mask_config("coarse", 0.6, coarse_cell=mask_patch // patch)
  mask.hard_patch.cell = mask.coarse.cell  # HPM's hard patches in SimMIM's cells.
  return mask


def simmim_optim(base_lr: float, warmup_steps: int, min_lr: float,
                 no_decay_tokens: tuple[str, ...]) -> ml_collections.ConfigDict:
  """SimMIM's AdamW: (0.9, 0.999), wd 0.05, clip 5, lr = base_lr * batch / 512; no weight decay
  on the encoder's tokens its no_weight_decay() names (models/simmim.py)."""
  return common.adamw_config(base_lr=base_lr, warmup_steps=warmup_steps, b2=0.999,
                             lr_batch_base=512, min_lr=min_lr, grad_clip_norm=5.0,
                             no_decay_tokens=no_decay_tokens)


def simmim_data(name: str) -> ml_collections.ConfigDict:
  d = common.data_config(name)
  d.crop_scale = (0.67, 1.0)  # SimMIM's light augmentation: RandomResizedCrop(0.67, 1), flips.
  return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  image_size = common.int_arg(args, "image_size", 32 if runlocal else 192)
  batch_size = common.int_arg(args, "batch_size", 128 if runlocal else 2048)
  epochs = common.int_arg(args, "epochs", 25 if runlocal else 100)

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  steps_per_epoch = common.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  c.init_from = ""               # Start from these params instead of random init: a workdir, an
                                 # MAE .pth or an .npz (mim_jax/init_from.py); '' = random init.
  c.model = ml_collections.ConfigDict()
  c.model.name = "swin"
  c.model.variant = args.get("variant", "Mu" if runlocal else "B")
  c.model.patch = 4              # Swin's patch size (Liu et al. 2021, sec. 3.1).
  c.model.window = common.int_arg(args, "window", 4 if runlocal else 6)  # 6 at 192 px, 7 at 224 px.
  c.model.exact_gelu = True      # erf GELU, as in the paper's PyTorch code; False = tanh.
  c.model.remat = "none"         # Rematerialise blocks to save accelerator memory: a policy of
                                 # models/layer_loop.py REMAT_POLICIES (none | full | ...).
  c.model.dtype = "float32"      # Compute dtype: float32 | bfloat16 | float16.
  c.model.param_dtype = "float32"

  c.method = ml_collections.ConfigDict({"name": "simmim"})
  c.method.hpm = common.hpm_config()  # HPM's loss predictor, off (configs/hpm_vit.py says how).
  c.mask = simmim_mask(common.int_arg(args, "mask_patch", 8 if runlocal else 32), c.model.patch)

  # 10 warmup epochs, lr 2e-4 per 512 images (8e-4 at 2048), cosine to 1e-5 per 512 images
  # (simmim_pretrain__swin_base__img192_window6__100ep.yaml: BASE_LR 2e-4, MIN_LR 1e-5, both
  # scaled by batch / 512 in main_simmim.py).
  warmup_epochs = 4 if runlocal else 10
  # SwinTransformerForSimMIM.no_weight_decay() adds 'mask_token' (Swin has no cls token).
  c.optim = simmim_optim(2e-4 if not runlocal else 2e-3, warmup_epochs * steps_per_epoch,
                         min_lr=1e-5 * batch_size / 512, no_decay_tokens=("mask_token",))
  c.data = simmim_data(data)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # SimMIM trains no cls token: probes read the mean of the final tokens.
  c.eval = common.eval_config(runlocal, feature="gap", reconstruction_png=True)
  return c
