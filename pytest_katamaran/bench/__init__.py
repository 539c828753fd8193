"""The benchmarks: commands that measure katamaran and write JSON (and pictures) to
`benchmarks/results/`; not part of the timed test run.

`python -m pytest_katamaran.bench` (or `testenv/bench.sh`): katamaran against the bare QMP
sequence, same VMs, same run, over a grid.  One job per module: `grid` (which points),
`observer` (what QEMU itself reports, seen from a second monitor), `flows` (the two ways to
migrate), `stats` (medians and spread), `plot` (the scaling curves), `cli` (the command).

`python -m pytest_katamaran.bench.ping_rate --interval S`: one migration with the real
cutover inside a Debian-kernel lab node under a ping at that interval (zero drop or not).
"""
