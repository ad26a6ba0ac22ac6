"""The loopback room: lifecycle, public API and protoo signalling over aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import tempfile
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from vsaiortc.contrib.media import MediaRelay

from .certs import CertFiles, make_certificates
from .init_config import ConfigServer, encrypt_ice_servers
from .peers import Peer, Reject
from .records import (
    DataMessage,
    MediaFrame,
    PeerRecord,
    VideoReducer,
    now,
    reduce_video_gray,
)
from .sfu import MediaSink, Sfu
from .transports import patch_loopback_ice

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 20.0


class LoopbackVideoSdkRoom(Sfu):
    """A tiny mediasoup-like SFU on 127.0.0.1 that the real videosdk SDK can join.

    ``host`` is what clients pass as ``signaling_base_url``.  See the package
    docstring for the messages it speaks and what it does not model.

    ``tmp_dir``: where the CA and server certificate go (a new temp dir if None).
    ``video_reducer(frame)``: what is kept per recorded video frame (default: the
    gray ndarray).  ``sink(room, peer, kind, MediaFrame)``: replaces recording.
    ``record_media=False``: nothing is decoded for recording.  ``forward_media=False``:
    no newConsumer is sent (saves the relay's decode + re-encode per consumer); a set
    such as ``{"audio"}`` forwards only those kinds.
    """

    def __init__(
        self,
        tmp_dir: str | Path | None = None,
        *,
        video_reducer: VideoReducer | None = None,
        sink: MediaSink | None = None,
        record_media: bool = True,
        forward_media: bool | Collection[str] = True,
    ) -> None:
        self._tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.mkdtemp())
        self._video_reducer = video_reducer or reduce_video_gray
        self._sink: MediaSink = sink or self._record_frame
        self._record_media = record_media
        self._forward_kinds = frozenset(
            {"audio", "video"} if forward_media is True else forward_media or ()
        )
        self._certs: CertFiles | None = None
        self._runner: web.AppRunner | None = None
        self._http: ConfigServer | None = None
        self._config_requests: list[dict[str, Any]] = []
        self._undo_ice: Callable[[], None] | None = None
        self._ws_port = 0
        self._host = ""
        self._rooms: dict[str, dict[str, Peer]] = {}
        self._records: dict[str, dict[str, PeerRecord]] = {}
        self._media: dict[tuple[str, str, str], list[MediaFrame]] = {}
        self._data: dict[str, list[DataMessage]] = {}
        self._relay = MediaRelay()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.protocol_errors: list[str] = []  # garbage the room ignored, for tests
        # method -> (errorCode, errorReason): answer those requests ok: false (failure paths)
        self.fail_requests: dict[str, tuple[int, str]] = {}
        # (peer id, method) -> seconds the room waits before handling it (a slow room)
        self.delay_requests: dict[tuple[str, str], float] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> LoopbackVideoSdkRoom:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        for name in ("aioice", "vsaiortc"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._certs = make_certificates(self._tmp_dir / "loopback-room-tls")
        self._undo_ice = patch_loopback_ice()

        app = web.Application()
        app.router.add_get("/", self._ws_handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._certs.server_context())
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self._ws_port = server.sockets[0].getsockname()[1]

        # server-init-config is fetched with a blocking requests.post on the client's
        # event loop, so it is served from a thread: an in-process client would
        # otherwise wait for a loop it is blocking.
        self._http = ConfigServer(
            self._certs.server_context(), self._init_config, self._config_requests
        )
        self._host = f"127.0.0.1:{self._http.port}"
        self._http.start()

    async def stop(self) -> None:
        for room in list(self._rooms.values()):
            for peer in list(room.values()):
                with contextlib.suppress(Exception):
                    await peer.ws.close(code=1001, message=b"room stopped")
                await self._peer_gone(peer)
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            http, self._http = self._http, None
            await asyncio.get_running_loop().run_in_executor(None, http.stop)
        if self._undo_ice is not None:
            self._undo_ice()
            self._undo_ice = None

    # -- public API ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: a client's ``signaling_base_url``."""
        return self._host

    @property
    def signaling_host(self) -> str:
        """``127.0.0.1:PORT`` of the websocket (the init-config's ``baseUrl``)."""
        return f"127.0.0.1:{self._ws_port}"

    @property
    def ca_file(self) -> Path:
        assert self._certs is not None, "start() the room first"
        return self._certs.ca_file

    def client_env(self) -> dict[str, str]:
        """Environment a client needs to trust the room (requests and websockets)."""
        return {"SSL_CERT_FILE": str(self.ca_file), "REQUESTS_CA_BUNDLE": str(self.ca_file)}

    @property
    def config_requests(self) -> list[dict[str, Any]]:
        """Every server-init-config request: path, roomId, authorization (the token)."""
        return list(self._config_requests)

    def peers(self, room_id: str) -> dict[str, PeerRecord]:
        """Peer id -> record (the latest connection with that id), including peers that left."""
        return dict(self._records.get(room_id, {}))

    def media(self, room_id: str, peer_id: str, kind: str) -> list[MediaFrame]:
        return list(self._media.get((room_id, peer_id, kind), []))

    def data_messages(self, room_id: str) -> list[DataMessage]:
        return list(self._data.get(room_id, []))

    async def wait_for_peer(self, room_id: str, peer_id: str, timeout: float = 20.0) -> PeerRecord:
        """Until the peer's join request has been answered."""
        return await self._wait(room_id, peer_id, lambda r: r.joined, timeout, "join")

    async def wait_for_peer_left(
        self, room_id: str, peer_id: str, timeout: float = 20.0
    ) -> PeerRecord:
        return await self._wait(room_id, peer_id, lambda r: r.left, timeout, "leave")

    async def wait_for_media(
        self, room_id: str, peer_id: str, kind: str, count: int = 1, timeout: float = 20.0
    ) -> list[MediaFrame]:
        async with asyncio.timeout(timeout):
            while len(self._media.get((room_id, peer_id, kind), [])) < count:
                await asyncio.sleep(0.02)
        return self.media(room_id, peer_id, kind)

    async def kick(self, room_id: str, peer_id: str, *, abrupt: bool = True) -> None:
        """Drop a peer: its websocket and transports close, the others get peerClosed.

        ``abrupt=True`` aborts the TCP connection without a close frame (the SDK's
        reader sees ConnectionClosedError); ``abrupt=False`` sends close code 1000.
        """
        peer = self._rooms.get(room_id, {}).get(peer_id)
        if peer is None:
            raise KeyError(f"no peer {peer_id!r} in room {room_id!r}")
        peer.record.kicked = True
        if abrupt:
            transport = peer.http_request.transport
            if transport is not None:
                transport.abort()
        else:
            with contextlib.suppress(Exception):
                await peer.ws.close(code=1000, message=b"kicked")
        await self._peer_gone(peer)

    async def close_peer(self, room_id: str, peer_id: str) -> None:
        """Send the protoo request ``close`` (the SDK answers by leaving)."""
        peer = self._rooms.get(room_id, {}).get(peer_id)
        if peer is None:
            raise KeyError(f"no peer {peer_id!r} in room {room_id!r}")
        with contextlib.suppress(Exception):
            await self._request(peer, "close", {}, timeout=2.0)

    # -- recording -----------------------------------------------------------------------------

    def _record_frame(self, room_id: str, peer_id: str, kind: str, frame: MediaFrame) -> None:
        self._media.setdefault((room_id, peer_id, kind), []).append(frame)

    def _init_config(self) -> dict[str, Any]:
        return {
            "baseUrl": self.signaling_host,
            "iceServers": encrypt_ice_servers([]),
            "observability": {"jwt": None, "traces": {}, "logs": {}, "metaData": {}},
        }

    async def _wait(
        self,
        room_id: str,
        peer_id: str,
        done: Callable[[PeerRecord], bool],
        timeout: float,
        what: str,
    ) -> PeerRecord:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    record = self._records.get(room_id, {}).get(peer_id)
                    if record is not None and done(record):
                        return record
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise TimeoutError(
                f"peer {peer_id!r} did not {what} room {room_id!r} within {timeout:g} s"
            ) from None

    def _spawn(self, owner: set[asyncio.Task[Any]], coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        owner.add(task)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            owner.discard(t)
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("room task failed", exc_info=t.exception())

        task.add_done_callback(done)

    # -- signalling ----------------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        room_id = request.query.get("roomId")
        peer_id = request.query.get("peerId")
        if not room_id or not peer_id:
            return web.Response(status=400, text="roomId and peerId are required")
        ws = web.WebSocketResponse(protocols=("protoo",), autoping=True, max_msg_size=0)
        await ws.prepare(request)

        old = self._rooms.get(room_id, {}).get(peer_id)
        if old is not None:  # same id again: the newest connection wins
            old.record.kicked = True
            with contextlib.suppress(Exception):
                await old.ws.close(code=4409, message=b"replaced")
            await self._peer_gone(old)

        record = PeerRecord(
            room_id=room_id,
            peer_id=peer_id,
            peer_type=request.query.get("peerType") or "normal",
            mode=request.query.get("mode") or "SEND_AND_RECV",
            connected_at=now(),
        )
        peer = Peer(room_id=room_id, peer_id=peer_id, ws=ws, http_request=request, record=record)
        self._rooms.setdefault(room_id, {})[peer_id] = peer
        self._records.setdefault(room_id, {})[peer_id] = record
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_message(peer, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._garbage(peer, "binary websocket frame")
                elif msg.type == WSMsgType.ERROR:
                    break
        except Exception:
            logger.debug("peer %s: websocket failed", peer_id, exc_info=True)
        finally:
            await self._peer_gone(peer)
        return ws

    def _garbage(self, peer: Peer, what: str) -> None:
        self.protocol_errors.append(f"{peer.peer_id}: {what}")
        logger.debug("peer %s sent garbage: %s", peer.peer_id, what)

    def _on_message(self, peer: Peer, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self._garbage(peer, "malformed JSON")
            return
        if not isinstance(message, dict):
            self._garbage(peer, "not a JSON object")
            return
        if message.get("response"):
            fut = peer.pending.pop(message.get("id"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(message)
        elif message.get("request"):
            self._spawn(peer.tasks, self._handle_request(peer, message))
        elif not message.get("notification"):
            self._garbage(peer, "neither request, response nor notification")

    async def _send(self, peer: Peer, message: dict[str, Any]) -> bool:
        if peer.closed or peer.ws.closed:
            return False
        try:
            await peer.ws.send_str(json.dumps(message))
            return True
        except Exception:
            logger.debug("peer %s: send failed", peer.peer_id, exc_info=True)
            return False

    async def _notify(self, peer: Peer, method: str, data: dict[str, Any]) -> None:
        await self._send(peer, {"notification": True, "method": method, "data": data})

    async def _request(
        self, peer: Peer, method: str, data: dict[str, Any], timeout: float = REQUEST_TIMEOUT
    ) -> dict[str, Any]:
        request_id = random.randint(1, 2**31)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        peer.pending[request_id] = fut
        sent = await self._send(
            peer, {"request": True, "id": request_id, "method": method, "data": data}
        )
        if not sent:
            peer.pending.pop(request_id, None)
            raise ConnectionError(f"peer {peer.peer_id} is gone")
        try:
            answer = await asyncio.wait_for(fut, timeout)
        finally:
            peer.pending.pop(request_id, None)
        if not answer.get("ok"):
            raise Reject(int(answer.get("errorCode") or 500), str(answer.get("errorReason")))
        return answer.get("data") or {}

    async def _handle_request(self, peer: Peer, message: dict[str, Any]) -> None:
        method = message.get("method")
        data = message.get("data")
        peer.record.requests.append(str(method))
        after: Callable[[], Awaitable[None]] | None = None
        try:
            if not isinstance(data, dict):
                data = {}
            if str(method) in self.fail_requests:
                raise Reject(*self.fail_requests[str(method)])
            if delay := self.delay_requests.get((peer.peer_id, str(method))):
                await asyncio.sleep(delay)
            handler = self._handlers.get(str(method))
            result: Any = {}
            if handler is not None:
                result = await handler(self, peer, data)
            if isinstance(result, tuple):
                result, after = result
            response = {"response": True, "id": message.get("id"), "ok": True, "data": result}
        except Reject as exc:
            response = {
                "response": True,
                "id": message.get("id"),
                "ok": False,
                "errorCode": exc.code,
                "errorReason": exc.reason,
            }
        except Exception as exc:
            logger.warning("request %s from %s failed", method, peer.peer_id, exc_info=True)
            response = {
                "response": True,
                "id": message.get("id"),
                "ok": False,
                "errorCode": 500,
                "errorReason": f"{type(exc).__name__}: {exc}",
            }
        await self._send(peer, response)
        if after is not None and not peer.closed:
            await after()
