"""Pure logic of the source's safety pieces: the per-VM lock, Progress on a broken
stream, phases, the new flag.  The behaviour against real QEMU is in
tests/integration/test_faults.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from katamaran import cli
from katamaran.errors import KatamaranError, OutcomeUncertain, UsageError
from katamaran.lock import VMLock, lock_file, qemu_identity, unlock_file
from katamaran.progress import Progress
from katamaran.source import Phase
from pytest_katamaran.lab.local import blocked_in_flock


def test_second_lock_on_the_same_socket_is_refused_with_the_holder_pid(tmp_path):
    sock = tmp_path / "qmp.sock"
    with VMLock(sock, [tmp_path / "locks"]):
        with pytest.raises(KatamaranError) as refused:
            VMLock(sock, [tmp_path / "locks"]).acquire()
    assert str(refused.value) == (
        f"another katamaran (pid {os.getpid()}) is already migrating the VM at {sock}"
    )
    with VMLock(sock, [tmp_path / "locks"]):  # released: free again
        pass
    assert list((tmp_path / "locks").iterdir()) == []  # and nothing left behind


def test_a_waiter_on_a_released_lock_file_locks_the_new_file_not_the_orphan(tmp_path):
    """The holder unlinks its file on release; one who waited on the old inode retries."""
    path = tmp_path / "dev.lock"
    held = lock_file(path, wait=False)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(lock_file(path, wait=True)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not blocked_in_flock(path):  # the waiter is in flock on the file about to go
        assert time.monotonic() < deadline, "the waiter never blocked on the lock"
        time.sleep(0.01)
    unlock_file(path, held)
    waiter.join(10)
    assert got, "the waiter never got the lock"
    assert os.fstat(got[0]).st_ino == path.stat().st_ino  # the file at the path, locked
    with pytest.raises(BlockingIOError):
        lock_file(path, wait=False)
    unlock_file(path, got[0])
    assert not path.exists()


def test_lock_is_per_resolved_path_and_held_across_processes(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    dirs = [tmp_path / "locks"]
    with VMLock(tmp_path / "link" / "qmp.sock", dirs):
        probe = (
            "import sys; from pathlib import Path; from katamaran.lock import VMLock\n"
            "try:\n"
            f"    VMLock(Path({str(tmp_path / 'real' / 'qmp.sock')!r}), [Path({str(dirs[0])!r})])"
            ".acquire()\n"
            "except Exception as err:\n"
            "    print(err); sys.exit(1)\n"
        )
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert other.returncode == 1, other.stdout + other.stderr
        assert f"(pid {os.getpid()})" in other.stdout
        assert VMLock(tmp_path / "other.sock", dirs).acquire() is None  # another VM: fine


def test_lock_falls_back_when_the_first_directory_is_unusable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    lock = VMLock(tmp_path / "qmp.sock", [blocker / "sub", tmp_path / "fallback"])
    with lock:
        assert lock.path is not None and lock.path.parent == tmp_path / "fallback"


def test_saved_settings_survive_until_cleared(tmp_path):
    lock = VMLock(tmp_path / "qmp.sock", [tmp_path])
    with lock:
        assert lock.load_state() is None
        lock.save_state({"parameters": {"downtime-limit": 300}, "was_running": True})
        assert VMLock(tmp_path / "qmp.sock", [tmp_path]).key == lock.key
        assert lock.load_state() == {"parameters": {"downtime-limit": 300}, "was_running": True}
        lock.clear_state()
        assert lock.load_state() is None


class _Dropped(io.StringIO):
    """stderr of a dropped ssh session: every write fails."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_progress_never_raises_on_a_broken_stream():
    progress = Progress(_Dropped())
    progress.step("a step")
    progress.warn("a warning")
    progress.update("12%")
    assert progress.broken


def test_progress_still_writes_to_a_working_stream():
    out = io.StringIO()
    Progress(out).warn("x")
    assert out.getvalue() == "katamaran: WARNING: x\n"


def test_phases_after_migrate_continue_are_committed():
    committed = {phase for phase in Phase if phase.committed}
    assert committed == {Phase.COMMITTED, Phase.COMPLETED, Phase.HOLD}
    assert Phase.RAM.value == "during RAM copy"


def test_signals_cancel_until_the_switch_then_let_the_switchover_finish_once():
    """Before the paused VM's traffic is switched a signal cancels; once switched the
    first lets the migration finish (the destination's plug holds packets a cancel would
    drop), the second cancels; after migrate-continue none does."""
    from katamaran.config import Config
    from katamaran.source import SourceMigration

    out = io.StringIO()
    source = SourceMigration(Config(mode="source"), None, Progress(out))  # type: ignore[arg-type]
    source.phase = Phase.RAM
    assert source.on_signal("SIGTERM") is True and out.getvalue() == ""
    assert source.where == "during RAM copy"
    # The switch comes at STOP, before QEMU confirms the pause: the phase is still RAM.
    source.switched = True
    assert source.where.startswith("at the switchover (VM paused")
    assert source.on_signal("SIGHUP") is False
    assert "SIGHUP: the VM's traffic already goes to the destination" in out.getvalue()
    assert "signal again to cancel anyway" in out.getvalue()
    assert source.on_signal("SIGINT") is True
    source.stopped_by = "io-error"  # a STOP that was not the migration's: no switchover
    assert source.where == "during RAM copy"
    late = SourceMigration(Config(mode="source"), None, Progress(io.StringIO()))  # type: ignore[arg-type]
    late.switched, late.phase = True, Phase.COMMITTED
    assert late.on_signal("SIGTERM") is False and late.on_signal("SIGTERM") is False


