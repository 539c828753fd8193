"""Boot the real test guest under QEMU TCG: READY on the console, acked writes on disk, ping."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_katamaran.checks.disk import last_ack, verify_writes
from pytest_katamaran.images.guest import READY_MARKER, GuestImage, build_guest, kernel_cmdline
from pytest_katamaran.net.hostlab import scratch_netns

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 90.0  # generous: CI machines are shared and TCG is slow under load

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        QEMU is None,
        reason="qemu-system-x86_64 not found on PATH (apt-get install qemu-system-x86)",
    ),
]

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    t0 = time.monotonic()
    image = build_guest(progress=print)
    print(f"guest image ready in {time.monotonic() - t0:.2f}s: {image}")
    return image


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start processes that are SIGKILLed by their own PID on every exit path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], name: str = "qemu") -> subprocess.Popen[bytes]:
        out = (tmp_path / f"{name}.out").open("wb")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        out.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def qemu_cmd(guest: GuestImage, serial: Path, disk: Path, netdev: str, cmdline: str) -> list[str]:
    assert QEMU is not None
    return [
        QEMU,
        "-M", "pc", "-accel", "tcg", "-m", "128", "-smp", "1",
        "-display", "none", "-nodefaults", "-no-reboot",
        "-serial", f"file:{serial}",
        *guest.qemu_args(cmdline),
        "-drive", f"if=none,id=drive-virtio-disk0,file={disk},format=qcow2",
        "-device", "virtio-blk-pci,drive=drive-virtio-disk0",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip


def make_disk(path: Path, size: str = "32M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path.name} missing>"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_ready(proc: subprocess.Popen[bytes], serial: Path, qemu_out: Path) -> float:
    """Seconds from now until the guest prints READY; fails with the console tail."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < BOOT_TIMEOUT:
        if serial.exists() and READY_MARKER.encode() in serial.read_bytes():
            return time.monotonic() - t0
        if proc.poll() is not None:
            pytest.fail(
                f"QEMU exited with {proc.returncode} before {READY_MARKER}\n"
                f"--- qemu output:\n{tail(qemu_out)}\n--- serial log tail:\n{tail(serial)}"
            )
        time.sleep(0.05)
    pytest.fail(f"no {READY_MARKER} within {BOOT_TIMEOUT}s\n--- serial log tail:\n{tail(serial)}")


def guest_uptime_at_ready(serial: Path) -> str:
    m = re.search(rb"ready at ([0-9.]+)s", serial.read_bytes())
    return m.group(1).decode() if m else "?"


def test_guest_boots_and_acked_writes_are_on_disk(guest, spawn, tmp_path):
    serial, disk = tmp_path / "serial.log", make_disk(tmp_path / "disk.qcow2")
    cmdline = kernel_cmdline(ip="10.0.2.15/24", gw="10.0.2.2", writer="/dev/vda")
    cmd = qemu_cmd(guest, serial, disk, "user,id=n0", cmdline)
    proc = spawn(cmd)
    boot = wait_for_ready(proc, serial, tmp_path / "qemu.out")
    print(f"boot to READY: {boot:.2f}s wall, {guest_uptime_at_ready(serial)}s guest uptime")

    ack_at_ready = last_ack(serial)
    time.sleep(2.0)
    # Kill, not quit: an acknowledged write must already be durable without QEMU's help.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    log = serial.read_bytes().decode(errors="replace")
    assert "katamaran: eth0 10.0.2.15/24 gw 10.0.2.2" in log, tail(serial)
    # No TX NAPI: a reply in the TX ring no longer holds the ICMP socket's send buffer
    # (see the init script and tests/bench/test_guest_burst.py).
    assert "katamaran: virtio_net napi_tx=N" in log, tail(serial)
    init_errors = [
        line
        for line in log.splitlines()
        if line.startswith("katamaran:") and ("failed" in line or "did not appear" in line)
    ]
    assert not init_errors, tail(serial)
    acked = last_ack(serial)
    assert acked > 0, f"the disk writer acknowledged nothing\n{tail(serial)}"
    print(f"disk writer: {acked - ack_at_ready} writes acked in 2.0s after READY "
          f"(~{(acked - ack_at_ready) / 2.0:.0f}/s), {acked} in total")  # fmt: skip
    report = verify_writes(disk, acked)
    print(report)
    assert report.ok, f"{report}\n{tail(serial)}"
    assert report.highest >= acked


def _can_make_netns() -> str | None:
    """Why a tap-in-netns test cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace and tap device"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing"
    if shutil.which("ip") is None or shutil.which("ping") is None:
        return "needs ip (iproute2) and ping (iputils-ping)"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace holding tap0 = 10.244.1.1/24, deleted afterwards."""
    reason = _can_make_netns()
    if reason:
        pytest.skip(reason)
    with scratch_netns("kmr-guest") as name:
        for cmd in (
            ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
            ["ip", "addr", "add", "10.244.1.1/24", "dev", "tap0"],
            ["ip", "link", "set", "tap0", "up"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name


def test_guest_answers_ping(guest, spawn, netns, tmp_path):
    serial, disk = tmp_path / "serial.log", make_disk(tmp_path / "disk.qcow2", "16M")
    cmdline = kernel_cmdline(ip="10.244.1.5/24", gw="10.244.1.1")
    netdev = "tap,id=n0,ifname=tap0,script=no,downscript=no"
    # `ip netns exec` execs QEMU in place, so the PID we kill is QEMU's own.
    proc = spawn(["ip", "netns", "exec", netns, *qemu_cmd(guest, serial, disk, netdev, cmdline)])
    wait_for_ready(proc, serial, tmp_path / "qemu.out")
    ping = subprocess.run(
        ["ip", "netns", "exec", netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.244.1.5"],
        capture_output=True,
        text=True,
    )
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n--- serial:\n{tail(serial)}"
    assert " 0% packet loss" in ping.stdout, ping.stdout
