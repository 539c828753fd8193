"""TLS for both streams: QEMU `tls-creds-x509` objects over a libvirt-layout directory.

QEMU itself does the TLS (it reads the files from `-tls-dir`, by the fixed names below),
so the files must be readable by the QEMU process at that path.  katamaran adds one
object per run, points the migration (and the NBD server/client) at it, and on every
exit path puts the migration parameters back and deletes the object.

Peer checks: both ends verify the other's certificate against `ca-cert.pem`
(verify-peer).  The source also checks the destination's certificate names the
address it connects to: QEMU's `tls-hostname` is set to `-dest-ip`, so the server
certificate needs that address as a subjectAltName (IP:10.0.0.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config
from .errors import KatamaranError, QMPCommandError, UsageError

if TYPE_CHECKING:
    from .qmp import Monitor

TLS_OBJECT = "katamaran-tls"
FILES = {
    "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
    "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem"),
}
MIGRATION_TLS_PARAMS = ("tls-creds", "tls-hostname")


def endpoint(cfg: Config) -> str:
    return "server" if cfg.mode == "dest" else "client"


def check_files(cfg: Config) -> None:
    """UsageError naming the first missing file, before anything is touched."""
    if not cfg.tls:
        return
    for name in FILES[endpoint(cfg)]:
        path = cfg.tls_dir / name
        if not path.is_file():
            raise UsageError(
                f"-tls: {path} is missing (-tls-dir needs {', '.join(FILES[endpoint(cfg)])})"
            )


class TLSCreds:
    """The run's tls-creds-x509 object and the migration parameters that use it."""

    def __init__(self, mon: Monitor, cfg: Config) -> None:
        self.mon = mon
        self.cfg = cfg
        self.id = TLS_OBJECT
        self.endpoint = endpoint(cfg)
        self.added = False
        self.saved: dict[str, str] = {}

    @property
    def hostname(self) -> str:
        return str(self.cfg.dest_ip) if self.cfg.dest_ip is not None else ""

    async def add(self) -> None:
        await self._delete_object()  # left by an earlier run that died
        try:
            await self.mon.execute(
                "object-add",
                {
                    "qom-type": "tls-creds-x509",
                    "id": self.id,
                    "dir": str(Path(self.cfg.tls_dir).resolve()),
                    "endpoint": self.endpoint,
                    "verify-peer": True,
                },
            )
        except QMPCommandError as err:
            raise KatamaranError(f"TLS setup failed: {err.desc}") from None
        self.added = True
        params = await self.mon.execute("query-migrate-parameters")
        self.saved = {key: params.get(key, "") for key in MIGRATION_TLS_PARAMS}
        wanted = {"tls-creds": self.id}
        if self.endpoint == "client":
            wanted["tls-hostname"] = self.hostname
        await self.mon.execute("migrate-set-parameters", wanted)

    def nbd_client_options(self) -> dict[str, str]:
        """For the source's blockdev-add nbd (tls-hostname: QEMU 7.0+)."""
        return {"tls-creds": self.id, "tls-hostname": self.hostname}

    async def remove(self) -> None:
        """Parameters back as they were, then the object; tolerates a half-done add."""
        if self.saved:
            await self.mon.execute("migrate-set-parameters", self.saved)
            self.saved = {}
        if self.added:
            await self._delete_object()
            self.added = False

    async def _delete_object(self) -> None:
        try:
            await self.mon.execute("object-del", {"id": self.id})
        except QMPCommandError:
            pass  # not there
