"""Node-side half of the two-node e2e test: run ON a lab node as root, print one JSON object.

Why: the e2e test drives each node over SSH, one command per step (start the workload,
start the destination VM, converge routes, look for leftovers, stop).  Every step runs in
a fresh process, so what one step created (PIDs, netns, tap, routes, disks) is recorded in
a JSON state file (default ``/run/katamaran-e2e/state.json``) where the next step -- and
above all ``stop`` -- finds it.  Output is a single JSON line on stdout (``"ok": false`` and
exit 1 on failure) so the test never screen-scrapes.

    python3 -m pytest_katamaran.agent.node [--state-dir D] [--netns NS] COMMAND [options]

Commands: workload-start, wait-ready, dest-start, peer-route, converge, nbd-attach,
nbd-detach, katamaran (timestamping wrapper), status, leftovers, console, qmp, vm-stop,
diskcheck, stop.  ``--netns`` plays the node's netns, so the same commands also run in a
network namespace on one host (that is how tests/e2e/test_nodeside.py checks them
without the node VMs).

Heavy imports (pyroute2 costs ~6 s of CPU inside a TCG node) happen only in the commands
that build links; the time-critical ones (converge, leftovers, status) use `ip`/`tc`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_katamaran.logtail import tail
from pytest_katamaran.net.listening import listening

if TYPE_CHECKING:
    from pytest_katamaran.qemu.accel import Accel

DEFAULT_STATE_DIR = Path("/run/katamaran-e2e")
DEFAULT_RUN_DIR = Path("/run/vc/vm")
DEFAULT_POD_IP = "10.244.1.5"
DEFAULT_SANDBOX_ID = "kmre2e"
DEFAULT_POD_NAME = "kmr-pod"
DEFAULT_TAP = "tap0_kata"
KATAMARAN_PRIORITIES = (90, 91)  # source rule (network.RULE_PRIORITY) and dest decap rule
WATCHED_PORTS = (10809, 4444)  # katamaran's NBD and migration listeners
ROLES = ("source", "dest")
READ_ONLY = ("status", "leftovers", "console", "qmp")
PATH_FIELDS = ("kernel", "initrd", "run_dir", "disk")


class NodesideError(Exception):
    """A step failed in a way the caller should see as one clear line (+ details)."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


# --------------------------------------------------------------------------- state


class State:
    """The JSON state file, read-modify-written under an flock (steps may overlap)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "state.json"
        self.data: dict[str, Any] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
                yield self
            finally:
                self.save()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self) -> None:
        tmp = self.path.with_name("state.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}


# --------------------------------------------------------------------------- helpers


def run(argv: Sequence[str], netns: str | None = None, check: bool = True) -> str:
    """Run a short command (in `netns` when given); failures carry its stderr."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise NodesideError(
            f"{' '.join(full)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def ip_json(args: Sequence[str], netns: str | None = None) -> list[dict[str, Any]]:
    """`ip -j ...` / `tc -j ...` parsed (empty output means an empty list)."""
    out = run(args, netns).strip()
    return json.loads(out) if out else []


def spec_to_json(spec: Any) -> dict[str, Any]:
    """SandboxSpec -> JSON-able dict (Paths as strings)."""
    data = dataclasses.asdict(spec)
    for key in PATH_FIELDS:
        if data.get(key) is not None:
            data[key] = str(data[key])
    return data


