"""The listening side of a worker: a TCP site whose connections get `ConnectionLimits`.

Under the worker's connection cap each accepted connection gets a `GuardedRequestHandler`; over
it, up to `PROBE_RESERVE` more are served for health and readiness probes only (anything else
gets 503), and past those a `RefusingProtocol` answers 503 and closes. Queued connections are
accepted in batches (see `ACCEPT_BATCH`), and a stopping site serves the connections the kernel
had already queued instead of resetting them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from typing import cast

import structlog
from aiohttp import web

from gateway.edge.connections import (
    CONNECTION_CAP_MESSAGE,
    LINGER_SECONDS,
    Admission,
    ConnectionLimits,
    GuardedRequestHandler,
    kernel_wait,
    raw_error_response,
)

logger = structlog.get_logger("gateway.edge.site")

# libuv (under uvloop) accepts one connection per loop iteration, and a busy worker's iterations
# are long: a burst of new connections would wait in the kernel's accept queue for seconds, where
# no queueing delay can be seen or shed. So after each accept, up to this many more are taken at
# once (per listening socket and iteration).
ACCEPT_BATCH = 64
# ... but only while the worker holds fewer connections than this share of its cap. Near the cap
# a burst taken at once would be refused whole at the connection level (503), before the
# requests it carries could be told apart (a flooding key's share is answered 429 from its
# head), so the last stretch is accepted at libuv's pace, one per iteration, as refusals close.
# Unless the queue stands: a busy worker's iteration can take 100 ms, and at that pace the
# queue of a sustained overload stayed full (1,024 connections, each request waiting 10-20 s
# unseen). So past the ceiling one more connection is taken per iteration, and when it had
# waited in the queue longer than `accept_queue_seconds` (the burst allowance), the rest of the
# batch is taken too: their requests meet the shedder, which sees how long they waited, and
# those past the cap get 503 at once.
ACCEPT_BATCH_CEILING = 0.75
# Connections over the cap served for `/healthz` and `/readyz` only: a worker at its cap under
# load answered its liveness probe 503 like any other connection, and Kubernetes restarts a pod
# after three such failures, cutting every stream it holds.
PROBE_RESERVE = 8
# How often a stopping site looks whether its connections have settled.
SETTLE_POLL_SECONDS = 0.01


class RefusingProtocol(asyncio.Protocol):
    """A connection over the worker's cap: 503 at once, then close after a short linger."""

    def __init__(self) -> None:
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Answer before reading anything: this worker will not parse the request."""
        stream = cast(asyncio.Transport, transport)
        stream.write(
            raw_error_response(
                503,
                CONNECTION_CAP_MESSAGE,
                "too_many_connections",
                retry_after=1,
            )
        )
        if stream.can_write_eof():
            stream.write_eof()
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, stream.close)

    def data_received(self, data: bytes) -> None:
        """Drop whatever the client sends meanwhile."""

    def eof_received(self) -> bool:
        """The client finished: close."""
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the linger timer."""
        if self._linger is not None:
            self._linger.cancel()


