"""The loopback room: HTTPS server-init-config, protoo signalling, ORTC media and data."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from Crypto.Cipher import AES
from Crypto.Util.Padding import pad
from vsaiortc import RTCDataChannel, RTCDataChannelParameters, RTCRtpReceiver, RTCRtpSender
from vsaiortc.contrib.media import MediaRelay
from vsaiortc.mediastreams import MediaStreamError, MediaStreamTrack
from vsaiortc.rtcrtpreceiver import RemoteStreamTrack

from .certs import CertFiles, make_certificates
from .records import (
    DataMessage,
    MediaFrame,
    PeerRecord,
    ProducerRecord,
    VideoReducer,
    now,
    reduce_audio,
    reduce_video_gray,
)
from .transports import (
    ROUTER_RTP_CAPABILITIES,
    ServerTransport,
    consumer_rtp_parameters,
    patch_loopback_ice,
    receive_parameters,
    send_parameters,
)

logger = logging.getLogger(__name__)

MediaSink = Callable[[str, str, str, MediaFrame], None]  # (room, peer, kind, frame)

# The SDK's own key and IV (videosdk/utils.py): iceServers travel AES-CBC encrypted.
_ICE_KEY = b"YSJ!gMW!Y1Eu8j1NTb^rZyQiNLplYz*n"[:32]
_ICE_IV = b"y^LKkEGk0FwxjQ#B"[:16]
REQUEST_TIMEOUT = 20.0
CONNECT_TIMEOUT = 20.0
MAX_PENDING_DATA = 10_000


def encrypt_ice_servers(servers: list[Any]) -> str:
    """What ``videosdk.utils.aes_decrypt`` turns back into ``servers`` ("" would not parse)."""
    cipher = AES.new(_ICE_KEY, AES.MODE_CBC, _ICE_IV)
    raw = pad(json.dumps(servers).encode(), AES.block_size, style="pkcs7")
    return base64.b64encode(cipher.encrypt(raw)).decode()


class _Reject(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(eq=False)
class _Producer:
    id: str
    peer: _Peer
    kind: str
    rtp: dict[str, Any]
    app_data: dict[str, Any]
    transport: ServerTransport
    receiver: RTCRtpReceiver
    track: RemoteStreamTrack
    record: ProducerRecord
    consumers: set[_Consumer] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    closed: bool = False


@dataclass(eq=False)
class _Consumer:
    id: str
    peer: _Peer  # the receiving peer
    producer: _Producer
    sender: RTCRtpSender
    track: MediaStreamTrack
    closed: bool = False


@dataclass(eq=False)
class _DataProducer:
    id: str
    peer: _Peer
    label: str
    protocol: str
    stream: dict[str, Any]  # the client's sctpStreamParameters
    app_data: Any
    channel: RTCDataChannel
    consumers: dict[str, _DataConsumer] = field(default_factory=dict)  # by peer id


@dataclass(eq=False)
class _DataConsumer:
    id: str
    peer: _Peer
    channel: RTCDataChannel
    pending: list[bytes | str] = field(default_factory=list)

    def deliver(self, message: bytes | str) -> None:
        if self.channel.readyState == "open":
            try:
                self.channel.send(message)
            except Exception:
                logger.debug("data consumer %s: send failed", self.id, exc_info=True)
        elif self.channel.readyState == "connecting" and len(self.pending) < MAX_PENDING_DATA:
            self.pending.append(message)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for message in pending:
            self.deliver(message)


@dataclass(eq=False)
class _Peer:
    room_id: str
    peer_id: str
    ws: web.WebSocketResponse
    http_request: web.Request
    record: PeerRecord
    transports: dict[str, ServerTransport] = field(default_factory=dict)
    recv_transport: ServerTransport | None = None
    producers: dict[str, _Producer] = field(default_factory=dict)
    data_producers: dict[str, _DataProducer] = field(default_factory=dict)
    consumers: dict[str, _Consumer] = field(default_factory=dict)
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    next_mid: int = 0
    closed: bool = False

    @property
    def joined(self) -> bool:
        return self.record.joined and not self.closed

    def info(self) -> dict[str, Any]:
        """A peer as ``newPeer`` and the join response describe it (meeting.py reads these)."""
        r = self.record
        return {
            "id": r.peer_id,
            "displayName": r.display_name,
            "device": r.device,
            "mode": r.mode,
            "peerType": r.peer_type,
            "metaData": r.meta_data,
        }


class _ConfigHandler(BaseHTTPRequestHandler):
    server: _ConfigServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            room_id = json.loads(body or b"{}").get("roomId")
        except (ValueError, AttributeError):
            room_id = None
        self.server.owner._config_requests.append(
            {
                "path": self.path,
                "roomId": room_id,
                "authorization": self.headers.get("Authorization"),
            }
        )
        if not self.path.startswith("/infra/v1/meetings/server-init-config"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = json.dumps({"data": self.server.owner._init_config()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = _answer
    do_GET = _answer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("init-config: " + format, *args)


class _ConfigServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: LoopbackVideoSdkRoom


class LoopbackVideoSdkRoom:
    """A tiny mediasoup-like SFU on 127.0.0.1 that the real videosdk SDK can join.

    ``host`` is what clients pass as ``signaling_base_url``.  See the package
    docstring for the messages it speaks and what it does not model.
    """

    def __init__(
        self,
        tmp_dir: str | Path | None = None,
        *,
        video_reducer: VideoReducer | None = None,
        sink: MediaSink | None = None,
        record_media: bool = True,
    ) -> None:
        self._tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.mkdtemp())
        self._video_reducer = video_reducer or reduce_video_gray
        self._sink: MediaSink = sink or self._record_frame
        self._record_media = record_media
        self._certs: CertFiles | None = None
        self._runner: web.AppRunner | None = None
        self._http: _ConfigServer | None = None
        self._http_thread: threading.Thread | None = None
        self._undo_ice: Callable[[], None] | None = None
        self._ws_port = 0
        self._host = ""
        self._rooms: dict[str, dict[str, _Peer]] = {}
        self._records: dict[str, dict[str, PeerRecord]] = {}
        self._media: dict[tuple[str, str, str], list[MediaFrame]] = {}
        self._data: dict[str, list[DataMessage]] = {}
        self._config_requests: list[dict[str, Any]] = []
        self._relay = MediaRelay()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.protocol_errors: list[str] = []  # garbage the room ignored, for tests

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
        self._http = _ConfigServer(("127.0.0.1", 0), _ConfigHandler)
        self._http.owner = self
        self._http.socket = self._certs.server_context().wrap_socket(
            self._http.socket, server_side=True
        )
        self._host = f"127.0.0.1:{self._http.server_address[1]}"
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, name="loopback-room-init-config", daemon=True
        )
        self._http_thread.start()

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
            await asyncio.get_running_loop().run_in_executor(None, http.shutdown)
            http.server_close()
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
        peer = _Peer(room_id=room_id, peer_id=peer_id, ws=ws, http_request=request, record=record)
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

    def _garbage(self, peer: _Peer, what: str) -> None:
        self.protocol_errors.append(f"{peer.peer_id}: {what}")
        logger.debug("peer %s sent garbage: %s", peer.peer_id, what)

    def _on_message(self, peer: _Peer, text: str) -> None:
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

    async def _send(self, peer: _Peer, message: dict[str, Any]) -> bool:
        if peer.closed or peer.ws.closed:
            return False
        try:
            await peer.ws.send_str(json.dumps(message))
            return True
        except Exception:
            logger.debug("peer %s: send failed", peer.peer_id, exc_info=True)
            return False

    async def _notify(self, peer: _Peer, method: str, data: dict[str, Any]) -> None:
        await self._send(peer, {"notification": True, "method": method, "data": data})

    async def _request(
        self, peer: _Peer, method: str, data: dict[str, Any], timeout: float = REQUEST_TIMEOUT
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
            raise _Reject(int(answer.get("errorCode") or 500), str(answer.get("errorReason")))
        return answer.get("data") or {}

    async def _handle_request(self, peer: _Peer, message: dict[str, Any]) -> None:
        method = message.get("method")
        data = message.get("data")
        peer.record.requests.append(str(method))
        after: Callable[[], Awaitable[None]] | None = None
        try:
            if not isinstance(data, dict):
                data = {}
            handler = self._handlers.get(str(method))
            result: Any = {}
            if handler is not None:
                result = await handler(self, peer, data)
            if isinstance(result, tuple):
                result, after = result
            response = {"response": True, "id": message.get("id"), "ok": True, "data": result}
        except _Reject as exc:
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

    # -- request handlers ----------------------------------------------------------------------

    async def _on_get_router_rtp_capabilities(
        self, peer: _Peer, data: dict[str, Any]
    ) -> dict[str, Any]:
        return json.loads(json.dumps(ROUTER_RTP_CAPABILITIES))

    async def _on_create_transport(self, peer: _Peer, data: dict[str, Any]) -> dict[str, Any]:
        transport = ServerTransport(
            producing=bool(data.get("producing")),
            sctp=data.get("sctpCapabilities") is not None,
        )
        await transport.gather()
        if peer.closed:
            await transport.close()
            raise _Reject(410, "peer gone")
        peer.transports[transport.id] = transport
        if data.get("consuming"):
            peer.recv_transport = transport
        return transport.describe()

    def _transport(self, peer: _Peer, data: dict[str, Any]) -> ServerTransport:
        transport = peer.transports.get(str(data.get("transportId")))
        if transport is None:
            raise _Reject(404, f"no transport {data.get('transportId')!r}")
        return transport

    async def _on_connect_transport(self, peer: _Peer, data: dict[str, Any]) -> dict[str, Any]:
        transport = self._transport(peer, data)
        dtls = data.get("dtlsParameters")
        if not isinstance(dtls, dict) or not dtls.get("fingerprints"):
            raise _Reject(400, "dtlsParameters with fingerprints required")
        transport.connect(dtls)
        return {}

    async def _on_request_entry(self, peer: _Peer, data: dict[str, Any]) -> Any:
        async def after() -> None:
            await self._notify(
                peer,
                "entryResponded",
                {"peerId": peer.peer_id, "decision": "allowed", "sessionId": self._session(peer)},
            )

        return {}, after

    def _session(self, peer: _Peer) -> str:
        return f"session-{peer.room_id}"

    async def _on_join(self, peer: _Peer, data: dict[str, Any]) -> Any:
        record = peer.record
        record.display_name = data.get("displayName")
        record.device = data.get("device")
        record.meta_data = data.get("metaData")
        others = [p for p in self._rooms.get(peer.room_id, {}).values() if p is not peer]
        joined = [p for p in others if p.joined]
        record.joined_at = now()

        async def after() -> None:
            for other in joined:
                await self._notify(other, "newPeer", peer.info())
            for other in joined:
                for producer in list(other.producers.values()):
                    self._spawn(peer.tasks, self._consume(peer, producer))
                for data_producer in list(other.data_producers.values()):
                    self._spawn(peer.tasks, self._consume_data(peer, data_producer))

        return {"peers": [p.info() for p in joined], "messages": []}, after

    async def _on_produce(self, peer: _Peer, data: dict[str, Any]) -> Any:
        transport = self._transport(peer, data)
        kind = data.get("kind")
        rtp = data.get("rtpParameters")
        if kind not in ("audio", "video") or not isinstance(rtp, dict):
            raise _Reject(400, "kind and rtpParameters required")
        try:
            params = receive_parameters(rtp)
        except (KeyError, TypeError, ValueError, StopIteration) as exc:
            raise _Reject(400, f"bad rtpParameters: {exc}") from None
        receiver = RTCRtpReceiver(kind, transport.dtls)
        track = RemoteStreamTrack(kind=kind, track_buffer_size=256)
        receiver._track = track
        receiver._set_rtcp_ssrc(random.randint(1, 2**32 - 1))
        producer_id = str(uuid.uuid4())
        record = ProducerRecord(
            id=producer_id,
            kind=kind,
            codec=params.codecs[0].mimeType,
            created_at=now(),
            app_data=dict(data.get("appData") or {}),
        )
        producer = _Producer(
            id=producer_id,
            peer=peer,
            kind=kind,
            rtp=rtp,
            app_data=record.app_data,
            transport=transport,
            receiver=receiver,
            track=track,
            record=record,
        )
        peer.producers[producer_id] = producer
        peer.record.producers[producer_id] = record
        self._spawn(producer.tasks, self._run_producer(producer, params))

        async def after() -> None:
            for other in self._rooms.get(peer.room_id, {}).values():
                if other is not peer and other.joined:
                    self._spawn(other.tasks, self._consume(other, producer))

        return {"id": producer_id}, after

    async def _run_producer(self, producer: _Producer, params: Any) -> None:
        try:
            await asyncio.wait_for(producer.transport.connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            logger.warning("producer %s: transport never connected", producer.id)
            return
        if producer.closed:
            return
        await producer.receiver.receive(params)
        if not self._record_media and self._sink == self._record_frame:
            return
        proxy = self._relay.subscribe(producer.track, buffered=True)
        room_id, peer_id, kind = producer.peer.room_id, producer.peer.peer_id, producer.kind
        try:
            while True:
                try:
                    frame = await proxy.recv()
                except MediaStreamError:
                    break
                if kind == "audio":
                    data: Any = reduce_audio(frame)
                    rate: int | None = frame.sample_rate
                else:
                    data, rate = self._video_reducer(frame), None
                self._sink(
                    room_id,
                    peer_id,
                    kind,
                    MediaFrame(
                        arrival=now(),
                        pts=frame.pts,
                        time_base=frame.time_base,
                        data=data,
                        sample_rate=rate,
                    ),
                )
        finally:
            proxy.stop()

    async def _on_close_producer(self, peer: _Peer, data: dict[str, Any]) -> dict[str, Any]:
        producer = peer.producers.pop(str(data.get("producerId")), None)
        if producer is not None:
            await self._close_producer(producer)
        return {}

    async def _close_producer(self, producer: _Producer) -> None:
        if producer.closed:
            return
        producer.closed = True
        producer.record.closed_at = now()
        for consumer in list(producer.consumers):
            await self._close_consumer(consumer, notify=True)
        with contextlib.suppress(Exception):
            await producer.receiver.stop()
        producer.track.stop()
        for task in list(producer.tasks):
            task.cancel()

    async def _close_consumer(self, consumer: _Consumer, *, notify: bool) -> None:
        if consumer.closed:
            return
        consumer.closed = True
        consumer.producer.consumers.discard(consumer)
        consumer.peer.consumers.pop(consumer.id, None)
        consumer.track.stop()
        with contextlib.suppress(Exception):
            await consumer.sender.stop()
        if notify:
            await self._notify(consumer.peer, "consumerClosed", {"consumerId": consumer.id})

    async def _consume(self, peer: _Peer, producer: _Producer) -> None:
        """newConsumer: relay the producer's decoded track to ``peer``'s recv transport."""
        transport = peer.recv_transport
        if transport is None or peer.closed or producer.closed:
            return
        track = self._relay.subscribe(producer.track, buffered=False)
        sender = RTCRtpSender(track, transport.dtls)
        mid = str(peer.next_mid)
        peer.next_mid += 1
        rtcp = producer.rtp.get("rtcp") or {}
        rtp = consumer_rtp_parameters(
            producer.rtp,
            mid=mid,
            ssrc=sender._ssrc,
            cname=rtcp.get("cname") or producer.peer.peer_id,
        )
        consumer = _Consumer(
            id=str(uuid.uuid4()), peer=peer, producer=producer, sender=sender, track=track
        )
        producer.consumers.add(consumer)
        peer.consumers[consumer.id] = consumer
        try:
            await self._request(
                peer,
                "newConsumer",
                {
                    "peerId": producer.peer.peer_id,
                    "producerId": producer.id,
                    "id": consumer.id,
                    "kind": producer.kind,
                    "rtpParameters": rtp,
                    "type": "simple",
                    "appData": {**producer.app_data, "peerId": producer.peer.peer_id},
                    "producerPaused": False,
                },
            )
            await asyncio.wait_for(transport.connected.wait(), CONNECT_TIMEOUT)
        except Exception as exc:
            logger.info("peer %s did not take consumer %s: %r", peer.peer_id, consumer.id, exc)
            await self._close_consumer(consumer, notify=False)
            return
        if not consumer.closed:
            await sender.send(send_parameters(rtp, ssrc=sender._ssrc))

    async def _on_produce_data(self, peer: _Peer, data: dict[str, Any]) -> Any:
        transport = self._transport(peer, data)
        stream = data.get("sctpStreamParameters")
        if transport.sctp is None or not isinstance(stream, dict):
            raise _Reject(400, "no SCTP on this transport or no sctpStreamParameters")
        try:
            stream_id = int(stream["streamId"])
        except (KeyError, TypeError, ValueError):
            raise _Reject(400, "sctpStreamParameters.streamId required") from None
        label = str(data.get("label") or "")
        protocol = str(data.get("protocol") or "")
        channel = RTCDataChannel(
            transport.sctp,
            RTCDataChannelParameters(
                label=label,
                ordered=bool(stream.get("ordered", True)),
                maxRetransmits=stream.get("maxRetransmits"),
                maxPacketLifeTime=stream.get("maxPacketLifeTime"),
                protocol=protocol,
                negotiated=True,
                id=stream_id,
            ),
        )
        producer = _DataProducer(
            id=str(uuid.uuid4()),
            peer=peer,
            label=label,
            protocol=protocol,
            stream=stream,
            app_data=data.get("appData"),
            channel=channel,
        )

        @channel.on("message")
        def on_message(message: bytes | str) -> None:
            self._data.setdefault(peer.room_id, []).append(
                DataMessage(
                    arrival=now(),
                    room_id=peer.room_id,
                    from_peer=peer.peer_id,
                    label=label,
                    payload=message,
                )
            )
            for consumer in list(producer.consumers.values()):
                consumer.deliver(message)

        peer.data_producers[producer.id] = producer
        peer.record.data_producers[producer.id] = label

        async def after() -> None:
            for other in self._rooms.get(peer.room_id, {}).values():
                if other is not peer and other.joined:
                    self._spawn(other.tasks, self._consume_data(other, producer))

        return {"id": producer.id}, after

    async def _consume_data(self, peer: _Peer, producer: _DataProducer) -> None:
        transport = peer.recv_transport
        if transport is None or transport.sctp is None or peer.closed:
            return
        if peer.peer_id in producer.consumers:
            return
        stream_id = transport.next_stream_id()
        stream: dict[str, Any] = {
            "streamId": stream_id,
            "ordered": bool(producer.stream.get("ordered", True)),
        }
        for key in ("maxRetransmits", "maxPacketLifeTime"):
            if producer.stream.get(key) is not None:
                stream[key] = producer.stream[key]
        channel = RTCDataChannel(
            transport.sctp,
            RTCDataChannelParameters(
                label=producer.label,
                ordered=stream["ordered"],
                maxRetransmits=stream.get("maxRetransmits"),
                maxPacketLifeTime=stream.get("maxPacketLifeTime"),
                protocol=producer.protocol,
                negotiated=True,
                id=stream_id,
            ),
        )
        consumer = _DataConsumer(id=str(uuid.uuid4()), peer=peer, channel=channel)
        channel.on("open", consumer.flush)
        producer.consumers[peer.peer_id] = consumer
        try:
            await self._request(
                peer,
                "newDataConsumer",
                {
                    "peerId": producer.peer.peer_id,
                    "dataProducerId": producer.id,
                    "id": consumer.id,
                    "sctpStreamParameters": stream,
                    "label": producer.label,
                    "protocol": producer.protocol,
                    "appData": producer.app_data,
                },
            )
        except Exception as exc:
            logger.info("peer %s did not take data consumer: %r", peer.peer_id, exc)
            producer.consumers.pop(peer.peer_id, None)

    async def _on_ok(self, peer: _Peer, data: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def _on_pubsub_subscribe(self, peer: _Peer, data: dict[str, Any]) -> dict[str, Any]:
        return {"messages": []}

    async def _on_remove_peer(self, peer: _Peer, data: dict[str, Any]) -> dict[str, Any]:
        target = str(data.get("peerId"))
        if target in self._rooms.get(peer.room_id, {}):
            self._spawn(self._tasks, self.kick(peer.room_id, target, abrupt=False))
        return {}

    _handlers: dict[str, Callable[..., Awaitable[Any]]] = {
        "getRouterRtpCapabilities": _on_get_router_rtp_capabilities,
        "createWebRtcTransport": _on_create_transport,
        "connectWebRtcTransport": _on_connect_transport,
        "requestEntry": _on_request_entry,
        "join": _on_join,
        "produce": _on_produce,
        "produceData": _on_produce_data,
        "closeProducer": _on_close_producer,
        "resumeConsumer": _on_ok,
        "getTransportStats": _on_ok,
        "pubsubSubscribe": _on_pubsub_subscribe,
        "removePeer": _on_remove_peer,
    }

    # -- leaving -----------------------------------------------------------------------------------

    async def _peer_gone(self, peer: _Peer) -> None:
        """The websocket closed (leave, crash, kick): tear the peer down, tell the others."""
        if peer.closed:
            return
        was_joined = peer.record.joined
        peer.closed = True
        peer.record.left_at = now()
        peer.record.ws_closed = True
        room = self._rooms.get(peer.room_id, {})
        if room.get(peer.peer_id) is peer:
            del room[peer.peer_id]
        for fut in peer.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("peer gone"))
        peer.pending.clear()
        for task in list(peer.tasks):
            if task is not asyncio.current_task():
                task.cancel()

        for consumer in list(peer.consumers.values()):
            await self._close_consumer(consumer, notify=False)
        for producer in list(peer.producers.values()):
            await self._close_producer(producer)
        peer.producers.clear()
        for other in list(room.values()):
            for data_producer in other.data_producers.values():
                data_producer.consumers.pop(peer.peer_id, None)
        for data_producer in peer.data_producers.values():
            for consumer in list(data_producer.consumers.values()):
                await self._notify(
                    consumer.peer, "dataConsumerClosed", {"dataConsumerId": consumer.id}
                )
            data_producer.consumers.clear()
        if was_joined:
            for other in list(room.values()):
                if other.joined:
                    await self._notify(other, "peerClosed", {"peerId": peer.peer_id})
        for transport in list(peer.transports.values()):
            await transport.close()
        if not peer.ws.closed:
            with contextlib.suppress(Exception):
                await peer.ws.close()
