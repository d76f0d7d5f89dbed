"""Prices from the sources operators use (issue 19 item 4): ERCOT settlement point prices
as published, a hashprice index's JSON, an AI contract. Fixtures: tests/fixtures/prices;
formats: docs/prices.md. Served over HTTP on this module's loopback range, 127.11.0.0/16."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from siteagent.agent.config import ConfigError, parse_config
from siteagent.agent.control.alarms import PRICES_STALE, Alarms
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.price_sources import (
    IntervalSeries,
    contract_usd_per_gpu_hour,
    electricity_sources,
    load_backtest_series,
    parse_ercot_spp,
    parse_hashprice_index,
)
from siteagent.agent.control.prices import PriceFeed, PriceFormatError
from siteagent.agent.tools.backtest import run_backtest, synthetic_site
from siteagent.policies.prices import PriceSeries

FIXTURES = Path(__file__).parent / "fixtures" / "prices"
DAM_FALL = FIXTURES / "ercot_dam_spp_2024-11-03.csv"
DAM_SPRING = FIXTURES / "ercot_dam_spp_2024-03-10.csv"
RTM_FALL = FIXTURES / "ercot_rtm_spp_2024-11-03.csv"
RTM_SPRING = FIXTURES / "ercot_rtm_spp_2024-03-10.csv"
HASHPRICE = FIXTURES / "hashrateindex_hashprice_usd_phs_1h.json"
BAD_ROW = FIXTURES / "ercot_dam_spp_bad_row.csv"
HOST = "127.11.0.1"  # this module's loopback range


def utc(text: str) -> float:
    """Unix s of an ISO time in UTC."""
    return datetime.fromisoformat(text + "+00:00").timestamp()


def starts(series: Any) -> list[float]:
    return [p.start_unix_s for p in series.points]


def held(series: IntervalSeries, t_unix_s: float) -> float:
    """The price of the interval holding at ``t_unix_s``."""
    p = series.covering(t_unix_s)
    assert p is not None
    return p.value


def last(series: IntervalSeries, t_unix_s: float) -> float:
    """The last price published at or before ``t_unix_s``."""
    p = series.at(t_unix_s)
    assert p is not None
    return p.value


def contiguous(series: Any) -> bool:
    return all(a.end_unix_s == b.start_unix_s for a, b in pairwise(series.points))


# ---------------------------------------------------------------- the formats, from fixtures


def test_dam_spring_forward_day_has_23_hours_in_utc_and_dollars_per_kwh() -> None:
    s = parse_ercot_spp(DAM_SPRING.read_text(), "dam", "HB_NORTH", where=str(DAM_SPRING))
    assert len(s) == 23 and contiguous(s)
    # Hour ending 01:00 CST is 06:00-07:00 UTC; 03:00 does not exist (02:00 CST -> 03:00
    # CDT), so hour ending 04:00 CDT starts at 08:00 UTC, right after hour ending 02:00.
    assert starts(s)[:3] == [
        utc("2024-03-10T06:00"),
        utc("2024-03-10T07:00"),
        utc("2024-03-10T08:00"),
    ]
    assert [p.value for p in s.points[:3]] == pytest.approx([0.01764, 0.01563, 0.01328])
    assert s.points[-1].end_unix_s == utc("2024-03-11T05:00")  # midnight CDT


def test_dam_fall_back_day_has_25_hours_the_repeated_one_by_its_dst_flag() -> None:
    s = parse_ercot_spp(
        DAM_FALL.read_text(), "dam", "HB_NORTH", adder_usd_per_kwh=0.012, where=str(DAM_FALL)
    )
    assert len(s) == 25 and contiguous(s)
    assert s.points[0].start_unix_s == utc("2024-11-03T05:00")  # midnight CDT
    # Hour ending 02:00 twice: 01:00-02:00 CDT (DSTFlag N), then 01:00-02:00 CST (Y).
    he2, he2_repeated, he3 = s.points[1:4]
    assert (he2.start_unix_s, he2_repeated.start_unix_s, he3.start_unix_s) == (
        utc("2024-11-03T06:00"),
        utc("2024-11-03T07:00"),
        utc("2024-11-03T08:00"),
    )
    # $/MWh -> $/kWh, plus the delivery adder.
    assert [he2.value, he2_repeated.value, he3.value] == pytest.approx(
        [0.02108 + 0.012, 0.02171 + 0.012, 0.02137 + 0.012]
    )
    assert s.points[-1].end_unix_s == utc("2024-11-04T06:00")  # midnight CST


def test_rtm_fall_back_day_in_15_minute_intervals_with_the_historical_column_names() -> None:
    text = RTM_FALL.read_text()
    assert text.startswith('"Delivery Date","Delivery Hour","Delivery Interval"')
    s = parse_ercot_spp(text, "rtm", "HB_NORTH", where=str(RTM_FALL))
    assert len(s) == 100 and contiguous(s)
    assert all(p.end_unix_s - p.start_unix_s == 900 for p in s.points)
    assert held(s, utc("2024-11-03T06:35")) == pytest.approx(0.02239)  # hour 2, 3rd, CDT
    assert held(s, utc("2024-11-03T07:35")) == pytest.approx(0.01975)  # again, CST
    assert held(s, utc("2024-11-03T08:00")) == pytest.approx(0.02196)  # hour 3, 1st


def test_rtm_spring_forward_day_skips_the_missing_hour() -> None:
    s = parse_ercot_spp(RTM_SPRING.read_text(), "rtm", "HB_NORTH", where=str(RTM_SPRING))
    assert len(s) == 92 and contiguous(s)
    assert held(s, utc("2024-03-10T07:50")) == pytest.approx(0.01376)  # 01:45 CST
    assert held(s, utc("2024-03-10T08:05")) == pytest.approx(0.01278)  # 03:00 CDT


def test_other_settlement_points_and_the_mis_column_names() -> None:
    # The MIS spelling of the real-time report, one interval as ERCOT posts it every 15 minutes.
    text = (
        "DeliveryDate,DeliveryHour,DeliveryInterval,SettlementPointName,SettlementPointType,"
        "SettlementPointPrice,DSTFlag\n"
        "07/15/2024,17,2,HB_NORTH,HU,88.40,N\n07/15/2024,17,2,LZ_WEST,LZ,-12.50,N\n"
    )
    west = parse_ercot_spp(text, "rtm", "LZ_WEST", where="rtm.csv")
    # 16:15 CDT is 21:15 UTC; a negative price stays negative (ERCOT's west has them).
    assert starts(west) == [utc("2024-07-15T21:15")]
    assert west.points[0].value == pytest.approx(-0.0125)


def test_hashprice_index_json_in_dollars_per_th_day_with_its_timestamps() -> None:
    s = parse_hashprice_index(HASHPRICE.read_text(), "usd_per_ph_day", where=str(HASHPRICE))
    assert len(s) == 72  # published newest first, kept in time order
    assert starts(s)[0] == utc("2024-11-02T00:00") and starts(s)[-1] == utc("2024-11-04T23:00")
    assert last(s, utc("2024-11-03T07:59")) == pytest.approx(44.0673 / 1000)
    per_th = parse_hashprice_index(HASHPRICE.read_text(), "usd_per_th_day")
    assert last(per_th, utc("2024-11-03T07:00")) == pytest.approx(44.0673)
    # The index's network overview: one point, "hashpriceUsd" ($/PH/day).
    overview = '{"data": {"timestamp": "2024-11-03T12:00:00Z", "hashpriceUsd": 45.2}}'
    one = parse_hashprice_index(overview)
    assert starts(one) == [utc("2024-11-03T12:00")] and one.points[0].value == pytest.approx(0.0452)


def test_ai_contract_price_by_period() -> None:
    cfg = parse_config(
        {
            "site": {"cap_w": 10_000},
            "prices": {
                "source": "sources",
                "ai": {
                    "kind": "contract",
                    "usd_per_gpu_hour": 2.1,
                    "schedule": [
                        {
                            "start": datetime.fromisoformat("2026-12-01T00:00:00+00:00"),
                            "end": datetime.fromisoformat("2027-01-01T00:00:00-06:00"),
                            "usd_per_gpu_hour": 2.65,
                        }
                    ],
                },
            },
        }
    )
    ai = cfg.prices.ai
    assert ai is not None
    assert contract_usd_per_gpu_hour(ai, utc("2026-11-30T23:59")) == 2.1
    assert contract_usd_per_gpu_hour(ai, utc("2026-12-15T00:00")) == 2.65
    assert contract_usd_per_gpu_hour(ai, utc("2027-01-01T05:59")) == 2.65  # before 00:00 CST
    assert contract_usd_per_gpu_hour(ai, utc("2027-01-01T06:00")) == 2.1


def test_a_path_with_a_pattern_reads_every_report_it_matches(tmp_path: Path) -> None:
    for f in (DAM_SPRING, DAM_FALL):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "copy-of-fall.csv").write_bytes(DAM_FALL.read_bytes())  # the same prices again
    cfg = sources_config(
        electricity={
            "kind": "ercot",
            "market": "dam",
            "settlement_point": "HB_NORTH",
            "path": str(tmp_path / "*.csv"),
        }
    )
    (source,) = electricity_sources(cfg)
    s = source.load()
    assert len(s) == 23 + 25
    assert last(s, utc("2024-03-10T07:30")) == pytest.approx(0.01563)
    assert last(s, utc("2024-11-03T07:30")) == pytest.approx(0.02171)
    # Two files that disagree on an hour: refused, naming both.
    other = DAM_FALL.read_text().replace('"21.71","Y"', '"99.99","Y"')
    (tmp_path / "revised.csv").write_text(other)
    with pytest.raises(PriceFormatError, match=r"revised\.csv: the price at 2024-11-03 07:00 UTC"):
        source.load()


# ---------------------------------------------------------------- bad rows: file and line


def test_a_bad_row_refuses_the_file_naming_file_and_line() -> None:
    with pytest.raises(PriceFormatError, match=r"ercot_dam_spp_bad_row\.csv:4: price '#VALUE!'"):
        parse_ercot_spp(BAD_ROW.read_text(), "dam", "HB_NORTH", where=str(BAD_ROW))


DAM_HEADER = '"DeliveryDate","HourEnding","SettlementPoint","SettlementPointPrice","DSTFlag"\n'


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        # Hour ending 03:00 does not exist on the March change day.
        ('"03/10/2024","03:00","HB_NORTH","20.1","N"\n', r"x\.csv:2: .*does not exist"),
        ('"11/04/2024","02:00","HB_NORTH","20.1","Y"\n', r"x\.csv:2: DSTFlag Y .* not repeated"),
        (
            '"11/03/2024","02:00","HB_NORTH","20.1","N"\n"11/03/2024","02:00","HB_NORTH","20.3","N"\n',
            r"x\.csv:3: .*a second time \(first on line 2\)",
        ),
        ('"11/03/2024","02:00","HB_NORTH","20.1"\n', r"x\.csv:2: 4 fields, expected 5"),
        ('"11/03/2024","25:00","HB_NORTH","20.1","N"\n', r"x\.csv:2: hour '25:00'"),
        ('"2024-13-03","01:00","HB_NORTH","20.1","N"\n', r"x\.csv:2: delivery date"),
        ('"11/03/2024","01:00","HB_NORTH","20100","N"\n', r"x\.csv:2: price '20100'"),
        ('"11/03/2024","01:00","HB_NORTH","20.1","maybe"\n', r"x\.csv:2: DSTFlag 'maybe'"),
        (
            '"11/03/2024","01:00","HB_WEST","20.1","N"\n',
            r"x\.csv: no rows for .*'HB_NORTH'.*HB_WEST",
        ),
    ],
)
def test_dam_rows_that_cannot_be_trusted(rows: str, says: str) -> None:
    with pytest.raises(PriceFormatError, match=says):
        parse_ercot_spp(DAM_HEADER + rows, "dam", "HB_NORTH", where="x.csv")


def test_the_real_time_report_read_as_day_ahead_is_named() -> None:
    with pytest.raises(PriceFormatError, match=r"rtm\.csv:1: header .* is this the real-time"):
        parse_ercot_spp(RTM_FALL.read_text(), "dam", "HB_NORTH", where="rtm.csv")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '{"data": [{"timestamp": "2024-11-03T07:00:00Z", "price": 44.1},'
            ' {"timestamp": "2024-11-03T08:00:00", "price": 44.2}]}',
            r"hp\.json: data\[1\]: timestamp .* without a zone",
        ),
        ('{"data": [{"timestamp": "2024-11-03T07:00:00Z", "price": "44.1"}]}', r"data\[0\]: price"),
        ('{"data": [{"timestamp": "2024-11-03T07:00:00Z", "price": -3}]}', r"data\[0\]: price -3"),
        ('{"data": [{"timestamp": "2024-11-03T07:00:00Z", "price": 0}]}', r"data\[0\]: price 0,"),
        ('{"data": []}', r"hp\.json: found list, expected"),
        ('{"data": [\n{"timestamp": 1,\n', r"hp\.json:3: not JSON"),
    ],
)
def test_hashprice_items_that_cannot_be_trusted(text: str, says: str) -> None:
    with pytest.raises(PriceFormatError, match=says):
        parse_hashprice_index(text, where="hp.json")


# ---------------------------------------------------------------- served, fetched by the price job


class Served:
    """Files served over loopback HTTP; tests change them while the agent polls."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/csv")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.base = f"http://{HOST}:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    thread = threading.Thread(target=s.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()


