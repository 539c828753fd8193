"""Divert: from the switchover on, frames the pod network still hands to the source VM's
tap go to katamaran instead, and on through the tunnel.

Why: the switch is one policy rule on the node, but a frame the node routed to the pod
just before it (in a backlog, a qdisc, a softirq a busy node runs late) reaches the tap
after it: a straggler.  If QEMU pauses the VM at that moment, it reads the straggler off
the tap and parks it in its own net queue, which dies with the source QEMU: lost (1 ping,
twice, in CI on 2026-11-30).  Draining the tap cannot close this, since the drain has to
end before the pause and a straggler may come later.  Taking the tap's feed away can.

How: Kata's tcfilter feeds the tap from the pod's eth0 (ingress qdisc, u32 filter,
mirred redirect to the tap).  Diverting adds one filter ahead of Kata's (prio 1) on that
device, redirecting everything to a veth pair of this migration's own whose other end is
in katamaran's namespace; katamaran reads that end (AF_PACKET) and resends the VM's IP
packets there, where the switched rule routes them into the tunnel.  Adding and deleting
a filter is atomic and leaves Kata's filter, the tap and its qdiscs untouched (replacing
a qdisc on the live path drops what is sent meanwhile: see network.PlugQdisc).  Where no
tc redirect feeds the tap (a bridge, macvtap), nothing is diverted and the caller says so.

The divert must go before the switch is undone: with the node routing the VM's address
to the pod again, resent packets would come straight back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .config import IPAddress
from .names import divert_names
from .network import NetworkUnavailable, _quiet, _sysctl_dev, _sysctl_path, mirred_redirect
from .tapqueue import destination, frame_to_packet

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
DIVERT_PRIO = 1  # ahead of Kata's filter (the kernel's automatic 49152)
INGRESS = 0xFFFF0000
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
PACKET_STATISTICS = 6
SETTLE_S = 0.5  # the longest a give-back waits for diverted frames still on their way
VNET_HDR_LEN = 10  # struct virtio_net_hdr, what PACKET_VNET_HDR prepends
MAX_FRAME = 65536 + 64


class NetnsIPRoute:
    """An IPRoute whose calls all run in one thread of its own, which has joined the
    network namespace at `path` (QEMU's: /proc/<pid>/ns/net).

    Why a thread: pyroute2 keeps one netlink socket per thread, made on first use in
    that thread's namespace, so the object must stay in the thread that joined.  Not
    pyroute2's netns=, which forks a child to make each socket: a forked child that
    gets SIGTERM writes it to asyncio's signal wakeup fd, which it shares with
    katamaran, and katamaran took it for its own (the e2e source aborted with
    "SIGTERM" right after it prepared the divert)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._joined = False
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katamaran-netns")
        try:
            self._ipr: IPRoute = self._run(IPRoute)
        except BaseException:
            self._exec.shutdown()
            raise

    def _join(self) -> None:
        if self._joined:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _LIBC.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.path}): {os.strerror(err)}")
        finally:
            os.close(fd)
        self._joined = True

    def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        def call() -> T:
            self._join()
            result = fn(*args, **kwargs)
            if isinstance(result, Iterator):  # a lazy dump reads the socket: here
                return list(result)  # type: ignore[return-value]
            return result

        return self._exec.submit(call).result()

    def __getattr__(self, name: str) -> Callable[..., object]:
        method = getattr(self._ipr, name)
        return lambda *args, **kwargs: self._run(method, *args, **kwargs)

    def close(self) -> None:
        try:
            self._run(self._ipr.close)
        finally:
            self._exec.shutdown()


def _walk(msg: object) -> Iterator[tuple[str, object]]:
    """Every (name, value) of a pyroute2 message, nested attributes included."""
    attrs = msg.get("attrs", []) if hasattr(msg, "get") else []
    for name, value in attrs or []:
        yield name, value
        if isinstance(value, list):
            for item in value:
                yield from _walk(item)
        elif hasattr(value, "get") and not isinstance(value, (str, bytes)):
            yield from _walk(value)


