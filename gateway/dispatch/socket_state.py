"""What the kernel knows of an upstream connection's socket that its transport does not say.

Two questions decide whether a keep-alive connection may be used, or a request sent again: is an
idle connection readable (the upstream's close, or bytes nobody asked for, are waiting), and did
the upstream close before the request's bytes reached it (then it never read them).
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import struct
import sys
from typing import Final

# The peer answered bytes sent after its close with a reset (EPIPE once its FIN was in).
_REFUSED_ERRORS: Final = frozenset({errno.ECONNRESET, errno.EPIPE})
# Linux `struct tcp_info`: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked.
_TCP_INFO_BYTES: Final = 104
_UNACKED_OFFSET: Final = 24
_HAS_TCP_INFO: Final = sys.platform == "linux" and hasattr(socket, "TCP_INFO")


def readable(transport: asyncio.Transport | None) -> bool:
    """Whether the connection's socket has something to read right now (data or its end); an
    idle keep-alive connection that has is not used again."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed underneath: nothing to reuse either
        return True


def request_refused(transport: asyncio.Transport | None) -> bool:
    """Whether the upstream closed before the request's bytes reached it, as the socket shows
    once the upstream's end arrived: its kernel reset the bytes that came after its close, or
    its close did not acknowledge all of them, or some were never sent at all.

    None of these can follow a request the upstream read: a close after reading acknowledges
    everything read, and a closed socket that read everything has nothing to reset.
    """
    if transport is None:
        return False
    if transport.get_write_buffer_size() > 0:
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in _REFUSED_ERRORS:
            return True
        if _HAS_TCP_INFO:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
            if len(info) >= _UNACKED_OFFSET + 4:
                (unacked,) = struct.unpack_from("I", info, _UNACKED_OFFSET)
                return bool(unacked)
    except OSError:
        return False
    return False
