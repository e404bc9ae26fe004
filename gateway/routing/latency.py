"""Time-to-first-token samples per (provider, model) over a sliding window, and latency bands.

A band is the provider's smoothed TTFT measured against the model's global mean, in steps of
two tolerances: band 0 is ``global ± tolerance``, so near-average and unsampled providers tie
and fall through to round robin instead of the fastest one winning every request.

These are one process's own samples, for providers whose nodes publish no figures of their own
(`gateway.routing.node_latency` has the fleet-wide view). A provider banded slow gets little new
traffic and so few new samples: a series with no sample for `max_age_seconds` is dropped, so
"no sample" reads as average, never as slow, and the provider is tried (and measured) again.
A provider changes band with hysteresis, as the fleet view's do.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_SAMPLES_PER_SERIES = 1024
"""Most samples kept per (provider, model): the oldest is dropped first, so memory is bounded and
a very busy provider's mean covers its latest 1024 requests rather than the whole window."""

MAX_SAMPLE_SECONDS = 86_400.0
"""Longer durations are recorded as this; no first token takes a day, and it bounds the totals."""

PRIOR_WEIGHT = 5
"""How many samples' worth of the global mean is blended into every provider's score."""

MINIMUM_TOLERANCE_SECONDS = 0.001
DEFAULT_BAND_FRACTION = 0.15
DEFAULT_MIN_SAMPLES = 20

_MICROSECONDS_PER_SECOND = 1_000_000


def round_half_away_from_zero(value: float) -> int:
    """Round a finite number to the nearest integer, halves away from zero (2.5 → 3, -0.5 → -1)."""
    magnitude = abs(value)
    whole = math.floor(magnitude)
    # magnitude - whole is exact in binary floating point, unlike magnitude + 0.5.
    if magnitude - whole >= 0.5:
        whole += 1
    return -whole if value < 0 else whole


def score_band(score: float, global_mean: float, band_fraction: float) -> int:
    """Return the band of `score` around `global_mean` (0 within tolerance, or if not finite)."""
    if not (math.isfinite(global_mean) and math.isfinite(score)):
        return 0
    return round_half_away_from_zero(
        (score - global_mean) / (2 * _tolerance(global_mean, band_fraction))
    )


def held_band(position: float, previous: int | None, hysteresis: float) -> int:
    """The band for `position` (band widths from the reference), kept at `previous` unless the
    position is `hysteresis` band widths inside another band (0 <= hysteresis < 0.5)."""
    if previous is None:
        return round_half_away_from_zero(position)
    upward = math.floor(position + 0.5 - hysteresis)
    if upward > previous:
        return upward
    downward = math.ceil(position - 0.5 + hysteresis)
    if downward < previous:
        return downward
    return previous


def _tolerance(global_mean: float, band_fraction: float) -> float:
    """Return the half-width of band 0: a fraction of the global mean, at least 1 ms."""
    return max(global_mean * band_fraction, MINIMUM_TOLERANCE_SECONDS)


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
    """Samples of one (provider, model) as (time, microseconds), oldest first, with their total."""

    samples: deque[tuple[float, int]] = field(default_factory=deque)
    total_microseconds: int = 0
    band: int | None = None
    """The band last given, which hysteresis holds until the score is clearly in another."""

    def score(self, global_mean: float) -> float:
        """Return the series mean blended with `PRIOR_WEIGHT` samples of the global mean."""
        if not self.samples:
            return global_mean
        total = self.total_microseconds / _MICROSECONDS_PER_SECOND
        return (total + global_mean * PRIOR_WEIGHT) / (len(self.samples) + PRIOR_WEIGHT)


@dataclass(slots=True)
class _ModelSamples:
    """Every series of one model, with the model-wide total and count.

    Totals are integer microseconds, so adding and expiring samples never drifts.
    """

    series: dict[str, _Series] = field(default_factory=dict)
    total_microseconds: int = 0
    count: int = 0
    oldest_at: float = math.inf
    """A lower bound on the oldest sample time: nothing expires before it passes the cutoff."""
    stale_check_at: float = math.inf
    """No series can have gone stale (no sample for the maximum age) before this time."""

    def mean(self) -> float | None:
        """Return the mean over every sample of the model, None without samples."""
        if not self.count:
            return None
        return self.total_microseconds / self.count / _MICROSECONDS_PER_SECOND


