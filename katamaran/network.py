"""Kernel-side cutover pieces, over netlink (pyroute2): tunnel, policy route, plug qdisc.

Source: an IPIP (sit, ip6tnl) tunnel to the destination and a policy rule that sends the
VM's address into it. A rule, not a route: the node's own route to the VM (its CNI's)
is never touched, so dropping the rule hands traffic straight back to whatever the CNI
has converged to meanwhile — and on an aborted migration, to the original route.

Destination: decapsulate what the source tunnels (a tunnel device with `remote
<source>`, which the kernel matches before the fallback `tunl0`), steer only packets
for the VM (`iif <tunnel> to <vm-ip>`) into a veth pair of this migration's own, hold
them there with `sch_plug`, and let the veth's peer hand them to the VM's tap (tc
mirred).  The tap itself is never touched: removing the hold cannot drop a packet on
the VM's live path.

The kernel refuses two tunnels of one kind with the same remote and local address, so
a tunnel device is shared per (kind, peer) by every migration to or from that peer,
created and removed under a lock by whichever run needs it first / last.  Everything
else (rules, tables, veths) is named after (peer, VM IP): a second run after a crash
finds and removes its own leftovers and nothing of another migration's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .config import IPAddress
from .lock import lock_file, unlock_file
from .names import crc

T = TypeVar("T")

# pyroute2's synchronous API drives an event loop of its own, which cannot run inside
# ours: every netlink call goes through this one thread, in order.
_NETLINK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katamaran-netlink")


async def netlink(fn: Callable[..., T], *args: object) -> T:
    """Run one (blocking, ordered) netlink operation off the asyncio thread."""
    return await asyncio.get_running_loop().run_in_executor(_NETLINK, fn, *args)


RULE_PRIORITY = 90  # ahead of the main table (32766) and of most CNIs' rules
DECAP_PRIORITY = 91
TABLE_BASE = 0x6B000000  # "k": table ids 0x6B000000..0x6BFFFFFF are ours
TABLE_MASK = 0xFFFFFF
TUNNEL_MTU = 1500  # full-size inner packets; the outer packet is fragmented (pmtudisc off)
# The hold veth's next hop: an address no one has, pinned to the VM's MAC, so that
# packets routed into the veth leave it addressed to the VM without any ARP/ND.
HOLD_GATEWAY = {4: "169.254.107.1", 6: "fe80::6b"}
LOCK_DIR = Path("/run/lock")
KINDS = {"ipip": "kmr-", "sit": "kmrs-", "ip6tnl": "kmr6-"}
MODULES = {"ipip": "ipip", "sit": "sit", "ip6tnl": "ip6_tunnel"}
FALLBACK = {"ipip": "tunl0", "sit": "sit0", "ip6tnl": "ip6tnl0"}


def table_for(role: str, peer: IPAddress | None, vm_ip: IPAddress | None) -> int:
    """A route table id per (role, peer, VM): two migrations never share one."""
    return TABLE_BASE + (crc(role, peer, vm_ip) & TABLE_MASK)


def tunnel_kind(peer: IPAddress, inner_version: int) -> str:
    """ipip (4 in 4), sit (6 in 4), ip6tnl in mode any (4 or 6 in 6)."""
    if peer.version == 6:
        return "ip6tnl"
    return "sit" if inner_version == 6 else "ipip"


def tunnel_name(peer: IPAddress, inner_version: int = 4) -> str:
    """`kmr-<hex>` (ipip), `kmrs-<hex>` (sit), `kmr6-<hex>` (ip6tnl): one per kind and
    peer, shared by every migration to or from that peer; at most 15 characters."""
    return f"{KINDS[tunnel_kind(peer, inner_version)]}{crc(peer):08x}"


def hold_names(peer: IPAddress | None, vm_ip: IPAddress | None) -> tuple[str, str]:
    """The destination's hold veth pair for one migration: (plugged end, tap end)."""
    tag = f"{crc('hold', peer, vm_ip):08x}"
    return f"kmrh-{tag}", f"kmrp-{tag}"


def _family(ip: IPAddress | int) -> int:
    version = ip if isinstance(ip, int) else ip.version
    return socket.AF_INET6 if version == 6 else socket.AF_INET


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


