"""Kubernetes and Kata pieces of the minikube and k3s flows, as data and pure functions.

Why: those flows cannot run on the CI machines (no usable KVM, no cluster, no Kata, no
internet), so everything that can be wrong without a cluster lives here and is covered
by ``tests/smoke/test_kube_logic.py``: the manifests (emitted as YAML by a tiny emitter,
PyYAML is not a dependency), kata-deploy steps, ``kubectl -o json`` parsing, waits that
always have a timeout and a message, QMP socket discovery from a node listing, the Kata
configuration patch for a second QMP monitor, and the destination QEMU command line
replayed from the source's ``/proc/<pid>/cmdline`` (a Kata pod cannot be a destination:
the shim kills a VM whose agent does not connect in time).
"""

from __future__ import annotations

import importlib.util
import json
import py_compile
import re
import shlex
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pytest_katamaran.qemu.sandbox import SandboxSockets
from pytest_katamaran.qemu.workload import (
    DEFAULT_RUN_DIR,
    EXTRA_MONITOR_SOCKET,
    PIDFILE,
    QMP_SOCKET,
)

T = TypeVar("T")

NGINX_IMAGE = "nginx:alpine"
HELPER_IMAGE = "python:3.11-alpine"
KATA_HANDLER = "kata-qemu"
MINIKUBE_RUNTIME_CLASS = "kata-qemu"
K3S_RUNTIME_CLASS = "kata"
KATA_NODE_LABEL = "katacontainers.io/kata-runtime"
HOSTNAME_LABEL = "kubernetes.io/hostname"
DEFAULT_TAP = "tap0_kata"
DEFAULT_KATA_VERSION = "3.7.0"
KATA_RAW = "https://raw.githubusercontent.com/kata-containers/kata-containers"
KATA_CONFIG_CANDIDATES = (
    "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml",
    "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml",
    "/etc/kata-containers/configuration-qemu.toml",
    "/usr/share/defaults/kata-containers/configuration-qemu.toml",
    "/etc/kata-containers/configuration.toml",  # the Ubuntu lab node's copy (seed.py)
)
BUNDLE_PACKAGES = ("katamaran", "qemu.qmp", "pyroute2")
RC_MARKER = "__katamaran_rc="


class KubeError(RuntimeError):
    """A cluster-side step failed; the message says which and what was seen."""


class WaitTimeout(TimeoutError):
    """A wait ran out of time; the message names what was awaited and the last state."""


