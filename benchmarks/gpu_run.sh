#!/usr/bin/env bash
# One GPU session for the Triton backend: kernel tests, benchmark, whole suite. From the repo root:
#
#     bash benchmarks/gpu_run.sh [kernels] [bench] [suite] [-- extra args for bench_attention.py]
#
# No stage named = all three, in that order. Logs and JSON go to $OUT (default
# /tmp/flashtile_gpu); the last lines printed are a short summary. Test compilation is spread
# over CPU cores with pytest-xdist when it is installed. Timeouts (seconds): KERNELS_TIMEOUT,
# BENCH_TIMEOUT, SUITE_TIMEOUT; SUITE_FILES (default: tests) narrows the suite stage.
set -o pipefail
stages=()
while [[ $# -gt 0 && $1 != -- ]]; do stages+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#stages[@]} -eq 0 ]] && stages=(kernels bench suite)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashtile_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n ${NPROC:-8}"; fi
quiet() { grep -v "PytestBenchmarkWarning\|warner("; }

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

summary=()
for stage in "${stages[@]}"; do
  t0=$SECONDS
  case $stage in
    kernels)
      timeout "${KERNELS_TIMEOUT:-420}" $PY -m pytest tests/test_triton_kernels.py $XDIST -q -rfE -p no:cacheprovider \
        2>&1 | quiet | tee "$OUT/tests_triton_kernels.log"
      summary+=("test_triton_kernels: $(tail -1 "$OUT/tests_triton_kernels.log") [$((SECONDS - t0)) s]")
      ;;
    bench)
      timeout "${BENCH_TIMEOUT:-420}" $PY benchmarks/bench_attention.py --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
      rc=$?
      grep -E "^sweep best|^using|SUSPICIOUS|fail" "$OUT/bench.log"
      sed -n '/^TFLOP\/s (fwd/,$p' "$OUT/bench.log"
      summary+=("bench: exit $rc [$((SECONDS - t0)) s]")
      ;;
    suite)
      # FLASHTILE_TEST_BACKENDS (tests/conftest.py) puts the parity tests on the triton backend;
      # forcing FLASHTILE_BACKEND=triton instead would also fail every test that uses CPU tensors.
      # -v names each result in the log as it happens, even if the timeout cuts the run.
      FLASHTILE_TEST_BACKENDS=triton timeout "${SUITE_TIMEOUT:-300}" \
        $PY -m pytest ${SUITE_FILES:-tests} $XDIST -v -rfE --tb=short -p no:cacheprovider \
        --ignore=tests/test_triton_kernels.py \
        2>&1 | quiet > "$OUT/tests_suite_triton.log"
      grep -E "\] (FAILED|ERROR) " "$OUT/tests_suite_triton.log" | grep -oE "(FAILED|ERROR) tests/\S+" | sort | head -40
      npass=$(grep -c "\] PASSED " "$OUT/tests_suite_triton.log")
      nfail=$(grep -cE "\] (FAILED|ERROR) " "$OUT/tests_suite_triton.log")
      nskip=$(grep -c "\] SKIPPED " "$OUT/tests_suite_triton.log")
      summary+=("suite (FLASHTILE_TEST_BACKENDS=triton): $npass passed, $nfail failed, $nskip skipped;" \
                "last line: $(tail -1 "$OUT/tests_suite_triton.log" | cut -c1-100) [$((SECONDS - t0)) s]")
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo
printf '%s\n' "${summary[@]}"
