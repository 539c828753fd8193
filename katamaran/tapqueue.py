"""The source VM's tap queues: take what the VM has not read, forward it through the tunnel.

Why: once QEMU pauses the VM, frames the kernel had already queued on the tap (the tun
ring) would die with the source QEMU: the tunnel only catches what arrives *after* the
switch.  Worse, a paused QEMU still reads the first frame waiting on its tap (its tap
handler reads before it asks whether the NIC can receive) and parks it in its own net
queue, which is neither migrated nor reachable from outside: that frame is lost.  So the
tap must be empty when the VM pauses, and a slow guest (nested TCG) takes tens of ms to
empty it, long enough for QEMU to pause it by itself meanwhile (it does so whenever no
page is dirty).  katamaran therefore diverts the tap's feed first (see divert), then takes
the queued frames off the tap itself, the VM still running (drain), and keeps them, as
IP packets (Hold), past the pause, until migrate-continue is sent: then traffic is
switched into the tunnel and they go first, ahead of the newer ones.  Whatever is still
queued when the VM pauses is read off and kept the same way (take_leftovers).

How: QEMU's pid comes from the QMP socket (SO_PEERCRED); its tap fds are the
`/dev/net/tun` entries of `/proc/<pid>/fd` (fdinfo names the interface); `pidfd_getfd(2)`
gives katamaran a duplicate of each (the same queue: each frame is read by one side
only), on which poll(POLLIN) says whether a frame is still queued.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

SYS_PIDFD_GETFD = 438  # x86_64, arm64 and the other generic-syscall architectures
TUN_DEVICE = "/dev/net/tun"
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int)
IFF_VNET_HDR = 0x4000  # QEMU's taps carry a virtio-net header before each frame
VNET_F_NEEDS_CSUM = 1  # the checksum at csum_start + csum_offset is still to be done
ETH_HLEN = 14
ETHERTYPES = {0x0800: 4, 0x86DD: 6}  # IPv4, IPv6: what can be resent as an IP packet
MAX_FRAME = 65536 + 64


class TapQueueUnavailable(Exception):
    """The tap fds cannot be watched (no permission, old kernel, QEMU gone)."""


def tap_fds(pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """QEMU's open tun fds and the interface each one serves: {fd: ifname}."""
    fds: dict[int, str] = {}
    try:
        entries = list((proc / str(pid) / "fd").iterdir())
    except OSError as err:
        raise TapQueueUnavailable(f"cannot list /proc/{pid}/fd: {err.strerror or err}") from None
    for entry in entries:
        try:
            if os.readlink(entry) != TUN_DEVICE:
                continue
            info = (proc / str(pid) / "fdinfo" / entry.name).read_text()
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key == "iff" and value.strip():
                fds[int(entry.name)] = value.strip()
    return fds


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if dup < 0:
        err = ctypes.get_errno()
        raise TapQueueUnavailable(f"pidfd_getfd: {os.strerror(err)}")
    return int(dup)


@dataclass
class Leftovers:
    """Frames taken off the taps (the VM had not read them), oldest first."""

    packets: list[bytes] = field(default_factory=list)  # IP packets, checksums complete
    not_ip: int = 0  # ARP and the like: the destination announces itself anyway
    unsendable: int = 0  # IP, but a GSO super-frame or malformed: lost

    @property
    def frames(self) -> int:
        return len(self.packets) + self.not_ip + self.unsendable

    def merge(self, other: Leftovers) -> None:
        self.packets += other.packets
        self.not_ip += other.not_ip
        self.unsendable += other.unsendable


@dataclass
class Drained:
    """What TapQueues.drain took off the taps while the VM ran."""

    taken: Leftovers = field(default_factory=Leftovers)
    forwarded: int = 0  # packets `forward` sent on
    busy: list[str] = field(default_factory=list)  # queues still holding frames at the end


def _vnet_hdr_len(fd: int) -> int:
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    if not struct.unpack_from("H", ifr, 16)[0] & IFF_VNET_HDR:
        return 0
    return int(struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0])


