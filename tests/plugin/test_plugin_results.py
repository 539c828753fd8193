"""The results fixture (one JSON per test, with outcome) and the ping fixture's wiring."""

from __future__ import annotations

import json

import pytest

from pytest_katamaran.checks.ping import PING_RCVBUF

RESULT_TESTS = """
import pytest
from pytest_katamaran.checks.ping import parse_ping_output

def test_pass(results):
    results["downtime_ms"] = 12.5
    results["ping"] = parse_ping_output(
        "[1.000000] 64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.3 ms"
    )

def test_fail(results):
    results["phase"] = "cutover"
    assert 1 == 2, "cutover lost packets"

def test_skip(results):
    pytest.skip("not today")

@pytest.mark.parametrize("size", ["1 GiB/idle"])
def test_param(results, size):
    results["size"] = size
"""


def test_results_fixture_writes_json(pytester: pytest.Pytester):
    pytester.makepyfile(test_res=RESULT_TESTS)
    result = pytester.runpytest("--results-dir=out")
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    out = pytester.path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "test_res.py_test_fail.json",
        "test_res.py_test_param_1_GiB_idle.json",
        "test_res.py_test_pass.json",
        "test_res.py_test_skip.json",
    ]
    passed = json.loads((out / "test_res.py_test_pass.json").read_text())
    assert passed["nodeid"] == "test_res.py::test_pass"
    assert passed["outcome"] == "passed" and passed["failure"] is None
    assert passed["duration_s"] >= 0
    assert passed["results"]["downtime_ms"] == 12.5
    assert passed["results"]["ping"]["sent"] == 1 and passed["results"]["ping"]["lost"] == []

    failed = json.loads((out / "test_res.py_test_fail.json").read_text())
    assert failed["outcome"] == "failed"
    assert failed["results"] == {"phase": "cutover"}
    assert "cutover lost packets" in failed["failure"]

    skipped = json.loads((out / "test_res.py_test_skip.json").read_text())
    assert skipped["outcome"] == "skipped"

    param = json.loads((out / "test_res.py_test_param_1_GiB_idle.json").read_text())
    assert param["nodeid"] == "test_res.py::test_param[1 GiB/idle]"
    assert param["results"]["size"] == "1 GiB/idle"


def test_results_default_dir_is_under_rootdir(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\n")
    sub = pytester.mkdir("sub")
    sub.joinpath("test_r.py").write_text("def test_a(results):\n    results['x'] = 1\n")
    result = pytester.runpytest("sub")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "results" / "sub_test_r.py_test_a.json").exists()


PING_TESTS = """
import os, time
import pytest
from pytest_katamaran.checks.ping import LocalRunner, PingMonitor, assert_zero_drop

class FakeNode:
    name = "fake"
    ssh = LocalRunner()

PIDS = []

def test_ping_zero_drop(ping, results):
    mon = ping(FakeNode(), "127.0.0.1")
    assert isinstance(mon, PingMonitor) and mon.running
    assert mon.interval == 0.02  # from --ping-interval
    time.sleep(0.6)
    stats = mon.stop()
    results["ping"] = stats
    assert_zero_drop(stats)
    assert stats.sent > 5

def test_ping_left_running_is_stopped_at_teardown(ping):
    mon = ping(FakeNode(), "127.0.0.1", interval=0.05)
    PIDS.append(mon.handle.pid)
    time.sleep(0.3)

def test_previous_ping_is_gone():
    time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(PIDS[0], 0)

def test_local_ping_when_node_is_none(ping):
    mon = ping(None, "127.0.0.1", interval=0.05)
    time.sleep(0.3)
    assert mon.stop().received > 0
"""


def test_ping_fixture_wiring(pytester: pytest.Pytester):
    pytester.makepyfile(test_pings=PING_TESTS)
    result = pytester.runpytest_subprocess("--ping-interval=0.02", "-p", "no:randomly", timeout=120)
    result.assert_outcomes(passed=4)
    data = json.loads(
        (pytester.path / "results" / "test_pings.py_test_ping_zero_drop.json").read_text()
    )
    assert data["results"]["ping"]["lost"] == [] and data["results"]["ping"]["sent"] > 5
    # the interval the test's ping really used, and how much of it was answered
    assert data["katamaran"]["ping_intervals_used"] == [0.02]
    # its socket's receive buffer, widened beside it (the kernel doubles what is set)
    assert data["katamaran"]["ping_rcvbufs"] == [2 * PING_RCVBUF]
    assert data["results"]["ping"]["answer_rate"] > 0.5
    raw = pytester.path / "results" / "test_pings.py_test_ping_zero_drop.ping1.txt"
    assert "bytes from 127.0.0.1" in raw.read_text()


def test_ping_that_cannot_start_fails_clearly(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        from pytest_katamaran.checks.ping import LocalRunner

        class FakeNode:
            name = "fake"
            ssh = LocalRunner()

        def test_bad(ping):
            ping(FakeNode(), "not-an-ip..invalid")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: ping not-an-ip..invalid from fake: `ping -D -O*"])
