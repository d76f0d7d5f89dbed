"""Prices from the sources operators use: ERCOT settlement point prices, a hashprice
index's JSON, and an AI contract (``prices.source = "sources"``; docs/prices.md).

Each published price is read into an interval series in the agent's units ($/kWh,
$/TH/day, $/GPU-hour); each live source keeps its last good series when a read
fails, and goes stale on its own clock. Staleness and its fallbacks are the rule of
``policies/prices.py`` (``resolve``), applied to each price by itself, so a dead
hashprice index does not throw away a fresh electricity price, or the reverse.

A file with a bad row is refused whole, naming the file and line: a skipped row
would leave a hole that the lookup fills with the interval before it (another
hour's price, unannounced), while a refused file keeps the last good series, and
the source goes stale with the alarm if no good file follows.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import glob
import io
import json
import math
import re
import urllib.request
import zipfile
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from siteagent.agent.config import (
    AiContractPricesConfig,
    Config,
    ErcotPricesConfig,
    HashpricePricesConfig,
)
from siteagent.agent.control.alarms import PRICES_STALE, Alarms
from siteagent.agent.control.prices import PriceFormatError, fallback, read_outcome
from siteagent.policies.prices import PriceFallback, PricePoint, Prices, PriceSeries, resolve

# ERCOT settles in Central Prevailing Time: CST in winter, CDT in summer.
CPT = ZoneInfo("America/Chicago")
KWH_PER_MWH = 1000.0
TH_PER_PH = 1000.0
# ERCOT's offer cap is $5,000/MWh and its floor -$251/MWh: a value far beyond them is
# a column or unit slip (a price in $/kWh, a row shifted), not a price.
MAX_ABS_USD_PER_MWH = 10_000.0
# About 100 times any hashprice ever published ($/PH/day): beyond it, a unit slip.
MAX_USD_PER_PH_DAY = 100_000.0
HOUR_S = 3600.0
RTM_INTERVAL_S = 900.0
Market = Literal["dam", "rtm"]


@dataclass(frozen=True, slots=True)
class IntervalPrice:
    """A price that holds from ``start_unix_s`` to ``end_unix_s`` (equal: an instant)."""

    start_unix_s: float
    end_unix_s: float
    value: float


class IntervalSeries:
    """Interval prices in time order; a lookup takes the last one starting at or before t."""

    def __init__(self, points: Iterable[IntervalPrice]) -> None:
        self.points: tuple[IntervalPrice, ...] = tuple(sorted(points, key=lambda p: p.start_unix_s))
        self._starts = [p.start_unix_s for p in self.points]

    def __len__(self) -> int:
        return len(self.points)

    def at(self, t_unix_s: float) -> IntervalPrice | None:
        """The last interval starting at or before ``t_unix_s`` (Unix s), or None."""
        i = bisect_right(self._starts, t_unix_s)
        return self.points[i - 1] if i > 0 else None

    def covering(self, t_unix_s: float) -> IntervalPrice | None:
        """The interval holding at ``t_unix_s`` (an instant's point: the last before)."""
        p = self.at(t_unix_s)
        if p is None or (p.end_unix_s > p.start_unix_s and t_unix_s >= p.end_unix_s):
            return None
        return p


# ---------------------------------------------------------------- ERCOT settlement point prices


def _utc(t_unix_s: float) -> str:
    return f"{datetime.fromtimestamp(t_unix_s, UTC):%Y-%m-%d %H:%M} UTC"


def _key(name: str) -> str:
    # ERCOT spells its columns "DeliveryDate" in the MIS reports and "Delivery Date" in the
    # historical ones; both are one column.
    return re.sub(r"[^a-z]", "", name.lower())


_COLUMNS: dict[Market, dict[str, str]] = {
    "dam": {
        "date": "deliverydate",
        "hour": "hourending",
        "point": "settlementpoint",
        "price": "settlementpointprice",
    },
    "rtm": {
        "date": "deliverydate",
        "hour": "deliveryhour",
        "interval": "deliveryinterval",
        "point": "settlementpointname",
        "price": "settlementpointprice",
    },
}
_FLAG_COLUMNS = ("dstflag", "repeatedhourflag")


def _delivery_date(text: str) -> datetime:
    for fmt in ("%m/%d/%Y", "%Y-%m-%d"):
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            pass
    raise ValueError(f"delivery date {text!r}, expected MM/DD/YYYY (or YYYY-MM-DD)")


def _hour(text: str, market: Market) -> int:
    t = text.strip()
    # The day-ahead report writes an hour ending as "01:00" .. "24:00", the real-time one
    # a delivery hour as 1 .. 24.
    m = re.fullmatch(r"(\d{1,2}):00" if market == "dam" else r"(\d{1,2})", t)
    hour = int(m.group(1)) if m else 0
    if not 1 <= hour <= 24:
        want = '"01:00" .. "24:00"' if market == "dam" else "1 .. 24"
        raise ValueError(f"hour {text!r}, expected {want}")
    return hour


def _repeated(text: str) -> bool:
    flag = text.strip().upper()
    if flag not in ("Y", "N"):
        raise ValueError(f"DSTFlag {text!r}, expected Y (the repeated hour in November) or N")
    return flag == "Y"


def cpt_to_unix_s(local: datetime, repeated: bool) -> float:
    """Unix s of a naive Central Prevailing Time; ``repeated``: the second (CST) pass."""
    aware = local.replace(tzinfo=CPT, fold=1 if repeated else 0)
    utc = aware.astimezone(UTC)
    if utc.astimezone(CPT).replace(tzinfo=None) != local:
        raise ValueError(
            f"{local:%Y-%m-%d %H:%M} does not exist in Central Prevailing Time "
            "(the hour skipped when clocks go forward in March)"
        )
    if repeated and aware.replace(fold=0).utcoffset() == aware.utcoffset():
        raise ValueError(
            f"DSTFlag Y on {local:%Y-%m-%d %H:%M}, which is not repeated "
            "(only the hour after 01:00 on the November change day is)"
        )
    return utc.timestamp()


def _price_usd_per_mwh(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"price {text!r}, expected a number in $/MWh") from None
    if not math.isfinite(value) or abs(value) > MAX_ABS_USD_PER_MWH:
        raise ValueError(f"price {text!r} $/MWh, expected a number within ±{MAX_ABS_USD_PER_MWH:g}")
    return value


def parse_ercot_spp(
    text: str,
    market: Market,
    settlement_point: str,
    *,
    adder_usd_per_kwh: float = 0.0,
    where: str = "<ercot>",
) -> IntervalSeries:
    """The settlement point's prices ($/kWh, adder included) from an ERCOT SPP CSV report."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    names = _COLUMNS[market]
    keys = [_key(h) for h in header or []]
    missing = [c for c in names.values() if c not in keys]
    flags = [keys.index(f) for f in _FLAG_COLUMNS if f in keys]
    if header is None or missing or not flags:
        want = ", ".join([*names.values(), "dstflag"])
        raise PriceFormatError(
            f"{where}:1: header {header}, expected the ERCOT {market.upper()} settlement point "
            f"price columns ({want}; spaces and case aside); is this the "
            f"{'real-time' if market == 'dam' else 'day-ahead'} report?"
        )
    at = {k: keys.index(c) for k, c in names.items()}
    step_s = HOUR_S if market == "dam" else RTM_INTERVAL_S
    points: list[IntervalPrice] = []
    lines: dict[float, int] = {}
    others: set[str] = set()
    for row in reader:
        line = reader.line_num
        if not any(f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise PriceFormatError(
                f"{where}:{line}: {len(row)} fields, expected {len(header)} as in the header"
            )
        point = row[at["point"]].strip()
        if point != settlement_point:
            others.add(point)
            continue
        try:
            day = _delivery_date(row[at["date"]])
            offset = timedelta(hours=_hour(row[at["hour"]], market) - 1)
            if market == "rtm":
                interval = row[at["interval"]].strip()
                if interval not in ("1", "2", "3", "4"):
                    raise ValueError(f"delivery interval {interval!r}, expected 1 .. 4")
                offset += timedelta(minutes=15 * (int(interval) - 1))
            start = cpt_to_unix_s(day + offset, _repeated(row[flags[0]]))
            price = _price_usd_per_mwh(row[at["price"]])
        except ValueError as e:
            raise PriceFormatError(f"{where}:{line}: {e}") from None
        if start in lines:
            raise PriceFormatError(
                f"{where}:{line}: {settlement_point} at {_utc(start)} a second time (first on "
                f"line {lines[start]}), expected each interval once (the repeated November "
                "hour flagged DSTFlag Y)"
            )
        lines[start] = line
        points.append(IntervalPrice(start, start + step_s, price / KWH_PER_MWH + adder_usd_per_kwh))
    if not points:
        seen = ", ".join(sorted(others)[:8]) or "none"
        raise PriceFormatError(
            f"{where}: no rows for settlement point {settlement_point!r} (points in the file: "
            f"{seen}), expected rows for the configured prices.electricity.settlement_point"
        )
    return IntervalSeries(points)


# ---------------------------------------------------------------- a hashprice index's JSON


def _instant_unix_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"timestamp {value!r}, expected an ISO 8601 time with its zone")
    if not isinstance(value, str):
        # Unix seconds, or milliseconds as JavaScript writes them.
        return float(value) / 1000.0 if value > 1e11 else float(value)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp {value!r}, expected an ISO 8601 time") from None
    if t.tzinfo is None:
        raise ValueError(f"timestamp {value!r} without a zone, expected one (Z or +00:00)")
    return t.timestamp()


def parse_hashprice_index(
    text: str, unit: str = "usd_per_ph_day", *, where: str = "<hashprice>"
) -> IntervalSeries:
    """Hashprice ($/TH/day) from a hashprice index's JSON (Hashrate Index's shape)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", "?")
        raise PriceFormatError(f"{where}:{line}: not JSON ({e})") from None
    body = data.get("data") if isinstance(data, dict) else data
    # /hashprice answers {"data": [{"timestamp", "price"}, ...]}; /network/overview
    # answers {"data": {"timestamp", "hashpriceUsd", ...}}: one point.
    items = [body] if isinstance(body, dict) else body
    if not isinstance(items, list) or not items:
        raise PriceFormatError(
            f'{where}: found {type(body).__name__}, expected {{"data": [{{"timestamp": ..., '
            '"price": ...}, ...]} with at least one point'
        )
    per_th = 1.0 / TH_PER_PH if unit == "usd_per_ph_day" else 1.0
    points: dict[float, IntervalPrice] = {}
    for i, item in enumerate(items):
        spot = f"{where}: data[{i}]" if isinstance(body, list) else f"{where}: data"
        try:
            if not isinstance(item, dict):
                raise ValueError(f"found {item!r}, expected an object")
            t = _instant_unix_s(item.get("timestamp"))
            price = item.get("price", item.get("hashpriceUsd"))
            if (
                isinstance(price, bool)
                or not isinstance(price, (int, float))
                or not 0 < price * per_th * TH_PER_PH <= MAX_USD_PER_PH_DAY
            ):
                # Mining always earns something: a zero is a broken index, not a price.
                raise ValueError(
                    f"price {price!r}, expected a number of $ per {unit.split('_')[2].upper()}"
                    " per day above 0"
                )
        except ValueError as e:
            raise PriceFormatError(f"{spot}: {e}") from None
        if t in points:
            raise PriceFormatError(f"{spot}: timestamp {item['timestamp']!r} a second time")
        points[t] = IntervalPrice(t, t, float(price) * per_th)
    return IntervalSeries(points.values())


