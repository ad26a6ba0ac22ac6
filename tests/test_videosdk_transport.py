"""``VideoSdkTransport`` against the SDK's real ``Meeting`` over a stand-in room client.

See ``tests/sdk_standin.py`` for what the stand-in models and what it does
not (signalling, media, sockets: the loopback room's tests cover those).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sdk_standin import JoinScript, StandInRoomClient, room_client, standin_init_meeting
from test_remote_media import new_receiver
from videosdk._events import Events

from worker.audio_in import AvatarAudioIn
from worker.dispatcher.messages import JoinSpec
from worker.dispatcher.sessions import _reason_label
from worker.listeners import RoomListener
from worker.transports import base
from worker.transports.base import JoinError
from worker.transports.sdk_errors import SdkErrorLog
from worker.transports.videosdk import VideoSdkTransport

AVATAR, AGENT, PERSON = "avatar", "agent-7", "user-1"
PCM = b"\x01\x02" * 480


class Tracks:
    audio = object()
    video = object()


def transport_for(script: JoinScript, **kwargs: Any) -> tuple[VideoSdkTransport, list]:
    made: list = []
    transport = VideoSdkTransport(
        JoinSpec(room_name="room-x", token="tok", participant_id=AVATAR),
        init_meeting=standin_init_meeting(script, made),
        fetch_server_config=lambda *a: {},
        **kwargs,
    )
    return transport, made


async def join(
    transport: VideoSdkTransport, audio_in: AvatarAudioIn | None = None, **kwargs: Any
) -> Any:
    listeners = [audio_in.listener] if audio_in is not None else []
    meeting = await transport.join(
        participant_id=AVATAR,
        audio_track=Tracks.audio,
        video_track=Tracks.video,
        listeners=listeners,
        on_agent=audio_in.set_agent if audio_in is not None else None,
        **kwargs,
    )
    if audio_in is not None:  # what LiveSession does after the join
        audio_in.set_meeting(meeting, attach=False)
        if transport.agent_id is None:
            audio_in.agent_unknown()
    return meeting


def new_audio_in() -> AvatarAudioIn:
    return AvatarAudioIn(self_participant_id=AVATAR, hold_until_agent_known=True)


def queued(audio_in: AvatarAudioIn) -> int:
    return audio_in._queue.qsize()


async def wait_for(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- listeners and the agent --------------------------------------------------------------------


async def test_messages_during_the_join_reach_the_listener() -> None:
    """The listener is on the meeting before the SDK joins; the agent speaks mid-join."""
    peers = [{"id": AGENT, "peerType": "agent"}]
    script = JoinScript(peers=peers, during_join=[lambda rc: rc.data(AGENT, PCM)])
    transport, _ = transport_for(script)
    audio_in = new_audio_in()
    await join(transport, audio_in)
    assert queued(audio_in) == 1
    assert audio_in.stats["held"] == 1  # held until the room named the agent
    assert audio_in.agent_participant_id == AGENT
    await transport.leave()


async def test_a_person_chatting_first_is_ignored_when_the_room_names_the_agent() -> None:
    peers = [{"id": PERSON, "peerType": "normal"}, {"id": AGENT, "peerType": "agent"}]
    script = JoinScript(
        peers=peers,
        during_join=[lambda rc: rc.data(PERSON, "hello everyone"), lambda rc: rc.data(AGENT, PCM)],
    )
    transport, _ = transport_for(script)
    audio_in = new_audio_in()
    meeting = await join(transport, audio_in)
    room_client(meeting).data(PERSON, "are you there?")
    assert audio_in.agent_participant_id == AGENT
    assert transport.agent_id == AGENT and transport.agent_named_by_room
    assert queued(audio_in) == 1  # only the agent's audio
    assert audio_in.stats["ignored"] == 2
    await transport.leave()


async def test_without_an_agent_peer_the_first_sender_is_the_agent_until_the_room_names_one() -> (
    None
):
    transport, _ = transport_for(JoinScript(peers=[{"id": PERSON, "peerType": "normal"}]))
    audio_in = new_audio_in()
    meeting = await join(transport, audio_in)
    client = room_client(meeting)
    client.data(PERSON, "hi")  # the fallback: the first sender
    assert audio_in.agent_participant_id == PERSON
    client.new_peer(AGENT, "agent")  # the room names the agent: it takes over
    assert audio_in.agent_participant_id == AGENT
    client.data(PERSON, "hi again")
    client.data(AGENT, PCM)
    assert queued(audio_in) == 2  # the person's first message and the agent's audio
    await transport.leave()


# -- joins that fail ---------------------------------------------------------------------------


async def test_a_failed_camera_publish_fails_the_join_with_the_sdks_cause() -> None:
    script = JoinScript(
        peers=[{"id": AGENT, "peerType": "agent"}],
        during_join=[
            lambda rc: rc.error(
                "Error while Producing Video",
                "RTC :: error while create video producer :: no H264 encoder",
            )
        ],
    )
    transport, made = transport_for(script)
    with pytest.raises(JoinError) as caught:
        await join(transport)
    message = str(caught.value)
    assert "Error while Producing Video" in message
    assert "no H264 encoder" in message
    client = room_client(made[0])
    assert client.websocket.close_code is not None  # we left: the room drops us
    assert all(t.closed for t in client.transports)


async def test_an_error_about_remote_media_does_not_fail_the_join() -> None:
    script = JoinScript(during_join=[lambda rc: rc.error("Error while Handling Consumer")])
    transport, _ = transport_for(script)
    await join(transport)
    await transport.leave()


async def test_stop_during_the_join_leaves_no_ghost() -> None:
    transport, made = transport_for(JoinScript(hang=True))
    joining = asyncio.ensure_future(join(transport))
    await wait_for(lambda: made and room_client(made[0]).join_started.is_set())
    client = room_client(made[0])
    joining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joining
    assert client.websocket.close_code is not None  # closed: the room removes us
    assert all(t.closed for t in client.transports)
    assert transport.meeting is None
    await transport.leave()  # idempotent


async def test_a_websocket_lost_while_joining_fails_the_join_at_once() -> None:
    """The SDK would wait 15 s for each answer of a room that has gone; the join must not."""
    transport, made = transport_for(JoinScript(hang=True))
    joining = asyncio.ensure_future(join(transport))
    await wait_for(lambda: made and room_client(made[0]).join_started.is_set())
    client = room_client(made[0])
    client.websocket.drop(1006)
    with pytest.raises(base.JoinError, match=r"closed the connection while joining.*1006"):
        await asyncio.wait_for(joining, 2)
    assert all(t.closed for t in client.transports)
    assert transport.meeting is None


# -- what ends a joined session ----------------------------------------------------------------


async def test_a_lost_websocket_ends_the_session() -> None:
    transport, _ = transport_for(JoinScript(peers=[{"id": AGENT, "peerType": "agent"}]))
    meeting = await join(transport)
    room_client(meeting).websocket.drop(1006)
    await asyncio.wait_for(transport.closed.wait(), 2)
    assert transport.close_reason == base.REASON_CONNECTION_LOST
    assert "1006" in transport.close_detail
    await transport.leave()


async def test_a_failed_media_transport_ends_the_session() -> None:
    transport, _ = transport_for(JoinScript(peers=[{"id": AGENT, "peerType": "agent"}]))
    meeting = await join(transport)
    client = room_client(meeting)
    client.transports[0].emit("connectionstatechange", "disconnected")  # transient
    assert not transport.closed.is_set()
    client.transports[0].emit("connectionstatechange", "failed")
    assert transport.close_reason == base.REASON_CONNECTION_LOST
    assert "send transport failed" in transport.close_detail
    await transport.leave()


async def test_the_agent_leaving_ends_the_session() -> None:
    transport, _ = transport_for(JoinScript(peers=[{"id": PERSON, "peerType": "normal"}]))
    meeting = await join(transport)
    client = room_client(meeting)
    client.new_peer(AGENT, "agent")
    client.peer_closed(PERSON)
    assert not transport.closed.is_set()
    client.peer_closed(AGENT)
    assert transport.close_reason == base.REASON_AGENT_LEFT
    await transport.leave()


async def test_the_room_closing_our_peer_ends_the_session() -> None:
    transport, _ = transport_for(JoinScript(peers=[{"id": AGENT, "peerType": "agent"}]))
    meeting = await join(transport)
    room_client(meeting).server_close_request()  # protoo "close": the SDK leaves by itself
    await asyncio.wait_for(transport.closed.wait(), 2)
    assert transport.close_reason == base.REASON_ROOM_CLOSED
    await transport.leave()

    transport, _ = transport_for(JoinScript(peers=[{"id": AGENT, "peerType": "agent"}]))
    meeting = await join(transport)
    room_client(meeting).peer_closed(AVATAR)
    assert transport.close_reason == base.REASON_REMOVED
    await transport.leave()


async def test_leave_closes_websocket_and_transports_even_if_a_listener_raises(caplog) -> None:
    class Clumsy(RoomListener):
        def on_meeting_state_change(self, data: Any) -> None:
            raise RuntimeError("a listener bug")

    transport, _ = transport_for(JoinScript(peers=[{"id": AGENT, "peerType": "agent"}]))
    meeting = await join(transport)
    meeting.add_event_listener(Clumsy())
    client = room_client(meeting)
    with caplog.at_level(logging.ERROR, logger="worker.listeners"):
        await transport.leave()
    assert client.websocket.close_code is not None
    assert all(t.closed for t in client.transports)
    assert not transport.closed.is_set()  # our own leave is not a room close
    assert "a listener bug" in caplog.text


async def test_an_unguarded_listener_would_stop_the_sdks_leave() -> None:
    """Why the guard matters: the real Meeting calls listeners with no guard."""

    class Plain:
        def handle_event(self, name: str, data: Any) -> None:
            raise RuntimeError("boom")

    transport, _ = transport_for(JoinScript())
    meeting = await join(transport)
    client: StandInRoomClient = room_client(meeting)
    meeting.add_event_listener(Plain())
    with pytest.raises(RuntimeError):
        await client.async_leave()
    assert client.websocket.close_code is None  # the SDK's leave stopped at CLOSING
    meeting.remove_all_listeners()
    await transport.leave()  # ours still closes the websocket
    assert client.websocket.close_code is not None


async def test_remote_media_is_dropped_from_the_first_packet() -> None:
    transport, _ = transport_for(JoinScript(peers=[{"id": AGENT, "peerType": "agent"}]))
    meeting = await join(transport)
    receiver, _ = new_receiver()

    class Consumer:
        rtpReceiver = receiver
        track = receiver.track
        appData = {"peerId": AGENT}

    room_client(meeting).emit(Events.ADD_CONSUMER, Consumer())
    assert transport.muted_consumers == 1
    assert receiver._avatar_discarding
    await receiver.stop()
    await transport.leave()


def test_every_end_reason_has_a_metrics_label() -> None:
    reasons = [getattr(base, name) for name in dir(base) if name.startswith("REASON_")]
    assert len(reasons) >= 6
    for reason in [*reasons, "stopped", "error", "idle", "join failed", "join timed out"]:
        assert _reason_label(reason) != "other", reason


def test_the_sdks_cause_is_captured_even_when_its_logging_is_turned_down() -> None:
    sdk = logging.getLogger("videosdk")
    level, propagate = sdk.level, sdk.propagate
    sdk.setLevel(logging.CRITICAL)
    try:
        log = SdkErrorLog()
        with log.capture():
            logging.getLogger("videosdk.room_client").error("RTC :: the root cause")
            logging.getLogger("videosdk.room_client").error("Failed to Join :: an effect")
        assert log.cause() == "RTC :: the root cause"
        assert (sdk.level, sdk.propagate) == (logging.CRITICAL, propagate)  # restored
    finally:
        sdk.setLevel(level)
