"""notebooks/mae_demo.ipynb runs top to bottom (nbclient, a real Jupyter kernel on CPU) as on a
fresh clone: with no checkpoint at its source it pretrains a tiny MAE there itself (4 steps),
then shows it, and its k-NN result is a real accuracy."""

import json

import nbclient
import nbformat

from conftest import MICRO_MAE
from conftest import REPO


def test_demo_notebook_pretrains_when_no_checkpoint_exists_then_shows_it(tmp_path, monkeypatch):

  nb = nbformat.read(REPO / "notebooks" / "mae_demo.ipynb", as_version=4)
  # Read back the k-NN figures the last cell leaves in the kernel.
  nb.cells.append(nbformat.v4.new_code_cell(
      "import json; print('KNN=' + json.dumps(KNN_RESULTS))"))
  monkeypatch.setenv("MIM_JAX_REPO", str(REPO))
  monkeypatch.setenv("MIM_JAX_SOURCE", str(tmp_path / "run"))  # absent: the notebook trains it
  monkeypatch.setenv("MIM_JAX_PRETRAIN_STEPS", "4")
  monkeypatch.setenv("MIM_JAX_CONFIG", f"configs/mae_vit.py:{MICRO_MAE}")
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "Mu/4" in text and str(tmp_path / "run") in text
  assert f"no checkpoint at {str(tmp_path / 'run')!r}: pretraining" in text
  assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
  # The reconstruction grid and the mask gallery are drawn as images.
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
  knn = json.loads(text.split("KNN=")[1].splitlines()[0])
  assert set(knn) == {"encoder (cls)", "pixels"}
  # Ten digit classes: chance is 0.1; k-NN on pixels is well above it, and so is a 4-step encoder.
  assert knn["pixels"] > 0.9 and knn["encoder (cls)"] > 0.3, knn


def test_speech_notebook_plays_a_digit_and_shows_its_masks(tmp_path, monkeypatch):
  nb = nbformat.read(REPO / "notebooks" / "speech_demo.ipynb", as_version=4)
  # Read back the summary the last cell leaves in the kernel.
  nb.cells.append(nbformat.v4.new_code_cell(
      "import json; print('SPEECH=' + json.dumps(SPEECH_SUMMARY))"))
  monkeypatch.setenv("MIM_JAX_REPO", str(REPO))
  # An empty cache: the notebook synthesizes the test split itself (under a second), so the test
  # depends on no cache from another run.
  monkeypatch.setenv("MIM_JAX_CACHE", str(tmp_path / "cache"))
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # The digit is playable: IPython's Audio renders as an HTML <audio> element.
  assert any("<audio" in o.get("data", {}).get("text/html", "") for o in outputs)
  # The log-mel plot and the masked-features plot.
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  summary = json.loads(text.split("SPEECH=")[1].splitlines()[0])
  assert 0 < summary["masked_frames"] < summary["valid_frames"] <= summary["frames"], summary
  assert summary["masked_only_valid"] is True, summary
  assert summary["label"] in range(10), summary
