"""Throw-away x509 files for TLS migrations in the one-machine lab (tests and benchmark).

Why here: the TLS integration tests and the benchmark both need a CA, a server
certificate naming the destination's addresses and a client certificate, in the
libvirt layout katamaran's `-tls-dir` and QEMU's `tls-creds-x509` read.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pytest_katamaran.errors import HarnessError

SERVER_SAN = "IP:10.0.0.2,IP:fd00:10::2"


class OpensslMissing(HarnessError):
    """No `openssl` binary: the certificates cannot be made."""


def lab_certs(tmp: Path, server_san: str = SERVER_SAN) -> Path:
    """A CA, a server certificate naming the destination's addresses, a client certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise OpensslMissing("openssl not found (apt package openssl)")
    tls = tmp / "pki"
    tls.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tls, check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kmr-ca",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
    )  # fmt: skip
    for role, san in (("server", server_san), ("client", "IP:10.0.0.1")):
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=kmr-{role}",
            "-keyout", f"{role}-key.pem", "-out", f"{role}.csr",
        )  # fmt: skip
        ext = tls / f"{role}.ext"
        usage = "serverAuth" if role == "server" else "clientAuth"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        run(
            "x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "1", "-extfile", ext.name, "-out", f"{role}-cert.pem",
        )  # fmt: skip
    for f in tls.glob("*-key.pem"):
        f.chmod(0o644)  # QEMU may run as another user than the test
    return tls
