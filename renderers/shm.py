"""Anonymous shared memory and eventfd doorbells: the primitives under the rings.

Memory comes from ``memfd_create``: an anonymous file that lives exactly as
long as some process holds a descriptor or a mapping of it.  Nothing is ever
named under ``/dev/shm``, so a process that is SIGKILLed leaves nothing
behind: the kernel frees the memory when the last holder is gone.  A segment
reaches another process as a file descriptor, either inherited at spawn
(:class:`PassFd`) or sent over a Unix socket (``SCM_RIGHTS``, see
:mod:`renderers.control`).

Ordering: a producer writes the payload, then stores the index that
publishes it (one aligned 64-bit store through a ``memoryview`` cast to
``"Q"``); the consumer loads the index, then the payload.  On x86-64 stores
become visible in program order and aligned 64-bit stores are atomic, which
is all the rings rely on.

Wake-ups use ``eventfd`` counters (:class:`Doorbell`).  A doorbell is only a
hint that "something changed": the truth is always in the ring's indices, so
the waiting side re-reads the indices after every wake-up and spurious wakes
are harmless.  A doorbell is a plain file descriptor, so the renderer loop
waits on many of them with one ``epoll`` and an asyncio loop with
``loop.add_reader``; nothing sleeps and polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import select
import time
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen


class Segment:
    """A shared memory mapping backed by an anonymous memfd.

    ``buf`` is a memoryview of the whole segment, writable unless mapped with
    ``readonly=True`` (``PROT_READ``: a stray write faults instead of reaching
    the other processes).  ``fd`` stays open while the segment may still be
    handed to another process; a peer that only needs the mapping attaches
    with ``keep_fd=False`` and holds no descriptor.
    """

    def __init__(self, fd: int, *, keep_fd: bool = True, readonly: bool = False) -> None:
        size = os.fstat(fd).st_size
        if size <= 0:
            raise ValueError("shared memory segment is empty (was it created?)")
        self.size = size
        self._mmap = mmap.mmap(fd, size, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        self.buf = memoryview(self._mmap)
        self.fd: int | None = fd
        if not keep_fd:
            self.close_fd()

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close_fd(self) -> None:
        """Drop the descriptor but keep the mapping."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Unmap (as soon as no view of the memory is alive) and close the fd."""
        self.close_fd()
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            # A numpy view still points into the mapping; it is unmapped when
            # the last view is garbage collected.
            pass


class Doorbell:
    """An ``eventfd`` used as a wake-up signal between two processes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> Doorbell:
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def drain(self) -> bool:
        """Consume pending rings; ``True`` if there were any."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until rung (and consume it); ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            if self.drain():
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return False
            poller.poll(None if left is None else left * 1000)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Await a ring on the running event loop (``add_reader``); ``False`` on timeout."""
        if self.drain():
            return True
        loop = asyncio.get_running_loop()
        rung = loop.create_future()

        def on_readable() -> None:
            if not rung.done():
                rung.set_result(None)

        loop.add_reader(self.fd, on_readable)
        try:
            async with asyncio.timeout(timeout):
                await rung
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self.fd)
        self.drain()
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PassFd:
    """A file descriptor that travels to a process started with ``spawn``.

    Pickled while the child is being spawned, it adds the descriptor to the
    child's inherited set (same number in the child).  Outside a spawn it
    cannot be pickled; send the descriptor over a socket instead.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        if get_spawning_popen() is None:
            raise TypeError("PassFd can only be passed as an argument of a process being spawned")
        return _rebuild_pass_fd, (reduction.DupFd(self.fd),)


def _rebuild_pass_fd(dup) -> PassFd:
    return PassFd(dup.detach())


def close_fds(fds) -> None:
    """Close descriptors, ignoring ones that are already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
