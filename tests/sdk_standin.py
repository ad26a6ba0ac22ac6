"""A stand-in for the ``videosdk`` SDK's ``RoomClient``, under the SDK's real ``Meeting``.

:func:`standin_init_meeting` builds a real ``videosdk.meeting.Meeting`` (so
listeners are called exactly as the SDK calls them: ``handle_event(name,
data)`` from ``Meeting.__emit``, unguarded) around :class:`StandInRoomClient`,
a pyee ``AsyncIOEventEmitter`` that emits the SDK's ``Events.*`` with the
SDK's payload shapes, in the order ``RoomClient.async_join`` does: state
``CONNECTING``, the websocket, ``CONNECTED``, the message loop task, then
whatever the test scripts for the join (data, peers, errors, their ERROR log
records), then ``MEETING_JOINED``.  ``async_leave`` follows the SDK's too
(``CLOSING`` first, then websocket, transports, ``CLOSED``, ``MEETING_LEFT``).

What it does not model: protoo/JSON signalling, mediasoup, ICE/DTLS/SCTP,
real sockets (:class:`StandInWebsocket` is an in-memory object with the
``wait_closed``/``close``/``close_code`` surface of a ``websockets``
connection), the server-config request, consumers other than the ones a test
emits, and timing.  The loopback room in ``tests/videosdk_room`` covers those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyee.asyncio import AsyncIOEventEmitter
from videosdk._events import Events
from videosdk.meeting import Meeting

sdk_log = logging.getLogger("videosdk.room_client")  # where the SDK logs its causes


class StandInWebsocket:
    def __init__(self) -> None:
        self.close_code: int | None = None
        self._closed = asyncio.Event()

    async def close(self, code: int = 1000) -> None:
        if self.close_code is None:
            self.close_code = code
        self._closed.set()

    def drop(self, code: int = 1006) -> None:
        """The server side went away."""
        self.close_code = code
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class StandInMediaTransport(AsyncIOEventEmitter):
    """A pymediasoup ``Transport``: ``connectionstatechange`` events and ``close()``."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def close(self) -> None:
        self.closed = True


@dataclass
class JoinScript:
    """What happens while the stand-in joins, in order."""

    peers: list[dict] = field(default_factory=list)
    during_join: list[Callable[[StandInRoomClient], Any]] = field(default_factory=list)
    hang: bool = False  # never finish joining


class StandInRoomClient(AsyncIOEventEmitter):
    def __init__(self, script: JoinScript) -> None:
        super().__init__()
        self.script = script
        self.session_id = "session-1"
        self._closed = False
        self._RoomClient__websocket: StandInWebsocket | None = None
        self._RoomClient__tasks: dict[str, asyncio.Task] = {}
        self._RoomClient__send_transport: StandInMediaTransport | None = None
        self._RoomClient__recv_transport: StandInMediaTransport | None = None
        self.join_started = asyncio.Event()
        self.sent: list[tuple[Any, Any]] = []

    @property
    def websocket(self) -> StandInWebsocket | None:
        return self._RoomClient__websocket

    @property
    def transports(self) -> list[StandInMediaTransport]:
        return [
            t
            for t in (self._RoomClient__send_transport, self._RoomClient__recv_transport)
            if t is not None
        ]

    async def async_join(self) -> None:
        self.emit(Events.MEETING_STATE_CHANGED, {"state": "CONNECTING"})
        self._RoomClient__websocket = StandInWebsocket()
        self.emit(Events.MEETING_STATE_CHANGED, {"state": "CONNECTED"})
        self._RoomClient__tasks["TASK_INCOMING_MESSAGES"] = asyncio.ensure_future(
            self._message_loop()
        )
        self._RoomClient__send_transport = StandInMediaTransport()
        self._RoomClient__recv_transport = StandInMediaTransport()
        self.join_started.set()
        for step in self.script.during_join:
            result = step(self)
            if asyncio.iscoroutine(result):
                await result
            await asyncio.sleep(0)
        if self.script.hang:
            await asyncio.Event().wait()
        self.emit(
            Events.MEETING_JOINED,
            {"participants": self.script.peers, "messages": [], "base_url": "127.0.0.1"},
        )

    async def _message_loop(self) -> None:
        # ``async for Data in websocket`` ends, silently, when the websocket closes.
        await self._RoomClient__websocket.wait_closed()

    # -- what the room does, as the SDK reports it ----------------------------------

    def data(self, sender: str, payload: Any, reliability: str = "RELIABLE") -> None:
        self.emit(
            Events.CHAT_MESSAGE,
            {
                "payload": payload,
                "from": sender,
                "timestamp": int(time.time() * 1000),
                "reliability": reliability,
            },
        )

    def new_peer(self, peer_id: str, peer_type: str = "normal") -> None:
        self.emit(
            Events.ADD_PEER,
            {
                "id": peer_id,
                "displayName": peer_id,
                "device": "Unknown",
                "mode": "SEND_AND_RECV",
                "peerType": peer_type,
            },
        )

    def peer_closed(self, peer_id: str) -> None:
        self.emit(Events.REMOVE_PEER, {"peerId": peer_id})

    def error(self, message: str, cause: str | None = None) -> None:
        if cause is not None:
            sdk_log.error(cause)
        self.emit(Events.ERROR, message)

    def server_close_request(self) -> None:
        """The room's protoo ``close`` request: the SDK calls ``self.leave()``."""
        self.leave()

    # -- the SDK's leave ------------------------------------------------------------

    def leave(self) -> None:
        self._RoomClient__tasks["TASK_ANY-leave"] = asyncio.ensure_future(self.async_leave())

    async def async_leave(self) -> None:
        try:
            self.emit(Events.MEETING_STATE_CHANGED, {"state": "CLOSING"})
            if self._closed:
                return
            self._closed = True
            if self._RoomClient__websocket:
                await self._RoomClient__websocket.close()
            for transport in self.transports:
                await transport.close()
            self.release()
            self.emit(Events.MEETING_STATE_CHANGED, {"state": "CLOSED"})
            self.emit(Events.MEETING_LEFT, {})
        except Exception as e:
            sdk_log.error(f"Failed to Leave :: {e}")
            self.emit(Events.ERROR, "Failed to Leave from the Meeting")

    def release(self) -> None:
        for task in self._RoomClient__tasks.values():
            task.cancel()

    async def send(self, payload: Any, options: Any = None) -> bool:
        self.sent.append((payload, options))
        return True


def standin_init_meeting(script: JoinScript, made: list[Meeting]) -> Callable[..., Meeting]:
    """An ``init_meeting`` for :class:`~worker.transports.videosdk.VideoSdkTransport`."""

    def init_meeting(**kwargs: Any) -> Meeting:
        meeting = Meeting(kwargs["meeting_id"], None, StandInRoomClient(script))
        meeting.init_kwargs = kwargs  # type: ignore[attr-defined]
        made.append(meeting)
        return meeting

    return init_meeting


def room_client(meeting: Meeting) -> StandInRoomClient:
    return meeting._Meeting__room_client  # type: ignore[attr-defined]
