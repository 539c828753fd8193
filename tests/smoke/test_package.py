"""Smoke: the package builds and installs its entry points (the stand-in for `go build`)."""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import katamaran

# Left out of the copy that gets built: VCS data, build output, caches, VM images.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "results",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".venv",
    ".state",
    "*.qcow2",
    "*.img",
    "*.iso",
    "kata_test_rsa*",
)


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build a wheel from a copy of the tree (an in-tree build would write build/ and
    *.egg-info into the shared work tree)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    out = base / "out"
    shutil.copytree(repo_root, src, ignore=_COPY_IGNORE, symlinks=True)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(src),  # an absolute path: a bare name would be looked up on the index
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    hint = ""
    if "invalid command 'bdist_wheel'" in r.stdout + r.stderr:
        hint = (
            "\nHINT: setuptools < 70.1 needs the 'wheel' package to build wheels without "
            "build isolation; it is not installed (add 'wheel' to the test extra).\n"
        )
    assert r.returncode == 0, (
        f"pip wheel failed (exit {r.returncode}):{hint}\n{r.stdout}\n{r.stderr}{hint}"
    )
    wheels = sorted(out.glob("katamaran-*.whl"))
    assert len(wheels) == 1, f"expected one katamaran wheel in {out}: {list(out.iterdir())}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _wheel_entry_points(wheel: Path, names: list[str]) -> configparser.ConfigParser:
    [ep_file] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    cp = configparser.ConfigParser(delimiters=("=",))
    cp.optionxform = str  # keep names as written
    with zipfile.ZipFile(wheel) as zf:
        cp.read_string(zf.read(ep_file).decode())
    return cp


def test_wheel_version_matches_package(wheel):
    assert wheel.name.startswith(f"katamaran-{katamaran.__version__}-"), wheel.name


@pytest.mark.parametrize(
    "member",
    [
        "katamaran/__init__.py",
        "katamaran/cli.py",
        "pytest_katamaran/__init__.py",
        "pytest_katamaran/plugin.py",
    ],
)
def test_wheel_contains(wheel_names, member):
    assert member in wheel_names, f"{member} missing from wheel: {wheel_names}"


def test_wheel_contains_guest_files(repo_root, wheel_names):
    guest = repo_root / "pytest_katamaran" / "images" / "guest"
    expected = sorted(
        f"pytest_katamaran/images/guest/{p.name}"
        for p in guest.iterdir()
        if p.is_file() and not p.name.startswith(".")
    )
    assert expected, f"no files in {guest}"
    missing = [m for m in expected if m not in wheel_names]
    assert not missing, f"package data missing from wheel: {missing}"


def test_wheel_entry_points(wheel, wheel_names):
    eps = _wheel_entry_points(wheel, wheel_names)
    assert eps.get("console_scripts", "katamaran").strip() == "katamaran.cli:main"
    assert eps.get("pytest11", "katamaran").strip() == "pytest_katamaran.plugin"


def test_import_cli():
    importlib.import_module("katamaran")
    cli = importlib.import_module("katamaran.cli")
    assert callable(getattr(cli, "main", None)), "katamaran.cli.main is not callable"


def test_pytest11_entry_point_registered():
    eps = importlib.metadata.entry_points(group="pytest11")
    matches = [ep for ep in eps if ep.name == "katamaran"]
    assert matches, "pytest11 entry point 'katamaran' not registered; run `pip install -e .`"
    assert matches[0].value == "pytest_katamaran.plugin"
    matches[0].load()


def test_console_script_entry_point_registered():
    eps = importlib.metadata.entry_points(group="console_scripts")
    matches = [ep for ep in eps if ep.name == "katamaran"]
    assert matches, "console script 'katamaran' not registered; run `pip install -e .`"
    assert matches[0].value == "katamaran.cli:main"
