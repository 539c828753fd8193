"""E2E, TESTING.md "Minikube Smoke Test": katamaran against a live Kata VM's QMP socket.

Why: the unit and integration tests use QEMUs we start ourselves; only a real Kata
deployment shows that QMP discovery matches Kata's runtime directory layout and that the
handshake works with the monitor Kata gives us.  The flow is the guide's: minikube (kvm2,
containerd), Kata via kata-deploy, an nginx:alpine pod with ``runtimeClassName: kata-qemu``,
katamaran copied into the node, ``katamaran -mode dest`` against the discovered socket
(it must connect, then refuse a VM that is not waiting for a migration), CLI errors.

Needs nested KVM, minikube, kubectl and internet: skipped with the exact missing piece
otherwise (``pytest_katamaran.kube.prereq``).  The cluster is deleted afterwards unless
``KATAMARAN_KEEP_CLUSTER=1`` (``./testenv/minikube-test.sh --keep``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_katamaran.kube import model as kube
from pytest_katamaran.kube import prereq
from pytest_katamaran.kube.model import KubeError, WaitTimeout, wait_for
from pytest_katamaran.qemu.sandbox import SandboxSockets

pytestmark = pytest.mark.timeout(3600)

PROFILE = os.environ.get("KATAMARAN_MINIKUBE_PROFILE", "katamaran-test")
KEEP_ENV = "KATAMARAN_KEEP_CLUSTER"
KATA_VERSION = os.environ.get("KATAMARAN_KATA_VERSION", kube.DEFAULT_KATA_VERSION)
POD = "kata-test"
HELPER = "katamaran-helper"
NODE_BUNDLE = "/tmp/katamaran-bundle.tgz"
NODE_PY = "/tmp/katamaran-py"
START_TIMEOUT = 1200.0
POD_TIMEOUT = 900.0


def _tail(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def run(
    argv: list[str], *, timeout: float, what: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """A local command with a time limit; failures name the step and show its output."""
    try:
        r = subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: `{shlex.join(argv)}` did not finish within {timeout:.0f}s")
    if check and r.returncode != 0:
        pytest.fail(
            f"{what}: `{shlex.join(argv)}` exited {r.returncode}:\n{_tail(r.stderr or r.stdout)}"
        )
    return r


class Minikube:
    """The profile's minikube and kubectl, every call bounded in time."""

    def __init__(self, profile: str) -> None:
        self.profile = profile

    def minikube(self, *args: str, timeout: float = 300, what: str = "minikube", **kw: Any) -> Any:
        return run(["minikube", "-p", self.profile, *args], timeout=timeout, what=what, **kw)

    def kubectl(self, *args: str, timeout: float = 120, what: str = "kubectl", **kw: Any) -> Any:
        return run(["kubectl", "--context", self.profile, *args], timeout=timeout, what=what, **kw)

    def ssh(self, cmd: str, timeout: float = 180) -> tuple[str, int | None]:
        """(output, exit code) of ``cmd`` on the node, through an rc marker."""
        r = self.minikube(
            "ssh", "--", kube.with_rc_marker(cmd), timeout=timeout, what=f"node: {cmd}", check=False
        )
        return kube.split_rc_marker((r.stdout + r.stderr).replace("\r", ""))

    def apply(self, *docs: Mapping[str, Any], what: str) -> None:
        self.kubectl("apply", "-f", "-", input=kube.to_yaml(*docs), what=what)

    def pod_json(self, name: str) -> str:
        return self.kubectl("get", "pod", name, "-o", "json", what=f"get pod {name}").stdout

    def wait_pod_ready(self, name: str, timeout: float) -> kube.PodStatus:
        def state() -> str:
            r = self.kubectl(
                "describe", "pod", name, check=False, what=f"describe pod {name}", timeout=60
            )
            return _tail(r.stdout, 600)

        return wait_for(
            kube.pod_ready_check(lambda: self.pod_json(name)),
            timeout=timeout,
            what=f"pod {name} to be Ready",
            interval=5,
            state=state,
        )


@dataclass
class Cluster:
    """A running minikube with Kata, the Kata pod, and a way to run katamaran in the node."""

    mk: Minikube
    pod: kube.PodStatus
    sandbox: SandboxSockets
    in_node: Callable[[str], tuple[str, int | None]]


