"""The audio ring: session -> renderer, s16 PCM and segment ends, never dropped.

A single-producer/single-consumer byte ring in one memfd segment.  The session
writes records, the renderer reads them.  TTS arrives in bursts faster than
real time, so the ring is sized for minutes (default 5 min at 24 kHz mono,
about 14 MB, committed by the kernel only as it is touched) and a full ring
never overwrites: the writer gets told how much fitted and waits for space.

Memory layout (all integers little-endian; each group of header words sits in
its own 64-byte cache line because a different process writes it)::

    byte 0    | magic u32 | version u32 | capacity u64 | sample_rate u32 |   fixed at creation
    byte 64   | head u64  | epoch u64 |                   written by the session (producer)
    byte 128  | tail u64 |                                written by the renderer (consumer)
    byte 192  | generation u64 | floor_epoch u64 |        written by the supervisor
    byte 256  | data: ``capacity`` bytes, a ring of records ...                  |

``head`` and ``tail`` count bytes since creation and only grow; a record at
``n`` lives at ``data[n % capacity]``.  ``head - tail`` bytes are unread.

Record (16-byte header, payload padded to 16 bytes; a record never wraps)::

    | kind u32 | n_bytes u32 | epoch u64 | payload (n_bytes, then padding) |

    kind PCM          payload = n_bytes / 2 int16 mono samples
    kind SEGMENT_END  no payload: synthesis of the current segment finished
    kind WRAP         no payload: skip to the start of the data area

When fewer than 32 bytes are left before the end of the data area the writer
puts a WRAP record there; a long PCM chunk is split into several records
(PCM is a stream, so the reader sees the same samples).

State of the data area (positions modulo ``capacity``)::

    |  free  |##### unread records #####|  free  |
             ^ tail                      ^ head

    FREE ──session: write record(s) at head, then head += their size──▶ UNREAD
      ▲                                                                   │
      └──────────renderer: copy the record out, then tail += its size ◀──┘

    The session writes only while ``head - tail + size <= capacity`` (a full
    ring makes it wait, never overwrite); the renderer reads only while
    ``tail < head``.  Each index has one writer.

Epochs (interrupts, out of band): the session bumps ``epoch`` and rings the
data doorbell; every record carries the epoch in force when it was written.
The renderer discards records older than ``max(epoch, floor_epoch)`` along
with everything it derived from them.  ``floor_epoch`` and ``generation`` are
set by the supervisor when it replaces a crashed renderer: the new renderer
ignores what was written for the interrupted segment, and the session notices
``generation`` changed and starts its next segment in a fresh epoch.

Doorbells: ``data`` (session -> renderer: records or a new epoch) and
``space`` (renderer -> session: ``tail`` moved).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np

from .shm import Doorbell, Segment

MAGIC = 0x41554452  # "AUDR"
VERSION = 1
HEADER_BYTES = 256
RECORD_HEADER = 16
MAX_RECORD_PAYLOAD = 16 * 1024  # bytes; bounds how much one read hands the renderer
PCM, SEGMENT_END, WRAP = 1, 2, 3

_GEOMETRY = struct.Struct("<IIQI")
_RECORD = struct.Struct("<IIQ")
# Word indices (u64) into the header.
_HEAD, _EPOCH, _TAIL, _GENERATION, _FLOOR = 8, 9, 16, 24, 25


class RingFullError(TimeoutError):
    """The reader did not make room in time; nothing was dropped or overwritten."""


class RingCorruptError(RuntimeError):
    """The ring's memory does not hold what its writer is allowed to write."""


@dataclass(frozen=True, slots=True)
class AudioRecord:
    kind: int  # PCM or SEGMENT_END
    epoch: int
    pcm: np.ndarray | None  # int16 samples (a copy) for PCM records


def _align16(n: int) -> int:
    return (n + 15) & ~15