def spec_from_json(data: dict[str, Any]) -> Any:
    """The inverse of spec_to_json: the very spec the source node printed."""
    from pytest_katamaran.qemu.workload import SandboxSpec

    values = dict(data)
    for key in PATH_FIELDS:
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return SandboxSpec(**values)


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` (`R`, `S`, `T` stopped, `Z`...); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_matches(pid: int, needle: str) -> bool:
    """True if `pid` is alive (not a zombie) and its cmdline contains `needle`.

    Why: PIDs come from a state file written by an earlier process; a recycled PID must
    never be killed.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return process_state(pid) not in (None, "Z") and needle in cmdline


def kill_pid(pid: int, needle: str, grace: float = 10.0) -> str:
    """SIGTERM, then SIGKILL after `grace`; only if the PID still is what we started."""
    if not pid_matches(pid, needle):
        return "gone"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_matches(pid, needle):
            return "terminated"
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_matches(pid, needle) and time.monotonic() < deadline:
        time.sleep(0.1)
    return "killed"


def qmp_call(
    path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 10
) -> Any:
    """One QMP command over a raw socket (no qemu.qmp import: fast on a TCG node).

    QEMU serves one monitor client at a time: while katamaran holds the socket this
    times out (NodesideError), which callers report as "busy".
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            reader = sock.makefile("rb")
            json.loads(reader.readline())  # greeting
            for cmd, cmd_args in (("qmp_capabilities", None), (command, args)):
                msg: dict[str, Any] = {"execute": cmd}
                if cmd_args:
                    msg["arguments"] = cmd_args
                sock.sendall(json.dumps(msg).encode() + b"\n")
                while True:
                    line = reader.readline()
                    if not line:
                        raise NodesideError(f"QMP {path}: connection closed during {cmd}")
                    reply = json.loads(line)
                    if "return" in reply:
                        result = reply["return"]
                        break
                    if "error" in reply:
                        raise NodesideError(f"QMP {cmd}: {reply['error'].get('desc')}")
            return result
        except (OSError, ValueError) as exc:
            raise NodesideError(f"QMP {path}: {command}: {exc}") from None


def listeners(ports: Sequence[int], netns: str | None) -> list[str]:
    """TCP sockets in LISTEN state on `ports` (from /proc/net/tcp{,6} of the netns)."""
    found = []
    for name in ("tcp", "tcp6"):
        text = run(["cat", f"/proc/net/{name}"], netns, check=False)
        found += [f"{name} port {port}" for _, port in listening(text) if port in ports]
    return found


def _need(state: dict[str, Any], role: str) -> dict[str, Any]:
    vm = state.get(role)
    if not vm:
        raise NodesideError(f"no {role} VM recorded in the state file (start it first)")
    return vm


def qemu_needle(vm: dict[str, Any]) -> str:
    return f"sandbox-{vm['spec']['sandbox_id']}"


# --------------------------------------------------------------------------- VM commands


def _start_sandbox(spec: Any, netns: str | None, role: str, st: State, timeout: float) -> Any:
    """Start QEMU detached from us (it must outlive this process) and record its PID."""
    from pytest_katamaran.qemu.sandbox import Sandbox

    box = Sandbox()
    launched = time.time()
    st.data[role] = {"spec": spec_to_json(spec), "netns": netns, "pid": None}
    st.save()
    box.start(spec, netns=netns, timeout=timeout, die_with_parent=False)
    st.data[role].update(
        pid=box.pid,
        qmp=str(box.qmp_path),
        console_log=str(box.console_log),
        run_dir=str(box.run_dir),
        argv=box.argv,
        started_at=launched,
    )
    st.save()
    return box


def _create_disk(path: Path, size: str, prefill: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    if prefill:
        # Data the guest did not write, so the mirror has real blocks to copy.
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 40M 8M", str(path)])


def _pod_accel(requested: str, why: str = "") -> Accel:
    """The pod QEMU's accelerator on this node (qemu.accel.pod_accel); a refusal is one line."""
    from pytest_katamaran.qemu.accel import AccelUnavailable, pod_accel

    try:
        return pod_accel(requested)
    except AccelUnavailable as err:
        raise NodesideError(f"{why}: {err}" if why else str(err)) from None


def cmd_workload_start(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """The Kata-shaped pod: PodNet (Calico veth + tcfilter) and QEMU in the pod netns."""
    from pytest_katamaran.images.guest import kernel_cmdline
    from pytest_katamaran.net.pod import PodNet
    from pytest_katamaran.qemu.workload import SandboxSpec

    if st.data.get("source") or st.data.get("podnet"):
        raise NodesideError("a workload is already recorded here: run `stop` first")
    accel = _pod_accel(args.accel)  # before any state: a refusal leaves nothing behind
    pod = PodNet(
        name=args.pod_name,
        pod_ip=args.pod_ip,
        node_netns=args.netns,
        tcfilter=not args.no_tcfilter,
    )
    st.data["podnet"] = {
        "name": pod.name,
        "cali": pod.host_ifname,
        "pod_ip": pod.pod_ip,
        "node_netns": args.netns,
    }
    st.save()
    pod.setup()
    if not args.dynamic_arp:
        # Calico's Felix pins the workload's MAC on its cali link (a permanent neighbour):
        # node A never has to ARP for the pod, so a guest busy under nested TCG cannot
        # fail a neighbour probe and turn pings into "host unreachable".
        run(
            ["ip", "neigh", "replace", pod.pod_ip, "lladdr", pod.mac or "", "dev"]
            + [pod.host_ifname, "nud", "permanent"],
            args.netns,
        )
    disk = Path(args.disk)
    if args.disk_size:
        _create_disk(disk, args.disk_size, args.prefill)
        st.data.setdefault("disks", []).append(str(disk))
    append = kernel_cmdline(
        ip=pod.guest_ip,
        gw=pod.gateway,
        writer="/dev/vda" if args.writer else None,
        rate=args.rate or None,
    )
    spec = SandboxSpec(
        sandbox_id=args.sandbox_id,
        kernel=Path(args.kernel),
        initrd=Path(args.initrd),
        append=append,
        run_dir=Path(args.run_dir),
        disk=disk,
        memory_mib=args.memory,
        mac=pod.mac or "",  # Kata copies eth0's MAC into the VM NIC
        qemu_binary=args.qemu_binary,
        extra_args=["-L", args.qemu_datadir] if args.qemu_datadir else [],
        accel=accel.name,
    )
    box = _start_sandbox(spec, pod.netns, "source", st, args.qmp_timeout)
    out = {
        "pid": box.pid,
        "qmp": str(box.qmp_path),
        "console_log": str(box.console_log),
        "mac": pod.mac,
        "netns": pod.netns,
        "cali": pod.host_ifname,
        "tcfilter": not args.no_tcfilter,
        "spec": spec_to_json(spec),
        "argv": box.argv,
        "accel": {"name": accel.name, "reason": accel.reason},
    }
    if args.no_wait:
        return out
    out.update(_wait_ready(st.data["source"], args.boot_timeout))
    st.data["source"]["boot_time_s"] = out["boot_time_s"]
    return out


def _wait_ready(vm: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Wait for READY on the console of a VM started by an earlier process."""
    from pytest_katamaran.qemu.sandbox import READY_MARKER

    console = Path(vm["console_log"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and READY_MARKER.encode() in console.read_bytes():
            return {"boot_time_s": round(time.time() - vm["started_at"], 3)}
        if not pid_matches(vm["pid"], qemu_needle(vm)):
            stderr = Path(vm["run_dir"]) / "qemu.stderr"
            raise NodesideError(
                "workload QEMU exited before READY",
                console=tail(console),
                qemu_stderr=tail(stderr),
            )
        # Once a second: at 5 polls/s this loop took 36 % of a TCG node's vCPU, which the
        # booting nested guest (110 %, two threads) needs.
        time.sleep(1.0)
    raise NodesideError(
        f"no READY on the workload console within {timeout:g}s", console=tail(console)
    )


def cmd_wait_ready(args: argparse.Namespace, st: State) -> dict[str, Any]:
    vm = _need(st.data, "source")
    out = _wait_ready(vm, args.boot_timeout)
    vm["boot_time_s"] = out["boot_time_s"]
    return out


def cmd_dest_start(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """The destination: pre-created tap in the node netns and the SAME spec, -incoming defer."""
    from pytest_katamaran.net.pod import prepare_dest_tap

    if st.data.get("dest") or st.data.get("desttap"):
        raise NodesideError("a destination is already recorded here: run `stop` first")
    spec_json = Path(args.spec_file).read_text() if args.spec_file else args.spec
    src_spec = spec_from_json(json.loads(spec_json))
    if src_spec.accel == "kvm":  # the same accelerator as the source, or no migration
        _pod_accel("kvm", why="the source's pod runs under KVM")
    pod_ip = args.pod_ip
    st.data["desttap"] = {"tap": args.tap, "pod_ip": pod_ip, "node_netns": args.netns}
    st.save()
    tap = prepare_dest_tap(args.netns, args.tap, pod_ip=pod_ip)
    disk = Path(args.disk) if args.disk else src_spec.disk
    if args.disk_size:
        _create_disk(disk, args.disk_size, prefill=False)
        st.data.setdefault("disks", []).append(str(disk))
    run_dir = Path(args.run_dir) if args.run_dir else None
    spec = src_spec.for_destination(disk=disk, incoming="defer", run_dir=run_dir)
    box = _start_sandbox(spec, args.netns, "dest", st, args.qmp_timeout)
    status = qmp_call(box.qmp_path, "query-status")["status"]
    return {
        "pid": box.pid,
        "qmp": str(box.qmp_path),
        "console_log": str(box.console_log),
        "status": status,
        "tap": tap.tap,
        "tap_mac": tap.mac,
        "spec": spec_to_json(spec),
        "argv": box.argv,
    }


def _vm_status(vm: dict[str, Any]) -> dict[str, Any]:
    alive = bool(vm.get("pid")) and pid_matches(vm["pid"], qemu_needle(vm))
    out: dict[str, Any] = {"pid": vm.get("pid"), "alive": alive, "qmp_status": None}
    if alive and vm.get("qmp"):
        try:
            out["qmp_status"] = qmp_call(Path(vm["qmp"]), "query-status", timeout=5)["status"]
        except NodesideError as exc:
            out["qmp_status"] = f"unavailable ({exc})"
    return out


def cmd_status(args: argparse.Namespace, st: State) -> dict[str, Any]:
    return {role: _vm_status(st.data[role]) for role in ROLES if st.data.get(role)}


def cmd_qmp(args: argparse.Namespace, st: State) -> dict[str, Any]:
    vm = _need(st.data, args.which)
    cmd_args = json.loads(args.args) if args.args else None
    return {"return": qmp_call(Path(vm["qmp"]), args.command, cmd_args, args.timeout)}


def _console_path(vm: dict[str, Any], st: State, role: str) -> Path:
    live = Path(vm.get("console_log", "/nonexistent"))
    return live if live.exists() else st.dir / f"{role}-console.log"


def cmd_console(args: argparse.Namespace, st: State) -> dict[str, Any]:
    from pytest_katamaran.checks.disk import last_ack

    vm = _need(st.data, args.which)
    path = _console_path(vm, st, args.which)
    acked = last_ack(path) if path.exists() else 0
    return {"path": str(path), "last_ack": acked, "tail": tail(path, args.lines)}


def _stop_vm(vm: dict[str, Any], st: State, role: str) -> dict[str, Any]:
    """Kill one VM by PID, keep its console log (the disk check needs it), drop its run dir."""
    out: dict[str, Any] = {}
    if vm.get("pid"):
        out["qemu"] = kill_pid(vm["pid"], qemu_needle(vm))
    run_dir = Path(vm.get("run_dir") or spec_from_json(vm["spec"]).sandbox_dir)
    for name, saved in (("console.log", "console.log"), ("qemu.stderr", "qemu.stderr")):
        src = run_dir / name
        if src.exists():
            shutil.copyfile(src, st.dir / f"{role}-{saved}")
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    vm["pid"] = None
    vm["console_log"] = str(st.dir / f"{role}-console.log")
    vm["stopped"] = True
    return out


def cmd_vm_stop(args: argparse.Namespace, st: State) -> dict[str, Any]:
    from pytest_katamaran.checks.disk import last_ack

    vm = _need(st.data, args.which)
    out = _stop_vm(vm, st, args.which)
    console = st.dir / f"{args.which}-console.log"
    out["last_ack"] = last_ack(console) if console.exists() else 0
    out["console_log"] = str(console)
    return out


def cmd_diskcheck(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """verify_writes on a recorded VM's disk (stop the VM first)."""
    from pytest_katamaran.checks.disk import last_ack, verify_writes

    vm = _need(st.data, args.which)
    if vm.get("pid") and pid_matches(vm["pid"], qemu_needle(vm)):
        raise NodesideError(f"the {args.which} VM still runs: `vm-stop --which {args.which}` first")
    disk = Path(args.disk or vm["spec"]["disk"])
    acked = args.acked
    if acked is None:
        acked = last_ack(_console_path(vm, st, args.which))
    report = verify_writes(disk, acked)
    return {
        "ok": report.ok,
        "report": str(report),
        "acked": acked,
        "highest": report.highest,
        "checked": report.checked,
        "missing": report.missing[:50],
        "corrupt": report.corrupt[:50],
        "misplaced": report.misplaced[:50],
        "disk": str(disk),
    }


# --------------------------------------------------------------------------- routes


def _route(
    st: State, netns: str | None, spec: list[str], label: str, *, record_only: bool = False
) -> dict[str, Any]:
    """`ip route replace SPEC` and remember it so `stop` deletes it (`record_only`: only
    remember it, for a route set by other means later)."""
    if not record_only:
        run(["ip", "route", "replace", *spec], netns)
    routes = st.data.setdefault("routes", [])
    if spec not in [r["spec"] for r in routes]:
        routes.append({"spec": spec, "netns": netns, "label": label})
    return {"route": " ".join(spec), "at": time.time()}


def cmd_peer_route(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """The other node's pod CIDR via its node IP (what Calico's BGP routes would install)."""
    return _route(st, args.netns, [args.dst, "via", args.via], "peer")


def converge_route(role: str, pod_ip: str, via: str | None, tap: str) -> list[str]:
    """The CNI's converged route for the moved pod, as `ip route replace` arguments:
    behind node B (`via`) on the source node, on the tap on the destination."""
    pod = f"{pod_ip}/32"
    if role == "source":
        if not via:
            raise NodesideError("converge --role source needs --via (node B's IP)")
        return [pod, "via", via]
    return [pod, "dev", tap, "scope", "link"]


def cmd_converge(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """What the CNI does once the pod runs on node B (the tunnel hold covers until then).

    source: POD_IP now lives behind node B.  dest: POD_IP is local, on the tap -- the same
    route as `podnet.DestTap.add_pod_route()`, set with `ip` because importing pyroute2
    costs seconds of CPU on a TCG node and this step races the tunnel hold -- and the
    pod's MAC pinned on the tap, as Felix does (`--dynamic-arp` leaves it to ARP).
    """
    spec = converge_route(args.role, args.pod_ip, args.via, args.tap)
    out = _route(st, args.netns, spec, "converged", record_only=args.record_only)
    mac = (st.data.get("dest") or {}).get("spec", {}).get("mac")
    if args.role == "dest" and mac and not args.dynamic_arp:
        # Felix pins the workload's MAC on node B's link too, as workload-start does on
        # node A: the first packets after the move then wait in the tap's queue for a guest
        # that TCG has not scheduled yet, instead of failing a 3 s neighbour probe.  With
        # --record-only too (the route comes later, over `ip`): unused until then.
        run(["ip", "neigh", "replace", args.pod_ip, "lladdr", mac, "dev", args.tap]
            + ["nud", "permanent"], args.netns)  # fmt: skip
        out["neighbour"] = mac
    return out


# --------------------------------------------------------------------------- shared storage


def cmd_nbd_attach(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """Map a network disk as a local block device (the krbd/iSCSI model of shared storage).

    Both nodes map the same NBD export; each node's QEMU opens `/dev/nbdN` as a plain
    block device, so the source QEMU inside the pod netns needs no network of its own.
    """
    dev = args.device
    run(["modprobe", "nbd"])
    url = f"nbd://{args.host}:{args.port}/{args.export}"
    run(["qemu-nbd", "-c", dev, "-f", "raw", url])
    name = Path(dev).name
    deadline = time.monotonic() + 30
    size = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            size = int(Path(f"/sys/block/{name}/size").read_text())
        if size:
            break
        time.sleep(0.1)
    if not size:
        raise NodesideError(f"{dev} connected to {url} but reports size 0")
    pid = int(Path(f"/sys/block/{name}/pid").read_text())
    st.data.setdefault("nbd", []).append({"device": dev, "url": url, "pid": pid})
    return {"device": dev, "url": url, "pid": pid, "bytes": size * 512}


def _nbd_detach(entry: dict[str, Any]) -> str:
    dev = entry["device"]
    run(["qemu-nbd", "-d", dev], check=False)
    if entry.get("pid"):
        return kill_pid(entry["pid"], "qemu-nbd")
    return "detached"


def cmd_nbd_detach(args: argparse.Namespace, st: State) -> dict[str, Any]:
    out = {}
    for entry in list(st.data.get("nbd", [])):
        if args.device in (None, entry["device"]):
            out[entry["device"]] = _nbd_detach(entry)
            st.data["nbd"].remove(entry)
    return out


# --------------------------------------------------------------------------- katamaran


def cmd_katamaran(args: argparse.Namespace, st: State) -> int:
    """Run the real `katamaran` CLI, stamping each of its lines with this node's clock.

    Why: `ping -D` stamps replies with the same clock, so a lost sequence number can be
    placed exactly relative to katamaran's STOP / switch / RESUME lines.  SIGINT/SIGTERM
    are forwarded; the exit code is katamaran's.
    """
    argv = [sys.executable, "-m", "katamaran", *args.rest]
    if args.netns:
        argv = ["ip", "netns", "exec", args.netns, *argv]  # execs in place: same PID
    started = time.time()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with st.locked():
        st.data.setdefault("katamaran", []).append(
            {"pid": proc.pid, "wrapper": os.getpid(), "argv": argv}
        )

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    err = sys.stderr
    print(f"[{started:.6f}] nodeside: exec {' '.join(argv)}", file=err, flush=True)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        print(f"[{time.time():.6f}] {line}", file=err, flush=True)
    rc = proc.wait()
    print(f"[{time.time():.6f}] nodeside: katamaran exited {rc}", file=err, flush=True)
    print(json.dumps({"ok": rc == 0, "rc": rc, "started": started, "ended": time.time()}))
    with st.locked():
        st.data["katamaran"] = [k for k in st.data.get("katamaran", []) if k["pid"] != proc.pid]
    return rc


# --------------------------------------------------------------------------- inspection


def cmd_leftovers(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """Everything katamaran must have removed: plug qdiscs, kmr-* tunnels, its rules, NBD."""
    ns = args.netns
    plug = [
        {"dev": q.get("dev"), "handle": q.get("handle")}
        for q in ip_json(["tc", "-j", "qdisc", "show"], ns)
        if q.get("kind") == "plug"
    ]
    links = [
        link["ifname"]
        for link in ip_json(["ip", "-j", "link", "show"], ns)
        if link.get("ifname", "").startswith("kmr-")
    ]
    rules = [
        {"family": fam, **rule}
        for fam in ("-4", "-6")
        for rule in ip_json(["ip", fam, "-j", "rule", "show"], ns)
        if rule.get("priority") in KATAMARAN_PRIORITIES
    ]
    exports: dict[str, Any] = {}
    for role in ROLES:
        vm = st.data.get(role)
        if vm and vm.get("pid") and pid_matches(vm["pid"], qemu_needle(vm)):
            try:
                found = qmp_call(Path(vm["qmp"]), "query-block-exports", timeout=5)
                nodes = qmp_call(
                    Path(vm["qmp"]), "query-named-block-nodes", {"flat": True}, timeout=5
                )
            except NodesideError as exc:
                exports[role] = [f"unknown: {exc}"]
                continue
            helpers = [
                n["node-name"] for n in nodes if n.get("node-name", "").startswith("katamaran")
            ]
            if found or helpers:
                exports[role] = found + helpers
    return {
        "plug_qdiscs": plug,
        "kmr_links": links,
        "rules": rules,
        "nbd_exports": exports,
        "listeners": listeners(WATCHED_PORTS, ns),
        "katamaran_running": [
            k["pid"] for k in st.data.get("katamaran", []) if pid_matches(k["pid"], "katamaran")
        ],
    }


# --------------------------------------------------------------------------- stop


def _quiet(what: str, fn: Callable[[], Any], done: dict[str, Any], errors: list[str]) -> None:
    try:
        done[what] = fn()
    except Exception as exc:  # keep tearing down the rest; report at the end
        errors.append(f"{what}: {exc}")


def _teardown_podnet(pod: dict[str, Any]) -> str:
    ns = pod.get("node_netns")
    run(["ip", "link", "del", pod["cali"]], ns, check=False)
    netns_dir = Path("/var/run/netns") / pod["name"]
    if netns_dir.exists():
        run(["ip", "netns", "del", pod["name"]])
        return "removed"
    return "gone"


def _teardown_tap(tap: dict[str, Any]) -> str:
    ns = tap.get("node_netns")
    if ns and not (Path("/var/run/netns") / ns).exists():
        return "netns gone"
    exists = subprocess.run(
        (["ip", "netns", "exec", ns] if ns else []) + ["ip", "link", "show", tap["tap"]],
        capture_output=True,
    )
    if exists.returncode != 0:
        return "gone"
    run(["ip", "link", "del", tap["tap"]], ns)
    return "removed"


def cmd_stop(args: argparse.Namespace, st: State) -> dict[str, Any]:
    """Undo everything recorded, in reverse order; safe to run twice or after a crash."""
    data = st.data
    done: dict[str, Any] = {}
    errors: list[str] = []
    for entry in data.get("katamaran", []):
        _quiet(
            f"katamaran {entry['pid']}",
            lambda e=entry: kill_pid(e["pid"], "katamaran"),
            done,
            errors,
        )
    data["katamaran"] = []
    for role in ROLES:
        vm = data.get(role)
        if vm and not vm.get("stopped"):
            _quiet(f"{role} vm", lambda vm=vm, role=role: _stop_vm(vm, st, role), done, errors)
    for entry in reversed(data.get("routes", [])):
        _quiet(
            f"route {' '.join(entry['spec'])}",
            lambda e=entry: (
                run(["ip", "route", "del", e["spec"][0]], e["netns"], check=False) or "removed"
            ),
            done,
            errors,
        )
    data["routes"] = []
    for entry in data.get("nbd", []):
        _quiet(f"nbd {entry['device']}", lambda e=entry: _nbd_detach(e), done, errors)
    data["nbd"] = []
    if data.get("podnet"):
        _quiet("podnet", lambda: _teardown_podnet(data["podnet"]), done, errors)
    if data.get("desttap"):
        _quiet("dest tap", lambda: _teardown_tap(data["desttap"]), done, errors)
    if args.purge:
        for disk in data.get("disks", []):
            _quiet(f"disk {disk}", lambda d=disk: Path(d).unlink(missing_ok=True), done, errors)
    for key in ("podnet", "desttap", "source", "dest", "nbd", "routes", "katamaran"):
        data.pop(key, None)
    if args.purge:
        data.pop("disks", None)
    if errors:
        raise NodesideError("stop: " + "; ".join(errors), done=done)
    return {"done": {k: v for k, v in done.items() if v is not None}}


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m pytest_katamaran.agent.node")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--netns", default=None, help="act in this netns instead of the node's own")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[..., Any], help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(fn=fn)
        return sp

    def vm_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--pod-ip", default=DEFAULT_POD_IP)
        sp.add_argument("--disk-size", default="", help="create the disk (qcow2) of this size")
        sp.add_argument("--qmp-timeout", type=float, default=120.0)

    sp = add("workload-start", cmd_workload_start, "pod network + source VM, wait for READY")
    vm_opts(sp)
    sp.add_argument("--kernel", required=True)
    sp.add_argument("--initrd", required=True)
    sp.add_argument("--disk", required=True)
    sp.add_argument("--prefill", action="store_true", help="write 8 MiB the guest did not")
    sp.add_argument("--sandbox-id", default=DEFAULT_SANDBOX_ID)
    sp.add_argument("--pod-name", default=DEFAULT_POD_NAME)
    sp.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    sp.add_argument("--memory", type=int, default=128)
    sp.add_argument("--qemu-binary", default="qemu-system-x86_64")
    sp.add_argument("--qemu-datadir", default="", help="QEMU -L (firmware of that QEMU)")
    sp.add_argument("--writer", action="store_true", help="run the guest's disk writer")
    sp.add_argument("--rate", type=int, default=0, help="writer writes/s (0: unthrottled)")
    sp.add_argument("--no-tcfilter", action="store_true", help="plain veth, no Kata redirect")
    sp.add_argument(
        "--dynamic-arp",
        action="store_true",
        help="no permanent neighbour for the pod (Felix adds one)",
    )
    sp.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default="tcg",
        help="the pod QEMU's accelerator (auto: KVM if this node really runs a vCPU with it)",
    )
    sp.add_argument("--no-wait", action="store_true", help="return before READY")
    sp.add_argument("--boot-timeout", type=float, default=600.0)

    sp = add("wait-ready", cmd_wait_ready, "wait for the source VM's READY line")
    sp.add_argument("--boot-timeout", type=float, default=600.0)

    sp = add("dest-start", cmd_dest_start, "dest tap + destination VM (-incoming defer)")
    vm_opts(sp)
    sp.add_argument("--spec", help="the source's spec as JSON (workload-start prints it)")
    sp.add_argument("--spec-file")
    sp.add_argument("--disk", help="this node's disk (default: the source's path)")
    sp.add_argument("--tap", default=DEFAULT_TAP)
    sp.add_argument("--run-dir", default="", help="override (single-host tests only)")

    sp = add("peer-route", cmd_peer_route, "route another node's pod CIDR via its node IP")
    sp.add_argument("--dst", required=True)
    sp.add_argument("--via", required=True)

    sp = add("converge", cmd_converge, "the CNI's converged route for the migrated pod")
    sp.add_argument("--role", choices=ROLES, required=True)
    sp.add_argument("--pod-ip", default=DEFAULT_POD_IP)
    sp.add_argument("--via", help="source: node B's IP")
    sp.add_argument("--tap", default=DEFAULT_TAP)
    sp.add_argument(
        "--dynamic-arp",
        action="store_true",
        help="dest: no permanent neighbour for the pod (Felix adds one)",
    )
    sp.add_argument(
        "--record-only",
        action="store_true",
        help="only record the route for `stop` (the e2e sets it with `ip` mid-hold)",
    )

    sp = add("nbd-attach", cmd_nbd_attach, "map a shared NBD export as /dev/nbdN")
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--export", required=True)
    sp.add_argument("--device", default="/dev/nbd0")

    sp = add("nbd-detach", cmd_nbd_detach, "unmap shared NBD devices")
    sp.add_argument("--device", default=None)

    sp = add("katamaran", cmd_katamaran, "run katamaran with node-clock timestamps")
    sp.add_argument("rest", nargs=argparse.REMAINDER)

    add("status", cmd_status, "are the VMs alive, and their QMP status")
    add("leftovers", cmd_leftovers, "plug qdiscs, kmr tunnels, rules 90/91, NBD exports")

    sp = add("console", cmd_console, "tail and last ACK of a VM's serial console")
    sp.add_argument("--which", choices=ROLES, required=True)
    sp.add_argument("--lines", type=int, default=80)

    sp = add("qmp", cmd_qmp, "one QMP command on a recorded VM")
    sp.add_argument("--which", choices=ROLES, required=True)
    sp.add_argument("--command", required=True)
    sp.add_argument("--args", default="")
    sp.add_argument("--timeout", type=float, default=10.0)

    sp = add("vm-stop", cmd_vm_stop, "kill one VM by PID, keep its console log")
    sp.add_argument("--which", choices=ROLES, required=True)

    sp = add("diskcheck", cmd_diskcheck, "verify every acknowledged write is on the disk")
    sp.add_argument("--which", choices=ROLES, required=True)
    sp.add_argument("--acked", type=int, default=None)
    sp.add_argument("--disk", default=None)

    sp = add("stop", cmd_stop, "kill VMs, remove nets/routes/nbd (and disks with --purge)")
    sp.add_argument("--purge", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "katamaran":
        if args.rest and args.rest[0] == "--":
            args.rest = args.rest[1:]
        return cmd_katamaran(args, State(args.state_dir))
    st = State(args.state_dir)
    try:
        if args.command in READ_ONLY:
            # No lock: a diagnostic read must not wait behind a long-running step.
            st.data = st.read()
            result = args.fn(args, st)
        else:
            with st.locked():
                result = args.fn(args, st)
    except NodesideError as exc:
        print(json.dumps({"ok": False, "error": str(exc), **exc.details}, default=str))
        return 1
    except Exception as exc:  # any other failure: still one JSON line, with the type
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, default=str))
        return 1
    print(json.dumps({"ok": True, **result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
