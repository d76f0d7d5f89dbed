"""Alarms: raised and cleared once each, in the log, the metrics, the status and the audit.

The site tests run the agent against simulated miners (pyasic over TCP) and a
simulated GPU node (SSH); the ground truth is the simulators' own power.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from metrics_reference import build_registry
from prometheus_client import generate_latest

from siteagent.agent.api.auth import Scope, TokenEntry, TokenStore, hash_token
from siteagent.agent.api.http import create_app, make_services
from siteagent.agent.config import parse_config
from siteagent.agent.control.alarms import (
    CAP_UNMEETABLE,
    CONTRACT_FLOOR_BROKEN,
    PRICES_STALE,
    AlarmEvent,
    Alarms,
)
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import families, render_text
from siteagent.agent.tools.client import status_table
from siteagent.domain import DeviceKind
from siteagent.sim.gpu import SimGpuSite
from siteagent.sim.site import SimSite

MINER_BASE = "127.1.203.1"
GHOST = "127.1.203.99"  # a configured miner with nothing listening: unreachable
GPU_BASE = "127.2.203.1"
TOKEN = "tok-operate-alarms-0123"


def test_an_alarm_logs_once_when_raised_and_once_when_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    alarms = Alarms(wall_clock=lambda: now[0])
    events: list[AlarmEvent] = []
    alarms.subscribe(events.append)
    with caplog.at_level(logging.INFO, logger="siteagent.alarms"):
        for k in range(5):
            alarms.update(PRICES_STALE, f"file prices stale: newest point {k} s old")
        now[0] = 1312.0
        alarms.update(PRICES_STALE, None)
        alarms.update(PRICES_STALE, None)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "alarm prices-stale: file prices stale: newest point 0 s old"),
        (
            "INFO",
            "alarm prices-stale cleared after 312 s (was: file prices stale: newest point 4 s old)",
        ),
    ]
    assert [(e.raised, e.duration_s) for e in events] == [(True, 0.0), (False, 312.0)]
    assert alarms.active() == ()
    with pytest.raises(ValueError, match="unknown alarm"):
        alarms.raise_alarm("gpu-a/gpu0-hot", "not a fixed name")


@pytest.fixture
async def sites() -> AsyncIterator[tuple[SimSite, SimGpuSite]]:
    miners = SimSite(n_miners=3, base_address=MINER_BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3)
    gpus = SimGpuSite(1, 4, base_address=GPU_BASE, port=0, seed=11)
    await miners.start()
    await gpus.start()
    try:
        yield miners, gpus
    finally:
        await gpus.stop()
        await miners.stop()


def site_config(
    miners: SimSite,
    gpus: SimGpuSite,
    tmp_path: Path,
    *,
    ghost: bool = False,
    ghost_domain: str | None = None,
    domains: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Any:
    node = gpus.inventory()[0]
    listed: list[dict[str, Any]] = [{"address": m.address} for m in miners.miners]
    if ghost:
        listed.append({"address": GHOST, "id": "ghost", "nameplate_power_w": 3500})
        if ghost_domain is not None:
            listed[-1]["domain"] = ghost_domain
    return parse_config(
        {
            "site": {"cap_w": 100_000},
            "domains": domains or [],
            "inventory": {"miners": listed},
            "gpu_nodes": [
                {
                    "id": "gpu-a",
                    "host": node["address"],
                    "port": node["port"],
                    "username": node["username"],
                    "client_key": node["client_key"],
                    "known_hosts": node["known_hosts"],
                    "gpus": node["gpus"],
                    "overhead_w": node["overhead_w"],
                    **extra,
                }
            ],
            "policy": {"name": "economic", "min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
            "telemetry": {"interval_s": 60, "timeout_s": 2.0},
            "control": {"interval_s": 60},
            "state": {"dir": str(tmp_path)},
        }
    )


async def settle(agent: Agent, rounds: int) -> None:
    for _ in range(rounds):
        await agent.tick()
        await asyncio.sleep(0.3)
        await agent.sweep()


def api(agent: Agent) -> tuple[Any, httpx.AsyncClient]:
    tokens = TokenStore(None, [TokenEntry("op", Scope.OPERATE, hash_token(TOKEN))])
    services = make_services(agent, agent.config, tokens=tokens)
    app = create_app(services)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 5555))
    http = httpx.AsyncClient(
        transport=transport, base_url="http://agent", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    return services, http


async def test_a_cap_below_a_contract_floor_wins_loudly_on_the_simulated_site(
    sites: tuple[SimSite, SimGpuSite], tmp_path: Path
) -> None:
    miners, gpus = sites
    # 4 GPUs of 200-700 W; the customer is owed 600 W each.
    cfg = site_config(miners, gpus, tmp_path, contract_floor_w=2400)
    agent = Agent(cfg, await build_devices(cfg))
    services, http = api(agent)
    try:
        await agent.sweep()
        await settle(agent, 3)
        assert agent.alarms.active() == ()
        node = gpus.nodes[0]
        # Room for the node's overhead, the GPUs at their 200 W minimum, the miners
        # asleep and 800 W of the 1600 W contract above the minimum: the cap wins.
        cap = node.overhead_w + 4 * 200.0 + 3 * 25.0 + 800.0
        r = await http.post(
            "/v1/overrides",
            json={"kind": "cap", "cap_w": cap, "ttl_s": 3600, "reason": "utility limit"},
        )
        assert r.status_code == 201, r.text
        ovr = r.json()["id"]
        await settle(agent, 10)
        now = time.monotonic()
        assert miners.total_power_w(now) + gpus.total_power_w(now) <= cap
        assert agent.last_plan is not None and agent.last_plan.broken_floors

        status = (await http.get("/v1/status")).json()
        assert [a["name"] for a in status["alarms"]] == [CONTRACT_FLOOR_BROKEN]
        reason = status["alarms"][0]["reason"]
        assert "contract floor of gpu-a (2400 W" in reason and ovr in reason, reason
        assert f"alarm {CONTRACT_FLOOR_BROKEN}" in status_table(status)
        text = render_text(families(agent)).decode()
        assert f'siteagent_alarm{{alarm="{CONTRACT_FLOOR_BROKEN}"}} 1.0' in text
        assert f'siteagent_alarm{{alarm="{CAP_UNMEETABLE}"}} 0.0' in text
        scraped = generate_latest(build_registry(agent)).decode()
        assert f'siteagent_alarm{{alarm="{CONTRACT_FLOOR_BROKEN}"}} 1.0' in scraped
        raised = [r for r in services.store.audit(100) if r.action.startswith("alarm raised")]
        assert len(raised) == 1
        assert "contract floor of gpu-a (2400 W" in raised[0].result and ovr in raised[0].result

        # The cap goes: the floor is kept again, the alarm clears, the audit says how long.
        r = await http.delete(f"/v1/overrides/{ovr}", params={"reason": "event over"})
        assert r.status_code == 200, r.text
        await settle(agent, 6)
        assert agent.alarms.active() == ()
        assert all(
            (t.power_target_w or 0.0) >= 600.0
            for t in agent.fleet.records()
            if t.kind is DeviceKind.GPU
        )
        cleared = [r for r in services.store.audit(100) if r.action.startswith("alarm cleared")]
        assert len(cleared) == 1 and cleared[0].result.startswith("cleared after ")
    finally:
        await http.aclose()
        await close_drivers(agent.fleet.links())
        services.store.close()


async def test_a_cap_no_plan_can_meet_raises_one_alarm_and_no_line_per_tick(
    sites: tuple[SimSite, SimGpuSite], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    miners, gpus = sites
    cfg = site_config(miners, gpus, tmp_path, ghost=True)
    agent = Agent(cfg, await build_devices(cfg))
    try:
        await agent.sweep()
        ghost = next(d for d in agent.snapshot().devices if d.device_id == "ghost")
        assert not ghost.controllable
        # The unreachable miner alone counts 3500 W at its nameplate: over a 3000 W cap.
        agent.set_cap("ovr-dr", 3000.0)
        with caplog.at_level(logging.INFO):
            await settle(agent, 8)
        alarm = agent.alarms.get(CAP_UNMEETABLE)
        assert alarm is not None
        assert "3500 W is 1 miner(s) unreachable" in alarm.reason, alarm.reason
        assert "cap 3000 W from ovr-dr" in alarm.reason
        messages = [r.getMessage() for r in caplog.records]
        assert sum(m.startswith(f"alarm {CAP_UNMEETABLE}") for m in messages) == 1
        ticks = [m for m in messages if m.startswith("tick:")]
        assert len(ticks) <= 3, ticks  # not one per tick
    finally:
        await close_drivers(agent.fleet.links())


async def test_a_domain_limit_no_plan_can_meet_raises_the_alarm_naming_the_domain(
    sites: tuple[SimSite, SimGpuSite], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    miners, gpus = sites
    # The rack's one miner does not answer: it counts at its 3500 W nameplate,
    # whatever the plan does. The rack's 4000 W holds that; the site's cap is far off.
    domains = [
        {"id": "feeder-f", "limit_w": 50_000},
        {"id": "rack-g", "limit_w": 4000, "parent": "feeder-f"},
    ]
    cfg = site_config(miners, gpus, tmp_path, ghost=True, ghost_domain="rack-g", domains=domains)
    agent = Agent(cfg, await build_devices(cfg))
    services, http = api(agent)
    try:
        await agent.sweep()
        await settle(agent, 2)
        assert agent.alarms.active() == ()
        # The rack's limit comes down to 3000 W (a breaker derated): no plan meets it.
        agent.set_domain_cap("rack-g", "ovr-rack", 3000.0)
        with caplog.at_level(logging.INFO):
            await settle(agent, 4)
        alarm = agent.alarms.get(CAP_UNMEETABLE)
        assert alarm is not None
        assert alarm.reason == (
            "worst case 3500 W of which 3500 W is 1 miner(s) unreachable or unconfirmed, "
            "counted at their worst case (nameplate); 0 W fixed loads and overhead, 0 W "
            "pinned or excluded, 0 W the rest at their minimum; domain rack-g limit 3000 W"
        )
        messages = [r.getMessage() for r in caplog.records]
        assert sum(m.startswith(f"alarm {CAP_UNMEETABLE}") for m in messages) == 1
        # `status` says why.
        status = (await http.get("/v1/status")).json()
        assert [a["name"] for a in status["alarms"]] == [CAP_UNMEETABLE]
        assert "domain rack-g limit 3000 W" in status_table(status)
        # The derating ends: the rack's 4000 W holds the miner again, the alarm clears.
        agent.set_domain_cap("rack-g", "ovr-rack", None)
        await settle(agent, 1)
        assert agent.alarms.active() == ()
    finally:
        await http.aclose()
        await close_drivers(agent.fleet.links())
        services.store.close()


async def test_a_contract_floor_broken_by_a_domain_names_the_domain_not_the_site_cap(
    sites: tuple[SimSite, SimGpuSite], tmp_path: Path
) -> None:
    miners, gpus = sites
    node = gpus.nodes[0]
    # The GPU node's rack holds its overhead, the GPUs at their 200 W minimum and 800 W
    # of the 1600 W contract above it; the site's cap (100 kW) has room for all.
    rack_w = node.overhead_w + 4 * 200.0 + 800.0
    cfg = site_config(
        miners,
        gpus,
        tmp_path,
        domains=[{"id": "rack-ai", "limit_w": rack_w}],
        contract_floor_w=2400,
        domain="rack-ai",
    )
    agent = Agent(cfg, await build_devices(cfg))
    try:
        await agent.sweep()
        await settle(agent, 4)
        assert agent.last_plan is not None and agent.last_plan.broken_floors
        alarm = agent.alarms.get(CONTRACT_FLOOR_BROKEN)
        assert alarm is not None
        assert alarm.reason.startswith("contract floor of gpu-a (2400 W, "), alarm.reason
        assert alarm.reason.endswith(f"broken: domain rack-ai limit {rack_w:.0f} W"), alarm.reason
        assert "cap 100000" not in alarm.reason
        assert agent.alarms.get(CAP_UNMEETABLE) is None  # the rack's limit is met
    finally:
        await close_drivers(agent.fleet.links())
