"""The loop over a model's identical layers, unrolled or as one `jax.lax.scan`
(config.model.scan_layers), and the rematerialisation policies a layer runs under, by name
(config.model.remat).

The parameters stay stored per layer, 'block_0' .. 'block_{depth-1}', the unrolled loop's
layout, whether or not the layers are scanned: the scan stacks them into [depth, ...] arrays
when it is applied, and its gradient splits back into the same per-layer entries. So
checkpoints, init_from, the import of released weights, the exports, the sharding rules and
layer-wise lr decay, which all name 'block_i', never see a layout that depends on scanning, and
a run may switch it between restarts. Init always runs the unrolled loop, so a seed gives the
same parameters either way.

Scanning traces one layer instead of `depth`, but whether it compiles faster depends on the
backend, and it costs memory. Measured on MAE ViT-L/16's train step (224 px, batch 8, one CPU
device, XLA's default level, CPU seconds of two runs): unrolled, lowering 3.7-4.2 s, compiling
16-17 s, 2.06 GiB of temporaries; scanned, 1.8-2.0 s, 30-36 s and 4.61 GiB. XLA's CPU compiler
already compiles the unrolled layers' identical kernels once, and the split of the stacked
gradient into per-layer entries adds kernels of its own; the stacked copy of the parameters and
the gradient, held whole until the optimizer runs, cost 2.5 GiB. (Parameters stored stacked,
which needs a layout conversion wherever they are saved, loaded or decayed by layer, measured
12.3 s and 3.39 GiB.) Measure on the target with mim_jax/tools/dryrun.py before turning it on.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  `parent`'s compact __call__; their parameters are parent's 'block_0' .. 'block_{depth-1}'.

  Returns the last output and {'block_i': layer i's output}. Scanned, those are slices of the
  scan's stacked outputs; under jit, the ones nobody reads are removed with their stacking.
  drop_path > 0 gives layer i the `drop_path_rates` rate as its `drop_path` field (`cls` must
  have one) and, scanned, one 'dropout' key split `depth` ways, so the draws differ from the
  unrolled loop's (the same distribution).
  """
  rates = drop_path_rates(drop_path, depth) if drop_path > 0 else None
  names = [f"block_{i}" for i in range(depth)]
  if not scan or not depth or parent.is_initializing():  # init: the same params either way
    layer_cls = remat(cls, remat_policy)
    aux = {}
    for i, name in enumerate(names):
      extra = {"drop_path": rates[i]} if rates else {}
      x = layer_cls(**fields, **extra, name=name)(x, *args)
      aux[name] = x
    return x, aux

  params = parent.variables["params"]
  xs = {"params": jax.tree.map(lambda *p: jnp.stack(p), *(params[n] for n in names))}
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
