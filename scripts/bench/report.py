"""The summary table printed at the end of a run, one block per section."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .common import is_skipped

# Targets the figures are reported against (never asserted).
RING_CPU_RATIO_TARGET = 7.0
RING_P99_TARGET_US = 1000.0
PACING_P99_TARGET_MS = 2.0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def columns(rows: Sequence[dict], spec: Sequence[tuple[str, str]]) -> str:
    """A table of ``rows`` with one column per ``(header, key)`` of ``spec``."""
    return table([h for h, _ in spec], [[row.get(key) for _, key in spec] for row in rows])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def _env(env: dict) -> str:
    gpu = env.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "none"
    return "\n".join(
        [
            f"cpu      {env['cpu']} ({env['cpu_count']} usable, load {env.get('load_avg')})",
            f"gpu      {gpu_text}",
            f"python   {env['python']}   torch {env['torch']}   av {env['av']}   "
            f"numpy {env['numpy']}",
            f"onnxrt   {env['onnxruntime']}  {', '.join(env['onnxruntime_providers'])}",
        ]
    )


def _model(rows: list[dict]) -> str:
    keys = ("weights", "backend", "device", "batch", "fps")
    return columns(rows, [*((k, k) for k in keys), ("ms/frame", "ms_per_frame")])


def _stages(s: dict) -> str:
    ms = s["ms_per_frame"]
    head = f"{s['backend']} on {s['device']}, batch {s['batch']}, {s['resolution']}"
    body = table([*ms, "total", "fps bound"], [[*ms.values(), s["total_ms"], s["fps_bound"]]])
    return f"{head} (ms per frame)\n{body}"


def _ipc(rows: list[dict]) -> str:
    text = columns(
        rows,
        [
            ("transport", "transport"),
            ("resolution", "resolution"),
            ("p50 us", "p50_us"),
            ("p99 us", "p99_us"),
            ("CPU us/frame", "cpu_us_per_frame"),
        ],
    )
    by = {(r["transport"], r["resolution"]): r for r in rows}
    notes = []
    for resolution in dict.fromkeys(r["resolution"] for r in rows):
        ring, queue = by.get(("ring", resolution)), by.get(("mp_queue", resolution))
        if ring and queue and ring["cpu_us_per_frame"]:
            ratio = queue["cpu_us_per_frame"] / ring["cpu_us_per_frame"]
            notes.append(
                f"{resolution}: ring uses {ratio:.1f}x less CPU per frame than mp.Queue "
                f"(target >= {RING_CPU_RATIO_TARGET:g}x), ring p99 {ring['p99_us']:.0f} us "
                f"(target <= {RING_P99_TARGET_US:g} us)"
            )
    return "\n".join([text, *notes])


def _pacing(rows: list[dict]) -> str:
    target = rows[0]["target_fps"] if rows else None
    text = columns(
        rows,
        [
            ("design", "design"),
            ("fps", "fps"),
            ("p99 |dev| ms", "interval_p99_dev_ms"),
            ("max |dev| ms", "interval_max_dev_ms"),
            ("audio gaps", "audio_gaps"),
            ("gap ms", "gap_ms"),
            ("stalls", "stalls"),
            ("first frame ms", "first_frame_ms"),
        ],
    )
    depth = next((r.get("jitter_frames") for r in rows if r["design"] == "this"), None)
    speed = rows[0].get("tts_speed") if rows else None
    feed = "all at once" if not speed else f"at {speed:g}x real time"
    return (
        f"target {target:g} fps, jittery renderer, speech streamed {feed}, "
        f"jitter_frames={depth}\n{text}\ntargets (this design): p99 |dev| <= "
        f"{PACING_P99_TARGET_MS:g} ms, 0 audio gaps, 0 stalls"
    )


def _sweep(rows: list[dict]) -> str:
    return columns(
        rows,
        [
            ("jitter_frames", "jitter_frames"),
            ("stalls", "stalls"),
            ("audio gaps", "audio_gaps"),
            ("frames held", "frames_held"),
            ("first frame ms", "first_frame_ms"),
            ("p99 |dev| ms", "interval_p99_dev_ms"),
            ("fps", "fps"),
        ],
    )


def _sessions(s: dict) -> str:
    best, failed = s["max_sessions"], s.get("first_failed")
    if best == s.get("search_limit"):
        note = " (the search limit: raise --sessions to look further)"
    elif failed is not None and failed > best + 1:
        note = f" (the limit lies between {best} and {failed - 1})"
    else:
        note = ""
    lines = [
        f"max sessions holding {s['target_fps']:g} fps with 0 stalls: {best}{note}",
        f"device {s['device']}, weights {s['weights']}, jitter_frames {s.get('jitter_frames')}, "
        f"agents streaming at {s.get('tts_speed')}x real time",
    ]
    trials = s.get("trials") or []
    if trials:
        lines.append(
            columns(
                trials,
                [
                    ("sessions", "sessions"),
                    ("held", "ok"),
                    ("min fps", "min_fps"),
                    ("stalls", "stalls"),
                    ("frames held", "frames_held"),
                    ("frames dropped", "frames_dropped"),
                ],
            )
        )
    return "\n".join(lines)


def _latency(s: dict) -> str:
    return (
        f"first audio byte -> first lip-synced frame: {s['first_frame_ms']} ms   "
        f"interrupt -> silence: {s['interrupt_ms']} ms   "
        f"(median of {s.get('rounds', 1)}, jitter_frames={s.get('jitter_frames')})"
    )


FORMATTERS: dict[str, Callable[[Any], str]] = {
    "env": _env,
    "model": _model,
    "stages": _stages,
    "ipc": _ipc,
    "pacing": _pacing,
    "jitter_sweep": _sweep,
    "sessions": _sessions,
    "latency": _latency,
}


def summary(results: dict[str, Any]) -> str:
    blocks = []
    for name, fmt in FORMATTERS.items():
        if name not in results:
            continue
        value = results[name]
        body = f"skipped: {value['skipped']}" if is_skipped(value) else fmt(value)
        blocks.append(f"== {name} ==\n{body}")
    return "\n\n".join(blocks)
