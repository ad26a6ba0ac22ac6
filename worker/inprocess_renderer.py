"""``InProcessRenderer``: an ``AvatarRenderer`` that runs a ``FrameRenderer`` in this process.

For tests, benchmarks and debugging: the live path runs the frame renderer in
the renderer process behind :class:`~worker.shm_renderer.ShmRenderer`.  Both
yield the same frames for a deterministic renderer.  Rendering runs in a
worker thread so the event loop keeps its pace.
"""

from __future__ import annotations

import asyncio
from collections import deque
from fractions import Fraction

import numpy as np
from av import AudioFrame, VideoFrame

from renderers.base import FrameRenderer, RenderJob

from .types import AudioSegmentEnd, AvatarRenderer

_END = object()


class InProcessRenderer(AvatarRenderer):
    def __init__(self, renderer: FrameRenderer) -> None:
        self.renderer = renderer
        self._stream = renderer.open_stream()
        self._jobs: deque[RenderJob | object] = deque()
        self._ready = asyncio.Event()
        self._epoch = 0
        self._closed = False
        self._time_base = Fraction(1, renderer.sample_rate)

    async def push_stream_chunk(self, frame: AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self._jobs.extend(self._stream.end_segment())
            self._jobs.append(_END)
        else:
            pcm = frame.to_ndarray().ravel().astype(np.int16, copy=False)
            self._jobs.extend(self._stream.push(pcm))
        self._ready.set()

    def reset_stream(self) -> None:
        self._epoch += 1
        self._jobs.clear()
        self._stream.reset()

    def idle_frames(self) -> list[VideoFrame]:
        return [VideoFrame.from_ndarray(f, format="yuv420p") for f in self.renderer.idle_frames()]

    async def aclose(self) -> None:
        self._closed = True
        self._ready.set()

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        while not self._closed:
            if not self._jobs:
                self._ready.clear()
                await self._ready.wait()
                continue
            if self._jobs[0] is _END:
                self._jobs.popleft()
                yield AudioSegmentEnd()
                continue
            batch: list[RenderJob] = []
            while self._jobs and self._jobs[0] is not _END and len(batch) < self.renderer.max_batch:
                batch.append(self._jobs.popleft())
            epoch = self._epoch
            images = await asyncio.to_thread(self.renderer.render, batch)
            if epoch != self._epoch:
                continue  # interrupted while rendering
            for job, image in zip(batch, images, strict=True):
                yield self._video(image, job.span.pts)
                yield self._audio(job.span.audio, job.span.pts)
                if epoch != self._epoch:
                    break

    def _video(self, image: np.ndarray, pts: int) -> VideoFrame:
        frame = VideoFrame.from_ndarray(image, format="yuv420p")
        frame.pts, frame.time_base = pts, self._time_base
        return frame

    def _audio(self, pcm: np.ndarray, pts: int) -> AudioFrame:
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.renderer.sample_rate
        frame.pts, frame.time_base = pts, self._time_base
        return frame
