"""Build the tiny katamaran test guest: Debian's cloud kernel plus a busybox initramfs.

Why: migration tests need a real guest that boots in seconds under TCG (no KVM on the
lab machines), answers ping and writes its disk. Everything comes from Debian packages
(no downloads outside apt), is cached under ``$KATAMARAN_CACHE`` (default
``~/.cache/katamaran``) and is rebuilt only when the recipe (init script, disk writer
source, module list, kernel version, busybox binary) changes. Builds take a file lock so
pytest-xdist workers never build the same thing at once.

Cache layout: ``kernels/<version>/{vmlinuz,vmlinux,root/lib/modules/<version>}`` (the
whole module tree, so other images can add e.g. sch_plug or ipip) and
``guests/<recipe-hash>/{initrd.gz,recipe.json}``. Stale entries are never used; delete
the directory to reclaim space (~160 MB per kernel).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent / "guest"
INIT_SCRIPT = GUEST_DIR / "init"
DISKWRITER_SRC = GUEST_DIR / "diskwriter.c"
MEMDIRTIER_SRC = GUEST_DIR / "memdirtier.c"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Top-level modules; their dependencies (virtio, virtio_ring, virtio_pci_legacy_dev,
# virtio_pci_modern_dev, failover, net_failover) are resolved by modprobe at build time.
GUEST_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_net")
READY_MARKER = "KATAMARAN-GUEST-READY"
# Bump when this builder changes what ends up in the image.
RECIPE_VERSION = 1

Progress = Callable[[str], None]


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Kernel:
    """An extracted Debian kernel: its image and its depmod'ed module tree."""

    vmlinuz: Path
    modules_dir: Path  # <root>/lib/modules/<version>, depmod'ed
    version: str
    # The same kernel uncompressed, when it can boot through PVH: QEMU then loads the ELF
    # directly, skipping SeaBIOS's real-mode path and the in-guest decompression (~1 s
    # under TCG). Kata also boots an uncompressed vmlinux.
    vmlinux: Path | None = None

    @property
    def boot_image(self) -> Path:
        """What to pass to QEMU's ``-kernel``: the PVH vmlinux when there is one."""
        return self.vmlinux or self.vmlinuz

    @property
    def root(self) -> Path:
        """The directory that plays ``/`` for ``depmod -b`` / ``modprobe -d``."""
        return self.modules_dir.parent.parent.parent


