# Two commands set up everything on a fresh machine:
#   make demo   MAE pretraining on the embedded digits, then k-NN, linear-probe and few-shot
#               accuracies (pretrained / random init / pixels), fine-tuning from the pretrained
#               encoder and from random init, a reconstruction PNG, curves and a final table
#   make test   the test suite (pytest on CPU JAX, 8 fake devices)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= workdirs/demo

.PHONY: demo test bench libtpu clean-demo

# glibc malloc settings for JAX on CPU. XLA's CPU runtime allocates a train step's temporaries
# as one large block per step (1.26 GB for MAE Ti/4 at batch 128) and frees it afterwards; by
# default glibc serves such a block with a fresh mmap and unmaps it on free, so every step
# page-faults on each 4 KB page again while the kernel zeroes it: about 300k faults and ~20% of
# the step in the kernel. One arena, no mmap'd blocks and no trimming keep the freed block in the
# heap for the next step, with no fault (bench's page_faults_per_step shows it). The cost: a
# process keeps its peak heap. glibc reads this only at process start, so it is set here (and in
# launch/) rather than in Python. Set GLIBC_TUNABLES= to opt out. Not for `make test`: its tiny
# models have no large temporaries, and its in-process tests, which compile many small programs,
# ran 18% slower with it (test_sharding, test_evaluators and test_weights: 83 s against 70 s).
GLIBC_TUNABLES ?= glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776
demo bench: export GLIBC_TUNABLES := $(GLIBC_TUNABLES)

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# libtpu, TPU's runtime and compiler, for `mim_jax.tools.dryrun --topology=...`: plans for a TPU
# slice compiled by TPU's own compiler on this host, no TPU needed. It lives outside the venv:
# installed there, every JAX process on a TPU-less host would look for a TPU first (2 s and an
# error in the log). `make test` installs it, for tests/test_dryrun.py.
LIBTPU := .libtpu
libtpu: $(LIBTPU)/.installed
$(LIBTPU)/.installed: requirements-libtpu.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --target $(LIBTPU) -r requirements-libtpu.txt
	touch $@

# A fresh run each time: the demo is a showcase, not a resumable job. It pretrains MAE, then
# fine-tunes that encoder and the same ViT from random init with one short recipe (the runlocal
# fine-tuning, run for DEMO_FINETUNE_STEPS), and ends with the table of every final evaluation:
# what pretraining buys, by k-NN, linear probe, few-shot and fine-tuning.
DEMO_FINETUNE_STEPS ?= 165
DEMO_FT := $(DEMO_DIR)/finetune
demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(PY) -m mim_jax.main --config=configs/mae_vit.py:runlocal --workdir=$(DEMO_DIR)
	$(PY) -m mim_jax.main --config=configs/finetune_vit.py:runlocal,init_from=$(DEMO_DIR) \
	    --workdir=$(DEMO_FT)/pretrained --config.total_steps=$(DEMO_FINETUNE_STEPS)
	$(PY) -m mim_jax.main --config=configs/finetune_vit.py:runlocal \
	    --workdir=$(DEMO_FT)/random_init --config.total_steps=$(DEMO_FINETUNE_STEPS)
	$(PY) -m mim_jax.tools.plot --workdir=$(DEMO_DIR) \
	    --finetuned=pretrained=$(DEMO_FT)/pretrained,random_init=$(DEMO_FT)/random_init
	@echo "reconstruction grid: $(DEMO_DIR)/reconstruction.png   curves: $(DEMO_DIR)/plots/   metrics: $(DEMO_DIR)/metrics.jsonl"

# Two pytest workers (pytest-xdist), one per core of the 2-core CI machine: most of the suite's
# time is XLA compilation, which runs on one thread. TEST_WORKERS=0 runs in one process.
# --dist loadfile keeps each test file on one worker, so a module-scoped fixture (a shared
# trained state, say) is built once rather than once per worker.
TEST_WORKERS ?= 2
test: $(VENV)/.installed $(LIBTPU)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# mim_jax's train step against its PyTorch peer (benchmarks/torch_mae.py: the same model, batch
# and mask ratio, eager and torch.compile) on the same config, in alternating timed rounds
# (benchmarks/compare.py), then a line with mim_jax's throughput over each of torch's: the
# median of the rounds' ratios and their range. BENCH_CONFIG picks another config.
BENCH_CONFIG ?= configs/mae_vit.py:variant=Ti/4,decoder=4x128,image_size=32,batch_size=128
BENCH_ROUNDS ?= 10
bench: $(VENV)/.installed
	$(PY) -m benchmarks.compare --config=$(BENCH_CONFIG) --rounds=$(BENCH_ROUNDS)
