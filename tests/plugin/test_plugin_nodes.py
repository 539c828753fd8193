"""The nodes fixtures: exact skip reason, backend factory, always-stop, keep-on-failure, logs.

A fake backend (see conftest.FAKE_BACKEND_CONFTEST) stands in for QEMU: this is
the plugin's wiring, the VM path is covered by the integration tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pytest_katamaran.backend import BACKENDS, UnknownBackend, get_backend
from pytest_katamaran.plugin import SKIP_REASON
from pytest_katamaran.qemu.accel import (
    KERNEL_RAN,
    PROBE_TIMEOUT,
    AccelUnavailable,
    choose_accel,
    node_kernel_image,
    probe_kvm,
    watch_boot,
)

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


# --------------------------------------------------------------------------- the KVM probe


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _watch(tmp_path, script: str, timeout: float = 5.0) -> tuple[bool, str, int]:
    """watch_boot on a real shell standing in for QEMU; also returns the shell's PID."""
    console = tmp_path / "serial.log"
    pid_file = tmp_path / "pid"
    argv = ["sh", "-c", f"echo $$ > {pid_file}; {script}"]
    ok, reason = watch_boot(argv, console, KERNEL_RAN, timeout, "booted")
    return ok, reason, int(pid_file.read_text())


def test_watch_boot_marker_is_success_and_process_is_killed(tmp_path):
    console = tmp_path / "serial.log"
    ok, reason, pid = _watch(
        tmp_path,
        f"echo 'Kernel panic - not syncing: VFS: Unable to mount root fs' > {console}; "
        "exec sleep 60",
    )
    assert ok and reason.startswith("booted in ")
    assert _gone(pid)


def test_watch_boot_silent_vcpu_times_out_naming_stderr(tmp_path):
    ok, reason, pid = _watch(tmp_path, "echo 'RAX=0000 RBX=0000' >&2; exec sleep 60", 1.0)
    assert not ok
    assert reason == "not within 1s (no console output): RAX=0000 RBX=0000"
    assert _gone(pid)


def test_watch_boot_console_without_marker_times_out(tmp_path):
    console = tmp_path / "serial.log"
    ok, reason, _ = _watch(tmp_path, f"echo 'SeaBIOS' > {console}; exec sleep 60", 1.0)
    assert (ok, reason) == (False, "not within 1s (console: SeaBIOS)")


def test_watch_boot_early_exit_and_error_are_failures(tmp_path):
    ok, reason, _ = _watch(tmp_path, "echo 'failed to set MSR 0x10a' >&2; exit 134")
    assert not ok and reason.startswith("QEMU exited (rc=134) after ")
    assert reason.endswith(": failed to set MSR 0x10a")
    ok, reason, pid = _watch(tmp_path, "echo 'KVM internal error. Suberror: 1' >&2; exec sleep 60")
    assert not ok and reason.startswith("QEMU error after ")
    assert reason.endswith("KVM internal error. Suberror: 1")
    assert _gone(pid)


def test_probe_verdict_agrees_with_a_node_style_kernel_boot(tmp_path):
    """Real: the probe's verdict matches booting the nodes' kernel under KVM by hand.

    The hand boot is written out here (not kvm_kernel_argv) with the nodes' -M/-cpu/-smp,
    so a probe that passes where the nodes would fail (SeaBIOS-only, one vCPU) fails this.
    """
    ok, reason = probe_kvm()
    if reason.startswith(("qemu-system-x86_64 not found", "/dev/kvm:", "KVM unproven")):
        assert not ok
        pytest.skip(f"no KVM boot possible here: {reason}")
    kernel = node_kernel_image()
    console = tmp_path / "serial.log"
    argv = [
        "qemu-system-x86_64", "-M", "pc", "-accel", "kvm", "-cpu", "host", "-smp", "2",
        "-m", "256", "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}", "-kernel", str(kernel),
        "-append", "console=ttyS0 panic=-1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + PROBE_TIMEOUT
    booted = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if console.exists() and b"Linux version" in console.read_bytes():
                booted = True
                break
            time.sleep(0.1)
        booted = booted or (console.exists() and b"Linux version" in console.read_bytes())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ok == booted, f"probe said {ok} ({reason}) but a node-style KVM boot printed: {booted}"
    if not ok:
        assert reason.startswith("the Debian kernel did not boot under KVM (-cpu host, -smp 2): ")
        assert choose_accel().note == f"katamaran: KVM unusable ({reason}); using TCG"
        with pytest.raises(AccelUnavailable, match="KVM is unusable: the Debian kernel did not"):
            choose_accel("kvm")