def sources_config(**prices: Any) -> Any:
    return parse_config({"site": {"cap_w": 10_000}, "prices": {"source": "sources", **prices}})


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, data)
    return buf.getvalue()


async def test_the_price_job_fetches_ercot_hashprice_and_the_contract_over_http(
    served: Served,
) -> None:
    # ERCOT's MIS hands reports out zipped; the index answers JSON.
    served.files["/dam.zip"] = zipped("cdr.00012331.DAMSPNP4190.csv", DAM_FALL.read_bytes())
    served.files["/hashprice"] = HASHPRICE.read_bytes()
    cfg = sources_config(
        electricity={
            "kind": "ercot",
            "market": "dam",
            "settlement_point": "HB_NORTH",
            "url": served.url("/dam.zip"),
            "adder_usd_per_kwh": 0.01,
        },
        hashprice={
            "kind": "hashrate-index",
            "url": served.url("/hashprice"),
            "stale_after_s": 7200,
        },
        ai={"kind": "contract", "usd_per_gpu_hour": 2.4},
    )
    agent = Agent(cfg, [])
    agent.price_feed.wall_clock = lambda: utc("2024-11-03T07:30")  # in the repeated hour
    agent.price_feed.started_unix_s = utc("2024-11-03T07:00")
    await agent._price_job()
    p = agent.prices()
    assert p.stale == () and p.source == "sources"
    assert p.electricity_usd_per_kwh == pytest.approx(0.02171 + 0.01)
    assert p.hashprice_usd_per_th_day == pytest.approx(0.0440673)
    assert p.ai_usd_per_gpu_hour == 2.4
    assert agent.alarms.active() == ()


