"""The loopback VideoSDK room, exercised with the real, unmodified videosdk SDK in-process."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
from av import AudioFrame, VideoFrame
from videosdk import MeetingEventHandler, VideoSDK
from videosdk._events import Events
from videosdk.utils import get_server_config
from vsaiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

from tests.videosdk_room import LoopbackVideoSdkRoom

for _name in ("aioice", "vsaiortc"):
    logging.getLogger(_name).setLevel(logging.WARNING)

ROOM = "room-1"


class Events_(MeetingEventHandler):
    """Records every meeting event the SDK emits (as name, data)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, Any]] = []
        self.data: list[dict[str, Any]] = []
        self.data_arrival: list[float] = []

    def on_meeting_joined(self, data: Any) -> None:
        self.log.append(("meeting-joined", data))

    def on_meeting_left(self, data: Any) -> None:
        self.log.append(("meeting-left", data))

    def on_participant_joined(self, participant: Any) -> None:
        self.log.append(("participant-joined", participant))

    def on_participant_left(self, participant: Any) -> None:
        self.log.append(("participant-left", participant))

    def on_agent_joined(self, agent: Any) -> None:
        self.log.append(("agent-joined", agent))

    def on_agent_left(self, agent: Any) -> None:
        self.log.append(("agent-left", agent))

    def on_error(self, data: Any) -> None:
        self.log.append(("error", data))

    def on_meeting_state_change(self, data: Any) -> None:
        self.log.append(("state", data.get("state")))

    def on_data(self, data: Any) -> None:
        self.data.append(data)
        self.data_arrival.append(time.monotonic())

    def named(self, name: str) -> list[Any]:
        return [d for n, d in self.log if n == name]


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


