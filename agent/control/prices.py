"""Price inputs with IO: a CSV or JSON file, or an HTTP endpoint polled on a schedule.

The pure part (lookup, staleness, fallbacks) is ``policies/prices.py``. A file or
feed that cannot be read leaves the last good series in place; the policy then
sees the prices go stale and uses the stated fallbacks.

CSV columns (header row required): ``timestamp_unix_s, hashprice_usd_per_th_day,
electricity_usd_per_kwh, ai_usd_per_gpu_hour`` and optionally ``ai_demand_frac``.
JSON: a list of objects with the same keys. Prices as their publishers write them
(ERCOT, a hashprice index, a contract; ``source = "sources"``): ``price_sources.py``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siteagent.agent.config import Config, PolicyConfig, gpu_device_id
from siteagent.agent.control.alarms import PRICES_STALE, Alarms
from siteagent.policies.capping import CappingParams
from siteagent.policies.economic_params import (
    EconomicParams,
    PriorityClass,
    PriorityClasses,
    SwitchingCosts,
)
from siteagent.policies.prices import PriceFallback, PricePoint, Prices, PriceSeries, resolve

if TYPE_CHECKING:
    from siteagent.agent.control.price_sources import SourcesFeed

log = logging.getLogger("siteagent.prices")

COLUMNS = (
    "timestamp_unix_s",
    "hashprice_usd_per_th_day",
    "electricity_usd_per_kwh",
    "ai_usd_per_gpu_hour",
    "ai_demand_frac",
)


class PriceFormatError(ValueError):
    """A price file or feed that cannot be parsed; the message names the row."""


def _point(row: Mapping[str, Any], where: str) -> PricePoint:
    try:
        demand = row.get("ai_demand_frac")
        return PricePoint(
            float(row["timestamp_unix_s"]),
            float(row["hashprice_usd_per_th_day"]),
            float(row["electricity_usd_per_kwh"]),
            float(row["ai_usd_per_gpu_hour"]),
            None if demand in (None, "") else float(demand),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PriceFormatError(f"{where}: {e!r}; expected the columns {COLUMNS}") from None


def parse_csv(text: str) -> PriceSeries:
    """A price series from CSV text."""
    reader = csv.DictReader(io.StringIO(text))
    return PriceSeries(_point(row, f"row {i + 2}") for i, row in enumerate(reader))


def parse_json(text: str) -> PriceSeries:
    """A price series from JSON text (a list of objects)."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise PriceFormatError("expected a JSON list of price objects")
    return PriceSeries(_point(row, f"item {i}") for i, row in enumerate(data))


def load_series(path: str | Path) -> PriceSeries:
    """Read a price series from a .csv or .json file."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    return parse_json(text) if p.suffix.lower() == ".json" else parse_csv(text)


def write_csv(points: Iterable[PricePoint], path: str | Path) -> None:
    """Write a price series as CSV (the format ``load_series`` reads)."""
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for p in points:
            w.writerow(
                [
                    f"{p.timestamp_unix_s:.0f}",
                    f"{p.hashprice_usd_per_th_day:.5f}",
                    f"{p.electricity_usd_per_kwh:.5f}",
                    f"{p.ai_usd_per_gpu_hour:.3f}",
                    "" if p.ai_demand_frac is None else f"{p.ai_demand_frac:.3f}",
                ]
            )


async def fetch_http(url: str, timeout_s: float = 5.0) -> PriceSeries:
    """Poll an HTTP endpoint serving CSV or JSON prices (blocking IO in a thread)."""

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.headers.get_content_type(), r.read().decode("utf-8")

    kind, text = await asyncio.to_thread(get)
    return parse_json(text) if "json" in kind else parse_csv(text)


def static_prices(cfg: Config) -> Prices:
    """The configured static prices."""
    p = cfg.prices
    return Prices(p.hashprice_usd_per_th_day, p.electricity_usd_per_kwh, p.ai_usd_per_gpu_hour)


def fallback(cfg: Config) -> PriceFallback:
    """What stale prices give way to: ``prices.stale_fallback`` (hold, then high; or high)."""
    p = cfg.prices
    return PriceFallback(
        p.stale_after_s,
        p.fallback_electricity_usd_per_kwh,
        p.hashprice_usd_per_th_day,
        p.ai_usd_per_gpu_hour,
        p.stale_fallback,
        p.stale_hold_s,
        p.electricity_usd_per_kwh,
    )


def node_contract_floors(cfg: Config) -> dict[str, tuple[float, tuple[str, ...]]]:
    """Per GPU node with a contract: its floor (W) and its GPUs' ids (as ``economic_params``)."""
    return {
        n.id: (n.contract_floor_w, tuple(gpu_device_id(n.id, i) for i in range(n.gpus)))
        for n in cfg.gpu_nodes
        if n.contract_floor_w > 0
    }


