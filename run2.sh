export PYTHONPATH=src
timeout 200 python benchmarks/fp8_run.py --quick --variant lazy_max=1 2>&1 | grep -v "^\[.*PASS \[default\]" | tail -30
timeout 280 python benchmarks/hopper_bwd_run.py --quick --full-bench --where causal=1 --rounds 5 --variant stat_ring=1,fold=1 2>&1 | tail -16
timeout 100 python -m pytest -x -q tests/test_hopper_bwd.py 2>&1 | tail -3
ls $OUT
