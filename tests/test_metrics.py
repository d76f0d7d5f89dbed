"""Prometheus exposition: the collector's output, promtool's lint, and a real Prometheus scrape."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from metrics_reference import build_registry
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from siteagent.agent.config import parse_config
from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import (
    CONTENT_TYPE,
    Scrapes,
    families,
    loop_healthy,
    render_text,
    serve_metrics,
    site_summary,
    stale_tick_s,
)
from siteagent.domain import DeviceReading, DeviceState


class FakeClock:
    """Monotonic time the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _never_connect() -> Any:
    raise AssertionError("the metrics tests never connect to a device")


def link(device_id: str, domain: str, nameplate_w: float = 3000.0) -> DeviceLink:
    return DeviceLink(
        device_id,
        address="127.0.0.1",
        domain=domain,
        nameplate_power_w=nameplate_w,
        nameplate_hashrate_ths=100.0,
        sleep_power_w=25.0,
        connect=_never_connect,
    )


def make_agent(clock: FakeClock, port: int = 0) -> Agent:
    """Four miners in two racks, fed readings directly: mining, estimated, sleeping, unreachable."""
    cfg = parse_config(
        {
            "site": {"cap_w": 20_000, "safety_margin_w": 500, "overhead_w": 1000},
            "domains": [
                {"id": "rack-a", "limit_w": 7000},
                {"id": "rack-b", "limit_w": 9000},
            ],
            "telemetry": {"stale_after_s": 30},
            "metrics": {"host": "127.0.0.1", "port": port},
        }
    )
    links = [link("m1", "rack-a"), link("m2", "rack-a"), link("m3", "rack-b")]
    links.append(link("m4", "rack-b"))
    agent = Agent(cfg, links, clock=clock)
    now = clock()
    fleet = agent.fleet
    fleet.record_reading(
        0,
        DeviceReading(
            "m1",
            now - 2,
            2900.0,
            DeviceState.MINING,
            hashrate_ths=104.5,
            temperature_c=71.5,
            power_target_w=3000.0,
        ),
        now - 2,
        120.0,
    )
    fleet.record_reading(
        1, DeviceReading("m2", now, 2500.0, DeviceState.MINING, power_estimated=True), now, 120.0
    )
    fleet.record_reading(2, DeviceReading("m3", now, 20.0, DeviceState.SLEEPING), now, 120.0)
    return agent


def parse(agent: Agent) -> dict[str, list[Sample]]:
    """Render the agent's metrics as served and parse them back, by sample name."""
    text = render_text(families(agent, version="9.9.9")).decode()
    return parse_text(text)


