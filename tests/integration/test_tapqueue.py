"""katamaran.tapqueue against a real QEMU in a Kata-shaped pod: frames queued on tap0_kata.

Why: the source's switchover waits for this queue to empty before it pauses the VM; a
frame left there would die with the source QEMU.  Here the VM is paused by hand, pings
pile up on its tap, and the watcher must see them, then see the queue empty once the VM
runs again.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import types
from ipaddress import ip_address

import pytest

from katamaran import tapqueue
from katamaran.tapqueue import TapQueues, resend, tap_fds
from pytest_katamaran.lab.local import VM_IP, qmp, wait_for_path
from pytest_katamaran.net.hostlab import run_in_netns

pytestmark = pytest.mark.qemu


def test_tap_queue_is_seen_while_paused_and_empties_when_running(rig_factory):
    rig = rig_factory(kata_pod=True)
    rig.up()
    pid = rig.src.pid
    assert pid is not None
    assert "tap0_kata" in tap_fds(pid).values()
    queues = TapQueues.of(pid)
    try:
        assert queues.names == ["tap0_kata"]
        assert queues.wait_empty(5.0) == [], "a running VM left frames on its tap"

        qmp(rig.src.qmp_path, "stop")
        ping = ["ping", "-c", "5", "-i", "0.05", "-W", "1", VM_IP]
        lost = rig.lab.run("a", ping, capture_output=True, text=True)
        assert lost.returncode != 0, f"a paused VM answered: {lost.stdout}"
        assert queues.queued() == ["tap0_kata"], "pings to the paused VM are not on its tap"
        assert queues.wait_empty(0.3) == ["tap0_kata"]

        qmp(rig.src.qmp_path, "cont")
        assert queues.wait_empty(10.0) == [], "the resumed VM did not read its tap"
    finally:
        queues.close()
    assert not queues.fds
    again = rig.lab.run("a", ["ping", "-c", "2", "-W", "5", VM_IP], stdout=subprocess.DEVNULL)
    assert again.returncode == 0, "the VM stopped answering after being watched"


def _echo_requests(packets: list[bytes]) -> dict[int, bytes]:
    """ICMP echo requests to the VM among IPv4 packets: {sequence: packet}."""
    found = {}
    for pkt in packets:
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[0] >> 4 == 4 and pkt[9] == 1 and pkt[ihl] == 8:
            assert socket.inet_ntoa(pkt[16:20]) == VM_IP
            found[struct.unpack_from("!H", pkt, ihl + 6)[0]] = pkt
    return found


def test_frames_left_on_a_paused_vms_tap_are_taken_and_resent(rig_factory):
    """What a paused VM did not read is taken off its tap as IP packets; resent from the
    node, they reach the VM's tap again, and the VM reads them once it runs."""
    rig = rig_factory(kata_pod=True)
    rig.up()
    assert rig.src.pid is not None
    queues = TapQueues.of(rig.src.pid)
    try:
        # Resolve the VM's MAC first: pings to a paused VM whose MAC is unknown wait in
        # the node's ARP queue, not on the tap.
        warm = rig.lab.run("a", ["ping", "-c", "1", "-W", "5", VM_IP], capture_output=True)
        assert warm.returncode == 0, "the VM does not answer ping"
        qmp(rig.src.qmp_path, "stop")
        ping = ["ping", "-c", "5", "-i", "0.05", "-W", "1", VM_IP]
        rig.lab.run("a", ping, capture_output=True, text=True)
        left = queues.take_leftovers()
        echoes = _echo_requests(left.packets)
        # A paused QEMU still reads the first frame that arrives and parks it in its own
        # net queue (tap_send reads before it asks whether the NIC can receive): that
        # one is out of reach; every later one must be here, in order.
        assert sorted(echoes) in ([1, 2, 3, 4, 5], [2, 3, 4, 5]), (left, echoes)
        assert [p for p in left.packets if p in echoes.values()] == list(echoes.values())
        assert left.unsendable == 0
        assert queues.queued() == [], "frames were left on the tap"

        sent = run_in_netns(rig.lab.a.netns, lambda: resend(list(echoes.values())))
        assert sent == len(echoes)
        deadline = time.monotonic() + 5
        while not queues.queued() and time.monotonic() < deadline:
            time.sleep(0.02)
        again = _echo_requests(queues.take_leftovers().packets)
        assert sorted(again) == sorted(echoes), "resent packets did not reach the tap"
        assert {seq: pkt[20:] for seq, pkt in again.items()} == {
            seq: pkt[20:] for seq, pkt in echoes.items()
        }, "ICMP bytes changed on the way"

        run_in_netns(rig.lab.a.netns, lambda: resend(list(again.values())))
        qmp(rig.src.qmp_path, "cont")
        assert queues.wait_empty(10.0) == [], "the resumed VM did not read the resent packets"
    finally:
        queues.close()


