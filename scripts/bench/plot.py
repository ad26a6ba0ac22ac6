"""``--plot``: frame intervals of both designs over time, and model fps against batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import is_skipped


def _skipped_panel(ax, title: str, reason: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, f"skipped: {reason}", ha="center", va="center", wrap=True)
    ax.set_axis_off()


def _intervals(ax, results: dict[str, Any], artifacts: dict[str, Any]) -> None:
    """Time between successive new pictures at the listener: 1/fps when paced, more on a stall."""
    title = "pacing: time between new pictures at the listener"
    traces = artifacts.get("pacing_traces")
    if not traces:
        reason = results.get("pacing", {}).get("skipped", "not run")
        _skipped_panel(ax, title, reason)
        return
    for design, trace in traces.items():
        times = np.asarray(trace.video_times)[np.asarray(trace.video_new, dtype=bool)]
        span = trace.speech_frames()
        if times.size < 2 or span is None:
            continue
        start, end = trace.audio_times[span[0]] - times[0], trace.audio_times[span[1]] - times[0]
        line = ax.plot(times[1:] - times[0], np.diff(times) * 1000.0, label=design, lw=0.9)[0]
        ax.axvspan(start, end, color=line.get_color(), alpha=0.06)
    fps = next(iter(traces.values())).fps
    ax.axhline(1000.0 / fps, color="grey", linestyle="--", linewidth=0.8, label="1/fps")
    ax.set_title(title)
    ax.set_xlabel("time since the session started (s); shaded: speech")
    ax.set_ylabel("interval (ms)")
    ax.legend()


def _model(ax, results: dict[str, Any]) -> None:
    title = "model throughput"
    rows = results.get("model")
    if not rows or is_skipped(rows):
        _skipped_panel(ax, title, rows["skipped"] if rows else "not run")
        return
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault(f"{row['backend']} {row['device']}", []).append(
            (row["batch"], row["fps"])
        )
    for label, points in series.items():
        batches, fps = zip(*sorted(points), strict=True)
        ax.plot(batches, fps, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({row["batch"] for row in rows}))
    ax.get_xaxis().set_major_formatter("{x:g}")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{title} ({rows[0]['weights']} weights)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("frames per second")
    ax.legend()


def write_plot(path: str | Path, results: dict[str, Any], artifacts: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    try:
        _intervals(left, results, artifacts)
        _model(right, results)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
