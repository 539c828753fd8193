"""Smoke: the tree is lint- and format-clean (the Python stand-in for `go vet` + `gofmt`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _ruff() -> list[str] | None:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        from ruff.__main__ import find_ruff_bin  # the PyPI package ships the binary
    except ImportError:
        return None
    try:
        return [str(find_ruff_bin())]
    except FileNotFoundError:
        return None


RUFF = _ruff()
needs_ruff = pytest.mark.skipif(
    RUFF is None, reason="ruff is not installed (pip install -e '.[test]')"
)


def _run(repo_root: Path, *args: str) -> None:
    assert RUFF is not None
    r = subprocess.run(
        [*RUFF, *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, (
        f"`ruff {' '.join(args)}` failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    )


@needs_ruff
def test_ruff_check(repo_root):
    _run(repo_root, "check", "--no-cache", ".")


@needs_ruff
def test_ruff_format(repo_root):
    _run(repo_root, "format", "--check", "--no-cache", ".")