def _drain_a_full_tap(rig, stop_after_mark: bool) -> tuple[bool, float, str, list[bytes], dict]:
    """Pause the pod's VM through QMP, pile 5 pings up on its tap, run the source's
    drain, and return (paused, seconds waited, log, packets it sent on, echo requests
    still on the tap afterwards).  With `stop_after_mark` the STOP comes after the
    drain's event mark, as when QEMU pauses the VM by itself during the drain; without,
    the drain sees a VM that simply does not read (a slow guest, at its extreme)."""
    import asyncio
    import io

    from katamaran.config import Config
    from katamaran.progress import Progress
    from katamaran.qmp import Monitor
    from katamaran.source import SourceMigration

    assert rig.src.pid is not None
    warm = rig.lab.run("a", ["ping", "-c", "1", "-W", "5", VM_IP], capture_output=True)
    assert warm.returncode == 0, "the VM does not answer ping"
    log = io.StringIO()
    sent: list[bytes] = []

    def resend(packets: list[bytes]) -> int:  # what the tunnel's rule would carry
        sent.extend(packets)
        return len(packets)

    async def drain() -> tuple[bool, float, dict]:
        mon = Monitor(rig.src.qmp_path, 30)
        await mon.connect()
        source = SourceMigration(
            Config(mode="source", vm_ip=ip_address(VM_IP), tap_drain_timeout=30.0),
            mon,
            Progress(log),
        )
        source.tunnel = types.SimpleNamespace(ifname="kmr-test", ready=True)
        source.hold = tapqueue.Hold(send=resend)
        source.taps = TapQueues.of(rig.src.pid)
        try:
            if not stop_after_mark:
                await mon.execute("stop")
            mark = mon.mark()
            if stop_after_mark:
                await mon.execute("stop")
            ping = ["ping", "-c", "5", "-i", "0.05", "-W", "1", VM_IP]
            await asyncio.to_thread(rig.lab.run, "a", ping, capture_output=True)
            assert source.taps.queued() == ["tap0_kata"], "no frame waited on the tap"
            t0 = time.monotonic()
            paused = await source._drain_taps(mark)
            waited = time.monotonic() - t0
            assert sent == [], "sent before the switch"
            source.hold.release()  # as at the STOP, once traffic is switched
            assert source.taps is not None and source.taps.fds, "the drain closed the watcher"
            left = _echo_requests(source.taps.take_leftovers().packets)
            return paused, waited, left
        finally:
            if source.taps is not None:
                source.taps.close()
            await mon.execute("cont")
            await mon.close()

    paused, waited, left = asyncio.run(drain())
    return paused, waited, log.getvalue(), sent, left


def test_the_drain_takes_the_frames_itself_and_sends_them_on(rig_factory):
    """The drain does not wait for the VM to read its tap: it takes the frames off it
    and keeps them for the tunnel, in order, even from a VM that reads nothing.

    Regression: the drain waited for the VM to read; a nested TCG guest took tens of ms,
    QEMU paused it meanwhile (nothing dirty), and the paused QEMU parked the oldest
    queued frame in its own net queue, where it died: 1 ping lost in CI's e2e.
    """
    rig = rig_factory(kata_pod=True)
    rig.up()
    paused, waited, log, sent, left = _drain_a_full_tap(rig, stop_after_mark=False)
    echoes = _echo_requests(sent)
    # The paused QEMU parked the first ping (see the test above); the other 4 are sent.
    assert sorted(echoes) in ([1, 2, 3, 4, 5], [2, 3, 4, 5]), (log, echoes)
    assert [p for p in sent if p in echoes.values()] == list(echoes.values()), "reordered"
    assert left == {}, "frames were left on the tap"
    assert not paused, log
    assert waited < 5, f"the drain waited {waited:.1f} s for a VM that reads nothing"
    assert "tap0_kata drained in" in log
    line = f"{len(echoes)} packet(s) the VM had not read from tap0_kata taken for kmr-test"
    assert line in log, log


def test_the_drain_ends_when_qemu_pauses_the_vm_by_itself(rig_factory):
    """An idle guest leaves QEMU nothing to copy, so QEMU pauses it by itself while the
    source still drains its tap.  That STOP must end the drain at once, with the frames
    not yet taken still watched (the STOP handling forwards them).

    Regression: the wait ignored the STOP and held the paused VM for the whole
    -tap-drain-timeout; the nested e2e in CI saw a 30.6 s downtime and lost 436 pings.
    """
    rig = rig_factory(kata_pod=True)
    rig.up()
    paused, waited, log, sent, left = _drain_a_full_tap(rig, stop_after_mark=True)
    assert paused, log
    assert waited < 5, f"the drain waited {waited:.1f} s for a paused VM"
    assert "QEMU paused the VM by itself" in log
    assert "still held frames for the VM after" not in log
    # Whether the drain took some before it saw the STOP or not: every ping is either
    # sent on or still on the tap for the STOP handling, none twice.
    echoes = _echo_requests(sent)
    assert not set(echoes) & set(left), (echoes, left)
    assert sorted({**echoes, **left}) in ([1, 2, 3, 4, 5], [2, 3, 4, 5]), (log, echoes, left)


