"""A whole session end to end: agent -> room -> AvatarAudioIn -> AvatarServer -> tracks.

Every test runs the ``session`` harness (tests/conftest.py): the tracks are
pulled like a WebRTC sender pulls them, on a media clock several times faster
than real time, and the assertions are on what was played (content, pts,
clock positions) and on the ``stream_ended`` acks the agent received.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import (
    AGENT,
    AUDIO_FRAME,
    AVATAR,
    CLICK,
    SPF,
    SR,
    VIDEO_PTS_STEP,
    SessionHarness,
    locate,
    pcm,
    played_prefix,
    speech,
    with_clicks,
    zero_runs,
)

from worker import protocol
from worker.local_room import ChannelTiming


def assert_played_whole(played: np.ndarray, signal: np.ndarray) -> int:
    start = locate(played, signal)
    assert start is not None, "the segment was not played whole and in order"
    return start


# -- a. nothing that arrives is dropped ------------------------------------------------


async def test_a_ten_second_burst_is_played_in_full(make_session) -> None:
    session = await make_session(speed=8.0)
    signal = speech(10 * SR)
    await session.send(signal)  # 32 messages at once, far ahead of playout
    await session.end_segment()
    await session.wait_acks(1)
    played = session.played()
    assert np.count_nonzero(played) == len(signal)  # bytes in == bytes played
    assert_played_whole(played, signal)
    assert session.acks == [(10.0, False)]


# -- b. silence is audio ------------------------------------------------------------------


async def test_an_all_zero_chunk_is_played_as_silence(session: SessionHarness) -> None:
    before, after = speech(SR // 2, seed=1), speech(SR // 2, seed=2)
    silence = np.zeros(SR // 2, np.int16)  # arrives as str: it decodes as UTF-8
    await session.send(before)
    await session.send(silence)
    await session.send(after)
    await session.end_segment()
    await session.wait_acks(1)
    start = assert_played_whole(session.played(), np.concatenate([before, silence, after]))
    assert start >= 0
    assert session.acks == [(1.5, False)]


async def test_a_segment_of_pure_silence_is_played_and_acknowledged(
    session: SessionHarness,
) -> None:
    await session.send(np.zeros(SR // 2, np.int16))
    await session.end_segment()
    await session.wait_acks(1)
    assert session.acks == [(0.5, False)]
    assert session.stats.speech_samples == SR // 2


# -- c. one clock ---------------------------------------------------------------------------


async def test_pts_are_positions_on_one_clock(session: SessionHarness) -> None:
    await session.send(speech(2 * SR))
    await session.end_segment()
    await session.wait_acks(1)
    await session.play_for(0.2)
    assert session.audio_pts == [i * AUDIO_FRAME for i in range(len(session.audio_pts))]
    assert [t.pts for t in session.video] == [i * VIDEO_PTS_STEP for i in range(len(session.video))]


async def test_the_marker_lights_in_the_frame_whose_span_holds_the_click(
    session: SessionHarness,
) -> None:
    frames = (4, 9, 17, 30, 44)  # clicks mid-frame, counted from the segment start
    signal = with_clicks(speech(2 * SR), [k * SPF + SPF // 2 for k in frames])
    await session.send(signal)
    await session.end_segment()
    await session.wait_acks(1)
    await session.play_for(0.2)
    heard = np.flatnonzero(session.played() == CLICK)  # index == clock position
    assert len(heard) == len(frames)
    lit = [t for t in session.video if t.marker]
    assert [t.position for t in lit] == [int(p) // SPF * SPF for p in heard]  # offset 0
    assert not any(t.idle for t in lit)


async def test_speech_opens_the_mouth_and_silence_shows_the_idle_loop(
    session: SessionHarness,
) -> None:
    await session.send(speech(SR, level=8000))
    await session.end_segment()
    await session.wait_acks(1)
    await session.play_for(0.2)
    start = int(np.flatnonzero(session.played())[0])
    speaking = [t for t in session.video if start <= t.position < start + SR - SPF]
    assert speaking and not any(t.idle for t in speaking)
    assert np.mean([t.mouth > 0 for t in speaking]) > 0.8
    assert all(t.idle for t in session.video if t.position < start - SPF)


async def test_no_silence_is_inserted_inside_a_streamed_segment(session: SessionHarness) -> None:
    signal = speech(3 * SR)
    for piece in np.array_split(signal, 30):  # a TTS stream: 100 ms pieces, 2x real time
        await session.send(piece)
        await session.sleep(0.05)
    await session.end_segment()
    await session.wait_acks(1)
    played = session.played()
    nonzero = np.flatnonzero(played)
    inside = played[nonzero[0] : nonzero[-1] + 1]
    assert zero_runs(inside) == []
    assert np.array_equal(inside, signal)
    assert session.acks == [(3.0, False)]


async def test_no_silence_is_inserted_before_the_last_frame_of_a_short_segment(
    make_session,
) -> None:
    session = await make_session(speed=1.0)  # real time, real constants
    signal = speech(3600)  # 150 ms: "OK."
    await session.send(signal)
    await session.end_segment()
    await session.wait_acks(1)
    played = session.played()
    nonzero = np.flatnonzero(played)
    assert zero_runs(played[nonzero[0] : nonzero[-1] + 1]) == []


# -- d. interrupt ---------------------------------------------------------------------------


async def _interrupt_mid_segment(
    session: SessionHarness, stale: list[np.ndarray], gap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Play a segment, interrupt it, send ``stale`` pieces ``gap`` s apart, then a new one."""
    first, second = speech(3 * SR, seed=1), speech(SR, seed=2)
    await session.send(first)
    await session.end_segment()
    await session.wait_until(lambda: session.stats.speech_samples > SR, "1 s of speech played")
    await session.interrupt()
    for piece in stale:  # the interrupted segment's audio still in flight
        await session.send(piece)
        await session.sleep(gap)
    await session.sleep(0.4)  # the agent's next reply comes after a quiet moment
    await session.send(second)
    await session.end_segment()
    await session.wait_acks(2)
    return first, second


