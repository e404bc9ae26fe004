"""Advisory lock keys: stable, signed 32-bit, and distinct where it matters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from affinity_store.locks import (
    MAINTENANCE_NAMESPACE,
    NAMESPACE,
    binding_lock_key,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def test_binding_lock_key_is_a_fixed_value_across_processes() -> None:
    """The key is derived from SHA-256, not Python's salted hash, so it never changes."""
    assert binding_lock_key("key-1", "model-a") == binding_lock_key("key-1", "model-a")
    assert binding_lock_key("key-1", "model-a") == 986943552


@given(st.text(), st.text())
def test_binding_lock_key_fits_a_signed_int4(api_key_id: str, model: str) -> None:
    """Every key is a valid Postgres int4."""
    assert INT32_MIN <= binding_lock_key(api_key_id, model) <= INT32_MAX


def test_binding_lock_key_separates_the_two_parts() -> None:
    """Moving characters between key id and model gives another lock key."""
    assert binding_lock_key("ab", "c") != binding_lock_key("a", "bc")


def test_namespaces_are_distinct_int4_values() -> None:
    """Binding and maintenance locks live in different, valid namespaces."""
    assert NAMESPACE != MAINTENANCE_NAMESPACE
    assert all(INT32_MIN <= value <= INT32_MAX for value in (NAMESPACE, MAINTENANCE_NAMESPACE))
