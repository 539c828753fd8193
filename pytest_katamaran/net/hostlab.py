"""Two "nodes" on this host as network namespaces, plus small netns helpers.

Why: integration tests need a source and a destination node with their own
routing tables, links and sysctls, without VMs.  Each node is a netns joined to
the other by a veth pair (10.0.0.1/24 <-> 10.0.0.2/24, fd00:10::1/64 <-> ::2/64).
Names carry a random suffix so pytest-xdist workers never collide, and teardown
deletes exactly the two namespaces it created (their links go with them).

The helpers (`netns_preexec`, `write_sysctl`, `popen_in_netns`, `scratch_netns`) live here because
every module that touches a namespace (sandbox, podnet) needs the same few.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

NETNS_RUN_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


def netns_exists(name: str) -> bool:
    """True when a named netns (as `ip netns add` makes them) exists."""
    return name in netns.listnetns()


def open_netns(name: str) -> int:
    """Open a named netns; FileNotFoundError (not auto-creation) if it is missing."""
    return os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_preexec(fd: int) -> Callable[[], None]:
    """A `preexec_fn` that enters the netns open at `fd` in the forked child.

    Why not `ip netns exec`: the child keeps the PID Popen reports (so we can kill it
    by PID) and no extra mount namespace is created.  The fd is opened in the parent
    so the child only makes one syscall between fork and exec.
    """

    def _enter() -> None:
        _setns(fd)

    return _enter


def run_in_netns(name: str | None, fn: Callable[[], Any]) -> Any:
    """Call `fn` in a short-lived thread that has joined netns `name`.

    Why a thread: setns(CLONE_NEWNET) only affects the calling thread, so the rest
    of the process (and pytest) stays where it was.  /proc/sys/net resolves against
    the opening thread's netns, which is what sysctl writes need.
    """
    if name is None:
        return fn()
    fd = open_netns(name)
    box: dict[str, Any] = {}

    def _target() -> None:
        try:
            _setns(fd)
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    try:
        t = threading.Thread(target=_target, name=f"netns-{name}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def sysctl_path(key: str) -> Path:
    """`net.ipv4.ip_forward` or `net/ipv4/conf/eth0.5/proxy_arp` -> its /proc/sys file.

    Use the slash form when a component (an interface name) may contain dots.
    """
    if key.startswith("/"):
        return Path(key)
    return Path("/proc/sys") / (key if "/" in key else key.replace(".", "/"))


def write_sysctl(name: str | None, key: str, value: str | int) -> None:
    """Write a sysctl (see `sysctl_path` for the key forms) inside netns `name` (None: current)."""
    path = sysctl_path(key)

    def _write() -> None:
        path.write_text(f"{value}\n")

    run_in_netns(name, _write)


def read_sysctl(name: str | None, key: str) -> str:
    """Read a sysctl inside netns `name`; used by tests to verify what we set."""
    path = sysctl_path(key)
    return str(run_in_netns(name, lambda: path.read_text().strip()))


def popen_in_netns(name: str | None, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start `argv` inside netns `name` (None: current); the Popen's pid is the command's."""
    if name is None:
        return subprocess.Popen(list(argv), **popen_kwargs)
    if "preexec_fn" in popen_kwargs:
        raise TypeError("preexec_fn is used to enter the netns")
    fd = open_netns(name)
    try:
        return subprocess.Popen(list(argv), preexec_fn=netns_preexec(fd), **popen_kwargs)
    finally:
        os.close(fd)


def ipr(name: str | None) -> IPRoute:
    """An IPRoute bound to netns `name` that never creates a missing namespace.

    Why: pyroute2's default (`flags=O_CREAT`) silently recreates a namespace we are
    trying to tear down.
    """
    if name is None:
        return IPRoute()
    if not netns_exists(name):
        raise FileNotFoundError(f"netns {name!r} does not exist")
    return IPRoute(netns=name, flags=0)


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A fresh netns holding only lo (up), named `<prefix>-<random>` so xdist workers
    never collide, deleted on the way out whatever happened inside (its links go with
    it): a test's own client, target or isolated QEMU namespace."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        with ipr(name) as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        if netns_exists(name):
            netns.remove(name)


@dataclass(frozen=True)
class Node:
    """One lab node: its netns and its end of the inter-node link."""

    label: str
    netns: str
    ifname: str
    ipv4: str
    ipv6: str
    prefix4: int = 24
    prefix6: int = 64


class HostLab:
    """Two netns "nodes" joined by a veth pair; use as a context manager.

    Callers must tear down in `finally` (or `with`) so Ctrl-C does not leak
    namespaces; `teardown()` is idempotent and only deletes what `up()` created.
    """

    LINK = "kmr0"

    def __init__(self, prefix: str = "kmr") -> None:
        suffix = secrets.token_hex(3)
        self.a = Node("a", f"{prefix}-a-{suffix}", self.LINK, "10.0.0.1", "fd00:10::1")
        self.b = Node("b", f"{prefix}-b-{suffix}", self.LINK, "10.0.0.2", "fd00:10::2")
        self._created: list[str] = []

    @property
    def nodes(self) -> tuple[Node, Node]:
        """Both nodes, source first."""
        return (self.a, self.b)

    def node(self, which: Node | str) -> Node:
        """Resolve "a"/"b", a netns name or a Node to the Node."""
        if isinstance(which, Node):
            return which
        for n in self.nodes:
            if which in (n.label, n.netns):
                return n
        raise KeyError(which)

    def up(self) -> HostLab:
        """Create both namespaces, the link, addresses, lo and ip_forward."""
        try:
            for n in self.nodes:
                if netns_exists(n.netns):
                    raise FileExistsError(f"netns {n.netns} already exists")
                netns.create(n.netns)
                self._created.append(n.netns)
            with ipr(self.a.netns) as ip:
                ip.link(
                    "add",
                    ifname=self.a.ifname,
                    kind="veth",
                    peer={"ifname": self.b.ifname, "net_ns_fd": self.b.netns},
                )
            for n in self.nodes:
                with ipr(n.netns) as ip:
                    lo = ip.link_lookup(ifname="lo")[0]
                    ip.link("set", index=lo, state="up")
                    idx = ip.link_lookup(ifname=n.ifname)[0]
                    ip.addr("add", index=idx, address=n.ipv4, prefixlen=n.prefix4)
                    # NODAD: usable at once instead of after ~1 s of duplicate detection.
                    ip.addr(
                        "add",
                        index=idx,
                        address=n.ipv6,
                        prefixlen=n.prefix6,
                        flags=IFA_F_NODAD,
                    )
                    ip.link("set", index=idx, state="up")
                write_sysctl(n.netns, "net.ipv4.ip_forward", 1)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Delete the namespaces this lab created (links inside go with them)."""
        while self._created:
            name = self._created.pop()
            if netns_exists(name):
                netns.remove(name)

    def popen(self, node: Node | str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside `node`'s netns; returns the Popen (pid is the command's)."""
        return popen_in_netns(self.node(node).netns, argv, **popen_kwargs)

    def run(
        self, node: Node | str, argv: Sequence[str], **popen_kwargs: Any
    ) -> subprocess.CompletedProcess:
        """`subprocess.run` inside `node`'s netns (accepts check/timeout/capture_output)."""
        name = self.node(node).netns
        fd = open_netns(name)
        try:
            return subprocess.run(list(argv), preexec_fn=netns_preexec(fd), **popen_kwargs)
        finally:
            os.close(fd)

    def __enter__(self) -> HostLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.teardown()
