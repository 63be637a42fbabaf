r"""Training curves from a run's `metrics.jsonl`, as PNG files, and its final evaluations.

  python -m mim_jax.tools.plot --workdir=workdirs/demo [--out=DIR] \
      [--finetuned=pretrained=workdirs/demo/finetune/pretrained,random_init=DIR2]

Writes one PNG per panel into `--out` (default `<workdir>/plots`): `loss.png` (every metric whose
name contains 'loss'), `lr.png`, `images_per_sec.png` and `evals.png` (the evaluators' metrics,
the names with a '/' such as 'knn/pretrained', that were logged at more than one step: periodic
evals), each against the training step; and `final.png`, a grouped bar chart of every
evaluator's last value: one group per evaluator ('knn', 'few_shot/10shot', ...), one bar per
encoder it read (pretrained, random_init, pixels, ...), the value written on each bar. Panels
with no data are skipped. Works on a run in progress: it reads whatever has been logged so far.

`--finetuned` names fine-tuning runs of the same architecture, `<encoder>=<workdir>` each: their
top-1 ('top1/finetuned' in the run's results.json) joins the bar chart as the group
'finetune_top1', one bar per encoder the fine-tuning started from. That is how `make demo` shows
what pretraining buys: the pretrained encoder and random init, fine-tuned with the same recipe.
The tool then prints the final evaluations as a table, one row per evaluator.
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
from mim_jax import final_results

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


def finetuned_series(runs: dict[str, str]) -> Series:
  """{encoder: fine-tuning workdir} -> {'finetune_top1/<encoder>': ([its last step], [top-1])},
  read from each finished run's results.json."""
  series = {}
  for encoder, workdir in runs.items():
    try:
      with open(final_results.path(workdir), encoding="utf-8") as f:
        saved = json.load(f)
      top1 = float(saved["results"]["top1/finetuned"])
    except FileNotFoundError as e:
      raise FileNotFoundError(f"--finetuned {encoder}={workdir}: no results.json there; pass the "
                              f"workdir of a finished fine-tuning run (configs/finetune_vit.py)"
                              ) from e
    except KeyError as e:
      raise ValueError(f"--finetuned {encoder}={workdir}: its results.json has no "
                       f"'top1/finetuned'; is it a fine-tuning run (configs/finetune_vit.py)?"
                       ) from e
    series[f"finetune_top1/{encoder}"] = ([int(saved["step"])], [top1])
  return series


def parse_runs(spec: str) -> dict[str, str]:
  """'pretrained=DIR1,random_init=DIR2' -> {'pretrained': 'DIR1', 'random_init': 'DIR2'}."""
  runs = {}
  for item in filter(None, spec.split(",")):
    encoder, sep, workdir = item.partition("=")
    if not sep or not encoder or not workdir:
      raise ValueError(f"--finetuned item {item!r} is not <encoder>=<workdir>, e.g. "
                       f"pretrained=workdirs/demo/finetune/pretrained")
    runs[encoder] = workdir
  return runs


def final_table(evals: Series) -> str:
  """The last value of each '<evaluator>/<encoder>' series as a text table: one row per
  evaluator, one column per encoder (pretrained first), '-' where an encoder was not read."""
  groups = sorted({name.rpartition("/")[0] for name in evals}, key=_natural)
  encoders = _encoders(evals)
  rows = [["evaluator"] + encoders]
  for group in groups:
    rows.append([group] + [f"{evals[f'{group}/{e}'][1][-1]:.4f}" if f"{group}/{e}" in evals
                           else "-" for e in encoders])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                   for row in rows)


def _natural(text: str) -> list:
  """Sort key that orders digits by value: '1shot' < '10shot'."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _encoders(evals: Series) -> list[str]:
  """The encoders named in '<evaluator>/<encoder>' series, the pretrained one first."""
  return sorted({name.rpartition("/")[2] for name in evals},
                key=lambda e: (e != "pretrained", e))


def plot(workdir: str, out_dir: str | None = None, finetuned: Series | None = None
         ) -> dict[str, Series]:
  """Writes the panels' PNGs; returns {png path: the series drawn in it}. `finetuned`
  (finetuned_series) joins the final bar chart."""
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
  final = {name: s for name, s in sorted({**series, **(finetuned or {})}.items())
           if PANELS["evals"](name)}
  if final:
    png = os.path.join(out_dir, "final.png")
    bar_chart(final, png, os.path.basename(os.path.abspath(workdir)))
    written[png] = final
  return written


def bar_chart(evals: Series, png: str, title: str) -> None:
  """Writes the grouped bar chart of each '<evaluator>/<encoder>' series' last value. A series
  '<evaluator>_std/<encoder>' (an evaluator averaged over seeds) is its bar's error bar."""
  groups = sorted({name.rpartition("/")[0] for name in evals
                   if not name.rpartition("/")[0].endswith("_std")}, key=_natural)
  encoders = _encoders(evals)
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
  finetuned = finetuned_series(parse_runs(flags.FLAGS.finetuned))
  written = plot(flags.FLAGS.workdir, flags.FLAGS.out, finetuned)
  for png, shown in written.items():
    print(f"wrote {png}: {', '.join(shown)}")
  final = next((shown for png, shown in written.items() if png.endswith("final.png")), None)
  if final:
    print(f"final evaluations ({os.path.basename(os.path.abspath(flags.FLAGS.workdir))}):")
    print(final_table(final))


if __name__ == "__main__":
  # Defined here, not at import, so importing this module next to other tools (tests, the
  # notebook) does not clash with their flags.
  flags.DEFINE_string("workdir", None, "The run's workdir (holds metrics.jsonl).")
  flags.DEFINE_string("out", None, "Output folder; default <workdir>/plots.")
  flags.DEFINE_string("finetuned", "", "Fine-tuning runs whose top-1 joins the final chart and "
                      "table: <encoder>=<workdir>, comma-separated, e.g. "
                      "pretrained=DIR1,random_init=DIR2.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=errors.parse_flags)
