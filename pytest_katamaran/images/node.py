"""Build (or download) and cache the OS images of the two lab nodes.

Why two kinds: the guide's nodes are Ubuntu 22.04 cloud images on a KVM laptop with
internet; CI has neither, so the offline default ("debian") is virtme-ng style: Debian's
kernel, a small initramfs (``guest/node-init``) and THIS host's root shared read-only over
virtio-9p under a tmpfs overlay. The host's python, QEMU and project checkout are then
visible inside the node at the same paths, and ``modprobe sch_plug`` works because the
kernel's module tree is bound onto ``/lib/modules/<ver>``.

Debian's *cloud* kernel (``guest.fetch_kernel``) has no 9p, so nodes use the generic
``linux-image-amd64`` (same 6.1 series, ~2 s slower to boot under TCG). Everything is
cached under ``$KATAMARAN_CACHE`` (default ``~/.cache/katamaran``), keyed by its recipe,
and built under a file lock so pytest-xdist workers never race.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_katamaran.images.guest import (
    Kernel,
    _locked,
    _stderr_progress,
    build_initramfs,
    cache_root,
    fetch_kernel,
    find_busybox,
)
from pytest_katamaran.images.guest import _run as _guest_run

Progress = Callable[[str], None]

GUEST_DIR = Path(__file__).resolve().parent / "guest"
NODE_INIT = GUEST_DIR / "node-init"
NODE_BOOT = GUEST_DIR / "node-boot"
NODE_CLOUDINIT = GUEST_DIR / "node-cloudinit"
NODE_KERNEL_PACKAGE = "linux-image-amd64"
# Loaded by node-init from the initramfs, dependencies first (resolved at build time).
NODE_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "overlay",
    "isofs",
)
SCRATCH_LABEL = "kmr-scratch"  # ext4 labels hold at most 16 bytes
SCRATCH_SIZE_GIB = 16
UBUNTU_IMAGE_URL = (
    "https://cloud-images.ubuntu.com/releases/22.04/release/ubuntu-22.04-server-cloudimg-amd64.img"
)
UBUNTU_URL_ENV = "KATAMARAN_UBUNTU_IMAGE_URL"
# The Ubuntu nodes' root overlay (virtual, sparse): room for Kata, containerd, k3s, images.
UBUNTU_OVERLAY_GIB = 20
IMAGE_KINDS = ("debian", "ubuntu")
# Bump when the node image recipe changes in a way the hashed inputs do not show.
RECIPE_VERSION = 3


class NodeImageError(RuntimeError):
    """The node image cannot be built or downloaded; the message says why and what to do."""


def _run(cmd: Sequence[str | Path], fix: str = "", cwd: Path | None = None) -> str:
    """guest's build-step runner, failing as NodeImageError (what node_vm reports)."""
    try:
        return _guest_run(cmd, fix, cwd=cwd)
    except RuntimeError as err:
        raise NodeImageError(str(err)) from err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class DebianImage:
    """The offline node: kernel + node initramfs booted over the host's root, plus the
    cached, once-formatted ext4 base that each node's scratch qcow2 overlays."""

    kernel: Path
    initrd: Path
    kernel_version: str
    modules_dir: Path
    scratch_base: Path
    kind: str = "debian"

    @property
    def disk_base(self) -> Path:
        """What a node's COW overlay is created on."""
        return self.scratch_base

    @property
    def disk_base_format(self) -> str:
        """Format of :attr:`disk_base` (``qemu-img create -F``)."""
        return "raw"

    @property
    def overlay_gib(self) -> int | None:
        """Virtual size of a node's overlay: the scratch disk's own (None)."""
        return None

    def files(self) -> list[Path]:
        """Files that must exist to boot (checked by the start scripts)."""
        return [self.kernel, self.initrd, self.modules_dir, self.scratch_base]

    def to_dict(self) -> dict[str, str]:
        """JSON-able form for the testenv manifest."""
        return {
            "kind": self.kind,
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernel_version": self.kernel_version,
            "modules_dir": str(self.modules_dir),
            "scratch_base": str(self.scratch_base),
        }