# ---------------------------------------------------------------- an AI contract


def contract_usd_per_gpu_hour(contract: AiContractPricesConfig, t_unix_s: float) -> float:
    """The contract's price per GPU-hour at ``t_unix_s``: its period's, else the base one."""
    for period in contract.schedule:
        if period.start.timestamp() <= t_unix_s < period.end.timestamp():
            return period.usd_per_gpu_hour
    return contract.usd_per_gpu_hour


# ---------------------------------------------------------------- reading and refreshing


def read_bytes(place: str, timeout_s: float = 10.0) -> bytes:
    """A file's or an http(s) URL's bytes (blocking); a ZIP archive's one CSV inside."""
    if re.match(r"https?://", place):
        with urllib.request.urlopen(place, timeout=timeout_s) as r:
            body: bytes = r.read()
    else:
        body = Path(place).read_bytes()
    if body[:4] == b"PK\x03\x04":
        # ERCOT's MIS hands out each report as a ZIP of one CSV.
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            names = [n for n in z.namelist() if n.lower().endswith(".csv")]
            if len(names) != 1:
                raise PriceFormatError(f"{place}: ZIP with CSV files {names}, expected exactly one")
            return z.read(names[0])
    return body


def _text(place: str) -> str:
    try:
        return read_bytes(place).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PriceFormatError(f"{place}: not UTF-8 text ({e})") from None


