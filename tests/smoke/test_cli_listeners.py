"""CLI validation of the listener/TLS flags: exit 2 and one specific line, nothing touched."""

from __future__ import annotations

import pytest

NO_SOCK = "/nonexistent/qmp.sock"


def usage_error(r, fragment: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert fragment in r.stderr.splitlines()[0], r.stderr


@pytest.mark.parametrize(
    ("mode", "present", "missing"),
    [
        ("dest", ["ca-cert.pem", "server-cert.pem"], "server-key.pem"),
        ("source", ["ca-cert.pem", "client-key.pem"], "client-cert.pem"),
        ("dest", [], "ca-cert.pem"),
    ],
)
def test_tls_missing_file_is_named(run_cli, tmp_path, mode, present, missing):
    for name in present:
        (tmp_path / name).write_text("x")
    extra = ["-dest-ip", "10.0.0.2", "-vm-ip", "10.244.1.5"] if mode == "source" else []
    r = run_cli("-mode", mode, "-qmp", NO_SOCK, "-tls", "-tls-dir", str(tmp_path), *extra)
    usage_error(r, f"-tls: {tmp_path / missing} is missing")


def test_tls_files_present_reach_qmp_stage(run_cli, tmp_path):
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (tmp_path / name).write_text("x")
    r = run_cli("-mode", "dest", "-qmp", NO_SOCK, "-tls", "-tls-dir", str(tmp_path))
    assert r.returncode == 1 and "Failed to connect to QMP" in r.stderr, r.stderr


@pytest.mark.parametrize("flag", ["-source-ip", "-listen-ip"])
def test_destination_flags_rejected_on_source(run_cli, flag):
    r = run_cli(
        "-mode", "source", "-qmp", NO_SOCK, "-dest-ip", "10.0.0.2", "-vm-ip", "10.244.1.5",
        flag, "10.0.0.1",
    )  # fmt: skip
    usage_error(r, "-source-ip and -listen-ip are destination flags")


def test_source_ip_and_listen_ip_of_different_families(run_cli):
    r = run_cli("-mode", "dest", "-qmp", NO_SOCK, "-source-ip", "10.0.0.1", "-listen-ip", "fd00::2")
    usage_error(r, "-source-ip 10.0.0.1 can never reach -listen-ip fd00::2")


def test_v4_mapped_source_with_v4_listen_ip_is_fine(run_cli):
    r = run_cli(
        "-mode", "dest", "-qmp", NO_SOCK, "-source-ip", "::ffff:10.0.0.1", "-listen-ip", "10.0.0.2"
    )  # fmt: skip
    assert r.returncode == 1 and "Failed to connect to QMP" in r.stderr, r.stderr