async def test_a_source_that_stops_updating_raises_the_alarm_and_falls_back(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.files["/rtm.csv"] = RTM_FALL.read_bytes()
    clock = [utc("2024-11-03T12:00")]
    alarms = Alarms(wall_clock=lambda: clock[0])
    cfg = sources_config(
        electricity={
            "kind": "ercot",
            "market": "rtm",
            "settlement_point": "HB_NORTH",
            "url": served.url("/rtm.csv"),
        },
        stale_after_s=900,
        stale_fallback="hold",
        stale_hold_s=1800,
    )
    feed = PriceFeed(cfg, wall_clock=lambda: clock[0], alarms=alarms)
    await feed.refresh()
    fresh = feed.prices()
    assert fresh.stale == () and alarms.active() == ()
    # The report's last interval ends at 06:00 UTC on the 4th; 15 min on, it is stale:
    # the last fresh price holds for stale_hold_s, and the alarm names the source.
    clock[0] = utc("2024-11-04T06:20")
    held = feed.prices()
    assert held.stale == ("electricity",)
    assert held.electricity_usd_per_kwh == pytest.approx(
        parse_ercot_spp(RTM_FALL.read_text(), "rtm", "HB_NORTH").points[-1].value
    )
    alarm = alarms.get(PRICES_STALE)
    assert alarm is not None
    assert f"ERCOT RTM HB_NORTH ({served.url('/rtm.csv')}) stale: newest 1200 s old" in alarm.reason
    assert "holding the last fresh prices" in alarm.reason
    # Past the hold: the high price.
    clock[0] = utc("2024-11-04T07:00")
    assert feed.prices().electricity_usd_per_kwh == 0.25
    # A report with a bad row is refused and the last good series kept; the alarm says
    # why it was not replaced, by URL and line.
    served.files["/rtm.csv"] = RTM_FALL.read_bytes().replace(b'"19.75","Y"', b'"#VALUE!","Y"')
    with caplog.at_level(logging.INFO, logger="siteagent.prices"):
        await feed.refresh()
        await feed.refresh()
    feed_lines = [r for r in caplog.records if r.name == "siteagent.prices"]
    assert [r.levelname for r in feed_lines] == ["WARNING"]  # once, not once per poll
    assert feed.prices().stale == ("electricity",)
    alarm = alarms.get(PRICES_STALE)
    assert alarm is not None and "last read failed" in alarm.reason
    assert f"{served.url('/rtm.csv')}:42: price '#VALUE!'" in alarm.reason
    # A fresh report clears it.
    served.files["/rtm.csv"] = RTM_FALL.read_bytes()
    clock[0] = utc("2024-11-03T12:00")
    with caplog.at_level(logging.INFO, logger="siteagent.prices"):
        await feed.refresh()
    feed_lines = [r for r in caplog.records if r.name == "siteagent.prices"]
    assert "ERCOT RTM HB_NORTH readable again" in feed_lines[-1].getMessage()
    assert feed.prices().stale == () and alarms.active() == ()


async def test_real_time_with_the_day_ahead_price_while_the_real_time_report_is_stale(
    served: Served,
) -> None:
    rtm_lines = RTM_FALL.read_text().splitlines(keepends=True)
    until_noon = [ln for ln in rtm_lines if not re.match(r'"11/03/2024","(1[3-9]|2\d)"', ln)]
    served.files["/rtm.csv"] = "".join(until_noon).encode()  # up to 12:00 CST (18:00 UTC)
    served.files["/dam.csv"] = DAM_FALL.read_bytes()
    clock = [utc("2024-11-03T20:30")]  # hour ending 15:00 CST
    alarms = Alarms(wall_clock=lambda: clock[0])
    cfg = sources_config(
        electricity={
            "kind": "ercot",
            "market": "rtm-dam",
            "settlement_point": "HB_NORTH",
            "url": served.url("/rtm.csv"),
            "dam_url": served.url("/dam.csv"),
        },
        stale_fallback="high",
    )
    feed = PriceFeed(cfg, wall_clock=lambda: clock[0], alarms=alarms)
    await feed.refresh()
    p = feed.prices()
    # The day-ahead price of the hour is a real price: not stale, no high fallback ...
    assert p.stale == () and p.electricity_usd_per_kwh == pytest.approx(0.02689)
    # ... but the operator hears that the real-time report stopped.
    alarm = alarms.get(PRICES_STALE)
    assert alarm is not None and alarm.reason.startswith("ERCOT RTM HB_NORTH")
    assert "using the ERCOT DAM HB_NORTH price for electricity" in alarm.reason
    served.files["/rtm.csv"] = RTM_FALL.read_bytes()
    await feed.refresh()
    assert feed.prices().electricity_usd_per_kwh != pytest.approx(0.02689)
    assert alarms.active() == ()


async def test_a_stale_hashprice_leaves_a_fresh_electricity_price_alone(tmp_path: Path) -> None:
    index = json.loads(HASHPRICE.read_text())
    index["data"] = [d for d in index["data"] if d["timestamp"] <= "2024-11-03T11:00:00.000Z"]
    hashprice = tmp_path / "hashprice.json"
    hashprice.write_text(json.dumps(index))
    clock = [utc("2024-11-03T20:30")]  # hour ending 15:00 CST; the index stopped at 11:00 UTC
    cfg = sources_config(
        electricity={
            "kind": "ercot",
            "market": "dam",
            "settlement_point": "HB_NORTH",
            "path": str(DAM_FALL),
        },
        hashprice={"kind": "hashrate-index", "path": str(hashprice), "stale_after_s": 3600},
        hashprice_usd_per_th_day=0.04,
        stale_fallback="high",
    )
    alarms = Alarms(wall_clock=lambda: clock[0])
    feed = PriceFeed(cfg, wall_clock=lambda: clock[0], alarms=alarms)
    await feed.refresh()
    p = feed.prices()
    assert p.stale == ("hashprice",) and p.hashprice_usd_per_th_day == 0.04
    assert p.electricity_usd_per_kwh == pytest.approx(0.02689)
    assert "the configured hashprice_usd_per_th_day" in p.fallback
    alarm = alarms.get(PRICES_STALE)
    assert alarm is not None and alarm.reason.startswith("hashprice index")
    assert "newest 34200 s old" in alarm.reason


# ---------------------------------------------------------------- config problems name the key


ERCOT = {"kind": "ercot", "market": "dam", "settlement_point": "HB_NORTH", "path": "/x.csv"}


@pytest.mark.parametrize(
    ("prices", "says"),
    [
        ({"source": "sources"}, "prices: found source = 'sources' without [prices.electricity]"),
        ({"electricity": ERCOT}, "prices: found [prices.electricity] with source = 'static'"),
        (
            {"source": "sources", "electricity": {**ERCOT, "url": "https://ercot.example/x"}},
            "prices.electricity: found path='/x.csv' and url='https://ercot.example/x'; "
            "expected exactly one",
        ),
        (
            {"source": "sources", "electricity": {**ERCOT, "path": None, "url": "ftp://x/y"}},
            "prices.electricity.url: found 'ftp://x/y'; expected an http:// or https:// URL",
        ),
        (
            {"source": "sources", "electricity": {**ERCOT, "market": "rtm-dam"}},
            "prices.electricity: found dam_path=None and dam_url=None",
        ),
        (
            {"source": "sources", "electricity": {**ERCOT, "market": "hourly"}},
            "prices.electricity.market",
        ),
        (
            {"source": "sources", "electricity": {**ERCOT, "dam_path": "/d.csv"}},
            "prices.electricity: found dam_path/dam_url with market = 'dam'",
        ),
        (
            {
                "source": "sources",
                "hashprice": {"kind": "hashrate-index", "path": "/h", "unit": "usd"},
            },
            "prices.hashprice.unit: found 'usd'",
        ),
        (
            {
                "source": "sources",
                "ai": {
                    "kind": "contract",
                    "usd_per_gpu_hour": 2.0,
                    "schedule": [
                        {
                            "start": datetime.fromisoformat("2026-12-01T00:00:00+00:00"),
                            "end": datetime.fromisoformat("2026-12-10T00:00:00+00:00"),
                            "usd_per_gpu_hour": 2.5,
                        },
                        {
                            "start": datetime.fromisoformat("2026-12-09T00:00:00+00:00"),
                            "end": datetime.fromisoformat("2026-12-20T00:00:00+00:00"),
                            "usd_per_gpu_hour": 2.6,
                        },
                    ],
                },
            },
            "prices.ai: found schedule periods",
        ),
        (
            {"source": "sources", "ai": {"kind": "contrat", "usd_per_gpu_hour": 2.0}},
            "prices.ai.kind",
        ),
    ],
)
def test_config_problems_name_the_key(prices: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"site": {"cap_w": 10_000}, "prices": prices})
    assert says in str(e.value)


