"""Session ids from requests, and the per-process session table with its live counts."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from multidict import CIMultiDict

from gateway.routing.sessions import MAX_SESSION_ID_LENGTH, SessionTable, session_id_from


@pytest.mark.parametrize(
    "header", ["x-session-id", "session_id", "session-id", "conversation_id", "conversation-id"]
)
def test_each_session_header_carries_the_session_id(header: str) -> None:
    """Any one of the five session headers is read as the session id."""
    assert session_id_from({header: "abc"}, {}) == "abc"


def test_the_first_session_header_in_priority_order_wins() -> None:
    """`x-session-id` beats `conversation-id` regardless of the order the headers arrived in."""
    headers = {"conversation-id": "later", "session-id": "middle", "x-session-id": "first"}
    assert session_id_from(headers, {}) == "first"


def test_session_headers_are_matched_case_insensitively() -> None:
    """Header names in any case are recognised, in plain dicts as in aiohttp's CIMultiDict."""
    assert session_id_from({"X-Session-ID": "plain"}, {}) == "plain"
    assert session_id_from(CIMultiDict({"Conversation-Id": "multi"}), {}) == "multi"


def test_blank_session_header_falls_through_to_the_next_one() -> None:
    """An empty or whitespace header is ignored and the next present one is used."""
    assert session_id_from({"x-session-id": "  ", "session-id": "next"}, {}) == "next"


def test_headers_win_over_the_body() -> None:
    """A session header is preferred to body `metadata.session_id` and `user`."""
    body = {"metadata": {"session_id": "from-body"}, "user": "someone"}
    assert session_id_from({"session_id": "from-header"}, body) == "from-header"


def test_body_metadata_session_id_is_used_without_headers() -> None:
    """Without a session header the body's `metadata.session_id` is the session id."""
    body = {"metadata": {"session_id": "meta"}, "user": "someone"}
    assert session_id_from({}, body) == "meta"


def test_body_user_is_the_last_resort() -> None:
    """Without headers or metadata session id, the body's `user` field is used."""
    assert session_id_from({"content-type": "application/json"}, {"user": "u-1"}) == "u-1"


def test_non_string_body_values_are_ignored() -> None:
    """A numeric metadata session id or user, or non-object metadata, gives no session id."""
    assert session_id_from({}, {"metadata": {"session_id": 7}, "user": 42}) is None
    assert session_id_from({}, {"metadata": "session", "user": ""}) is None
    assert session_id_from({}, {"metadata": {"session_id": 7}, "user": "u"}) == "u"


def test_no_session_signal_gives_none() -> None:
    """A request without any session header or body field has no session id."""
    assert session_id_from({"authorization": "Bearer x"}, {"model": "m"}) is None


def test_long_session_ids_are_capped() -> None:
    """An over-long session id is trimmed and truncated to the cap."""
    long_id = "  " + "s" * (MAX_SESSION_ID_LENGTH + 50)
    assert session_id_from({"x-session-id": long_id}, {}) == "s" * MAX_SESSION_ID_LENGTH


def test_bound_session_returns_its_provider() -> None:
    """After a bind, the session resolves to its provider; an unknown session to None."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key-1", "session-1", "gpu-a", "gpu-a", now=0)
    assert table.get("key-1", "session-1", now=1) == "gpu-a"
    assert table.get("key-1", "session-2", now=1) is None


def test_session_ids_are_scoped_by_key() -> None:
    """The same session id under two keys is two independent bindings."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key-1", "shared-id", "gpu-a", "gpu-a", now=0)
    table.bind("key-2", "shared-id", "gpu-b", "gpu-b", now=0)
    assert table.get("key-1", "shared-id", now=1) == "gpu-a"
    assert table.get("key-2", "shared-id", now=1) == "gpu-b"


def test_binding_expires_ttl_seconds_after_its_last_write() -> None:
    """A binding is live strictly less than `ttl_seconds` after its last write."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "session", "gpu-a", "gpu-a", now=0)
    assert table.get("key", "session", now=9.5) == "gpu-a"
    assert table.get("key", "session", now=10) is None
    assert len(table) == 0


def test_rewriting_a_binding_extends_its_life_but_reading_does_not() -> None:
    """Only writes slide the TTL: a rebind at t=5 lives to t=15, reads change nothing."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "read-only", "gpu-a", "gpu-a", now=0)
    table.bind("key", "rewritten", "gpu-a", "gpu-a", now=0)
    assert table.get("key", "read-only", now=5) == "gpu-a"
    table.bind("key", "rewritten", "gpu-a", "gpu-a", now=5)
    assert table.get("key", "read-only", now=12) is None
    assert table.get("key", "rewritten", now=12) == "gpu-a"


