"""The guide's k3s end-to-end lab on the two nodes, and the migration of its Kata pod.

Why: TESTING.md "k3s End-to-End Migration Test" is a sequence of SSH steps (k3s server on
Node A, agent on Node B over the private link, a ``kata`` RuntimeClass, an nginx:alpine
Kata pod pinned to Node A, then katamaran on both nodes).  One implementation serves the
guide's front-end (``testenv/k3s-e2e.sh``) and ``tests/e2e/test_k3s.py``.

CLI::

    python3 -m pytest_katamaran.kube.k3s setup|status|teardown

talks to the running guide nodes: ``ubuntu@localhost`` on ports 2222/2223 (override with
``KATAMARAN_NODE_A_PORT``/``KATAMARAN_NODE_B_PORT``, host ``KATAMARAN_NODE_HOST``) with
``testenv/kata_test_rsa`` (``KATAMARAN_TESTENV_DIR``).

The destination is not a Kata pod (the shim would kill a VM whose agent never connects):
Node B runs a QEMU replayed from the source's command line with ``-incoming defer``.
Kubernetes is not told about the migration; the test proves the data plane only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from pytest_katamaran.kube import model as kube
from pytest_katamaran.kube import prereq
from pytest_katamaran.kube.model import KubeError, PodStatus, WaitTimeout, wait_for
from pytest_katamaran.qemu.sandbox import SandboxSockets
from pytest_katamaran.qemu.workload import QMP_SOCKET
from pytest_katamaran.ssh import CommandFailed, CommandTimeout, SSHClient

DEFAULT_K3S_VERSION = "v1.30.6+k3s1"
K3S_INSTALL_URL = "https://get.k3s.io"
POD_NAME = "kata-nginx"
NAMESPACE = "default"
PRIVATE_IPS = {"a": "10.0.0.1", "b": "10.0.0.2"}
DEFAULT_PORTS = {"a": 2222, "b": 2223}
PORT_ENV = {"a": "KATAMARAN_NODE_A_PORT", "b": "KATAMARAN_NODE_B_PORT"}
HOST_ENV = "KATAMARAN_NODE_HOST"
K3S_VERSION_ENV = "KATAMARAN_K3S_VERSION"
START_HINT = {"a": "./testenv/start-node-a.sh", "b": "./testenv/start-node-b.sh"}
K3S_TEMPLATE = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl"
KATA_K3S_CONFIG = "/etc/kata-containers/katamaran-qemu.toml"
KATA_SHIM_CANDIDATES = (
    "/opt/kata/bin/containerd-shim-kata-v2",
    "/usr/local/bin/containerd-shim-kata-v2",
)
SERVER_UNINSTALL = "/usr/local/bin/k3s-uninstall.sh"
AGENT_UNINSTALL = "/usr/local/bin/k3s-agent-uninstall.sh"
NODE_BUNDLE_DIR = "/var/tmp/katamaran-py"
INSTALL_TIMEOUT = 900.0
POD_TIMEOUT = 900.0  # nested Kata under TCG boots slowly

Progress = Callable[[str], None]


class LabError(RuntimeError):
    """A lab step failed in a way the message fully explains."""


class NodeUnreachable(LabError):
    """A guide node does not answer on its SSH port."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pure pieces


def containerd_template(
    config_path: str, shim_path: str | None, handler: str = kube.KATA_HANDLER
) -> str:
    """k3s containerd template adding the Kata runtime ``handler`` (containerd 1.7 schema)."""
    base = f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."{handler}"]'
    lines = [
        '{{ template "base" . }}',
        "",
        base,
        '  runtime_type = "io.containerd.kata.v2"',
    ]
    if shim_path:
        lines.append(f'  runtime_path = "{shim_path}"')
    lines += [
        "  privileged_without_host_devices = true",
        '  pod_annotations = ["io.katacontainers.*"]',
        f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."{handler}".options]',
        f'  ConfigPath = "{config_path}"',
    ]
    return "\n".join(lines) + "\n"


