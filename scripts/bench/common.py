"""What every section shares: the run's settings, skips, statistics and progress lines."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from worker.synchronizer import DEFAULT_JITTER_FRAMES

T = TypeVar("T")


@dataclass
class BenchConfig:
    """The command line, parsed; every section reads what it needs from here."""

    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto (every backend installed) | onnx | torch
    weights: str = "builtin"  # builtin | reference | path to an ONNX file
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    sessions: int | None = None  # None: search upwards until a session count fails
    duration: float = 4.0  # seconds of speech per pacing, sweep and sessions run
    tts_speed: float = 1.0  # how fast the agent streams speech, in multiples of real time
    fps: float = 25.0
    width: int = 512
    height: int = 512
    sample_rate: int = 24_000
    jitter_frames: int = DEFAULT_JITTER_FRAMES  # jitter buffer for pacing, sessions, latency
    jitter_sweep: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    ipc_frames: int = 300
    seed: int = 0
    max_sessions: int = 64  # upper bound of the ``auto`` search
    in_process: bool = False  # render in the benchmark's process (debugging)


class Skip(Exception):
    """Raised inside a section when it cannot run; the message is the reason shown."""


def skipped(reason: str) -> dict[str, str]:
    return {"skipped": reason}


def is_skipped(result: object) -> bool:
    return isinstance(result, dict) and set(result) == {"skipped"}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Progress:
    """One line per step on stderr, prefixed by the section and the time since start."""

    def __init__(self, stream=None, *, quiet: bool = False) -> None:
        self._stream = stream or sys.stderr
        self._quiet = quiet
        self._t0 = time.monotonic()

    def __call__(self, section: str, message: str) -> None:
        if self._quiet:
            return
        elapsed = time.monotonic() - self._t0
        print(f"[{elapsed:6.1f}s] {section:8s} {message}", file=self._stream, flush=True)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh event loop (uvloop where installed, as sessions do)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
