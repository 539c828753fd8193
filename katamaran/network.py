"""Kernel-side cutover pieces, over netlink (pyroute2): tunnel, policy route, plug qdisc.

Source: an IPIP (or ip6tnl) tunnel to the destination and a policy rule that sends the
VM's address into it. A rule, not a route: the node's own route to the VM (its CNI's)
is never touched, so dropping the rule hands traffic straight back to whatever the CNI
has converged to meanwhile — and on an aborted migration, to the original route.

Destination: decapsulate tunnelled packets (the fallback `tunl0`/`ip6tnl0` devices),
steer them into the VM's tap with a rule keyed on the tunnel device, and hold them
there with `sch_plug` until the VM runs.

Every object has a fixed name/number derived from its inputs, so a second run after a
crash finds and removes the first run's leftovers.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .config import IPAddress

T = TypeVar("T")

# pyroute2's synchronous API drives an event loop of its own, which cannot run inside
# ours: every netlink call goes through this one thread, in order.
_NETLINK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katamaran-netlink")


async def netlink(fn: Callable[..., T], *args: object) -> T:
    """Run one (blocking, ordered) netlink operation off the asyncio thread."""
    return await asyncio.get_running_loop().run_in_executor(_NETLINK, fn, *args)


NUD_REACHABLE = 0x02
NUD_PERMANENT = 0x80
RULE_PRIORITY = 90  # ahead of the main table (32766) and of most CNIs' rules
TABLE_BASE = 0x6B00  # "k"; table ids 27392..28415 are ours


def _tag(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x3FF


def tunnel_name(dest_ip: IPAddress) -> str:
    """`kmr-<hex>`: unique per destination, at most 15 characters."""
    return f"kmr-{zlib.crc32(str(dest_ip).encode()):08x}"


def _family(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _plen(ip: IPAddress) -> int:
    return 128 if ip.version == 6 else 32


def _quiet(call: object, *args: object, **kwargs: object) -> bool:
    """Run a netlink delete; True if it removed something, False if it was not there."""
    try:
        call(*args, **kwargs)  # type: ignore[operator]
        return True
    except NetlinkError as err:
        if err.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL):
            return False
        raise


class NetworkUnavailable(Exception):
    """The kernel lacks a piece (ipip, sch_plug...): the caller warns and goes on."""


@dataclass
class SourceTunnel:
    """The source's half of the cutover: tunnel device now, rule at switch time."""

    dest_ip: IPAddress
    vm_ip: IPAddress
    ipr: IPRoute = field(default_factory=IPRoute)
    ifname: str = ""
    table: int = 0
    switched: bool = False
    ready: bool = False

    def __post_init__(self) -> None:
        self.ifname = tunnel_name(self.dest_ip)
        self.table = TABLE_BASE + _tag(self.vm_ip)

    def _rule_args(self) -> dict[str, object]:
        return {
            "family": _family(self.vm_ip),
            "dst": str(self.vm_ip),
            "dst_len": _plen(self.vm_ip),
            "table": self.table,
            "priority": RULE_PRIORITY,
        }

    def remove_stale(self) -> list[str]:
        """Remove what a crashed earlier run for this VM/destination left behind."""
        removed = []
        while _quiet(self.ipr.rule, "del", **self._rule_args()):
            removed.append(f"rule to {self.vm_ip}")
        if self.ipr.link_lookup(ifname=self.ifname):
            self.ipr.link("del", ifname=self.ifname)
            removed.append(f"tunnel {self.ifname}")
        return removed

    def prepare(self) -> None:
        """Create the tunnel and its route table ahead of time: the switch is one rule."""
        if self.dest_ip.version == 6:
            kind = "ip6tnl"
            data = {"ip6tnl_remote": str(self.dest_ip), "ip6tnl_proto": 0}
        elif self.vm_ip.version == 6:
            kind = "sit"
            data = {"sit_remote": str(self.dest_ip)}
        else:
            kind = "ipip"
            data = {"ipip_remote": str(self.dest_ip)}
        try:
            self.ipr.link("add", ifname=self.ifname, kind=kind, **data)
        except NetlinkError as err:
            raise NetworkUnavailable(
                f"cannot create {kind} tunnel {self.ifname} to {self.dest_ip}: {err.args[-1]}"
                f" (kernel module {'ip6_tunnel' if kind == 'ip6tnl' else kind} missing?)"
            ) from None
        index = self.ipr.link_lookup(ifname=self.ifname)[0]
        self.ipr.link("set", index=index, state="up")
        self.ipr.route(
            "replace",
            dst=str(self.vm_ip),
            dst_len=_plen(self.vm_ip),
            oif=index,
            table=self.table,
            family=_family(self.vm_ip),
        )
        self.ready = True

    def switch(self) -> None:
        """Send the VM's traffic into the tunnel: one atomic rule insertion."""
        if self.ready and not self.switched:
            self.ipr.rule("add", **self._rule_args())
            self.switched = True

    def unswitch(self) -> None:
        """Give the VM's traffic back to the node's own routing (CNI route)."""
        if self.switched:
            _quiet(self.ipr.rule, "del", **self._rule_args())
            self.switched = False

    def remove(self) -> None:
        self.unswitch()
        if self.ipr.link_lookup(ifname=self.ifname):
            _quiet(self.ipr.link, "del", ifname=self.ifname)  # its table route goes too
        self.ready = False

    def close(self) -> None:
        self.ipr.close()


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


