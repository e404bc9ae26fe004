"""A small PromQL reader for tests: which metric families and labels an expression names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

from gateway.shared.metrics import Metrics

TARGET_LABELS = frozenset({"job", "instance"})
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


@dataclass(frozen=True)
class Family:
    """One metric family of `gateway.shared.metrics.Metrics`, as registered."""

    name: str
    kind: str
    labels: frozenset[str]

    def series_names(self) -> frozenset[str]:
        """The names its samples are scraped under."""
        if self.kind == "counter":
            return frozenset({f"{self.name}_total"})
        if self.kind == "histogram":
            return frozenset(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return frozenset({self.name})

    def labels_of(self, series: str) -> frozenset[str]:
        """The labels a selector of `series` may match on."""
        extra = {"le"} if series.endswith("_bucket") else set()
        return self.labels | TARGET_LABELS | extra


def metric_families() -> dict[str, Family]:
    """Every family the gateway registers, by each series name it is scraped under."""
    families: dict[str, Family] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus-client has no public accessor for a family's name, type and labels.
            family = Family(metric._name, str(metric._type), frozenset(metric._labelnames))
            families.update(dict.fromkeys(family.series_names(), family))
    return families


@dataclass(frozen=True)
class QueryReferences:
    """The series and label names one PromQL expression mentions."""

    series: frozenset[str]
    selector_labels: tuple[tuple[str, frozenset[str]], ...]  # (series, labels it matches)
    grouping_labels: frozenset[str]


def promql_references(expression: str) -> QueryReferences:
    """Pull metric and label names out of a PromQL expression (Grafana variables allowed)."""
    text = re.sub(r"\$\{?\w+\}?", "", expression)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', text)
    selector_labels: list[tuple[str, frozenset[str]]] = []

    def selector(match: re.Match[str]) -> str:
        matched = frozenset(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", match.group(2)))
        selector_labels.append((match.group(1), matched))
        return match.group(1)

    text = re.sub(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", selector, text)
    grouping: set[str] = set()

    def clause(match: re.Match[str]) -> str:
        grouping.update(re.findall(r"[A-Za-z_]\w*", match.group(2)))
        return " "

    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", clause, text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    series = {
        match.group(0)
        for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()", text)
        if match.group(0) not in PROMQL_KEYWORDS
    }
    series.update(name for name, _ in selector_labels)
    return QueryReferences(frozenset(series), tuple(selector_labels), frozenset(grouping))


def query_problems(expression: str, families: Mapping[str, Family]) -> list[str]:
    """Every unknown series, or label unknown to the families it is used with, in `expression`."""
    references = promql_references(expression)
    problems = [f"unknown series {name}" for name in references.series if name not in families]
    known = [(name, families[name]) for name in references.series if name in families]
    for name, labels in references.selector_labels:
        if name in families and not labels <= families[name].labels_of(name):
            problems.append(f"{name} has no label {sorted(labels - families[name].labels)}")
    allowed = set().union(*(family.labels_of(name) for name, family in known))
    if unknown := references.grouping_labels - allowed:
        problems.append(f"grouping by unknown labels {sorted(unknown)}")
    if not references.series:
        problems.append("names no series")
    return problems
