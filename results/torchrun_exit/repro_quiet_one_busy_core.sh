#!/bin/bash
# Issue 25 item 14 on a quiet machine with one busy core (the filer's condition), code before the fix
# (main with 3571a35's import removed). The long runs given in PAUSE_PIDS are paused (SIGSTOP) meanwhile.
set -u
cd /work/main
PIDS=${PAUSE_PIDS:?the long runs to pause, e.g. PAUSE_PIDS="123 456"}
out=${OUT:-/work/studies/exit_loop_quiet}
restore() { git -C /work/main checkout kpg/distributed.py; kill $BUSY 2>/dev/null; kill -CONT $PIDS; }
trap restore EXIT
kill -STOP $PIDS
python3 -c 'while True: pass' & BUSY=$!
sed -i '/importlib.import_module("torch.distributed.nn")/d' kpg/distributed.py
git diff --stat
bash results/torchrun_exit/test_loop.sh /work/main ${1:-15} $out/test_old
PYTHON=/work/main/.venv/bin/python bash scripts/torchrun_exit_loop.sh ${2:-20} $out/exit_old > $out/exit_old.log 2>&1
git checkout kpg/distributed.py
echo done
