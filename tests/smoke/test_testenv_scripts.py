"""Smoke: the testenv scripts and the node_vm/seed/nodeimage code behind them, without QEMU.

Why: the guide's entry points must parse, fail early with the guide's message when
setup.sh has not run, and build the node command line the integration tests boot.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_katamaran.images import node as nodeimage
from pytest_katamaran.images import seed
from pytest_katamaran.images.node import DebianImage, NodeImageError, UbuntuImage
from pytest_katamaran.qemu import node as node_vm
from pytest_katamaran.qemu.node import NodeSpec, Testenv, node_argv

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "testenv").glob("*.sh"))
HINT = "not found. Run ./testenv/setup.sh first."


def _run(argv: list[str], env_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KATAMARAN_TESTENV_DIR=str(env_dir))
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("role", ["a", "b"])
def test_start_script_fails_early_without_setup(tmp_path, role):
    state = tmp_path / "empty"
    state.mkdir()
    r = _run(["bash", str(REPO / "testenv" / f"start-node-{role}.sh")], state, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip() == f"empty/.state/nodes.json {HINT}"
    assert not (state / ".state").exists(), "a failing start must not create state"


def _fake_setup(root: Path) -> Testenv:
    """A manifest whose files do not exist (nothing here may reach QEMU)."""
    env = Testenv(root)
    env.state.mkdir(parents=True)
    image = DebianImage(
        kernel=root / "vmlinux",
        initrd=root / "initrd.gz",
        kernel_version="6.1.0-0-amd64",
        modules_dir=root / "modules",
        scratch_base=root / "scratch.raw",
    )
    env.manifest.write_text(json.dumps({"image": image.to_dict(), "accel": "tcg"}))
    return env


@pytest.mark.parametrize("role", ["a", "b"])
def test_start_script_names_each_missing_file(tmp_path, role):
    env = _fake_setup(tmp_path / "te")
    script = str(REPO / "testenv" / f"start-node-{role}.sh")
    expected = [env.disk(role), env.seed(role), env.key, tmp_path / "te" / "vmlinux"]
    for path in expected:
        r = _run(["bash", script], env.root, tmp_path)
        assert r.returncode == 1
        assert r.stderr.strip() == f"{path.relative_to(tmp_path)} {HINT}"
        path.write_text("x")  # next run names the next missing file


def _spec(tmp_path: Path, role: str, image: DebianImage | UbuntuImage | None = None) -> NodeSpec:
    image = image or DebianImage(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.gz",
        kernel_version="6.1.0-0-amd64",
        modules_dir=tmp_path / "lib/modules/6.1.0-0-amd64",
        scratch_base=tmp_path / "scratch.raw",
    )
    return NodeSpec(
        role=role,
        image=image,
        disk=tmp_path / f"node-{role}.qcow2",
        seed=tmp_path / f"node-{role}-seed.iso",
        serial_log=tmp_path / f"node-{role}.log",
        ssh_port=2222 if role == "a" else 2223,
        link_port=1234,
    )


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_node_argv_debian_layout(tmp_path):
    a = node_argv(_spec(tmp_path, "a"))
    b = node_argv(_spec(tmp_path, "b"))
    assert a[0] == "qemu-system-x86_64"
    assert _opt(a, "-M") == ["pc"] and _opt(a, "-accel") == ["tcg"] and _opt(a, "-cpu") == ["max"]
    assert _opt(a, "-display") == ["none"] and _opt(a, "-smp") == ["2"]
    assert _opt(a, "-m") == ["1536"]
    assert "user,id=nat,hostfwd=tcp:127.0.0.1:2222-:22" in _opt(a, "-netdev")
    assert "user,id=nat,hostfwd=tcp:127.0.0.1:2223-:22" in _opt(b, "-netdev")
    assert "socket,id=priv,listen=127.0.0.1:1234" in _opt(a, "-netdev")
    assert "socket,id=priv,connect=127.0.0.1:1234" in _opt(b, "-netdev")
    devs_a, devs_b = _opt(a, "-device"), _opt(b, "-device")
    # fixed MACs at fixed PCI slots (enp0s3 / enp0s4 inside the node)
    assert any("netdev=nat,mac=52:54:00:12:34:0a,addr=0x3" in d for d in devs_a)
    assert any("netdev=priv,mac=52:54:00:12:35:0a,addr=0x4" in d for d in devs_a)
    assert any("netdev=priv,mac=52:54:00:12:35:0b,addr=0x4" in d for d in devs_b)
    assert f"file,id=serial0,path={tmp_path / 'node-a.log'}" in _opt(a, "-chardev")
    fsdev = _opt(a, "-fsdev")[0]
    assert fsdev.startswith("local,") and "path=/," in fsdev and "readonly=on" in fsdev
    assert "security_model=none" in fsdev
    append = _opt(a, "-append")[0]
    assert "katamaran.privip=10.0.0.1/24" in append
    assert "katamaran.privip=10.0.0.2/24" in _opt(b, "-append")[0]
    # 2 TCG vCPUs: without it the node kernel falls back to the HPET (see NODE_CLOCK_ARGS)
    assert "tsc=reliable" in append.split()
    drives = _opt(a, "-drive")
    assert any("node-a.qcow2" in d and "format=qcow2" in d for d in drives)
    assert any("node-a-seed.iso" in d and "readonly=on" in d for d in drives)


def test_node_argv_runs_the_chosen_qemu_with_its_firmware(tmp_path):
    """The nodes run backports' QEMU (qemu.binary.node_qemu) with its own firmware dir."""
    spec = _spec(tmp_path, "a")
    assert "-L" not in node_argv(spec)  # the system QEMU finds its own
    qemu = "/cache/qemu-backports/usr/bin/qemu-system-x86_64"
    argv = node_argv(
        NodeSpec(**{**spec.__dict__, "qemu": qemu, "qemu_datadir": "/cache/share/qemu"})
    )
    assert argv[0] == qemu and _opt(argv, "-L") == ["/cache/share/qemu"]


