"""The workload VM's QEMU argv: Kata's layout, and source/destination that can migrate.

Pure tests (no QEMU, no filesystem writes): `sandbox_argv` is a pure function.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from pytest_katamaran.qemu.workload import SandboxSpec, sandbox_argv

RUN = Path("/run/vc/vm")
SID = "0123456789abcdef"


def make_spec(**kw) -> SandboxSpec:
    base = dict(
        sandbox_id=SID,
        kernel=Path("/k/vmlinuz"),
        initrd=Path("/k/initrd.gz"),
        append="console=ttyS0 katamaran.ip=10.244.1.5/32 katamaran.gw=169.254.1.1",
        disk=Path("/var/lib/kmr/src.qcow2"),
        disk_format="qcow2",
        mac="8e:aa:32:9e:96:30",
        extra_monitor=True,
    )
    base.update(kw)
    return SandboxSpec(**base)


def opt_after(argv: list[str], flag: str) -> list[str]:
    """All values following `flag` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def kv(value: str) -> dict[str, str]:
    """Parse QEMU's `a=b,c=d` (first bare word, if any, under key '')."""
    out: dict[str, str] = {}
    for part in value.split(","):
        k, sep, v = part.partition("=")
        out[k if sep else ""] = v if sep else k
    return out


def test_defaults_match_kata():
    spec = SandboxSpec(sandbox_id="x", kernel=Path("/k"), initrd=Path("/i"))
    assert spec.run_dir == RUN
    assert spec.drive_id == "drive-virtio-disk0"
    assert (spec.memory_mib, spec.smp, spec.machine, spec.accel) == (128, 1, "pc", "tcg")
    assert spec.tap == "tap0_kata"
    assert spec.incoming is None and spec.extra_monitor is False


def test_argv_has_every_kata_layout_element():
    spec = make_spec()
    argv = sandbox_argv(spec)
    d = f"{RUN}/{SID}"
    assert argv[0] == "qemu-system-x86_64"
    assert opt_after(argv, "-name") == [f"sandbox-{SID}"]
    assert opt_after(argv, "-pidfile") == [f"{d}/pid"]
    assert opt_after(argv, "-qmp") == [
        f"unix:{d}/qmp.sock,server=on,wait=off",
        f"unix:{d}/extra-monitor.sock,server=on,wait=off",
    ]
    assert opt_after(argv, "-m") == ["128M"]
    assert opt_after(argv, "-smp") == ["1"]
    assert opt_after(argv, "-machine") == ["pc"]
    assert opt_after(argv, "-accel") == ["tcg,thread=single"]
    assert opt_after(argv, "-object") == [
        "memory-backend-file,id=dimm1,size=128M,mem-path=/dev/shm,share=on"
    ]
    assert opt_after(argv, "-numa") == ["node,memdev=dimm1"]

    (drive,) = opt_after(argv, "-drive")
    assert kv(drive) == {
        "id": "drive-virtio-disk0",
        "if": "none",
        "file": "/var/lib/kmr/src.qcow2",
        "format": "qcow2",
        "aio": "threads",
        "cache": "writeback",
    }
    devices = [kv(x) for x in opt_after(argv, "-device")]
    blk = next(x for x in devices if x[""] == "virtio-blk-pci")
    assert blk["drive"] == "drive-virtio-disk0" and blk["id"] == "virtio-disk0"
    net = next(x for x in devices if x[""] == "virtio-net-pci")
    assert net["netdev"] == "network-0" and net["mac"] == "8e:aa:32:9e:96:30"

    (netdev,) = opt_after(argv, "-netdev")
    assert kv(netdev) == {
        "": "tap",
        "id": "network-0",
        "ifname": "tap0_kata",
        "script": "no",
        "downscript": "no",
    }
    assert opt_after(argv, "-serial") == [f"file:{d}/console.log"]
    assert opt_after(argv, "-display") == ["none"]
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert opt_after(argv, "-kernel") == ["/k/vmlinuz"]
    assert opt_after(argv, "-initrd") == ["/k/initrd.gz"]
    assert opt_after(argv, "-append") == [spec.append]
    assert "-incoming" not in argv
    assert "-daemonize" not in argv  # we must own the PID to kill it


