"""``LipSyncRenderer``: audio in, lip-synced I420 frames out, through a Wav2Lip-contract model.

Per render call (``jobs`` from any number of sessions' streams)::

    job.features  [1, 80, 16] mel window   --stack-->  source [B, 1, 80, 16]
    job.span.index -> base frame k (walks the avatar's idle loop)
    avatar crop k  -> target [6, 96, 96] (precomputed per frame)  --gather-->  target [B, 6, 96, 96]
    backend.run(source, target) -> faces [B, 3, 96, 96]                  (inference)
    paste each face into base frame k's crop box with the feathered mask (compose)
    box region -> Y, U, V over a copy of frame k's I420                   (I420 conversion)

When the model runs on a GPU the faces stay there and composition runs there
too (torch); otherwise numpy/OpenCV on the CPU.  Idle frames are the avatar's
idle loop, precomputed: no inference.

Weights are swapped with :meth:`LipSyncRenderer.swap_weights` between render
calls: the new file is loaded and test-run completely before it replaces the
old one, and a file that fails leaves the old weights in place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.audio_features import MelStream
from models.contract import make_target

from .avatar import Avatar, default_avatar, load_avatar
from .backends import DEFAULT_MAX_BATCH, Backend, select_backend, torch_cuda
from .base import FrameRenderer, RenderJob, RenderStream
from .compose import FrameComposer, TorchFrameComposer
from .framing import FrameSpan

logger = logging.getLogger(__name__)


class LipSyncStream(RenderStream):
    """A session's audio: frames released once their 200 ms mel window can be computed."""

    def __init__(self, sample_rate: int, fps: float) -> None:
        self.mel = MelStream(sample_rate)
        super().__init__(sample_rate, fps, lookahead=self.mel.lookahead)

    @property
    def lookahead(self) -> int:
        """Samples of future audio a frame waits for (about 215 ms)."""
        return self.mel.lookahead

    def _features(self, span: FrameSpan) -> np.ndarray:
        return self.mel.window(span.pts)

    def _on_pcm(self, pcm: np.ndarray) -> None:
        self.mel.push(pcm)

    def _on_segment_end(self) -> None:
        self.mel.end_segment()

    def _on_reset(self) -> None:
        self.mel.reset()


@dataclass(slots=True)
class RenderTimings:
    """Seconds spent in the stages of the last :meth:`LipSyncRenderer.render` call.

    On a GPU the stages overlap with asynchronous work, so only their sum is exact.
    """

    frames: int = 0
    inference: float = 0.0
    compose: float = 0.0
    convert: float = 0.0