def _match_all() -> dict[str, object]:
    """u32 match-all keys, as Kata's own filter has them."""
    return {"protocol": ETH_P_ALL, "target": 0, "keys": ["0x0/0x0+0"]}


def _del_filter(pod: NetnsIPRoute, index: int) -> bool:
    """Delete our prio-1 filter on `index` only.  The kind is required: without it
    pyroute2 sends prio 0, which deletes every filter there, Kata's too (seen)."""
    return _quiet(
        pod.tc, "del-filter", "u32", index=index, parent=INGRESS, prio=DIVERT_PRIO, **_match_all()
    )


def redirect_targets(msg: object) -> list[int]:
    """The ifindexes a tc filter's mirred actions send packets to."""
    return [int(v["ifindex"]) for n, v in _walk(msg) if n == "TCA_MIRRED_PARMS"]  # type: ignore[index]


@dataclass
class Stats:
    frames: int = 0  # diverted frames read
    forwarded: int = 0  # IP packets for the VM sent on
    not_ip: int = 0  # ARP and the like
    other: int = 0  # IP, not for -vm-ip (multicast, another address): not tunnelled
    unsendable: int = 0  # for the VM, but GSO, malformed or over the route's MTU: lost


@dataclass
class TapDivert:
    """The divert for one tap of the VM whose QEMU is `pid` (its network namespace)."""

    pid: int
    tap: str
    vm_ip: IPAddress
    ipr: IPRoute = field(default_factory=IPRoute)  # katamaran's namespace
    pod: NetnsIPRoute | None = None  # QEMU's namespace
    sources: list[int] = field(default_factory=list)  # devices feeding the tap (pod)
    target: int = 0  # the pod's end of the veth
    feeds: list[int] = field(default_factory=list)  # devices with our filter on
    stats: Stats = field(default_factory=Stats)
    installed: bool = False
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _own_mac: bytes = b""
    _forward: Callable[[list[bytes]], int] | None = None
    error: OSError | None = None  # what stopped the pump, if anything
    settled: bool | None = None  # the last give-back read every frame the veth carried
    _delivered: int = 0  # frames the kernel handed the socket, both ways (see _settle)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.mine, self.peer = divert_names(self.vm_ip, self.tap)

    def _pod(self) -> NetnsIPRoute:
        if self.pod is None:
            try:
                self.pod = NetnsIPRoute(f"/proc/{self.pid}/ns/net")
            except OSError as err:
                raise NetworkUnavailable(
                    f"cannot enter QEMU's network namespace (pid {self.pid}): {err.strerror or err}"
                ) from None
        return self.pod

    def _feeds_of(self, target: int) -> list[tuple[int, int]]:
        """(device, prio) of each ingress filter in the pod that redirects to `target`."""
        found = []
        pod = self._pod()
        for link in pod.get_links():
            try:
                filters = pod.get_filters(index=link["index"], parent=INGRESS)
            except NetlinkError:
                continue  # no ingress qdisc on it
            for msg in filters:
                if target in redirect_targets(msg):
                    found.append((link["index"], msg["info"] >> 16))
        return sorted(set(found))

    def remove_stale(self) -> list[str]:
        """What a killed earlier run for this VM left: its filters (also one whose veth
        is gone: it would drop the VM's traffic), then its veth."""
        removed = []
        pod = self._pod()
        links = {link["index"] for link in pod.get_links()}
        peer = pod.link_lookup(ifname=self.peer)
        for link in links:
            try:
                filters = pod.get_filters(index=link, parent=INGRESS)
            except NetlinkError:
                continue
            for msg in filters:
                targets = set(redirect_targets(msg))
                if msg["info"] >> 16 != DIVERT_PRIO or not targets:
                    continue
                if (peer and peer[0] in targets) or not targets & links:
                    if _del_filter(pod, link):
                        removed.append(f"divert filter on ifindex {link}")
        for name, ipr in ((self.mine, self.ipr), (self.peer, pod)):
            if ipr.link_lookup(ifname=name) and _quiet(ipr.link, "del", ifname=name):
                removed.append(f"veth {name}")
        return removed

    def prepare(self, forward: Callable[[list[bytes]], int]) -> None:
        """Everything but the switch, ahead of time (the STOP path runs `divert` while
        the VM is paused): find the tc filters feeding the tap, make the veth, start
        reading it.  `forward` gets the VM's IP packets, in a thread of ours, as they
        come.  NetworkUnavailable, with nothing left changed, when no tc redirect feeds
        the tap or a piece is missing."""
        pod = self._pod()
        tap = pod.link_lookup(ifname=self.tap)
        if not tap:
            raise NetworkUnavailable(f"{self.tap} not found in QEMU's network namespace")
        feeds = self._feeds_of(tap[0])
        if not feeds:
            raise NetworkUnavailable(f"no tc redirect feeds {self.tap} (not Kata's tcfilter)")
        if any(prio <= DIVERT_PRIO for _, prio in feeds):
            raise NetworkUnavailable(f"a filter feeding {self.tap} already has prio 1")
        try:
            self._make_veth()
            self._open_socket()
            self._bring_up()
            self.target = pod.link_lookup(ifname=self.peer)[0]
        except Exception as err:  # noqa: BLE001 - whatever failed, nothing stays changed
            self.remove()
            raise NetworkUnavailable(f"cannot prepare a divert for {self.tap}: {err}") from None
        self.sources = sorted({index for index, _ in feeds})
        self._forward = forward
        self._thread = threading.Thread(target=self._pump, name="katamaran-divert", daemon=True)
        self._thread.start()

    def divert(self) -> None:
        """From now on, what the pod would hand the tap comes to katamaran: one filter
        per feeding device, ahead of Kata's.  Once: the STOP handling asks again."""
        if self.installed:
            return
        pod = self._pod()
        for index in self.sources:
            pod.tc(
                "add-filter",
                "u32",
                index=index,
                parent=INGRESS,
                prio=DIVERT_PRIO,
                action=mirred_redirect(self.target),
                **_match_all(),
            )
            self.feeds.append(index)
        self.installed = True

    def _make_veth(self) -> None:
        self.ipr.link("add", ifname=self.mine, kind="veth", peer=self.peer)
        dev = _sysctl_dev(self.mine)
        try:  # no address, no solicitation: this end only listens
            _sysctl_path(f"net.ipv6.conf.{dev}.disable_ipv6").write_text("1")
        except OSError:
            pass  # no IPv6 on this node
        nsfd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            peer = self.ipr.link_lookup(ifname=self.peer)[0]
            if os.stat(f"/proc/{self.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
                self.ipr.link("set", index=peer, net_ns_fd=nsfd)
        finally:
            os.close(nsfd)

    def _bring_up(self) -> None:
        """Both ends up, once the socket listens: from then on it sees every frame the
        veth counts (see _settle)."""
        pod = self._pod()
        self.ipr.link("set", index=self.ipr.link_lookup(ifname=self.mine)[0], arp="off", state="up")
        peer = pod.get_links(pod.link_lookup(ifname=self.peer)[0])[0]
        pod.link("set", index=peer["index"], arp="off", state="up")
        # what the pod's end sends itself (IPv6 solicitations) is not the VM's
        self._own_mac = bytes.fromhex(peer.get_attr("IFLA_ADDRESS").replace(":", ""))

    def _open_socket(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            # checksum-partial frames come with where their checksum goes, GSO ones marked
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.bind((self.mine, ETH_P_ALL))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def _pump(self) -> None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(50):
                try:
                    self.take()
                except OSError as err:  # a raw socket refused: reported at removal
                    self.error = err

    def take(self) -> int:
        """Read what has arrived and send the VM's packets on; the number of frames."""
        with self._lock:
            if self._sock is None or self._forward is None:
                return 0
            packets: list[bytes] = []
            frames = 0
            while True:
                try:
                    frame, addr = self._sock.recvfrom(MAX_FRAME)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as err:
                    if err.errno == errno.ENETDOWN:
                        break
                    raise
                src = frame[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12]
                if addr[2] == PACKET_OUTGOING or src == self._own_mac:
                    continue  # sent by one of the pair's own ends
                frames += 1
                version, packet = frame_to_packet(frame, VNET_HDR_LEN)
                if packet is None:
                    if version:
                        self.stats.unsendable += 1
                    else:
                        self.stats.not_ip += 1
                    continue
                if destination(packet) != self.vm_ip:
                    self.stats.other += 1  # the VM's other addresses, multicast: not tunnelled
                    continue
                packets.append(packet)
            self.stats.frames += frames
            if packets:
                sent = self._forward(packets)
                self.stats.forwarded += sent
                self.stats.unsendable += len(packets) - sent
            return frames

    def undivert(self) -> None:
        """Give the tap its feed back, ready to divert it again (the source gives the VM
        its packets back when RAM does not converge soon after the gate, see gate).
        Frames already diverted are read and sent on first."""
        self._drop_filters()
        self._settle()
        self._take_rest()
        self.installed = False

    def remove(self) -> None:
        """Give the tap its feed back (filter first), then drop the veth.  Frames already
        diverted are read and sent on first."""
        self._drop_filters()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._settle()
        self._take_rest()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        _quiet(self.ipr.link, "del", ifname=self.mine)  # and its peer in the pod
        self.installed = False

    def _drop_filters(self) -> None:
        pod = self._pod()
        for index in self.feeds:
            _del_filter(pod, index)
        self.feeds.clear()

    def _settle(self) -> None:
        """Once the filters are gone, wait until every frame the veth carried has reached
        the socket, reading as they come (at most SETTLE_S).

        Why: a frame redirected just before the filter went sits in a CPU's backlog
        until its softirq runs, which on a busy nested node comes after the last read:
        that frame was lost with the socket (the hold fault suite lost 1 ping so in 2 of
        6 gate cases).  The veth counts a frame when the pod's end sends it; the socket
        (PACKET_STATISTICS) when the kernel hands it over, read or dropped: equal
        counts mean nothing is on its way."""
        if not self.installed and not self.feeds and self._sock is None:
            return
        deadline = time.monotonic() + SETTLE_S
        while True:
            carried = self._carried()
            delivered = self._count_delivered()
            if carried is None or delivered is None:
                self.settled = None
                return
            if delivered >= carried:
                self.settled = True
                return
            if time.monotonic() >= deadline:
                self.settled = False
                return
            self._take_rest()
            time.sleep(0.001)

    def _carried(self) -> int | None:
        """Frames through our veth end, both ways (its counters); None if unreadable."""
        try:
            found = self.ipr.link_lookup(ifname=self.mine)
            stats = self.ipr.get_links(found[0])[0].get_attr("IFLA_STATS64") if found else None
        except (NetlinkError, OSError):
            return None
        return int(stats["rx_packets"]) + int(stats["tx_packets"]) if stats else None

    def _count_delivered(self) -> int | None:
        """Frames the kernel has handed the socket so far, read or dropped (it resets its
        counts on each read, so they are summed here); None without a socket."""
        with self._lock:
            if self._sock is None:
                return None
            try:
                raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            except OSError:
                return None
            packets, _drops = struct.unpack("II", raw)  # packets includes the drops
            self._delivered += packets
            return self._delivered

    def _take_rest(self) -> None:
        """What came before the filter went."""
        try:
            self.take()
        except OSError as err:
            self.error = err

    def close(self) -> None:
        self.ipr.close()
        if self.pod is not None:
            self.pod.close()
            self.pod = None