@dataclass(frozen=True)
class UbuntuImage:
    """The guide's node: the Ubuntu 22.04 cloud image, booted from a qcow2 COW overlay."""

    base: Path
    kind: str = "ubuntu"

    @property
    def disk_base(self) -> Path:
        """What a node's COW overlay is created on."""
        return self.base

    @property
    def disk_base_format(self) -> str:
        """Format of :attr:`disk_base` (the cloud image is qcow2)."""
        return "qcow2"

    @property
    def overlay_gib(self) -> int | None:
        """Virtual size of a node's root overlay (cloud-init's growpart fills it at boot).

        Why: the cloud image's 2.2 GiB root has about 600 MiB free, less than Kata's static
        release, containerd, k3s and the pod images need. qcow2 is sparse: only what the
        node writes takes space on the host.
        """
        return UBUNTU_OVERLAY_GIB

    def files(self) -> list[Path]:
        """Files that must exist to boot."""
        return [self.base]

    def to_dict(self) -> dict[str, str]:
        """JSON-able form for the testenv manifest."""
        return {"kind": self.kind, "base": str(self.base)}


NodeImage = DebianImage | UbuntuImage


def image_from_dict(data: dict[str, Any]) -> NodeImage:
    """Inverse of ``to_dict`` (the testenv manifest)."""
    kind = data.get("kind")
    if kind == "debian":
        return DebianImage(
            kernel=Path(data["kernel"]),
            initrd=Path(data["initrd"]),
            kernel_version=str(data["kernel_version"]),
            modules_dir=Path(data["modules_dir"]),
            scratch_base=Path(data["scratch_base"]),
        )
    if kind == "ubuntu":
        return UbuntuImage(base=Path(data["base"]))
    raise NodeImageError(f"unknown node image kind {kind!r}; expected one of {IMAGE_KINDS}")


# --------------------------------------------------------------------------- debian


def fetch_node_kernel(
    cache_dir: Path | None = None, progress: Progress = _stderr_progress
) -> Kernel:
    """Debian's generic kernel (it has 9p; the cloud kernel has not), extracted and depmod'ed.

    ``guest.fetch_kernel`` for another package, cached in ``node-kernels/<version>/``
    (with the PVH vmlinux when the kernel has one). Without apt metadata a previously
    cached kernel is reused.
    """
    try:
        return fetch_kernel(
            cache_dir,
            progress,
            package=NODE_KERNEL_PACKAGE,
            subdir="node-kernels",
            label="node image",
        )
    except RuntimeError as e:  # callers (node_vm) catch NodeImageError
        raise NodeImageError(str(e)) from e


_LAZY = "lazy_itable_init=1,lazy_journal_init=1"


