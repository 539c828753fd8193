"""The pods' accelerator on a lab node (qemu.accel.pod_accel) and the node vCPUs that follow
from it (qemu.node.node_cpus): pure logic, no QEMU.

The real proof (a pod under a TCG node's KVM, migrated at the guide's 10 ms) is the e2e
and tests/integration/test_nodes.py; here only the decisions around it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_katamaran.qemu import accel
from pytest_katamaran.qemu.accel import kvm_kernel_argv, kvm_module, load_kvm, pod_accel
from pytest_katamaran.qemu.workload import POD_SMP, SandboxSpec

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme svm npt nrip_save\n"
INTEL = "processor\t: 0\nflags\t\t: fpu vme vmx ept\n"
NEITHER = "processor\t: 0\nflags\t\t: fpu vme sse2\n"


@pytest.mark.parametrize(
    ("cpuinfo", "module"), [(AMD, "kvm_amd"), (INTEL, "kvm_intel"), (NEITHER, None), ("", None)]
)
def test_the_kvm_module_follows_the_cpu_flags(cpuinfo, module):
    assert kvm_module(cpuinfo) == module


def test_no_modprobe_when_dev_kvm_exists(tmp_path, monkeypatch):
    dev = tmp_path / "kvm"
    dev.touch()
    monkeypatch.setattr(accel.subprocess, "run", _refuse)
    assert load_kvm(_cpuinfo(tmp_path, AMD), dev) == f"{dev} present"


def test_a_cpu_without_virtualization_loads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(accel.subprocess, "run", _refuse)
    got = load_kvm(_cpuinfo(tmp_path, NEITHER), tmp_path / "kvm")
    assert got == "the CPU offers neither svm nor vmx"


def test_modprobe_of_the_cpus_module_and_its_failure_is_said(tmp_path, monkeypatch):
    calls = []

    def run(argv, **_kw):
        calls.append(argv)
        return _Done(1, "modprobe: FATAL: Module kvm_amd not found")

    monkeypatch.setattr(accel.subprocess, "run", run)
    got = load_kvm(_cpuinfo(tmp_path, AMD), tmp_path / "kvm")
    assert calls == [["modprobe", "kvm_amd"]]
    assert got == "modprobe kvm_amd failed: modprobe: FATAL: Module kvm_amd not found"


def test_tcg_is_taken_without_loading_or_probing(monkeypatch):
    monkeypatch.setattr(accel, "load_kvm", _refuse)
    monkeypatch.setattr(accel, "probe_kvm", _refuse)
    assert pod_accel("tcg").name == "tcg"


def test_auto_says_what_it_loaded_and_falls_back_to_tcg(monkeypatch):
    probed = []

    def probe(timeout, smp):
        probed.append(smp)
        return True, "booted in 3.0s"

    monkeypatch.setattr(accel, "load_kvm", lambda: "modprobe kvm_amd")
    monkeypatch.setattr(accel, "probe_kvm", probe)
    chosen = pod_accel("auto")
    assert (chosen.name, chosen.cpu) == ("kvm", "host")
    assert chosen.reason == "booted in 3.0s; modprobe kvm_amd"
    monkeypatch.setattr(accel, "probe_kvm", lambda timeout, smp: (False, "/dev/kvm: No such file"))
    assert pod_accel("auto").name == "tcg"
    # The in-node probe boots as many vCPUs as a pod runs (one), not a node's two: TCG's
    # SVM ran 95 one-vCPU nested boots clean and corrupted two-vCPU nodes.
    assert probed == [POD_SMP] == [SandboxSpec("s", Path("k"), Path("i")).smp] == [1]


def test_the_probe_boots_the_vcpus_it_is_given(tmp_path):
    argv = kvm_kernel_argv("qemu", Path("vmlinuz"), tmp_path / "console", "host", POD_SMP)
    assert argv[argv.index("-smp") + 1] == "1"
    assert kvm_kernel_argv("qemu", Path("k"), tmp_path / "c")[argv.index("-smp") + 1] == "2"


def test_kvm_required_but_unusable_names_what_was_tried(monkeypatch):
    monkeypatch.setattr(accel, "load_kvm", lambda: "the CPU offers neither svm nor vmx")
    monkeypatch.setattr(accel, "probe_kvm", lambda timeout, smp: (False, "/dev/kvm: No such file"))
    with pytest.raises(
        accel.AccelUnavailable, match=r"unusable: /dev/kvm: No such file.*neither svm"
    ):
        pod_accel("kvm")


def test_unknown_accel_is_refused():
    with pytest.raises(ValueError, match="accel must be one of auto, kvm, tcg; got 'hvf'"):
        pod_accel("hvf")


class _Done:
    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def _cpuinfo(tmp: Path, text: str) -> Path:
    path = tmp / "cpuinfo"
    path.write_text(text)
    return path


def _refuse(*args, **kwargs):
    raise AssertionError(f"must not be called: {args} {kwargs}")


@pytest.mark.parametrize(
    ("node_accel", "pod", "requested", "cpus"),
    [
        ("tcg", "auto", None, 1),  # the default: pods may run under the TCG node's KVM
        ("tcg", "kvm", None, 1),
        ("tcg", "tcg", None, 2),  # nested TCG pods keep the image's two vCPUs
        ("kvm", "auto", None, 2),  # a KVM node's own SVM/VMX is the hardware's
        ("tcg", "auto", 3, 3),  # --node-cpus wins
    ],
)
def test_node_vcpus_follow_where_the_pods_run(node_accel, pod, requested, cpus):
    from pytest_katamaran.qemu.node import RESOURCES, node_cpus

    assert RESOURCES["debian"][0] == 2
    assert node_cpus("debian", node_accel, pod, requested) == cpus
