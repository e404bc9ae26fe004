"""Time-to-first-token samples per (provider, model) over a sliding window, and latency bands.

A band is the provider's smoothed TTFT measured against the model's global mean, in steps of
two tolerances: band 0 is ``global ± tolerance``, so near-average and unsampled providers tie
and fall through to round robin instead of the fastest one winning every request.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_SAMPLES_PER_SERIES = 1024
"""Most samples kept per (provider, model): the oldest is dropped first, so memory is bounded and
a very busy provider's mean covers its latest 1024 requests rather than the whole window."""

PRIOR_WEIGHT = 5
"""How many samples' worth of the global mean is blended into every provider's score."""

MINIMUM_TOLERANCE_SECONDS = 0.001
DEFAULT_BAND_FRACTION = 0.15
DEFAULT_MIN_SAMPLES = 20


def round_half_away_from_zero(value: float) -> int:
    """Round a finite number to the nearest integer, halves away from zero (2.5 → 3, -0.5 → -1)."""
    magnitude = abs(value)
    whole = math.floor(magnitude)
    # magnitude - whole is exact in binary floating point, unlike magnitude + 0.5.
    if magnitude - whole >= 0.5:
        whole += 1
    return -whole if value < 0 else whole


@dataclass(frozen=True, slots=True)
class ProviderLatency:
    """One provider's TTFT summary for a model: mean and count in the window, score and band."""

    provider: str
    mean_seconds: float | None
    sample_count: int
    score_seconds: float | None
    band: int


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """A model's latency state for the status page: global mean, sample count, per provider."""

    model: str
    global_mean_seconds: float | None
    sample_count: int
    banding_active: bool
    providers: tuple[ProviderLatency, ...]