def _scratch_base(root: Path, progress: Progress) -> Path:
    """A sparse ext4 file system image, formatted once; nodes write to qcow2 overlays of it."""
    base = root / "nodes" / f"scratch-{SCRATCH_SIZE_GIB}g-v{RECIPE_VERSION}.raw"
    if base.is_file():
        return base
    with _locked(root / "nodes" / ".lock-scratch"):
        if base.is_file():
            return base
        progress(f"node image: formatting the {SCRATCH_SIZE_GIB} GiB scratch base (ext4) ...")
        tmp = base.with_name(base.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with tmp.open("wb") as f:
            f.truncate(SCRATCH_SIZE_GIB << 30)
        _run(
            # lazy_*: leave the (sparse, all-zero) inode tables and journal unwritten, so the
            # base stays a few MiB; node-boot mounts with noinit_itable to keep it that way
            ["mkfs.ext4", "-q", "-F", "-L", SCRATCH_LABEL, "-m", "0", "-E", _LAZY, tmp],
            fix="apt-get install e2fsprogs",
        )
        os.replace(tmp, base)
    return base


def node_recipe(kernel: Kernel, busybox: Path) -> dict[str, object]:
    """Everything that determines the node initramfs; its hash is the cache key."""
    return {
        "recipe_version": RECIPE_VERSION,
        "kernel": kernel.version,
        "modules": list(NODE_MODULES),
        "node-init": _sha256(NODE_INIT),
        "node-boot": _sha256(NODE_BOOT),
        "node-cloudinit": _sha256(NODE_CLOUDINIT),
        "busybox": _sha256(busybox),
    }


def build_debian_image(
    cache_dir: Path | None = None, progress: Progress = _stderr_progress
) -> DebianImage:
    """The offline node image, built once per recipe and cached (a cached call takes ms)."""
    root = cache_root(cache_dir)
    kernel = fetch_node_kernel(root, progress)
    try:
        busybox = find_busybox(root, progress)
    except RuntimeError as e:
        raise NodeImageError(f"no static busybox: {e}. Fix: apt-get install busybox-static") from e
    recipe = node_recipe(kernel, busybox)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    nodes = root / "nodes"
    nodes.mkdir(exist_ok=True)
    initrd = nodes / key / "initrd.gz"
    if not initrd.is_file():
        with _locked(nodes / ".lock"):
            if not initrd.is_file():
                progress(f"node image: building initramfs {key} (kernel {kernel.version}) ...")
                t0 = time.monotonic()
                with tempfile.TemporaryDirectory(dir=nodes, prefix=".tmp-") as tmp:
                    staged = Path(tmp) / key
                    staged.mkdir()
                    try:
                        build_initramfs(
                            kernel,
                            NODE_INIT,
                            NODE_MODULES,
                            {"/node-boot": NODE_BOOT, "/node-cloudinit": NODE_CLOUDINIT},
                            out=staged / "initrd.gz",
                            busybox=busybox,
                        )
                    except RuntimeError as e:
                        raise NodeImageError(f"building the node initramfs failed: {e}") from e
                    (staged / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
                    os.rename(staged, nodes / key)
                progress(f"node image: initramfs built in {time.monotonic() - t0:.1f}s")
    return DebianImage(
        kernel=kernel.vmlinux or kernel.vmlinuz,
        initrd=initrd,
        kernel_version=kernel.version,
        modules_dir=kernel.modules_dir,
        scratch_base=_scratch_base(root, progress),
    )


def is_current(image: NodeImage) -> bool:
    """Whether a (testenv manifest's) debian image still matches the node scripts here.

    Why: after a pull that changed ``guest/node-*`` the old initramfs still boots;
    ``start`` warns instead of silently running stale node code.
    """
    if not isinstance(image, DebianImage):
        return True
    kernel = Kernel(
        vmlinuz=image.kernel, modules_dir=image.modules_dir, version=image.kernel_version
    )
    try:
        recipe = node_recipe(kernel, find_busybox(progress=lambda m: None))
    except (OSError, RuntimeError):
        return True
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return image.initrd.parent.name == key


# --------------------------------------------------------------------------- ubuntu


def download(url: str, dest: Path, progress: Progress = _stderr_progress) -> Path:
    """Fetch url to dest atomically (``.part`` then rename), reporting progress.

    Raises NodeImageError ``cannot download <url>: <reason>`` at the first failure: no
    retries, so a machine without internet fails in seconds.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, part.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done, last = 0, 0.0
            progress(f"node image: downloading {url} ({total >> 20} MiB) ...")
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last >= 5 or (total and done == total):
                    pct = f" {100 * done // total}%" if total else ""
                    progress(f"node image: {done >> 20} MiB{pct} ({now - t0:.0f}s)")
                    last = now
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        # from None: the one-line reason is the whole story (no internet, 404, ...)
        raise NodeImageError(f"cannot download {url}: {reason}") from None
    os.replace(part, dest)
    return dest


def fetch_ubuntu_image(
    cache_dir: Path | None = None, progress: Progress = _stderr_progress, url: str | None = None
) -> UbuntuImage:
    """The Ubuntu 22.04 cloud image, downloaded once into the cache."""
    url = url or os.environ.get(UBUNTU_URL_ENV) or UBUNTU_IMAGE_URL
    images = cache_root(cache_dir) / "ubuntu"
    dest = images / url.rstrip("/").rsplit("/", 1)[-1]
    if not dest.is_file():
        with _locked(images / ".lock"):
            if not dest.is_file():
                download(url, dest, progress)
    return UbuntuImage(base=dest)


def build_image(
    kind: str = "debian", cache_dir: Path | None = None, progress: Progress = _stderr_progress
) -> NodeImage:
    """The node image of the given kind, from the cache when possible."""
    if kind == "debian":
        return build_debian_image(cache_dir, progress)
    if kind == "ubuntu":
        return fetch_ubuntu_image(cache_dir, progress)
    raise NodeImageError(f"unknown node image {kind!r}; choose from: {', '.join(IMAGE_KINDS)}")


def create_overlay(image: NodeImage, out: Path) -> Path:
    """A qcow2 copy-on-write overlay of the image's disk base (the base is never written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk_base)]
    argv += ["-F", image.disk_base_format, str(out)]
    if image.overlay_gib:
        argv.append(f"{image.overlay_gib}G")
    _run(argv, fix="apt-get install qemu-utils")
    return out


def overlay_fits(path: Path, image: NodeImage) -> bool:
    """A qcow2 overlay on the image's disk base, at least the size the image asks for."""
    try:
        out = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info = json.loads(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return False
    if info.get("backing-filename") != str(image.disk_base):
        return False
    return not image.overlay_gib or info.get("virtual-size", 0) >= image.overlay_gib << 30
