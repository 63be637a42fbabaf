r"""MAE pretraining of a ViT (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

Run (the paper's ViT-B/16 ImageNet recipe, 800 epochs at batch 4096; on a GPU host or TPU pod):

  python -m mim_jax.main --config=configs/mae_vit.py:variant=B/16,data=tfds:imagenet2012 \
      --workdir=/tmp/mae_b16

Expected: the paper reports 83.6% top-1 after fine-tuning and 68.0% linear probe for ViT-B/16
(MAE tables 3 and 9, 1600 epochs; 800 epochs lands a few tenths below on fine-tuning).

Run on a laptop CPU in about a minute (embedded digits, tiny ViT):

  python -m mim_jax.main --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae_local

Expected: the loss falls from about 1.0 to about 0.5, and a linear probe on the encoder's cls
feature is printed next to the same encoder at random init (see README for measured numbers).

The argument after ':' is a comma-separated list (big_vision style):
  variant=<Ti|S|B|L|H>/<patch>   encoder size and patch, e.g. B/16, H/14, Ti/4 (default B/16)
  decoder=<depth>x<width>        MAE decoder, e.g. 8x512 (the paper's default)
  data=<source>                  digits | synthetic | tfds:<name> | folder:<path>
  image_size=<int>               input resolution (default 224; 32 with runlocal)
  batch_size=<int>               global batch (default 4096; 128 with runlocal)
  runlocal                       tiny model and run on digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

# ImageNet-1k train size, used to turn the paper's epochs into steps.
_TRAIN_EXAMPLES = {"tfds:imagenet2012": 1_281_167, "digits": 1500}
_RGB_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as MAE normalises inputs.
_RGB_STD = (0.229, 0.224, 0.225)


def parse_arg(arg: str | None) -> dict[str, str]:
  """'variant=B/16,runlocal' -> {'variant': 'B/16', 'runlocal': ''}."""
  known = {"variant", "decoder", "data", "image_size", "batch_size", "runlocal"}
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in known:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: {sorted(known)}")
    out[key] = value
  return out


def parse_decoder(spec: str) -> tuple[int, int]:
  """'8x512' -> (8, 512)."""
  depth, _, width = spec.partition("x")
  if not (depth.isdigit() and width.isdigit()):
    raise ValueError(f"decoder must be <depth>x<width>, e.g. 8x512, got {spec!r}")
  return int(depth), int(width)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  runlocal = "runlocal" in args
  data = args.get("data", "digits" if runlocal else "tfds:imagenet2012")
  decoder_depth, decoder_width = parse_decoder(args.get("decoder", "2x128" if runlocal else "8x512"))
  image_size = int(args.get("image_size", 32 if runlocal else 224))
  batch_size = int(args.get("batch_size", 128 if runlocal else 4096))

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = image_size
  c.batch_size = batch_size  # Global, over all processes and devices.

  # Run length. The paper: 800 epochs with 40 warmup epochs (MAE sec. A.1, table 8).
  epochs, warmup_epochs = (40, 4) if runlocal else (800, 40)
  steps_per_epoch = max(1, _TRAIN_EXAMPLES.get(data, 1_281_167) // batch_size)
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = 10 if runlocal else 100

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit"
  c.model.variant = args.get("variant", "Ti/4" if runlocal else "B/16")
  c.model.exact_gelu = True      # erf GELU, as in the paper's PyTorch code; False = tanh.
  c.model.remat = False          # Rematerialise blocks to save accelerator memory.
  c.model.dtype = "float32"      # Compute dtype: float32 | bfloat16 | float16.
  c.model.param_dtype = "float32"
  c.model.attention_impl = "auto"  # auto | xla | cudnn (fused flash attention on GPU).

  c.method = ml_collections.ConfigDict()
  c.method.name = "mae"
  c.method.mask = "random"       # A generator in mim_jax/masking.py.
  c.method.mask_ratio = 0.75     # MAE sec. 4, fig. 5.
  c.method.norm_pix_loss = True  # MAE table 1c.
  c.method.decoder_depth = decoder_depth
  c.method.decoder_width = decoder_width
  c.method.decoder_heads = max(1, decoder_width // 32)  # 512 -> 16 heads, as in the paper.

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4         # lr = base_lr * batch_size / 256 (MAE table 8).
  c.optim.lr_batch_base = 256
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = warmup_epochs * steps_per_epoch
  c.optim.min_lr = 0.0
  c.optim.grad_clip_norm = 0.0     # 0 disables; MAE pretraining uses none.

  c.data = ml_collections.ConfigDict()
  c.data.name = data
  c.data.split = "train"
  c.data.eval_split = "test" if data == "digits" else "validation"
  c.data.channels = 1 if data == "digits" else 3
  c.data.num_classes = 10 if data == "digits" else 1000
  c.data.crop_scale = (0.2, 1.0)   # MAE's RandomResizedCrop area range.
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.hflip = False if data == "digits" else True  # Digits are not mirror-symmetric.
  c.data.mean = (0.5,) if data == "digits" else _RGB_MEAN
  c.data.std = (0.5,) if data == "digits" else _RGB_STD
  c.data.on_corrupt = "error"      # folder sources: 'error' stops on an undecodable file, 'skip' counts it.
  c.data.tfds_data_dir = ""        # '' = tfds default (~/tensorflow_datasets).
  c.data.num_workers = 0           # grain worker processes; 0 reads in the training process.

  c.sharding = ml_collections.ConfigDict()
  c.sharding.fsdp = False          # Shard large parameters and optimizer state over devices.
  c.sharding.fsdp_min_size = 2 ** 14  # Parameters with fewer elements stay replicated.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200 if runlocal else 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.linear_probe = runlocal   # At the end: probe the pretrained encoder vs random init.
  c.eval.probe_feature = "cls"     # cls | gap: which encoder feature the probe reads.
  c.eval.probe_steps = 500
  c.eval.probe_max_examples = 10_000
  c.eval.reconstruction_png = True  # At the end: originals / masked / reconstructions.
  c.eval.num_png_images = 8
  return c