def server_install_command(version: str, node_ip: str, iface: str) -> str:
    """get.k3s.io server install bound to the private link (flannel over ``iface``)."""
    exec_args = (
        f"server --node-ip {node_ip} --advertise-address {node_ip} --flannel-iface {iface} "
        "--write-kubeconfig-mode 644 --disable traefik --disable servicelb"
    )
    return (
        f"curl -sfL {K3S_INSTALL_URL} | INSTALL_K3S_VERSION={shlex.quote(version)} "
        f"INSTALL_K3S_EXEC={shlex.quote(exec_args)} sh -s -"
    )


def agent_install_command(
    version: str, server_ip: str, token: str, node_ip: str, iface: str
) -> str:
    """get.k3s.io agent install joining ``server_ip`` over the private link."""
    exec_args = f"agent --node-ip {node_ip} --flannel-iface {iface}"
    return (
        f"curl -sfL {K3S_INSTALL_URL} | INSTALL_K3S_VERSION={shlex.quote(version)} "
        f"K3S_URL={shlex.quote(f'https://{server_ip}:6443')} K3S_TOKEN={shlex.quote(token)} "
        f"INSTALL_K3S_EXEC={shlex.quote(exec_args)} sh -s -"
    )


def kubectl_command(*args: str) -> str:
    """kubectl through k3s (root: the kubeconfig is root's unless mode 644)."""
    return "k3s kubectl " + shlex.join(args)


def instructions(pod: PodStatus, a_ip: str, b_ip: str, key: str = "testenv/kata_test_rsa") -> str:
    """The guide's next steps, with this cluster's pod IP filled in."""
    ssh = "ssh -o StrictHostKeyChecking=no -i " + key + " -p {port} ubuntu@localhost"
    return "\n".join(
        [
            f"k3s cluster ready: pod {pod.namespace}/{pod.name} (Kata) on {pod.node}, "
            f"IP {pod.pod_ip}",
            "",
            "Next steps (TESTING.md, 'Running the Migration'):",
            f"1. Node A ({ssh.format(port=2222)}): find the QMP socket",
            "     sudo ls /run/vc/vm/*/extra-monitor.sock /run/vc/vm/*/qmp.sock",
            "2. Node B: start the destination QEMU (the source's /proc/<pid>/cmdline with",
            "   -incoming defer, see pytest_katamaran.kube.model.dest_qemu_argv), then katamaran:",
            "     sudo python3 -m katamaran -mode dest -qmp <dest qmp.sock> -tap tap0_kata "
            "-shared-storage",
            "3. Node A: start the source",
            "     sudo python3 -m katamaran -mode source -qmp <extra-monitor.sock> "
            f"-dest-ip {b_ip} -vm-ip {pod.pod_ip} -shared-storage",
            f"4. Meanwhile on Node A: ping -D -O -i 0.01 {pod.pod_ip}   (expect no lost replies)",
            "",
            "Kubernetes is not told about the migration: the pod may show as failed afterwards.",
            "Automated: KATAMARAN_INTERNET=1 python3 -m pytest tests/e2e/test_k3s.py --nodes=qemu",
            "Status: ./testenv/k3s-e2e.sh status    Teardown: ./testenv/k3s-e2e.sh teardown",
            f"(private link: node A {a_ip}, node B {b_ip})",
        ]
    )


# --------------------------------------------------------------------------- nodes


@dataclass
class LabNode:
    """A node as the lab sees it (the pytest node fixtures have the same attributes)."""

    name: str
    ssh: Any
    private_ip: str


