"""The request handler: authenticate → parse → resolve → candidates → order → dispatch → record."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from gateway.catalog import Catalog, Key, Provider
from gateway.connections import body_read_timeout, close_after_response
from gateway.dispatch import Dispatcher, DispatchRecord, DispatchRequest
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.payload import Endpoint, Payload, parse_payload
from gateway.permits import KeyLimits
from gateway.requestid import request_id_of
from gateway.router import RequestContext, Router, RoutingDecision
from gateway.routing.automodel import (
    AutoModelDisabled,
    InvalidAutoRoute,
    normalize_mode,
    resolve,
)
from gateway.routing.sessions import session_id_from
from gateway.status import RecentDecision

logger = structlog.get_logger("gateway.proxy")

RECENT_DECISIONS = 50

# nginx's convention for "the client closed the connection before the answer was complete".
CLIENT_CLOSED_REQUEST = 499

ENDPOINT_PATHS: Mapping[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
}


@dataclass(frozen=True)
class Resolved:
    """The concrete model a request will use, and whether the org's auto model chose it."""

    model: str
    via_auto: bool


class Proxy:
    """Owns the per-process pieces a request passes through and answers proxied requests."""

    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        mode_header: str,
        key_limits: KeyLimits | None = None,
        recent: deque[RecentDecision] | None = None,
    ) -> None:
        self.catalog = catalog
        self.router = router
        self.dispatcher = dispatcher
        self.metrics = metrics
        # Given when a reload builds a new proxy: counts and history carry over.
        self.key_limits = key_limits or KeyLimits()
        self.recent = recent if recent is not None else deque(maxlen=RECENT_DECISIONS)
        self._max_body_bytes = max_body_bytes
        self._mode_header = mode_header

    def authenticate(self, request: web.Request) -> Key:
        """The key of a `Bearer` Authorization header, or a 401."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(
                401,
                "Missing API key: send `Authorization: Bearer <key>`.",
                "missing_api_key",
            )
        key = self.catalog.authenticate(token)
        if key is None:
            raise GatewayError(401, "Invalid API key.", "invalid_api_key")
        return key

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        return await self._proxy(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions` (legacy)."""
        return await self._proxy(request, "completions")

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the models this key may use, in OpenAI's list shape."""
        key = self.authenticate(request)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "affinity-gateway"}
            for name in self.catalog.models_for(key)
        ]
        return web.json_response({"object": "list", "data": data})

    def _response_headers(
        self, decision: RoutingDecision, resolved: Resolved
    ) -> Callable[[Provider], Mapping[str, str]]:
        def headers(provider: Provider) -> Mapping[str, str]:
            values: dict[str, str] = {
                "x-gateway-affinity": self.router.affinity_header(decision, provider)
            }
            if resolved.via_auto:
                values["x-gateway-resolved-model"] = resolved.model
            return values

        return headers

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body: 413 past `max_body_bytes`, 408 when it is not all there in time."""
        if request.content_length is not None and request.content_length > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)
        timeout = body_read_timeout(request)
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(self._max_body_bytes) from None
        except TimeoutError:
            # The rest of the body is not worth waiting for: close once the 408 is out.
            close_after_response(request)
            raise GatewayError(
                408,
                f"The request body did not arrive within {timeout:g} s.",
                "body_timeout",
                headers={"Connection": "close"},
            ) from None

    def _resolve(self, request: web.Request, key: Key, requested: str) -> Resolved:
        spec = self.catalog.auto_model(key)
        if spec is not None and requested == spec.name:
            if not key.allows(requested):
                raise GatewayError(
                    403, f"This key may not use the model `{requested}`.", "model_not_allowed"
                )
            mode = normalize_mode(request.headers.get(self._mode_header))
            try:
                resolution = resolve(spec, mode, is_valid_model=self.catalog.serves)
            except AutoModelDisabled as error:
                raise GatewayError(400, str(error), "auto_model_disabled") from None
            except InvalidAutoRoute as error:
                raise GatewayError(400, str(error), "invalid_auto_route") from None
            model = resolution.model
            via_auto = True
        else:
            model = requested
            via_auto = False
        if not self.catalog.serves(model):
            raise GatewayError(404, f"The model `{model[:200]}` does not exist.", "model_not_found")
        if not key.allows(model):
            raise GatewayError(
                403, f"This key may not use the model `{model}`.", "model_not_allowed"
            )
        return Resolved(model=model, via_auto=via_auto)

    async def _proxy(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started_at = time.monotonic()
        request_id = request_id_of(request)
        record = DispatchRecord()
        key: Key | None = None
        admitted: Key | None = None
        affinity = "none"
        route: list[str] = []
        payload: Payload | None = None
        resolved: Resolved | None = None
        status = 500
        try:
            key = self.authenticate(request)
            payload = parse_payload(await self._read_body(request), endpoint)
            resolved = self._resolve(request, key, payload.model)
            candidates = self.catalog.candidates(key, resolved.model)
            if not candidates and self.catalog.only_draining(key, resolved.model):
                raise GatewayError(
                    503,
                    f"Every provider for `{resolved.model}` is draining; try again shortly.",
                    "providers_draining",
                    retry_after=1,
                )
            if not candidates:
                raise GatewayError(
                    404,
                    f"No provider on this key's route serves `{resolved.model}`.",
                    "model_not_found",
                )
            session_id = (
                session_id_from(request.headers, payload.data)
                if self.catalog.stickiness(resolved.model) == "session"
                else None
            )
            context = RequestContext(
                request_id=request_id,
                key=key,
                model=resolved.model,
                stream=payload.stream,
                session_id=session_id,
            )
            self.key_limits.acquire(key)
            admitted = key
            decision = await self.router.decide(context, candidates)
            affinity = decision.affinity
            route = [
                f"{provider.name}:{reason}"
                for provider, reason in zip(decision.failover, decision.reasons, strict=True)
            ]
            job = DispatchRequest(
                request_id=request_id,
                path=ENDPOINT_PATHS[endpoint],
                payload=payload,
                model=resolved.model,
                client_headers=request.headers,
                response_headers=self._response_headers(decision, resolved),
                on_attempt=self.router.started,
                started_at=started_at,
            )
            response = await self.dispatcher.dispatch(request, job, decision.failover, record)
            served = record.served
            if served is not None and record.succeeded:
                self.router.succeeded(context, decision, served, record.upstream_ttft_seconds)
                affinity = self.router.affinity_header(decision, served)
            status = response.status
            return response
        except GatewayError as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            record.client_disconnected = True
            raise
        finally:
            if admitted is not None:
                self.key_limits.release(admitted)
            self._record(
                request_id=request_id,
                affinity=affinity,
                route=route,
                key=key,
                payload=payload,
                resolved=resolved,
                record=record,
                status=status,
                started_at=started_at,
            )

    def _record(
        self,
        *,
        request_id: str,
        affinity: str,
        route: list[str],
        key: Key | None,
        payload: Payload | None,
        resolved: Resolved | None,
        record: DispatchRecord,
        status: int,
        started_at: float,
    ) -> None:
        duration = time.monotonic() - started_at
        model = resolved.model if resolved else None
        attempts = [f"{attempt.provider}:{attempt.outcome}" for attempt in record.attempts]
        served = record.served.name if record.served else None
        self.recent.append(
            RecentDecision(
                at=time.time(),
                request_id=request_id,
                key_id=key.id if key else None,
                model=model,
                provider=served,
                affinity=affinity,
                attempts=tuple(attempts),
                status=status,
                duration_ms=round(duration * 1000, 1),
            )
        )
        if route:  # a routing decision was made: count how stickiness turned out
            self.metrics.affinity_results.labels(affinity).inc()
        if model is not None:
            self.metrics.requests.labels(model, served or "none", f"{status // 100}xx").inc()
            self.metrics.request_duration.labels(model).observe(duration)
            if served is not None and record.ttft_seconds is not None:
                self.metrics.ttft.labels(model, served).observe(record.ttft_seconds)
            for attempt in record.attempts:
                self.metrics.upstream_attempts.labels(attempt.provider, attempt.outcome).inc()
        logger.info(
            "request",
            request_id=request_id,
            key_id=key.id if key else None,
            org=key.org if key else None,
            requested_model=payload.model if payload and resolved else None,
            model=model,
            provider=served,
            affinity=affinity,
            route=route,
            attempts=attempts,
            status=status,
            client_disconnected=record.client_disconnected,
            duration_ms=round(duration * 1000, 2),
            ttft_ms=round(record.ttft_seconds * 1000, 2) if record.ttft_seconds else None,
            bytes=record.bytes_sent,
        )


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is larger than the limit of {limit} bytes.", "body_too_large"
    )