def test_exit_codes():
    assert OutcomeUncertain("x").exit_code == 3
    assert {signal.name for signal in cli.SIGNALS} == {"SIGINT", "SIGTERM", "SIGHUP"}


def test_switchover_timeout_flag():
    base = ["-mode", "source", "-dest-ip", "10.0.0.2", "-vm-ip", "10.244.1.5"]
    assert cli.parse_args(base).switchover_timeout == 5.0
    assert cli.parse_args([*base, "-switchover-timeout", "1.5"]).switchover_timeout == 1.5
    with pytest.raises(UsageError, match="-switchover-timeout"):
        cli.parse_args([*base, "-switchover-timeout", "-1"])
    with pytest.raises(UsageError, match="must be positive"):
        cli.parse_args([*base, "-switchover-timeout", "0"])


class _Jobs:
    """Answers query-block-jobs only: the one QMP call the switchover test makes."""

    timeout = 1.0

    def __init__(self, unsynced: int) -> None:
        self.unsynced = unsynced

    async def execute(self, command: str, args: object = None) -> list[dict]:
        assert command == "query-block-jobs"
        job = "katamaran-mirror-drive-virtio-disk0"
        return [{"device": job, "len": 1 << 30, "offset": (1 << 30) - self.unsynced}]


def _converged(unsynced: int, remaining: int) -> bool:
    import asyncio

    from katamaran.config import Config
    from katamaran.source import SourceMigration

    src = SourceMigration(Config(mode="source"), _Jobs(unsynced), Progress(io.StringIO()))
    src.mirror_started = True
    src.last_sync = 2
    # 800 Mbit/s = 100 000 bytes/ms; the default 50 ms budget is 5 000 000 bytes.
    info = {"status": "active", "ram": {"dirty-sync-count": 3, "mbps": 800.0}}
    info["ram"]["remaining"] = remaining
    return asyncio.run(src._converged(info))


def test_switchover_test_counts_the_mirror_bytes_left():
    assert _converged(unsynced=0, remaining=4_000_000)
    assert not _converged(unsynced=2_000_000, remaining=4_000_000)
    assert _converged(unsynced=1_000_000, remaining=4_000_000)
    assert not _converged(unsynced=0, remaining=6_000_000)


def test_a_dropped_session_does_not_change_the_exit_code(tmp_path):
    """A real pipe whose reader is gone (a dropped ssh session) behind stdout and stderr:
    the error line a failed write leaves in stderr's buffer is flushed again when Python
    exits, and a failing flush there would turn the exit code (here 1: no QMP socket)
    into 120.  Buffered streams, as under ssh: PYTHONUNBUFFERED would hide it."""
    child = (
        "import sys\n"
        "from katamaran import cli\n"
        "sys.stdin.readline()\n"  # wait until the parent has closed its end
        "sys.exit(cli.main(['-mode', 'dest', '-qmp', sys.argv[1]]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(tmp_path / "no-such-qmp.sock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={
            **{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        },
    )
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.close()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert proc.wait(30) == 1


def test_only_the_vms_packets_taken_off_its_tap_go_into_the_tunnel():
    """Packets for -vm-ip are resent (the rule routes them into the tunnel); others would
    come back to the same tap, so they are not.  -vm-ip arrives parsed (an IPv4Address
    or IPv6Address), the packets as bytes: the two must compare as addresses.

    Regression: the first version compared the text of the packet's address with the
    parsed -vm-ip, matched nothing, and the nested e2e lost the 218 pings it took off
    the tap ("217 packet(s) ... could not be forwarded")."""
    import ipaddress
    import struct

    from katamaran import tapqueue
    from katamaran.config import Config
    from katamaran.source import SourceMigration

    def ipv4(dst: str) -> bytes:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 1, 0,
                           ipaddress.ip_address("10.0.0.9").packed,
                           ipaddress.ip_address(dst).packed) + bytes(8)  # fmt: skip

    def ipv6(dst: str) -> bytes:
        head = struct.pack("!IHBB", 6 << 28, 8, 58, 64)
        return head + ipaddress.ip_address("fd00::9").packed + ipaddress.ip_address(dst).packed

    sent: list[bytes] = []
    for vm, mine, others in (
        ("10.244.1.5", ipv4("10.244.1.5"), [ipv4("10.244.1.6"), ipv6("fd00::5")]),
        ("fd00::5", ipv6("fd00::5"), [ipv6("fd00::6"), ipv4("10.244.1.5"), ipv6("ff02::1")]),
    ):
        sent.clear()
        cfg = Config(mode="source", vm_ip=ipaddress.ip_address(vm))
        source = SourceMigration(cfg, None, Progress(io.StringIO()))  # type: ignore[arg-type]
        source.hold = tapqueue.Hold(send=lambda packets: sent.extend(packets) or len(packets))
        assert source._tunnel_packets([others[0], mine, *others[1:], mine]) == 2
        assert sent == [] and source.hold.held == 2, "sent before the switch"
        assert source.hold.release() == (2, 2)
        assert sent == [mine, mine], vm
        assert source._tunnel_packets([mine]) == 1 and sent == [mine] * 3, "kept after the switch"


