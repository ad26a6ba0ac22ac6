"""Section ``ipc``: handing a frame to another process, frame ring vs ``multiprocessing.Queue``.

Both transports are measured in one run by :func:`renderers.ipc_bench.measure_ipc`
(producer and consumer in two processes, I420 frames plus their audio): the
latency from write to read, and the CPU time both processes spend per frame.
"""

from __future__ import annotations

from typing import Any

from .common import BenchConfig, Progress, Skip

RESOLUTIONS = ((512, 512), (1280, 720))
KEYS = ("transport", "resolution", "p50_us", "p99_us", "cpu_us_per_frame")


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> list[dict]:
    try:
        from renderers.ipc_bench import measure_ipc
    except ImportError as exc:
        raise Skip(f"the ring benchmark is not available ({exc})") from exc
    rows = []
    for width, height in RESOLUTIONS:
        progress("ipc", f"{width}x{height} I420, {config.ipc_frames} frames per transport")
        for result in measure_ipc(width, height, config.ipc_frames):
            row = {key: result[key] for key in KEYS}
            row.update({k: v for k, v in result.items() if k not in row})
            rows.append(row)
    return rows
