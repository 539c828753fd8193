"""Pure logic of the migration core: addresses, event matching, event history, names."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from pathlib import Path

import pytest

from katamaran.cli import parse_args
from katamaran.config import host_port
from katamaran.errors import KatamaranError, QMPTimeout, UsageError
from katamaran.migration import can_switch_copy_mode, tcg_dirty_tracking_flaw
from katamaran.network import (
    TABLE_BASE,
    TABLE_MASK,
    SourceTunnel,
    hold_names,
    table_for,
    tunnel_name,
)
from katamaran.qmp import Monitor, migration_status, named


def test_host_port_brackets_ipv6_only():
    assert host_port(ipaddress.ip_address("10.0.0.2"), 4444) == "10.0.0.2:4444"
    assert host_port(ipaddress.ip_address("fd00::2"), 10809) == "[fd00::2]:10809"
    assert host_port("::", 4444) == "[::]:4444"


def test_named_matches_name_and_data():
    ready = named("BLOCK_JOB_READY", device="j1")
    assert ready({"event": "BLOCK_JOB_READY", "data": {"device": "j1"}})
    assert not ready({"event": "BLOCK_JOB_READY", "data": {"device": "j2"}})
    assert not ready({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j1"}})
    either = named(("STOP", "RESUME"))
    assert either({"event": "RESUME"}) and not either({"event": "MIGRATION"})


def test_migration_status_matcher():
    done = migration_status("completed", "failed")
    assert done({"event": "MIGRATION", "data": {"status": "failed"}})
    assert not done({"event": "MIGRATION", "data": {"status": "active"}})
    assert not done({"event": "STOP", "data": {"status": "completed"}})


def test_events_that_arrived_before_the_wait_are_not_lost():
    """An event recorded while a command was in flight is found by a later wait."""

    async def scenario() -> list[str]:
        mon = Monitor(Path("/nonexistent.sock"), 1.0)
        mark = mon.mark()
        mon.history.append({"event": "STOP"})
        mon.history.append({"event": "MIGRATION", "data": {"status": "completed"}})
        found = await mon.next_event(named("STOP"), mark, 0.1)
        assert found is not None
        index, event = found
        after = await mon.next_event(migration_status("completed"), index, 0.1)
        assert after is not None
        missing = await mon.next_event(named("RESUME"), after[0], 0.05)
        return [event["event"], after[1]["data"]["status"], str(missing)]

    assert asyncio.run(scenario()) == ["STOP", "completed", "None"]


class _SilentQEMU:
    """A QMP client whose commands never get an answer (a hung QEMU)."""

    async def execute(self, command, arguments=None):
        await asyncio.Event().wait()


def test_a_command_qemu_never_answers_is_a_qmp_timeout():
    """Before 3.11 asyncio.wait_for raises asyncio.TimeoutError, not the builtin TimeoutError."""

    async def scenario() -> None:
        mon = Monitor(Path("/nonexistent.sock"), 0.05)
        mon._client = _SilentQEMU()
        with pytest.raises(QMPTimeout, match=r"^timed out waiting for QMP response to stop after"):
            await mon.execute("stop")

    asyncio.run(scenario())


def test_a_socket_that_never_greets_fails_connect_with_the_path(tmp_path):
    """A real unix socket that accepts and stays silent (another client holds the monitor)."""
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        mon = Monitor(path, 0.2)
        with pytest.raises(KatamaranError, match=r"no greeting within 0\.2s") as err:
            asyncio.run(mon.connect())
    assert str(err.value).startswith(f"Failed to connect to QMP socket {path}: ")


def test_tunnel_name_fits_ifnamsiz_and_is_stable():
    v6, v4 = ipaddress.ip_address("fd00:10::2"), ipaddress.ip_address("10.0.0.2")
    assert tunnel_name(v6).startswith("kmr6-") and tunnel_name(v4).startswith("kmr-")
    assert tunnel_name(v4, 6).startswith("kmrs-")  # IPv6 VM over IPv4 nodes: sit
    for name in (tunnel_name(v6), tunnel_name(v4), tunnel_name(v4, 6)):
        assert len(name) <= 15
    assert tunnel_name(v6) == tunnel_name(ipaddress.ip_address("fd00:10::2"))
    assert tunnel_name(v6) != tunnel_name(v4)


def test_tables_and_hold_devices_are_per_peer_and_vm():
    peer = ipaddress.ip_address("10.0.0.1")
    vm1, vm2 = ipaddress.ip_address("10.244.1.5"), ipaddress.ip_address("10.244.1.6")
    tables = {table_for(r, peer, v) for r in ("source", "dest") for v in (vm1, vm2)}
    assert len(tables) == 4 and all(TABLE_BASE <= t <= TABLE_BASE + TABLE_MASK for t in tables)
    assert hold_names(peer, vm1) != hold_names(peer, vm2)
    assert all(len(n) <= 15 for n in hold_names(peer, vm1))


def test_tunnel_rule_is_a_host_route_to_the_vm_only():
    tunnel = SourceTunnel.__new__(SourceTunnel)  # no netlink socket needed for the args
    tunnel.vm_ip = ipaddress.ip_address("10.244.1.5")
    tunnel.table = 27500
    args = tunnel._rule_args()
    assert args["dst"] == "10.244.1.5" and args["dst_len"] == 32
    assert args["priority"] < 32766  # ahead of the main table, whose CNI route stays


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-mode", "source", "-dest-ip", "10.0.0.2"], "-dest-ip and -vm-ip are required"),
        (["-mode", "dest", "-qmp-timeout", "abc"], 'invalid -qmp-timeout "abc"'),
        (["-mode", "dest", "-copy-mode", "sync"], 'invalid -copy-mode "sync"'),
        (["-mode", "dest", "-drive-id", ""], "-drive-id must not be empty"),
        (["-mode", "dest", "-early-ram=maybe"], 'invalid -early-ram "maybe" \\(want true'),
    ],
)
def test_parse_args_rejects(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_parse_args_accepts_bracketed_ipv6_and_defaults():
    cfg = parse_args(["-mode", "source", "-dest-ip", "[fd00::2]", "-vm-ip", "10.244.1.5"])
    assert str(cfg.dest_ip) == "fd00::2" and cfg.tunnel_hold == 5.0
    assert cfg.drive_id == "drive-virtio-disk0" and cfg.copy_mode == "auto"
    assert cfg.early_ram is False  # disk first, then RAM (config.EARLY_RAM says why)


@pytest.mark.parametrize(
    ("flag", "early"),
    [("-early-ram", True), ("-early-ram=true", True), ("-early-ram=false", False),
     ("--early-ram=0", False), ("-early-ram=F", False)],
)  # fmt: skip
def test_early_ram_is_a_go_style_boolean(flag, early):
    """Off by default; a bare flag or Go's forms turn it on, -early-ram=false keeps it off."""
    argv = ["-mode", "source", "-dest-ip", "10.0.0.2", "-vm-ip", "10.244.1.5", flag]
    assert parse_args(argv).early_ram is early


