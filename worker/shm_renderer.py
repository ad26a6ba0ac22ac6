"""``ShmRenderer``: the session's ``AvatarRenderer`` in front of the renderer process.

Audio pushed here goes into the session's audio ring; frames come back from
its frame ring.  For each speech slot the iterator yields a ``VideoFrame``
(yuv420p) then an ``AudioFrame`` (s16 mono, exactly the slot's samples), both
with ``pts`` = the slot's stream sample position and ``time_base`` =
``1/sample_rate``, and ``AudioSegmentEnd()`` after a slot flagged
``SEGMENT_END``.

The idle loop is not copied into the session: it lives once per renderer in
a shared segment (:mod:`renderers.idle_loop`) that this session maps
read-only.  :meth:`ShmRenderer.idle_frames` returns :class:`SharedIdleFrames`,
a sequence that builds the ``VideoFrame`` of an idle tick from the mapped
bytes when it is asked for (one frame's copy, the last one kept for a tick
that shows it again), from whatever generation is current, so a renderer
restart or a new avatar is picked up at the next idle tick.  An ``IDLE`` slot
in the frame ring (no frame) says the loop is published: :meth:`wait_ready`
waits for the first one.

``reset_stream()`` (interrupt) bumps the audio ring's epoch: the renderer
drops queued audio and work in flight, and slots of older epochs are dropped
here when they are read.  No round trip is needed.

A renderer restart (see :mod:`renderers.supervisor`) shows up as a new
``generation`` in the audio ring.  Frames the old process finished still play;
the segment it was working on ends there: its ``AudioSegmentEnd`` is yielded
when the agent's segment end arrives (or at once if it already had), the rest
of its audio is dropped, and the next segment renders on the new process in a
fresh epoch.  Exactly one ``AudioSegmentEnd`` per segment, as without a
restart.

This module imports the rings, never the renderer side (no torch, no models).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from av import AudioFrame, AudioResampler, VideoFrame

from models.timing import exact_fps
from renderers.control import SessionRings
from renderers.frame_ring import IDLE, SEGMENT_END, SPEECH
from renderers.idle_loop import IdleLoop
from renderers.supervisor import Supervisor

from .types import AudioSegmentEnd, AvatarRenderer, AvatarSettings

logger = logging.getLogger(__name__)

_END = AudioSegmentEnd()


class SharedIdleFrames(Sequence[VideoFrame]):
    """The renderer's idle loop as ``VideoFrame``s, built on demand from shared memory.

    ``frames[i]`` is frame ``i`` modulo the current loop's length (so a loop
    that changed length under an index still answers); only the last frame
    built is kept.  Empty while nothing is published or after :meth:`close`.
    """

    def __init__(self, loop: IdleLoop | None) -> None:
        self._loop = loop
        self._last: tuple[int, int, VideoFrame] | None = None  # generation, index, frame
        self.built = 0  # frames built from the mapping (a copy each)

    def __len__(self) -> int:
        return 0 if self._loop is None else len(self._loop)

    def __iter__(self) -> Iterator[VideoFrame]:
        for i in range(len(self)):  # __getitem__ wraps around: iterate by length
            yield self[i]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        loop = self._loop
        if loop is None:
            raise IndexError("no idle loop")
        count = len(loop)
        last = self._last
        if last is not None and count and (last[0], last[1]) == (loop.generation, index % count):
            return last[2]
        read = loop.read(index, self._build)
        if read is None:
            raise IndexError("no idle loop")
        self._last = read
        return read[2]

    def _build(self, image: np.ndarray) -> VideoFrame:
        self.built += 1
        return VideoFrame.from_ndarray(image, format="yuv420p")

    @property
    def generation(self) -> int:
        return 0 if self._loop is None else self._loop.generation

    def close(self) -> None:
        loop, self._loop, self._last = self._loop, None, None
        if loop is not None:
            loop.close()


class ShmRenderer(AvatarRenderer):
    """Feeds a session's audio ring and turns its frame ring back into av frames."""

    def __init__(
        self,
        rings: SessionRings,
        *,
        settings: AvatarSettings | None = None,
        supervisor: Supervisor | None = None,
        session_id: int | None = None,
        owns_supervisor: bool = False,
        write_timeout: float | None = None,
        idle: IdleLoop | None = None,
    ) -> None:
        g = rings.frames.geometry
        if settings is not None:
            wanted = (settings.video_width, settings.video_height, settings.audio_sample_rate)
            fps = exact_fps(settings.video_fps)
            if wanted != (g.width, g.height, g.sample_rate) or fps != g.fps:
                raise ValueError(
                    f"the avatar settings ask for {wanted[0]}x{wanted[1]} at "
                    f"{settings.video_fps:g} fps and {wanted[2]} Hz, but the renderer's rings "
                    f"carry {g.width}x{g.height} at {float(g.fps):g} fps and {g.sample_rate} Hz"
                )
            if settings.audio_channels != 1:
                raise ValueError("the renderer process takes mono audio (audio_channels=1)")
        self.rings = rings
        self.sample_rate = g.sample_rate
        self.write_timeout = write_timeout
        self._supervisor, self._session_id = supervisor, session_id
        self._owns_supervisor = owns_supervisor
        self._time_base = Fraction(1, self.sample_rate)
        self._epoch = rings.audio.epoch
        self._generation = rings.audio.generation
        self._out: deque[tuple[VideoFrame, AudioFrame] | AudioSegmentEnd] = deque()
        self._idle = SharedIdleFrames(idle)
        self._idle_ready = asyncio.Event()
        self._slots = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._segment_open = False  # audio pushed since the last segment end
        self._ends_in_flight = 0  # segment ends pushed, their end slot not read yet
        self._skip_until_end = False  # a restart voided the segment being pushed
        self._resampler: AudioResampler | None = None
        self._closed = False
        self.stale_slots = 0
        self.restarts_seen = 0

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_rings(
        cls,
        rings: SessionRings,
        *,
        settings: AvatarSettings | None = None,
        idle: IdleLoop | None = None,
    ) -> ShmRenderer:
        """For rings already attached to a renderer process (e.g. by the dispatcher), and
        that renderer's shared idle loop (mapped read-only; closed with this renderer).

        Await :meth:`wait_ready` before reading :meth:`idle_frames`.
        """
        return cls(rings, settings=settings, idle=idle)

    @classmethod
    async def open(
        cls,
        factory: str,
        kwargs: dict[str, Any] | None = None,
        *,
        settings: AvatarSettings | None = None,
        supervisor: Supervisor | None = None,
        ready_timeout: float = 60.0,
        **supervisor_options: Any,
    ) -> ShmRenderer:
        """Attach a new session to ``supervisor``'s renderer, or start a renderer process
        of its own (``factory(**kwargs)``, closed with this renderer)."""
        owns = supervisor is None
        if supervisor is None:
            supervisor = Supervisor(factory, kwargs, **supervisor_options)
            await asyncio.to_thread(supervisor.start)
        rings = session_id = idle = None
        try:
            info = supervisor.info
            assert info is not None
            idle = IdleLoop.from_fd(supervisor.idle_loop_fd())
            rings = SessionRings.create(
                width=info.width, height=info.height, fps=info.fps, sample_rate=info.sample_rate
            )
            renderer = cls(
                rings, settings=settings, supervisor=supervisor, owns_supervisor=owns, idle=idle
            )
            idle = None  # the renderer owns it now
            session_id = await asyncio.to_thread(supervisor.attach, rings)
            renderer._session_id = session_id
            await renderer.wait_ready(ready_timeout)
            return renderer
        except BaseException:
            if session_id is not None:
                supervisor.detach(session_id)
            if rings is not None:
                rings.close()
            if idle is not None:
                idle.close()
            if owns:
                await asyncio.to_thread(supervisor.close)
            raise

    async def wait_ready(self, timeout: float | None = 60.0) -> None:
        """Wait until the renderer has published its idle loop."""
        self._start_reader()
        try:
            async with asyncio.timeout(timeout):
                while not self._idle_ready.is_set() and not self._closed:
                    self._slots.clear()
                    self._read_slots()
                    if not self._idle_ready.is_set():
                        await self._slots.wait()
        except TimeoutError:
            raise TimeoutError(
                f"the renderer process published no idle loop within {timeout:.0f} s: "
                "is it running and attached to this session?"
            ) from None

    # -- AvatarRenderer ---------------------------------------------------------------
    async def push_stream_chunk(self, frame: AudioFrame | AudioSegmentEnd) -> None:
        if self._closed:
            return
        self._start_reader()
        self._check_restart()
        audio = self.rings.audio
        if isinstance(frame, AudioSegmentEnd):
            if self._skip_until_end:  # the restart already ended this segment's frames
                self._skip_until_end = False
                self._emit(_END)
                return
            self._segment_open = False
            self._ends_in_flight += 1
            await audio.put_segment_end(self.write_timeout)
            return
        if self._skip_until_end:
            return
        self._segment_open = True
        await audio.put_pcm(self._pcm(frame), self.write_timeout)

    def reset_stream(self) -> None:
        """Interrupt: a new epoch; queued frames and work in flight are dropped."""
        if self._closed:
            return
        self._epoch = self.rings.audio.bump_epoch()
        self._out.clear()
        self._segment_open = self._skip_until_end = False
        self._ends_in_flight = 0
        self._read_slots()  # free the ring's stale slots for the renderer at once

    def idle_frames(self) -> SharedIdleFrames:  # type: ignore[override]
        """The shared idle loop (not a copy: frames are built when they are shown)."""
        return self._idle

    def ring_depths(self) -> dict[str, int]:
        """Audio bytes the renderer has not read yet, frames this side has not read yet."""
        if self._closed:
            return {}
        return {"audio_bytes": self.rings.audio.unread_bytes, "frames": self.rings.frames.used}

    def __aiter__(self) -> AsyncIterator[VideoFrame | AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.rings.audio.bump_epoch()  # the renderer drops what is left; a waiting writer stops
        self.rings.audio.space_bell.ring()
        self._slots.set()
        if self._loop is not None:
            self._loop.remove_reader(self.rings.frames.ready_bell.fd)
        await asyncio.sleep(0)  # let our own waiters see the close
        if self._supervisor is not None and self._session_id is not None:
            await asyncio.to_thread(self._supervisor.detach, self._session_id)
        if self._owns_supervisor and self._supervisor is not None:
            await asyncio.to_thread(self._supervisor.close)
        self.rings.close()
        self._idle.close()

    # -- reading frames ---------------------------------------------------------------
    async def _frames(self) -> AsyncIterator[VideoFrame | AudioFrame | AudioSegmentEnd]:
        self._start_reader()
        while not self._closed:
            if self._out:
                item = self._out.popleft()
                if isinstance(item, AudioSegmentEnd):
                    yield item
                else:
                    yield item[0]
                    yield item[1]
                continue
            self._slots.clear()
            self._check_restart()
            self._read_slots()
            if not self._out:
                await self._slots.wait()

    def _start_reader(self) -> None:
        """Register the frame doorbell with the running loop (once)."""
        if self._loop is None and not self._closed:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.rings.frames.ready_bell.fd, self._on_ready_bell)

    def _on_ready_bell(self) -> None:
        self.rings.frames.ready_bell.drain()
        self._slots.set()

    def _emit(self, item: AudioSegmentEnd) -> None:
        self._out.append(item)
        self._slots.set()

    def _read_slots(self) -> None:
        """Copy the slots published so far out of the ring, keeping what is current.

        Bounded by the count on entry: a renderer refilling released slots while
        we read must not turn this into an unbounded copy (the ring's
        backpressure is what keeps the session's memory flat).
        """
        frames = self.rings.frames
        for _ in range(frames.used):
            slot = frames.peek()
            if slot is None:
                break
            if slot.flags & IDLE:  # the shared idle loop is published (pts: its generation)
                self._idle_ready.set()
            elif slot.epoch < self._epoch:
                self.stale_slots += 1
            else:
                if slot.flags & SPEECH:
                    self._out.append(
                        (self._video(slot.video, slot.pts), self._audio(slot.audio, slot.pts))
                    )
                if slot.flags & SEGMENT_END:
                    self._ends_in_flight = max(0, self._ends_in_flight - 1)
                    self._out.append(_END)
            del slot
            frames.release()

    def _check_restart(self) -> None:
        """Handle a renderer restart the supervisor announced in the audio ring."""
        audio = self.rings.audio
        if audio.generation == self._generation:
            return
        self._generation = audio.generation
        self.restarts_seen += 1
        self._read_slots()  # what the old process finished is still good
        self._epoch = audio.bump_epoch(at_least=audio.floor_epoch)
        self._out.extend([_END] * self._ends_in_flight)
        self._ends_in_flight = 0
        if self._segment_open:
            self._segment_open = False
            self._skip_until_end = True
        self._slots.set()
        logger.warning("renderer process was replaced; resuming with the next segment")

    def _video(self, image: np.ndarray, pts: int) -> VideoFrame:
        frame = VideoFrame.from_ndarray(image, format="yuv420p")
        frame.pts, frame.time_base = pts, self._time_base
        return frame

    def _audio(self, pcm: np.ndarray, pts: int) -> AudioFrame:
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1).copy(), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts, frame.time_base = pts, self._time_base
        return frame

    # -- audio in --------------------------------------------------------------------
    def _pcm(self, frame: AudioFrame) -> np.ndarray:
        """int16 mono samples at the ring's rate (converting if the frame is not)."""
        rate = frame.sample_rate or self.sample_rate
        if (
            frame.format.name in ("s16", "s16p")
            and frame.layout.nb_channels == 1
            and rate == self.sample_rate
        ):
            return frame.to_ndarray().reshape(-1)
        if self._resampler is None:
            self._resampler = AudioResampler("s16", "mono", self.sample_rate)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.int16)
