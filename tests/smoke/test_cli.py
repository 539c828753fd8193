"""Smoke tests for the ``katamaran`` command line (TESTING.md, "Running Smoke Tests").

Every case runs the CLI as a real subprocess and never gets further than the
QMP connect, so no QEMU, no root and no network are needed:

- invalid invocations are rejected with exit 2 and a specific message,
- valid invocations pass validation and fail at the QMP connect (exit 1),
  naming the socket path,
- ``-help`` describes every flag, ``--version`` prints the version,
- never a Python traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import katamaran

NO_SOCK = "/nonexistent/qmp.sock"
DEFAULT_QMP = "/run/vc/vm/qmp.sock"
DEFAULT_DRIVE_ID = "drive-virtio-disk0"
USAGE_EXIT = 2
RUNTIME_EXIT = 1

SEVEN_FLAGS = ["mode", "qmp", "tap", "dest-ip", "vm-ip", "drive-id", "shared-storage"]
TIMEOUT_FLAGS = ["migration-timeout", "storage-sync-timeout", "qmp-timeout", "tunnel-hold"]

SOURCE_REQUIRED = "-dest-ip and -vm-ip are required for source mode"
QMP_FAILED = "Failed to connect to QMP"


def _show(r: subprocess.CompletedProcess[str]) -> str:
    return f"\nargs: {r.args}\nexit: {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def assert_clean(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, _show(r)
    assert "Traceback" not in r.stdout, _show(r)


def assert_usage_error(r: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Rejected at argument validation: exit 2, each fragment in stderr."""
    assert_clean(r)
    assert r.returncode == USAGE_EXIT, _show(r)
    for fragment in fragments:
        assert fragment in r.stderr, f"{fragment!r} not in stderr" + _show(r)


def assert_reached_qmp(r: subprocess.CompletedProcess[str], sock: str) -> None:
    """Validation passed; the run failed at the QMP connect and names the socket."""
    assert_clean(r)
    assert r.returncode == RUNTIME_EXIT, _show(r)
    assert QMP_FAILED in r.stderr, _show(r)
    assert sock in r.stderr, f"socket path {sock!r} not in stderr" + _show(r)


def assert_one_line_qmp_error(r: subprocess.CompletedProcess[str], sock: str) -> None:
    """Like assert_reached_qmp, and the error is one line naming the path."""
    assert_reached_qmp(r, sock)
    lines = [ln for ln in r.stderr.splitlines() if QMP_FAILED in ln]
    assert len(lines) == 1, _show(r)
    assert sock in lines[0], _show(r)


# --- missing / invalid mode ---------------------------------------------------------------


def test_no_arguments_prints_usage(run_cli):
    assert_usage_error(run_cli(), "Usage")


@pytest.mark.parametrize(
    "args",
    [
        ["-qmp", NO_SOCK],
        ["-tap", "tap0_kata"],
        ["--dest-ip", "10.0.0.2", "--vm-ip", "10.244.0.5"],
        ["-shared-storage"],
        ["-mode="],
        ["-mode", ""],
    ],
    ids=["qmp-only", "tap-only", "ips-only", "shared-storage-only", "mode-eq-empty", "mode-empty"],
)
def test_no_mode_prints_usage(run_cli, args):
    assert_usage_error(run_cli(*args), "Usage")


@pytest.mark.parametrize(
    "args, bad",
    [
        (["-mode", "x"], "x"),
        (["--mode", "x"], "x"),
        (["-mode=x"], "x"),
        (["--mode=migrate"], "migrate"),
        (["-mode", "x", "-qmp", NO_SOCK], "x"),
    ],
    ids=["single-dash", "double-dash", "single-eq", "double-eq", "with-qmp"],
)
def test_invalid_mode_has_specific_message(run_cli, args, bad):
    assert_usage_error(run_cli(*args), f"invalid mode \"{bad}\" (must be 'source' or 'dest')")


