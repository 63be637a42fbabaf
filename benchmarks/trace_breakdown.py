r"""Where a train step's time goes, by kind of operation, from a trace of mim_jax.bench.

  python -m mim_jax.bench \
      --config=configs/mae_vit.py:variant=Ti/4,decoder=4x128,image_size=32,batch_size=128 \
      --profile=/tmp/profile
  python -m benchmarks.trace_breakdown --profile=/tmp/profile

`bench --profile=DIR` writes a jax.profiler trace of a few steps (DIR/plugins/profile/<run>/
*.trace.json.gz, Chrome's trace format) and the compiled step's HLO text (DIR/train_step.hlo.txt).
On the CPU every instruction the step executes (a fusion, a matmul, a copy, a sort) is one event
of the trace, named after it. This sums those events' durations per kind of operation: the
kind is read from the jax operations the instruction computes, which the HLO keeps as metadata
(op_name: the transformation, flax module path and primitive, e.g.
'jit(step_fn)/jvp(MAE)/.../block_0/norm1/rsqrt'). An instruction that only moves data (copy,
transpose, concatenate, broadcast...) is a copy whatever it serves. For a fusion, all the
instructions fused into it count, and the first kind below that any of them has names it:
  matmul        dot_general or a convolution (with what XLA fused into it: bias, residual)
  gather        gather and scatter: dropping the masked patches, putting the mask tokens back
                in order, and their gradients
  mask          drawing the masks (random bits, the argsorts) and the step's key
  softmax       the attention's non-matmul work: max, exp, sum, division, the q scaling
  gelu          the MLP's activation
  layer norm    anything inside a LayerNorm module (norm, norm1, norm2)
  bias          a dense layer's bias: its add, and its gradient's sum over the tokens
  optimizer     outside the loss and its gradient: AdamW, the lr schedule, the gradient norm
  elementwise   the rest of the model's arithmetic: residual adds, the loss, position tables
  copy          copies, transposes, concatenations and broadcasts alone (layout changes)
Prints one JSON line per kind (ms per step summed over threads, i.e. CPU time, and its share
of all instructions' time), then one with the step's wall time (first instruction's start to
last one's end), its busy time (when at least one instruction runs; the rest is dispatch gaps),
the instructions' summed time (above the busy time by what XLA's runtime ran concurrently,
which then shared the cores: a matmul beside another reads slower here than it is alone), the
busiest instructions outside matmuls, and the matmuls' own rate, for the dense dots (2-D: the
projections and MLPs, their gradients) and the batched ones (attention's q k^T and weights @ v)
apart: their FLOPs per step, read from the HLO (2 x output elements x contracted size), over
the time at least one of them runs. On a CPU, XLA runs a dense layer's two gradient dots at
once, one in YNNPACK and one in Eigen, so each alone reads half as fast in the trace; the
union of their spans does not. With the step's FLOPs, that time bounds the MFU the step could
reach if nothing but its matmuls took time.
"""

import collections
import glob
import gzip
import json
import math
import os
import re

from absl import app
from absl import flags

from mim_jax import errors

_PROFILE = flags.DEFINE_string("profile", None, "The directory `mim_jax.bench --profile` wrote.")
_TOP = flags.DEFINE_integer("top", 8, "How many of the busiest non-matmul instructions to list.")
flags.mark_flags_as_required(["profile"])

HLO_FILE = "train_step.hlo.txt"  # mim_jax.bench.HLO_FILE; importing bench would add its flags
KINDS = ("matmul", "gather", "mask", "softmax", "gelu", "layer norm", "bias", "optimizer",
         "elementwise", "copy")
_DENSE = {"qkv", "proj", "fc1", "fc2", "embed", "pred", "patch_embed"}  # the models' dense layers
_LAYOUT = {"transpose", "concatenate", "reshape", "broadcast_in_dim", "copy", "split", "squeeze",
           "expand_dims", "pad", "slice", "convert_element_type", "select_n"}