def mirred_redirect(ifindex: int) -> dict[str, object]:
    """The tc action `mirred egress redirect dev <ifindex>` as pyroute2 takes it: every
    packet the filter matches leaves through that device (the hold's veth into the tap
    here; Kata's tcfilter between eth0 and the tap in the lab's pod network)."""
    return {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifindex}


def _modprobe(module: str) -> None:
    """Load a module if we can; a kernel without it is reported by the caller."""
    if not Path("/sys/module", module).exists():
        subprocess.run(["modprobe", "-q", module], check=False, capture_output=True)


@contextlib.contextmanager
def _device_lock(name: str) -> Iterator[None]:
    """Serialise create/reuse/remove of one shared device between katamaran processes."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"katamaran-{name}.lock"
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        unlock_file(path, fd)


def _ours(table: int | None) -> bool:
    return table is not None and TABLE_BASE <= table <= TABLE_BASE + TABLE_MASK


def _rule_table(rule: object) -> int | None:
    table = rule.get_attr("FRA_TABLE")  # type: ignore[attr-defined]
    return int(table) if table is not None else int(rule["table"])  # type: ignore[index]


def _users(ipr: IPRoute, ifname: str, index: int) -> int:
    """How many katamaran rules (iif ifname) and table routes (dev ifname) use a device."""
    count = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        for rule in ipr.get_rules(family=family):
            if _ours(_rule_table(rule)) and rule.get_attr("FRA_IIFNAME") == ifname:
                count += 1
        for route in ipr.get_routes(family=family):
            if _ours(route.get_attr("RTA_TABLE")) and route.get_attr("RTA_OIF") == index:
                count += 1
    return count


def katamaran_rules(ipr: IPRoute) -> int:
    """Rules into katamaran's tables left in this namespace (any migration's)."""
    return sum(
        _ours(_rule_table(rule))
        for family in (socket.AF_INET, socket.AF_INET6)
        for rule in ipr.get_rules(family=family)
    )


def _clear_df(ifname: str) -> str | None:
    """Clear the inner DF bit on the way into an ipip tunnel (tc pedit + csum).

    ipip copies the inner DF bit to the outer header, so a full-size DF packet (1500
    bytes; every TCP segment) cannot be fragmented on the 1500-byte underlay and is
    dropped with "fragmentation needed".  Cleared, the outer packet is fragmented and
    reassembled by the destination before decapsulation.  pyroute2 has no pedit: tc.
    Returns a warning when it cannot be done.
    """
    tc = shutil.which("tc") or "/sbin/tc"
    for module in ("sch_ingress", "act_pedit", "act_csum", "cls_matchall"):
        _modprobe(module)
    steps = (
        [tc, "qdisc", "add", "dev", ifname, "clsact"],
        [tc, "filter", "add", "dev", ifname, "egress", "protocol", "ip", "pref", "1",
         "matchall", "action", "pedit", "ex", "munge", "ip", "df", "set", "0", "pipe",
         "action", "csum", "ip"],
    )  # fmt: skip
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        except OSError as err:
            return f"cannot run tc ({err.strerror})"
        if done.returncode:
            return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "tc failed"
    return None


def _source_address(ipr: IPRoute, peer: IPAddress) -> str:
    """The address this node sends from towards peer (the route's preferred source)."""
    try:
        route = ipr.route("get", dst=str(peer), family=_family(peer))[0]
    except NetlinkError as err:
        raise NetworkUnavailable(f"no route to {peer}: {err.args[-1]}") from None
    src = route.get_attr("RTA_PREFSRC")
    if not src:
        raise NetworkUnavailable(f"no source address towards {peer}")
    return str(src)


def ensure_tunnel(ipr: IPRoute, kind: str, peer: IPAddress, inner: int) -> list[str]:
    """Create (or reuse) the shared tunnel device to/from peer; return warnings.

    MTU 1500 with path-MTU discovery off: a full-size inner packet becomes an outer
    packet the underlay fragments, instead of one the tunnel drops.
    """
    name = tunnel_name(peer, inner)
    _modprobe(MODULES[kind])
    warnings: list[str] = []
    if kind == "ip6tnl":
        # ip6tnl sends only with a local address set (remote-only tunnels only receive)
        data: dict[str, object] = {
            "ip6tnl_remote": str(peer),
            "ip6tnl_local": _source_address(ipr, peer),
            "ip6tnl_proto": 0,  # mode any: IPv4 and IPv6 inside
        }
    else:
        data = {f"{kind}_remote": str(peer), f"{kind}_pmtudisc": 0}
    if not ipr.link_lookup(ifname=name):
        try:
            ipr.link("add", ifname=name, kind=kind, **data)
        except NetlinkError as err:
            if err.code == errno.EEXIST:
                raise NetworkUnavailable(
                    f"cannot create {kind} tunnel {name}: another {kind} tunnel with remote "
                    f"{peer} exists on this node (not katamaran's): remove it or migrate "
                    "without the tunnel"
                ) from None
            raise NetworkUnavailable(
                f"cannot create {kind} tunnel {name} to {peer}: {err.args[-1]}"
                f" (kernel module {MODULES[kind]} missing?)"
            ) from None
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, mtu=TUNNEL_MTU if kind != "ip6tnl" else 1452, state="up")
        if kind == "ipip":
            why = _clear_df(name)
            if why:
                warnings.append(
                    f"cannot clear DF on {name} ({why}): full-size packets with DF set "
                    "are dropped in the tunnel (path MTU 1480)"
                )
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, state="up")
    return warnings


