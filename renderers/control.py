"""The control channel between a supervisor and its renderer process.

Everything that is not a stream of samples or frames goes here: attaching and
detaching sessions (with their ring descriptors), weight swaps,
shutdown, and the renderer's replies.  Messages are msgspec structs encoded
as msgpack, one per datagram on a ``SOCK_SEQPACKET`` Unix socket pair, so
descriptors sent with ``SCM_RIGHTS`` stay attached to the message that names
them.  End-of-file on the socket means the peer process is gone.

Also here: :class:`SessionRings` (the ring pair an ``Attach`` hands over) and
:class:`StatusBlock` (the renderer's heartbeat and counters in shared memory).
"""

from __future__ import annotations

import array
import os
import select
import socket
import time
from fractions import Fraction
from multiprocessing.context import get_spawning_popen

import msgspec

from .audio_ring import AudioRing
from .frame_ring import FrameRing
from .shm import PassFd, Segment, close_fds

# -- messages: supervisor -> renderer ------------------------------------------


class Attach(msgspec.Struct, tag=True):
    """Serve a session.  Descriptors: the session's six ring fds, then its pidfd if any."""

    session_id: int
    has_owner: bool = False  # a pidfd of the session process follows the ring fds


class Detach(msgspec.Struct, tag=True):
    session_id: int


class SwapWeights(msgspec.Struct, tag=True):
    request_id: int
    path: str


class Shutdown(msgspec.Struct, tag=True):
    pass


class IdleSegment(msgspec.Struct, tag=True):
    """Publish your idle loop here (and after every weight swap).  Descriptor: the
    :class:`~renderers.idle_loop.IdleLoop` segment, shared by every session."""


# -- messages: renderer -> supervisor ------------------------------------------


class Ready(msgspec.Struct, tag=True):
    """The renderer is built and serving; what it draws."""

    pid: int
    width: int
    height: int
    fps: float
    sample_rate: int
    max_batch: int
    idle_frames: int


class StartFailed(msgspec.Struct, tag=True):
    error: str


class SwapResult(msgspec.Struct, tag=True):
    request_id: int
    ok: bool
    error: str = ""


class Detached(msgspec.Struct, tag=True):
    """The renderer stopped serving a session on its own (peer died, bad rings)."""

    session_id: int
    reason: str


Message = (
    Attach
    | Detach
    | SwapWeights
    | Shutdown
    | IdleSegment
    | Ready
    | StartFailed
    | SwapResult
    | Detached
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_MAX_MESSAGE = 64 * 1024
_MAX_FDS = 16
_FD_SIZE = array.array("i").itemsize


class ChannelClosed(ConnectionError):
    """The process at the other end of the control channel is gone."""


class ControlChannel:
    """One end of the control socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[ControlChannel, socket.socket]:
        """This end, and the raw socket to hand to the child process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        data = _encoder.encode(message)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed("the renderer control channel is closed") from exc

    def recv(self, timeout: float | None = None) -> tuple[Message, list[int]] | None:
        """The next message and its descriptors; ``None`` on timeout.

        Raises :class:`ChannelClosed` when the peer has gone away.
        """
        # The socket stays blocking (senders on other threads rely on it); waiting
        # is done with poll and the receive itself never blocks.
        if timeout != 0:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(None if timeout is None else timeout * 1000):
                return None
        try:  # (socket.recv_fds would ignore these flags)
            data, ancillary, flags, _ = self.sock.recvmsg(
                _MAX_MESSAGE,
                socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE),
                socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT,
            )
        except BlockingIOError:
            return None
        except ConnectionResetError as exc:
            raise ChannelClosed("the control channel peer is gone") from exc
        received = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
        fds = list(received)
        if not data:
            close_fds(fds)
            raise ChannelClosed("the control channel peer is gone")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise ValueError("control message truncated (too large or too many descriptors)")
        try:
            return _decoder.decode(data), fds
        except msgspec.DecodeError:
            close_fds(fds)
            raise

    def close(self) -> None:
        self.sock.close()