async def test_interrupt_silences_the_next_audio_frame_and_video_tick(
    session: SessionHarness,
) -> None:
    stale = [speech(2400, seed=10 + i) for i in range(3)]
    first, second = await _interrupt_mid_segment(session, stale, gap=0.01)
    (event,) = session.events_of("interrupt")
    played = session.played()

    # The first audio frame pulled after the INTERRUPT arrived is silence, and so is
    # everything until the next segment starts.
    second_start = assert_played_whole(played, second)
    after = played[event.audio_frames * AUDIO_FRAME : second_start]
    assert len(after) > 0 and not after.any()
    # The first video tick after it shows the idle picture, within one frame of clock time.
    tick = session.video[event.video_ticks]
    assert tick.idle
    assert tick.position <= event.position + SPF
    assert all(t.idle for t in session.video[event.video_ticks :] if t.position < second_start)

    start, length = played_prefix(played, first)
    assert event.audio_frames * AUDIO_FRAME == start + length  # stopped at the frame boundary
    for piece in stale:
        assert locate(played, piece[:64]) is None
    assert session.acks == [(length / SR, True), (1.0, False)]


async def test_audio_still_flowing_after_an_interrupt_is_not_played(
    session: SessionHarness,
) -> None:
    # Stale pieces keep arriving for 0.5 s (longer than any fixed cool-down).
    stale = [speech(1200, seed=20 + i) for i in range(10)]
    _, second = await _interrupt_mid_segment(session, stale, gap=0.05)
    played = session.played()
    for piece in stale:
        assert locate(played, piece[:64]) is None
    assert_played_whole(played, second)
    assert session.acks[1] == (1.0, False)


# -- e. segment_end overtaking audio ---------------------------------------------------------


