"""The loop over a model's identical layers, unrolled or as one `jax.lax.scan`
(config.model.scan_layers), and the rematerialisation policies a layer runs under, by name
(config.model.remat).

Unrolled, layer i's parameters are the loop owner's 'block_i'. Scanned, they are stored
stacked, the owner's STACKED entry with a leading [depth] axis (mim_jax/layer_layout.py, which
converts between the two layouts for checkpoints, pretrained sources and exports), and the scan
consumes them as they are: the step neither stacks the parameters nor splits their gradient.
Init draws each layer's parameters as the unrolled loop does, so a seed gives the same
parameters either way.

Scanning traces and compiles one layer instead of `depth`. Measured on MAE ViT-L/16's train
step (224 px, batch 8, one CPU device, XLA's default level, mim_jax/tools/dryrun.py's plan; CPU
seconds, two runs unrolled and three scanned): unrolled, lowering 3.6-4.1 s, compiling
16.0-17.3 s, 2.06 GiB of temporaries; scanned, 1.0-1.4 s, 9.6-10.1 s and 3.39 GiB. (When the
scan stacked parameters stored per layer in every step, it compiled in 30-36 s and needed
4.61 GiB.) The extra 1.3 GiB is about the size of the parameters, as if the scan's gradient,
one [depth, ...] array per weight, were held whole until the optimizer runs; with FSDP on 8
devices, where gradients are sharded, the extra is 0.04-0.6 GiB (README, "Scale out"). Measure
on the target with mim_jax/tools/dryrun.py before turning it on.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import Scope
from flax.core.scope import LazyRng

from mim_jax.layer_layout import STACKED
from mim_jax.registry import Registry

# What a rematerialised layer keeps for its backward pass (jax.checkpoint_policies); the rest is
# recomputed from the layer's input. 'none' does not rematerialise.
REMAT_POLICIES = Registry("remat policy", {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # every matmul's output
    # The matmuls with weights (projections, MLP); attention's batched q k^T and weights @ v,
    # the part that grows with the square of the tokens, are recomputed.
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
})


def policy_name(remat: bool | str) -> str:
  """A config's or a model's `remat` -> its REMAT_POLICIES name; True and False, the older form,
  are 'full' and 'none'. Raises ValueError listing the valid names."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown model.remat {remat!r}; valid: {REMAT_POLICIES.names()} (or True "
                     "and False for 'full' and 'none')")
  return remat


def remat(cls: type[nn.Module], policy: bool | str) -> type[nn.Module]:
  """Module class `cls` rematerialised under the named policy; `cls` itself for 'none'."""
  name = policy_name(policy)
  return cls if name == "none" else nn.remat(cls, policy=REMAT_POLICIES[name])


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
  """Stochastic-depth rate of each of `depth` layers, rising linearly from 0 to `drop_path`
  (the DeiT/MAE schedule)."""
  return [drop_path * i / max(1, depth - 1) for i in range(depth)]


def run(parent: nn.Module, cls: type[nn.Module], fields: dict[str, Any], depth: int,
        x: jax.Array, *args: Any, scan: bool = False, remat_policy: bool | str = False,
        drop_path: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs `depth` layers cls(**fields) on x, each called as layer(x, *args), from inside
  `parent`'s compact __call__. Unrolled, their parameters are parent's 'block_0' ..
  'block_{depth-1}'; scanned, parent's STACKED, the same parameters stacked.

  Returns the last output and {'block_i': layer i's output}. Scanned, those are slices of the
  scan's stacked outputs; under jit, the ones nobody reads are removed with their stacking.
  drop_path > 0 gives layer i the `drop_path_rates` rate as its `drop_path` field (`cls` must
  have one) and, scanned, one 'dropout' key split `depth` ways, so the draws differ from the
  unrolled loop's (the same distribution).
  """
  rates = drop_path_rates(drop_path, depth) if drop_path > 0 else None
  names = [f"block_{i}" for i in range(depth)]
  if not scan or not depth:
    layer_cls = remat(cls, remat_policy)
    aux = {}
    for i, name in enumerate(names):
      extra = {"drop_path": rates[i]} if rates else {}
      x = layer_cls(**fields, **extra, name=name)(x, *args)
      aux[name] = x
    return x, aux
  if parent.is_initializing():
    return _init_stacked(parent, cls, fields, names, rates, x, *args)

  params = parent.variables["params"]
  if STACKED not in params:
    raise ValueError(f"{'/'.join(parent.scope.path)}: scanned layers (model.scan_layers=True) "
                     f"take their parameters stacked as {STACKED!r}, got {sorted(params)}; "
                     f"convert a tree with mim_jax.layer_layout.stack_blocks")
  xs = {"params": params[STACKED]}
  if rates:
    xs["rate"] = jnp.asarray(rates, jnp.float32)
    xs["rng"] = jax.random.split(parent.make_rng("dropout"), depth)

  def step(carry: jax.Array, layer: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    # An unbound module applied to one layer's slice: a pure function, as a scan body must be.
    extra, rngs = ({"drop_path": layer["rate"]}, {"dropout": layer["rng"]}) if rates else ({}, {})
    y = cls(**fields, **extra, parent=None).apply({"params": layer["params"]}, carry, *args,
                                                   rngs=rngs)
    return y, y

  policy = policy_name(remat_policy)
  if policy != "none":  # prevent_cse is not needed inside a scan (jax.checkpoint's docs).
    step = jax.checkpoint(step, policy=REMAT_POLICIES[policy], prevent_cse=False)
  x, ys = jax.lax.scan(step, x, xs)
  return x, {name: ys[i] for i, name in enumerate(names)}


def _init_stacked(parent: nn.Module, cls: type[nn.Module], fields: dict[str, Any],
                  names: list[str], rates: list[float] | None, x: jax.Array, *args: Any
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Init of the scanned loop: each layer is initialised in a scope of its own that draws the
  rngs parent's child `names[i]` would (flax's core Scope folds a child's name into its
  parent's rngs, lazily: LazyRng), so the stacked parameters are the unrolled loop's, bit for
  bit, and a seed gives the same model either way (tests/test_scan.py holds it to that, should
  flax change how it derives them); they are then stored stacked as parent's STACKED."""
  layer_params, aux = [], {}
  for i, name in enumerate(names):
    rngs = {kind: LazyRng.create(rng, name) for kind, rng in parent.scope.rngs.items()}
    scope = Scope({}, rngs=rngs, mutable=True)
    extra = {"drop_path": rates[i]} if rates else {}
    x = aux[name] = cls(**fields, **extra, parent=scope)(x, *args)
    layer_params.append(scope.variables()["params"])
  parent.put_variable("params", STACKED, jax.tree.map(lambda *p: jnp.stack(p), *layer_params))
  return x, aux

