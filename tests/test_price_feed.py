"""The live price feed: a file or a loopback HTTP endpoint, staleness and its fallback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.loop import Agent
from agent.prices import PriceFeed

NOW = 1_800_000_000.0
HEADER = "timestamp_unix_s,hashprice_usd_per_th_day,electricity_usd_per_kwh,ai_usd_per_gpu_hour\n"


def config(**prices: Any) -> Any:
    return parse_config({"site": {"cap_w": 10_000}, "prices": {"stale_after_s": 600, **prices}})


async def test_file_feed_gives_the_latest_point_then_falls_back_when_stale(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(HEADER + f"{NOW - 300:.0f},0.05,0.04,2.1\n{NOW - 60:.0f},0.06,0.03,2.2\n")
    clock = [NOW]
    feed = PriceFeed(config(source="file", path=str(path)), wall_clock=lambda: clock[0])
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