def test_paths_derive_from_run_dir():
    # A short directory of our own: pytest's tmp_path under xdist can exceed the 107-byte
    # unix socket limit that sandbox_argv rightly enforces.
    tmp_path = Path(tempfile.mkdtemp(prefix="kq"))
    spec = make_spec(run_dir=tmp_path)
    assert spec.sandbox_dir == tmp_path / SID
    assert spec.qmp_path == tmp_path / SID / "qmp.sock"
    assert spec.extra_monitor_path == tmp_path / SID / "extra-monitor.sock"
    assert spec.monitor_path == spec.extra_monitor_path
    assert make_spec(extra_monitor=False).monitor_path.name == "qmp.sock"
    assert spec.pidfile == tmp_path / SID / "pid"
    assert spec.console_log == tmp_path / SID / "console.log"
    sandbox_argv(spec)
    assert list(tmp_path.iterdir()) == []  # pure: creates nothing
    tmp_path.rmdir()


@pytest.mark.parametrize("incoming", ["defer", "tcp:[::]:4444"])
def test_source_and_destination_differ_only_in_incoming_and_disk(incoming):
    src = make_spec()
    dst = src.for_destination(disk=Path("/var/lib/kmr/dst.qcow2"), incoming=incoming)
    a, b = sandbox_argv(src), sandbox_argv(dst)
    assert b[-2:] == ["-incoming", incoming]
    b = b[:-2]
    assert len(a) == len(b)
    diffs = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert len(diffs) == 1
    (x, y) = diffs[0]
    dx, dy = kv(x), kv(y)
    assert dx.pop("file") == "/var/lib/kmr/src.qcow2"
    assert dy.pop("file") == "/var/lib/kmr/dst.qcow2"
    assert dx == dy


def test_destination_keeps_ids_macs_and_machine():
    src = make_spec()
    dst = src.for_destination(disk=Path("/d.qcow2"))
    a, b = sandbox_argv(src), sandbox_argv(dst)
    for flag in ("-device", "-netdev", "-object", "-numa", "-machine", "-m", "-smp", "-name"):
        assert opt_after(a, flag) == opt_after(b, flag), flag
    assert kv(opt_after(a, "-drive")[0])["id"] == kv(opt_after(b, "-drive")[0])["id"]
    # the destination spec is a copy: mutating it does not touch the source
    dst.extra_args.append("-S")
    assert src.extra_args == []


def test_same_disk_shared_storage_differs_only_in_incoming():
    src = make_spec()
    assert sandbox_argv(src.for_destination()) == sandbox_argv(src) + ["-incoming", "defer"]


def test_optional_parts():
    argv = sandbox_argv(make_spec(tap=None, disk=None, extra_monitor=False))
    assert "-netdev" not in argv and "-drive" not in argv
    assert len(opt_after(argv, "-qmp")) == 1
    assert not any(x.startswith("virtio-net-pci") for x in opt_after(argv, "-device"))


def test_kvm_and_tcg_threading():
    kvm = sandbox_argv(make_spec(accel="kvm"))
    assert opt_after(kvm, "-accel") == ["kvm"] and opt_after(kvm, "-cpu") == ["host"]
    tcg = sandbox_argv(make_spec(tcg_thread=None))
    assert opt_after(tcg, "-accel") == ["tcg"] and "-cpu" not in tcg
    with pytest.raises(ValueError, match="accel"):
        sandbox_argv(make_spec(accel="hvf"))


def test_commas_in_disk_path_are_escaped():
    (drive,) = opt_after(sandbox_argv(make_spec(disk=Path("/x/a,b.img"))), "-drive")
    assert "file=/x/a,,b.img," in drive


def test_blkdebug_and_werror_go_on_the_source_drive_only():
    """A fault test's I/O error: blkdebug between the format and the file, the drive's
    werror policy; the destination gets the same werror but never the blkdebug rules
    (they would fail the mirror's writes there)."""
    src = make_spec(blkdebug=Path("/t/rules.conf"), werror="stop", disk_format="raw")
    (drive,) = opt_after(sandbox_argv(src), "-drive")
    d = kv(drive)
    assert d["file"] == "blkdebug:/t/rules.conf:/var/lib/kmr/src.qcow2"
    assert d["werror"] == "stop" and d["format"] == "raw"
    (dst_drive,) = opt_after(sandbox_argv(src.for_destination(disk=Path("/d.raw"))), "-drive")
    assert kv(dst_drive)["file"] == "/d.raw" and kv(dst_drive)["werror"] == "stop"
    (plain,) = opt_after(sandbox_argv(make_spec()), "-drive")
    assert "werror" not in kv(plain) and "blkdebug" not in plain


def test_overlong_socket_path_is_rejected_early():
    with pytest.raises(ValueError, match="too long"):
        sandbox_argv(make_spec(run_dir=Path("/tmp/" + "d" * 100)))
