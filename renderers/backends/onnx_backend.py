"""onnxruntime engine: any ONNX file that fits the model contract.

On a GPU it uses the CUDA execution provider with IO binding: inputs are
copied to the device once per call and the output is written either to a
device buffer onnxruntime owns (then copied to the host) or straight into a
torch tensor (``run_tensor``), so composition can continue on the GPU.

Session options are set for one latency-bound caller: all graph optimisations,
sequential execution, the memory pattern planner on, a few intra-op threads
that sleep rather than spin between calls, and no inter-op pool.

A file with a fixed batch size ``b`` runs ``b`` frames per call (smaller
batches are padded); a dynamic-batch file runs up to ``max_batch``.  The file is
run once at load (batch 1 and, for a dynamic batch, 2): a file that declares
the right shapes but fails to run is refused at load, not in a session, and a
"dynamic" file that only runs batch 1 is used with batch 1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from models import contract

from ..validation import WeightsError, read_binding
from . import DEFAULT_MAX_BATCH, Backend, BackendUnavailable, cuda_index

logger = logging.getLogger(__name__)

_OUT = tuple(contract.OUTPUT.shape[1:])


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use, at most 8 (more rarely helps)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(8, available))


class OnnxBackend(Backend):
    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "cpu",
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.path = Path(path)
        self.weights = str(self.path)
        read_binding(self.path)  # file-level problems, explained before onnxruntime sees it
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(
                "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu"
            ) from exc
        self._ort = ort
        self.session = self._open(device, threads or default_threads())
        self.device = device if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        if device != "cpu" and self.device == "cpu":
            logger.warning(
                "onnxruntime could not start its CUDA execution provider (CUDA or cuDNN libraries "
                "missing?); %s runs on the CPU",
                self.path.name,
            )
        try:  # onnxruntime's own view of the graph, after optimisation
            self.binding = contract.bind_io(self.session.get_inputs(), self.session.get_outputs())
        except contract.ModelContractError as exc:
            raise WeightsError(f"{self.path}: {exc}") from None
        self._dtype = np.float16 if self.binding.dtype == "float16" else np.float32
        self.fixed_batch = self.binding.batch
        self.max_batch = self.fixed_batch or max_batch
        self.name = f"onnxruntime-{'cuda' if self.on_gpu else 'cpu'}"
        self._self_test()

    # ------------------------------------------------------------ loading

    def _open(self, device: str, threads: int):
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_mem_pattern = True
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No spin-waiting between calls: the renderer shares the CPUs with session
        # processes, and spinning threads on a busy host make batches several times slower.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; problems are reported by this module
        providers: list[Any] = ["CPUExecutionProvider"]
        if device != "cpu":
            cuda_options = {"device_id": cuda_index(device), "cudnn_conv_algo_search": "EXHAUSTIVE"}
            providers.insert(0, ("CUDAExecutionProvider", cuda_options))
        try:
            return ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            if device != "cpu":  # the GPU, not the file, may be the problem
                try:
                    session = ort.InferenceSession(str(self.path), options, providers=providers[1:])
                except Exception:
                    pass
                else:
                    logger.warning("onnxruntime's CUDA provider failed (%s)", _first_line(exc))
                    return session
            raise WeightsError(f"onnxruntime cannot load {self.path}: {_first_line(exc)}") from exc

    def _self_test(self) -> None:
        sizes = [self.fixed_batch or 1]
        if self.fixed_batch is None and self.max_batch > 1:
            sizes.append(2)
        for n in sizes:
            source = np.full((n, *contract.SOURCE.shape[1:]), -4.0, np.float32)
            target = np.full((n, *contract.TARGET.shape[1:]), 0.5, np.float32)
            try:
                out = self._run_batch(source, target)
            except Exception as exc:
                if n > 1:
                    logger.warning(
                        "%s declares a dynamic batch but fails at batch %d; running one frame "
                        "per call",
                        self.path.name,
                        n,
                    )
                    self.max_batch = 1
                    return
                raise WeightsError(f"{self.path} loads but fails when run: {exc}") from exc
            if out.shape != (n, *_OUT) or not np.isfinite(out).all():
                raise WeightsError(
                    f"{self.path} gives output {tuple(out.shape)} for batch {n}, "
                    f"expected {(n, *_OUT)} with finite values"
                )

    # ------------------------------------------------------------ running

    def _feeds(self, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        n = len(source)
        if self.fixed_batch and n < self.fixed_batch:  # pad with copies of the last frame
            pad = self.fixed_batch - n
            source = np.concatenate([source, np.repeat(source[-1:], pad, axis=0)])
            target = np.concatenate([target, np.repeat(target[-1:], pad, axis=0)])
        return source.astype(self._dtype, copy=False), target.astype(self._dtype, copy=False), n

    def _run_batch(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        source, target, n = self._feeds(source, target)
        b = self.binding
        if not self.on_gpu:
            (out,) = self.session.run([b.output], {b.source: source, b.target: target})
        else:
            io = self.session.io_binding()
            io.bind_cpu_input(b.source, source)
            io.bind_cpu_input(b.target, target)
            io.bind_output(b.output, "cuda", cuda_index(self.device))
            self.session.run_with_iobinding(io)
            out = io.copy_outputs_to_cpu()[0]
        return np.asarray(out[:n], dtype=np.float32)

    def run_tensor(self, source: np.ndarray, target: np.ndarray) -> Any:
        if not self.on_gpu:
            return super().run_tensor(source, target)
        import torch

        from . import check_inputs

        source, target = check_inputs(source, target)
        b = self.binding
        torch_dtype = torch.float16 if self._dtype == np.float16 else torch.float32
        outputs = []
        for i in range(0, len(source), self.max_batch):
            s, t, n = self._feeds(source[i : i + self.max_batch], target[i : i + self.max_batch])
            out = torch.empty((len(s), *_OUT), dtype=torch_dtype, device=self.device)
            io = self.session.io_binding()
            io.bind_cpu_input(b.source, s)
            io.bind_cpu_input(b.target, t)
            io.bind_output(
                b.output,
                "cuda",
                cuda_index(self.device),
                self._dtype,
                tuple(out.shape),
                out.data_ptr(),
            )
            self.session.run_with_iobinding(io)
            outputs.append(out[:n].float())
        return torch.cat(outputs)

    def close(self) -> None:
        self.session = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