async def test_segment_end_overtaking_the_last_chunk_waits_for_it(
    session: SessionHarness,
) -> None:
    signal = speech(3 * 7200)
    a, b, c = np.split(signal, 3)
    session.inject(pcm(a), reliability=protocol.UNRELIABLE)
    session.inject(pcm(b), reliability=protocol.UNRELIABLE)
    session.inject(protocol.segment_end())
    await session.sleep(0.03)
    session.inject(pcm(c), reliability=protocol.UNRELIABLE)  # the straggler
    await session.wait_acks(1)
    played = session.played()
    start = assert_played_whole(played, signal)
    assert session.acks == [(len(signal) / SR, False)]
    (ack,) = session.events_of("ack")
    assert ack.audio_frames * AUDIO_FRAME >= start + len(signal)  # ended after it played


async def test_segment_end_overtaken_on_a_jittery_room_still_plays_everything(
    make_session,
) -> None:
    session = await make_session(
        unreliable=ChannelTiming(delay=0.03, jitter=0.04), reliable=ChannelTiming()
    )
    signal = speech(2 * SR)
    pieces = np.array_split(signal, 20)
    for piece in pieces:
        await session.send(piece)
        await session.sleep(0.01)
    await session.end_segment()  # overtakes the last pieces
    await session.wait_acks(1)
    await session.settle()
    played = session.played()
    assert np.count_nonzero(played) == len(signal)
    for piece in pieces:  # pieces may be reordered by the room, none is lost
        assert locate(played, piece) is not None
    assert session.acks == [(2.0, False)]


async def test_segment_end_overtaking_a_whole_one_chunk_segment(make_session) -> None:
    session = await make_session(unreliable=ChannelTiming(delay=0.05), reliable=ChannelTiming())
    signal = speech(3600)
    await session.send(signal)
    await session.end_segment()
    await session.wait_until(lambda: len(session.acks) >= 1, "the ack", timeout=1.5)
    assert_played_whole(session.played(), signal)
    assert session.acks == [(len(signal) / SR, False)]


# -- f. acknowledgements -------------------------------------------------------------------------


async def test_one_ack_per_segment_with_the_seconds_played(session: SessionHarness) -> None:
    segments = [speech(n * AUDIO_FRAME, seed=i) for i, n in enumerate((50, 125, 77))]
    for signal in segments:
        await session.send(signal)
        await session.end_segment()
        await session.sleep(0.3)  # the next turn starts a moment later, while this one plays
    await session.wait_acks(3)
    await session.settle()
    played = session.played()
    for signal in segments:
        assert_played_whole(played, signal)
    assert session.acks == [(len(s) / SR, False) for s in segments]


async def test_an_interrupt_acknowledges_every_segment_in_flight(session: SessionHarness) -> None:
    first, second, third = speech(3 * SR, seed=1), speech(2 * SR, seed=2), speech(SR, seed=3)
    for signal in (first, second):
        await session.send(signal)
        await session.end_segment()
        await session.sleep(0.3)
    await session.wait_until(lambda: session.stats.speech_samples > SR, "1 s of speech played")
    await session.interrupt()
    await session.sleep(0.4)
    await session.send(third)
    await session.end_segment()
    await session.wait_acks(3)
    await session.settle()
    played = session.played()
    _, length = played_prefix(played, first)
    assert locate(played, second[:64]) is None
    assert_played_whole(played, third)
    assert session.acks == [(length / SR, True), (0.0, True), (1.0, False)]


async def test_segments_within_the_grace_window_merge_into_one_ack(
    session: SessionHarness,
) -> None:
    """The documented price of tolerating an overtaking ``segment_end``: audio that
    arrives within ``segment_end_grace`` of it still belongs to that segment."""
    segments = [speech(n * AUDIO_FRAME, seed=i) for i, n in enumerate((50, 125, 77))]
    for signal in segments:
        await session.send(signal)
        await session.end_segment()
    await session.wait_acks(1)
    await session.settle()
    assert session.acks == [(sum(len(s) for s in segments) / SR, False)]
    assert_played_whole(session.played(), np.concatenate(segments))


