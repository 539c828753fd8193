"""The results fixture draws each migration's timeline and the terminal summary names it;
a drawing that fails is a warning line there, never a test failure."""

from __future__ import annotations

import json
import struct

import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[test]')")

TIMELINE_TESTS = """
import pytest
from pytest_katamaran.checks.ping import parse_ping_output

def ping_log():
    lines = ["PING 10.244.1.5 (10.244.1.5) 56(84) bytes of data."]
    for seq in range(1, 21):
        if seq in (16, 17):
            continue
        lines.append(f"[{99.0 + 0.1 * seq:.3f}] 64 bytes from 10.244.1.5: icmp_seq={seq} "
                     "ttl=63 time=10.0 ms")
    lines.append("20 packets transmitted, 18 received, 10% packet loss, time 1900ms")
    return "\\n".join(lines)

MIGRATION = {
    "source_node": "node-a", "dest_node": "node-b", "downtime_ms": 120,
    "events_source": {"tunnel switched": 100.4, "STOP": 100.5},
    "events_dest": {"RESUME (plug released)": 100.6},
    "converged_at": {"node-b": 101.0},
    "plug_released": "katamaran: VM resumed: released 3 held packet(s) in order",
}

def test_moved(results):
    results["migration"] = MIGRATION
    results["ping"] = parse_ping_output(ping_log(), 0.1)

def test_broken(results):
    results["migration"] = MIGRATION
    results["ping"] = parse_ping_output(ping_log(), 0.1)

def test_failed_after_moving(results):
    results["migration"] = MIGRATION
    results["ping"] = parse_ping_output(ping_log(), 0.1)
    assert False, "zero drop not proven"

def test_no_migration(results):
    results["ping"] = parse_ping_output(ping_log(), 0.1)
"""


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_timeline_tests(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_tl=TIMELINE_TESTS)
    out = pytester.path / "out"
    # A real fault, no mock: the picture's path is taken by a directory.
    (out / "test_tl.py_test_broken.timeline.png").mkdir(parents=True)
    return pytester.runpytest_subprocess("--results-dir=out", "-p", "no:cacheprovider", *args)


def check_summary(pytester: pytest.Pytester, result: pytest.RunResult) -> None:
    result.assert_outcomes(passed=3, failed=1)
    out = (pytester.path / "out").resolve()
    lines = result.stdout.lines
    start = next(i for i, ln in enumerate(lines) if ln.startswith("=") and " katamaran " in ln)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("="))
    summary = "\n".join(lines[start + 1 : end])
    moved = out / "test_tl.py_test_moved.timeline.png"
    failed = out / "test_tl.py_test_failed_after_moving.timeline.png"
    assert f"timeline: {moved}" in summary
    assert f"timeline: {failed}" in summary  # a failed test's picture matters most
    assert png_size(moved.read_bytes()) == (1200, 750)
    assert png_size(failed.read_bytes()) == (1200, 750)
    broken = out / "test_tl.py_test_broken.timeline.png"
    assert f"WARNING: no timeline for test_tl.py::test_broken: {broken}: IsADirectoryError" in (
        summary
    )
    assert not (out / "test_tl.py_test_no_migration.timeline.png").exists()
    assert "test_no_migration" not in summary
    assert len(summary.splitlines()) == 3, summary
    assert sorted(p.name for p in out.glob("*.tmp")) == []  # nothing half-written
    # the first reply after RESUME (100.6) is seq 18's at 100.8, sent 10 ms before: on time
    moved_json = json.loads((out / "test_tl.py_test_moved.json").read_text())
    assert moved_json["results"]["after_resume"] == {
        "first_reply_s": pytest.approx(0.2),
        "on_time_s": pytest.approx(0.2),
        "on_time_ms": 250.0,
    }
    alone = json.loads((out / "test_tl.py_test_no_migration.json").read_text())
    assert "after_resume" not in alone["results"]


def test_summary_names_pictures_and_warns_for_a_broken_one(pytester: pytest.Pytester):
    result = run_timeline_tests(pytester, "-p", "no:xdist")
    check_summary(pytester, result)


def test_pictures_reach_the_summary_from_xdist_workers(pytester: pytest.Pytester):
    pytest.importorskip("xdist", reason="pytest-xdist not installed")
    result = run_timeline_tests(pytester, "-n", "2")
    check_summary(pytester, result)
