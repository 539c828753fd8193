"""Smoke: required project files exist and every shell script parses (TESTING.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]  # for collection-time parametrization only

REQUIRED_FILES = [
    "README.md",
    "pyproject.toml",
    "conftest.py",
    ".ci/run",
    "katamaran/__init__.py",
    "katamaran/cli.py",
    "pytest_katamaran/plugin.py",
    "testenv/setup.sh",
    "testenv/start-node-a.sh",
    "testenv/start-node-b.sh",
    "testenv/test.sh",
    "testenv/minikube-test.sh",
    "testenv/k3s-e2e.sh",
]


def _shell_scripts() -> list[str]:
    found = sorted(p.relative_to(_ROOT).as_posix() for p in (_ROOT / "testenv").rglob("*.sh"))
    if (_ROOT / ".ci" / "run").is_file():
        found.append(".ci/run")
    return found


SHELL_SCRIPTS = _shell_scripts()
START_SCRIPTS = ["testenv/start-node-a.sh", "testenv/start-node-b.sh"]


@pytest.mark.parametrize("rel", REQUIRED_FILES)
def test_required_file_exists(repo_root, rel):
    path = repo_root / rel
    assert path.is_file(), f"required file missing: {rel}"
    assert path.stat().st_size > 0, f"required file is empty: {rel}"


def test_shell_scripts_found():
    assert SHELL_SCRIPTS, "no *.sh under testenv/ and no .ci/run"


@pytest.mark.parametrize("rel", SHELL_SCRIPTS)
def test_shell_syntax(repo_root, rel):
    r = subprocess.run(
        ["bash", "-n", str(repo_root / rel)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, f"bash -n {rel} failed:\n{r.stderr}"


@pytest.mark.parametrize("rel", [s for s in SHELL_SCRIPTS if s != "testenv/lib.sh"])
def test_shell_script_executable(repo_root, rel):
    # The guide runs them as ./testenv/NAME.sh.
    assert os.access(repo_root / rel, os.X_OK), f"{rel} is not executable (chmod +x)"


# Binaries a start script would use to boot a node; stubs record any call.
_QEMU_STUBS = ["qemu-system-x86_64", "qemu-system-aarch64", "qemu-kvm", "kvm", "qemu-img"]


@pytest.mark.parametrize("rel", START_SCRIPTS)
def test_start_script_fails_early_without_vm_files(repo_root, tmp_path, rel):
    """A start script run where no VM disk/seed files exist must fail before launching QEMU."""
    script = repo_root / rel
    if not script.is_file():
        pytest.fail(f"required file missing: {rel}")
    # A copy of testenv/ without any VM images, keys or state.
    work = tmp_path / "repo"
    shutil.copytree(
        repo_root / "testenv",
        work / "testenv",
        ignore=shutil.ignore_patterns(
            "*.qcow2", "*.img", "*.iso", "*.raw", "kata_test_rsa*", ".state", "images", "cache"
        ),
    )
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "qemu-calls"
    for name in _QEMU_STUBS:
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 0\n')
        stub.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ)
    env.update(
        PATH=f"{stubs}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
    )
    try:
        r = subprocess.run(
            ["bash", str(work / rel)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{rel} did not fail early: still running after 60s without VM files")
    launched = calls.read_text() if calls.exists() else ""
    assert r.returncode != 0, f"{rel} exited 0 without VM files:\n{r.stdout}\n{r.stderr}"
    assert "qemu-system" not in launched and "kvm" not in launched, (
        f"{rel} launched QEMU without VM files:\n{launched}"
    )
    assert (r.stdout + r.stderr).strip(), f"{rel} failed silently (no message)"