class SessionRings:
    """The ring pair of one session: audio in, frames out.

    The side that creates it owns it; the other side gets the descriptors,
    either as an ``Attach`` (:meth:`fds` / :meth:`from_fds`) or, for a session
    process started with ``spawn``, by passing the object as a process
    argument (its descriptors are inherited).
    """

    N_FDS = 6

    def __init__(self, audio: AudioRing, frames: FrameRing) -> None:
        self.audio, self.frames = audio, frames

    @classmethod
    def create(
        cls,
        *,
        width: int,
        height: int,
        fps: float | Fraction,
        sample_rate: int,
        slots: int = 16,
        audio_seconds: float = 300.0,
    ) -> SessionRings:
        audio = AudioRing.create(sample_rate, audio_seconds)
        try:
            frames = FrameRing.create(
                width=width, height=height, fps=fps, sample_rate=sample_rate, slots=slots
            )
        except BaseException:
            audio.close()
            raise
        return cls(audio, frames)

    def fds(self) -> list[int]:
        return self.audio.fds() + self.frames.fds()

    @classmethod
    def from_fds(cls, fds: list[int], *, keep_fd: bool = True) -> SessionRings:
        """Open rings from descriptors (takes ownership; all are closed on failure)."""
        if len(fds) != cls.N_FDS:
            close_fds(fds)
            raise ValueError(f"a session's rings need {cls.N_FDS} descriptors, got {len(fds)}")
        try:
            audio = AudioRing.from_fds(*fds[:3], keep_fd=keep_fd)
        except BaseException:
            close_fds(fds)
            raise
        try:
            frames = FrameRing.from_fds(*fds[3:], keep_fd=keep_fd)
        except BaseException:
            audio.close()
            close_fds(fds[3:])
            raise
        return cls(audio, frames)

    def dup(self) -> SessionRings:
        """An independent handle on the same rings (own descriptors and mappings)."""
        return SessionRings.from_fds([os.dup(fd) for fd in self.fds()])

    def close(self) -> None:
        self.audio.close()
        self.frames.close()

    def __reduce__(self):
        if get_spawning_popen() is None:
            raise TypeError("SessionRings can only be passed to a process being spawned")
        return _rebuild_rings, tuple(PassFd(fd) for fd in self.fds())


def _rebuild_rings(*fds: PassFd) -> SessionRings:
    return SessionRings.from_fds([fd.fd for fd in fds])


class StatusBlock:
    """Heartbeat and counters the renderer writes and its supervisor reads.

    One page of shared memory, u64 words::

        0 heartbeat_ns (CLOCK_MONOTONIC, written every loop turn)   1 pid
        2 sessions   3 frames rendered   4 render calls   5 stale frames discarded
    """

    HEARTBEAT, PID, SESSIONS, FRAMES, RENDER_CALLS, STALE = range(6)
    _FIELDS = ("heartbeat_ns", "pid", "sessions", "frames", "render_calls", "stale_frames")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.words = segment.buf[:64].cast("Q")

    @classmethod
    def create(cls) -> StatusBlock:
        return cls(Segment.create("avatar-renderer-status", 4096))

    @classmethod
    def from_fd(cls, fd: int) -> StatusBlock:
        return cls(Segment(fd, keep_fd=False))

    @property
    def fd(self) -> int:
        assert self.segment.fd is not None
        return self.segment.fd

    def beat(self) -> None:
        self.words[self.HEARTBEAT] = time.monotonic_ns()

    @property
    def heartbeat_ns(self) -> int:
        return self.words[self.HEARTBEAT]

    def reset(self) -> None:
        for i in range(len(self._FIELDS)):
            self.words[i] = 0

    def snapshot(self) -> dict[str, int]:
        return {name: self.words[i] for i, name in enumerate(self._FIELDS)}

    def close(self) -> None:
        self.words.release()
        self.segment.close()
