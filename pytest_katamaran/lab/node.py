"""One Debian-kernel lab node running one Python command as root: the cutover's real kernel.

Why: this host's kernel has no ipip/sch_plug, the Debian node's has.  The node sees this
host's root (the repo, the cached test guest, the backports QEMU are all there), so the
command runs the repo's own code in it.  It prints its progress on stderr (relayed here
as it comes) and one JSON object as the last line of its stdout (returned).
Used by the ping-rate benchmark and by the tunnel-hold fault tests.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class NodeRunError(RuntimeError):
    """The node could not run the command (no node image, the command failed)."""


class NoNodeImage(NodeRunError):
    """No Debian node image could be built or found (a prerequisite, not a failure)."""


def run_in_node(
    args: list[str],
    *,
    results_dir: Path | None = None,
    timeout: float = 3600.0,
    pod_accel: str = "tcg",
) -> dict[str, Any]:
    """Boot one lab node, run `python <args>` there as root (PYTHONPATH = this repo),
    return the JSON object it printed last.

    ``pod_accel``: how the command's nested guests will run (the harness's
    ``--pod-accel``), which sets the node's vCPUs as for the e2e's nodes
    (qemu.node.node_cpus: one where they may run under the node's KVM).
    """
    from pytest_katamaran.backend.qemu import QemuNodes
    from pytest_katamaran.images.node import NodeImageError
    from pytest_katamaran.pluginstate import serial_tails

    config = types.SimpleNamespace(
        node_image="debian",
        accel="tcg",
        pod_accel=pod_accel,
        keep_on_failure=False,
        results_dir=results_dir or Path(tempfile.mkdtemp(prefix="kmr-node-results-")),
    )
    lab = QemuNodes(config, roles=("a",))
    try:
        lab.start()
    except NodeImageError as err:
        raise NoNodeImage(f"no Debian node image: {err}") from None
    command = shlex.join(["env", f"PYTHONPATH={REPO}", sys.executable, *args])
    serial = ""

    def node_log() -> str:  # read while the node's log is still there
        return "\n\n".join(f"{title}:\n{text}" for title, text in serial_tails(lab))

    try:
        proc = lab.node_a.ssh.start(command, sudo=True)
        try:
            rc = _relay(proc, timeout)
        except NodeRunError as err:  # a hung node: its kernel's last words say why
            raise NodeRunError(f"{err}\ncommand: {command}\n{node_log()}") from None
        out, err = proc.output(), proc.errors()
        lines = out.strip().splitlines()
        if rc != 0 or not lines:
            serial = node_log()
    finally:
        lab.stop()
    if rc != 0 or not lines:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise NodeRunError(
            f"the run inside the lab node failed ({rc}): {last}\ncommand: {command}\n{serial}"
        )
    return json.loads(lines[-1])


def _relay(proc: Any, timeout: float) -> int | None:
    """Wait for the inner run, passing its progress (stderr) on as it comes."""
    deadline, shown = time.monotonic() + timeout, 0
    while True:
        rc = proc.wait(1.0)
        err = proc.errors()
        if len(err) > shown:
            sys.stderr.write(err[shown:])
            shown = len(err)
        if rc is not None:
            return rc
        if time.monotonic() > deadline:
            try:
                proc.stop()
            except Exception as err:  # noqa: BLE001 - a hung node does not answer ssh
                raise NodeRunError(
                    f"the run inside the lab node took over {timeout:g} s, and the node "
                    f"no longer answers ssh ({err})"
                ) from None
            raise NodeRunError(f"the run inside the lab node took over {timeout:g} s")
