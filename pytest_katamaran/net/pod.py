"""A Kata-shaped pod network on a "node" (a netns, or the current one), via pyroute2.

Why: katamaran's cutover has to work against the plumbing a real Calico + Kata node
has, not a simplified bridge.  That is:

* node side: veth `cali<id>` with Calico's fixed MAC ee:ee:ee:ee:ee:ee, 169.254.1.1/32,
  proxy_arp on, strict rp_filter (as Felix sets it), and the host route
  `<pod-ip>/32 dev cali<id>`;
* pod netns: the peer as `eth0` with `<pod-ip>/32` and `default via 169.254.1.1 onlink`;
  `tap0_kata` for QEMU; the VM NIC reuses eth0's MAC (Kata copies it);
* Kata's default "tcfilter" model: ingress qdiscs on eth0 and tap0_kata with u32
  match-all filters `action mirred egress redirect` each way.

The tcfilter part needs the kernel's ingress qdisc, u32 classifier and mirred action;
when requested but missing, `PodNet.setup()` raises `TcFilterUnavailable` with a
one-line reason (from a real attempt, not a guess about the kernel).

`prepare_dest_tap` builds the destination side: `tap0_kata` directly in the node's
netns (the destination QEMU runs there), same MAC/address/proxy_arp as a cali link,
but no route to the pod yet: katamaran's destination mode steers packets itself.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from katamaran.network import mirred_redirect
from pytest_katamaran.net.hostlab import ipr, netns_exists, write_sysctl

CALICO_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_IP = "169.254.1.1"
DEFAULT_TAP = "tap0_kata"
POD_IFNAME = "eth0"
ETH_P_ALL = 0x0003
TC_H_INGRESS = 0xFFFF0000
RTNH_F_ONLINK = 0x04
# 0: the kernel picks (49152 for a device's first filter), as Kata's own netlink call
# (addRedirectTCFilter sets no priority) leaves it; katamaran's divert goes ahead of it.
FILTER_PRIO = 0
# errnos the kernel returns for an unknown qdisc kind, classifier or action
_MISSING_FEATURE = (errno.ENOENT, errno.EOPNOTSUPP)


class TcFilterUnavailable(RuntimeError):
    """Kata's tcfilter plumbing (ingress qdisc + u32 + mirred) cannot be built here."""


def _check_ip(pod_ip: str) -> str:
    addr = ipaddress.ip_address(pod_ip)
    if addr.version != 4:
        raise ValueError(f"pod IP must be IPv4 (Calico-style /32), got {pod_ip}")
    return str(addr)


def _link_index(ip: IPRoute, ifname: str) -> int | None:
    found = ip.link_lookup(ifname=ifname)
    return found[0] if found else None


def _delete_link(netns_name: str | None, ifname: str) -> None:
    """Delete `ifname` if it (and its netns) still exist; a link already gone is fine."""
    if netns_name is not None and not netns_exists(netns_name):
        return
    with ipr(netns_name) as ip:
        idx = _link_index(ip, ifname)
        if idx is not None:
            try:
                ip.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise


def _make_up_tap(netns_name: str | None, tap: str, mac: str | None) -> None:
    """Create a persistent tap (QEMU attaches via ifname=) and bring it up."""
    with ipr(netns_name) as ip:
        if _link_index(ip, tap) is not None:
            raise FileExistsError(f"{tap} already exists in netns {netns_name or '<current>'}")
        ip.link("add", ifname=tap, kind="tuntap", mode="tap")
        idx = _link_index(ip, tap)
        assert idx is not None
        if mac:
            ip.link("set", index=idx, address=mac)
        ip.link("set", index=idx, state="up")


