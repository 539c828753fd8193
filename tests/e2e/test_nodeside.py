"""nodeside on this host: every step of the e2e flow, in two netns "nodes", without node VMs.

Why: the e2e test can only show a nodeside bug after minutes of nested boots.  Here the
same commands (as separate processes, state in a JSON file) run in network namespaces:
workload start (pod net without Kata's tcfilter, which this kernel lacks), destination
with the same spec, real katamaran via the timestamping wrapper (it warns and skips the
cutover here: no ipip/sch_plug), convergence, leftovers, disk check, idempotent stop.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_katamaran.agent.client import parse_summary, stamped
from pytest_katamaran.net.hostlab import HostLab, netns_exists

pytestmark = pytest.mark.qemu

POD_IP = "10.244.1.5"


def nodeside(state: Path, netns: str, *args: str, check: bool = True) -> dict:
    cmd = [sys.executable, "-m", "pytest_katamaran.agent.node", "--state-dir", str(state)]
    done = subprocess.run(
        [*cmd, "--netns", netns, *args], capture_output=True, text=True, timeout=300
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    if check:
        assert data["ok"], f"nodeside {args[0]}: {data}\n{done.stderr}"
    return data


@pytest.fixture
def lab(guest_image, tmp_path):
    lab = HostLab(prefix="kns").up()
    states = {"a": tmp_path / "state-a", "b": tmp_path / "state-b"}
    yield lab, states
    for role in ("a", "b"):
        nodeside(states[role], lab.node(role).netns, "stop", "--purge", check=False)
    lab.teardown()


def test_nodeside_steps_migrate_a_writing_workload(
    lab, guest_image, workload_qemu, accelerator, tmp_path
):
    lab, states = lab
    guest = guest_image
    na, nb = lab.a.netns, lab.b.netns
    pod = f"kns-pod-{secrets.token_hex(3)}"
    work = nodeside(
        states["a"], na, "workload-start",
        "--pod-name", pod, "--pod-ip", POD_IP, "--no-tcfilter",
        "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--disk", str(tmp_path / "src.qcow2"), "--disk-size", "64M", "--prefill",
        "--writer", "--rate", "200", "--run-dir", str(tmp_path / "run-a"),
        # the pods' QEMU, as the e2e runs them: the system's 7.2 loses TCG guest stores
        # during migration (pytest_katamaran.qemu.binary), 1 run in ~20 here crashed
        # the destination guest's kernel
        *workload_qemu.nodeside_args(),
        # this host's own accelerator, as probed for the session (not the agent's
        # auto: a host whose /dev/kvm opens yet never runs a vCPU costs its full timeout)
        "--accel", accelerator.name,
    )  # fmt: skip
    assert work["accel"]["name"] == work["spec"]["accel"] == accelerator.name, work["accel"]
    assert work["boot_time_s"] > 0 and work["mac"] == work["spec"]["mac"]
    neigh = subprocess.run(
        ["ip", "-n", na, "neigh", "show", POD_IP], capture_output=True, text=True
    ).stdout
    assert "PERMANENT" in neigh and work["mac"] in neigh, neigh
    nodeside(states["b"], nb, "peer-route", "--dst", "10.244.1.0/24", "--via", lab.a.ipv4)
    dest = nodeside(
        states["b"], nb, "dest-start", "--spec", json.dumps(work["spec"]), "--pod-ip", POD_IP,
        "--disk", str(tmp_path / "dst.qcow2"), "--disk-size", "64M",
        "--run-dir", str(tmp_path / "run-b"),
    )  # fmt: skip
    assert dest["status"] == "inmigrate"
    assert dest["argv"][-2:] == ["-incoming", "defer"]
    assert dest["argv"][0] == workload_qemu.binary  # the spec carries the pods' QEMU
    assert nodeside(states["a"], na, "status")["source"]["qmp_status"] == "running"

    wrapper = [sys.executable, "-m", "pytest_katamaran.agent.node"]
    dest_log = tmp_path / "dest.log"
    with dest_log.open("w") as log:
        dst = subprocess.Popen(
            [*wrapper, "--state-dir", str(states["b"]), "--netns", nb, "katamaran", "--"]
            + ["-mode", "dest", "-qmp", dest["qmp"], "-tap", "tap0_kata", "-tunnel-hold", "0.5"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    deadline = time.monotonic() + 60
    while "destination ready" not in dest_log.read_text() and time.monotonic() < deadline:
        assert dst.poll() is None, dest_log.read_text()
        time.sleep(0.1)
    src = subprocess.run(
        [*wrapper, "--state-dir", str(states["a"]), "--netns", na, "katamaran", "--"]
        + ["-mode", "source", "-qmp", work["qmp"], "-dest-ip", lab.b.ipv4, "-vm-ip", POD_IP]
        + ["-tunnel-hold", "0.2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    dst.communicate(timeout=120)
    dst_err = dest_log.read_text()
    assert src.returncode == 0 and dst.returncode == 0, src.stderr + dst_err
    assert stamped(dst_err)[-1][1] == "nodeside: katamaran exited 0"
    assert json.loads(src.stdout)["rc"] == 0
    lines = stamped(src.stderr)
    assert lines and all(ts > 0 for ts, _ in lines)
    summary = parse_summary(src.stderr)
    assert summary is not None and summary["storage_mib"] > 0, src.stderr

    conv = nodeside(states["b"], nb, "converge", "--role", "dest", "--pod-ip", POD_IP)
    assert conv["neighbour"] == work["mac"], conv
    nodeside(
        states["a"], na, "converge", "--role", "source", "--pod-ip", POD_IP, "--via", "10.0.0.2"
    )
    pong = subprocess.run(
        ["ip", "netns", "exec", na, "ping", "-c", "3", "-i", "0.2", "-W", "5", "-I", "10.0.0.1"]
        + [POD_IP],
        capture_output=True,
        text=True,
    )
    if pong.returncode != 0:  # the pod answers node A, via node B
        neigh = subprocess.run(["ip", "-n", nb, "neigh"], capture_output=True, text=True)
        status = nodeside(states["b"], nb, "status", check=False)
        console = nodeside(states["b"], nb, "console", "--which", "dest", check=False)
        pytest.fail(
            f"{pong.stdout}\nnode B neighbours:\n{neigh.stdout}\nnode B status: {status}\n"
            f"destination console:\n{console.get('tail')}\nsource katamaran:\n{src.stderr}"
        )
    for state, ns in ((states["a"], na), (states["b"], nb)):
        left = nodeside(state, ns, "leftovers")
        for key in ("plug_qdiscs", "kmr_links", "rules", "nbd_exports", "listeners"):
            assert not left[key], (key, left)
    assert nodeside(states["a"], na, "status")["source"]["qmp_status"] == "postmigrate"

    time.sleep(1.0)  # the writer goes on at the destination
    stopped = nodeside(states["b"], nb, "vm-stop", "--which", "dest")
    assert stopped["last_ack"] > 0
    check = nodeside(states["b"], nb, "diskcheck", "--which", "dest")
    assert check["ok"] and check["acked"] == stopped["last_ack"], check

    first = nodeside(states["a"], na, "stop", "--purge")
    assert "podnet" in first["done"]
    assert not netns_exists(pod)
    again = nodeside(states["a"], na, "stop", "--purge")
    assert again["done"] == {}
    nodeside(states["b"], nb, "stop", "--purge")
    routes = subprocess.run(["ip", "-n", nb, "route"], capture_output=True, text=True).stdout
    assert "10.244" not in routes and not (tmp_path / "run-b" / "kmre2e").exists()


def test_nodeside_reports_failures_as_json(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pytest_katamaran.agent.node", "--state-dir", str(tmp_path)]
        + ["vm-stop", "--which", "dest"],
        capture_output=True,
        text=True,
    )
    data = json.loads(done.stdout)
    assert done.returncode == 1 and data["ok"] is False and "no dest VM" in data["error"]
