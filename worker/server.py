"""``AvatarServer``: audio in -> renderer -> synchronizer -> tracks, plus the acks.

Two tasks move data: ``_read_audio`` feeds the renderer from the input, and
``_forward_frames`` feeds the synchronizer from the renderer.  Segment
bookkeeping lives here, once:

* a segment opens with its first audio frame; a segment end with no audio
  before it is not a segment and is not passed on;
* segments are acknowledged in order: when the synchronizer has *played* an
  end marker (``stream_ended(played, interrupted=False)``), or on
  ``reset_stream`` for every segment not yet acknowledged (the one playing
  with the samples it played, the ones queued behind it with 0): exactly one
  ack per segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from av import AudioFrame

from .clock import MediaClock
from .synchronizer import DEFAULT_JITTER_FRAMES, AvatarSynchronizer
from .tracks import AvatarVisualTrack, AvatarVoiceTrack
from .types import AudioSegmentEnd, AvatarInput, AvatarRenderer, AvatarSettings

logger = logging.getLogger(__name__)


class AvatarServer:
    """Orchestrates one avatar session."""

    def __init__(
        self,
        meeting: Any | None,
        *,
        audio_recv: AvatarInput,
        video_gen: AvatarRenderer,
        options: AvatarSettings,
        jitter_frames: int = DEFAULT_JITTER_FRAMES,
        clock: MediaClock | None = None,
        wait_for_renderer: bool = False,
    ) -> None:
        self._meeting = meeting
        self._audio_recv = audio_recv
        self._video_gen = video_gen
        self._options = options
        self.clock = clock or MediaClock(options.audio_sample_rate)
        self._audio_track = AvatarVoiceTrack(
            options.audio_sample_rate, options.audio_channels, clock=self.clock
        )
        self._video_track = AvatarVisualTrack(
            options.video_width, options.video_height, options.video_fps, clock=self.clock
        )
        self._av_sync = AvatarSynchronizer(
            self._audio_track,
            self._video_track,
            options.video_fps,
            jitter_frames=jitter_frames,
            clock=self.clock,
            wait_for_renderer=wait_for_renderer,
        )
        self._av_sync.on_segment_played = self._on_segment_played
        self._reading_segment = False  # audio read since the last segment end
        self._unacked = 0  # segments with audio, not yet acknowledged
        self._read_task: asyncio.Task | None = None
        self._forward_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.acks: list[tuple[float, bool]] = []

    @property
    def av_sync(self) -> AvatarSynchronizer:
        return self._av_sync

    @property
    def audio_track(self) -> AvatarVoiceTrack:
        return self._audio_track

    @property
    def video_track(self) -> AvatarVisualTrack:
        return self._video_track

    async def start(self) -> None:
        await self._audio_recv.start_stream()
        self._av_sync.set_idle_frames(self._video_gen.idle_frames())
        self._audio_recv.on("reset_stream", self._on_reset_stream)
        self._read_task = asyncio.create_task(self._read_audio(), name="avatar-read-audio")
        self._forward_task = asyncio.create_task(self._forward_frames(), name="avatar-forward")

    async def wait_for_complete(self) -> None:
        if self._read_task is None or self._forward_task is None:
            raise RuntimeError("AvatarServer not started")
        await asyncio.gather(self._read_task, self._forward_task)

    async def _read_audio(self) -> None:
        async for frame in self._audio_recv:
            if isinstance(frame, AudioFrame):
                if not self._reading_segment:
                    self._reading_segment = True
                    self._unacked += 1
            elif isinstance(frame, AudioSegmentEnd):
                if not self._reading_segment:
                    continue
                self._reading_segment = False
            await self._video_gen.push_stream_chunk(frame)

    async def _forward_frames(self) -> None:
        async for frame in self._video_gen:
            await self._av_sync.push(frame)

    def _on_segment_played(self, samples: int) -> None:
        if self._unacked:
            self._unacked -= 1
            self._ack(samples, interrupted=False)

    def _on_reset_stream(self) -> None:
        played = self._av_sync.flush()
        result = self._video_gen.reset_stream()
        if asyncio.iscoroutine(result):
            self._spawn(result)
        self._reading_segment = False
        for i in range(self._unacked):
            self._ack(played if i == 0 else 0, interrupted=True)
        self._unacked = 0

    def _ack(self, samples: int, *, interrupted: bool) -> None:
        position = samples / self._options.audio_sample_rate
        self.acks.append((position, interrupted))
        result = self._audio_recv.notify_stream_ended(position, interrupted)
        if asyncio.iscoroutine(result):
            self._spawn(result)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        await self._audio_recv.aclose()
        for task in (self._read_task, self._forward_task, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._read_task, self._forward_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._video_gen.aclose()
        await self._av_sync.aclose()
        self._audio_track.stop()
        self._video_track.stop()
