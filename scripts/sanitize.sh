#!/usr/bin/env bash
# Builds the C++ path with AddressSanitizer and UndefinedBehaviorSanitizer into build/sanitize
# (the installed extension is left alone) and runs the kernel tests against it.
#
#   scripts/sanitize.sh                 # the kernel, launch-plan, property, op, bad-input and fuzz tests
#   scripts/sanitize.sh tests/test_x.py # other pytest arguments instead
#
# Any sanitizer report aborts the test process, so a clean run is a passing pytest run. Leak
# detection is off: CPython and torch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/sanitize
python=${PYTHON:-python}

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKPG_SANITIZE=ON -DKPG_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v "$python")" -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build" --parallel "${JOBS:-2}"
extension=$(ls "$PWD/$build"/_C*.so)

if [ "$#" -eq 0 ]; then
  set -- tests/test_kernels.py tests/test_launch_plan.py tests/test_properties.py tests/test_ops.py tests/test_bad_input.py \
    tests/test_fuzz.py
fi
# libasan must be the process's first library: preload it into the Python interpreter.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export KPG_SANITIZED_EXTENSION="$extension"
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m pytest -p sanitized_extension -q "$@"
