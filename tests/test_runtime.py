"""The override runtime: restore at start and expiry at each override's end time, with or
without the HTTP API. Time is driven through an injected wall clock and timer, not waited for."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakesite import fake_agent, site_config

from siteagent.agent.api.auth import Scope, TokenEntry, TokenStore, hash_token
from siteagent.agent.api.http import create_app, make_services, serve_api
from siteagent.agent.api.overrides import CapRequest, PinRequest
from siteagent.agent.api.runtime import RECHECK_S, RETRY_S, OverrideRuntime
from siteagent.agent.config import Config
from siteagent.agent.control.loop import Agent

START_UNIX_S = 1_700_000_000.0
HOST = "127.1.215.1"
TOKEN = "tok-operate-runtime-0123"


@dataclass
class Handle:
    """A pending fake timer."""

    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Timers:
    """A wall clock and the loop's timers, both moved by the test (``advance``)."""

    wall_unix_s: float = START_UNIX_S
    mono_s: float = 0.0
    _due: list[tuple[float, int, Handle, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def wall_clock(self) -> float:
        return self.wall_unix_s

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Handle:
        handle = Handle()
        heapq.heappush(self._due, (self.mono_s + delay_s, next(self._seq), handle, callback))
        return handle

    def pending_s(self) -> list[float]:
        """Seconds until each timer still armed fires."""
        return sorted(when - self.mono_s for when, _, h, _ in self._due if not h.cancelled)

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` pass on both clocks, firing each timer at its time."""
        end_s = self.mono_s + dt_s
        while self._due and self._due[0][0] <= end_s:
            when, _, handle, callback = heapq.heappop(self._due)
            if handle.cancelled:
                continue
            self.wall_unix_s += when - self.mono_s
            self.mono_s = when
            callback()
        self.wall_unix_s += end_s - self.mono_s
        self.mono_s = end_s

    def step_wall(self, dt_s: float) -> None:
        """The wall clock alone jumps (NTP, a suspended host): no timer fires for it."""
        self.wall_unix_s += dt_s


def cap(cap_w: float, ttl_s: float) -> CapRequest:
    return CapRequest(kind="cap", cap_w=cap_w, ttl_s=ttl_s, reason="grid event")


def expiries(runtime: OverrideRuntime) -> list[tuple[str, str | None, str]]:
    return [
        (r.actor, r.override_id, r.result) for r in runtime.store.audit(100) if r.action == "expire"
    ]


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return site_config(str(tmp_path), cap_w=40_000)


@pytest.fixture
async def agent(cfg: Config) -> AsyncIterator[Agent]:
    a = await fake_agent(cfg, 10)
    yield a
    await a.stop()


def open_runtime(agent: Agent, cfg: Config, timers: Timers) -> OverrideRuntime:
    return OverrideRuntime.open(
        agent, cfg, wall_clock=timers.wall_clock, call_later=timers.call_later
    )


@pytest.fixture
async def running(agent: Agent, cfg: Config) -> AsyncIterator[tuple[OverrideRuntime, Timers]]:
    """A started runtime on injected time, and no API."""
    timers = Timers()
    runtime = open_runtime(agent, cfg, timers)
    runtime.start()
    yield runtime, timers
    await runtime.close()


async def test_an_override_ends_at_its_expiry_with_no_api_at_all(
    running: tuple[OverrideRuntime, Timers], agent: Agent
) -> None:
    runtime, timers = running
    assert timers.pending_s() == []  # nothing in force: no timer
    ov, _ = runtime.manager.create(cap(25_000, 0.5), actor="alice", client="-", admin=False)
    assert agent.limits().cap_source == ov.id
    assert timers.pending_s() == [0.5]  # one timer, at the expiry: no polling
    timers.advance(0.375)
    assert agent.limits().cap_source == ov.id and expiries(runtime) == []
    timers.advance(0.125)
    assert agent.limits().cap_source == "site"
    assert runtime.manager.active() == []
    assert expiries(runtime) == [
        ("siteagent", ov.id, f"expired at its end time ({ov.expires_at_unix_s:.0f})")
    ]
    stored = runtime.store.get_override(ov.id)
    assert stored is not None and stored.state(timers.wall_clock()) == "expired"
    assert timers.pending_s() == []


async def test_the_timer_follows_the_next_expiry_as_overrides_come_and_go(
    running: tuple[OverrideRuntime, Timers], agent: Agent
) -> None:
    runtime, timers = running
    long, _ = runtime.manager.create(cap(30_000, 8), actor="alice", client="-", admin=False)
    assert timers.pending_s() == [8.0]
    short, _ = runtime.manager.create(
        PinRequest(kind="pin", device_id="m0001", power_w=2000, ttl_s=2, reason="rig"),
        actor="alice",
        client="-",
        admin=False,
    )
    assert timers.pending_s() == [2.0]
    runtime.manager.cancel(short.id, actor="alice", admin=False, reason="done")
    assert timers.pending_s() == [8.0]
    timers.advance(8)
    assert [i for _, i, _ in expiries(runtime)] == [long.id]
    assert timers.pending_s() == []


async def test_a_step_of_the_wall_clock_is_noticed_within_the_recheck(
    running: tuple[OverrideRuntime, Timers],
) -> None:
    runtime, timers = running
    ov, _ = runtime.manager.create(cap(25_000, 3600), actor="alice", client="-", admin=False)
    assert timers.pending_s() == [RECHECK_S]
    timers.step_wall(3600)
    timers.advance(RECHECK_S)
    assert runtime.manager.active() == [] and [i for _, i, _ in expiries(runtime)] == [ov.id]


async def test_an_expiry_the_store_refuses_is_retried_and_logged_once(
    running: tuple[OverrideRuntime, Timers], agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, timers = running
    ov, _ = runtime.manager.create(cap(25_000, 1), actor="alice", client="-", admin=False)
    runtime.store.close()  # every write now fails, as on a full disk
    with caplog.at_level(logging.INFO, logger="siteagent.overrides"):
        timers.advance(1 + 5 * RETRY_S)
    failures = [r for r in caplog.records if "expiring overrides failed" in r.getMessage()]
    assert len(failures) == 1
    # Not recorded means not ended: the cap stays in force, and expiry keeps trying.
    assert agent.limits().cap_source == ov.id and timers.pending_s() == [RETRY_S]


async def test_stored_overrides_are_restored_at_open_and_expire_on_time(
    cfg: Config, agent: Agent
) -> None:
    timers = Timers()
    first = open_runtime(agent, cfg, timers)
    gone, _ = first.manager.create(cap(30_000, 5), actor="alice", client="-", admin=False)
    kept, _ = first.manager.create(cap(25_000, 60), actor="alice", client="-", admin=False)
    await first.close()

    timers.step_wall(10)  # the agent was down for 10 s: one expired meanwhile
    again = await fake_agent(cfg, 10)
    runtime = open_runtime(again, cfg, timers)
    try:
        assert [o.id for o in runtime.manager.active()] == [kept.id]
        assert again.limits().cap_source == kept.id  # before any tick, without an API
        assert [i for _, i, _ in expiries(runtime)] == [gone.id]
        runtime.start()
        assert timers.pending_s() == [RECHECK_S]  # 50 s to go; rechecked every RECHECK_S
        timers.advance(49.75)
        assert again.limits().cap_source == kept.id
        timers.advance(0.25)
        assert again.limits().cap_source == "site"
        assert [i for _, i, _ in expiries(runtime)] == [kept.id, gone.id]
    finally:
        await runtime.close()
        await again.stop()


async def test_by_default_expiry_runs_on_the_event_loop(agent: Agent, cfg: Config) -> None:
    runtime = OverrideRuntime.open(agent, cfg)
    runtime.start()
    try:
        ov, _ = runtime.manager.create(cap(25_000, 0.5), actor="alice", client="-", admin=False)
        for _ in range(200):  # the loop's own timer ends it; give up after 10 s
            if not runtime.manager.active():
                break
            await asyncio.sleep(0.05)
        assert agent.limits().cap_source == "site"
        assert [i for _, i, _ in expiries(runtime)] == [ov.id]
    finally:
        await runtime.close()


async def test_the_api_is_handed_the_runtime_and_leaves_it_open(
    agent: Agent, tmp_path: Path
) -> None:
    cfg = site_config(str(tmp_path), cap_w=40_000, api={"host": HOST, "port": 0})
    timers = Timers()
    runtime = open_runtime(agent, cfg, timers)
    runtime.start()
    tokens = TokenStore(None, [TokenEntry("op", Scope.OPERATE, hash_token(TOKEN))])
    services = make_services(agent, cfg, runtime=runtime, tokens=tokens)
    app = create_app(services)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body: dict[str, Any] = {"kind": "cap", "cap_w": 25_000, "ttl_s": 0.5, "reason": "grid"}
    try:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            r = await http.post("/v1/overrides", json=body, headers=headers)
            assert r.status_code == 201
            assert timers.pending_s() == [0.5]
            timers.advance(0.5)
            listed = await http.get("/v1/overrides", params={"state": "all"}, headers=headers)
        assert [(o["id"], o["state"]) for o in listed.json()] == [(r.json()["id"], "expired")]
        server = await serve_api(agent, cfg, runtime=runtime)
        await server.close()
        # The server closed; the runtime it was handed still works (its owner closes it).
        runtime.manager.create(cap(30_000, 1), actor="alice", client="-", admin=False)
        timers.advance(1)
        assert len(expiries(runtime)) == 2
    finally:
        await runtime.close()