def _start(mk: Minikube) -> None:
    mk.minikube(
        "start",
        "--driver=kvm2",
        "--container-runtime=containerd",
        "--memory=8192",
        "--cpus=4",
        "--wait=all",
        timeout=START_TIMEOUT,
        what="minikube start (kvm2, containerd)",
    )


def _install_kata(mk: Minikube) -> str:
    """kata-deploy, then wait for the node label it sets once the runtime is in place."""
    for step in kube.kata_deploy_steps(KATA_VERSION):
        mk.kubectl(*step.args, timeout=step.timeout, what=step.what)

    def labelled() -> str | None:
        nodes = kube.parse_nodes(mk.kubectl("get", "nodes", "-o", "json").stdout)
        done = [n.name for n in nodes if n.labels.get(kube.KATA_NODE_LABEL) == "true"]
        return done[0] if done else None

    return wait_for(
        labelled,
        timeout=900,
        what=f"kata-deploy to label the node {kube.KATA_NODE_LABEL}=true",
        interval=10,
        state=lambda: _tail(
            mk.kubectl(
                "-n", "kube-system", "logs", "-l", "name=kata-deploy", "--tail=20", check=False
            ).stdout,
            600,
        ),
    )


def _enable_extra_monitor(mk: Minikube) -> str:
    """The second QMP monitor (the shim owns qmp.sock), before the pod's VM starts."""
    path, rc = mk.ssh(kube.first_existing_script(kube.KATA_CONFIG_CANDIDATES))
    path = path.strip()
    assert rc == 0 and path, (
        f"no Kata QEMU configuration on the node ({kube.KATA_CONFIG_CANDIDATES})"
    )
    text, rc = mk.ssh(f"sudo cat {shlex.quote(path)}")
    assert rc == 0, f"cannot read {path}: {text}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "configuration-qemu.toml"
        local.write_text(kube.enable_extra_monitor(text))
        mk.minikube("cp", str(local), "/tmp/katamaran-qemu.toml", what="copy Kata config")
    out, rc = mk.ssh(f"sudo install -m 0644 /tmp/katamaran-qemu.toml {shlex.quote(path)}")
    assert rc == 0, f"cannot write {path}: {out}"
    out, rc = mk.ssh(f"grep -c '^extra_monitor_socket = \"qmp\"' {shlex.quote(path)}")
    assert rc == 0, f"extra_monitor_socket not set in {path}: {out}"
    return path


