"""The ``videosdk`` transport: join a real VideoSDK room with the avatar's tracks.

Facts of the SDK (``videosdk`` 0.4) this module handles:

* ``Meeting.async_join()`` does not raise when the join fails: it emits
  ``on_error`` and the state ``FAILED`` and returns.  Success is the
  ``meeting-joined`` event, nothing else.
* ``async_join()`` starts with a blocking HTTP request (the server config,
  ``requests.post`` without a timeout) on the event loop.  We make that
  request first, in a daemon thread with our join timeout, and hand its
  result to the SDK, so the loop never blocks and a hung request cannot
  keep a process alive.
* ``async_join()`` emits ``error`` and then still ``meeting-joined`` when
  publishing the camera or microphone failed: any error during the join
  (but those about remote media, see :mod:`.sdk_errors`) fails it, and the
  :class:`JoinError` quotes the SDK's own ERROR log record of the cause.
* Listeners (the session's too) are on the meeting before ``async_join()``
  starts: the SDK delivers data from the moment its data consumers exist,
  which is before ``meeting-joined``.
* Every listener is a guarded ``MeetingEventHandler`` (:mod:`worker.listeners`):
  the SDK calls ``handle_event`` unguarded, and an exception from the
  ``CLOSING`` state event stops ``async_leave()`` before it closes anything.
* Remote media is received and decoded whether anyone reads it or not, and a
  remote audio track queues decoded frames without bound.  The avatar uses
  no remote media: each consumer's receiver drops RTP from the first packet
  (:mod:`.remote_media`); RTCP and the transport keep running.
* The agent is the peer whose ``peerType`` is ``agent`` (in ``meeting-joined``
  ``participants`` and ``newPeer``): the transport names it to the session at
  once.  Participants already in the room when we join get no participant
  object, so "the agent left" is taken from the room client's peer events.
* The SDK pings its websocket every 2000 s and its message loop ends silently
  when the server closes it: the transport watches the websocket, the
  message loop and the WebRTC transports' connection state, and ends the
  session with ``connection lost``.
* A Stop while joining cancels the SDK's join task and closes what it opened
  (websocket, transports), so the room drops us: no ghost participant.
  ``leave()`` closes the websocket itself if the SDK's leave did not.

The room client is reached through the ``Meeting`` object's private
attribute; if a future SDK renames it, the transport still works but logs
that remote media is drained instead of dropped and that only the meeting's
own events end the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from videosdk import VideoSDK
from videosdk import room_client as room_client_module
from videosdk._events import Events
from videosdk.utils import get_server_config
from videosdk.videosdk import SIGNALLING_BASE_URL

from ..dispatcher.messages import JoinSpec
from ..listeners import RoomListener
from .base import (
    REASON_AGENT_LEFT,
    REASON_CONNECTION_LOST,
    REASON_REMOVED,
    REASON_ROOM_CLOSED,
    REASON_ROOM_EMPTY,
    JoinError,
    Meeting,
    RoomTransport,
)
from .remote_media import discard_remote_media
from .sdk_errors import SdkErrorLog, is_fatal_join_error

logger = logging.getLogger(__name__)


class _RoomEvents(RoomListener):
    """The meeting's own events, for the transport (guarded: never raises into the SDK)."""

    def __init__(self, transport: VideoSdkTransport) -> None:
        super().__init__()
        self._t = transport

    def on_meeting_joined(self, data: Any) -> None:
        self._t._on_joined(data)

    def on_meeting_left(self, data: Any) -> None:
        self._t._close(REASON_ROOM_CLOSED, "the room closed the meeting")

    def on_error(self, data: Any) -> None:
        self._t._on_error(str(data))

    def on_meeting_state_change(self, data: Any) -> None:
        state = data.get("state") if isinstance(data, dict) else None
        if state == "FAILED":
            self._t._sdk_join_failed = True

    def on_agent_left(self, agent: Any) -> None:
        self._t._on_peer_left({"peerId": getattr(agent, "id", None)})


