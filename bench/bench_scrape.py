"""Time one Prometheus scrape of a large site against the control tick's own planning time.

Run: .venv/bin/python bench/bench_scrape.py [--devices 10000] [--runs 7]
Builds an Agent over N miners (fed readings directly, with an in-memory
driver so every one is controllable and has a setpoint), runs one control
tick, then renders its metrics several times: as the HTTP endpoint serves them
(``render_text(families(agent))``) and through prometheus-client's
``generate_latest`` on a private registry (same samples, for comparison; the
collector is tests/metrics_reference.py), then the same two over HTTP with gzip:
the agent's metrics server, and prometheus-client's own WSGI app.
Prints median times and their ratio to the tick's plan time
(``TickRecord.plan_duration_s``) and to a fresh ``policies.capping.plan`` on the
same snapshot. Goal: one scrape of 10,000 devices in at most 200 ms.

Then ticks with and without scrapes: ``--ticks`` control ticks on the event loop
(0.6 s apart, as a real cadence leaves time between them), alternately alone
and each with one scrape over HTTP with gzip asked for, by another process, as the
tick starts (a scrape landing on a tick in progress). Prints the ticks' median
and slowest wall time each way and the difference. Goal: a tick in progress is
delayed by a scrape by at most 20 ms.
Runs against older trees too (it uses only ``serve_metrics`` and the agent).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from benchlib import median_s
from prometheus_client import generate_latest, make_wsgi_app

from siteagent.agent.config import parse_config
from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import families, render_text, serve_metrics
from siteagent.domain import DeviceControls, DeviceIdentity, DeviceReading, DeviceState
from siteagent.policies.capping import plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from metrics_reference import build_registry

GOAL_S = 0.200
TICK_DELAY_GOAL_S = 0.020
# Between ticks: room for the once-per-tick render (about 0.25 s here), as a real
# control interval (5 s) leaves; a render still running when a tick starts pauses.
GAP_S = 0.6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _fetch_gzip(url: str) -> int:
    """GET ``url`` asking for gzip; the body's size (bytes, compressed)."""
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return len(r.read())


class StillDriver:
    """A miner that accepts every command at once; the bench never reads through it."""

    def __init__(self, identity: DeviceIdentity) -> None:
        self._identity = identity

    @property
    def identity(self) -> DeviceIdentity | None:
        """What the miner identified as."""
        return self._identity

    async def read(self) -> DeviceReading:
        """Never called: readings are fed to the fleet directly."""
        raise NotImplementedError

    async def set_power_target(self, power_w: float) -> float:
        """Accept the target (W)."""
        return power_w

    async def sleep(self) -> None:
        """Accept."""

    async def wake(self) -> None:
        """Accept."""


async def _no_connect() -> StillDriver:
    raise NotImplementedError


def build_agent(n: int, seed: int = 1) -> Agent:
    """n miners in racks of 40 under 10 feeders, all read just now, the site 10% over its cap."""
    rng = random.Random(seed)
    racks = (n + 39) // 40
    domains = [{"id": f"feeder-{i}", "limit_w": 1e10} for i in range(10)]
    domains += [
        {"id": f"rack-{i}", "limit_w": 40 * 3600.0, "parent": f"feeder-{i % 10}"}
        for i in range(racks)
    ]
    cfg = parse_config({"site": {"cap_w": n * 3300.0 * 0.9}, "domains": domains})
    clock_s = 1000.0
    agent = Agent(cfg, [], clock=lambda: clock_s)
    fleet = agent.fleet
    for i in range(n):
        nameplate = rng.choice([3010.0, 3068.0, 3500.0, 3510.0])
        caps = DeviceControls(
            power_target=True,
            power_target_min_w=nameplate * 0.5,
            power_target_max_w=nameplate,
            can_sleep=True,
        )
        ident = DeviceIdentity("bench", "S19", "bench", None, None, caps, nameplate, 100.0)
        hashrate = rng.choice([104.0, 140.0, 200.0, 234.0])
        t = DeviceLink(
            f"m{i:06d}",
            address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
            domain=f"rack-{i // 40}",
            nameplate_power_w=nameplate,
            nameplate_hashrate_ths=hashrate,
            sleep_power_w=25.0,
            connect=_no_connect,
        )
        t.driver = StillDriver(ident)
        row = fleet.add(t)
        reading = DeviceReading(
            t.device_id,
            clock_s - rng.uniform(0, 5),
            nameplate * rng.uniform(0.95, 1.0),
            DeviceState.MINING,
            hashrate_ths=hashrate * rng.uniform(0.9, 1.0),
            temperature_c=rng.uniform(55, 80),
            power_target_w=nameplate,
            power_estimated=i % 7 == 0,
        )
        fleet.record_reading(row, reading, clock_s, 120.0)
    return agent


async def _tick_times_s(
    agent: Agent, n: int, gap_s: float, at_start: Callable[[], object] | None = None
) -> list[float]:
    out = []
    for _ in range(n):
        await asyncio.sleep(gap_s)
        t = time.perf_counter()
        if at_start is not None:
            at_start()
        await agent.tick()
        out.append(time.perf_counter() - t)
    return out


