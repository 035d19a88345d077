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

.PHONY: setup test lint run bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[train,envs,smax,vmas,torchrl,benchmarl,test,lint]"
	touch $@

test: setup
	$(PY) -m pytest -q

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
	rm -rf $(VENV) build
