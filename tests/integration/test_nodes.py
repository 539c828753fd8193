"""Integration: the two-node lab really boots (TCG), as QemuNodes and as the guide's scripts.

Why: every migration test stands on these nodes, so prove what the guide promises once:
SSH as ``ubuntu`` with the lab key, the zero-drop kernel pieces (``sch_plug``) inside a
node, the private link 10.0.0.1 <-> 10.0.0.2, and no QEMU left behind after stop().
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_katamaran.agent.node import process_state
from pytest_katamaran.backend.qemu import QemuNodes
from pytest_katamaran.qemu.node import TESTENV_LINK_PORT, TESTENV_SSH_PORTS, port_busy

# one lab per module; run-tests.sh runs the lab_nodes modules without xdist, after the
# rest (one boot per module, never two labs at once: 2 cores here)
pytestmark = [pytest.mark.qemu, pytest.mark.lab_nodes]

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Running (a zombie we have not reaped yet counts as gone)."""
    return process_state(pid) not in (None, "Z")


@pytest.fixture(scope="module")
def lab(node_lab_config):
    nodes = QemuNodes(node_lab_config)
    nodes.start()
    yield nodes
    nodes.stop()


def test_both_nodes_boot_and_answer_ssh_as_ubuntu(lab):
    for node, ip in ((lab.node_a, "10.0.0.1"), (lab.node_b, "10.0.0.2")):
        assert node.private_ip == ip
        out = node.ssh.run("id -un; hostname; ip -4 -br addr show enp0s4").stdout.split()
        assert out[:2] == ["ubuntu", node.name], out
        assert f"{ip}/24" in out
        assert node.boot_seconds > 0 and node.serial_log.is_file()
        assert "KATAMARAN-NODE-READY" in node.serial_log.read_text()


def test_nodes_keep_the_tsc_clocksource(lab):
    """Two TCG vCPUs would make the kernel drop the TSC for the HPET (tsc=reliable keeps it)."""
    for node in (lab.node_a, lab.node_b):
        path = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        assert node.ssh.run(f"cat {path}").stdout.strip() == "tsc", node.name


def test_sch_plug_qdisc_inside_a_node(lab):
    r = lab.node_a.ssh.run(
        "sudo modprobe sch_plug && sudo tc qdisc add dev lo root plug limit 32768 "
        "&& tc qdisc show dev lo"
    )
    assert "qdisc plug" in r.stdout


def test_private_link_ping_a_to_b(lab):
    r = lab.node_a.ssh.run("ping -c 3 -i 0.2 -W 5 10.0.0.2", timeout=60)
    assert " 0% packet loss" in r.stdout, r.stdout


def test_node_runs_the_host_python_and_project(lab):
    r = lab.node_b.ssh.run(
        "python3 -c 'import katamaran, sys; print(katamaran.__file__)' "
        "&& touch /var/lib/katamaran/probe && sudo modprobe ipip && echo ok"
    )
    assert r.stdout.split()[0] == str(REPO / "katamaran" / "__init__.py")
    assert r.stdout.split()[-1] == "ok"


# Run as root in node b: a tap held open by this process (as QEMU holds the VM's), then
# katamaran's own fit for a -plug-limit of 60 s of 1 ms pings (196000 minimum-size frames).
TAP_RING_SCRIPT = """
import errno, fcntl, json, os, struct
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from katamaran.network import fit_tap_queue, tap_frames_needed
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"kmrfit0", 0x0002 | 0x1000 | 0x4000))
ipr = IPRoute()
index = ipr.link_lookup(ifname="kmrfit0")[0]
ipr.link("set", index=index, txqlen=1000)
fitted = fit_tap_queue(ipr, "kmrfit0", 11_760_000)
now = ipr.get_links(index)[0].get_attr("IFLA_TXQLEN")
try:
    ipr.link("set", index=index, txqlen=fitted[1] + 1)
    longer = "taken"
except NetlinkError as err:
    longer = errno.errorcode.get(err.code, str(err.code))
os.close(fd)
print(json.dumps({"fitted": fitted, "now": now, "longer": longer,
                  "wanted": tap_frames_needed(11_760_000), "kernel": os.uname().release}))
"""


def test_the_tap_ring_is_raised_to_the_longest_the_node_kernel_takes(lab):
    """-plug-limit sizes the tap's ring for the plug's release; the nodes' 6.1 kernel
    refuses tun rings above 32767 frames (ERANGE), and halving alone stopped at 24500.
    katamaran must end on the kernel's longest: the next frame up is refused."""
    command = shlex.join(["env", f"PYTHONPATH={REPO}", sys.executable, "-c", TAP_RING_SCRIPT])
    facts = json.loads(lab.node_b.ssh.run(command, sudo=True, timeout=60).stdout)
    old, new = facts["fitted"]
    assert old == 1000 and facts["now"] == new, facts
    if new < facts["wanted"]:
        assert facts["longer"] in ("ERANGE", "ENOMEM", "EINVAL"), facts
    else:
        assert new == facts["wanted"], facts
    if facts["kernel"].startswith("6.1."):
        assert new == 32767, facts


def test_stop_leaves_no_qemu(lab):
    """Last in this module: stop() kills both QEMUs by PID (twice is harmless)."""
    pids = lab.pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    workdir = lab.workdir
    lab.stop()
    lab.stop()
    assert not [p for p in pids if _alive(p)]
    assert workdir is not None and not workdir.exists()


# --------------------------------------------------------------------------- the guide


def _wait_for(pred, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.args} exited with {p.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.5)


def test_guide_scripts_boot_nodes_reachable_with_ssh(tmp_path):
    """Sections 1-3 of the guide: setup.sh, start-node-a/b.sh, then the guide's ssh line."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    if shutil.which("ssh") is None:
        pytest.skip("ssh client not installed (apt-get install openssh-client)")
    if any(port_busy(p) for p in TESTENV_SSH_PORTS.values()):
        pytest.skip("ports 2222/2223 are busy")
    if port_busy(TESTENV_LINK_PORT):
        pytest.skip(f"port {TESTENV_LINK_PORT} is busy")
    env = dict(os.environ)
    env.pop("KATAMARAN_TESTENV_DIR", None)  # the real testenv/, as in the guide
    setup = subprocess.run(
        ["./testenv/setup.sh", "--accel", "tcg"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "./testenv/start-node-a.sh" in setup.stdout

    logs = {role: tmp_path / f"start-node-{role}.out" for role in "ab"}
    procs: list[subprocess.Popen] = []
    state = REPO / "testenv" / ".state"
    qemu_pids: list[int] = []
    try:
        for role in "ab":
            with logs[role].open("w") as out:
                procs.append(
                    subprocess.Popen(
                        [f"./testenv/start-node-{role}.sh"],
                        cwd=REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for role in "ab":
            _wait_for(
                lambda r=role: f"node-{r} ready in" in logs[r].read_text(),
                240,
                f"start-node-{role}.sh",
                procs,
            )
        qemu_pids = [int((state / f"node-{r}.pid").read_text()) for r in "ab"]
        for port in (2222, 2223):
            # the guide's command (+ a throwaway known_hosts: host keys change per boot)
            ssh = [
                "ssh",
                "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                "-o", "BatchMode=yes",
                "-i", "testenv/kata_test_rsa",
                "-p", str(port),
                "ubuntu@localhost",
                "true",
            ]  # fmt: skip
            r = subprocess.run(
                ssh,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, f"ssh -p {port}: {r.stderr}"
    finally:
        for p in procs:  # SIGTERM: the script's python kills its QEMU by PID
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in qemu_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in qemu_pids if _alive(pid)], "a start script left QEMU running"
