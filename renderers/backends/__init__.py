"""Running the lip-sync model: one interface, two engines, and the choice between them.

    Backend.run(source [B, 1, 80, 16], target [B, 6, 96, 96])  ->  output [B, 3, 96, 96]
    (numpy float32 in and out; B may exceed ``max_batch``: the call is split)

``onnx`` (:mod:`.onnx_backend`) runs any ONNX file that fits the contract: the
shipped built-in model, the reference export, or a user's Wav2Lip weights.
``torch`` (:mod:`.torch_backend`) runs the project's own networks (``builtin``,
``reference``) eagerly, in fp16 and optionally compiled on CUDA; it cannot run an
arbitrary ``.onnx`` file, so a file always goes to onnxruntime.

``select_backend(weights, backend="auto", device="auto")`` decides::

    weights               GPU usable (device auto/cuda)               CPU (device cpu, or no GPU)
    a .onnx file          onnxruntime, CUDA execution provider        onnxruntime, CPU
    builtin / reference   torch CUDA fp16, else onnxruntime CUDA      onnxruntime CPU (else torch)

onnxruntime and torch are imported only here and in the two engine modules,
and only when a backend is built: the session process never loads them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from models import contract, weights

from ..validation import WeightsError

logger = logging.getLogger(__name__)

OWN_NETWORKS = (weights.BUILTIN, weights.REFERENCE)
DEFAULT_MAX_BATCH = 8
ENGINE_OPTIONS = {"onnx": ("threads",), "torch": ("threads", "fp16", "compile")}
_SOURCE_SHAPE = tuple(contract.SOURCE.shape[1:])
_TARGET_SHAPE = tuple(contract.TARGET.shape[1:])
_OUTPUT_SHAPE = tuple(contract.OUTPUT.shape[1:])


class BackendUnavailable(RuntimeError):
    """The requested engine or device is not installed or not present on this machine."""


class Backend(ABC):
    """A loaded model on a device; see the package docstring for the contract."""

    name: str  # e.g. "onnxruntime-cpu", "torch-cuda-fp16"
    device: str  # "cpu" or "cuda:N"
    max_batch: int  # the most frames one inference call takes
    weights: str  # what was loaded: "builtin", "reference" or a file path
    reason: str = ""  # why select_backend chose it

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def run(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Model output for any number of frames, in slices of ``max_batch``."""
        source, target = check_inputs(source, target)
        n = len(source)
        out = np.empty((n, *_OUTPUT_SHAPE), np.float32)
        for i in range(0, n, self.max_batch):
            out[i : i + self.max_batch] = self._run_batch(
                source[i : i + self.max_batch], target[i : i + self.max_batch]
            )
        return out

    def run_tensor(self, source: np.ndarray, target: np.ndarray) -> Any:
        """Like :meth:`run`, but the output is a float32 torch tensor on :attr:`device`.

        Engines on a GPU override this so the output never leaves the device
        (composition runs there too).
        """
        import torch

        return torch.from_numpy(self.run(source, target))

    @abstractmethod
    def _run_batch(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """One inference call, ``len(source) <= max_batch``."""

    def close(self) -> None:
        """Release the session or module (the object is unusable afterwards)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.weights} max_batch={self.max_batch}>"


def check_inputs(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    source = np.ascontiguousarray(source, dtype=np.float32)
    target = np.ascontiguousarray(target, dtype=np.float32)
    if source.shape[1:] != _SOURCE_SHAPE or target.shape[1:] != _TARGET_SHAPE:
        raise ValueError(
            f"model inputs must be source [B, {', '.join(map(str, _SOURCE_SHAPE))}] and "
            f"target [B, {', '.join(map(str, _TARGET_SHAPE))}]; got {source.shape} and "
            f"{target.shape}"
        )
    if len(source) != len(target):
        raise ValueError(f"source has {len(source)} frames, target {len(target)}")
    return source, target


def cuda_index(device: str) -> int:
    """``"cuda"`` -> 0, ``"cuda:1"`` -> 1."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


# ---------------------------------------------------------------- choosing


def onnxruntime_cuda() -> bool:
    """onnxruntime is installed and offers its CUDA execution provider."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def torch_cuda() -> bool:
    """torch is installed, built with CUDA, and sees a GPU."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def select_backend(
    weights_spec: str | os.PathLike[str] = weights.BUILTIN,
    backend: str = "auto",
    device: str = "auto",
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    **options: Any,
) -> Backend:
    """Load ``weights_spec`` on the best engine and device available (table in the module doc).

    ``options`` go to the engine: ``threads`` (onnx), ``fp16``/``compile`` (torch).
    Raises :class:`WeightsError` for an unusable file or spec and
    :class:`BackendUnavailable` when an explicitly requested engine/device is missing.
    """
    spec = os.fspath(weights_spec)
    own = spec in OWN_NETWORKS
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"backend must be 'auto', 'onnx' or 'torch', got {backend!r}")
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if backend == "torch" and not own:
        raise WeightsError(
            f"the torch backend runs only the built-in networks ('builtin', 'reference'); "
            f"{spec} is an ONNX file, which runs on the onnx backend (backend 'onnx' or 'auto')"
        )
    unknown = set(options) - set(ENGINE_OPTIONS["torch"]) - set(ENGINE_OPTIONS["onnx"])
    if unknown:
        raise TypeError(f"unknown backend option(s) {sorted(unknown)}")
    engine, dev, reason = _decide(own, backend, device)
    logger.info("model %s: %s on %s (%s)", spec, engine, dev, reason)
    # Options of the other engine (e.g. fp16 when onnxruntime was chosen) do not apply.
    options = {k: v for k, v in options.items() if k in ENGINE_OPTIONS[engine]}
    if engine == "torch":
        from .torch_backend import TorchBackend

        chosen: Backend = TorchBackend(spec, dev, max_batch=max_batch, **options)
    else:
        from .onnx_backend import OnnxBackend

        chosen = OnnxBackend(_onnx_path(spec), dev, max_batch=max_batch, **options)
        chosen.weights = spec
    chosen.reason = reason
    return chosen