def tick_delay(agent: Agent, n: int) -> tuple[list[float], list[float], int]:
    """Tick wall times (s) alone, and each with one scrape asked for as it starts; how
    many scrapes ran."""
    served = serve_metrics(agent, "127.0.0.1", 0, version="bench")
    url = f"http://127.0.0.1:{served.port}/metrics"
    try:
        _fetch_gzip(url)
        asyncio.run(_tick_times_s(agent, 3, GAP_S))  # warm up: the plan settles
        # The scraper is another process, as Prometheus is, idle until asked: only the
        # serving side's work shares the agent's interpreter and the machine's cores.
        scraper = subprocess.Popen(
            [sys.executable, "-c", _SCRAPER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert scraper.stdin is not None

        def ask() -> None:
            assert scraper.stdin is not None
            scraper.stdin.write("scrape\n")
            scraper.stdin.flush()

        alone: list[float] = []
        scraped: list[float] = []
        try:
            # Alternating, so that a shared machine's drift falls on both alike.
            for _ in range(n):
                alone += asyncio.run(_tick_times_s(agent, 1, GAP_S))
                scraped += asyncio.run(_tick_times_s(agent, 1, GAP_S, ask))
        finally:
            out, _ = scraper.communicate(timeout=60)
    finally:
        served.close()
    return alone, scraped, int(out.strip() or 0)


_SCRAPER = """
import sys, urllib.request
n = 0
for _ in sys.stdin:
    req = urllib.request.Request(sys.argv[1], headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
    n += 1
print(n)
"""


def main() -> None:
    """Print scrape time, size and ratios to the tick's planning."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ticks", type=int, default=30)
    args = ap.parse_args()
    agent = build_agent(args.devices)
    t = time.perf_counter()
    record = asyncio.run(agent.tick())
    tick_s = time.perf_counter() - t
    registry = build_registry(agent, version="bench")
    body = render_text(families(agent, version="bench"))
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    scrape_s = median_s(lambda: render_text(families(agent, version="bench")), args.runs)
    client_s = median_s(lambda: generate_latest(registry), max(1, args.runs // 2))
    served = serve_metrics(agent, "127.0.0.1", 0, version="bench")
    client_app = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_Quiet)
    threading.Thread(target=client_app.serve_forever, daemon=True).start()
    try:
        ours_url = f"http://127.0.0.1:{served.port}/metrics"
        theirs_url = f"http://127.0.0.1:{client_app.server_port}/metrics"
        gz_bytes = _fetch_gzip(ours_url)
        http_s = median_s(lambda: _fetch_gzip(ours_url), args.runs)
        # Where the served path renders once per tick (the first scrape waited for it).
        render = getattr(getattr(served, "scrapes", None), "current", lambda: None)()
        render_s = None if render is None else render.render_s
        client_http_s = median_s(lambda: _fetch_gzip(theirs_url), max(1, args.runs // 2))
    finally:
        served.close()
        client_app.shutdown()
    snap, limits = record.snapshot, record.limits
    plan_s = median_s(lambda: plan(snap, limits, agent.params, None), args.runs)
    print(
        f"devices: {args.devices}, plan mode: {record.plan.mode}, "
        f"setpoints: {len(record.plan.setpoints)}, changes sent: {len(record.applied)}"
    )
    print(f"exposition: {samples} samples, {len(body) / 1e6:.1f} MB")
    print(f"tick (plan, order, apply in memory): {tick_s * 1000:8.1f} ms")
    print(f"tick plan_duration_s:               {record.plan_duration_s * 1000:8.1f} ms")
    print(f"capping plan, median:               {plan_s * 1000:8.1f} ms")
    for label, t_s in (
        ("one scrape as served, median:", scrape_s),
        ("generate_latest, median:", client_s),
        ("HTTP + gzip as served, median:", http_s),
        ("prometheus-client WSGI + gzip:", client_http_s),
    ):
        print(
            f"{label:<36}{t_s * 1000:8.1f} ms  "
            f"({t_s / record.plan_duration_s:4.2f}x tick plan, {t_s / plan_s:4.2f}x plan)"
        )
    print(f"gzip body as served: {gz_bytes / 1e6:.2f} MB")
    if render_s is not None:
        print(f"render once per tick (off the scrape):  {render_s * 1000:8.1f} ms")
    verdict = "ok" if http_s <= GOAL_S else "OVER"
    print(f"goal: scrape over HTTP with gzip <= {GOAL_S * 1000:.0f} ms: {verdict}")
    alone, scraped, n_scrapes = tick_delay(agent, args.ticks)
    med_a, med_s = statistics.median(alone), statistics.median(scraped)
    print(f"ticks alone:        median {med_a * 1000:7.1f} ms, slowest {max(alone) * 1000:7.1f} ms")
    print(
        f"ticks with scrapes: median {med_s * 1000:7.1f} ms, slowest {max(scraped) * 1000:7.1f} ms"
        f" ({n_scrapes} scrapes, one as each of {len(scraped)} ticks starts)"
    )
    delay_s = med_s - med_a
    print(
        f"tick delayed by scrapes: median {delay_s * 1000:+.1f} ms ({med_s / med_a:.2f}x), "
        f"slowest {(max(scraped) - max(alone)) * 1000:+.1f} ms"
    )
    verdict = "ok" if delay_s <= TICK_DELAY_GOAL_S else "OVER"
    print(f"goal: a tick delayed by a scrape <= {TICK_DELAY_GOAL_S * 1000:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
