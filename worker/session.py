"""The live session process: one room, one avatar, on uvloop.

``python -m worker.session --control-fd N`` is started by the dispatcher
(see :mod:`worker.dispatcher.messages` for the control channel).  The
process imports everything and attaches to the renderer *before* a join
arrives, so a spare is always warm.  Then::

    SPARE --Start--> JOINING --joined--> LIVE --agent left | room closed | idle | Stop--> LEAVING
      |                 |                                                                   |
      +--Stop / EOF-----+--join failed | join timed out | Stop---------------------------> ENDED

In LIVE, data flows ``room data channel -> AvatarAudioIn -> AvatarServer ->
renderer -> AvatarSynchronizer -> tracks -> room``; this process never runs
inference.  Every second it reports counters to the dispatcher.

:class:`LiveSession` is the part that does not care where it runs: tests
drive it in their own event loop with a :class:`~worker.transports.local.LocalRoomTransport`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from setproctitle import setproctitle

from .audio_in import AvatarAudioIn
from .dispatcher.messages import (
    Answer,
    ControlChannel,
    Ended,
    FirstFrame,
    Hello,
    Joined,
    Message,
    Offer,
    Prepare,
    Prepared,
    Start,
    Stats,
    Stop,
)
from .dispatcher.renderer_host import AttachedRenderer, attach_renderer
from .listeners import RoomListener
from .loop import run
from .server import AvatarServer
from .synchronizer import DEFAULT_JITTER_FRAMES
from .transports.base import JoinError, RoomTransport
from .types import AvatarSettings

logger = logging.getLogger("worker.session")


@dataclass
class SessionOptions:
    session_id: str
    participant_id: str
    settings: AvatarSettings
    jitter_frames: int = DEFAULT_JITTER_FRAMES
    join_timeout: float = 20.0
    idle_timeout: float = 300.0
    stats_interval: float = 1.0


class _ActivityListener(RoomListener):
    """Notes when a participant other than us sent anything (the idle timer)."""

    def __init__(self, on_message: Callable[[object], None]) -> None:
        super().__init__()
        self._on_message = on_message

    def on_data(self, data: dict) -> None:
        self._on_message(data.get("from") if isinstance(data, dict) else None)


class LiveSession:
    """Joins one room, runs the avatar in it, and leaves when it should."""

    def __init__(
        self,
        options: SessionOptions,
        transport: RoomTransport,
        attached: AttachedRenderer,
        report: Callable[[Message], None] | None = None,
    ) -> None:
        self.options = options
        self.transport = transport
        self.attached = attached
        self._report = report or (lambda message: None)
        self._stop = asyncio.Event()
        self._stop_reason = "stopped"
        self._last_activity = time.monotonic()
        self._offsets: list[float] = []
        self._fps_mark = (time.monotonic(), 0)  # (time, video ticks) of the last Stats
        self.audio_in: AvatarAudioIn | None = None
        self.server: AvatarServer | None = None
        self.started_at = time.monotonic()

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def run(self) -> Ended:
        """Join, play until something ends the session, leave; never raises."""
        self.started_at = time.monotonic()
        opts = self.options
        # Messages wait until the room has said who the agent is (or that it names none).
        self.audio_in = AvatarAudioIn(
            self_participant_id=opts.participant_id, hold_until_agent_known=True
        )
        self.server = AvatarServer(
            None,
            audio_recv=self.audio_in,
            video_gen=self.attached.renderer,
            options=opts.settings,
            jitter_frames=opts.jitter_frames,
        )
        self._hook_offsets()
        try:
            ended = await self._join()
            if ended is None:
                ended = await self._live()
        except Exception as exc:
            logger.exception("session failed")
            ended = Ended("error", f"{type(exc).__name__}: {exc}")
        finally:
            await self._leave()
        return ended

    async def _join(self) -> Ended | None:
        """None once joined; else why the session ended before it started."""
        opts = self.options
        # The listeners go in before the join starts: nothing the room sends while the SDK
        # is joining is lost.  The room names the agent through on_agent.
        join = asyncio.ensure_future(
            self.transport.join(
                participant_id=opts.participant_id,
                audio_track=self.server.audio_track,
                video_track=self.server.video_track,
                listeners=[self.audio_in.listener, _ActivityListener(self._on_activity)],
                on_agent=self.audio_in.set_agent,
            )
        )
        stop = asyncio.ensure_future(self._stop.wait())
        # The transport enforces the join timeout; the margin only guards a transport that hangs.
        done, _ = await asyncio.wait(
            {join, stop}, timeout=opts.join_timeout + 5, return_when=asyncio.FIRST_COMPLETED
        )
        stop.cancel()
        if join not in done:
            join.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await join
            if self._stop.is_set():
                return Ended(self._stop_reason)
            return Ended(
                "join timed out", f"the room was not joined within {opts.join_timeout:g} s"
            )
        try:
            meeting = join.result()
        except JoinError as exc:
            logger.warning("join failed: %s", exc)
            return Ended("join failed", str(exc))
        self.audio_in.set_meeting(meeting, attach=False)
        if self.transport.agent_id is None:
            self.audio_in.agent_unknown()  # the room named no agent: the first sender is
        await self.server.start()
        self._fps_mark = (time.monotonic(), 0)
        self._report(Joined(time.monotonic() - self.started_at))
        logger.info("joined room as %s", opts.participant_id)
        return None

    async def _live(self) -> Ended:
        watchers = [
            asyncio.ensure_future(self._first_frame()),
            asyncio.ensure_future(self._stats_loop()),
        ]
        waits = {
            asyncio.ensure_future(self._stop.wait()): "stop",
            asyncio.ensure_future(self.transport.closed.wait()): "transport",
            asyncio.ensure_future(self._idle()): "idle",
            asyncio.ensure_future(self.server.wait_for_complete()): "media",
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*watchers, *waits]:
                task.cancel()
            for task in [*watchers, *waits]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # When several happen at once, the first of stop, transport, idle, media names it.
        first = next(task for task in waits if task in done)
        kind = waits[first]
        if kind == "stop":
            return Ended(self._stop_reason)
        if kind == "transport":
            return Ended(self.transport.close_reason or "room closed", self.transport.close_detail)
        if kind == "idle":
            return Ended("idle", f"no message from the agent for {self.options.idle_timeout:g} s")
        error = first.exception() if not first.cancelled() else None
        return Ended(
            "error",
            f"the media pipeline stopped: {error!r}" if error else "the media pipeline stopped",
        )

    async def _leave(self) -> None:
        if self.server is not None:
            self._report(self._stats())  # before closing: closing flushes the playout
            with contextlib.suppress(Exception):
                await self.server.aclose()
        with contextlib.suppress(Exception):
            await self.transport.leave()

    # -- watchers -------------------------------------------------------------------------

    def _on_activity(self, sender: object) -> None:
        if sender == self.options.participant_id:
            return
        self._last_activity = time.monotonic()
        agent = self.audio_in.agent_participant_id if self.audio_in else None
        if agent is not None and self.transport.agent_id != agent:
            self.transport.set_agent(agent)

    async def _idle(self) -> None:
        timeout = self.options.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.server.av_sync.queued_frames:
                self._last_activity = time.monotonic()  # still playing what the agent sent
            if time.monotonic() - self._last_activity >= timeout:
                return

    async def _first_frame(self) -> None:
        await self.server.av_sync.first_tick.wait()
        self._report(FirstFrame(time.monotonic() - self.started_at))

    async def _stats_loop(self) -> None:
        interval = self.options.stats_interval
        while True:
            await asyncio.sleep(interval)
            self._report(self._stats())

    def _stats(self) -> Stats:
        if self.server is None:
            return Stats()
        now = time.monotonic()
        sync = self.server.av_sync
        s = sync.stats
        last_time, last_ticks = self._fps_mark
        fps = (s.video_ticks - last_ticks) / (now - last_time) if now > last_time else 0.0
        self._fps_mark = (now, s.video_ticks)
        offsets, self._offsets = self._offsets, []
        return Stats(
            fps=fps,
            frames_shown=s.frames_shown,
            frames_late=s.frames_held,
            frames_dropped=s.frames_dropped,
            stalls=s.stalls,
            interrupts=s.interrupts,
            segments=s.segments,
            playout_depth=sync.queued_frames,
            ring_depths=self.attached.ring_depths(),
            render_ms=self.attached.take_render_ms(),
            av_offset_ms=offsets,
            audio_in=dict(self.audio_in.stats) if self.audio_in is not None else {},
        )

    def _hook_offsets(self) -> None:
        """Record, for each speech frame shown, how far its tick is from its audio's start."""
        sync = self.server.av_sync
        rate = sync.sample_rate

        def shown(tick_position: int, audio_position: int) -> None:
            if len(self._offsets) < 1000:
                self._offsets.append((tick_position - audio_position) * 1000 / rate)

        sync.on_frame_shown = shown


