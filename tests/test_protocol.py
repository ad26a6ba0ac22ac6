"""The wire protocol, the in-process room and our AvatarAudioOut.

Messages must be byte-identical to what videosdk-agents writes, which is
``json.dumps`` of the same dicts (default separators).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from conftest import SR, pcm, speech
from hypothesis import given
from hypothesis import strategies as st

from worker import protocol
from worker.audio_out import AvatarAudioOut
from worker.auth import AvatarAuthCredentials
from worker.listeners import RoomListener
from worker.local_room import ChannelTiming, LocalRoom


def seed_stream_ended(position: float, interrupted: bool) -> str:
    """videosdk-agents' AvatarAudioIn._send_stream_ended payload."""
    return json.dumps(
        {
            "type": "stream_ended",
            "data": {"playback_position": position, "interrupted": interrupted},
        }
    )


# -- byte-exact messages -------------------------------------------------------------------


def test_segment_end_is_byte_exact() -> None:
    assert protocol.segment_end() == json.dumps({"type": "segment_end"})


@given(samples=st.integers(3, SR * 86_400 * 7), interrupted=st.booleans())
def test_stream_ended_is_byte_exact_for_any_played_length(samples: int, interrupted: bool) -> None:
    position = samples / SR
    assert protocol.stream_ended(position, interrupted) == seed_stream_ended(position, interrupted)


@pytest.mark.parametrize("position", [0.0, 0.5, 1.0, 2.56, 1 / 3, 3600.0, 12.34])
def test_stream_ended_is_byte_exact_for_common_positions(position: float) -> None:
    for interrupted in (False, True):
        assert protocol.stream_ended(position, interrupted) == seed_stream_ended(
            position, interrupted
        )


@pytest.mark.parametrize("samples", [1, 2])
def test_stream_ended_is_byte_exact_for_one_or_two_samples(samples: int) -> None:
    position = samples / SR
    assert protocol.stream_ended(position, False) == seed_stream_ended(position, False)


def test_stream_ended_round_trips_through_classify() -> None:
    msg = protocol.classify(protocol.stream_ended(1.25, True))
    assert isinstance(msg, protocol.StreamEnded)
    assert (msg.data.playback_position, msg.data.interrupted) == (1.25, True)


# -- classify ------------------------------------------------------------------------------------

_PCM = pcm(np.array([1000, -2000, 3000], np.int16))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"INTERRUPT", protocol.Interrupt),
        ("INTERRUPT", protocol.Interrupt),
        (bytearray(b"INTERRUPT"), protocol.Interrupt),
        ('{"type": "segment_end"}', protocol.SegmentEnd),
        (b'{"type": "segment_end"}', protocol.SegmentEnd),
        ('{"type":"segment_end"}', protocol.SegmentEnd),
        ('{"type": "segment_end", "extra": [1, 2]}', protocol.SegmentEnd),
        (seed_stream_ended(1.5, False), protocol.StreamEnded),
        ('{"type": "something_new"}', protocol.UnknownControl),
        (_PCM, bytes),
        (memoryview(_PCM), bytes),
        (bytes(480), bytes),
        ("\x00" * 480, bytes),  # silence, as the SDK hands it over
        ("INTERRUPTED", bytes),
        ("interrupt", bytes),
        ("[1, 2]", bytes),
        ('"segment_end"', bytes),
        ("{not json}", bytes),
        ('{"kind": "segment_end"}', bytes),
    ],
    ids=repr,
)
def test_classify(payload, expected) -> None:
    assert isinstance(protocol.classify(payload), expected)


@pytest.mark.parametrize(
    "payload",
    [
        None,
        5,
        1.5,
        {"type": "segment_end"},
        ["INTERRUPT"],
        b"",
        "",
        '{"type": "stream_ended"}',
        '{"type": "stream_ended", "data": {"playback_position": "x", "interrupted": false}}',
    ],
    ids=repr,
)
def test_classify_rejects(payload) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.classify(payload)


@given(st.binary(min_size=1, max_size=200))
def test_audio_survives_the_sdk_str_conversion(raw: bytes) -> None:
    try:
        delivered: bytes | str = raw.decode("utf-8")
    except UnicodeDecodeError:
        delivered = raw
    msg = protocol.classify(delivered)
    if isinstance(msg, bytes):
        assert msg == raw


# -- LocalRoom ------------------------------------------------------------------------------------


class Inbox(RoomListener):
    def __init__(self) -> None:
        super().__init__()
        self.data: list[dict] = []

    def on_data(self, data: dict) -> None:
        self.data.append(data)


def _room(**timing) -> tuple[LocalRoom, Inbox]:
    room = LocalRoom(**timing)
    inbox = Inbox()
    room.join("a")
    room.join("b").add_event_listener(inbox)
    return room, inbox


