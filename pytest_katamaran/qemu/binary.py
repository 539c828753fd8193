"""The QEMU that the Kata-shaped workload VMs run (both nodes: it is part of the shared spec).

Why not simply the system QEMU: Debian 12's 7.2 loses guest stores during TCG live
migration (see :func:`backports_qemu`), so by default the workload runs Debian
backports' QEMU, unpacked (not installed) into the harness cache, which the nodes see
through the host root.  ``--workload-qemu=system`` (ini ``katamaran_workload_qemu``)
keeps the system one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

WORKLOAD_QEMU_CHOICES = ("backports", "system")
SYSTEM_QEMU = "qemu-system-x86_64"

QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-data", "qemu-system-common")


@dataclass(frozen=True)
class WorkloadQemu:
    """The QEMU the workload VMs run (both sides: it is part of the shared spec)."""

    binary: str
    datadir: str  # its own firmware (-L), "" for the system QEMU
    version: str

    def nodeside_args(self) -> list[str]:
        if not self.datadir:
            return ["--qemu-binary", self.binary]
        return ["--qemu-binary", self.binary, "--qemu-datadir", self.datadir]


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{binary} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0].removeprefix("QEMU emulator version ").strip()


def _system_sources() -> tuple[str, str]:
    """(archive URI, codename) from this machine's own apt configuration (never hard-coded)."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    uri = ""
    for src in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if not src.is_file() or src.suffix not in (".list", ".sources"):
            continue
        for line in src.read_text().splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "security" not in line:
                uri = uri or line.split(":", 1)[1].strip().split()[0]
            elif line.startswith("deb ") and "security" not in line:
                uri = uri or line.split()[1]
    if not (uri and codename):
        raise RuntimeError("cannot find this machine's Debian archive in its apt configuration")
    return uri, codename


def backports_qemu(cache: Path) -> WorkloadQemu:
    """QEMU from Debian's <codename>-backports, unpacked (not installed) under `cache`.

    Why: Debian 12's QEMU 7.2 loses guest stores during TCG live migration (its dirty
    bitmap fast path never re-arms the TCG TLB; upstream fix 03bfc2188f "physmem: Fix
    migration dirty bitmap coherency with TCG memory access", QEMU 9.0, not in 7.2.x),
    which corrupts the migrated workload's kernel.  Unpacking keeps the system QEMU that
    the rest of the suite uses untouched; the nodes see `cache` through the host root.
    """
    root = cache / "qemu-backports"
    marker = root / "version"
    binary = root / "usr/bin/qemu-system-x86_64"
    datadir = root / "usr/share/qemu"
    if marker.is_file() and binary.is_file():
        return WorkloadQemu(str(binary), str(datadir), marker.read_text().strip())
    uri, codename = _system_sources()
    with tempfile.TemporaryDirectory(prefix="kmr-qemu-", dir=cache) as tmp:
        work = Path(tmp)
        (work / "lists/partial").mkdir(parents=True)
        (work / "cache/archives/partial").mkdir(parents=True)
        (work / "parts").mkdir()
        (work / "sources.list").write_text(f"deb {uri} {codename}-backports main\n")
        apt = [
            "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={work / 'parts'}",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        for cmd in (
            ["apt-get", *apt, "update"],
            ["apt-get", *apt, "download", *(f"{p}/{codename}-backports" for p in QEMU_PACKAGES)],
        ):
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-2:])}: {done.stderr.strip()[-500:]}")
        stage = work / "root"
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(stage)], check=True)
        staged = stage / "usr/bin/qemu-system-x86_64"
        missing = subprocess.run(["ldd", str(staged)], capture_output=True, text=True).stdout
        if "not found" in missing:
            raise RuntimeError(f"backports QEMU lacks libraries here:\n{missing}")
        version = qemu_version(str(staged))
        (stage / "version").write_text(version + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(stage, root)
    return WorkloadQemu(str(binary), str(datadir), version)


def workload_qemu(choice: str, cache: Path) -> tuple[WorkloadQemu, str | None]:
    """The workload QEMU for ``choice``, and a note when backports was asked for but failed.

    A failed backports fetch (no archive reachable) falls back to the system QEMU with
    the note, which the caller shows as a warning: the run may then corrupt the guest.
    """
    if choice == "backports":
        return _backports_else_system(
            cache, "the workload runs on the system QEMU, whose TCG migration can corrupt the guest"
        )
    return WorkloadQemu(SYSTEM_QEMU, "", qemu_version(SYSTEM_QEMU)), None


def _backports_else_system(cache: Path, fallback: str) -> tuple[WorkloadQemu, str | None]:
    """Backports' QEMU; where it cannot be fetched, the system one and a note that says
    so, ending with `fallback` (what running on the system QEMU risks)."""
    try:
        return backports_qemu(cache), None
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        note = f"backports QEMU unavailable ({exc}); {fallback}"
    return WorkloadQemu(SYSTEM_QEMU, "", qemu_version(SYSTEM_QEMU)), note


def node_qemu(cache: Path) -> tuple[WorkloadQemu, str | None]:
    """The QEMU the lab nodes run: backports' too, and the note if it had to fall back.

    Why not the system 7.2: under it a Debian-kernel node with two TCG vCPUs hung in
    2 of 5 runs of the decapsulation scenario here (2026-12-02): both vCPUs spun at one
    instruction of ``__netif_receive_skb_core`` (a static-key jump the kernel patches
    live when a ping or an ingress qdisc comes or goes) until the soft-lockup watchdog
    fired, and the node never answered again.  On 10.0 the same churn (60 ingress qdiscs
    added and removed under a 2 ms ping, 8 times over) ran through, each round in about
    half the time (29-41 s against 56-83 s): the nested lab's capacity grows with it.
    """
    return _backports_else_system(
        cache,
        "the lab nodes run on the system QEMU, whose two-vCPU TCG nodes can hang (soft lockups)",
    )
