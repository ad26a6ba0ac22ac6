"""AvatarAudioIn on its own: what the SDK callback turns into frames, ends and resets.

A fake meeting hands the listener's ``on_data`` straight to the test, so an
exception raised into the SDK callback fails the test instead of being logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import numpy as np
import pytest
from av import AudioFrame
from conftest import AGENT, AVATAR, SR, pcm, speech
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import worker.audio_in as audio_in_module
from worker import protocol
from worker.audio_in import AvatarAudioIn
from worker.types import AudioSegmentEnd

GRACE = 0.02  # segment_end_grace used here (wall seconds)
QUIET = 0.05  # interrupt_quiet used here


class FakeMeeting:
    """The ``Meeting`` surface AvatarAudioIn uses, with the listener exposed."""

    id = "fake-room"

    def __init__(self) -> None:
        self.listeners: list[Any] = []
        self.sent: list[tuple[Any, dict]] = []

    def add_event_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_event_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    async def send(self, payload: Any, options: dict) -> None:
        self.sent.append((payload, options))

    def deliver(self, payload: Any, sender: Any = AGENT, **extra: Any) -> None:
        data = {"payload": payload, "from": sender, "timestamp": 0, "reliability": "RELIABLE"}
        for listener in list(self.listeners):
            listener.handle_event("data", data | extra)  # as videosdk.Meeting does


def receiver(**options: Any) -> tuple[AvatarAudioIn, FakeMeeting]:
    meeting = FakeMeeting()
    options = {"segment_end_grace": GRACE, "interrupt_quiet": QUIET} | options
    return AvatarAudioIn(meeting, self_participant_id=AVATAR, **options), meeting


def queued(audio_in: AvatarAudioIn) -> list[AudioFrame | AudioSegmentEnd]:
    """Everything queued right now (white box: the iterator would wait)."""
    items = []
    while not audio_in._queue.empty():
        items.append(audio_in._queue.get_nowait())
    return items


def samples_of(items) -> np.ndarray:
    frames = [i.to_ndarray().ravel() for i in items if isinstance(i, AudioFrame)]
    return np.concatenate(frames) if frames else np.zeros(0, np.int16)


def resets(audio_in: AvatarAudioIn) -> list[int]:
    count = [0]

    def on_reset() -> None:
        count[0] += 1

    audio_in.on("reset_stream", on_reset)
    return count


# -- silence, audio, the iterator --------------------------------------------------------------


async def test_silence_delivered_as_str_is_audio() -> None:
    audio_in, meeting = receiver()
    silence = bytes(960)
    meeting.deliver(silence.decode("utf-8"))  # what the SDK does with it
    (frame,) = queued(audio_in)
    assert isinstance(frame, AudioFrame)
    assert frame.samples == 480 and frame.sample_rate == SR
    assert not frame.to_ndarray().any()


async def test_audio_frames_carry_the_exact_samples() -> None:
    audio_in, meeting = receiver()
    signal = speech(7000)
    meeting.deliver(pcm(signal[:3000]))
    meeting.deliver(pcm(signal[3000:]))
    assert np.array_equal(samples_of(queued(audio_in)), signal)
    assert audio_in.stats["audio_bytes"] == 2 * len(signal)


async def test_stereo_output_duplicates_the_mono_samples() -> None:
    audio_in, meeting = receiver(channels=2)
    meeting.deliver(pcm(np.array([1, 2, 3], np.int16)))
    (frame,) = queued(audio_in)
    assert frame.layout.name == "stereo"
    assert frame.to_ndarray().ravel().tolist() == [1, 1, 2, 2, 3, 3]


async def test_iteration_ends_after_aclose_and_the_listener_is_removed() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(pcm(speech(480)))
    await audio_in.aclose()
    assert meeting.listeners == []
    items = [item async for item in audio_in]
    assert len(items) == 1 and isinstance(items[0], AudioFrame)


async def test_stream_ended_goes_out_reliable_and_byte_exact() -> None:
    audio_in, meeting = receiver()
    audio_in.notify_stream_ended(2.5, True)
    await asyncio.sleep(0)
    expected = json.dumps(
        {"type": "stream_ended", "data": {"playback_position": 2.5, "interrupted": True}}
    )
    assert meeting.sent == [(expected, {"reliability": "RELIABLE"})]


# -- segment ends ---------------------------------------------------------------------------------


async def test_segment_end_is_held_for_the_grace_then_queued() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(pcm(speech(480)))
    meeting.deliver(protocol.segment_end())
    assert [type(i) for i in queued(audio_in)] == [AudioFrame]
    await asyncio.sleep(GRACE * 3)
    assert [type(i) for i in queued(audio_in)] == [AudioSegmentEnd]


async def test_a_straggler_within_the_grace_belongs_to_the_segment() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(pcm(speech(480, seed=1)))
    meeting.deliver(protocol.segment_end())
    await asyncio.sleep(GRACE / 4)
    meeting.deliver(pcm(speech(480, seed=2)))
    await asyncio.sleep(GRACE * 3)
    assert [type(i) for i in queued(audio_in)] == [AudioFrame, AudioFrame, AudioSegmentEnd]


async def test_segment_end_without_audio_is_ignored() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(protocol.segment_end())
    meeting.deliver(protocol.segment_end().encode())
    await asyncio.sleep(GRACE * 3)
    assert queued(audio_in) == []


async def test_two_segment_ends_give_one() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(pcm(speech(480)))
    meeting.deliver(protocol.segment_end())
    meeting.deliver(protocol.segment_end())
    await asyncio.sleep(GRACE * 3)
    assert [type(i) for i in queued(audio_in)] == [AudioFrame, AudioSegmentEnd]


# -- interrupts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"INTERRUPT", "INTERRUPT"], ids=["bytes", "str"])
async def test_interrupt_clears_the_queue_and_resets_once(payload) -> None:
    audio_in, meeting = receiver()
    count = resets(audio_in)
    meeting.deliver(pcm(speech(4800)))
    meeting.deliver(payload)
    meeting.deliver(payload)  # one barge-in, two messages
    assert count[0] == 1
    assert queued(audio_in) == []


async def test_audio_in_flight_after_an_interrupt_is_dropped_until_the_channel_is_quiet() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(pcm(speech(480, seed=1)))
    meeting.deliver(protocol.INTERRUPT)
    for seed in range(2, 6):  # the interrupted segment keeps arriving for a while
        await asyncio.sleep(QUIET / 5)
        meeting.deliver(pcm(speech(480, seed=seed)))
    meeting.deliver(protocol.segment_end())  # its segment_end: already acknowledged
    assert queued(audio_in) == []
    await asyncio.sleep(QUIET * 2)
    fresh = speech(480, seed=9)
    meeting.deliver(pcm(fresh))
    assert np.array_equal(samples_of(queued(audio_in)), fresh)
    assert audio_in.stats["dropped_after_interrupt"] == 4 * 960


async def test_dropping_after_an_interrupt_is_capped() -> None:
    audio_in, meeting = receiver(interrupt_max_drop=QUIET * 2)
    meeting.deliver(protocol.INTERRUPT)
    accepted = 0
    for seed in range(12):  # never quiet, but the cap ends the drop
        await asyncio.sleep(QUIET / 3)
        meeting.deliver(pcm(speech(480, seed=seed)))
        accepted += len(queued(audio_in))
    assert accepted > 0


async def test_a_new_interrupt_after_new_audio_resets_again() -> None:
    audio_in, meeting = receiver()
    count = resets(audio_in)
    meeting.deliver(protocol.INTERRUPT)
    await asyncio.sleep(QUIET * 2)
    meeting.deliver(pcm(speech(480)))
    meeting.deliver(protocol.INTERRUPT)
    assert count[0] == 2


# -- who counts -----------------------------------------------------------------------------------


async def test_configured_agent_only() -> None:
    audio_in, meeting = receiver(agent_participant_id=AGENT)
    count = resets(audio_in)
    meeting.deliver(pcm(speech(480)), sender="intruder")
    meeting.deliver(protocol.INTERRUPT, sender="intruder")
    meeting.deliver(pcm(speech(480)), sender=AVATAR)
    meeting.deliver(pcm(speech(480)), sender=None)
    assert queued(audio_in) == [] and count[0] == 0
    meeting.deliver(pcm(speech(480)), sender=AGENT)
    assert len(queued(audio_in)) == 1
    assert audio_in.stats["ignored"] == 4


async def test_first_protocol_sender_is_the_agent() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(protocol.stream_ended(1.0, False), sender="another-avatar")
    meeting.deliver(pcm(speech(480)), sender=AVATAR)  # our own: never the agent
    assert audio_in.agent_participant_id is None
    meeting.deliver(protocol.INTERRUPT, sender="the-agent")
    assert audio_in.agent_participant_id == "the-agent"
    await asyncio.sleep(QUIET * 2)
    meeting.deliver(pcm(speech(480)), sender="someone-else")
    assert queued(audio_in) == []
    meeting.deliver(pcm(speech(480)), sender="the-agent")
    assert len(queued(audio_in)) == 1


async def test_messages_wait_until_the_room_names_the_agent() -> None:
    audio_in, meeting = receiver(hold_until_agent_known=True)
    meeting.deliver("hello, anyone?", sender="a-person")  # a chat line: would pass for PCM
    meeting.deliver(pcm(speech(480)), sender=AGENT)
    meeting.deliver(protocol.segment_end(), sender=AGENT)
    assert queued(audio_in) == [] and audio_in.stats["held"] == 3
    audio_in.set_agent(AGENT)
    assert audio_in.agent_participant_id == AGENT
    assert audio_in.stats["ignored"] == 1  # the person, although they spoke first
    await asyncio.sleep(GRACE * 2)
    items = queued(audio_in)
    assert len(items) == 2 and isinstance(items[1], AudioSegmentEnd)  # in order


async def test_a_room_without_an_agent_falls_back_to_the_first_sender() -> None:
    audio_in, meeting = receiver(hold_until_agent_known=True)
    meeting.deliver(pcm(speech(480)), sender="first")
    meeting.deliver(pcm(speech(480)), sender="second")
    audio_in.agent_unknown()
    assert audio_in.agent_participant_id == "first"
    assert len(queued(audio_in)) == 1
    audio_in.set_agent("second")  # the room names one later: it takes over
    meeting.deliver(pcm(speech(480)), sender="first")
    meeting.deliver(pcm(speech(480)), sender="second")
    assert len(queued(audio_in)) == 1


async def test_held_messages_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(audio_in_module, "MAX_HELD_BYTES", 2000)
    audio_in, meeting = receiver(hold_until_agent_known=True)
    for _ in range(3):
        meeting.deliver(pcm(speech(480)), sender=AGENT)  # 960 bytes each
    assert audio_in.stats["held"] == 2 and audio_in.stats["dropped_while_held"] == 1
    audio_in.set_agent(AGENT)
    assert len(queued(audio_in)) == 2


async def test_a_listener_given_to_the_room_before_the_join_is_not_added_twice() -> None:
    meeting = FakeMeeting()
    audio_in = AvatarAudioIn(self_participant_id=AVATAR)
    meeting.add_event_listener(audio_in.listener)  # the transport did it before joining
    audio_in.set_meeting(meeting, attach=False)
    assert meeting.listeners == [audio_in.listener]
    await audio_in.aclose()
    assert meeting.listeners == []


def test_the_agent_identification_rule_is_documented() -> None:
    doc = audio_in_module.__doc__ or ""
    assert "agent_participant_id" in doc and "first participant" in doc


# -- malformed input ------------------------------------------------------------------------------

MALFORMED = [
    None,
    0,
    7.5,
    True,
    {"type": "segment_end"},
    ["INTERRUPT"],
    b"",
    "",
    bytearray(),
    '{"type": "stream_ended", "data": {"playback_position": "soon", "interrupted": 1}}',
    '{"type": "stream_ended", "data": 5}',
    '{"type": "stream_ended"}',
]


@pytest.mark.parametrize("payload", MALFORMED, ids=repr)
async def test_malformed_payloads_are_logged_and_dropped(payload, caplog) -> None:
    audio_in, meeting = receiver()
    count = resets(audio_in)
    caplog.set_level(logging.WARNING, logger="worker.audio_in")
    meeting.deliver(payload)
    await asyncio.sleep(GRACE * 2)
    assert queued(audio_in) == []
    assert count[0] == 0
    assert audio_in.stats["malformed"] == 1
    assert caplog.records, "a dropped message is logged"


@pytest.mark.parametrize("data", [None, "text", 5, [], {"from": AGENT}, {"payload": None}])
async def test_data_that_is_not_a_message_never_raises(data) -> None:
    audio_in, meeting = receiver()
    for listener in meeting.listeners:
        listener.handle_event("data", data)
    assert queued(audio_in) == []


async def test_odd_length_audio_is_logged_and_never_raises(caplog) -> None:
    audio_in, meeting = receiver()
    caplog.set_level(logging.WARNING, logger="worker.audio_in")
    meeting.deliver(b"\x01\x02\x03")
    assert caplog.records
    assert audio_in.stats["audio_bytes"] % 2 == 0
    assert sum(2 * i.samples for i in queued(audio_in)) == audio_in.stats["audio_bytes"]


async def test_odd_length_payload_is_dropped() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(b"\x01\x02\x03")
    assert queued(audio_in) == []


async def test_huge_payload_never_raises() -> None:
    audio_in, meeting = receiver()
    meeting.deliver(bytes(range(256)) * 8192)  # 2 MiB
    meeting.deliver("x" * 1_000_001)
    items = queued(audio_in)
    assert sum(2 * i.samples for i in items) == audio_in.stats["audio_bytes"]


async def test_payload_over_the_sdk_limit_is_logged_and_dropped(caplog) -> None:
    audio_in, meeting = receiver()
    caplog.set_level(logging.WARNING, logger="worker.audio_in")
    meeting.deliver(bytes(protocol.MAX_PAYLOAD + 2))
    assert queued(audio_in) == []
    assert caplog.records


# -- property-based -------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
_typed_json = st.builds(
    lambda kind, data: json.dumps({"type": kind, "data": data}),
    st.sampled_from(["segment_end", "stream_ended", "other", ""]),
    _json_values,
)
_payloads = st.one_of(
    st.binary(max_size=64).map(lambda b: b + b"\x00" * (len(b) % 2)),
    st.binary(max_size=65),
    st.text(max_size=32),
    st.just(b"INTERRUPT"),
    st.just("INTERRUPT"),
    st.just(protocol.segment_end()),
    st.just(protocol.segment_end().encode()),
    st.builds(protocol.stream_ended, st.floats(0, 100), st.booleans()),
    _typed_json,
    _json_values.map(json.dumps),
    _json_values,
)
_senders = st.sampled_from([AGENT, AGENT, AGENT, "intruder", AVATAR, None, 7])
_messages = st.lists(
    st.tuples(_payloads, _senders, st.booleans()),  # (payload, from, let the loop run after)
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_messages, configured=st.booleans())
def test_any_sequence_of_messages_keeps_the_receiver_consistent(messages, configured) -> None:
    asyncio.run(_check_sequence(messages, configured))


async def _check_sequence(messages, configured: bool) -> None:
    audio_in, meeting = receiver(
        agent_participant_id=AGENT if configured else None, segment_end_grace=0.0
    )
    count = resets(audio_in)
    items: list[Any] = []
    for payload, sender, run_loop in messages:
        before = (len(items), count[0])
        agent = audio_in.agent_participant_id
        meeting.deliver(payload, sender=sender)  # must not raise
        items += queued(audio_in)
        if sender == AVATAR or (agent is not None and sender != agent):
            assert (len(items), count[0]) == before, "a non-agent message had an effect"
        if run_loop:
            await asyncio.sleep(0)
            items += queued(audio_in)
    await asyncio.sleep(0)
    items += queued(audio_in)
    assert all(isinstance(i, AudioFrame | AudioSegmentEnd) for i in items)
    frames = [i for i in items if isinstance(i, AudioFrame)]
    assert sum(2 * f.samples for f in frames) == audio_in.stats["audio_bytes"]
    assert all(f.format.name == "s16" and f.sample_rate == SR for f in frames)
    # A segment end always closes a segment that had audio.
    previous: Any = AudioSegmentEnd()
    for item in items:
        assert not (isinstance(item, AudioSegmentEnd) and isinstance(previous, AudioSegmentEnd))
        previous = item
    await audio_in.aclose()
