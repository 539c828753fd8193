"""Shared fixtures for the smoke tests (the Python form of TESTING.md "Running Smoke Tests")."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Generous per-invocation limit: every CLI case fails fast (validation or QMP connect),
# so hitting this means the CLI hung, which is itself a bug.
CLI_TIMEOUT = 60


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the directory holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture
def run_cli(repo_root: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m katamaran ARGS...`` as a real subprocess from the work tree.

    The child runs in an empty temporary directory with the repo root first on
    PYTHONPATH, so it is the code in this tree that is exercised, whether or not
    (and however) the package is installed.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONSTARTUP", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [sys.executable, "-m", "katamaran", *args],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"katamaran {' '.join(args)} did not exit within {CLI_TIMEOUT}s")

    return run