# --- source-mode required flags and IP validation -----------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["-dest-ip", "10.0.0.2"],
        ["-vm-ip", "10.244.0.5"],
        ["--dest-ip=10.0.0.2"],
        ["-shared-storage"],
        ["-shared-storage", "-dest-ip", "10.0.0.2"],
        ["-shared-storage", "-vm-ip", "10.244.0.5"],
    ],
    ids=[
        "neither",
        "no-vm-ip",
        "no-dest-ip",
        "double-dash-no-vm-ip",
        "shared-storage-neither",
        "shared-storage-no-vm-ip",
        "shared-storage-no-dest-ip",
    ],
)
def test_source_requires_dest_ip_and_vm_ip(run_cli, extra):
    assert_usage_error(run_cli("-mode", "source", "-qmp", NO_SOCK, *extra), SOURCE_REQUIRED)


@pytest.mark.parametrize(
    "flag, bad",
    [
        ("dest-ip", "999.1.1.1"),
        ("vm-ip", "nope"),
        ("dest-ip", "10.0.0"),
        ("dest-ip", "1.2.3.4.5"),
        ("vm-ip", "example.com"),
        ("vm-ip", "10.244.0.5/24"),
        ("dest-ip", "fd00::zz"),
        ("vm-ip", "fd00:::5"),
    ],
)
def test_invalid_ip_rejected(run_cli, flag, bad):
    ips = {"dest-ip": "10.0.0.2", "vm-ip": "10.244.0.5", flag: bad}
    r = run_cli(
        "-mode", "source", "-qmp", NO_SOCK, "-dest-ip", ips["dest-ip"], "-vm-ip", ips["vm-ip"]
    )
    assert_usage_error(r, f'invalid -{flag} "{bad}"')


@pytest.mark.parametrize("flag", ["dest-ip", "vm-ip"])
def test_invalid_ip_rejected_double_dash(run_cli, flag):
    ips = {"dest-ip": "10.0.0.2", "vm-ip": "10.244.0.5", flag: "999.1.1.1"}
    r = run_cli(
        "--mode=source",
        f"--qmp={NO_SOCK}",
        f"--dest-ip={ips['dest-ip']}",
        f"--vm-ip={ips['vm-ip']}",
    )
    assert_usage_error(r, f'invalid -{flag} "999.1.1.1"')


@pytest.mark.parametrize(
    "dest_ip, vm_ip",
    [
        ("10.0.0.2", "10.244.0.5"),
        ("fd00::2", "fd00:244::5"),
        ("::1", "10.244.0.5"),
        ("10.0.0.2", "::1"),
        ("fd00::2", "10.244.0.5"),
    ],
)
def test_valid_ips_reach_qmp_stage(run_cli, dest_ip, vm_ip):
    sock = "/nonexistent/x.sock"
    r = run_cli("-mode", "source", "-qmp", sock, "-dest-ip", dest_ip, "-vm-ip", vm_ip)
    assert_reached_qmp(r, sock)


# --- valid invocations reach the QMP connect ----------------------------------------------


def test_dest_qmp_error_names_socket(run_cli):
    assert_reached_qmp(run_cli("-mode", "dest", "-qmp", NO_SOCK, "-tap", "tap0_kata"), NO_SOCK)


def test_source_qmp_error_names_socket(run_cli):
    sock = "/nonexistent/x.sock"
    r = run_cli("-mode", "source", "-qmp", sock, "-dest-ip", "10.0.0.2", "-vm-ip", "10.244.0.5")
    assert_reached_qmp(r, sock)


