"""A real CPython 3.10 for the core's tests, where no python3.10 package exists.

Why: Ubuntu 22.04 nodes (the guide's image) run katamaran on Python 3.10, but Debian 12 has
no python3.10 package and these machines reach only the package registries. Pyodide 0.22
(on the npm registry) is CPython 3.10.2 compiled to WebAssembly; under node it runs the
core's pure logic and asyncio (timers, `asyncio.wait_for`) with 3.10's semantics. It has no
sockets, netlink or subprocesses: the modules it leaves out (ssl, fcntl, pwd...) are
stand-ins that import but cannot be used, so only logic that needs none of them can pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

from pytest_katamaran.images.guest import _locked, cache_root  # the cache's one flock helper

PYODIDE = "0.22.1"  # the last release on CPython 3.10 (0.23 moved to 3.11)
# pytest's backports below 3.11 (pure Python), from PyPI
BACKPORTS = ["exceptiongroup", "tomli", "typing_extensions"]
HOST = "/host"  # where the host's root is mounted inside the wasm filesystem

_RUNNER_JS = """
const { loadPyodide } = require(process.argv[2] + "/pyodide.js");
(async () => {
  const py = await loadPyodide({ indexURL: process.argv[2] + "/" });
  py.FS.mkdir("/host");
  py.FS.mount(py.FS.filesystems.NODEFS, { root: "/" }, "/host");
  py.globals.set("KATAMARAN_ARGS", JSON.parse(process.argv[3]));
  try {
    process.exitCode = py.runPython(require("fs").readFileSync(process.argv[4], "utf8"));
  } catch (e) {
    console.error(String(e));
    process.exitCode = 99;
  }
})();
"""

# Runs inside the wasm CPython: stand-ins for what pyodide leaves out, an event loop that
# only has timers (no fds in wasm), then pytest.
_BOOT_PY = """
import asyncio, asyncio.base_events, os, sys, time, types

args = KATAMARAN_ARGS.to_py()
sys.path[:0] = args["path"]


class _Absent(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.isupper():
            return 0

        def unusable(*_a, **_k):
            raise OSError(f"{self.__name__}.{name}: not in pyodide")

        return type(name, (), {"__init__": unusable})


for _name in args["absent"]:
    sys.modules[_name] = _Absent(_name)
sys.modules["resource"].getpagesize = lambda: 4096


class _Timers:
    def select(self, timeout=None):
        if timeout:
            time.sleep(timeout)
        return []


class TimerLoop(asyncio.base_events.BaseEventLoop):
    def __init__(self):
        super().__init__()
        self._selector = _Timers()

    def _process_events(self, event_list):
        pass

    def _write_to_self(self):
        pass


class _Policy(asyncio.events.BaseDefaultEventLoopPolicy):
    _loop_factory = TimerLoop


asyncio.set_event_loop_policy(_Policy())
asyncio.events._set_running_loop(None)  # pyodide marks its own WebLoop as running
os.chdir(args["cwd"])
print("cpython", sys.version.split()[0], flush=True)
import pytest

int(pytest.main(args["pytest"]))
"""

ABSENT = ["ssl", "fcntl", "resource", "sqlite3", "termios", "pwd", "grp", "mmap"]


class Unavailable(Exception):
    """No 3.10 here: the message names the missing prerequisite (a skip reason)."""


def _run(argv: list[str], what: str, timeout: float = 300) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"{what}: {err}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"{what} failed (exit {r.returncode}): {tail[0]}")
    return r.stdout


def prepare(cache: Path | None = None) -> Path:
    """Pyodide and pytest's backports under the cache; the directory, or Unavailable."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` not found (apt-get install nodejs npm)")
    root = cache_root(cache) / f"cpython310-pyodide-{PYODIDE}"
    with _locked(root.with_name(root.name + ".lock")):  # xdist workers share the cache
        package = root / "package"
        if not (package / "pyodide.asm.wasm").is_file():
            root.mkdir(parents=True, exist_ok=True)
            out = _run(
                ["npm", "pack", "--silent", f"pyodide@{PYODIDE}", "--pack-destination", str(root)],
                f"npm pack pyodide@{PYODIDE}",
            )
            tgz = root / out.strip().splitlines()[-1]
            unpack = root / "unpack"  # renamed whole: an interrupted unpack is redone
            shutil.rmtree(unpack, ignore_errors=True)
            with tarfile.open(tgz) as tar:
                tar.extractall(unpack)  # the npm registry's own tarball of files, no links
            shutil.rmtree(package, ignore_errors=True)
            (unpack / "package").rename(package)
            shutil.rmtree(unpack)
            tgz.unlink()
        site = root / "backports"
        done = site / ".installed"
        if not done.is_file() or done.read_text() != " ".join(BACKPORTS):
            shutil.rmtree(site, ignore_errors=True)
            _run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
                + BACKPORTS,
                f"pip install --target {site} {' '.join(BACKPORTS)}",
            )
            done.write_text(" ".join(BACKPORTS))
        for name, text in (("run.js", _RUNNER_JS), ("boot.py", _BOOT_PY)):
            path = root / name
            if not path.is_file() or path.read_text() != text:  # others may be running it
                path.write_text(text)
    return root


def run_pytest(
    root: Path,
    repo: Path,
    pytest_args: list[str],
    first: list[Path] | None = None,
    timeout: float = 600,
):
    """Run pytest on CPython 3.10 (wasm) in ``repo``; the CompletedProcess.

    ``first`` goes ahead on sys.path (default: the checkout), then pytest's backports and
    this interpreter's pure-Python packages (pytest; qemu.qmp and pyroute2 for the core).
    """
    purelib = sysconfig.get_paths()["purelib"]
    path = [HOST + str(p) for p in (first if first is not None else [repo])]
    args = {
        "path": [*path, HOST + str(root / "backports"), HOST + purelib],
        "absent": ABSENT,
        "cwd": HOST + str(repo),
        "pytest": [
            "-p",
            "no:cacheprovider",
            "-p",
            "no:faulthandler",
            "-p",
            "no:xdist",
            "-p",
            "no:timeout",
            "-p",
            "no:katamaran",
            "-s",  # pytest's capture needs fstat on temp files (not in wasm)
            "-c",
            "/dev/null",
            f"--rootdir={HOST}{repo}",
            *pytest_args,
        ],
    }
    runner, boot = root / "run.js", root / "boot.py"
    return subprocess.run(
        ["node", str(runner), str(root / "package"), json.dumps(args), str(boot)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