def test_aliases_of_one_routing_identity_share_a_count() -> None:
    """Sessions on two providers with one routing identity count together."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "s1", "alias-a", "account-7", now=0)
    table.bind("key", "s2", "alias-b", "account-7", now=0)
    table.bind("key", "s3", "gpu-c", "gpu-c", now=0)
    assert table.live_counts(now=1) == {"account-7": 2, "gpu-c": 1}


def test_rebinding_moves_the_count_to_the_new_identity() -> None:
    """Rebinding a session to another provider takes its count from the old identity."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "s1", "gpu-a", "gpu-a", now=0)
    table.bind("key", "s1", "gpu-b", "gpu-b", now=1)
    assert table.get("key", "s1", now=1) == "gpu-b"
    assert table.live_counts(now=1) == {"gpu-b": 1}


def test_expired_bindings_leave_the_counts() -> None:
    """Counts only include live bindings: expired ones are subtracted."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "old", "gpu-a", "gpu-a", now=0)
    table.bind("key", "new", "gpu-a", "gpu-a", now=5)
    assert table.live_counts(now=9) == {"gpu-a": 2}
    assert table.live_counts(now=12) == {"gpu-a": 1}
    assert table.live_counts(now=15) == {}


def test_capacity_evicts_the_least_recently_written_binding() -> None:
    """Over capacity, the binding written longest ago goes, and its count with it."""
    table = SessionTable(ttl_seconds=100, capacity=2)
    table.bind("key", "s1", "gpu-a", "gpu-a", now=0)
    table.bind("key", "s2", "gpu-b", "gpu-b", now=1)
    table.bind("key", "s1", "gpu-a", "gpu-a", now=2)
    table.bind("key", "s3", "gpu-c", "gpu-c", now=3)
    assert table.get("key", "s2", now=3) is None
    assert table.get("key", "s1", now=3) == "gpu-a"
    assert table.live_counts(now=3) == {"gpu-a": 1, "gpu-c": 1}
    assert len(table) == 2


def test_live_counts_is_a_snapshot() -> None:
    """Counts returned earlier do not change when the table changes afterwards."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "s1", "gpu-a", "gpu-a", now=0)
    counts = table.live_counts(now=0)
    table.bind("key", "s2", "gpu-a", "gpu-a", now=0)
    assert counts == {"gpu-a": 1}


def test_a_clock_that_steps_back_keeps_counts_exact() -> None:
    """A write with an earlier `now` than the latest counts as written at the latest time."""
    table = SessionTable(ttl_seconds=10, capacity=8)
    table.bind("key", "s1", "gpu-a", "gpu-a", now=5)
    table.bind("key", "s2", "gpu-b", "gpu-b", now=1)
    assert table.live_counts(now=14) == {"gpu-a": 1, "gpu-b": 1}
    assert table.live_counts(now=15) == {}


@pytest.mark.parametrize(("ttl_seconds", "capacity"), [(0, 8), (-1, 8), (10, 0)])
def test_table_rejects_a_non_positive_ttl_or_capacity(ttl_seconds: float, capacity: int) -> None:
    """A zero or negative TTL or capacity is a programming error."""
    with pytest.raises(ValueError, match="must be"):
        SessionTable(ttl_seconds=ttl_seconds, capacity=capacity)


IDENTITY_OF = {"alias-a": "account-7", "alias-b": "account-7", "gpu-c": "gpu-c"}
TTL_SECONDS = 10
CAPACITY = 4
key_ids = st.sampled_from(["key-1", "key-2"])
session_ids = st.sampled_from(["s1", "s2", "s3", "s4", "s5"])