def test_guide_nodes_run_the_qemu_setup_chose(tmp_path):
    env = _fake_setup(tmp_path / "te")
    image, _ = env.load()
    for path in (env.disk("a"), env.seed("a"), env.key, *image.files()):
        path.write_text("x")
    assert env.spec("a", "tcg").qemu == "qemu-system-x86_64"  # a manifest from before
    data = json.loads(env.manifest.read_text())
    data["qemu"] = {"binary": "/q/qemu-system-x86_64", "datadir": "/q/share", "version": "10"}
    env.manifest.write_text(json.dumps(data))
    spec = env.spec("a", "tcg")
    assert (spec.qemu, spec.qemu_datadir) == ("/q/qemu-system-x86_64", "/q/share")


def test_node_argv_ubuntu_boots_its_disk_under_kvm(tmp_path):
    spec = _spec(tmp_path, "b", UbuntuImage(base=tmp_path / "jammy.img"))
    argv = node_argv(NodeSpec(**{**spec.__dict__, "accel": "kvm"}))
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert "-kernel" not in argv and "-fsdev" not in argv
    assert _opt(argv, "-m") == ["4096"]


def test_guide_nodes_take_a_vcpu_count_and_say_when_kata_needs_one(tmp_path):
    """start --cpus N boots N vCPUs; a TCG node with two gets one line saying why Kata
    pods under its KVM want one (qemu.node.NESTED_KVM_NODE_CPUS)."""
    spec = _spec(tmp_path, "a")
    note = node_vm.smp_note(spec)
    assert note is not None and "2 vCPUs" in note and "--cpus 1" in note
    one = NodeSpec(**{**spec.__dict__, "smp": 1})
    assert _opt(node_argv(one), "-smp") == ["1"] and node_vm.smp_note(one) is None
    assert node_vm.smp_note(NodeSpec(**{**spec.__dict__, "accel": "kvm"})) is None


@pytest.mark.parametrize("cpus", ["0", "-1", "two"])
def test_start_refuses_a_vcpu_count_that_is_not_one_or_more(cpus, capsys):
    with pytest.raises(SystemExit) as exc:
        node_vm.main(["start", "a", "--cpus", cpus])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"--cpus: must be a whole number of vCPUs, 1 or more: {cpus!r}"), err


def test_node_spec_rejects_unknown_role(tmp_path):
    with pytest.raises(ValueError):
        _spec(tmp_path, "c")