def test_a_source_rule_is_reported_beside_a_bad_number_in_one_pass() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(
            {
                "site": {"cap_w": 10_000},
                "prices": {
                    "source": "sources",
                    "poll_interval_s": -1,
                    "electricity": {**ERCOT, "url": "https://e.example/x", "stale_after_s": 0},
                },
            }
        )
    paths = [p.path for p in e.value.problems]
    assert paths == [
        "prices.poll_interval_s",
        "prices.electricity.stale_after_s",
        "prices.electricity",
    ]


def test_the_documented_example_parses() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "prices.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example is not None
    cfg = parse_config({"site": {"cap_w": 10_000}, **tomllib.loads(example.group(1))})
    assert cfg.prices.electricity is not None and cfg.prices.electricity.market == "rtm-dam"
    assert cfg.prices.hashprice is not None and cfg.prices.ai is not None


# ---------------------------------------------------------------- the backtest's series


def test_the_backtest_series_from_published_files(tmp_path: Path) -> None:
    electricity = {
        "kind": "ercot",
        "market": "rtm",
        "settlement_point": "HB_NORTH",
        "path": str(RTM_FALL),
        "adder_usd_per_kwh": 0.02,
    }
    cfg = sources_config(
        electricity=electricity,
        hashprice={"kind": "hashrate-index", "path": str(HASHPRICE)},
        ai={"kind": "contract", "usd_per_gpu_hour": 1.9},
    )
    series = load_backtest_series(cfg)
    assert isinstance(series, PriceSeries)
    times = [p.timestamp_unix_s for p in series.points]
    assert len(times) == 25 * 12 and times[0] == utc("2024-11-03T05:00")
    assert {b - a for a, b in pairwise(times)} == {300.0}
    p = series.at(utc("2024-11-03T07:35"))  # the repeated hour's third interval, CST
    assert p is not None and p.electricity_usd_per_kwh == pytest.approx(0.01975 + 0.02)
    assert p.hashprice_usd_per_th_day == pytest.approx(0.0440673) and p.ai_usd_per_gpu_hour == 1.9
    # A hole in the report is refused, not bridged with the interval before.
    holed = tmp_path / "holed.csv"
    holed.write_text(RTM_FALL.read_text().replace('"5","2","HB_NORTH"', '"5","2","HB_XX"'))
    cfg = sources_config(electricity={**electricity, "path": str(holed)})
    with pytest.raises(PriceFormatError, match="no electricity price for 2024-11-03 10:15 UTC"):
        load_backtest_series(cfg)


