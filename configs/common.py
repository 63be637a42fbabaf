"""Config parts shared by every experiment family: the ':arg' parser, run length in epochs,
and the data, optimizer, sharding, checkpoint and eval sections.

A family's config file (configs/mae_vit.py, configs/crate_mae.py, ...) builds its model and
method sections itself and takes the rest from here, passing the values its paper prescribes.
The fields and their meaning are the trainer's contract; each is commented once, here.
"""

import os

import ml_collections

# Training-set sizes, to turn a paper's epochs into steps.
TRAIN_EXAMPLES = {"tfds:imagenet2012": 1_281_167, "digits": 1500}
RGB_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as MAE and its family normalise inputs.
RGB_STD = (0.229, 0.224, 0.225)


def parse_arg(arg: str | None, known: set[str]) -> dict[str, str]:
  """'variant=B/16,runlocal' -> {'variant': 'B/16', 'runlocal': ''} (big_vision style).
  Raises ValueError on a key outside `known`, naming the valid keys."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in known:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: {sorted(known)}")
    out[key] = value
  return out


def int_arg(args: dict[str, str], name: str, default: int) -> int:
  """The integer argument `name` of a parsed ':arg' (or `default` when absent). Raises
  ValueError naming the argument and what it takes."""
  if name not in args:
    return default
  try:
    return int(args[name])
  except ValueError:
    raise ValueError(f"config argument {name}={args[name]!r} must be an integer, e.g. "
                     f"{name}={default}") from None


def parse_decoder(spec: str) -> tuple[int, int]:
  """'8x512' -> (8, 512)."""
  depth, _, width = spec.partition("x")
  if not (depth.isdigit() and width.isdigit()):
    raise ValueError(f"decoder must be <depth>x<width>, e.g. 8x512, got {spec!r}")
  return int(depth), int(width)


def count_folder_files(data: str, extensions: tuple[str, ...]) -> int | None:
  """The number of files with `extensions` that a 'folder:<path>' source trains on
  (<path>/train if it exists, else <path>), or None for another source or a missing folder
  (the source reports that itself). Counting file names is cheap next to training on them."""
  kind, _, path = data.partition(":")
  root = os.path.expanduser(path)
  if kind != "folder" or not os.path.isdir(root):
    return None
  if os.path.isdir(os.path.join(root, "train")):
    root = os.path.join(root, "train")
  return sum(name.lower().endswith(extensions)
             for _, _, names in os.walk(root, followlinks=True) for name in names)


def steps_per_epoch(data: str, batch_size: int, *, default_examples: int = 1_281_167,
                    known: dict[str, int] | None = None,
                    extensions: tuple[str, ...] = (".jpeg", ".jpg", ".png")) -> int:
  """Steps in one pass over the training set: its size where known (the embedded sets, a
  folder's file count), else `default_examples` (ImageNet-1k's size). A batch size below 1 gives
  1 step: config validation then reports the batch size itself."""
  examples = ({**TRAIN_EXAMPLES, **(known or {})}.get(data)
              or count_folder_files(data, extensions) or default_examples)
  return max(1, examples // max(batch_size, 1))


def data_config(name: str) -> ml_collections.ConfigDict:
  """The input pipeline: source, splits, channels and MAE's augmentation."""
  digits = name == "digits"
  d = ml_collections.ConfigDict()
  d.name = name                  # digits | synthetic | tfds:<name> | folder:<path>
  d.split = "train"
  d.eval_split = "test" if digits else "validation"
  d.channels = 1 if digits else 3
  d.num_classes = 10 if digits else 1000
  d.crop_scale = (0.2, 1.0)      # MAE's RandomResizedCrop area range.
  d.crop_ratio = (3 / 4, 4 / 3)
  d.hflip = not digits           # Digits are not mirror-symmetric.
  d.mean = (0.5,) if digits else RGB_MEAN
  d.std = (0.5,) if digits else RGB_STD
  add_reading_fields(d)
  return d


