"""One behaviour suite for every affinity store: in memory, Postgres, and Postgres via PgBouncer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest

from affinity_store.locks import NAMESPACE, SPREAD_NAMESPACE, binding_lock_key
from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import (
    AffinityStore,
    Binding,
    Candidate,
    Renewal,
    Spread,
    StoreTimeout,
)
from tests.support.polling import wait_until

pytestmark = pytest.mark.timeout(30)

TTL = 300.0
TIMEOUT = 5.0
CAP = 1000  # stored responses a key keeps
ALPHA = Candidate("alpha", "alpha")
BETA = Candidate("beta", "beta")
GAMMA = Candidate("gamma", "gamma")
EVERY_PROVIDER = frozenset({"alpha", "beta", "gamma"})

LockHolder = Callable[[str, str], AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class StoreHarness:
    """A store under test and a way to hold one binding's lock from elsewhere."""

    store: AffinityStore
    hold_binding_lock: LockHolder


def postgres_lock_holder(direct_url: str) -> LockHolder:
    """Hold a binding's advisory lock in an open transaction on a second connection."""

    @contextlib.asynccontextmanager
    async def hold(api_key_id: str, model: str) -> AsyncIterator[None]:
        """Keep the lock until the block ends."""
        connection = await asyncpg.connect(direct_url)
        try:
            async with connection.transaction():
                await connection.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    NAMESPACE,
                    binding_lock_key(api_key_id, model),
                )
                yield
        finally:
            await connection.close()

    return hold


@pytest.fixture
def memory_harness() -> StoreHarness:
    """The in-memory twin."""
    store = MemoryAffinityStore()

    @contextlib.asynccontextmanager
    async def hold(api_key_id: str, model: str) -> AsyncIterator[None]:
        """Keep the key's lock until the block ends."""
        async with store.key_lock(api_key_id, model):
            yield

    return StoreHarness(store=store, hold_binding_lock=hold)


@pytest.fixture
async def postgres_harness(database_url: str) -> AsyncIterator[StoreHarness]:
    """The Postgres store on a direct pool with the statement cache on."""
    pool = await create_pool(database_url, min_size=1, max_size=5, statement_cache_size=100)
    yield StoreHarness(PostgresAffinityStore(pool), postgres_lock_holder(database_url))
    await pool.close()


@pytest.fixture
async def pgbouncer_harness(
    pgbouncer_database_url: str, database_url: str
) -> AsyncIterator[StoreHarness]:
    """The Postgres store through transaction-pooling PgBouncer, statement cache off."""
    pool = await create_pool(pgbouncer_database_url, min_size=1, max_size=5, statement_cache_size=0)
    yield StoreHarness(PostgresAffinityStore(pool), postgres_lock_holder(database_url))
    await pool.close()


@pytest.fixture(params=["memory", "postgres", "pgbouncer"])
def harness(request: pytest.FixtureRequest) -> StoreHarness:
    """Each store implementation in turn."""
    chosen: StoreHarness = request.getfixturevalue(f"{request.param}_harness")
    return chosen


@pytest.fixture
def store(harness: StoreHarness) -> AffinityStore:
    """The store under test."""
    return harness.store


async def bind(store: AffinityStore, key: str, *candidates: Candidate, model: str = "m") -> str:
    """Claim `(key, model)` accepting any provider and return the bound provider."""
    binding = await store.claim(
        key,
        model,
        acceptable=EVERY_PROVIDER,
        preferred=list(candidates) or [ALPHA],
        ttl_seconds=TTL,
        timeout=TIMEOUT,
    )
    return binding.provider


async def backdate(
    store: AffinityStore, key: str, provider: str, seconds_ago: float, *, model: str = "m"
) -> None:
    """Make a binding expire `seconds_ago` in the past, through the public API (negative TTL)."""
    assert await store.renew(
        key, model, provider=provider, ttl_seconds=-seconds_ago, timeout=TIMEOUT
    )


async def test_lookup_misses_an_unknown_key(store: AffinityStore) -> None:
    """A key with no binding looks up as None."""
    assert await store.lookup("nobody", "m", timeout=TIMEOUT) is None