class ToneTrack(AudioStreamTrack):
    """20 ms frames (48 kHz mono s16) of a 440 Hz tone, paced in real time."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self._t0: float | None = None

    async def recv(self) -> AudioFrame:
        if self._t0 is None:
            self._t0 = time.monotonic()
        await asyncio.sleep(max(0.0, self._t0 + self.sent * 0.02 - time.monotonic()))
        start = self.sent * 960
        t = (np.arange(960) + start) / 48000
        pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).reshape(1, -1)
        frame = AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, start
        frame.time_base = fractions.Fraction(1, 48000)
        self.sent += 1
        return frame


class GrayTrack(VideoStreamTrack):
    """Uniform gray frames (level 200) at ``fps``, paced in real time."""

    def __init__(self, fps: float = 15.0, level: int = 200) -> None:
        super().__init__()
        self.fps, self.level, self.sent = fps, level, 0
        self._start: float | None = None

    async def recv(self) -> VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        img = np.full((240, 320, 3), self.level, dtype=np.uint8)
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = int(self.sent * 90000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.sent += 1
        return frame


@pytest.fixture
async def room(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LoopbackVideoSdkRoom]:
    server = LoopbackVideoSdkRoom(
        tmp_path, video_reducer=lambda frame: float(frame.to_ndarray(format="gray").mean())
    )
    await server.start()
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def meetings() -> AsyncIterator[list[Any]]:
    joined: list[Any] = []
    yield joined
    for meeting in joined:
        client = meeting._Meeting__room_client
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.async_leave(), 5)
        meeting.release()


async def join(
    room: LoopbackVideoSdkRoom,
    meetings: list[Any],
    peer_id: str,
    *,
    room_id: str = ROOM,
    mic: bool = False,
    webcam: bool = False,
    **kwargs: Any,
) -> tuple[Any, Events_]:
    events = Events_()
    meeting = VideoSDK.init_meeting(
        meeting_id=room_id,
        token="any-token",
        participant_id=peer_id,
        name=peer_id.title(),
        mic_enabled=mic,
        webcam_enabled=webcam,
        signaling_base_url=room.host,
        **kwargs,
    )
    meeting.add_event_listener(events)
    meetings.append(meeting)
    await meeting.async_join()
    assert events.named("meeting-joined"), events.log
    return meeting, events


def room_client(meeting: Any) -> Any:
    return meeting._Meeting__room_client


def sendable(client: Any) -> bool:
    """send() raises until the send transport is connected and the data channel is open."""
    producers = (client._reliable_data_producer, client._unreliable_data_producer)
    return client._RoomClient__send_transport.connectionState == "connected" and all(
        p is not None and p.readyState == "open" for p in producers
    )


async def until_sendable(meeting: Any, timeout: float = 10.0) -> float:
    """async_join() returns before meeting.send() can work; wait until it can."""
    t0 = time.monotonic()
    client = room_client(meeting)
    await until(lambda: sendable(client), timeout)
    return time.monotonic() - t0


async def test_init_config_points_at_the_room_with_no_ice_servers(
    room: LoopbackVideoSdkRoom,
) -> None:
    config = await asyncio.to_thread(get_server_config, "r", "tok", room.host)
    assert config["base_url"] == room.signaling_host
    assert config["ice_servers"] == []
    assert config["signaling_url"] is None
    assert room.config_requests[-1]["roomId"] == "r"
    assert room.config_requests[-1]["authorization"] == "tok"


@pytest.mark.slow
async def test_two_peers_see_each_other(room: LoopbackVideoSdkRoom, meetings: list[Any]) -> None:
    t0 = time.monotonic()
    _, agent_events = await join(room, meetings, "agent-1", peer_type="agent")
    join_s = time.monotonic() - t0
    assert agent_events.named("meeting-joined")[0]["participants"] == []

    _, user_events = await join(room, meetings, "user-1", meta_data={"role": "viewer"})
    # the newcomer learns of the agent from the join response (no participant object)
    (joined,) = user_events.named("meeting-joined")
    assert [(p["id"], p["peerType"], p["displayName"]) for p in joined["participants"]] == [
        ("agent-1", "agent", "Agent-1")
    ]
    # the agent gets participant-joined (not agent-joined) for a normal peer
    await until(lambda: agent_events.named("participant-joined"))
    participant = agent_events.named("participant-joined")[0]
    assert participant.id == "user-1"
    assert participant.display_name == "User-1"
    assert participant.meta_data == {"role": "viewer"}

    # a third peer of type agent is reported as agent-joined to the others
    await join(room, meetings, "agent-2", peer_type="agent")
    await until(lambda: user_events.named("agent-joined"))
    assert user_events.named("agent-joined")[0].id == "agent-2"

    records = room.peers(ROOM)
    assert {pid: r.peer_type for pid, r in records.items()} == {
        "agent-1": "agent",
        "user-1": "normal",
        "agent-2": "agent",
    }
    assert all(r.joined and not r.left for r in records.values())
    assert join_s < 5.0


@pytest.mark.slow
async def test_data_reaches_the_other_peer(room: LoopbackVideoSdkRoom, meetings: list[Any]) -> None:
    sender, _ = await join(room, meetings, "agent", peer_type="agent")
    avatar, receiver = await join(room, meetings, "avatar")
    # the sender's data producers are consumed by the receiver once it joined
    await until(lambda: len(room_client(avatar)._RoomClient__data_consumers) == 2)
    await until_sendable(sender)

    sent_at = time.monotonic()
    await sender.send('{"type": "segment_end"}', {"reliability": "RELIABLE"})
    await sender.send(b"\x00\x01pcm", {"reliability": "UNRELIABLE"})
    await sender.send(b"INTERRUPT", {"reliability": "RELIABLE"})
    await sender.send(b"\xff\xfe", {"reliability": "UNRELIABLE"})
    await until(lambda: len(receiver.data) == 4)
    latency = max(receiver.data_arrival) - sent_at

    by_payload = {d["payload"]: d for d in receiver.data}
    # bytes that decode as UTF-8 arrive as str (the SDK's doing); others stay bytes
    assert by_payload['{"type": "segment_end"}']["reliability"] == "RELIABLE"
    assert by_payload["\x00\x01pcm"]["reliability"] == "UNRELIABLE"
    assert by_payload["INTERRUPT"]["reliability"] == "RELIABLE"
    assert by_payload[b"\xff\xfe"]["reliability"] == "UNRELIABLE"
    assert all(d["from"] == "agent" for d in receiver.data)
    assert latency < 1.0

    relayed = room.data_messages(ROOM)
    assert [(m.from_peer, m.label) for m in relayed] == [
        ("agent", "reliable_data_producer"),
        ("agent", "unreliable_data_producer"),
        ("agent", "reliable_data_producer"),
        ("agent", "unreliable_data_producer"),
    ]
    assert relayed[1].payload == b"\x00\x01pcm"


@pytest.mark.slow
async def test_published_media_is_recorded_and_relayed(
    room: LoopbackVideoSdkRoom, meetings: list[Any]
) -> None:
    video = GrayTrack(fps=15.0, level=200)
    _, _ = await join(
        room,
        meetings,
        "avatar",
        mic=True,
        webcam=True,
        custom_microphone_audio_track=ToneTrack(),
        custom_camera_video_track=video,
    )
    viewer, _ = await join(room, meetings, "viewer")
    consumers = room_client(viewer)._RoomClient__consumers  # id -> Consumer

    await room.wait_for_media(ROOM, "avatar", "video", count=5)
    await room.wait_for_media(ROOM, "avatar", "audio", count=5)
    start_v = len(room.media(ROOM, "avatar", "video"))
    start_a = len(room.media(ROOM, "avatar", "audio"))
    t0 = time.monotonic()
    await asyncio.sleep(3.0)
    elapsed = time.monotonic() - t0
    frames = room.media(ROOM, "avatar", "video")[start_v:]
    chunks = room.media(ROOM, "avatar", "audio")[start_a:]

    fps = len(frames) / elapsed
    assert 12.0 <= fps <= 18.0, fps
    assert all(abs(f.data - 200) < 8 for f in frames), [f.data for f in frames[:5]]
    pcm = np.concatenate([c.data for c in chunks])
    assert chunks[0].sample_rate == 48000
    audio_s = len(pcm) / 48000
    assert 0.8 * elapsed <= audio_s <= 1.2 * elapsed, (audio_s, elapsed)
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    assert 3000 < rms < 8000, rms  # the tone (amplitude 8000 -> rms ~5657) survives Opus

    # the viewer consumes both tracks and really receives decoded media
    await until(lambda: {c.kind for c in consumers.values()} >= {"audio", "video"})
    video_consumer = next(c for c in consumers.values() if c.kind == "video")
    assert video_consumer.appData["peerId"] == "avatar"
    got = []
    async with asyncio.timeout(10):
        while len(got) < 5:
            try:
                got.append(await video_consumer.track.recv())
            except MediaStreamError:
                break
    assert len(got) == 5
    assert abs(float(got[-1].to_ndarray(format="gray").mean()) - 200) < 10


@pytest.mark.slow
async def test_leave_produces_peer_closed(room: LoopbackVideoSdkRoom, meetings: list[Any]) -> None:
    agent, agent_events = await join(room, meetings, "agent", peer_type="agent")
    user, _ = await join(room, meetings, "user")
    await until(lambda: agent_events.named("participant-joined"))
    peer_closed: list[Any] = []
    room_client(agent).on(Events.REMOVE_PEER, peer_closed.append)

    user.leave()
    await room.wait_for_peer_left(ROOM, "user", timeout=10)
    await until(lambda: agent_events.named("participant-left"))
    assert peer_closed == [{"peerId": "user"}]
    assert agent_events.named("participant-left")[0].id == "user"
    record = room.peers(ROOM)["user"]
    assert record.ws_closed and not record.kicked


@pytest.mark.slow
async def test_kick_closes_the_sdk_websocket(
    room: LoopbackVideoSdkRoom, meetings: list[Any]
) -> None:
    _, agent_events = await join(room, meetings, "agent", peer_type="agent")
    user, user_events = await join(room, meetings, "user")
    await until(lambda: agent_events.named("participant-joined"))

    await room.kick(ROOM, "user")
    websocket = room_client(user)._RoomClient__websocket
    await until(lambda: websocket.state.name == "CLOSED")
    await until(lambda: agent_events.named("participant-left"))
    # an abrupt close reaches the SDK as an error, not as meeting-left
    await until(lambda: user_events.named("error"))
    assert "Internal socket Error" in user_events.named("error")
    assert not user_events.named("meeting-left")
    record = room.peers(ROOM)["user"]
    assert record.kicked and record.left


async def _raw_socket(room: LoopbackVideoSdkRoom, peer_id: str) -> Any:
    ctx = ssl.create_default_context(cafile=str(room.ca_file))
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(
        f"wss://{room.signaling_host}/?roomId={ROOM}&peerId={peer_id}&peerType=normal",
        protocols=("protoo",),
        ssl=ctx,
    )
    return session, ws


async def test_room_survives_garbage(room: LoopbackVideoSdkRoom, meetings: list[Any]) -> None:
    session, ws = await _raw_socket(room, "garbage")
    try:
        await ws.send_str("{not json")
        await ws.send_str("[1, 2]")
        await ws.send_str(json.dumps({"request": True, "id": 1, "method": "produce", "data": 5}))
        await ws.send_str(json.dumps({"request": True, "id": 2, "method": "noSuchMethod"}))
        await ws.send_str(
            json.dumps(
                {
                    "request": True,
                    "id": 3,
                    "method": "createWebRtcTransport",
                    "data": {"producing": True, "sctpCapabilities": {}},
                }
            )
        )
        answers = {}
        async with asyncio.timeout(10):
            while len(answers) < 3:
                msg = json.loads((await ws.receive()).data)
                answers[msg["id"]] = msg
        assert answers[1]["ok"] is False
        assert answers[2] == {"response": True, "id": 2, "ok": True, "data": {}}
        assert answers[3]["data"]["iceParameters"]["iceLite"] is True
        # disconnect mid-join: transport created, never joined
    finally:
        await ws.close()
        await session.close()
    await room.wait_for_peer_left(ROOM, "garbage", timeout=5)
    assert len(room.protocol_errors) == 2

    # the room still works
    await join(room, meetings, "after-garbage")
    assert room.peers(ROOM)["after-garbage"].joined


SUBPROCESS_CLIENT = """
import asyncio, sys
import aioice.ice
# aioice skips 127.0.0.1 when gathering; the room only listens there
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
from videosdk import MeetingEventHandler, VideoSDK