def test_copy_mode_switch_needs_block_job_change():
    """query-commands decides (see test_copy_mode for real QEMU 7.2 and 10.0 answers)."""
    qemu_7_2 = [{"name": "block-job-cancel"}, {"name": "block-job-complete"}]
    assert not can_switch_copy_mode(qemu_7_2)
    assert can_switch_copy_mode([*qemu_7_2, {"name": "block-job-change"}])
    assert not can_switch_copy_mode([])


class _AnswerMon:
    """QMP answers by command: tcg_dirty_tracking_flaw asks only query-kvm/query-version."""

    def __init__(self, kvm: bool, version: tuple[int, int, int]) -> None:
        major, minor, micro = version
        self.answers = {
            "query-kvm": {"enabled": kvm, "present": kvm},
            "query-version": {"qemu": {"major": major, "minor": minor, "micro": micro}},
        }

    async def execute(self, command: str) -> dict:
        return self.answers[command]


@pytest.mark.parametrize(
    ("kvm", "version", "flawed"),
    [
        (False, (7, 2, 22), True),  # Debian 12's: warned
        (False, (8, 2, 9), True),
        (False, (9, 0, 0), False),  # the fix (03bfc2188f) is in 9.0
        (False, (10, 0, 2), False),
        (True, (7, 2, 22), False),  # KVM tracks dirty pages itself
    ],
)
def test_tcg_dirty_tracking_flaw_is_tcg_before_9_0(kvm, version, flawed):
    flaw = asyncio.run(tcg_dirty_tracking_flaw(_AnswerMon(kvm, version)))  # type: ignore[arg-type]
    if flawed:
        assert flaw is not None and f"QEMU {'.'.join(map(str, version))}," in flaw
        assert "(fixed in QEMU 9.0)" in flaw
    else:
        assert flaw is None


# ---------------------------------------------------------------- tap leftovers


