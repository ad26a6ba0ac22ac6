"""The contract between the renderer loop and whatever draws the frames.

A :class:`FrameRenderer` turns frames of audio (:class:`~renderers.framing.FrameSpan`)
into full video frames in I420.  The renderer loop (in the renderer process, or
in-process for tests) owns scheduling: it keeps one :class:`RenderStream` per
session, collects the jobs that are ready across sessions and calls
:meth:`FrameRenderer.render` with as many as ``max_batch`` allows.

Frames are ``uint8`` arrays of shape ``(height * 3 // 2, width)``: the Y plane
followed by the U and V planes (yuv420p / I420), exactly the bytes a frame
ring slot holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .framing import AudioFramer, FrameSpan


@dataclass(slots=True)
class RenderJob:
    """One frame to draw: its audio span plus whatever features the renderer needs."""

    span: FrameSpan
    features: Any = None  # e.g. the [1, 80, 16] mel window of a lip-sync model
    stream: RenderStream | None = field(default=None, repr=False)


class RenderStream:
    """Per-session audio state: framing plus (optionally) streaming features.

    Subclasses override :meth:`_features` (called once per released frame, in
    order) and :meth:`_on_pcm` / :meth:`_on_reset` to keep streaming state.
    """

    def __init__(self, sample_rate: int, fps: float, lookahead: int = 0) -> None:
        self.framer = AudioFramer(sample_rate, fps, lookahead)

    def push(self, pcm: np.ndarray) -> list[RenderJob]:
        self._on_pcm(pcm)
        return [self._job(s) for s in self.framer.push(pcm)]

    def end_segment(self) -> list[RenderJob]:
        self._on_segment_end()
        return [self._job(s) for s in self.framer.end_segment()]

    def reset(self) -> None:
        self.framer.reset()
        self._on_reset()

    def _job(self, span: FrameSpan) -> RenderJob:
        return RenderJob(span, self._features(span), self)

    def _features(self, span: FrameSpan) -> Any:
        return None

    def _on_pcm(self, pcm: np.ndarray) -> None:
        pass

    def _on_segment_end(self) -> None:
        pass

    def _on_reset(self) -> None:
        pass


class FrameRenderer(ABC):
    """Draws I420 frames for :class:`RenderJob` batches."""

    width: int
    height: int
    fps: float
    sample_rate: int
    max_batch: int = 1

    @abstractmethod
    def open_stream(self) -> RenderStream:
        """State for one new session."""

    @abstractmethod
    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        """One I420 frame per job, in order.  ``len(jobs) <= max_batch``."""

    def render_into(self, jobs: Sequence[RenderJob], out: Sequence[np.ndarray]) -> None:
        """Draw job ``k``'s frame into ``out[k]`` (a frame ring slot, in shared memory).

        Renderers that can compose in place override this, so the renderer
        process writes each frame once, into the slot that carries it.  The
        default renders then copies.
        """
        frames = self.render(jobs)
        if len(frames) != len(jobs):
            raise RuntimeError(f"render() returned {len(frames)} frames for {len(jobs)} jobs")
        for frame, target in zip(frames, out, strict=True):
            np.copyto(target, np.asarray(frame).reshape(target.shape))

    @abstractmethod
    def idle_frames(self) -> list[np.ndarray]:
        """The idle loop, played (without inference) when nobody speaks."""

    def close(self) -> None:
        """Free devices and sessions."""


def i420_shape(width: int, height: int) -> tuple[int, int]:
    if width % 2 or height % 2:
        raise ValueError(f"I420 needs even dimensions, got {width}x{height}")
    return height * 3 // 2, width