def economic_params(cfg: Config) -> EconomicParams:
    """The economic policy's parameters from the config, contract floors split per GPU."""
    pol = cfg.policy
    floors = {
        gpu_device_id(n.id, i): n.contract_floor_w / n.gpus
        for n in cfg.gpu_nodes
        if n.contract_floor_w > 0
        for i in range(n.gpus)
    }
    return EconomicParams(
        capping=CappingParams(
            pol.capping_threshold,
            pol.capping_target,
            pol.uncapping_threshold,
            pol.min_off_s,
            pol.max_wakes_per_hour,
        ),
        default_utilization_frac=pol.default_utilization_frac,
        keep_margin_usd_per_kwh=pol.keep_margin_usd_per_kwh,
        contract_floor_w=floors,
        switching=switching_costs(pol),
        priority=PriorityClasses(
            PriorityClass(c.name, tuple(c.devices), tuple(c.domains)) for c in pol.priority_classes
        )
        if pol.priority_classes
        else None,
    )


def read_outcome(name: str, last_error: str | None, error: Exception | None) -> str | None:
    """The last error after a read of ``name`` (None: it succeeded); one log line when
    reads start failing, one when they recover, none while nothing changes."""
    if error is not None:
        if last_error is None:
            log.warning("prices: %s failed, keeping the last good series: %s", name, error)
        return str(error)
    if last_error is not None:
        log.info("prices: %s readable again", name)
    return None


def switching_costs(pol: PolicyConfig) -> SwitchingCosts:
    """What a sleep/wake cycle, a GPU drain and running hardware cost, from ``[policy]``."""
    return SwitchingCosts(
        miner_wear_usd_per_cycle=pol.miner_wear_usd_per_cycle,
        miner_restart_usd_per_cycle=pol.miner_restart_usd_per_cycle,
        miner_wake_s=pol.miner_wake_s,
        gpu_drain_usd=pol.gpu_drain_usd,
        gpu_undrain_usd=pol.gpu_undrain_usd,
        miner_depreciation_usd_per_h=pol.miner_depreciation_usd_per_h,
        gpu_depreciation_usd_per_h=pol.gpu_depreciation_usd_per_h,
        horizon_s=pol.switch_horizon_s,
    )


class PriceFeed:
    """The configured price source: static values, or a file or HTTP series refreshed on a
    schedule. A refresh that fails keeps the last good series (logged once until it
    recovers); prices older than ``stale_after_s`` give way to the stated fallbacks."""

    def __init__(
        self,
        cfg: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        alarms: Alarms | None = None,
    ) -> None:
        self.cfg = cfg
        self.wall_clock = wall_clock
        self.series: PriceSeries | None = None
        self.last_error: str | None = None
        self.alarms = alarms
        self._fallback = fallback(cfg)
        # Prices that went stale before this were never fresh to this run ("hold" needs it).
        self.started_unix_s = wall_clock()
        self.sources: SourcesFeed | None = None
        if cfg.prices.source == "sources":
            # Imported here: price_sources builds on this module.
            from siteagent.agent.control.price_sources import SourcesFeed

            self.sources = SourcesFeed(cfg, self.started_unix_s)

    def reconfigure(self, cfg: Config) -> None:
        """Take reloaded prices settings; a new source drops the old source's series."""
        p, q = self.cfg.prices, cfg.prices
        if (p.source, p.path, p.url) != (q.source, q.path, q.url):
            self.series = None
            self.last_error = None
        self.cfg = cfg
        self._fallback = fallback(cfg)

    @property
    def live(self) -> bool:
        """Whether prices come from a file or feed that needs refreshing."""
        return self.cfg.prices.source != "static"

    async def refresh(self) -> None:
        """Re-read the file or poll the endpoint; keep the last good series on failure."""
        p = self.cfg.prices
        if self.sources is not None:
            await self.sources.refresh()
            self.last_error = self.sources.last_error
            return
        try:
            if p.source == "file":
                if p.path is None:
                    raise PriceFormatError("prices.source = 'file' needs prices.path")
                series = await asyncio.to_thread(load_series, p.path)
            elif p.source == "http":
                if p.url is None:
                    raise PriceFormatError("prices.source = 'http' needs prices.url")
                series = await fetch_http(p.url)
            else:
                return
        except (OSError, ValueError) as e:
            self.last_error = read_outcome(p.source, self.last_error, e)
            return
        self.last_error = read_outcome(p.source, self.last_error, None)
        self.series = series

    def prices(self) -> Prices:
        """The prices in force now."""
        if not self.live:
            return static_prices(self.cfg)
        now = self.wall_clock()
        if self.sources is not None:
            self.sources.started_unix_s = self.started_unix_s
            return self.sources.prices(now, self.alarms)
        point = self.series.at(now) if self.series is not None else None
        source = self.cfg.prices.source
        prices = resolve(
            point, now, self._fallback, source=source, started_unix_s=self.started_unix_s
        )
        if self.alarms is not None:
            reason = None
            if prices.stale:
                where = self.cfg.prices.path if source == "file" else self.cfg.prices.url
                if point is None:
                    age = "no price point at or before now"
                else:
                    age = f"newest point {now - point.timestamp_unix_s:.0f} s old"
                error = f", last read failed: {self.last_error}" if self.last_error else ""
                reason = (
                    f"{source} prices ({where}) stale: {age} (stale after "
                    f"{self._fallback.stale_after_s:.0f} s){error}; using {prices.fallback}"
                )
            self.alarms.update(PRICES_STALE, reason)
        return prices