def test_seed_iso_holds_the_guide_user(tmp_path):
    pycdlib = pytest.importorskip("pycdlib")
    iso_path = seed.write_seed(
        tmp_path / "seed.iso",
        hostname="node-b",
        authorized_keys=["ssh-rsa AAAA test"],
        private_ip="10.0.0.2/24",
        nic_macs=node_vm.nic_macs("b"),
    )
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        files = {}
        for name in ("user-data", "meta-data", "network-config"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/" + name)
            files[name] = buf.getvalue().decode()
    finally:
        iso.close()
    assert files["user-data"].startswith("#cloud-config\n")
    data = json.loads(files["user-data"].partition("\n")[2])
    user = data["users"][0]
    assert user["name"] == "ubuntu" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["ssh_authorized_keys"] == ["ssh-rsa AAAA test"]
    assert {"name": "ubuntu", "password": "ubuntu", "type": "text"} in data["chpasswd"]["users"]
    assert "local-hostname: node-b" in files["meta-data"]
    net = files["network-config"]
    assert '"10.0.0.2/24"' in net and "@" not in net
    # matched by the MAC the QEMU command line gives each NIC, renamed to the guide's names
    private = net[net.index("  private:") :]
    assert 'macaddress: "52:54:00:12:35:0b"' in private and "set-name: enp0s4" in private
    nat = net[net.index("  nat:") : net.index("  private:")]
    assert 'macaddress: "52:54:00:12:34:0b"' in nat and "set-name: enp0s3" in nat
    keys = [line.strip() for line in net.splitlines() if not line.lstrip().startswith("#")]
    assert "enp0s3:" not in keys and "ens3:" not in keys, "NICs must not be matched by name"


def test_network_config_macs_are_the_ones_on_the_qemu_command_line(tmp_path):
    for role in ("a", "b"):
        argv = " ".join(node_argv(_spec(tmp_path, role)))
        for mac in node_vm.nic_macs(role).values():
            assert f"mac={mac}," in argv


@pytest.mark.parametrize(
    "macs",
    [{"nat": "52:54:00:12:34:0a"}, {"nat": "52:54:00:12:34:0a", "private": "52-54-00-12-35-0a"}],
)
def test_network_config_rejects_bad_macs(macs):
    with pytest.raises(ValueError, match="^nic_macs must map nat and private"):
        seed.render_network_config("10.0.0.1/24", macs)


def _load_node_cloudinit():
    path = REPO / "pytest_katamaran" / "images" / "guest" / "node-cloudinit"
    loader = importlib.machinery.SourceFileLoader("node_cloudinit", str(path))
    spec = importlib.util.spec_from_loader("node_cloudinit", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_node_cloudinit_reads_what_seed_writes():
    mod = _load_node_cloudinit()
    text = seed.render_user_data(seed.user_data("node-a", ["ssh-ed25519 AAAA k"]))
    parsed = mod.parse_user_data(text)
    assert parsed["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAA k"]
    meta = mod.parse_meta_data(seed.render_meta_data("id-1", "node-a"))
    assert meta == {"instance-id": "id-1", "local-hostname": "node-a"}


def test_ubuntu_download_fails_fast_and_cleanly(tmp_path):
    url = "http://127.0.0.1:9/ubuntu-22.04-server-cloudimg-amd64.img"  # discard: refused
    with pytest.raises(NodeImageError, match=r"^cannot download http://127\.0\.0\.1:9/\S+: "):
        nodeimage.fetch_ubuntu_image(tmp_path, progress=lambda m: None, url=url)
    assert not list((tmp_path / "ubuntu").glob("*.img*")), "partial download left behind"


def test_missing_host_packages_are_named(monkeypatch):
    real_which = node_vm.shutil.which

    def which(cmd, path=None):
        return None if cmd == "qemu-img" else real_which(cmd, path=path)

    monkeypatch.setattr(node_vm.shutil, "which", which)
    assert "qemu-utils" in node_vm.missing_packages("debian")


# --------------------------------------------------------------------------- the .venv

# Every entry point a user or CI runs; each must run the python testenv/lib.sh picks.
FRONT_ENDS = [p for p in SCRIPTS if p.name not in ("lib.sh", "install-deps.sh")]


@pytest.mark.parametrize("script", [*SCRIPTS, REPO / ".ci" / "run"], ids=lambda p: p.name)
def test_no_script_runs_the_system_python(script):
    """Stock Debian 12 / Ubuntu 24.04 refuse pip into /usr/bin/python3 (PEP 668): .venv only."""
    text = script.read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    offenders = [line for line in code if re.search(r"(^|[\s;(`])python3?\s+-[mc]\b", line)]
    assert not offenders, f"{script.name} runs python3 from PATH: {offenders}"
    assert not [line for line in code if "pip install" in line and "venv_py" not in line]


@pytest.mark.parametrize("script", FRONT_ENDS, ids=lambda p: p.name)
def test_front_ends_source_lib_sh(script):
    text = script.read_text()
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"' in text
    assert "katamaran_python" in text and '"$KATAMARAN_PY"' in text


def _copy_checkout(tmp_path: Path) -> Path:
    """testenv/ alone in a fresh directory: a clone where install-deps.sh has not run."""
    work = tmp_path / "clone"
    (work / "testenv").mkdir(parents=True)
    for script in SCRIPTS:
        (work / "testenv" / script.name).write_bytes(script.read_bytes())
    return work


def _run_script(work: Path, script: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KATAMARAN_PYTHON"}
    env.update(env_extra)
    return subprocess.run(
        ["bash", str(work / "testenv" / script)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("script", ["test.sh", "run-tests.sh", "start-node-a.sh", "setup.sh"])
def test_without_venv_the_scripts_name_install_deps(tmp_path, script):
    work = _copy_checkout(tmp_path)
    r = _run_script(work, script, {})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"{work}/.venv/bin/python not found. Run ./testenv/install-deps.sh (as root) first."
    )


def test_scripts_run_the_venv_python_without_activation(tmp_path):
    work = _copy_checkout(tmp_path)
    venv_bin = work / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = venv_bin / "python"
    fake.write_text('#!/bin/sh\necho "venv python: $*"\n')
    fake.chmod(0o755)
    r = _run_script(work, "test.sh", {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "venv python: -m pytest tests/smoke\n"
    r = _run_script(work, "test.sh", {"KATAMARAN_PYTHON": "/bin/echo"})
    assert r.stdout == "-m pytest tests/smoke\n", "KATAMARAN_PYTHON must win over .venv"


def test_ci_builds_the_venv_on_the_system_python():
    text = (REPO / ".ci" / "run").read_text()
    assert "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in text
    assert "unset KATAMARAN_PYTHON KATAMARAN_BASE_PYTHON" in text
    assert 'if [[ "$base" != /usr ]]' in text


def test_install_deps_builds_the_venv_from_the_distribution_python():
    lib = (REPO / "testenv" / "lib.sh").read_text()
    assert 'KATAMARAN_BASE_PYTHON="${KATAMARAN_BASE_PYTHON:-/usr/bin/python3}"' in lib
    text = (REPO / "testenv" / "install-deps.sh").read_text()
    assert '"$KATAMARAN_BASE_PYTHON" -m venv "$KATAMARAN_VENV"' in text
    assert "\"$venv_py\" -m pip install -q -e '.[test]'" in text
    assert "python3-venv" in text


# --------------------------------------------------------------------------- overlays


def _virtual_size(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)["virtual-size"]


def test_ubuntu_overlay_is_grown_to_fit_kata_containerd_and_k3s(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    base = tmp_path / "jammy.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    image = UbuntuImage(base=base)
    disk = nodeimage.create_overlay(image, tmp_path / "node-a.qcow2")
    assert _virtual_size(disk) == nodeimage.UBUNTU_OVERLAY_GIB << 30
    assert nodeimage.overlay_fits(disk, image)
    small = tmp_path / "old-node-a.qcow2"  # an overlay from before: too small, made anew
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(small)],
        check=True,
    )
    assert not nodeimage.overlay_fits(small, image)


def test_debian_overlay_keeps_the_scratch_size(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    scratch = tmp_path / "scratch.raw"
    scratch.write_bytes(b"")
    os.truncate(scratch, 8 << 20)
    image = _spec(tmp_path, "a").image
    image = DebianImage(**{**image.__dict__, "scratch_base": scratch})
    disk = nodeimage.create_overlay(image, tmp_path / "node-a.qcow2")
    assert _virtual_size(disk) == 8 << 20 and nodeimage.overlay_fits(disk, image)


@pytest.mark.parametrize(
    ("uptime", "lo", "hi", "verdict"),
    [
        (55.0, 60.0, 61.0, None),  # firmware took 5 s: fine
        (61.5, 60.0, 61.0, None),  # within a second of the host's figure
        (300.0, 60.0, 61.0, "fast"),  # TSC calibrated 5x too slow: the node's clock races
        (12.0, 60.0, 61.0, "slow"),
    ],
)
def test_node_clock_check(uptime, lo, hi, verdict):
    from pytest_katamaran.backend.qemu import clock_problem

    problem = clock_problem(uptime, lo, hi)
    if verdict is None:
        assert problem is None
    else:
        assert problem is not None and f"clock runs {verdict}" in problem
        assert f"uptime {uptime:.1f} s" in problem


_STALL = (
    "[   23.596662] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
    "[   23.613868] rcu: \tPossible timer handling issue on cpu=1 timer-softirq=8\n"
)


def test_a_boot_whose_kernel_keeps_reporting_a_stalled_cpu_is_lost(tmp_path):
    """Two stall reports may still recover; the third (a minute without RCU) is a lost boot."""
    proc = node_vm.NodeProcess(_spec(tmp_path, "b"), progress=lambda _m: None)
    proc.proc = subprocess.Popen(["sleep", "60"])
    try:
        log = proc.spec.serial_log
        log.write_text(_STALL * 2)
        assert proc.check() is False
        log.write_text(_STALL * 3)
        with pytest.raises(node_vm.NodeStalled) as err:
            proc.check()
        headline = str(err.value).splitlines()[0]
        assert headline == (
            "node-b: its kernel reported a stalled CPU 3 times before KATAMARAN-NODE-READY "
            "(a vCPU whose timer stopped firing)"
        )
        assert "Possible timer handling issue on cpu=1" in str(err.value)  # the console tail
        log.write_text(_STALL * 3 + "KATAMARAN-NODE-READY\n")  # READY wins over old reports
        assert proc.check() is True
    finally:
        proc.kill()
    assert proc.proc.returncode is not None


class _FakeBoot:
    """A node process for ``QemuNodes._boot``: fails its wait as told, records kills."""

    def __init__(self, spec: NodeSpec, outcome: Exception | None, killed: list[str]) -> None:
        self.spec, self.outcome, self.killed = spec, outcome, killed
        spec.serial_log.write_text(f"console of {spec.name}\n")

    def wait_ready(self, timeout: float) -> float:
        if self.outcome is not None:
            raise self.outcome
        return 12.5

    def kill(self) -> None:
        self.killed.append(self.spec.name)


def _boot_with(tmp_path, monkeypatch, outcomes: list[Exception | None]):
    """Run QemuNodes._boot with node B failing its boots by ``outcomes`` (A always READY)."""
    from pytest_katamaran.backend import qemu as backend

    lines: list[str] = []
    killed: list[str] = []
    disks: list[str] = []
    nodes = backend.QemuNodes(SimpleNamespace(results_dir=tmp_path), progress=lines.append)
    launches = iter(outcomes)

    def launch_both(accel: str, cpu: str | None) -> None:
        outcome = next(launches)
        nodes._procs = {
            "a": _FakeBoot(_spec(tmp_path, "a"), None, killed),
            "b": _FakeBoot(_spec(tmp_path, "b"), outcome, killed),
        }

    monkeypatch.setattr(nodes, "_launch_both", launch_both)
    monkeypatch.setattr(nodes, "_write_disks", disks.append)
    return nodes, lines, killed, disks


def test_a_stalled_boot_boots_both_nodes_once_more_keeping_the_console(tmp_path, monkeypatch):
    stalled = node_vm.NodeStalled("node-b: its kernel reported a stalled CPU 3 times\nQEMU argv")
    nodes, lines, killed, disks = _boot_with(tmp_path, monkeypatch, [stalled, None])
    nodes._boot("tcg", None, "ssh-rsa KEY")
    assert killed == ["node-a", "node-b"]  # both, since B's link is a connection to A
    assert disks == ["ssh-rsa KEY"]  # fresh overlays and seeds for the second boot
    kept = tmp_path / "node-b.stalled-1.log"
    assert kept.read_text() == "console of node-b\n"
    warning = next(line for line in lines if "WARNING" in line)
    assert warning.startswith(
        "katamaran: WARNING: node-b: its kernel reported a stalled CPU 3 times; "
        "booting node-a and node-b again (attempt 2 of 2); the stalled consoles: "
    )
    assert str(kept) in warning
    assert lines[-2:] == [
        "katamaran: node-a: READY after 12.5s",
        "katamaran: node-b: READY after 12.5s",
    ]


def test_a_second_stall_or_any_other_boot_failure_is_raised(tmp_path, monkeypatch):
    stalled = node_vm.NodeStalled("node-b: its kernel reported a stalled CPU 3 times")
    nodes, _lines, _killed, _disks = _boot_with(tmp_path, monkeypatch, [stalled, stalled])
    with pytest.raises(node_vm.NodeStalled):
        nodes._boot("tcg", None, "k")
    timeout = node_vm.NodeBootError("node-b did not print KATAMARAN-NODE-READY within 180s")
    nodes, lines, killed, disks = _boot_with(tmp_path, monkeypatch, [timeout, None])
    with pytest.raises(node_vm.NodeBootError) as err:
        nodes._boot("tcg", None, "k")
    assert err.value is timeout and killed == [] and disks == []
    assert not any("WARNING" in line for line in lines)