@dataclass
class Sysctls:
    """Set sysctls and put back exactly what was there before."""

    saved: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: str) -> None:
        path = _sysctl_path(name)
        old = path.read_text().strip()
        if old != value:
            path.write_text(value)
            self.saved.setdefault(name, old)

    def restore(self) -> None:
        for name, old in reversed(self.saved.items()):
            try:
                _sysctl_path(name).write_text(old)
            except OSError:
                pass  # the device went away with its sysctls
        self.saved.clear()


def _modprobe(module: str) -> None:
    """Load a module if we can; a kernel without it is reported by the caller."""
    if not Path("/sys/module", module).exists():
        subprocess.run(["modprobe", "-q", module], check=False, capture_output=True)


@dataclass
class DestDecap:
    """Accept tunnelled packets for the VM and route them into its tap."""

    tap: str
    ipr: IPRoute = field(default_factory=IPRoute)
    sysctls: Sysctls = field(default_factory=Sysctls)
    raised: list[int] = field(default_factory=list)
    rules: list[dict[str, object]] = field(default_factory=list)
    table: int = 0
    devices: list[str] = field(default_factory=list)
    pinned: dict[str, object] | None = None

    def __post_init__(self) -> None:
        self.table = TABLE_BASE + 0x200 + _tag(self.tap)

    def pin_neighbour(self, vm_ip: IPAddress, mac: str) -> None:
        """A permanent neighbour entry for the VM on its tap, for the cutover.

        Decapsulated packets are routed on-link into the tap; without this the kernel
        must ARP for the VM first, the plug holds that request, and the packets wait in
        the neighbour queue, which the kernel drops after ~3 s of failed resolution.
        """
        index = self.ipr.link_lookup(ifname=self.tap)[0]
        args: dict[str, object] = {
            "dst": str(vm_ip),
            "lladdr": mac,
            "ifindex": index,
            "family": _family(vm_ip),
        }
        self.ipr.neigh("replace", state=NUD_PERMANENT, **args)
        self.pinned = args

    def unpin_neighbour(self) -> None:
        """Hand the entry back to the kernel as an ordinary REACHABLE one, not delete it.

        Deleting it would make the node ARP for the VM at once; a VM still working off
        the backlog of its pause (or a slow one) answers late, and the kernel drops what
        queued behind the request.  A reachable entry ages and re-validates as usual.
        """
        if self.pinned is not None:
            _quiet(self.ipr.neigh, "replace", state=NUD_REACHABLE, **self.pinned)
            self.pinned = None

    def _rule_args(self, device: str, family: int) -> dict[str, object]:
        return {"family": family, "iifname": device, "table": self.table, "priority": 91}

    def remove_stale(self) -> None:
        for device in ("tunl0", "ip6tnl0"):
            for family in (socket.AF_INET, socket.AF_INET6):
                while _quiet(self.ipr.rule, "del", **self._rule_args(device, family)):
                    pass

    def setup(self) -> list[str]:
        """Bring up the fallback tunnel devices; return warnings for what is missing."""
        warnings = []
        tap = self.ipr.link_lookup(ifname=self.tap)
        if not tap:
            raise NetworkUnavailable(f"tap device {self.tap} not found")
        for module, device in (("ipip", "tunl0"), ("ip6_tunnel", "ip6tnl0")):
            _modprobe(module)
            found = self.ipr.link_lookup(ifname=device)
            if not found:
                warnings.append(
                    f"{device} missing (kernel module {module} not available): tunnelled "
                    "packets cannot be decapsulated here"
                )
                continue
            index = found[0]
            link = self.ipr.link("get", index=index)[0]
            if not link["flags"] & 1:
                self.ipr.link("set", index=index, state="up")
                self.raised.append(index)
            self.devices.append(device)
            self.sysctls.set(f"net.ipv4.conf.{device}.rp_filter", "0")
        if not self.devices:
            return warnings
        self.sysctls.set("net.ipv4.conf.all.rp_filter", _loose(self.sysctls, "all"))
        self.sysctls.set("net.ipv4.ip_forward", "1")
        for family in (socket.AF_INET, socket.AF_INET6):
            self.ipr.route(
                "replace",
                dst="default",
                oif=tap[0],
                table=self.table,
                family=family,
            )
        for device in self.devices:
            for family in (socket.AF_INET, socket.AF_INET6):
                args = self._rule_args(device, family)
                self.ipr.rule("add", **args)
                self.rules.append(args)
        return warnings

    def teardown(self) -> None:
        self.unpin_neighbour()
        for args in self.rules:
            _quiet(self.ipr.rule, "del", **args)
        self.rules.clear()
        for family in (socket.AF_INET, socket.AF_INET6):
            _quiet(self.ipr.route, "del", dst="default", table=self.table, family=family)
        for index in self.raised:
            _quiet(self.ipr.link, "set", index=index, state="down")
        self.raised.clear()
        self.sysctls.restore()

    def close(self) -> None:
        self.ipr.close()