def test_kept_packets_go_out_in_order_once_released():
    from katamaran.tapqueue import Hold

    sent: list[bytes] = []
    hold = Hold(send=lambda packets: sent.extend(packets) or len(packets) - 1)  # 1 too big
    assert hold([b"c", b"d"]) == 2 and hold([]) == 0 and hold([b"a"], older=True) == 1
    assert hold([b"e"]) == 1 and hold([b"b"], older=True) == 1
    assert sent == [] and hold.held == 5
    assert hold.release() == (5, 4)  # held, sent
    assert sent == [b"a", b"b", b"c", b"d", b"e"] and hold.held == 0  # the tap's first
    assert hold([b"f", b"g"]) == 1 and sent[-2:] == [b"f", b"g"]
    assert hold.release() == (0, 0)


def test_divert_names_fit_and_differ_per_vm_and_tap():
    import ipaddress

    from katamaran.names import divert_names

    a = divert_names(ipaddress.ip_address("10.244.1.5"), "tap0_kata")
    b = divert_names(ipaddress.ip_address("10.244.1.6"), "tap0_kata")
    c = divert_names(ipaddress.ip_address("10.244.1.5"), "tap1_kata")
    assert all(len(name) <= 15 for name in (*a, *b, *c))  # IFNAMSIZ - 1
    assert len({*a, *b, *c}) == 6 and a[0].startswith("kmrd-") and a[1].startswith("kmrq-")


def test_the_tap_feed_is_found_by_the_mirred_target_of_a_filter():
    """Kata's u32 filter as pyroute2 dumps it: the redirect target sits deep in nested
    attributes; a filter without mirred (the u32 hash table entry) has none."""
    from katamaran.divert import redirect_targets

    mirred = {"attrs": [["TCA_MIRRED_PARMS", {"ifindex": 4, "eaction": 1}]]}
    action = {"attrs": [["TCA_ACT_KIND", "mirred"], ["TCA_ACT_OPTIONS", mirred]]}
    options = {
        "attrs": [["TCA_U32_SEL", {}], ["TCA_U32_ACT", {"attrs": [["TCA_ACT_PRIO_1", action]]}]]
    }
    kata = {"info": 49152 << 16, "attrs": [["TCA_KIND", "u32"], ["TCA_OPTIONS", options]]}
    table = {"info": 49152 << 16, "attrs": [["TCA_KIND", "u32"], ["TCA_OPTIONS", {"attrs": []}]]}
    assert redirect_targets(kata) == [4]
    assert redirect_targets(table) == []


def test_an_abort_gives_the_tap_its_feed_back_before_it_unswitches():
    """Unswitched first, the node would route the VM's address to the pod again, and
    the divert would resend what it takes straight back to itself, in a loop."""
    import asyncio
    import ipaddress

    from katamaran.config import Config
    from katamaran.source import SourceMigration
    from katamaran.tapqueue import Hold

    calls: list[str] = []

    class Divert:
        tap, installed, settled = "tap0_kata", True, True
        stats = types.SimpleNamespace(forwarded=3, unsendable=0, other=1, not_ip=0)
        error = None

        def remove(self) -> None:
            calls.append("give the feed back")

        def close(self) -> None:
            calls.append("close")

    class Tunnel:
        ifname, tunnelled, switched = "kmr-0", None, True

        def unswitch(self) -> None:
            calls.append("unswitch")
            self.tunnelled = 2  # the device's TX count over the switch

    cfg = Config(mode="source", vm_ip=ipaddress.ip_address("10.244.1.5"))
    out = io.StringIO()
    source = SourceMigration(cfg, _Monitor(calls, "running"), Progress(out))  # type: ignore[arg-type]
    source.tunnel, source.diverts = Tunnel(), [Divert()]  # type: ignore[assignment, list-item]
    source.hold = Hold(send=lambda packets: calls.append("resend to the VM") or len(packets))
    source.hold([b"kept while the VM ran"])
    asyncio.run(source._abort_migration())
    assert calls[:4] == ["give the feed back", "close", "unswitch", "resend to the VM"], calls
    assert calls.index("resend to the VM") < calls.index("query-migrate"), calls
    said = "3 packet(s) for 10.244.1.5 were diverted from it (1 frame(s) not"
    assert said in out.getvalue()
    assert "1 of 1 packet(s) kept for the tunnel given back to the VM" in out.getvalue()
    assert "given up after the switch: 2 packet(s) went through kmr-0" in out.getvalue()
    assert source.diverts == []