def _udp_frame(needs_csum: bool, gso: int = 0) -> tuple[bytes, bytes]:
    """(frame as read from a vnet-hdr tap, the UDP datagram with its correct checksum)."""
    import socket
    import struct

    from katamaran.tapqueue import _fold

    src, dst = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.244.1.5")
    payload = b"katamaran"
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 4000, 5000, udp_len, 0) + payload
    correct = udp[:6] + struct.pack("!H", _fold(pseudo + udp)) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _fold(ip)) + ip[12:]
    if needs_csum:  # the host leaves the pseudo-header sum (not inverted) in the field
        partial = (~_fold(pseudo)) & 0xFFFF
        udp = udp[:6] + struct.pack("!H", partial) + udp[8:]
    else:
        udp = correct
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    hdr = struct.pack("<BBHHHH", 1 if needs_csum else 0, gso, 0, 0, 14 + 20, 6) + b"\0\0"
    return hdr + eth + ip + udp, ip + correct


def test_frame_to_packet_completes_a_partial_checksum():
    from katamaran.tapqueue import frame_to_packet

    frame, expected = _udp_frame(needs_csum=True)
    assert frame_to_packet(frame, 12) == (4, expected)


def test_frame_to_packet_keeps_a_complete_packet_and_refuses_gso_and_arp():
    from katamaran.tapqueue import frame_to_packet

    frame, expected = _udp_frame(needs_csum=False)
    assert frame_to_packet(frame, 12) == (4, expected)
    assert frame_to_packet(frame[12:], 0) == (4, expected)  # a tap without vnet header
    gso, _ = _udp_frame(needs_csum=True, gso=3)
    assert frame_to_packet(gso, 12) == (4, None)
    arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28)
    assert frame_to_packet(arp, 0) == (0, None)


