#!/usr/bin/env bash
# Before/after a refactor in ONE device session: the same benchmarks on an older tree (extracted
# by `git archive <rev> src benchmarks | tar -x -C .base`, carried to the device) and on this one,
# interleaved so that drift shows in the peers' columns. From the repo root on the GPU machine:
#
#     bash benchmarks/compare_before_after.sh [bench_attention.py args...]
#
# Writes everything to $WORK (before/ and after/) and, when $OUT is set, $OUT/compare.tgz;
# prints the two TFLOP/s tables last.
set -o pipefail
WORK=${WORK:-/tmp/flashtile_compare}
export PYTHONUNBUFFERED=1
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(--seqlens 1024 4096 16384 --hdims 64 128 --impls flashtile sdpa-flash sdpa-cudnn)
for side in before after; do
  root=$([[ $side == before ]] && echo .base || echo .)
  mkdir -p "$WORK/$side"
  (cd "$root" && PYTHONPATH=src timeout 240 python benchmarks/bench_attention.py --out "$WORK/$side" "${args[@]}") \
    > "$WORK/$side/bench.log" 2>&1 || echo "$side bench exit $?"
  PYTHONPATH=$root/src timeout 120 python benchmarks/bench_small_calls.py --out "$WORK/$side" --tag "$side" \
    > "$WORK/$side/small.log" 2>&1 || echo "$side small-calls exit $?"
done
for side in before after; do
  echo "== $side"; grep -E "SUSPICIOUS|check fail" "$WORK/$side/bench.log"
  sed -n '/^TFLOP\/s (fwd/,$p' "$WORK/$side/bench.log"; cat "$WORK/$side/small.log"
done
[[ -n ${OUT:-} ]] && tar czf "$OUT/compare.tgz" -C "$WORK" before after