def test_the_backtest_replays_the_series_the_loader_returns() -> None:
    cfg = sources_config(
        electricity={
            "kind": "ercot",
            "market": "rtm",
            "settlement_point": "HB_NORTH",
            "path": str(RTM_FALL),
        },
        hashprice={"kind": "hashrate-index", "path": str(HASHPRICE)},
        ai={"kind": "contract", "usd_per_gpu_hour": 2.0},
    )
    report = run_backtest(synthetic_site(6, 2), list(load_backtest_series(cfg).points))
    assert report["steps"] == 25 * 12
    assert all(p["seconds_over_cap"] == 0 for p in report["policies"])
    assert report["bound"]["margin_usd"] > 0


def test_the_backtest_command_replays_a_configs_sources_without_a_series_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from siteagent.agent.tools.cli import main

    site = tmp_path / "site.toml"
    site.write_text(
        "[site]\ncap_w = 10000\n"
        '[[inventory.miners]]\naddress = "127.11.9.1"\n'
        '[[inventory.miners]]\naddress = "127.11.9.2"\n'
        '[prices]\nsource = "sources"\n'
        f'[prices.electricity]\nkind = "ercot"\nmarket = "rtm"\nsettlement_point = "HB_NORTH"\n'
        f'path = "{RTM_FALL}"\n'
        f'[prices.hashprice]\nkind = "hashrate-index"\npath = "{HASHPRICE}"\n'
        '[prices.ai]\nkind = "contract"\nusd_per_gpu_hour = 2.0\n'
    )
    assert main(["backtest", "--config", str(site), "--report", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 25 * 12
    # Without sources in the config, a series file is asked for by name.
    plain = tmp_path / "plain.toml"
    plain.write_text('[site]\ncap_w = 10000\n[[inventory.miners]]\naddress = "127.11.9.1"\n')
    assert main(["backtest", "--config", str(plain)]) == 2
    assert "--prices: missing" in capsys.readouterr().err
    # A config with nothing to replay says so, not the LP's "Empty".
    empty = tmp_path / "empty.toml"
    empty.write_text("[site]\ncap_w = 10000\n")
    assert main(["backtest", "--config", str(empty), "--prices", str(RTM_FALL)]) == 2
    assert "lists no miners" in capsys.readouterr().err
