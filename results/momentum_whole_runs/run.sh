#!/bin/bash
# Issue 28: whole-run overhead of momentum k=2 (and exact k=2) over k=1 with 64 agents.
cd "$(git rev-parse --show-toplevel)"
.venv/bin/kpg compare --ks 1 2 --anticipations exact momentum --seeds 0 --workers 2 \
  --out /work/studies/momentum_whole/simple_spread_64 --train.env simple_spread --train.agents 64 \
  --train.steps 2000 --train.eval-episodes 0 --train.threads 1
.venv/bin/kpg compare --ks 1 2 --anticipations exact momentum --seeds 0 --workers 2 \
  --out /work/studies/momentum_whole/navigation_64 --train.env vmas:navigation --train.agents 64 \
  --train.steps 10000 --train.eval-episodes 0 --train.threads 1
echo finished
