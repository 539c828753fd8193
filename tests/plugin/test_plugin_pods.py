"""kata_pod, migrate and ping: wiring, skip reasons, tuning options, cleanup on every path.

The nodes are the fake backend and the node agent is faked (tests/plugin/conftest.py):
what is checked is which steps and flags the fixtures send and that everything they
started is stopped after a pass, a failure or Ctrl-C.  The real flow is tests/e2e.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

START_POD = """
def test_pod(kata_pod, node_a):
    pod = kata_pod(node_a)
    print("POD", pod.ip, pod.node.name, pod.qmp_socket, pod.tap, pod.drive_id, pod.disk)
"""


def _steps(events) -> list[str]:
    return [ln for ln in events.read_text().splitlines() if ": nodeside " in ln]


def test_pod_fixtures_skip_without_nodes_naming_the_option(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        def test_pod(kata_pod):
            raise AssertionError("must not run")

        def test_move(migrate):
            raise AssertionError("must not run")
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*needs --nodes=qemu (the two-node QEMU lab); not given*"])


def test_kata_runtime_without_kata_skips_naming_the_binaries(pytester, fake_agent):
    if shutil.which("kata-runtime") or shutil.which("containerd-shim-kata-v2"):
        pytest.skip("this host has Kata: the skip cannot be shown here")
    pytester.makepyfile(START_POD)
    result = pytester.runpytest("--nodes=qemu", "--kata=runtime", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*--kata=runtime: node-a has none of kata-runtime, containerd-shim-kata-v2 on PATH*"]
    )
    assert not _steps(fake_agent), "nothing may be started on the node"


def test_kata_pod_starts_a_sandbox_and_stops_it(pytester, fake_agent):
    pytester.makepyfile(START_POD)
    result = pytester.runpytest("--nodes=qemu", "-s", "--writer-rate=7")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*POD 10.244.1.5 node-a /run/vc/vm/kmre2e/qmp.sock tap0_kata drive-virtio-disk0 "
            "/var/lib/katamaran/e2e/src.qcow2"
        ]
    )
    steps = _steps(fake_agent)
    assert steps[0].startswith("node-a: nodeside workload-start --pod-ip 10.244.1.5 ")
    assert "--writer --rate 7" in steps[0] and "--prefill" in steps[0]
    assert " --accel auto " in steps[0], steps[0]  # --pod-accel's default reaches the agent
    assert steps[-1] == "node-a: nodeside stop --purge"


def test_pod_of_a_failing_test_is_stopped(pytester, fake_agent):
    pytester.makepyfile(
        """
        def test_pod(kata_pod, node_a, node_b):
            kata_pod(node_a)
            kata_pod(node_b, ip="10.244.2.5")
            assert False, "the test fails after starting pods"
        """
    )
    result = pytester.runpytest("--nodes=qemu")
    result.assert_outcomes(failed=1)
    steps = _steps(fake_agent)
    assert "node-a: nodeside stop --purge" in steps
    assert "node-b: nodeside stop --purge" in steps
    assert fake_agent.read_text().splitlines()[-1] == "stop"  # nodes stopped after the pods


def test_keep_nodes_on_failure_keeps_the_pod(pytester, fake_agent):
    pytester.makepyfile("def test_pod(kata_pod, node_a):\n    kata_pod(node_a)\n    assert 0\n")
    result = pytester.runpytest("--nodes=qemu", "--keep-nodes-on-failure")
    result.assert_outcomes(failed=1)
    assert "node-a: nodeside stop --purge" not in _steps(fake_agent)


def test_pod_is_stopped_on_ctrl_c(pytester, fake_agent):
    pytester.makepyfile(
        """
        def test_pod(kata_pod, node_a):
            kata_pod(node_a)
            raise KeyboardInterrupt

        def test_never_runs():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--nodes=qemu", timeout=120)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "node-a: nodeside stop --purge" in _steps(fake_agent)
    assert fake_agent.read_text().splitlines()[-1] == "stop"


