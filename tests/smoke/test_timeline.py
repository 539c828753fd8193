"""The timeline picture: the numbers it draws (send times, lost seqs, phase positions) from a
small synthetic ping log, the PNG it writes, and a redraw from the real e2e results."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from pytest_katamaran.agent.client import katamaran_events
from pytest_katamaran.checks.ping import parse_ping_output
from pytest_katamaran.errors import TimelineError
from pytest_katamaran.timeline import (
    DPI,
    HEIGHT_IN,
    ON_TIME_MS,
    WIDTH_IN,
    after_resume,
    after_resume_figures,
    build_timeline,
    draw,
    draw_results,
    phase_marks,
    redraw,
    send_times,
    timeline_path,
)

pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[test]')")

INTERVAL = 0.1
STOP = 100.5
LOST = (16, 17)
SLOW = {18: 200.0}  # seq -> RTT ms; every other answered seq took 10 ms


def sent(seq: int) -> float:
    """Seq 1 leaves at 99.0, one every 100 ms: seq 16 leaves exactly at STOP."""
    return round(99.0 + INTERVAL * (seq - 1), 6)


def ping_log(count: int = 20) -> str:
    """iputils `ping -D -O` output: seqs 16-17 unanswered, seq 18 slow, then a summary."""
    lines = ["PING 10.244.1.5 (10.244.1.5) from 10.0.0.1 : 56(84) bytes of data."]
    for seq in range(1, count + 1):
        if seq in LOST:
            lines.append(f"[{sent(seq) + INTERVAL:.6f}] no answer yet for icmp_seq={seq}")
            continue
        rtt = SLOW.get(seq, 10.0)
        lines.append(
            f"[{sent(seq) + rtt / 1000:.6f}] 64 bytes from 10.244.1.5: icmp_seq={seq} ttl=63 "
            f"time={rtt:g} ms"
        )
    received = count - len(LOST)
    lines += [
        "",
        "--- 10.244.1.5 ping statistics ---",
        f"{count} packets transmitted, {received} received, 10% packet loss, time 1900ms",
        "rtt min/avg/max/mdev = 10.000/20.556/200.000/44.777 ms",
    ]
    return "\n".join(lines) + "\n"


# katamaran's stamped lines as the node agent (and the demo's Rig) record them.
SOURCE_LOG = "\n".join(
    [
        "[99.500000] katamaran: storage synchronized (64.1 MiB)",
        "[100.300000] katamaran: tap0_kata's feed diverted to katamaran: frames still on their "
        "way to it follow the rest through the tunnel",
        "[100.400000] katamaran: switchover (0.4 MiB of RAM left): traffic for 10.244.1.5 "
        "into kmr-1",
        f"[{STOP:.6f}] katamaran: VM paused: traffic for 10.244.1.5 now goes through kmr-1",
        "[100.800000] katamaran: migration completed in 3.00 s (downtime 120 ms, RAM 10.0 MiB, "
        "storage 64.1 MiB)",
        "[100.810000] katamaran: holding tunnel kmr-1 for 30 s (CNI convergence)",
    ]
)
DEST_LOG = "\n".join(
    [
        "[90.000000] katamaran: destination ready: NBD on [::]:10809; waiting for the VM",
        "[100.600000] katamaran: VM resumed: released 3 held packet(s) in order",
        "[100.700000] katamaran: migration received in 11.00 s",
    ]
)


def migration() -> dict:
    """A MigrationResult.as_dict() in miniature, built by the same log parser the e2e uses."""
    events, dest_events = katamaran_events(SOURCE_LOG, DEST_LOG)
    return {
        "source_node": "node-a",
        "dest_node": "node-b",
        "downtime_ms": 120,
        "events_source": events,
        "events_dest": dest_events,
        "converged_at": {"node-b": 101.0, "node-a": 101.2},
        "plug_released": "katamaran: VM resumed: released 3 held packet(s) in order",
    }


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_events_name_every_phase_from_katamaran_lines():
    events, dest_events = katamaran_events(SOURCE_LOG, DEST_LOG)
    assert events["mirror ready"] == 99.5
    assert events["tunnel switched"] == 100.4
    assert events["feed diverted"] == 100.3
    assert events["STOP"] == STOP
    assert dest_events["RESUME (plug released)"] == 100.6
    no_tunnel, _ = katamaran_events(
        "[1.0] katamaran: switchover (0.4 MiB of RAM left): pausing the VM\n"
        "[1.1] katamaran: VM paused",
        "",
    )
    assert no_tunnel["tunnel switched"] is None  # nothing was switched: no mark
    kept, _ = katamaran_events(  # the feed diverted before the pause: switched at commit
        "[2.0] katamaran: VM paused: packets for 10.244.1.5 kept until migrate-continue "
        "(9 so far), then sent into kmr-1\n"
        "[2.1] katamaran: migrate-continue: point of no return (the source will not resume)\n"
        "[2.2] katamaran: migrate-continue sent: traffic for 10.244.1.5 now goes through "
        "kmr-1; the 12 packet(s) kept while the VM was paused went first",
        "",
    )
    assert (kept["STOP"], kept["tunnel switched"]) == (2.0, 2.2)
    assert no_tunnel["mirror ready"] is None  # shared storage: no mirror


def test_phase_marks_in_time_order_with_labels():
    marks = phase_marks(migration())
    assert [label for label, _ in marks] == [
        "mirror ready",
        "tap's feed diverted",
        "traffic switched",
        "STOP",
        "RESUME + plug released",
        "CNI converged (node-b)",
        "CNI converged (node-a)",
    ]
    assert [at for _, at in marks] == [99.5, 100.3, 100.4, STOP, 100.6, 101.0, 101.2]
    no_plug = {**migration(), "plug_released": None}
    assert "RESUME" in [label for label, _ in phase_marks(no_plug)]


def test_target_stamps_move_onto_the_source_clock():
    """node-b's clock 250 ms behind node-a's: its stamps move 250 ms later (RESUME from
    100.6 to 100.85); node-a's stay; the note says by how much and how sure."""
    from pytest_katamaran.timeline import clock_note

    behind = {**migration(), "dest_clock_offset_s": -0.25, "clock_uncertainty_s": 0.004}
    marks = dict(phase_marks(behind))
    assert marks["RESUME + plug released"] == pytest.approx(100.85)
    assert marks["CNI converged (node-b)"] == pytest.approx(101.25)
    assert marks["CNI converged (node-a)"] == 101.2  # the source node's own: unchanged
    assert marks["STOP"] == STOP
    assert "moved from node-b's by +250 ms" in clock_note(behind)
    assert "±4 ms" in clock_note(behind)
    assert "uncorrected" in clock_note(migration())