@pytest.mark.parametrize("tunnelled", [False, True], ids=["kept", "tunnelled"])
def test_kept_packets_go_back_only_after_the_cancel(tunnelled: bool):
    """Kept by katamaran (the gate, the pause before the commit), the VM's packets go
    back once QEMU has cancelled and the VM runs: a pause QEMU makes meanwhile (the gate
    opened just before the signal) drops the frame it holds for a guest with no room.
    Tunnelled (switched at the STOP), the traffic comes back first: the destination
    would drop it."""
    import asyncio
    import ipaddress

    from katamaran.config import Config
    from katamaran.source import SourceMigration
    from katamaran.tapqueue import Hold

    calls: list[str] = []

    class Monitor(_Monitor):
        def mark(self) -> int:
            return 0

        async def execute(self, command: str, args: dict | None = None) -> dict:
            if command == "query-migrate":
                self.calls.append(command)
                return {
                    "status": "pre-switchover"
                    if "migrate_cancel" not in self.calls
                    else "cancelled"
                }
            return await super().execute(command, args)

    tunnel, divert = _Tunnel(calls), _Divert(calls)
    tunnel.switched = tunnelled
    out = io.StringIO()
    cfg = Config(mode="source", vm_ip=ipaddress.ip_address("10.244.1.5"))
    source = SourceMigration(cfg, Monitor(calls, "paused"), Progress(out))  # type: ignore[arg-type]
    source.tunnel, source.diverts = tunnel, [divert]  # type: ignore[assignment, list-item]
    source.was_running = True
    source.hold = Hold(send=lambda packets: calls.append("resend to the VM") or len(packets))
    source.hold([b"kept while the VM ran"])

    async def ended(mark: int, timeout: float) -> None:
        calls.append("cancelled")

    source._wait_migration_end = ended  # type: ignore[method-assign]
    asyncio.run(source._abort_migration())
    cancel, back = calls.index("migrate_cancel"), calls.index("resend to the VM")
    assert (back < cancel) is tunnelled, calls
    if not tunnelled:
        assert calls.index("cont") < calls.index("give the feed back") < back, calls
    assert "cancelling the migration (QEMU: pre-switchover)" in out.getvalue()
    assert "1 of 1 packet(s) kept for the tunnel given back to the VM" in out.getvalue()


class _Recording:
    """Fakes of a divert, a tunnel and taps that only record, in order, what the source
    asks of them."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls


class _Divert(_Recording):
    tap, installed, error, settled = "tap0_kata", False, None, True
    stats = types.SimpleNamespace(forwarded=1, unsendable=0, other=0, not_ip=0)

    def divert(self) -> None:
        self.calls.append("divert")
        self.installed = True

    def undivert(self) -> None:
        self.calls.append("undivert")
        self.installed = False

    def remove(self) -> None:
        self.calls.append("give the feed back")
        self.installed = False

    def close(self) -> None:
        pass


class _Tunnel(_Recording):
    ifname, ready, switched, tunnelled = "kmr-0", True, False, None

    def switch(self) -> None:
        self.calls.append("switch")
        self.switched = True

    def unswitch(self) -> None:
        self.calls.append("unswitch")


class _Taps(_Recording):
    fds, names = [7], ["tap0_kata"]

    def drain(self, forward, timeout, cancel=None):  # type: ignore[no-untyped-def]
        from katamaran.tapqueue import Drained, Leftovers

        self.calls.append("drain")
        taken = Leftovers(packets=[b"queued"])
        return Drained(taken=taken, forwarded=forward(taken.packets))

    def take_leftovers(self):  # type: ignore[no-untyped-def]
        from katamaran.tapqueue import Leftovers

        self.calls.append("take the tap's frames")
        return Leftovers()

    def close(self) -> None:
        self.calls.append("release the tap")


class _Monitor(_Recording):
    """QMP that records each command and answers query-status with `status`; no event
    ever comes."""

    timeout = 1.0

    def __init__(self, calls: list[str], status: str) -> None:
        super().__init__(calls)
        self.status = status

    async def execute(self, command: str, args: dict | None = None) -> dict:
        self.calls.append(command)
        return {"status": self.status} if command == "query-status" else {}

    async def next_event(self, match, since, timeout):  # type: ignore[no-untyped-def]
        import asyncio

        await asyncio.sleep(timeout)
        return None


def _stop_handling(passes: int, status: str) -> tuple[list[str], str | None]:
    """Feed one STOP to a source whose traffic katamaran had not switched yet (QEMU
    paused the VM itself); the calls in order, and the error if it aborted."""
    import asyncio
    import ipaddress

    from katamaran.config import Config
    from katamaran.source import SourceMigration

    calls: list[str] = []
    divert, tunnel, taps = _Divert(calls), _Tunnel(calls), _Taps(calls)

    cfg = Config(mode="source", vm_ip=ipaddress.ip_address("10.244.1.5"))
    mon = _Monitor(calls, status)
    source = SourceMigration(cfg, mon, Progress(io.StringIO()))  # type: ignore[arg-type]
    source.tunnel, source.diverts = tunnel, [divert]  # type: ignore[assignment, list-item]
    source.taps, source.passes = taps, passes  # type: ignore[assignment]

    async def stop() -> None:
        try:
            await source._on_event({"event": "STOP", "data": {}})  # type: ignore[typeddict-item]
        finally:
            await source._diverted()

    try:
        asyncio.run(stop())
    except KatamaranError as err:
        return calls, str(err)
    return calls, None


def test_a_stop_after_the_first_pass_takes_the_tap_before_asking_qemu():
    """QEMU holds its main loop from STOP to pre-switchover and parks the first frame it
    reads after that; query-status is answered only then, so it must come last."""
    calls, error = _stop_handling(passes=3, status="finish-migrate")
    assert error is None
    assert calls[:2] == ["switch", "take the tap's frames"], calls
    # The divert (~0.1 s on a nested node) runs beside the rest of the pause: then what
    # reached the tap meanwhile is taken, and only then is the tap let go.
    later = calls[2:]
    assert sorted(later) == sorted(
        ["divert", "take the tap's frames", "release the tap", "query-status"]
    ), calls
    took = later.index("take the tap's frames")
    assert later.index("divert") < took < later.index("release the tap"), calls


def test_a_stop_in_the_first_pass_asks_qemu_first_and_leaves_traffic_alone():
    """QEMU cannot switch over before its first pass ends: such a STOP is an operator or
    an I/O error, and traffic must stay with the paused VM's tap."""
    calls, error = _stop_handling(passes=1, status="paused")
    assert error is not None and "not by the migration" in error
    assert calls == ["query-status"], calls


