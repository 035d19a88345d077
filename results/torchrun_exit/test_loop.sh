#!/bin/bash
# Issue 25 item 14: the test that failed under load, looped, in the tree given as $1 (its own venv), N times.
tree=$1; n=$2; out=$3
cd "$tree" || exit 1
{ date -u; uptime; git -C "$tree" rev-parse HEAD
fail=0
for i in $(seq 1 "$n"); do
  if ! .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_faults.py -k ctrl_c_under_torchrun > "$out.$i.txt" 2>&1; then
    fail=$((fail + 1)); echo "run $i failed: $out.$i.txt"; grep -m3 -E "terminate called|returncode|Error" "$out.$i.txt"
  else rm "$out.$i.txt"; fi
done
echo "runs: $n, failed: $fail"; date -u; uptime; } > "$out.log" 2>&1
