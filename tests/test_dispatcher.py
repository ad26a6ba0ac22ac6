"""The dispatcher's HTTP API against a real server on 127.0.0.1 (a free port).

Sessions are real session processes (``python -m worker.session``) with the
``local`` transport (a WebRTC peer on 127.0.0.1 offers through the
dispatcher) and the pattern renderer, so nothing needs an account or a GPU.
A session that no peer joins ends itself after ``join_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.dispatcher.app import RunningServer
from worker.dispatcher.config import (
    OPTIONS,
    ConfigError,
    DispatcherConfig,
    build_parser,
    load_config,
)
from worker.dispatcher.renderer_host import ShmHost
from worker.renderer_factory import RendererSpec
from worker.types import AvatarSettings
from worker.webrtc_loopback import connect_agent, ice_on_loopback

API_KEY = "test-api-key"
SECRET = "test-secret-for-hs256-signatures-0123456789"
BEARER = "admin-bearer-token"
ROOT = Path(__file__).resolve().parents[1]


def make_token(
    *,
    participant: str = "avatar-1",
    secret: str = SECRET,
    api_key: str = API_KEY,
    expires_in: int = 3600,
) -> str:
    now = int(time.time())
    claims = {
        "apikey": api_key,
        "permissions": ["allow_join"],
        "version": 2,
        "iat": now - 10,
        "exp": now + expires_in,
        "participantId": participant,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def join_body(room: str = "room-1", participant: str = "avatar-1", **claims: Any) -> dict:
    return {
        "room_name": room,
        "token": make_token(participant=participant, **claims),
        "participant_id": participant,
        "signaling_base_url": None,
    }


def make_config(**overrides: Any) -> DispatcherConfig:
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        port=0,
        transport="local",
        renderer="pattern",
        in_process=True,
        api_key=API_KEY,
        secret=SECRET,
        token=BEARER,
        width=64,
        height=64,
        max_sessions=2,
        join_timeout=20.0,
        leave_timeout=3.0,
        retry_after=7,
        log_level="warning",
    )
    values.update(overrides)
    config = DispatcherConfig(**values)
    config.validate()
    return config


ADMIN = {"Authorization": f"Bearer {BEARER}"}
Start = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    servers: list[RunningServer] = []

    async def start(host=None, **overrides: Any) -> RunningServer:
        server = await RunningServer.start(make_config(**overrides), host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sessions_of(http: aiohttp.ClientSession, server: RunningServer) -> list[dict]:
    async with http.get(f"{server.url}/sessions", headers=ADMIN) as r:
        assert r.status == 200
        return (await r.json())["sessions"]


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def metric(http: aiohttp.ClientSession, server: RunningServer, line_start: str) -> float:
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# -- health and joins ----------------------------------------------------------------------


async def test_health_ready_and_metrics(serve: Start, http: aiohttp.ClientSession) -> None:
    server = await serve()
    async with http.get(f"{server.url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{server.url}/readyz") as r:
        assert r.status == 200
        assert (await r.json())["free_slots"] == 2
    async with http.get(f"{server.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    for name in (
        "avatar_sessions",
        "avatar_free_slots",
        "avatar_renderer_up",
        "avatar_render_ms_per_frame",
        "avatar_av_offset_ms",
        "avatar_frames_late_total",
        "avatar_frames_dropped_total",
        "avatar_stalls_total",
        "avatar_interrupts_total",
    ):
        assert name in text


async def test_valid_join_starts_a_session_and_delete_ends_it(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve()
    async with http.post(f"{server.url}/launch", json=join_body()) as r:
        assert r.status == 202, await r.text()
        started = await r.json()
        assert r.headers["Location"] == f"/sessions/{started['id']}"
    assert started["room_name"] == "room-1"
    assert started["participant_id"] == "avatar-1"

    async def has_process() -> bool:
        sessions = await sessions_of(http, server)
        return len(sessions) == 1 and sessions[0]["pid"] is not None

    await wait_for(has_process, "the session process")
    (session,) = await sessions_of(http, server)
    pid = session["pid"]
    assert pid_alive(pid)
    async with http.get(f"{server.url}/readyz") as r:
        assert (await r.json())["free_slots"] == 1

    async with http.delete(f"{server.url}/sessions/{started['id']}", headers=ADMIN) as r:
        assert r.status == 200
        assert (await r.json())["end_reason"] == "deleted"
    assert await sessions_of(http, server) == []
    assert not pid_alive(pid)
    assert await metric(http, server, 'avatar_session_ends_total{reason="deleted"}') == 1
    async with http.delete(f"{server.url}/sessions/{started['id']}", headers=ADMIN) as r:
        assert r.status == 404
    # An ended session still says why it ended, at its Location and in the list.
    async with http.get(f"{server.url}/sessions/{started['id']}", headers=ADMIN) as r:
        assert r.status == 200
        assert (await r.json())["end_reason"] == "deleted"
    async with http.get(f"{server.url}/sessions", headers=ADMIN) as r:
        assert [s["id"] for s in (await r.json())["ended"]] == [started["id"]]


def _forged() -> dict:
    return join_body(secret="another-secret-of-sufficient-length-000000")


def _wrong_key() -> dict:
    return join_body(api_key="someone-elses-key")


def _expired() -> dict:
    return join_body(expires_in=-120)


def _mismatch() -> dict:
    body = join_body(participant="avatar-1")
    body["participant_id"] = "avatar-2"
    return body


def _missing() -> dict:
    body = join_body()
    del body["token"]
    return body


def _garbage() -> dict:
    body = join_body()
    body["token"] = "not-a-jwt"
    return body


@pytest.mark.parametrize(
    ("make_body", "reason"),
    [
        (_forged, "signature"),
        (_wrong_key, "different API key"),
        (_expired, "expired"),
        (_mismatch, "participantId"),
        (_missing, "no token"),
        (_garbage, "not a valid"),
    ],
    ids=[
        "forged-signature",
        "wrong-apikey",
        "expired",
        "participant-mismatch",
        "missing",
        "garbage",
    ],
)
async def test_unauthenticated_joins_get_401_and_start_nothing(
    serve: Start, http: aiohttp.ClientSession, make_body, reason: str
) -> None:
    server = await serve()
    async with http.post(f"{server.url}/launch", json=make_body()) as r:
        assert r.status == 401
        assert reason in (await r.json())["error"]
    assert await sessions_of(http, server) == []
    assert await metric(http, server, 'avatar_join_requests_total{outcome="unauthorized"}') == 1


async def test_bearer_token_authenticates_joins_and_admin(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve()
    body = {"room_name": "room-b", "token": "opaque", "participant_id": "avatar-b"}
    async with http.post(
        f"{server.url}/launch", json=body, headers={"Authorization": "Bearer nope"}
    ) as r:
        assert r.status == 401
        assert "bearer token does not match" in (await r.json())["error"]
    async with http.post(f"{server.url}/launch", json=body, headers=ADMIN) as r:
        assert r.status == 202
    async with http.get(f"{server.url}/sessions") as r:
        assert r.status == 401
    async with http.get(f"{server.url}/sessions", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
    async with http.post(f"{server.url}/weights", json={"path": "x.onnx"}) as r:
        assert r.status == 401
    async with http.delete(f"{server.url}/sessions/abc") as r:
        assert r.status == 401


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "wrong shape"),
        (b'{"room_name": 5, "token": "t"}', 400, "wrong shape"),
        (b'{"token": "t"}', 400, "room_name"),
        (b'{"room_name": "r", "token": 7}', 400, "wrong shape"),
        (b'{"room_name": "", "token": "t"}', 400, "room_name"),
        (b'{"room_name": "a\\u0000b", "token": "t"}', 400, "room_name"),
        (
            b'{"room_name": "r", "token": "t", "signaling_base_url": "evil.example.com"}',
            400,
            "not allowed",
        ),
        (
            b'{"room_name": "r", "token": "t", "signaling_base_url": "https://x/y"}',
            400,
            "host name",
        ),
        (b'{"room_name": "' + b"r" * 20_000 + b'", "token": "t"}', 413, "larger than"),
    ],
    ids=[
        "malformed",
        "empty",
        "array",
        "room-int",
        "no-room",
        "token-int",
        "room-empty",
        "room-control-char",
        "signaling-host",
        "signaling-url",
        "oversize",
    ],
)
async def test_bad_bodies(
    serve: Start, http: aiohttp.ClientSession, payload: bytes, status: int, reason: str
) -> None:
    server = await serve()
    headers = {"Content-Type": "application/json", **ADMIN}
    async with http.post(f"{server.url}/launch", data=payload, headers=headers) as r:
        assert r.status == status
        assert reason in (await r.json())["error"]
    assert await sessions_of(http, server) == []


async def test_oversize_chunked_body_is_refused(serve: Start, http: aiohttp.ClientSession) -> None:
    server = await serve()

    async def chunks():
        for _ in range(40):
            yield b" " * 1024

    async with http.post(f"{server.url}/launch", data=chunks(), headers=ADMIN) as r:
        assert r.status == 413


async def test_capacity_answers_503_with_retry_after(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve(max_sessions=1)
    async with http.post(f"{server.url}/launch", json=join_body("room-a", "av-a")) as r:
        assert r.status == 202
    async with http.get(f"{server.url}/readyz") as r:
        assert r.status == 503
        assert "no free slot" in (await r.json())["reasons"]
    async with http.post(f"{server.url}/launch", json=join_body("room-b", "av-b")) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "7"
        assert "slots" in (await r.json())["error"]
    assert [s["room_name"] for s in await sessions_of(http, server)] == ["room-a"]


async def test_duplicate_room_refused(serve: Start, http: aiohttp.ClientSession) -> None:
    server = await serve(duplicate_room="refuse")
    async with http.post(f"{server.url}/launch", json=join_body("room-d", "av-1")) as r:
        assert r.status == 202
        first = (await r.json())["id"]
    async with http.post(f"{server.url}/launch", json=join_body("room-d", "av-2")) as r:
        assert r.status == 409
        assert first in (await r.json())["error"]
    assert [s["id"] for s in await sessions_of(http, server)] == [first]


async def test_duplicate_room_replaces_the_old_session(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve(duplicate_room="replace", max_sessions=1)
    async with http.post(f"{server.url}/launch", json=join_body("room-r", "av-1")) as r:
        first = (await r.json())["id"]

    async def first_attached() -> bool:
        return any(s["pid"] for s in await sessions_of(http, server))

    await wait_for(first_attached, "the first session process")
    old_pid = (await sessions_of(http, server))[0]["pid"]
    # A full server still accepts the replacement: it takes over the old slot.
    async with http.post(f"{server.url}/launch", json=join_body("room-r", "av-1")) as r:
        assert r.status == 202
        second = (await r.json())["id"]
    assert second != first

    async def only_second() -> bool:
        sessions = await sessions_of(http, server)
        return [s["id"] for s in sessions] == [second] and sessions[0]["pid"] is not None

    await wait_for(only_second, "the replacement")
    assert not pid_alive(old_pid)
    assert await metric(http, server, 'avatar_session_ends_total{reason="replaced"}') == 1


async def test_crashed_session_process_frees_its_slot(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve(max_sessions=1)
    async with http.post(f"{server.url}/launch", json=join_body()) as r:
        assert r.status == 202

    async def attached() -> bool:
        return any(s["pid"] for s in await sessions_of(http, server))

    await wait_for(attached, "the session process")
    pid = (await sessions_of(http, server))[0]["pid"]
    os.kill(pid, signal.SIGKILL)

    async def freed() -> bool:
        return await sessions_of(http, server) == []

    await wait_for(freed, "the slot to be freed")
    assert await metric(http, server, 'avatar_session_ends_total{reason="crashed"}') == 1
    async with http.get(f"{server.url}/healthz") as r:
        assert r.status == 200
    async with http.post(f"{server.url}/launch", json=join_body("room-2", "av-2")) as r:
        assert r.status == 202


async def test_join_that_times_out_ends_and_is_counted(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve(join_timeout=0.5)
    async with http.post(f"{server.url}/launch", json=join_body()) as r:
        assert r.status == 202

    async def ended() -> bool:
        return await sessions_of(http, server) == []

    await wait_for(ended, "the join to fail")
    assert await metric(http, server, 'avatar_session_ends_total{reason="join_failed"}') == 1
    async with http.get(f"{server.url}/sessions", headers=ADMIN) as r:
        (session,) = (await r.json())["ended"]
    assert session["end_reason"] == "join failed"
    assert session["end_error"]  # the transport's own words, not just the label


async def test_live_session_over_loopback_webrtc(serve: Start, http: aiohttp.ClientSession) -> None:
    """Join, offer, frames flow; the agent leaving ends the session and frees the slot."""
    server = await serve()
    async with http.post(f"{server.url}/launch", json=join_body("room-l", "av-l")) as r:
        assert r.status == 202

    async def signal_(sdp: str, kind: str) -> tuple[str, str]:
        body = {"sdp": sdp, "type": kind, "participant_id": "agent-l"}
        async with http.post(f"{server.url}/local/room-l/offer", json=body, headers=ADMIN) as r:
            answer = await r.json()
            assert r.status == 200, answer
            return answer["sdp"], answer["type"]

    with ice_on_loopback():
        peer = await connect_agent(signal_, participant_id="agent-l")
    try:
        frame = await asyncio.wait_for(peer.video.recv(), 10)
        assert (frame.width, frame.height) == (64, 64)

        async def live() -> bool:
            sessions = await sessions_of(http, server)
            return bool(sessions) and sessions[0]["state"] == "live"

        await wait_for(live, "the session to be live")
    finally:
        await peer.close()

    async def gone() -> bool:
        return await sessions_of(http, server) == []

    await wait_for(gone, "the session to end after the agent left")
    assert await metric(http, server, 'avatar_session_ends_total{reason="agent_left"}') == 1


async def test_offer_for_unknown_room_is_404(serve: Start, http: aiohttp.ClientSession) -> None:
    server = await serve()
    body = {"sdp": "v=0", "type": "offer"}
    async with http.post(f"{server.url}/local/nowhere/offer", json=body, headers=ADMIN) as r:
        assert r.status == 404


# -- the shared renderer process -------------------------------------------------------------


def _shm_host(heartbeat_timeout: float = 6.0, **spec: Any) -> ShmHost:
    settings = AvatarSettings(video_width=64, video_height=64, video_fps=25)
    return ShmHost(
        RendererSpec(kind=spec.pop("kind", "pattern"), settings=settings, **spec),
        heartbeat_timeout=heartbeat_timeout,
    )


async def test_readiness_follows_the_renderer_through_a_restart(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    host = _shm_host()
    server = await serve(host, in_process=False)

    async def ready() -> bool:
        async with http.get(f"{server.url}/readyz") as r:
            return r.status == 200

    async def not_ready() -> bool:
        return not await ready()

    assert await ready()
    old_pid = host.supervisor.pid
    os.kill(old_pid, signal.SIGSTOP)  # a hung renderer: no heartbeat
    try:
        # Not ready once the heartbeat is 3 s old; replaced after 6 s without one.
        await wait_for(not_ready, "readyz to fail while the renderer hangs", timeout=20)
        async with http.post(f"{server.url}/launch", json=join_body()) as r:
            assert r.status == 503
            assert "renderer" in (await r.json())["error"]
        await wait_for(ready, "readyz after the renderer was replaced", timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGKILL)
    assert host.supervisor.pid != old_pid

    async def counted() -> bool:  # counted by the supervisor's thread just after the spawn
        return host.supervisor.restarts == 1

    await wait_for(counted, "the restart to be counted", timeout=5)


async def test_crashed_session_releases_its_rings(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    host = _shm_host()
    server = await serve(host, in_process=False, prewarm=0)
    async with http.post(f"{server.url}/launch", json=join_body()) as r:
        assert r.status == 202

    async def attached() -> bool:
        return any(s["pid"] for s in await sessions_of(http, server))

    await wait_for(attached, "the session process")
    assert len(host.supervisor.session_ids) == 1  # its rings are attached to the renderer
    os.kill((await sessions_of(http, server))[0]["pid"], signal.SIGKILL)

    async def released() -> bool:
        return await sessions_of(http, server) == [] and host.supervisor.session_ids == []

    await wait_for(released, "the slot and the rings to be released")
    async with http.get(f"{server.url}/readyz") as r:
        assert r.status == 200


async def test_weight_swap_errors(
    serve: Start, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    host = _shm_host()
    server = await serve(host, in_process=False)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    async with http.post(
        f"{server.url}/weights", json={"path": str(tmp_path / "no.onnx")}, headers=ADMIN
    ) as r:
        assert r.status == 400
        assert "no weights file" in (await r.json())["error"]
    async with http.post(f"{server.url}/weights", json={"path": str(junk)}, headers=ADMIN) as r:
        assert r.status == 422
        assert "does not support swapping" in (await r.json())["error"]
    async with http.post(f"{server.url}/weights", json={"nope": 1}, headers=ADMIN) as r:
        assert r.status == 400
    async with http.get(f"{server.url}/readyz") as r:
        assert r.status == 200


async def test_weight_swap_with_the_lipsync_renderer(
    serve: Start, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A bad file is refused with the renderer's reason (old weights stay); a good one loads."""
    host = _shm_host(kind="lipsync", device="cpu")
    server = await serve(host, in_process=False, renderer="lipsync")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    async with http.post(f"{server.url}/weights", json={"path": str(junk)}, headers=ADMIN) as r:
        assert r.status == 422
        assert "is not an ONNX model file" in (await r.json())["error"]
    async with http.get(f"{server.url}/readyz") as r:
        assert r.status == 200
    good = ROOT / "models" / "data" / "parametric.onnx"
    async with http.post(f"{server.url}/weights", json={"path": str(good)}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
    assert await metric(http, server, 'avatar_weight_swaps_total{result="ok"}') == 1
    assert await metric(http, server, 'avatar_weight_swaps_total{result="refused"}') == 1


async def test_weight_swap_in_process_mode_is_refused(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    server = await serve()
    async with http.post(f"{server.url}/weights", json={"path": "/x.onnx"}, headers=ADMIN) as r:
        assert r.status == 409


# -- configuration -------------------------------------------------------------------------


def test_refuses_to_start_without_authentication() -> None:
    with pytest.raises(ConfigError, match="without a way to authenticate"):
        load_config([], environ={})
    config = load_config(["--insecure"], environ={})
    assert config.insecure and config.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="loopback"):
        load_config(["--insecure", "--host", "0.0.0.0"], environ={})
    with pytest.raises(ConfigError, match="both"):
        load_config([], environ={"VIDEOSDK_API_KEY": "k"})


def test_settings_precedence_flags_env_toml(tmp_path: Path) -> None:
    toml = tmp_path / "avatar.toml"
    toml.write_text(
        '[server]\nport = 9000\nmax_sessions = 3\nhost = "127.0.0.2"\n'
        '[auth]\nvideosdk_api_key = "file-key"\nvideosdk_secret_key = "file-secret"\n'
        '[renderer]\nrenderer = "pattern"\nfps = 30\n'
    )
    env = {
        "AVATAR_SERVER_CONFIG": str(toml),
        "AVATAR_SERVER_PORT": "9100",
        "VIDEOSDK_API_KEY": "env-key",
    }
    config = load_config(["--port", "9200"], environ=env)
    assert config.port == 9200  # flag beats env beats file
    assert config.max_sessions == 3 and config.host == "127.0.0.2" and config.fps == 30.0
    assert config.api_key == "env-key" and config.secret == "file-secret"
    config = load_config([], environ=env)
    assert config.port == 9100
    assert load_config([], environ={**env, "AVATAR_SERVER_TOKEN": "t"}).token == "t"


def test_bad_settings_are_explained(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nportt = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'portt'"):
        load_config(["--config", str(bad), "--insecure"], environ={})
    with pytest.raises(ConfigError, match="AVATAR_SERVER_MAX_SESSIONS"):
        load_config(["--insecure"], environ={"AVATAR_SERVER_MAX_SESSIONS": "many"})
    with pytest.raises(ConfigError, match="transport"):
        load_config(["--insecure"], environ={"AVATAR_SERVER_TRANSPORT": "carrier-pigeon"})


def test_help_documents_every_option() -> None:
    text = build_parser().format_help()
    for option in OPTIONS:
        assert option.flag in text
        assert option.env_var in text
    assert "--config" in text


# -- shutdown ----------------------------------------------------------------------------


def _start_serving(*args: str) -> tuple[subprocess.Popen, str]:
    code = (
        "import sys; from worker.dispatcher.app import serve_main; "
        "sys.exit(serve_main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[-1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_lets_sessions_leave_and_exits(
    http: aiohttp.ClientSession, signum: int
) -> None:
    proc, url = await asyncio.to_thread(
        _start_serving,
        "--transport", "local", "--renderer", "pattern", "--in-process", "--insecure",
        "--width", "64", "--height", "64", "--log-level", "warning",
    )  # fmt: skip
    peer = None
    try:
        async with http.post(f"{url}/launch", json={"room_name": "room-s", "token": "t"}) as r:
            assert r.status == 202

        async def signal_(sdp: str, kind: str) -> tuple[str, str]:
            body = {"sdp": sdp, "type": kind, "participant_id": "agent-s"}
            async with http.post(f"{url}/local/room-s/offer", json=body) as r:
                answer = await r.json()
                return answer["sdp"], answer["type"]

        with ice_on_loopback():
            peer = await connect_agent(signal_, participant_id="agent-s")
        await asyncio.wait_for(peer.video.recv(), 10)
        async with http.get(f"{url}/sessions") as r:
            pid = (await r.json())["sessions"][0]["pid"]
        proc.send_signal(signum)
        await asyncio.wait_for(peer.meeting.closed.wait(), 15)  # the avatar left the room
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        assert code == 0
        assert not pid_alive(pid)
    finally:
        if peer is not None:
            await peer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# -- fuzz ------------------------------------------------------------------------------------


class _ThreadedServer:
    """A dispatcher on its own event loop thread, for synchronous (hypothesis) tests."""

    def __init__(self, config: DispatcherConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(RunningServer.start(config))
        self.url = self.server.url

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self._call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_server():
    # A long join timeout keeps the first accepted session alive for the whole run,
    # so later valid joins meet a full server (503) instead of spawning processes.
    server = _ThreadedServer(make_config(max_sessions=1, join_timeout=120, duplicate_room="refuse"))
    yield server
    server.close()


def _post(url: str, data: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_field = st.one_of(
    _json,
    st.text(max_size=300),
    st.just(make_token()),
    st.just(make_token(participant="avatar-1", expires_in=-100)),
    st.sampled_from(["", "api.videosdk.live", "room-1", "avatar-1"]),
)
_bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "room_name": _field,
            "token": _field,
            "participant_id": _field,
            "signaling_base_url": _field,
            "extra": _json,
        },
    ).map(lambda d: json.dumps(d).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)
_auth = st.sampled_from([None, f"Bearer {BEARER}", "Bearer wrong", "Basic abc", "Bearer", ""])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_bodies, authorization=_auth)
def test_fuzzed_join_bodies_never_cause_5xx(
    fuzz_server, body: bytes, authorization: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    status = _post(f"{fuzz_server.url}/launch", body, headers)
    assert 200 <= status < 300 or 400 <= status < 500 or status == 503, status
    with urllib.request.urlopen(f"{fuzz_server.url}/healthz", timeout=10) as response:
        assert response.status == 200


# -- the example agent on Python 3.12 (videosdk-agents) --------------------------------------

PY312_VENV = Path(os.environ.get("AVATAR_PY312_VENV", ROOT / ".venv312"))
PY312 = PY312_VENV / "bin" / "python"

_EXAMPLE_SCRIPT = """
import asyncio, importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("example_agent", sys.argv[1])
agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agent)

async def main():
    context = agent.make_context()
    avatar = context.room_options.avatar
    assert isinstance(avatar, agent.AvatarAudioOut), type(avatar)
    avatar._avatar_dispatcher_url = sys.argv[2]
    agent.AvatarAgent()
    avatar.set_room_id(os.environ["VIDEOSDK_ROOM_ID"])
    await avatar.connect()
    print(json.dumps({"participant_id": avatar.participant_id}))

asyncio.run(main())
"""


def _py312_ready() -> bool:
    if not PY312.exists():
        return False
    probe = subprocess.run(
        [str(PY312), "-c", "import videosdk.agents.avatar, httpx, jwt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _py312_ready(), reason="no Python 3.12 venv with videosdk-agents")
async def test_example_agent_joins_through_the_dispatcher(
    serve: Start, http: aiohttp.ClientSession
) -> None:
    """videosdk-agents' own AvatarAudioOut (examples/agent.py) is accepted by the dispatcher."""
    server = await serve()
    env = {
        **os.environ,
        "VIDEOSDK_API_KEY": API_KEY,
        "VIDEOSDK_SECRET_KEY": SECRET,
        "VIDEOSDK_ROOM_ID": "room-example",
    }
    proc = await asyncio.create_subprocess_exec(
        str(PY312),
        "-c",
        _EXAMPLE_SCRIPT,
        str(ROOT / "examples" / "agent.py"),
        f"{server.url}/launch",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    participant = json.loads(out.decode().strip().splitlines()[-1])["participant_id"]
    sessions = await sessions_of(http, server)
    assert [(s["room_name"], s["participant_id"]) for s in sessions] == [
        ("room-example", participant)
    ]


# -- process titles --------------------------------------------------------------------------


def _title(pid: int) -> str:
    """What ``ps`` shows for ``pid`` (its cmdline, NUL-separated words joined)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


async def _titles_until(pid: int, wanted: set[str], timeout: float = 60) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        titles = {p: _title(p) for p in _children(pid)}
        if wanted <= set(titles.values()) or time.monotonic() > deadline:
            return titles
        await asyncio.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
async def test_ps_names_the_dispatcher_its_renderer_and_its_sessions(
    http: aiohttp.ClientSession,
) -> None:
    proc, url = await asyncio.to_thread(
        _start_serving,
        "--transport", "local", "--renderer", "pattern", "--insecure", "--device", "cpu",
        "--width", "64", "--height", "64", "--log-level", "warning",
    )  # fmt: skip
    try:
        assert _title(proc.pid) == "avatar-server dispatcher"
        spare, renderer = "avatar-server session (spare)", "avatar-server renderer [cpu]"
        titles = await _titles_until(proc.pid, {spare, renderer})
        assert {spare, renderer} <= set(titles.values()), titles
        async with http.post(f"{url}/launch", json={"room_name": "room-ps", "token": "t"}) as r:
            assert r.status == 202
        deadline, pid = time.monotonic() + 30, None
        while pid is None and time.monotonic() < deadline:  # None until the process has it
            async with http.get(f"{url}/sessions") as r:
                pid = (await r.json())["sessions"][0]["pid"]
            await asyncio.sleep(0.05)
        while _title(pid) != "avatar-server session room-ps" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _title(pid) == "avatar-server session room-ps"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def test_a_session_title_is_one_printable_word_of_bounded_length() -> None:
    from worker.session import session_title

    assert session_title("room 1\n") == "avatar-server session room_1_"
    assert session_title("") == "avatar-server session ?"
    assert len(session_title("r" * 500)) == len("avatar-server session ") + 64


def test_audio_in_counters_reach_the_metrics_as_increments() -> None:
    from worker.dispatcher.messages import Stats, _decoder, _encoder
    from worker.dispatcher.metrics import Metrics

    def sample(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not in the metrics")

    m = Metrics()
    first = {"audio_bytes": 960, "dropped_after_interrupt": 0, "ignored": 1, "malformed": 2}
    crossed = _decoder.decode(_encoder.encode(Stats(audio_in=first)))  # the control socket
    assert crossed == Stats(audio_in=first)
    m.session_stats("a", crossed)
    m.session_stats("b", Stats(audio_in={"audio_bytes": 100, "held": 3}))
    m.session_stats(
        "a", Stats(audio_in={**first, "audio_bytes": 1920, "dropped_after_interrupt": 480})
    )
    m.session_stats("a", Stats(audio_in={**first, "audio_bytes": 1920, "future_counter": 5}))
    text = m.render().decode()
    assert sample(text, "avatar_audio_in_bytes_total") == 1920 + 100
    assert sample(text, "avatar_audio_in_dropped_after_interrupt_bytes_total") == 480
    assert sample(text, "avatar_audio_in_ignored_messages_total") == 1
    assert sample(text, "avatar_audio_in_malformed_messages_total") == 2
    assert sample(text, "avatar_audio_in_held_messages_total") == 3
    assert sample(text, "avatar_audio_in_dropped_while_held_messages_total") == 0
    assert sample(text, 'avatar_audio_in_other_total{counter="future_counter"}') == 5