@pytest.mark.parametrize(
    "args",
    [
        ["--mode", "dest", "--qmp", NO_SOCK, "--tap", "tap0_kata"],
        ["-mode=dest", f"-qmp={NO_SOCK}", "-tap=tap0_kata"],
        ["--mode=dest", f"--qmp={NO_SOCK}", "--tap=tap0_kata"],
        ["-tap", "tap0_kata", "--qmp", NO_SOCK, "-mode=dest"],
        ["-mode", "dest", "-qmp", NO_SOCK],
        [
            "--mode=source",
            f"--qmp={NO_SOCK}",
            "--dest-ip=10.0.0.2",
            "--vm-ip=10.244.0.5",
            "--drive-id=drive-virtio-disk1",
        ],
        [
            "-mode",
            "source",
            "-qmp",
            NO_SOCK,
            "-dest-ip",
            "10.0.0.2",
            "-vm-ip",
            "10.244.0.5",
            "-drive-id",
            "drive-virtio-disk1",
        ],
        ["-mode=source", f"--qmp={NO_SOCK}", "-dest-ip=fd00::2", "--vm-ip", "fd00:244::5"],
    ],
    ids=[
        "dest-double-dash",
        "dest-single-eq",
        "dest-double-eq",
        "dest-mixed-order",
        "dest-no-tap",
        "source-double-eq-drive-id",
        "source-single-drive-id",
        "source-mixed-ipv6",
    ],
)
def test_flag_syntax_forms_reach_qmp_stage(run_cli, args):
    assert_reached_qmp(run_cli(*args), NO_SOCK)


def test_default_qmp_socket_path(run_cli):
    if os.path.exists(DEFAULT_QMP):
        pytest.skip(f"{DEFAULT_QMP} exists on this machine; would talk to a real VM")
    assert_reached_qmp(run_cli("-mode", "dest", "-tap", "tap0_kata"), DEFAULT_QMP)


# --- -shared-storage combinations ---------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-mode", "dest", "-qmp", NO_SOCK, "-tap", "tap0_kata", "-shared-storage"],
        ["-shared-storage", "-mode", "dest", "-qmp", NO_SOCK, "-tap", "tap0_kata"],
        ["--shared-storage", "--mode=dest", f"--qmp={NO_SOCK}"],
        [
            "-mode",
            "source",
            "-shared-storage",
            "-qmp",
            NO_SOCK,
            "-dest-ip",
            "10.0.0.2",
            "-vm-ip",
            "10.244.0.5",
        ],
        ["--mode", "source", "--shared-storage", "--qmp", NO_SOCK]
        + ["--dest-ip", "fd00::2", "--vm-ip", "fd00:244::5"],
    ],
    ids=["dest-last", "dest-first", "dest-double-dash", "source", "source-ipv6"],
)
def test_shared_storage_reaches_qmp_stage(run_cli, args):
    assert_reached_qmp(run_cli(*args), NO_SOCK)


# --- stray arguments, unknown flags, missing values ---------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-mode", "dest", "extra"],
        ["-mode", "dest", "-qmp", NO_SOCK, "-tap", "tap0_kata", "extra"],
        ["-mode", "source", "-dest-ip", "10.0.0.2", "-vm-ip", "10.244.0.5", "extra"],
    ],
    ids=["dest-bare", "dest-otherwise-valid", "source-otherwise-valid"],
)
def test_stray_positional_rejected(run_cli, args):
    r = run_cli(*args)
    assert_clean(r)
    assert r.returncode == USAGE_EXIT, _show(r)
    assert "extra" in r.stderr, _show(r)
    assert QMP_FAILED not in r.stderr, _show(r)


def test_unknown_flag_rejected(run_cli):
    r = run_cli("-mode", "dest", "-qmp", NO_SOCK, "-bogus-flag")
    assert_usage_error(r, "bogus-flag")


@pytest.mark.parametrize("flag", ["-mode", "-qmp", "--dest-ip"])
def test_flag_without_value_rejected(run_cli, flag):
    r = run_cli("-tap", "tap0_kata", flag)
    assert_usage_error(r, flag.lstrip("-"))


# --- help and version ---------------------------------------------------------------------


