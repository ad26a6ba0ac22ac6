"""``AvatarAudioIn``: the data channel -> audio frames and segment ends.

Differences from the seed receiver, each a documented fix:

* silence is audio: the SDK hands UTF-8-decodable payloads over as ``str``,
  so any ``str`` that is neither ``INTERRUPT`` nor typed JSON is PCM;
* only the agent counts: messages from our own participant are ignored, and
  so is every participant other than the agent.  The agent is
  ``agent_participant_id`` when given, otherwise the first participant that
  sends a protocol message (audio, ``segment_end`` or ``INTERRUPT``);
* ``segment_end`` may overtake the last audio chunks (both channels are
  unordered): the segment end is held for ``segment_end_grace`` seconds after
  the last chunk of the segment arrived, so stragglers still belong to it;
* after ``INTERRUPT`` the interrupted segment's in-flight audio keeps
  arriving: it is dropped until the channel has been quiet for
  ``interrupt_quiet`` seconds (capped at ``interrupt_max_drop``), so the next
  segment's audio plays.  Repeated ``INTERRUPT`` messages are idempotent;
* malformed payloads are logged and dropped; nothing is raised into the SDK.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from av import AudioFrame

from . import protocol
from .types import AudioSegmentEnd, AvatarInput

logger = logging.getLogger(__name__)


class _DataListener:
    """The ``MeetingEventHandler`` shape: the SDK calls ``on_data(data)``."""

    def __init__(self, callback: Callable[[dict], None]) -> None:
        self._callback = callback

    def on_data(self, data: dict) -> None:
        self._callback(data)

    def __getattr__(self, name: str) -> Callable[..., None]:
        # The SDK calls other on_* hooks on every listener; ignore them.
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class AvatarAudioIn(AvatarInput):
    """Receives the agent's TTS audio and control messages from the room."""

    def __init__(
        self,
        meeting: Any | None = None,
        *,
        channels: int = 1,
        sample_rate: int = protocol.SAMPLE_RATE,
        agent_participant_id: str | None = None,
        self_participant_id: str | None = None,
        segment_end_grace: float = 0.2,
        interrupt_quiet: float = 0.15,
        interrupt_max_drop: float = 1.0,
    ) -> None:
        super().__init__()
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self._channels = channels
        self._sample_rate = sample_rate
        self.agent_participant_id = agent_participant_id
        self.self_participant_id = self_participant_id
        self.segment_end_grace = segment_end_grace
        self.interrupt_quiet = interrupt_quiet
        self.interrupt_max_drop = interrupt_max_drop
        self._queue: asyncio.Queue[AudioFrame | AudioSegmentEnd | None] = asyncio.Queue()
        self._meeting: Any | None = None
        self._listener: _DataListener | None = None
        self._segment_open = False  # audio of the current segment has been queued
        self._pending_end: asyncio.TimerHandle | None = None
        self._last_audio = 0.0  # monotonic time of the last accepted chunk
        self._dropping_since: float | None = None  # set while discarding after INTERRUPT
        self._last_dropped = 0.0
        self._closed = False
        self.stats = {"audio_bytes": 0, "dropped_after_interrupt": 0, "ignored": 0, "malformed": 0}
        if meeting is not None:
            self.set_meeting(meeting)

    # -- room plumbing -------------------------------------------------------

    def set_meeting(self, meeting: Any) -> None:
        self._detach()
        self._meeting = meeting
        self._listener = _DataListener(self._on_data)
        meeting.add_event_listener(self._listener)

    def _detach(self) -> None:
        if self._meeting is not None and self._listener is not None:
            try:
                self._meeting.remove_event_listener(self._listener)
            except Exception:
                logger.debug("listener already removed", exc_info=True)
        self._listener = None

    # -- AvatarInput -----------------------------------------------------------

    def notify_stream_ended(self, playback_position: float, interrupted: bool) -> None:
        if self._meeting is None:
            return
        payload = protocol.stream_ended(playback_position, interrupted)
        task = asyncio.get_running_loop().create_task(self._send(payload))
        task.add_done_callback(_log_task_error)

    async def _send(self, payload: str) -> None:
        await self._meeting.send(payload, {"reliability": protocol.RELIABLE})

    def __aiter__(self) -> AvatarAudioIn:
        return self

    async def __anext__(self) -> AudioFrame | AudioSegmentEnd:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach()
        if self._pending_end is not None:
            self._pending_end.cancel()
        self._queue.put_nowait(None)

    # -- incoming messages -----------------------------------------------------

    def _on_data(self, data: dict) -> None:
        """SDK callback: never raises."""
        try:
            self._handle(data)
        except Exception:
            self.stats["malformed"] += 1
            logger.exception("dropped a data message that could not be handled")

    def _handle(self, data: dict) -> None:
        if self._closed or not isinstance(data, dict):
            self.stats["malformed"] += not self._closed
            return
        sender = data.get("from")
        if not self._from_agent(sender):
            self.stats["ignored"] += 1
            return
        try:
            msg = protocol.classify(data.get("payload"))
        except protocol.ProtocolError as exc:
            self.stats["malformed"] += 1
            logger.warning("dropped a malformed message from %s: %s", sender, exc)
            return
        if isinstance(msg, bytes):
            self._lock_agent(sender)
            self._on_audio(msg)
        elif isinstance(msg, protocol.Interrupt):
            self._lock_agent(sender)
            self._on_interrupt()
        elif isinstance(msg, protocol.SegmentEnd):
            self._lock_agent(sender)
            self._on_segment_end()
        elif isinstance(msg, protocol.UnknownControl):
            logger.info("ignored a control message of unknown type %r", msg.type)
        # StreamEnded is our own kind of message (another avatar's): nothing to do.

    def _from_agent(self, sender: object) -> bool:
        if sender is not None and sender == self.self_participant_id:
            return False
        return self.agent_participant_id is None or sender == self.agent_participant_id

    def _lock_agent(self, sender: object) -> None:
        if self.agent_participant_id is None and isinstance(sender, str):
            self.agent_participant_id = sender
            logger.info("agent identified as participant %s", sender)

    def _on_audio(self, raw: bytes) -> None:
        now = time.monotonic()
        if self._dropping_since is not None:
            quiet = now - self._last_dropped >= self.interrupt_quiet
            expired = now - self._dropping_since >= self.interrupt_max_drop
            if not (quiet or expired):
                self._last_dropped = now
                self.stats["dropped_after_interrupt"] += len(raw)
                return
            self._dropping_since = None
        if len(raw) % 2:
            logger.warning("odd-length PCM chunk (%d bytes): padded with one zero byte", len(raw))
            raw += b"\x00"
        self._last_audio = now
        self._segment_open = True
        self.stats["audio_bytes"] += len(raw)
        self._queue.put_nowait(self._frame(raw))
        if self._pending_end is not None:  # a straggler: push the segment end back
            self._schedule_segment_end()

    def _frame(self, raw: bytes) -> AudioFrame:
        samples = np.frombuffer(raw, dtype=np.int16)
        if self._channels == 2:
            samples = np.repeat(samples, 2)
        frame = AudioFrame.from_ndarray(
            samples.reshape(1, -1), format="s16", layout="mono" if self._channels == 1 else "stereo"
        )
        frame.sample_rate = self._sample_rate
        return frame

    def _on_segment_end(self) -> None:
        if self._dropping_since is not None:
            return  # the interrupted segment's own end: already acknowledged
        if self._segment_open:
            self._schedule_segment_end()

    def _schedule_segment_end(self) -> None:
        if self._pending_end is not None:
            self._pending_end.cancel()
        loop = asyncio.get_running_loop()
        self._pending_end = loop.call_later(self.segment_end_grace, self._emit_segment_end)

    def _emit_segment_end(self) -> None:
        self._pending_end = None
        self._segment_open = False
        self._queue.put_nowait(AudioSegmentEnd())

    def _on_interrupt(self) -> None:
        now = time.monotonic()
        already = self._dropping_since is not None  # no audio accepted since the last one
        self._dropping_since = now
        self._last_dropped = now
        if already:
            return  # a second INTERRUPT for the same barge-in
        if self._pending_end is not None:
            self._pending_end.cancel()
            self._pending_end = None
        self._segment_open = False
        while not self._queue.empty():
            if self._queue.get_nowait() is None:  # keep a pending close
                self._queue.put_nowait(None)
                break
        self.emit("reset_stream")


def _log_task_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("sending stream_ended failed: %s", task.exception())