_SOFTMAX = {"reduce_max", "reduce_sum", "exp", "sub", "div", "max", "mul", "stop_gradient",
            "add_any", "neg"}
_CONTROL_FLOW = {"while", "conditional", "call"}  # their bodies' instructions have own events
# HLO opcodes that move or relabel data without arithmetic.
_MOVES = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast",
          "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad", "tuple",
          "get-tuple-element", "iota", "reverse"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_SHAPE = re.compile(r"= \w+\[([\d,]*)\]")  # an instruction's (first) output shape
_DOT = re.compile(r"\bdot\(%([\w.\-]+),.*?lhs_contracting_dims=\{([\d,]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def kind_of_op(op_name: str) -> str:
  """The kind of one jax operation, from its HLO op_name."""
  path, _, primitive = op_name.rpartition("/")
  module = path.rpartition("/")[2]
  if "draw_mask" in path or "threefry" in path or primitive in ("sort", "random_bits"):
    return "mask"
  if "jvp(" not in op_name:
    return "optimizer"
  if primitive in ("dot_general", "conv_general_dilated"):
    return "matmul"
  if "gather" in primitive or "scatter" in primitive:
    return "gather"
  if re.fullmatch(r"norm\d*", module):
    return "layer norm"
  if module == "attn" and primitive in _SOFTMAX:
    return "softmax"
  if module == "mlp" or primitive == "erf":
    return "gelu"
  if module in _DENSE and primitive not in _LAYOUT:
    return "bias"
  return "copy" if primitive in _LAYOUT or module.endswith("transpose") else "elementwise"


def dims_of(line: str) -> list[int]:
  """The dimensions of the (first) array an HLO instruction's line defines."""
  match = _SHAPE.search(line)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def dot_flops(line: str, lines: dict[str, str]) -> int:
  """The FLOPs of an HLO dot's line: 2 x output elements x the size of the contracted dims
  (of its left operand, whose line `lines` has by name)."""
  match = _DOT.search(line)
  lhs = dims_of(lines[match.group(1)])
  contracted = [lhs[int(d)] for d in match.group(2).split(",") if d]
  return 2 * math.prod(dims_of(line)) * math.prod(contracted)


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, tuple[int, bool]]]:
  """For every instruction of an HLO module's text, {name: kind}, and for those that run
  matmuls (a dot, or a fusion with dots inside), {name: (FLOPs, batched)}: batched when a dot
  has batch dimensions."""
  computations, current = collections.defaultdict(list), None
  instructions = {}  # name -> (opcode, op_name, called computations)
  lines = {}  # name -> its line
  for line in text.splitlines():
    if line.rstrip().endswith("{") and not line.startswith(" "):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    match = _INSTRUCTION.match(line)
    if match and current:
      op_name = _OP_NAME.search(line)
      instructions[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "",
                                      _CALLED.findall(line))
      computations[current].append(match.group(1))
      lines[match.group(1)] = line

  def dots_in(name: str) -> list[str]:
    """The dots `name` runs: itself, or those of the computations a fusion calls."""
    opcode, _, called = instructions[name]
    if opcode == "dot":
      return [name]
    if opcode != "fusion":
      return []
    return [dot for computation in called for inner in computations[computation]
            for dot in dots_in(inner)]

  def kinds_in(name: str, seen: set[str]) -> set[str]:
    """The kinds of `name`, or of every instruction of the computations a fusion calls."""
    opcode, op_name, called = instructions[name]
    if opcode == "fusion":
      found = set()
      for computation in set(called) - seen:
        seen.add(computation)
        for inner in computations[computation]:
          found |= kinds_in(inner, seen)
      return found
    if opcode in ("dot", "convolution"):
      return {"matmul"}
    if opcode in ("gather", "scatter"):
      return {"gather"}
    if opcode in _MOVES:  # whatever jax op it serves, moving data is a copy
      return {"copy"}
    return {kind_of_op(op_name) if op_name else "elementwise"}

  kinds, matmuls = {}, {}
  for name, (opcode, _, _) in instructions.items():
    if opcode not in _CONTROL_FLOW:
      found = kinds_in(name, set())
      kinds[name] = next((k for k in KINDS if k in found), "copy")
      dots = dots_in(name)
      if dots:
        matmuls[name] = (sum(dot_flops(lines[d], lines) for d in dots),
                         any("lhs_batch_dims" in lines[d] for d in dots))
  return kinds, matmuls


