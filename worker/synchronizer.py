"""``AvatarSynchronizer``: the playout buffer both tracks read on one clock.

The renderer yields video frames, each followed by the audio that plays while
it is shown.  :meth:`AvatarSynchronizer.push` pairs them into *units* and
queues them (awaiting while the queue is full: backpressure, never a drop).
The tracks pull on the :class:`~worker.clock.MediaClock`:

* the voice track calls :meth:`pull_audio` every 20 ms of clock time.  Audio
  is taken from the head unit; the clock position where a unit's first sample
  plays is written to a short *history*.
* the visual track calls :meth:`video_at` at each of its ticks and gets the
  frame of the unit whose audio is playing at that clock position, or the
  idle loop frame for that position when nobody speaks.

Segment state machine (per segment)::

    IDLE --first unit queued--> PRIMING --N units queued or segment end queued-->
    PLAYING --segment end marker reached--> IDLE  (on_segment_played(samples))
    PLAYING --queue ran dry--> PRIMING            (a stall: counted, silence meanwhile)
    any --flush() (interrupt)--> IDLE             (queue and history cleared)

``N`` is the jitter buffer depth (``jitter_frames``).  The default,
:data:`DEFAULT_JITTER_FRAMES`, was chosen by measurement (``scripts/bench_fps.py
--jitter-sweep``, README "Performance"): 4 frames absorb a single 120 ms
inference spike at 25 fps for 40 ms more first-frame latency than 3.

Offline renders (``wait_for_renderer=True``) never stall: when the queue
cannot fill the next audio frame mid-segment, the voice track waits for the
renderer and the clock's origin moves by the time waited, so audio and video
shift together (:meth:`until_playable`).  A live session cannot wait; it stalls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from av import AudioFrame, AudioResampler, VideoFrame

from .clock import FrameTiming, MediaClock
from .types import AudioSegmentEnd

logger = logging.getLogger(__name__)

DEFAULT_JITTER_FRAMES = 4


@dataclass(slots=True)
class _Unit:
    video: VideoFrame | None
    pcm: np.ndarray  # int16, interleaved when stereo
    segment_end: bool = False
    offset: int = 0  # samples (per channel) already played


@dataclass
class SyncStats:
    """Counters of what the playout did; read by metrics and benchmarks."""

    audio_frames: int = 0  # 20 ms frames pulled
    speech_samples: int = 0  # samples of speech played out
    video_ticks: int = 0
    frames_shown: int = 0  # distinct speech frames shown
    frames_held: int = 0  # ticks that repeated a speech frame (renderer late)
    frames_dropped: int = 0  # speech frames whose time passed before a tick showed them
    stalls: int = 0  # queue ran dry mid-segment
    gap_samples: int = 0  # silence inserted by stalls
    segments: int = 0
    interrupts: int = 0
    first_speech_position: int | None = None  # clock position of the first speech sample
    last_segment_end: int | None = None  # clock position where the last segment's audio ended


class AvatarSynchronizer:
    """Paces audio and video into the tracks from one media clock."""

    def __init__(
        self,
        audio_track,
        video_track,
        video_fps: float,
        *,
        jitter_frames: int = DEFAULT_JITTER_FRAMES,
        max_queued_frames: int = 25,
        clock: MediaClock | None = None,
        wait_for_renderer: bool = False,
    ) -> None:
        self._audio_track = audio_track
        self._video_track = video_track
        self.sample_rate: int = audio_track.sample_rate
        self.timing = FrameTiming(video_fps, self.sample_rate)
        self.fps = self.timing.fps
        self.channels: int = audio_track.num_channels
        self.clock = clock or audio_track.clock or MediaClock(self.sample_rate)
        self.jitter_frames = max(1, jitter_frames)
        self.max_queued_frames = max(self.jitter_frames + 1, max_queued_frames)
        audio_track.attach(self, self.clock)
        video_track.attach(self, self.clock)
        self.on_segment_played: Callable[[int], None] | None = None
        # (tick position, position where the frame's audio starts), once per speech frame shown
        self.on_frame_shown: Callable[[int, int], None] | None = None
        self.first_tick = asyncio.Event()  # set when the visual track takes its first frame
        self.stats = SyncStats()
        self._units: deque[_Unit] = deque()
        self._queued_units = 0  # units with audio in _units
        self._ends_queued = 0
        self._pending_video: VideoFrame | None = None
        self._playing = False
        self._segment_samples = 0
        self._history: deque[tuple[int, VideoFrame | None, list[bool]]] = deque(maxlen=256)
        self._last_shown: VideoFrame | None = None
        self._idle: Sequence[VideoFrame] = []
        self._epoch = 0
        self._space = asyncio.Event()
        self._arrived = asyncio.Event()
        self.wait_for_renderer = wait_for_renderer
        self._resampler: AudioResampler | None = None
        self._pulled_until = 0  # clock position up to which audio has been taken

    # -- producer side -----------------------------------------------------------

    def set_idle_frames(self, frames: Sequence[VideoFrame]) -> None:
        """The idle loop; kept as given, not copied (it may be a view of shared memory
        that builds each frame when it is shown, see ``ShmRenderer.idle_frames``)."""
        self._idle = frames

    @property
    def queued_frames(self) -> int:
        return self._queued_units

    @property
    def segment_samples(self) -> int:
        """Samples of the current segment played out so far."""
        return self._segment_samples

    async def push(self, frame: VideoFrame | AudioFrame | AudioSegmentEnd) -> None:
        """Queue a renderer output; waits while the queue is full."""
        if isinstance(frame, VideoFrame):
            self._pending_video = frame
            return
        epoch = self._epoch
        while self._queued_units >= self.max_queued_frames and epoch == self._epoch:
            self._space.clear()
            await self._space.wait()
        if epoch != self._epoch:
            return  # flushed while waiting: the frame belongs to an interrupted segment
        if isinstance(frame, AudioSegmentEnd):
            self._units.append(_Unit(None, np.zeros(0, np.int16), segment_end=True))
            self._ends_queued += 1
            self._arrived.set()
            return
        if isinstance(frame, AudioFrame):
            self._units.append(_Unit(self._pending_video, self._pcm(frame)))
            self._queued_units += 1
            self._pending_video = None
            self._arrived.set()

    def _pcm(self, frame: AudioFrame) -> np.ndarray:
        layout = "mono" if self.channels == 1 else "stereo"
        if (
            frame.sample_rate != self.sample_rate
            or frame.format.name != "s16"
            or (frame.layout.name != layout)
        ):
            if self._resampler is None:
                self._resampler = AudioResampler("s16", layout, self.sample_rate)
            frames = self._resampler.resample(frame)
            return np.concatenate(
                [f.to_ndarray().ravel() for f in frames] or [np.zeros(0, np.int16)]
            )
        return frame.to_ndarray().ravel().astype(np.int16, copy=False)

    def flush(self) -> int:
        """Interrupt: drop everything queued; returns the samples of the segment played."""
        played = self._segment_samples
        self._epoch += 1
        self._units.clear()
        self._queued_units = self._ends_queued = 0
        self._pending_video = None
        self._resampler = None  # samples it holds back belong to the interrupted speech
        self._playing = False
        self._segment_samples = 0
        self._history.clear()
        self._history.append((self.clock.position() if self.clock.started else 0, None, [True]))
        self.stats.interrupts += 1
        self._space.set()
        self._arrived.set()
        return played

    # -- consumer side (called by the tracks) --------------------------------------

    def pull_audio(self, position: int, n: int) -> np.ndarray:
        """The ``n`` samples (per channel) that play from clock ``position``."""
        ch = self.channels
        out = np.zeros(n * ch, np.int16)
        self.stats.audio_frames += 1
        self._maybe_start()
        filled = 0
        while self._playing and filled < n:
            if not self._units:  # ran dry mid-segment: silence until primed again
                self._playing = False
                self.stats.stalls += 1
                self.stats.gap_samples += n - filled
                break
            unit = self._units[0]
            if unit.segment_end:
                self._units.popleft()
                self._ends_queued -= 1
                self._end_segment(position + filled)
                break
            if unit.offset == 0 and not self._predicted(unit):
                self._history.append((position + filled, unit.video, [False]))
            if self.stats.first_speech_position is None:
                self.stats.first_speech_position = position + filled
            take = min(n - filled, len(unit.pcm) // ch - unit.offset)
            out[filled * ch : (filled + take) * ch] = unit.pcm[
                unit.offset * ch : (unit.offset + take) * ch
            ]
            unit.offset += take
            filled += take
            self._segment_samples += take
            self.stats.speech_samples += take
            if unit.offset * ch >= len(unit.pcm):
                self._units.popleft()
                self._queued_units -= 1
                self._space.set()
        self._pulled_until = position + n
        return out

    async def until_playable(self, n: int) -> None:
        """Offline only: wait until the next ``n`` samples can play without a stall."""
        if not self.wait_for_renderer:
            return
        while self._playing and not self._ends_queued:
            queued = sum(len(u.pcm) // self.channels - u.offset for u in self._units)
            if queued >= n:
                return
            self._arrived.clear()
            await self._arrived.wait()

    def _maybe_start(self) -> None:
        """Leave priming once the jitter buffer is full or the segment is complete."""
        if not self._playing and (
            self._queued_units >= self.jitter_frames or (self._ends_queued and self._units)
        ):
            self._playing = True

    def _predicted(self, unit: _Unit) -> bool:
        return unit.video is not None and any(v is unit.video for _, v, _ in self._history)

    def _end_segment(self, position: int) -> None:
        played = self._segment_samples
        self._playing = False
        self._segment_samples = 0
        self._history.append((position, None, [True]))
        self.stats.segments += 1
        self.stats.last_segment_end = position
        if self.on_segment_played is not None:
            self.on_segment_played(played)

    def video_at(self, position: int) -> VideoFrame | None:
        """The frame to show at clock ``position``: speech, or idle, or None."""
        self.stats.video_ticks += 1
        if self.stats.video_ticks == 1:
            self.first_tick.set()
        if position >= self._pulled_until:
            # The audio pull due at this instant may not have run yet: decide as it will.
            self._maybe_start()
            if self._playing:
                self._predict_starts(position)
        # Drop history entries superseded by a later one that has started by now.
        while len(self._history) > 1 and self._history[1][0] <= position:
            _, video, shown = self._history.popleft()
            if video is not None and not shown[0]:
                self.stats.frames_dropped += 1
        if self._history and self._history[0][0] <= position and self._history[0][1] is not None:
            start, video, shown = self._history[0]
            if shown[0]:
                self.stats.frames_held += 1
            else:
                shown[0] = True
                self.stats.frames_shown += 1
                if self.on_frame_shown is not None:
                    self.on_frame_shown(position, start)
            self._last_shown = video
            return video
        if self._playing and self._last_shown is not None and self._history:
            # A unit without a picture (audio-only renderer output): hold the last one.
            self.stats.frames_held += 1
            return self._last_shown
        return self.idle_frame(position)

    def _predict_starts(self, position: int) -> None:
        """Record units that start by ``position`` though their audio is not pulled yet.

        The visual tick and the 20 ms audio pull due at the same instant may run
        in either order; queue order fixes where each unit will start, so the
        tick need not wait for the pull.
        """
        start = self._pulled_until
        recorded = {id(v) for _, v, _ in self._history}
        for unit in self._units:
            if unit.segment_end or start > position:
                return
            if unit.offset == 0 and unit.video is not None and id(unit.video) not in recorded:
                self._history.append((start, unit.video, [False]))
            start += len(unit.pcm) // self.channels - unit.offset

    def idle_frame(self, position: int) -> VideoFrame | None:
        if not self._idle:
            return None
        index = self.timing.frame_at(position) % len(self._idle)
        return self._idle[index]

    async def aclose(self) -> None:
        self.flush()
