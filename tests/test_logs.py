"""Logs: one line when a thing goes wrong, one when it recovers, back-off between (15.12)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.agent.tools.cli import _setup_logging
from siteagent.sim.faults import Fault
from siteagent.sim.gpu import GpuFault, SimGpuSite
from siteagent.sim.site import SimSite

BASE = "127.1.204.31"
GPU_BASE = "127.2.211.1"


class Clock:
    """The agent's clock, moved by the test one control interval per tick."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


async def test_two_refusing_miners_warn_once_each_back_off_and_say_when_they_accept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SimSite(2, base_address=BASE, settle_s=0.2, pause_s=0.1, wake_s=0.2) as site:
        cfg = parse_config(
            {
                "site": {"cap_w": 100_000},
                "inventory": {"miners": [{"address": m.address} for m in site.miners]},
                "policy": {"min_off_s": 0},
                "telemetry": {"timeout_s": 3.0, "stale_after_s": 86_400.0, "max_backoff_s": 60},
                "control": {"interval_s": 5},
            }
        )
        clock = Clock()
        agent = Agent(cfg, await build_devices(cfg), clock=clock)
        try:
            await agent.sweep()
            for m in site.miners:
                site.set_fault(m.address, Fault.REFUSE_COMMANDS)
            # Far below what they draw: the agent wants both lower every tick.
            agent.set_cap("test", 2000.0)
            caplog.clear()
            caplog.set_level(logging.INFO, logger="siteagent")
            for _ in range(10):
                clock.now_s += 5.0
                await agent.sweep()
                await agent.tick()
            refused = [r for r in caplog.records if "refused" in r.getMessage()]
            assert len([r for r in refused if r.levelno == logging.WARNING]) == 2, refused
            # 50 s at 5 s a tick: backed off (5, 10, 20, 40 s) rather than sent every tick.
            assert sum(agent.actuation_errors.values()) <= 2 * 4
            for m in site.miners:
                site.set_fault(m.address, Fault.NONE)
            caplog.clear()
            for _ in range(4):
                clock.now_s += 60.0
                await agent.sweep()
                await agent.tick()
                await asyncio.sleep(0.3)
            again = [r for r in caplog.records if "accepted again" in r.getMessage()]
            assert len(again) == 2 and all(r.levelno == logging.INFO for r in again)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        finally:
            await close_drivers(agent.fleet.links())


async def test_a_gpu_node_that_goes_down_warns_once_for_the_node_and_says_once_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SimGpuSite(1, 4, base_address=GPU_BASE, port=0, seed=3) as site:
        (node,) = site.inventory()
        cfg = parse_config(
            {
                "site": {"cap_w": 100_000},
                "gpu_nodes": [
                    {
                        "id": "gpu-a",
                        "host": node["address"],
                        "port": node["port"],
                        "username": node["username"],
                        "client_key": node["client_key"],
                        "known_hosts": node["known_hosts"],
                        "gpus": node["gpus"],
                    }
                ],
                "telemetry": {"timeout_s": 2.0, "max_backoff_s": 60},
            }
        )
        clock = Clock()
        agent = Agent(cfg, await build_devices(cfg), clock=clock)
        try:
            await agent.sweep()
            assert {d.state.value for d in agent.snapshot().devices} == {"running"}
            caplog.set_level(logging.INFO, logger="siteagent")
            await site.set_fault(node["address"], GpuFault.DISCONNECT)
            for _ in range(3):
                # Past every back-off, and past the node's cached read: each sweep asks.
                clock.now_s += 120.0
                await asyncio.sleep(0.6)
                await agent.sweep()
            assert {d.state.value for d in agent.snapshot().devices} == {"unreachable"}
            # The device lines (the SSH driver says what happened to its session itself).
            devices = [r for r in caplog.records if r.name == "siteagent.devices"]
            warnings = [r.getMessage() for r in devices if r.levelno >= logging.WARNING]
            assert len(warnings) == 1, warnings
            assert warnings[0].startswith("gpu-a (") and "unreachable" in warnings[0]
            caplog.clear()
            await site.set_fault(node["address"], GpuFault.NONE)
            for _ in range(60):  # until the SSH driver's own back-off lets it reconnect
                clock.now_s += 120.0
                await asyncio.sleep(0.3)
                await agent.sweep()
                if {d.state.value for d in agent.snapshot().devices} == {"running"}:
                    break
            assert {d.state.value for d in agent.snapshot().devices} == {"running"}
            lines = [
                r
                for r in caplog.records
                if r.name == "siteagent.devices" and r.levelno >= logging.INFO
            ]
            assert [r.levelno for r in lines] == [logging.INFO], [r.getMessage() for r in lines]
            assert (
                lines[0].getMessage().startswith("gpu-a (") and "recovered" in lines[0].getMessage()
            )
        finally:
            await close_drivers(agent.fleet.links())


async def test_a_cap_override_says_what_changed_in_words(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(parse_config({"site": {"cap_w": 29_000, "safety_margin_w": 0}}), [])
    caplog.set_level(logging.INFO, logger="siteagent.loop")
    agent.set_cap("ovr-0", 40_000.0)  # above the site's own: no change, and it says so
    agent.set_cap("ovr-1", 6000.0)
    agent.set_mode("ovr-2", "mining-off")
    agent.clear_source("ovr-1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "cap from ovr-0 (40000 W) added; no change of effective cap (29000 W)",
        "cap from ovr-1 (6000 W) added: effective cap 29000 W -> 6000 W",
        "mode mining-off from ovr-2 set; no change of effective cap (6000 W)",
        "ovr-1 ended (cap 6000 W): effective cap 6000 W -> 29000 W",
    ]


def test_client_commands_do_not_log_each_http_request() -> None:
    _setup_logging("info")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)


def test_no_deprecation_warnings_from_asyncssh_at_start() -> None:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    # The sim's GPU nodes import asyncssh, as `run` does for SSH nodes.
    out = subprocess.run(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "sim", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
