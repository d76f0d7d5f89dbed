"""The live price feed: a file or a loopback HTTP endpoint, staleness and its fallback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_economic import miner

from siteagent.agent.config import parse_config
from siteagent.agent.control.alarms import PRICES_STALE, Alarms
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.prices import PriceFeed
from siteagent.domain import Limits, Snapshot

NOW = 1_800_000_000.0
HEADER = "timestamp_unix_s,hashprice_usd_per_th_day,electricity_usd_per_kwh,ai_usd_per_gpu_hour\n"


def config(**prices: Any) -> Any:
    return parse_config({"site": {"cap_w": 10_000}, "prices": {"stale_after_s": 600, **prices}})


async def test_file_feed_gives_the_latest_point_then_falls_back_when_stale(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(HEADER + f"{NOW - 300:.0f},0.05,0.04,2.1\n{NOW - 60:.0f},0.06,0.03,2.2\n")
    clock = [NOW]
    feed = PriceFeed(
        config(source="file", path=str(path), stale_fallback="high"), wall_clock=lambda: clock[0]
    )
    assert feed.live
    await feed.refresh()
    p = feed.prices()
    assert (p.hashprice_usd_per_th_day, p.electricity_usd_per_kwh, p.ai_usd_per_gpu_hour) == (
        0.06,
        0.03,
        2.2,
    )
    assert p.stale == ()
    # Ten minutes with no new point: the configured high electricity price is assumed.
    clock[0] = NOW + 600
    p = feed.prices()
    assert "electricity" in p.stale and p.electricity_usd_per_kwh == 0.25
    # A broken file keeps the last good series.
    path.write_text("not,a,price,file\nx,y,z,w\n")
    clock[0] = NOW
    await feed.refresh()
    assert feed.last_error is not None
    assert feed.prices().electricity_usd_per_kwh == 0.03


@pytest.fixture
def http_prices() -> Iterator[str]:
    body = (HEADER + f"{NOW - 30:.0f},0.045,0.07,1.9\n").encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/prices.csv"
    finally:
        server.shutdown()
        server.server_close()


async def test_http_feed_reaches_the_agent(http_prices: str) -> None:
    agent = Agent(config(source="http", url=http_prices), [])
    agent.price_feed.wall_clock = lambda: NOW
    assert agent.prices().stale == ("hashprice", "electricity", "ai")  # nothing fetched yet
    await agent.price_feed.refresh()
    p = agent.prices()
    assert p.electricity_usd_per_kwh == 0.07 and p.source == "http" and p.stale == ()


def test_static_prices_need_no_feed() -> None:
    feed = PriceFeed(config(electricity_usd_per_kwh=0.04))
    assert not feed.live
    assert feed.prices().electricity_usd_per_kwh == 0.04


async def test_stale_prices_hold_the_last_fresh_ones_for_the_grace_then_go_high(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(HEADER + f"{NOW - 60:.0f},0.06,0.03,2.2\n")
    clock = [NOW]
    alarms = Alarms(wall_clock=lambda: clock[0])
    cfg = config(source="file", path=str(path), stale_hold_s=1800)
    assert cfg.prices.stale_fallback == "hold"
    feed = PriceFeed(cfg, wall_clock=lambda: clock[0], alarms=alarms)
    await feed.refresh()
    assert feed.prices().stale == () and alarms.active() == ()
    # Stale since NOW + 540: the last fresh prices hold for 1800 s, and the alarm says so.
    clock[0] = NOW + 2000
    p = feed.prices()
    assert p.stale and p.electricity_usd_per_kwh == 0.03
    alarm = alarms.get(PRICES_STALE)
    assert alarm is not None and "newest point 2060 s old" in alarm.reason
    assert "holding the last fresh prices" in alarm.reason
    clock[0] = NOW + 2400
    p = feed.prices()
    assert p.electricity_usd_per_kwh == 0.25
    alarm = alarms.get(PRICES_STALE)
    assert alarm is not None and "the high electricity price $0.2500/kWh" in alarm.reason
    # A fresh point clears the alarm.
    path.write_text(HEADER + f"{NOW + 2390:.0f},0.06,0.04,2.2\n")
    await feed.refresh()
    assert feed.prices().electricity_usd_per_kwh == 0.04 and alarms.active() == ()


OLD_FILE = HEADER + "1704067200,0.06,0.09,2.0\n1704067500,0.06,0.09,2.0\n"  # January 2024


async def test_an_old_file_as_live_source_does_not_sleep_the_fleet_silently(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prices_2024.csv"
    path.write_text(OLD_FILE)
    devices = Snapshot(NOW, (miner("a", 17.5), miner("b", 21.5)))
    limits = Limits(1e6, 1e6, "test")
    for fallback, awake, says in (
        ("hold", True, "none fresh since the start: the configured static prices"),
        ("high", False, "the high electricity price $0.2500/kWh"),
    ):
        cfg = parse_config(
            {
                "site": {"cap_w": 1e6},
                "policy": {"name": "economic"},
                "prices": {"source": "file", "path": str(path), "stale_fallback": fallback},
            }
        )
        agent = Agent(cfg, [])
        agent.price_feed.wall_clock = lambda: NOW
        agent.price_feed.started_unix_s = NOW
        await agent.price_feed.refresh()
        p = agent.plan(devices, limits)
        assert [sp.awake for sp in p.setpoints] == [awake, awake], (fallback, p.reason)
        alarm = agent.alarms.get(PRICES_STALE)
        assert alarm is not None and says in alarm.reason, alarm
        assert str(path) in alarm.reason and "stale" in p.reason
    # Past the grace from the start, "hold" too goes to the high price (still alarmed).
    agent = Agent(
        cfg.model_copy(update={"prices": cfg.prices.model_copy(update={"stale_fallback": "hold"})}),
        [],
    )
    agent.price_feed.started_unix_s = NOW - 3601
    agent.price_feed.wall_clock = lambda: NOW
    await agent.price_feed.refresh()
    assert agent.prices().electricity_usd_per_kwh == 0.25