@dataclass(slots=True)
class LiveSource:
    """One published source: where it is, how to parse it, its last good series."""

    name: str
    place: str
    parse: Callable[[str, str], IntervalSeries]
    stale_after_s: float
    series: IntervalSeries | None = None
    last_error: str | None = None

    def load(self) -> IntervalSeries:
        """Read and parse the source now (blocking); a path with * ? [ reads every match."""
        if re.match(r"https?://", self.place) or not glob.has_magic(self.place):
            return self.parse(_text(self.place), self.place)
        # ERCOT posts a report per day (DAM) or per interval (RTM): a folder a download
        # job fills is read whole, e.g. today's and tomorrow's day-ahead files.
        files = sorted(glob.glob(self.place))
        if not files:
            raise PriceFormatError(f"{self.place}: no file matches, expected at least one")
        points: dict[float, tuple[IntervalPrice, str]] = {}
        for f in files:
            for q in self.parse(_text(f), f).points:
                seen = points.setdefault(q.start_unix_s, (q, f))
                if seen[0] != q:
                    raise PriceFormatError(
                        f"{f}: the price at {_utc(q.start_unix_s)} differs from the one in "
                        f"{seen[1]}, expected one price per interval across the files"
                    )
        return IntervalSeries(q for q, _ in points.values())

    async def refresh(self) -> None:
        """Read it again; on failure keep the last good series (logged once until it recovers)."""
        try:
            series = await asyncio.to_thread(self.load)
        except (OSError, ValueError, csv.Error, zipfile.BadZipFile) as e:
            self.last_error = read_outcome(self.name, self.last_error, e)
            return
        self.last_error = read_outcome(self.name, self.last_error, None)
        self.series = series


