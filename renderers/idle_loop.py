"""The idle loop, once per renderer: one shared segment every session maps read-only.

The idle loop (the frames shown when nobody speaks, about 100 of them) is the
same for every session of a renderer, so it is kept once, in one memfd
segment (:mod:`renderers.shm`), instead of being sent to each session and
decoded there.  The renderer process writes it; each session maps the segment
read-only and copies one frame out of it at the tick that shows it.

Memory layout (little-endian)::

    byte 0    | magic u32 | version u32 | width u32 | height u32 | capacity u32 |
              | (pad u32) | frame_bytes u64 | bank_bytes u64 |           fixed at creation
    byte 64   | current u64 |   generation to show (0: nothing published yet)
    byte 128  | bank 0: seq u64 | generation u64 | frames u64 |
    byte 192  | bank 1: seq u64 | generation u64 | frames u64 |
    byte 256  | bank 0 frames: ``capacity`` I420 frames, each at a multiple of 64 bytes |
              | bank 1 frames (same size)                                              |

A frame is ``width * height * 3 / 2`` bytes of yuv420p (Y, then U, then V),
exactly as a frame ring slot holds it.  Generation ``g`` lives in bank
``g % 2``, so publishing a new loop never touches the bank sessions are
reading.  Pages are only allocated when written: an unused bank (before the
first republish) costs nothing.

Protocol (one writer, the renderer process; any number of readers).

Publish (:meth:`IdleLoop.publish`)::

    g = current + 1;  b = g % 2
    seq[b] |= 1                     odd: bank b is being written (it may be odd
                                    already: a renderer killed while publishing)
    frames, generation[b] = g, frames count
    seq[b] += 1                     even: bank b is complete
    current = g                     readers switch to it from their next frame

Read frame ``i`` (:meth:`IdleLoop.read`)::

    g = current;  b = g % 2;  s = seq[b]
    s odd, or generation[b] != g    ─▶ start again (a newer publish is under way)
    copy frame i % frames[b] out of bank b
    seq[b] != s                     ─▶ drop the copy, start again (torn)

A bank is rewritten only two publishes after it was current, so a retry is
rare (a reader that stalled through two republishes) and never returns a torn
frame.  Ordering is the rings' (x86-64: stores become visible in program
order, loads are not reordered with older loads, aligned 64-bit words are
atomic; see :mod:`renderers.shm`).

Who holds what: the :class:`~renderers.supervisor.Supervisor` creates the
segment when its first renderer process is ready and keeps it across
restarts; it hands every renderer process it starts the descriptor (control
message ``IdleSegment``), and that process publishes its idle loop at once
and again after every weight swap, so a restart or a new avatar shows up as a
new generation.  Sessions get their own read-only mapping (a descriptor
inherited at spawn, or a duplicate from the supervisor in their own
process).  After each publish the renderer puts one frameless ``IDLE`` slot
in every session's frame ring (``pts`` = the generation): that is how a
session knows the loop is there without polling.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Sequence
from multiprocessing.context import get_spawning_popen
from typing import TypeVar

import numpy as np

from .shm import PassFd, Segment

logger = logging.getLogger(__name__)

MAGIC = 0x49444C45  # "IDLE"
VERSION = 1
HEADER_BYTES = 256
MIN_CAPACITY = 256  # frames per bank: room for a longer loop after an avatar change

_GEOMETRY = struct.Struct("<IIIIIIQQ")
_CURRENT = 8  # u64 word index of ``current``
_BANK = (16, 24)  # u64 word index of each bank's ``seq`` (then generation, frames)
_RETRIES = 1000

T = TypeVar("T")


def _align64(n: int) -> int:
    return (n + 63) & ~63


class IdleLoop:
    """The shared idle loop; the renderer publishes, sessions :meth:`read`."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        fields = _GEOMETRY.unpack_from(segment.buf, 0)
        magic, version, width, height, capacity, _, frame_bytes, bank_bytes = fields
        if magic != MAGIC or version != VERSION:
            raise ValueError("this memory is not an idle loop of this version")
        if (
            frame_bytes != width * height * 3 // 2
            or bank_bytes != capacity * _align64(frame_bytes)
            or HEADER_BYTES + 2 * bank_bytes > segment.size
        ):
            raise ValueError("idle loop geometry does not match its segment")
        self.width, self.height, self.capacity = width, height, capacity
        self.frame_bytes, self._stride, self._bank_bytes = (
            frame_bytes,
            _align64(frame_bytes),
            bank_bytes,
        )
        self._words = segment.buf[:HEADER_BYTES].cast("Q")

    @classmethod
    def create(cls, width: int, height: int, capacity: int = MIN_CAPACITY) -> IdleLoop:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"I420 frames need positive even dimensions, got {width}x{height}")
        capacity = max(1, capacity)
        frame_bytes = width * height * 3 // 2
        bank_bytes = capacity * _align64(frame_bytes)
        segment = Segment.create("avatar-idle-loop", HEADER_BYTES + 2 * bank_bytes)
        _GEOMETRY.pack_into(
            segment.buf, 0, MAGIC, VERSION, width, height, capacity, 0, frame_bytes, bank_bytes
        )
        return cls(segment)

    @classmethod
    def from_fd(cls, fd: int, *, readonly: bool = True, keep_fd: bool = False) -> IdleLoop:
        """Map a segment handed over as a descriptor (takes ownership of it)."""
        try:
            segment = Segment(fd, keep_fd=keep_fd, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls(segment)
        except BaseException:
            segment.close()
            raise

    @property
    def fd(self) -> int:
        if self.segment.fd is None:
            raise ValueError("this mapping of the idle loop gave its descriptor up")
        return self.segment.fd

    @property
    def readonly(self) -> bool:
        return self.segment.buf.readonly

    def close(self) -> None:
        self._words.release()
        self.segment.close()

    def __reduce__(self):
        """Passed to a process being spawned, it arrives as a read-only mapping."""
        if get_spawning_popen() is None:
            raise TypeError("an IdleLoop can only be passed to a process being spawned")
        return _rebuild, (PassFd(self.fd),)

    # -- state -----------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The generation sessions show now (0 before the first publish)."""
        return self._words[_CURRENT]

    def __len__(self) -> int:
        """Frames in the current loop."""
        g = self._words[_CURRENT]
        return min(self._words[_BANK[g % 2] + 2], self.capacity) if g else 0

    def _frame_view(self, bank: int, index: int) -> np.ndarray:
        offset = HEADER_BYTES + bank * self._bank_bytes + index * self._stride
        frame = np.frombuffer(self.segment.buf, np.uint8, self.frame_bytes, offset)
        return frame.reshape(self.height * 3 // 2, self.width)

    # -- writer (renderer) -----------------------------------------------------------
    def publish(self, frames: Sequence[np.ndarray]) -> int:
        """Write a new loop into the bank nobody reads and make it current; its generation."""
        if self.readonly:
            raise ValueError("this mapping of the idle loop is read-only")
        if len(frames) > self.capacity:
            logger.warning(
                "the idle loop has %d frames; the shared segment holds %d: the rest is not shown",
                len(frames),
                self.capacity,
            )
            frames = frames[: self.capacity]
        words = self._words
        generation = words[_CURRENT] + 1
        bank = generation % 2
        seq = _BANK[bank]
        # Odd: being written.  ``| 1`` rather than ``+ 1``: a writer killed half-way (a
        # renderer restart) left it odd, and the bank was never made current.
        writing = words[seq] | 1
        words[seq] = writing
        shape = (self.height * 3 // 2, self.width)
        for i, frame in enumerate(frames):
            np.copyto(self._frame_view(bank, i), np.asarray(frame, np.uint8).reshape(shape))
        words[seq + 1] = generation
        words[seq + 2] = len(frames)
        words[seq] = writing + 1  # even: complete
        words[_CURRENT] = generation
        return generation

    # -- reader (session) ------------------------------------------------------------
    def read(self, index: int, build: Callable[[np.ndarray], T]) -> tuple[int, int, T] | None:
        """``(generation, i, build(frame i))`` with ``i = index`` modulo the loop's length.

        ``build`` gets a read-only view into shared memory and must copy what it
        keeps (e.g. ``VideoFrame.from_ndarray``); it may be called again if a
        republish overtook the read.  ``None`` while there is no loop.
        """
        words = self._words
        for _ in range(_RETRIES):
            generation = words[_CURRENT]
            if generation == 0:
                return None
            seq = _BANK[generation % 2]
            before = words[seq]
            if before & 1 or words[seq + 1] != generation:
                continue
            count = min(words[seq + 2], self.capacity)
            if count == 0:
                return None
            i = index % count
            result = build(self._frame_view(generation % 2, i))
            if words[seq] == before:
                return generation, i, result
        raise RuntimeError("the idle loop kept changing while it was read")


def _rebuild(fd: PassFd) -> IdleLoop:
    return IdleLoop.from_fd(fd.fd)