def test_clock_offset_keeps_the_shortest_round_trip():
    from pytest_katamaran.agent.client import best_offset

    # round trips 0.4, 0.02, 0.2 s; the node runs 0.5 s ahead
    readings = [(10.0, 10.5, 10.4), (20.0, 20.51, 20.02), (30.0, 31.0, 30.2)]
    offset, error = best_offset(readings)
    assert offset == pytest.approx(0.5) and error == pytest.approx(0.01)
    with pytest.raises(ValueError):
        best_offset([])


def test_clock_loop_answers_each_line_with_the_time():
    """The node-side loop, run here: one reading per line, from bash alone."""
    import subprocess
    import time

    from pytest_katamaran.agent.client import CLOCK_LOOP

    t0 = time.time()
    out = subprocess.run(CLOCK_LOOP, shell=True, input="\n\n", capture_output=True, text=True)
    readings = [float(line) for line in out.stdout.split()]
    assert len(readings) == 2 and t0 - 1 < readings[0] <= readings[1] < time.time() + 1


def test_send_times_and_lost_positions():
    stats = parse_ping_output(ping_log(), INTERVAL)
    assert stats.lost == list(LOST)
    assert stats.replies[18] == (pytest.approx(sent(18) + 0.2), 200.0)
    times = send_times(stats, INTERVAL)
    assert sorted(times) == list(range(1, 21))
    for seq in range(1, 21):  # answered: reply stamp - RTT; lost: between 15 and 18
        assert times[seq] == pytest.approx(sent(seq), abs=1e-6), seq


