"""Slots and session processes: who is in which room, and when a slot is free again.

A *slot* is taken when a join is accepted and freed when that session's
process has exited, whatever the cause (left, failed to join, crashed,
killed).  One session process per room; a warm spare (imported and
attached to the renderer, waiting for a join) is kept ready so that a join
only costs the room's own join time.

Session states (``Session.state``)::

    starting --process attached, Start sent--> joining --Joined--> live
        |                                          |                 |
        +------------- stop / failure -------------+-----------------+--> leaving --exit--> ended

A second join for a room that already has a session follows
``duplicate_room``: ``refuse`` answers 409; ``replace`` tells the old
session to leave and starts the new one once the old process has exited
(so one participant never sits in the room twice).  The old session hands
its slot to the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..transports.base import (
    REASON_AGENT_LEFT,
    REASON_CONNECTION_LOST,
    REASON_PEER_FAILED,
    REASON_REMOVED,
    REASON_ROOM_CLOSED,
    REASON_ROOM_EMPTY,
)
from .config import DispatcherConfig
from .messages import (
    Answer,
    ControlChannel,
    Ended,
    FirstFrame,
    Hello,
    Joined,
    JoinSpec,
    Offer,
    Prepare,
    Prepared,
    Start,
    Stats,
    Stop,
)
from .metrics import Metrics
from .renderer_host import RendererHost

logger = logging.getLogger(__name__)

_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class SessionRefused(Exception):
    """A join that cannot be served now; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class SessionProcess:
    """One ``python -m worker.session`` child and its control channel."""

    def __init__(
        self, proc: asyncio.subprocess.Process, channel: ControlChannel, prepare: Prepare
    ) -> None:
        self.proc = proc
        self._prepare = prepare
        self.channel = channel
        self.pid = proc.pid
        self.prepared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.prepared.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        self.ended: Ended | None = None
        self.session: Session | None = None
        self._answers: dict[int, asyncio.Future[Answer]] = {}
        self._next_request = 0
        self._reader = asyncio.ensure_future(self._read())
        self.exited = asyncio.ensure_future(self._wait_exit())

    @classmethod
    async def spawn(cls, host: RendererHost, prepare: Callable[[dict], Prepare]) -> SessionProcess:
        """Start a session process with its renderer resources (rings) already attached."""
        resources = host.session_resources()
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, env.get("PYTHONPATH")]))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker.session",
                "--control-fd",
                str(child.fileno()),
                "--parent-pid",
                str(os.getpid()),
                pass_fds=[child.fileno(), *resources.fds],
                start_new_session=True,  # Ctrl-C reaches the dispatcher, which stops sessions
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
            if resources.attach is not None:
                try:
                    await resources.attach(proc.pid)
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    raise
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
            resources.release()
        channel = await ControlChannel.open(parent)
        return cls(proc, channel=channel, prepare=prepare(resources.spec))

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.exited.done()

    def send(self, message: Any) -> None:
        self.channel.send(message)

    async def request_answer(self, offer: Offer, timeout: float = 10.0) -> Answer:
        self._next_request += 1
        offer.request_id = self._next_request
        future = asyncio.get_running_loop().create_future()
        self._answers[offer.request_id] = future
        self.send(offer)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._answers.pop(offer.request_id, None)

    async def _read(self) -> None:
        try:
            while (message := await self.channel.recv()) is not None:
                self._on_message(message)
        except Exception:
            logger.exception("session process %d sent something unreadable", self.pid)
        finally:
            if not self.prepared.done():
                self.prepared.set_exception(
                    RuntimeError("the session process exited before it was ready")
                )
            for future in self._answers.values():
                if not future.done():
                    future.set_exception(RuntimeError("the session process exited"))

    def _on_message(self, message: Any) -> None:
        if isinstance(message, Hello):
            self.send(self._prepare)
        elif isinstance(message, Prepared):
            if not self.prepared.done():
                self.prepared.set_result(None)
        elif isinstance(message, Answer):
            future = self._answers.get(message.request_id)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, Ended):
            self.ended = message
        elif self.session is not None:
            self.session.on_message(message)

    async def _wait_exit(self) -> int:
        code = await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self.channel.aclose()
        return code

    async def discard(self) -> int:
        """End a process that never got a room (a spare): nothing to leave, so no grace."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        return await self.stop("not needed", 0.0)

    async def stop(self, reason: str, grace: float) -> int:
        """Ask the process to leave; terminate, then kill, if it does not exit in time."""
        if self.alive:
            self.send(Stop(reason))
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self.exited), grace)
        for kill in (self.proc.terminate, self.proc.kill):
            with contextlib.suppress(ProcessLookupError):
                kill()
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self.exited), 2.0)
        return await self.exited


@dataclass
class Session:
    """A room's session as the dispatcher tracks it."""

    id: str
    join: JoinSpec
    metrics: Metrics
    created: float = field(default_factory=time.time)
    requested_at: float = field(default_factory=time.monotonic)
    state: str = "starting"
    process: SessionProcess | None = None
    holds_slot: bool = True
    stop_reason: str | None = None
    end_reason: str | None = None
    end_error: str | None = None
    joined_seconds: float | None = None
    first_frame_seconds: float | None = None
    stats: Stats = field(default_factory=Stats)
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_message(self, message: Any) -> None:
        if isinstance(message, Joined):
            self.state = "live" if self.state == "joining" else self.state
            self.joined_seconds = time.monotonic() - self.requested_at
            self.metrics.join_seconds.observe(self.joined_seconds)
            logger.info("session %s joined room %r", self.id, self.join.room_name)
        elif isinstance(message, FirstFrame):
            self.first_frame_seconds = time.monotonic() - self.requested_at
            self.metrics.first_frame_seconds.observe(self.first_frame_seconds)
        elif isinstance(message, Stats):
            self.stats = message
            self.metrics.session_stats(self.id, message)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "room_name": self.join.room_name,
            "participant_id": self.join.participant_id,
            "state": self.state,
            "created": self.created,
            "pid": self.process.pid if self.process else None,
            "joined_seconds": self.joined_seconds,
            "first_frame_seconds": self.first_frame_seconds,
            "output_fps": round(self.stats.fps, 2),
            "frames_shown": self.stats.frames_shown,
            "stalls": self.stats.stalls,
            "interrupts": self.stats.interrupts,
            "end_reason": self.end_reason,
            "end_error": self.end_error,
        }


