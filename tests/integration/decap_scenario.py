"""The cutover's kernel side in network namespaces, run as root inside a Debian-kernel node.

Why a script: the host kernel has no ipip/sch_plug, so test_decap_scope.py boots a lab node
and runs this there.  Namespaces: `cl` (a client, 10.7.0.2) behind `src` (the source node,
10.9.0.1), `dst` (the destination node, 10.9.0.2 towards src, 10.9.1.2 towards `thr`),
`thr` (a third host, 10.9.1.3) and `vm` (the VM: 10.8.0.9 and 10.8.0.10 on eth0, whose veth
peer `tap0` in dst stands in for the tap).  katamaran's own classes build the tunnel,
decapsulation and hold, in the order source.py/dest.py use them.  Prints one JSON object
of measured facts; the test asserts on them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from katamaran.network import (
    TABLE_BASE,
    TABLE_MASK,
    DestDecap,
    PlugQdisc,
    SourceTunnel,
    fit_tap_queue,
    tunnel_name,
)
from pytest_katamaran.lab.local import blocked_in_flock

CLONE_NEWNET = 0x40000000
VM_IP, OTHER_IP, VM2_IP = "10.8.0.9", "10.8.0.10", "10.8.0.19"
SRC_IP, DST_IP, THIRD_IP = "10.9.0.1", "10.9.0.2", "10.9.1.3"
NAMESPACES = ("cl", "src", "dst", "thr", "vm")
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.default.rp_filter",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.tap0.forwarding",
    "net.ipv4.conf.tap0.rp_filter",
    "net.ipv6.conf.all.forwarding",
)
_libc = ctypes.CDLL(None, use_errno=True)
_home = os.open("/proc/self/ns/net", os.O_RDONLY)


def sh(*cmds: str, ns: str | None = None, check: bool = True) -> str:
    out = []
    for cmd in cmds:
        argv = (["ip", "netns", "exec", ns] if ns else []) + ["sh", "-c", cmd]
        done = subprocess.run(argv, capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{ns}: {cmd}: {done.stderr.strip()}")
        out.append(done.stdout)
    return "".join(out)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread in netns `ns` (netlink sockets, /proc/sys and child processes follow)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        yield
    finally:
        os.close(fd)
        _libc.setns(_home, CLONE_NEWNET)


def topology() -> str:
    for ns in NAMESPACES:
        sh(f"ip netns add {ns}")
        sh("ip link set lo up", ns=ns)
    sh(
        "ip link add eth0 netns cl type veth peer name cl0 netns src",
        "ip link add eth0 netns src type veth peer name eth0 netns dst",
        "ip link add eth1 netns dst type veth peer name eth0 netns thr",
        "ip link add tap0 netns dst type veth peer name eth0 netns vm",
    )
    sh(
        "ip addr add 10.7.0.2/24 dev eth0; ip link set eth0 up; ip route add default via 10.7.0.1",
        ns="cl",
    )
    sh(
        "ip addr add 10.7.0.1/24 dev cl0; ip link set cl0 up",
        f"ip addr add {SRC_IP}/24 dev eth0; ip link set eth0 up",
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        # the VM still lives here as far as the CNI knows: its route points at dst
        f"ip route add 10.8.0.0/24 via {DST_IP}",
        ns="src",
    )
    vm_mac = sh("cat /sys/class/net/eth0/address", ns="vm").strip()
    tap_mac = sh("cat /sys/class/net/tap0/address", ns="dst").strip()
    sh(
        f"ip addr add {VM_IP}/24 dev eth0; ip addr add {OTHER_IP}/24 dev eth0",
        "ip link set eth0 up",
        "ip route add default via 10.8.0.254 dev eth0 onlink",
        f"ip neigh replace 10.8.0.254 lladdr {tap_mac} dev eth0 nud permanent",
        ns="vm",
    )
    sh(
        f"ip addr add {DST_IP}/24 dev eth0; ip link set eth0 up",
        "ip addr add 10.9.1.2/24 dev eth1; ip link set eth1 up",
        "ip link set tap0 up",
        # a node that routes its pods (tap0) but is no router otherwise; devices created
        # from now on (katamaran's) get strict rp_filter: the reverse-path rule must hold
        "sysctl -qw net.ipv4.ip_forward=0 net.ipv4.conf.all.rp_filter=0",
        "sysctl -qw net.ipv4.conf.default.rp_filter=1 net.ipv4.conf.tap0.rp_filter=0",
        "sysctl -qw net.ipv4.conf.tap0.forwarding=1 net.ipv4.conf.eth0.forwarding=1",
        "sysctl -qw net.ipv6.conf.all.forwarding=1",  # the node routes its IPv6 pods
        f"ip route add 10.7.0.0/24 via {SRC_IP}",
        f"ip route add 10.8.0.0/24 via {SRC_IP}",
        # Calico-like: the fallback tunnel is up and decapsulates from anyone
        "modprobe ipip; ip link set tunl0 up",
        ns="dst",
    )
    sh(f"ip addr add {THIRD_IP}/24 dev eth0; ip link set eth0 up", ns="thr")
    return vm_mac


def sysctls(ns: str) -> dict[str, str]:
    return {
        k: sh(f"sysctl -n {k} 2>/dev/null || echo gone", ns=ns, check=False).strip()
        for k in SYSCTLS
    }


def in_echos(ns: str = "vm") -> int:
    snmp = sh("cat /proc/net/snmp", ns=ns).splitlines()
    head, values = [ln.split() for ln in snmp if ln.startswith("Icmp:")][:2]
    return int(values[head.index("InEchos")])


def ping(target: str, count: int, interval: float = 0.2, size: int = 56, df: bool = False):
    flags = f"-c {count} -i {interval} -s {size} -W 2" + (" -M do" if df else "")
    out = sh(f"ping -q {flags} {target} || true", ns="cl")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    return {"sent": int(m[1]), "received": int(m[2])} if m else {"raw": out}


def _ours(line: str) -> bool:
    """A rule/route line naming one of katamaran's tables (0x6B000000..0x6BFFFFFF)."""
    return any(
        TABLE_BASE <= int(n) <= TABLE_BASE + TABLE_MASK
        for n in re.findall(r"(?:lookup|table) (\d+)", line)
    )


