"""How this gateway runs: its listener, the store, shared affinity, usage and routing sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from gateway.config_base import NonNegativeFloat, PositiveFloat, PositiveInt, Section

# Load-shedding settings of earlier builds, all replaced by `load_shedding_burst_seconds`: a
# config that still has them loads, with a warning that names the replacement (see
# config_loading), so an upgrade never stops a gateway over a setting that no longer applies.
REPLACED_SHEDDING_SETTINGS = frozenset(
    {"load_shedding_target_lag_ms", "load_shedding_target_delay_ms", "load_shedding_interval_ms"}
)


class ServerSettings(Section):
    """The HTTP listener and its limits.

    The connection limits guard each worker against slow and oversized clients: a request head
    must arrive within `header_read_timeout_seconds` (on a new connection, counted from accept),
    its body within `body_read_timeout_seconds`; an idle keep-alive connection closes after
    `keepalive_timeout_seconds` (keep it above the load balancer's upstream idle timeout); a head
    over `max_header_bytes` or `max_header_count` headers gets 431; connections beyond
    `max_connections_per_worker` get 503, except a few kept for `/healthz` and `/readyz` probes
    (each proxied request also holds an upstream socket, so allow at least twice this many open
    files). One key's requests in progress on a worker,
    from their head until their answer ends (bodies still arriving included), may hold more than
    `max_connection_share_per_key` of that cap only while the worker is not crowded (its requests
    in progress hold under three quarters of the cap): past its share on a crowded worker a key's
    requests get 429 before their body is read, so one client may use a quiet worker whole and a
    flooding key leaves at least a quarter of the cap (or the rest of its share) to the others.

    What a worker holds in memory for requests (bodies being read, upload copies kept for a
    failover, non-streamed answers read whole) is at most `memory_budget_bytes`, one key's at
    most `memory_share_per_key` of it: past it a body gets 503 (429 for the key over its share)
    before more of it is read, and an answer waits up to `routing.wait_timeout_seconds` first
    (see `gateway.dispatch.memory_budget`). `max_buffered_answer_bytes` is its former name.

    On SIGTERM a worker fails `/readyz` and answers with `Connection: close` for
    `drain_delay_seconds` (match the Kubernetes `preStop` sleep; keep it above the load balancer's
    upstream idle keep-alive timeout), then stops accepting and finishes in-flight requests up to
    `shutdown_timeout_seconds`.

    With `load_shedding` (on by default), a worker refuses only sustained overload: a burst whose
    queue (the time between a request's head being read and its handler starting) drains within
    `load_shedding_burst_seconds` is never refused; a queue that stands past it for a tenth of it
    makes the worker overloaded, and until it drains each new proxied request that queued past a
    quarter of it is answered 503 with `Retry-After` at once (see `gateway.edge.overload`). Off,
    the delay is still measured and published; nothing is refused.
    """

    host: str = "0.0.0.0"
    """Listen address (`gateway serve --host` overrides it)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """Listen port, shared by every worker (`SO_REUSEPORT`; `--port` overrides it)."""
    workers: Annotated[int, Field(ge=1, le=256)] = 2
    """Worker processes on the port (`--workers` overrides it)."""
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    """Larger request bodies get 413."""
    admin_token: SecretStr | None = None
    """Enables `/admin/*` and the status page, given as a bearer token or HTTP Basic password;
    empty: admin endpoints off.
    """
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Serve `/metrics` on this port instead (not facing clients)."""
    shutdown_timeout_seconds: PositiveFloat = 30.0
    """After the drain delay, in-flight requests (streams too) get this long to finish."""
    drain_delay_seconds: NonNegativeFloat = 5.0
    """SIGTERM: fail `/readyz` and close each answered connection this long, then stop accepting."""
    header_read_timeout_seconds: PositiveFloat = 10.0
    """Request line + headers must arrive within this (a new connection: from accept); else 408."""
    body_read_timeout_seconds: PositiveFloat = 60.0
    """The whole body within this; else 408 and the connection closes."""
    keepalive_timeout_seconds: PositiveFloat = 75.0
    """Idle keep-alive connections close; keep above the load balancer's upstream idle timeout."""
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024
    """Request line + headers; more, or one line over 8190 bytes, gets 431."""
    max_header_count: PositiveInt = 100
    """More headers get 431."""
    max_connections_per_worker: PositiveInt = 1024
    """More connections get 503 + Retry-After; allow twice this many open files."""
    max_connection_share_per_key: Annotated[float, Field(gt=0, le=1)] = 0.5
    """One key's requests in progress per worker (bodies still arriving included): at most this
    share of `max_connections_per_worker`; more get 429 before their body.
    """
    cors_allow_origins: list[str] = Field(default_factory=list)
    """E.g. `["https://app.example.com"]` or `["*"]`; empty: no CORS headers."""
    request_compression: bool = False
    """False: a request with `Content-Encoding` other than `identity` gets 415."""
    memory_budget_bytes: PositiveInt = 256 * 1024 * 1024
    """Per worker: request bodies being read, upload copies kept for failover and non-streamed
    answers, together; past it 503 (see security.md, "Hostile clients and upstreams").
    """
    memory_share_per_key: Annotated[float, Field(gt=0, le=1)] = 0.5
    """One key's share of that budget; past it 429 `key_memory_share`."""
    max_buffered_answer_bytes: PositiveInt | None = None
    """The former name of `memory_budget_bytes`: it still sets the budget."""
    load_shedding: bool = True
    """Under sustained overload a worker answers new requests 503 + Retry-After instead of queueing
    them (see security.md, "Load shedding"); false: it only measures.
    """
    load_shedding_burst_seconds: Annotated[float, Field(ge=0.01)] = 1.0
    """A burst whose queue drains within this is never refused; a queue standing past it is shed (at
    least 0.01).
    """

    @field_validator("admin_token", mode="after")
    @classmethod
    def _empty_token_disables(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        return value

    @model_validator(mode="before")
    @classmethod
    def _former_answer_budget(cls, data: Any) -> Any:
        """`max_buffered_answer_bytes` (answers only, in earlier builds) sets the whole budget."""
        if not isinstance(data, dict) or data.get("max_buffered_answer_bytes") is None:
            return data
        if "memory_budget_bytes" in data:
            raise ValueError(
                "`max_buffered_answer_bytes` is the former name of `memory_budget_bytes` (one "
                "budget for request bodies, upload copies and buffered answers): set only that"
            )
        return {**data, "memory_budget_bytes": data["max_buffered_answer_bytes"]}


class DatabaseSettings(Section):
    """Where the shared affinity store lives; no URL means the embedded single-machine Postgres.

    `listen_url` is a direct connection (not through PgBouncer in transaction mode) on which each
    worker hears binding changes; empty means `url`.
    """

    url: SecretStr | None = None
    """Empty or omitted (no database section at all): `DATABASE_URL`, else the embedded Postgres."""
    listen_url: SecretStr | None = None
    """A direct connection for binding-change notifications (LISTEN); empty: `url`. Set it when
    `url` is a PgBouncer in transaction mode.
    """
    embedded_data_dir: str = ".gateway/pgdata"
    """Where the embedded Postgres keeps its data when no URL is given."""
    pool_min_size: Annotated[int, Field(ge=0)] = 2
    """Connections each worker's pool keeps open."""
    pool_max_size: PositiveInt = 10
    """A worker opens this many connections before it accepts traffic."""
    statement_cache_size: Annotated[int, Field(ge=0)] = 100
    """0 behind PgBouncer in transaction mode."""
    apply_migrations_on_start: bool = True
    """Workers apply pending migrations at start-up, exactly once between them (`gateway migrate`
    does it on demand).
    """
    # Set when `url` is an embedded server's, derived at start rather than configured.
    _embedded_url: bool = PrivateAttr(default=False)

    def with_embedded_url(self, url: str) -> DatabaseSettings:
        """These settings pointing at an embedded Postgres's URL, marked as derived."""
        derived = self.model_copy(update={"url": SecretStr(url)})
        derived._embedded_url = True
        return derived

    def as_configured(self) -> DatabaseSettings:
        """These settings as the config gave them: an embedded server's derived URL is none."""
        if not self._embedded_url:
            return self
        configured = self.model_copy(update={"url": None})
        configured._embedded_url = False
        return configured

    @field_validator("url", "listen_url", mode="after")
    @classmethod
    def _empty_url_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self


class SpillSettings(Section):
    """When a bound provider is loaded enough to skip it for one request."""

    min_load: NonNegativeFloat = 32
    """A bound provider's load (running + waiting requests) must exceed this to be skipped."""
    ratio: Annotated[float, Field(ge=1)] = 1.5
    """... and this many times the least-loaded candidate's load."""


class AffinitySettings(Section):
    """Shared bindings: TTLs, deadlines, breaker and background work, and what one binding holds.

    `scope` is the default of every model's `affinity_scope`: `key` binds `(key, model)`;
    `conversation` binds `(key, model, conversation)` (see `gateway.routing.conversations`).
    """

    ttl_seconds: PositiveFloat = 300
    """How long a shared binding lives without being used (renewed after successes)."""
    local_cache_seconds: NonNegativeFloat = 5
    """How long a worker's copy of a binding is trusted while the change feed is not verified
    (see design.md, "Renewals and changes, off the request path").
    """
    lookup_timeout_ms: PositiveFloat = 50
    """The floor of a binding look-up's deadline (stretched adaptively on a slow store)."""
    claim_timeout_ms: PositiveFloat = 500
    """The floor of a claim's deadline (also the deadline of a key-limit unit claim)."""
    breaker_cooloff_seconds: PositiveFloat = 10
    """After three store failures in a row, requests route on local state this long before a probe.

    """
    agreement_slack: NonNegativeFloat = 0.1
    """A claim keeps the rendezvous winner unless it holds this share (and at least 2) more bindings
    than the least-bound candidate.
    """
    responses_ttl_seconds: PositiveFloat = 3600
    """How long a stored `/v1/responses` id keeps its node."""
    responses_max_per_key: PositiveInt = 100_000
    """Stored `/v1/responses` ids kept per key; a key's new one evicts its oldest."""
    renew_queue_size: PositiveInt = 10000
    """Renewals and rebinds waiting to be written; past it a new one is dropped and counted."""
    janitor_interval_seconds: PositiveFloat = 60
    """How often a worker's janitor deletes expired bindings (one worker at a time)."""
    janitor_grace_seconds: NonNegativeFloat = 300
    """Bindings are deleted this long after they expire."""
    spill: SpillSettings = SpillSettings()
    """When a bound provider is loaded enough to skip it for one request."""
    scope: Literal["key", "conversation"] = "key"
    """`key` or `conversation`: what one shared binding holds (models override it with
    `affinity_scope`).
    """
    conversation_secret: SecretStr | None = None
    """Optional; keys the conversation digests of this deployment."""
    conversation_head_bytes: PositiveInt = 4096
    """Completions: how much of the prompt names its conversation."""


class UsageSettings(Section):
    """Usage accounting: per-minute rollups in the store, written in batches off the hot path."""

    enabled: bool = True
    """False: nothing is asked of upstreams, nothing written."""
    flush_interval_seconds: PositiveFloat = 10
    """One statement per worker per interval; a crash loses at most this."""
    retention_days: PositiveFloat = 35
    """Older minutes are deleted by the janitor."""
    max_pending_rows: PositiveInt = 100_000
    """Rows a worker holds between flushes; past that requests go uncounted."""
    janitor_interval_seconds: PositiveFloat = 300
    """How often each worker deletes rollups past `retention_days`."""


class RoutingSettings(Section):
    """Per-process routing: permits, failover, cooldowns, latency bands, sessions, timeouts.

    Failures a client's request could have caused (an upstream 5xx, a timeout) cool a provider
    only when they come from two keys, and never more than `max_cooling_fraction` of a model's
    providers at once; an unreachable provider or a 429 cools whatever the share.

    Failover attempts beyond a request's first are a retry budget per worker: at most
    `retry_budget_percent` % of its requests in flight, and never fewer than
    `retry_budget_min_concurrent`, may be retrying at once (100: no budget).
    """

    wait_timeout_seconds: NonNegativeFloat = 5
    """How long a request waits in FIFO order when every candidate's permits are taken; then 503."""
    failover_budget: PositiveInt = 3
    """Most providers tried for one request."""
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] = 20
    """Per worker, at most this share (%) of its requests in flight may be failing over at once;
    100: no budget.
    """
    retry_budget_min_concurrent: Annotated[int, Field(ge=0)] = 3
    """... and never fewer than this many."""
    allowed_fails: PositiveInt = 3
    """Consecutive failures that cool a provider."""
    cooldown_seconds: PositiveFloat = 5
    """The first cooldown after `allowed_fails` failures; doubled on each further one."""
    cooldown_max_seconds: PositiveFloat = 300
    """The longest cooldown, a 429's `Retry-After` included."""
    max_cooling_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    """The most of a model's providers that may cool at once for failures other than unreachable or
    429; 0: none, 1: no limit.
    """
    latency_window_seconds: PositiveFloat = 900
    """This worker's own TTFT samples (providers whose nodes publish no TTFT histogram)."""
    latency_band_fraction: PositiveFloat = 0.15
    """Band 0 is the model's mean TTFT ± this fraction."""
    latency_min_samples: Annotated[int, Field(ge=0)] = 20
    """Own samples of a model this worker needs before it bands its providers on them."""
    latency_band_hysteresis: Annotated[float, Field(ge=0, lt=0.5)] = 0.25
    """A provider changes band only this many band widths inside the new one."""
    latency_sample_max_age_seconds: PositiveFloat = 60
    """Own samples: a provider with none this long is unbanded (0) and tried again."""
    node_latency_window_seconds: PositiveFloat = 10
    """Nodes' own TTFT histograms (vLLM, SGLang `/metrics`): the span of each node's figure."""
    session_ttl_seconds: PositiveFloat = 21600
    """How long a session binding (`stickiness: session`) lives unused."""
    session_capacity: PositiveInt = 4096
    """Per worker; when full, the key holding the most sessions loses its least recently written
    one: a key holding at most an equal split (capacity ÷ keys holding sessions) never loses one to
    another key.
    """
    load_poll_interval_seconds: PositiveFloat = 1
    """How often each worker reads every provider's `/metrics` (load and TTFT)."""
    connect_timeout_seconds: PositiveFloat = 5
    """Connecting to an upstream; a connect failure fails over."""
    first_byte_timeout_seconds: PositiveFloat = 120
    """Streams: silence before the first event, and between chunks."""
    response_timeout_seconds: PositiveFloat = 600
    """Non-streamed answers: the whole answer (vLLM sends nothing until done)."""
    retry_after_timeout: bool = False
    """Replay a request that timed out after the upstream accepted it."""
    downstream_write_timeout_seconds: PositiveFloat = 60
    """A client that accepts no bytes this long is dropped and its upstream cancelled."""
    mode_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,100}$")] = "x-gateway-mode"
    """The request header an org's `auto` model reads the mode from."""

    @model_validator(mode="after")
    def _cooldown_bounds(self) -> RoutingSettings:
        if self.cooldown_seconds > self.cooldown_max_seconds:
            raise ValueError("cooldown_seconds must not exceed cooldown_max_seconds")
        return self
