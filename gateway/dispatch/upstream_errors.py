"""How an upstream exchange can fail, in the classes that decide what may be tried again.

The line that matters is whether the upstream may have run the request. It cannot have when no
connection was made (`UpstreamConnectError`, `UpstreamTlsError`) or when a connection ended before
the upstream read the request (`RequestNotReadError`): those are safe to send again, here or
elsewhere. Once a request went out and the upstream may have read it, a failure is an
`UpstreamBrokenError`: the request may have run, and the error says so.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """An upstream exchange failed (the counterpart of aiohttp's `ClientError`)."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (name resolution, refusal): nothing was sent."""


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake failed (verification, protocol): nothing was sent. `reason` is the TLS
    library's, for the log."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamBrokenError(UpstreamError):
    """The connection failed or the answer broke its framing after the request started out: the
    upstream may have run the request."""


class UpstreamMalformedError(UpstreamBrokenError):
    """The answer is not one HTTP/1.1 can carry to the client: a malformed or oversized head, a
    status outside 100-599, a switch of protocols, a body that breaks its framing."""


class RequestNotReadError(UpstreamBrokenError):
    """The connection ended before the upstream read the request (its kernel refused the
    request's bytes, or the close crossed them): it was not run, and may be sent again."""


class ConnectTimeoutError(UpstreamError, TimeoutError):
    """No connection within the connect timeout (a timeout, as aiohttp's are)."""


class ReadTimeoutError(UpstreamError, TimeoutError):
    """The upstream stayed silent for longer than the read timeout."""