def _fetch_in_thread(
    fetch: Callable[[str, str, str], Any], room: str, token: str, host: str
) -> asyncio.Future:
    """Run a blocking request in a daemon thread (never joined, so it cannot block exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fetch(room, token, host), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop may be gone
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="videosdk-server-config", daemon=True).start()
    return future


@contextlib.contextmanager
def _prefetched_server_config(config: Any) -> Iterator[None]:
    """Make the SDK's own server-config request return ``config`` without I/O."""
    original = room_client_module.get_server_config
    room_client_module.get_server_config = lambda *args, **kwargs: config
    try:
        yield
    finally:
        room_client_module.get_server_config = original


class VideoSdkTransport(RoomTransport):
    def __init__(
        self,
        join: JoinSpec,
        *,
        join_timeout: float = 20.0,
        display_name: str = "Avatar",
        init_meeting: Callable[..., Any] = VideoSDK.init_meeting,
        fetch_server_config: Callable[[str, str, str], Any] = get_server_config,
        leave_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.spec = join
        self.join_timeout = join_timeout
        self.leave_timeout = leave_timeout
        self.display_name = display_name
        self._init_meeting = init_meeting
        self._fetch_server_config = fetch_server_config
        self.meeting: Any = None
        self._participant_id: str | None = None
        self._room_client: Any = None
        self._events: _RoomEvents | None = None
        self._join_task: asyncio.Task | None = None
        self._joined = asyncio.Event()
        self._join_errors: list[str] = []
        self._sdk_join_failed = False  # the SDK's state FAILED (its error event says why)
        self._sdk_log = SdkErrorLog()
        self._watchers: list[asyncio.Task] = []
        self._leaving = False
        self.remote_peers: dict[str, str] = {}  # peer id -> peer type
        self.muted_consumers = 0

    async def _join(
        self, *, participant_id: str, audio_track: Any, video_track: Any, listeners: Sequence[Any]
    ) -> Meeting:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.join_timeout
        host = self.spec.signaling_base_url or SIGNALLING_BASE_URL
        room, token = self.spec.room_name, self.spec.token
        self._participant_id = participant_id
        try:
            config = await asyncio.wait_for(
                _fetch_in_thread(self._fetch_server_config, room, token, host),
                self.join_timeout,
            )
        except TimeoutError:
            raise JoinError(
                f"VideoSDK ({host}) did not answer within {self.join_timeout:g} s"
            ) from None
        except Exception as exc:
            raise JoinError(f"VideoSDK ({host}) refused room {room!r}: {exc}") from exc

        self.meeting = self._init_meeting(
            meeting_id=room,
            token=token,
            participant_id=participant_id,
            name=self.display_name,
            custom_microphone_audio_track=audio_track,
            custom_camera_video_track=video_track,
            mic_enabled=True,
            webcam_enabled=True,
            chat_enabled=True,
            signaling_base_url=host,
            buffer_size=1,
            loop=loop,
        )
        # Everything listens before the SDK starts: data can arrive while it is joining.
        self._events = _RoomEvents(self)
        self.meeting.add_event_listener(self._events)
        for listener in listeners:
            self.meeting.add_event_listener(listener)
        self._hook_room_client()
        try:
            with self._sdk_log.capture(), _prefetched_server_config(config):
                self._join_task = loop.create_task(self.meeting.async_join())
                # The SDK waits 15 s for each answer of a room that has gone: do not.
                lost = loop.create_task(self._signalling_closed())
                try:
                    done, _ = await asyncio.wait(
                        {self._join_task, lost},
                        timeout=max(0.0, deadline - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    lost.cancel()
                if not done:
                    await self._abandon()
                    raise JoinError(
                        f"joining room {room!r} took longer than {self.join_timeout:g} s"
                        + self._sdk_cause()
                    )
                if self._join_task not in done:
                    await self._abandon()
                    raise JoinError(
                        f"the room closed the connection while joining room {room!r} "
                        f"({lost.result()})" + self._sdk_cause()
                    )
        except asyncio.CancelledError:
            # Stopped while joining: cancel the SDK's join and close what it opened, so the
            # room sees our websocket close and drops us (no ghost participant).
            await asyncio.shield(self._abandon())
            raise
        fatal = [e for e in self._join_errors if is_fatal_join_error(e)]
        if not self._joined.is_set() or fatal or self._sdk_join_failed:
            await self._abandon()
            reason = fatal[0] if fatal else "the join failed" if self._sdk_join_failed else None
            reason = reason or (self._join_errors or ["no reason given"])[0]
            raise JoinError(
                f"VideoSDK refused the join to room {room!r}: {reason}" + self._sdk_cause()
            )
        self._watch_connection()
        return self.meeting

    async def _signalling_closed(self) -> str:
        """How the SDK's websocket closed, once it has opened and closed."""
        while (websocket := getattr(self._room_client, "_RoomClient__websocket", None)) is None:
            await asyncio.sleep(0.05)
        await websocket.wait_closed()
        return f"websocket closed with code {getattr(websocket, 'close_code', None)}"

    def _sdk_cause(self) -> str:
        cause = self._sdk_log.cause()
        return f" (SDK: {cause})" if cause else ""

    # -- room events ---------------------------------------------------------------

    def _hook_room_client(self) -> None:
        self._room_client = getattr(self.meeting, "_Meeting__room_client", None)
        if self._room_client is None or not hasattr(self._room_client, "on"):
            logger.warning(
                "this videosdk version hides its room client: remote media is drained, not "
                "dropped, and only the meeting's own events end the session"
            )
            self._room_client = None
            return
        for event, handler in (
            (Events.ADD_CONSUMER, self._drop_remote_media),
            (Events.ADD_PEER, self._on_peer_joined),
            (Events.REMOVE_PEER, self._on_peer_left),
        ):
            self._room_client.on(event, _never_raises(handler))

    def _on_joined(self, data: Any) -> None:
        for peer in (data or {}).get("participants") or []:
            self._on_peer_joined(peer)
        self._joined.set()

    def _on_error(self, message: str) -> None:
        if not self._joined.is_set() and not self._leaving:
            self._join_errors.append(message)
        else:
            logger.warning("VideoSDK reported an error: %s", message)

    def _on_peer_joined(self, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            return
        peer, kind = data["id"], str(data.get("peerType") or "normal")
        if peer == self._participant_id:
            return
        self.remote_peers[peer] = kind
        if kind == "agent":
            self._name_agent(peer)

    def _on_peer_left(self, data: Any) -> None:
        peer = data.get("peerId") if isinstance(data, dict) else None
        if peer is None:
            return
        if peer == self._participant_id:
            self._close(REASON_REMOVED, "the room closed our peer")
            return
        kind = self.remote_peers.pop(peer, None)
        if peer == self.agent_id or kind == "agent":
            self._close(REASON_AGENT_LEFT, f"the agent ({peer}) left the room")
        elif not self.remote_peers and self._joined.is_set():
            self._close(REASON_ROOM_EMPTY, "everyone else left the room")

    def _close(self, reason: str, detail: str | None = None) -> None:
        if not self._leaving:
            super()._close(reason, detail)

    def _drop_remote_media(self, consumer: Any) -> None:
        """Decode and keep nothing of a remote track (bounded memory, no wasted CPU)."""
        if discard_remote_media(getattr(consumer, "rtpReceiver", None)):
            self.muted_consumers += 1
            return
        track = getattr(consumer, "track", None)
        if track is not None:
            self._watchers.append(asyncio.get_running_loop().create_task(_drain(track)))

    # -- the connection, once joined ---------------------------------------------------

    def _watch_connection(self) -> None:
        """End the session when the signalling websocket or a WebRTC transport is lost.

        The SDK pings its websocket every 2000 s and, when the server closes it
        cleanly, its message loop just ends: nothing tells the meeting.
        """
        client = self._room_client
        if client is None:
            return
        loop = asyncio.get_running_loop()
        self._watchers.append(loop.create_task(self._watch_signalling(client)))
        for name in ("send", "recv"):
            transport = getattr(client, f"_RoomClient__{name}_transport", None)
            if transport is not None and hasattr(transport, "on"):
                transport.on("connectionstatechange", _never_raises(self._on_media_state(name)))

    async def _watch_signalling(self, client: Any) -> None:
        websocket = getattr(client, "_RoomClient__websocket", None)
        tasks = getattr(client, "_RoomClient__tasks", None) or {}
        message_loop = tasks.get("TASK_INCOMING_MESSAGES")
        waits: list[asyncio.Future] = []
        if websocket is not None and hasattr(websocket, "wait_closed"):
            waits.append(asyncio.ensure_future(websocket.wait_closed()))
        if isinstance(message_loop, asyncio.Future):
            waits.append(message_loop)  # awaited, never cancelled by us
        if not waits:
            return
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if waits and waits[0] is not message_loop:
                waits[0].cancel()
        if getattr(client, "_closed", False) is True:
            # The SDK is leaving by itself: the room sent protoo "close" (its leave closes
            # the websocket before it emits meeting-left).
            self._close(REASON_ROOM_CLOSED, "the room asked us to leave")
            return
        code = getattr(websocket, "close_code", None)
        how = f"closed with code {code}" if code is not None else "ended"
        detail = f"the connection to the room was lost (websocket {how})"
        self._close(REASON_CONNECTION_LOST, detail)

    def _on_media_state(self, name: str) -> Callable[[str], None]:
        def changed(state: str) -> None:
            if state in ("failed", "closed"):
                self._close(
                    REASON_CONNECTION_LOST,
                    f"the connection to the room was lost ({name} transport {state})",
                )

        return changed

    # -- leaving -------------------------------------------------------------------------

    async def _abandon(self) -> None:
        """Undo a failed or stopped join: close sockets and transports, cancel the SDK's tasks."""
        self._leaving = True
        await self._leave_room()

    async def _leave_room(self) -> None:
        for task in self._watchers:
            task.cancel()
        self._watchers.clear()
        join, self._join_task = self._join_task, None
        if join is not None and not join.done():
            join.cancel()  # the SDK's join must not go on connecting after we left
            with contextlib.suppress(BaseException):
                await join
        if self.meeting is None:
            return
        meeting, self.meeting = self.meeting, None
        client = self._room_client
        try:
            if client is not None:
                await asyncio.wait_for(client.async_leave(), self.leave_timeout)
            else:
                meeting.leave()
        except Exception:
            logger.warning("leaving the room failed", exc_info=True)
        await self._close_websocket(client)
        with contextlib.suppress(Exception):
            meeting.release()  # cancels the SDK's tasks (message loop, consumers)
        with contextlib.suppress(Exception):
            meeting.remove_all_listeners()

    async def _close_websocket(self, client: Any) -> None:
        """Close the signalling websocket if the SDK's leave did not (the room then drops us)."""
        websocket = getattr(client, "_RoomClient__websocket", None)
        if websocket is None or not hasattr(websocket, "close"):
            return
        if getattr(websocket, "close_code", None) is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(), self.leave_timeout)

    async def leave(self) -> None:
        self._leaving = True
        await self._leave_room()


def _never_raises(handler: Callable[..., None]) -> Callable[..., None]:
    """A room-client handler: pyee re-raises handler errors into the SDK's own code."""

    def call(*args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            logger.exception("handling a room event failed")

    return call


async def _drain(track: Any) -> None:
    with contextlib.suppress(Exception):
        while True:
            await track.recv()