class Events(MeetingEventHandler):
    def on_data(self, data):
        print("DATA", data["from"], data["payload"], flush=True)

async def main():
    meeting = VideoSDK.init_meeting(
        meeting_id=sys.argv[2], token="t", participant_id="sub-agent", name="Sub",
        mic_enabled=False, webcam_enabled=False, signaling_base_url=sys.argv[1],
        peer_type="agent",
    )
    meeting.add_event_listener(Events())
    await meeting.async_join()
    client = meeting._Meeting__room_client
    # send() raises until the send transport is connected AND the data channel is open
    while client._RoomClient__send_transport.connectionState != "connected" or (
        client._reliable_data_producer.readyState != "open"
    ):
        await asyncio.sleep(0.02)
    print("READY", flush=True)
    await meeting.send("from-subprocess", {"reliability": "RELIABLE"})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await client.async_leave()
    print("LEFT", flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_subprocess_client(room: LoopbackVideoSdkRoom, meetings: list[Any]) -> None:
    avatar, events = await join(room, meetings, "avatar")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUBPROCESS_CLIENT,
        room.host,
        ROOM,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **room.client_env()},
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).strip() == b"READY"
        await room.wait_for_peer(ROOM, "sub-agent")
        await until(lambda: events.named("agent-joined") and events.data)
        assert events.named("agent-joined")[0].id == "sub-agent"
        assert events.data[0]["payload"] == "from-subprocess"
        assert events.data[0]["from"] == "sub-agent"
        # the subprocess hears the in-process peer too
        await until_sendable(avatar)
        await avatar.send("to-subprocess", {"reliability": "RELIABLE"})
        async with asyncio.timeout(10):
            assert (await proc.stdout.readline()).strip() == b"DATA avatar to-subprocess"
        proc.stdin.write(b"leave\n")
        await proc.stdin.drain()
        async with asyncio.timeout(10):
            assert (await proc.stdout.readline()).strip() == b"LEFT"
        await room.wait_for_peer_left(ROOM, "sub-agent")
        await until(lambda: events.named("agent-left"))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.slow
