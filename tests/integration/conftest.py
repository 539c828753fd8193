from __future__ import annotations

import pytest

from pytest_katamaran.lab.local import Rig


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