def _ercot(c: ErcotPricesConfig, market: Market, place: str, stale_after_s: float) -> LiveSource:
    def parse(text: str, where: str) -> IntervalSeries:
        return parse_ercot_spp(
            text, market, c.settlement_point, adder_usd_per_kwh=c.adder_usd_per_kwh, where=where
        )

    return LiveSource(f"ERCOT {market.upper()} {c.settlement_point}", place, parse, stale_after_s)


def electricity_sources(cfg: Config) -> list[LiveSource]:
    """The configured ERCOT sources, in the order they are trusted (real time first)."""
    c = cfg.prices.electricity
    if c is None:
        return []
    stale = c.stale_after_s or cfg.prices.stale_after_s
    place = c.path or c.url or ""
    if c.market != "rtm-dam":
        return [_ercot(c, c.market, place, stale)]
    # The day-ahead price is known for the whole hour it covers, so it stands in for a
    # real-time report that stopped; it ages from the end of its hour like any other.
    return [_ercot(c, "rtm", place, stale), _ercot(c, "dam", c.dam_path or c.dam_url or "", stale)]


def hashprice_source(cfg: Config) -> LiveSource | None:
    """The configured hashprice index, if any."""
    c: HashpricePricesConfig | None = cfg.prices.hashprice
    if c is None:
        return None
    unit = c.unit

    def parse(text: str, where: str) -> IntervalSeries:
        return parse_hashprice_index(text, unit, where=where)

    stale = c.stale_after_s or cfg.prices.stale_after_s
    return LiveSource("hashprice index", c.path or c.url or "", parse, stale)


