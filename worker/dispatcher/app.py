"""The dispatcher's HTTP API (aiohttp on uvloop) and ``serve_main``.

==========================  =======  ===============================================
route                       auth     answer
==========================  =======  ===============================================
POST <join_path>            join     202 session starting; 400 malformed body, 401 not
                                     authenticated, 409 room busy (duplicate_room =
                                     refuse), 413 body too large, 503 + Retry-After at
                                     capacity / renderer down / shutting down
GET  /healthz               none     200 while the process serves HTTP
GET  /readyz                none     200 while a slot is free and the renderer is up
GET  /metrics               none     Prometheus text
GET  /sessions              admin    the sessions holding slots, and the last 50 ended
                                     (``ended``, newest first, with end_reason/end_error)
GET  /sessions/{id}         admin    one session, live or recently ended; 404 unknown
DELETE /sessions/{id}       admin    200 once the session has left its room
POST /weights               admin    hot-swap {"path": ...}: 200, or 400/409/422 with
                                     the renderer's reason (old weights stay)
POST /local/{room}/offer    admin    local transport: relay a WebRTC offer, get the answer
==========================  =======  ===============================================

"join" auth: a VideoSDK token signed with the configured secret, or the
bearer token; "admin": the bearer token (see :mod:`.auth`).  Every error
answer is JSON ``{"error": "<reason>"}``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import signal
import socket
import sys
from typing import Any

import msgspec
from aiohttp import web
from setproctitle import setproctitle

from ..renderer_factory import RendererSpec
from .auth import Authenticator, AuthError
from .config import ConfigError, DispatcherConfig, load_config
from .messages import JoinSpec
from .metrics import CONTENT_TYPE, Metrics
from .renderer_host import RendererHost, WeightsError, make_host
from .sessions import SessionManager, SessionRefused

logger = logging.getLogger("worker.dispatcher")

MAX_NAME = 256
MAX_TOKEN = 8192
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


class JoinBody(msgspec.Struct):
    """What ``AvatarAudioOut.connect()`` posts; unknown fields are ignored."""

    room_name: str
    token: str | None = None
    participant_id: str | None = None
    signaling_base_url: str | None = None


class OfferBody(msgspec.Struct):
    sdp: str
    type: str
    participant_id: str = "agent"


class WeightsBody(msgspec.Struct):
    path: str


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


class Dispatcher:
    """Everything one ``serve`` runs: routes, slot manager, renderer host, metrics."""

    def __init__(self, config: DispatcherConfig, host: RendererHost | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.host = host or make_host(
            RendererSpec(
                kind=config.renderer,
                weights=config.weights,
                avatar=config.avatar,
                backend=config.backend,
                device=config.device,
                in_process=config.in_process,
                max_batch=config.max_batch,
                settings=config.settings,
            )
        )
        self.auth = Authenticator(config)
        self.sessions = SessionManager(config, self.host, self.metrics)
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_post(self.config.join_path, self.join)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/sessions", self.list_sessions)
        r.add_get("/sessions/{id}", self.get_session)
        r.add_delete("/sessions/{id}", self.delete_session)
        r.add_post("/weights", self.swap_weights)
        if self.config.transport == "local":
            r.add_post("/local/{room}/offer", self.local_offer)
        return app

    async def start(self) -> None:
        """Start the renderer (model and avatar loaded) and a warm session process."""
        await self.host.start()
        await self.sessions.start()

    async def stop(self) -> None:
        """Refuse new joins, let sessions leave their rooms, stop the renderer."""
        await self.sessions.shutdown()
        await self.host.stop()

    # -- helpers ----------------------------------------------------------------------------

    async def _read_body(self, request: web.Request, type_: type) -> Any:
        """The decoded body, or an error :class:`web.Response` (400 / 413)."""
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body is larger than {limit} bytes")
        raw = await request.content.read(limit + 1)
        if len(raw) > limit:
            return _error(413, f"body is larger than {limit} bytes")
        if not raw.strip():
            return _error(400, "body is empty; expected a JSON object")
        try:
            return msgspec.json.decode(raw, type=type_)
        except msgspec.ValidationError as exc:
            return _error(400, f"body has the wrong shape: {exc}")
        except msgspec.DecodeError as exc:
            return _error(400, f"body is not valid JSON: {exc}")

    def _admin(self, request: web.Request) -> web.Response | None:
        try:
            self.auth.admin(request.headers.get("Authorization"))
        except AuthError as exc:
            return _error(401, str(exc), {"WWW-Authenticate": "Bearer"})
        return None

    def _refused(self, exc: SessionRefused) -> web.Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _error(exc.status, str(exc), headers)

    def _check_fields(self, body: JoinBody) -> str | None:
        """Why the join body's values cannot be used, or None."""
        if not (0 < len(body.room_name) <= MAX_NAME) or not _PRINTABLE.match(body.room_name):
            return f"room_name must be 1-{MAX_NAME} printable characters"
        if body.token is not None and len(body.token) > MAX_TOKEN:
            return f"token must be at most {MAX_TOKEN} characters"
        pid = body.participant_id
        if pid is not None and (not (0 < len(pid) <= MAX_NAME) or not _PRINTABLE.match(pid)):
            return f"participant_id must be 1-{MAX_NAME} printable characters"
        host = body.signaling_base_url or self.config.signaling_base_url
        if host:
            if not _HOSTNAME.match(host):
                return "signaling_base_url must be a host name such as api.videosdk.live"
            name = host.split(":")[0].lower()
            if not any(fnmatch.fnmatch(name, p.lower()) for p in self.config.signaling_hosts):
                allowed = ", ".join(self.config.signaling_hosts)
                return f"signaling_base_url {host!r} is not allowed (allowed: {allowed})"
        return None

    # -- routes -----------------------------------------------------------------------------

    async def join(self, request: web.Request) -> web.Response:
        body = await self._read_body(request, JoinBody)
        if isinstance(body, web.Response):
            self.metrics.joins.labels("bad_request").inc()
            return body
        problem = self._check_fields(body)
        if problem is not None:
            self.metrics.joins.labels("bad_request").inc()
            return _error(400, problem)
        try:
            participant_id = self.auth.join(
                request.headers.get("Authorization"), body.token, body.participant_id
            )
        except AuthError as exc:
            self.metrics.joins.labels("unauthorized").inc()
            logger.warning("refused a join for room %r: %s", body.room_name, exc)
            return _error(401, str(exc), {"WWW-Authenticate": "Bearer"})
        if not body.token and self.config.transport == "videosdk":
            self.metrics.joins.labels("bad_request").inc()
            return _error(400, "token is required: the avatar joins the VideoSDK room with it")
        spec = JoinSpec(
            room_name=body.room_name,
            token=body.token or "",
            participant_id=participant_id,
            signaling_base_url=body.signaling_base_url or self.config.signaling_base_url,
        )
        try:
            session = self.sessions.launch(spec)
        except SessionRefused as exc:
            self.metrics.joins.labels("capacity" if exc.status == 503 else "conflict").inc()
            return self._refused(exc)
        self.metrics.joins.labels("accepted").inc()
        return web.json_response(
            session.describe(), status=202, headers={"Location": f"/sessions/{session.id}"}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        if self.sessions.closing:
            problems.append("shutting down")
        if not self.host.ready:
            problems.append("renderer not ready")
        if self.sessions.free_slots <= 0:
            problems.append("no free slot")
        body = {
            "ready": not problems,
            "free_slots": self.sessions.free_slots,
            "renderer": self.host.status(),
        }
        if problems:
            body["reasons"] = problems
        return web.json_response(body, status=503 if problems else 200)

    async def metrics_text(self, request: web.Request) -> web.Response:
        self.metrics.renderer_up.set(1 if self.host.ready else 0)
        self.metrics.free_slots.set(self.sessions.free_slots)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def list_sessions(self, request: web.Request) -> web.Response:
        if (denied := self._admin(request)) is not None:
            return denied
        sessions = [s.describe() for s in self.sessions.sessions.values()]
        ended = [s.describe() for s in reversed(self.sessions.ended)]
        return web.json_response(
            {"sessions": sessions, "free_slots": self.sessions.free_slots, "ended": ended}
        )

    async def get_session(self, request: web.Request) -> web.Response:
        if (denied := self._admin(request)) is not None:
            return denied
        session_id = request.match_info["id"]
        session = self.sessions.sessions.get(session_id) or next(
            (s for s in self.sessions.ended if s.id == session_id), None
        )
        if session is None:
            return _error(404, "no such session")
        return web.json_response(session.describe())

    async def delete_session(self, request: web.Request) -> web.Response:
        if (denied := self._admin(request)) is not None:
            return denied
        session = await self.sessions.stop(request.match_info["id"], "deleted")
        if session is None:
            return _error(404, "no such session")
        return web.json_response(session.describe())

    async def swap_weights(self, request: web.Request) -> web.Response:
        if (denied := self._admin(request)) is not None:
            return denied
        body = await self._read_body(request, WeightsBody)
        if isinstance(body, web.Response):
            return body
        if not body.path:
            return _error(400, "path must name a weights file")
        try:
            message = await self.host.swap_weights(body.path)
        except WeightsError as exc:
            self.metrics.weight_swaps.labels("refused").inc()
            return _error(exc.status, str(exc))
        self.metrics.weight_swaps.labels("ok").inc()
        return web.json_response({"weights": body.path, "message": message})

    async def local_offer(self, request: web.Request) -> web.Response:
        if (denied := self._admin(request)) is not None:
            return denied
        body = await self._read_body(request, OfferBody)
        if isinstance(body, web.Response):
            return body
        try:
            answer = await self.sessions.offer(
                request.match_info["room"], body.sdp, body.type, body.participant_id
            )
        except SessionRefused as exc:
            return self._refused(exc)
        except (RuntimeError, TimeoutError) as exc:
            return _error(503, f"the session did not answer: {exc}")
        if answer.error:
            return _error(400, answer.error)
        return web.json_response({"sdp": answer.sdp, "type": answer.type})


# -- running it ---------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(False)
    return sock


class RunningServer:
    """A started dispatcher bound to a socket; :meth:`close` shuts it down cleanly."""

    def __init__(self, dispatcher: Dispatcher, runner: web.AppRunner, sock: socket.socket) -> None:
        self.dispatcher = dispatcher
        self.runner = runner
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    @classmethod
    async def start(
        cls, config: DispatcherConfig, host: RendererHost | None = None
    ) -> RunningServer:
        dispatcher = Dispatcher(config, host)
        await dispatcher.start()
        runner = web.AppRunner(
            dispatcher.app, handle_signals=False, access_log=None, shutdown_timeout=5.0
        )
        await runner.setup()
        sock = bind_socket(config.host, config.port)
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            await dispatcher.stop()
            raise
        return cls(dispatcher, runner, sock)

    async def close(self) -> None:
        self.dispatcher.sessions.closing = True
        await self.dispatcher.stop()
        await self.runner.cleanup()
        self.sock.close()


async def serve(config: DispatcherConfig) -> int:
    try:
        server = await RunningServer.start(config)
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"avatar-server listening on {server.url}", flush=True)
    logger.info(
        "ready: transport %s, %d slots, renderer %s",
        config.transport,
        config.max_sessions,
        config.renderer,
    )
    await stop.wait()
    logger.info("shutting down: sessions leave their rooms")
    await server.close()
    logger.info("stopped")
    return 0


def serve_main(argv: list[str]) -> int:
    """``avatar-server serve``: parse ``argv`` and run until SIGTERM or SIGINT."""
    setproctitle("avatar-server dispatcher")
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(config.log_level.upper())
    if config.insecure:
        logger.warning("--insecure: joins and admin requests are not authenticated")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