def _loose(sysctls: Sysctls, device: str) -> str:
    """Strict reverse-path filtering (1) would drop decapsulated packets; keep 0/2 as is."""
    current = _sysctl_path(f"net.ipv4.conf.{device}.rp_filter").read_text().strip()
    return "2" if current == "1" else current


PLUG_BUFFER = "TCQ_PLUG_BUFFER"
PLUG_RELEASE = "TCQ_PLUG_RELEASE_INDEFINITE"


MIN_FRAME = 60  # bytes of the smallest Ethernet frame (no FCS): the most frames per byte


@dataclass
class PlugQdisc:
    """sch_plug as the tap's root qdisc: pass-through, then hold, then release in order."""

    tap: str
    limit: int
    ipr: IPRoute = field(default_factory=IPRoute)
    index: int = 0
    installed: bool = False

    def _index(self) -> int:
        found = self.ipr.link_lookup(ifname=self.tap)
        if not found:
            raise NetworkUnavailable(f"tap device {self.tap} not found")
        return found[0]

    def _root_kind(self) -> str | None:
        for qdisc in self.ipr.get_qdiscs(index=self.index):
            if qdisc["parent"] == 0xFFFFFFFF:
                return qdisc.get_attr("TCA_KIND")
        return None

    def remove_stale(self) -> bool:
        self.index = self._index()
        if self._root_kind() == "plug":
            self.ipr.tc("del", index=self.index, root=True)
            return True
        return False

    def install(self) -> None:
        self.index = self._index()
        try:
            self.ipr.tc("add", "plug", index=self.index, handle="1:", limit=self.limit)
        except NetlinkError as err:
            raise NetworkUnavailable(
                f"Failed to add plug qdisc on {self.tap}: {err.args[-1]} "
                "(is sch_plug available? `modprobe sch_plug`)"
            ) from None
        self.installed = True
        self._action(PLUG_RELEASE)  # a new plug qdisc starts closed: open it

    def fit_tap_queue(self) -> tuple[int, int] | None:
        """Make the tap's queue (the tun ring, sized by txqueuelen) hold a whole release.

        At RESUME the plug hands everything it held to the tap at once; a tun ring
        shorter than that burst drops the excess.  (old, new) when raised, else None.
        The larger queue is left in place: shrinking it later would drop whatever the
        VM has not read yet.
        """
        link = self.ipr.get_links(self.index)[0]
        old = int(link.get_attr("IFLA_TXQLEN") or 0)
        want = -(-self.limit // MIN_FRAME)
        if old >= want:
            return None
        self.ipr.link("set", index=self.index, txqlen=want)
        return old, want

    def _action(self, action: str) -> None:
        self.ipr.tc("change", "plug", index=self.index, handle="1:", action=action)

    def buffer(self) -> None:
        if self.installed:
            self._action(PLUG_BUFFER)

    def release(self) -> None:
        if self.installed:
            self._action(PLUG_RELEASE)

    def _stat(self, key: str) -> int:
        """One counter of the plug qdisc's TCA_STATS (0 when it is gone)."""
        for qdisc in self.ipr.get_qdiscs(index=self.index):
            if qdisc.get_attr("TCA_KIND") == "plug":
                stats = qdisc.get_attr("TCA_STATS") or {}
                return int(stats.get(key, 0)) if hasattr(stats, "get") else 0
        return 0

    def backlog(self) -> int:
        return self._stat("qlen")

    def drops(self) -> int:
        return self._stat("drop")

    def remove(self, drain_timeout: float = 2.0) -> None:
        """Release, let the queue drain into the tap, then restore the default qdisc."""
        if not self.installed:
            return
        try:
            self.release()
            deadline = time.monotonic() + drain_timeout
            while self.backlog() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.ipr.tc("del", index=self.index, root=True)
        except NetlinkError as err:
            if err.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                raise
        self.installed = False

    def close(self) -> None:
        self.ipr.close()
