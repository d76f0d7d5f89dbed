"""Telemetry and actuation in worker processes (issue 20 item 1), against simulated
miners on loopback: readings land in the fleet as the agent's own, a command goes to
the worker owning the miner and its outcome comes back, and a worker killed mid-run
leaves its miners at their worst case until it is restarted (one line each way)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_startup_bounded import run_until_ready

from siteagent.agent.config import Config, default_id, parse_config
from siteagent.agent.control.inventory import build_devices, scan
from siteagent.agent.control.inventory_store import InventoryStore
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.workers import (
    AUTO_MIN_DEVICES,
    GONE,
    RemoteDriver,
    WorkerSpec,
    WorkerTelemetry,
    _Worker,
    make_workers,
    start_workers,
    worker_count,
)
from siteagent.agent.ops.metrics import Family, head_families
from siteagent.domain import DeviceError, DeviceState, DeviceStatus
from siteagent.domain.table import STATE_CODE
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.power import SIM_MODELS, PowerTiming
from siteagent.sim.site import SimSite

BASE = "127.12.0.1"  # this module's own loopback range (127.12.0.0/16)
BACKENDS = ["braiins", "whatsminer", "luxos"]
GUARD_S = 60.0  # a wait that never ends fails the test instead of hanging it


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _config(addresses: list[str], workers: int | str = 0) -> Config:
    return parse_config(
        {
            "site": {"cap_w": 1_000_000},
            "telemetry": {"timeout_s": 3.0, "stale_after_s": 30.0, "workers": workers},
            "inventory": {"miners": [{"address": a} for a in addresses]},
        }
    )


async def _agent(cfg: Config, clock: Clock) -> Agent:
    agent = Agent(cfg, await build_devices(cfg), clock=clock)
    agent.telemetry = await start_workers(cfg, agent.fleet, clock)
    return agent


async def _until(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds (failing the test after GUARD_S)."""
    async with asyncio.timeout(GUARD_S):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


def _worker_metric(agent: Agent, name: str) -> dict[str, float]:
    """One of the agent's per-worker metric families as served: worker index -> value."""
    for fam in head_families(agent, None, agent.clock()):
        if isinstance(fam, Family) and fam.name == f"siteagent_telemetry_worker_{name}":
            return {labels[0]: value for labels, value in fam.samples}
    raise AssertionError(f"no siteagent_telemetry_worker_{name} family")


def _view(agent: Agent) -> list[DeviceStatus]:
    """What a snapshot says of each device, the reading's own timestamp aside."""
    return [
        replace(d, reading=None if d.reading is None else replace(d.reading, timestamp_s=0.0))
        for d in agent.snapshot().devices
    ]


def test_auto_runs_workers_only_at_scale() -> None:
    assert worker_count("auto", AUTO_MIN_DEVICES - 1, 16) == 0
    assert worker_count("auto", AUTO_MIN_DEVICES, 16) == 15
    assert worker_count("auto", AUTO_MIN_DEVICES, 1) == 1
    assert worker_count(0, 50_000, 16) == 0
    assert worker_count(3, 10, 16) == 3
    assert _config(["127.12.0.1"], "auto").telemetry.workers == "auto"
    # By default a large site's miners are read in workers, a small one's in one process.
    assert parse_config({"site": {"cap_w": 1}}).telemetry.workers == "auto"


def test_a_bad_worker_count_names_the_key() -> None:
    from siteagent.agent.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _config(["127.12.0.1"], "many")
    assert "telemetry.workers" in str(e.value)