async def test_playback_position_counts_a_last_partial_audio_frame(
    session: SessionHarness,
) -> None:
    first, second = speech(SR + 100, seed=1), speech(SR // 2, seed=2)
    for signal in (first, second):
        await session.send(signal)
        await session.end_segment()
        await session.sleep(0.3)
    await session.wait_acks(2)
    assert session.acks == [(len(first) / SR, False), (len(second) / SR, False)]


# -- g. only the agent counts --------------------------------------------------------------------


async def test_only_the_configured_agent_is_played(make_session) -> None:
    session = await make_session(agent_participant_id=AGENT)
    intruder = session.room.join("intruder")
    noise = speech(SR // 2, seed=66)
    await intruder.send(pcm(noise[:6000]), {"reliability": protocol.UNRELIABLE})
    await intruder.send(protocol.segment_end(), {"reliability": protocol.RELIABLE})
    signal = speech(2 * SR)
    await session.send(signal)
    await session.end_segment()
    await session.wait_until(lambda: session.stats.speech_samples > SR // 2, "speech playing")
    await intruder.send(protocol.INTERRUPT, {"reliability": protocol.RELIABLE})
    await intruder.send(pcm(noise[6000:]), {"reliability": protocol.UNRELIABLE})
    await session.wait_acks(1)
    await session.settle()
    played = session.played()
    assert_played_whole(played, signal)
    assert np.count_nonzero(played) == len(signal)
    assert session.resets == 0
    assert session.acks == [(2.0, False)]


async def test_the_first_protocol_sender_becomes_the_agent(session: SessionHarness) -> None:
    intruder = session.room.join("intruder")
    # Another avatar's ack is not a protocol message to us: it must not claim the agent role.
    session.inject(protocol.stream_ended(1.0, False), sender="other-avatar")
    assert session.audio_in.agent_participant_id is None
    signal = speech(SR)
    await session.send(signal)
    await session.room.drain()
    assert session.audio_in.agent_participant_id == AGENT
    await intruder.send(pcm(speech(6000, seed=5)), {"reliability": protocol.UNRELIABLE})
    await intruder.send(protocol.INTERRUPT, {"reliability": protocol.RELIABLE})
    session.inject(pcm(speech(6000, seed=6)), sender=AVATAR)  # our own echo
    await session.end_segment()
    await session.wait_acks(1)
    await session.settle()
    played = session.played()
    assert np.count_nonzero(played) == len(signal)
    assert session.resets == 0
    assert session.acks == [(1.0, False)]


# -- h. repeated interrupts, malformed payloads ---------------------------------------------------


async def test_repeated_interrupts_reset_once_and_ack_once(session: SessionHarness) -> None:
    await session.send(speech(3 * SR))
    await session.end_segment()
    await session.wait_until(lambda: session.stats.speech_samples > SR // 2, "speech playing")
    await session.interrupt()
    await session.interrupt()  # one barge-in, two messages
    session.inject("INTERRUPT")
    await session.settle()
    assert session.resets == 1
    assert session.stats.interrupts == 1
    assert len(session.acks) == 1 and session.acks[0][1] is True


async def test_malformed_payloads_are_dropped_and_playback_goes_on(
    session: SessionHarness, caplog: pytest.LogCaptureFixture
) -> None:
    signal = speech(2 * SR)
    await session.send(signal)
    await session.end_segment()
    await session.wait_until(lambda: session.stats.speech_samples > SR // 2, "speech playing")
    caplog.set_level(logging.INFO)
    for payload in (
        None,
        5,
        3.5,
        {"type": "segment_end"},
        ["INTERRUPT"],
        b"",
        "",
        '{"type": "stream_ended", "data": {"playback_position": "soon"}}',
        '{"type": "stream_ended"}',
        '{"type": "no_such_message"}',
    ):
        session.inject(payload)
    session.avatar._dispatch("not a dict")  # type: ignore[arg-type]
    await session.wait_acks(1)
    await session.settle()
    assert_played_whole(session.played(), signal)
    assert session.acks == [(2.0, False)]
    assert session.resets == 0
    assert session.audio_in.stats["malformed"] >= 9
    assert not [r for r in caplog.records if "listener raised" in r.getMessage()]
