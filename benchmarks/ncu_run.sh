#!/usr/bin/env bash
# Nsight Compute reports of single attention calls (benchmarks/ncu_case.py), ours against cuDNN's.
#
#     OUT=/tmp/ncu bash benchmarks/ncu_run.sh bwd128:ours bwd128:cudnn fp8_128:ours ...
#
# NCU_CASE_ARGS: more arguments of ncu_case.py (e.g. "--bwd-set stat_ring=1,fold=1").
# Per case: the .ncu-rep (``--set full``, clocks left alone), its details page as text, the raw
# metrics as CSV and, for our kernels, the SASS source page with the sampled stall reasons per
# instruction (CSV). Printed: the lines of every kernel's details page that matter for a
# compute-bound kernel (duration, throughputs, issue, pipes, stalls), so the call's reply has them.
set -u
OUT=${OUT:-/tmp/ncu}
WORK=${WORK:-/tmp/ncu_work}  # reports and pages; what comes back is one archive of the text files
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
NCU=${NCU:-ncu}
command -v "$NCU" >/dev/null || NCU=$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
"$NCU" --version | tail -1
KEYS='Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Issued Ipc Active|Executed Ipc A|No Eligible|Active Warps Per Scheduler|Eligible Warps|Registers Per Thread|Shared Memory Configuration Size|Dynamic Shared|Achieved Occupancy|Warp Cycles Per Issued|Bank Conflicts|L1/TEX Hit|L2 Hit|DRAM Throughput|Pipe|stall|Stall'
for spec in "$@"; do
  case_=${spec%%:*}; who=${spec##*:}
  rep="$WORK/${case_}_${who}"
  echo "=== $case_ $who"
  timeout 300 "$NCU" --profile-from-start off --clock-control none --set full --import-source no -f -o "$rep" \
    python3 benchmarks/ncu_case.py --case "$case_" --who "$who" ${NCU_CASE_ARGS:-} > "$rep.log" 2>&1 || { echo "ncu failed:"; tail -5 "$rep.log"; continue; }
  "$NCU" -i "$rep.ncu-rep" --page details --print-units base > "$rep.details.txt" 2>&1
  "$NCU" -i "$rep.ncu-rep" --page raw --csv > "$rep.raw.csv" 2>&1
  if [[ $who == ours ]]; then
    "$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv" 2>&1 || echo "(no source page)"
  fi
  grep -E "^  [^ ]|$KEYS" "$rep.details.txt" | grep -v -E '^\s+-{3,}' | head -400 > "$rep.summary.txt"
  # the largest kernel's block only (by duration), printed, and its stall reasons and pipes from the raw page
  python3 - "$rep.details.txt" "$rep.raw.csv" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.split(r"\n(?=  \S.*\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\))", text)
def dur(b):
    m = re.search(r"Duration\s+\S+\s+([\d,.]+)", b)
    return float(m.group(1).replace(",", "")) if m else 0.0
best = max(blocks, key=dur)
keep = re.compile(r"Duration|Throughput|Issue|Ipc|Eligible|Warps Per|Registers|Shared Memory|Occupancy|Warp Cycles|Conflict|Hit|Pipe|[Ss]tall|Inst|Block Size|Grid Size")
print(best.splitlines()[0][:160])
for line in best.splitlines()[1:]:
    if keep.search(line) and not line.strip().startswith("---"):
        print(line.rstrip()[:150])
import csv
try:
    rows = list(csv.reader(open(sys.argv[2])))
    head, data = rows[0], rows[2:]
    col = {n: i for i, n in enumerate(head)}
    dcol = col.get("gpu__time_duration.sum")
    def num(x):
        try:
            return float(x.replace(",", ""))
        except ValueError:
            return None
    main = max(data, key=lambda r: num(r[dcol]) or 0.0) if dcol is not None else data[0]
    print("kernel:", main[col.get("Kernel Name", 0)][:100])
    stalls = [(n, num(main[i])) for n, i in col.items()
              if re.search(r"average_warps_issue_stalled_.*_per_issue_active\.ratio$", n) and num(main[i])]
    stalls.sort(key=lambda t: -t[1])
    print("stalls (warps per issue):", "; ".join(f"{n.split('stalled_')[1].split('_per')[0]} {v:.2f}" for n, v in stalls[:12]))
    pipes = [(n, num(main[i])) for n, i in col.items()
             if re.search(r"pipe_.*(cycles_active|inst_executed).*pct_of_peak_sustained_active$", n) and num(main[i])]
    pipes.sort(key=lambda t: -t[1])
    print("pipes (% of peak, active):", "; ".join(f"{n.replace('sm__', '').replace('.avg.pct_of_peak_sustained_active', '')} {v:.1f}" for n, v in pipes[:12]))
except Exception as e:  # the printed summary is a convenience; the files hold everything
    print("raw page not parsed:", type(e).__name__, e)
PY
done
tar czf "$OUT/ncu_pages.tgz" -C "$WORK" --exclude='*.ncu-rep' . && ls -la "$OUT" "$WORK"
