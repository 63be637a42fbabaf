r"""mim_jax's MAE train step against its PyTorch peer, timed in alternating rounds.

  python -m benchmarks.compare \
      --config=configs/mae_vit.py:variant=Ti/4,decoder=4x128,image_size=32,batch_size=128 \
      [--rounds=10] [--steps=3] [--modes=eager,compiled]

What `make bench` runs. It starts `python -m mim_jax.bench` and one `python -m
benchmarks.torch_mae` per PyTorch mode, each with --serve and the same config argument, one at a
time, so no compilation overlaps another's timing. Each prints its usual JSON line (forwarded
here) and waits. Then come `--rounds` rounds: in each, every process in turn runs `--steps`
timed steps while the others sleep on their stdin, in an order that rotates from round to round.
A drift in the machine's speed then slows every contender of a round alike, and the ratio of a
round compares like with like: timed one after the other instead, minutes apart, the same two
programs' ratio ranged from 0.72 to 1.02 on a 2-core CPU.

Prints one JSON line per round (images/s of each contender) and a last line: each contender's
median images/s, and mim_jax's images/s over each PyTorch mode's, the median of the rounds'
ratios with their range (`mim_jax_over_torch_<mode>`, `..._min`, `..._max`).
"""

import json
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from mim_jax import errors

_CONFIG = flags.DEFINE_string("config", None, "An MAE config argument as mim_jax.bench takes "
                              "it, e.g. configs/mae_vit.py:variant=Ti/4,batch_size=128.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds; each runs every contender once.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per contender per round.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps of each contender before its own "
                               "first figures (and after its compilation).")
_MODES = flags.DEFINE_list("modes", "eager,compiled", "PyTorch modes to compare with, any of "
                           "eager, compiled (benchmarks/torch_mae.py).")
flags.mark_flags_as_required(["config"])

MIM_JAX = "mim_jax"
# Between two contenders' turns: torch's OpenMP threads spin a little after their last op
# before they sleep, and that spinning must not eat into the next contender's time.
SETTLE_S = 0.2


class Contender:
  """One benchmark process started with --serve: its first line is its own figures; then it
  answers each count of steps with their time per step."""

  def __init__(self, name: str, module: str, args: list[str]):
    self.name = name
    self.process = subprocess.Popen([sys.executable, "-m", module, *args, "--serve"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.first = self._read_line()
    # Neither line names the batch; both give images/s and ms per step to 2 decimals.
    self.batch = round(self.first["images_per_sec"] * self.first["step_ms"] / 1e3)

  def _read_line(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      code = self.process.wait()
      raise ValueError(f"{self.name}: the benchmark process exited with code {code} before "
                       f"it answered (its error is printed above)")
    return json.loads(line)

  def images_per_sec(self, steps: int) -> float:
    self.process.stdin.write(f"{steps}\n")
    self.process.stdin.flush()
    return self.batch / self._read_line()["step_s"]

  def close(self) -> None:
    if self.process.stdin and not self.process.stdin.closed:
      self.process.stdin.close()
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()


def contenders_args(config: str, modes: list[str], warmup: int, steps: int
                    ) -> list[tuple[str, str, list[str]]]:
  """(name, module, arguments) of each benchmark process."""
  common = [f"--config={config}", f"--warmup={warmup}", f"--steps={steps}"]
  return ([(MIM_JAX, "mim_jax.bench", common)]
          + [(f"torch_{mode}", "benchmarks.torch_mae", [*common, f"--modes={mode}"])
             for mode in modes])


def summary(rounds: list[dict[str, float]], modes: list[str]) -> dict[str, float]:
  """Each contender's median images/s, and mim_jax's over each mode's: the median of the rounds'
  ratios, with their least and greatest."""
  out = {f"{name}_images_per_sec": round(statistics.median(r[name] for r in rounds), 2)
         for name in rounds[0]}
  for mode in modes:
    ratios = [r[MIM_JAX] / r[f"torch_{mode}"] for r in rounds]
    key = f"mim_jax_over_torch_{mode}"
    out.update({key: round(statistics.median(ratios), 3), f"{key}_min": round(min(ratios), 3),
                f"{key}_max": round(max(ratios), 3)})
  return {"rounds": len(rounds), **out}


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  modes = _MODES.value
  if not modes or (bad := [m for m in modes if m not in ("eager", "compiled")]):
    raise ValueError(f"--modes={','.join(modes)}: expected one or more of eager, compiled")
  if _ROUNDS.value < 1 or _STEPS.value < 1:
    raise ValueError(f"--rounds={_ROUNDS.value} --steps={_STEPS.value}: both must be >= 1")
  contenders = []
  try:
    for name, module, args in contenders_args(_CONFIG.value, modes, _WARMUP.value,
                                              _STEPS.value):
      contenders.append(Contender(name, module, args))
      print(json.dumps(contenders[-1].first), flush=True)
    rounds = []
    for index in range(_ROUNDS.value):
      shift = index % len(contenders)
      row = {}
      for contender in contenders[shift:] + contenders[:shift]:
        time.sleep(SETTLE_S)
        row[contender.name] = contender.images_per_sec(_STEPS.value)
      rounds.append({c.name: row[c.name] for c in contenders})
      print(json.dumps({"round": index, **{k: round(v, 2) for k, v in rounds[-1].items()}}),
            flush=True)
    print(json.dumps(summary(rounds, modes)), flush=True)
  finally:
    for contender in contenders:
      contender.close()


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