# --------------------------------------------------------------------------- YAML

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Any) -> str:
    """One scalar; strings are plain when unambiguous, else JSON-quoted (valid YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _emit(obj: Any, level: int) -> list[str]:
    pad = "  " * level
    if isinstance(obj, Mapping):
        lines: list[str] = []
        for key, value in obj.items():
            head = f"{pad}{_scalar(key)}:"
            if isinstance(value, Mapping | list | tuple) and value:
                lines.append(head)
                lines.extend(_emit(value, level + 1))
            elif isinstance(value, Mapping):
                lines.append(f"{head} {{}}")
            elif isinstance(value, list | tuple):
                lines.append(f"{head} []")
            else:
                lines.append(f"{head} {_scalar(value)}")
        return lines
    if isinstance(obj, list | tuple):
        lines = []
        for item in obj:
            if isinstance(item, Mapping | list | tuple) and item:
                inner = _emit(item, level + 1)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines.extend(inner[1:])
            elif isinstance(item, Mapping):
                lines.append(f"{pad}- {{}}")
            elif isinstance(item, list | tuple):
                lines.append(f"{pad}- []")
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [pad + _scalar(obj)]


def to_yaml(*docs: Mapping[str, Any]) -> str:
    """Block-style YAML for one or more documents (``---`` separated)."""
    return "".join("---\n" + "\n".join(_emit(doc, 0)) + "\n" for doc in docs)


def _parse_scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text in ("null", "~"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        return float(text)
    return text


def _split_key(text: str) -> tuple[str, str] | None:
    """``key: rest`` -> (key, rest); None if the line is not a mapping entry."""
    if text.startswith('"'):
        key, end = json.JSONDecoder().raw_decode(text)
        rest = text[end:]
    else:
        m = re.match(r"[^\s:\"][^:]*?(?=:(\s|$))", text)
        if m is None:
            return None
        key, rest = m.group(0), text[m.end() :]
    if not rest.startswith(":"):
        return None
    return str(key), rest[1:].strip()


def _parse_block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1] == "-" or lines[i][1].startswith("- "):
        seq: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            rest = lines[i][1][2:].strip()
            if _split_key(rest) is not None:
                lines[i] = (indent + 2, rest)
                item, i = _parse_block(lines, i, indent + 2)
            else:
                item, i = _parse_scalar(rest), i + 1
            seq.append(item)
        return seq, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        split = _split_key(lines[i][1])
        if split is None:
            raise ValueError(f"not a mapping entry at indent {indent}: {lines[i][1]!r}")
        key, rest = split
        i += 1
        if rest:
            mapping[key] = _parse_scalar(rest)
        elif i < len(lines) and (
            lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("- "))
        ):
            mapping[key], i = _parse_block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    return mapping, i


def load_yaml_subset(text: str) -> list[Any]:
    """Parse the block YAML ``to_yaml`` writes back into Python (a structural check).

    Not a general YAML parser: block mappings and sequences, JSON-quoted or plain scalars.
    """
    docs: list[Any] = []
    for chunk in re.split(r"^---\s*$", text, flags=re.M):
        lines = [
            (len(raw) - len(raw.lstrip(" ")), raw.strip())
            for raw in chunk.splitlines()
            if raw.strip() and not raw.lstrip().startswith("#")
        ]
        if not lines:
            continue
        doc, end = _parse_block(lines, 0, lines[0][0])
        if end != len(lines):
            raise ValueError(f"unparsed YAML from line {end}: {lines[end][1]!r}")
        docs.append(doc)
    return docs


# --------------------------------------------------------------------------- manifests


def runtime_class(
    name: str, handler: str = KATA_HANDLER, node_selector: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A RuntimeClass mapping ``name`` to the containerd runtime ``handler``."""
    doc: dict[str, Any] = {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": name},
        "handler": handler,
    }
    if node_selector:
        doc["scheduling"] = {"nodeSelector": dict(node_selector)}
    return doc


