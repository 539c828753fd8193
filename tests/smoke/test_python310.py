"""Smoke: the migration core runs on Python 3.10 (Ubuntu 22.04, the guide's node image).

Why: katamaran is shipped to nodes whose python3 may be 3.10, and the traps are silent on
3.11: `asyncio.wait_for` raises `asyncio.TimeoutError`, which is the builtin `TimeoutError`
only from 3.11, and 3.11-only names (datetime.UTC, typing.Self, enum.StrEnum, tomllib,
asyncio.TaskGroup / timeout, ExceptionGroup) fail on import or at the worst moment.
Three checks: vermin (static, whole API surface), an AST check for the wait_for trap, and
the core's logic tests run on a real CPython 3.10.2 (pyodide under node, tests/smoke/cpython310.py).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cpython310  # tests/smoke/ is on sys.path (rootdir-less test dirs, as e2e_lab)
import pytest

REPO = Path(__file__).resolve().parents[2]
# The core (shipped to nodes) and the harness (runs on the host and on Debian-image nodes).
PACKAGES = ["katamaran", "pytest_katamaran"]


def _vermin() -> list[str] | None:
    exe = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    return [exe] if exe else None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_api_newer_than_python_310(package):
    vermin = _vermin()
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    r = subprocess.run(
        [*vermin, "--no-tips", "--violations", "--eval-annotations", "-t=3.10-", package],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, f"vermin: {package} needs more than 3.10:\n{r.stdout}{r.stderr}"
    found = re.search(r"Minimum required versions: 3\.(\d+)", r.stdout)
    assert found and int(found.group(1)) <= 10, r.stdout


def _wait_for_handlers(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, caught name) of every handler around an `asyncio.wait_for` call or a call of
    katamaran.aio.within (which raises asyncio.TimeoutError the same way)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        calls = [
            n
            for stmt in node.body
            for n in ast.walk(stmt)
            if isinstance(n, ast.Call) and ast.unparse(n.func) in ("asyncio.wait_for", "within")
        ]
        if calls:
            found += [(h.lineno, ast.unparse(h.type)) for h in node.handlers if h.type]
    return found


def test_wait_for_timeouts_are_caught_as_asyncio_timeouterror():
    handlers = []
    for path in sorted((REPO / "katamaran").glob("*.py")):
        for line, caught in _wait_for_handlers(ast.parse(path.read_text())):
            handlers.append((path.name, line, caught))
            assert "TimeoutError" not in caught or "asyncio.TimeoutError" in caught, (
                f"{path.name}:{line} catches {caught} around asyncio.wait_for: on Python 3.10 "
                "its timeout is asyncio.TimeoutError, which that does not catch"
            )
    assert [h for h in handlers if h[2] == "asyncio.TimeoutError"], "no wait_for handler found"


def test_pyproject_says_310():
    text = (REPO / "pyproject.toml").read_text()  # no tomllib on 3.10
    assert re.search(r'^requires-python = ">=3\.10"', text, re.M)
    assert re.search(r'^target-version = "py310"', text, re.M)


def _cpython310() -> Path:
    try:
        return cpython310.prepare()
    except cpython310.Unavailable as why:
        pytest.skip(f"no CPython 3.10 here: {why}")


def test_core_logic_on_a_real_cpython_310():
    root = _cpython310()
    # the unix-socket and socketpair tests need sockets, the netlink-error one a thread
    # (katamaran's netlink calls run in one), which wasm has not; the rest runs
    skip = "not never_greets and not handed_stream and not netlink_error"
    r = cpython310.run_pytest(root, REPO, ["-q", "tests/smoke/test_core_logic.py", "-k", skip])
    out = r.stdout + r.stderr
    assert "cpython 3.10." in r.stdout, out
    assert r.returncode == 0, out
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 10, out


_ZIPAPP_TEST = """
import sys


def test_the_zipapp_imports_and_parses_on_310():
    import katamaran.cli, katamaran.dest, katamaran.source, pyroute2, qemu.qmp

    app = {app!r}
    for module in (katamaran.dest, katamaran.source, pyroute2, qemu.qmp):
        assert module.__file__.startswith(app + "/"), module.__file__
    assert sys.version_info[:2] == (3, 10)
    assert katamaran.cli.main(["-mode", "bogus"]) == 2
    argv = ["-mode", "source", "-dest-ip", "fd00::2", "-vm-ip", "10.1.1.1"]
    assert str(katamaran.cli.parse_args(argv).dest_ip) == "fd00::2"
"""


def test_zipapp_on_a_real_cpython_310(tmp_path):
    """katamaran.pyz, as copied to an Ubuntu 22.04 node, imports everything from itself."""
    from pytest_katamaran.kube.model import build_zipapp

    root = _cpython310()
    app = build_zipapp(tmp_path / "katamaran.pyz")
    test = tmp_path / "test_zipapp310.py"
    test.write_text(_ZIPAPP_TEST.format(app=cpython310.HOST + str(app)))
    r = cpython310.run_pytest(
        root, tmp_path, ["-q", "-W", "ignore::DeprecationWarning", test.name], first=[app]
    )
    out = r.stdout + r.stderr
    assert "cpython 3.10." in r.stdout and r.returncode == 0, out
    assert "1 passed" in r.stdout, out