def covered(spans: list[tuple[float, float]]) -> float:
  """The time during which at least one of the (start, end) spans runs: their union's length."""
  length, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      length += end - max(start, reach)
      reach = end
  return length


def breakdown(directory: str, top: int) -> list[dict]:
  """The rows printed for the profile in `directory` (see the module docstring)."""
  hlo_path = os.path.join(directory, HLO_FILE)
  traces = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz")))
  if not traces or not os.path.isfile(hlo_path):
    raise FileNotFoundError(f"--profile={directory}: no trace (plugins/profile/*/*.trace.json.gz) "
                            f"or no {HLO_FILE}; write them with python -m mim_jax.bench "
                            f"--config=... --profile={directory}")
  with open(hlo_path, encoding="utf-8") as f:
    text = f.read()
  module = re.search(r"HloModule (\S+?),", text).group(1)
  kinds, matmuls = parse_hlo(text)
  with gzip.open(traces[-1], "rt", encoding="utf-8") as f:
    events = [e for e in json.load(f)["traceEvents"]
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module]
  runs = collections.defaultdict(list)  # run_id -> (start, end) of its events: one step each
  # run_id -> the spans of the instructions counted below (a while loop or call, whose body's
  # instructions have their own events, is left out, as from the sums).
  counted = collections.defaultdict(list)
  per_kind, per_op = collections.Counter(), collections.Counter()
  # dense / batched / all dots -> the FLOPs their events ran, and their spans by run_id
  dot_work = {kind: [0, collections.defaultdict(list)] for kind in ("dense", "batched", "all")}
  for e in events:
    span = (e["ts"], e["ts"] + e["dur"])
    runs[e["args"]["run_id"]].append(span)
    name = e["args"]["hlo_op"]
    if name in kinds:
      counted[e["args"]["run_id"]].append(span)
      per_kind[kinds[name]] += e["dur"]
      per_op[name] += e["dur"]
    if name in matmuls:
      flop, batched = matmuls[name]
      for kind in ("batched" if batched else "dense", "all"):
        dot_work[kind][0] += flop
        dot_work[kind][1][e["args"]["run_id"]].append(span)
  steps, total = len(runs), sum(per_kind.values())
  if not steps or not total:
    raise ValueError(f"--profile={directory}: the trace has no event of {module}'s instructions")
  ms = lambda us: round(us / 1e3 / steps, 2)
  rows = [{"kind": k, "ms_per_step": ms(per_kind[k]), "share": round(per_kind[k] / total, 4)}
          for k in KINDS]
  wall = sum(max(end for _, end in spans) - min(start for start, _ in spans)
             for spans in runs.values())
  busy = sum(covered(spans) for spans in counted.values())
  busiest = [{"instruction": name, "kind": kinds[name], "ms_per_step": ms(us)}
             for name, us in per_op.most_common() if kinds[name] != "matmul"][:top]
  rows.append({"steps": steps, "wall_ms_per_step": ms(wall), "busy_ms_per_step": ms(busy),
               "instructions_ms_per_step": ms(total), "busiest_non_matmul": busiest})
  # Each kind of dot, then all of them: the FLOPs they run over the time any of them runs.
  for kind, (flop, spans) in dot_work.items():
    busy_us = sum(covered(run_spans) for run_spans in spans.values())
    rows.append({"dots": kind, "gflop_per_step": round(flop / 1e9 / steps, 6),
                 "busy_ms_per_step": ms(busy_us),
                 "gflop_per_s": round(flop / 1e3 / busy_us, 2) if busy_us else 0.0})
  return rows


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for row in breakdown(_PROFILE.value, _TOP.value):
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