def leftovers(ns: str) -> dict[str, object]:
    links = [ln.split(":")[1].strip().split("@")[0] for ln in sh("ip -o link", ns=ns).splitlines()]
    rules = sh("ip rule; ip -6 rule", ns=ns).splitlines()
    routes = sh("ip route show table all; ip -6 route show table all", ns=ns).splitlines()
    return {
        "kmr_links": [n for n in links if n.startswith("kmr")],
        "rules": [ln for ln in rules if _ours(ln)],
        "routes": [ln for ln in routes if _ours(ln)],
        "tap_qdisc": sh("tc qdisc show dev tap0", ns=ns).strip() if ns == "dst" else "",
        "neigh": sh("ip neigh show nud permanent", ns=ns).strip(),
    }


def fallback(vm_mac: str, vm: ipaddress.IPv4Address | ipaddress.IPv6Address) -> dict:
    """Without -source-ip: tunl0 (up already, Calico-style), the rule still `to <vm-ip>`."""
    with inside("dst"):
        decap = DestDecap("tap0", vm_mac, vm, None)
        facts = {"scope": decap.scope(), "warnings": decap.setup(), "devices": list(decap.devices)}
        echos = in_echos()
    sh(f"ping -q -c 3 -i 0.2 -W 1 {VM_IP} || true", ns="thr")  # tunl0 takes anyone's
    sh(f"ping -q -c 3 -i 0.2 -W 1 {OTHER_IP} || true", ns="thr")
    with inside("dst"):
        facts["third_to_vm_echos"] = in_echos() - echos
        decap.teardown()
    facts["tunl0_up"] = "UP" in sh("ip -br link show tunl0", ns="dst")
    return facts


CHURN_TAP = (
    "tc qdisc add dev t0 root handle 1: plug limit 1000000",
    "tc qdisc change dev t0 root handle 1: plug release_indefinite",
    "sleep 0.1; tc qdisc del dev t0 root; sleep 0.05",
)
CHURN_HOLD = (
    "ip link add kh type veth peer name kp; ip link set kh up; ip link set kp up",
    "tc qdisc add dev kp ingress",
    "tc filter add dev kp parent ffff: matchall action mirred egress redirect dev t0",
    "tc qdisc add dev kh root handle 1: plug limit 1000000",
    "tc qdisc change dev kh root handle 1: plug release_indefinite",
    "sleep 0.1; tc qdisc del dev kh root; ip link del kh; sleep 0.05",
)


