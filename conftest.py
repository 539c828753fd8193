"""Root conftest: the plugin itself is registered through the pytest11 entry point."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

# tests/plugin use pytester; it must be registered at the root to be usable there.
pytest_plugins = ["pytester"]

# The testenv/ scripts the tests run use the python under test, not the checkout's .venv
# (testenv/lib.sh): a developer's own environment or a fresh clone without .venv works too.
os.environ.setdefault("KATAMARAN_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def guest():
    """The small test guest (Debian cloud kernel + busybox initramfs), built once, cached."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    from pytest_katamaran.images.guest import build_guest

    return build_guest()
