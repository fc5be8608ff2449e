#!/usr/bin/env bash
# The test suite: the README's test command, and what CI (.ci/run) runs.
#   pass 1: every test, on the torch backend (and the triton backend where a GPU is present)
#   pass 2: the Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1), limited to
#           the parity and kernel tests, then the KV-cache tests with the backend forced to triton
#           (the decode kernel), the ones meaningful (and fast enough) there
# pytest's exit code 5 ("no tests collected") is not a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

run_pytest() {
  local rc=0
  "$PYTHON" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "(pytest collected no tests in: $*)"
    return 0
  fi
  return "$rc"
}

start=$SECONDS
echo "== pass 1/2: pytest -q tests =="
rc1=0
run_pytest -q tests || rc1=$?

echo "== pass 2/2: Triton kernels under the interpreter =="
rc2=0
files=()
for f in tests/test_parity.py tests/test_triton_kernels.py; do
  if [ -f "$f" ]; then files+=("$f"); fi
done
if [ "${#files[@]}" -eq 0 ]; then
  echo "skipped: neither tests/test_parity.py nor tests/test_triton_kernels.py exists"
elif ! why=$("$PYTHON" -c 'import flashtile.backends.triton' 2>&1); then
  echo "skipped: the triton backend is not importable: $(echo "$why" | tail -n 1)"
else
  TRITON_INTERPRET=1 FLASHTILE_TEST_BACKENDS=triton run_pytest -q "${files[@]}" || rc2=$?
  if [ -f tests/test_kvcache.py ]; then
    echo "== pass 2b: the Triton decode kernel (flash_attn_with_kvcache) under the interpreter =="
    TRITON_INTERPRET=1 FLASHTILE_BACKEND=triton run_pytest -q tests/test_kvcache.py || rc2=$?
  fi
fi
echo "scripts/test.sh: done in $((SECONDS - start)) s (pass 1 exit code $rc1, pass 2 exit code $rc2)"
if [ "$rc1" -ne 0 ]; then exit "$rc1"; fi
exit "$rc2"