def churn() -> dict[str, dict[str, int]]:
    """A 2 ms ping to a "VM" behind a veth "tap" while a plug is installed and removed 30
    times: as the tap's root qdisc (the old hold) or on a hold veth redirecting into it."""
    sh("ip netns add ch; ip netns add cv")
    sh(
        "ip link set lo up; ip link add t0 type veth peer name e0 netns cv",
        "ip addr add 10.5.0.1/24 dev t0; ip link set t0 up",
        ns="ch",
    )
    sh("ip addr add 10.5.0.2/24 dev e0; ip link set e0 up", ns="cv")
    sh("ping -c 1 -W 2 10.5.0.2", ns="ch")
    out = {}
    try:
        for name, steps in (("tap_root_qdisc", CHURN_TAP), ("hold_veth", CHURN_HOLD)):
            pinger = subprocess.Popen(
                ["ip", "netns", "exec", "ch", "ping", "-q", "-i", "0.002", "-c", "3000",
                 "-W", "1", "10.5.0.2"],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(30):
                sh(" && ".join(steps), ns="ch")  # one process per cycle: forks are slow here
            m = re.search(r"(\d+) packets transmitted, (\d+) received", pinger.communicate()[0])
            out[name] = {"sent": int(m[1]), "received": int(m[2])} if m else {}
    finally:
        sh("ip netns del ch; ip netns del cv", check=False)
    return out


def setup_race(vm_mac: str) -> dict[str, object]:
    """Two destinations start at once: B sweeps its leftovers while A has created the
    shared tunnel and nothing of A uses it yet (A held there, B run meanwhile).  B must
    wait for A's lock, then see the device in use and keep it."""
    src = ipaddress.ip_address(SRC_IP)
    out: dict[str, object] = {}
    with inside("dst"):
        a = DestDecap("tap0", vm_mac, ipaddress.ip_address(VM_IP), src)
        b = DestDecap("tap0", vm_mac, ipaddress.ip_address(VM2_IP), src)
        name = tunnel_name(src, 4)
        out["fresh"] = not a.ipr.link_lookup(ifname=name)
        swept: list[str] = []
        sweep = threading.Thread(target=lambda: swept.extend(b.remove_stale()))
        make_hold = a._make_hold

        def held_after_the_tunnel(tap_index: int) -> None:
            out["tunnel_made"] = bool(a.ipr.link_lookup(ifname=name))
            sweep.start()
            lock = Path(f"/run/lock/katamaran-{name}.lock")
            deadline = time.monotonic() + 20
            while sweep.is_alive() and not blocked_in_flock(lock) and time.monotonic() < deadline:
                time.sleep(0.01)
            out["sweep_waited"] = sweep.is_alive()  # blocked on A's lock, not done
            make_hold(tap_index)

        a._make_hold = held_after_the_tunnel  # type: ignore[method-assign]
        try:
            a.setup()
            sweep.join(20)
            out["swept"] = swept
            out["tunnel_kept"] = bool(a.ipr.link_lookup(ifname=name))
        finally:
            a.teardown()
            a.close()
            b.close()
    # the last user gone, the device goes with it
    out["gone_after"] = not sh(f"ip -br link show {name} 2>/dev/null || true", ns="dst").strip()
    return out


def ping6(target: str, count: int, size: int = 56) -> dict[str, int]:
    out = sh(f"ping -6 -q -c {count} -i 0.2 -s {size} -M do -W 2 {target} || true", ns="cl")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    return {"sent": int(m[1]), "received": int(m[2])} if m else {"sent": count, "received": -1}


def mixed_families(vm_mac: str) -> dict[str, object]:
    """IPv6 VM over IPv4 nodes (sit) and IPv4 VM over IPv6 nodes (ip6tnl, mode any)."""
    sh(
        "ip addr add fd00:7::2/64 dev eth0 nodad; ip -6 route add default via fd00:7::1",
        ns="cl",
    )
    sh(
        "ip addr add fd00:7::1/64 dev cl0 nodad; ip addr add fd00:9::1/64 dev eth0 nodad",
        "ip -6 route add fd00:8::/64 via fd00:9::2",
        ns="src",
    )
    tap_mac = sh("cat /sys/class/net/tap0/address", ns="dst").strip()
    sh(
        "ip addr add fd00:8::9/64 dev eth0 nodad",
        "ip -6 route add default via fe80::1 dev eth0",
        f"ip -6 neigh replace fe80::1 lladdr {tap_mac} dev eth0 nud permanent",
        ns="vm",
    )
    sh(
        "ip addr add fd00:9::2/64 dev eth0 nodad",
        "ip -6 route add fd00:7::/64 via fd00:9::1",
        ns="dst",
    )
    out: dict[str, object] = {}
    cases = (
        ("v6_in_v4", "fd00:8::9", DST_IP, SRC_IP),
        ("v4_in_v6", VM_IP, "fd00:9::2", "fd00:9::1"),
    )
    for name, vm_s, dst_s, src_s in cases:
        vm = ipaddress.ip_address(vm_s)
        dst, src = ipaddress.ip_address(dst_s), ipaddress.ip_address(src_s)
        with inside("src"):
            tunnel = SourceTunnel(dst, vm)
            tunnel.prepare()
        with inside("dst"):
            decap = DestDecap("tap0", vm_mac, vm, src)
            warnings = decap.setup()
        with inside("src"):
            tunnel.switch()
        if vm.version == 6:
            result = {"ping": ping6(vm_s, 3), "full": ping6(vm_s, 3, size=1452)}
        else:
            result = {"ping": ping(vm_s, 3)}
        with inside("dst"):
            result["held"] = decap.forwarded()
            decap.teardown()
        with inside("src"):
            tunnel.remove()
        result.update(
            devices=[tunnel.ifname],
            warnings=warnings + tunnel.warnings,
            tunnelled=tunnel.tunnelled,  # the device's TX count over the switch
        )
        out[name] = result
    return out


def main() -> dict[str, object]:
    facts: dict[str, object] = {}
    vm_mac = topology()
    before = {"src": sysctls("src"), "dst": sysctls("dst")}
    vm = ipaddress.ip_address(VM_IP)
    src, dst = ipaddress.ip_address(SRC_IP), ipaddress.ip_address(DST_IP)
    with inside("src"):
        tunnel = SourceTunnel(dst, vm)
        tunnel.prepare()
        facts["source_warnings"] = tunnel.warnings
    with inside("dst"):
        decap = DestDecap("tap0", vm_mac, vm, src)
        facts["scope_warning"] = decap.scope()
        facts["dest_warnings"] = decap.setup()
        plug = PlugQdisc(decap.hold, 1 << 20)
        plug.install()
        fit_tap_queue(decap.ipr, "tap0", 1 << 20)
        facts["devices"] = {"tunnel": list(decap.devices), "hold": decap.hold}
    with inside("src"):
        tunnel.switch()
    facts["ping"] = ping(VM_IP, 3)
    if os.environ.get("DECAP_DEBUG"):
        print(*(sh("nstat -a | grep -v ' 0 ' | grep -v 6", ns=n) for n in ("src", "dst", "cl")))
        print(sh("ip -s link", ns="vm"), sh("ip -s link; ip rule", ns="dst"))
    facts["ping_1400"] = ping(VM_IP, 3, size=1400, df=True)
    facts["ping_1472"] = ping(VM_IP, 3, size=1472, df=True)

    # scoping: a third host's tunnelled packet, and the source's for another address
    sh(
        f"ip link add t3 type ipip remote 10.9.1.2 local {THIRD_IP}; ip link set t3 up",
        "ip addr add 10.7.3.3/32 dev t3; ip route add 10.8.0.0/24 dev t3 src 10.7.3.3",
        ns="thr",
    )
    with inside("dst"):
        held = decap.forwarded()
    echos = in_echos()
    sh(f"ping -q -c 3 -i 0.2 -W 1 {VM_IP} || true", ns="thr")
    with inside("dst"):
        facts["third"] = {"vm_echos": in_echos() - echos, "held": decap.forwarded() - held}
        held = decap.forwarded()
    echos = in_echos()
    sh(f"ip route add {OTHER_IP}/32 dev {tunnel.ifname}", ns="src")
    other = ping(OTHER_IP, 3)
    sh(f"ip route del {OTHER_IP}/32 dev {tunnel.ifname}", ns="src")
    with inside("dst"):
        facts["other"] = {
            "vm_echos": in_echos() - echos,
            "held": decap.forwarded() - held,
            "ping": other,
        }

    # a second VM from the same source at the same time: shared tunnel, own rule/table/veth
    vm2 = ipaddress.ip_address(VM2_IP)
    with inside("src"):
        tunnel2 = SourceTunnel(dst, vm2)
        tunnel2.prepare()
    with inside("dst"):
        decap2 = DestDecap("tap0", vm_mac, vm2, src)
        decap2.setup()
        facts["second"] = {"hold": decap2.hold, "table": decap2.table != decap.table}

    # the hold: block, ping at 10 ms, release (RESUME), CNI converges, source stops
    # tunnelling, destination waits for a quiet tunnel and removes everything
    with inside("dst"):
        plug.buffer()
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", "cl", "ping", "-n", "-i", "0.01", "-c", "700", "-W", "3", VM_IP],
        stdout=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    marks: dict[str, float] = {}  # s after the first ping: where a lost one fell, if any

    def mark(name: str) -> None:
        marks[name] = round(time.monotonic() - t0, 3)

    echos = in_echos()
    time.sleep(1.0)
    with inside("dst"):
        facts["vm_echos_while_held"] = in_echos() - echos
        echos = in_echos()
        plug.release()
        mark("released")
        time.sleep(0.05)  # the plug hands its backlog over at once: ~100 pings in 1 s
        facts["held_at_resume"] = in_echos() - echos
    time.sleep(1.0)
    sh("ip route replace 10.8.0.9/32 dev tap0", ns="dst")  # the CNI converges
    sh(f"ip route replace 10.8.0.9/32 via {DST_IP}", ns="src")
    mark("converged")
    time.sleep(0.5)
    with inside("src"):
        tunnel.remove()
        mark("source_tunnel_removed")
        facts["shared_tunnel_kept"] = bool(tunnel.ipr.link_lookup(ifname=tunnel.ifname))
    with inside("dst"):
        last, still = decap.forwarded(), time.monotonic()
        while time.monotonic() - still < 1.0:
            time.sleep(0.1)
            now = decap.forwarded()
            if now != last:
                last, still = now, time.monotonic()
        facts["tunnelled"] = last
        mark("quiet")
        decap.unsteer()
        mark("unsteered")
        plug.remove()
        mark("plug_removed")
        facts["plug_drops"] = plug.drops()
        decap.teardown()
        name = facts["devices"]["tunnel"][0]  # type: ignore[index]
        facts["dst_kept_for_second"] = bool(decap.ipr.link_lookup(ifname=name))
    out, _ = pinger.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?", out)
    answered = {int(n) for n in re.findall(r"icmp_seq=(\d+)", out)}
    # Packets the kernel dropped from its per-CPU input backlog (all namespaces share it):
    # the released plug hands hundreds of pings over at once, and a loaded lab VM lost 19.
    softnet = Path("/proc/net/softnet_stat").read_text().split("\n")
    backlog_drops = sum(int(line.split()[1], 16) for line in softnet if line.strip())
    facts["hold_ping"] = {"sent": int(m[1]), "received": int(m[2]), "dups": int(m[3] or 0)}
    facts["hold_lost"] = {
        "seqs": sorted(set(range(1, int(m[1]) + 1)) - answered),  # ping counts from 1
        "marks": marks,  # a lost seq n was sent about (n - 1) * 0.01 s after the first
        "softnet_backlog_drops": backlog_drops,
    }

    with inside("dst"):
        decap2.teardown()
    with inside("src"):
        tunnel2.remove()
    facts["fallback"] = fallback(vm_mac, vm)
    facts["churn"] = churn()
    facts["mixed"] = mixed_families(vm_mac)
    facts["setup_race"] = setup_race(vm_mac)
    facts["after"] = {"src": sysctls("src"), "dst": sysctls("dst")}
    facts["before"] = before
    facts["leftovers"] = {"src": leftovers("src"), "dst": leftovers("dst")}
    return facts


if __name__ == "__main__":
    try:
        print(json.dumps(main()))
    finally:
        for ns in NAMESPACES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sys.exit(0)
