"""Per-process routing policy: pure functions and small classes over plain data, no I/O.

`automodel` resolves an org's `auto` model, `preferences` a key's model-group preference,
`sessions` session ids and per-process session bindings, `latency` TTFT bands, `ordering`
ranks a request's candidates into a failover list, and `rendezvous` names the provider every
process agrees on for a key.
"""

from gateway.routing.automodel import (
    AutoModelDisabled,
    AutoModelError,
    AutoModelSpec,
    InvalidAutoRoute,
    Resolution,
    normalize_mode,
    resolve,
    validate_spec,
)
from gateway.routing.latency import (
    LatencySnapshot,
    LatencyTracker,
    ProviderLatency,
    round_half_away_from_zero,
    score_band,
)
from gateway.routing.ordering import (
    OrderingRequest,
    ProviderState,
    Ranked,
    StartTracker,
    order,
    tiebreak_ranks,
)
from gateway.routing.preferences import (
    MissingGroup,
    MissingGroupReports,
    PreferenceKind,
    PreferredSet,
    active_providers,
    is_active,
    missing_groups,
    preferred_set,
)
from gateway.routing.rendezvous import rendezvous_order, rendezvous_weight
from gateway.routing.sessions import SessionTable, session_id_from

__all__ = [
    "AutoModelDisabled",
    "AutoModelError",
    "AutoModelSpec",
    "InvalidAutoRoute",
    "LatencySnapshot",
    "LatencyTracker",
    "MissingGroup",
    "MissingGroupReports",
    "OrderingRequest",
    "PreferenceKind",
    "PreferredSet",
    "ProviderLatency",
    "ProviderState",
    "Ranked",
    "Resolution",
    "SessionTable",
    "StartTracker",
    "active_providers",
    "is_active",
    "missing_groups",
    "normalize_mode",
    "order",
    "preferred_set",
    "rendezvous_order",
    "rendezvous_weight",
    "resolve",
    "round_half_away_from_zero",
    "score_band",
    "session_id_from",
    "tiebreak_ranks",
    "validate_spec",
]