def _flag_has_description(text: str, name: str) -> bool:
    """True if an option line for ``-name``/``--name`` carries or is followed by a description.

    Accepts argparse layout (``  -mode MODE, --mode MODE   text`` or text on the
    next, more-indented line) and Go ``flag`` layout (``  -mode string`` then an
    indented text line). Usage-synopsis lines (``usage: ... [-mode MODE]``) don't count.
    """
    flag_re = re.compile(rf"(?<![\w-])--?{re.escape(name)}(?![\w-])")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("-"):
            continue
        parts = re.split(r"\s{2,}|\t", stripped, maxsplit=1)
        invocation = parts[0]
        rest = parts[1] if len(parts) > 1 else ""
        if not flag_re.search(invocation):
            continue
        if re.search(r"[A-Za-z]{3,}", rest):
            return True
        if i + 1 < len(lines):
            nxt = lines[i + 1].strip()
            if nxt and not nxt.startswith("-") and re.search(r"[A-Za-z]{3,}", nxt):
                return True
    return False


HELP_FORMS = ["-help", "--help"]


def _help_output(run_cli, form: str) -> str:
    r = run_cli(form)
    assert_clean(r)
    assert r.returncode == 0, _show(r)
    out = r.stdout + r.stderr
    assert out.strip(), _show(r)
    return out


@pytest.mark.parametrize("name", SEVEN_FLAGS)
@pytest.mark.parametrize("form", HELP_FORMS)
def test_help_describes_flag(run_cli, form, name):
    out = _help_output(run_cli, form)
    assert _flag_has_description(out, name), f"no described -{name} in {form} output:\n{out}"


@pytest.mark.parametrize("name", TIMEOUT_FLAGS)
def test_help_describes_timeout_flag(run_cli, name):
    out = _help_output(run_cli, "-help")
    assert _flag_has_description(out, name), f"no described -{name} in -help output:\n{out}"


def test_help_shows_defaults(run_cli):
    # argparse wraps long help text at hyphens ("drive-virtio-" / "disk0"): undo that.
    out = re.sub(r"-\n\s+", "-", _help_output(run_cli, "--help"))
    assert DEFAULT_QMP in out, out
    assert DEFAULT_DRIVE_ID in out, out


def test_version(run_cli):
    r = run_cli("--version")
    assert_clean(r)
    assert r.returncode == 0, _show(r)
    assert katamaran.__version__ in r.stdout + r.stderr, _show(r)


def _console_script() -> str | None:
    scripts = sysconfig.get_path("scripts")
    return shutil.which("katamaran", path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))


def test_console_script_installed():
    exe = _console_script()
    assert exe, "no 'katamaran' console script on PATH; run `pip install -e .`"
    r = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert_clean(r)
    assert r.returncode == 0, _show(r)
    assert katamaran.__version__ in r.stdout + r.stderr, _show(r)


