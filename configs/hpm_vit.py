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

Run on a laptop CPU in a few minutes, next to configs/mae_vit.py:runlocal (the same run plus HPM):

  python -m mim_jax.main --config=configs/hpm_vit.py:runlocal --workdir=/tmp/hpm_local

Expected (Ti/4 at 16 px, 275 steps; measured once on a loaded 2-core CPU): the loss, the
reconstruction's plus the ranking's, falls from about 2.8 to about 1.3. The reconstruction part
falls from 2.1 to 0.75 (MAE's runlocal: 0.72, on easier, random masks); the ranking part falls
from 0.69 (chance: log 2) to about 0.57 as the predictor learns which patches are hard; the
hard share reaches 0.5. Top-1 on the 297 test digits, cls feature, for the pretrained encoder /
the same encoder at random init / raw pixels: k-NN 0.67 / 0.59 / 0.98, linear probe
0.91 / 0.91 / 0.97, 10-shot 0.85 / 0.84 / 0.88, where MAE's runlocal reads 0.67, 0.93 and 0.87:
a run this short does not show HPM's gain. A step costs about twice MAE's: the predictor is a
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
  if "runlocal" not in mae_vit.parse_arg(arg):
    c.method.norm_pix_loss = False  # HPM's main_pretrain.py default, which its scripts keep.
  return c
