"""MFCC features in jnp: the features HuBERT's first k-means iteration clusters (Hsu et al.
2021, sec. IV-B: 39-dimensional MFCC, 13 coefficients with their first and second order
derivatives).

The cepstrum is the orthonormal DCT-II of the log-mel spectrum of the config's front end
(data/logmel.py), first 13 coefficients; then HTK's regression deltas over +-2 frames, of the
coefficients and again of the deltas. The front end normalises each utterance's log-mel bins
(by default), so the cepstra are mean-normalised per utterance (CMN; the DCT is linear), like
the model's own input: k-means then groups spectral shapes, not recording levels (spoken digits'
voices differ in level by 5x; on them CMN raised the runlocal k-NN from 0.76 to 0.84). No
liftering (a per-coefficient scale, which only reweights k-means' distance) and no energy term
in place of c0. Padding: frames past an utterance's end are 0, and the deltas repeat its first
and last real frames at its edges, so nothing depends on how far a batch was padded.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.data import logmel

NUM_CEPS = 13    # HuBERT sec. IV-B.
DELTA_WIDTH = 2  # HTK's regression window: frames t-2 .. t+2.


def dct_matrix(num_mels: int, num_ceps: int) -> np.ndarray:
  """The orthonormal DCT-II [num_mels, num_ceps] (x @ it = scipy.fft.dct(x, norm='ortho')
  truncated to num_ceps): sqrt(2 / M) cos(pi k (2m + 1) / 2M), row k = 0 scaled by 1/sqrt(2)."""
  m, k = np.arange(num_mels)[:, None], np.arange(num_ceps)[None, :]
  basis = np.sqrt(2.0 / num_mels) * np.cos(np.pi * k * (2 * m + 1) / (2 * num_mels))
  basis[:, 0] /= np.sqrt(2.0)
  return basis.astype(np.float32)


def deltas(x: jax.Array, valid: jax.Array, width: int = DELTA_WIDTH) -> jax.Array:
  """HTK's regression deltas of x [B, T, C]: d_t = sum_n n (x_{t+n} - x_{t-n}) / (2 sum_n n^2),
  n = 1..width, with frame indices clamped to each row's real frames (valid [B, T] is a
  prefix); 0 on padded frames."""
  frames = x.shape[1]
  last = jnp.maximum(valid.sum(axis=1) - 1, 0)[:, None]  # [B, 1]
  t = jnp.arange(frames)[None, :]
  take = lambda shift: jnp.take_along_axis(x, jnp.clip(t + shift, 0, last)[..., None], axis=1)
  out = sum(n * (take(n) - take(-n)) for n in range(1, width + 1))
  out = out / (2 * sum(n * n for n in range(1, width + 1)))
  return jnp.where(valid[..., None], out, 0.0)


def mfcc(audio: jax.Array, audio_len: jax.Array, fe: logmel.FrontEnd
         ) -> tuple[jax.Array, jax.Array]:
  """39-d MFCC with deltas of a padded batch of audio [B, L] (audio_len [B] real samples),
  from the front end `fe`'s (normalised) log-mel. Returns (float32 [B, T, 3 * NUM_CEPS], valid
  bool [B, T]), as logmel.log_mel."""
  feats, valid = logmel.log_mel(audio, audio_len, fe)
  ceps = jnp.matmul(feats, dct_matrix(fe.num_mels, NUM_CEPS),
                    precision=jax.lax.Precision.HIGHEST)
  first = deltas(ceps, valid)
  return jnp.concatenate([ceps, first, deltas(first, valid)], axis=-1), valid
