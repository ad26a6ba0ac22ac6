"""Section ``env``: the machine and the library versions the figures were taken with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from .common import BenchConfig, Progress


def cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``; ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_info() -> dict[str, Any] | None:
    """Name and memory of the first CUDA device torch sees, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def onnxruntime_info() -> dict[str, Any] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return {
        "version": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
    }


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> dict[str, Any]:
    progress("env", "collecting versions")
    try:
        import torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    ort = onnxruntime_info()
    return {
        "cpu": cpu_model(),
        "cpu_count": usable_cpus(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],  # other work skews every timing
        "gpu": gpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "onnxruntime": ort["version"] if ort else None,
        "onnxruntime_providers": ort["providers"] if ort else [],
        "av": _version("av"),
        "numpy": _version("numpy"),
    }
