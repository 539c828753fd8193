"""katamaran.failpoint: inert unless armed; armed, the process stops itself until SIGCONT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from katamaran import failpoint
from pytest_katamaran.agent.node import process_state
from pytest_katamaran.lab.local import wait_stopped

CHILD = (
    "import sys; from katamaran import failpoint; "
    "failpoint.hit('gate-held', lambda m: print(m, file=sys.stderr, flush=True)); "
    "print('went on')"
)


def test_armed_reads_the_comma_separated_list(monkeypatch):
    monkeypatch.setenv(failpoint.ENV, "other,gate-held")
    assert failpoint.armed("gate-held")
    monkeypatch.setenv(failpoint.ENV, "gate-held-not")
    assert not failpoint.armed("gate-held")
    monkeypatch.delenv(failpoint.ENV)
    assert not failpoint.armed("gate-held")


def test_unknown_point_is_a_programming_error():
    with pytest.raises(AssertionError):
        failpoint.hit("no-such-point", print)


def run_child(armed: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != failpoint.ENV}
    if armed is not None:
        env[failpoint.ENV] = armed
    return subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_unarmed_goes_on_without_a_word():
    out, err = run_child(None).communicate(timeout=60)
    assert out == "went on\n" and "failpoint" not in err


def test_armed_stops_until_sigcont_and_a_pending_signal_then_lands():
    child = run_child("gate-held")
    try:
        wait_stopped(child, 60)
        assert process_state(child.pid) == "T" and child.poll() is None
        child.send_signal(signal.SIGTERM)  # pending while stopped, as the fault tests do
        assert process_state(child.pid) == "T"
        child.send_signal(signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "failpoint gate-held: stopped (SIGSTOP) until SIGCONT" in err
    assert child.returncode == -signal.SIGTERM and out == ""  # the signal won, not `went on`
