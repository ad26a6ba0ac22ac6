"""The reference design, modelled so the pacing section can run it beside ours.

It behaves like the original ``agents.avatar`` server: no renderer process,
no shared clock.  Modelled behaviour::

    audio in --> renderer, called inline: each frame is drawn inside the event
                 loop, which waits for it (no other task runs meanwhile)
             --> pacer.push(video): sleep until 1/fps after the previous video
                 push (a *relative* sleep: time lost is never made up), queue it
             --> pacer.push(audio): append to the voice track's byte buffer,
                 which keeps at most 2 s (the oldest bytes are dropped)
    voice track  recv(): 20 ms from the buffer if it holds a full 20 ms, else
                 silence; due at wall-clock start + pts / rate
    visual track recv(): the next queued picture, whenever one comes

So the picture rate is at most ``fps`` and falls with every slow frame, and
the audio, fed only as fast as frames are drawn, runs dry (inserted silence)
whenever drawing falls behind real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from fractions import Fraction

import numpy as np
from av import AudioFrame, VideoFrame

from renderers.base import FrameRenderer, RenderJob
from worker.types import AudioSegmentEnd, AvatarInput

AUDIO_PTIME = 0.02
MAX_BUFFERED_SECONDS = 2.0


class ReferenceVoiceTrack:
    """A byte buffer played in 20 ms frames on wall-clock time; silence when short."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.samples_per_frame = int(sample_rate * AUDIO_PTIME)
        self._buffer = bytearray()
        self._cap = int(MAX_BUFFERED_SECONDS * sample_rate) * 2
        self._start: float | None = None
        self._pts = 0

    @property
    def buffered_samples(self) -> int:
        return len(self._buffer) // 2

    def put(self, pcm: np.ndarray) -> None:
        self._buffer += pcm.astype(np.int16, copy=False).tobytes()
        if len(self._buffer) > self._cap:
            del self._buffer[: len(self._buffer) - self._cap]

    def clear(self) -> None:
        self._buffer.clear()

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        size = self.samples_per_frame * 2
        if len(self._buffer) >= size:
            pcm = np.frombuffer(bytes(self._buffer[:size]), np.int16)
            del self._buffer[:size]
        else:
            pcm = np.zeros(self.samples_per_frame, np.int16)
        delay = self._start + self._pts / self.sample_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts, frame.time_base = self._pts, Fraction(1, self.sample_rate)
        self._pts += self.samples_per_frame
        return frame


class ReferenceVisualTrack:
    """Whatever picture was queued next, returned as soon as it is there."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[VideoFrame] = asyncio.Queue()

    def put(self, frame: VideoFrame) -> None:
        self._queue.put_nowait(frame)

    async def recv(self) -> VideoFrame:
        return await self._queue.get()


class RelativePacer:
    """The reference synchronizer: video pushes spaced by relative sleeps."""

    def __init__(self, voice: ReferenceVoiceTrack, visual: ReferenceVisualTrack, fps: float):
        self._voice, self._visual = voice, visual
        self._interval = 1.0 / fps
        self._last_video = 0.0

    async def push(self, frame: VideoFrame | AudioFrame) -> None:
        if isinstance(frame, AudioFrame):
            self._voice.put(frame.to_ndarray().ravel())
            return
        elapsed = time.monotonic() - self._last_video
        if elapsed < self._interval:
            await asyncio.sleep(self._interval - elapsed)
        self._visual.put(frame)
        self._last_video = time.monotonic()


class InlineRenderer:
    """Draws each frame inside the event loop, one at a time, as audio arrives."""

    def __init__(self, renderer: FrameRenderer) -> None:
        self.renderer = renderer
        self._stream = renderer.open_stream()
        self._jobs: deque[RenderJob | AudioSegmentEnd] = deque()
        self._ready = asyncio.Event()
        self._time_base = Fraction(1, renderer.sample_rate)

    async def push_stream_chunk(self, frame: AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self._jobs.extend(self._stream.end_segment())
            self._jobs.append(frame)
        else:
            self._jobs.extend(self._stream.push(frame.to_ndarray().ravel()))
        self._ready.set()

    def reset_stream(self) -> None:
        self._jobs.clear()
        self._stream.reset()

    async def frames(self):
        while True:
            if not self._jobs:
                self._ready.clear()
                await self._ready.wait()
                continue
            job = self._jobs.popleft()
            if isinstance(job, AudioSegmentEnd):
                yield job
                continue
            image = self.renderer.render([job])[0]  # blocks the event loop, as inline code does
            video = VideoFrame.from_ndarray(image, format="yuv420p")
            audio = AudioFrame.from_ndarray(job.span.audio.reshape(1, -1), layout="mono")
            audio.sample_rate = self.renderer.sample_rate
            video.pts = audio.pts = job.span.pts
            video.time_base = audio.time_base = self._time_base
            yield video
            yield audio


class ReferenceSession:
    """The reference design around one frame renderer: input -> inline renderer -> pacer."""

    def __init__(self, audio_in: AvatarInput, renderer: FrameRenderer, fps: float) -> None:
        self.audio_track = ReferenceVoiceTrack(renderer.sample_rate)
        self.video_track = ReferenceVisualTrack()
        self._audio_in = audio_in
        self._renderer = InlineRenderer(renderer)
        self._pacer = RelativePacer(self.audio_track, self.video_track, fps)
        self._tasks: list[asyncio.Task] = []
        self.segments_rendered = 0

    async def start(self) -> None:
        await self._audio_in.start_stream()
        self._audio_in.on("reset_stream", self._renderer.reset_stream)
        self._tasks = [
            asyncio.create_task(self._read(), name="reference-read"),
            asyncio.create_task(self._forward(), name="reference-forward"),
        ]

    async def _read(self) -> None:
        async for frame in self._audio_in:
            await self._renderer.push_stream_chunk(frame)

    async def _forward(self) -> None:
        async for frame in self._renderer.frames():
            if isinstance(frame, AudioSegmentEnd):
                self.segments_rendered += 1
            else:
                await self._pacer.push(frame)

    def played(self, segments: int = 1) -> bool:
        """All audio of ``segments`` segments handed to the voice track and played."""
        return (
            self.segments_rendered >= segments
            and self.audio_track.buffered_samples < self.audio_track.samples_per_frame
        )

    def first_frame_time(self, trace, after: float = 0.0) -> float | None:
        """No idle loop here: the first picture out after ``after`` is a speech frame."""
        return next((t for t in trace.video_times if t >= after), None)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
