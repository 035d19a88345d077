#!/usr/bin/env bash
# Counts aborts at exit of finished torchrun runs: makes one 2-rank run with a checkpoint, then
# resumes a copy of it RUNS times (one update each) and reports how many exited non-zero, keeping the
# output of each failure in WORKDIR. Run it beside busy cores, e.g.
#   python -c 'while True: pass' &   then   scripts/torchrun_exit_loop.sh 30 /tmp/exit-loop
# An aborted rank's core dump lands in its run folder (ulimit -c unlimited, core_pattern "core").
set -u
RUNS=${1:?usage: torchrun_exit_loop.sh RUNS WORKDIR}
WORKDIR=$(realpath -m "${2:?usage: torchrun_exit_loop.sh RUNS WORKDIR}")
PYTHON=$(command -v "${PYTHON:-python}")
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" # absolute: each run starts in its folder
TRAIN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m kpg train --name dist
  --copies 4 --mappo.epochs 2 --mappo.minibatches 2 --mappo.hidden 16 --checkpoint-every 0
  --no-progress --no-tensorboard --eval-episodes 0 --threads 1)

mkdir -p "$WORKDIR"
rm -rf "$WORKDIR/base"
"${TRAIN[@]}" --logdir "$WORKDIR/base" --steps 100 >"$WORKDIR/base.log" 2>&1 ||
  { echo "the first run failed: $WORKDIR/base.log"; exit 1; }
ok=0
failed=0
for i in $(seq 1 "$RUNS"); do
  run="$WORKDIR/run$i"
  rm -rf "$run"
  cp -a "$WORKDIR/base" "$run"
  (cd "$run" && ulimit -c unlimited && timeout 300 "${TRAIN[@]}" --logdir "$run" --steps 200 --resume >out.txt 2>&1)
  status=$?
  if [ "$status" = 0 ]; then
    ok=$((ok + 1))
    rm -rf "$run"
  else
    failed=$((failed + 1))
    echo "run $i: exit code $status ($run/out.txt)"
  fi
done
echo "resumed runs: $RUNS, exit code 0: $ok, non-zero: $failed"
