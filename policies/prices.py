"""Prices as the economic policy sees them: a series lookup, and staleness turned into fallbacks.

Pure: no IO, no clock. Loading a CSV/JSON file or polling an HTTP feed lives in
``agent/control/prices.py``; this module only answers "what prices hold at time t, and
which of them are too old to trust". A stale price is a state, not a crash: each
stale input is replaced by its stated fallback. Two fallbacks (``PriceFallback.mode``):

- ``high``: at once the configured *high* electricity price, so the planner errs
  towards shedding, never towards running at a loss (it may sleep every miner);
- ``hold``: for ``hold_s`` after the prices went stale, the last fresh prices; if
  none was fresh since the agent started (a dead feed, an old file), the
  configured static prices for ``hold_s`` from the start. Then the high price.
"""

from __future__ import annotations

import math
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
    # "high": the high electricity price at once; "hold": the last fresh prices (or,
    # none fresh since the start, the static ones) for hold_s, then the high price.
    mode: str = "high"
    hold_s: float = 0.0
    static_electricity_usd_per_kwh: float = 0.05


@dataclass(frozen=True, slots=True)
class Prices:
    """The prices a plan is made with; ``stale`` names inputs replaced by their fallback."""

    hashprice_usd_per_th_day: float
    electricity_usd_per_kwh: float
    ai_usd_per_gpu_hour: float
    ai_demand_frac: float | None = None
    stale: tuple[str, ...] = ()
    source: str = "static"
    # What stands in for the stale prices, in words ("" when none is stale).
    fallback: str = ""

    @property
    def note(self) -> str:
        """One line for reasons and logs: the prices, and what is stale."""
        text = (
            f"hashprice ${self.hashprice_usd_per_th_day:.4f}/TH/day, electricity "
            f"${self.electricity_usd_per_kwh:.4f}/kWh, AI ${self.ai_usd_per_gpu_hour:.2f}/GPU-h"
        )
        if self.stale:
            text += f" (stale, fallback used: {', '.join(self.stale)}"
            text += f"; {self.fallback})" if self.fallback else ")"
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
    started_unix_s: float | None = None,
) -> Prices:
    """Prices in force at ``now_unix_s`` (Unix s): the point's, or the stated fallback.

    ``started_unix_s`` is when the agent started: a point that went stale before
    then was never fresh to it (None: the point's age alone decides).
    """
    stale_after = fallback.stale_after_s
    if point is None or now_unix_s - point.timestamp_unix_s > stale_after:
        stale = ("hashprice", "electricity", "ai")
        if fallback.mode == "hold":
            stale_since = -math.inf if point is None else point.timestamp_unix_s + stale_after
            seen = point is not None and (started_unix_s is None or stale_since > started_unix_s)
            if seen:
                held_from = stale_since
            else:
                held_from = -math.inf if started_unix_s is None else started_unix_s
            if now_unix_s < held_from + fallback.hold_s:
                grace = f"for up to {fallback.hold_s:.0f} s, then the high electricity price"
                if point is not None and seen:
                    return Prices(
                        point.hashprice_usd_per_th_day,
                        point.electricity_usd_per_kwh,
                        point.ai_usd_per_gpu_hour,
                        point.ai_demand_frac,
                        stale,
                        source,
                        f"holding the last fresh prices {grace}",
                    )
                return Prices(
                    fallback.hashprice_usd_per_th_day,
                    fallback.static_electricity_usd_per_kwh,
                    fallback.ai_usd_per_gpu_hour,
                    None,
                    stale,
                    source,
                    f"none fresh since the start: the configured static prices {grace}",
                )
        return Prices(
            fallback.hashprice_usd_per_th_day,
            fallback.electricity_usd_per_kwh,
            fallback.ai_usd_per_gpu_hour,
            None,
            stale,
            source,
            f"the high electricity price ${fallback.electricity_usd_per_kwh:.4f}/kWh",
        )
    return Prices(
        point.hashprice_usd_per_th_day,
        point.electricity_usd_per_kwh,
        point.ai_usd_per_gpu_hour,
        point.ai_demand_frac,
        (),
        source,
    )
