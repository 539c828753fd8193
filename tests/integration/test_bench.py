"""The benchmark command end to end at its smallest point: both flows really migrate.

`python -m pytest_katamaran.bench --quick` as a process: one 64 MiB-disk / 128 MiB-RAM
point, one round of the bare QMP sequence and one of katamaran, each on fresh VMs; the
JSON must hold the figures QEMU reported for both and the pictures must be written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.qemu


def test_quick_bench_migrates_with_both_flows_and_writes_json_and_png(guest, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "pytest_katamaran.bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    progress = [ln for ln in run.stderr.splitlines() if "point 1/1" in ln]
    assert [ln.split(" round 1/1 ")[1].split(":")[0] for ln in progress] == ["bare", "katamaran"]
    results = json.loads((out / "bench-quick.json").read_text())
    (point,) = results["points"]
    assert point["point"]["label"] == "disk64-ram128-idle-nbd"
    for flow in ("bare", "katamaran"):
        (row,) = point["runs"][flow]
        assert "error" not in row, row
        # QEMU's own account of a migration that happened: the mirror copied the whole
        # 64 MiB disk, RAM moved, the VM paused on the source and resumed on the destination.
        assert row["disk_bytes"] == 64 << 20, row
        assert row["ram_bytes"] > 1 << 20 and row["downtime_ms"] > 0, row
        assert 0 < row["stop_resume_ms"] < 10_000, row
        assert 0 < row["migration_s"] <= row["total_s"], row
        assert point["summary"][flow]["total_s"]["n"] == 1
    assert point["runs"]["katamaran"][0]["cpu_s"] > 0  # rusage of its two processes
    assert point["ratios"]["total_s"] > 0
    for name in ("total_vs_disk", "total_vs_ram", "downtime"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
        assert (out / f"{name}.svg").is_file()
