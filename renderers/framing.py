"""Cutting a session's audio stream into video frames.

Frame ``i`` of a stream plays the samples ``[edge(i), edge(i + 1))`` where
``edge(i) = floor(i * sample_rate / fps)`` (:class:`models.timing.FrameTiming`,
the rule every process uses); exact integer arithmetic, so no sample is lost or
duplicated at any fps (29.97 is 30000/1001) and the audio that leaves with the
frames is bit-identical to the audio that came in.

A frame is released once more than ``lookahead`` samples past its *start*, and
more than its own samples, are buffered (a lip-sync model looks ~200 ms into
the future).  At least one sample therefore stays buffered until the segment
ends, so the segment's last frame is always released by :meth:`end_segment`,
flagged ``segment_end`` (it may be short).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.timing import FrameTiming


@dataclass(frozen=True, slots=True)
class FrameSpan:
    """One video frame's worth of audio, positioned on the stream's sample axis."""

    index: int  # frame number since the start of the stream (or the last reset)
    pts: int  # stream sample position of the first sample of ``audio``
    audio: np.ndarray  # int16 mono samples that play during this frame
    segment_end: bool  # the last frame of a segment


class AudioFramer:
    """Accumulates int16 PCM and releases :class:`FrameSpan` objects in order."""

    def __init__(self, sample_rate: int, fps: float, lookahead: int = 0) -> None:
        if sample_rate <= 0 or fps <= 0:
            raise ValueError(f"sample_rate and fps must be positive, got {sample_rate}, {fps}")
        self.sample_rate = sample_rate
        self.timing = FrameTiming(fps, sample_rate)
        self.fps = self.timing.fps
        self.lookahead = lookahead
        self.reset()

    def reset(self) -> None:
        """Forget everything buffered (interrupt); frame numbering restarts at 0."""
        self._buf = np.zeros(0, dtype=np.int16)
        self._buf_start = 0  # stream sample position of _buf[0]
        self._next = 0  # next frame index to release
        self._base = 0  # stream position where the current segment started
        self._base_index = 0  # frame index at the start of the current segment

    def edge(self, index: int) -> int:
        """Stream sample position where frame ``index`` starts."""
        return self._base + self.timing.start(index - self._base_index)

    @property
    def buffered(self) -> int:
        """Samples received but not yet released."""
        return len(self._buf)

    def push(self, pcm: np.ndarray) -> list[FrameSpan]:
        """Add samples; return the frames that became complete."""
        if pcm.size:
            self._buf = np.concatenate([self._buf, pcm.astype(np.int16, copy=False).ravel()])
        out = []
        while True:
            start, end = self.edge(self._next), self.edge(self._next + 1)
            available_until = self._buf_start + len(self._buf)
            if available_until <= max(end, start + self.lookahead):
                return out
            out.append(self._take(end, segment_end=False))

    def end_segment(self) -> list[FrameSpan]:
        """Release everything buffered; the last frame is flagged ``segment_end``.

        Returns ``[]`` if nothing was buffered.  The next segment starts on a
        fresh frame boundary right after the released audio.
        """
        out = []
        while len(self._buf):
            end = min(self.edge(self._next + 1), self._buf_start + len(self._buf))
            last = end == self._buf_start + len(self._buf)
            out.append(self._take(end, segment_end=last))
        self._base, self._base_index = self._buf_start, self._next
        return out

    def _take(self, end: int, *, segment_end: bool) -> FrameSpan:
        n = end - self._buf_start
        span = FrameSpan(self._next, self._buf_start, self._buf[:n].copy(), segment_end)
        self._buf = self._buf[n:]
        self._buf_start = end
        self._next += 1
        return span