def _kept_source(calls: list[str]):  # type: ignore[no-untyped-def]
    """A source with fakes that record, at katamaran's own switchover: taps, a tunnel
    and a divert not installed yet; what the hold sends is recorded as `send ...`."""
    import ipaddress

    from katamaran.config import Config
    from katamaran.source import SourceMigration
    from katamaran.tapqueue import Hold

    cfg = Config(mode="source", vm_ip=ipaddress.ip_address("10.244.1.5"))
    mon = _Monitor(calls, "finish-migrate")
    out = io.StringIO()
    source = SourceMigration(cfg, mon, Progress(out))  # type: ignore[arg-type]
    source.tunnel, source.diverts = _Tunnel(calls), [_Divert(calls)]  # type: ignore[assignment, list-item]
    source.taps, source.passes = _Taps(calls), 3  # type: ignore[assignment]
    source._tunnel_packets = lambda packets: source.hold(packets, older=True)  # type: ignore[method-assign]
    source.hold = Hold(
        send=lambda packets: calls.extend(f"send {p.decode()}" for p in packets) or len(packets)
    )
    return source, out


def test_katamarans_switchover_keeps_the_vms_packets_until_migrate_continue():
    """Switched while the VM runs, strict rp_filter on the pod's veth (Calico's) drops
    every packet the VM sends; switched before the commit, a migration given up then
    loses what the destination's plug holds.  So the drain keeps what it takes, the STOP
    takes the tap and keeps that too, and the rule goes in once migrate-continue is
    sent, what was kept going first."""
    import asyncio

    calls: list[str] = []
    source, out = _kept_source(calls)

    async def run() -> None:
        await source._switchover({"ram": {"remaining": 1 << 20}}, 0)
        assert "switch" not in calls, calls  # the VM still runs: nothing switched yet
        assert calls.index("divert") < calls.index("drain"), calls
        assert source.hold.held == 1
        await source._on_event({"event": "STOP", "data": {}})  # type: ignore[typeddict-item]
        assert "switch" not in calls and source.hold.held == 1, calls  # paused: still kept
        assert source.where.startswith("at the switchover (VM paused"), source.where
        pre = {"event": "MIGRATION", "data": {"status": "pre-switchover"}}
        await source._on_event(pre)  # type: ignore[arg-type]

    asyncio.run(run())
    stop = calls.index("take the tap's frames")
    assert stop < calls.index("query-status") < calls.index("migrate-continue"), calls
    assert calls[calls.index("migrate-continue") :][:3] == [
        "migrate-continue",
        "switch",
        "send queued",
    ], calls
    assert "packets for 10.244.1.5 kept until migrate-continue (1 so far)" in out.getvalue()
    assert "migrate-continue sent: traffic for 10.244.1.5 now goes through kmr-0; the 1 " in (
        out.getvalue()
    )


def test_a_migration_given_up_while_paused_gives_the_kept_packets_back():
    """Given up between the STOP and migrate-continue (a signal, a failed drain, a
    destination that ended): nothing went into the tunnel, so nothing is lost there;
    the kept packets go back to the VM, after its feed, once it runs again."""
    import asyncio

    calls: list[str] = []
    source, out = _kept_source(calls)

    async def run() -> None:
        await source._switchover({"ram": {"remaining": 1 << 20}}, 0)
        await source._on_event({"event": "STOP", "data": {}})  # type: ignore[typeddict-item]
        await source._abort_migration()

    asyncio.run(run())
    assert "switch" not in calls, calls
    after = calls[calls.index("unswitch") :]
    assert after[:2] == ["unswitch", "send queued"], calls
    assert calls.index("give the feed back") < calls.index("unswitch"), calls
    assert "1 of 1 packet(s) kept for the tunnel given back to the VM" in out.getvalue()
    assert "given up after the switch" not in out.getvalue()
    # back once QEMU's cancel is done and the VM runs (test_kept_packets_go_back_only_...)
    assert calls.index("cont") < calls.index("give the feed back"), calls


