# Two commands set up everything on a fresh machine:
#   make demo   MAE pretraining on the embedded digits, then k-NN, linear-probe and few-shot
#               accuracies (pretrained / random init / pixels), a reconstruction PNG and curves
#   make test   the test suite (pytest on CPU JAX, 8 fake devices)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= workdirs/demo

.PHONY: demo test bench clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# A fresh run each time: the demo is a showcase, not a resumable job.
demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(PY) -m mim_jax.main --config=configs/mae_vit.py:runlocal --workdir=$(DEMO_DIR)
	$(PY) -m mim_jax.tools.plot --workdir=$(DEMO_DIR)
	@echo "reconstruction grid: $(DEMO_DIR)/reconstruction.png   curves: $(DEMO_DIR)/plots/   metrics: $(DEMO_DIR)/metrics.jsonl"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m mim_jax.bench --config=configs/mae_vit.py:variant=Ti/4,decoder=4x128,image_size=32,batch_size=128
