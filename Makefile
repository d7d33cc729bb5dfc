# alignlab: `make demo` runs the main job on the embedded TinyHH world, `make test` runs the test suite.
# Both set up .venv first. torch is pinned: an unpinned torch pulls gigabytes of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# Where the torch wheel comes from; e.g. TORCH_ARGS="--index-url <PyTorch CPU wheel index>" on a machine whose
# default index would resolve a CUDA build.
TORCH_ARGS ?=

# Test workers (pytest-xdist): one per core, at most 8; each gets cores/workers threads (tests/conftest.py).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 8 ] && n=8; echo $$n)
# loadgroup: tests that share a fixture, and the SLURM tier (one local cluster), stay on one worker;
# no-loadscope-reorder keeps the order tests/conftest.py gives (the chain's critical path first).
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0 $(TORCH_ARGS)
	# DeepSpeed's setup.py imports torch: build it against the torch installed above.
	$(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[dev]'
	touch $@

demo: install
	# every stage on TinyHH (finished ones are skipped), then the side-by-side report: runs/tinyhh/eval/report.md
	$(PY) -m alignlab stage=pipeline

# float32 | bfloat16: on a GPU machine `make bench BENCH_DTYPE=bfloat16` (the scripts use CUDA when torch sees it
# and then write their own `_gpu` sections of docs/benchmarks.md, the GPU model named in each)
BENCH_DTYPE ?= float32

bench: install
	# each script trains the TinyHH models it needs if missing, prints its table and rewrites its section of
	# docs/benchmarks.md (about 40 minutes on 2 CPU cores, 25 of them the scale sweep)
	$(PY) scripts/bench/bench_rollout.py --dtype $(BENCH_DTYPE)
	$(PY) scripts/bench/bench_train.py --dtype $(BENCH_DTYPE)
	$(PY) scripts/bench/bench_ppo.py --dtype $(BENCH_DTYPE)
	$(PY) scripts/bench/bench_rain.py --dtype $(BENCH_DTYPE)
	$(PY) scripts/bench/bench_scale.py --dtype $(BENCH_DTYPE)

test: install
	# every tier; the TinyHH model chain is trained once and shared by the workers
	$(PY) -m pytest $(XDIST) -q -ra --durations=30

test-fast: install
	# the inner loop: unit and config tiers, nothing trains end to end (a few minutes)
	$(PY) -m pytest $(XDIST) -q -ra -m "not slow" tests/unit tests/config

lint: install
	$(VENV)/bin/ruff check alignlab tests scripts
	$(VENV)/bin/ruff format --check alignlab tests scripts

clean:
	rm -rf runs data_cache outputs