def release_tunnel(ipr: IPRoute, name: str) -> bool:
    """Delete a shared tunnel device once no katamaran rule or route uses it."""
    found = ipr.link_lookup(ifname=name)
    if not found or _users(ipr, name, found[0]):
        return False
    return _quiet(ipr.link, "del", index=found[0])


@dataclass
class SourceTunnel:
    """The source's half of the cutover: tunnel device now, rule at switch time."""

    dest_ip: IPAddress
    vm_ip: IPAddress
    ipr: IPRoute = field(default_factory=IPRoute)
    ifname: str = ""
    kind: str = ""
    table: int = 0
    switched: bool = False
    ready: bool = False
    warnings: list[str] = field(default_factory=list)
    # The device's TX count at the switch, and what it sent while switched (set at
    # unswitch): what went to the destination's plug.  The device is shared by every
    # migration to that node, so with several at once it is an upper bound.
    tx_at_switch: int | None = None
    tunnelled: int | None = None

    def __post_init__(self) -> None:
        self.kind = tunnel_kind(self.dest_ip, self.vm_ip.version)
        self.ifname = tunnel_name(self.dest_ip, self.vm_ip.version)
        self.table = table_for("source", self.dest_ip, self.vm_ip)

    def _rule_args(self) -> dict[str, object]:
        return {
            "family": _family(self.vm_ip),
            "dst": str(self.vm_ip),
            "dst_len": _plen(self.vm_ip),
            "table": self.table,
            "priority": RULE_PRIORITY,
        }

    def _route_args(self) -> dict[str, object]:
        return {
            "dst": str(self.vm_ip),
            "dst_len": _plen(self.vm_ip),
            "table": self.table,
            "family": _family(self.vm_ip),
        }

    def remove_stale(self) -> list[str]:
        """Remove what a crashed earlier run for this VM/destination left behind (its rule
        and table route; the shared tunnel only if no other migration uses it)."""
        removed = []
        while _quiet(self.ipr.rule, "del", **self._rule_args()):
            removed.append(f"rule to {self.vm_ip}")
        if _quiet(self.ipr.route, "del", **self._route_args()):
            removed.append(f"route table {self.table}")
        with _device_lock(self.ifname):
            if release_tunnel(self.ipr, self.ifname):
                removed.append(f"tunnel {self.ifname}")
        return removed

    def prepare(self) -> None:
        """Create the tunnel and its route table ahead of time: the switch is one rule."""
        with _device_lock(self.ifname):
            self.warnings = ensure_tunnel(self.ipr, self.kind, self.dest_ip, self.vm_ip.version)
            index = self.ipr.link_lookup(ifname=self.ifname)[0]
            self.ipr.route("replace", oif=index, **self._route_args())
        self.ready = True

    def switch(self) -> None:
        """Send the VM's traffic into the tunnel: one atomic rule insertion."""
        if self.ready and not self.switched:
            self.tx_at_switch = self._tx_packets()
            self.ipr.rule("add", **self._rule_args())
            self.switched = True

    def unswitch(self) -> None:
        """Give the VM's traffic back to the node's own routing (CNI route)."""
        if self.switched:
            _quiet(self.ipr.rule, "del", **self._rule_args())
            self.switched = False
            now = self._tx_packets()
            if now is not None and self.tx_at_switch is not None:
                self.tunnelled = now - self.tx_at_switch

    def _tx_packets(self) -> int | None:
        """The device's TX count; None if it cannot be read (only a report depends on it,
        never the switch)."""
        try:
            found = self.ipr.link_lookup(ifname=self.ifname)
            if not found:
                return None
            stats = self.ipr.link("get", index=found[0])[0].get_attr("IFLA_STATS64")
        except (NetlinkError, OSError):
            return None
        return None if stats is None else int(stats["tx_packets"])

    def remove(self) -> None:
        self.unswitch()
        _quiet(self.ipr.route, "del", **self._route_args())
        with _device_lock(self.ifname):
            release_tunnel(self.ipr, self.ifname)
        self.ready = False

    def close(self) -> None:
        self.ipr.close()


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


