#!/usr/bin/env bash
export PYTHONPATH=src PYTHONUNBUFFERED=1
step() { local name=$1 t=$2; shift 2; local t0=$SECONDS; mkdir -p $OUT/$name
  OUT=$OUT/$name timeout $t "$@" > $OUT/$name/log.txt 2>&1; echo "== $name rc=$? $((SECONDS-t0))s"; tail -${TAILN:-25} $OUT/$name/log.txt; }
TAILN=12 step flexbwd 250 python benchmarks/gflex_bwd_run.py --no-d64 --budget 230
TAILN=8 step host 70 python benchmarks/flex_bwd_host.py --calls 40
grep "us per call\|thread" $OUT/host/log.txt
TAILN=16 step fwd64 140 python benchmarks/gflex_run.py --skip-check --only-d64 --budget 130
