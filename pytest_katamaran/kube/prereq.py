"""Probes for what the minikube and k3s flows need; each names the exact missing piece.

Why: the e2e tests cannot run on the CI machines (no usable KVM, no cluster binaries,
no internet beyond package registries, no Kata).  A skip must then say precisely what
is missing and how to get it, not just "environment not suitable".  Every probe
returns ``None`` when the prerequisite is there and a one-line reason when it is not.

Internet is never probed: traffic to non-registry hosts is not allowed from these
machines, so it is assumed unavailable unless ``KATAMARAN_INTERNET=1`` says otherwise.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pytest_katamaran.qemu.accel import probe_kvm

INTERNET_ENV = "KATAMARAN_INTERNET"
NESTED_PARAMS = (
    "sys/module/kvm_intel/parameters/nested",
    "sys/module/kvm_amd/parameters/nested",
)
KATA_RUNTIME = "/opt/kata/bin/kata-runtime"
KATA_SHIM = "containerd-shim-kata-v2"
KATA_SHIM_OPT = "/opt/kata/bin/containerd-shim-kata-v2"
# What the flows download: images (nginx:alpine, python, kata-deploy), k3s, kata-deploy YAML.
INTERNET_HOSTS = ("docker.io", "quay.io", "get.k3s.io", "github.com")
MIN_NODE_PYTHON = (3, 10)

Probe = Callable[[], str | None]


def nested_virtualization(root: Path | str = "/") -> str | None:
    """Nested virtualization enabled in kvm_intel or kvm_amd (Y or 1), per TESTING.md."""
    root = Path(root)
    seen: list[str] = []
    for rel in NESTED_PARAMS:
        path = root / rel
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value in ("Y", "y", "1"):
            return None
        seen.append(f"/{rel} is {value or 'empty'}")
    if seen:
        return (
            "nested virtualization is disabled ("
            + "; ".join(seen)
            + "): enable it (e.g. modprobe kvm_intel nested=1)"
        )
    return (
        "nested virtualization unavailable: neither /sys/module/kvm_intel/parameters/nested "
        "nor /sys/module/kvm_amd/parameters/nested exists (kvm_intel/kvm_amd not loaded)"
    )


def working_kvm(probe: Callable[[], tuple[bool, str]] = probe_kvm) -> str | None:
    """KVM that really runs a guest (accel.probe_kvm), not merely an openable /dev/kvm."""
    ok, reason = probe()
    return None if ok else f"KVM is not usable here ({reason})"


def nested_kvm(
    root: Path | str = "/", probe: Callable[[], tuple[bool, str]] = probe_kvm
) -> str | None:
    """Both halves minikube's kvm2 driver needs: nested virtualization and a working KVM."""
    return first_missing(lambda: nested_virtualization(root), lambda: working_kvm(probe))


def on_path(program: str, hint: str = "") -> str | None:
    """``program`` resolvable on PATH."""
    if shutil.which(program) is not None:
        return None
    return f"`{program}` not found on PATH" + (f" ({hint})" if hint else "")


def minikube() -> str | None:
    """The minikube binary (not installable from the registries this machine may reach)."""
    return on_path("minikube", "install it from https://minikube.sigs.k8s.io")


def kubectl() -> str | None:
    """The kubectl client."""
    return on_path("kubectl", "install kubectl")


def internet(env: dict[str, str] | None = None) -> str | None:
    """Internet access, declared rather than probed (no traffic to non-registry hosts)."""
    env = os.environ if env is None else env
    if env.get(INTERNET_ENV, "").strip() == "1":
        return None
    return (
        f"internet access (to {', '.join(INTERNET_HOSTS)}) is assumed unavailable: this "
        f"machine may only reach package registries, so it is not probed; set "
        f"{INTERNET_ENV}=1 where the flow can download"
    )


def kata_local() -> str | None:
    """Kata installed on this machine (kata-runtime or the containerd shim)."""
    if os.access(KATA_RUNTIME, os.X_OK) or shutil.which(KATA_SHIM) is not None:
        return None
    return f"Kata Containers not installed ({KATA_RUNTIME} missing and {KATA_SHIM} not on PATH)"


# A node check prints one word per missing piece; empty output means all present.
KATA_NODE_CHECK = (
    f"if [ -x {KATA_RUNTIME} ] || [ -x {KATA_SHIM_OPT} ] || command -v {KATA_SHIM} "
    ">/dev/null 2>&1; then echo kata=yes; else echo kata=no; fi"
)


def kata_node_reason(node: str, check_output: str) -> str | None:
    """Interpret ``KATA_NODE_CHECK`` output from ``node``."""
    if "kata=yes" in check_output:
        return None
    return (
        f"Kata Containers not installed on {node} ({KATA_RUNTIME} and {KATA_SHIM_OPT} "
        f"missing, {KATA_SHIM} not on PATH)"
    )


def command_node_check(program: str) -> str:
    """A node command printing ``<program>=yes|no``."""
    q = shlex.quote(program)
    return f"if command -v {q} >/dev/null 2>&1; then echo {q}=yes; else echo {q}=no; fi"


def command_node_reason(node: str, program: str, check_output: str) -> str | None:
    """Interpret ``command_node_check(program)`` output from ``node``."""
    if f"{program}=yes" in check_output:
        return None
    return f"`{program}` not found on {node} (`command -v {program}` failed)"


PYTHON_NODE_CHECK = (
    "python3 -c 'import sys; print(\"python=%d.%d\" % sys.version_info[:2])' 2>/dev/null "
    "|| echo python=none"
)


def python_node_reason(node: str, check_output: str) -> str | None:
    """katamaran needs python3 >= 3.10 on the node it runs on."""
    for word in check_output.split():
        if word.startswith("python="):
            value = word.split("=", 1)[1]
            if value == "none":
                return f"python3 not found on {node} (katamaran needs python3 >= 3.10 there)"
            try:
                version = tuple(int(p) for p in value.split("."))
            except ValueError:
                break
            if version >= MIN_NODE_PYTHON:
                return None
            return f"python3 on {node} is {value}; katamaran needs python3 >= 3.10 there"
    return f"cannot tell python3's version on {node} (output: {check_output.strip()[:80]!r})"


def node_reasons(
    node: str, runner: Any, programs: Iterable[str] = (), *, python: bool = True
) -> list[str]:
    """Kata, python3 (if ``python``) and ``programs`` on a node, in one SSH round trip.

    ``runner`` is anything with ``run(cmd, check=False, timeout=...)`` returning an
    object with ``stdout`` (``pytest_katamaran.ssh.SSHClient``).
    """
    programs = list(programs)
    script = "; ".join(
        [KATA_NODE_CHECK, PYTHON_NODE_CHECK, *(command_node_check(p) for p in programs)]
    )
    out = runner.run(script, check=False, timeout=60).stdout
    reasons = [kata_node_reason(node, out)]
    if python:
        reasons.append(python_node_reason(node, out))
    reasons += [command_node_reason(node, p, out) for p in programs]
    return [r for r in reasons if r]


def first_missing(*probes: Probe) -> str | None:
    """The first probe's reason (for prerequisites that only make sense in order)."""
    for probe in probes:
        reason = probe()
        if reason:
            return reason
    return None


def all_missing(*probes: Probe) -> str | None:
    """Every missing prerequisite, joined, so one run tells the whole story."""
    reasons = [r for r in (p() for p in probes) if r]
    return "; ".join(reasons) if reasons else None


def minikube_flow() -> str | None:
    """Everything the minikube smoke test needs on this machine."""
    return all_missing(minikube, kubectl, nested_kvm, internet)
