from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest

from pytest_katamaran.lab.local import Rig


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