def _decide(own: bool, backend: str, device: str) -> tuple[str, str, str]:
    """(engine, device, why) for the request."""
    want_gpu = device != "cpu"
    gpu = device if device.startswith("cuda") else "cuda:0"
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    ort_gpu = want_gpu and (backend != "torch") and onnxruntime_cuda()
    torch_gpu = want_gpu and own and (backend != "onnx") and torch_cuda()
    if backend == "onnx" or (backend == "auto" and not own):
        if not has_ort:
            raise BackendUnavailable(
                "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu"
            )
        if ort_gpu:
            return "onnx", gpu, "onnxruntime offers the CUDA execution provider"
        if device.startswith("cuda"):
            raise BackendUnavailable(
                "device 'cuda' was asked for but onnxruntime has no CUDA execution provider: "
                "install onnxruntime-gpu in place of onnxruntime"
                + ("" if not own else ", or use backend 'torch' with a CUDA build of torch")
            )
        return "onnx", "cpu", _cpu_reason(device)
    if backend == "torch":
        if torch_gpu:
            return "torch", gpu, "torch sees a CUDA GPU"
        if device.startswith("cuda"):
            raise BackendUnavailable(
                "device 'cuda' was asked for but torch sees no CUDA GPU "
                "(a CPU build of torch, or no driver)"
            )
        return "torch", "cpu", _cpu_reason(device)
    # auto, own network
    if torch_gpu:
        return "torch", gpu, "torch sees a CUDA GPU (fp16)"
    if ort_gpu:
        return "onnx", gpu, "onnxruntime offers the CUDA execution provider; torch sees no GPU"
    if device.startswith("cuda"):
        raise BackendUnavailable(
            "device 'cuda' was asked for but neither torch nor onnxruntime can use a CUDA GPU here"
        )
    if has_ort:
        return "onnx", "cpu", _cpu_reason(device) + "; onnxruntime is the faster CPU engine"
    return "torch", "cpu", _cpu_reason(device) + "; onnxruntime is not installed"


def _cpu_reason(device: str) -> str:
    return "device 'cpu' was asked for" if device == "cpu" else "no usable CUDA GPU"


def _onnx_path(spec: str):
    try:
        return weights.resolve_weights(spec)
    except FileNotFoundError as exc:
        raise WeightsError(str(exc)) from None
