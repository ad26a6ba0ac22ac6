"""What a listener received, and the pacing figures computed from it.

A :class:`Consumer` pulls a session's two tracks the way a WebRTC sender does
(``await track.recv()`` in a loop) and writes down the wall-clock time each
call returned, whether the picture changed, and the audio samples.  The same
consumer and the same arithmetic serve both designs, so their figures compare.

The test speech never contains a zero sample (see :func:`speech_signal`), so
any run of zeros between the first and the last speech sample is silence that
the playout inserted: an audio gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

STALL_FACTOR = 1.5  # a picture shown longer than this many frame intervals is a stall
MIN_GAP_SAMPLES = 2  # a zero run this long inside speech is inserted silence


def speech_signal(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Speech-like int16 test audio with no zero sample: syllable-rate loudness on noise."""
    n = int(seconds * sample_rate)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    envelope = 600 + 3400 * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    magnitude = envelope * rng.uniform(0.5, 1.0, n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return np.clip(sign * np.maximum(magnitude, 64), -32767, 32767).astype(np.int16)


@dataclass
class Trace:
    """One consumer's record of a run."""

    fps: float
    sample_rate: int
    video_times: list[float] = field(default_factory=list)
    video_new: list[bool] = field(default_factory=list)  # False: the previous picture again
    video_pts: list[int] = field(default_factory=list)
    audio_times: list[float] = field(default_factory=list)
    audio_pts: list[int] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)

    def speech_frames(self) -> tuple[int, int] | None:
        """Indices of the first and the last audio frame holding speech."""
        loud = [i for i, pcm in enumerate(self.audio) if pcm.size and np.any(pcm)]
        return (loud[0], loud[-1]) if loud else None

    def first_speech_position(self, after: float = 0.0) -> int | None:
        """Clock position (``pts`` + offset) of the first speech sample received after ``after``."""
        for t, pts, pcm in zip(self.audio_times, self.audio_pts, self.audio, strict=True):
            if t >= after and pcm.size and np.any(pcm):
                return pts + int(np.flatnonzero(pcm)[0])
        return None

    def silence_after(self, after: float) -> float | None:
        """Wall time at which the audio fell silent for good after ``after``.

        A frame returns from ``recv()`` when it starts playing, so the first
        zero sample of the first frame that ends in silence plays at that
        return time plus its offset.
        """
        for t, pcm in zip(self.audio_times, self.audio, strict=True):
            if t < after or not pcm.size:
                continue
            loud = np.flatnonzero(pcm)
            if loud.size == 0 or loud[-1] < pcm.size - 1:
                stop = 0 if loud.size == 0 else int(loud[-1]) + 1
                return t + stop / self.sample_rate
        return None


class Consumer:
    """Pulls both tracks until stopped, recording into a :class:`Trace`."""

    def __init__(self, audio_track, video_track, fps: float, sample_rate: int) -> None:
        self.trace = Trace(fps, sample_rate)
        self._audio_track = audio_track
        self._video_track = video_track
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pull_audio(), name="bench-pull-audio"),
            asyncio.create_task(self._pull_video(), name="bench-pull-video"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _pull_audio(self) -> None:
        trace = self.trace
        while True:
            frame = await self._audio_track.recv()
            trace.audio_times.append(time.monotonic())
            trace.audio_pts.append(int(frame.pts or 0))
            trace.audio.append(frame.to_ndarray().ravel().copy())

    async def _pull_video(self) -> None:
        trace = self.trace
        previous = None
        while True:
            frame = await self._video_track.recv()
            trace.video_times.append(time.monotonic())
            trace.video_new.append(frame is not previous)
            trace.video_pts.append(int(frame.pts or 0))
            previous = frame  # held, so a new frame can never reuse its identity


@dataclass
class PacingMetrics:
    fps: float  # distinct pictures per second while speaking
    interval_p99_dev_ms: float  # p99 of |interval between recv() returns - 1/fps|
    interval_max_dev_ms: float
    audio_gaps: int  # runs of inserted silence inside the speech
    gap_ms: float  # their total length
    stalls: int  # pictures shown longer than STALL_FACTOR frame intervals while speaking
    frames: int  # distinct pictures while speaking
    speech_s: float  # wall-clock length of the speech as received
    intervals_ms: list[float]  # every video interval while speaking (for the plot)


def zero_runs(pcm: np.ndarray, min_run: int = MIN_GAP_SAMPLES) -> tuple[int, int]:
    """(count, samples) of zero runs of at least ``min_run`` samples between the
    first and the last non-zero sample of ``pcm``."""
    nonzero = np.flatnonzero(pcm)
    if nonzero.size < 2:
        return 0, 0
    inner = pcm[nonzero[0] : nonzero[-1] + 1] == 0
    edges = np.diff(np.concatenate(([0], inner.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    long = lengths >= min_run
    return int(long.sum()), int(lengths[long].sum())


def analyse(trace: Trace) -> PacingMetrics:
    """The pacing figures of one run, over the time speech was being received."""
    budget = 1.0 / trace.fps
    span = trace.speech_frames()
    if span is None:
        return PacingMetrics(0.0, 0.0, 0.0, 0, 0.0, 0, 0, 0.0, [])
    first, last = span
    t_start, t_end = trace.audio_times[first], trace.audio_times[last]
    gaps, gap_samples = zero_runs(np.concatenate(trace.audio[first : last + 1]))

    times = np.asarray(trace.video_times)
    new = np.asarray(trace.video_new, dtype=bool)
    inside = (times >= t_start) & (times <= t_end)
    intervals = np.diff(times[inside])
    deviations = np.abs(intervals - budget) * 1000.0

    changes = times[inside & new]
    shown = np.diff(np.concatenate((changes, [t_end]))) if changes.size else np.array([])
    stalls = int(np.sum(shown > STALL_FACTOR * budget))
    fps = (changes.size - 1) / (changes[-1] - changes[0]) if changes.size > 1 else 0.0
    return PacingMetrics(
        fps=float(fps),
        interval_p99_dev_ms=float(np.percentile(deviations, 99)) if deviations.size else 0.0,
        interval_max_dev_ms=float(deviations.max()) if deviations.size else 0.0,
        audio_gaps=gaps,
        gap_ms=1000.0 * gap_samples / trace.sample_rate,
        stalls=stalls,
        frames=int(changes.size),
        speech_s=float(t_end - t_start),
        intervals_ms=[float(x) for x in intervals * 1000.0],
    )