class _ParamMonitor(_Monitor):
    """_Monitor that also keeps what migrate-set-parameters set, and has parameters."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__(calls, "finish-migrate")
        self.set: list[dict] = []

    async def execute(self, command: str, args: dict | None = None) -> dict:
        await super().execute(command, args)
        if command == "migrate-set-parameters":
            self.set.append(dict(args or {}))
        if command == "query-migrate-parameters":
            extra = getattr(self, "params", {})
            return {
                "max-bandwidth": 1 << 62,
                "cpu-throttle-initial": 20,
                "max-cpu-throttle": 99,
                **extra,
            }
        return {"status": self.status} if command == "query-status" else {}


def _gated_source(calls: list[str]):  # type: ignore[no-untyped-def]
    """A source whose QEMU waits at the switchover gate, with fakes that record."""
    import ipaddress

    from katamaran.config import Config
    from katamaran.gate import SwitchoverGate
    from katamaran.source import SourceMigration
    from katamaran.tapqueue import Hold

    cfg = Config(mode="source", vm_ip=ipaddress.ip_address("10.244.1.5"))
    mon = _ParamMonitor(calls)
    source = SourceMigration(cfg, mon, Progress(io.StringIO()))  # type: ignore[arg-type]
    source.tunnel, source.diverts = _Tunnel(calls), [_Divert(calls)]  # type: ignore[assignment, list-item]
    source.taps = _Taps(calls)  # type: ignore[assignment]
    source.gate = SwitchoverGate(mon, "disk0", pending=1)  # type: ignore[arg-type]
    source._tunnel_packets = lambda packets: source.hold(packets, older=True)  # type: ignore[method-assign]
    source.hold = Hold(
        send=lambda packets: calls.extend(f"send {p.decode()}" for p in packets) or len(packets)
    )
    return source, mon


def test_at_the_gate_the_tap_is_taken_before_qemu_may_sync_again():
    """QEMU waits at the gate (see katamaran/gate.py): bandwidth capped (it spins there),
    the tap's feed diverted and its queue kept, and only then the gate opened, with the
    bandwidth back, in one command.  The later switchover only lets QEMU pause the VM;
    the switch waits for migrate-continue."""
    import asyncio

    calls: list[str] = []
    source, mon = _gated_source(calls)

    async def run() -> None:
        await source._hold_at_gate({"ram": {"remaining": 0}}, 0)
        assert "switch" not in calls, calls
        assert calls.index("divert") < calls.index("drain"), calls
        cap, opened = mon.set
        assert cap["max-bandwidth"] == 4096, cap
        assert opened == {
            "max-bandwidth": 1 << 62,
            "cpu-throttle-initial": 20,
            "max-cpu-throttle": 99,
            "downtime-limit": 2,
        }, opened
        assert calls[-1] == "migrate-set-parameters" and calls.index("drain") < len(calls) - 1
        assert source.gate is not None and source.gate.opened and source.held_at is not None
        assert source.hold.held == 1
        before = len(calls)
        await source._switchover({"ram": {"remaining": 4096}}, 0)
        assert calls[before:] == ["migrate-set-parameters"], calls[before:]
        assert mon.set[-1]["downtime-limit"] == 2_000_000
        await source._on_event({"event": "STOP", "data": {}})  # type: ignore[typeddict-item]

        assert "switch" not in calls, calls  # kept until migrate-continue
        pre = {"event": "MIGRATION", "data": {"status": "pre-switchover"}}
        await source._on_event(pre)  # type: ignore[arg-type]

    source.passes = 2
    asyncio.run(run())
    at_commit = calls[calls.index("migrate-continue") :]
    assert at_commit[:3] == ["migrate-continue", "switch", "send queued"], calls


def test_at_the_gate_qemu_gets_its_own_test_back_where_it_is_katamarans():
    """Once the feed is diverted and drained, QEMU may pause the VM at its own test:
    -downtime-limit at its measured bandwidth (avail-switchover-bandwidth back to what it
    was), so no lift has to wait out QEMU's 100 ms accounting window.  Not with a
    background mirror: katamaran's test also counts what it has not copied."""
    import asyncio

    for mirror, blocking, handed in (
        (False, False, True),
        (True, True, True),
        (True, False, False),
    ):
        calls: list[str] = []
        source, mon = _gated_source(calls)
        source.saved_params["avail-switchover-bandwidth"] = 0  # _take_switchover_decision's
        source.mirror_started, source.mirror_blocking = mirror, blocking
        asyncio.run(source._hold_at_gate({"ram": {"remaining": 0}}, 0))
        opened = mon.set[-1]
        if handed:
            assert opened["downtime-limit"] == source.cfg.downtime_limit_ms == 50, opened
            assert opened["avail-switchover-bandwidth"] == 0, opened
            assert "avail-switchover-bandwidth" not in source.saved_params
            assert source.handed_back == {"avail-switchover-bandwidth": 0}
        else:
            assert opened["downtime-limit"] == 2 and "avail-switchover-bandwidth" not in opened
            assert source.saved_params["avail-switchover-bandwidth"] == 0


def test_a_give_back_whose_take_back_got_no_answer_sends_it_again(monkeypatch):
    """QEMU did not answer the take-back within -switchover-timeout: whether it holds
    katamaran's 1-byte test again is unknown, so nothing is given back, and the next
    give-back sends the take-back again before the feed goes back."""
    import asyncio

    import katamaran.source as source_module

    monkeypatch.setattr(source_module, "TEST_TAKEN_BACK_S", 0.0)
    calls: list[str] = []
    source, mon = _gated_source(calls)
    mon.status = "running"
    mon.mark = lambda: 0  # type: ignore[attr-defined]
    source.hold([b"kept"])
    source.held_at = 0.0
    source.handed_back = {"avail-switchover-bandwidth": 0}  # as _hold_at_gate left it
    answers = iter([None])

    async def ask(command: str, args=None):  # type: ignore[no-untyped-def]
        if command == "migrate-set-parameters" and next(answers, "answered") is None:
            return None  # past -switchover-timeout
        return await source.mon.execute(command, args)

    async def sleep(_: float) -> None:
        calls.append("wait")

    async def next_event(match, since, timeout):  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(source_module.asyncio, "sleep", sleep)
    mon.next_event = next_event  # type: ignore[method-assign]
    source._ask = ask  # type: ignore[method-assign]
    source._release_hold = lambda what: _release(source)  # type: ignore[method-assign]
    assert asyncio.run(source._give_back_early()) is False
    assert "undivert" not in calls and source.hold.held == 1, calls
    assert source.handed_back == {"avail-switchover-bandwidth": 0}
    assert source.saved_params["avail-switchover-bandwidth"] == 0  # restored on exit
    assert asyncio.run(source._give_back_early()) is True
    taken_back = mon.set[-1]
    assert taken_back == {"downtime-limit": 2, "avail-switchover-bandwidth": 1000}, mon.set
    assert calls[calls.index("wait") :] == ["wait", "query-status", "undivert", "send kept"]
    assert not source.handed_back and source.held_at is None


