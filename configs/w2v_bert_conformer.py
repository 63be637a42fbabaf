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

Run on a laptop CPU in under two minutes (eSpeak NG spoken digits, synthesized on first use
and cached; the micro Conformer Mu, 2 blocks of width 32, one per module; 175 steps of batch
64):

  python -m mim_jax.main --config=configs/w2v_bert_conformer.py:runlocal \
      --workdir=/tmp/w2v_bert_local

Expected (measured with the data cached: 44 s on an idle 2-core machine; earlier, 100 s of CPU,
evaluations included (96 s user + 4 s system; 12 min wall on a 2-core machine at load 15-20), so
under 2 minutes on an idle 2-core machine; the former runlocal's Ti Conformer took 2.9 min wall
there): the loss falls from 10.9 to 8.4 (contrastive 4.72 -> 4.03, masked prediction 6.16 ->
4.35, its accuracy 0 -> 0.24); top-1 on the test speakers' digits, from the mean of the
second-to-last block's output (Mu's contrastive block) over the real frames:

                 pretrained   random init   log-mel mean + std
  k-NN              0.765        0.435          0.776
  linear probe      0.835        0.624          0.888
  10-shot           0.776        0.529          0.759

The Ti Conformer (variant=Ti: 4 blocks of width 96, 2 per module; block -2 is then the first
masked prediction block) reached k-NN 0.824, linear probe 0.929, 10-shot 0.912 (random init
0.518 / 0.759 / 0.624) in 2.9 min wall on an idle 2-core machine.

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
