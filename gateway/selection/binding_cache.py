"""This process's copies of shared bindings: least recently used out first, one key at a time.

With conversation-scoped affinity one key may hold a binding per conversation, so one busy
application key could fill the cache and push every other key's copies out (each then costs a
store look-up again). A key may hold at most `per_key_capacity` copies: past that it loses its
own least recently used one. Past the whole `capacity`, the least recently used copy of all
goes. Every operation is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class BindingCache(Generic[Entry]):
    """`(key id, model) → entry`, bounded overall and per key, in least-recently-used order."""

    def __init__(self, capacity: int, per_key_capacity: int) -> None:
        """Hold at most `capacity` entries, and at most `per_key_capacity` of one key."""
        if capacity < 1 or per_key_capacity < 1:
            raise ValueError("capacities must be at least 1")
        self._capacity = capacity
        self._per_key_capacity = per_key_capacity
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._by_key: dict[str, OrderedDict[str, None]] = {}

    def get(self, key: tuple[str, str]) -> Entry | None:
        """The entry, if held (its place in the order is kept: `put` marks use)."""
        return self._entries.get(key)

    def put(self, key: tuple[str, str], entry: Entry) -> None:
        """Hold `entry` as the most recently used, evicting what the bounds require."""
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        key_id, model = key
        models = self._by_key.get(key_id)
        if models is None:
            models = self._by_key[key_id] = OrderedDict()
        models[model] = None
        models.move_to_end(model)
        if len(models) > self._per_key_capacity:
            self.pop((key_id, next(iter(models))))
        while len(entries) > self._capacity:
            self.pop(next(iter(entries)))

    def pop(self, key: tuple[str, str]) -> Entry | None:
        """Forget the entry; return it, or None if it was not held."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            key_id, model = key
            models = self._by_key[key_id]
            del models[model]
            if not models:
                del self._by_key[key_id]
        return entry

    def held_by(self, key_id: str) -> int:
        """How many entries the key holds."""
        models = self._by_key.get(key_id)
        return 0 if models is None else len(models)

    def __len__(self) -> int:
        """How many entries are held."""
        return len(self._entries)
