r"""CRATE-MAE pretraining (Pai et al. 2023, "Masked Completion via Structured Diffusion with
White-Box Transformers"; CRATE from Yu et al. 2023, "White-Box Transformers via Sparse Rate
Reduction").

Run (CRATE-MAE-Base: CRATE-B/16 encoder, 12 mirrored decoder layers of width 768, ImageNet-1k
at 224 px; on a GPU host or TPU pod):

  python -m mim_jax.main --config=configs/crate_mae.py:variant=base/16,data=tfds:imagenet2012 \
      --workdir=/tmp/crate_mae_b16

The recipe: the architecture is the paper's and its released code's (crate_ae.py): encoder
lambda 0.5 and eta 0.1, a decoder as deep and as wide as the encoder, mask tokens through the
encoder, mask ratio 0.75, fixed sin-cos position embeddings, raw pixel targets (the released
model's norm_pix_loss default, False). The released code is trained with MAE's pretraining
script (its README: swap MAE's models_mae.py for crate_ae.py); the paper's own schedule could
not be checked here, so the optimizer and schedule are MAE's: AdamW (0.9, 0.95), weight decay
0.05, base lr 1.5e-4 x batch / 256, batch 4096, 40 warmup epochs then cosine, 800 epochs.

Expected: CRATE-MAE-Base has 44.6M parameters against 143.8M for MAE-Base, whose decoder in
the released code is 8 blocks of width 768 (Pai et al.: "~30% of the parameters"). Here the
trees hold 43.7M and 143.5M: the released models also count their two fixed sin-cos tables,
and CRATE-MAE a decoder_embed layer its forward never uses (tests/test_crate.py). The paper
and its README report linear probing and reconstruction quality comparable to MAE-Base's;
those numbers were not reproduced here.

Run on a laptop CPU in about a minute (embedded digits at 16 px, a micro CRATE, 440 steps):

  python -m mim_jax.main --config=configs/crate_mae.py:runlocal --workdir=/tmp/crate_mae_local

Expected (measured: 27 s on an idle 2-core machine, start-up included; earlier, 71 s of CPU,
evaluations included (69 s user + 2 s system; 4 min wall on a 2-core machine at load 15), so
about a minute on an idle 2-core machine): the loss falls from about 1.8 to about 0.34; top-1 on
the test digits from the encoder's mean patch token ('gap'), pretrained / the same encoder at
random init / raw pixels: linear probe 0.845 / 0.828 / 0.973, while k-NN (0.677 / 0.707 / 0.983)
and 10-shot (0.636 / 0.660 / 0.879) do not move yet. With runlocal,image_size=32 (64 patches,
about 3 CPU-minutes) the loss reaches about 0.22 and the probe 0.956 against 0.933.

Throughput of the train step (CRATE-T/4 at 32 px, the shared small benchmark setting):

  python -m mim_jax.bench --config=configs/crate_mae.py:variant=tiny/4,image_size=32,batch_size=64

The argument after ':' is a comma-separated list (big_vision style):
  variant=<micro|tiny|small|base|large>/<patch>  encoder size and patch (default base/16)
  decoder_depth=<int>            decoder layers (default: the encoder's depth, as in the paper)
  data=<source>                  digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>               input resolution (default 224; 16 with runlocal)
  batch_size=<int>               global batch (default 4096; 128 with runlocal)
  runlocal                       micro model on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>, e.g.
--config.method.encoder_mask_tokens=False to encode only the visible patches.
"""

import ml_collections

from configs import common
from mim_jax.models import crate

ARGS = {"variant", "decoder_depth", "data", "image_size", "batch_size", "runlocal"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  variant = args.get("variant", "micro/4" if runlocal else "base/16")
  # Digits are 8x8: at 16 px a 4-px patch holds 2x2 digit pixels and a CPU step stays cheap.
  image_size = common.int_arg(args, "image_size", 16 if runlocal else 224)
  batch_size = common.int_arg(args, "batch_size", 128 if runlocal else 4096)
  size, _ = crate.parse_variant(variant)
  decoder_depth = common.int_arg(args, "decoder_depth", size.depth)

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  # Run length: MAE's 800 epochs with 40 warmup epochs (MAE sec. A.1, table 8).
  epochs, warmup_epochs = (40, 4) if runlocal else (800, 40)
  steps_per_epoch = common.steps_per_epoch(data, batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  c.model = ml_collections.ConfigDict()
  c.model.name = "crate"
  c.model.variant = variant
  c.model.ista_eta = 0.1         # ISTA step size (Yu et al. 2023; CRATE-MAE keeps it).
  c.model.ista_lambda = 0.5      # Sparsity; 0.1 in CRATE, 0.5 in CRATE-MAE's encoder.
  c.model.patch_norm = False     # True: LN, linear, LN tokenizer of supervised CRATE.
  c.model.remat = "none"         # Rematerialise layers to save accelerator memory: a policy of
                                 # models/layer_loop.py REMAT_POLICIES (none | full | ...).
  c.model.scan_layers = False    # Run the layers as one scan, params stacked (layer_loop.py).
  c.model.dtype = "float32"      # Compute dtype: float32 | bfloat16 | float16.
  c.model.param_dtype = "float32"
  c.model.attention_impl = "auto"  # auto | xla | cudnn (fused flash attention on GPU).

  c.init_from = ""               # Start from these params instead of random init: a workdir, an
                                 # MAE .pth or an .npz (mim_jax/init_from.py); '' = random init.

  c.method = ml_collections.ConfigDict()
  c.method.name = "crate_mae"
  c.method.norm_pix_loss = False  # The released model's default: raw pixel targets.
  # True (the paper's pipeline): the encoder sees every patch, masked ones as a learned mask
  # token. False: it sees only the visible patches (faster; the decoder inserts mask tokens).
  c.method.encoder_mask_tokens = True
  c.method.decoder_depth = decoder_depth  # Width and heads are the encoder's.
  c.method.hpm = common.hpm_config()  # HPM's loss predictor, off (configs/hpm_vit.py: on).

  # MAE's optimizer, cls and mask tokens decayed (the released code trains with MAE's script).
  # The micro model of runlocal learns much faster with a 10x higher lr (measured on digits at
  # 32 px: loss 0.22 against 0.39 after 440 steps).
  c.optim = common.adamw_config(base_lr=1.5e-3 if runlocal else 1.5e-4,
                                warmup_steps=warmup_epochs * steps_per_epoch)
  c.data = common.data_config(data)
  c.sharding = common.sharding_config()
  c.checkpoint = common.checkpoint_config(runlocal)
  # The probe reads the mean patch token: the cls token's output is never reconstructed, so the
  # objective shapes it only through attention (on digits at 32 px: cls 0.91, gap 0.96).
  c.eval = common.eval_config(runlocal, feature="gap", reconstruction_png=True)
  c.mask = common.mask_config("random", 0.75)  # As MAE; the released code's default.
  return c