@dataclass
class Sysctls:
    """Set sysctls and put back exactly what was there before."""

    saved: dict[str, str] = field(default_factory=dict)
    # Called after an old value is noted and before the change: it persists `saved`, so
    # the run after a SIGKILL can put back what the killed run changed.
    journal: Callable[[], None] | None = None

    def set(self, name: str, value: str) -> bool:
        """True if the value changed."""
        path = _sysctl_path(name)
        old = path.read_text().strip()
        if old == value:
            return False
        self.saved.setdefault(name, old)
        if self.journal is not None:
            self.journal()
        path.write_text(value)
        return True

    def restore(self) -> None:
        for name, old in reversed(self.saved.items()):
            try:
                _sysctl_path(name).write_text(old)
            except OSError:
                pass  # the device went away with its sysctls
        self.saved.clear()


def _sysctl_dev(name: str) -> str:
    """A device name inside a sysctl key (dots in names are written as slashes)."""
    return name.replace(".", "/")


@dataclass
class DestDecap:
    """Accept what the migration source tunnels for the VM, and nothing else.

    Tunnelled packets arrive on the shared device to `source_ip` (else the fallback
    tunl0/sit0/ip6tnl0, which decapsulate from anyone); the rule `iif <device> to
    <vm-ip>` sends them to this migration's table: a route into the hold veth, whose
    plug holds them until the VM runs and whose peer redirects them into the tap.
    """

    tap: str
    vm_mac: str
    vm_ip: IPAddress | None = None
    source_ip: IPAddress | None = None
    ipr: IPRoute = field(default_factory=IPRoute)
    sysctls: Sysctls = field(default_factory=Sysctls)  # node-wide ones
    device_sysctls: dict[str, Sysctls] = field(default_factory=dict)
    raised: list[str] = field(default_factory=list)
    rules: list[dict[str, object]] = field(default_factory=list)
    table: int = 0
    rpf_table: int = 0
    skipped: list[int] = field(default_factory=list)  # inner IP versions not steered
    devices: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    hold: str = ""
    hold_peer: str = ""
    # Persists the old values of the sysctls this run changed (see changed_sysctls): a
    # SIGKILLed run cannot put them back, the next run for the VM does (restore_sysctls).
    journal: Callable[[dict[str, str]], None] | None = None

    def __post_init__(self) -> None:
        self.table = table_for("dest", self.source_ip, self.vm_ip)
        self.rpf_table = table_for("dest-rpf", self.source_ip, self.vm_ip)
        self.hold, self.hold_peer = hold_names(self.source_ip, self.vm_ip)
        self.sysctls.journal = self._journal

    def changed_sysctls(self) -> dict[str, str]:
        """Every sysctl this run changed and has not put back, with its value from before."""
        merged: dict[str, str] = {}
        for own in self.device_sysctls.values():
            merged.update(own.saved)
        merged.update(self.sysctls.saved)
        return merged

    def _journal(self) -> None:
        if self.journal is not None:
            self.journal(self.changed_sysctls())

    def restore_sysctls(self, stale: dict[str, str]) -> list[str]:
        """Put back the sysctls a killed run for this VM changed (their old values from
        its journal; call after remove_stale).  While another migration on this node
        still decapsulates they stay: this run takes them over and puts them back when it
        ends as the last one (teardown), as it does with its own."""
        restored = []
        if katamaran_rules(self.ipr):
            for name, old in stale.items():
                self.sysctls.saved.setdefault(name, old)
        else:
            for name, old in stale.items():
                try:
                    _sysctl_path(name).write_text(old)
                except OSError:
                    continue  # its device went away, and the setting with it
                restored.append(f"change of {name} (back to {old})")
        self._journal()
        return restored

    @property
    def versions(self) -> tuple[int, ...]:
        """Inner IP versions steered: the VM's, or both when its address is not given."""
        return (self.vm_ip.version,) if self.vm_ip is not None else (4, 6)

    def scope(self) -> str | None:
        """One warning naming what cannot be scoped, or None when all of it is."""
        missing = []
        if self.source_ip is None:
            missing.append(
                "-source-ip not given: packets tunnelled from ANY host over IPv4 (tunl0/sit0; "
                "a source node reached over IPv6 needs -source-ip)"
            )
        if self.vm_ip is None:
            missing.append("-vm-ip not given: for ANY inner address")
        if not missing:
            return None
        return "; ".join(missing) + f" are steered into {self.tap} until the hold ends"

    def _rule_args(self, device: str, version: int) -> dict[str, object]:
        args: dict[str, object] = {
            "family": _family(version),
            "iifname": device,
            "table": self.table,
            "priority": DECAP_PRIORITY,
        }
        if self.vm_ip is not None:
            args.update(dst=str(self.vm_ip), dst_len=_plen(self.vm_ip))
        return args

    def _kinds(self) -> list[tuple[str, int]]:
        """(tunnel kind, inner version) pairs to decapsulate."""
        outer = self.source_ip.version if self.source_ip is not None else 4
        pairs = []
        for version in self.versions:
            kind = "ip6tnl" if outer == 6 else ("sit" if version == 6 else "ipip")
            if (kind, version) not in pairs:
                pairs.append((kind, version))
        return pairs

    def _device(self, kind: str, version: int) -> str:
        if self.source_ip is None:
            return FALLBACK[kind]
        return tunnel_name(self.source_ip, version)

    def remove_stale(self) -> list[str]:
        """Remove this migration's own leftovers: its rules, hold veth, unused tunnels."""
        removed = []
        for version in (4, 6):
            for rule in self.ipr.get_rules(family=_family(version)):
                table = _rule_table(rule)
                if table in (self.table, self.rpf_table):
                    _quiet(self.ipr.rule, "del", **self._rule_from(rule, version))
                    removed.append(f"rule iif {rule.get_attr('FRA_IIFNAME')} (table {table})")
            for table in (self.table, self.rpf_table):  # they keep a tunnel in use
                route = {"dst": "default", "table": table, "family": _family(version)}
                if _quiet(self.ipr.route, "del", **route):
                    removed.append(f"route table {table}")
        if self.ipr.link_lookup(ifname=self.hold):
            _quiet(self.ipr.link, "del", ifname=self.hold)
            removed.append(f"hold veth {self.hold}")
        if self.source_ip is not None:
            for kind, version in self._kinds():
                name = self._device(kind, version)
                with _device_lock(name):
                    if release_tunnel(self.ipr, name):
                        removed.append(f"tunnel {name}")
        return removed

    def _rule_from(self, rule: object, version: int) -> dict[str, object]:
        args: dict[str, object] = {
            "family": _family(version),
            "table": _rule_table(rule),
            "priority": rule.get_attr("FRA_PRIORITY"),  # type: ignore[attr-defined]
        }
        if rule.get_attr("FRA_IIFNAME"):  # type: ignore[attr-defined]
            args["iifname"] = rule.get_attr("FRA_IIFNAME")  # type: ignore[attr-defined]
        if rule.get_attr("FRA_DST"):  # type: ignore[attr-defined]
            args["dst"] = rule.get_attr("FRA_DST")  # type: ignore[attr-defined]
            args["dst_len"] = rule["dst_len"]  # type: ignore[index]
        return args

    def setup(self) -> list[str]:
        """Tunnel device(s), hold veth with its redirect into the tap, routes, rules.

        A shared tunnel's lock is held until this migration's rules and routes use it:
        until then the device has no user, and another migration's `remove_stale` (two
        destinations starting at once on one node) took it for a leftover and deleted
        it under this one (seen in the two-VM hold case: `removed tunnel kmr-...`).
        """
        with contextlib.ExitStack() as held:
            return self._setup(held)

    def _setup(self, held: contextlib.ExitStack) -> list[str]:
        warnings: list[str] = []
        tap = self.ipr.link_lookup(ifname=self.tap)
        if not tap:
            raise NetworkUnavailable(f"tap device {self.tap} not found")
        for kind, version in self._kinds():
            name = self._device(kind, version)
            if self.source_ip is not None:
                if name not in self.devices:  # ip6tnl carries both versions: one lock
                    held.enter_context(_device_lock(name))  # released once it is in use
                warnings += ensure_tunnel(self.ipr, kind, self.source_ip, version)
            else:
                _modprobe(MODULES[kind])
                found = self.ipr.link_lookup(ifname=name)
                if not found:
                    warnings.append(
                        f"{name} missing (kernel module {MODULES[kind]} not available): "
                        f"IPv{version} packets tunnelled to this node cannot be decapsulated"
                    )
                    continue
                if not self.ipr.link("get", index=found[0])[0]["flags"] & 1:
                    self.ipr.link("set", index=found[0], state="up")
                    self.raised.append(name)
            if name not in self.devices:
                self.devices.append(name)
                self._relax(name)
        if not self.devices:
            return warnings
        self._make_hold(tap[0])
        hold = self.ipr.link_lookup(ifname=self.hold)[0]
        for version in self.versions:
            if version == 6 and not self._ipv6_forwarding(warnings):
                self.skipped.append(6)
                continue
            gateway = HOLD_GATEWAY[version]
            self.ipr.neigh(
                "replace",
                dst=gateway,
                lladdr=self.vm_mac,
                ifindex=hold,
                family=_family(version),
                state=0x80,  # NUD_PERMANENT
            )
            self.ipr.route(
                "replace",
                dst="default",
                gateway=gateway,
                oif=hold,
                table=self.table,
                family=_family(version),
                flags=4,  # RTNH_F_ONLINK
            )
        for kind, version in self._kinds():
            name = self._device(kind, version)
            if name not in self.devices or version in self.skipped:
                continue
            # rp_filter (strict, or loose on an address-less tunnel) would drop the
            # decapsulated packets: the kernel checks their source with a lookup whose
            # iif is the hold veth, which receives nothing else.  This rule answers it
            # with "via the tunnel", so they pass without touching any rp_filter sysctl.
            self.ipr.route(
                "replace",
                dst="default",
                oif=self.ipr.link_lookup(ifname=name)[0],
                table=self.rpf_table,
                family=_family(version),
            )
            rpf = {
                "family": _family(version),
                "iifname": self.hold,
                "table": self.rpf_table,
                "priority": DECAP_PRIORITY,
            }
            args = self._rule_args(name, version)
            for rule in (rpf, args):
                self.ipr.rule("add", **rule)
                self.rules.append(rule)
        return warnings

    def _relax(self, device: str) -> None:
        """IPv4 forwarding on this device only.

        Decapsulated packets are forwarded (tunnel -> hold veth); the kernel checks
        forwarding on the input device only, so the node's ip_forward stays as it is.
        (rp_filter is satisfied by the reverse-path rule, see setup: no sysctl.)
        """
        own = self.device_sysctls.setdefault(device, Sysctls(journal=self._journal))
        own.set(f"net.ipv4.conf.{_sysctl_dev(device)}.forwarding", "1")

    def _ipv6_forwarding(self, warnings: list[str]) -> bool:
        """IPv6 forwards only with the node-wide switch on: set it for an IPv6 VM (and
        say so); without -vm-ip, steer IPv6 only where the node forwards it already."""
        key = "net.ipv6.conf.all.forwarding"
        if self.vm_ip is None and _sysctl_path(key).read_text().strip() != "1":
            warnings.append(
                f"{key} is 0: tunnelled IPv6 packets are not steered (give -vm-ip for an "
                "IPv6 VM: katamaran then turns IPv6 forwarding on for the hold)"
            )
            return False
        if self.sysctls.set(key, "1"):
            warnings.append(
                "net.ipv6.conf.all.forwarding was 0: set to 1 for the hold (IPv6 has no "
                "per-device forwarding switch), restored afterwards"
            )
        return True

    def _make_hold(self, tap_index: int) -> None:
        """The veth pair: plug on one end (PlugQdisc), the other end redirects to the tap."""
        for module in ("veth", "sch_ingress", "cls_matchall", "act_mirred"):
            _modprobe(module)
        try:
            self.ipr.link("add", ifname=self.hold, kind="veth", peer=self.hold_peer)
        except NetlinkError as err:
            raise NetworkUnavailable(f"cannot create veth {self.hold}: {err.args[-1]}") from None
        self.created.append(self.hold)
        for name in (self.hold, self.hold_peer):
            dev = _sysctl_dev(name)
            if 6 in self.versions:
                # no link-local address, no router solicitations: nothing of ours in the VM
                _sysctl_path(f"net.ipv6.conf.{dev}.addr_gen_mode").write_text("1")
                _sysctl_path(f"net.ipv6.conf.{dev}.accept_ra").write_text("0")
            else:
                _sysctl_path(f"net.ipv6.conf.{dev}.disable_ipv6").write_text("1")
        hold = self.ipr.link_lookup(ifname=self.hold)[0]
        peer = self.ipr.link_lookup(ifname=self.hold_peer)[0]
        self.ipr.link("set", index=hold, arp="off", state="up")
        self.ipr.link("set", index=peer, arp="off", state="up")
        try:
            self.ipr.tc("add", "ingress", index=peer)
            self.ipr.tc(
                "add-filter",
                "matchall",
                index=peer,
                parent=0xFFFF0000,
                action=mirred_redirect(tap_index),
            )
        except NetlinkError as err:
            raise NetworkUnavailable(
                f"cannot redirect {self.hold_peer} into {self.tap}: {err.args[-1]} "
                "(kernel modules sch_ingress, cls_matchall, act_mirred)"
            ) from None

    def _counters(self, name: str, *keys: str) -> int:
        """The sum of a link's IFLA_STATS64 `keys` (0 once the link is gone)."""
        found = self.ipr.link_lookup(ifname=name)
        stats = self.ipr.get_links(found[0])[0].get_attr("IFLA_STATS64") if found else None
        return sum(int(stats[key]) for key in keys) if stats else 0

    def forwarded(self) -> int:
        """Packets that went into the hold (this migration's tunnelled packets only)."""
        return self._counters(self.hold, "tx_packets")

    def dropped(self) -> int:
        """Packets the hold veth pair dropped (its end's tx, its peer's rx and tx): read
        before the teardown, as the counters go with the pair."""
        return self._counters(self.hold, "tx_dropped") + self._counters(
            self.hold_peer, "rx_dropped", "tx_dropped"
        )

    def unsteer(self) -> None:
        """Stop steering: new tunnelled packets for the VM take the node's own route."""
        for args in self.rules:
            _quiet(self.ipr.rule, "del", **args)
        self.rules.clear()

    def teardown(self) -> None:
        self.unsteer()
        for name in self.created:
            _quiet(self.ipr.link, "del", ifname=name)  # its routes, neighbour and plug go too
        self.created.clear()
        for version in (4, 6):
            for table in (self.table, self.rpf_table):
                _quiet(self.ipr.route, "del", dst="default", table=table, family=_family(version))
        for name in self.devices:
            with _device_lock(name):
                found = self.ipr.link_lookup(ifname=name)
                if found and _users(self.ipr, name, found[0]):
                    continue  # another migration still uses it: its settings stay
                own = self.device_sysctls.pop(name, None)
                if own is not None:
                    own.restore()
                if self.source_ip is not None:
                    release_tunnel(self.ipr, name)
                elif name in self.raised:
                    _quiet(self.ipr.link, "set", ifname=name, state="down")
        self.devices.clear()
        self.raised.clear()
        if not katamaran_rules(self.ipr):
            self.sysctls.restore()  # node-wide: the last migration puts them back
        self._journal()  # what is still changed (nothing, unless other migrations run)

    def close(self) -> None:
        self.ipr.close()


