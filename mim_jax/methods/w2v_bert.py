"""w2v-BERT (Chung et al. 2021, "w2v-BERT: Combining Contrastive Learning and Masked Language
Modeling for Self-Supervised Speech Pre-Training"): wav2vec 2.0's contrastive task on the
Conformer's lower blocks, and masked prediction of the quantizer's ids on its upper blocks,
trained together end to end.

One Conformer of `depth` blocks is split in two (sec. 2; w2v-BERT XL has 24 blocks, 12 in the
contrastive module and 12 in the masked prediction module, table 1):
  - the contrastive module, blocks 0 .. contrastive_layers - 1: its output at the masked frames
    is the context vector of wav2vec 2.0's contrastive loss (wav2vec2.py: the same quantizer on
    the unmasked features, the same distractors, kappa and diversity loss);
  - the masked prediction module, the remaining blocks: a linear softmax head per quantizer
    group predicts the quantizer's id for each masked frame (cross-entropy, averaged over the
    groups); the ids are integers, so no gradient reaches the quantizer this way.
The ids are the quantizer's most likely entries (argmax of its logits), not its Gumbel-noisy
training picks: the argmax of logits plus Gumbel noise is a sample of softmax(logits), nearly
uniform while the logits are small, so the noisy picks would be unpredictable targets early on;
the argmax is a function of the unmasked input, the id the quantizer assigns at evaluation.
  Loss = beta * (contrastive + alpha * diversity) + gamma * masked prediction, beta = gamma = 1
  (sec. 2, the pre-training loss L_p = beta L_c + gamma L_m), alpha = 0.1 (wav2vec 2.0's).

The encoder runs once, on the masked features, and the contrastive module's output is read
from aux['block_{contrastive_layers - 1}']: the masked prediction blocks come after it, so
this is exactly the output of running the contrastive module alone.

Masked frames are filled with random vectors, N(0, 1) at the scale of the normalised log-mel
(sec. 2, the contrastive module: masked features are replaced by random vectors), where
wav2vec 2.0 learns a mask embedding; `method.mask_fill` switches. Masking, local features and
distractor sampling depart from the papers as wav2vec2.py describes (input-side masking over
encoder frames, stacked log-mel frames as the quantizer's input).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax import flops
from mim_jax.methods import wav2vec2
from mim_jax.models import conformer

inputs = wav2vec2.inputs


class W2VBert(wav2vec2.Wav2Vec2):
  """wav2vec2.Wav2Vec2 plus a masked prediction head on the encoder's last block."""
  contrastive_layers: int = 1     # Blocks of the contrastive module (the rest: masked prediction).
  contrastive_weight: float = 1.0  # beta of L_p (sec. 2).
  mlm_weight: float = 1.0          # gamma of L_p (sec. 2).

  def setup(self):
    super().setup()
    self.mlm_head = nn.DenseGeneral((self.groups, self.entries), dtype=self.encoder.dtype,
                                    param_dtype=self.encoder.param_dtype, name="mlm_head")

  def __call__(self, audio: jax.Array, audio_len: jax.Array, *, train: bool = True,
               step: jax.Array | int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) on raw audio [B, L] with audio_len [B] real samples per row; `step`
    (the trainer's update count) sets the Gumbel temperature."""
    enc = self.encode_masked(audio, audio_len, train=train, step=step)
    context = enc["aux"][f"block_{self.contrastive_layers - 1}"]
    contrastive, metrics = self.contrastive_terms(context, enc)
    logits = self.mlm_head(enc["out"]).astype(jnp.float32)        # [B, T', G, V]
    targets = enc["quantized"].ids
    per_frame = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)
    weight = enc["mask"].astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    mlm = (per_frame * weight).sum() / count
    correct = (logits.argmax(-1) == targets).mean(-1)
    loss = self.contrastive_weight * contrastive + self.mlm_weight * mlm
    return loss, {"loss": loss, **metrics, "mlm": mlm,
                  "mlm_accuracy": (correct * weight).sum() / count}


def contrastive_layers(config: ml_collections.ConfigDict) -> int:
  """method.contrastive_layers, 0 meaning half the Conformer's blocks (w2v-BERT XL's split)."""
  depth = conformer.parse_variant(config.model.variant).depth
  return config.method.contrastive_layers or depth // 2


def build(config: ml_collections.ConfigDict) -> W2VBert:
  m = config.method
  return W2VBert(**wav2vec2.module_kwargs(config), contrastive_layers=contrastive_layers(config),
                 contrastive_weight=m.contrastive_weight, mlm_weight=m.mlm_weight)


def validate(config: ml_collections.ConfigDict) -> None:
  wav2vec2.validate(config, "w2v-BERT")
  depth = conformer.parse_variant(config.model.variant).depth
  layers = contrastive_layers(config)
  if not 1 <= layers < depth:
    raise ValueError(f"method.contrastive_layers {config.method.contrastive_layers} gives "
                     f"{layers} contrastive blocks; the {config.model.variant} Conformer has "
                     f"{depth}, so 1 to {depth - 1} (0 = half) leave the masked prediction "
                     f"module at least one")
  m = config.method
  if m.contrastive_weight < 0 or m.mlm_weight < 0:
    raise ValueError(f"method.contrastive_weight and method.mlm_weight must be >= 0, got "
                     f"{m.contrastive_weight}, {m.mlm_weight}")


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Analytic training FLOPs of one utterance: wav2vec 2.0's (the Conformer, the quantizer, the
  contrastive loss) plus the masked prediction head, times 3."""
  size = conformer.parse_variant(config.model.variant)
  m = config.method
  head = flops.dense(wav2vec2.encoder_frames(config), size.width, m.groups * m.entries)
  return wav2vec2.train_flops_per_example(config) + flops.TRAIN_MULTIPLIER * head
