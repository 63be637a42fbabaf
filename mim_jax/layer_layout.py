"""The two layouts of a layer loop's parameters (models/layer_loop.py runs the loop), and the
conversion between them.

Unrolled, layer i's parameters are the loop owner's 'block_i' (e.g. 'encoder/blocks/block_0/
attn/qkv/kernel'). Scanned (config.model.scan_layers), they are stored stacked: one entry STACKED
whose leaves carry a leading [depth] axis ('encoder/blocks/stacked_blocks/attn/qkv/kernel'
[depth, D, 3D]). The unrolled layout is the one every export writes and every name outside a
scanned run uses; `unstack_blocks` gives it, and `stack_blocks` gives any tree the layout of
another, which checkpoint restore and the readers of pretrained parameters use. Sharding,
weight decay and layer-wise lr decay tell a stacked leaf by its name (`is_stacked`).

It lives at the bottom floor (it imports only jax and numpy), so the checkpoint, the optimizer
and the sharding rules may use it as well as the models.
"""

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# The scanned layers' parameters, stacked on a leading [depth] axis, under the loop's owner.
STACKED = "stacked_blocks"
_BLOCK = re.compile(r"block_(\d+)")


def is_stacked(name: str) -> bool:
  """Whether the parameter (or state entry) `name`, '/'-joined, is a scanned loop's [depth, ...]
  leaf."""
  return STACKED in name.split("/")


def block_params(owner: dict[str, Any], i: int) -> dict[str, Any]:
  """Layer i's parameters from the parameters of a loop's owner (e.g. a ViT's
  params['blocks']), in either layout."""
  if STACKED in owner:
    return jax.tree.map(lambda leaf: leaf[i], owner[STACKED])
  return owner[f"block_{i}"]


def unstack_blocks(tree: Any) -> Any:
  """`tree` in the unrolled layout: every STACKED entry, wherever it is in the tree, becomes the
  entries 'block_0' .. 'block_{depth-1}', rows of its leaves. The layout every export writes and
  every name outside a scanned model uses."""
  return stack_blocks(tree, ())


def stack_blocks(tree: Any, like: Iterable[str]) -> Any:
  """`tree` in the layout of `like`, the '/'-joined names of a tree (e.g. `tree_paths.flatten`'s
  keys, or an orbax checkpoint's metadata's): each of tree's loops is stacked where like has a
  STACKED entry at its path and unrolled where it has none. Any tree: parameters, a train state
  (its optimizer moments have the parameters' paths under their own), arrays, numpy arrays or
  jax.ShapeDtypeStructs (whose NamedShardings gain or lose the [depth] axis, unsharded)."""
  stacked = set()
  for name in like:
    parts = name.split("/")
    if STACKED in parts:
      stacked.add("/".join(parts[:parts.index(STACKED)]))

  def convert(path: tuple[Any, ...], node: Any) -> Any:
    if not _is_loop(node):
      return node
    # tree_paths.name's '/'-joined name (a sibling on this floor, so not imported).
    want = jax.tree_util.keystr(path, simple=True, separator="/") in stacked
    if want == (STACKED in node):
      return node
    return _stacked(node) if want else _unstacked(node)

  return jax.tree_util.tree_map_with_path(convert, tree, is_leaf=_is_loop)


def _is_loop(node: Any) -> bool:
  """A dict that holds a loop's layers, in either layout."""
  return isinstance(node, dict) and (STACKED in node or "block_0" in node)


def _stacked(node: dict[str, Any]) -> dict[str, Any]:
  names = [k for k in node if _BLOCK.fullmatch(k)]
  depth = len(names)
  if sorted(names) != sorted(f"block_{i}" for i in range(depth)):
    raise ValueError(f"cannot stack layers {sorted(names)}: expected block_0 .. "
                     f"block_{depth - 1}")
  rest = {k: v for k, v in node.items() if k not in names}
  layers = [node[f"block_{i}"] for i in range(depth)]
  return {**rest, STACKED: jax.tree.map(lambda *leaves: _stack(leaves), *layers)}


def _unstacked(node: dict[str, Any]) -> dict[str, Any]:
  rest = {k: v for k, v in node.items() if k != STACKED}
  depth = jax.tree.leaves(node[STACKED])[0].shape[0]
  return {**rest, **{f"block_{i}": jax.tree.map(lambda leaf, i=i: _row(leaf, i), node[STACKED])
                     for i in range(depth)}}


def _stack(leaves: tuple[Any, ...]) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                sharding=_with_depth_axis(first.sharding, True))
  return (np if isinstance(first, np.ndarray) else jnp).stack(leaves)


def _row(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                sharding=_with_depth_axis(leaf.sharding, False))
  return leaf[i]


def _with_depth_axis(sharding: Any, add: bool) -> Any:
  """A NamedSharding with an unsharded leading [depth] axis added or removed."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh,
                       PartitionSpec(None, *spec) if add else PartitionSpec(*spec[1:]))