async def test_sdk_on_a_graceful_close_and_a_refused_produce(
    room: LoopbackVideoSdkRoom, meetings: list[Any]
) -> None:
    # A refused produce: the SDK reports an error but still "joins" and keeps no producer.
    room.fail_requests["produce"] = (403, "no media for you")
    meeting, events = await join(room, meetings, "refused", mic=True)
    assert events.named("error") == ["Error while Producing Media", "Not Able to Enable Mic"]
    assert room.peers(ROOM)["refused"].producers == {}
    assert events.named("meeting-joined")
    room.fail_requests.clear()

    # A clean close frame from the room is silent in the SDK: no error, no meeting-left.
    await room.kick(ROOM, "refused", abrupt=False)
    websocket = room_client(meeting)._RoomClient__websocket
    await until(lambda: websocket.state.name == "CLOSED")
    await asyncio.sleep(0.3)
    assert not events.named("meeting-left")
    assert len(events.named("error")) == 2  # nothing new

    # the "close" request makes the SDK leave by itself
    _, other_events = await join(room, meetings, "closable")
    await room.close_peer(ROOM, "closable")
    await room.wait_for_peer_left(ROOM, "closable", timeout=10)
    await until(lambda: other_events.named("meeting-left"))


@pytest.mark.slow
async def test_forward_media_off_still_records(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, meetings: list[Any]
) -> None:
    async with LoopbackVideoSdkRoom(tmp_path, forward_media=False) as quiet:
        for key, value in quiet.client_env().items():
            monkeypatch.setenv(key, value)
        await join(quiet, meetings, "avatar", webcam=True, custom_camera_video_track=GrayTrack())
        viewer, _ = await join(quiet, meetings, "viewer")
        frames = await quiet.wait_for_media(ROOM, "avatar", "video", count=3)
        assert frames[0].data.shape == (240, 320)  # default reducer: the gray frame
        await until(lambda: len(room_client(viewer)._RoomClient__data_consumers) == 2)
        assert room_client(viewer)._RoomClient__consumers == {}
        for meeting in meetings:
            await room_client(meeting).async_leave()
