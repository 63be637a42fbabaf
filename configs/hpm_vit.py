r"""HPM, hard-patch mining, on MAE with a ViT (Wang et al. 2023, "Hard Patches Mining for Masked
Image Modeling"): MAE plus a loss predictor trained with a relative objective, and masks whose
predicted-hardest share ramps from 0 to 0.5 of the masked patches (mim_jax/methods/hpm.py).

Run (the official ViT-B/16 recipe; on a GPU host or TPU pod):

  python -m mim_jax.main --config=configs/hpm_vit.py:variant=B/16,data=tfds:imagenet2012 \
      --workdir=/tmp/hpm_b16

The recipe is the official scripts' (scripts/pretrain_base.sh): MAE's ViT-B/16 with an 8x512
decoder and a loss predictor of the same shape, mask ratio 0.75, raw pixel targets (its
norm_pix_loss default, False), 800 epochs with 40 warmup epochs, AdamW (0.9, 0.95), weight
decay 0.05, base lr 1.5e-4 x batch / 256. Those scripts run 32 images per GPU on 8 GPUs; here
the batch is MAE's 4096, with the lr scaled linearly as both codes do.

Expected: 84.2% top-1 after fine-tuning ViT-B/16 pretrained for 800 epochs, against 83.6% for
MAE at 1600 epochs; at 200 epochs 83.0% against MAE's 82.2% (the official README's table).

Run on a laptop CPU in about a minute, next to configs/mae_vit.py:runlocal (the same run plus HPM,
for 6 epochs, 66 steps, rather than 18: a step costs about twice MAE's):

  python -m mim_jax.main --config=configs/hpm_vit.py:runlocal --workdir=/tmp/hpm_local

Expected (Ti/4 at 16 px, 66 steps; 65 s on an idle 2-core CPU, 101 CPU-s, start-up and
evaluations included; 88 steps took 118 s in another run): the loss, the reconstruction's plus
the ranking's, falls from about 2.8 to about 1.4. The reconstruction part falls from 2.1 to
0.80; the ranking part from 0.69 (chance: log 2) to about 0.62 as the predictor learns which
patches are hard; the hard share reaches 0.5. Top-1 on the 297 test digits, cls feature, for the
pretrained encoder / the same encoder at random init / raw pixels: k-NN 0.653 / 0.589 / 0.983,
linear probe 0.916 / 0.913 / 0.973, 10-shot 0.845 / 0.835 / 0.879, 25-shot 0.916 / 0.913 /
0.916; at 88 steps k-NN 0.684, probe 0.919, 10-shot 0.842. (The former 275-step runlocal read
k-NN 0.67, probe 0.91, 10-shot 0.85, like MAE's then.) A run this short does not show HPM's
gain over MAE. A step costs about twice MAE's: the predictor is a
second decoder, and the hard-patch mask needs a pass of encoder and predictor over every patch
(training FLOPs per image at ViT-B/16: 137 G against MAE's 59 G).

The argument after ':' is configs/mae_vit.py's (variant, decoder, data, image_size, batch_size,
runlocal). HPM's knobs are `method.hpm` (configs/common.py hpm_config); e.g.
--config.mask.name=random keeps the loss predictor with MAE's masks (HPM's ablation of the
loss-prediction objective alone). The same switch gives CRATE-MAE (configs/crate_mae.py) and
SimMIM (configs/simmim_vit.py, simmim_swin.py: a twin of the prediction head, hard patches in
SimMIM's mask cells, mask.hard_patch.cell) the predictor and the hard-patch mask:
--config.method.hpm.enabled=True --config.mask.name=hard_patch.
"""

import ml_collections

from configs import common
from configs import mae_vit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mae_vit.get_config(arg)
  c.method.hpm = common.hpm_config(enabled=True)
  c.mask.name = "hard_patch"
  if "runlocal" in mae_vit.parse_arg(arg):
    # 6 epochs, not MAE's runlocal length: a step costs twice MAE's, and a runlocal stays under
    # 2 minutes. The warmup (3 epochs) is MAE's.
    c.total_steps = 6 * common.steps_per_epoch(c.data.name, c.batch_size)
  else:
    c.method.norm_pix_loss = False  # HPM's main_pretrain.py default, which its scripts keep.
  return c