# -- the process ---------------------------------------------------------------------------


def make_transport(start: Start) -> RoomTransport:
    if start.ice_addresses:
        from .ice import gather_on

        gather_on(start.ice_addresses)
    if start.transport == "local":
        from .transports.webrtc import WebRtcLoopbackTransport
        from .webrtc_loopback import restrict_ice_to_loopback

        restrict_ice_to_loopback()
        return WebRtcLoopbackTransport(join_timeout=start.join_timeout)
    if start.transport == "videosdk":
        from .transports.videosdk import VideoSdkTransport

        return VideoSdkTransport(start.join, join_timeout=start.join_timeout)
    raise ValueError(f"unknown transport {start.transport!r}")


async def _answer(session: LiveSession, channel: ControlChannel, offer: Offer) -> None:
    answer = getattr(session.transport, "answer", None)
    if answer is None:
        channel.send(
            Answer(offer.request_id, error="this session's transport takes no WebRTC offers")
        )
        return
    try:
        sdp, kind = await answer(offer.sdp, offer.type, offer.participant_id)
    except ValueError as exc:
        channel.send(Answer(offer.request_id, error=str(exc)))
        return
    channel.send(Answer(offer.request_id, sdp=sdp, type=kind))


async def _read_commands(session: LiveSession, channel: ControlChannel) -> None:
    answering: set[asyncio.Task] = set()
    while True:
        message = await channel.recv()
        if message is None:
            session.stop("dispatcher gone")
            return
        if isinstance(message, Stop):
            session.stop(message.reason)
        elif isinstance(message, Offer):
            task = asyncio.ensure_future(_answer(session, channel, message))
            answering.add(task)
            task.add_done_callback(answering.discard)