def test_console_script_no_args_prints_usage():
    exe = _console_script()
    if not exe:
        pytest.skip("no 'katamaran' console script (see test_console_script_installed)")
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert_usage_error(r, "Usage")


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
def test_usage_error_with_its_reader_gone_still_exits_2(repo_root, tmp_path, buffered):
    """`katamaran -mode bogus 2>&1 | true`: the write of the error fails (EPIPE) and must
    not turn exit 2 into a BrokenPipeError (exit 1).  The pipe's read end is closed
    before the child starts, so every write fails, deterministically."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "PYTHONSTARTUP")}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(repo_root)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "katamaran", "-mode", "bogus"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=write_end,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert r.returncode == USAGE_EXIT


# --- QMP socket path that is not a usable socket ------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temporary directory (AF_UNIX paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="kmsmoke") as d:
        yield Path(d)


@pytest.fixture(params=["regular-file", "directory", "stale-socket"])
def bad_sock(request, short_dir) -> Iterator[str]:
    path = short_dir / "qmp.sock"
    if request.param == "regular-file":
        path.write_text("not a socket\n")
        yield str(path)
    elif request.param == "directory":
        path.mkdir()
        yield str(path)
    else:
        # Bound but never listening: what a dead QEMU leaves behind -> ECONNREFUSED.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(path))
            yield str(path)
        finally:
            s.close()


def test_dest_bad_qmp_socket_one_line_error(run_cli, bad_sock):
    r = run_cli("-mode", "dest", "-qmp", bad_sock, "-tap", "tap0_kata")
    assert_one_line_qmp_error(r, bad_sock)


def test_source_bad_qmp_socket_one_line_error(run_cli, bad_sock):
    r = run_cli("-mode", "source", "-qmp", bad_sock, "-dest-ip", "10.0.0.2", "-vm-ip", "10.0.0.5")
    assert_one_line_qmp_error(r, bad_sock)


def test_silent_qmp_server_honours_qmp_timeout(run_cli, short_dir):
    """A socket that accepts but never sends the QMP greeting must not hang the CLI."""
    path = str(short_dir / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        srv.listen(4)  # the kernel completes connects; nobody ever speaks QMP
        start = time.monotonic()
        r = run_cli("-mode", "dest", "-qmp", path, "-tap", "tap0_kata", "-qmp-timeout", "2")
        elapsed = time.monotonic() - start
    finally:
        srv.close()
    assert_clean(r)
    assert r.returncode == RUNTIME_EXIT, _show(r)
    assert path in r.stderr, _show(r)
    assert elapsed < 30, f"took {elapsed:.1f}s with -qmp-timeout 2" + _show(r)


# --- timeout flags ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "abc", "-0.5"])
@pytest.mark.parametrize("name", TIMEOUT_FLAGS)
def test_timeout_flag_rejects_bad_value(run_cli, name, value):
    r = run_cli("-mode", "dest", "-qmp", NO_SOCK, "-tap", "tap0_kata", f"-{name}", value)
    assert_usage_error(r, name)
    assert QMP_FAILED not in r.stderr, _show(r)


@pytest.mark.parametrize("name", TIMEOUT_FLAGS)
def test_timeout_flag_rejects_bad_value_eq_form(run_cli, name):
    r = run_cli("--mode=dest", f"--qmp={NO_SOCK}", f"--{name}=-3")
    assert_usage_error(r, name)


def test_timeout_flags_valid_values_reach_qmp_stage(run_cli):
    r = run_cli(
        "-mode",
        "source",
        "-qmp",
        NO_SOCK,
        "-dest-ip",
        "10.0.0.2",
        "-vm-ip",
        "10.244.0.5",
        "-migration-timeout",
        "600",
        "-storage-sync-timeout",
        "300",
        "-qmp-timeout",
        "10",
        "--tunnel-hold=0",
    )
    assert_reached_qmp(r, NO_SOCK)


# --- -stream-buffer -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "²", "", str((1 << 30) + 1)])
def test_stream_buffer_rejects_bad_value(run_cli, value):
    r = run_cli("-mode", "dest", "-qmp", NO_SOCK, "-tap", "tap0_kata", "-stream-buffer", value)
    assert_usage_error(r, f'invalid -stream-buffer "{value}"')
    assert QMP_FAILED not in r.stderr, _show(r)


@pytest.mark.parametrize("value", ["auto", "0", "65536", str(1 << 30)])
def test_stream_buffer_valid_values_reach_qmp_stage(run_cli, value):
    r = run_cli(
        *("-mode", "source", "-qmp", NO_SOCK, "-dest-ip", "10.0.0.2", "-vm-ip", "10.244.0.5"),
        *("-stream-buffer", value),
    )
    assert_reached_qmp(r, NO_SOCK)


def test_help_describes_stream_buffer_and_its_default(run_cli):
    out = _help_output(run_cli, "-help")
    assert _flag_has_description(out, "stream-buffer"), out
    assert "default auto: sized from the connection's RTT" in re.sub(r"\s+", " ", out), out
