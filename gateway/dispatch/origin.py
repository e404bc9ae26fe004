"""Where a provider's base URL points: host, port, TLS, path prefix and the head every request
to it starts with."""

from __future__ import annotations

from base64 import b64encode
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Origin:
    """Where a provider's base URL points, and what every request to it starts with."""

    host: str
    port: int
    tls: bool
    prefix: str  # the base URL's path, before each request's own
    host_header: str
    basic_auth: str | None  # from credentials in the URL
    tls_ca_file: str | None = None  # the CAs to verify against instead of the system's


def parse_origin(base_url: str, tls_ca_file: str | None = None) -> Origin:
    """The origin of an http(s) base URL (verified against `tls_ca_file`'s CAs, if given)."""
    parts = urlsplit(base_url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    host = parts.hostname
    default = 443 if tls else 80
    port = parts.port or default
    shown = f"[{host}]" if ":" in host else host
    basic = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        basic = "Basic " + b64encode(pair.encode("latin-1")).decode("ascii")
    return Origin(
        host=host,
        port=port,
        tls=tls,
        prefix=parts.path.rstrip("/"),
        host_header=shown if port == default else f"{shown}:{port}",
        basic_auth=basic,
        tls_ca_file=tls_ca_file if tls else None,
    )