async def serve_control(fd: int) -> int:
    """Run one session as told over the control socket ``fd``; the process exit code."""
    channel = await ControlChannel.open(socket.socket(fileno=fd))
    channel.send(Hello(os.getpid()))
    prepare = await channel.recv()
    if not isinstance(prepare, Prepare):
        return 0
    logging.getLogger().setLevel(prepare.log_level.upper())
    logging.getLogger("aioice").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = AvatarSettings(
        video_width=prepare.width, video_height=prepare.height, video_fps=prepare.fps
    )
    async with attach_renderer(prepare.renderer, settings) as attached:
        channel.send(Prepared())
        start = await channel.recv()
        if not isinstance(start, Start):
            return 0
        _name_logs(start.session_id)
        setproctitle(session_title(start.join.room_name))
        options = SessionOptions(
            session_id=start.session_id,
            participant_id=start.join.participant_id,
            settings=settings,
            jitter_frames=prepare.jitter_frames,
            join_timeout=start.join_timeout,
            idle_timeout=start.idle_timeout,
        )
        session = LiveSession(options, make_transport(start), attached, channel.send)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, session.stop, "terminated")
        commands = asyncio.ensure_future(_read_commands(session, channel))
        ended = await session.run()
        commands.cancel()
        logger.info("session ended: %s%s", ended.reason, f" ({ended.error})" if ended.error else "")
        channel.send(ended)
        await channel.drain()
    await channel.aclose()
    return 0


SPARE_TITLE = "avatar-server session (spare)"


def session_title(room_name: str) -> str:
    """What ``ps`` and ``top`` show for a session in ``room_name`` (printable, bounded)."""
    room = "".join(c if c.isprintable() and not c.isspace() else "_" for c in room_name)
    return f"avatar-server session {room[:64] or '?'}"


def _name_logs(session_id: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s session {session_id} %(name)s: %(message)s"
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.session",
        description="One live avatar session; started by 'avatar-server serve', not by hand.",
    )
    parser.add_argument("--control-fd", type=int, required=True, help="inherited control socket")
    parser.add_argument("--parent-pid", type=int, help="exit with this process (the dispatcher)")
    args = parser.parse_args(argv)
    setproctitle(SPARE_TITLE)
    if args.parent_pid is not None and not _die_with_parent(args.parent_pid):
        return 0
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s session %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run(serve_control(args.control_fd))


def _die_with_parent(parent_pid: int) -> bool:
    """Get SIGTERM when the dispatcher dies, however it dies (Linux); False if it already has.

    SIGTERM makes a live session leave its room; a spare simply exits.
    """
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    return os.getppid() == parent_pid


def _warm_imports() -> Any:
    """Import what a join needs before one arrives (the transports pull in the SDKs)."""
    from .transports import videosdk, webrtc  # noqa: F401


if __name__ == "__main__":
    setproctitle(SPARE_TITLE)
    _warm_imports()
    sys.exit(main())