def parse_text(text: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def same_exposition(a: str, b: str) -> bool:
    """Same HELP/TYPE lines and the same samples in the same order (label order aside)."""
    comments_a = [line for line in a.splitlines() if line.startswith("#")]
    comments_b = [line for line in b.splitlines() if line.startswith("#")]
    assert comments_a == comments_b
    assert parse_text(a) == parse_text(b)
    return len(parse_text(a)) > 10


def one(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


async def test_before_the_first_tick_only_counters_and_histograms() -> None:
    agent = make_agent(FakeClock())
    samples = parse(agent)
    assert one(samples, "siteagent_ticks_total") == 0
    assert one(samples, "siteagent_actuation_errors_total", kind="sleep") == 0
    assert one(samples, "siteagent_build_info", version="9.9.9") == 1
    assert "siteagent_site_power_watts" not in samples
    assert "siteagent_device_power_watts" not in samples


async def test_site_metrics_render_the_last_tick() -> None:
    clock = FakeClock()
    agent = make_agent(clock)
    record = await agent.tick()
    agent.actuation_errors["lower"] += 2
    agent.actuations["sleep"] += 3
    clock.t += 4.0
    s = parse(agent)
    measured = 2900.0 + 2500.0 + 20.0
    assert one(s, "siteagent_site_power_watts") == pytest.approx(measured + 1000.0)
    worst = record.snapshot.budget_w + 1000.0
    assert one(s, "siteagent_site_worst_case_power_watts") == pytest.approx(worst)
    # m4 was never read: it counts at its nameplate.
    assert worst >= 1000.0 + 2900.0 + 2500.0 + 20.0 + 3000.0
    assert one(s, "siteagent_site_cap_watts") == 20_000
    assert one(s, "siteagent_effective_cap_watts", source="site") == 19_500
    assert one(s, "siteagent_headroom_watts") == pytest.approx(19_500 - worst)
    assert one(s, "siteagent_last_tick_age_seconds") == pytest.approx(4.0)
    assert one(s, "siteagent_plan_mode", mode=record.plan.mode) == 1
    assert sum(x.value for x in s["siteagent_plan_mode"]) == 1
    assert one(s, "siteagent_ticks_total") == 1
    assert one(s, "siteagent_actuation_errors_total", kind="lower") == 2
    assert one(s, "siteagent_actuations_total", kind="sleep") == 3
    assert one(s, "siteagent_actuations_total", kind="wake") == 0
    assert one(s, "siteagent_tick_duration_seconds_count") == 1
    assert one(s, "siteagent_tick_duration_seconds_bucket", le="+Inf") == 1
    assert one(s, "siteagent_sweep_duration_seconds_count") == 0
    assert "siteagent_meter_power_watts" not in s


async def test_device_metrics_use_base_units_and_bounded_labels() -> None:
    clock = FakeClock()
    agent = make_agent(clock)
    await agent.tick()
    clock.t += 1.0
    s = parse(agent)
    assert one(s, "siteagent_device_power_watts", device="m1", measured="true") == 2900
    assert one(s, "siteagent_device_power_watts", device="m2", measured="false") == 2500
    assert one(s, "siteagent_device_hashrate_hashes_per_second", device="m1") == pytest.approx(
        104.5e12
    )
    assert one(s, "siteagent_device_temperature_celsius", device="m1") == 71.5
    assert one(s, "siteagent_device_power_target_watts", device="m1") == 3000
    assert one(s, "siteagent_device_telemetry_age_seconds", device="m1") == pytest.approx(3.0)
    assert one(s, "siteagent_device_telemetry_age_seconds", device="m2") == pytest.approx(1.0)
    assert one(s, "siteagent_telemetry_max_age_seconds") == pytest.approx(3.0)
    assert one(s, "siteagent_device_state", device="m3", state="sleeping") == 1
    assert one(s, "siteagent_device_state", device="m4", state="unknown") == 1
    assert one(s, "siteagent_device_info", device="m4", kind="miner", domain="rack-b") == 1
    # An unread device has no power or age series, rather than a made-up zero.
    assert not [x for x in s["siteagent_device_power_watts"] if x.labels["device"] == "m4"]
    assert one(s, "siteagent_devices", kind="miner", state="mining") == 2
    assert one(s, "siteagent_devices", kind="miner", state="unknown") == 1
    assert one(s, "siteagent_devices", kind="gpu", state="mining") == 0
    # Per-domain sums: rack-b holds the sleeping m3 (20 W read) and the unread m4.
    assert one(s, "siteagent_domain_power_watts", domain="rack-a") == 5400
    assert one(s, "siteagent_domain_power_watts", domain="rack-b") == 20
    assert one(s, "siteagent_domain_limit_watts", domain="rack-b") == 9000
    assert one(s, "siteagent_domain_worst_case_power_watts", domain="rack-b") >= 3020
    for name, samples in s.items():
        assert name.startswith("siteagent_"), name
        for x in samples:
            assert set(x.labels) <= {
                "device",
                "domain",
                "kind",
                "state",
                "measured",
                "source",
                "mode",
                "le",
                "version",
                "alarm",
            }


async def test_effective_cap_source_follows_the_lowest_cap() -> None:
    agent = make_agent(FakeClock())
    agent.set_cap("demand-response", 12_000)
    await agent.tick()
    s = parse(agent)
    assert one(s, "siteagent_effective_cap_watts", source="demand-response") == 11_500
    assert len(s["siteagent_effective_cap_watts"]) == 1


async def test_status_line_and_health() -> None:
    clock = FakeClock()
    agent = make_agent(clock)
    started = clock()
    assert "waiting for the first control tick" in site_summary(agent)
    assert loop_healthy(agent, started)
    await agent.tick()
    line = site_summary(agent)
    assert "effective cap 19.5 kW from site" in line
    assert "mining 2" in line and "unknown 1" in line
    clock.t += stale_tick_s(agent) + 1
    assert not loop_healthy(agent, started)
    await agent.tick()
    assert loop_healthy(agent, started)
    # A tick that took long (sending until its deadline) but ended is a loop at work.
    plan = agent.plan

    def slow_plan(*args: Any) -> Any:
        clock.t += stale_tick_s(agent) + 1
        return plan(*args)

    agent.plan = slow_plan  # type: ignore[method-assign,assignment]
    await agent.tick()
    assert agent.last_tick is not None
    assert clock() - agent.last_tick.time_s > stale_tick_s(agent)
    assert loop_healthy(agent, started)


async def test_sweep_records_its_duration() -> None:
    clock = FakeClock()
    agent = Agent(make_agent(clock).config, [], clock=clock)
    await agent.sweep()
    s = parse(agent)
    assert one(s, "siteagent_sweep_duration_seconds_count") == 1
    assert one(s, "siteagent_sweeps_total") == 1
    assert one(s, "siteagent_last_sweep_age_seconds") == 0


async def test_served_text_equals_prometheus_client_exposition() -> None:
    agent = make_agent(FakeClock())
    agent.set_cap("override", 15_000)
    await agent.tick()
    agent.actuations["wake"] += 1
    ours = render_text(families(agent, version="1")).decode()
    theirs = generate_latest(build_registry(agent, version="1")).decode()
    assert same_exposition(ours, theirs)


async def test_label_values_are_escaped() -> None:
    clock = FakeClock()
    agent = make_agent(clock)
    odd = 'rack "7"\\east\nrow'
    agent.set_cap(odd, 10_000)
    await agent.tick()
    s = parse(agent)
    assert one(s, "siteagent_effective_cap_watts", source=odd) == 9_500
    ours = render_text(families(agent)).decode()
    assert same_exposition(ours, generate_latest(build_registry(agent)).decode())


async def test_http_server_serves_text_and_gzip() -> None:
    agent = make_agent(FakeClock())
    await agent.tick()
    server = serve_metrics(agent, "127.0.0.1", 0, version="7")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        plain, ctype = await asyncio.to_thread(_fetch, url, {})
        assert ctype == CONTENT_TYPE
        s = parse_text(plain.decode())
        assert one(s, "siteagent_build_info", version="7") == 1
        zipped, _ = await asyncio.to_thread(_fetch, url, {"Accept-Encoding": "gzip"})
        assert gzip.decompress(zipped) == plain
    finally:
        server.close()


async def test_served_exposition_is_the_specification_plain_and_gzipped() -> None:
    """The served body (the head rendered at the scrape, the device families once per
    tick) is the reference exposition; gzipped, it is one gzip member."""
    clock = FakeClock()
    agent = make_agent(clock)
    agent.set_cap("override", 15_000)  # a lowered cap also requests a tick of its own
    await agent.tick()
    # Queued behind the requested one (the lock is fair): no tick is left to run after
    # this, so every render and the reference below are of the same last tick.
    await agent.tick()
    server = serve_metrics(agent, "127.0.0.1", 0, version="3")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        plain, _ = await asyncio.to_thread(_fetch, url, {})
        zipped, _ = await asyncio.to_thread(_fetch, url, {"Accept-Encoding": "gzip"})
    finally:
        server.close()
    theirs = generate_latest(build_registry(agent, version="3")).decode()
    assert same_exposition(plain.decode(), theirs)
    # A decoder that reads one member only (as some clients do) gets the whole text.
    one_member = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert one_member.decompress(zipped) == plain
    assert one_member.eof and one_member.unused_data == b""


async def test_scrapes_render_each_tick_once_and_never_during_a_tick() -> None:
    """While a tick runs, a scrape serves the previous tick's render and the renderer
    waits; after the tick it renders the new one, once, whatever the scrapes."""
    clock = FakeClock()
    agent = make_agent(clock)
    scrapes = Scrapes(agent, version="1")
    before = b"".join(scrapes.body(gzipped=False))
    assert b"siteagent_ticks_total 0.0" in before and b"siteagent_device_" not in before
    assert gzip.decompress(b"".join(scrapes.body(gzipped=True))) == before
    await agent.tick()
    first = b"".join(scrapes.body(gzipped=False))
    b"".join(scrapes.body(gzipped=False))
    assert scrapes.renders == 1
    assert parse_text(first.decode())["siteagent_ticks_total"][0].value == 1
    # A second tick, not yet rendered, when the third begins.
    clock.t += 1.0
    await agent.tick()
    plan = agent.plan
    during: list[bytes] = []
    renderer = threading.Thread(target=scrapes.refresh)

    def plan_while_scraped(*args: Any) -> Any:
        assert agent.ticking
        during.append(b"".join(scrapes.body(gzipped=False)))
        renderer.start()
        # A bound on waiting: a renderer that does not wait ends in milliseconds.
        renderer.join(timeout=0.5)
        during.append(b"alive" if renderer.is_alive() else b"done")
        return plan(*args)

    agent.plan = plan_while_scraped  # type: ignore[method-assign,assignment]
    await agent.tick()
    assert during[1] == b"alive", "the renderer rendered while a tick ran"
    assert scrapes.renders == 1
    # A scrape during the tick served the first tick's render, with the live counters.
    seen = parse_text(during[0].decode())
    assert seen["siteagent_ticks_total"][0].value == 2
    assert one(seen, "siteagent_last_tick_age_seconds") == pytest.approx(1.0)
    await asyncio.to_thread(renderer.join, 10.0)
    # The renderer resumed after the tick and rendered its record, the newest.
    assert scrapes.renders == 2
    plain = b"".join(scrapes.body(gzipped=False))
    assert gzip.decompress(b"".join(scrapes.body(gzipped=True))) == plain
    s = parse_text(plain.decode())
    assert s["siteagent_ticks_total"][0].value == 3
    assert one(s, "siteagent_last_tick_age_seconds") == 0
    assert one(s, "siteagent_device_power_watts", device="m1", measured="true") == 2900


def _fetch(url: str, headers: dict[str, str]) -> tuple[bytes, str]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read(), r.headers["Content-Type"]


# -- promtool and a real Prometheus -----------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required on CI (apt-get install -y prometheus)")
        pytest.skip(f"{name} not installed (apt-get install -y prometheus)")
    return path


def test_promtool_check_metrics_reports_nothing() -> None:
    promtool = _tool("promtool")
    agent = make_agent(FakeClock())

    async def capped_tick() -> None:
        agent.set_cap("override", 15_000)
        await agent.tick()

    asyncio.run(capped_tick())
    agent.actuation_errors["raise"] += 1
    text = render_text(families(agent, version="1.0"))
    assert b"siteagent_device_power_watts{" in text
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    report = (out.stdout + out.stderr).decode()
    assert out.returncode == 0, report
    assert report.strip() == "", report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PromServer:
    """A running Prometheus: its port, the process and its log."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@contextmanager
def prometheus_scraping(target_port: int, tmp_path: Path) -> Iterator[PromServer]:
    """A Prometheus server on loopback scraping 127.0.0.1:target_port every second."""
    binary = _tool("prometheus")
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    # A static target: file-based discovery would add the scrape manager's 5 s reload delay.
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: siteagent\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = PromServer(port, proc, log_path)
        try:
            _wait_for(lambda: _get(port, "/-/ready") is not None, 20.0, server)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _get(port: int, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            body: bytes = r.read()
            return body
    except OSError:
        return None


def _wait_for(ok: Callable[[], bool], timeout_s: float, server: PromServer) -> None:
    """Poll ok() until true; fail with Prometheus's log on timeout or if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        if ok():
            return
        time.sleep(0.2)
    log = server.log.read_text(errors="replace")[-3000:]
    pytest.fail(f"Prometheus did not get there within {timeout_s} s; its log:\n{log}")


DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "siteagent.json"


def dashboard_queries() -> list[str]:
    """The dashboard's PromQL with Grafana's variables filled in."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    subs = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    out = []
    for e in exprs:
        for var, value in subs.items():
            e = e.replace(var, value)
        assert "$" not in e, e
        out.append(e)
    return out


def _query_status(port: int, expr: str) -> str:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status: str = json.loads(r.read())["status"]
    except urllib.error.HTTPError as e:
        status = f"{e.code}: {e.read().decode(errors='replace')}"
    return status


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    body = _get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if body is None:
        return []
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


def test_real_prometheus_scrapes_the_agent(tmp_path: Path) -> None:
    agent = make_agent(FakeClock())
    asyncio.run(agent.tick())
    metrics = serve_metrics(agent, "127.0.0.1", 0, version="1.2.3")
    try:
        with prometheus_scraping(metrics.port, tmp_path) as prom:
            found: list[dict[str, Any]] = []

            def scraped() -> bool:
                found[:] = _query(prom.port, 'siteagent_device_power_watts{device="m2"}')
                return bool(found)

            _wait_for(scraped, 20.0, prom)
            (series,) = found
            assert series["metric"]["measured"] == "false"
            assert series["metric"]["job"] == "siteagent"
            assert float(series["value"][1]) == 2500.0
            (up,) = _query(prom.port, "up")
            assert up["value"][1] == "1"
            cap = _query(prom.port, "siteagent_effective_cap_watts")
            got = [(c["metric"]["source"], float(c["value"][1])) for c in cap]
            assert got == [("site", 19_500.0)]
            # Every dashboard query parses and runs on this Prometheus.
            for expr in dashboard_queries():
                assert _query_status(prom.port, expr) == "success", expr
    finally:
        metrics.close()
