"""The renderer process: one frame renderer serving many sessions through rings.

Started with the ``spawn`` method by :class:`~renderers.supervisor.Supervisor`.
It builds its :class:`~renderers.base.FrameRenderer` once, from an importable
factory (``"package.module:callable"`` plus keyword arguments), so models
load once; then it serves every attached session (one ring pair and one
:class:`~renderers.base.RenderStream` each) until told to shut down or until
its supervisor disappears (end-of-file on the control socket).

One turn of the loop::

    heartbeat ─▶ control messages ─▶ per session: follow the epoch, read audio
    into render jobs, write idle-loop notices and frameless segment ends ─▶ pick
    a batch (earliest deadline first, across sessions) ─▶ render it straight
    into the sessions' free frame ring slots ─▶ publish each slot with its audio
    ─▶ nothing to do?  wait on every doorbell, the control socket and the
       sessions' pidfds (epoll), at most one heartbeat interval

Deadlines: a session plays one frame per frame interval, so the ``k``-th
queued job of a session whose frame ring already holds ``f`` frames is needed
``f + k`` frame intervals from now.  The batch takes the smallest of these
across sessions, at most ``renderer.max_batch`` jobs, and never more for a
session than its frame ring has free slots: a session that does not read its
frames only stalls itself.

Interrupts: a session's epoch (``max(epoch, floor_epoch)`` of its audio ring)
is checked every turn and again after every render; audio records and jobs of
an older epoch are discarded, rendered frames of an older epoch are not
written (the slot they were drawn into stays free).

Frames are composed straight into shared memory: each job of a batch gets a
view of the free slot it will be published in
(:meth:`~renderers.frame_ring.FrameRing.slots_for_write`) and the renderer
writes the frame there (:meth:`~renderers.base.FrameRenderer.render_into`),
so a frame is never built in a temporary and copied.

Idle frames cost no inference and are not sent per session: the renderer
writes its idle loop once into the shared :class:`~renderers.idle_loop.IdleLoop`
segment its supervisor hands it (``IdleSegment``), again after a weight swap,
and tells each session with one frameless ``IDLE`` slot (at attach and after
each publish).
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from setproctitle import setproctitle

from models.timing import exact_fps

from .audio_ring import PCM, RingCorruptError
from .base import FrameRenderer, RenderJob, RenderStream
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
from .factory import load_factory
from .frame_ring import IDLE, SEGMENT_END, SPEECH, samples_per_frame_max
from .idle_loop import IdleLoop
from .shm import PassFd, close_fds

logger = logging.getLogger(__name__)

_END = object()  # queue entry: a segment end with no frame (the segment had no audio)


@dataclass(eq=False)
class _Session:
    id: int
    rings: SessionRings
    stream: RenderStream
    order: int  # attach order, the tie-break between equal deadlines
    epoch: int
    owner: int | None = None  # pidfd of the session process
    queue: deque = field(default_factory=deque)  # RenderJob | _END, all of ``epoch``
    idle_notice: bool = True  # an IDLE slot (the loop's generation) is still to send

    def current_epoch(self) -> int:
        audio = self.rings.audio
        return max(audio.epoch, audio.floor_epoch)

    def restart(self, epoch: int) -> None:
        self.stream.reset()
        self.queue.clear()
        self.epoch = epoch


class RenderLoop:
    def __init__(
        self,
        renderer: FrameRenderer,
        channel: ControlChannel,
        status: StatusBlock,
        heartbeat_interval: float = 0.05,
    ) -> None:
        self.renderer, self.channel, self.status = renderer, channel, status
        self.heartbeat_interval = heartbeat_interval
        self.max_batch = max(1, int(getattr(renderer, "max_batch", 1)))
        self.sessions: dict[int, _Session] = {}
        self._idle = [np.ascontiguousarray(f) for f in renderer.idle_frames()]
        self.idle_loop: IdleLoop | None = None  # shared with every session (IdleSegment)
        self._fps = exact_fps(renderer.fps)
        self._order = itertools.count()
        self._running = True
        self._selector = selectors.DefaultSelector()
        self._selector.register(channel.sock, selectors.EVENT_READ, ("control", None))

    def ready_message(self) -> Ready:
        r = self.renderer
        return Ready(
            pid=os.getpid(),
            width=r.width,
            height=r.height,
            fps=float(r.fps),
            sample_rate=r.sample_rate,
            max_batch=self.max_batch,
            idle_frames=len(self._idle),
        )

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        while self._running:
            self.status.beat()
            if not self._handle_control():
                break
            for session in list(self.sessions.values()):
                try:
                    self._pump(session)
                except RingCorruptError as exc:
                    self._drop(session, f"its audio ring is corrupt: {exc}")
                except Exception as exc:  # one session's bad stream must not stop the others
                    logger.exception("session %d failed", session.id)
                    self._drop(session, f"its audio could not be processed: {exc}")
            batch = self._pick_batch()
            if batch:
                self._render(batch)
            else:
                self._wait()

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._drop(session, None)
        self._selector.close()
        if self.idle_loop is not None:
            self.idle_loop.close()
            self.idle_loop = None
        self.renderer.close()

    def _wait(self) -> None:
        gone = []
        for key, _ in self._selector.select(self.heartbeat_interval):
            kind, obj = key.data
            if kind == "bell":
                obj.drain()
            elif kind == "owner":
                gone.append(obj)
        for session in gone:  # after draining: dropping closes the session's doorbells
            if session.id in self.sessions:
                self._drop(session, "the session process exited")

    # -- control ---------------------------------------------------------------
    def _handle_control(self) -> bool:
        """Handle every pending message; ``False`` once the loop must stop."""
        while self._running:
            try:
                received = self.channel.recv(timeout=0)
            except ChannelClosed:
                logger.info("supervisor gone; renderer exiting")
                return False
            if received is None:
                return True
            msg, fds = received
            if isinstance(msg, Attach):
                self._attach(msg, fds)
                continue
            if isinstance(msg, IdleSegment):
                self._use_idle_segment(fds)
                continue
            close_fds(fds)
            if isinstance(msg, Detach):
                if msg.session_id in self.sessions:
                    self._drop(self.sessions[msg.session_id], None)
            elif isinstance(msg, SwapWeights):
                result = self._swap(msg)
                if result.ok:  # the avatar (and so its idle loop) may have changed
                    self._idle = [np.ascontiguousarray(f) for f in self.renderer.idle_frames()]
                    self._publish_idle()
                self.channel.send(result)
            elif isinstance(msg, Shutdown):
                self._running = False
            else:
                logger.warning("unexpected control message %r", msg)
        return False

    def _attach(self, msg: Attach, fds: list[int]) -> None:
        n = SessionRings.N_FDS
        ring_fds = fds[:n]
        owner = fds[n] if msg.has_owner and len(fds) > n else None
        close_fds(fds[n + (owner is not None) :])
        owner_fds = [] if owner is None else [owner]
        if msg.session_id in self.sessions:
            close_fds(ring_fds + owner_fds)
            self.channel.send(Detached(msg.session_id, "a session with this id is attached"))
            return
        try:
            rings = SessionRings.from_fds(ring_fds, keep_fd=False)
        except (ValueError, OSError) as exc:
            close_fds(owner_fds)
            self.channel.send(Detached(msg.session_id, f"its rings cannot be opened: {exc}"))
            return
        if (problem := self._geometry_problem(rings)) is not None:
            rings.close()
            close_fds(owner_fds)
            self.channel.send(Detached(msg.session_id, problem))
            return
        session = _Session(msg.session_id, rings, self.renderer.open_stream(), next(self._order), 0)
        session.epoch = session.current_epoch()
        session.owner = owner
        self.sessions[session.id] = session
        for bell in (rings.audio.data_bell, rings.frames.free_bell):
            self._selector.register(bell.fd, selectors.EVENT_READ, ("bell", bell))
        if owner is not None:
            self._selector.register(owner, selectors.EVENT_READ, ("owner", session))
        self.status.words[StatusBlock.SESSIONS] = len(self.sessions)

    def _use_idle_segment(self, fds: list[int]) -> None:
        close_fds(fds[1:])
        if not fds:
            logger.warning("IdleSegment without a descriptor")
            return
        try:
            loop = IdleLoop.from_fd(fds[0], readonly=False)
        except (ValueError, OSError) as exc:
            logger.error("the idle loop segment cannot be opened: %s", exc)
            return
        r = self.renderer
        if (loop.width, loop.height) != (r.width, r.height):
            logger.error(
                "the idle loop segment is %dx%d, the renderer draws %dx%d",
                *(loop.width, loop.height, r.width, r.height),
            )
            loop.close()
            return
        if self.idle_loop is not None:
            self.idle_loop.close()
        self.idle_loop = loop
        self._publish_idle()

    def _publish_idle(self) -> None:
        if self.idle_loop is None:
            return
        self.idle_loop.publish(self._idle)
        for session in self.sessions.values():
            session.idle_notice = True

    def _geometry_problem(self, rings: SessionRings) -> str | None:
        r, g = self.renderer, rings.frames.geometry
        if (g.width, g.height) != (r.width, r.height):
            return f"its frames are {g.width}x{g.height}, the renderer draws {r.width}x{r.height}"
        if rings.audio.sample_rate != r.sample_rate or g.sample_rate != r.sample_rate:
            return f"its audio is {rings.audio.sample_rate} Hz, the renderer's {r.sample_rate} Hz"
        if g.fps != self._fps:
            return f"its frame rate is {float(g.fps):g} fps, the renderer's {float(r.fps):g}"
        if g.max_audio < samples_per_frame_max(r.sample_rate, self._fps):
            return "its frame slots are too small for one frame of audio"
        return None

    def _drop(self, session: _Session, reason: str | None) -> None:
        self.sessions.pop(session.id, None)
        for fd in (
            session.rings.audio.data_bell.fd,
            session.rings.frames.free_bell.fd,
            session.owner,
        ):
            if fd is not None:
                self._selector.unregister(fd)
        session.rings.close()
        if session.owner is not None:
            os.close(session.owner)
            session.owner = None
        self.status.words[StatusBlock.SESSIONS] = len(self.sessions)
        if reason is not None:
            logger.info("dropped session %d: %s", session.id, reason)
            try:
                self.channel.send(Detached(session.id, reason))
            except ChannelClosed:
                pass

    def _swap(self, msg: SwapWeights) -> SwapResult:
        swap = getattr(self.renderer, "swap_weights", None)
        if swap is None:
            error = f"{type(self.renderer).__name__} does not support swapping weights"
            return SwapResult(msg.request_id, False, error)
        with _KeepBeating(self.status, self.heartbeat_interval):
            try:
                swap(msg.path)
            except Exception as exc:
                logger.warning("weight swap to %s failed: %s", msg.path, exc)
                return SwapResult(msg.request_id, False, str(exc) or type(exc).__name__)
        return SwapResult(msg.request_id, True)

    # -- audio in, frames out --------------------------------------------------
    def _pump(self, s: _Session) -> None:
        """Follow the epoch, turn queued audio into jobs, send what needs no inference."""
        current = s.current_epoch()
        if current != s.epoch:
            s.restart(current)
        audio, frames = s.rings.audio, s.rings.frames
        # Jobs held here are bounded; the rest of the audio waits in the ring.
        limit = frames.geometry.slots + self.max_batch
        consumed = False
        while len(s.queue) < limit and (record := audio.read()) is not None:
            consumed = True
            if record.epoch < s.epoch:
                continue
            if record.epoch > s.epoch:  # bumped after we looked at the header
                s.restart(record.epoch)
            if record.kind == PCM:
                s.queue.extend(s.stream.push(record.pcm))
            else:
                s.queue.extend(s.stream.end_segment() or [_END])
        if consumed:
            audio.notify_space()
        generation = 0 if self.idle_loop is None else self.idle_loop.generation
        if s.idle_notice and generation and frames.free_slots:
            frames.write(None, None, epoch=s.epoch, pts=generation, flags=IDLE)
            s.idle_notice = False
        while s.queue and s.queue[0] is _END and frames.free_slots:
            s.queue.popleft()
            frames.write(None, None, epoch=s.epoch, pts=0, flags=SEGMENT_END)

    def _pick_batch(self) -> list[tuple[_Session, RenderJob]]:
        """Earliest deadline first across sessions, at most ``max_batch`` jobs."""
        candidates = []
        for s in self.sessions.values():
            ahead = s.rings.frames.used
            room = min(s.rings.frames.free_slots, self.max_batch)
            for k, item in enumerate(itertools.islice(s.queue, room)):
                if item is _END:
                    break
                candidates.append((ahead + k, s.order, k, s))
        candidates.sort(key=lambda c: c[:3])
        taken: dict[_Session, int] = {}
        for *_, s in candidates[: self.max_batch]:
            taken[s] = taken.get(s, 0) + 1
        # Each session's share is a prefix of its queue (k grows with the deadline).
        return [(s, s.queue.popleft()) for s, n in taken.items() for _ in range(n)]

    def _render(self, batch: list[tuple[_Session, RenderJob]]) -> None:
        epochs = [s.epoch for s, _ in batch]
        # Each job is drawn straight into the free slot it will be published in: a
        # session's jobs are a prefix of its queue and take its next free slots in order.
        slots: dict[_Session, list[tuple[np.ndarray, np.ndarray]]] = {}
        for s, _ in batch:
            if s not in slots:
                n = sum(1 for t, _ in batch if t is s)
                reserved = s.rings.frames.slots_for_write(n)
                if reserved is None:
                    raise RuntimeError("frame ring full although a slot was reserved")
                slots[s] = reserved
        taken = {s: iter(views) for s, views in slots.items()}
        targets = [next(taken[s]) for s, _ in batch]
        self.renderer.render_into([job for _, job in batch], [video for video, _ in targets])
        words = self.status.words
        words[StatusBlock.FRAMES] += len(batch)
        words[StatusBlock.RENDER_CALLS] += 1
        for (s, job), epoch, (_, audio) in zip(batch, epochs, targets, strict=True):
            if s.id not in self.sessions or s.current_epoch() != epoch or s.epoch != epoch:
                words[StatusBlock.STALE] += 1  # interrupted while it was being drawn
                continue
            flags = SPEECH | (SEGMENT_END if job.span.segment_end else 0)
            span = job.span
            n_audio = len(span.audio)
            audio[:n_audio] = span.audio
            s.rings.frames.publish(epoch=epoch, pts=span.pts, flags=flags, n_audio=n_audio)


class _KeepBeating:
    """Keeps the heartbeat going during a long, legitimate call (loading weights)."""

    def __init__(self, status: StatusBlock, interval: float) -> None:
        self.status, self.interval = status, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            self.status.beat()

    def __enter__(self) -> _KeepBeating:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()


def _device_label(renderer: Any) -> str:
    """``cpu`` or ``gpu N``: where the renderer's model runs, for ``ps`` and ``top``."""
    device = str(getattr(getattr(renderer, "backend", None), "device", "cpu"))
    if device.startswith("cuda"):
        return f"gpu {device.partition(':')[2] or 0}"
    return "cpu"


def main(
    factory: str,
    kwargs: dict[str, Any],
    control: socket.socket,
    status_fd: PassFd,
    heartbeat_interval: float = 0.05,
) -> None:
    """Entry point of the renderer process (the ``spawn`` target)."""
    setproctitle("avatar-server renderer")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    logging.basicConfig(level=logging.INFO, format=f"renderer[{os.getpid()}] %(message)s")
    channel = ControlChannel(control)
    status = StatusBlock.from_fd(status_fd.fd)
    status.words[StatusBlock.PID] = os.getpid()
    status.beat()
    try:
        renderer = load_factory(factory)(**kwargs)
    except Exception as exc:
        logger.exception("could not build the renderer")
        channel.send(StartFailed(f"could not build the renderer {factory!r}: {exc}"))
        raise SystemExit(1) from None
    setproctitle(f"avatar-server renderer [{_device_label(renderer)}]")
    loop = RenderLoop(renderer, channel, status, heartbeat_interval)
    status.beat()  # building may have taken longer than the hang timeout
    channel.send(loop.ready_message())
    try:
        loop.run()
    finally:
        loop.close()
        channel.close()
        status.close()