class LatencyTracker:
    """Keeps TTFT samples per (provider, model) with running totals; old samples expire lazily."""

    def __init__(
        self,
        window_seconds: float,
        *,
        max_samples_per_series: int = MAX_SAMPLES_PER_SERIES,
        max_age_seconds: float = math.inf,
    ) -> None:
        """Track samples younger than `window_seconds`, at most `max_samples_per_series` each;
        a series whose newest sample is `max_age_seconds` old is dropped whole."""
        if window_seconds <= 0 or max_age_seconds <= 0:
            raise ValueError("window_seconds and max_age_seconds must be positive")
        if max_samples_per_series < 1:
            raise ValueError("max_samples_per_series must be at least 1")
        self._window_seconds = window_seconds
        self._max_samples_per_series = max_samples_per_series
        self._max_age_seconds = max_age_seconds
        self._models: dict[str, _ModelSamples] = {}

    def record(self, provider: str, model: str, ttft_seconds: float, now: float) -> None:
        """Add one TTFT sample taken at monotonic time `now`; ignore non-finite or negative ones."""
        if not math.isfinite(ttft_seconds) or ttft_seconds < 0:
            return
        microseconds = round(min(ttft_seconds, MAX_SAMPLE_SECONDS) * _MICROSECONDS_PER_SECOND)
        model_samples = self._models.get(model)
        if model_samples is None:
            model_samples = self._models[model] = _ModelSamples()
        self._expire(model_samples, now)
        series = model_samples.series.get(provider)
        if series is None:
            series = model_samples.series[provider] = _Series()
            model_samples.stale_check_at = min(
                model_samples.stale_check_at, now + self._max_age_seconds
            )
        if len(series.samples) >= self._max_samples_per_series:
            _, dropped = series.samples.popleft()
            series.total_microseconds -= dropped
            model_samples.total_microseconds -= dropped
            model_samples.count -= 1
        series.samples.append((now, microseconds))
        series.total_microseconds += microseconds
        model_samples.total_microseconds += microseconds
        model_samples.count += 1
        model_samples.oldest_at = min(model_samples.oldest_at, now)

    def newest_sample_at(self, provider: str) -> float | None:
        """When the provider's newest sample (of any model) was taken; None without one."""
        newest = [
            series.samples[-1][0]
            for model_samples in self._models.values()
            if (series := model_samples.series.get(provider)) is not None and series.samples
        ]
        return max(newest, default=None)

    def forget(self, provider: str) -> None:
        """Drop every sample of a provider: after an outage its past latency says nothing."""
        for model_samples in self._models.values():
            series = model_samples.series.pop(provider, None)
            if series is not None:
                model_samples.total_microseconds -= series.total_microseconds
                model_samples.count -= len(series.samples)

    def bands(
        self,
        model: str,
        providers: Sequence[str],
        now: float,
        *,
        band_fraction: float,
        min_samples: int,
        enabled: bool,
        hysteresis: float = 0.0,
    ) -> dict[str, int]:
        """Return each provider's latency band for `model` (lower is faster, 0 is near average);
        a band moves only once the score is `hysteresis` band widths inside the new one."""
        bands = dict.fromkeys(providers, 0)
        if not enabled:
            return bands
        model_samples = self._models.get(model)
        if model_samples is None:
            return bands
        global_mean = self._banding_mean(model_samples, now, min_samples)
        if global_mean is None:
            return bands
        band_width = 2 * _tolerance(global_mean, band_fraction)
        prior = global_mean * PRIOR_WEIGHT
        series_by_provider = model_samples.series
        # The score formula of `_Series.score`, inlined: this loop runs on every request.
        for provider in providers:
            series = series_by_provider.get(provider)
            if series is not None and series.samples:
                total = series.total_microseconds / _MICROSECONDS_PER_SECOND
                score = (total + prior) / (len(series.samples) + PRIOR_WEIGHT)
                position = (score - global_mean) / band_width
                band = series.band
                # Most calls find the provider well inside its band: no call needed then.
                if band is None or abs(position - band) >= 0.5 + hysteresis:
                    band = series.band = held_band(position, band, hysteresis)
                bands[provider] = band
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
        model_samples = self._models.get(model) or _ModelSamples()
        global_mean = self._banding_mean(model_samples, now, min_samples)
        names = {name for name, series in model_samples.series.items() if series.samples}
        names.update(providers)
        entries = []
        for name in sorted(names):
            series = model_samples.series.get(name) or _Series()
            count = len(series.samples)
            mean = series.total_microseconds / count / _MICROSECONDS_PER_SECOND if count else None
            if global_mean is None:
                score, band = None, 0
            else:
                score = series.score(global_mean)
                band = (
                    series.band
                    if series.band is not None
                    else score_band(score, global_mean, band_fraction)
                )
            entries.append(ProviderLatency(name, mean, count, score, band))
        return LatencySnapshot(
            model=model,
            global_mean_seconds=model_samples.mean(),
            sample_count=model_samples.count,
            banding_active=global_mean is not None,
            providers=tuple(entries),
        )

    def _banding_mean(
        self, model_samples: _ModelSamples, now: float, min_samples: int
    ) -> float | None:
        """Expire old samples; return the model's mean, or None when there are too few to band."""
        self._expire(model_samples, now)
        if model_samples.count < min_samples:
            return None
        global_mean = model_samples.mean()
        return global_mean if global_mean is not None and math.isfinite(global_mean) else None

    def _expire(self, model_samples: _ModelSamples, now: float) -> None:
        """Drop the model's samples that are `window_seconds` old or older, and every series
        whose newest sample is `max_age_seconds` old or older."""
        if now >= model_samples.stale_check_at:
            self._drop_stale(model_samples, now)
        cutoff = now - self._window_seconds
        if model_samples.oldest_at > cutoff:
            return
        oldest_at = math.inf
        for series in model_samples.series.values():
            samples = series.samples
            while samples and samples[0][0] <= cutoff:
                _, dropped = samples.popleft()
                series.total_microseconds -= dropped
                model_samples.total_microseconds -= dropped
                model_samples.count -= 1
            if samples:
                oldest_at = min(oldest_at, samples[0][0])
        model_samples.oldest_at = oldest_at

    def _drop_stale(self, model_samples: _ModelSamples, now: float) -> None:
        """Drop whole series without a sample for `max_age_seconds`: their band is forgotten."""
        cutoff = now - self._max_age_seconds
        next_check = math.inf
        for provider, series in list(model_samples.series.items()):
            newest = series.samples[-1][0] if series.samples else -math.inf
            if newest <= cutoff:
                del model_samples.series[provider]
                model_samples.total_microseconds -= series.total_microseconds
                model_samples.count -= len(series.samples)
            else:
                next_check = min(next_check, newest + self._max_age_seconds)
        model_samples.stale_check_at = next_check
