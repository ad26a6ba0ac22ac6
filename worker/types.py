"""The contracts of the avatar API: what feeds audio in, what renders frames.

Same names and semantics as videosdk-agents ``agents.avatar``.  An
:class:`AvatarInput` yields ``AudioFrame`` items and an
:class:`AudioSegmentEnd` sentinel when the agent finishes a TTS segment; an
:class:`AvatarRenderer` takes those and yields video and audio frames followed
by :class:`AudioSegmentEnd` once the segment is rendered.

Timing contract (ours, a superset of the original): every ``VideoFrame`` and
``AudioFrame`` a renderer yields carries ``pts`` in audio samples
(``time_base = 1/sample_rate``); a video frame is followed by the audio that
plays while it is shown.  Renderers that set no pts still work: frames are
then paired in the order they arrive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Literal

from av import AudioFrame, VideoFrame

from .events import EventEmitter


class AudioSegmentEnd:
    """Sentinel: the current TTS segment is complete."""

    def __repr__(self) -> str:
        return "AudioSegmentEnd()"


@dataclass
class AvatarSettings:
    """Output format of the avatar's tracks."""

    video_width: int = 512
    video_height: int = 512
    video_fps: float = 25.0
    audio_sample_rate: int = 24_000
    audio_channels: int = 1


class AvatarInput(ABC, EventEmitter[Literal["reset_stream"]]):
    """The avatar-side audio receiver; emits ``reset_stream`` on interrupt."""

    def __init__(self) -> None:
        EventEmitter.__init__(self)

    async def start_stream(self) -> None:
        """Called once before the first frame is consumed."""

    @abstractmethod
    def notify_stream_ended(
        self, playback_position: float, interrupted: bool
    ) -> Coroutine[None, None, None] | None:
        """Acknowledge a segment to the agent (``stream_ended``)."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[AudioFrame | AudioSegmentEnd]:
        """Audio frames, then ``AudioSegmentEnd`` when a segment is complete."""

    async def aclose(self) -> None:
        pass


class AvatarRenderer(ABC):
    """Turns audio into lip-synced video + the audio that plays with it."""

    @abstractmethod
    async def push_stream_chunk(self, frame: AudioFrame | AudioSegmentEnd) -> None:
        """Receive an audio frame or the segment-end sentinel."""

    @abstractmethod
    def reset_stream(self) -> Coroutine[None, None, None] | None:
        """Drop everything buffered or in flight (interrupt)."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[VideoFrame | AudioFrame | AudioSegmentEnd]:
        """Video frames each followed by their audio, then ``AudioSegmentEnd``."""

    def idle_frames(self) -> list[VideoFrame]:
        """The idle loop shown when nobody speaks (optional; costs no inference)."""
        return []

    async def aclose(self) -> None:
        pass