# How a kernel refuses a tun ring longer than it can allocate or allows (see fit_tap_queue).
RING_REFUSED = (errno.ERANGE, errno.ENOMEM, errno.EINVAL)


def fit_tap_queue(ipr: IPRoute, tap: str, limit: int) -> tuple[int, int] | None:
    """Make the tap's queue (the tun ring, sized by txqueuelen) hold a whole release.

    At RESUME the plug hands everything it held to the tap at once; a tun ring
    shorter than that burst drops the excess.  (old, new) when raised, else None.
    The larger queue is left in place: shrinking it later would drop whatever the
    VM has not read yet.
    """
    found = ipr.link_lookup(ifname=tap)
    if not found:
        raise NetworkUnavailable(f"tap device {tap} not found")
    old = int(ipr.get_links(found[0])[0].get_attr("IFLA_TXQLEN") or 0)
    want = tap_frames_needed(limit)
    if old >= want:
        return None
    # A kernel may refuse a ring that large: Debian 12's 6.1 takes at most 32767 frames
    # (ERANGE above, measured in the lab node; 6.18 took 196000).  Halve until one is
    # taken, then search up to the largest between it and the last refused.  Each
    # attempt only grows the ring (a refused one leaves it as it was), so the frames
    # queued meanwhile stay.  A shorter ring still holds a release of frames larger
    # than the minimum; the caller says so.
    size, refused = want, None
    while True:
        try:
            ipr.link("set", index=found[0], txqlen=size)
            break
        except NetlinkError as err:
            if err.code not in RING_REFUSED or size // 2 <= old:
                raise
            size, refused = size // 2, size
    while refused is not None and refused - size > 1:
        middle = (size + refused) // 2
        try:
            ipr.link("set", index=found[0], txqlen=middle)
            size = middle
        except NetlinkError as err:
            if err.code not in RING_REFUSED:
                break  # the ring already grew to `size`: keep that
            refused = middle
    return old, size


