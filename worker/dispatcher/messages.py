"""The control channel between the dispatcher and one session process.

A Unix socket pair per session process (the child gets its end as an
inherited fd); newline-delimited JSON, one message per line, tagged by
``"type"``.  The media never crosses it: only commands, state and counters.

::

    dispatcher                                   session process
        |  spawn ``python -m worker.session --control-fd N``
        |  <------------------ Hello(pid) --------------|  modules imported
        |  ------------------- Prepare(renderer, ...) ->|
        |  <------------------ Prepared ----------------|  renderer attached: a warm spare
        |  ------------------- Start(join, ...) ------->|
        |  <------------------ Joined(seconds) ---------|  in the room, tracks published
        |  <------------------ FirstFrame(seconds) -----|  the visual track sent a frame
        |  <------------------ Stats (every second) ----|
        |  ------------------- Offer(id, sdp) --------->|  local transport only
        |  <------------------ Answer(id, sdp|error) ---|
        |  ------------------- Stop(reason) ----------->|
        |  <------------------ Ended(reason, error) ----|  then the process exits

End of file on either side means the other side is gone: the session
leaves its room, the dispatcher frees the slot.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from ..synchronizer import DEFAULT_JITTER_FRAMES

logger = logging.getLogger(__name__)


class JoinSpec(msgspec.Struct):
    """What the agent posted: the room and the pre-signed credentials to enter it."""

    room_name: str
    token: str
    participant_id: str
    signaling_base_url: str | None = None


class _Message(msgspec.Struct, tag=True, tag_field="msg"):
    """A control message; its class name is its tag."""


class Hello(_Message):
    pid: int


class Prepare(_Message):
    renderer: dict  # how to reach the renderer: see worker.dispatcher.renderer_host
    width: int
    height: int
    fps: float
    jitter_frames: int = DEFAULT_JITTER_FRAMES
    log_level: str = "info"


class Prepared(_Message):
    pass


class Start(_Message):
    session_id: str
    join: JoinSpec
    transport: str
    join_timeout: float
    idle_timeout: float
    ice_addresses: list[str] = []


class Stop(_Message):
    reason: str


class Offer(_Message):
    request_id: int
    sdp: str
    type: str
    participant_id: str


class Answer(_Message):
    request_id: int
    sdp: str = ""
    type: str = "answer"
    error: str | None = None


class Joined(_Message):
    seconds: float  # from Start to joined


class FirstFrame(_Message):
    seconds: float  # from Start to the first video frame handed to the sender


class Stats(_Message):
    """Counters are totals since the session started; samples are new since the last Stats."""

    fps: float = 0.0
    frames_shown: int = 0
    frames_late: int = 0
    frames_dropped: int = 0
    stalls: int = 0
    interrupts: int = 0
    segments: int = 0
    playout_depth: int = 0
    ring_depths: dict[str, int] = {}
    render_ms: list[float] = []
    av_offset_ms: list[float] = []
    audio_in: dict[str, int] = {}  # AvatarAudioIn.stats: totals of what the agent sent


class Ended(_Message):
    reason: str
    error: str | None = None


Message = (
    Hello | Prepare | Prepared | Start | Stop | Offer | Answer | Joined | FirstFrame | Stats | Ended
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)

MAX_LINE = 1 << 20


class ControlChannel:
    """One end of the control socket: ``send`` never blocks, ``recv`` returns None at EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock) -> ControlChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(_encoder.encode(message) + b"\n")

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    async def recv(self) -> Message | None:
        try:
            line = await self._reader.readline()
        except (ConnectionError, ValueError):
            return None
        while line:
            try:
                return _decoder.decode(line)
            except msgspec.DecodeError as exc:  # a bad line must not silence the channel
                logger.warning("dropped a malformed control message: %s", exc)
            try:
                line = await self._reader.readline()
            except (ConnectionError, ValueError):
                return None
        return None

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, RuntimeError):
            pass
