"""The benchmark's pure logic: grid, QEMU event arithmetic, medians/spread, pictures, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_katamaran.bench import grid, stats
from pytest_katamaran.bench.cli import parse
from pytest_katamaran.bench.observer import Observed, phases


def test_grid_is_one_factor_sweeps_around_the_base():
    points = grid.expand()
    labels = [p.label for p in points]
    assert len(labels) == len(set(labels)), "every point runs once"
    # 5 disk sizes + 4 more RAM sizes + 2 more workloads + shared + TLS
    assert len(points) == 5 + 4 + 2 + 1 + 1
    for name, sweep in grid.sweeps().items():
        assert grid.BASE in sweep, name
        for point in sweep:  # only the swept factor moves away from the base
            moved = [k for k, v in point.as_dict().items() if v != grid.BASE.as_dict()[k]]
            assert set(moved) <= {"disk_mib", "ram_mib", "workload", "shared", "tls",
                                  "fill_mib", "label"}  # fmt: skip
            assert len(set(moved) - {"fill_mib", "label"}) <= 1, (name, moved)
    assert min(p.disk_mib for p in points) == 64 and max(p.disk_mib for p in points) == 2048
    assert min(p.ram_mib for p in points) == 128 and max(p.ram_mib for p in points) == 2048
    assert {p.workload for p in points} == set(grid.WORKLOADS)
    assert grid.Point(disk_mib=1024).fill_mib == 512  # half the disk holds data


def test_quick_is_the_smallest_point_in_both_size_sweeps():
    assert grid.expand(quick=True) == [grid.QUICK]
    assert grid.sweep_labels(quick=True) == {"disk": [grid.QUICK.label], "ram": [grid.QUICK.label]}
    full = grid.sweep_labels()
    assert set(full) == {"disk", "ram", "workload", "storage", "tls"}
    assert full["tls"][1].endswith("+tls")


def ev(name: str, t: float, **data: object) -> dict:
    secs = int(t)
    return {"event": name, "data": data,
            "timestamp": {"seconds": secs, "microseconds": round((t - secs) * 1e6)}}  # fmt: skip


def test_phases_from_qemu_events():
    seen = Observed(
        source=[
            ev("JOB_STATUS_CHANGE", 100.0, id="m", status="created"),
            ev("JOB_STATUS_CHANGE", 100.1, id="m", status="running"),
            ev("JOB_STATUS_CHANGE", 102.5, id="m", status="ready"),
            ev("MIGRATION", 102.6, status="setup"),
            ev("MIGRATION", 102.7, status="active"),
            ev("STOP", 104.2),
            ev("MIGRATION", 104.206, status="pre-switchover"),
            ev("BLOCK_JOB_COMPLETED", 104.21, device="m", len=1 << 20, offset=1 << 20),
            ev("MIGRATION", 104.209, status="device"),
            ev("MIGRATION", 104.3, status="completed"),
        ],
        dest=[ev("RESUME", 99.0), ev("RESUME", 104.225)],  # the boot's RESUME is not it
        query_migrate={"status": "completed", "downtime": 20, "ram": {"transferred": 12345}},
    )
    got = phases(seen)
    assert got["storage_sync_s"] == pytest.approx(2.5)
    assert got["ram_s"] == pytest.approx(1.5)
    assert got["stop_resume_ms"] == pytest.approx(25.0)
    # where the pause went: QEMU's stop, the controller's part, send and load
    assert got["stop_pause_ms"] == pytest.approx(6.0)
    assert got["switchover_ms"] == pytest.approx(3.0)
    assert got["send_load_ms"] == pytest.approx(16.0)
    assert got["migration_s"] == pytest.approx(4.225)
    assert (got["downtime_ms"], got["ram_bytes"], got["disk_bytes"]) == (20, 12345, 1 << 20)


def test_phases_shared_storage_start_at_migration_setup_and_missing_resume_is_none():
    seen = Observed(
        source=[
            ev("MIGRATION", 10.0, status="setup"),
            ev("MIGRATION", 10.1, status="active"),
            ev("STOP", 11.0),
        ],  # fmt: skip
        dest=[],
    )
    got = phases(seen)
    assert got["storage_sync_s"] is None and got["disk_bytes"] == 0
    assert got["ram_s"] == pytest.approx(0.9)
    assert got["stop_resume_ms"] is None and got["migration_s"] is None
    # no pause-before-switchover (the bare shared-storage flow): no split of the pause
    assert got["stop_pause_ms"] is got["switchover_ms"] is got["send_load_ms"] is None


def test_summary_medians_spread_failures_and_ratios():
    runs = {
        "bare": [{"total_s": 1.0, "downtime_ms": 10}, {"total_s": 3.0, "downtime_ms": 30},
                 {"total_s": 2.0, "downtime_ms": 20}],
        "katamaran": [{"total_s": 2.2, "downtime_ms": 15, "cpu_s": 0.5},
                      {"error": "FlowFailed: boom"}, {"total_s": 2.6, "downtime_ms": 25}],
    }  # fmt: skip
    summary = stats.summarize(runs)
    assert summary["bare"]["total_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summary["katamaran"]["total_s"] == {
        "median": pytest.approx(2.4),
        "min": 2.2,
        "max": 2.6,
        "n": 2,
    }
    assert summary["katamaran"]["failed"] == 1 and summary["bare"]["failed"] == 0
    assert summary["katamaran"]["cpu_s"]["n"] == 1  # a missing figure is not a zero
    assert summary["bare"]["cpu_s"] is None
    r = stats.ratios(summary)
    assert r["total_s"] == pytest.approx(1.2) and r["downtime_ms"] == pytest.approx(1.0)
    assert r["stop_resume_ms"] is None


def test_derived_fixed_cost_and_tail():
    row = {"total_s": 3.0, "migration_s": 1.0, "start": 10.0, "end": 13.0, "resume_at": 11.5}
    got = stats.derive(row)
    assert got["fixed_s"] == 2.0 and got["tail_s"] == 1.5
    assert stats.derive({"total_s": 1.0}).get("fixed_s") is None  # no migration figure: unknown
    summary = stats.summarize({"katamaran": [row]})
    assert summary["katamaran"]["tail_s"]["median"] == 1.5


def small_results() -> dict:
    runs = {
        "bare": [
            {
                "total_s": 1.0,
                "migration_s": 0.9,
                "downtime_ms": 10,
                "stop_resume_ms": 12,
                "stop_pause_ms": 5.0,
                "switchover_ms": 2.5,
                "send_load_ms": 4.5,
            }
        ],
        "katamaran": [
            {
                "total_s": 1.5,
                "migration_s": 0.95,
                "downtime_ms": 11,
                "stop_resume_ms": 13,
                "stop_pause_ms": 6.0,
                "switchover_ms": 3.0,
                "send_load_ms": 4.0,
            }
        ],
    }
    points = []
    for disk in (64, 256):
        p = grid.Point(disk_mib=disk, ram_mib=128)
        s = stats.summarize(runs)
        points.append({"point": p.as_dict(), "runs": runs, "summary": s,
                       "ratios": stats.ratios(s)})  # fmt: skip
    meta = {"date": "2026-11-30 02:00 UTC", "rounds": 1,
            "machine": {"cpu": "Test CPU", "cores": 2, "qemu": "7.2", "accel": "tcg",
                        "loadavg": [1.0, 1.0, 1.0]}}  # fmt: skip
    return {"meta": meta, "sweeps": {"disk": [p["point"]["label"] for p in points]},
            "points": points}  # fmt: skip


def test_plot_draws_pngs_and_svgs_from_a_small_json(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    from pytest_katamaran.bench.plot import draw

    written = draw(small_results(), tmp_path)
    names = sorted(p.name for p in written)
    # no RAM sweep in this JSON: no total_vs_ram picture
    assert names == ["downtime.png", "downtime.svg", "total_vs_disk.png", "total_vs_disk.svg"]
    png = (tmp_path / "total_vs_disk.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "Test CPU" in (tmp_path / "total_vs_disk.svg").read_text()  # the machine footer


def test_markdown_tables_show_median_spread_and_ratio():
    text = stats.markdown(small_results())
    assert "| disk64-ram128-idle-nbd | 1.00 (1.00–1.00) | 1.50 (1.50–1.50) | 1.50× |" in text
    assert "| disk256-ram128-idle-nbd | 10 (10–10) | 11 (11–11) | 12 (12–12) | 13 (13–13) |" in text
    split = "| disk64-ram128-idle-nbd | 5.0 (5.0–5.0) / 6.0 (6.0–6.0) | 2.5 (2.5–2.5) / 3.0"
    assert split in text, text


def test_cli_rounds_and_plot_only(tmp_path):
    assert parse(["--quick"]).rounds == 1 and parse([]).rounds == 3
    assert parse(["--rounds", "5"]).rounds == 5
    cmd = [sys.executable, "-m", "pytest_katamaran.bench"]
    bad = subprocess.run([*cmd, "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds must be at least 1, not 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = tmp_path / "nope.json"
    out = subprocess.run([*cmd, "--plot-only", str(missing), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"bench: cannot read {missing}: "
                                               f"[Errno 2] No such file or directory: "
                                               f"'{missing}'"]  # fmt: skip
    assert not (tmp_path / "o").exists()  # nothing half set up


def test_cli_plot_only_redraws(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    src = tmp_path / "r.json"
    src.write_text(json.dumps(small_results()))
    cmd = [sys.executable, "-m", "pytest_katamaran.bench", "--plot-only", str(src)]
    out = subprocess.run([*cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "downtime.png").is_file()
    assert "| point |" in (tmp_path / "o" / "bench.md").read_text()
    assert not (tmp_path / "o" / "bench.json").exists()  # a redraw writes no results


def test_point_selects_grid_points_and_rejects_unknown_labels(capsys):
    from pytest_katamaran.bench import cli

    args = cli.parse(["--point", "disk512-ram512-disk-writer-nbd", "--rounds", "2"])
    assert args.point == ["disk512-ram512-disk-writer-nbd"] and args.rounds == 2
    with pytest.raises(SystemExit) as bad:
        cli.parse(["--point", "disk3-ram512-idle-nbd"])
    assert bad.value.code == 2
    assert "no grid point 'disk3-ram512-idle-nbd'" in capsys.readouterr().err


def test_qemu_choice_defaults_to_backports_and_rejects_others(capsys):
    from pytest_katamaran.bench import cli

    assert cli.parse([]).qemu == "backports"  # the pods' QEMU: block-job-change, no 7.2 bug
    assert cli.parse(["--qemu", "system"]).qemu == "system"
    with pytest.raises(SystemExit) as bad:
        cli.parse(["--qemu", "9.0"])
    assert bad.value.code == 2
    assert "invalid choice: '9.0'" in capsys.readouterr().err


class _FailingLab:
    """QemuNodes without a boot: its command fails; the config it got and its stops kept."""

    configs: list = []
    stopped: list = []
    serial: Path

    def __init__(self, config, roles):
        from types import SimpleNamespace

        self.configs.append(config)
        self.node_a = SimpleNamespace(ssh=SimpleNamespace(start=lambda cmd, sudo: _FailingRun()))

    def start(self):
        pass

    def serial_logs(self):
        return {"node-a": self.serial}

    def stop(self):
        self.stopped.append(True)


class _FailingRun:
    def wait(self, timeout):
        return 1

    def output(self):
        return ""

    def errors(self):
        return "progress\nboom: no such thing\n"


@pytest.fixture
def failing_lab(monkeypatch, tmp_path):
    import pytest_katamaran.backend.qemu as backend

    serial = tmp_path / "node-a.serial.log"
    serial.write_text("[  1.0] booted\n[  9.9] oom-killer: killed python3\n")
    monkeypatch.setattr(_FailingLab, "serial", serial, raising=False)
    monkeypatch.setattr(_FailingLab, "configs", [])
    monkeypatch.setattr(_FailingLab, "stopped", [])
    monkeypatch.setattr(backend, "QemuNodes", _FailingLab)
    return _FailingLab


def test_run_in_node_failure_names_the_command_and_the_serial_log(failing_lab, tmp_path):
    """A failing command inside the lab node: its last stderr line, the command and the
    node's serial tail, and the node stopped (the boot itself is faked here)."""
    from pytest_katamaran.lab import node

    with pytest.raises(node.NodeRunError) as err:
        node.run_in_node(["scenario.py", "--x"], results_dir=tmp_path, timeout=5)
    text = str(err.value)
    assert text.startswith("the run inside the lab node failed (1): boom: no such thing")
    assert "scenario.py --x" in text and "oom-killer: killed python3" in text
    assert failing_lab.stopped == [True]