def kata_pod(
    name: str,
    runtime_class_name: str,
    *,
    image: str = NGINX_IMAGE,
    namespace: str = "default",
    node_name: str | None = None,
    node_selector: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The guide's workload: nginx:alpine in a Kata VM, optionally pinned to one node.

    ``node_selector`` keeps the scheduler (and so the RuntimeClass scheduling rules) in
    the loop; ``node_name`` bypasses it.
    """
    spec: dict[str, Any] = {"runtimeClassName": runtime_class_name}
    if node_name:
        spec["nodeName"] = node_name
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    spec["terminationGracePeriodSeconds"] = 5
    spec["containers"] = [
        {
            "name": "nginx",
            "image": image,
            "ports": [{"containerPort": 80}],
        }
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
    }


def helper_pod(
    name: str,
    node_name: str,
    host_paths: Mapping[str, str],
    *,
    image: str = HELPER_IMAGE,
    namespace: str = "default",
) -> dict[str, Any]:
    """A privileged runc pod in the node's namespaces, for running katamaran "in the node".

    Why: the minikube ISO has no python3; this pod brings one while seeing the node's
    network, PIDs and ``/run/vc`` (``host_paths``: host path -> mount path).
    """
    volumes, mounts = [], []
    for i, (host, mount) in enumerate(sorted(host_paths.items())):
        volumes.append({"name": f"host{i}", "hostPath": {"path": host}})
        mounts.append(
            {"name": f"host{i}", "mountPath": mount, "mountPropagation": "HostToContainer"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node_name,
            "hostNetwork": True,
            "hostPID": True,
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "shell",
                    "image": image,
                    "command": ["sleep", "infinity"],
                    "securityContext": {"privileged": True},
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


# --------------------------------------------------------------------------- kata-deploy


@dataclass(frozen=True)
class Step:
    """One kubectl invocation of a flow, with its time limit and what it is for."""

    args: tuple[str, ...]
    timeout: float
    what: str


def kata_deploy_urls(version: str = DEFAULT_KATA_VERSION) -> tuple[str, str]:
    """kata-rbac and kata-deploy DaemonSet YAML for a pinned Kata release."""
    base = f"{KATA_RAW}/{version}/tools/packaging/kata-deploy"
    return (
        f"{base}/kata-rbac/base/kata-rbac.yaml",
        f"{base}/kata-deploy/base/kata-deploy.yaml",
    )


def kata_deploy_steps(version: str = DEFAULT_KATA_VERSION, timeout: float = 900) -> list[Step]:
    """The guide's "install Kata via kata-deploy": RBAC, DaemonSet, wait for its rollout.

    The node label ``katacontainers.io/kata-runtime=true`` (set by kata-deploy once the
    runtime is installed) is awaited separately by the caller.
    """
    rbac, deploy = kata_deploy_urls(version)
    return [
        Step(("apply", "-f", rbac), 120, "apply kata-rbac"),
        Step(("apply", "-f", deploy), 120, "apply kata-deploy DaemonSet"),
        Step(
            (
                "-n",
                "kube-system",
                "rollout",
                "status",
                "daemonset/kata-deploy",
                f"--timeout={timeout:.0f}s",
            ),
            timeout + 30,
            "kata-deploy DaemonSet rollout",
        ),
    ]


# --------------------------------------------------------------------------- kubectl JSON


def _load(data: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    try:
        loaded = json.loads(data)
    except ValueError as exc:
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        raise KubeError(f"kubectl did not return JSON ({exc}): {text.strip()[:200]!r}") from None
    if not isinstance(loaded, Mapping):
        raise KubeError(f"kubectl JSON is not an object: {str(loaded)[:200]!r}")
    return loaded


def _items(data: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    if data.get("kind") == kind:
        return [data]
    if "items" in data:
        return list(data.get("items") or [])
    raise KubeError(f"expected a {kind} or a List, got kind {data.get('kind')!r}")


@dataclass(frozen=True)
class PodStatus:
    """What the flows need from ``kubectl get pod -o json``."""

    name: str
    namespace: str
    phase: str
    node: str | None
    pod_ip: str | None
    ready: bool
    runtime_class: str | None = None
    waiting: str | None = None  # e.g. "ContainerCreating" or "ImagePullBackOff: <message>"
    message: str | None = None

    def describe(self) -> str:
        """One line for wait messages and skip/fail reasons."""
        bits = [f"{self.namespace}/{self.name}: {self.phase}"]
        if self.ready:
            bits.append("ready")
        if self.waiting:
            bits.append(f"waiting ({self.waiting})")
        if self.message:
            bits.append(self.message)
        bits.append(f"node={self.node or '-'} ip={self.pod_ip or '-'}")
        return ", ".join(bits)


# Waiting reasons that will not fix themselves: fail at once instead of at the timeout.
FATAL_WAITING = ("ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError")


def _pod(item: Mapping[str, Any]) -> PodStatus:
    meta = item.get("metadata") or {}
    spec = item.get("spec") or {}
    status = item.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    waiting = None
    for cs in status.get("containerStatuses") or []:
        state = (cs.get("state") or {}).get("waiting")
        if state:
            waiting = state.get("reason") or "waiting"
            if state.get("message"):
                waiting += f": {state['message']}"
            break
    message = status.get("message")
    if not message:
        for c in status.get("conditions") or []:
            if c.get("status") == "False" and c.get("message"):
                message = c["message"]
                break
    return PodStatus(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        phase=str(status.get("phase", "Unknown")),
        node=spec.get("nodeName"),
        pod_ip=status.get("podIP"),
        ready=ready,
        runtime_class=spec.get("runtimeClassName"),
        waiting=waiting,
        message=message,
    )


def parse_pod(data: str | bytes | Mapping[str, Any]) -> PodStatus:
    """One pod from ``kubectl get pod NAME -o json``."""
    items = _items(_load(data), "Pod")
    if len(items) != 1:
        raise KubeError(f"expected one pod, got {len(items)}")
    return _pod(items[0])


def parse_pods(data: str | bytes | Mapping[str, Any]) -> list[PodStatus]:
    """All pods from ``kubectl get pods -o json``."""
    return [_pod(item) for item in _items(_load(data), "Pod")]


@dataclass(frozen=True)
class NodeStatus:
    """What the flows need from ``kubectl get nodes -o json``."""

    name: str
    ready: bool
    internal_ip: str | None
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_nodes(data: str | bytes | Mapping[str, Any]) -> list[NodeStatus]:
    """Nodes with readiness, InternalIP and labels."""
    nodes = []
    for item in _items(_load(data), "Node"):
        status = item.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        ip = next(
            (
                a.get("address")
                for a in status.get("addresses") or []
                if a.get("type") == "InternalIP"
            ),
            None,
        )
        meta = item.get("metadata") or {}
        nodes.append(
            NodeStatus(
                name=str(meta.get("name", "")),
                ready=ready,
                internal_ip=ip,
                labels=dict(meta.get("labels") or {}),
            )
        )
    return nodes


@dataclass(frozen=True)
class DaemonSetStatus:
    """Rollout counters of a DaemonSet."""

    name: str
    desired: int
    ready: int
    updated: int

    @property
    def rolled_out(self) -> bool:
        """Every desired pod scheduled, updated and ready."""
        return self.desired > 0 and self.ready == self.desired and self.updated == self.desired


def parse_daemonset(data: str | bytes | Mapping[str, Any]) -> DaemonSetStatus:
    """``kubectl get daemonset NAME -o json``."""
    items = _items(_load(data), "DaemonSet")
    if len(items) != 1:
        raise KubeError(f"expected one DaemonSet, got {len(items)}")
    item = items[0]
    status = item.get("status") or {}
    return DaemonSetStatus(
        name=str((item.get("metadata") or {}).get("name", "")),
        desired=int(status.get("desiredNumberScheduled", 0)),
        ready=int(status.get("numberReady", 0)),
        updated=int(status.get("updatedNumberScheduled", 0)),
    )


# --------------------------------------------------------------------------- waiting


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 2.0,
    state: Callable[[], str] | None = None,
    transient: tuple[type[BaseException], ...] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Poll ``check`` until it returns something other than None/False, or time out.

    ``transient`` exceptions (an API server still starting) are retried and reported as
    the last state; ``state()`` describes the situation for the timeout message.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    deadline = clock() + timeout
    last = ""
    while True:
        try:
            result = check()
        except transient as exc:
            result = None
            last = f"{type(exc).__name__}: {exc}"
        if result is not None and result is not False:
            return result
        if clock() >= deadline:
            if state is not None:
                try:
                    last = state() or last
                except transient as exc:
                    last = f"{type(exc).__name__}: {exc}"
            tail = f"; last state: {last.strip()[:500]}" if last else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{tail}")
        sleep(max(0.0, min(interval, deadline - clock())))


def pod_ready_check(fetch: Callable[[], str]) -> Callable[[], PodStatus | None]:
    """A ``wait_for`` check: the pod once Ready; raises KubeError if it cannot get there."""

    def check() -> PodStatus | None:
        pod = parse_pod(fetch())
        if pod.phase in ("Failed", "Succeeded"):
            raise KubeError(f"pod will never be Ready: {pod.describe()}")
        if pod.waiting and pod.waiting.split(":")[0] in FATAL_WAITING:
            raise KubeError(f"pod will never be Ready: {pod.describe()}")
        return pod if pod.ready and pod.pod_ip else None

    return check


# --------------------------------------------------------------------------- Kata config


def _section_bounds(lines: list[str], section: str) -> tuple[int, int]:
    header = f"[{section}]"
    start = next((i for i, ln in enumerate(lines) if ln.strip() == header), None)
    if start is None:
        raise KubeError(f"no {header} section in the Kata configuration")
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines)
    )
    return start, end


def _set_key(lines: list[str], section: str, key: str, value: str) -> None:
    start, end = _section_bounds(lines, section)
    pattern = re.compile(rf"^\s*(#\s*)?{re.escape(key)}\s*=")
    hits = [i for i in range(start + 1, end) if pattern.match(lines[i])]
    active = [i for i in hits if not lines[i].lstrip().startswith("#")]
    target = (active or hits or [None])[0]
    if target is None:
        lines.insert(start + 1, f"{key} = {value}")
    else:
        lines[target] = f"{key} = {value}"


def enable_extra_monitor(toml_text: str, protocol: str = "qmp") -> str:
    """Kata config with a second QMP monitor at ``/run/vc/vm/<id>/extra-monitor.sock``.

    Why: the primary qmp.sock belongs to the Kata shim (one client at a time); Kata
    only creates the extra monitor with ``enable_debug = true`` in ``[hypervisor.qemu]``.
    """
    lines = toml_text.splitlines()
    _set_key(lines, "hypervisor.qemu", "enable_debug", "true")
    _set_key(lines, "hypervisor.qemu", "extra_monitor_socket", json.dumps(protocol))
    return "\n".join(lines) + "\n"


def first_existing_script(paths: Iterable[str]) -> str:
    """Shell printing the first existing file of ``paths`` (nothing if none)."""
    tests = " ".join(shlex.quote(p) for p in paths)
    return f'for f in {tests}; do if [ -f "$f" ]; then echo "$f"; break; fi; done; true'


# --------------------------------------------------------------------------- QMP discovery


def sandbox_list_script(run_dir: Path | str = DEFAULT_RUN_DIR) -> str:
    """POSIX shell listing what ``sandbox.discover_qmp_sockets`` looks at, for a remote node.

    Output lines: ``socket <path>`` for QMP sockets, ``file <path>`` for pidfiles.
    """
    base = shlex.quote(str(run_dir).rstrip("/"))
    socks = " ".join((QMP_SOCKET, EXTRA_MONITOR_SOCKET))
    return (
        f'for d in {base}/*/; do [ -d "$d" ] || continue; '
        f'for f in {socks}; do if [ -S "${{d}}$f" ]; then echo "socket ${{d}}$f"; fi; done; '
        f'if [ -f "${{d}}{PIDFILE}" ]; then echo "file ${{d}}{PIDFILE}"; fi; done; true'
    )


def parse_sandbox_listing(text: str) -> list[SandboxSockets]:
    """``sandbox_list_script`` output -> the same SandboxSockets discover_qmp_sockets builds."""
    found: dict[str, dict[str, Path]] = {}
    for line in text.splitlines():
        kind, _, raw = line.strip().partition(" ")
        if kind not in ("socket", "file") or not raw:
            continue
        path = Path(raw.replace("//", "/"))
        entry = found.setdefault(path.parent.name, {})
        if kind == "socket" and path.name in (QMP_SOCKET, EXTRA_MONITOR_SOCKET):
            entry[path.name] = path
        elif kind == "file" and path.name == PIDFILE:
            entry[PIDFILE] = path
    sandboxes = []
    for sid in sorted(found):
        entry = found[sid]
        sockets = SandboxSockets(
            id=sid,
            qmp=entry.get(QMP_SOCKET),
            extra_monitor=entry.get(EXTRA_MONITOR_SOCKET),
            pidfile=entry.get(PIDFILE),
        )
        if sockets.preferred is not None:
            sandboxes.append(sockets)
    return sandboxes


def pick_sandbox(
    sandboxes: Sequence[SandboxSockets], sandbox_id: str | None = None
) -> SandboxSockets:
    """The pod's sandbox: by (a prefix of) its id, or the only one there is."""
    ids = ", ".join(s.id[:12] for s in sandboxes) or "none"
    if sandbox_id:
        match = [s for s in sandboxes if s.id.startswith(sandbox_id) or sandbox_id.startswith(s.id)]
        if len(match) == 1:
            return match[0]
        raise KubeError(
            f"no Kata sandbox with id {sandbox_id[:12]} under /run/vc/vm (found: {ids})"
        )
    if len(sandboxes) == 1:
        return sandboxes[0]
    if not sandboxes:
        raise KubeError("no Kata sandbox with a QMP socket under /run/vc/vm (is the pod running?)")
    raise KubeError(
        f"{len(sandboxes)} Kata sandboxes under /run/vc/vm ({ids}): which is the pod's?"
    )


# --------------------------------------------------------------------------- remote runs


def with_rc_marker(cmd: str) -> str:
    """Append an exit-code marker: ``minikube ssh``/``kubectl exec`` do not all relay it.

    ``cmd`` runs in a subshell so an ``exit`` in it cannot skip the marker.
    """
    return f"( {cmd} ); echo {RC_MARKER}$?"


def split_rc_marker(output: str) -> tuple[str, int | None]:
    """(output without the marker line, the exit code or None if the marker is missing)."""
    lines = output.replace("\r\n", "\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().startswith(RC_MARKER):
            try:
                rc = int(lines[i].strip()[len(RC_MARKER) :])
            except ValueError:
                return output, None
            return "\n".join(lines[:i] + lines[i + 1 :]), rc
    return output, None


def _package_files(packages: Sequence[str]) -> Iterable[tuple[Path, str]]:
    """(file, archive name) of each package's source files, without caches."""
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise KubeError(f"cannot bundle {name}: not an importable package here")
        src = Path(list(spec.submodule_search_locations)[0])
        arc = name.replace(".", "/")
        for path in sorted(src.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield path, f"{arc}/{path.relative_to(src).as_posix()}"


def build_bundle(out: Path, packages: Sequence[str] = BUNDLE_PACKAGES) -> Path:
    """A tar.gz of katamaran and its pure-Python dependencies, to unpack on a node.

    Why: a node (Ubuntu lab VM, minikube VM via a helper pod) has a python3 but not our
    packages and maybe no PyPI access; ``PYTHONPATH=<dir> python3 -m katamaran`` then works.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for path, arcname in _package_files(packages):
            tar.add(path, arcname=arcname)
    return out


# What runs a zipapp: its dependencies come from inside it, never from the node's packages.
_ZIPAPP_MAIN = """\
import runpy

runpy.run_module("katamaran", run_name="__main__", alter_sys=True)
"""


def build_zipapp(out: Path, packages: Sequence[str] = BUNDLE_PACKAGES) -> Path:
    """``katamaran.pyz``: one executable file, the guide's "copy the binary" step.

    Why: nodes that do not see this machine's root (the guide's Ubuntu VMs, real clusters)
    have a python3 (Ubuntu 22.04: 3.10, enough for the core) but not our packages, maybe
    no PyPI. ``scp katamaran.pyz node:katamaran && sudo ./katamaran -mode ...`` then works
    with qemu.qmp and pyroute2 (pure Python) vendored inside the archive.

    Each module also goes in compiled by this Python (see `_pyc`): zipimport cannot cache
    what it compiles, so without them every run compiled pyroute2's ~400 modules again.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with (
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf,
        tempfile.TemporaryDirectory() as work,
    ):
        zf.writestr("__main__.py", _ZIPAPP_MAIN)
        dirs: set[str] = set()
        for path, arcname in _package_files(packages):
            # directory entries: zipimport finds a namespace package (qemu/) only by them
            parts = arcname.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                name = "/".join(parts[:i]) + "/"
                if name not in dirs:
                    dirs.add(name)
                    zf.writestr(zipfile.ZipInfo(name), b"")
            zf.write(path, arcname)
            if path.suffix == ".py":
                zf.write(_pyc(path, arcname, Path(work)), arcname[:-3] + ".pyc")
    data = tmp.read_bytes()
    tmp.write_bytes(b"#!/usr/bin/env python3\n" + data)  # zip readers allow a prefix
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


def _pyc(path: Path, arcname: str, work: Path) -> Path:
    """`path` compiled by this Python, as zipimport takes it from beside the ``.py``.

    zipimport prefers ``<module>.pyc`` and, when its magic number is not the running
    Python's (a node with another version), falls back to the ``.py``: right everywhere,
    fast where the versions match (importing katamaran's cli, dest and source from
    katamaran.pyz took 0.42-0.63 s without, 0.14-0.31 s with, five runs each on this
    machine's 3.11: each katamaran process starts that much sooner).  Unchecked-hash:
    the archive's ``.py`` never changes under it, and a zip's 2-second timestamps would
    not match a source mtime.
    """
    cfile = work / "module.pyc"
    py_compile.compile(
        str(path),
        cfile=str(cfile),
        dfile=arcname,  # tracebacks name the module's place in the archive
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return cfile


# --------------------------------------------------------------------------- QEMU replay

# QEMU options without a value (everything else starting with "-" takes one).
_NO_VALUE = {
    "-daemonize",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-no-shutdown",
    "-S",
    "-enable-kvm",
    "-no-hpet",
    "-no-acpi",
    "-snapshot",
    "-only-migratable",
    "-full-screen",
}
_FD_KEYS = ("fd", "fds", "vhostfd", "vhostfds")


def parse_cmdline(raw: bytes | str) -> list[str]:
    """``/proc/<pid>/cmdline`` (NUL-separated) -> argv."""
    text = raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else raw
    parts = text.split("\0")
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def qemu_options(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """argv[1:] as (option, value) pairs; ``--opt`` is normalised to ``-opt``."""
    pairs: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        norm = "-" + opt.lstrip("-") if opt.startswith("-") else opt
        if not opt.startswith("-") or norm in _NO_VALUE or i + 1 >= len(argv):
            pairs.append((norm, None))
            i += 1
        else:
            pairs.append((norm, argv[i + 1]))
            i += 2
    return pairs


def split_opts(value: str) -> list[str]:
    """QEMU's ``a=1,b=2`` (``,,`` is an escaped comma) -> items."""
    items, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur += ",,"
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    items.append(cur)
    return items


def _key(item: str) -> str:
    return item.split("=", 1)[0] if "=" in item else item


def _opt_value(items: Sequence[str], key: str) -> str | None:
    for item in items:
        if "=" in item and item.split("=", 1)[0] == key:
            return item.split("=", 1)[1]
    return None


def _qmp_path(value: str) -> str | None:
    """``unix:/p,server=on`` or ``unix:path=/p,...`` -> /p (None for fd= or non-unix)."""
    if not value.startswith("unix:"):
        return None
    first = split_opts(value[5:])[0]
    if first.startswith("fd="):
        return None
    return first[5:] if first.startswith("path=") else first


def migration_blockers(argv: Sequence[str]) -> list[str]:
    """Devices that make this VM unmigratable, stated so the fix is obvious."""
    problems = []
    for opt, value in qemu_options(argv):
        if opt == "-device" and value and split_opts(value)[0].startswith("virtio-9p"):
            problems.append(
                f"{split_opts(value)[0]} (virtio-9p blocks migration: use shared_fs = "
                '"virtio-fs" in the Kata configuration)'
            )
    return problems


def dest_qemu_argv(
    src: Sequence[str], *, qmp_path: str, tap: str = DEFAULT_TAP, vhost: bool = True
) -> list[str]:
    """The destination QEMU: the source's argv, runnable by hand, waiting for the migration.

    Dropped: ``-daemonize`` (we keep the PID), ``-add-fd`` and every ``fd=``/``fds=``/
    ``vhostfd=``/``vhostfds=`` key (those fds belong to the source's shim), an old
    ``-incoming``.  The fd-passed primary ``-qmp`` becomes ``qmp_path``; tap netdevs open
    the pre-created ``tap``.  Machine, ``-smp``, ``-m``, ids and MACs stay identical, as
    migration requires.  ``-incoming defer`` is appended (katamaran dest starts it).
    """
    out = [src[0]]
    for opt, value in qemu_options(src):
        if opt in ("-daemonize", "-add-fd", "-incoming"):
            continue
        if value is None:
            out.append(opt)
            continue
        if opt == "-qmp" and value.startswith("unix:") and _qmp_path(value) is None:
            value = f"unix:{qmp_path},server=on,wait=off"
        elif opt in ("-netdev", "-device", "-chardev", "-object"):
            items = [it for it in split_opts(value) if _key(it) not in _FD_KEYS]
            if opt == "-netdev" and items and items[0] in ("tap", "type=tap"):
                items = [it for it in items if _key(it) not in ("ifname", "script", "downscript")]
                if not vhost:
                    items = [it for it in items if _key(it) != "vhost"]
                items += [f"ifname={tap}", "script=no", "downscript=no"]
            value = ",".join(items)
        out += [opt, value]
    return out + ["-incoming", "defer"]


def runtime_dirs(argv: Sequence[str]) -> list[str]:
    """Directories the replayed QEMU expects to exist (sockets, pidfile, logs)."""
    paths: list[str] = []
    for opt, value in qemu_options(argv):
        if not value:
            continue
        if opt == "-chardev":
            p = _opt_value(split_opts(value), "path")
            if p:
                paths.append(p)
        elif opt in ("-qmp", "-monitor"):
            p = _qmp_path(value)
            if p:
                paths.append(p)
        elif opt in ("-pidfile", "-D"):
            paths.append(value)
    return sorted({str(Path(p).parent) for p in paths if p.startswith("/")})


def uses_drive(argv: Sequence[str], drive_id: str) -> bool:
    """Whether ``drive_id`` is a block device of the VM (else storage is not mirrored)."""
    for opt, value in qemu_options(argv):
        if not value:
            continue
        items = split_opts(value)
        if opt == "-drive" and _opt_value(items, "id") == drive_id:
            return True
        if opt == "-blockdev" and _opt_value(items, "node-name") == drive_id:
            return True
    return False


def vhost_user_fs_socket(argv: Sequence[str]) -> str | None:
    """The socket path of the VM's vhost-user-fs device (virtiofsd), if any."""
    chardevs: dict[str, str] = {}
    wanted = None
    for opt, value in qemu_options(argv):
        if not value:
            continue
        items = split_opts(value)
        if opt == "-chardev":
            cid, path = _opt_value(items, "id"), _opt_value(items, "path")
            if cid and path:
                chardevs[cid] = path
        elif opt == "-device" and items[0].startswith("vhost-user-fs"):
            wanted = _opt_value(items, "chardev")
    return chardevs.get(wanted) if wanted else None


def virtiofsd_dest_argv(src: Sequence[str], socket_path: str) -> list[str]:
    """virtiofsd for the destination: own socket instead of the shim's fd, migratable."""
    out: list[str] = []
    skip = False
    for arg in src:
        if skip:
            skip = False
            continue
        if arg in ("--fd", "--socket-path", "--socket", "--migration-on-error"):
            skip = True
            continue
        if arg.startswith(("--fd=", "--socket-path=", "--socket=", "--migration-on-error=")):
            continue
        out.append(arg)
    return out + [f"--socket-path={socket_path}", "--migration-on-error=guest-error"]


def virtiofsd_shared_dir(argv: Sequence[str]) -> str | None:
    """The directory virtiofsd shares (``--shared-dir`` or ``-o source=``)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--shared-dir="):
            return arg.split("=", 1)[1]
        if arg == "--shared-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg == "-o" and i + 1 < len(argv):
            source = _opt_value(split_opts(argv[i + 1]), "source")
            if source:
                return source
    return None


def netdev_macs(argv: Sequence[str]) -> list[str]:
    """MAC addresses of the VM's NICs (for messages and the destination tap)."""
    macs = []
    for opt, value in qemu_options(argv):
        if opt == "-device" and value:
            mac = _opt_value(split_opts(value), "mac")
            if mac:
                macs.append(mac)
    return macs


# --------------------------------------------------------------------------- node networking


def parse_default_gateway(ip_route: str) -> tuple[str, str] | None:
    """``ip -4 route show default`` -> (gateway, device)."""
    for line in ip_route.splitlines():
        m = re.match(r"\s*default\s+via\s+(\S+)\s+dev\s+(\S+)", line)
        if m:
            return m.group(1), m.group(2)
    return None


def iface_with_address(ip_addr: str, address: str) -> str | None:
    """``ip -o -4 addr show`` -> the interface holding ``address``."""
    for line in ip_addr.splitlines():
        m = re.match(r"\s*\d+:\s+(\S+)\s+inet\s+([\d.]+)/\d+", line)
        if m and m.group(2) == address:
            return m.group(1).split("@")[0]
    return None


def dest_tap_commands(tap: str, gateway_mac: str) -> list[str]:
    """Pre-create the destination ``tap`` looking like the source's pod gateway.

    The guest keeps its ARP entry for the gateway: frames addressed to that MAC must be
    accepted by the destination host (tap MAC = gateway MAC), and later ARP requests are
    answered by proxy ARP.  No address on the tap: with flannel the gateway IP is the
    source node's cni0 address, which must stay routable (replies to pings from there).
    """
    t = shlex.quote(tap)
    return [
        f"ip link show {t} >/dev/null 2>&1 || ip tuntap add dev {t} mode tap",
        f"ip link set dev {t} address {shlex.quote(gateway_mac)}",
        f"ip link set dev {t} up",
        f"sysctl -qw net.ipv4.conf.{tap}.proxy_arp=1",
        f"sysctl -qw net.ipv4.conf.{tap}.rp_filter=0",
    ]