ENDED_KEPT = 50  # ended sessions /sessions still shows, with their end_reason


class SessionManager:
    """Accepts joins into free slots and runs one session process per room."""

    def __init__(self, config: DispatcherConfig, host: RendererHost, metrics: Metrics) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.ended: deque[Session] = deque(maxlen=ENDED_KEPT)  # newest last: why they ended
        self._rooms: dict[str, Session] = {}
        self._spare: SessionProcess | None = None
        self._spare_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closing = False

    # -- capacity -------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return sum(1 for s in self.sessions.values() if s.holds_slot)

    @property
    def free_slots(self) -> int:
        return max(0, self.config.max_sessions - self.active)

    def _update_gauges(self) -> None:
        self.metrics.sessions.set(self.active)
        self.metrics.free_slots.set(self.free_slots)

    def prepare_message(self, renderer: dict) -> Prepare:
        c = self.config
        return Prepare(
            renderer=renderer,
            width=c.width,
            height=c.height,
            fps=c.fps,
            jitter_frames=c.jitter_frames,
            log_level=c.log_level,
        )

    async def start(self) -> None:
        self._update_gauges()
        self._replenish_spare()

    # -- joins ----------------------------------------------------------------------------

    def launch(self, join: JoinSpec) -> Session:
        """Reserve a slot and start the session in the background.

        Raises :class:`SessionRefused` (capacity, duplicate room, renderer down, shutdown).
        """
        c = self.config
        if self.closing:
            raise SessionRefused("the server is shutting down", 503, c.retry_after)
        if not self.host.ready:
            raise SessionRefused(
                "the renderer is not ready (starting or restarting)", 503, c.retry_after
            )
        old = self._rooms.get(join.room_name)
        if old is not None and c.duplicate_room == "refuse":
            raise SessionRefused(
                f"room {join.room_name!r} already has an avatar session ({old.id}); "
                "end it with DELETE /sessions/{id} or configure duplicate_room = 'replace'",
                409,
            )
        if old is None and self.free_slots <= 0:
            raise SessionRefused(
                f"all {c.max_sessions} session slots are in use", 503, c.retry_after
            )
        session = Session(uuid.uuid4().hex[:12], join, self.metrics)
        if old is not None:
            old.holds_slot = False  # the new session takes over the old one's slot
            old.stop_reason = "replaced"
            self._spawn(self.stop(old.id, "replaced"))
        self.sessions[session.id] = session
        self._rooms[join.room_name] = session
        self._update_gauges()
        self._spawn(self._run(session, old))
        logger.info("session %s starting for room %r", session.id, join.room_name)
        return session

    async def _run(self, session: Session, replaced: Session | None) -> None:
        try:
            if replaced is not None:
                await replaced.done.wait()
            if session.stop_reason is None:
                process = await self._take_process()
                if session.stop_reason is not None:
                    self._offer_spare(process)
                else:
                    await self._serve(session, process)
        except Exception as exc:
            logger.warning("session %s could not start: %s", session.id, exc)
            session.end_reason, session.end_error = "start failed", str(exc)
        finally:
            self._finish(session)

    async def _serve(self, session: Session, process: SessionProcess) -> None:
        c = self.config
        session.process = process
        process.session = session
        session.state = "joining"
        process.send(
            Start(
                session_id=session.id,
                join=session.join,
                transport=c.transport,
                join_timeout=c.join_timeout,
                idle_timeout=c.idle_timeout,
                ice_addresses=c.ice_addresses,
            )
        )
        session.attached.set()
        code = await process.exited
        ended = process.ended
        if ended is not None:
            session.end_reason, session.end_error = ended.reason, ended.error
        else:
            session.end_reason = "crashed"
            session.end_error = f"the session process exited with code {code}"
            logger.error("session %s: %s", session.id, session.end_error)

    def _finish(self, session: Session) -> None:
        session.state = "ended"
        reason = session.end_reason or session.stop_reason or "ended"
        session.end_reason = reason
        self.sessions.pop(session.id, None)
        self.ended.append(session)
        if self._rooms.get(session.join.room_name) is session:
            del self._rooms[session.join.room_name]
        self.metrics.session_ended(session.id, _reason_label(reason))
        self._update_gauges()
        log = logger.warning if reason in _WARN_REASONS else logger.info
        log(
            "session %s for room %r ended: %s%s",
            session.id,
            session.join.room_name,
            reason,
            f" ({session.end_error})" if session.end_error else "",
        )
        session.done.set()

    # -- spare processes --------------------------------------------------------------------

    async def _take_process(self) -> SessionProcess:
        process, self._spare = self._spare, None
        if process is None or not process.alive:
            if self._spare_task is not None and not self._spare_task.done():
                with contextlib.suppress(Exception):
                    await self._spare_task
                process, self._spare = self._spare, None
            if process is None or not process.alive:
                process = await SessionProcess.spawn(self.host, self.prepare_message)
        self._replenish_spare()
        try:
            await asyncio.wait_for(asyncio.shield(process.prepared), 60.0)
        except BaseException:
            await process.discard()
            raise
        return process

    def _replenish_spare(self) -> None:
        if self.closing or self.config.prewarm <= 0 or self._spare is not None:
            return
        if self._spare_task is not None and not self._spare_task.done():
            return
        self._spare_task = self._spawn(self._make_spare())

    async def _make_spare(self) -> None:
        try:
            process = await SessionProcess.spawn(self.host, self.prepare_message)
        except Exception:
            logger.exception("could not start a spare session process")
            return
        self._offer_spare(process)

    def _offer_spare(self, process: SessionProcess) -> None:
        if self.closing or self._spare is not None:
            self._spawn(process.discard())
        else:
            self._spare = process

    # -- commands ---------------------------------------------------------------------------

    async def stop(self, session_id: str, reason: str) -> Session | None:
        """Tell a session to leave and wait until its process has exited."""
        session = self.sessions.get(session_id)
        if session is None:
            return None
        session.stop_reason = session.stop_reason or reason
        if session.state != "ended":
            session.state = "leaving" if session.process else session.state
        if session.process is not None:
            await session.process.stop(session.stop_reason, self.config.leave_timeout)
        await session.done.wait()
        return session

    async def offer(self, room_name: str, sdp: str, kind: str, participant_id: str) -> Answer:
        """Relay a WebRTC offer to the room's session (local transport)."""
        session = self._rooms.get(room_name)
        if session is None:
            raise SessionRefused(f"no session for room {room_name!r}; POST the join first", 404)
        try:
            await asyncio.wait_for(session.attached.wait(), 60.0)
        except TimeoutError:
            raise SessionRefused(
                "the session is still starting; try again", 503, self.config.retry_after
            ) from None
        if session.process is None or not session.process.alive:
            raise SessionRefused("the session has ended", 410)
        return await session.process.request_answer(Offer(0, sdp, kind, participant_id))

    async def shutdown(self) -> None:
        """Stop accepting joins, let every session leave, stop spare processes."""
        self.closing = True
        spare, self._spare = self._spare, None
        if self._spare_task is not None:
            with contextlib.suppress(Exception):
                await self._spare_task
            spare = spare or self._spare
            self._spare = None
        stops = [self.stop(sid, "shutdown") for sid in list(self.sessions)]
        if spare is not None:
            stops.append(spare.discard())
        await asyncio.gather(*stops, return_exceptions=True)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# Every reason a session can end with, as a metrics label; "other" only for a reason that
# is not listed here (a bug: add it).
_REASONS = {
    REASON_AGENT_LEFT: "agent_left",
    REASON_ROOM_CLOSED: "room_closed",
    REASON_ROOM_EMPTY: "room_empty",
    REASON_REMOVED: "removed",
    REASON_CONNECTION_LOST: "connection_lost",
    REASON_PEER_FAILED: "peer_failed",
    "stopped": "stopped",
    "error": "error",
    "idle": "idle",
    "deleted": "deleted",
    "replaced": "replaced",
    "shutdown": "shutdown",
    "join failed": "join_failed",
    "join timed out": "join_timeout",
    "start failed": "start_failed",
    "crashed": "crashed",
    "dispatcher gone": "dispatcher_gone",
    "terminated": "terminated",
    "ended": "ended",
}


_WARN_REASONS = frozenset(
    {
        "crashed",
        "join failed",
        "join timed out",
        "start failed",
        "error",
        REASON_CONNECTION_LOST,
        REASON_PEER_FAILED,
    }
)


def _reason_label(reason: str) -> str:
    return _REASONS.get(reason, "other")