@dataclass(slots=True)
class _Series:
    """Samples of one (provider, model) in arrival order, with their running total."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0


@dataclass(slots=True)
class _ModelSamples:
    """Every series of one model, with the model-wide running total and count."""

    series: dict[str, _Series] = field(default_factory=dict)
    total: float = 0.0
    count: int = 0
    oldest_at: float = math.inf
    """A lower bound on the oldest sample time: nothing can expire before it passes the cutoff."""


class LatencyTracker:
    """Keeps TTFT samples per (provider, model) with running totals; old samples expire lazily."""

    def __init__(
        self, window_seconds: float, *, max_samples_per_series: int = MAX_SAMPLES_PER_SERIES
    ) -> None:
        """Track samples younger than `window_seconds`, at most `max_samples_per_series` each."""
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if max_samples_per_series < 1:
            raise ValueError("max_samples_per_series must be at least 1")
        self._window_seconds = window_seconds
        self._max_samples_per_series = max_samples_per_series
        self._models: dict[str, _ModelSamples] = {}

    def record(self, provider: str, model: str, ttft_seconds: float, now: float) -> None:
        """Add one TTFT sample taken at monotonic time `now`; ignore non-finite or negative ones."""
        if not math.isfinite(ttft_seconds) or ttft_seconds < 0:
            return
        model_samples = self._models.get(model)
        if model_samples is None:
            model_samples = self._models[model] = _ModelSamples()
        self._expire(model_samples, now)
        series = model_samples.series.get(provider)
        if series is None:
            series = model_samples.series[provider] = _Series()
        if len(series.samples) >= self._max_samples_per_series:
            _, dropped = series.samples.popleft()
            self._subtract(model_samples, series, dropped)
        series.samples.append((now, ttft_seconds))
        series.total += ttft_seconds
        model_samples.total += ttft_seconds
        model_samples.count += 1
        model_samples.oldest_at = min(model_samples.oldest_at, now)

    def bands(
        self,
        model: str,
        providers: Sequence[str],
        now: float,
        *,
        band_fraction: float,
        min_samples: int,
        enabled: bool,
    ) -> dict[str, int]:
        """Return each provider's latency band for `model` (lower is faster, 0 is near average)."""
        bands = dict.fromkeys(providers, 0)
        if not enabled:
            return bands
        model_samples = self._models.get(model)
        if model_samples is None:
            return bands
        global_mean = self._global_mean(model_samples, now, min_samples)
        if global_mean is None:
            return bands
        band_width = 2 * _tolerance(global_mean, band_fraction)
        series_by_provider = model_samples.series
        for provider in providers:
            series = series_by_provider.get(provider)
            if series is None or not series.samples:
                continue
            score = _score(series, global_mean)
            bands[provider] = round_half_away_from_zero((score - global_mean) / band_width)
        return bands

    def snapshot(
        self,
        model: str,
        now: float,
        *,
        providers: Sequence[str] = (),
        band_fraction: float = DEFAULT_BAND_FRACTION,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ) -> LatencySnapshot:
        """Summarise `model` for the status page: sampled providers plus those in `providers`."""
        model_samples = self._models.get(model)
        if model_samples is None:
            model_samples = _ModelSamples()
        global_mean = self._global_mean(model_samples, now, min_samples)
        names = [name for name, series in model_samples.series.items() if series.samples]
        names += [name for name in providers if name not in names]
        bands = self.bands(
            model,
            names,
            now,
            band_fraction=band_fraction,
            min_samples=min_samples,
            enabled=True,
        )
        entries = []
        for name in sorted(names):
            series = model_samples.series.get(name)
            count = len(series.samples) if series is not None else 0
            mean = series.total / count if series is not None and count else None
            if global_mean is None:
                score = None
            elif series is None or not count:
                score = global_mean
            else:
                score = _score(series, global_mean)
            entries.append(ProviderLatency(name, mean, count, score, bands[name]))
        raw_mean = model_samples.total / model_samples.count if model_samples.count else None
        return LatencySnapshot(
            model=model,
            global_mean_seconds=raw_mean,
            sample_count=model_samples.count,
            banding_active=global_mean is not None,
            providers=tuple(entries),
        )

    def _global_mean(
        self, model_samples: _ModelSamples, now: float, min_samples: int
    ) -> float | None:
        """Expire old samples and return the model's mean, or None when banding must stay off."""
        self._expire(model_samples, now)
        count = model_samples.count
        if count == 0 or count < min_samples:
            return None
        global_mean = model_samples.total / count
        return global_mean if math.isfinite(global_mean) else None

    def _expire(self, model_samples: _ModelSamples, now: float) -> None:
        """Drop the model's samples that are `window_seconds` old or older."""
        cutoff = now - self._window_seconds
        if model_samples.oldest_at > cutoff:
            return
        oldest_at = math.inf
        for series in model_samples.series.values():
            samples = series.samples
            while samples and samples[0][0] <= cutoff:
                _, dropped = samples.popleft()
                self._subtract(model_samples, series, dropped)
            if samples:
                oldest_at = min(oldest_at, samples[0][0])
        model_samples.oldest_at = oldest_at

    @staticmethod
    def _subtract(model_samples: _ModelSamples, series: _Series, dropped: float) -> None:
        """Take one removed sample out of the running totals, without letting rounding drift."""
        series.total -= dropped
        model_samples.total -= dropped
        model_samples.count -= 1
        if not series.samples:
            series.total = 0.0
        elif not math.isfinite(series.total):
            # Only reachable after an overflow; re-summing is rare and bounded by the cap.
            series.total = math.fsum(value for _, value in series.samples)
        if model_samples.count == 0:
            model_samples.total = 0.0
        elif not math.isfinite(model_samples.total):
            for each in model_samples.series.values():
                each.total = math.fsum(value for _, value in each.samples)
            model_samples.total = math.fsum(each.total for each in model_samples.series.values())


def _tolerance(global_mean: float, band_fraction: float) -> float:
    """Return the half-width of band 0: a fraction of the global mean, at least one millisecond."""
    return max(global_mean * band_fraction, MINIMUM_TOLERANCE_SECONDS)


def _score(series: _Series, global_mean: float) -> float:
    """Return the series mean blended with `PRIOR_WEIGHT` samples of the global mean."""
    count = len(series.samples)
    return (series.total + global_mean * PRIOR_WEIGHT) / (count + PRIOR_WEIGHT)
