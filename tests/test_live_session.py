"""The live session (worker/session.py) and its room transports.

``LiveSession`` runs here in the test's event loop with the in-process
``LocalRoom`` (the tracks are pulled the way a WebRTC sender pulls them);
the VideoSDK transport is driven by the real ``videosdk`` SDK against
servers on 127.0.0.1 that fail in the ways the real service can, and by a
stand-in for the room events a joined meeting receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import websockets
from pyee.asyncio import AsyncIOEventEmitter
from videosdk._events import Events

from worker.audio_out import AvatarAudioOut
from worker.auth import AvatarAuthCredentials
from worker.dispatcher.messages import Ended, FirstFrame, Joined, JoinSpec, Stats
from worker.dispatcher.renderer_host import attach_renderer
from worker.local_room import LocalRoom
from worker.session import LiveSession, SessionOptions
from worker.transports.base import JoinError, RoomTransport
from worker.transports.local import LocalRoomTransport
from worker.transports.videosdk import VideoSdkTransport
from worker.types import AvatarSettings

SR = 24_000
SIZE = 64
AGENT, AVATAR = "agent", "avatar"
SETTINGS = AvatarSettings(video_width=SIZE, video_height=SIZE, video_fps=25)
PATTERN = {
    "mode": "in_process",
    "factory": "renderers.pattern:PatternRenderer",
    "kwargs": {"width": SIZE, "height": SIZE, "fps": 25, "sample_rate": SR},
}


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (6000 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(
        np.int16
    )


class Pullers:
    """Pull both tracks like a WebRTC sender, counting frames."""

    def __init__(self, transport: LocalRoomTransport) -> None:
        self.transport = transport
        self.video = 0
        self.audio = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        while self.transport.video_track is None:
            await asyncio.sleep(0.005)
        self._tasks = [
            asyncio.create_task(self._pull("video")),
            asyncio.create_task(self._pull("audio")),
        ]

    async def _pull(self, kind: str) -> None:
        track = getattr(self.transport, f"{kind}_track")
        with contextlib.suppress(Exception):
            while True:
                await track.recv()
                setattr(self, kind, getattr(self, kind) + 1)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Run:
    """A LiveSession in a LocalRoom with an agent on the other side."""

    def __init__(
        self, transport: RoomTransport | None = None, room: LocalRoom | None = None, **options: Any
    ) -> None:
        self.room = room or LocalRoom()
        self.transport = transport or LocalRoomTransport(self.room)
        self.options = SessionOptions(
            session_id="s1", participant_id=AVATAR, settings=SETTINGS, **options
        )
        self.reports: list[Any] = []
        self.agent = self.room.join(AGENT)
        self.out = AvatarAudioOut(credentials=AvatarAuthCredentials(AVATAR, "unused"))
        self.out._set_meeting(self.agent)
        self.session: LiveSession | None = None
        self.task: asyncio.Task[Ended] | None = None

    async def __aenter__(self) -> Run:
        self._renderer_cm = attach_renderer(PATTERN, SETTINGS)
        attached = await self._renderer_cm.__aenter__()
        self.session = LiveSession(self.options, self.transport, attached, self.reports.append)
        self.task = asyncio.create_task(self.session.run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.task is not None and not self.task.done():
            self.session.stop("test over")
            await asyncio.wait_for(self.task, 10)
        await self._renderer_cm.__aexit__(None, None, None)

    async def ended(self, timeout: float = 10) -> Ended:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    def of(self, kind: type) -> list[Any]:
        return [r for r in self.reports if isinstance(r, kind)]

    async def wait(self, predicate, what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; reports={self.reports}")
            await asyncio.sleep(0.01)


# -- LiveSession -----------------------------------------------------------------------------


async def test_session_plays_acks_and_leaves_when_the_agent_leaves() -> None:
    async with Run() as run:
        pullers = Pullers(run.transport)
        await pullers.start()
        await run.wait(lambda: run.of(Joined) and run.of(FirstFrame), "joined and first frame")
        await run.out.handle_audio_input(speech(0.8).tobytes())
        await run.out.send_segment_end()
        await run.wait(lambda: run.out.acks, "the stream_ended ack")
        position, interrupted = run.out.acks[0]
        assert not interrupted
        assert position == pytest.approx(0.8, abs=0.05)
        await run.wait(lambda: any(s.frames_shown for s in run.of(Stats)), "stats with frames")
        run.transport.agent_left()
        ended = await run.ended()
        await pullers.stop()
    assert ended.reason == "agent left"
    assert AVATAR not in run.room.participants  # left the room
    stats = run.of(Stats)[-1]
    assert (stats.segments, stats.stalls, stats.interrupts) == (1, 0, 0)
    assert sum(len(s.render_ms) for s in run.of(Stats)) >= 20  # render times reach the metrics
    # what the agent sent, as AvatarAudioIn counted it, reaches the dispatcher
    assert stats.audio_in["audio_bytes"] == len(speech(0.8).tobytes())
    assert stats.audio_in["malformed"] == stats.audio_in["dropped_after_interrupt"] == 0
    assert set(stats.audio_in) >= {"audio_bytes", "dropped_after_interrupt", "ignored", "malformed"}


async def test_the_first_frame_is_reported_by_event_not_by_polling() -> None:
    """FirstFrame goes out as soon as the visual track takes its first frame (no 5 ms poll)."""
    async with Run() as run:
        await run.wait(lambda: run.of(Joined), "joined")
        sync = run.session.server.av_sync
        assert not sync.first_tick.is_set() and not run.of(FirstFrame)
        await asyncio.wait_for(run.transport.video_track.recv(), 5)  # the sender's first pull
        assert sync.first_tick.is_set()
        for _ in range(3):  # a few loop turns, far less than a poll interval
            await asyncio.sleep(0)
        assert len(run.of(FirstFrame)) == 1


async def test_idle_timeout_ends_the_session() -> None:
    async with Run(idle_timeout=0.3) as run:
        ended = await run.ended()
    assert ended.reason == "idle"
    assert "0.3 s" in ended.error


async def test_agent_messages_keep_the_session_alive() -> None:
    async with Run(idle_timeout=0.6) as run:
        pullers = Pullers(run.transport)
        await pullers.start()
        for _ in range(8):
            await run.out.send_segment_end()  # any message from the agent counts
            await asyncio.sleep(0.15)
        assert not run.task.done()
        ended = await run.ended()
        await pullers.stop()
    assert ended.reason == "idle"


async def test_a_person_chatting_before_the_agent_speaks_is_ignored() -> None:
    """The room names the agent: a person's chat cannot take its place."""
    room = LocalRoom()
    run = Run(LocalRoomTransport(room, agent_id=AGENT), room)
    person = room.join("person")
    async with run:
        pullers = Pullers(run.transport)
        await pullers.start()
        await run.wait(lambda: run.of(Joined), "joined")
        await person.send("hello, is anyone there?", {"reliability": "RELIABLE"})
        await room.drain()
        await run.out.handle_audio_input(speech(0.4).tobytes())
        await run.out.send_segment_end()
        await run.wait(lambda: run.out.acks, "the stream_ended ack")
        assert run.session.audio_in.agent_participant_id == AGENT
        assert run.session.audio_in.stats["ignored"] == 1
        assert run.out.acks[0][0] == pytest.approx(0.4, abs=0.05)
        await pullers.stop()


