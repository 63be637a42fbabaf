r"""w2v-BERT pretraining of a Conformer on speech (Chung et al. 2021, "w2v-BERT: Combining
Contrastive Learning and Masked Language Modeling for Self-Supervised Speech Pre-Training";
mim_jax/methods/w2v_bert.py): wav2vec 2.0's contrastive task on the lower half of the blocks,
masked prediction of the quantizer's ids on the upper half.

Run (a LibriSpeech-scale recipe; on a GPU host or TPU pod, with tfds' librispeech prepared as
ArrayRecord):

  python -m mim_jax.main --config=configs/w2v_bert_conformer.py:variant=L,data=tfds:librispeech \
      --workdir=/tmp/w2v_bert_l

Expected: the paper reports WERs after fine-tuning for ASR (its table 2), which mim_jax does not
fine-tune yet; pretraining alone gives the contrastive and masked-prediction losses and
accuracies in metrics.jsonl.

Run on a laptop CPU in a few minutes (eSpeak NG spoken digits, synthesized on first use
and cached; a 4-block Conformer of width 96, 2 blocks per module):

  python -m mim_jax.main --config=configs/w2v_bert_conformer.py:runlocal \
      --workdir=/tmp/w2v_bert_local

Expected (measured on an otherwise idle 2-core CPU: 2.9 min wall; its steps run 80
utterances/s against wav2vec 2.0's 126 at the same MFU, so about 1.5x the work): the loss
falls from 11.1 to 6.4 (contrastive 4.79 -> 3.88, masked prediction 6.35 -> 2.51, its accuracy
0 -> 0.50); top-1 on the test speakers' digits, from the mean of the second-to-last block's
output (the first masked prediction block) over the real frames:

                 pretrained   random init   log-mel mean + std
  k-NN              0.824        0.518          0.776
  linear probe      0.929        0.759          0.888
  10-shot           0.912        0.624          0.759

The argument after ':' is a comma-separated list:
  variant=<S|M|L|Ti|Mu>          Conformer size (Gulati et al. 2020, table 1; Ti/Mu are tiny)
  data=<source>                  spoken_digits | synthetic | tfds:<name> | folder:<path>
  clip_seconds=<float>           utterance length after crop/pad (default 16; 1 with runlocal)
  batch_size=<int>               global batch (default 2048; 64 with runlocal)
  runlocal                       tiny model and run on spoken digits, for a CPU
Any field below can then be overridden with --config.<field>=<value>.
"""

import ml_collections

from configs import wav2vec2_conformer

ARGS = wav2vec2_conformer.ARGS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = wav2vec2_conformer.get_config(arg)
  c.method.name = "w2v_bert"
  # w2v-BERT XL: 24 blocks, 12 contrastive and 12 masked prediction (table 1); 0 = half.
  c.method.contrastive_layers = 0
  c.method.contrastive_weight = 1.0   # beta of L_p (sec. 2).
  c.method.mlm_weight = 1.0           # gamma of L_p (sec. 2).
  c.method.mask_fill = "noise"        # Masked frames become random vectors (sec. 2).
  return c
