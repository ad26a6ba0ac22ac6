"""torch engine: the project's own networks (``builtin``, ``reference``), run eagerly.

It builds the torch module from :mod:`models` rather than reading a file, so it
cannot run a user's ``.onnx`` weights (those go to onnxruntime).  On CUDA it
runs in fp16 by default (half the memory traffic, tensor cores) and can be
wrapped in ``torch.compile``; on the CPU it stays fp32 and eager.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from models import contract, weights

from ..validation import WeightsError
from . import DEFAULT_MAX_BATCH, Backend

logger = logging.getLogger(__name__)


def build_module(kind: str):
    """The torch module of one of the project's networks."""
    if kind == weights.BUILTIN:
        from models import parametric

        return parametric.build()
    if kind == weights.REFERENCE:
        from models import wav2lip

        return wav2lip.build()
    raise WeightsError(
        f"the torch backend runs only 'builtin' and 'reference', not {kind!r}; "
        "ONNX files run on the onnx backend"
    )


class TorchBackend(Backend):
    def __init__(
        self,
        kind: str = weights.BUILTIN,
        device: str = "cpu",
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        fp16: bool | None = None,
        compile: bool = False,
        threads: int | None = None,
    ) -> None:
        import torch

        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._torch = torch
        self.weights = kind
        self.device = device if device.startswith("cuda") else "cpu"
        self.max_batch = max_batch
        self.fp16 = self.on_gpu if fp16 is None else (fp16 and self.on_gpu)
        if fp16 and not self.on_gpu:
            logger.info("fp16 is used on CUDA only; %s runs in fp32 on the CPU", kind)
        if threads and not self.on_gpu:
            torch.set_num_threads(threads)
        module = build_module(kind).to(self.device).eval()
        if self.fp16:
            module = module.half()
        self._dtype = torch.float16 if self.fp16 else torch.float32
        if compile:
            module = torch.compile(module, dynamic=False)
        self.module = module
        self.name = f"torch-{'cuda' if self.on_gpu else 'cpu'}{'-fp16' if self.fp16 else ''}"
        self._self_test()

    def _self_test(self) -> None:
        source = np.full((1, *contract.SOURCE.shape[1:]), -4.0, np.float32)
        target = np.full((1, *contract.TARGET.shape[1:]), 0.5, np.float32)
        out = self._run_batch(source, target)
        if not np.isfinite(out).all():
            raise WeightsError(f"the {self.weights} network gives non-finite output")

    def _forward(self, source: np.ndarray, target: np.ndarray):
        torch = self._torch
        with torch.inference_mode():
            s = torch.from_numpy(source).to(self.device, self._dtype, non_blocking=True)
            t = torch.from_numpy(target).to(self.device, self._dtype, non_blocking=True)
            return self.module(s, t).float()

    def _run_batch(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        return self._forward(source, target).cpu().numpy()

    def run_tensor(self, source: np.ndarray, target: np.ndarray) -> Any:
        from . import check_inputs

        source, target = check_inputs(source, target)
        parts = [
            self._forward(source[i : i + self.max_batch], target[i : i + self.max_batch])
            for i in range(0, len(source), self.max_batch)
        ]
        return self._torch.cat(parts)

    def close(self) -> None:
        self.module = None
        if self.on_gpu:
            self._torch.cuda.empty_cache()