@pytest.mark.parametrize(("pod_accel", "cpus"), [("tcg", 2), ("auto", 1), ("kvm", 1)])
def test_run_in_node_sizes_the_node_for_its_nested_guests(failing_lab, tmp_path, pod_accel, cpus):
    """Guests that may run under the node's KVM get a one-vCPU node, as the e2e's pods."""
    from pytest_katamaran.lab import node
    from pytest_katamaran.qemu.node import node_cpus

    with pytest.raises(node.NodeRunError):
        node.run_in_node(["s.py"], results_dir=tmp_path, timeout=5, pod_accel=pod_accel)
    (config,) = failing_lab.configs
    assert node_cpus(config.node_image, config.accel, config.pod_accel) == cpus


def test_katamaran_args_go_to_the_results_and_the_caption():
    from pytest_katamaran.bench import cli
    from pytest_katamaran.bench.stats import caption

    assert cli.parse([]).katamaran_arg == []
    args = cli.parse(["--katamaran-arg=-stream-buffer", "--katamaran-arg=262144"])
    assert args.katamaran_arg == ["-stream-buffer", "262144"]
    machine = {"cpu": "x", "cores": 2, "qemu": "10.0", "accel": "tcg", "loadavg": [0.5]}
    meta = {"machine": machine, "date": "d", "rounds": 3}
    assert "katamaran" not in caption(meta)
    assert caption({**meta, "katamaran_args": args.katamaran_arg}).endswith(
        "; katamaran -stream-buffer 262144"
    )