class _TxqLinks:
    """IPRoute's link calls for one tap whose kernel refuses rings above `cap` frames."""

    def __init__(self, old: int, cap: int) -> None:
        self.txqlen, self.cap, self.tried = old, cap, []

    def link_lookup(self, ifname: str) -> list[int]:
        return [7]

    def get_links(self, index: int) -> list:
        txqlen = self.txqlen

        class Link:
            def get_attr(self, name: str) -> int:
                return txqlen

        return [Link()]

    def link(self, cmd: str, index: int, txqlen: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        self.tried.append(txqlen)
        if txqlen > self.cap:
            raise NetlinkError(errno.ERANGE, "Numerical result out of range")
        self.txqlen = txqlen


def test_fit_tap_queue_takes_the_largest_ring_the_kernel_allows():
    """Debian 12's 6.1 refuses tun rings above 32767 frames (ERANGE, measured in the lab
    node); a -plug-limit sized for 1000 pings/s asks for 196000.  Halving alone stopped
    at 24500; the search goes on to the largest taken, and only ever grows the ring."""
    from katamaran.network import fit_tap_queue

    links = _TxqLinks(old=1000, cap=32_767)
    assert fit_tap_queue(links, "tap0", 11_760_000) == (1000, 32_767)
    assert links.txqlen == 32_767
    assert links.tried[:4] == [196_000, 98_000, 49_000, 24_500]
    taken = [n for n in links.tried if n <= links.cap]
    assert taken == sorted(taken)  # grow-only: a refused size left the ring as it was
    assert len(links.tried) <= 20
    fits = _TxqLinks(old=1000, cap=50_000)
    assert fit_tap_queue(fits, "tap0", 600_000) == (1000, 10_000)
    assert fits.tried == [10_000]
    assert fit_tap_queue(fits, "tap0", 60_000) is None  # already long enough
    refused = _TxqLinks(old=1000, cap=10)
    with pytest.raises(Exception, match="out of range"):
        fit_tap_queue(refused, "tap0", 5_880_000)


def test_within_never_swallows_a_cancellation_that_meets_a_completion():
    """The caller is cancelled in the very loop turn its awaitable completes: on Python
    before 3.12 asyncio.wait_for then returns the result and the cancellation is lost
    (a SIGHUP'd source kept migrating); within must raise CancelledError."""
    import asyncio

    from katamaran.aio import within

    async def scenario() -> str:
        inner = asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(within(inner, 10))
        await asyncio.sleep(0)  # the caller now waits on inner
        inner.set_result("answer")
        caller.cancel()
        try:
            await caller
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    assert asyncio.run(scenario()) == "cancelled"


def test_within_times_out_with_asyncio_timeouterror_and_returns_results():
    import asyncio

    from katamaran.aio import within

    async def scenario() -> tuple[object, bool]:
        got = await within(asyncio.sleep(0, result=7), 5)
        never = asyncio.get_running_loop().create_future()
        try:
            await within(never, 0.01)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11
            return got, never.cancelled()
        return got, False

    assert asyncio.run(scenario()) == (7, True)


def test_destination_signals_before_resume_cancel_after_it_shorten_the_hold():
    """Before the VM runs here a signal cancels (cleanup); after, the first ends the fixed
    hold only (the source may still tunnel), the next the wait for a quiet tunnel."""
    import io
    import types

    from katamaran.dest import DestMigration
    from katamaran.progress import Progress

    out = io.StringIO()
    cfg = parse_args(["-mode", "dest", "-qmp", "/run/q.sock", "-tap", "tap0"])
    dest = DestMigration(cfg, types.SimpleNamespace(closed=False), Progress(out))
    assert dest.on_signal("SIGTERM") is True and out.getvalue() == ""
    dest.resumed = True
    assert dest.on_signal("SIGHUP") is False  # no decapsulation: nothing to hold
    assert "finishing (no tunnel to hold)" in out.getvalue() and not dest.hold_cut.is_set()
    dest.decap = types.SimpleNamespace(rules=[{"table": 1}])
    assert dest.on_signal("SIGTERM") is False
    assert dest.hold_cut.is_set() and not dest.quiet_cut.is_set()
    assert "decapsulating only until the source's tunnel is quiet" in out.getvalue()
    assert dest.on_signal("SIGINT") is False
    assert dest.quiet_cut.is_set()
    assert "removing the decapsulation now" in out.getvalue()


def test_destination_hold_wait_ends_when_qemu_is_gone():
    import types

    from katamaran.dest import DestMigration
    from katamaran.progress import Progress

    cfg = parse_args(["-mode", "dest", "-qmp", "/run/q.sock"])
    mon = types.SimpleNamespace(closed=False)
    dest = DestMigration(cfg, mon, Progress())

    async def waits() -> tuple[bool, bool]:
        timed_out = await dest._wait_unless(dest.hold_cut, 0.05)
        mon.closed = True
        return timed_out, await dest._wait_unless(dest.hold_cut, 30.0)

    assert asyncio.run(asyncio.wait_for(waits(), 5)) == (False, True)


def test_destination_shuts_the_handed_stream_down_only_if_the_vm_did_not_resume():
    """QEMU holds the same socket as katamaran's copy: a shutdown there is its stream's
    end (the source side reads EOF); a plain close of the copy is not."""
    import io
    import types

    from katamaran.dest import DestMigration
    from katamaran.progress import Progress

    cfg = parse_args(["-mode", "dest", "-qmp", "/run/q.sock"])
    for shut in (False, True):
        out = io.StringIO()
        dest = DestMigration(cfg, types.SimpleNamespace(closed=False), Progress(out))
        ours, peer = socket.socketpair()
        qemus = ours.dup()  # what getfd gave QEMU
        dest.stream = ours
        with peer, qemus:
            dest._close_stream(shut=shut)
            assert dest.stream is None and ours.fileno() == -1
            peer.settimeout(0.2)
            if shut:
                assert peer.recv(1) == b""  # EOF: QEMU's copy is shut down too
                assert "incoming migration stream shut down" in out.getvalue()
            else:
                with pytest.raises(TimeoutError):
                    peer.recv(1)  # QEMU's copy still carries the stream
                assert out.getvalue() == ""


def test_a_netlink_error_in_the_destinations_cleanup_stops_no_other_step():
    """Each piece of the destination's network fails to go (NetlinkError, OSError): one
    warning each, every later piece still removed, in order (rules first, the plug
    drained, then the rest), and no exception out of the cleanup."""
    import asyncio
    import errno
    import io
    import types

    from pyroute2.netlink.exceptions import NetlinkError

    from katamaran.config import Config
    from katamaran.dest import DestMigration
    from katamaran.progress import Progress

    calls: list[str] = []

    def step(name: str, err: Exception | None = None):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls.append(name)
            if err is not None:
                raise err

        return run

    decap = types.SimpleNamespace(
        unsteer=step("unsteer", NetlinkError(errno.ENOENT, "No such file or directory")),
        teardown=step("teardown"),
        close=step("close decap"),
    )
    plug = types.SimpleNamespace(
        remove=step("remove plug", OSError(errno.EBADF, "Bad file descriptor")),
        close=step("close plug"),
    )
    out = io.StringIO()
    dest = DestMigration(Config(mode="dest"), types.SimpleNamespace(closed=False), Progress(out))
    dest.decap, dest.plug = decap, plug  # type: ignore[assignment]
    asyncio.run(dest._remove_network())
    assert calls == ["unsteer", "remove plug", "close plug", "teardown", "close decap"]
    said = out.getvalue()
    assert "cleanup: (2, 'No such file or directory')" in said, said
    assert "cleanup: [Errno 9] Bad file descriptor" in said, said
    assert dest.decap is None and dest.plug is None