MIN_FRAME = 60  # bytes of the smallest Ethernet frame (no FCS): the most frames per byte


def tap_frames_needed(limit: int) -> int:
    """Tap ring length for a plug release of `limit` bytes of minimum-size frames."""
    return -(-limit // MIN_FRAME)


PLUG_BUFFER = "TCQ_PLUG_BUFFER"
PLUG_RELEASE = "TCQ_PLUG_RELEASE_INDEFINITE"


@dataclass
class PlugQdisc:
    """sch_plug as the hold veth's root qdisc: hold, release in order, then pass-through.

    On the hold veth, not the tap: deleting or replacing a root qdisc deactivates the
    device for a moment (noop_qdisc drops what is sent meanwhile), which on the tap
    cost a ping on the VM's live path; the veth carries nothing but tunnelled packets.
    """

    device: str
    limit: int
    ipr: IPRoute = field(default_factory=IPRoute)
    index: int = 0
    installed: bool = False

    def _index(self) -> int:
        found = self.ipr.link_lookup(ifname=self.device)
        if not found:
            raise NetworkUnavailable(f"device {self.device} not found")
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
                f"Failed to add plug qdisc on {self.device}: {err.args[-1]} "
                "(is sch_plug available? `modprobe sch_plug`)"
            ) from None
        self.installed = True
        self._action(PLUG_RELEASE)  # a new plug qdisc starts closed: open it

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
