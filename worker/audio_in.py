"""``AvatarAudioIn``: the data channel -> audio frames and segment ends.

Differences from the seed receiver, each a documented fix:

* silence is audio: the SDK hands UTF-8-decodable payloads over as ``str``,
  so any ``str`` that is neither ``INTERRUPT`` nor typed JSON is PCM;
* only the agent counts: messages from our own participant are ignored, and
  so is every participant other than the agent.  The agent is the one the
  room names (:meth:`AvatarAudioIn.set_agent`: the real agent joins with peer
  type ``agent``) or ``agent_participant_id`` when given; only when the room
  names none (:meth:`AvatarAudioIn.agent_unknown`) is it the first participant
  that sends a protocol message (audio, ``segment_end`` or ``INTERRUPT``).
  With ``hold_until_agent_known`` (the live session), messages that arrive
  before either call are held, in order, and handled once it is known who
  the agent is, so a person's chat during the join cannot take the agent's
  place and the agent's first words are not lost;
* the listener (:attr:`AvatarAudioIn.listener`, a ``MeetingEventHandler``)
  exists from construction, so a transport can attach it before it joins;
* ``segment_end`` may overtake the last audio chunks (both channels are
  unordered): the segment end takes effect ``segment_end_grace`` seconds after
  it arrives, and audio arriving in that window still belongs to the segment
  (even when the ``segment_end`` overtook all of it).  The window is fixed, not
  extended by stragglers, and shorter than the playout's jitter buffer, so a
  short segment does not stall waiting for it.  The price: a new segment whose
  first audio arrives within the window of the previous ``segment_end`` is
  merged into it (one ack for both); a real agent's next turn starts far later;
* a segment whose ``segment_end`` never comes (lost, agent gone) ends after
  ``segment_timeout`` seconds without audio, so its last frames still play;
* after ``INTERRUPT`` the interrupted segment's in-flight audio keeps
  arriving: it is dropped until the channel has been quiet for
  ``interrupt_quiet`` seconds (capped at ``interrupt_max_drop``), so the next
  segment's audio plays.  Repeated ``INTERRUPT`` messages are idempotent;
* malformed payloads (wrong type, empty, odd length, over the SDK's 15,360-byte
  limit, malformed typed JSON, no sender) are logged and dropped; nothing is
  raised into the SDK.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from av import AudioFrame

from . import protocol
from .listeners import DataListener
from .types import AudioSegmentEnd, AvatarInput

logger = logging.getLogger(__name__)

#: Bytes of messages held while the agent is not known yet (about 170 s of 24 kHz speech).
MAX_HELD_BYTES = 8 * 1024 * 1024


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
        segment_end_grace: float = 0.08,
        segment_timeout: float = 2.0,
        interrupt_quiet: float = 0.15,
        interrupt_max_drop: float = 1.0,
        hold_until_agent_known: bool = False,
    ) -> None:
        super().__init__()
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self._channels = channels
        self._sample_rate = sample_rate
        self.agent_participant_id = agent_participant_id
        self.self_participant_id = self_participant_id
        self.segment_end_grace = segment_end_grace
        self.segment_timeout = segment_timeout
        self.interrupt_quiet = interrupt_quiet
        self.interrupt_max_drop = interrupt_max_drop
        self._queue: asyncio.Queue[AudioFrame | AudioSegmentEnd | None] = asyncio.Queue()
        self._meeting: Any | None = None
        self.listener = DataListener(self._on_data)
        self._attached = False
        # None: not holding; a list: messages held until the agent is known.
        self._held: list[dict] | None = (
            [] if hold_until_agent_known and agent_participant_id is None else None
        )
        self._held_bytes = 0
        self._segment_open = False  # audio of the current segment has been queued
        self._pending_end: asyncio.TimerHandle | None = None  # segment_end's grace window
        self._idle_end: asyncio.TimerHandle | None = None  # segment_timeout without audio
        self._dropping_since: float | None = None  # set while discarding after INTERRUPT
        self._last_dropped = 0.0
        self._closed = False
        self.stats = {
            "audio_bytes": 0,
            "dropped_after_interrupt": 0,
            "ignored": 0,
            "malformed": 0,
            "held": 0,
            "dropped_while_held": 0,
        }
        if meeting is not None:
            self.set_meeting(meeting)

    # -- room plumbing -------------------------------------------------------

    def set_meeting(self, meeting: Any, *, attach: bool = True) -> None:
        """Send acknowledgements through ``meeting``; listen to it too unless ``attach`` is False.

        ``attach=False`` is for a transport that was given :attr:`listener`
        before it joined (it is already on the meeting).
        """
        if self._meeting is not None and self._meeting is not meeting:
            self._detach()
        self._meeting = meeting
        if attach and not self._attached:
            meeting.add_event_listener(self.listener)
        self._attached = True

    def _detach(self) -> None:
        if self._meeting is not None and self._attached:
            try:
                self._meeting.remove_event_listener(self.listener)
            except Exception:
                logger.debug("listener already removed", exc_info=True)
        self._attached = False

    # -- who the agent is --------------------------------------------------------

    def set_agent(self, participant_id: str) -> None:
        """The room named the agent: only its messages count from now on.

        It overrides an agent guessed from the first message (a person may
        have sent something before the agent was announced).
        """
        if participant_id == self.self_participant_id:
            return
        if self.agent_participant_id != participant_id:
            logger.info("agent is participant %s (named by the room)", participant_id)
        self.agent_participant_id = participant_id
        self._release_held()

    def agent_unknown(self) -> None:
        """The room named no agent: fall back to the first protocol message's sender."""
        self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, None
        self._held_bytes = 0
        for data in held or ():
            self._on_data(data)

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
        self._held = None
        self._detach()
        self._cancel_timers()
        self._queue.put_nowait(None)

    # -- incoming messages -----------------------------------------------------

    def _on_data(self, data: dict) -> None:
        """SDK callback: never raises."""
        if self._held is not None and not self._closed:
            self._hold(data)
            return
        try:
            self._handle(data)
        except Exception:
            self.stats["malformed"] += 1
            logger.exception("dropped a data message that could not be handled")

    def _hold(self, data: Any) -> None:
        payload = data.get("payload") if isinstance(data, dict) else None
        size = len(payload) if isinstance(payload, bytes | str) else 0
        if self._held_bytes + size > MAX_HELD_BYTES:
            self.stats["dropped_while_held"] += 1
            return
        assert self._held is not None
        self._held.append(data)
        self._held_bytes += size
        self.stats["held"] += 1

    def _handle(self, data: dict) -> None:
        if self._closed or not isinstance(data, dict):
            self.stats["malformed"] += not self._closed
            return
        sender = data.get("from")
        if not isinstance(sender, str) or not sender or not self._from_agent(sender):
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

    def _from_agent(self, sender: str) -> bool:
        if sender == self.self_participant_id:
            return False
        return self.agent_participant_id is None or sender == self.agent_participant_id

    def _lock_agent(self, sender: str) -> None:
        if self.agent_participant_id is None:
            self.agent_participant_id = sender
            logger.info("agent identified as participant %s", sender)

    def _on_audio(self, raw: bytes) -> None:
        if len(raw) % 2 or len(raw) > protocol.MAX_PAYLOAD:
            self.stats["malformed"] += 1
            logger.warning("dropped a PCM payload of %d bytes (odd or over the limit)", len(raw))
            return
        now = time.monotonic()
        if self._dropping_since is not None:
            quiet = now - self._last_dropped >= self.interrupt_quiet
            expired = now - self._dropping_since >= self.interrupt_max_drop
            if not (quiet or expired):
                self._last_dropped = now
                self.stats["dropped_after_interrupt"] += len(raw)
                return
            self._dropping_since = None
        self._segment_open = True
        self.stats["audio_bytes"] += len(raw)
        self._queue.put_nowait(self._frame(raw))
        if self._idle_end is not None:
            self._idle_end.cancel()
        self._idle_end = asyncio.get_running_loop().call_later(
            self.segment_timeout, self._end_idle_segment
        )

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
        if self._pending_end is None:  # a repeated segment_end inside the window is one
            loop = asyncio.get_running_loop()
            self._pending_end = loop.call_later(self.segment_end_grace, self._emit_segment_end)

    def _emit_segment_end(self) -> None:
        self._pending_end = None
        if self._segment_open:
            self._segment_open = False
            self._queue.put_nowait(AudioSegmentEnd())

    def _end_idle_segment(self) -> None:
        self._idle_end = None
        if self._segment_open and self._pending_end is None:
            logger.warning(
                "no segment_end after %.1f s without audio: ending the segment",
                self.segment_timeout,
            )
            self._emit_segment_end()

    def _cancel_timers(self) -> None:
        for timer in (self._pending_end, self._idle_end):
            if timer is not None:
                timer.cancel()
        self._pending_end = self._idle_end = None

    def _on_interrupt(self) -> None:
        now = time.monotonic()
        already = self._dropping_since is not None  # no audio accepted since the last one
        self._dropping_since = now
        self._last_dropped = now
        if already:
            return  # a second INTERRUPT for the same barge-in
        self._cancel_timers()
        self._segment_open = False
        while not self._queue.empty():
            if self._queue.get_nowait() is None:  # keep a pending close
                self._queue.put_nowait(None)
                break
        self.emit("reset_stream")


def _log_task_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("sending stream_ended failed: %s", task.exception())
