"""Section ``model``: the lip-sync model alone, per backend, device and batch size.

Each point: a few warm-up calls (not timed: graph optimisation, allocator,
CUDA kernels selection), then ``REPEATS`` timed blocks of calls, each long
enough to time well; the figure is the median block.  On CUDA every block
ends with a device synchronisation, so queued work is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .common import BenchConfig, Progress, Skip, median

BACKENDS = ("onnx", "torch")
WARMUP = 3
REPEATS = 5
MIN_BLOCK_S = 0.15


def example_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the model contract: mel windows in [-4, 4] and face crops in [0, 1]."""
    rng = np.random.default_rng(seed)
    source = rng.uniform(-4.0, 4.0, (batch, 1, 80, 16)).astype(np.float32)
    target = rng.random((batch, 6, 96, 96), dtype=np.float32)
    target[:, :3, 48:] = 0.0
    return source, target


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for queued device work (a no-op on the CPU).

    onnxruntime returns host arrays, so its calls are synchronous already;
    torch queues kernels, so a timed block must end with a synchronisation.
    """
    if not str(device).startswith("cuda"):
        return lambda: None
    try:
        import torch
    except ImportError:
        return lambda: None
    if not torch.cuda.is_available():
        return lambda: None
    return torch.cuda.synchronize


def backends_to_measure(config: BenchConfig, progress: Progress) -> Iterator[Any]:
    """Each backend to measure, opened in turn and closed after (``auto``: every one that loads).

    One at a time, so an idle engine's threads never compete with the measured one.
    """
    try:
        from renderers.backends import select_backend
    except ImportError as exc:
        raise Skip(f"the model backends are not available ({exc})") from exc
    names = BACKENDS if config.backend == "auto" else (config.backend,)
    failures = []
    for name in names:
        try:
            backend = select_backend(
                config.weights, name, config.device, max_batch=max(config.batches)
            )
        except Exception as exc:  # not installed, no such device, or cannot run this file
            failures.append(f"{name}: {exc}")
            progress("model", f"backend {name} unavailable: {exc}")
            continue
        try:
            yield backend
        finally:
            backend.close()
    if len(failures) == len(names):
        raise Skip("no backend could load the weights (" + "; ".join(failures) + ")")


def open_chosen_backend(config: BenchConfig) -> Any:
    """The backend a renderer would pick for this configuration."""
    try:
        from renderers.backends import select_backend
    except ImportError as exc:
        raise Skip(f"the model backends are not available ({exc})") from exc
    return select_backend(
        config.weights, config.backend, config.device, max_batch=max(config.batches)
    )


def seconds_per_call(backend: Any, batch: int) -> float:
    """Median wall time of one ``run`` at ``batch`` (warm-up excluded)."""
    source, target = example_batch(batch)
    sync = synchronizer(backend.device)
    for _ in range(WARMUP):
        backend.run(source, target)
    sync()
    start = time.perf_counter()
    backend.run(source, target)
    sync()
    single = time.perf_counter() - start
    calls = max(1, int(MIN_BLOCK_S / max(single, 1e-6)))
    blocks = []
    for _ in range(REPEATS if single < 0.5 else 2):
        start = time.perf_counter()
        for _ in range(calls):
            backend.run(source, target)
        sync()
        blocks.append((time.perf_counter() - start) / calls)
    return median(blocks)


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> list[dict]:
    rows = []
    for backend in backends_to_measure(config, progress):
        for batch in config.batches:
            if batch > backend.max_batch:
                progress(
                    "model",
                    f"{backend.name}: batch {batch} skipped "
                    f"(this file takes at most {backend.max_batch} frames a call)",
                )
                continue
            seconds = seconds_per_call(backend, batch)
            row = {
                "weights": config.weights,
                "backend": backend.name,
                "device": backend.device,
                "batch": batch,
                "fps": round(batch / seconds, 1),
                "ms_per_frame": round(1000.0 * seconds / batch, 3),
            }
            progress("model", f"{backend.name} batch {batch}: {row['fps']} fps")
            rows.append(row)
    return rows