def test_build_timeline_positions_relative_to_stop():
    stats = parse_ping_output(ping_log(), INTERVAL)
    tl = build_timeline(stats, migration(), "t::case")
    assert tl.origin == STOP and tl.origin_label == "STOP"
    assert tl.lost_seqs == [16, 17]
    assert [t for _, t in tl.lost] == [pytest.approx(0.0, abs=1e-6), pytest.approx(0.1)]
    assert [(seq, round(t, 6)) for seq, t, _ in tl.answered][:2] == [(1, -1.5), (2, -1.4)]
    assert dict((s, r) for s, _, r in tl.answered)[18] == 200.0
    rel = dict(tl.phases)
    assert rel["mirror ready"] == pytest.approx(-1.0)
    assert rel["traffic switched"] == pytest.approx(-0.1)
    assert rel["STOP"] == 0.0
    assert rel["RESUME + plug released"] == pytest.approx(0.1)
    assert rel["CNI converged (node-a)"] == pytest.approx(0.7)
    assert "lost 2 of 20" in tl.title and "ping every 100 ms" in tl.title
    assert "downtime 120 ms" in tl.title and tl.title.startswith("t::case\n")
    assert tl.zoom is None  # a 2 s run needs no switchover panel


def test_long_run_gets_a_switchover_panel():
    stats = parse_ping_output(ping_log(count=400), INTERVAL)  # 40 s of ping
    tl = build_timeline(stats, migration(), "long")
    assert tl.zoom == (pytest.approx(-1.1), pytest.approx(2.1))