async def test_readings_from_workers_land_in_the_fleet_as_the_agents_own() -> None:
    async with SimSite(6, base_address=BASE, backends=BACKENDS) as site:
        addrs = [m.address for m in site.miners]
        clock = Clock()
        single = await _agent(_config(addrs, 0), clock)
        assert single.telemetry is None
        split = await _agent(_config(addrs, 2), clock)
        assert isinstance(split.telemetry, WorkerTelemetry)
        try:
            assert len(split.telemetry.shards) == 2
            pids = split.telemetry.pids()
            assert None not in pids and os.getpid() not in pids
            await single.sweep()
            await split.sweep()
            assert all(isinstance(split.fleet.link(r).driver, RemoteDriver) for r in range(6))
            assert _view(split) == _view(single)
            assert all(d.state is DeviceState.MINING for d in split.snapshot().devices)
            assert all(d.controllable for d in split.snapshot().devices)
        finally:
            await split.telemetry.close()


async def test_a_workers_readings_land_as_they_come_not_when_its_sweep_ends() -> None:
    """A miner that hangs holds back its own reading only: the others' reach the fleet
    in a part of the worker's answer while the hanging one waits out its timeout."""
    async with SimSite(4, base_address="127.12.6.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        clock = Clock()
        agent = await _agent(_config(addrs, 1), clock)
        assert agent.telemetry is not None
        try:
            await agent.sweep()  # connects every miner
            site.set_fault(addrs[0], "no_answer")
            await site.ready()
            clock.now_s += 100.0
            sweep = asyncio.create_task(agent.sweep())
            fleet = agent.fleet
            rows = [fleet.row(default_id(a)) for a in addrs]
            async with asyncio.timeout(GUARD_S):
                while not all(fleet.last_ok_s[r] == clock.now_s for r in rows[1:]):
                    assert not sweep.done(), "the others were read only as the sweep ended"
                    await asyncio.sleep(0.05)
            # Read, while the hanging miner's read (3 s timeout) is still in flight.
            assert not sweep.done()
            assert fleet.last_ok_s[rows[0]] < clock.now_s
            await sweep
            assert fleet.last_ok_s[rows[0]] < clock.now_s
        finally:
            await agent.telemetry.close()


async def test_a_workers_reading_counts_from_when_it_was_taken_at_the_latest() -> None:
    """A reading taken seconds into a sweep counts from then (the worker's delay after
    the ask, added to when the agent asked), not from the ask, nor from its arrival."""
    async with SimSite(2, base_address="127.12.7.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        cfg = _config(addrs, 1)
        agent = Agent(cfg, await build_devices(cfg))  # the agent's own clock
        agent.telemetry = await start_workers(cfg, agent.fleet, agent.clock)
        assert agent.telemetry is not None
        try:
            await agent.sweep()  # connects every miner
            site.set_fault(addrs[0], "slow", delay_s=1.5)
            await site.ready()
            fleet = agent.fleet
            rows = [fleet.row(default_id(a)) for a in addrs]
            for r in rows:
                fleet.link(r).next_read_s = 0.0  # due now
            asked_s = agent.clock()
            await agent.sweep()
            done_s = agent.clock()
            slow, quick = (float(fleet.last_ok_s[r]) for r in rows)
            assert asked_s + 1.4 <= slow <= done_s
            assert asked_s <= quick < asked_s + 1.4
        finally:
            await agent.telemetry.close()


async def test_start_up_goes_on_without_a_worker_lost_while_identifying() -> None:
    """A worker gone when start-up identifies: the others' finds are theirs, the miners
    it would have identified are shared out unidentified (counted at their worst case),
    and they are read once its restart connects them."""
    async with SimSite(4, base_address="127.12.8.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        cfg = _config(addrs, 2)
        clock = Clock()
        telemetry = make_workers(cfg, 2, clock=clock)
        await telemetry.launch()
        try:
            lost = telemetry.shards[0]
            assert lost.process is not None and lost.process.pid is not None
            os.kill(lost.process.pid, signal.SIGKILL)
            await asyncio.wait_for(lost.down.wait(), GUARD_S)
            links = await build_devices(cfg, identifier=telemetry.identify)
            assert len(links) == 4  # listed: in the fleet, found or not
            agent = Agent(cfg, links, clock=clock)
            telemetry.fleet = agent.fleet
            await telemetry.adopt()
            agent.telemetry = telemetry
            assert sorted(len(s.rows) for s in telemetry.shards) == [2, 2]
            before = {d.device_id: d for d in agent.snapshot().devices}
            assert all(d.budget_w >= d.nameplate_power_w for d in before.values())
            await asyncio.wait_for(lost.up.wait(), GUARD_S)  # restarted
            async with asyncio.timeout(GUARD_S):
                while not all(d.state is DeviceState.MINING for d in agent.snapshot().devices):
                    clock.now_s += 100.0
                    await agent.sweep()
                    for shard in telemetry.shards:
                        await shard.idle.wait()
        finally:
            await telemetry.close()


async def test_a_scheduled_sweep_does_not_wait_out_a_slow_worker() -> None:
    """The scheduler's sweep returns once the workers are asked, so the next one is not
    skipped while a slow miner is read; it asks only for the miners not still being
    read, and each sweep counts as done once all its answers are in."""
    async with SimSite(2, base_address="127.12.9.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        cfg = _config(addrs, 1)
        agent = Agent(cfg, await build_devices(cfg))
        agent.telemetry = telemetry = await start_workers(cfg, agent.fleet, agent.clock)
        assert telemetry is not None
        try:
            await agent.sweep()  # connects every miner
            site.set_fault(addrs[0], "slow", delay_s=2.0)
            await site.ready()
            fleet, shard, done = agent.fleet, telemetry.shards[0], agent.sweeps
            slow, quick = (fleet.row(default_id(a)) for a in addrs)
            read_s = float(fleet.last_ok_s[quick])
            for row in (slow, quick):
                fleet.link(row).next_read_s = 0.0  # due now
            await agent.sweep(wait_for_workers=False)
            assert agent.sweeps == done and not shard.idle.is_set()  # asked, not answered
            await _until(lambda: fleet.last_ok_s[quick] != read_s)
            assert shard.in_flight.keys() == {shard.rows.index(slow)}  # the slow one, still
            for row in (slow, quick):
                fleet.link(row).next_read_s = 0.0
            await agent.sweep(wait_for_workers=False)  # asks for the quick one only
            await _until(lambda: shard.idle.is_set() and agent.sweeps == done + 2)
            assert not shard.in_flight
        finally:
            await telemetry.close()


async def test_a_command_goes_to_the_owning_worker_and_its_outcome_comes_back() -> None:
    async with SimSite(4, base_address="127.12.1.1", backends=["braiins"]) as site:
        addrs = [m.address for m in site.miners]
        clock = Clock()
        agent = await _agent(_config(addrs, 2), clock)
        assert agent.telemetry is not None
        try:
            await agent.sweep()
            fleet = agent.fleet
            # Each miner's driver sends to the worker that reads it (rows dealt in turn).
            owners = [fleet.link(r).driver for r in range(4)]
            assert [d.shard.spec.index for d in owners if isinstance(d, RemoteDriver)] == [
                0,
                1,
                0,
                1,
            ]
            row = 1
            target = site.miner(fleet.link(row).address)
            low_w = target.model.power_target_min_w + 100
            driver = fleet.link(row).driver
            assert driver is not None
            took_w = await driver.set_power_target(low_w)
            assert took_w == low_w
            assert target.power.target_w == low_w
            # Others untouched: only the owning worker's miner was told.
            for r in (0, 2, 3):
                m = site.miner(fleet.link(r).address)
                assert m.power.target_w == m.model.power_target_default_w
            assert not target.power.paused
            await driver.sleep()
            assert target.power.paused
            # An error comes back as the same class the worker's driver raised.
            site.set_fault(fleet.link(row).address, "refuse")
            await site.ready()
            with pytest.raises(DeviceError):
                await driver.wake()
            assert target.power.paused
        finally:
            await agent.telemetry.close()


async def test_a_killed_worker_leaves_its_miners_at_worst_case_until_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="siteagent")
    async with SimSite(6, base_address="127.12.2.1", backends=BACKENDS) as site:
        addrs = [m.address for m in site.miners]
        clock = Clock()
        agent = await _agent(_config(addrs, 2), clock)
        telemetry = agent.telemetry
        assert telemetry is not None
        try:
            await agent.sweep()
            assert all(d.state is DeviceState.MINING for d in agent.snapshot().devices)
            victim = telemetry.shards[0]
            pid = telemetry.pids()[0]
            assert pid is not None
            assert _worker_metric(agent, "up") == {"0": 1.0, "1": 1.0}
            assert sum(_worker_metric(agent, "devices").values()) == 6
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(victim.down.wait(), GUARD_S)
            assert _worker_metric(agent, "up") == {"0": 0.0, "1": 1.0}
            # Past stale_after_s: the dead worker's miners were not read, the other's were.
            clock.now_s += 31.0
            await agent.sweep()
            snap = agent.snapshot()
            dead = {agent.fleet.link(r).device_id for r in victim.rows}
            assert dead and len(dead) < 6
            for d in snap.devices:
                if d.device_id in dead:
                    assert d.state is DeviceState.UNREACHABLE
                    assert not d.controllable
                    assert d.budget_w >= d.nameplate_power_w
                else:
                    assert d.state is DeviceState.MINING
                    assert d.controllable
            # Restarted: read again, fresh.
            await asyncio.wait_for(victim.up.wait(), GUARD_S)
            assert telemetry.pids()[0] not in (None, pid)
            assert _worker_metric(agent, "restarts_total") == {"0": 1.0, "1": 0.0}
            assert _worker_metric(agent, "up") == {"0": 1.0, "1": 1.0}
            await agent.sweep()
            assert all(d.state is DeviceState.MINING for d in agent.snapshot().devices)
            await agent.sweep()
        finally:
            await telemetry.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "siteagent.workers"]
    assert len([t for t in lines if "exited" in t]) == 1, lines
    assert len([t for t in lines if " back:" in t]) == 1, lines


async def test_a_late_worker_leaves_its_miners_at_worst_case_until_it_answers_in_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="siteagent")
    async with SimSite(4, base_address="127.12.4.1", backends=BACKENDS) as site:
        addrs = [m.address for m in site.miners]
        clock = Clock()
        cfg = parse_config(
            {
                "site": {"cap_w": 1_000_000},
                "telemetry": {"timeout_s": 3.0, "stale_after_s": 6.0, "workers": 2},
                "inventory": {"miners": [{"address": a} for a in addrs]},
            }
        )
        agent = await _agent(cfg, clock)
        telemetry = agent.telemetry
        assert telemetry is not None
        late = telemetry.shards[0]
        pid = telemetry.pids()[0]
        assert pid is not None
        try:
            await agent.sweep()
            os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
            clock.now_s += 10.0
            await agent.sweep()  # gives up on it after stale_after_s
            assert late.alive
            for d in agent.snapshot().devices:
                row = agent.fleet.row(d.device_id)
                if row in late.rows:
                    assert d.state is DeviceState.UNREACHABLE
                    assert d.budget_w >= d.nameplate_power_w
                else:
                    assert d.state is DeviceState.MINING
            # Still stopped: no second sweep is sent to it on top of the one it owes.
            await agent.sweep()
            assert not late.idle.is_set()
            # Its backlog shows: every miner it owns is asked for and not answered.
            in_flight = _worker_metric(agent, "reads_in_flight")
            assert in_flight == {"0": float(len(late.rows)), "1": 0.0}
            os.kill(pid, signal.SIGCONT)  # its late batch counts from when asked
            await asyncio.wait_for(late.idle.wait(), GUARD_S)
            assert _worker_metric(agent, "reads_in_flight") == {"0": 0.0, "1": 0.0}
            clock.now_s += 10.0
            await agent.sweep()
            assert all(d.state is DeviceState.MINING for d in agent.snapshot().devices)
            assert telemetry.pids()[0] == pid  # the same process: late, not dead
        finally:
            os.kill(pid, signal.SIGCONT)
            await telemetry.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "siteagent.workers"]
    assert len([t for t in lines if "did not answer within" in t]) == 1, lines
    assert len([t for t in lines if " back:" in t]) == 1, lines


