from __future__ import annotations

import shutil

import pytest

from pytest_katamaran.guest import build_guest
from pytest_katamaran.locallab import Rig


@pytest.fixture(scope="session")
def guest():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    return build_guest()


@pytest.fixture
def rig_factory(guest, tmp_path):
    rigs: list[Rig] = []

    def make(**kwargs) -> Rig:
        rig = Rig(guest, tmp_path, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.down()
