"""Parameter names: a pytree path as one '/'-joined string, e.g. 'encoder/block_0/attn/qkv/kernel'.

Sharding rules, the weight-decay mask, layer-wise lr decay, checkpoint signatures and exported
`.npz` files all name parameters this way, so they agree on every name. Dict keys give their key,
attributes (optax states are named tuples) their name, sequence entries their index.

It lives at the bottom floor (it imports only jax), so any layer may use it.
"""

from typing import Any, Callable

import jax


def _part(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def name(path: tuple[Any, ...]) -> str:
  """The '/'-joined name of a path from `jax.tree_util.tree_flatten_with_path`."""
  return "/".join(_part(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
  """Nested tree -> {'a/b/c': leaf}, in tree order."""
  return {name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dicts; the inverse of `flatten` on a tree of dicts."""
  tree: dict[str, Any] = {}
  for full_name, value in flat.items():
    *parents, leaf = full_name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Like `jax.tree.map`, but `fn(name, leaf)` also gets each leaf's '/'-joined name."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(name(path), leaf), tree)