class AudioRing:
    """One audio ring; the session uses the writer methods, the renderer the reader ones."""

    def __init__(self, segment: Segment, data: Doorbell, space: Doorbell) -> None:
        self.segment, self.data_bell, self.space_bell = segment, data, space
        magic, version, capacity, sample_rate = _GEOMETRY.unpack_from(segment.buf, 0)
        if magic != MAGIC or version != VERSION:
            raise RingCorruptError("this memory is not an audio ring of this version")
        if capacity % 16 or HEADER_BYTES + capacity > segment.size:
            raise RingCorruptError(f"audio ring capacity {capacity} does not fit its segment")
        self.capacity, self.sample_rate = capacity, sample_rate
        self._words = segment.buf[:HEADER_BYTES].cast("Q")
        self._data = segment.buf[HEADER_BYTES : HEADER_BYTES + capacity]

    @classmethod
    def create(
        cls, sample_rate: int, seconds: float = 300.0, *, capacity: int | None = None
    ) -> AudioRing:
        """A new ring holding ``seconds`` of mono s16 audio (plus record headers).

        ``capacity`` sets the data area in bytes instead (tests use tiny rings).
        """
        if capacity is None:
            payload = int(sample_rate * seconds) * 2
            capacity = payload + payload // MAX_RECORD_PAYLOAD * RECORD_HEADER + 4096
        capacity = _align16(capacity)
        if capacity < 4 * RECORD_HEADER:
            raise ValueError(f"an audio ring needs at least {4 * RECORD_HEADER} bytes")
        segment = Segment.create("avatar-audio-ring", HEADER_BYTES + capacity)
        _GEOMETRY.pack_into(segment.buf, 0, MAGIC, VERSION, capacity, sample_rate)
        return cls(segment, Doorbell.create(), Doorbell.create())

    @classmethod
    def from_fds(cls, mem: int, data: int, space: int, *, keep_fd: bool = True) -> AudioRing:
        """Open a ring handed over as descriptors (takes ownership of them)."""
        return cls(Segment(mem, keep_fd=keep_fd), Doorbell(data), Doorbell(space))

    def fds(self) -> list[int]:
        if self.segment.fd is None:
            raise ValueError("this side of the ring gave its memory descriptor up")
        return [self.segment.fd, self.data_bell.fd, self.space_bell.fd]

    def close(self) -> None:
        self._words.release()
        self._data.release()
        self.segment.close()
        self.data_bell.close()
        self.space_bell.close()

    # -- shared state ----------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._words[_EPOCH]

    @property
    def floor_epoch(self) -> int:
        return self._words[_FLOOR]

    @property
    def generation(self) -> int:
        return self._words[_GENERATION]

    @property
    def unread_bytes(self) -> int:
        return self._words[_HEAD] - self._words[_TAIL]

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.unread_bytes

    # -- writer (session) ------------------------------------------------------
    def bump_epoch(self, at_least: int = 0) -> int:
        """Start a new epoch (interrupt); returns it.  Wakes the renderer."""
        epoch = max(self._words[_EPOCH] + 1, at_least)
        self._words[_EPOCH] = epoch
        self.data_bell.ring()
        return epoch

    def write_pcm(self, pcm: np.ndarray) -> int:
        """Write as many samples as fit right now; returns how many (0 when full)."""
        raw = memoryview(np.ascontiguousarray(pcm, dtype=np.int16).ravel()).cast("B")
        epoch = self._words[_EPOCH]
        head, tail = self._words[_HEAD], self._words[_TAIL]
        done = 0
        while done < len(raw):
            pos, free = head % self.capacity, self.capacity - (head - tail)
            room = self.capacity - pos
            if room < RECORD_HEADER + 16:
                if free < room:
                    break
                _RECORD.pack_into(self._data, pos, WRAP, 0, epoch)
                head += room
                continue
            n = min(len(raw) - done, MAX_RECORD_PAYLOAD, room - RECORD_HEADER, free - RECORD_HEADER)
            if n <= 0:
                break
            _RECORD.pack_into(self._data, pos, PCM, n, epoch)
            start = pos + RECORD_HEADER
            self._data[start : start + n] = raw[done : done + n]
            head += RECORD_HEADER + _align16(n)
            done += n
        if head != self._words[_HEAD]:
            self._words[_HEAD] = head  # publish after the payload is in place
            self.data_bell.ring()
        return done // 2

    def end_segment(self) -> bool:
        """Append a SEGMENT_END record; ``False`` when the ring is full."""
        head, tail = self._words[_HEAD], self._words[_TAIL]
        if self.capacity - (head - tail) < RECORD_HEADER:
            return False
        # Every record is 16-aligned, so 16 bytes always fit before the end.
        _RECORD.pack_into(self._data, head % self.capacity, SEGMENT_END, 0, self._words[_EPOCH])
        self._words[_HEAD] = head + RECORD_HEADER
        self.data_bell.ring()
        return True

    async def put_pcm(self, pcm: np.ndarray, timeout: float | None = None) -> None:
        """Write all of ``pcm``, awaiting space; :class:`RingFullError` after ``timeout``.

        If the epoch changes while it waits (an interrupt), the rest is stale
        and is not written.
        """
        rest = np.ascontiguousarray(pcm, dtype=np.int16).ravel()
        epoch = self._words[_EPOCH]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._words[_EPOCH] == epoch:
            rest = rest[self.write_pcm(rest) :]
            if not rest.size:
                return
            await self.space_bell.wait_async(self._time_left(deadline, timeout))

    async def put_segment_end(self, timeout: float | None = None) -> None:
        """Append a SEGMENT_END record, awaiting space (dropped if the epoch changes)."""
        epoch = self._words[_EPOCH]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._words[_EPOCH] == epoch and not self.end_segment():
            await self.space_bell.wait_async(self._time_left(deadline, timeout))

    def put_pcm_blocking(self, pcm: np.ndarray, timeout: float | None = None) -> None:
        """:meth:`put_pcm` for code without an event loop."""
        rest = np.ascontiguousarray(pcm, dtype=np.int16).ravel()
        epoch = self._words[_EPOCH]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._words[_EPOCH] == epoch:
            rest = rest[self.write_pcm(rest) :]
            if not rest.size:
                return
            self.space_bell.wait(self._time_left(deadline, timeout))

    def _time_left(self, deadline: float | None, timeout: float | None) -> float | None:
        """Seconds left to wait for space; raises once the deadline has passed."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._full_error(timeout)
        return left

    def _full_error(self, timeout: float | None) -> RingFullError:
        return RingFullError(
            f"the audio ring stayed full for {timeout:.1f} s: the renderer process is not "
            "reading (hung, or much slower than real time). Nothing was dropped."
        )

    # -- reader (renderer) -----------------------------------------------------
    def read(self) -> AudioRecord | None:
        """The next record (tail advances past it), or ``None`` when empty.

        Call :meth:`notify_space` after a run of reads so a waiting writer wakes.
        """
        while True:
            head, tail = self._words[_HEAD], self._words[_TAIL]
            if head == tail:
                return None
            if head - tail > self.capacity or tail % 16:
                raise RingCorruptError(f"audio ring indices are inconsistent ({head}, {tail})")
            pos = tail % self.capacity
            kind, n, epoch = _RECORD.unpack_from(self._data, pos)
            if kind == WRAP:
                self._words[_TAIL] = tail + self.capacity - pos
                continue
            size = RECORD_HEADER + _align16(n)
            if kind not in (PCM, SEGMENT_END) or n % 2 or size > head - tail:
                raise RingCorruptError(f"bad audio record (kind {kind}, {n} bytes)")
            pcm = None
            if kind == PCM:
                start = pos + RECORD_HEADER
                pcm = np.frombuffer(self._data[start : start + n], dtype=np.int16).copy()
            self._words[_TAIL] = tail + size
            return AudioRecord(kind, epoch, pcm)

    def notify_space(self) -> None:
        self.space_bell.ring()

    # -- supervisor ------------------------------------------------------------
    def mark_restart(self) -> int:
        """A renderer was replaced: records of the current epoch are void.

        Returns the new floor epoch; the session moves to it (or later) when it
        sees :attr:`generation` change.
        """
        floor = self._words[_EPOCH] + 1
        self._words[_FLOOR] = floor
        self._words[_GENERATION] += 1
        return floor
