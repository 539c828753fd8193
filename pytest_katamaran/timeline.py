"""A migration's timeline picture: ping RTT per packet, lost packets, the cutover's phases.

Why: a results JSON says "lost 0 of 1972, downtime 351 ms, longest gap 6.76 s"; only a
picture shows *when* replies slowed or stopped relative to mirror ready, the traffic
switch, STOP, RESUME/plug release and the CNI convergence.  Every e2e migration and the
demo leave one next to their results JSON (``<stem>.timeline.png``).

Two layers: :func:`build_timeline` is pure (ping stats + the migration's event stamps ->
the numbers drawn: each packet's send time and RTT, lost seqs and where they were sent,
phase positions), :func:`draw` renders a :class:`Timeline` with matplotlib's Agg
backend.  :func:`draw_results` is the glue the ``results`` fixture and the demo call;
``python -m pytest_katamaran.timeline RESULTS.json ...`` redraws from files on disk
(the JSON and its ``.ping1.txt``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_katamaran.agent.client import katamaran_events
from pytest_katamaran.checks.pace import RTT_P90_S
from pytest_katamaran.checks.ping import PingStats, parse_ping_output
from pytest_katamaran.errors import TimelineError

WIDTH_IN, HEIGHT_IN, DPI = 12.0, 7.5, 100  # 1200 x 750 px
SUFFIX = ".timeline.png"
ZOOM_BEFORE_S, ZOOM_AFTER_S = 1.0, 2.0  # the switchover panel around switch..RESUME
ZOOM_NEAR_STOP_S = 10.0  # phases this close to STOP belong to the switchover
# A reply this fast is on time again: the bound the pace probe holds a target to.
ON_TIME_MS = RTT_P90_S * 1000.0
# (colour, line style) per phase, in the order they happen.
PHASE_STYLE = {
    "mirror ready": ("tab:green", "--"),
    "traffic switched": ("tab:purple", "-."),
    "STOP": ("tab:red", "-"),
    "RESUME": ("tab:orange", "-"),
    "RESUME + plug released": ("tab:orange", "-"),
    "CNI converged": ("tab:gray", ":"),
}


@dataclass(frozen=True)
class Timeline:
    """What one picture shows; times are seconds from ``origin`` (STOP, else first send).

    ``answered``: (seq, send time, RTT ms) of every first reply; ``lost``: (seq, estimated
    send time) of every seq never answered (ping's in-flight tail excluded); ``phases``:
    (label, time) in time order; ``zoom``: the switchover panel's x range, or None when
    one panel shows it all.
    """

    title: str
    origin: float
    origin_label: str
    answered: list[tuple[int, float, float]]
    lost: list[tuple[int, float]]
    phases: list[tuple[str, float]]
    zoom: tuple[float, float] | None
    note: str = ""

    @property
    def lost_seqs(self) -> list[int]:
        return [seq for seq, _ in self.lost]


def phase_marks(migration: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The phases of a ``MigrationResult.as_dict()`` as (label, absolute time), in order.

    katamaran logs RESUME and the plug's release as one line, after the release: with a
    plug both are one mark (``RESUME + plug released``).  Missing stamps are left out
    (no mirror with shared storage, no tunnel on a kernel without ipip).
    """
    src = dict(migration.get("events_source") or {})
    dst = dict(migration.get("events_dest") or {})
    if migration.get("katamaran_source_log") or migration.get("katamaran_dest_log"):
        # Older results lack some names (mirror ready): the logs they keep have the stamps.
        src_log, dst_log = katamaran_events(
            migration.get("katamaran_source_log") or "", migration.get("katamaran_dest_log") or ""
        )
        src = {**src_log, **{k: v for k, v in src.items() if v is not None}}
        dst = {**dst_log, **{k: v for k, v in dst.items() if v is not None}}
    # The target's stamps onto the source node's clock (the ping's too: it runs there).
    shift = float(migration.get("dest_clock_offset_s") or 0.0)
    dst = {k: (v - shift if v is not None else None) for k, v in dst.items()}
    converged = dict(migration.get("converged_at") or {})
    target = migration.get("dest_node")
    if target in converged:
        converged[target] = float(converged[target]) - shift
    resume = "RESUME + plug released" if migration.get("plug_released") else "RESUME"
    marks: list[tuple[str, Any]] = [
        ("mirror ready", src.get("mirror ready")),
        ("tap's feed diverted", src.get("feed diverted")),
        ("traffic switched", src.get("tunnel switched")),
        ("STOP", src.get("STOP")),
        (resume, dst.get("RESUME (plug released)")),
    ]
    for node, at in converged.items():
        marks.append((f"CNI converged ({node})", at))
    found = [(label, float(at)) for label, at in marks if at is not None]
    return sorted(found, key=lambda mark: mark[1])


@dataclass(frozen=True)
class AfterResume:
    """How the migrated VM answered once it ran on the target; seconds from RESUME.

    ``first_reply_s``: the first reply received after RESUME, the target VM's first
    answer.  ``on_time_s``: the first reply to a ping sent after RESUME that came within
    ``on_time_ms``: by then the VM had answered what queued for it while it was paused
    and warming up.  None: not seen in the ping.  Why: in the nested TCG lab the target's
    QEMU translates the guest's code again from nothing, so both are many seconds (README,
    "the cold start on node B"); this is how each run shows it in numbers.
    """

    first_reply_s: float | None
    on_time_s: float | None
    on_time_ms: float = ON_TIME_MS

    def describe(self) -> str:
        def fmt(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        return (
            f"first reply {fmt(self.first_reply_s)} after RESUME, "
            f"on time (RTT <= {self.on_time_ms:g} ms) after {fmt(self.on_time_s)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_reply_s": self.first_reply_s,
            "on_time_s": self.on_time_s,
            "on_time_ms": self.on_time_ms,
        }


def after_resume(
    stats: PingStats, migration: Mapping[str, Any], on_time_ms: float = ON_TIME_MS
) -> AfterResume | None:
    """:class:`AfterResume` of one migration's ping; None without a RESUME stamp.

    Reply stamps are ping's (``-D``: the receive time on the pinging node); RESUME is
    moved onto that clock by :func:`phase_marks`.
    """
    resume = next((at for label, at in phase_marks(migration) if label.startswith("RESUME")), None)
    if resume is None:
        return None
    replies = sorted(
        (ts, rtt) for ts, rtt in stats.replies.values() if ts is not None and rtt is not None
    )
    first = next((ts for ts, _ in replies if ts >= resume), None)
    on_time = next(
        (ts for ts, rtt in replies if ts - rtt / 1000.0 >= resume and rtt <= on_time_ms), None
    )
    return AfterResume(
        first_reply_s=None if first is None else round(first - resume, 3),
        on_time_s=None if on_time is None else round(on_time - resume, 3),
        on_time_ms=on_time_ms,
    )


def send_times(stats: PingStats, interval: float) -> dict[int, float]:
    """Send time of every seq from 1 to ``stats.sent`` (in-flight tail excluded).

    An answered seq was sent at its reply stamp minus its RTT (ping -D).  A lost seq's
    send time is interpolated between the nearest answered seqs around it (ping's own
    pace, which lags its interval under load), or extrapolated one ``interval`` per seq
    where only one side exists.
    """
    known = {
        seq: ts - rtt / 1000.0
        for seq, (ts, rtt) in stats.replies.items()
        if ts is not None and rtt is not None
    }
    if not known:
        raise TimelineError(
            "the ping log has no timestamped replies (ping -D with RTTs): nothing to place"
        )
    anchors = sorted(known)
    out: dict[int, float] = {}
    tail = set(stats.in_flight)
    j = 0  # anchors[j] is the first anchor above seq
    for seq in range(1, stats.sent + 1):
        if seq in tail:
            continue
        if seq in known:
            out[seq] = known[seq]
            continue
        while j < len(anchors) and anchors[j] < seq:
            j += 1
        before = anchors[j - 1] if j > 0 else None
        after = anchors[j] if j < len(anchors) else None
        if before is not None and after is not None:
            t0, t1 = known[before], known[after]
            out[seq] = t0 + (t1 - t0) * (seq - before) / (after - before)
        elif before is not None:
            out[seq] = known[before] + (seq - before) * interval
        else:
            assert after is not None
            out[seq] = known[after] - (after - seq) * interval
    return out


def build_timeline(
    stats: PingStats,
    migration: Mapping[str, Any],
    title: str,
    *,
    interval: float | None = None,
    note: str = "",
) -> Timeline:
    """The numbers a picture draws (pure: no matplotlib, no files)."""
    interval = interval or stats.interval
    if not interval or interval <= 0:
        raise TimelineError("no ping interval in the results: cannot place lost pings")
    sent_at = send_times(stats, interval)
    phases_abs = phase_marks(migration)
    stop = next((at for label, at in phases_abs if label == "STOP"), None)
    origin = stop if stop is not None else min(sent_at.values())
    origin_label = "STOP" if stop is not None else "the first ping"
    answered = [
        (seq, sent_at[seq] - origin, float(rtt))
        for seq, (_, rtt) in sorted(stats.replies.items())
        if seq in sent_at and rtt is not None
    ]
    lost = [(seq, sent_at[seq] - origin) for seq in stats.lost if seq in sent_at]
    phases = [(label, at - origin) for label, at in phases_abs]
    zoom = _zoom_window(phases, [t for _, t, _ in answered] + [t for _, t in lost])
    downtime = migration.get("downtime_ms")
    head = [
        f"lost {stats.lost_count} of {stats.sent}",
        f"ping every {interval * 1000:g} ms",
        f"downtime {downtime} ms" if downtime is not None else "downtime n/a",
    ]
    if stats.longest_gap_s is not None:
        head.append(f"longest reply gap {stats.longest_gap_s:.2f} s")
    lines = [title, " · ".join(head)]
    recovered = after_resume(stats, migration)
    if recovered is not None:
        lines.append(recovered.describe())
    return Timeline(
        title="\n".join(lines),
        origin=origin,
        origin_label=origin_label,
        answered=answered,
        lost=lost,
        phases=phases,
        zoom=zoom,
        note=note,
    )


def _zoom_window(
    phases: list[tuple[str, float]], times: Sequence[float]
) -> tuple[float, float] | None:
    """Switch..RESUME with a margin, when it is a small part of the whole run."""
    core = [
        t
        for label, t in phases
        if (label in ("traffic switched", "STOP") or label.startswith("RESUME"))
        and abs(t) <= ZOOM_NEAR_STOP_S
    ]
    if not core or not times:
        return None
    lo, hi = min(core) - ZOOM_BEFORE_S, max(core) + ZOOM_AFTER_S
    span = max([*times, *(t for _, t in phases)]) - min([*times, *(t for _, t in phases)])
    return (lo, hi) if span > 3 * (hi - lo) else None


def _style(label: str) -> tuple[str, str]:
    for key in sorted(PHASE_STYLE, key=len, reverse=True):
        if label.startswith(key):
            return PHASE_STYLE[key]
    return ("black", ":")


def _broken_at_gaps(
    answered: list[tuple[int, float, float]],
) -> tuple[list[float], list[float]]:
    """x and y of the RTT line, with a NaN where seqs are missing: no line across a loss."""
    xs: list[float] = []
    ys: list[float] = []
    prev: int | None = None
    for seq, t, rtt in answered:
        if prev is not None and seq != prev + 1:
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(t)
        ys.append(rtt)
        prev = seq
    return xs, ys


def draw(timeline: Timeline, path: Path) -> tuple[int, int]:
    """Render ``timeline`` to a PNG at ``path``; returns its (width, height) in pixels.

    Agg on a bare Figure: no pyplot state, no display, safe in any thread.  Written to a
    temporary name first, so a failed drawing never leaves a half-written picture.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.transforms import blended_transform_factory
    except ImportError as exc:
        raise TimelineError(
            f"matplotlib is not installed ({exc}): pip install matplotlib"
        ) from None
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    panels = [(None, "the whole ping")]
    if timeline.zoom is not None:
        panels.append((timeline.zoom, "the switchover"))
    grid = fig.add_gridspec(len(panels), 1, height_ratios=[3, 2][: len(panels)], hspace=0.45)
    rtts = [rtt for _, _, rtt in timeline.answered]
    ylo = max(min(rtts) / 2, 1e-3) if rtts else 0.1
    yhi = max(rtts) * 2 if rtts else 1000.0
    stop = next((t for label, t in timeline.phases if label == "STOP"), None)
    resume = next((t for label, t in timeline.phases if label.startswith("RESUME")), None)
    for row, (xlim, what) in enumerate(panels):
        ax = fig.add_subplot(grid[row])
        xs, ys = _broken_at_gaps(timeline.answered)
        ax.plot(xs, ys, color="tab:blue", lw=0.6, marker=".", ms=2.5, label="reply RTT")
        if timeline.lost:
            on_axis = blended_transform_factory(ax.transData, ax.transAxes)
            ax.plot(
                [t for _, t in timeline.lost],
                [0.03] * len(timeline.lost),
                "x",
                color="red",
                ms=7,
                mew=1.5,
                transform=on_axis,
                clip_on=xlim is not None,
                label=f"lost ({len(timeline.lost)})",
            )
        if stop is not None and resume is not None and resume > stop:
            ax.axvspan(stop, resume, color="tab:red", alpha=0.08, label="VM paused")
        for label, t in timeline.phases:
            colour, ls = _style(label)
            ax.axvline(t, color=colour, ls=ls, lw=1.3, label=f"{label} ({t:+.3f} s)")
        ax.set_yscale("log")
        ax.set_ylim(ylo, yhi)
        if xlim is not None:
            ax.set_xlim(*xlim)
        ax.set_ylabel("RTT (ms, log)")
        ax.set_xlabel(f"send time, s from {timeline.origin_label}")
        ax.set_title(what, fontsize=10, loc="left")
        ax.grid(True, which="major", alpha=0.3)
        if row == 0:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(timeline.title, fontsize=11)
    lines = timeline.title.count("\n") + 1  # room for the title, 2.5 % per line
    fig.subplots_adjust(left=0.07, right=0.74, top=0.93 - 0.025 * lines, bottom=0.09)
    if timeline.note:
        fig.text(0.07, 0.01, timeline.note, fontsize=7, color="dimgray")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    width, height = fig.canvas.get_width_height()
    return int(width), int(height)


def timeline_path(json_path: Path) -> Path:
    """``results/x.json`` -> ``results/x.timeline.png``."""
    name = json_path.name.removesuffix(".json")
    return json_path.with_name(name + SUFFIX)


def clock_note(migration: Mapping[str, Any]) -> str:
    """Which clock each stamp is on, when source and destination are different machines."""
    src, dst = migration.get("source_node"), migration.get("dest_node")
    offset, error = migration.get("dest_clock_offset_s"), migration.get("clock_uncertainty_s")
    if offset is None:
        return (
            f"Clocks: ping and STOP/switch stamps on the pinging node and {src}; RESUME and "
            f"{dst}'s convergence on {dst}'s clock, uncorrected (the lab's nodes set their "
            "clocks from the host at boot)."
        )
    return (
        f"Clocks: every stamp on {src}'s (the ping's, STOP, the switch); RESUME and {dst}'s "
        f"convergence moved from {dst}'s by {-offset * 1000:+.0f} ms (offset read over ssh "
        f"after the run, ±{(error or 0) * 1000:.0f} ms)."
    )


def _migration_and_ping(
    results: Mapping[str, Any], ping: PingStats | None = None
) -> tuple[Mapping[str, Any], PingStats] | None:
    """``results["migration"]`` as a mapping and the ping's stats, or None without both."""
    migration = results.get("migration")
    if migration is not None and hasattr(migration, "as_dict"):
        migration = migration.as_dict()
    stats = ping if ping is not None else results.get("ping")
    if not isinstance(migration, Mapping) or not isinstance(stats, PingStats):
        return None
    return migration, stats


def after_resume_figures(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`after_resume` of a test's ``results`` as JSON, for ``results["after_resume"]``.

    None when the results hold no migration with a RESUME stamp and a ping.  Figures that
    cannot be computed are reported as ``{"error": ...}``: they illustrate, never decide.
    """
    found = _migration_and_ping(results)
    if found is None:
        return None
    try:
        figures = after_resume(found[1], found[0])
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return None if figures is None else figures.as_dict()


def draw_results(
    results: Mapping[str, Any],
    title: str,
    out: Path,
    *,
    ping: PingStats | None = None,
    note: str | None = None,
) -> Path | None:
    """Draw the timeline of a test's ``results`` (``migration`` + ``ping``) to ``out``.

    ``migration`` may be a MigrationResult or its ``as_dict()``; the ping comes from
    ``ping`` or ``results["ping"]`` (a PingStats: the JSON form has no per-packet data).
    Returns None when the results hold no migration or no ping: nothing to draw.
    """
    found = _migration_and_ping(results, ping)
    if found is None:
        return None
    migration, stats = found
    tl = build_timeline(
        stats, migration, title, note=clock_note(migration) if note is None else note
    )
    draw(tl, out)
    return out


def redraw(json_path: Path) -> Path:
    """Redraw a results JSON's timeline from it and its ``.ping1.txt`` (same stem)."""
    try:
        payload = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise TimelineError(f"{json_path}: cannot read results JSON ({exc})") from None
    results = payload.get("results") or {}
    if not isinstance(results.get("migration"), Mapping):
        raise TimelineError(f"{json_path}: no migration in its results")
    ping_file = json_path.with_name(json_path.name.removesuffix(".json") + ".ping1.txt")
    if not ping_file.is_file():
        raise TimelineError(f"{json_path}: no ping log next to it ({ping_file.name})")
    interval = (results.get("ping") or {}).get("interval") or (
        (payload.get("katamaran") or {}).get("ping_interval")
    )
    stats = parse_ping_output(ping_file.read_text(errors="replace"), interval)
    title = str(payload.get("nodeid") or json_path.stem)
    out = timeline_path(json_path)
    note = (payload.get("katamaran") or {}).get("timeline_note")  # the demo: one clock
    drawn = draw_results(results, title, out, ping=stats, note=note)
    assert drawn is not None
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_katamaran.timeline",
        description="Redraw the timeline picture of results JSON files (next to each).",
    )
    parser.add_argument("json", nargs="+", type=Path, help="results/<test>.json")
    args = parser.parse_args(argv)
    rc = 0
    for path in args.json:
        try:
            print(redraw(path))
        except TimelineError as exc:
            print(f"timeline: {exc}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
