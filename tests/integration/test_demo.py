"""The demo (`python -m pytest_katamaran.demo`) leaves its results and timeline picture.

Real run: netns nodes, TCG VM, both katamaran processes, node A's ping.  The host kernel
has no ipip/sch_plug, so pings around the switchover are lost: counted, not judged.  The
VM runs backports' QEMU, as by default: the system's 7.2 loses TCG guest stores during
migration and now and then panicked the destination guest.
"""

from __future__ import annotations

import json
import struct

import pytest

from pytest_katamaran import demo

pytestmark = pytest.mark.qemu


def test_demo_writes_results_and_timeline(guest, katamaran_config, workload_qemu, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[test]')")
    out = tmp_path / "results"
    choice = katamaran_config.workload_qemu  # backports unless --workload-qemu=system
    rc = demo.main(["--results-dir", str(out), "--ping-interval", "0.02", "--qemu", choice])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    payload = json.loads((out / "demo.json").read_text())
    # the QEMU the harness picked (the same cache, the same choice), recorded
    assert payload["katamaran"]["qemu"]["binary"] == workload_qemu.binary
    moved = payload["results"]["migration"]
    assert moved["source_rc"] == 0 and moved["dest_rc"] == 0, err[-3000:]
    assert moved["events_source"]["STOP"] is not None
    assert moved["events_dest"]["RESUME (plug released)"] is not None
    assert set(moved["converged_at"]) == {"node A", "node B"}
    ping = payload["results"]["ping"]
    assert ping["interval"] == 0.02 and ping["received"] >= 20
    # the VM answered on node B after RESUME (on this kernel the move loses a few pings)
    first = payload["results"]["after_resume"]["first_reply_s"]
    assert first is not None and first >= 0, payload["results"]["after_resume"]
    picture = out / "demo.timeline.png"
    head = picture.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1200, 750)
    assert f"demo: timeline: {picture}" in err
    assert (out / "demo.ping1.txt").read_text().startswith("PING 10.244.1.5")