def add_reading_fields(d: ml_collections.ConfigDict) -> None:
  """The fields of how a source is read, the same for images and audio (configs/speech.py)."""
  d.on_corrupt = "error"         # folder sources: 'error' stops on an unreadable or undecodable
                                 # file, 'skip' counts it.
  d.holdout = 0.05               # folder sources without split folders: this share of each
                                 # class is held out of data.split as the eval split (0 = refuse
                                 # to evaluate: never evaluate on the training files).
  d.tfds_data_dir = ""           # '' = tfds default (~/tensorflow_datasets).
  d.num_workers = 0              # grain worker processes; 0 reads in the training process.
  d.read_threads = 0             # Threads reading and augmenting batches (in each worker, if
                                 # any); 0 = one per CPU core, at most 16 (grain's default).
  d.prefetch_batches = 0         # Batches read ahead; 0 = one per read thread, the least that
                                 # keeps each busy. grain's default, 500, holds 500 batches in
                                 # memory and, on a small CPU, fights the first compile for cores.


def vit_model_config(variant: str, posemb: str) -> ml_collections.ConfigDict:
  """The ViT encoder (mim_jax/models/vit.py), as every ViT family builds it."""
  m = ml_collections.ConfigDict()
  m.name = "vit"
  m.variant = variant            # <size>/<patch>, e.g. B/16 (models/vit.py SIZES).
  m.exact_gelu = True            # erf GELU, as in the papers' PyTorch code; False = tanh.
  m.posemb = posemb              # sincos (fixed, MAE pretraining) | learned (fine-tuning) | none.
  m.patch_init = "xavier"        # Patch embedding init (models/layers.py PATCH_INITS): MAE's.
  m.remat = "none"               # Rematerialise blocks to save accelerator memory, keeping:
                                 # none (no remat) | full (only each block's input) |
                                 # dots_saveable (every matmul's output) |
                                 # dots_with_no_batch_dims_saveable (the projections' and MLP's,
                                 # not attention's) (models/layer_loop.py REMAT_POLICIES).
  m.scan_layers = False          # Run the blocks as one scan, their parameters stored stacked
                                 # (the same values; checkpoints and pretrained sources load
                                 # across the switch). Compiles one block instead of all of them
                                 # (models/layer_loop.py measures).
  m.dtype = "float32"            # Compute dtype: float32 | bfloat16 | float16.
  m.param_dtype = "float32"
  m.attention_impl = "auto"      # auto | xla | cudnn (fused flash attention on GPU).
  return m


