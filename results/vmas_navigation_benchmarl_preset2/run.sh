#!/bin/bash
# Issue 29: navigation seeds 1 and 2 with configs/vmas_benchmarl.toml (seed 0's runs copied in from
# results/vmas_navigation_benchmarl_preset2, so compare keeps them and reports all three seeds).
cd /work/main
git rev-parse HEAD > /work/studies/vmas_preset2/code_commit.txt
.venv/bin/kpg compare --config configs/vmas_benchmarl.toml --ks 1 2 --seeds 0 1 2 --workers 2 \
  --out /work/studies/vmas_preset2 --train.checkpoint-every 5 --train.env-options shared_rew false
echo finished