def test_draw_writes_a_png_of_the_expected_size(tmp_path):
    stats = parse_ping_output(ping_log(), INTERVAL)
    out = tmp_path / "sub" / "case.timeline.png"
    size = draw(build_timeline(stats, migration(), "t::case"), out)
    expected = (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
    assert size == expected and png_size(out) == expected
    assert [p.name for p in out.parent.iterdir()] == ["case.timeline.png"]  # no temp left


RESUME = 100.6  # DEST_LOG's "VM resumed" stamp


def cold_target_log(count: int = 60) -> str:
    """A target that answers nothing until 103.0 (2.4 s after RESUME), then its backlog
    (seqs 14-40, sent 100.3-102.9) one per ms, then every ping within 30 ms."""
    lines = ["PING 10.244.1.5 (10.244.1.5) from 10.0.0.1 : 56(84) bytes of data."]
    for seq in range(1, count + 1):
        if seq <= 13:
            received = sent(seq) + 0.010
        elif seq <= 40:
            received = 103.0 + 0.001 * (seq - 14)
        else:
            received = sent(seq) + 0.030
        rtt = (received - sent(seq)) * 1000
        lines.append(
            f"[{received:.6f}] 64 bytes from 10.244.1.5: icmp_seq={seq} ttl=63 time={rtt:.3f} ms"
        )
    return "\n".join(lines) + "\n"


def test_after_resume_first_reply_and_back_on_time():
    stats = parse_ping_output(cold_target_log(), INTERVAL)
    found = after_resume(stats, migration())
    assert found is not None and found.on_time_ms == ON_TIME_MS == 250.0
    # the first reply received after RESUME is seq 14's, at 103.0
    assert found.first_reply_s == pytest.approx(2.4)
    # seq 38 (sent 102.7, 324 ms) is still late; seq 39 (sent 102.8, 225 ms) is on time
    assert found.on_time_s == pytest.approx(103.025 - RESUME)
    assert found.describe() == (
        "first reply 2.4 s after RESUME, on time (RTT <= 250 ms) after 2.4 s"
    )
    stricter = after_resume(stats, migration(), on_time_ms=100.0)  # seq 41: 103.03
    assert stricter is not None and stricter.on_time_s == pytest.approx(103.03 - RESUME)
    title = build_timeline(stats, migration(), "t::cold").title
    assert title.splitlines()[2] == found.describe()


def test_after_resume_never_on_time_and_without_resume():
    backlog_only = parse_ping_output(cold_target_log(count=30), INTERVAL)  # seq 30: 1.5 s late
    found = after_resume(backlog_only, migration())
    assert found is not None and found.first_reply_s == pytest.approx(2.4)
    assert found.on_time_s is None and "on time (RTT <= 250 ms) after never" in found.describe()
    no_resume = {**migration(), "events_dest": {}}
    assert after_resume(backlog_only, no_resume) is None
    assert len(build_timeline(backlog_only, no_resume, "t").title.splitlines()) == 2


def test_after_resume_figures_for_the_results_json():
    stats = parse_ping_output(cold_target_log(), INTERVAL)

    class Moved:  # a MigrationResult stand-in: only as_dict() is used
        def as_dict(self) -> dict:
            return migration()

    figures = after_resume_figures({"migration": Moved(), "ping": stats})
    assert figures == {
        "first_reply_s": pytest.approx(2.4),
        "on_time_s": pytest.approx(2.425),
        "on_time_ms": 250.0,
    }
    assert after_resume_figures({"migration": migration(), "ping": stats.as_dict()}) is None
    assert after_resume_figures({"ping": stats}) is None
    broken = after_resume_figures({"migration": {"dest_clock_offset_s": "x"}, "ping": stats})
    assert broken is not None and broken["error"].startswith("ValueError")


def test_draw_results_needs_a_migration_and_per_packet_ping(tmp_path):
    stats = parse_ping_output(ping_log(), INTERVAL)
    out = tmp_path / "x.timeline.png"
    assert draw_results({"ping": stats}, "t", out) is None
    assert draw_results({"migration": migration(), "ping": stats.as_dict()}, "t", out) is None
    assert not out.exists()
    assert draw_results({"migration": migration(), "ping": stats}, "t", out) == out
    assert png_size(out)[0] == int(WIDTH_IN * DPI)
    quiet = parse_ping_output("PING 10.244.1.5 (10.244.1.5) 56(84) bytes of data.\n", INTERVAL)
    with pytest.raises(TimelineError, match="no timestamped replies"):
        draw_results({"migration": migration(), "ping": quiet}, "t", out)


def test_timeline_path_keeps_the_stem():
    json_path = Path("results/tests_e2e_x.py_test_a_nbd.json")
    assert timeline_path(json_path) == Path("results/tests_e2e_x.py_test_a_nbd.timeline.png")


# A real two-node e2e case (NBD, 50 ms ping, 2026-11-30), gzipped: JSON and its ping log.
E2E_DATA = Path(__file__).with_name("data")
E2E_CASE = "e2e-nbd"


def test_redraw_from_recorded_e2e_results(tmp_path):
    """A real e2e JSON and its ping log (written before mirror ready was recorded: the
    stamp comes from the katamaran log the JSON keeps)."""
    for suffix in (".json", ".ping1.txt"):
        packed = (E2E_DATA / f"{E2E_CASE}{suffix}.gz").read_bytes()
        (tmp_path / f"{E2E_CASE}{suffix}").write_bytes(gzip.decompress(packed))
    out = redraw(tmp_path / f"{E2E_CASE}.json")
    assert out == tmp_path / f"{E2E_CASE}.timeline.png"
    assert png_size(out) == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
    payload = json.loads((tmp_path / f"{E2E_CASE}.json").read_text())
    labels = [label for label, _ in phase_marks(payload["results"]["migration"])]
    assert labels[:4] == ["mirror ready", "traffic switched", "STOP", "RESUME + plug released"]
    stats = parse_ping_output((tmp_path / f"{E2E_CASE}.ping1.txt").read_text(), 0.05)
    found = after_resume(stats, payload["results"]["migration"])
    assert found is not None and found.first_reply_s is not None and found.on_time_s is not None
    assert 0 < found.first_reply_s <= found.on_time_s  # the cold target, in a real run


def test_redraw_without_ping_log_is_one_line_error(tmp_path, capsys):
    from pytest_katamaran.timeline import main

    (tmp_path / "a.json").write_text(json.dumps({"results": {"migration": migration()}}))
    assert main([str(tmp_path / "a.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ping log next to it (a.ping1.txt)" in err