async def test_the_transports_reason_and_detail_end_the_session() -> None:
    async with Run() as run:
        await run.wait(lambda: run.of(Joined), "joined")
        run.transport._close("connection lost", "the connection to the room was lost")
        ended = await run.ended()
    assert ended == Ended("connection lost", "the connection to the room was lost")


async def test_stop_ends_the_session_with_its_reason() -> None:
    async with Run() as run:
        await run.wait(lambda: run.of(Joined), "joined")
        run.session.stop("deleted")
        ended = await run.ended()
    assert ended == Ended("deleted")


class FailingTransport(RoomTransport):
    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error
        self.left = False

    async def _join(self, **kwargs: Any):
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()  # never joins

    async def leave(self) -> None:
        self.left = True


async def test_failed_join_ends_the_session_and_leaves() -> None:
    transport = FailingTransport(JoinError("VideoSDK refused the join: bad token"))
    async with Run(transport) as run:
        ended = await run.ended()
    assert ended.reason == "join failed"
    assert "bad token" in ended.error
    assert transport.left
    assert not run.of(Joined)


async def test_stop_while_joining() -> None:
    transport = FailingTransport()
    async with Run(transport, join_timeout=30) as run:
        await asyncio.sleep(0.1)
        run.session.stop("shutdown")
        ended = await run.ended()
    assert ended.reason == "shutdown"
    assert transport.left


