"""The benchmark: katamaran against the bare QMP sequence, same VMs, same run, over a grid.

`python -m pytest_katamaran.bench` (or `testenv/bench.sh`) writes JSON and pictures to
`benchmarks/results/`.  One job per module: `grid` (which points), `observer` (what
QEMU itself reports, seen from a second monitor), `flows` (the two ways to migrate),
`stats` (medians and spread), `plot` (the scaling curves), `cli` (the command).
"""