def node_address(role: str, env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(host, port) of a guide node, honouring the override variables."""
    env = os.environ if env is None else env
    host = env.get(HOST_ENV, "localhost")
    raw = env.get(PORT_ENV[role], "")
    try:
        port = int(raw) if raw.strip() else DEFAULT_PORTS[role]
    except ValueError:
        raise LabError(f"{PORT_ENV[role]} must be a port number, got {raw!r}") from None
    return host, port


def check_reachable(role: str, host: str, port: int, timeout: float = 5.0) -> None:
    """A TCP connect to the node's SSH port; NodeUnreachable names host:port and the fix."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise NodeUnreachable(
            f"node-{role} is not reachable at {host}:{port} ({why}); "
            f"start it with {START_HINT[role]}"
        ) from None


def guide_nodes(env: Mapping[str, str] | None = None) -> tuple[LabNode, LabNode]:
    """Connect to the running guide nodes (``./testenv/start-node-{a,b}.sh``)."""
    from pytest_katamaran.qemu.node import Testenv

    key = Testenv.default().key
    addresses = {role: node_address(role, env) for role in ("a", "b")}
    for role, (host, port) in addresses.items():  # both up before anything else is said
        check_reachable(role, host, port)
    if not key.is_file():
        raise LabError(f"{key} not found. Run ./testenv/setup.sh first.")
    nodes: list[LabNode] = []
    for role, (host, port) in addresses.items():
        client = SSHClient(host, port, user="ubuntu", key_path=key, name=f"node-{role}")
        try:
            client.connect()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            for node in nodes:
                node.ssh.close()
            raise LabError(
                f"cannot log in to node-{role} at {host}:{port} as ubuntu with {key}: {exc}"
            ) from None
        nodes.append(LabNode(f"node-{role}", client, PRIVATE_IPS[role]))
    return nodes[0], nodes[1]


# --------------------------------------------------------------------------- the lab


@dataclass
class SourceVM:
    """The pod's Kata VM on Node A, as the migration needs it."""

    pod: PodStatus
    sandbox: SandboxSockets
    pid: int
    argv: list[str]
    virtiofsd: list[str] | None
    gateway_mac: str

    @property
    def qmp(self) -> str:
        """The socket katamaran source uses (the extra monitor if Kata has one)."""
        assert self.sandbox.preferred is not None
        return str(self.sandbox.preferred)


@dataclass
class Destination:
    """What runs on Node B for the incoming VM; ``cleanup()`` undoes all of it."""

    qmp: str
    tap: str
    qemu: Any = None
    virtiofsd: Any = None
    node: Any = None
    routes: list[tuple[Any, str]] = field(default_factory=list)

    def cleanup(self) -> None:
        """Stop the processes we started (by PID), drop routes and the tap."""
        for proc in (self.qemu, self.virtiofsd):
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stop(timeout=10.0)
        for node, cmd in self.routes:
            with contextlib.suppress(Exception):
                node.ssh.sudo(cmd, check=False, timeout=30)
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.ssh.sudo(f"ip link del {shlex.quote(self.tap)}", check=False, timeout=30)