def test_a_give_back_takes_the_test_back_before_the_feed(monkeypatch):
    """Not converged GATE_HOLD_S after a handed-back gate: katamaran's 1-byte threshold
    again, two of QEMU's accounting windows with the feed still diverted, then the feed
    and the kept packets.  Nothing is given back if QEMU may be pausing the VM: a STOP
    came meanwhile, QEMU no longer runs it, or it did not answer in time."""
    import asyncio

    import katamaran.source as source_module

    monkeypatch.setattr(source_module, "TEST_TAKEN_BACK_S", 0.0)
    cases = {"running": True, "stop event": False, "finish-migrate": False, "no answer": False}
    for case, given in cases.items():
        calls: list[str] = []
        source, mon = _gated_source(calls)
        mon.status = "finish-migrate" if case == "finish-migrate" else "running"
        mon.mark = lambda: 0  # type: ignore[attr-defined]
        source.hold([b"kept"])
        source.held_at = 0.0
        source.handed_back = {"avail-switchover-bandwidth": 0}  # as _hold_at_gate left it

        async def sleep(_: float, calls=calls) -> None:
            calls.append("wait")

        async def next_event(match, since, timeout, case=case):  # type: ignore[no-untyped-def]
            stop = {"event": "STOP", "data": {}}
            return (1, stop) if case == "stop event" and match(stop) else None

        async def ask(command: str, args=None, source=source, case=case):  # type: ignore[no-untyped-def]
            if case == "no answer" and command == "query-status":
                return None  # past -switchover-timeout: QEMU holds its lock, pausing
            return await source.mon.execute(command, args)

        monkeypatch.setattr(source_module.asyncio, "sleep", sleep)
        mon.next_event = next_event  # type: ignore[method-assign]
        source._ask = ask  # type: ignore[method-assign]
        source._release_hold = lambda what, source=source: _release(source)  # type: ignore[method-assign]
        assert asyncio.run(source._give_back_early()) is given, case
        taken_back = mon.set[-1]
        assert taken_back == {"downtime-limit": 2, "avail-switchover-bandwidth": 1000}, mon.set
        assert source.saved_params["avail-switchover-bandwidth"] == 0 and not source.handed_back
        assert calls.index("migrate-set-parameters") < calls.index("wait"), calls
        if given:
            assert calls[calls.index("wait") :] == ["wait", "query-status", "undivert", "send kept"]
            assert source.held_at is None
        else:
            assert "undivert" not in calls, (case, calls)
            assert source.held_at == 0.0 and source.hold.held == 1
        assert not source.draining and source.drain_ended.is_set()


async def _release(source):  # type: ignore[no-untyped-def]
    return source.hold.release()


def test_not_converged_after_the_gate_gives_the_vm_its_packets_and_feed_back():
    """A guest that keeps dirtying RAM: its packets are not kept for more than
    GATE_HOLD_S; the feed comes back first, then the kept packets, and what comes after
    is kept again only at katamaran's switchover."""
    import asyncio

    calls: list[str] = []
    source, _ = _gated_source(calls)
    source.hold([b"kept"])
    source.held_at = 0.0
    seen: list[bool] = []
    source._release_hold = lambda what: (seen.append(source.draining), _release(source))[1]  # type: ignore[method-assign]
    asyncio.run(source._give_back_early())
    assert calls == ["undivert", "send kept"], calls
    # a STOP meanwhile waits (see _watch_stop): the take would re-divert under it
    assert seen == [True] and not source.draining and source.drain_ended.is_set()
    assert source.held_at is None and not source.hold.released
    assert source.hold([b"later"]) == 1 and calls == ["undivert", "send kept"]


def _settling_divert(carried: list[int], delivered: list[int]):  # type: ignore[no-untyped-def]
    """A TapDivert whose veth counters and socket counts come from the lists, in turn
    (the last repeats); reads are counted in `.reads`."""
    import ipaddress

    from katamaran.divert import TapDivert

    divert = TapDivert(1, "tap0_kata", ipaddress.ip_address("10.244.1.5"), ipr=object())  # type: ignore[arg-type]
    divert.installed = True
    divert.reads = 0  # type: ignore[attr-defined]

    def take_rest() -> None:
        divert.reads += 1  # type: ignore[attr-defined]

    divert._carried = lambda: carried.pop(0) if len(carried) > 1 else carried[0]  # type: ignore[method-assign]
    divert._count_delivered = (  # type: ignore[method-assign]
        lambda: delivered.pop(0) if len(delivered) > 1 else delivered[0]
    )
    divert._take_rest = take_rest  # type: ignore[method-assign]
    return divert


