#!/usr/bin/env bash
# One GPU session for the Triton backend: tests, then the benchmark. Run from the repo root:
#
#     bash benchmarks/gpu_run.sh [tests|bench|all] [extra args for bench_attention.py]
#
# Logs and JSON go to $OUT (default /tmp/flashtile_gpu); the last lines printed are a short
# summary. Test compilation is spread over CPU cores with pytest-xdist when it is installed.
set -o pipefail
what=${1:-all}
shift || true
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashtile_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n ${NPROC:-8}"; fi

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

summary=()
if [[ $what == tests || $what == all ]]; then
  if [[ ${SKIP_KERNEL_TESTS:-0} != 1 ]]; then
    t0=$SECONDS
    timeout "${TEST_TIMEOUT:-420}" $PY -m pytest tests/test_triton_kernels.py $XDIST -q -rfE -p no:cacheprovider \
      2>&1 | grep -v "PytestBenchmarkWarning\|warner(" | tee "$OUT/tests_triton_kernels.log"
    summary+=("test_triton_kernels: $(tail -1 "$OUT/tests_triton_kernels.log") [$((SECONDS - t0)) s]")
  fi
  if [[ -f tests/test_parity.py && ${SKIP_SUITE:-0} != 1 ]]; then
    t0=$SECONDS
    # FLASHTILE_TEST_BACKENDS (tests/conftest.py) puts the parity tests on the triton backend;
    # forcing FLASHTILE_BACKEND=triton instead would also fail every test that uses CPU tensors.
    # -v: each failure is named in the log as it happens, even if the timeout cuts the run.
    FLASHTILE_TEST_BACKENDS=triton timeout "${SUITE_TIMEOUT:-300}" \
      $PY -m pytest tests $XDIST -v -rfE -p no:cacheprovider --ignore=tests/test_triton_kernels.py \
      > "$OUT/tests_suite_triton.log" 2>&1
    grep -E "FAILED|ERROR" "$OUT/tests_suite_triton.log" | grep -v "^FAILED\|^ERROR" | sort | uniq | head -40
    npass=$(grep -c " PASSED" "$OUT/tests_suite_triton.log"); nfail=$(grep -c " FAILED" "$OUT/tests_suite_triton.log")
    summary+=("suite (FLASHTILE_TEST_BACKENDS=triton): $nfail failed, $npass passed; $(tail -1 "$OUT/tests_suite_triton.log" | cut -c1-120) [$((SECONDS - t0)) s]")
  fi
fi
if [[ $what == bench || $what == all ]]; then
  t0=$SECONDS
  timeout "${BENCH_TIMEOUT:-420}" $PY benchmarks/bench_attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
  summary+=("bench: exit $? [$((SECONDS - t0)) s]")
  # the table is the tail of the log
  sed -n '/^TFLOP\/s (fwd/,$p' "$OUT/bench.log"
fi
echo
printf '%s\n' "${summary[@]}"
