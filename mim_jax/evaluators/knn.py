"""Weighted k-nearest-neighbour classification on frozen features.

Features are l2-normalised, so a dot product is a cosine similarity. Each test example's k most
similar training examples vote for their labels with weight exp(similarity / T). The weighting
and T = 0.07 are from Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"); k = 20 is DINO's choice (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", which found 20 neighbours best). Both are the defaults of
`config.eval.knn`.

Test rows go through one jitted program in fixed-size chunks, sharded over the mesh; the
training bank is replicated on every device.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import sharding


def l2_normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "out_sharding"))
def _chunk_votes(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array,
                 temperature: jax.Array, *, k: int, num_classes: int,
                 out_sharding: jax.sharding.NamedSharding) -> tuple[jax.Array, jax.Array]:
  """Votes [Q, C] and neighbour indices [Q, k] of a chunk of queries against the bank,
  replicated (`out_sharding`) so that every process can read them."""
  sims = jnp.dot(l2_normalise(queries), l2_normalise(bank).T,
                 precision=jax.lax.Precision.HIGHEST)  # no bf16 passes on TPU: exact ranking
  top, idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top / temperature)
  votes = jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(bank_labels[idx], num_classes),
                     precision=jax.lax.Precision.HIGHEST)
  return jax.lax.with_sharding_constraint((votes, idx), out_sharding)


def votes(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
          mesh: jax.sharding.Mesh, *, k: int = 20, temperature: float = 0.07,
          chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Returns (votes [N_test, num_classes], neighbour indices [N_test, k]) on host."""
  if not 0 < k <= len(train_x):
    raise ValueError(f"k={k} needs 1..{len(train_x)} (the training examples)")
  chunk = -(-chunk // mesh.size) * mesh.size  # a multiple of the devices
  repl, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  bank = jax.device_put(np.asarray(train_x, np.float32), repl)
  bank_labels = jax.device_put(np.asarray(train_y, np.int32), repl)
  temperature = jax.device_put(np.float32(temperature), repl)
  all_votes, all_idx = [], []
  for start in range(0, len(test_x), chunk):
    part = np.asarray(test_x[start:start + chunk], np.float32)
    host = np.concatenate([part, np.zeros((chunk - len(part), part.shape[1]), np.float32)])
    queries = jax.make_array_from_callback(host.shape, rows, lambda i, h=host: h[i])
    v, idx = jax.device_get(_chunk_votes(bank, bank_labels, queries, temperature, k=k,
                                         num_classes=num_classes, out_sharding=repl))
    all_votes.append(v[:len(part)])
    all_idx.append(idx[:len(part)])
  return np.concatenate(all_votes), np.concatenate(all_idx)


def evaluate(cfg: ml_collections.ConfigDict, train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], num_classes: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """{'knn': top-1 accuracy} of the weighted k-NN classifier on (features, labels) pairs."""
  v, _ = votes(train[0], train[1], test[0], num_classes, mesh, k=cfg.k,
               temperature=cfg.temperature, chunk=cfg.chunk)
  return {"knn": float((v.argmax(-1) == test[1]).mean())}
