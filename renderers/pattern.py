"""A deterministic, dependency-free test renderer (numpy only).

Draws a flat stylised face whose mouth opens with the RMS of the frame's
audio, and a *sync marker* square in the top-left corner that turns white in
frames whose audio holds a click (a sample above ``click_level``).  Output
depends only on the audio, so two runs (in-process or through the renderer
process) give identical frames, and a receiver can measure A/V offset by
matching marker flashes to audio clicks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import FrameRenderer, RenderJob, RenderStream, i420_shape

MARKER = 32  # marker square size in pixels


class PatternRenderer(FrameRenderer):
    def __init__(
        self,
        width: int = 512,
        height: int = 512,
        fps: float = 25.0,
        sample_rate: int = 24_000,
        *,
        max_batch: int = 8,
        click_level: int = 20_000,
        idle_length: int = 50,
    ) -> None:
        self.width, self.height = width, height
        self.fps, self.sample_rate = fps, sample_rate
        self.max_batch = max_batch
        self.click_level = click_level
        self._shape = i420_shape(width, height)
        self._base = self._draw_base()
        self._idle = [self._frame(0.0, False, breathe=i / idle_length) for i in range(idle_length)]

    def open_stream(self) -> RenderStream:
        return RenderStream(self.sample_rate, self.fps)

    def idle_frames(self) -> list[np.ndarray]:
        return self._idle

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        return [self._frame(*self._look(job)) for job in jobs]

    def render_into(self, jobs: Sequence[RenderJob], out: Sequence[np.ndarray]) -> None:
        for job, target in zip(jobs, out, strict=True):
            self._frame(*self._look(job), out=target)

    def _look(self, job: RenderJob) -> tuple[float, bool]:
        audio = job.span.audio.astype(np.float32)
        rms = float(np.sqrt(np.mean(audio**2))) if audio.size else 0.0
        click = bool(audio.size and np.abs(audio).max() >= self.click_level)
        return min(1.0, rms / 4000.0), click

    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the mouth area in the full frame."""
        w, h = self.width, self.height
        return w * 2 // 5, h * 62 // 100, w * 3 // 5, h * 78 // 100

    def _draw_base(self) -> np.ndarray:
        h, w = self.height, self.width
        y, x = np.mgrid[0:h, 0:w]
        luma = (60 + 40 * y / h).astype(np.uint8)
        face = ((x - w / 2) / (w * 0.3)) ** 2 + ((y - h / 2) / (h * 0.4)) ** 2 <= 1
        luma[face] = 170
        for ex in (0.38, 0.62):
            eye = ((x - w * ex) / (w * 0.05)) ** 2 + ((y - h * 0.42) / (h * 0.03)) ** 2 <= 1
            luma[eye] = 40
        return luma

    def _frame(
        self, openness: float, click: bool, breathe: float = 0.0, out: np.ndarray | None = None
    ) -> np.ndarray:
        frame = np.empty(self._shape, np.uint8) if out is None else out.reshape(self._shape)
        frame[self.height :] = 128
        y_plane = frame[: self.height]
        y_plane[:] = self._base
        x0, y0, x1, y1 = self.mouth_box()
        mid = (y0 + y1) // 2
        half = max(1, int(openness * (y1 - y0) / 2))
        y_plane[mid - half : mid + half, x0:x1] = 20
        if breathe:  # idle: a faint vertical shimmer so the idle loop visibly moves
            shift = int(2 * np.sin(2 * np.pi * breathe))
            y_plane[:] = np.roll(y_plane, shift, axis=0)
        y_plane[:MARKER, :MARKER] = 235 if click else 16
        return frame
