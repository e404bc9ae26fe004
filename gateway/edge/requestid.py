"""Request ids: a well-formed incoming `x-request-id` is kept, anything else is replaced."""

from __future__ import annotations

import re
import uuid

from aiohttp import web

WELL_FORMED = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID = web.RequestKey("request_id", str)


def request_id_of(request: web.Request) -> str:
    """The request's id, decided once: the client's when well-formed, else a new random one."""
    existing: str | None = request.get(REQUEST_ID)
    if existing is not None:
        return existing
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if WELL_FORMED.match(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    return request_id
