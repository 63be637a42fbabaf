r"""Training curves from a run's `metrics.jsonl`, as PNG files.

  python -m mim_jax.tools.plot --workdir=workdirs/demo [--out=DIR]

Writes one PNG per panel into `--out` (default `<workdir>/plots`): `loss.png` (every metric whose
name contains 'loss'), `lr.png`, `images_per_sec.png` and `evals.png` (the evaluators' metrics,
the names with a '/' such as 'knn/pretrained', that were logged at more than one step: periodic
evals), each against the training step; and `final.png`, a grouped bar chart of every
evaluator's last value: one group per evaluator ('knn', 'few_shot/10shot', ...), one bar per
encoder it read (pretrained, random_init, pixels, ...), the value written on each bar. Panels
with no data are skipped. Works on a run in progress: it reads whatever has been logged so far.
"""

import json
import os
import re
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # Files only: no display is needed (CI, SSH, TPU hosts).
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from mim_jax import errors

Series = dict[str, tuple[list[int], list[float]]]

# Panel name -> which metric names it shows.
PANELS: dict[str, Callable[[str], bool]] = {
    "loss": lambda name: "loss" in name and "/" not in name,
    "lr": lambda name: name == "lr",
    "images_per_sec": lambda name: name == "images_per_sec",
    "evals": lambda name: "/" in name,  # of these, only the series of more than one point
}


def read_series(path: str) -> Series:
  """metrics.jsonl -> {metric name: (steps, values)}, in file order. Raises ValueError naming
  the file and line of a row that is not a JSON object with an integer 'step'."""
  series: Series = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = row.pop("step")
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}:{line_no} is not a metrics row (a JSON object with a 'step'): "
                         f"{line.strip()[:80]!r}") from e
      for name, value in row.items():
        if isinstance(value, (int, float)):
          steps, values = series.setdefault(name, ([], []))
          steps.append(int(step))
          values.append(float(value))
  return series


def plot(workdir: str, out_dir: str | None = None) -> dict[str, Series]:
  """Writes the panels' PNGs; returns {png path: the series drawn in it}."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics.jsonl in workdir {workdir!r}: pass the --workdir of a "
                            f"mim_jax run (python -m mim_jax.main ... --workdir=DIR)")
  series = read_series(path)
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for panel, selects in PANELS.items():
    shown = {name: s for name, s in sorted(series.items()) if selects(name)
             and (panel != "evals" or len(s[0]) > 1)}
    if not shown:
      continue
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, (steps, values) in shown.items():
      # Evals are few points (one per eval pass): markers keep a single point visible.
      ax.plot(steps, values, marker="o" if panel == "evals" else None, markersize=3,
              label=name)
    ax.set_xlabel("step")
    ax.set_title(f"{panel} ({os.path.basename(os.path.abspath(workdir))})")
    if panel == "loss" and all(v > 0 for _, values in shown.values() for v in values):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out_dir, f"{panel}.png")
    fig.savefig(png)
    plt.close(fig)
    written[png] = shown
  final = {name: s for name, s in sorted(series.items()) if PANELS["evals"](name)}
  if final:
    png = os.path.join(out_dir, "final.png")
    bar_chart(final, png, os.path.basename(os.path.abspath(workdir)))
    written[png] = final
  return written


def bar_chart(evals: Series, png: str, title: str) -> None:
  """Writes the grouped bar chart of each '<evaluator>/<encoder>' series' last value. A series
  '<evaluator>_std/<encoder>' (an evaluator averaged over seeds) is its bar's error bar."""
  natural = lambda text: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
  groups = sorted({name.rpartition("/")[0] for name in evals
                   if not name.rpartition("/")[0].endswith("_std")}, key=natural)  # 1 < 10shot
  encoders = sorted({name.rpartition("/")[2] for name in evals},
                    key=lambda e: (e != "pretrained", e))  # the pretrained encoder first
  width = 0.8 / len(encoders)
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(encoders) / 3)), 4),
                         dpi=100)
  for i, encoder in enumerate(encoders):
    x = [g + (i - (len(encoders) - 1) / 2) * width for g in range(len(groups))]
    last = lambda name: evals.get(name, ([], [float("nan")]))[1][-1]
    heights = [last(f"{group}/{encoder}") for group in groups]
    errors_ = [last(f"{group}_std/{encoder}") for group in groups]
    bars = ax.bar(x, heights, width, label=encoder,
                  yerr=None if all(e != e for e in errors_) else errors_, capsize=2)
    ax.bar_label(bars, labels=[f"{h:.2f}" if h == h else "" for h in heights], fontsize=6,
                 padding=1)
  ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("final value")
  ax.set_title(f"final evaluations ({title})")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)


@errors.reporting
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for png, shown in plot(flags.FLAGS.workdir, flags.FLAGS.out).items():
    print(f"wrote {png}: {', '.join(shown)}")


if __name__ == "__main__":
  # Defined here, not at import, so importing this module next to other tools (tests, the
  # notebook) does not clash with their flags.
  flags.DEFINE_string("workdir", None, "The run's workdir (holds metrics.jsonl).")
  flags.DEFINE_string("out", None, "Output folder; default <workdir>/plots.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=errors.parse_flags)
