"""Start-up does not wait out devices that never answer (issue 20 item 5): READY once
the site is safe to control, those devices counted at their worst case meanwhile.

Two of five listed simulated miners, known from an earlier start, accept connections
and then never answer, under a read timeout (120 s) far longer than the test's guard:
before the change the agent waited out each one's identification (120 s as the known
firmware, then pyasic's probes) before its first sweep, and each read before READY.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.devices import close_quietly
from siteagent.agent.control.inventory import build_devices
from siteagent.agent.control.inventory_store import InventoryStore
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.startup import straggler_quiet_s, until_quiet
from siteagent.agent.tools.cli import _run_agent
from siteagent.domain import DeviceState
from siteagent.sim.site import SimSite

GUARD_S = 60.0  # far below the 480 s the old start-up spent on the silent miners
TIMEOUT_S = 120.0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """The agent's state directory, as the daemon finds it."""
    (tmp_path / "state").mkdir()
    return tmp_path / "state"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a temp dir, as systemd's notify socket is."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        yield s, str(path)


async def _known_then_silent(site: SimSite, state_dir: Path) -> list[str]:
    """Identify every miner once (the store keeps them), then silence the last two."""
    cfg = parse_config(
        {
            "site": {"cap_w": 1_000_000},
            "inventory": {"miners": [{"address": m.address} for m in site.miners]},
        }
    )
    store = InventoryStore(state_dir / "inventory.sqlite")
    try:
        links = await build_devices(cfg, store)
    finally:
        store.close()
    await close_quietly([t.driver for t in links], "a test's driver")
    silent = [m.address for m in site.miners[-2:]]
    for a in silent:
        site.set_fault(a, "no_answer")
    await site.ready()
    return silent


async def test_unanswered_listed_miners_count_at_worst_case_while_the_rest_are_read(
    tmp_path: Path,
) -> None:
    async with SimSite(5, base_address="127.13.0.1", backends=["whatsminer", "luxos"]) as site:
        addrs = [m.address for m in site.miners]
        cfg = parse_config(
            {
                "site": {"cap_w": 1_000_000},
                "telemetry": {"timeout_s": TIMEOUT_S},
                "inventory": {"miners": [{"address": a} for a in addrs]},
            }
        )
        # Identified while answering; silent from the first sweep on.
        links = await build_devices(cfg)
        assert all(t.driver is not None for t in links)
        silent = [m.address for m in site.miners[-2:]]
        for a in silent:
            site.set_fault(a, "no_answer")
        await site.ready()
        quiet_s = straggler_quiet_s(TIMEOUT_S)
        agent = Agent(cfg, links)
        first = asyncio.create_task(agent.sweep())
        async with asyncio.timeout(GUARD_S):
            finished = await until_quiet(agent.fleet.tried, first.done, quiet_s)
        assert not finished  # the silent two are still being read
        assert agent.fleet.tried() == 3
        snap = agent.snapshot()
        for d in snap.devices:
            link = agent.fleet.get_link(d.device_id)
            assert link is not None
            if link.address in silent:
                assert d.state is DeviceState.UNKNOWN
                assert d.budget_w == d.nameplate_power_w > 0
                assert not d.controllable
            else:
                assert d.state is DeviceState.MINING
                assert d.controllable
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await close_quietly([t.driver for t in links], "a test's driver")


async def test_identification_gives_up_on_silent_listed_miners(state_dir: Path) -> None:
    async with SimSite(5, base_address="127.13.2.1", backends=["whatsminer", "luxos"]) as site:
        silent = await _known_then_silent(site, state_dir)
        addrs = [m.address for m in site.miners]
        cfg = parse_config(
            {
                "site": {"cap_w": 1_000_000},
                "telemetry": {"timeout_s": TIMEOUT_S},
                "inventory": {"miners": [{"address": a} for a in addrs]},
            }
        )
        store = InventoryStore(state_dir / "inventory.sqlite")
        try:
            async with asyncio.timeout(GUARD_S):
                links = await build_devices(cfg, store)
        finally:
            store.close()
        by_address = {t.address: t for t in links}
        assert sorted(by_address) == sorted(addrs)  # listed: in the fleet, answered or not
        # The silent two connect on a later read; until then they are never read.
        assert [a for a in addrs if by_address[a].driver is None] == silent
        await close_quietly([t.driver for t in links], "a test's driver")


async def test_ready_comes_without_waiting_out_miners_that_never_answer(
    listener: tuple[socket.socket, str],
    tmp_path: Path,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real start-up path (``siteagent run``), to READY over the notify socket."""
    caplog.set_level(logging.INFO, logger="siteagent")
    s, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    async with SimSite(5, base_address="127.13.1.1", backends=["whatsminer"]) as site:
        await _known_then_silent(site, state_dir)
        listed = "".join(f'[[inventory.miners]]\naddress = "{m.address}"\n' for m in site.miners)
        cfg = tmp_path / "siteagent.toml"
        cfg.write_text(
            "[site]\ncap_w = 1000000\n[control]\ninterval_s = 5\n"
            f"[telemetry]\ninterval_s = 5\ntimeout_s = {TIMEOUT_S}\n"
            f"[inventory]\n{listed}"
            '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
            f'[state]\ndir = "{state_dir}"\n'
        )
        await run_until_ready(cfg, s)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("siteagent")]
    assert any(t.startswith("identified 5 device(s) in 5 address(es)") for t in lines), lines
    assert any(t.startswith("first sweep") for t in lines), lines


async def run_until_ready(config: Path, notify: socket.socket) -> None:
    """``siteagent run`` in this process until READY on ``notify``, then stopped by its
    SIGTERM as systemd stops it; it must exit 0."""
    run = asyncio.create_task(_run_agent(str(config)))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(GUARD_S):
            while True:
                fields = (await loop.sock_recv(notify, 4096)).decode().split("\n")
                if fields[0] == "READY=1":
                    break
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(run, GUARD_S) == 0
