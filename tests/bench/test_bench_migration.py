"""Benchmark: katamaran against bare QMP (the LAB's hand-run sequence), same machine, same run.

Run with `python3 -m pytest tests/bench -s`. Nothing here asserts a speed (machines are
shared and noisy); it asserts both flows migrated and reports the ratios, also as JSON
under results/bench.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import pytest

from katamaran.qmp import Monitor, named
from pytest_katamaran.lab.local import Rig

pytestmark = pytest.mark.qemu
ROUNDS = 3


async def bare_qmp_migration(rig: Rig) -> dict[str, float]:
    """What an operator would type: NBD export, drive-mirror, migrate, cancel the mirror."""
    src, dst = Monitor(rig.src.qmp_path, 30), Monitor(rig.dst.qmp_path, 30)
    await src.connect()
    await dst.connect()
    try:
        started = time.monotonic()
        inet = {"type": "inet", "data": {"host": "::", "port": "10809"}}
        await dst.execute("nbd-server-start", {"addr": inet})
        block = (await dst.execute("query-block"))[0]["inserted"]
        await dst.execute(
            "blockdev-add",
            {
                "driver": block["drv"],
                "node-name": "bench-export",
                "file": {"driver": "file", "filename": block["file"], "locking": "off"},
            },
        )
        await dst.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": "e",
                "node-name": "bench-export",
                "name": "drive-virtio-disk0",
                "writable": True,
            },
        )
        await dst.execute("migrate-incoming", {"uri": "tcp:[::]:4444"})
        mark = src.mark()
        await src.execute(
            "drive-mirror",
            {
                "device": "drive-virtio-disk0",
                "job-id": "m",
                "sync": "full",
                "mode": "existing",
                "format": "raw",
                "target": "nbd:10.0.0.2:10809:exportname=drive-virtio-disk0",
            },
        )
        await src.wait_event(named("BLOCK_JOB_READY"), 300, mark)
        await src.execute(
            "migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": 1 << 62}
        )
        await src.execute("migrate", {"uri": "tcp:10.0.0.2:4444"})
        deadline = time.monotonic() + 120
        while (await src.execute("query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, "bare migration did not finish in 120 s"
            await asyncio.sleep(0.02)  # by hand one polls query-migrate
        await src.execute("block-job-cancel", {"device": "m"})
        info = await src.execute("query-migrate")
        assert info["status"] == "completed", info
        return {"total_s": time.monotonic() - started, "downtime_ms": info["downtime"]}
    finally:
        await src.close()
        await dst.close()


def katamaran_migration(rig: Rig) -> dict[str, float]:
    started = time.monotonic()
    dest = rig.start_dest("-tunnel-hold", "0")
    source = rig.start_source("10.0.0.2", "-tunnel-hold", "0")
    assert rig.finish(source) == 0 and rig.finish(dest) == 0, rig.log("source.log")
    total = time.monotonic() - started
    line = next(x for x in rig.log("source.log").splitlines() if "migration completed" in x)
    downtime = float(line.split("downtime ")[1].split(" ms")[0])
    return {"total_s": total, "downtime_ms": downtime}


def test_katamaran_vs_bare_qmp(guest, tmp_path):
    figures: dict[str, list[dict[str, float]]] = {"bare": [], "katamaran": []}
    for i in range(ROUNDS):
        for flow in ("bare", "katamaran"):
            rig = Rig(guest, tmp_path / f"{flow}{i}", disk_mib=512, fill_mib=256)
            rig.tmp.mkdir()
            try:
                rig.up()
                if flow == "bare":
                    result = asyncio.run(bare_qmp_migration(rig))
                else:
                    result = katamaran_migration(rig)
                figures[flow].append(result)
            finally:
                rig.down()
    summary = {
        flow: {key: statistics.median(r[key] for r in runs) for key in ("total_s", "downtime_ms")}
        for flow, runs in figures.items()
    }
    ratio = summary["katamaran"]["total_s"] / summary["bare"]["total_s"]
    report = {"rounds": figures, "median": summary, "total_time_ratio": ratio}
    out = Path("results")
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    print(f"\nbench: median {summary}; katamaran/bare total time = {ratio:.2f}")
    assert len(figures["bare"]) == len(figures["katamaran"]) == ROUNDS