def _age_s(p: IntervalPrice, now_unix_s: float) -> float:
    # An interval price is fresh while it holds and ages from its end; an instant from itself.
    return max(0.0, now_unix_s - p.end_unix_s)


def _fresh(s: LiveSource, now_unix_s: float) -> IntervalPrice | None:
    p = s.series.at(now_unix_s) if s.series is not None else None
    return p if p is not None and _age_s(p, now_unix_s) <= s.stale_after_s else None


def _stale_reason(s: LiveSource, now_unix_s: float) -> str:
    p = s.series.at(now_unix_s) if s.series is not None else None
    age = "no price at or before now" if p is None else f"newest {_age_s(p, now_unix_s):.0f} s old"
    error = f", last read failed: {s.last_error}" if s.last_error else ""
    return f"{s.name} ({s.place}) stale: {age} (stale after {s.stale_after_s:.0f} s){error}"


@dataclass(frozen=True, slots=True)
class _Part:
    value: float
    stale: bool
    fallback: str


def _resolve_part(
    p: IntervalPrice | None,
    field: Literal["electricity", "hashprice"],
    now_unix_s: float,
    fb: PriceFallback,
    started_unix_s: float,
) -> _Part:
    """One price through ``resolve`` (the one staleness rule), the others left aside."""
    point = None
    if p is not None:
        stamp = min(now_unix_s, p.end_unix_s)
        elec = p.value if field == "electricity" else fb.static_electricity_usd_per_kwh
        hp = p.value if field == "hashprice" else fb.hashprice_usd_per_th_day
        point = PricePoint(stamp, hp, elec, fb.ai_usd_per_gpu_hour)
    r = resolve(point, now_unix_s, fb, source="sources", started_unix_s=started_unix_s)
    if field == "electricity":
        return _Part(r.electricity_usd_per_kwh, bool(r.stale), r.fallback)
    value = r.hashprice_usd_per_th_day
    if not r.stale:
        return _Part(value, False, "")
    held = p is not None and value == p.value and "holding" in r.fallback
    how = "the last fresh one, held" if held else "the configured hashprice_usd_per_th_day"
    return _Part(value, True, f"hashprice ${value:.4f}/TH/day ({how})")