def _copy_katamaran(mk: Minikube) -> None:
    """The guide's step 4: katamaran (with its pure-Python deps) into the node."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = kube.build_bundle(Path(tmp) / "katamaran-bundle.tgz")
        mk.minikube("cp", str(bundle), NODE_BUNDLE, what="minikube cp katamaran bundle")
    out, rc = mk.ssh(
        f"rm -rf {NODE_PY} && mkdir -p {NODE_PY} && tar -xzf {NODE_BUNDLE} -C {NODE_PY}"
    )
    assert rc == 0, f"cannot unpack katamaran in the node: {out}"


def _runner(mk: Minikube, node: str) -> Callable[[str], tuple[str, int | None]]:
    """Run a command as root in the node with python3: natively, or in a host-namespace pod.

    The minikube ISO usually has no python3; then a privileged runc pod on the node (host
    network and PIDs, the node's /run/vc and the copied katamaran) provides one.
    """
    out, _ = mk.ssh(prereq.PYTHON_NODE_CHECK)
    if prereq.python_node_reason(node, out) is None:
        return lambda cmd: mk.ssh(f"sudo env PYTHONPATH={NODE_PY} {cmd}")
    mk.apply(
        kube.helper_pod(HELPER, node, {"/run/vc": "/run/vc", NODE_PY: NODE_PY}),
        what="helper pod",
    )
    mk.wait_pod_ready(HELPER, timeout=600)

    def in_pod(cmd: str) -> tuple[str, int | None]:
        wrapped = kube.with_rc_marker(f"env PYTHONPATH={NODE_PY} {cmd}")
        r = mk.kubectl(
            "exec", HELPER, "--", "sh", "-c", wrapped,
            timeout=180, what=f"in node: {cmd}", check=False,
        )  # fmt: skip
        return kube.split_rc_marker(r.stdout + r.stderr)

    return in_pod


@pytest.fixture(scope="module")
def cluster() -> Generator[Cluster, None, None]:
    reason = prereq.minikube_flow()
    if reason:
        pytest.skip(reason)
    mk = Minikube(PROFILE)
    keep = os.environ.get(KEEP_ENV) == "1"
    try:
        _start(mk)
        node = _install_kata(mk)
        _enable_extra_monitor(mk)
        have_rc = mk.kubectl("get", "runtimeclass", kube.MINIKUBE_RUNTIME_CLASS, check=False)
        if have_rc.returncode != 0:
            mk.apply(
                kube.runtime_class(
                    kube.MINIKUBE_RUNTIME_CLASS, node_selector={kube.KATA_NODE_LABEL: "true"}
                ),
                what="kata-qemu RuntimeClass",
            )
        mk.apply(kube.kata_pod(POD, kube.MINIKUBE_RUNTIME_CLASS), what="Kata pod")
        try:
            pod = mk.wait_pod_ready(POD, POD_TIMEOUT)
        except (WaitTimeout, KubeError) as exc:
            pytest.fail(str(exc))
        _copy_katamaran(mk)
        listing, rc = mk.ssh("sudo sh -c " + shlex.quote(kube.sandbox_list_script()))
        assert rc == 0, f"cannot list /run/vc/vm: {listing}"
        ids, rc = mk.ssh(f"sudo crictl pods --name {POD} --state ready -q")
        sandbox_id = ids.split()[0] if rc == 0 and ids.split() else None
        try:
            sandbox = kube.pick_sandbox(kube.parse_sandbox_listing(listing), sandbox_id)
        except KubeError as exc:
            pytest.fail(f"{exc}\nlisting:\n{listing}")
        yield Cluster(mk, pod, sandbox, _runner(mk, node))
    finally:
        if keep:
            print(f"\nkatamaran: {KEEP_ENV}=1: keeping minikube profile {PROFILE!r}")
        else:
            run(
                ["minikube", "delete", "-p", PROFILE],
                timeout=600,
                what="minikube delete",
                check=False,
            )


def test_kata_pod_runs_with_kata_qemu(cluster):
    assert cluster.pod.ready and cluster.pod.pod_ip, cluster.pod.describe()
    assert cluster.pod.runtime_class == kube.MINIKUBE_RUNTIME_CLASS
    out, rc = cluster.mk.ssh(f"sudo cat {cluster.sandbox.pidfile}")
    assert rc == 0 and out.strip().isdigit(), f"no QEMU pidfile for the sandbox: {out}"


def test_qmp_socket_discovered_under_run_vc_vm(cluster):
    sock = cluster.sandbox.preferred
    assert sock is not None and str(sock).startswith("/run/vc/vm/")
    assert cluster.sandbox.extra_monitor is not None, (
        f"only {cluster.sandbox.qmp} (held by the Kata shim): extra_monitor_socket inactive"
    )


def test_dest_mode_completes_qmp_handshake(cluster):
    sock = cluster.sandbox.preferred
    out, rc = cluster.in_node(
        f"timeout 60 python3 -m katamaran -mode dest -qmp {sock} -tap tap0_kata "
        "-qmp-timeout 10 2>&1"
    )
    assert f"connected to QMP at {sock}" in out, out
    # A running VM is not waiting for an incoming migration: dest must refuse, harmlessly.
    assert rc == 1 and "not waiting for an incoming migration" in out, f"rc={rc}\n{out}"
    assert "Traceback" not in out, out
    pod = cluster.mk.wait_pod_ready(POD, 120)
    assert pod.ready, "the Kata pod stopped being Ready after the handshake"


def test_cli_invalid_mode_in_node(cluster):
    out, rc = cluster.in_node("python3 -m katamaran -mode bogus 2>&1")
    assert rc == 2 and "invalid mode" in out, f"rc={rc}\n{out}"


def test_cli_usage_in_node(cluster):
    out, rc = cluster.in_node("python3 -m katamaran 2>&1")
    assert rc == 2 and "Usage" in out, f"rc={rc}\n{out}"