async def test_lookup_returns_the_claimed_binding(store: AffinityStore) -> None:
    """After a claim, lookup returns that binding with its database expiry and TTL left."""
    claimed = await store.claim(
        "k", "m", acceptable=EVERY_PROVIDER, preferred=[BETA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    found = await store.lookup("k", "m", timeout=TIMEOUT)
    assert found is not None
    assert (found.api_key_id, found.model, found.provider, found.routing_identity) == (
        "k",
        "m",
        "beta",
        "beta",
    )
    assert found.expires_at == claimed.expires_at
    assert found.expires_at.utcoffset() == timedelta(0)
    assert 0 < found.ttl_remaining <= TTL
    assert claimed.ttl_remaining == pytest.approx(TTL, abs=1.0)


async def test_lookup_ignores_an_expired_binding(store: AffinityStore) -> None:
    """A binding past its expiry is not returned."""
    await bind(store, "k", ALPHA)
    await backdate(store, "k", "alpha", seconds_ago=1)
    assert await store.lookup("k", "m", timeout=TIMEOUT) is None


async def test_claim_is_idempotent(store: AffinityStore) -> None:
    """Claiming again with another preference returns the existing provider unchanged."""
    first = await store.claim(
        "k", "m", acceptable=EVERY_PROVIDER, preferred=[ALPHA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    second = await store.claim(
        "k", "m", acceptable=EVERY_PROVIDER, preferred=[GAMMA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    assert second.provider == "alpha"
    assert second.expires_at == first.expires_at


async def test_claim_keeps_an_acceptable_binding_that_is_not_preferred_first(
    store: AffinityStore,
) -> None:
    """An existing live binding in `acceptable` wins over the first preferred candidate."""
    await bind(store, "k", BETA)
    binding = await store.claim(
        "k", "m", acceptable={"alpha", "beta"}, preferred=[ALPHA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    assert binding.provider == "beta"


async def test_claim_replaces_a_live_binding_that_is_not_acceptable(store: AffinityStore) -> None:
    """A live binding outside `acceptable` is replaced by a preferred candidate."""
    await bind(store, "k", BETA)
    binding = await store.claim(
        "k", "m", acceptable={"gamma"}, preferred=[GAMMA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    assert binding.provider == "gamma"
    found = await store.lookup("k", "m", timeout=TIMEOUT)
    assert found is not None
    assert found.provider == "gamma"


async def test_claim_takes_over_an_expired_binding(store: AffinityStore) -> None:
    """An expired binding counts as absent: the claim binds the preferred candidate."""
    await bind(store, "k", ALPHA)
    await backdate(store, "k", "alpha", seconds_ago=1)
    binding = await store.claim(
        "k", "m", acceptable=EVERY_PROVIDER, preferred=[BETA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    assert binding.provider == "beta"
    assert binding.ttl_remaining > 0


async def test_claim_spreads_new_keys_by_fewest_live_bindings(store: AffinityStore) -> None:
    """Thirty keys over three equal providers end up ten each, give or take one."""
    for index in range(30):
        await bind(store, f"key-{index}", ALPHA, BETA, GAMMA)
    counts = await store.count_bindings(["alpha", "beta", "gamma"], timeout=TIMEOUT)
    assert all(9 <= count <= 11 for count in counts.values()), counts
    assert sum(counts.values()) == 30


async def test_claim_breaks_ties_by_preference_order(store: AffinityStore) -> None:
    """With equal counts the earlier preferred candidate wins."""
    assert await bind(store, "k1", GAMMA, ALPHA) == "gamma"
    assert await bind(store, "k2", GAMMA, ALPHA) == "alpha"
    assert await bind(store, "k3", GAMMA, ALPHA) == "gamma"


async def test_claim_counts_aliases_under_one_routing_identity(store: AffinityStore) -> None:
    """Two providers sharing a routing identity share one live-binding count."""
    first_alias = Candidate("account-a", "account")
    second_alias = Candidate("account-b", "account")
    assert await bind(store, "k1", first_alias, second_alias, GAMMA) == "account-a"
    assert await bind(store, "k2", second_alias, first_alias, GAMMA) == "gamma"


async def test_claim_does_not_count_the_binding_it_replaces(store: AffinityStore) -> None:
    """Rebinding a key whose provider became unacceptable ignores its own old row in the counts."""
    await bind(store, "k1", ALPHA)
    await bind(store, "k2", BETA)
    binding = await store.claim(
        "k1",
        "m",
        acceptable={"beta", "gamma"},
        preferred=[ALPHA, BETA],
        ttl_seconds=TTL,
        timeout=TIMEOUT,
    )
    assert binding.provider == "alpha"


async def test_claim_rejects_an_empty_preference(store: AffinityStore) -> None:
    """A claim with no candidate is a programming error."""
    with pytest.raises(ValueError, match="preferred"):
        await store.claim(
            "k", "m", acceptable=EVERY_PROVIDER, preferred=[], ttl_seconds=TTL, timeout=TIMEOUT
        )


async def test_renew_extends_only_for_the_bound_provider(store: AffinityStore) -> None:
    """Renew is a compare-and-set on the provider: the bound one extends, others change nothing."""
    await bind(store, "k", ALPHA)
    assert await store.renew("k", "m", provider="alpha", ttl_seconds=10, timeout=TIMEOUT)
    assert not await store.renew("k", "m", provider="beta", ttl_seconds=TTL, timeout=TIMEOUT)
    unchanged = await store.lookup("k", "m", timeout=TIMEOUT)
    assert unchanged is not None
    assert unchanged.ttl_remaining <= 10
    assert await store.renew("k", "m", provider="alpha", ttl_seconds=TTL, timeout=TIMEOUT)
    renewed = await store.lookup("k", "m", timeout=TIMEOUT)
    assert renewed is not None
    assert renewed.ttl_remaining > TTL - 5


async def test_renew_of_a_missing_binding_changes_nothing(store: AffinityStore) -> None:
    """Renewing a key that has no row returns False and creates nothing."""
    assert not await store.renew("k", "m", provider="alpha", ttl_seconds=TTL, timeout=TIMEOUT)
    assert await store.lookup("k", "m", timeout=TIMEOUT) is None


async def test_rebind_moves_the_binding_from_the_old_provider(store: AffinityStore) -> None:
    """Rebind from the bound provider moves the binding to the new candidate."""
    await bind(store, "k", ALPHA)
    assert await store.rebind(
        "k", "m", old_provider="alpha", new=BETA, ttl_seconds=TTL, timeout=TIMEOUT
    )
    found = await store.lookup("k", "m", timeout=TIMEOUT)
    assert found is not None
    assert (found.provider, found.routing_identity) == ("beta", "beta")


async def test_rebind_from_a_stale_provider_changes_nothing(store: AffinityStore) -> None:
    """Rebind is a compare-and-set: naming a provider that is no longer bound does nothing."""
    await bind(store, "k", GAMMA)
    assert not await store.rebind(
        "k", "m", old_provider="alpha", new=BETA, ttl_seconds=TTL, timeout=TIMEOUT
    )
    found = await store.lookup("k", "m", timeout=TIMEOUT)
    assert found is not None
    assert found.provider == "gamma"


async def test_rebind_creates_a_binding_when_none_exists(store: AffinityStore) -> None:
    """With no row at all, rebind inserts the new binding."""
    assert await store.rebind(
        "k", "m", old_provider="alpha", new=BETA, ttl_seconds=TTL, timeout=TIMEOUT
    )
    found = await store.lookup("k", "m", timeout=TIMEOUT)
    assert found is not None
    assert found.provider == "beta"


async def test_late_renewal_for_the_old_provider_cannot_resurrect_it(store: AffinityStore) -> None:
    """After a rebind, a renewal queued for the old provider fails and the new binding stays."""
    await bind(store, "k", ALPHA)
    assert await store.rebind(
        "k", "m", old_provider="alpha", new=BETA, ttl_seconds=TTL, timeout=TIMEOUT
    )
    assert not await store.renew("k", "m", provider="alpha", ttl_seconds=TTL, timeout=TIMEOUT)
    found = await store.lookup("k", "m", timeout=TIMEOUT)
    assert found is not None
    assert found.provider == "beta"


async def test_count_bindings_counts_rows_until_the_janitor_deletes_them(
    store: AffinityStore,
) -> None:
    """Identities with no binding count 0; an expired binding counts until it is purged."""
    await bind(store, "k1", ALPHA)
    await bind(store, "k2", ALPHA)
    await bind(store, "k3", BETA)
    await backdate(store, "k3", "beta", seconds_ago=1)
    counts = await store.count_bindings(["alpha", "beta", "gamma"], timeout=TIMEOUT)
    assert counts == {"alpha": 2, "beta": 1, "gamma": 0}
    assert await store.purge_expired(grace_seconds=0, batch_size=100, timeout=TIMEOUT) == 1
    counts = await store.count_bindings(["alpha", "beta", "gamma"], timeout=TIMEOUT)
    assert counts == {"alpha": 2, "beta": 0, "gamma": 0}


async def test_claim_keeps_the_first_candidate_within_the_spread_allowance(
    store: AffinityStore,
) -> None:
    """With an allowance of two, the first candidate takes three keys before the claim spreads."""
    spread = Spread(share=0.1, minimum=2)
    chosen = [
        (
            await store.claim(
                f"key-{index}",
                "m",
                acceptable=EVERY_PROVIDER,
                preferred=[GAMMA, ALPHA, BETA],
                ttl_seconds=TTL,
                timeout=TIMEOUT,
                spread=spread,
            )
        ).provider
        for index in range(4)
    ]
    assert chosen == ["gamma", "gamma", "gamma", "alpha"]


async def test_claim_replacing_a_binding_moves_its_count(store: AffinityStore) -> None:
    """A claim that replaces an unacceptable binding counts it once, under the new identity."""
    await bind(store, "k", ALPHA)
    await store.claim(
        "k", "m", acceptable={"beta"}, preferred=[BETA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    counts = await store.count_bindings(["alpha", "beta"], timeout=TIMEOUT)
    assert counts == {"alpha": 0, "beta": 1}


async def test_rebind_moves_the_count_and_a_stale_rebind_does_not(store: AffinityStore) -> None:
    """A rebind moves one count to the new identity; a compare-and-set miss moves nothing."""
    await bind(store, "k", ALPHA)
    assert await store.rebind(
        "k", "m", old_provider="alpha", new=BETA, ttl_seconds=TTL, timeout=TIMEOUT
    )
    assert not await store.rebind(
        "k", "m", old_provider="alpha", new=GAMMA, ttl_seconds=TTL, timeout=TIMEOUT
    )
    counts = await store.count_bindings(["alpha", "beta", "gamma"], timeout=TIMEOUT)
    assert counts == {"alpha": 0, "beta": 1, "gamma": 0}


async def test_renew_many_renews_only_bindings_that_still_match(store: AffinityStore) -> None:
    """One batch renews the matching bindings and reports exactly those."""
    await bind(store, "k1", ALPHA)
    await bind(store, "k2", BETA)
    await backdate(store, "k1", "alpha", seconds_ago=1)
    renewed = await store.renew_many(
        [Renewal("k1", "m", "alpha"), Renewal("k2", "m", "gamma"), Renewal("k3", "m", "alpha")],
        ttl_seconds=TTL,
        timeout=TIMEOUT,
    )
    assert renewed == {("k1", "m")}
    found = await store.lookup("k1", "m", timeout=TIMEOUT)
    assert found is not None
    assert found.ttl_remaining > TTL - 5
    assert await store.renew_many([], ttl_seconds=TTL, timeout=TIMEOUT) == set()


async def test_purge_deletes_only_bindings_expired_beyond_the_grace(store: AffinityStore) -> None:
    """Rows expired longer than the grace go; recently expired and live rows stay."""
    for key, provider in (("live", ALPHA), ("recent", BETA), ("old-1", GAMMA), ("old-2", GAMMA)):
        await bind(store, key, provider)
    await backdate(store, "recent", "beta", seconds_ago=5)
    await backdate(store, "old-1", "gamma", seconds_ago=120)
    await backdate(store, "old-2", "gamma", seconds_ago=120)
    assert await store.purge_expired(grace_seconds=60, batch_size=100, timeout=TIMEOUT) == 2
    assert await store.purge_expired(grace_seconds=60, batch_size=100, timeout=TIMEOUT) == 0
    assert await store.purge_expired(grace_seconds=0, batch_size=100, timeout=TIMEOUT) == 1
    assert await store.lookup("live", "m", timeout=TIMEOUT) is not None


async def test_purge_works_through_several_batches(store: AffinityStore) -> None:
    """A purge with a small batch size keeps going until every old row is gone."""
    for index in range(7):
        await bind(store, f"old-{index}", ALPHA)
        await backdate(store, f"old-{index}", "alpha", seconds_ago=120)
    assert await store.purge_expired(grace_seconds=60, batch_size=3, timeout=TIMEOUT) == 7
    assert await store.purge_expired(grace_seconds=0, batch_size=3, timeout=TIMEOUT) == 0


async def test_list_bindings_filters_and_orders(store: AffinityStore) -> None:
    """Listing returns live bindings by key then model, filtered by key, model and limit."""
    await bind(store, "k2", ALPHA, model="m1")
    await bind(store, "k1", BETA, model="m2")
    await bind(store, "k1", GAMMA, model="m1")
    await bind(store, "k3", ALPHA, model="m1")
    await backdate(store, "k3", "alpha", seconds_ago=1, model="m1")

    def pairs(bindings: list[Binding]) -> list[tuple[str, str]]:
        """Reduce bindings to their (key id, model) pairs, in order."""
        return [(binding.api_key_id, binding.model) for binding in bindings]

    everything = await store.list_bindings(timeout=TIMEOUT)
    assert pairs(everything) == [("k1", "m1"), ("k1", "m2"), ("k2", "m1")]
    assert all(binding.ttl_remaining > 0 for binding in everything)
    assert pairs(await store.list_bindings(api_key_id="k1", timeout=TIMEOUT)) == [
        ("k1", "m1"),
        ("k1", "m2"),
    ]
    assert pairs(await store.list_bindings(model="m1", timeout=TIMEOUT)) == [
        ("k1", "m1"),
        ("k2", "m1"),
    ]
    assert pairs(await store.list_bindings(api_key_id="k1", model="m2", timeout=TIMEOUT)) == [
        ("k1", "m2")
    ]
    assert pairs(await store.list_bindings(limit=1, timeout=TIMEOUT)) == [("k1", "m1")]


async def test_lookup_does_not_wait_for_a_held_binding_lock(harness: StoreHarness) -> None:
    """While another session holds the key's lock, lookup still answers at once."""
    await bind(harness.store, "k", BETA)
    async with harness.hold_binding_lock("k", "m"):
        found = await harness.store.lookup("k", "m", timeout=2.0)
    assert found is not None
    assert found.provider == "beta"


async def test_claim_waits_for_a_held_binding_lock_then_times_out(harness: StoreHarness) -> None:
    """While another session holds the key's lock, a claim waits and then raises StoreTimeout."""
    async with harness.hold_binding_lock("k", "m"):
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            await harness.store.claim(
                "k",
                "m",
                acceptable=EVERY_PROVIDER,
                preferred=[ALPHA],
                ttl_seconds=TTL,
                timeout=0.3,
            )
        waited = time.monotonic() - started
    assert 0.2 <= waited < 2.0
    assert await harness.store.lookup("k", "m", timeout=TIMEOUT) is None


async def test_claims_for_different_keys_pick_independent_bindings(store: AffinityStore) -> None:
    """Bindings of one key never leak into another key's lookup."""
    await bind(store, "k1", ALPHA)
    await bind(store, "k2", BETA, model="other")
    assert await store.lookup("k1", "other", timeout=TIMEOUT) is None
    assert await store.lookup("k2", "m", timeout=TIMEOUT) is None
    providers = Counter(
        [await bind(store, "k1", GAMMA), await bind(store, "k2", GAMMA, model="other")]
    )
    assert providers == Counter({"alpha": 1, "beta": 1})


async def test_a_recorded_response_names_its_provider(store: AffinityStore) -> None:
    """`record_response` then `response_provider` gives the provider; unknown ids give None."""
    await store.record_response(
        "resp_1", "alpha", api_key_id="k", ttl_seconds=TTL, max_per_key=CAP, timeout=TIMEOUT
    )
    assert await store.response_provider("resp_1", api_key_id="k", timeout=TIMEOUT) == "alpha"
    assert await store.response_provider("resp_unknown", api_key_id="k", timeout=TIMEOUT) is None


async def test_recording_a_response_again_moves_it(store: AffinityStore) -> None:
    """A second record of the same id replaces the provider."""
    await store.record_response(
        "resp_2", "alpha", api_key_id="k", ttl_seconds=TTL, max_per_key=CAP, timeout=TIMEOUT
    )
    await store.record_response(
        "resp_2", "beta", api_key_id="k", ttl_seconds=TTL, max_per_key=CAP, timeout=TIMEOUT
    )
    assert await store.response_provider("resp_2", api_key_id="k", timeout=TIMEOUT) == "beta"


async def test_an_expired_response_binding_is_unknown(store: AffinityStore) -> None:
    """Once its TTL passed, a response id no longer names a provider (polled, bounded)."""
    await store.record_response(
        "resp_3", "alpha", api_key_id="k", ttl_seconds=0.05, max_per_key=CAP, timeout=TIMEOUT
    )

    async def expired() -> bool:
        return await store.response_provider("resp_3", api_key_id="k", timeout=TIMEOUT) is None

    await wait_until(expired, message="the response binding to expire")


async def test_a_response_is_found_only_by_the_key_that_created_it(store: AffinityStore) -> None:
    """Another key asking for the same response id finds nothing."""
    await store.record_response(
        "resp_4", "alpha", api_key_id="k", ttl_seconds=TTL, max_per_key=CAP, timeout=TIMEOUT
    )
    assert await store.response_provider("resp_4", api_key_id="k", timeout=TIMEOUT) == "alpha"
    assert await store.response_provider("resp_4", api_key_id="other", timeout=TIMEOUT) is None


async def record(store: AffinityStore, response_id: str, provider: str, key: str, cap: int) -> bool:
    """Record a response for `key`, keeping at most `cap` per key; whether it was written."""
    return await store.record_response(
        response_id, provider, api_key_id=key, ttl_seconds=TTL, max_per_key=cap, timeout=TIMEOUT
    )


async def test_another_key_cannot_take_over_a_response_id(store: AffinityStore) -> None:
    """A second key recording the same id writes nothing: the creator still finds it on its
    node, the other key finds nothing, and the id is taken for the other key only."""
    assert await record(store, "resp_owned", "alpha", "creator", CAP)
    assert not await record(store, "resp_owned", "beta", "intruder", CAP)
    assert await store.response_provider("resp_owned", api_key_id="creator", timeout=TIMEOUT) == (
        "alpha"
    )
    assert (
        await store.response_provider("resp_owned", api_key_id="intruder", timeout=TIMEOUT) is None
    )
    assert await store.response_taken("resp_owned", api_key_id="intruder", timeout=TIMEOUT)
    assert not await store.response_taken("resp_owned", api_key_id="creator", timeout=TIMEOUT)
    assert not await store.response_taken("resp_free", api_key_id="intruder", timeout=TIMEOUT)


async def test_an_expired_response_id_stays_its_creators(store: AffinityStore) -> None:
    """Expired but not yet deleted, a response id is still not another key's to record."""
    await store.record_response(
        "resp_lapsed",
        "alpha",
        api_key_id="creator",
        ttl_seconds=-1,
        max_per_key=CAP,
        timeout=TIMEOUT,
    )
    assert not await record(store, "resp_lapsed", "beta", "intruder", CAP)
    assert await store.response_taken("resp_lapsed", api_key_id="intruder", timeout=TIMEOUT)


async def test_a_key_keeps_only_its_newest_responses(store: AffinityStore) -> None:
    """Past `max_per_key`, each new response of a key evicts that key's oldest; another key's
    responses are untouched, and re-recording an id makes it the newest."""
    key = f"capped-{time.monotonic_ns()}"
    other = f"other-{time.monotonic_ns()}"
    assert await record(store, f"{other}-0", "alpha", other, 2)
    for index in range(3):
        assert await record(store, f"{key}-{index}", "alpha", key, 3)
    assert await record(store, f"{key}-0", "beta", key, 3)  # now the newest
    assert await record(store, f"{key}-3", "alpha", key, 3)
    assert await record(store, f"{key}-4", "alpha", key, 3)

    async def found(response_id: str, owner: str) -> bool:
        provider = await store.response_provider(response_id, api_key_id=owner, timeout=TIMEOUT)
        return provider is not None

    assert [await found(f"{key}-{index}", key) for index in range(5)] == [
        True,
        False,
        False,
        True,
        True,
    ]
    assert await found(f"{other}-0", other)


async def test_claim_spreads_by_capacity(store: AffinityStore) -> None:
    """A node with twice the KV cache takes twice the new bindings."""
    spread = Spread(weights={"alpha": 2000.0, "beta": 1000.0})
    for index in range(30):
        await store.claim(
            f"key-{index}",
            "m",
            acceptable=EVERY_PROVIDER,
            preferred=[BETA, ALPHA] if index % 2 else [ALPHA, BETA],
            ttl_seconds=TTL,
            timeout=TIMEOUT,
            spread=spread,
        )
    counts = await store.count_bindings(["alpha", "beta"], timeout=TIMEOUT)
    assert counts == {"alpha": 20, "beta": 10}


async def test_a_full_candidate_takes_no_new_binding(store: AffinityStore) -> None:
    """Weight 0 (a nearly full cache): the claim passes over it, even when it is preferred
    first and holds the fewest bindings; when every candidate is full, the first wins."""
    await bind(store, "k0", BETA)
    full_alpha = Spread(weights={"alpha": 0.0, "beta": 1000.0, "gamma": 1000.0})
    chosen = [
        (
            await store.claim(
                f"k{index}",
                "m",
                acceptable=EVERY_PROVIDER,
                preferred=[ALPHA, BETA, GAMMA],
                ttl_seconds=TTL,
                timeout=TIMEOUT,
                spread=full_alpha,
            )
        ).provider
        for index in range(1, 5)
    ]
    assert Counter(chosen) == Counter({"gamma": 2, "beta": 2})
    all_full = Spread(weights={"alpha": 0.0, "beta": 0.0})
    binding = await store.claim(
        "k9",
        "m",
        acceptable=EVERY_PROVIDER,
        preferred=[ALPHA, BETA],
        ttl_seconds=TTL,
        timeout=TIMEOUT,
        spread=all_full,
    )
    assert binding.provider == "alpha"


@pytest.fixture(params=["postgres", "pgbouncer"])
def sql_harness(request: pytest.FixtureRequest) -> StoreHarness:
    """Each Postgres store in turn (the memory twin chooses in one step: nothing to queue)."""
    chosen: StoreHarness = request.getfixturevalue(f"{request.param}_harness")
    return chosen


async def test_claims_of_one_spread_group_choose_one_at_a_time(
    sql_harness: StoreHarness, database_url: str
) -> None:
    """Simultaneous claims of one key's new conversations (one spread group) queue on the
    group's lock and each sees the bindings the earlier ones made: no pile-up on one node."""
    harness = sql_harness
    candidates = [Candidate(name, f"group-{name}") for name in ("p1", "p2", "p3")]
    spread = Spread(group="app\nm")
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            SPREAD_NAMESPACE,
            binding_lock_key("app\nm", ""),
        )
        claims = [
            asyncio.create_task(
                harness.store.claim(
                    "app",
                    f"m#conversation-{index}",
                    acceptable=EVERY_PROVIDER,
                    preferred=candidates,
                    ttl_seconds=TTL,
                    timeout=TIMEOUT,
                    spread=spread,
                )
            )
            for index in range(4)
        ]

        async def all_waiting() -> bool:
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid::int8 = $1",
                SPREAD_NAMESPACE,
            )
            return bool(waiting == len(claims))

        await wait_until(all_waiting, timeout=10, message="every claim waiting on the group")
        await transaction.rollback()
        providers = Counter(binding.provider for binding in await asyncio.gather(*claims))
    finally:
        await holder.close()
    assert providers == Counter({"p1": 2, "p2": 1, "p3": 1})
