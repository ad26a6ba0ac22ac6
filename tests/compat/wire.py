"""Frames on the loopback connection between a test and a bridged agent process.

Standard library only: imported by the test (Python 3.11+) and by
``agent_bridge.py`` running under Python 3.12.  One frame::

    +----------------+----------------+------------------+--------------+
    | header length  | body length    | header           | body         |
    | uint32, BE     | uint32, BE     | JSON object      | raw bytes    |
    +----------------+----------------+------------------+--------------+

The header's ``op`` says what the frame is:

==========  ===============  ==============================================================
op          direction        meaning
==========  ===============  ==============================================================
``send``    agent -> test    ``meeting.send(body, {"reliability": header["reliability"]})``
``data``    test -> agent    an ``on_data`` dict for the agent's listeners (payload = body)
``call``    test -> agent    ``await AvatarAudioOut.<header["method"]>(body?)``
``done``    agent -> test    the call with ``header["id"]`` returned
``hello``   test -> agent    first frame: ``header["avatar_id"]``, the avatar's participant id
``ack``     agent -> test    the agent's ack handler got ``stream_ended``
``close``   test -> agent    detach this agent and hang up
==========  ===============  ==============================================================

A payload is bytes or str; ``header["kind"]`` says which (str travels as UTF-8).
"""

from __future__ import annotations

import asyncio
import json
import struct

_LENGTHS = struct.Struct("!II")


def frame(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return _LENGTHS.pack(len(head), len(body)) + head + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    """The next frame; raises ``asyncio.IncompleteReadError`` when the peer hung up."""
    head_len, body_len = _LENGTHS.unpack(await reader.readexactly(_LENGTHS.size))
    header = json.loads(await reader.readexactly(head_len))
    return header, await reader.readexactly(body_len)


def pack_payload(payload: bytes | str) -> tuple[str, bytes]:
    if isinstance(payload, str):
        return "str", payload.encode("utf-8")
    return "bytes", bytes(payload)


def unpack_payload(kind: str, body: bytes) -> bytes | str:
    return body.decode("utf-8") if kind == "str" else body