# -- the VideoSDK transport with the real SDK, failing locally ---------------------------------


def _server_config(signaling_url: str) -> dict:
    return {
        "base_url": "127.0.0.1",
        "ice_servers": [],
        "observability_Jwt": None,
        "traces": {},
        "logs": {},
        "metaData": {},
        "signaling_url": signaling_url,
    }


def _spec() -> JoinSpec:
    return JoinSpec(room_name="room-x", token="tok", participant_id=AVATAR)


class _Tracks:
    """Placeholder tracks: the join fails before any media is produced."""

    def __init__(self) -> None:
        from worker.tracks import AvatarVisualTrack, AvatarVoiceTrack

        self.audio = AvatarVoiceTrack(SR, 1)
        self.video = AvatarVisualTrack(SIZE, SIZE, 25)


async def test_sdk_join_failure_is_detected_although_async_join_returns() -> None:
    """``async_join`` swallows the failure (it only emits an error); the transport raises."""
    transport = VideoSdkTransport(
        _spec(),
        join_timeout=10,
        fetch_server_config=lambda *a: _server_config("ws://127.0.0.1:9"),  # nothing listens
    )
    tracks = _Tracks()
    with pytest.raises(JoinError, match="refused the join"):
        await transport.join(
            participant_id=AVATAR, audio_track=tracks.audio, video_track=tracks.video
        )
    await transport.leave()


@pytest.fixture
async def silent_signaling() -> AsyncIterator[str]:
    """A signaling server that accepts the websocket and never answers."""
    connections: list[Any] = []

    async def handler(ws) -> None:
        connections.append(ws)
        with contextlib.suppress(Exception):
            async for _ in ws:
                pass

    async with websockets.serve(handler, "127.0.0.1", 0, subprotocols=["protoo"]) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def test_sdk_join_timeout_leaves_cleanly(silent_signaling: str) -> None:
    transport = VideoSdkTransport(
        _spec(), join_timeout=1.0, fetch_server_config=lambda *a: _server_config(silent_signaling)
    )
    tracks = _Tracks()
    with pytest.raises(JoinError, match="longer than 1 s"):
        await transport.join(
            participant_id=AVATAR, audio_track=tracks.audio, video_track=tracks.video
        )
    assert transport.meeting is None  # the half-joined meeting was torn down


async def test_blocking_server_config_request_does_not_block_the_loop() -> None:
    release = threading.Event()

    def hanging_request(*args: Any) -> dict:
        release.wait(30)  # the SDK's request has no timeout
        raise OSError("gave up")

    transport = VideoSdkTransport(_spec(), join_timeout=0.5, fetch_server_config=hanging_request)
    tracks = _Tracks()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(JoinError, match=r"did not answer within 0\.5 s"):
            await transport.join(
                participant_id=AVATAR, audio_track=tracks.audio, video_track=tracks.video
            )
    finally:
        ticker.cancel()
        release.set()
    assert ticks >= 10  # the loop kept running while the request hung


async def test_refused_server_config_is_a_join_error() -> None:
    def refuse(*args: Any) -> dict:
        raise RuntimeError("401 Unauthorized")

    transport = VideoSdkTransport(_spec(), fetch_server_config=refuse)
    tracks = _Tracks()
    with pytest.raises(JoinError, match="401 Unauthorized"):
        await transport.join(
            participant_id=AVATAR, audio_track=tracks.audio, video_track=tracks.video
        )


