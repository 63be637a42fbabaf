"""`python -m mim_jax.tools.plot`: metrics.jsonl written by the trainer's MetricWriter becomes
PNG curves holding exactly the logged values."""

import pytest
from PIL import Image

from conftest import run_module
from mim_jax import final_results
from mim_jax.metric_writer import MetricWriter
from mim_jax.tools import plot


def write_run(workdir) -> None:
  writer = MetricWriter(str(workdir))
  for step in (10, 20, 30):
    writer.write(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "images_per_sec": 50.0 + step,
                        "mfu": 0.3})
  writer.write(20, {"knn/pretrained": 0.7})  # a periodic eval
  writer.write(30, {"knn/pretrained": 0.9, "knn/random_init": 0.8, "finetune/top1": 0.95,
                    "few_shot/10shot/pretrained": 0.7, "few_shot/10shot_std/pretrained": 0.02})
  writer.close()


def test_cli_writes_one_png_per_panel_with_the_logged_values(tmp_path):
  write_run(tmp_path)
  result = run_module("mim_jax.tools.plot", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  for panel in ("loss", "lr", "images_per_sec", "evals", "final"):
    with Image.open(tmp_path / "plots" / f"{panel}.png") as image:
      assert image.format == "PNG" and image.size == (600, 400)
  assert ("final.png: few_shot/10shot/pretrained, few_shot/10shot_std/pretrained, finetune/top1, "
          "knn/pretrained, knn/random_init") in result.stdout

  drawn = plot.plot(str(tmp_path), str(tmp_path / "again"))
  by_panel = {path.rsplit("/", 1)[-1]: series for path, series in drawn.items()}
  assert by_panel["loss.png"] == {"loss": ([10, 20, 30], [0.1, 0.05, 1 / 30])}
  assert by_panel["lr.png"]["lr"][1] == pytest.approx([0.01, 0.02, 0.03])
  # Curves for the evals logged at several steps; every eval's last value in the bar chart.
  assert by_panel["evals.png"] == {"knn/pretrained": ([20, 30], [0.7, 0.9])}
  assert by_panel["final.png"]["knn/random_init"] == ([30], [0.8])
  assert set(by_panel["final.png"]) == {"finetune/top1", "knn/pretrained", "knn/random_init",
                                        "few_shot/10shot/pretrained",
                                        "few_shot/10shot_std/pretrained"}
  assert "mfu" not in {name for series in drawn.values() for name in series}


def test_missing_workdir_and_bad_rows_are_named(tmp_path):
  result = run_module("mim_jax.tools.plot", f"--workdir={tmp_path / 'nope'}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: no metrics.jsonl in workdir '{tmp_path / 'nope'}'")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics row"):
    plot.read_series(str(tmp_path / "metrics.jsonl"))


def test_finetuned_runs_join_the_bar_chart_and_the_printed_table(tmp_path):
  """What `make demo` prints last: the pretraining's final evaluations and the top-1 of the
  fine-tuning runs started from each encoder, read from their results.json."""
  write_run(tmp_path)
  for encoder, top1 in (("pretrained", 0.95), ("random_init", 0.39)):
    (tmp_path / encoder).mkdir()
    final_results.write(str(tmp_path / encoder), 330, {"top1/finetuned": top1, "loss": 0.1})
  result = run_module("mim_jax.tools.plot", f"--workdir={tmp_path}", "--finetuned="
                      f"pretrained={tmp_path / 'pretrained'},random_init={tmp_path / 'random_init'}")
  assert result.returncode == 0, result.stderr[-2000:]
  table = result.stdout.split(f"final evaluations ({tmp_path.name}):\n")[1].splitlines()
  # (write_run's 'finetune/top1' reads as evaluator 'finetune', encoder 'top1'.)
  assert table[0].split() == ["evaluator", "pretrained", "random_init", "top1"]
  assert table[-1].split() == ["knn", "0.9000", "0.8000", "-"]
  assert ["finetune_top1", "0.9500", "0.3900", "-"] in [row.split() for row in table]
  assert ["few_shot/10shot", "0.7000", "-", "-"] in [row.split() for row in table]

  bad = run_module("mim_jax.tools.plot", f"--workdir={tmp_path}",
                   f"--finetuned=pretrained={tmp_path / 'nope'}")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith(
      f"error: --finetuned pretrained={tmp_path / 'nope'}: no results.json there")
  with pytest.raises(ValueError, match=r"--finetuned item 'pretrained' is not <encoder>=<workdir>"):
    plot.parse_runs("pretrained")
