#!/usr/bin/env bash
# Context parallelism on H200s (issue 17): the one-GPU baseline, then ring / Ulysses / 2-D at
# 2, 4 and 8 GPUs (NCCL parity first, then throughput at 32k-512k, causal bf16 h32 hk8 d128),
# then the table of all runs with the scaling model's column. From the repo root:
#
#     bash benchmarks/cp2d_run.sh [1] [2] [4] [8] [summary]     # no argument: every stage the GPUs allow
#
# Each stage is one process group and stays under ~4 minutes (the 1-GPU stage: ~3 minutes, most
# of it the 512k baseline); run stages as separate commands where a command is time-limited.
# JSON and logs go to $OUT (default benchmarks/results); the summary reads every ring_*_x*.json
# there. NVLink multicast stays off (bench_ring.py sets the NCCL variables).
set -o pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
stages=("$@")
if [[ ${#stages[@]} -eq 0 ]]; then
  stages=(1)
  for w in 2 4 8; do [[ $NGPU -ge $w ]] && stages+=("$w"); done
  stages+=(summary)
fi
for st in "${stages[@]}"; do
  case $st in
    1) $PY benchmarks/bench_ring.py --nprocs 1 --skip-parity 2>&1 | tee "$OUT/cp2d_x1.log" ;;
    2|4|8)
      if [[ $NGPU -lt $st ]]; then echo "stage $st: needs $st GPUs, found $NGPU (blocked)"; continue; fi
      torchrun --standalone --nproc-per-node "$st" benchmarks/bench_ring.py --skip-single 2>&1 | tee "$OUT/cp2d_x$st.log" ;;
    summary) $PY benchmarks/bench_ring.py --summary "$OUT/ring_*_x*.json" ;;
    *) echo "unknown stage $st (1, 2, 4, 8, summary)"; exit 2 ;;
  esac
done
