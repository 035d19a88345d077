#!/usr/bin/env bash
# One command that proves kpg's CUDA path on a fresh GPU machine and measures it (docs/cuda.md):
#
#     scripts/gpu_check.sh OUTDIR
#
# Needs torch (with CUDA), nvcc, CMake, pybind11 and scikit-build-core installed; downloads nothing.
# Builds kpg for this GPU against the installed torch into a virtual environment in OUTDIR that sees
# the system's packages, runs the CUDA tests (pytest where pytest and hypothesis are installed;
# scripts/cuda_checks.py always), then bench/optimizer.py and bench/agents.py on CUDA. Writes
# OUTDIR/gpu_check.log (everything printed) and OUTDIR/gpu_check.json (each stage's outcome and the
# benchmarks' figures). Each stage has a time limit (460 s together), so the run ends within 8 minutes.
# Exit status: 0 all passed, 1 a stage failed, 2 no GPU or a missing tool (nothing was run).
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
PYTHON=${PYTHON:-python3}
STARTED=$(date +%s)

refuse() {
  echo "gpu_check: $1; nothing was built or run." >&2
  exit 2
}

# ---- at once: a GPU, then the tools -----------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || refuse "no NVIDIA GPU here (nvidia-smi not found); run this on a GPU machine"
GPU=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
[[ -n "$GPU" ]] || refuse "nvidia-smi lists no GPU (driver not loaded, or no device visible)"
COMPUTE_CAP=$(echo "$GPU" | awk -F', ' '{print $NF}')
DRIVER_CUDA=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9.]*\).*/\1/p' | head -n 1)
command -v "$PYTHON" >/dev/null 2>&1 || refuse "no $PYTHON (set PYTHON=/path/to/python)"
TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", torch.cuda.is_available())' \
  2>/dev/null) || refuse "torch is not importable by $PYTHON"
read -r TORCH_VERSION TORCH_CUDA TORCH_SEES_GPU <<<"$TORCH"
[[ "$TORCH_CUDA" != none ]] || refuse "torch $TORCH_VERSION is a CPU-only build"
[[ "$TORCH_SEES_GPU" == True ]] || refuse "torch $TORCH_VERSION (CUDA $TORCH_CUDA) cannot use the GPU: $GPU"
command -v cmake >/dev/null 2>&1 || refuse "cmake not found"
"$PYTHON" -c 'import pybind11, scikit_build_core' 2>/dev/null ||
  refuse "pybind11 or scikit-build-core is not importable"

# nvcc of torch's CUDA major version (docs/cuda.md): nvcc on PATH, else /usr/local/cuda-<major>.*.
nvcc_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p'; }
NVCC=${KPG_CUDA_COMPILER:-$(command -v nvcc || true)}
TORCH_MAJOR=${TORCH_CUDA%%.*}
if [[ -z "${KPG_CUDA_COMPILER:-}" && ( -z "$NVCC" || "$(nvcc_release "$NVCC")" != "$TORCH_MAJOR".* ) ]]; then
  NEWEST=$(printf '%s\n' /usr/local/cuda-"$TORCH_MAJOR".*/bin/nvcc | sort -V -r | head -n 1)
  [[ -x "$NEWEST" ]] && NVCC=$NEWEST
fi
[[ -n "$NVCC" ]] || refuse "no nvcc found (PATH, /usr/local/cuda-$TORCH_MAJOR.*, KPG_CUDA_COMPILER)"
NVCC_CUDA=$(nvcc_release "$NVCC")
export KPG_CUDA_COMPILER=$NVCC
if [[ "${NVCC_CUDA%%.*}" != "$TORCH_MAJOR" ]]; then
  # No toolkit of torch's major version here. This driver may still run both; the build then holds
  # only on drivers like this one, which the log says.
  if [[ -n "$DRIVER_CUDA" && "${DRIVER_CUDA%%.*}" -ge "${NVCC_CUDA%%.*}" ]]; then
    echo "NOTE: nvcc is CUDA $NVCC_CUDA, torch runs CUDA $TORCH_CUDA; this driver supports CUDA $DRIVER_CUDA," \
      "so kpg is built with KPG_CUDA_MATCH_TORCH=OFF (it would not run on drivers older than CUDA ${NVCC_CUDA%%.*}.x)"
    export KPG_CUDA_MATCH_TORCH=OFF
  else
    refuse "nvcc $NVCC is CUDA $NVCC_CUDA, torch runs CUDA $TORCH_CUDA and the driver supports CUDA $DRIVER_CUDA: \
install a CUDA $TORCH_MAJOR.x toolkit (KPG_CUDA_COMPILER=/path/to/nvcc)"
  fi
