"""Starting, watching and replacing the renderer process.

A :class:`Supervisor` lives in the process that owns the sessions (a session
process, or the dispatcher).  It spawns the renderer process, attaches session
ring pairs to it, forwards weight swaps (interrupts do not pass through here: a
session bumps its audio ring's epoch), and watches it from a background thread:
the process sentinel (it died), the control socket (it closed), and the
heartbeat word the renderer loop writes into shared memory
(it hangs).  A dead or hung renderer is killed and replaced, and every
attached session is re-attached to the new one.

Lifecycle::

    start() ──▶ RUNNING ──exited / channel closed / heartbeat older than
                   ▲       heartbeat_timeout──▶ kill, mark rings, spawn ──Ready──┐
                   └─────────────── re-attach sessions, on_restart(event) ◀──────┘
                   more than max_restarts in restart_window ──▶ FAILED
    close() from any state ──▶ Shutdown (then SIGKILL if it does not exit) ──▶ CLOSED

What a session sees of a restart: the supervisor sets its audio ring's
``floor_epoch`` past the current epoch and bumps ``generation`` (see
:mod:`renderers.audio_ring`), then rings the frame doorbell.  The audio of the
segment that was playing is void; the session starts its next segment in a
new epoch and it renders on the new process.  Frames already in the frame
ring stay valid.  In-process listeners also get :attr:`Supervisor.on_restart`
(called from the watcher thread).

The idle loop: the supervisor creates one :class:`~renderers.idle_loop.IdleLoop`
segment when its first renderer process is ready and keeps it for good; every
renderer process it starts gets it (``IdleSegment``) and publishes its idle
loop there, so a replacement (or a weight swap) shows up to sessions as a new
generation of the same segment.  Sessions map it read-only
(:meth:`Supervisor.idle_loop_fd`).

Memory and descriptors: rings are memfd segments, so nothing appears in
``/dev/shm`` and a SIGKILLed process leaks nothing; the supervisor keeps its
own duplicate of each attached session's descriptors (to re-attach after a
restart) and closes it on detach, when the session process exits (pidfd), or
on :meth:`Supervisor.close`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from models.timing import exact_fps

from .control import (
    Attach,
    ChannelClosed,
    ControlChannel,
    Detach,
    Detached,
    IdleSegment,
    Ready,
    SessionRings,
    Shutdown,
    StartFailed,
    StatusBlock,
    SwapResult,
    SwapWeights,
)
from .idle_loop import MIN_CAPACITY, IdleLoop
from .shm import Doorbell, PassFd

logger = logging.getLogger(__name__)


class RendererStartError(RuntimeError):
    """The renderer process could not be started; the message says why."""


class RendererUnavailable(RuntimeError):
    """The renderer process is gone and could not be replaced."""


class SwapWeightsError(RuntimeError):
    """The renderer refused new weights and keeps the old ones."""


@dataclass(frozen=True)
class RestartEvent:
    reason: str  # why the old process was replaced
    restarts: int  # restarts so far
    pid: int | None  # the new renderer process (None if it could not be replaced)
    session_ids: tuple[int, ...]  # sessions re-attached to it
    seconds: float  # from detection to the new process serving
    failed: bool = False


@dataclass(eq=False)
class _Attached:
    id: int
    rings: SessionRings  # the supervisor's own duplicate
    owner: int | None  # pidfd of the session process, if it is another process


def _renderer_main(*args: Any) -> None:
    """Spawn target; imports the renderer side only in the child."""
    from .process import main

    main(*args)


class Supervisor:
    """Runs one renderer process and keeps it running."""

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any] | None = None,
        *,
        heartbeat_timeout: float = 10.0,
        heartbeat_interval: float = 0.05,
        start_timeout: float = 120.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        on_restart: Callable[[RestartEvent], None] | None = None,
    ) -> None:
        module, sep, name = factory.partition(":")
        if not (module and sep and name):
            raise ValueError(
                f"renderer factory {factory!r} is not of the form 'package.module:callable'"
            )
        if heartbeat_timeout <= heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        self.factory, self.kwargs = factory, dict(kwargs or {})
        self.heartbeat_timeout, self.heartbeat_interval = heartbeat_timeout, heartbeat_interval
        self.start_timeout = start_timeout
        self.max_restarts, self.restart_window = max_restarts, restart_window
        self.on_restart = on_restart
        self.info: Ready | None = None
        self.restarts = 0
        self.last_restart_seconds: float | None = None
        self.failed = False
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._channel: ControlChannel | None = None
        self._status: StatusBlock | None = None
        self._wake: Doorbell | None = None
        self._idle_loop: IdleLoop | None = None  # created at the first Ready, kept for good
        self._sessions: dict[int, _Attached] = {}
        self._swaps: dict[int, Future[None]] = {}
        self._swapped_to: str | None = None  # re-applied to a replacement process
        self._ids = itertools.count(1)
        self._restart_times: deque[float] = deque()
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- public API --------------------------------------------------------------
    def start(self) -> Ready:
        """Spawn the renderer and wait until it serves; returns what it draws."""
        with self._lock:
            if self._watcher is not None:
                raise RuntimeError("Supervisor.start() called twice")
            self._status = StatusBlock.create()
            self._wake = Doorbell.create()
            try:
                self._spawn()
            except BaseException:
                self._status.close()
                self._wake.close()
                self._status = self._wake = None
                raise
            self._watcher = threading.Thread(target=self._watch, name="renderer-watch", daemon=True)
            self._watcher.start()
            atexit.register(self.close)  # before multiprocessing terminates its children
            assert self.info is not None
            return self.info

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def idle_loop_fd(self) -> int:
        """A new descriptor of the shared idle loop segment, for one session (the caller
        owns it: map it with :meth:`IdleLoop.from_fd <renderers.idle_loop.IdleLoop.from_fd>`,
        or pass it to a session process and close it)."""
        self._require_running()
        with self._lock:
            if self._idle_loop is None:
                raise RuntimeError("the supervisor has no idle loop segment")
            return os.dup(self._idle_loop.fd)

    def attach(self, rings: SessionRings, *, owner_pid: int | None = None) -> int:
        """Have the renderer serve ``rings``; returns the session id.

        ``owner_pid`` names the session process when it is not this one: the
        renderer (and this supervisor) let go of the rings when it exits.  The
        caller keeps its own ``rings`` and may close them once the session has
        them.
        """
        info = self._require_running()
        self._check_geometry(rings, info)
        owner = None
        if owner_pid is not None:
            try:
                owner = os.pidfd_open(owner_pid)
            except ProcessLookupError:
                raise ValueError(f"session process {owner_pid} is not running") from None
        session = _Attached(next(self._ids), rings.dup(), owner)
        with self._lock:
            self._sessions[session.id] = session
            self._send_attach(session)
        self._wake_watcher()
        return session.id

    def detach(self, session_id: int) -> None:
        """Stop serving a session and let go of its rings."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return
            self._send(Detach(session_id))
            self._release(session)
        self._wake_watcher()

    def request_swap(self, path: str | os.PathLike[str]) -> Future[None]:
        """Ask the renderer to load other weights between two frames.

        The future fails with :class:`SwapWeightsError` (old weights kept) or
        :class:`RendererUnavailable` (the process was replaced meanwhile).
        """
        future: Future[None] = Future()
        path = os.fspath(path)
        with self._lock:
            self._require_running()
            request_id = next(self._ids)
            self._swaps[request_id] = future
            future.add_done_callback(lambda f: self._remember_swap(f, path))
            self._send(SwapWeights(request_id, path))
        return future

    def swap_weights(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        """Blocking :meth:`request_swap`."""
        self.request_swap(path).result(timeout)

    def heartbeat_age(self) -> float:
        """Seconds since the renderer loop last showed it is alive."""
        status = self._status
        if status is None:
            return float("inf")
        return max(0, time.monotonic_ns() - status.heartbeat_ns) / 1e9

    def stats(self) -> dict[str, int | float]:
        """The renderer's counters (frames, render calls, stale frames, sessions)."""
        status = self._status
        snapshot: dict[str, int | float] = status.snapshot() if status else {}
        snapshot["restarts"] = self.restarts
        return snapshot

    @property
    def session_ids(self) -> list[int]:
        with self._lock:
            return list(self._sessions)

    def close(self, timeout: float = 5.0) -> None:
        """Shut the renderer down (killing it if it does not exit) and free everything."""
        atexit.unregister(self.close)
        self._closing.set()
        self._wake_watcher()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        with self._lock:
            proc, channel = self._proc, self._channel
            if proc is not None and proc.is_alive() and channel is not None:
                with contextlib.suppress(ChannelClosed, OSError):
                    channel.send(Shutdown())
                proc.join(timeout)
            self._stop_process()
            self._fail_swaps(RendererUnavailable("the supervisor was closed"))
            for session in self._sessions.values():
                self._release(session)
            self._sessions.clear()
            for resource in (self._status, self._wake, self._idle_loop):
                if resource is not None:
                    resource.close()
            self._status = self._wake = self._idle_loop = None

    def __enter__(self) -> Supervisor:
        if self._watcher is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- starting and stopping the process ------------------------------------------
    def _spawn(self) -> None:
        """Start a renderer process and wait for Ready (lock held)."""
        assert self._status is not None
        self._status.reset()
        channel, theirs = ControlChannel.pair()
        args = (self.factory, self.kwargs, theirs, PassFd(self._status.fd), self.heartbeat_interval)
        proc = self._ctx.Process(target=_renderer_main, args=args, name="avatar-renderer")
        proc.daemon = True
        try:
            proc.start()
        except BaseException:
            channel.close()
            raise
        finally:
            theirs.close()
        self._proc, self._channel = proc, channel
        try:
            self.info = self._await_ready(proc, channel)
            self._send_idle_segment(channel, self.info)
            if self._swapped_to is not None:
                self._reapply_swap(channel, self._swapped_to)
        except BaseException:
            self._stop_process()
            raise

    def _await_ready(self, proc, channel: ControlChannel) -> Ready:
        deadline = time.monotonic() + self.start_timeout
        while (left := deadline - time.monotonic()) > 0:
            if not wait([channel.sock, proc.sentinel], left):
                break
            try:
                received = channel.recv(timeout=0)
            except ChannelClosed:
                received = None
                proc.join(1.0)
            if received is not None:
                msg, fds = received
                for fd in fds:
                    os.close(fd)
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, StartFailed):
                    raise RendererStartError(msg.error)
            elif not proc.is_alive():
                raise RendererStartError(
                    f"the renderer process exited with code {proc.exitcode} while starting"
                )
        raise RendererStartError(
            f"the renderer process did not become ready within {self.start_timeout:.0f} s"
        )

    def _send_idle_segment(self, channel: ControlChannel, info: Ready) -> None:
        """Hand the (new) process the shared idle loop segment; it publishes at once."""
        loop = self._idle_loop
        if loop is not None and (loop.width, loop.height) != (info.width, info.height):
            loop.close()  # sessions attached before keep their own mapping of the old one
            loop = self._idle_loop = None
        if loop is None:
            capacity = max(info.idle_frames, MIN_CAPACITY)
            loop = self._idle_loop = IdleLoop.create(info.width, info.height, capacity)
        channel.send(IdleSegment(), [loop.fd])

    def _reapply_swap(self, channel: ControlChannel, path: str) -> None:
        channel.send(SwapWeights(0, path))
        received = channel.recv(timeout=self.start_timeout)
        if received is None or not isinstance(received[0], SwapResult) or not received[0].ok:
            logger.warning("the replacement renderer could not load %s again", path)

    def _stop_process(self) -> None:
        """Kill (if needed) and reap the current process; close its channel (lock held)."""
        proc, channel = self._proc, self._channel
        self._proc = self._channel = None
        if proc is not None:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            proc.close()
        if channel is not None:
            channel.close()

    # -- the watcher thread ----------------------------------------------------------
    def _watch(self) -> None:
        interval = min(self.heartbeat_interval * 2, self.heartbeat_timeout / 4)
        while not self._closing.is_set():
            try:
                self._watch_once(interval)
            except Exception:  # keep supervising whatever happened
                logger.exception("error while watching the renderer process")
                self._closing.wait(interval)

    def _watch_once(self, interval: float) -> None:
        with self._lock:
            proc, channel, wake = self._proc, self._channel, self._wake
            owners = {s.owner: s.id for s in self._sessions.values() if s.owner is not None}
        if wake is None:
            return
        poller = select.poll()
        poller.register(wake.fd, select.POLLIN)
        for fd in owners:
            poller.register(fd, select.POLLIN)
        if proc is not None and channel is not None:
            poller.register(proc.sentinel, select.POLLIN)
            poller.register(channel.fileno(), select.POLLIN)
        events = dict(poller.poll(interval * 1000))
        if self._closing.is_set():
            return
        wake.drain()
        for fd, session_id in owners.items():
            if fd in events:
                self._forget(session_id, "its process exited")
        if proc is None or channel is None:
            return  # failed for good: only owners are watched
        reason = None
        if channel.fileno() in events:
            reason = self._read_replies(channel)
        if proc.sentinel in events or reason is not None:
            proc.join(1.0)  # an exit closes the channel too: report the exit
            if proc.exitcode is not None:
                reason = f"the renderer process exited (code {proc.exitcode})"
        if reason is None and self.heartbeat_age() > self.heartbeat_timeout:
            reason = f"the renderer process hung (no heartbeat for {self.heartbeat_age():.1f}s)"
        if reason is not None:
            self._replace(reason)

    def _read_replies(self, channel: ControlChannel) -> str | None:
        """Handle replies; returns a reason to replace the process, if any."""
        while True:
            try:
                received = channel.recv(timeout=0)
            except ChannelClosed:
                return "the renderer process closed its control channel"
            if received is None:
                return None
            msg, fds = received
            for fd in fds:
                os.close(fd)
            if isinstance(msg, SwapResult):
                with self._lock:
                    future = self._swaps.pop(msg.request_id, None)
                if future is not None:
                    if msg.ok:
                        future.set_result(None)
                    else:
                        future.set_exception(SwapWeightsError(msg.error))
            elif isinstance(msg, Detached):
                self._forget(msg.session_id, msg.reason)

    def _replace(self, reason: str) -> None:
        logger.warning("replacing the renderer process: %s", reason)
        detected = time.monotonic()
        with self._lock:
            self._stop_process()
            self._fail_swaps(RendererUnavailable(f"the renderer was replaced: {reason}"))
            for session in self._sessions.values():
                session.rings.audio.mark_restart()
                session.rings.frames.ready_bell.ring()
            pid = None
            while pid is None and self._may_restart():
                try:
                    self._spawn()
                    pid = self.pid
                except (RendererStartError, OSError) as exc:
                    logger.error("could not start a replacement renderer: %s", exc)
            if pid is None:
                self.failed = True
            else:
                self.restarts += 1
                for session in list(self._sessions.values()):
                    self._send_attach(session)
            self.last_restart_seconds = time.monotonic() - detected
            event = RestartEvent(
                reason=reason,
                restarts=self.restarts,
                pid=pid,
                session_ids=tuple(self._sessions),
                seconds=self.last_restart_seconds,
                failed=pid is None,
            )
        if event.failed:
            logger.error("the renderer could not be replaced; giving up")
        if self.on_restart is not None:
            try:
                self.on_restart(event)
            except Exception:
                logger.exception("on_restart callback failed")

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.restart_window:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts or self._closing.is_set():
            return False
        self._restart_times.append(now)
        return True

    # -- helpers ---------------------------------------------------------------------
    def _require_running(self) -> Ready:
        if self.failed:
            raise RendererUnavailable("the renderer process failed and could not be replaced")
        if self.info is None or self._closing.is_set():
            raise RuntimeError("the supervisor is not running: call start() first")
        return self.info

    @staticmethod
    def _check_geometry(rings: SessionRings, info: Ready) -> None:
        g = rings.frames.geometry
        theirs = (
            info.width,
            info.height,
            info.sample_rate,
            exact_fps(info.fps),
        )
        if (g.width, g.height, g.sample_rate, g.fps) != theirs:
            raise ValueError(
                f"the session's rings are for {g.width}x{g.height} at {float(g.fps):g} fps and "
                f"{g.sample_rate} Hz, but the renderer draws {info.width}x{info.height} at "
                f"{info.fps:g} fps and {info.sample_rate} Hz"
            )

    def _send(self, message) -> None:
        if self._channel is None:
            return  # between processes: the replacement gets attached sessions anyway
        try:
            self._channel.send(message)
        except ChannelClosed:
            self._wake_watcher()  # the watcher notices the death and replaces the process

    def _send_attach(self, session: _Attached) -> None:
        if self._channel is None:
            return
        owner = [] if session.owner is None else [session.owner]
        try:
            self._channel.send(Attach(session.id, bool(owner)), session.rings.fds() + owner)
        except ChannelClosed:
            self._wake_watcher()

    def _forget(self, session_id: int, reason: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return
            logger.info("session %d detached: %s", session_id, reason)
            self._send(Detach(session_id))  # in case the renderer has not noticed yet
            self._release(session)

    @staticmethod
    def _release(session: _Attached) -> None:
        session.rings.close()
        if session.owner is not None:
            os.close(session.owner)
            session.owner = None

    def _fail_swaps(self, exc: Exception) -> None:
        swaps, self._swaps = self._swaps, {}
        for future in swaps.values():
            if not future.done():
                future.set_exception(exc)

    def _remember_swap(self, future: Future[None], path: str) -> None:
        if not future.cancelled() and future.exception() is None:
            self._swapped_to = path

    def _wake_watcher(self) -> None:
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.ring()
