"""The agent <-> avatar wire protocol, written once.

Every message travels through ``meeting.send(payload, {"reliability": mode})``
and arrives through ``MeetingEventHandler.on_data(data)`` with
``data = {"payload", "from", "timestamp", "reliability"}``.

==========  ==========================================================  ==========
direction   payload                                                     mode
==========  ==========================================================  ==========
agent->av   raw PCM s16le mono 24 kHz, <= 15,000 bytes a chunk           UNRELIABLE
agent->av   ``{"type": "segment_end"}`` (str)                            RELIABLE
agent->av   ``b"INTERRUPT"``                                              RELIABLE
av->agent   ``{"type": "stream_ended", "data": {"playback_position":
            float seconds, "interrupted": bool}}``                        RELIABLE
==========  ==========================================================  ==========

Facts of the real transport that :func:`classify` handles: the SDK hands any
payload that decodes as UTF-8 over as ``str`` (so silent PCM and
``b"INTERRUPT"`` arrive as strings); JSON is only a control message when it is
an object with a string ``"type"``; anything else is audio.  JSON goes out
formatted exactly as videosdk-agents writes it (``json.dumps`` spacing).
"""

from __future__ import annotations

import json
from typing import Literal

import msgspec

SAMPLE_RATE = 24_000
CHANNELS = 1
MAX_AUDIO_CHUNK = 15_000  # bytes of PCM per data-channel message (agent side)
MAX_PAYLOAD = 15_360  # the SDK refuses larger payloads
INTERRUPT = b"INTERRUPT"
RELIABLE = "RELIABLE"
UNRELIABLE = "UNRELIABLE"


class SegmentEnd(msgspec.Struct, tag_field="type", tag="segment_end"):
    """Synthesis of the current TTS segment finished (not its playback)."""


class StreamEndedData(msgspec.Struct):
    playback_position: float
    interrupted: bool


class StreamEnded(msgspec.Struct, tag_field="type", tag="stream_ended"):
    """Acknowledgement of one segment: seconds actually played, and whether it was cut."""

    data: StreamEndedData


class Interrupt(msgspec.Struct):
    """``INTERRUPT``: stop playback now."""


class UnknownControl(msgspec.Struct):
    """Typed JSON whose ``type`` this protocol does not define."""

    type: str


class _Typed(msgspec.Struct):
    type: str


Control = SegmentEnd | StreamEnded
_control_decoder = msgspec.json.Decoder(Control)
_typed_decoder = msgspec.json.Decoder(_Typed)


class ProtocolError(ValueError):
    """A payload that cannot be understood (logged and dropped by receivers)."""


def encode(msg: Control) -> str:
    """A control message as the exact text videosdk-agents sends and expects.

    The struct defines the schema; the text is ``json.dumps``'s, whose float
    spelling (``4.1666666666666665e-05``) the agent side produces too.
    """
    return json.dumps(msgspec.to_builtins(msg))


def stream_ended(playback_position: float, interrupted: bool) -> str:
    return encode(StreamEnded(StreamEndedData(float(playback_position), bool(interrupted))))


def segment_end() -> str:
    return encode(SegmentEnd())


Message = bytes | Interrupt | SegmentEnd | StreamEnded | UnknownControl


def check_outgoing(payload: object) -> bytes | str:
    """What ``Meeting.send`` accepts, with the SDK's own errors for what it refuses."""
    if isinstance(payload, bytearray | memoryview):
        payload = bytes(payload)
    if not isinstance(payload, bytes | str):
        raise TypeError(
            f"Invalid payload type current type is: {type(payload).__name__} "
            "only string and bytes are allowed"
        )
    size = len(payload.encode("utf-8")) if isinstance(payload, str) else len(payload)
    if size > MAX_PAYLOAD:
        raise ValueError(f"Payload too large: {size} bytes. Max allowed is {MAX_PAYLOAD} bytes")
    return payload


def classify(payload: object) -> Message:
    """Turn an ``on_data`` payload into audio bytes or a control message.

    Raises :class:`ProtocolError` for payloads of the wrong type, malformed
    typed JSON, and empty payloads.
    """
    if isinstance(payload, memoryview | bytearray):
        payload = bytes(payload)
    if isinstance(payload, str):
        if payload == "INTERRUPT":
            return Interrupt()
        control = _typed_json(payload)
        # The SDK decoded these bytes as UTF-8; encoding gives them back exactly.
        return control if control is not None else _audio(payload.encode("utf-8"))
    if isinstance(payload, bytes):
        if payload == INTERRUPT:
            return Interrupt()
        control = _typed_json(payload) if payload[:1] == b"{" else None
        return control if control is not None else _audio(payload)
    raise ProtocolError(f"payload must be bytes or str, got {type(payload).__name__}")


def _typed_json(text: str | bytes) -> SegmentEnd | StreamEnded | UnknownControl | None:
    """The control message in ``text``, or None when it is not a typed JSON object."""
    if not text or text[:1] not in ("{", b"{"):
        return None
    try:
        typed = _typed_decoder.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    try:
        return _control_decoder.decode(text)
    except msgspec.ValidationError as exc:
        if typed.type in ("segment_end", "stream_ended"):
            raise ProtocolError(f"malformed {typed.type!r} message: {exc}") from exc
        return UnknownControl(typed.type)


def _audio(raw: bytes) -> bytes:
    if not raw:
        raise ProtocolError("empty payload")
    return raw


ReliabilityMode = Literal["RELIABLE", "UNRELIABLE"]