class SourcesFeed:
    """Each price from its own published source, each with its own staleness and fallback."""

    def __init__(self, cfg: Config, started_unix_s: float) -> None:
        self.cfg = cfg
        self.started_unix_s = started_unix_s
        self.fallback = fallback(cfg)
        self.electricity = electricity_sources(cfg)
        self.hashprice = hashprice_source(cfg)

    @property
    def sources(self) -> list[LiveSource]:
        """Every live source."""
        return [*self.electricity, *([self.hashprice] if self.hashprice else [])]

    @property
    def last_error(self) -> str | None:
        """The failed reads, one per source, or None."""
        errors = [f"{s.name}: {s.last_error}" for s in self.sources if s.last_error]
        return "; ".join(errors) or None

    async def refresh(self) -> None:
        """Read every source again; each keeps its last good series on failure."""
        await asyncio.gather(*(s.refresh() for s in self.sources))

    def prices(self, now_unix_s: float, alarms: Alarms | None = None) -> Prices:
        """The prices in force at ``now_unix_s``, and the stale-prices alarm set or cleared."""
        p = self.cfg.prices
        reasons: list[str] = []
        stale: list[str] = []
        fallbacks: list[str] = []
        electricity = p.electricity_usd_per_kwh
        if self.electricity:
            first = self.electricity[0]
            chosen = next((s for s in self.electricity if _fresh(s, now_unix_s)), None)
            if chosen is not first:
                reasons.append(_stale_reason(first, now_unix_s))
            if chosen is not None and chosen is not first:
                fallbacks.append(f"the {chosen.name} price for electricity")
            source = chosen or first
            fb = dataclasses.replace(self.fallback, stale_after_s=source.stale_after_s)
            point = source.series.at(now_unix_s) if source.series is not None else None
            part = _resolve_part(point, "electricity", now_unix_s, fb, self.started_unix_s)
            electricity = part.value
            if part.stale:
                reasons.extend(_stale_reason(s, now_unix_s) for s in self.electricity[1:])
                stale.append("electricity")
                fallbacks.append(part.fallback)
        hashprice = p.hashprice_usd_per_th_day
        if self.hashprice is not None:
            h = self.hashprice
            fb = dataclasses.replace(self.fallback, stale_after_s=h.stale_after_s)
            point = h.series.at(now_unix_s) if h.series is not None else None
            part = _resolve_part(point, "hashprice", now_unix_s, fb, self.started_unix_s)
            hashprice = part.value
            if part.stale:
                reasons.append(_stale_reason(h, now_unix_s))
                stale.append("hashprice")
                fallbacks.append(part.fallback)
        ai = p.ai_usd_per_gpu_hour
        if p.ai is not None:
            ai = contract_usd_per_gpu_hour(p.ai, now_unix_s)
        prices = Prices(
            hashprice, electricity, ai, None, tuple(stale), "sources", "; ".join(fallbacks)
        )
        if alarms is not None:
            reason = None
            if reasons:
                reason = f"{'; '.join(reasons)}; using {prices.fallback}"
            alarms.update(PRICES_STALE, reason)
        return prices


# ---------------------------------------------------------------- the backtest's series


def load_backtest_series(cfg: Config, step_s: float = 300.0) -> PriceSeries:
    """The configured sources read now and sampled every ``step_s`` (s) as the backtest's
    price series: electricity by the interval holding at each step (real time where it
    has one, else day-ahead), hashprice the last published, AI by the contract."""
    elec = electricity_sources(cfg)
    hash_source = hashprice_source(cfg)
    elec_series = [s.load() for s in elec]
    hash_series = hash_source.load() if hash_source is not None else None
    p = cfg.prices
    spans = [(s.points[0].start_unix_s, s.points[-1].end_unix_s) for s in elec_series]
    if spans:
        start, end = min(a for a, _ in spans), max(b for _, b in spans)
    elif hash_series is not None:
        start, end = hash_series.points[0].start_unix_s, hash_series.points[-1].end_unix_s + 1
    else:
        raise PriceFormatError(
            "prices: a backtest needs [prices.electricity] or [prices.hashprice] (dated prices)"
        )
    if hash_series is not None:
        # No hashprice before the index's first point: starting there, not guessing back.
        start = max(start, hash_series.points[0].start_unix_s)
    points: list[PricePoint] = []
    t = start
    while t < end:
        electricity = p.electricity_usd_per_kwh
        if elec_series:
            held = next((x for s in elec_series if (x := s.covering(t)) is not None), None)
            if held is None:
                where = ", ".join(s.place for s in elec)
                raise PriceFormatError(
                    f"{where}: no electricity price for {_utc(t)}, expected intervals "
                    "without gaps over the series"
                )
            electricity = held.value
        hashprice = p.hashprice_usd_per_th_day
        if hash_series is not None:
            last = hash_series.at(t)
            hashprice = last.value if last is not None else hashprice
        ai = contract_usd_per_gpu_hour(p.ai, t) if p.ai is not None else p.ai_usd_per_gpu_hour
        points.append(PricePoint(t, hashprice, electricity, ai))
        t += step_s
    return PriceSeries(points)
