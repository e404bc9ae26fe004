"""Past the batch ceiling, a worker takes its accept queue in batches only while the queue stands
(its connections waited longer than the burst allowance); else one more per loop iteration."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from gateway.edge.site import ACCEPT_BATCH, queued_connections


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A real listening socket on loopback, non-blocking, nothing accepted from it yet."""
    server = socket.create_server(("127.0.0.1", 0), backlog=256)
    server.setblocking(False)
    yield server
    server.close()


def queue_clients(listener: socket.socket, count: int) -> list[socket.socket]:
    """`count` clients connected (the kernel completes each handshake) and waiting in the queue,
    each with a request written."""
    clients = [socket.create_connection(listener.getsockname()) for _ in range(count)]
    for client in clients:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    return clients


def test_with_room_up_to_the_room_and_one_more(listener: socket.socket) -> None:
    """A fresh queue (no connection waited past the allowance): the room, then one more."""
    clients = queue_clients(listener, 10)
    try:
        accepted = queued_connections(listener, room=3, standing_after=5.0)
        assert len(accepted) == 4
        assert all(not connection.getblocking() for connection in accepted)
        # Past the ceiling, no room: still one per call, so a queue never waits on the loop alone.
        assert len(queued_connections(listener, room=0, standing_after=5.0)) == 1
    finally:
        for connection in [*clients, *accepted]:
            connection.close()


def test_a_standing_queue_is_taken_in_a_batch_whatever_the_room(listener: socket.socket) -> None:
    """Connections that waited longer than the allowance: the whole queue, up to a batch."""
    clients = queue_clients(listener, 10)
    try:
        time.sleep(0.3)  # they wait in the queue past an allowance of 0.2 s
        accepted = queued_connections(listener, room=0, standing_after=0.2)
        assert len(accepted) == 10
    finally:
        for connection in [*clients, *accepted]:
            connection.close()


def test_a_batch_stops_at_the_first_connection_that_did_not_wait(
    listener: socket.socket,
) -> None:
    """Old connections first, then new ones: the batch ends after the first new one."""
    old = queue_clients(listener, 3)
    time.sleep(0.3)
    new = queue_clients(listener, 3)
    try:
        accepted = queued_connections(listener, room=0, standing_after=0.2)
        assert len(accepted) == 4  # the three that waited, and one that did not
    finally:
        for connection in [*old, *new, *accepted]:
            connection.close()


def test_a_batch_is_bounded(listener: socket.socket) -> None:
    """However long the queue stood, one call takes at most `ACCEPT_BATCH`."""
    clients = queue_clients(listener, ACCEPT_BATCH + 5)
    try:
        time.sleep(0.3)
        accepted = queued_connections(listener, room=0, standing_after=0.2)
        assert len(accepted) == ACCEPT_BATCH
    finally:
        for connection in [*clients, *accepted]:
            connection.close()