async def test_room_hands_utf8_payloads_over_as_str() -> None:
    room, inbox = _room()
    sender = room.participants["a"]
    await sender.send(bytes(100), {"reliability": "UNRELIABLE"})
    await sender.send(b"INTERRUPT", {"reliability": "RELIABLE"})
    await sender.send(b"\xff\xfe\x00\x01", {"reliability": "UNRELIABLE"})
    await room.drain()
    assert [d["payload"] for d in inbox.data] == ["\x00" * 100, "INTERRUPT", b"\xff\xfe\x00\x01"]
    assert {d["from"] for d in inbox.data} == {"a"}
    assert [d["reliability"] for d in inbox.data] == ["UNRELIABLE", "RELIABLE", "UNRELIABLE"]
    assert all(set(d) == {"payload", "from", "timestamp", "reliability"} for d in inbox.data)


async def test_room_does_not_echo_to_the_sender() -> None:
    room, inbox = _room()
    own = Inbox()
    room.participants["a"].add_event_listener(own)
    await room.participants["a"].send("hello", {"reliability": "RELIABLE"})
    await room.drain()
    assert own.data == [] and len(inbox.data) == 1


async def test_room_enforces_the_sdk_payload_limit() -> None:
    room, inbox = _room()
    sender = room.participants["a"]
    await sender.send(bytes(protocol.MAX_PAYLOAD), {"reliability": "UNRELIABLE"})
    with pytest.raises(ValueError, match="too large"):
        await sender.send(bytes(protocol.MAX_PAYLOAD + 1), {"reliability": "UNRELIABLE"})
    with pytest.raises(ValueError, match="too large"):  # str counts its UTF-8 bytes
        await sender.send("é" * (protocol.MAX_PAYLOAD // 2 + 1), {"reliability": "RELIABLE"})
    await room.drain()
    assert len(inbox.data) == 1


@pytest.mark.parametrize("payload", [None, 5, {"type": "segment_end"}, ["x"], 1.5])
async def test_room_accepts_only_bytes_and_str(payload) -> None:
    room, _ = _room()
    with pytest.raises(TypeError, match="only string and bytes"):
        await room.participants["a"].send(payload, {"reliability": "RELIABLE"})


async def test_room_rejects_unknown_reliability_and_a_participant_who_left() -> None:
    room, _ = _room()
    sender = room.participants["a"]
    with pytest.raises(ValueError, match="reliability"):
        await sender.send("x", {"reliability": "SOMETIMES"})
    sender.leave()
    with pytest.raises(ConnectionError):
        await sender.send("x", {"reliability": "RELIABLE"})


async def test_room_jitter_reorders_and_loses_nothing() -> None:
    room, inbox = _room(unreliable=ChannelTiming(delay=0.001, jitter=0.01))
    for i in range(40):
        await room.participants["a"].send(str(i), {"reliability": "UNRELIABLE"})
    await room.drain()
    order = [int(d["payload"]) for d in inbox.data]
    assert sorted(order) == list(range(40))
    assert order != list(range(40))


async def test_room_without_jitter_keeps_order() -> None:
    room, inbox = _room()
    for i in range(40):
        await room.participants["a"].send(str(i), {"reliability": "UNRELIABLE"})
    await room.drain()
    assert [int(d["payload"]) for d in inbox.data] == list(range(40))


# -- our AvatarAudioOut on the wire ---------------------------------------------------------------


def _agent() -> tuple[LocalRoom, AvatarAudioOut, Inbox]:
    room, inbox = _room()
    out = AvatarAudioOut(credentials=AvatarAuthCredentials(participant_id="b", token="t"))
    out._set_meeting(room.participants["a"])
    return room, out, inbox


async def test_audio_out_sends_what_the_seed_agent_sends() -> None:
    room, out, inbox = _agent()
    signal = speech(SR)  # 48,000 bytes: 4 messages
    await out.handle_audio_input(pcm(signal) + b"\x01")  # odd tail gets padded
    await out.send_segment_end()
    await out.interrupt()
    await room.drain()
    audio = inbox.data[:-2]
    assert [len(d["payload"]) for d in audio] == [15_000, 15_000, 15_000, 3_002]
    assert all(d["reliability"] == "UNRELIABLE" for d in audio)
    assert b"".join(d["payload"] for d in audio)[:-2] == pcm(signal)
    assert inbox.data[-2]["payload"] == json.dumps({"type": "segment_end"})
    assert inbox.data[-1]["payload"] == "INTERRUPT"
    assert [d["reliability"] for d in inbox.data[-2:]] == ["RELIABLE", "RELIABLE"]


async def test_audio_out_records_acks_and_stops_when_the_room_is_gone() -> None:
    room, out, _ = _agent()
    await room.participants["b"].send(seed_stream_ended(1.5, True), {"reliability": "RELIABLE"})
    await room.drain()
    assert out.acks == [(1.5, True)]
    room.participants["a"].leave()
    await out.handle_audio_input(bytes(100))  # no exception: the channel is closed
    await out.send_segment_end()


async def test_audio_out_takes_acks_only_from_its_avatar() -> None:
    room, out, _ = _agent()
    room.join("another-avatar")
    await room.participants["another-avatar"].send(
        seed_stream_ended(9.0, False), {"reliability": "RELIABLE"}
    )
    await room.drain()
    await asyncio.sleep(0)
    assert out.acks == []