async def test_the_daemon_runs_its_miners_in_workers_and_stops_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``siteagent run`` with ``telemetry.workers = 2``: READY with every miner read
    through the workers, and on SIGTERM the workers end with the agent."""
    caplog.set_level(logging.INFO, logger="siteagent")
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        await _ready_in_workers(s, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("siteagent")]
    assert "telemetry: 4 miner(s) in 2 worker process(es)" in lines, lines
    assert "first sweep of 4 device(s)" in " ".join(lines), lines
    assert not [t for t in lines if "exited" in t], lines  # stopped, not died
    assert multiprocessing.active_children() == []


async def _ready_in_workers(s: socket.socket, tmp_path: Path) -> None:
    """The daemon on four simulated miners in two workers, to READY and stopped."""
    async with SimSite(4, base_address="127.12.3.1", backends=BACKENDS) as site:
        # Two listed, two found by a scan range: both kinds identified in the workers.
        listed = "".join(
            f'[[inventory.miners]]\naddress = "{m.address}"\n' for m in site.miners[:2]
        )
        scan = f'scan = ["{site.miners[2].address}-{site.miners[3].address}"]\n'

        cfg = tmp_path / "siteagent.toml"
        cfg.write_text(
            "[site]\ncap_w = 1000000\n[control]\ninterval_s = 1\n"
            "[telemetry]\ninterval_s = 1\ntimeout_s = 3\nworkers = 2\n"
            f"[inventory]\n{scan}{listed}"
            '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
            f'[state]\ndir = "{tmp_path / "state"}"\n'
        )
        await run_until_ready(cfg, s)
        # Each miner identified and connected once, by the worker that reads it: not by
        # the agent's start-up as well (which then had the worker connect again).
        bos = [m for m in site.miners if isinstance(m, SimBraiinsMiner)]
        assert bos
        assert [m.grpc_connections for m in bos] == [1] * len(bos)
        assert [m.grpc_calls["GetConstraints"] for m in bos] == [1] * len(bos)
    # What the workers identified is in the inventory, for the next start.
    store = InventoryStore(tmp_path / "state" / "inventory.sqlite")
    try:
        known = {m.address for m in store.miners(include_missing=False)}
    finally:
        store.close()
    assert known == {m.address for m in site.miners}


async def test_a_scan_hands_new_and_moved_miners_to_the_workers(tmp_path: Path) -> None:
    """A later scan identifies in the workers as start-up does: a new miner is read by
    the worker that found it, on the connection its identification opened; a moved one
    by a worker at its new address, its old worker letting go; the scan's second
    connections to the miners already read are closed once the agent has taken in what
    it found."""
    cfg = parse_config(
        {
            "site": {"cap_w": 1_000_000},
            "telemetry": {"timeout_s": 3.0, "stale_after_s": 30.0, "workers": 2},
            "inventory": {"scan": ["127.12.10.1-127.12.10.8"]},
        }
    )
    store = InventoryStore(tmp_path / "inventory.sqlite")
    site = SimSite(3, base_address="127.12.10.1")
    await site.start()
    arrivals: list[SimBraiinsMiner] = []
    telemetry = make_workers(cfg, 2)
    try:
        await telemetry.launch()
        trackers = await build_devices(cfg, store, identifier=telemetry.identify)
        clock = Clock()
        agent = Agent(
            cfg,
            trackers,
            clock=clock,
            rescan=lambda: scan(cfg, store, identifier=telemetry.identify),
        )
        telemetry.fleet, telemetry.clock = agent.fleet, agent.clock
        await telemetry.adopt()
        agent.telemetry = telemetry
        await agent.sweep()
        leaving = site.miners[1]
        moved_id = next(
            link.device_id for link in agent.fleet.links() if link.address == leaving.address
        )
        was = agent.fleet[moved_id].driver
        assert isinstance(was, RemoteDriver)
        await leaving.stop()
        model = SIM_MODELS[leaving.model.key]
        index = int(leaving.serial.removeprefix("SIMBOS"))
        arrivals += [
            SimBraiinsMiner("127.12.10.6", model, PowerTiming(), index=index),  # moved
            SimBraiinsMiner("127.12.10.4", model, PowerTiming(), index=index + 100),  # new
        ]
        for m in arrivals:
            await m.start()
        await agent._scan_job()

        fleet = agent.fleet
        assert len(fleet) == 4
        assert fleet[moved_id].address == "127.12.10.6"
        now = fleet[moved_id].driver
        assert isinstance(now, RemoteDriver) and now is not was
        assert was.shard.rows[was.position] == GONE  # its old worker let go of it
        new_row = next(r for r, link in enumerate(fleet.links()) if link.address == "127.12.10.4")
        assert isinstance(fleet.link(new_row).driver, RemoteDriver)
        assert sum(s.n_devices for s in telemetry.shards) == 4
        clock.now_s += 100.0
        await agent.sweep()
        for r in range(len(fleet)):
            assert fleet.last_ok_s[r] == clock.now_s, fleet.link(r).address
        assert all(d.state is DeviceState.MINING for d in agent.snapshot().devices)
        # Read on the connection the worker's identification opened: not connected again.
        assert arrivals[1].grpc_connections == 1
        # The miners read all along: the scan's own connections to them are closed.
        stayed = [m for m in site.miners[::2] if isinstance(m, SimBraiinsMiner)]
        assert len(stayed) == 2
        await _until(lambda: all(m.grpc_open_connections == 1 for m in stayed))
        await _until(lambda: arrivals[0].grpc_open_connections == 1)
    finally:
        await telemetry.close()
        for m in arrivals:
            await m.stop()
        await site.stop()
        store.close()


async def test_a_full_pipe_to_a_stopped_worker_does_not_hold_the_loop() -> None:
    """The agent sends a worker that reads nothing (stopped) more than its pipe holds
    (20,000 miners to take): the send waits in the pipe's own thread and the loop runs
    on. Sent on the loop's thread, it held the loop until the worker read again."""
    async with SimSite(2, base_address="127.12.11.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        agent = await _agent(_config(addrs, 1), Clock())
        telemetry = agent.telemetry
        assert telemetry is not None
        shard = telemetry.shards[0]
        pid = telemetry.pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(5.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            t0 = time.monotonic()
            for i in range(20_000):
                # Never asked for: no fleet row, and no connection made.
                shard.add(GONE, (f"extra-{i}", f"127.12.11.{100 + i % 100}", None, None))
            shard.send_added()
            for _ in range(10):
                await asyncio.sleep(0.01)
            assert time.monotonic() - t0 < 3.0
            assert telemetry.pids()[0] == pid  # stopped, not dead
        finally:
            resume.cancel()
            os.kill(pid, signal.SIGCONT)
            await telemetry.close()


async def test_a_stopping_worker_ends_its_reads_before_it_closes_their_drivers() -> None:
    """Told to stop with reads in flight (miners that do not answer), a worker cancels
    them and waits for them before it closes its drivers: none runs on into a closed
    connection, to fail there and be logged as an error nobody took in (171 tracebacks
    at one daemon's stop). The worker runs here, in the test's process, on its pipe."""
    async with SimSite(3, base_address="127.12.13.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        ours, theirs = multiprocessing.Pipe()
        miners = tuple((default_id(a), a, None, None) for a in addrs)
        worker = _Worker(theirs, WorkerSpec(0, miners, 30.0, 10, None, logging.WARNING))
        serving = asyncio.ensure_future(worker.serve())

        async def until(what: str) -> tuple[object, ...]:
            while True:
                msg = await asyncio.wait_for(asyncio.to_thread(ours.recv), GUARD_S)
                if msg[0] == what and (what != "readings" or msg[5]):  # a sweep's last part
                    return tuple(msg)

        try:
            await until("ready")
            ours.send(("read", 1, np.arange(3, dtype=np.int32)))
            await until("readings")  # connected
            for a in addrs:
                site.set_fault(a, "no_answer")
            await site.ready()
            ours.send(("read", 2, np.arange(3, dtype=np.int32)))
            await asyncio.sleep(0.5)  # reading, each until its 30 s timeout
            reads = [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "_Worker._read"
            ]
            assert len(reads) == 3
            ours.send(("stop",))
            await asyncio.wait_for(serving, GUARD_S)
            assert all(t.done() for t in reads)
        finally:
            serving.cancel()
            ours.close()


def _part(positions: list[int], time_s: float) -> dict[str, np.ndarray]:
    """The columns of a worker's answer: ``positions`` read at ``time_s``, mining."""
    n = len(positions)
    return {
        "pos": np.asarray(positions, np.int32),
        "time_s": np.full(n, time_s),
        "state": np.full(n, STATE_CODE[DeviceState.MINING], np.int8),
        "power_w": np.full(n, 3000.0),
        "hashrate_ths": np.full(n, 100.0),
        "temperature_c": np.full(n, 60.0),
        "power_target_w": np.full(n, np.nan),
        "utilization_frac": np.full(n, np.nan),
        "estimated": np.zeros(n, np.bool_),
        "login_ok": np.full(n, -1, np.int8),
    }


async def test_miners_a_worker_left_unanswered_are_asked_again_at_the_next_sweep(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sweep's last part came without some of its miners (a reading that ended with
    # no outcome: a library's cancel that escaped the driver). Still counted as being
    # read, they were never asked again: 30 miners of 10,000 stayed unread for good.
    # One the sweep answered and a later sweep asked again is that later one's.
    caplog.set_level(logging.INFO, logger="siteagent")
    async with SimSite(2, base_address="127.12.14.1", backends=["whatsminer"]) as site:
        clock = Clock()
        agent = await _agent(_config([m.address for m in site.miners], 1), clock)
        telemetry = agent.telemetry
        assert telemetry is not None
        shard = telemetry.shards[0]
        pid = telemetry.pids()[0]
        assert pid is not None
        failed: tuple[np.ndarray, list[tuple[str, str]]] = (np.empty(0, np.int32), [])
        try:
            await agent.sweep()
            os.kill(pid, signal.SIGSTOP)  # its real answers come after the ones below
            clock.now_s += 10.0
            await agent.sweep(wait_for_workers=False)
            first = shard._seq
            assert shard.in_flight == {0: first, 1: first}
            assert shard.pipe is not None
            # The sweep's parts, as a worker that lost the reading of position 1 sends
            # them: 0 answered, then (after the next sweep asked 0 again) the last part.
            part: tuple[Any, ...] = ("readings", first, _part([0], 0.0), [], failed, False, 0.0)
            shard._take(shard.pipe, part)
            clock.now_s += 10.0
            await agent.sweep(wait_for_workers=False)
            second = shard._seq
            assert shard.in_flight == {0: second, 1: first}
            last: tuple[Any, ...] = ("readings", first, _part([], 0.0), [], failed, True, 0.0)
            shard._take(shard.pipe, last)
            assert shard.in_flight == {0: second}
            os.kill(pid, signal.SIGCONT)  # the first sweep's real answer: from before
            await asyncio.wait_for(shard.idle.wait(), GUARD_S)
            assert not shard.in_flight
            clock.now_s += 10.0
            await agent.sweep()  # both asked again, and read
            assert not shard.in_flight
            assert all(d.state is DeviceState.MINING for d in agent.snapshot().devices)
        finally:
            os.kill(pid, signal.SIGCONT)
            await telemetry.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "siteagent.workers"]
    unanswered = [t for t in lines if "without answering" in t]
    assert len(unanswered) == 1, lines
    assert "1 of its miner(s)" in unanswered[0]