def adamw_config(*, base_lr: float, warmup_steps: int, b1: float = 0.9, b2: float = 0.95,
                 weight_decay: float = 0.05, lr_batch_base: int = 256, min_lr: float = 0.0,
                 grad_clip_norm: float = 0.0, layer_decay: float = 1.0,
                 no_decay_tokens: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """AdamW with linear warmup then cosine decay. The defaults are MAE's recipe (He et al.
  2021, table 8): (0.9, 0.95), weight decay 0.05, no gradient clipping."""
  o = ml_collections.ConfigDict()
  o.base_lr = base_lr            # Peak lr = base_lr * batch_size / lr_batch_base.
  o.lr_batch_base = lr_batch_base
  o.b1 = b1
  o.b2 = b2
  o.weight_decay = weight_decay  # Not applied to biases, norms and position tables.
  # Learned tokens ('cls', 'mask_token') exempt from weight decay. MAE's pretraining decays both
  # (main_pretrain.py: timm's add_weight_decay with no skip list); configs whose reference
  # exempts them (its model's no_weight_decay()) name them here.
  o.no_decay_tokens = no_decay_tokens
  o.warmup_steps = warmup_steps
  o.min_lr = min_lr              # Final lr of the cosine decay.
  o.grad_clip_norm = grad_clip_norm  # Global-norm clipping; 0 disables.
  o.layer_decay = layer_decay    # Layer-wise lr decay (BEiT, MAE fine-tuning): the encoder's
                                 # block i gets lr x decay^(depth - i), its embeddings
                                 # decay^(depth + 1), the rest the full lr. 1 = off.
  return o


def mask_config(name: str, ratio: float, *, block_min_patches: int = 16,
                coarse_cell: int = 2) -> ml_collections.ConfigDict:
  """The mask generator (mim_jax/masking.py) a method draws through, by name, and every
  generator's knobs, so `--config.mask.name=<other>` works with its defaults."""
  m = ml_collections.ConfigDict()
  m.name = name                  # random | block | coarse | <red|blue|green|purple>_noise |
                                 # hard_patch | attention (masking.GENERATORS).
  m.ratio = ratio                # Share of patches masked (for MP3: left out of the context).
  m.random = ml_collections.ConfigDict()  # i.i.d. uniform scores (MAE, sec. 3): no knobs.
  # BEiT's block-wise masking (Bao et al. 2021, algorithm 1), as CAE uses it.
  m.block = ml_collections.ConfigDict()
  m.block.min_patches = block_min_patches  # Smallest block (BEiT: 16 patches).
  m.block.min_aspect = 0.3       # Block aspect ratio in [0.3, 1/0.3], as in BEiT.
  m.block.attempts = 64          # Fixed number of block draws; see masking.block_union.
  # SimMIM's random masking of square cells (Xie et al. 2022: 32 px).
  m.coarse = ml_collections.ConfigDict()
  m.coarse.cell = coarse_cell    # Cell side in patches: 32 px is 2 ViT/16 or 8 Swin patches.
  # ColorMAE's coloured noise (Hinojosa et al. 2024; green is its best): the visible patches are
  # where filtered white noise is highest. `sigmas` are the Gaussian filters' stds in patches
  # (mim_jax/color_noise.py). The authors ship precomputed patterns, not their filter widths;
  # these put each colour's passband in its own part of the patch grid's spectrum (half-power
  # at 0.12 cycles/patch for red, above 0.37 for blue, between for green; purple removes
  # green's band).
  for color, sigmas in (("red", (1.5,)), ("blue", (0.5,)), ("green", (0.5, 1.5)),
                        ("purple", (0.5, 1.5))):
    m[f"{color}_noise"] = ml_collections.ConfigDict({"sigmas": sigmas})
  # HPM's hard patches (Wang et al. 2023): the scores and the ramp come from the loss predictor
  # of MAE's, CRATE-MAE's or SimMIM's `method.hpm`; without one the mask is refused.
  m.hard_patch = ml_collections.ConfigDict()
  m.hard_patch.cell = 1          # Mask square cells of this many patches a side (SimMIM's: its
                                 # coarse cell), scored by their patches' mean predicted loss.
  # The attention mask's frozen ViT teacher for MAE, CRATE-MAE and SimMIM (MaskAlign names its
  # own, method.teacher): with mask.name='attention', the visible patches are drawn in
  # proportion to its last block's cls attention (mim_jax/methods/teacher_attention.py).
  m.teacher = ""                 # A mim_jax workdir, an MAE .pth or an exported .npz.
  m.teacher_variant = ""         # Its ViT <size>/<patch>; '' = a ViT student's own. Its patch
                                 # grid must be the student's.
  return m


def hpm_config(enabled: bool = False) -> ml_collections.ConfigDict:
  """HPM (Wang et al. 2023, "Hard Patches Mining for Masked Image Modeling"; mim_jax/methods/
  hpm.py) for the MAE family's `method` section: a loss predictor, and with
  `mask.name='hard_patch'` masks that cover the patches it predicts hardest."""
  h = ml_collections.ConfigDict()
  h.enabled = enabled            # Train a loss predictor (a twin of the decoder) with HPM's
                                 # relative objective; off = plain MAE, same parameters.
  h.final_share = 0.5            # Share of the masked patches that are the predicted-hardest
                                 # at the end of the ramp (HPM: 0.5; the rest stay random).
  h.ramp_fraction = 1.0          # The share ramps linearly from 0 over this fraction of
                                 # total_steps (HPM: the whole run), then stays at final_share.
  h.loss_weight = 1.0            # Weight of the predictor's loss (HPM's code: 1).
  return h


def sharding_config() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.fsdp = False                 # Shard large parameters and optimizer state over devices.
  s.fsdp_min_size = 2 ** 14      # Parameters with fewer elements stay replicated.
  return s


def checkpoint_config(runlocal: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 200 if runlocal else 1000
  c.keep = 3                     # Newest checkpoints kept.
  c.async_save = True
  return c


def eval_config(runlocal: bool, *, feature: str = "cls", reconstruction_png: bool = True,
                probes: bool | None = None, top1: bool = False,
                run_name: str = "pretrained") -> ml_collections.ConfigDict:
  """Evaluations of the encoder (mim_jax/evaluators/): every `every_steps` during pretraining,
  at its end next to the baselines, and on a checkpoint with --mode=eval.

  `feature` is the default of every evaluator's `feature`, a spec of
  mim_jax/evaluators/features.py: 'cls' or 'gap' (the final normed output's cls token or mean
  patch token), '<cls|gap>@block_<i>' (block i's pre-norm output; i = -1 is the last block) or
  'pixels'. runlocal (digits) enables k-NN, the probes and the baselines, with a small probe
  batch (`probes` overrides that); `top1` enables the fine-tuned classifier's top-1.
  """
  probes = runlocal if probes is None else probes
  e = ml_collections.ConfigDict()
  e.every_steps = 0              # Run the enabled evaluators on the params every N steps of
                                 # pretraining (metrics.jsonl, TensorBoard); 0 = only at the end.
  e.run_name = run_name          # Results of the run's own params are '<metric>/<run_name>'.
  e.baselines = ("random_init", "pixels") if probes else ()  # At the end (and --mode=eval),
                                 # also evaluate the encoder at its random init and raw pixels.
  e.init_from = ""               # --mode=eval: params to evaluate: a workdir, an MAE .pth or an
                                 # .npz ('' = the newest checkpoint in --workdir).
  e.max_examples = 10_000        # First N examples of each split; 0 = all. Images and features
                                 # are held in memory: this suite is for small datasets.

  # Weighted k-NN (Wu et al. 2018; k = 20 as in DINO, Caron et al. 2021): evaluators/knn.py.
  e.knn = ml_collections.ConfigDict()
  e.knn.enabled = probes
  e.knn.feature = feature
  e.knn.k = 20
  e.knn.temperature = 0.07       # Votes weigh exp(cosine similarity / temperature).
  e.knn.chunk = 256              # Test rows per jitted similarity call.

  # Linear probe on frozen features, BatchNorm (no affine) + linear head: evaluators/
  # linear_probe.py. The defaults are MAE's ImageNet recipe (He et al. 2021, table 10): LARS,
  # base lr 0.1, momentum 0.9, weight decay 0, batch 16384, 90 epochs, 10 warmup, cosine.
  p = e.linear_probe = ml_collections.ConfigDict()
  p.enabled = probes
  p.feature = feature
  # lars | sgd (with momentum). LARS's trust ratio (0.001 x weight norm / gradient norm)
  # barely moves a head in the few hundred steps of a small dataset: runlocal uses SGD.
  p.optimizer = "sgd" if runlocal else "lars"
  p.base_lr = 0.1                # Peak lr = base_lr * batch_size / lr_batch_base.
  p.lr_batch_base = 256
  p.momentum = 0.9
  p.weight_decay = 0.0
  p.batch_size = 256 if runlocal else 16384  # Capped at the training set's size.
  p.epochs = 90
  p.warmup_epochs = 10
  p.seed = 0                     # Head init and shuffling.

  # Few-shot linear evaluation: closed-form least squares onto +-1 targets from n examples per
  # class (evaluators/few_shot.py). Results: 'few_shot/<n>shot', the mean top-1 over seeds,
  # and with more than one seed 'few_shot/<n>shot_std'.
  f = e.few_shot = ml_collections.ConfigDict()
  f.enabled = probes
  f.feature = feature
  f.protocol = "ridge_loo"       # ridge_loo | big_vision (few_shot.PROTOCOLS), each with its
                                 # section below, so `protocol=<other>` works with its defaults.
  f.shots = (1, 5, 10, 25)       # Training examples per class; one result each (big_vision's
                                 # too: configs/common_fewshot.py).
  f.seed = 0                     # Seeds seed, seed + 1, ... draw the examples (big_vision:
                                 # 0, 1, 2 as np.random.default_rng seeds).
  # mim_jax's own: centred features scaled to a mean squared norm of 1, an unregularised bias,
  # and the l2 picked per n by leave-one-out error on the n-shot set (1-shot: the largest n's).
  f.ridge_loo = ml_collections.ConfigDict()
  f.ridge_loo.l2_regs = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)  # Candidates.
  f.ridge_loo.num_seeds = 1      # The measured 10-shot numbers in configs/ and README are of
                                 # one seed.
  # big_vision's (big_vision/evaluators/fewshot_lsr.py): each dimension whitened by the n-shot
  # set's mean and std, a constant bias feature of 100, one fixed l2 for every n and source,
  # nested n-shot sets per seed.
  f.big_vision = ml_collections.ConfigDict()
  f.big_vision.l2_reg = 2.0 ** 10  # big_vision/configs/common_fewshot.py's l2_reg.
  f.big_vision.num_seeds = 3     # Its num_seeds (ibid.); it logs each seed, we the mean and std.

  # Top-1 of a classifier's predictions on the whole eval split, streamed (evaluators/top1.py).
  e.top1 = ml_collections.ConfigDict()
  e.top1.enabled = top1
  e.top1.feature = "logits"

  e.reconstruction_png = reconstruction_png  # At the end: originals / masked / reconstructions.
  e.num_png_images = 8
  return e
