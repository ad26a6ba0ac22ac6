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
* Remote media is received and decoded whether anyone reads it or not, and a
  remote audio track queues decoded frames without bound.  The avatar uses
  no remote media, so each consumer's decoder is stopped as soon as it is
  created (RTP is still acknowledged; nothing is decoded or kept).
* Participants already in the room when we join get no participant object,
  so "the agent left" is taken from the room client's peer events.

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
from collections.abc import Callable, Iterator
from typing import Any

from videosdk import MeetingEventHandler, VideoSDK
from videosdk import room_client as room_client_module
from videosdk._events import Events
from videosdk.utils import get_server_config
from videosdk.videosdk import SIGNALLING_BASE_URL

from ..dispatcher.messages import JoinSpec
from .base import JoinError, Meeting, RoomTransport

logger = logging.getLogger(__name__)


class _RoomEvents(MeetingEventHandler):
    def __init__(self, transport: VideoSdkTransport) -> None:
        super().__init__()
        self._t = transport

    def on_meeting_joined(self, data: Any) -> None:
        self._t._on_joined(data)

    def on_meeting_left(self, data: Any) -> None:
        self._t._close("room closed")

    def on_error(self, data: Any) -> None:
        self._t._on_error(str(data))

    def on_meeting_state_change(self, data: Any) -> None:
        state = data.get("state") if isinstance(data, dict) else None
        if state == "FAILED":
            self._t._on_error("the join failed")

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


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
    ) -> None:
        super().__init__()
        self.spec = join
        self.join_timeout = join_timeout
        self.display_name = display_name
        self._init_meeting = init_meeting
        self._fetch_server_config = fetch_server_config
        self.meeting: Any = None
        self._room_client: Any = None
        self._events: _RoomEvents | None = None
        self._joined = asyncio.Event()
        self._error: str | None = None
        self._leaving = False
        self.remote_peers: dict[str, str] = {}  # peer id -> peer type
        self.muted_consumers = 0

    async def join(self, *, participant_id: str, audio_track: Any, video_track: Any) -> Meeting:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.join_timeout
        host = self.spec.signaling_base_url or SIGNALLING_BASE_URL
        room, token = self.spec.room_name, self.spec.token
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
        self._events = _RoomEvents(self)
        self.meeting.add_event_listener(self._events)
        self._hook_room_client()
        with _prefetched_server_config(config):
            task = loop.create_task(self.meeting.async_join())
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - loop.time()))
            except TimeoutError:
                task.cancel()
                await self._abandon()
                raise JoinError(
                    f"joining room {room!r} took longer than {self.join_timeout:g} s"
                ) from None
        if not self._joined.is_set():
            await self._abandon()
            raise JoinError(
                f"VideoSDK refused the join to room {room!r}: {self._error or 'no reason given'}"
            )
        return self.meeting

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
        self._room_client.on(Events.ADD_CONSUMER, self._drop_remote_media)
        self._room_client.on(Events.ADD_PEER, self._on_peer_joined)
        self._room_client.on(Events.REMOVE_PEER, self._on_peer_left)

    def _on_joined(self, data: Any) -> None:
        for peer in (data or {}).get("participants") or []:
            if isinstance(peer, dict) and isinstance(peer.get("id"), str):
                self.remote_peers[peer["id"]] = str(peer.get("peerType", "normal"))
        self._joined.set()

    def _on_error(self, message: str) -> None:
        if not self._joined.is_set():
            self._error = self._error or message
        else:
            logger.warning("VideoSDK reported an error: %s", message)

    def _on_peer_joined(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            self.remote_peers[data["id"]] = str(data.get("peerType", "normal"))

    def _on_peer_left(self, data: Any) -> None:
        peer = data.get("peerId") if isinstance(data, dict) else None
        kind = self.remote_peers.pop(peer, None)
        if peer is not None and (peer == self.agent_id or kind == "agent"):
            self._close("agent left")
        elif not self.remote_peers and self._joined.is_set():
            self._close("room empty")

    def _close(self, reason: str) -> None:
        if not self._leaving:
            super()._close(reason)

    def _drop_remote_media(self, consumer: Any) -> None:
        """Stop decoding a remote track nobody reads (bounded memory, no wasted CPU)."""
        receiver = getattr(consumer, "rtpReceiver", None)
        stop_decoder = getattr(receiver, "_handle_disconnect", None)
        if callable(stop_decoder):
            stop_decoder()
            self.muted_consumers += 1
            return
        track = getattr(consumer, "track", None)
        if track is not None:
            asyncio.get_running_loop().create_task(_drain(track))

    # -- leaving -------------------------------------------------------------------------

    async def _abandon(self) -> None:
        """Undo a failed join: close sockets and transports, cancel the SDK's tasks."""
        self._leaving = True
        await self._leave_room()

    async def _leave_room(self) -> None:
        if self.meeting is None:
            return
        meeting, self.meeting = self.meeting, None
        try:
            if self._room_client is not None:
                await asyncio.wait_for(self._room_client.async_leave(), 5.0)
            else:
                meeting.leave()
        except Exception:
            logger.debug("leaving the room failed", exc_info=True)
        with contextlib.suppress(Exception):
            meeting.release()
        with contextlib.suppress(Exception):
            meeting.remove_all_listeners()

    async def leave(self) -> None:
        self._leaving = True
        await self._leave_room()


async def _drain(track: Any) -> None:
    with contextlib.suppress(Exception):
        while True:
            await track.recv()
