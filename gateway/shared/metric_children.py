"""Children of a labelled metric family, looked up once per label values instead of per use."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client.metrics import MetricWrapperBase

Family = TypeVar("Family", bound=MetricWrapperBase)

# Label values a family sees in practice: models by providers by outcomes. Past this (a config
# churning through names) the cache starts over rather than growing.
MAX_CHILDREN = 4096


class Children(Generic[Family]):
    """The children of one family by label values, each resolved through `labels()` once.

    A child stays valid for the family's lifetime (nothing removes children), so a reload that
    changes the label sets only adds entries; the cache is bounded all the same.
    """

    def __init__(self, family: Family, limit: int = MAX_CHILDREN) -> None:
        self._family = family
        self._limit = limit
        self._children: dict[tuple[str, ...], Family] = {}

    def of(self, *values: str) -> Family:
        """The child for these label values."""
        child = self._children.get(values)
        if child is None:
            if len(self._children) >= self._limit:
                self._children.clear()
            child = self._children[values] = self._family.labels(*values)
        return child