def test_a_give_back_waits_for_diverted_frames_still_on_their_way():
    """The veth counted 7 frames, the socket has had 5, then 6, then 7: the give-back
    reads on until the counts agree (a frame in a CPU's backlog was lost before)."""
    divert = _settling_divert([7], [5, 6, 7])
    divert._settle()
    assert divert.settled is True and divert.reads == 2  # type: ignore[attr-defined]


def test_a_give_back_waits_for_frames_on_their_way_at_most_settle_s(monkeypatch):
    """Counts that never agree (a frame dropped between the two): given up after
    SETTLE_S, said so (settled False); counters that cannot be read: not waited for."""
    import katamaran.divert as divert_mod

    monkeypatch.setattr(divert_mod, "SETTLE_S", 0.05)
    stuck = _settling_divert([7], [6])
    stuck._settle()
    assert stuck.settled is False and stuck.reads > 1  # type: ignore[attr-defined]
    unknown = _settling_divert([7], [6])
    unknown._carried = lambda: None  # type: ignore[method-assign]
    unknown._settle()
    assert unknown.settled is None and unknown.reads == 0  # type: ignore[attr-defined]


def test_a_give_back_that_did_not_settle_is_said():
    """Frames still on their way when the feed came back may be lost: a warning says so."""
    from katamaran.config import Config
    from katamaran.source import SourceMigration

    out = io.StringIO()
    source = SourceMigration(Config(mode="source"), None, Progress(out))  # type: ignore[arg-type]
    divert = _Divert([])
    source._report_diverted(divert)  # type: ignore[arg-type]
    assert "WARNING" not in out.getvalue()
    divert.settled = False
    source._report_diverted(divert)  # type: ignore[arg-type]
    assert "were still on their way when its feed came back" in out.getvalue()


def test_a_netlink_error_in_cleanup_stops_no_other_step():
    """The divert's removal and the tunnel's each fail with a NetlinkError: each says so in
    one warning, and every later step still runs (the divert closed, the tunnel removed
    and its netlink socket closed), with no exception out of the cleanup."""
    import asyncio
    import errno
    import ipaddress

    from pyroute2.netlink.exceptions import NetlinkError

    from katamaran.config import Config
    from katamaran.source import SourceMigration

    calls: list[str] = []

    class Divert(_Divert):
        installed = True

        def remove(self) -> None:
            self.calls.append("give the feed back")
            raise NetlinkError(errno.EBUSY, "Device or resource busy")

        def close(self) -> None:
            self.calls.append("close divert")

    class Tunnel(_Tunnel):
        def remove(self) -> None:
            self.calls.append("remove tunnel")
            raise NetlinkError(errno.ENODEV, "No such device")

        def close(self) -> None:
            self.calls.append("close tunnel")

    class Monitor(_Monitor):
        async def regain(self) -> None:
            return None

    out = io.StringIO()
    cfg = Config(mode="source", vm_ip=ipaddress.ip_address("10.244.1.5"))
    source = SourceMigration(cfg, Monitor(calls, "running"), Progress(out))  # type: ignore[arg-type]
    source.tunnel, source.diverts = Tunnel(calls), [Divert(calls)]  # type: ignore[assignment, list-item]
    asyncio.run(source._cleanup())
    said = out.getvalue()
    assert "cleanup: giving the taps their feed back: (16, 'Device or resource busy')" in said
    assert "cleanup: removing tunnel kmr-0: (19, 'No such device')" in said
    assert calls.index("give the feed back") < calls.index("close divert"), calls
    assert calls[-2:] == ["remove tunnel", "close tunnel"], calls


def test_qemu_identity_is_pid_and_start_time_even_with_a_parenthesised_name(tmp_path):
    """The pair a reused pid cannot repeat; a command name like `a) b` must not shift it."""
    odd = tmp_path / "a) b"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(30)"])
    try:
        fields = Path(f"/proc/{child.pid}/stat").read_text().split()
        assert "b)" in fields  # the name really splits the naive way
        start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        assert qemu_identity(child.pid) == f"{child.pid}:{start}"
        assert qemu_identity(child.pid) != qemu_identity(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert qemu_identity(child.pid) is None  # gone
    assert qemu_identity(None) is None


def test_a_journal_saved_for_another_qemu_is_dropped_not_applied(tmp_path):
    """Same -qmp path, another QEMU process: its saved settings and `was_running` would
    be put on the wrong VM; the run says so and starts clean."""
    from katamaran.config import Config
    from katamaran.source import SourceMigration

    lock = VMLock(tmp_path / "qmp.sock", [tmp_path / "locks"])
    out = io.StringIO()
    mon = types.SimpleNamespace(peer_pid=os.getpid(), path=tmp_path / "qmp.sock")
    with lock:
        source = SourceMigration(Config(mode="source"), mon, Progress(out), lock)  # type: ignore[arg-type]
        mine = {"parameters": {"downtime-limit": 300}, "was_running": True}
        lock.save_state({**mine, "qemu": qemu_identity(os.getpid())})
        assert source._journal() == {**mine, "qemu": qemu_identity(os.getpid())}
        lock.save_state({**mine, "qemu": "1:1"})  # init's pid, another start time
        assert source._journal() is None
        assert lock.load_state() is None
    assert out.getvalue().strip() == (
        f"katamaran: WARNING: ignored the settings a killed katamaran saved for another QEMU "
        f"at {tmp_path / 'qmp.sock'} (1:1, now {qemu_identity(os.getpid())})"
    )