def test_no_tap_means_nothing_to_watch():
    """A process without tun fds (this test itself) yields an empty watcher."""
    import os

    queues = TapQueues.of(os.getpid())
    assert queues.fds == {} and queues.queued() == [] and queues.wait_empty(0.1) == []


def test_switchover_mode_follows_qemu_version_and_accelerator(tmp_path):
    """katamaran decides the pause only where extra RAM passes are safe (KVM or 9.0+)."""
    import asyncio

    from katamaran import migration
    from katamaran.qmp import Monitor

    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-accel", "tcg", "-display", "none"]
        + ["-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_path(sock, 30, qemu)

        async def ask() -> tuple[bool, tuple[int, int]]:
            mon = Monitor(sock, 30)
            await mon.connect()
            try:
                version = (await mon.execute("query-version"))["qemu"]
                reliable = await migration.tcg_dirty_tracking_is_reliable(mon)
                return reliable, (version["major"], version["minor"])
            finally:
                await mon.close()

        reliable, version = asyncio.run(ask())
        assert reliable == (version >= (9, 0)), (version, reliable)
    finally:
        qemu.kill()
        qemu.wait()


def _tap_reads(netns: str, tap: str) -> int:
    """Frames user space has read off `tap` (the tun driver counts them as tx)."""
    from pytest_katamaran.net.hostlab import ipr

    with ipr(netns) as ip:
        link = ip.get_links(ifname=tap)[0]
        return int(link.get_attr("IFLA_STATS64")["tx_packets"])


def test_qemu_reads_no_tap_frame_between_stop_and_pre_switchover(rig_factory):
    """Why katamaran takes the tap at STOP before it asks QEMU anything: from the
    migration's STOP until `pre-switchover` QEMU holds its big lock (it drains and
    flushes the disks) and its main loop reads nothing off the tap; once it runs again,
    it reads one frame for the paused VM and parks it, out of anyone's reach.

    The drain is held deterministically: the destination's NBD goes through a relay that
    is frozen (SIGSTOP) before the migration starts, so the mirror's in-flight writes,
    and QEMU's drain at STOP, wait until it is thawed.
    """
    import signal

    from pytest_katamaran.lab.local import wait_for_text
    from tests.integration.test_faults import nbd_relay, wait_migration

    rig = rig_factory(kata_pod=True, writer=True)  # the writer keeps mirror writes in flight
    rig.up()
    assert rig.src.pid is not None and rig.pod is not None
    warm = rig.lab.run("a", ["ping", "-c", "1", "-W", "5", VM_IP], capture_output=True)
    assert warm.returncode == 0, "the VM does not answer ping"
    rig.start_dest("-nbd-port", "10810")
    relay = nbd_relay(rig)
    source = rig.start_source("10.0.0.2", "-switchover-timeout", "120")
    wait_for_text(rig.tmp / "source.log", "storage synchronized", 60, source)
    source.send_signal(signal.SIGSTOP)  # before `migrate`: the STOP is still to come
    relay.send_signal(signal.SIGSTOP)
    source.send_signal(signal.SIGCONT)
    queues = TapQueues.of(rig.src.pid)
    try:
        # This lab has no tunnel, so katamaran leaves the pause to QEMU and, at STOP,
        # only says so; its query-status then waits for QEMU's big lock like anything else.
        wait_for_text(rig.tmp / "source.log", "VM paused", 60, source)
        reads = _tap_reads(rig.pod.netns, "tap0_kata")
        ping = ["ping", "-c", "5", "-i", "0.05", "-W", "1", VM_IP]
        lost = rig.lab.run("a", ping, capture_output=True, text=True)
        assert lost.returncode != 0, f"the VM answered while QEMU was pausing it: {lost.stdout}"
        # ping waited 1 s for the last answer: time enough for a running main loop
        assert _tap_reads(rig.pod.netns, "tap0_kata") == reads, "QEMU read its tap while held"
        assert queues.queued() == ["tap0_kata"], "the pings are not on the tap"

        relay.send_signal(signal.SIGCONT)
        wait_migration(rig.src, "completed", 120)
        assert rig.finish(source, 60) == 0, rig.log("source.log")
        # Running again, QEMU read exactly one frame for the VM it had paused, and
        # stopped reading: that frame is parked in QEMU and dies with it.
        assert _tap_reads(rig.pod.netns, "tap0_kata") == reads + 1
        left = _echo_requests(queues.take_leftovers().packets)
        assert sorted(left) in ([2, 3, 4, 5], [1, 2, 3, 4, 5]), left
    finally:
        queues.close()
        relay.send_signal(signal.SIGCONT)