fi
export KPG_TORCH_CUDA_VERSION=$TORCH_CUDA
export KPG_CUDA=ON
export KPG_CUDA_ARCHITECTURES=${KPG_CUDA_ARCHITECTURES:-${COMPUTE_CAP/./}-real}

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT ($COMMIT)"
echo "GPU: $GPU; driver supports CUDA ${DRIVER_CUDA:-?}"
echo "torch $TORCH_VERSION (CUDA $TORCH_CUDA); nvcc $NVCC (CUDA $NVCC_CUDA); $(cmake --version | head -n 1)"
echo "building for CUDA architectures $KPG_CUDA_ARCHITECTURES"

STAGES="$OUT/stages.tsv"
: >"$STAGES"
# stage NAME LIMIT_SECONDS COMMAND...: runs the command with a time limit and records the outcome.
FAILED=0
stage() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "== $name (limit ${limit}s): $*"
  local begin rc seconds
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  seconds=$(($(date +%s) - begin))
  [[ $rc -eq 0 ]] || FAILED=1
  [[ $rc -eq 124 || $rc -eq 137 ]] && echo "== $name: stopped after ${limit}s"
  echo "== $name: exit $rc after ${seconds}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$STAGES"
  return $rc
}

VENV="$OUT/venv"
VPY="$VENV/bin/python"
# The system's torch, pybind11 and scikit-build-core, seen from a fresh environment kpg installs into.
stage venv 20 "$PYTHON" -m venv --system-site-packages "$VENV" || exit 1
cd "$ROOT" || exit 1
# Editable, as `make setup` installs it: the tests import kpg from this checkout.
stage build 150 "$VPY" -m pip install --no-build-isolation --no-deps --no-index -v -e . || {
  echo "gpu_check: the build failed; see above"
  exit 1
}
stage info 20 "$VPY" -m kpg.info

if "$VPY" -c 'import pytest, hypothesis' 2>/dev/null; then
  # The device-parametrized tests' CUDA cases and the CUDA-only tests (ids and names with "cuda").
  TESTS=(tests/test_cuda.py tests/test_kernels.py tests/test_optim.py tests/test_nn.py tests/test_anticipation.py)
  # The trainers' tests need the environments (kpg's runtime dependencies, not installed by --no-deps).
  if "$VPY" -c 'import gymnasium, pettingzoo, kpg.app.train, kpg.app.compare, kpg.algos, kpg.envs' 2>/dev/null; then
    TESTS+=(tests/test_offpolicy.py::test_actor_step_matches_brute_force
      tests/test_train.py::test_mappo_batched_actors_equal_per_agent_actors)
  else
    echo "NOTE: the trainers' dependencies (gymnasium, pettingzoo, ...) are missing: their CUDA tests are left out"
  fi
  stage pytest 80 "$VPY" -m pytest -q -p no:cacheprovider -k cuda --junitxml="$OUT/pytest.xml" "${TESTS[@]}"
else
  echo
  echo "== pytest: skipped: pytest or hypothesis is not installed here (nothing is downloaded);" \
    "scripts/cuda_checks.py below checks the CUDA path without them"
  printf 'pytest\tskipped\t0\t0\n' >>"$STAGES"
fi
stage cuda_checks 60 "$VPY" scripts/cuda_checks.py --json "$OUT/cuda_checks.json"
stage bench_optimizer 60 "$VPY" bench/optimizer.py --device cuda --min-run-time 0.2 --max-run-time 0.5 \
  --json "$OUT/optimizer.json"
stage bench_agents 70 "$VPY" bench/agents.py --device cuda --agents 8 512 --no-memory --min-run-time 0.3 \
  --max-run-time 2 --launch-agents 8 512 4096 --json "$OUT/agents.json"

"$VPY" - "$OUT" "$GPU" "$TORCH_VERSION" "$TORCH_CUDA" "$NVCC_CUDA" "$DRIVER_CUDA" "$STARTED" <<'EOF'
import json, os, sys, time
out, gpu, torch_version, torch_cuda, nvcc_cuda, driver_cuda, started = sys.argv[1:]
stages = []
with open(os.path.join(out, "stages.tsv")) as file:
    for line in file:
        name, rc, seconds, limit = line.rstrip("\n").split("\t")
        stages.append({"stage": name, "exit": rc, "seconds": int(seconds), "limit_seconds": int(limit)})
summary = {"gpu": gpu, "torch": torch_version, "torch_cuda": torch_cuda, "nvcc_cuda": nvcc_cuda,
           "driver_cuda": driver_cuda, "seconds": time.time() - int(started), "stages": stages}
for name in ("cuda_checks", "optimizer", "agents"):
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        with open(path) as file:
            summary[name] = json.load(file)
with open(os.path.join(out, "gpu_check.json"), "w") as file:
    json.dump(summary, file, indent=2)
print(f"\nwrote {out}/gpu_check.json and {out}/gpu_check.log after {summary['seconds']:.0f} s")
EOF
if [[ $FAILED -ne 0 ]]; then
  echo "gpu_check: some stage failed (see the exits above)"
  exit 1
fi
echo "gpu_check: every stage passed"
