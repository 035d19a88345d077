# Quick start: `make run` (set up, then the main job) and `make test` (set up, then the tests).
# Setup is a virtual environment in .venv with the CPU build of torch where no NVIDIA driver is
# present, and kpg installed in editable mode with every extra (the extension rebuilds when csrc/
# changes). `make lint` checks formatting and lint (CI runs it before the tests).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch==2.13.0
TORCH := $(if $(shell command -v nvidia-smi 2>/dev/null),$(TORCH_GPU),$(TORCH_CPU))
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
CSRC_FILES := $(shell find csrc -type f \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \) 2>/dev/null)

# The authors' SMAX environment (their environment_jax.yml in AryamanReddi99/cheap-talk): JaxMARL 0.0.7 on
# jax 0.6.0, which cannot share .venv (jaxmarl 0.2.0, jax 0.10.2), so it has its own venv with kpg[train,test].
# `make test` also runs the tests marked smax_authors there (tests/test_smax_authors.py).
SMAX_AUTHORS_VENV ?= .venv-smax-authors
SMAX_AUTHORS_PY := $(SMAX_AUTHORS_VENV)/bin/python
SMAX_AUTHORS_PINS := jaxmarl==0.0.7 jax==0.6.0 jaxlib==0.6.0 flax==0.10.5 chex==0.1.89 numpy==1.26.4 \
	scipy==1.12.0 brax==0.10.3 mujoco==3.1.3

.PHONY: setup setup-smax-authors test test-smax-authors lint run bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[train,envs,smax,vmas,torchrl,benchmarl,test,lint]"
	touch $@

setup-smax-authors: $(SMAX_AUTHORS_VENV)/.installed

# Its own build folder: the extension is built for this venv's interpreter, not .venv's. Without CUDA: this
# venv only runs SMAX on the CPU, and skipping nvcc saves minutes of every fresh setup.
$(SMAX_AUTHORS_VENV)/.installed: $(SOURCES)
	test -x $(SMAX_AUTHORS_PY) || $(PYTHON) -m venv $(SMAX_AUTHORS_VENV)
	$(SMAX_AUTHORS_PY) -m pip install --quiet "$(TORCH)" $(SMAX_AUTHORS_PINS)
	KPG_CUDA=OFF $(SMAX_AUTHORS_PY) -m pip install --quiet -e ".[train,test]" $(SMAX_AUTHORS_PINS) \
		--config-settings=build-dir=build/smax-authors
	touch $@

test: setup test-smax-authors
	$(PY) -m pytest -q

test-smax-authors: setup-smax-authors
	$(SMAX_AUTHORS_PY) -m pytest -q -m smax_authors tests/test_smax_authors.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CSRC_FILES)

# The main job (about 5 minutes on 2 cores): what KPG changes, then what it costs.
# 1. kpg games: k = 1, 2, 3 on normal-form games where simultaneous steps collide or rotate (penalty games,
#    matching pennies) and on controls (climbing, pure coordination), 4 optimizers x 6 learning rates (under a minute).
# 2. kpg compare: K2-MAPPO against MAPPO on simple_spread, 3 agents, 2 seeds each, with the per-level time split.
run: setup
	$(VENV)/bin/kpg games --out results/quickstart/games
	$(VENV)/bin/kpg compare --ks 1 2 --seeds 0 1 --workers 2 --out results/quickstart/mappo --train.steps 40000

bench: setup
	$(PY) bench/optimizer.py --json bench/results/optimizer.json

clean:
	rm -rf $(VENV) $(SMAX_AUTHORS_VENV) build