def _fold(data: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame_to_packet(frame: bytes, vnet_hdr_len: int) -> tuple[int, bytes | None]:
    """(IP version or 0 if not IP, the IP packet or None if it cannot be resent).

    A frame read from a tap with IFF_VNET_HDR starts with a virtio_net_hdr.  A frame the
    host left checksum-partial (NEEDS_CSUM: the field holds the pseudo-header sum) gets
    its checksum completed, as the VM's virtio driver would have; GSO super-frames are
    not resent (bigger than the path MTU; TCP retransmits them).
    """
    flags = gso_type = csum_start = csum_offset = 0
    if vnet_hdr_len:
        if len(frame) < vnet_hdr_len:
            return 0, None
        flags, gso_type, _, _, csum_start, csum_offset = struct.unpack_from("<BBHHHH", frame)
        frame = frame[vnet_hdr_len:]
    if len(frame) <= ETH_HLEN:
        return 0, None
    version = ETHERTYPES.get(int.from_bytes(frame[12:14], "big"), 0)
    if not version or gso_type:
        return version, None
    packet = bytearray(frame[ETH_HLEN:])
    if flags & VNET_F_NEEDS_CSUM:
        start, at = csum_start - ETH_HLEN, csum_start - ETH_HLEN + csum_offset
        if start < 0 or at + 2 > len(packet):
            return version, None
        csum = _fold(packet[start:])
        packet[at : at + 2] = struct.pack("!H", csum or 0xFFFF)
    return version, bytes(packet)


def destination(packet: bytes) -> IPv4Address | IPv6Address | None:
    """The destination address of an IPv4/IPv6 packet (None if neither)."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        return IPv4Address(packet[16:20])
    if version == 6 and len(packet) >= 40:
        return IPv6Address(packet[24:40])
    return None


def resend(packets: list[bytes]) -> int:
    """Send IP packets as they are (header included) from this network namespace, where
    the tunnel's rule routes them to the destination; returns how many were sent (a
    packet the route's MTU refuses, EMSGSIZE, is skipped and not counted)."""
    sent = 0
    socks: dict[int, socket.socket] = {}
    try:
        for packet in packets:
            version = packet[0] >> 4
            if version == 4:
                family, dst = socket.AF_INET, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0)
            elif version == 6:
                family, dst = socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0)
            else:
                continue
            if family not in socks:  # IPPROTO_RAW: the header is ours (IP_HDRINCL)
                socks[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                socks[family].sendto(packet, dst)
            except OSError as err:
                if err.errno != errno.EMSGSIZE:
                    raise
                continue  # bigger than the route's MTU: this one is lost, not the rest
            sent += 1
    finally:
        for sock in socks.values():
            sock.close()
    return sent


class Hold:
    """The VM's packets taken off its tap or diverted from its feed, kept until traffic
    is switched into the tunnel (release), then sent in the order they came; after that,
    sent at once.

    Why not switch first: the switch is one policy rule, and from then on the node's
    reverse-path check finds the VM's address "via the tunnel".  Where the pod's veth
    has strict rp_filter (Calico's Felix sets it on every workload interface, against
    spoofing), every packet the still-running VM sends is dropped: its answers to what
    it read just before the switch, until QEMU pauses it.  tests/integration/test_rpf.py:
    2 of 2 packets from the pod's address dropped (`TcpExtIPReversePathFilter`), none
    with rp_filter 0.  So katamaran takes the tap's feed and queue while the VM runs,
    and switches only once QEMU has paused it, and where it can only once
    migrate-continue is sent (Source._keeps_to_commit).

    If the migration is given up instead, release() (after the switch, if any, is
    undone) gives the packets back: resent on the node, they reach the VM's tap again.

    Order: frames taken off the tap (`older=True`) were queued before the divert went
    in, so they go before every diverted one, whichever was read first (in the nested
    e2e, a 143 ms drain beside the divert had ping count 4 replies reordered).
    """

    def __init__(self, send: Callable[[list[bytes]], int] = resend) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._older: list[bytes] = []
        self._newer: list[bytes] = []
        self.released = False

    def __call__(self, packets: list[bytes], older: bool = False) -> int:
        """Hold (or, once released, send) `packets`; how many were taken or sent."""
        with self._lock:
            if not self.released:
                (self._older if older else self._newer).extend(packets)
                return len(packets)
            return self._send(packets) if packets else 0

    @property
    def held(self) -> int:
        return len(self._older) + len(self._newer)

    def release(self) -> tuple[int, int]:
        """Send what is held, oldest first, and whatever comes later at once:
        (held, sent)."""
        with self._lock:
            held = self._older + self._newer
            self._older, self._newer = [], []
            self.released = True
            return len(held), self._send(held) if held else 0

    def keep(self) -> None:
        """Keep again what comes from now on (after a release that gave packets back)."""
        with self._lock:
            self.released = False


@dataclass
class TapQueues:
    """Duplicates of a QEMU's tap fds: polled while the VM runs, read once it is paused."""

    pid: int
    fds: dict[int, str] = field(default_factory=dict)  # our duplicate fd -> ifname

    @classmethod
    def of(cls, pid: int) -> TapQueues:
        found = tap_fds(pid)
        queues = cls(pid)
        if not found:
            return queues
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as err:
            raise TapQueueUnavailable(f"pidfd_open({pid}): {err.strerror or err}") from None
        try:
            for fd, ifname in found.items():
                queues.fds[_pidfd_getfd(pidfd, fd)] = ifname
        except TapQueueUnavailable:
            queues.close()
            raise
        finally:
            os.close(pidfd)
        return queues

    @property
    def names(self) -> list[str]:
        return sorted(set(self.fds.values()))

    def queued(self) -> list[str]:
        """Interfaces that still hold at least one frame for the VM."""
        return sorted({self.fds[fd] for fd, ev in self._poll(0) if ev & select.POLLIN})

    def wait_empty(
        self, timeout: float, settle: float = 0.02, cancel: threading.Event | None = None
    ) -> list[str]:
        """Block until every queue is seen empty twice, `settle` s apart; [] on success,
        else the interfaces still holding frames when `timeout` ran out or `cancel` was
        set."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.queued()
            if not busy:
                time.sleep(settle)  # QEMU may be between two reads: look once more
                busy = self.queued()
                if not busy:
                    return []
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                return busy
            time.sleep(0.005)

    def drain(
        self,
        forward: Callable[[list[bytes]], int],
        timeout: float,
        settle: float = 0.02,
        cancel: threading.Event | None = None,
    ) -> Drained:
        """Take every frame off the taps while the VM runs, handing the IP packets to
        `forward` as they come, until no frame has arrived for `settle` s (frames still
        on their way through the node's qdiscs when traffic was switched land late).

        `timeout` or `cancel` (set when QEMU pauses the VM: take_leftovers then reads
        the rest) end it early, with `busy` naming the queues that still hold frames.
        """
        deadline = time.monotonic() + timeout
        done = Drained()
        while True:
            left = self.take_leftovers()
            done.taken.merge(left)
            if left.packets:
                done.forwarded += forward(left.packets)
            now = time.monotonic()
            if now >= deadline or (cancel is not None and cancel.is_set()):
                done.busy = self.queued()
                return done
            if not self._readable(min(settle, deadline - now)):
                return done

    def _readable(self, timeout: float) -> bool:
        """Whether a frame arrives on any queue within `timeout` s."""
        return bool(self._poll(max(0, int(timeout * 1000))))

    def _poll(self, timeout_ms: int) -> list[tuple[int, int]]:
        """poll(POLLIN) over every queue; [] at once when there is none."""
        if not self.fds:
            return []
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        return poller.poll(timeout_ms)

    def take_leftovers(self, limit: int = 100_000) -> Leftovers:
        """Read every frame queued now (QEMU may read some of them first if the VM runs)."""
        left = Leftovers()
        for fd in self.fds:
            hdr = _vnet_hdr_len(fd)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while poller.poll(0) and limit > 0:
                try:
                    frame = os.read(fd, MAX_FRAME)
                except BlockingIOError:
                    break  # QEMU's fds are non-blocking; someone read it first
                limit -= 1
                version, packet = frame_to_packet(frame, hdr)
                if packet is not None:
                    left.packets.append(packet)
                elif version:
                    left.unsendable += 1
                else:
                    left.not_ip += 1
        return left

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
