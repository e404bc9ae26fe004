"""Request ids: a well-formed incoming `x-request-id` is kept, anything else is replaced.

A new id is `<prefix>-<n>`: 16 hex digits drawn at random once per app (so per worker process,
and anew after every restart), then a per-app counter in hex. Ids are unique across workers and
restarts without a random draw per request; within one process they count up, across processes
they cannot be guessed.
"""

from __future__ import annotations

import itertools
import re
import secrets

from aiohttp import web

WELL_FORMED = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID = web.RequestKey("request_id", str)


class RequestIds:
    """New request ids for one app: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def new(self) -> str:
        """The next id, never handed out before by any process."""
        return f"{self._prefix}-{next(self._counter):x}"


REQUEST_IDS = web.AppKey("request_ids", RequestIds)


def request_id_of(request: web.Request) -> str:
    """The request's id, decided once: the client's when well-formed, else a new one."""
    existing: str | None = request.get(REQUEST_ID)
    if existing is not None:
        return existing
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if WELL_FORMED.match(incoming) else request.app[REQUEST_IDS].new()
    request[REQUEST_ID] = request_id
    return request_id