# -- the VideoSDK transport's room events ------------------------------------------------------


class FakeRoomClient(AsyncIOEventEmitter):
    def __init__(self) -> None:
        super().__init__()
        self.left = False

    async def async_leave(self) -> None:
        self.left = True
        self.emit(Events.MEETING_LEFT, {})


class FakeMeeting:
    """What ``VideoSDK.init_meeting`` returns, reduced to what the transport touches."""

    def __init__(self, joined_peers: list[dict], **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.listeners: list[Any] = []
        self._Meeting__room_client = FakeRoomClient()
        self._peers = joined_peers
        self._Meeting__room_client.on(
            Events.MEETING_LEFT, lambda data: self._emit("meeting-left", data)
        )

    @property
    def room_client(self) -> FakeRoomClient:
        return self._Meeting__room_client

    def _emit(self, event: str, data: Any) -> None:
        for listener in self.listeners:
            listener.handle_event(event, data)

    def add_event_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_all_listeners(self) -> None:
        self.listeners.clear()

    async def async_join(self) -> None:
        self._emit("meeting-joined", {"participants": self._peers, "messages": []})

    def release(self) -> None:
        pass

    async def send(self, payload, options=None) -> None:
        pass


async def joined_transport(peers: list[dict]) -> tuple[VideoSdkTransport, FakeMeeting]:
    meetings: list[FakeMeeting] = []

    def init_meeting(**kwargs: Any) -> FakeMeeting:
        meetings.append(FakeMeeting(peers, **kwargs))
        return meetings[-1]

    transport = VideoSdkTransport(
        _spec(), init_meeting=init_meeting, fetch_server_config=lambda *a: _server_config("x")
    )
    tracks = _Tracks()
    meeting = await transport.join(
        participant_id=AVATAR, audio_track=tracks.audio, video_track=tracks.video
    )
    assert meeting is meetings[0]
    kwargs = meeting.kwargs
    assert kwargs["custom_microphone_audio_track"] is tracks.audio
    assert kwargs["custom_camera_video_track"] is tracks.video
    assert kwargs["chat_enabled"] and kwargs["participant_id"] == AVATAR
    assert kwargs["meeting_id"] == "room-x" and kwargs["token"] == "tok"
    return transport, meeting


async def test_agent_leaving_ends_the_room_session() -> None:
    peers = [{"id": "agent-7", "peerType": "agent"}, {"id": "user-1", "peerType": "normal"}]
    transport, meeting = await joined_transport(peers)
    meeting.room_client.emit(Events.REMOVE_PEER, {"peerId": "user-1"})
    assert not transport.closed.is_set()
    meeting.room_client.emit(Events.REMOVE_PEER, {"peerId": "agent-7"})
    assert transport.close_reason == "agent left"
    await transport.leave()
    assert meeting.room_client.left


async def test_the_agent_identified_by_its_messages_counts_too() -> None:
    transport, meeting = await joined_transport([{"id": "a"}, {"id": "b"}])
    transport.set_agent("b")
    meeting.room_client.emit(Events.REMOVE_PEER, {"peerId": "b"})
    assert transport.close_reason == "agent left"


async def test_room_closing_and_emptying_end_the_session() -> None:
    transport, meeting = await joined_transport([{"id": "user-1"}])
    meeting.room_client.emit(Events.REMOVE_PEER, {"peerId": "user-1"})
    assert transport.close_reason == "room empty"
    transport, meeting = await joined_transport([{"id": "user-1"}])
    await meeting.room_client.async_leave()  # the server closed the room
    assert transport.close_reason == "room closed"


async def test_our_own_leave_is_not_reported_as_a_room_close() -> None:
    transport, _ = await joined_transport([{"id": "user-1"}])
    await transport.leave()
    assert not transport.closed.is_set()