def add_tc_redirect(netns_name: str | None, src: str, dst: str) -> None:
    """Kata's tcfilter: everything entering `src` leaves through `dst` (ingress + u32 + mirred).

    Raises TcFilterUnavailable (one line) when the kernel lacks a piece; other errors
    propagate unchanged so genuine bugs are not disguised as missing features.
    """
    with ipr(netns_name) as ip:
        src_idx = _link_index(ip, src)
        dst_idx = _link_index(ip, dst)
        if src_idx is None or dst_idx is None:
            raise FileNotFoundError(f"{src} or {dst} missing in netns {netns_name}")
        step = f"ingress qdisc on {src}"
        try:
            ip.tc("add", "ingress", src_idx, "ffff:")
            step = f"u32 filter with mirred redirect {src}->{dst}"
            ip.tc(
                "add-filter",
                "u32",
                src_idx,
                parent=TC_H_INGRESS,
                protocol=ETH_P_ALL,
                prio=FILTER_PRIO,
                target=0,
                keys=["0x0/0x0+0"],
                action=mirred_redirect(dst_idx),
            )
        except NetlinkError as exc:
            if exc.code in _MISSING_FEATURE:
                raise TcFilterUnavailable(
                    f"tcfilter unavailable on this kernel: {step} failed: "
                    f"{errno.errorcode.get(exc.code, exc.code)} ({exc})"
                ) from None
            raise


def del_tc_redirect(netns_name: str | None, src: str) -> bool:
    """Remove the ingress qdisc (and with it the redirect filter) from `src`.

    Why it exists: LAB notes that deleting the filter lets the pod's host side answer
    in the VM's place; tests that want to show that need a clean way to do it.
    """
    with ipr(netns_name) as ip:
        idx = _link_index(ip, src)
        if idx is None:
            return False
        try:
            ip.tc("del", "ingress", idx, "ffff:")
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL):
                return False
            raise
        return True


@dataclass
class PodNet:
    """One pod's network on a node; `setup()` builds it, `teardown()` removes it.

    Use as a context manager or call teardown in `finally`.  Teardown only touches
    what setup created (the pod netns, the cali veth and its route) and is idempotent.
    """

    name: str
    pod_ip: str
    node_netns: str | None = None
    tcfilter: bool = True
    tap: str = DEFAULT_TAP
    short_id: str | None = None
    mac: str | None = field(default=None, init=False)  # eth0's MAC = the VM NIC's MAC
    _created_netns: bool = field(default=False, init=False, repr=False)
    _created_veth: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pod_ip = _check_ip(self.pod_ip)
        if self.short_id is None:
            key = f"{self.node_netns or ''}/{self.name}".encode()
            self.short_id = hashlib.sha1(key).hexdigest()[:11]
        if len(self.host_ifname) > 15:
            raise ValueError(f"interface name too long: {self.host_ifname}")

    @property
    def netns(self) -> str:
        """The pod network namespace's name."""
        return self.name

    @property
    def host_ifname(self) -> str:
        """Node-side veth name, Calico style."""
        return f"cali{self.short_id}"

    @property
    def gateway(self) -> str:
        """The link-local next hop every Calico pod (and the VM) routes through."""
        return GATEWAY_IP

    @property
    def guest_ip(self) -> str:
        """The VM's address argument for `kernel_cmdline(ip=...)`."""
        return f"{self.pod_ip}/32"

    def setup(self) -> PodNet:
        """Build netns, veth, addresses, routes, tap and (optionally) the tc redirects."""
        if self.node_netns is not None and not netns_exists(self.node_netns):
            raise FileNotFoundError(f"node netns {self.node_netns!r} does not exist")
        if netns_exists(self.name):
            raise FileExistsError(f"pod netns {self.name!r} already exists")
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self) -> None:
        netns.create(self.name)
        self._created_netns = True
        with ipr(self.node_netns) as ip:
            if _link_index(ip, self.host_ifname) is not None:
                raise FileExistsError(f"{self.host_ifname} already exists on the node")
            ip.link(
                "add",
                ifname=self.host_ifname,
                kind="veth",
                peer={"ifname": POD_IFNAME, "net_ns_fd": self.name},
            )
            self._created_veth = True
            cali = _link_index(ip, self.host_ifname)
            assert cali is not None
            ip.link("set", index=cali, address=CALICO_MAC)
            ip.addr("add", index=cali, address=GATEWAY_IP, prefixlen=32)
            ip.link("set", index=cali, state="up")
        write_sysctl(self.node_netns, f"net/ipv4/conf/{self.host_ifname}/proxy_arp", 1)
        # Strict reverse-path filtering, as Calico's Felix sets on every workload
        # interface (against spoofing): a cutover that routes the VM's address elsewhere
        # while the VM still sends has those packets dropped here (see tapqueue.Hold).
        write_sysctl(self.node_netns, f"net/ipv4/conf/{self.host_ifname}/rp_filter", 1)
        with ipr(self.node_netns) as ip:
            cali = _link_index(ip, self.host_ifname)
            ip.route("add", dst=f"{self.pod_ip}/32", oif=cali, scope="link")

        with ipr(self.name) as ip:
            lo = _link_index(ip, "lo")
            ip.link("set", index=lo, state="up")
            eth0 = _link_index(ip, POD_IFNAME)
            assert eth0 is not None
            ip.addr("add", index=eth0, address=self.pod_ip, prefixlen=32)
            ip.link("set", index=eth0, state="up")
            ip.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IP, oif=eth0, flags=RTNH_F_ONLINK)
            self.mac = ip.get_links(eth0)[0].get_attr("IFLA_ADDRESS")
        _make_up_tap(self.name, self.tap, None)
        if self.tcfilter:
            add_tc_redirect(self.name, POD_IFNAME, self.tap)
            add_tc_redirect(self.name, self.tap, POD_IFNAME)

    def teardown(self) -> None:
        """Delete the cali veth (its route goes with it) and the pod netns. Idempotent."""
        if self._created_veth:
            self._created_veth = False
            _delete_link(self.node_netns, self.host_ifname)
        if self._created_netns:
            self._created_netns = False
            if netns_exists(self.name):
                netns.remove(self.name)

    def __enter__(self) -> PodNet:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