class SessionTableMachine(RuleBasedStateMachine):
    """Binds, reads and clock steps in any order, checked against a brute-force model.

    The model keeps each live session's last write; on a bind it drops expired writes, adds the
    new one and, over `CAPACITY`, removes the oldest write of the key with the most writes (of
    tied keys, the one whose oldest write is older), recounting from scratch every time.
    """

    def __init__(self) -> None:
        """Start an empty table and an empty write history at time 0."""
        super().__init__()
        self.table = SessionTable(TTL_SECONDS, CAPACITY)
        self.now = 0
        self.sequence = 0
        self.last_writes: dict[tuple[str, str], tuple[str, int, int]] = {}

    def expected_live(self) -> dict[tuple[str, str], str]:
        """Return the live bindings by brute force: the model's writes, filtered by age."""
        return {
            key: provider
            for key, (provider, written_at, _) in self.last_writes.items()
            if written_at > self.now - TTL_SECONDS
        }

    @rule(key_id=key_ids, session_id=session_ids, provider=st.sampled_from(sorted(IDENTITY_OF)))
    def bind(self, key_id: str, session_id: str, provider: str) -> None:
        """Bind a session, as the proxy does after a success."""
        self.table.bind(key_id, session_id, provider, IDENTITY_OF[provider], self.now)
        self.sequence += 1
        writes = {
            key: write
            for key, write in self.last_writes.items()
            if write[1] > self.now - TTL_SECONDS
        }
        writes[(key_id, session_id)] = (provider, self.now, self.sequence)
        while len(writes) > CAPACITY:
            per_key = Counter(key for key, _ in writes)
            oldest = {
                key: min(write[2] for (owner, _), write in writes.items() if owner == key)
                for key in per_key
            }
            victim_key = max(per_key, key=lambda key: (per_key[key], -oldest[key]))
            victim = next(
                entry
                for entry, write in writes.items()
                if entry[0] == victim_key and write[2] == oldest[victim_key]
            )
            del writes[victim]
        self.last_writes = writes

    @rule(seconds=st.integers(min_value=0, max_value=7))
    def advance(self, seconds: int) -> None:
        """Let time pass, possibly past some bindings' expiry."""
        self.now += seconds

    @rule(key_id=key_ids, session_id=session_ids)
    def get_matches_the_model(self, key_id: str, session_id: str) -> None:
        """A read returns the provider exactly when the model says the binding is live."""
        expected = self.expected_live().get((key_id, session_id))
        assert self.table.get(key_id, session_id, self.now) == expected

    @rule()
    def counts_match_a_recount(self) -> None:
        """Live counts per routing identity equal a recount of the model's live bindings."""
        expected = Counter(IDENTITY_OF[provider] for provider in self.expected_live().values())
        assert self.table.live_counts(self.now) == dict(expected)

    @invariant()
    def never_over_capacity(self) -> None:
        """The table never holds more than its capacity."""
        assert len(self.table) <= CAPACITY


TestSessionCountsStayExact = SessionTableMachine.TestCase
TestSessionCountsStayExact.__doc__ = "Session counts stay exact under binds, expiry and eviction."


def test_a_key_with_10000_sessions_leaves_another_keys_binding_intact() -> None:
    """One key writing 10,000 sessions into a 4,096-entry table evicts only its own."""
    table = SessionTable(ttl_seconds=3600, capacity=4096)
    table.bind("victim", "conversation", "node-b", "node-b", now=0.0)
    for number in range(10_000):
        table.bind("flooder", f"s-{number}", "node-a", "node-a", now=1.0 + number / 1000)
    assert table.get("victim", "conversation", now=20.0) == "node-b"
    assert len(table) == 4096
    assert table.get("flooder", "s-9999", now=20.0) == "node-a"
    assert table.get("flooder", "s-0", now=20.0) is None
    assert table.live_counts(now=20.0) == {"node-a": 4095, "node-b": 1}


def test_eviction_takes_from_the_key_holding_the_most() -> None:
    """Over capacity, the largest key's least recently written session goes first."""
    table = SessionTable(ttl_seconds=100, capacity=4)
    table.bind("a", "a-1", "n", "n", now=0.0)
    table.bind("b", "b-1", "n", "n", now=1.0)
    table.bind("b", "b-2", "n", "n", now=2.0)
    table.bind("b", "b-3", "n", "n", now=3.0)
    table.bind("a", "a-2", "n", "n", now=4.0)
    assert table.get("a", "a-1", now=5.0) == "n"
    assert table.get("b", "b-1", now=5.0) is None
    assert table.get("b", "b-2", now=5.0) == "n"


def sessions_of(table: SessionTable, key_id: str, count: int, now: float) -> int:
    """How many of the key's sessions `s-0` … `s-{count-1}` are still bound."""
    return sum(table.get(key_id, f"s-{number}", now) is not None for number in range(count))


@pytest.mark.parametrize(("victim", "kept"), [(2048, 2048), (1000, 1000), (3000, 2048)])
def test_a_flood_cuts_a_victim_to_an_equal_split_and_never_below(victim: int, kept: int) -> None:
    """Another key's flood into a full 4,096-entry table: a victim holding up to its equal
    split (4,096 ÷ 2 keys) keeps every session; one holding more is cut to exactly that split
    (the guarantee a bounded table allows, as docs/design.md says), never below."""
    table = SessionTable(ttl_seconds=3600, capacity=4096)
    for number in range(victim):
        table.bind("victim", f"s-{number}", "node-b", "node-b", now=number / 1000)
    for number in range(20_000):
        table.bind("flooder", f"s-{number}", "node-a", "node-a", now=10.0 + number / 1000)
    assert sessions_of(table, "victim", victim, now=40.0) == kept
    assert len(table) == 4096
