"""The demo (`python -m pytest_katamaran.demo`) leaves its results and timeline picture.

Real run: netns nodes, TCG VM, both katamaran processes, node A's ping.  The host kernel
has no ipip/sch_plug, so pings around the switchover are lost: counted, not judged.  QEMU
7.2's TCG now and then panics the destination guest (README); the demo then exits 1 saying
so, and its results and picture must exist all the same.
"""

from __future__ import annotations

import json
import struct

import pytest

from pytest_katamaran import demo

pytestmark = pytest.mark.qemu


def test_demo_writes_results_and_timeline(guest, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[test]')")
    out = tmp_path / "results"
    rc = demo.main(["--results-dir", str(out), "--ping-interval", "0.02"])
    err = capsys.readouterr().err
    panicked = "destination guest kernel panicked" in err  # QEMU 7.2 under TCG (README)
    assert rc == 0 or panicked, err[-3000:]
    payload = json.loads((out / "demo.json").read_text())
    moved = payload["results"]["migration"]
    # a panic ends the destination QEMU (-no-reboot): its katamaran then exits 1 (gone)
    assert moved["source_rc"] == 0 and (moved["dest_rc"] == 0 or panicked), err[-3000:]
    assert moved["events_source"]["STOP"] is not None
    assert moved["events_dest"]["RESUME (plug released)"] is not None
    assert set(moved["converged_at"]) == {"node A", "node B"}
    ping = payload["results"]["ping"]
    assert ping["interval"] == 0.02 and ping["received"] >= 20
    picture = out / "demo.timeline.png"
    head = picture.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1200, 750)
    assert f"demo: timeline: {picture}" in err
    assert (out / "demo.ping1.txt").read_text().startswith("PING 10.244.1.5")