class K3sLab:
    """k3s server on node A, agent on node B, the Kata pod, and the migration steps."""

    def __init__(
        self,
        node_a: Any,
        node_b: Any,
        *,
        progress: Progress = _stderr,
        k3s_version: str | None = None,
        pod_name: str = POD_NAME,
    ) -> None:
        self.a = node_a
        self.b = node_b
        self.say = progress
        self.k3s_version = k3s_version or os.environ.get(K3S_VERSION_ENV) or DEFAULT_K3S_VERSION
        self.pod_name = pod_name

    # ------------------------------------------------------------------ helpers

    def _sudo(self, node: Any, cmd: str, *, timeout: float = 120.0, check: bool = True) -> Any:
        return node.ssh.sudo(cmd, timeout=timeout, check=check)

    def kubectl(self, *args: str, timeout: float = 60.0, check: bool = True) -> Any:
        """Run kubectl on the server node."""
        return self._sudo(self.a, kubectl_command(*args), timeout=timeout, check=check)

    def has_k3s(self, node: Any, service: str) -> bool:
        """k3s installed and its service active on ``node``."""
        r = self._sudo(
            node, f"command -v k3s >/dev/null && systemctl is-active --quiet {service}", check=False
        )
        return r.rc == 0

    def missing_prerequisites(self, *, python: bool = True) -> str | None:
        """Internet, Kata (and python3 for katamaran) on both nodes; curl where k3s is missing."""
        reasons = [r for r in (prereq.internet(),) if r]
        for node, service in ((self.a, "k3s"), (self.b, "k3s-agent")):
            reasons += prereq.node_reasons(node.name, node.ssh, python=python)
            if not self.has_k3s(node, service):
                out = node.ssh.run(prereq.command_node_check("curl"), check=False).stdout
                reason = prereq.command_node_reason(node.name, "curl", out)
                if reason:
                    reasons.append(reason + " (needed to install k3s)")
        return "; ".join(reasons) if reasons else None

    def private_iface(self, node: Any) -> str:
        """The interface holding the node's private-link address (enp0s4 in the guide)."""
        out = node.ssh.run("ip -o -4 addr show", timeout=30).stdout
        iface = kube.iface_with_address(out, node.private_ip)
        if iface is None:
            raise LabError(f"{node.name}: no interface has {node.private_ip} (private link down?)")
        return iface

    def hostname(self, node: Any) -> str:
        """The node's hostname (its Kubernetes node name)."""
        return node.ssh.run("hostname", timeout=30).stdout.strip()

    def _write_file(self, node: Any, path: str, text: str, mode: str = "0644") -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".tmp", delete=False) as fh:
            fh.write(text)
            local = Path(fh.name)
        remote = f"/tmp/katamaran-{Path(path).name}.{os.getpid()}"
        try:
            node.ssh.put(local, remote)
        finally:
            local.unlink(missing_ok=True)
        self._sudo(
            node,
            f"mkdir -p {shlex.quote(str(Path(path).parent))} && "
            f"install -m {mode} {shlex.quote(remote)} {shlex.quote(path)} && "
            f"rm -f {shlex.quote(remote)}",
        )

    # ------------------------------------------------------------------ setup

    def configure_kata(self, node: Any) -> bool:
        """Kata config with the extra QMP monitor, and k3s's containerd template for it.

        Returns True if the template changed (a running k3s must then restart).
        """
        src = self._sudo(
            node, kube.first_existing_script(kube.KATA_CONFIG_CANDIDATES)
        ).stdout.strip()
        if not src:
            raise LabError(
                f"{node.name}: no Kata QEMU configuration in "
                + ", ".join(kube.KATA_CONFIG_CANDIDATES)
            )
        text = self._sudo(node, f"cat {shlex.quote(src)}").stdout
        self._write_file(node, KATA_K3S_CONFIG, kube.enable_extra_monitor(text))
        shim = self._sudo(
            node,
            "command -v containerd-shim-kata-v2 || "
            + kube.first_existing_script(KATA_SHIM_CANDIDATES),
            check=False,
        ).stdout.strip()
        template = containerd_template(KATA_K3S_CONFIG, shim.splitlines()[0] if shim else None)
        old = self._sudo(node, f"cat {K3S_TEMPLATE} 2>/dev/null; true").stdout
        if old == template:
            return False
        self._write_file(node, K3S_TEMPLATE, template)
        self.say(f"{node.name}: containerd runtime {kube.KATA_HANDLER} -> {KATA_K3S_CONFIG}")
        return True

    def install_server(self, changed: bool) -> None:
        """k3s server on node A (skipped if running; restarted if its Kata config changed)."""
        if self.has_k3s(self.a, "k3s"):
            self.say(f"{self.a.name}: k3s server already running")
            if changed:
                self._sudo(self.a, "systemctl restart k3s", timeout=300)
            return
        self.say(f"{self.a.name}: installing k3s server {self.k3s_version} (get.k3s.io)")
        cmd = server_install_command(
            self.k3s_version, self.a.private_ip, self.private_iface(self.a)
        )
        self._sudo(self.a, cmd, timeout=INSTALL_TIMEOUT)

    def node_token(self) -> str:
        """The join token, once the server has written it."""
        path = "/var/lib/rancher/k3s/server/node-token"
        return wait_for(
            lambda: (
                self._sudo(self.a, f"cat {path} 2>/dev/null", check=False).stdout.strip() or None
            ),
            timeout=300,
            what=f"{path} on {self.a.name}",
            interval=3,
        )

    def install_agent(self, changed: bool) -> None:
        """k3s agent on node B joining node A over the private link."""
        if self.has_k3s(self.b, "k3s-agent"):
            self.say(f"{self.b.name}: k3s agent already running")
            if changed:
                self._sudo(self.b, "systemctl restart k3s-agent", timeout=300)
            return
        token = self.node_token()
        self.say(f"{self.b.name}: installing k3s agent (server https://{self.a.private_ip}:6443)")
        cmd = agent_install_command(
            self.k3s_version,
            self.a.private_ip,
            token,
            self.b.private_ip,
            self.private_iface(self.b),
        )
        self._sudo(self.b, cmd, timeout=INSTALL_TIMEOUT)

    def nodes_json(self) -> str:
        """``kubectl get nodes -o json``."""
        return self.kubectl("get", "nodes", "-o", "json").stdout

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 600) -> None:
        """Both nodes registered and Ready."""

        def check() -> bool:
            ready = {n.name for n in kube.parse_nodes(self.nodes_json()) if n.ready}
            return set(names) <= ready

        def state() -> str:
            return ", ".join(
                f"{n.name}={'Ready' if n.ready else 'NotReady'}"
                for n in kube.parse_nodes(self.nodes_json())
            )

        wait_for(
            check,
            timeout=timeout,
            what=f"nodes {', '.join(names)} to be Ready",
            interval=5,
            state=state,
            transient=(CommandFailed, KubeError),
        )

    def apply(self, *docs: Mapping[str, Any]) -> None:
        """``kubectl apply`` of manifests built in kube.py."""
        text = kube.to_yaml(*docs)
        self._sudo(
            self.a, f"printf '%s' {shlex.quote(text)} | " + kubectl_command("apply", "-f", "-")
        )

    def pod(self) -> PodStatus:
        """The Kata pod's current status."""
        out = self.kubectl("get", "pod", self.pod_name, "-n", NAMESPACE, "-o", "json").stdout
        return kube.parse_pod(out)

    def _pod_state(self) -> str:
        try:
            state = self.pod().describe()
        except (CommandFailed, KubeError) as exc:
            state = str(exc).splitlines()[0]
        events = self.kubectl(
            "get", "events", "-n", NAMESPACE, "--field-selector",
            f"involvedObject.name={self.pod_name}", "-o",
            "custom-columns=REASON:.reason,MESSAGE:.message", "--no-headers",
            check=False,
        ).stdout.strip().splitlines()  # fmt: skip
        return state + ("; events: " + " | ".join(events[-3:]) if events else "")

    def wait_pod_ready(self, timeout: float = POD_TIMEOUT) -> PodStatus:
        """The Kata pod Running and Ready with an IP (fails early on hopeless states)."""

        def fetch() -> str:
            return self.kubectl("get", "pod", self.pod_name, "-n", NAMESPACE, "-o", "json").stdout

        return wait_for(
            kube.pod_ready_check(fetch),
            timeout=timeout,
            what=f"Kata pod {NAMESPACE}/{self.pod_name} to be Ready on {self.a.name}",
            interval=5,
            state=self._pod_state,
            transient=(CommandFailed,),
        )

    def setup(self) -> PodStatus:
        """Everything "./testenv/k3s-e2e.sh setup" promises; returns the ready pod."""
        changed_a = self.configure_kata(self.a)
        changed_b = self.configure_kata(self.b)
        self.install_server(changed_a)
        self.install_agent(changed_b)
        names = [self.hostname(self.a), self.hostname(self.b)]
        self.wait_nodes_ready(names)
        self.say(f"nodes Ready: {', '.join(names)}")
        self.apply(
            kube.runtime_class(kube.K3S_RUNTIME_CLASS, kube.KATA_HANDLER),
            kube.kata_pod(
                self.pod_name,
                kube.K3S_RUNTIME_CLASS,
                namespace=NAMESPACE,
                node_selector={kube.HOSTNAME_LABEL: names[0]},
            ),
        )
        self.say(f"pod {self.pod_name} ({kube.NGINX_IMAGE}, runtimeClassName kata) -> {names[0]}")
        pod = self.wait_pod_ready()
        if pod.node != names[0]:
            raise LabError(f"pod landed on {pod.node}, not on {names[0]} (node A)")
        return pod

    # ------------------------------------------------------------------ status / teardown

    def status(self) -> str:
        """Cluster, pods and QEMU processes on both nodes, as text."""
        parts = []
        for node, service in ((self.a, "k3s"), (self.b, "k3s-agent")):
            state = self._sudo(
                node,
                f"if command -v k3s >/dev/null 2>&1; then systemctl is-active {service} "
                "2>/dev/null || true; else echo 'not installed'; fi",
            ).stdout.strip()
            parts.append(f"== {node.name}: k3s {state or 'unknown'} ({service})")
        if "not installed" in parts[0]:
            parts.append(f"== nodes/pods: no cluster (k3s not installed on {self.a.name})")
        else:
            for title, args in (("nodes", ("nodes",)), ("pods", ("pods", "-A"))):
                r = self.kubectl("get", *args, "-o", "wide", check=False)
                parts.append(f"== {title}\n" + (r.stdout.strip() or r.stderr.strip()))
        for node in (self.a, self.b):
            # [q]: the pattern does not match pgrep's own command line
            out = node.ssh.run(
                "pgrep -a -f '[q]emu-system' || echo '(no QEMU processes)'", check=False, timeout=30
            ).stdout.strip()
            parts.append(f"== QEMU on {node.name}\n{out}")
        return "\n".join(parts)

    def teardown(self) -> None:
        """Uninstall k3s (agent first) and our Kata files; the VMs stay running."""
        for node, script in ((self.b, AGENT_UNINSTALL), (self.a, SERVER_UNINSTALL)):
            r = self._sudo(
                node,
                f"if [ -x {script} ]; then {script} >/dev/null 2>&1; echo removed; "
                "else echo absent; fi",
                timeout=600,
            )
            verb = "k3s uninstalled" if "removed" in r.stdout else "k3s not installed"
            self.say(f"{node.name}: {verb}")
            self._sudo(node, f"rm -f {K3S_TEMPLATE} {KATA_K3S_CONFIG}", check=False)

    # ------------------------------------------------------------------ migration

    def katamaran_env(self, node: Any) -> dict[str, str]:
        """Make ``python3 -m katamaran`` runnable as root on ``node``; returns its env.

        Lab nodes built from the host root already import it; others get a bundle.
        """
        probe = "python3 -c 'import katamaran, qemu.qmp, pyroute2' 2>/dev/null"
        if self._sudo(node, probe, check=False).rc == 0:
            return {}
        with tempfile.TemporaryDirectory(prefix="katamaran-bundle-") as tmp:
            bundle = kube.build_bundle(Path(tmp) / "katamaran-bundle.tgz")
            node.ssh.put(bundle, "/tmp/katamaran-bundle.tgz")
        self._sudo(
            node,
            f"rm -rf {NODE_BUNDLE_DIR} && mkdir -p {NODE_BUNDLE_DIR} && "
            f"tar -xzf /tmp/katamaran-bundle.tgz -C {NODE_BUNDLE_DIR}",
        )
        env = {"PYTHONPATH": NODE_BUNDLE_DIR}
        r = node.ssh.sudo(probe, env=env, check=False)
        if r.rc != 0:
            raise LabError(f"{node.name}: katamaran bundle does not import: {r.stderr.strip()}")
        return env

    def sandbox_id(self) -> str | None:
        """The pod's sandbox id from crictl (None if crictl cannot tell)."""
        r = self._sudo(
            self.a,
            f"k3s crictl pods --name {shlex.quote(self.pod_name)} --namespace {NAMESPACE} "
            "--state ready -q",
            check=False,
        )
        ids = r.stdout.split()
        return ids[0] if r.rc == 0 and ids else None

    def _cmdline(self, node: Any, pid: int) -> list[str]:
        raw = self._sudo(node, f"base64 -w0 /proc/{pid}/cmdline").stdout.strip()
        return kube.parse_cmdline(base64.b64decode(raw))

    def source_vm(self, pod: PodStatus) -> SourceVM:
        """QMP discovery on node A plus what the destination must replay."""
        listing = self._sudo(self.a, kube.sandbox_list_script()).stdout
        sandbox = kube.pick_sandbox(kube.parse_sandbox_listing(listing), self.sandbox_id())
        if sandbox.extra_monitor is None:
            raise LabError(
                f"{self.a.name}: sandbox {sandbox.id[:12]} has no extra-monitor.sock "
                "(the shim holds qmp.sock); extra_monitor_socket is not active"
            )
        pid_text = self._sudo(self.a, f"cat {sandbox.pidfile}", check=False).stdout.strip()
        if not pid_text.isdigit():
            raise LabError(f"{self.a.name}: no QEMU pidfile for sandbox {sandbox.id[:12]}")
        pid = int(pid_text)
        argv = self._cmdline(self.a, pid)
        blockers = kube.migration_blockers(argv)
        if blockers:
            raise LabError(f"the Kata VM cannot be migrated: {'; '.join(blockers)}")
        virtiofsd = None
        if kube.vhost_user_fs_socket(argv):
            pids = self._sudo(self.a, f"pgrep -f -- {shlex.quote(sandbox.id)}", check=False).stdout
            for other in pids.split():
                if other.isdigit() and int(other) != pid:
                    cand = self._cmdline(self.a, int(other))
                    if cand and Path(cand[0]).name.startswith("virtiofsd"):
                        virtiofsd = cand
                        break
            if virtiofsd is None:
                raise LabError(f"{self.a.name}: VM uses vhost-user-fs but no virtiofsd was found")
        route = self._sudo(self.a, f"nsenter -t {pid} -n ip -4 route show default").stdout
        gw = kube.parse_default_gateway(route)
        if gw is None:
            raise LabError(f"{self.a.name}: no default route in the pod's netns: {route.strip()!r}")
        iface = kube.iface_with_address(self.a.ssh.run("ip -o -4 addr show").stdout, gw[0])
        if iface is None:
            raise LabError(f"{self.a.name}: pod gateway {gw[0]} is not a local address")
        mac = self.a.ssh.run(f"cat /sys/class/net/{shlex.quote(iface)}/address").stdout.strip()
        return SourceVM(pod, sandbox, pid, argv, virtiofsd, mac)

    def prepare_destination(self, vm: SourceVM, tap: str = kube.DEFAULT_TAP) -> Destination:
        """On node B: tap like the pod gateway, virtiofsd, and QEMU waiting (-incoming defer)."""
        qmp = str(Path(vm.qmp).parent / QMP_SOCKET)  # same layout as on node A
        dest = Destination(qmp=qmp, tap=tap, node=self.b)
        try:
            vhost = self._sudo(self.b, "test -c /dev/vhost-net", check=False).rc == 0
            argv = kube.dest_qemu_argv(vm.argv, qmp_path=qmp, tap=tap, vhost=vhost)
            dirs = kube.runtime_dirs(argv)
            if dirs:
                self._sudo(self.b, "mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
            for cmd in kube.dest_tap_commands(tap, vm.gateway_mac):
                self._sudo(self.b, cmd)
            fs_sock = kube.vhost_user_fs_socket(argv)
            if vm.virtiofsd and fs_sock:
                shared = kube.virtiofsd_shared_dir(vm.virtiofsd)
                if shared:
                    self._sudo(self.b, f"mkdir -p {shlex.quote(shared)}")
                fs_argv = kube.virtiofsd_dest_argv(vm.virtiofsd, fs_sock)
                dest.virtiofsd = self.b.ssh.start(shlex.join(fs_argv), sudo=True)
                self._wait_socket(self.b, fs_sock, dest.virtiofsd, "virtiofsd socket")
            self._sudo(self.b, f"rm -f {shlex.quote(qmp)}", check=False)
            dest.qemu = self.b.ssh.start(shlex.join(argv), sudo=True)
            self._wait_socket(self.b, qmp, dest.qemu, "destination QEMU's QMP socket")
        except BaseException:
            dest.cleanup()
            raise
        return dest

    def _wait_socket(self, node: Any, path: str, proc: Any, what: str, timeout: float = 60) -> None:
        def check() -> bool:
            if not proc.is_running():
                raise LabError(
                    f"{node.name}: {what}: process exited: {proc.errors().strip()[-800:]}"
                )
            return self._sudo(node, f"test -S {shlex.quote(path)}", check=False).rc == 0

        wait_for(check, timeout=timeout, what=f"{what} {path} on {node.name}", interval=0.5)

    def converge_routes(self, dest: Destination, pod_ip: str) -> None:
        """What the CNI would converge to: the pod IP now lives behind node B's tap."""
        ip = shlex.quote(f"{pod_ip}/32")
        self._sudo(self.b, f"ip route replace {ip} dev {shlex.quote(dest.tap)}")
        dest.routes.append((self.b, f"ip route del {ip} dev {shlex.quote(dest.tap)}"))
        self._sudo(self.a, f"ip route replace {ip} via {self.b.private_ip}")
        dest.routes.append((self.a, f"ip route del {ip} via {self.b.private_ip}"))


def wait_output(proc: Any, text: str, timeout: float, what: str) -> str:
    """Wait until a background katamaran printed ``text`` (it logs on stderr)."""

    def check() -> str | None:
        out = proc.output() + proc.errors()
        if text in out:
            return out
        if not proc.is_running():
            raise LabError(f"{what} exited (rc={proc.returncode}) before {text!r}:\n{out[-2000:]}")
        return None

    return wait_for(
        check,
        timeout=timeout,
        what=f"{what} to print {text!r}",
        interval=0.2,
        state=lambda: (proc.output() + proc.errors())[-500:],
    )


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m pytest_katamaran.kube.k3s setup|status|teardown`` (exit 2 on bad usage)."""
    parser = argparse.ArgumentParser(
        prog="k3s-e2e.sh",
        description="k3s end-to-end lab on the running guide nodes (TESTING.md).",
    )
    parser.add_argument(
        "command",
        choices=("setup", "status", "teardown"),
        help="setup: k3s server/agent + kata RuntimeClass + pod; status: cluster, pods, "
        "QEMU; teardown: uninstall k3s",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        node_a, node_b = guide_nodes()
        lab = K3sLab(node_a, node_b)
        try:
            if args.command == "setup":
                reason = lab.missing_prerequisites(python=False)
                if reason:
                    raise LabError(f"cannot set up k3s: {reason}")
                pod = lab.setup()
                print(instructions(pod, node_a.private_ip, node_b.private_ip))
                lab.say(f"setup done in {time.monotonic() - started:.0f}s")
            elif args.command == "status":
                print(lab.status())
            else:
                lab.teardown()
        finally:
            for node in (node_a, node_b):
                node.ssh.close()
    except KeyboardInterrupt:
        print("k3s-e2e: interrupted", file=sys.stderr)
        return 130
    except (
        LabError,
        KubeError,
        WaitTimeout,
        CommandFailed,
        CommandTimeout,
        paramiko.SSHException,
        OSError,
    ) as exc:
        print(f"k3s-e2e: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