class LipSyncRenderer(FrameRenderer):
    def __init__(
        self,
        weights: str | os.PathLike[str] = "builtin",
        avatar: str | os.PathLike[str] | Avatar | None = None,
        *,
        backend: str = "auto",
        device: str = "auto",
        fps: float = 25.0,
        sample_rate: int = 24_000,
        max_batch: int = DEFAULT_MAX_BATCH,
        width: int | None = None,
        height: int | None = None,
        composer: str = "auto",
        **backend_options: Any,
    ) -> None:
        """Load the avatar and the model (see :func:`~renderers.backends.select_backend`).

        ``composer`` is "auto" (torch when the model runs on a CUDA GPU that torch
        can use, else numpy), "numpy" or "torch"; ``backend_options`` go to the
        engine (``threads``; ``fp16`` and ``compile`` for torch).
        """
        if composer not in ("auto", "numpy", "torch"):
            raise ValueError(f"composer must be 'auto', 'numpy' or 'torch', got {composer!r}")
        self.composer = composer
        self.fps, self.sample_rate, self.max_batch = fps, sample_rate, max_batch
        self._choice = {"backend": backend, "device": device, "max_batch": max_batch}
        self._choice.update(backend_options)
        self.avatar = self._load_avatar(avatar, width, height, fps)
        self.width, self.height = self.avatar.width, self.avatar.height
        self._targets = make_target(self.avatar.crops)  # [N, 6, 96, 96], gathered per batch
        self._numpy_composer = FrameComposer(self.avatar)
        self._torch_composer: TorchFrameComposer | None = None
        self._lock = threading.Lock()
        self.timings = RenderTimings()
        self._backend = select_backend(weights, **self._choice)
        if self._backend.on_gpu:
            self.warmup()

    @staticmethod
    def _load_avatar(avatar, width: int | None, height: int | None, fps: float) -> Avatar:
        if isinstance(avatar, Avatar):
            loaded = avatar
        elif avatar is None:
            loaded = default_avatar(width or 512, height or 512, fps)
        else:
            loaded = load_avatar(Path(avatar), fps=fps)
        if abs(loaded.fps - fps) > 1e-6:
            logger.warning(
                "avatar %s was prepared at %g fps and plays at %g fps: its motion runs %s",
                loaded.source,
                loaded.fps,
                fps,
                "faster" if fps > loaded.fps else "slower",
            )
        if width and height and (width, height) != (loaded.width, loaded.height):
            logger.info(
                "avatar %dx%d rescaled to %dx%d", loaded.width, loaded.height, width, height
            )
            loaded = loaded.resized(width, height)
        return loaded

    # ------------------------------------------------------------ FrameRenderer

    @property
    def backend(self) -> Backend:
        return self._backend

    def open_stream(self) -> LipSyncStream:
        return LipSyncStream(self.sample_rate, self.fps)

    def idle_frames(self) -> list[np.ndarray]:
        return self.avatar.idle

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        return self._draw(jobs, None)

    def render_into(self, jobs: Sequence[RenderJob], out: Sequence[np.ndarray]) -> None:
        """Compose each frame straight into ``out`` (the frame ring slots)."""
        if len(out) != len(jobs):
            raise ValueError(f"{len(out)} buffers for {len(jobs)} jobs")
        self._draw(jobs, out)

    def _draw(
        self, jobs: Sequence[RenderJob], out: Sequence[np.ndarray] | None
    ) -> list[np.ndarray]:
        if not jobs:
            return []
        for job in jobs:
            if job.features is None:
                raise ValueError(
                    "a render job has no mel window: jobs must come from a stream opened "
                    "with LipSyncRenderer.open_stream()"
                )
        bases = [self.avatar.base_index(job.span.index) for job in jobs]
        source = np.stack([np.asarray(job.features, dtype=np.float32) for job in jobs])
        target = self._targets[bases]
        timings = RenderTimings(frames=len(jobs))
        with self._lock:
            backend = self._backend
            start = time.perf_counter()
            if self._torch_composes(backend):
                faces = backend.run_tensor(source, target)
                composer: Any = self._tensor_composer(backend.device)
            else:
                faces = backend.run(source, target)
                composer = self._numpy_composer
            timings.inference = time.perf_counter() - start
        if isinstance(composer, TorchFrameComposer):
            start = time.perf_counter()
            frames = composer.compose(bases, faces, out)
            timings.compose = time.perf_counter() - start
        else:
            frames = []
            targets = out if out is not None else [None] * len(jobs)
            for base, face, target in zip(bases, faces, targets, strict=True):
                t0 = time.perf_counter()
                region = composer.paste(base, face)
                t1 = time.perf_counter()
                frames.append(composer.to_i420(base, region, target))
                timings.compose += t1 - t0
                timings.convert += time.perf_counter() - t1
        self.timings = timings
        return frames

    def _torch_composes(self, backend: Backend) -> bool:
        if self.composer != "auto":
            return self.composer == "torch"
        # onnxruntime-gpu may sit beside a CPU build of torch: then compose on the CPU.
        return backend.on_gpu and torch_cuda()

    def _tensor_composer(self, device: str) -> TorchFrameComposer:
        composer = self._torch_composer
        if composer is None or str(composer.device) != str(device):
            composer = self._torch_composer = TorchFrameComposer(self.avatar, device)
        return composer

    # ------------------------------------------------------------ weights

    def swap_weights(self, weights: str | os.PathLike[str]) -> Backend:
        """Load ``weights`` (file, 'builtin' or 'reference') and use it from the next render call.

        The new model is loaded and test-run before anything changes; on
        :class:`~renderers.validation.WeightsError` (or any load failure) the
        current weights stay in use.
        """
        new = select_backend(weights, **self._choice)
        if new.on_gpu:
            self._warmup_backend(new)
        with self._lock:
            old, self._backend = self._backend, new
        old.close()
        logger.info("weights swapped: %s -> %s (%s)", old.weights, new.weights, new.name)
        return new

    def warmup(self) -> None:
        """Run every batch size once (lets a GPU engine pick its kernels before real frames)."""
        self._warmup_backend(self._backend)

    def _warmup_backend(self, backend: Backend) -> None:
        for n in range(1, min(self.max_batch, backend.max_batch) + 1):
            source = np.full((n, 1, 80, 16), -4.0, np.float32)
            backend.run(source, self._targets[np.arange(n) % len(self._targets)])

    def close(self) -> None:
        with self._lock:
            self._backend.close()
        self._torch_composer = None


def build(**kwargs: Any) -> LipSyncRenderer:
    """Factory for the renderer process (importable by name, keyword arguments only)."""
    return LipSyncRenderer(**kwargs)
