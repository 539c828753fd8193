"""One katamaran per VM: an flock on a file named after the QMP socket, held for the run.

Without it a second run on the same VM would take the first run's live migration for a
leftover and tear it down.  The lock also proves that whatever a run finds on the VM
(a migration paused in `pre-switchover`, a block job, changed migration settings) was
left by a katamaran that is gone, so it may be recovered.  The migration settings a run
is about to change are written next to the lock (`<key>.json`) before the change, so
the run after a SIGKILL can put back the values from before the killed run; the
destination does the same for the sysctls it changes (`<key>.sysctls.json`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import KatamaranError

LOCK_DIR = Path("/run/lock/katamaran")


def lock_dirs() -> list[Path]:
    """/run/lock (tmpfs, cleared at boot like the VMs), else a temp dir if not writable."""
    return [LOCK_DIR, Path(tempfile.gettempdir()) / f"katamaran-locks-{os.getuid()}"]


def lock_file(path: Path, *, wait: bool) -> int:
    """Open and flock ``path``; the fd, locked.  Raises BlockingIOError if another process
    holds it and ``wait`` is false.

    Why the loop: the holder unlinks the file on release (see `unlock_file`), so a taker
    that opened it before the unlink may lock an orphan.  It then sees that the path no
    longer names the inode it locked and tries again on the file now there.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def unlock_file(path: Path, fd: int) -> None:
    """Remove the lock file, then let go of it: only a holder unlinks (see `lock_file`)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


class VMLock:
    """Exclusive, non-blocking flock for one QMP socket; released when the process dies."""

    def __init__(self, qmp: Path, dirs: list[Path] | None = None) -> None:
        self.qmp = Path(qmp)
        key = hashlib.sha256(str(self.qmp.resolve()).encode()).hexdigest()[:32]
        self.key = key
        self.dirs = dirs if dirs is not None else lock_dirs()
        self.path: Path | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        last: OSError | None = None
        for folder in self.dirs:
            path = folder / f"{self.key}.lock"
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = lock_file(path, wait=False)
            except BlockingIOError:
                raise KatamaranError(
                    f"another katamaran (pid {_holder(path)}) is already migrating the VM "
                    f"at {self.qmp}"
                ) from None
            except OSError as err:
                last = err
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            self.path = path
            return
        raise KatamaranError(f"cannot create a lock file for {self.qmp}: {last}")

    def release(self) -> None:
        if self._fd is not None and self.path is not None:
            unlock_file(self.path, self._fd)
            self._fd = None

    def __enter__(self) -> VMLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # Saved state (see module docstring); only touched while the lock is held.  `part`
    # names the file next to the lock: "" for the source's QEMU settings, "sysctls" for
    # the destination's changed sysctls.
    def _state(self, part: str = "") -> Path:
        assert self.path is not None, "lock not held"
        return self.path.with_suffix(f".{part}.json" if part else ".json")

    def load_state(self, part: str = "") -> dict[str, Any] | None:
        try:
            return json.loads(self._state(part).read_text())
        except (OSError, ValueError):
            return None

    def save_state(self, state: dict[str, Any], part: str = "") -> None:
        path = self._state(part)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def clear_state(self, part: str = "") -> None:
        with contextlib.suppress(FileNotFoundError):
            self._state(part).unlink()


def _holder(path: Path) -> str:
    """The pid the holder wrote into its lock file, or "?" (written just after locking)."""
    try:
        return path.read_text(errors="replace").strip() or "?"
    except OSError:
        return "?"


def qemu_identity(pid: int | None) -> str | None:
    """ "<pid>:<start time>" of a process, or None: a pid alone is reused, the pair is not
    (field 22 of /proc/<pid>/stat, in clock ticks since boot)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its ")"
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"
