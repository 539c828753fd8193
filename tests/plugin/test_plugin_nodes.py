"""The nodes fixtures: exact skip reason, backend factory, always-stop, keep-on-failure, logs.

A fake backend (see conftest.FAKE_BACKEND_CONFTEST) stands in for QEMU: this is
the plugin's wiring, the VM path is covered by the integration tests.
"""

from __future__ import annotations

import pytest

from pytest_katamaran.accel import probe_kvm
from pytest_katamaran.backend import BACKENDS, UnknownBackend, get_backend
from pytest_katamaran.plugin import SKIP_REASON

TIMEOUT = 120

NODE_TESTS = """
import pytest

@pytest.mark.nodes
def test_marked():
    pass

def test_uses_nodes(nodes):
    pass

def test_uses_node_a(node_a):
    pass

def test_plain():
    pass
"""

TWO_NODE_TESTS = """
def test_one(nodes, node_a, node_b):
    assert node_a is nodes.node_a and node_b is nodes.node_b
    assert (node_a.private_ip, node_b.private_ip) == ("10.0.0.1", "10.0.0.2")

def test_two(node_a):
    assert node_a.name == "node-a"
"""


def _events(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_skip_reason_is_exact_without_nodes(pytester: pytest.Pytester):
    assert SKIP_REASON == "needs --nodes=qemu (the two-node QEMU lab); not given"
    pytester.makepyfile(NODE_TESTS)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=3)
    skipped = [ln for ln in result.stdout.lines if ln.startswith("SKIPPED [")]
    assert skipped and all(ln.endswith(f": {SKIP_REASON}") for ln in skipped), skipped
    assert sum(int(ln.split("[")[1].split("]")[0]) for ln in skipped) == 3


def test_skip_when_nodes_requested_dynamically(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        def test_dynamic(request):
            request.getfixturevalue("nodes")
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"*{SKIP_REASON}"])


def test_backend_started_once_and_stopped(pytester: pytest.Pytester, fake_backend):
    pytester.makepyfile(TWO_NODE_TESTS)
    result = pytester.runpytest_subprocess("--nodes=qemu", "--accel=tcg", timeout=TIMEOUT)
    result.assert_outcomes(passed=2)
    assert _events(fake_backend) == ["init", "accel=tcg", "image=debian", "start", "stop"]


def test_failure_appends_serial_log_tails(pytester: pytest.Pytester, fake_backend):
    pytester.makepyfile(
        """
        def test_breaks(node_a):
            assert False, "migration broke"
        """
    )
    result = pytester.runpytest_subprocess("--nodes=qemu", "--accel=tcg", timeout=TIMEOUT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*katamaran serial log node-a (last 60 lines of *node-a.serial.log)*",
            "node-a console line 99",
            "*katamaran serial log node-b*",
            "node-b console line 99",
        ]
    )
    assert "console line 39\n" not in result.stdout.str()  # only the tail
    assert _events(fake_backend)[-1] == "stop"


def test_start_failure_stops_and_shows_consoles(
    pytester: pytest.Pytester, fake_backend, monkeypatch
):
    monkeypatch.setenv("FAKE_START_FAIL", "1")
    pytester.makepyfile(TWO_NODE_TESTS)
    result = pytester.runpytest_subprocess("--nodes=qemu", "--accel=tcg", timeout=TIMEOUT)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*RuntimeError: fake boot failed*"])
    result.stdout.fnmatch_lines(["*katamaran serial log node-a*", "node-a console line 99"])
    assert _events(fake_backend).count("stop") == 1


def test_keep_nodes_on_failure(pytester: pytest.Pytester, fake_backend):
    pytester.makepyfile(
        """
        def test_ok(nodes):
            pass

        def test_breaks(node_b):
            assert False
        """
    )
    result = pytester.runpytest_subprocess(
        "--nodes=qemu", "--accel=tcg", "--keep-nodes-on-failure", timeout=TIMEOUT
    )
    result.assert_outcomes(passed=1, failed=1)
    assert "stop" not in _events(fake_backend)
    result.stdout.fnmatch_lines(
        [
            "*katamaran: --keep-nodes-on-failure: nodes left running after failure of "
            "*test_breaks*",
            "*node-a (10.0.0.1): ssh -p 2222 root@127.0.0.1  serial log: *node-a.serial.log",
            "*node-b (10.0.0.2): ssh -p 2223 root@127.0.0.1  serial log: *",
        ]
    )


def test_keep_flag_without_failure_still_stops(pytester: pytest.Pytester, fake_backend):
    pytester.makepyfile(TWO_NODE_TESTS)
    result = pytester.runpytest_subprocess(
        "--nodes=qemu", "--accel=tcg", "--keep-nodes-on-failure", timeout=TIMEOUT
    )
    result.assert_outcomes(passed=2)
    assert _events(fake_backend)[-1] == "stop"


def test_ctrl_c_still_stops_nodes_even_with_keep(pytester: pytest.Pytester, fake_backend):
    pytester.makepyfile(
        """
        def test_breaks(nodes):
            assert False

        def test_interrupted(nodes):
            raise KeyboardInterrupt
        """
    )
    result = pytester.runpytest_subprocess(
        "--nodes=qemu", "--accel=tcg", "--keep-nodes-on-failure", timeout=TIMEOUT
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert _events(fake_backend)[-1] == "stop"


def test_sigterm_still_stops_nodes(pytester: pytest.Pytester, fake_backend):
    pytester.makepyfile(
        """
        import os, signal

        def test_killed(nodes):
            os.kill(os.getpid(), signal.SIGTERM)
        """
    )
    result = pytester.runpytest_subprocess("--nodes=qemu", "--accel=tcg", timeout=TIMEOUT)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert _events(fake_backend)[-1] == "stop"


def test_auto_accel_probe_note(pytester: pytest.Pytester, fake_backend):
    """auto really probes KVM; on a machine where it is broken the TCG fallback is announced."""
    ok, reason = probe_kvm()
    pytester.makepyfile(
        """
        def test_accel(nodes, accelerator, katamaran_config):
            print("ACCEL", accelerator.name)
        """
    )
    result = pytester.runpytest_subprocess("-s", "--nodes=qemu", timeout=TIMEOUT)
    result.assert_outcomes(passed=1)
    if ok:
        result.stdout.fnmatch_lines(["*ACCEL kvm"])
    else:
        result.stdout.fnmatch_lines(["*ACCEL tcg", "*katamaran: KVM unusable (*); using TCG"])
        assert "init accel=tcg" in fake_backend.read_text()


def test_explicit_kvm_when_unusable_is_a_usage_error(pytester: pytest.Pytester, fake_backend):
    ok, _ = probe_kvm()
    if ok:
        pytest.skip("KVM works on this machine")
    pytester.makepyfile("def test_x(nodes): pass")
    result = pytester.runpytest_subprocess("--nodes=qemu", "--accel=kvm", timeout=TIMEOUT)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--accel=kvm was requested but KVM is unusable: *"])
    assert not fake_backend.exists()


def test_get_backend_unknown_name():
    assert BACKENDS == ("qemu",)
    with pytest.raises(
        UnknownBackend, match="unknown katamaran node backend 'vbox'; available: qemu"
    ):
        get_backend("vbox", None)
