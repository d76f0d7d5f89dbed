"""Prices as the economic policy sees them: a series lookup, and staleness turned into fallbacks.

Pure: no IO, no clock. Loading a CSV/JSON file or polling an HTTP feed lives in
``agent/prices.py``; this module only answers "what prices hold at time t, and
which of them are too old to trust". A stale price is a state, not a crash: each
stale input is replaced by its stated fallback (a stale electricity price means
the configured *high* price, so the planner errs towards shedding, never
towards running at a loss).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PricePoint:
    """Prices observed at one instant (Unix seconds).

    ``ai_demand_frac`` is the offered inference load as a fraction of peak, when
    the source knows it (a backtest series does; a live feed usually does not).
    """

    timestamp_unix_s: float
    hashprice_usd_per_th_day: float
    electricity_usd_per_kwh: float
    ai_usd_per_gpu_hour: float
    ai_demand_frac: float | None = None


@dataclass(frozen=True, slots=True)
class PriceFallback:
    """What to assume for each input once it is older than ``stale_after_s``."""

    stale_after_s: float = 900.0
    electricity_usd_per_kwh: float = 0.25
    hashprice_usd_per_th_day: float = 0.03
    ai_usd_per_gpu_hour: float = 1.0


@dataclass(frozen=True, slots=True)
class Prices:
    """The prices a plan is made with; ``stale`` names inputs replaced by their fallback."""

    hashprice_usd_per_th_day: float
    electricity_usd_per_kwh: float
    ai_usd_per_gpu_hour: float
    ai_demand_frac: float | None = None
    stale: tuple[str, ...] = ()
    source: str = "static"

    @property
    def note(self) -> str:
        """One line for reasons and logs: the prices, and what is stale."""
        text = (
            f"hashprice ${self.hashprice_usd_per_th_day:.4f}/TH/day, electricity "
            f"${self.electricity_usd_per_kwh:.4f}/kWh, AI ${self.ai_usd_per_gpu_hour:.2f}/GPU-h"
        )
        if self.stale:
            text += f" (stale, fallback used: {', '.join(self.stale)})"
        return text


class PriceSeries:
    """A time-ordered series of price points; lookups take the last point at or before t."""

    def __init__(self, points: Iterable[PricePoint]) -> None:
        self.points: tuple[PricePoint, ...] = tuple(
            sorted(points, key=lambda p: p.timestamp_unix_s)
        )
        self._times = [p.timestamp_unix_s for p in self.points]

    def __len__(self) -> int:
        return len(self.points)

    def at(self, t_unix_s: float) -> PricePoint | None:
        """The latest point at or before ``t_unix_s`` (Unix s), or None before the first."""
        i = bisect_right(self._times, t_unix_s)
        return self.points[i - 1] if i > 0 else None


def resolve(
    point: PricePoint | None,
    now_unix_s: float,
    fallback: PriceFallback,
    *,
    source: str = "series",
) -> Prices:
    """Prices in force at ``now_unix_s`` (Unix s): the point's, or each stale input's fallback."""
    if point is None or now_unix_s - point.timestamp_unix_s > fallback.stale_after_s:
        return Prices(
            fallback.hashprice_usd_per_th_day,
            fallback.electricity_usd_per_kwh,
            fallback.ai_usd_per_gpu_hour,
            None,
            ("hashprice", "electricity", "ai"),
            source,
        )
    return Prices(
        point.hashprice_usd_per_th_day,
        point.electricity_usd_per_kwh,
        point.ai_usd_per_gpu_hour,
        point.ai_demand_frac,
        (),
        source,
    )