class GuardedSite(web.BaseSite):
    """A TCP site like aiohttp's `TCPSite`, whose connections get `ConnectionLimits`."""

    __slots__ = (
        "_admission",
        "_bound_port",
        "_connecting",
        "_connections",
        "_drain_due",
        "_full",
        "_host",
        "_limits",
        "_listeners",
        "_port",
        "_probe_connections",
        "_reuse_port",
        "_spares",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: ConnectionLimits,
        reuse_port: bool = False,
        backlog: int = 1024,
        admission: Admission | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._admission = admission
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._reuse_port = reuse_port
        self._limits = limits
        # Weak, so a connection asyncio gave up on before it was made frees its slot too.
        self._connections: weakref.WeakSet[GuardedRequestHandler] = weakref.WeakSet()
        self._probe_connections: weakref.WeakSet[GuardedRequestHandler] = weakref.WeakSet()
        self._full = False
        self._listeners: list[socket.socket] = []
        # Duplicates of the listening sockets, to accept from in batches (see `ACCEPT_BATCH`).
        self._spares: list[socket.socket] = []
        self._drain_due = False
        self._connecting: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        """The site's URL."""
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the requested one."""
        return self._port if self._bound_port is None else self._bound_port

    async def start(self) -> None:
        """Listen."""
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self._accept, self._host, self._port, backlog=self._backlog, reuse_port=self._reuse_port
        )
        self._server = server
        self._listeners = list(server.sockets)
        self._spares = [_duplicate(listener) for listener in self._listeners]
        if server.sockets:
            self._bound_port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, serving the connections the kernel had already queued for us.

        Closing a listening socket resets every connection still in its accept queue, and a load
        balancer that already sent a request on one cannot safely replay it. So the socket is held
        open (a duplicate descriptor) while the loop stops watching it, its queue is accepted
        until empty, and only then is it closed; the accepted connections are served as usual.
        """
        held = [_duplicate(listener) for listener in self._listeners]
        self._listeners = []
        for spare in self._spares:
            spare.close()
        self._spares = []
        await super().stop()
        queued: list[socket.socket] = []
        for listener in held:
            while True:
                try:
                    connection, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                queued.append(connection)
            listener.close()
        loop = asyncio.get_running_loop()
        for connection in queued:
            connection.setblocking(False)
            await loop.connect_accepted_socket(self._accept, connection)
        if queued:
            logger.info("accept_queue_drained", connections=len(queued))

    async def settle(self, timeout: float) -> None:  # noqa: ASYNC109 - the wait is the bounded thing itself
        """Wait (bounded) until every open connection is idle or has its handler running."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            held = [*self._connections, *self._probe_connections]
            if all(connection.settled for connection in held):
                return
            await asyncio.sleep(SETTLE_POLL_SECONDS)

    def _accept(self) -> asyncio.Protocol:
        if self._spares and not self._drain_due:
            self._drain_due = True
            asyncio.get_running_loop().call_soon(self._drain)
        manager = self._runner.server
        if manager is None:
            return RefusingProtocol()
        over_cap = len(self._connections) >= self._limits.max_connections
        if over_cap != self._full:
            self._full = over_cap
            if over_cap:
                logger.warning("connection_limit_reached", limit=self._limits.max_connections)
            else:
                logger.info("connection_limit_cleared", limit=self._limits.max_connections)
        if over_cap and len(self._probe_connections) >= PROBE_RESERVE:
            return RefusingProtocol()
        pool = self._probe_connections if over_cap else self._connections
        handler = GuardedRequestHandler(
            manager,
            loop=asyncio.get_running_loop(),
            limits=self._limits,
            on_lost=pool.discard,
            admission=self._admission,
            probes_only=over_cap,
        )
        pool.add(handler)
        return handler

    def _drain(self) -> None:
        """Accept up to `ACCEPT_BATCH` more queued connections from each listening socket, while
        the worker stays under `ACCEPT_BATCH_CEILING` of its connection cap, or while the queue
        stands (see `ACCEPT_BATCH_CEILING`)."""
        self._drain_due = False
        ceiling = int(self._limits.max_connections * ACCEPT_BATCH_CEILING)
        room = ceiling - len(self._connections) - len(self._connecting)
        for spare in self._spares:
            for connection in queued_connections(spare, room, self._limits.accept_queue_seconds):
                task = asyncio.create_task(self._connect(connection))
                self._connecting.add(task)
                task.add_done_callback(self._connecting.discard)

    async def _connect(self, connection: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._accept, connection)
        except OSError:
            connection.close()


def queued_connections(
    listener: socket.socket, room: int, standing_after: float
) -> list[socket.socket]:
    """Accept from `listener`'s queue, at most `ACCEPT_BATCH`: up to `room` connections, then one
    more, and more for as long as each waited in the queue longer than `standing_after` seconds
    (the queue stands). Non-blocking sockets, in the queue's order."""
    accepted: list[socket.socket] = []
    while len(accepted) < ACCEPT_BATCH:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as error:  # out of descriptors, or the like: the loop retries
            logger.warning("accept_failed", error=error.strerror)
            break
        connection.setblocking(False)
        accepted.append(connection)
        if len(accepted) > room and kernel_wait(connection) <= standing_after:
            break
    return accepted


def _duplicate(listener: socket.socket) -> socket.socket:
    """A non-blocking socket on a duplicate of the listening socket's descriptor."""
    duplicate = socket.socket(fileno=os.dup(listener.fileno()))
    duplicate.setblocking(False)
    return duplicate