@dataclass
class DestTap:
    """The destination node's pre-created `tap0_kata` (see `prepare_dest_tap`)."""

    node_netns: str | None
    tap: str
    pod_ip: str
    mac: str
    _created: bool = field(default=True, repr=False)
    _route: bool = field(default=False, repr=False)

    def add_pod_route(self, vm_mac: str | None = None) -> None:
        """The converged route `<pod-ip>/32 dev tap0_kata` the lab adds after cutover;
        with `vm_mac`, the VM's MAC pinned on the tap as Felix pins a workload's (the
        node then never ARPs for it: a VM that is slow to run after its move would let
        the probe fail and the packets waiting for it be dropped)."""
        with ipr(self.node_netns) as ip:
            idx = _link_index(ip, self.tap)
            if idx is None:
                raise FileNotFoundError(f"{self.tap} is gone from {self.node_netns}")
            if vm_mac:
                ip.neigh("replace", dst=self.pod_ip, lladdr=vm_mac, ifindex=idx, state=0x80)
            ip.route("replace", dst=f"{self.pod_ip}/32", oif=idx, scope="link")
        self._route = True

    def teardown(self) -> None:
        """Delete the tap (and any route through it). Idempotent; leaves all else alone."""
        if not self._created:
            return
        self._created = False
        _delete_link(self.node_netns, self.tap)

    def __enter__(self) -> DestTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def prepare_dest_tap(
    node_netns: str | None,
    tap: str = DEFAULT_TAP,
    *,
    pod_ip: str,
    mac: str | None = None,
) -> DestTap:
    """Pre-create `tap` in the destination node's netns for the replayed QEMU.

    MAC ee:ee:ee:ee:ee:ee and 169.254.1.1/32 make the tap look exactly like the source's
    cali link to the guest (its ARP entry for the gateway stays valid); proxy_arp lets the
    node answer for other addresses.  No route to `pod_ip` is added here.
    """
    pod_ip = _check_ip(pod_ip)
    if node_netns is not None and not netns_exists(node_netns):
        raise FileNotFoundError(f"node netns {node_netns!r} does not exist")
    mac = mac or CALICO_MAC
    _make_up_tap(node_netns, tap, mac)
    dest = DestTap(node_netns=node_netns, tap=tap, pod_ip=pod_ip, mac=mac)
    try:
        with ipr(node_netns) as ip:
            idx = _link_index(ip, tap)
            ip.addr("add", index=idx, address=GATEWAY_IP, prefixlen=32)
        write_sysctl(node_netns, f"net/ipv4/conf/{tap}/proxy_arp", 1)
    except BaseException:
        dest.teardown()
        raise
    return dest


def tcfilter_unavailable_reason() -> str | None:
    """Probe (in a scratch netns) whether Kata's tcfilter can be built; None if it can."""
    name = f"kmr-probe-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        with ipr(name) as ip:
            ip.link("add", ifname="p0", kind="veth", peer="p1")
        try:
            add_tc_redirect(name, "p0", "p1")
        except TcFilterUnavailable as exc:
            return str(exc)
        return None
    finally:
        netns.remove(name)
