from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import pytest

from pytest_katamaran.images.guest import cache_root
from pytest_katamaran.lab.local import Rig
from pytest_katamaran.qemu.binary import WorkloadQemu, backports_qemu


@pytest.fixture
def rig_factory(guest, tmp_path):
    rigs: list[Rig] = []

    def make(tmp: Path | None = None, **kwargs) -> Rig:
        rig = Rig(guest, tmp or tmp_path, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in reversed(rigs):  # a rig in another's lab goes before that lab
        rig.down()


@pytest.fixture(scope="module")
def node_lab_config(tmp_path_factory) -> types.SimpleNamespace:
    """What QemuNodes reads from the plugin's config, for the modules that boot lab nodes
    themselves (no --nodes run): the Debian node image under TCG (KVM fails here, LAB.md)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    return types.SimpleNamespace(
        node_image="debian",
        accel="tcg",
        keep_on_failure=False,
        results_dir=tmp_path_factory.mktemp("results"),
    )


@pytest.fixture(scope="session")
def qemu_backports() -> WorkloadQemu:
    """Debian backports' QEMU (10.0 here), unpacked into the harness cache as the two-node
    e2e's workload is: what the host's 7.2 lacks (block-job-change, 8.2+;
    avail-switchover-bandwidth, 8.2+)."""
    try:
        return backports_qemu(cache_root())
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"needs Debian backports' QEMU (8.2+) in the harness cache: {err}")
