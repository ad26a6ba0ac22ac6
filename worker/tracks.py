"""The avatar's outgoing tracks: voice (20 ms audio frames) and visual (video at fps).

Both are pulled by the WebRTC sender (``recv()`` is the whole contract) and
both pace on absolute deadlines of the shared :class:`~worker.clock.MediaClock`;
their ``pts`` come from that clock.  What they play comes from a *source*: an
:class:`~worker.synchronizer.AvatarSynchronizer` once one is attached, else a
plain buffer fed with ``put_frame`` (that buffer never drops audio).
"""

from __future__ import annotations

import fractions
from collections import deque
from fractions import Fraction

import numpy as np
from av import AudioFrame, VideoFrame
from videosdk.custom_audio_track import CustomAudioTrack
from videosdk.custom_video_track import CustomVideoTrack
from vsaiortc.mediastreams import MediaStreamError

from .clock import VIDEO_CLOCK_RATE, FrameTiming, MediaClock

AUDIO_PTIME = 0.02

__all__ = ["AUDIO_PTIME", "VIDEO_CLOCK_RATE", "AvatarVisualTrack", "AvatarVoiceTrack"]


class _AudioBuffer:
    """The voice track's source when no synchronizer is attached."""

    def __init__(self, channels: int) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._channels = channels

    def put(self, pcm: np.ndarray) -> None:
        self._chunks.append(pcm)

    def clear(self) -> None:
        self._chunks.clear()

    def pull_audio(self, position: int, n: int) -> np.ndarray:
        out = np.zeros(n * self._channels, np.int16)
        filled = 0
        while self._chunks and filled < len(out):
            head = self._chunks[0]
            take = min(len(out) - filled, len(head))
            out[filled : filled + take] = head[:take]
            filled += take
            if take == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[take:]
        return out


class AvatarVoiceTrack(CustomAudioTrack):
    """Steady 20 ms PCM frames on the media clock; silence when nothing plays."""

    kind = "audio"

    def __init__(self, sample_rate: int, num_channels: int, *, clock: MediaClock | None = None):
        super().__init__()
        self.sample_rate = sample_rate
        self.num_channels = num_channels
        self.clock = clock
        self.samples_per_frame = int(sample_rate * AUDIO_PTIME)
        self._time_base = fractions.Fraction(1, sample_rate)
        self._layout = "mono" if num_channels == 1 else "stereo"
        self._buffer = _AudioBuffer(num_channels)
        self._source = self._buffer
        self._position = 0

    def attach(self, source, clock: MediaClock) -> None:
        """Play from ``source.pull_audio`` on ``clock`` (done by the synchronizer)."""
        self._source = source
        self.clock = clock

    async def put_frame(self, frame: AudioFrame) -> None:
        """Append audio to the standalone buffer (unbounded: nothing is dropped)."""
        self._buffer.put(frame.to_ndarray().ravel().astype(np.int16, copy=False))

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.clock is None:
            self.clock = MediaClock(self.sample_rate)
        position = self._position
        await self.clock.sleep_until(position)
        if getattr(self._source, "wait_for_renderer", False):
            self.clock.pause()  # the visual track waits with us
            try:
                await self._source.until_playable(self.samples_per_frame)
            finally:
                self.clock.resume()
        if self.readyState != "live":
            raise MediaStreamError
        pcm = self._source.pull_audio(position, self.samples_per_frame)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=self._layout)
        frame.sample_rate = self.sample_rate
        frame.pts = position
        frame.time_base = self._time_base
        self._position += self.samples_per_frame
        return frame


class _LatestFrame:
    """The visual track's source when no synchronizer is attached."""

    def __init__(self) -> None:
        self.frame: VideoFrame | None = None

    def video_at(self, position: int) -> VideoFrame | None:
        return self.frame


class AvatarVisualTrack(CustomVideoTrack):
    """Video at ``fps`` on the media clock: the frame whose audio is playing."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float, *, clock: MediaClock | None = None):
        super().__init__()
        self.width = width
        self.height = height
        self.fps = FrameTiming(fps, 1).fps  # exact (29.97 is 30000/1001)
        self.clock = clock
        self._latest = _LatestFrame()
        self._source = self._latest
        self._index = 0
        self._blank: VideoFrame | None = None

    def attach(self, source, clock: MediaClock) -> None:
        self._source = source
        self.clock = clock

    async def put_frame(self, frame: VideoFrame) -> None:
        """Standalone use: show this frame from the next tick on."""
        self._latest.frame = frame

    @property
    def timing(self) -> FrameTiming:
        """Where this track's ticks sit on the clock's sample axis."""
        rate = self.clock.sample_rate if self.clock is not None else 48_000
        return FrameTiming(self.fps, rate)

    def position_of(self, index: int) -> Fraction:
        """Clock position (samples) of video tick ``index``."""
        return self.timing.position(index)

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.clock is None:
            self.clock = MediaClock(48_000)
        index = self._index
        self._index += 1
        timing = self.timing
        await self.clock.sleep_until(timing.position(index))
        if self.readyState != "live":
            raise MediaStreamError
        frame = self._source.video_at(timing.start(index)) or self._blank_frame()
        frame.pts = timing.pts(index)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        return frame

    def _blank_frame(self) -> VideoFrame:
        if self._blank is None:
            i420 = np.full((self.height * 3 // 2, self.width), 128, np.uint8)
            i420[: self.height] = 16
            self._blank = VideoFrame.from_ndarray(i420, format="yuv420p")
        return self._blank
