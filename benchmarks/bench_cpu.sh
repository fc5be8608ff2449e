#!/usr/bin/env bash
# The CPU benchmark of issue 2: float32, batch 1, 8 heads, head dim 64, seqlen 1k..16k,
# forward and forward+backward, flashtile (torch backend) vs standard attention vs SDPA.
# Writes benchmarks/results/cpu_<date>.json and .png. About 30+ minutes on a 2-core CPU;
# SEQLENS=1024,2048,4096 for a shorter run. Extra arguments go to `flashtile bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
date=$(date +%Y-%m-%d)
mkdir -p benchmarks/results
${PYTHON:-python} -m flashtile.cli bench --device cpu --dtype float32 --batch 1 --heads 8 --headdim 64 \
  --seqlens "${SEQLENS:-1024,2048,4096,8192,16384}" --mode fwd,fwd_bwd \
  --json "benchmarks/results/cpu_${date}.json" --plot "benchmarks/results/cpu_${date}.png" "$@"