@dataclass(frozen=True)
class GuestImage:
    """A bootable test guest: pass to QEMU as ``-kernel``/``-initrd``."""

    kernel: Path
    initrd: Path
    version: str

    def qemu_args(self, cmdline: str) -> list[str]:
        """QEMU direct-boot arguments for this guest with the given kernel command line."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", cmdline]


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache directory: argument, else ``$KATAMARAN_CACHE``, else ~/.cache/katamaran."""
    if cache_dir is None:
        env = os.environ.get("KATAMARAN_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "katamaran"
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Exclusive flock: one builder at a time across processes (pytest-xdist workers)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: Sequence[str | Path], fix: str = "", **kw: object) -> str:
    """Run a build command; on failure raise with its stderr and the suggested fix."""
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise RuntimeError(f"{args[0]} not found. {fix}".strip()) from e
    if proc.returncode != 0:
        hint = f"\nFix: {fix}" if fix else ""
        raise RuntimeError(
            f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}{hint}"
        )
    return proc.stdout


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` one package into dest; returns the .deb path."""
    fix = (
        f"run `apt-get update` (as root) so apt knows {package}, and check that the "
        "Debian mirror is reachable"
    )
    # Sandbox user root: the _apt user cannot write into our private temp dir.
    _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], fix=fix, cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no .deb. Fix: {fix}")
    return debs[0]


def _resolve_kernel_package(package: str) -> str:
    """The versioned package behind a kernel metapackage, e.g. linux-image-6.1.0-56-..."""
    fix = f"run `apt-get update` (as root) so apt knows {package}"
    out = _run(["apt-cache", "depends", package], fix=fix)
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not m:
        raise RuntimeError(f"cannot resolve {package} with apt-cache depends. Fix: {fix}")
    return m.group(1)


APT_LISTS = Path("/var/lib/apt/lists")


def _apt_lists_stamp() -> str:
    """Fingerprint of apt's package lists: changes exactly when ``apt-get update`` changes them."""
    h = hashlib.sha256()
    if APT_LISTS.is_dir():
        for p in sorted(APT_LISTS.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve_kernel_package_cached(kernels: Path, package: str) -> str:
    """Like _resolve_kernel_package, but memoised per apt-lists state (apt-cache takes ~1 s).

    The memo lives in kernels/resolved.json, so each cache subdirectory has its own.
    """
    memo = kernels / "resolved.json"
    stamp = _apt_lists_stamp()
    try:
        data = json.loads(memo.read_text())
        if data["apt_lists"] == stamp:
            return str(data["package"])
    except (OSError, ValueError, KeyError):
        pass
    resolved = _resolve_kernel_package(package)
    memo.write_text(json.dumps({"apt_lists": stamp, "package": resolved}) + "\n")
    return resolved


def _kernel_at(kdir: Path) -> Kernel | None:
    """The cached kernel in kdir, if completely built."""
    ver = kdir.name
    vmlinuz = kdir / "vmlinuz"
    modules = kdir / "root" / "lib" / "modules" / ver
    vmlinux = kdir / "vmlinux"
    if vmlinuz.is_file() and (modules / "modules.dep").is_file():
        return Kernel(
            vmlinuz=vmlinuz,
            modules_dir=modules,
            version=ver,
            vmlinux=vmlinux if vmlinux.is_file() else None,
        )
    return None


_PAYLOAD_TOOLS = {  # bzImage payload magic -> decompressor command (Debian uses LZ4)
    b"\x02\x21\x4c\x18": (["lz4", "-dc"], "lz4"),
    b"\x28\xb5\x2f\xfd": (["zstd", "-dc"], "zstd"),
    b"\xfd7zXZ\x00": (["xz", "-dc"], "xz-utils"),
    b"\x1f\x8b": (["gzip", "-dc"], "gzip"),
}


def _has_pvh_note(elf: bytes) -> bool:
    """True if an ELF64 kernel carries the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _extract_vmlinux(vmlinuz: Path, out: Path) -> str | None:
    """Write the PVH-bootable ELF inside a bzImage to out; else return why not."""
    data = vmlinuz.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        return "not a bzImage"
    pm_start = (data[0x1F1] or 4) * 512 + 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[pm_start + offset : pm_start + offset + length]
    found = [tool for magic, tool in _PAYLOAD_TOOLS.items() if payload.startswith(magic)]
    if not found:
        return f"unknown kernel compression (magic {payload[:6].hex()})"
    cmd, package = found[0]
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} not found (apt-get install {package})"
    # The build appends the decompressed size after the stream, so tools may exit non-zero
    # ("trailing garbage") with a complete output: judge the ELF instead of the exit code.
    elf = subprocess.run(cmd, input=payload, capture_output=True).stdout
    if not _has_pvh_note(elf):
        return "no PVH entry note in the kernel (CONFIG_PVH off?)"
    tmp = out.with_name(out.name + ".tmp")  # atomic: a cached kernel dir may be in use
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return None


def fetch_kernel(
    cache_dir: Path | None = None,
    progress: Progress = _stderr_progress,
    *,
    package: str = KERNEL_PACKAGE,
    subdir: str = "kernels",
    label: str = "guest",
) -> Kernel:
    """A Debian kernel, downloaded with apt, extracted and depmod'ed once, then cached.

    package is the apt metapackage (default: the cloud kernel), subdir the cache
    directory it lives in (``<subdir>/<version>/``) and label the progress prefix. The
    PVH-bootable vmlinux is extracted next to vmlinuz (also into kernels cached before
    that existed). Without apt metadata (no ``apt-get update``) a previously cached
    kernel is reused.
    """
    kernels = cache_root(cache_dir) / subdir
    kernels.mkdir(exist_ok=True)
    with _locked(kernels / ".lock"):
        try:
            resolved = _resolve_kernel_package_cached(kernels, package)
        except RuntimeError:
            cached = [d for d in sorted(kernels.iterdir()) if _kernel_at(d)]
            if not cached:
                raise
            progress(f"{label}: apt cannot resolve {package}, using cached kernel")
            return _cached_kernel(cached[-1], progress, label)
        version = resolved.removeprefix("linux-image-")
        if _kernel_at(kernels / version):
            return _cached_kernel(kernels / version, progress, label)
        progress(f"{label}: downloading kernel {resolved} ...")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=kernels, prefix=".tmp-") as tmp:
            tmpdir = Path(tmp)
            deb = _apt_download(resolved, tmpdir)
            extracted = tmpdir / "x"
            _run(["dpkg-deb", "-x", deb, extracted])
            staged = tmpdir / version
            (staged / "root" / "lib" / "modules").mkdir(parents=True)
            shutil.move(extracted / "boot" / f"vmlinuz-{version}", staged / "vmlinuz")
            for mods in (extracted / "lib", extracted / "usr" / "lib"):
                if (mods / "modules" / version).is_dir():
                    shutil.move(mods / "modules" / version, staged / "root" / "lib" / "modules")
                    break
            else:
                raise RuntimeError(f"{deb.name} holds no lib/modules/{version}")
            _run(["depmod", "-b", staged / "root", version], fix="apt-get install kmod")
            _add_vmlinux(staged, progress, label)
            os.rename(staged, kernels / version)
        progress(f"{label}: kernel {version} ready in {time.monotonic() - t0:.1f}s")
        kernel = _kernel_at(kernels / version)
        assert kernel is not None
        return kernel


def _cached_kernel(kdir: Path, progress: Progress, label: str) -> Kernel:
    """The complete cached kernel in kdir, given a vmlinux if cached before PVH support."""
    kernel = _kernel_at(kdir)
    assert kernel is not None
    if kernel.vmlinux is None and not (kdir / "no-vmlinux").exists():
        _add_vmlinux(kdir, progress, label)
        kernel = _kernel_at(kdir)
        assert kernel is not None
    return kernel


def _add_vmlinux(kdir: Path, progress: Progress, label: str = "guest") -> None:
    """Extract kdir/vmlinux for PVH boot; record why not in kdir/no-vmlinux (tried once)."""
    why = _extract_vmlinux(kdir / "vmlinuz", kdir / "vmlinux")
    if why:
        (kdir / "no-vmlinux").write_text(why + "\n")
        progress(f"{label}: booting the compressed kernel (~1 s slower under TCG): {why}")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP header (needs no dynamic loader)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def find_busybox(cache_dir: Path | None = None, progress: Progress = _stderr_progress) -> Path:
    """A static busybox: the host's (busybox-static installed) or one fetched with apt."""
    host = Path("/bin/busybox")
    if host.is_file() and _is_static_elf(host):
        return host
    bbdir = cache_root(cache_dir) / "busybox"
    bbdir.mkdir(exist_ok=True)
    cached = bbdir / "busybox"
    with _locked(bbdir / ".lock"):
        if not cached.is_file():
            progress(f"guest: downloading {BUSYBOX_PACKAGE} ...")
            with tempfile.TemporaryDirectory(dir=bbdir, prefix=".tmp-") as tmp:
                deb = _apt_download(BUSYBOX_PACKAGE, Path(tmp))
                _run(["dpkg-deb", "-x", deb, Path(tmp) / "x"])
                os.replace(Path(tmp) / "x" / "bin" / "busybox", cached)
    return cached


def compile_guest_program(out: Path, src: Path = DISKWRITER_SRC) -> Path:
    """Compile a guest program (by default the disk writer) statically: the initramfs
    has no libc."""
    libc = _run(["gcc", "-print-file-name=libc.a"], fix="apt-get install gcc libc6-dev").strip()
    if not os.path.isabs(libc):
        raise RuntimeError("static libc (libc.a) missing. Fix: apt-get install libc6-dev")
    fix = "apt-get install gcc libc6-dev"
    _run(["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-o", out, src], fix=fix)
    return out


def resolve_modules(kernel: Kernel, modules: Sequence[str]) -> list[Path]:
    """The module files to load, dependencies first, each once (built-ins skipped)."""
    paths: list[Path] = []
    for mod in modules:
        out = _run(
            ["modprobe", "--show-depends", "-d", kernel.root, "-S", kernel.version, mod],
            fix=f"check that {mod} exists in {kernel.version} (apt-get install kmod)",
        )
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod" and Path(words[1]) not in paths:
                paths.append(Path(words[1]))
    return paths


def _module_bytes(path: Path) -> tuple[str, bytes]:
    """A module's plain .ko name and content; busybox insmod cannot decompress."""
    name = path.name
    if name.endswith(".ko.xz"):
        return name[:-3], lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return name[:-3], gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise RuntimeError(f"{path.name} is zstd-compressed. Fix: apt-get install zstd")
        return name[:-4], subprocess.run(
            ["zstd", "-dc", path], capture_output=True, check=True
        ).stdout
    return name, path.read_bytes()


def build_initramfs(
    kernel: Kernel,
    init: Path | str,
    modules: Sequence[str],
    files: Mapping[str, Path] | None = None,
    *,
    out: Path,
    busybox: Path | None = None,
) -> Path:
    """Write a newc cpio.gz: static busybox (+ applet links), modules, files and ``/init``.

    ``init`` is a script path, or the script text itself when given as ``str``. Modules
    and their dependencies go to ``/lib/modules/<name>.ko``; ``/modules.order`` lists them
    in load order for the init script. ``files`` maps guest paths to host files.
    """
    busybox = busybox or find_busybox()
    with tempfile.TemporaryDirectory(prefix="katamaran-initramfs-") as tmp:
        stage = Path(tmp) / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc"):
            (stage / d).mkdir(parents=True)
        (stage / "lib" / "modules").mkdir(parents=True)
        shutil.copy(busybox, stage / "bin" / "busybox")
        (stage / "bin" / "busybox").chmod(0o755)
        for applet in _run([busybox, "--list-full"]).split():
            link = stage / applet
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
        order = []
        for path in resolve_modules(kernel, modules):
            name, data = _module_bytes(path)
            (stage / "lib" / "modules" / name).write_bytes(data)
            order.append(name)
        (stage / "modules.order").write_text("".join(f"{n}\n" for n in order))
        for guest_path, host_path in (files or {}).items():
            dest = stage / guest_path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(host_path, dest)
        init_text = init.read_text() if isinstance(init, Path) else init
        (stage / "init").write_text(init_text)
        (stage / "init").chmod(0o755)

        # sorted: every directory precedes its contents, as the kernel's unpacker needs
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        archive = _cpio(stage, names)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        with gzip.GzipFile(tmp_out, "wb", compresslevel=6, mtime=0) as gz:
            gz.write(archive)
        os.replace(tmp_out, out)
    return out


def _cpio(stage: Path, names: Sequence[str]) -> bytes:
    """Archive names (relative to stage) as newc, all owned by root."""
    cmd = ["cpio", "-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet"]
    try:
        proc = subprocess.run(
            cmd, input="\n".join(names).encode() + b"\n", capture_output=True, cwd=stage
        )
    except FileNotFoundError as e:
        raise RuntimeError("cpio not found. Fix: apt-get install cpio") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout


def with_hook(image: GuestImage, name: str, script: str, out: Path) -> GuestImage:
    """The same guest plus one init hook, ``/etc/katamaran.d/<name>.sh`` (sourced by
    /init before READY): a second cpio appended to the initrd, which the kernel unpacks
    over the first.  For one test's workload (say, a memory dirtier) without a rebuild
    or a new cache entry."""
    with tempfile.TemporaryDirectory(prefix="katamaran-hook-") as tmp:
        stage = Path(tmp)
        (stage / "etc" / "katamaran.d").mkdir(parents=True)
        (stage / "etc" / "katamaran.d" / f"{name}.sh").write_text(script)
        names = ["etc", "etc/katamaran.d", f"etc/katamaran.d/{name}.sh"]
        extra = gzip.compress(_cpio(stage, names), mtime=0)
    out.write_bytes(image.initrd.read_bytes() + extra)
    return GuestImage(kernel=image.kernel, initrd=out, version=image.version)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guest_recipe(kernel: Kernel, busybox: Path) -> dict[str, object]:
    """Everything that determines the guest image; its hash is the cache key."""
    return {
        "recipe_version": RECIPE_VERSION,
        "kernel": kernel.version,
        "modules": list(GUEST_MODULES),
        "init": _sha256(INIT_SCRIPT),
        "diskwriter": _sha256(DISKWRITER_SRC),
        "memdirtier": _sha256(MEMDIRTIER_SRC),
        "busybox": _sha256(busybox),
    }


def build_guest(cache_dir: Path | None = None, progress: Progress = _stderr_progress) -> GuestImage:
    """The workload guest (virtio net/blk, disk writer, memory dirtier), built once per
    recipe and cached."""
    root = cache_root(cache_dir)
    kernel = fetch_kernel(root, progress)
    busybox = find_busybox(root, progress)
    recipe = guest_recipe(kernel, busybox)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    guests = root / "guests"
    guests.mkdir(exist_ok=True)
    gdir = guests / key
    image = GuestImage(kernel=kernel.boot_image, initrd=gdir / "initrd.gz", version=kernel.version)
    if image.initrd.is_file():
        return image
    with _locked(guests / ".lock"):
        if image.initrd.is_file():  # another worker built it while we waited
            return image
        progress(f"guest: building initrd {key} for kernel {kernel.version} ...")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=guests, prefix=".tmp-") as tmp:
            staged = Path(tmp) / key
            staged.mkdir()
            writer = compile_guest_program(Path(tmp) / "diskwriter")
            dirtier = compile_guest_program(Path(tmp) / "memdirtier", MEMDIRTIER_SRC)
            build_initramfs(
                kernel,
                INIT_SCRIPT,
                GUEST_MODULES,
                {"/bin/diskwriter": writer, "/bin/memdirtier": dirtier},
                out=staged / "initrd.gz",
                busybox=busybox,
            )
            (staged / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
            os.rename(staged, gdir)
        progress(f"guest: built initrd in {time.monotonic() - t0:.1f}s")
    return image


# Boot-time savers under TCG (measured: /init reached ~0.8 s sooner): no Spectre
# patching, no crypto self-tests, no audit, no IO-APIC timer check, one UART probed.
# Not acpi=off: this kernel has no MP-table support, so it would lose the local APIC and MSI.
# Not tsc=reliable: the clocksource watchdog is the guard against a TSC miscalibrated on a
# loaded host (one boot in ~30 reported a guest uptime 5x the wall time with it set).
FAST_BOOT_ARGS = "mitigations=off cryptomgr.notests audit=0 no_timer_check 8250.nr_uarts=1"


def kernel_cmdline(
    ip: str | None = None,
    gw: str | None = None,
    writer: str | None = None,
    extra: str = "",
    *,
    rate: int | None = None,
    dirty: int = 0,
) -> str:
    """Kernel command line for the guest.

    ``ip`` is ADDR/LEN for eth0, ``gw`` the default route, ``writer`` the block device
    for the disk writer, ``rate`` caps its writes/s (default: as fast as it can),
    ``dirty`` makes the guest rewrite that many MiB of its RAM every second (benchmark).
    """
    parts = ["console=ttyS0", "panic=-1", "quiet", FAST_BOOT_ARGS]
    if ip:
        parts.append(f"katamaran.ip={ip}")
    if gw:
        parts.append(f"katamaran.gw={gw}")
    if writer:
        parts.append(f"katamaran.writer={writer}")
    if rate:
        parts.append(f"katamaran.rate={rate}")
    if dirty:
        parts.append(f"katamaran.dirty={dirty}")
    if extra:
        parts.append(extra)
    return " ".join(parts)
