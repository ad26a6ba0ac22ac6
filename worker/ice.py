"""Which local addresses WebRTC offers as ICE host candidates.

aioice gathers a candidate on every interface address except loopback.  A
multi-homed host may want media on one interface only, and a test that keeps
all traffic on the host needs 127.0.0.1, which aioice would skip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import aioice.ice

LOOPBACK = "127.0.0.1"
HostAddresses = Callable[..., list[str]]  # aioice.ice.get_host_addresses(use_ipv4, use_ipv6)


def host_addresses_on(addresses: Sequence[str]) -> HostAddresses:
    """An ``aioice.ice.get_host_addresses`` that answers ``addresses`` only."""
    chosen = list(addresses)

    def host_addresses(use_ipv4: bool = True, use_ipv6: bool = False) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    return host_addresses


def gather_on(addresses: Sequence[str]) -> None:
    """From now on, this process gathers ICE host candidates on ``addresses`` only."""
    aioice.ice.get_host_addresses = host_addresses_on(addresses)


@contextlib.contextmanager
def gathering_on(addresses: Sequence[str]) -> Iterator[None]:
    """:func:`gather_on` for the duration of a ``with`` block."""
    original = aioice.ice.get_host_addresses
    gather_on(addresses)
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original