def test_pod_is_stopped_on_sigterm(pytester, fake_agent):
    """SIGTERM (CI cancelling a job) while the test runs: the pod is still stopped."""
    pytester.makepyfile(
        """
        import time
        from pathlib import Path

        def test_pod(kata_pod, node_a):
            kata_pod(node_a)
            Path("started").write_text("1")
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        # --accel=tcg: no KVM probe boot (20 s) before the pod starts on a loaded machine
        [sys.executable, "-m", "pytest", "--nodes=qemu", "--accel=tcg", "-p", "no:cacheprovider"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (pytester.path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "node-a: nodeside stop --purge" in _steps(fake_agent), out


def test_node_step_failure_carries_command_and_serial_tail(pytester, fake_agent, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "workload-start")
    pytester.makepyfile(START_POD)
    result = pytester.runpytest_subprocess("--nodes=qemu", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*NodeStepFailed: node-a: `env PYTHONPATH=* -m pytest_katamaran.agent.node "
            "--state-dir /run/katamaran-e2e workload-start *` failed: fake workload-start failure",
            "*serial log tail of node-a:*",
            "*node-a console line 99*",
        ]
    )
    assert "node-a: nodeside stop --purge" in _steps(fake_agent)


def test_unknown_pod_option_is_one_clear_line(pytester, fake_agent):
    pytester.makepyfile("def test_pod(kata_pod, node_a):\n    kata_pod(node_a, cpus=4)\n")
    result = pytester.runpytest("--nodes=qemu")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*PodError: node-a: unknown kata_pod option(s) cpus; known: ip*"])
    assert not any("workload-start" in s for s in _steps(fake_agent))


MIGRATE = """
from pytest_katamaran import KataPod, MigrationResult

def test_move(kata_pod, migrate, node_a, node_b):
    pod = kata_pod(node_a, ip="127.0.0.1")
    moved = migrate(pod, to=node_b, downtime_limit=50)
    assert isinstance(moved, MigrationResult)
    assert moved.ok, moved.explain()
    assert isinstance(moved.pod, KataPod) and moved.pod.node is node_b
    assert moved.pod.qmp_socket == "/run/vc/vm/kmre2e/qmp-dest.sock"
    assert (moved.total_s, moved.downtime_ms, moved.source_rc, moved.dest_rc) == (1.2, 30, 0, 0)
    assert "migration completed in" in moved.source_log
    assert "destination ready" in moved.dest_log
    assert moved.hold_end is not None
    writes = moved.pod.verify_writes()
    assert writes.ok and (writes.acked, writes.acked_before_move) == (20, 10), writes
"""


def test_migrate_runs_the_guide_flow_with_configured_holds(pytester, fake_agent):
    pytester.makeini("[pytest]\nkatamaran_tunnel_hold = 12\nkatamaran_tap_drain = 4\n")
    pytester.makepyfile(MIGRATE)
    result = pytester.runpytest("--nodes=qemu", "--converge-delay=0", "--ping-interval=0.05")
    result.assert_outcomes(passed=1)
    events = fake_agent.read_text()
    dest = re.search(r"^node-b: katamaran (.*)$", events, re.M).group(1)
    source = re.search(r"^node-a: katamaran (.*)$", events, re.M).group(1)
    assert dest.startswith("-mode dest -qmp /run/vc/vm/kmre2e/qmp-dest.sock -tap tap0_kata ")
    # dest hold = tunnel hold + 5; plug limit = 60 s of 98-byte pings at 50 ms, twice
    assert "-vm-ip 127.0.0.1 -source-ip 10.0.0.1 -tunnel-hold 12 -plug-limit 1048576" in dest
    assert "-shared-storage" not in dest + source
    assert source == (
        "-mode source -qmp /run/vc/vm/kmre2e/qmp.sock -dest-ip 10.0.0.2 -vm-ip 127.0.0.1 "
        "-tunnel-hold 12 -tap-drain-timeout 4 -downtime-limit 50"
    )
    steps = _steps(fake_agent)
    assert "node-b: nodeside peer-route --dst 127.0.0.0/24 --via 10.0.0.1" in steps
    assert any(s.startswith("node-b: nodeside dest-start --spec ") for s in steps)
    # the CNI's routes: recorded for `stop` before the migration, set with `ip` mid-hold
    assert (
        "node-a: nodeside converge --role source --pod-ip 127.0.0.1 --via 10.0.0.2 "
        "--tap tap0_kata --record-only"
    ) in steps
    assert (
        "node-b: nodeside converge --role dest --pod-ip 127.0.0.1 --tap tap0_kata --record-only"
    ) in steps
    routes = [ln for ln in events.splitlines() if ": ip route replace " in ln]
    assert sorted(routes) == [
        "node-a: ip route replace 127.0.0.1/32 via 10.0.0.2 && date +%s.%N",
        "node-b: ip route replace 127.0.0.1/32 dev tap0_kata scope link && date +%s.%N",
    ]
    assert events.index("node-a: katamaran -mode source") < events.index(routes[0])
    assert "node-b: nodeside diskcheck --which dest --acked 20" in steps
    assert steps[-2:] in (
        ["node-a: nodeside stop --purge", "node-b: nodeside stop --purge"],
        ["node-b: nodeside stop --purge", "node-a: nodeside stop --purge"],
    )


def test_failed_migration_reports_logs_consoles_and_tails(pytester, fake_agent, monkeypatch):
    monkeypatch.setenv("FAKE_KATAMARAN_FAIL", "dest")
    pytester.makepyfile(MIGRATE)
    result = pytester.runpytest_subprocess("--nodes=qemu", "--converge-delay=0", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*migration node-a -> node-b: katamaran exited source=0 dest=1*",
            "*--- katamaran dest (node-b) ---*",
            "*ERROR: fake katamaran failure*",
            "*--- dest VM console on node-b ---*",
            "*--- drop counters on node-a ---*",
            "*--- serial log tail of node-b ---*",
        ]
    )
    assert "node-b: nodeside stop --purge" in _steps(fake_agent)


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed")
def test_shared_storage_export_is_passed_and_stopped(pytester, fake_agent):
    pytester.makepyfile(
        """
        import os
        from pathlib import Path

        def test_move(kata_pod, migrate, node_a, node_b):
            pod = kata_pod(node_a, shared_storage=True, ip="127.0.0.1")
            assert pod.shared_storage and pod.disk == "/dev/nbd0"
            Path("nbd.pid").write_text(str(pod.export.proc.pid))
            assert pod.export.path.stat().st_size >= 64 << 20  # preallocated metadata
            migrate(pod, to=node_b)
            assert False, "fail after the move: the export must still go away"
        """
    )
    result = pytester.runpytest("--nodes=qemu", "--converge-delay=0")
    result.assert_outcomes(failed=1)
    pid = int((pytester.path / "nbd.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    events = fake_agent.read_text()
    assert re.search(
        r"^node-a: nodeside nbd-attach --host 10.0.2.2 --port \d+ --export shared$", events, re.M
    )
    assert re.search(r"^node-b: nodeside nbd-attach --host 10.0.2.2", events, re.M)
    assert re.search(r"^node-a: katamaran .* -shared-storage$", events, re.M)
    assert re.search(r"^node-b: katamaran .* -shared-storage$", events, re.M)
    assert "node-b: nodeside dest-start" in events and "--disk /dev/nbd0" in events


def test_migrate_to_the_same_node_is_refused(pytester, fake_agent):
    pytester.makepyfile(
        "def test_m(kata_pod, migrate, node_a):\n    migrate(kata_pod(node_a), to=node_a)\n"
    )
    result = pytester.runpytest("--nodes=qemu")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*PodError: node-a: pod 10.244.1.5 already runs on node-a*"])


# --------------------------------------------------------------------------- ping


def test_ping_leaves_from_the_node_cluster_address(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        from pytest_katamaran.checks.ping import LocalRunner

        class Node:
            name = "node-x"
            private_ip = "127.0.0.1"
            ssh = LocalRunner()

        def test_src(ping):
            mon = ping(Node(), "127.0.0.1", interval=0.05)
            assert "-I 127.0.0.1" in mon.command and "(127.0.0.1)" in mon.name
            mon.wait_replies(3, timeout=20)
            stats = mon.finish(catch_up_s=5, settle_s=0.1)
            assert stats.received >= 3 and not stats.lost

        def test_kernel_choice(ping):
            mon = ping(Node(), "127.0.0.1", interval=0.05, source="")
            assert "-I" not in mon.command
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)


def test_a_nested_tcg_pod_is_pinged_at_the_rate_it_was_probed_to_keep_up_with(
    pytester: pytest.Pytester,
):
    """Towards a pod under TCG without --ping-interval the ping fixture probes it first
    (pytest_katamaran.checks.pace; the pod here: this host's loopback, which keeps up),
    pings at --nested-tcg-ping-headroom times the interval kept up with (4 by default)
    and says so in the ping's notes; with --ping-interval it pings at that, unprobed.
    A pod under the node's KVM, or a TCG pod in KVM nodes, is pinged at --ping-interval,
    unprobed: only a guest translated twice is paced."""
    pytester.makepyfile(
        """
        import pytest
        from pytest_katamaran.checks.pace import with_headroom
        from pytest_katamaran.checks.ping import LocalRunner
        from pytest_katamaran.pod import KataPod
        from pytest_katamaran.qemu.accel import Accel

        class Node:
            name = "node-x"
            private_ip = "127.0.0.1"
            ssh = LocalRunner()

        @pytest.fixture(scope="session")
        def accelerator():  # the nodes': TCG, as on this machine
            return Accel("tcg", "forced for this test", "max")

        def test_paced(ping, katamaran_config):
            pod = KataPod(Node(), "127.0.0.1", "", "", "", "", side=None, spec={"accel": "tcg"})
            mon = ping(Node(), pod)
            stats = mon.finish(catch_up_s=5, settle_s=0.5)
            fastest = katamaran_config.pod_ping_interval("tcg", Accel("tcg", "", "max"))
            headroom = katamaran_config.tuning.nested_tcg_ping_headroom
            assert mon.interval == (fastest if katamaran_config.ping_interval_set else
                                    with_headroom(fastest, headroom))  # fmt: skip
            paced = [n for n in stats.notes if n.startswith("ping every")]
            print("NOTES", "|".join(paced) or "none", "SET", katamaran_config.ping_interval_set)
            assert stats.received > 0 and not stats.lost

        def test_kvm_pod_unpaced(ping, katamaran_config):
            pod = KataPod(Node(), "127.0.0.1", "", "", "", "", side=None, spec={"accel": "kvm"})
            mon = ping(Node(), pod)
            stats = mon.finish(catch_up_s=5, settle_s=0.5)
            assert mon.interval == katamaran_config.ping_interval
            assert not [n for n in stats.notes if n.startswith("ping every")], stats.notes

        def test_tcg_pod_in_kvm_nodes_unpaced(katamaran_config):
            kvm_nodes = Accel("kvm", "probed", "host")
            assert not katamaran_config.paces_pod_ping("tcg", kvm_nodes)
            assert katamaran_config.pod_ping_interval("tcg", kvm_nodes) == (
                katamaran_config.ping_interval)
        """
    )
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*NOTES ping every 50 ms, at least 4x the 10 ms it kept up with when idle (headroom "
         "for the migration's load) (kept up: 500 of 500, RTT p90 * ms) SET False"]
    )  # fmt: skip
    result = pytester.runpytest("-s", "--nested-tcg-ping-headroom=1")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*NOTES ping every 10 ms (kept up: 500 of 500, RTT p90 * ms) SET False"]
    )
    result = pytester.runpytest("-s", "--ping-interval=0.05")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*NOTES none SET True"])


# --------------------------------------------------------------------------- options


TUNING = (
    "tunnel-hold",
    "dest-hold",
    "converge-delay",
    "writer-rate",
    "tap-drain",
    "max-pause",
    "node-cpus",
    "nested-tcg-ping-interval",
    "nested-tcg-ping-headroom",
)

PRINT_TUNING = """
def test_show(katamaran_config):
    t = katamaran_config.tuning
    print(f"TUNING {t.tunnel_hold} {t.dest_hold_s} {t.converge_delay} {t.writer_rate} "
          f"{t.tap_drain} {t.max_pause} {t.node_cpus} {t.nested_tcg_ping_interval} "
          f"{t.nested_tcg_ping_headroom} "
          f"{katamaran_config.kata} {katamaran_config.workload_qemu}")
"""


def test_tuning_options_and_ini_keys_in_help(pytester: pytest.Pytester):
    out = pytester.runpytest("--help").stdout.str()
    for name in (*TUNING, "kata", "workload-qemu"):
        assert f"--{name}" in out, name
        assert f"katamaran_{name.replace('-', '_')}" in out, name


def test_tuning_defaults(pytester: pytest.Pytester):
    pytester.makepyfile(PRINT_TUNING)
    result = pytester.runpytest("-s")
    result.stdout.fnmatch_lines(["*TUNING 30.0 30.0 2.0 2 2.0 60.0 None 0.01 4.0 auto backports"])


def test_tuning_from_ini_and_command_line_wins(pytester: pytest.Pytester):
    pytester.makeini(
        "[pytest]\nkatamaran_tunnel_hold = 40\nkatamaran_writer_rate = 3\n"
        "katamaran_kata = sandbox\nkatamaran_max_pause = 9\nkatamaran_pod_accel = kvm\n"
    )
    pytester.makepyfile(PRINT_TUNING)
    result = pytester.runpytest(
        "-s", "--tunnel-hold=20", "--dest-hold=21", "--workload-qemu=system", "--node-cpus=2"
    )
    result.stdout.fnmatch_lines(["*TUNING 20.0 21.0 2.0 3 2.0 9.0 2 0.01 4.0 sandbox system"])
    result.stdout.fnmatch_lines(
        ["katamaran: kata=sandbox workload-qemu=system pod-accel=kvm tunnel-hold=20s*"]
    )
    result.stdout.fnmatch_lines(["katamaran: * max-pause=9s node-cpus=2 *"])
    result = pytester.runpytest("-s", "--pod-accel=tcg")
    result.stdout.fnmatch_lines(["katamaran: kata=sandbox workload-qemu=backports pod-accel=tcg *"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tunnel-hold=abc"], "--tunnel-hold (ini katamaran_tunnel_hold) must be a number*"),
        (["--writer-rate=2.5"], "--writer-rate (ini katamaran_writer_rate) must be a whole*"),
        (["--node-cpus=0"], "--node-cpus (ini katamaran_node_cpus) must be > 0, got 0"),
        (["--tap-drain=0"], "--tap-drain (ini katamaran_tap_drain) must be > 0, got 0"),
        (["--converge-delay=-1"], "--converge-delay (ini katamaran_converge_delay) must be >= 0*"),
        (["--tunnel-hold=3", "--converge-delay=5"], "converge delay (5 s) must be below the*"),
        (["--nested-tcg-ping-headroom=0.5"], "--nested-tcg-ping-headroom must be >= 1*"),
    ],
)
def test_bad_tuning_is_a_usage_error(pytester: pytest.Pytester, args, message):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*katamaran: {message}"])
    assert "Traceback" not in result.stderr.str()


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("katamaran_kata = gvisor", "unknown kata mode 'gvisor' (ini katamaran_kata)"),
        ("katamaran_pod_accel = hvf", "unknown pod accel 'hvf' (ini katamaran_pod_accel)"),
    ],
)
def test_bad_choice_in_ini_is_a_usage_error(pytester: pytest.Pytester, ini, message):
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_public_api(pytester: pytest.Pytester):
    import pytest_katamaran

    for name in ("assert_zero_drop", "verify_writes", "KataPod", "MigrationResult"):
        assert name in pytest_katamaran.__all__
        assert getattr(pytest_katamaran, name) is not None
    out = pytester.runpytest("--fixtures").stdout.str()
    for name in ("kata_pod", "migrate", "ping", "katamaran_pods", "guest_image"):
        assert re.search(rf"^{name}( \[session scope\])? -- .*fixtures\.py", out, re.M), name


def test_test_failing_after_a_migration_gets_its_evidence(pytester, fake_agent):
    """A zero-drop failure after an ok migration: the report carries the migration's
    logs, live consoles/counters and the ping placed against katamaran's events."""
    pytester.makepyfile(
        """
        def test_move(kata_pod, migrate, ping, node_a, node_b):
            pod = kata_pod(node_a, ip="127.0.0.1")
            pinger = ping(node_a, pod, interval=0.05, source="")
            pinger.wait_replies(3, timeout=20)
            assert migrate(pod, to=node_b).ok
            assert False, "a check after the move fails"
        """
    )
    result = pytester.runpytest("--nodes=qemu", "--converge-delay=0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*katamaran migration 1: node-a -> node-b*",
            "migration node-a -> node-b: ok",
            "--- ping ---",
            "*--- katamaran source (node-a) ---*",
            "*migration completed in 1.2 s*",
            "*--- dest VM console on node-b ---*",
            "*--- drop counters on node-b ---*",
        ]
    )


@pytest.mark.parametrize("mode", ["auto", "runtime"])
def test_node_with_kata_is_detected_and_skipped_as_not_implemented(
    pytester, fake_agent, monkeypatch, mode
):
    """A node with containerd-shim-kata-v2 on PATH: runtime is chosen, and since pods
    through containerd are not built, the skip says so (and how to get the sandbox)."""
    bindir = pytester.mkdir("kata-bin")
    shim = bindir / "containerd-shim-kata-v2"
    shim.write_text("#!/bin/sh\nexit 0\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    pytester.makepyfile(START_POD)
    result = pytester.runpytest_subprocess("--nodes=qemu", f"--kata={mode}", "-rs", timeout=120)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*node-a has containerd-shim-kata-v2: real Kata pods through containerd are not*"]
    )
    assert not _steps(fake_agent)


def test_kata_sandbox_mode_does_not_probe_the_node(pytester, fake_agent, monkeypatch):
    bindir = pytester.mkdir("kata-bin")
    (bindir / "kata-runtime").write_text("#!/bin/sh\n")
    (bindir / "kata-runtime").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    pytester.makepyfile(START_POD)
    result = pytester.runpytest_subprocess("--nodes=qemu", "--kata=sandbox", timeout=120)
    result.assert_outcomes(passed=1)


def test_the_harness_plug_limit_fits_the_tap_ring_a_6_1_kernel_takes():
    """At 1 ms the e2e's 60 s of pings wanted 11760000 bytes, a 196000-frame ring the
    nodes' kernel refuses (the destination then warned and the e2e failed with 0 lost)."""
    from katamaran.network import tap_frames_needed
    from pytest_katamaran.migration import TAP_RING_MAX, plug_limit

    assert plug_limit(60.0, 0.05) == 1 << 20  # the floor: katamaran's default
    assert plug_limit(60.0, 0.01) == 6000 * 98 * 2
    assert plug_limit(60.0, 0.001) == TAP_RING_MAX * 60
    assert tap_frames_needed(plug_limit(60.0, 0.001)) == TAP_RING_MAX == 32767
