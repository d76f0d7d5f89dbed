"""Demand-response events at run time: the event book, the API, the loop's caps, the metrics.

The site test runs the real agent against simulated Braiins OS miners on
127.5.0.0/16 (pyasic over loopback), its API in process.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakesite import fake_agent, site_config
from prometheus_client.parser import text_string_to_metric_families
from test_api import auth, token_store
from test_plan_dry_run import digest, plan_dry_run, write_config

from siteagent.agent.api.events import EventBook, EventError, GridEvent
from siteagent.agent.api.http import Services, create_app, make_services
from siteagent.agent.api.store import DB_NAME, Store
from siteagent.agent.config import Config, parse_config
from siteagent.agent.control.inventory import build_devices
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import families, render_text
from siteagent.sim.site import SimSite

BASE = "127.5.0.1"
N_SIM = 6
N_FAKE = 10  # fake miners of 3 kW: 30 kW; m0000-m0004 in rack "r1" (16 kW)


def iso(t: datetime) -> str:
    return t.isoformat()


def now_utc() -> datetime:
    return datetime.now(UTC)


def event_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "ers-test",
        "start": iso(now_utc() + timedelta(minutes=10)),
        "duration_s": 3600,
        "target_w": 20_000,
    }
    body.update(over)
    return body


@dataclass
class Env:
    agent: Agent
    cfg: Config
    services: Services
    http: httpx.AsyncClient

    @property
    def book(self) -> EventBook:
        return self.services.runtime.events

    async def add(self, who: str = "alice", **over: Any) -> httpx.Response:
        return await self.http.post("/v1/events", json=event_body(**over), headers=auth(who))

    def book_audit(self) -> list[tuple[str, str, str, str | None]]:
        """(action, actor, client, subject) of the book's own records, oldest first."""
        return [
            (r.action, r.actor, r.client, r.override_id)
            for r in reversed(self.services.store.audit(1000))
            if r.action.startswith("event ")
        ]


def _client(services: Services) -> httpx.AsyncClient:
    app = create_app(services)
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
    return httpx.AsyncClient(transport=transport, base_url="http://agent")


def fake_config(state_dir: Path) -> Config:
    return site_config(str(state_dir), cap_w=40_000, domains=[{"id": "r1", "limit_w": 16_000}])


async def open_env(state_dir: Path) -> tuple[Agent, Config, Services]:
    cfg = fake_config(state_dir)
    agent = await fake_agent(cfg, N_FAKE, domain=lambda i: "r1" if i < 5 else "site")
    return agent, cfg, make_services(agent, cfg, tokens=token_store())


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    agent, cfg, services = await open_env(tmp_path)
    async with _client(services) as http:
        yield Env(agent, cfg, services, http)
    await agent.stop()
    services.store.close()


# -- the site: an event comes into force at its start and sheds the simulated miners ------


def sim_config(site: SimSite, state_dir: Path, cap_w: float) -> Config:
    addresses = [m.address for m in site.miners]
    return parse_config(
        {
            "site": {"cap_w": cap_w, "safety_margin_w": 0, "correction_window_s": 10},
            "inventory": {"scan": [f"{addresses[0]}-{addresses[-1]}"], "sleep_power_w": 25},
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
            # Slow timers: within the test, every tick is one the event asked for.
            "telemetry": {"interval_s": 60, "timeout_s": 1.0, "stale_after_s": 30},
            "control": {"interval_s": 60, "actuation_timeout_s": 3, "confirm_timeout_s": 30},
            "state": {"dir": str(state_dir)},
        }
    )


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    s = SimSite(n_miners=N_SIM, base_address=BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def until(check: Callable[[], bool], bound_s: float, what: str) -> None:
    """Wait for a condition the agent reaches by itself; fail naming it after ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {bound_s:.0f} s")
        await asyncio.sleep(0.05)


async def test_an_event_from_the_api_sheds_the_site_at_its_start_and_cancel_ends_it(
    site: SimSite, tmp_path: Path
) -> None:
    full_w = sum(m.nameplate_power_w for m in site.miners)
    cfg = sim_config(site, tmp_path, cap_w=2 * full_w)
    agent = Agent(cfg, await build_devices(cfg))
    services = make_services(agent, cfg, tokens=token_store())
    target_w = 0.5 * full_w
    try:
        async with _client(services) as http:
            await agent.sweep()
            agent.start()
            start = now_utc() + timedelta(seconds=1.5)
            r = await http.post(
                "/v1/events",
                json=event_body(start=iso(start), duration_s=600, target_w=target_w),
                headers=auth("alice"),
            )
            assert r.status_code == 201, r.text
            ev = r.json()
            source = f"event:{ev['id']}"
            assert ev["state"] == "scheduled" and ev["cap_source"] == source
            # Before its start the event sets no cap, and nothing has shed.
            assert agent.limits().cap_source == "site"
            assert site.total_power_w(time.monotonic()) > target_w
            # The tick the event's start asked for (the regular one is a minute away).
            await until(
                lambda: agent.last_tick is not None and agent.last_tick.limits.cap_source == source,
                10.0,
                "a tick under the event's cap",
            )
            record = agent.last_tick
            assert record is not None
            assert record.limits.effective_cap_w == target_w
            assert record.applied, "the tick at the start sent no shed"
            await until(
                lambda: site.total_power_w(time.monotonic()) <= target_w,
                10.0,
                "the simulated site under the event's target",
            )
            status = (await http.get("/v1/status", headers=auth("reader"))).json()
            assert status["cap_source"] == source
            assert status["effective_cap_w"] == target_w

            r = await http.delete(
                f"/v1/events/{ev['id']}", params={"reason": "grid recovered"}, headers=auth("alice")
            )
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "cancelled"
            assert agent.limits().cap_source == "site"
            for _ in range(20):
                await asyncio.sleep(0.2)
                for link in agent.fleet.links():
                    link.next_read_s = 0.0
                await agent.sweep()
                await agent.tick()
                if site.total_power_w(time.monotonic()) > target_w:
                    break
            assert site.total_power_w(time.monotonic()) > target_w
    finally:
        await agent.stop()
        services.store.close()


# -- the book through the API ----------------------------------------------------------


async def test_an_event_in_force_is_a_cap_and_shows_in_status(env: Env) -> None:
    r = await env.add(start=iso(now_utc() - timedelta(seconds=5)), target_w=20_000)
    assert r.status_code == 201, r.text
    ev = r.json()
    assert ev["state"] == "active" and ev["source"] == "api:alice"
    limits = env.agent.limits()
    assert (limits.cap_source, limits.effective_cap_w) == (f"event:{ev['id']}", 20_000)
    status = (await env.http.get("/v1/status", headers=auth("reader"))).json()
    assert status["cap_source"] == f"event:{ev['id']}"
    listed = (await env.http.get("/v1/events", headers=auth("reader"))).json()
    assert [e["id"] for e in listed] == [ev["id"]]


async def test_a_domain_event_lowers_that_domain_only(env: Env) -> None:
    r = await env.add(start=iso(now_utc() - timedelta(seconds=1)), target_w=8_000, domain="r1")
    assert r.status_code == 201, r.text
    limits = env.agent.limits()
    assert {d.domain_id: d.limit_w for d in limits.domains} == {"r1": 8_000}
    assert limits.cap_source == "site"
    status = (await env.http.get("/v1/status", headers=auth("reader"))).json()
    (r1,) = status["domains"]
    assert (r1["limit_w"], r1["configured_limit_w"]) == (8_000, 16_000)


@pytest.mark.parametrize(
    ("over", "status", "words"),
    [
        (
            {"duration_s": None, "end": "2020-01-01T00:00:00+00:00"},
            409,
            "is not after start",
        ),
        ({"start": "2026-08-14T16:00"}, 422, "without a UTC offset"),
        ({"target_w": -1}, 422, "target_w"),
        ({"domain": "r9"}, 409, "unknown domain 'r9'"),
        (
            {"start": "2020-08-14T16:00:00-05:00", "duration_s": 3600},
            409,
            "a past event cannot be added",
        ),
        (
            {"duration_s": None, "end": "2999-01-01T00:00:00Z"},
            409,
            "longer than an event may last (7 days)",
        ),
        ({"duration_s": None}, 422, "give either duration_s or end"),
        ({"end": "2099-01-01T00:00:00Z"}, 422, "give either duration_s or end"),
        ({"duration_s": 0}, 422, "duration_s"),
        ({"id": "has space"}, 422, "id"),
        ({"target_w": "400kW"}, 422, "target_w"),
    ],
)
async def test_bad_events_are_refused_with_a_reason(
    env: Env, over: dict[str, Any], status: int, words: str
) -> None:
    body = event_body(**over)
    body = {k: v for k, v in body.items() if v is not None}
    r = await env.http.post("/v1/events", json=body, headers=auth("alice"))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert env.book.list(include_past=True) == []
    assert env.agent.limits().cap_source == "site"
    # Refused requests are audited too (the API's record), but change nothing in the book.
    assert env.book_audit() == []
    (last,) = env.services.store.audit(1)
    assert (last.action, last.status) == ("POST /v1/events", status)


async def test_idempotent_add_modification_and_audit_with_the_source(env: Env) -> None:
    body = event_body(id="ers-0814", target_w=20_000)
    first = await env.http.post("/v1/events", json=body, headers=auth("alice"))
    assert first.status_code == 201, first.text
    again = await env.http.post("/v1/events", json=body, headers=auth("alice"))
    assert again.status_code == 200
    assert again.json()["modified_seq"] == 0
    assert again.json()["created_unix_s"] == first.json()["created_unix_s"]
    changed = await env.http.post(
        "/v1/events", json={**body, "target_w": 18_000}, headers=auth("alice")
    )
    assert changed.status_code == 200
    assert (changed.json()["target_w"], changed.json()["modified_seq"]) == (18_000, 1)
    # Another actor cannot take it over; cancelling it takes admin for them.
    bob = await env.http.post("/v1/events", json=body, headers=auth("bob"))
    assert bob.status_code == 409 and "comes from api:alice" in bob.json()["detail"]
    r = await env.http.delete("/v1/events/ers-0814", headers=auth("bob"))
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = await env.http.delete(
        "/v1/events/ers-0814", params={"reason": "utility called it off"}, headers=auth("alice")
    )
    assert r.status_code == 200
    r = await env.http.delete("/v1/events/ers-0814", headers=auth("alice"))
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    r = await env.http.delete("/v1/events/nope", headers=auth("alice"))
    assert r.status_code == 404
    assert env.book_audit() == [
        ("event add", "alice", "api:alice", "ers-0814"),
        ("event modify", "alice", "api:alice", "ers-0814"),
        ("event cancel", "alice", "api:alice", "ers-0814"),
    ]
    cancel = env.services.store.audit(1000)
    (record,) = [r for r in cancel if r.action == "event cancel"]
    assert "utility called it off" in record.result
    # A cancelled id stays taken.
    r = await env.http.post("/v1/events", json=body, headers=auth("alice"))
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert (await env.http.get("/v1/events", headers=auth("reader"))).json() == []
    listed = (await env.http.get("/v1/events?all=true", headers=auth("reader"))).json()
    assert [(e["id"], e["state"]) for e in listed] == [("ers-0814", "cancelled")]


async def test_events_survive_a_restart_on_the_same_state_dir(tmp_path: Path) -> None:
    agent, _, services = await open_env(tmp_path)
    try:
        async with _client(services) as http:
            now_ = await http.post(
                "/v1/events",
                json=event_body(id="now", start=iso(now_utc() - timedelta(seconds=2))),
                headers=auth("alice"),
            )
            later = await http.post(
                "/v1/events",
                json=event_body(id="later", domain="r1", target_w=9_000),
                headers=auth("alice"),
            )
            assert (now_.status_code, later.status_code) == (201, 201)
        assert agent.limits().cap_source == "event:now"
    finally:
        await agent.stop()
        services.store.close()

    agent2, _, services2 = await open_env(tmp_path)
    try:
        assert agent2.limits().cap_source == "event:now"
        assert agent2.limits().effective_cap_w == 20_000
        book = services2.runtime.events
        assert [e.id for e in book.list()] == ["now", "later"]
        later_ev = book.get("later")
        assert later_ev is not None and (later_ev.domain, later_ev.target_w) == ("r1", 9_000)
        # The one still to come is not in force yet (r1 keeps its configured limit).
        assert {d.domain_id: d.limit_w for d in agent2.limits().domains} == {"r1": 16_000}
    finally:
        await agent2.stop()
        services2.store.close()


# -- the book itself (what the OpenADR VEN calls) --------------------------------------


def ven_event(**over: Any) -> GridEvent:
    base: dict[str, Any] = {
        "id": "oadr-1",
        "name": "oadr-1",
        "source": "openadr:oadr-1",
        "start_unix_s": 1_000.0,
        "duration_s": 600.0,
        "target_w": 10_000.0,
    }
    base.update(over)
    return GridEvent(**base)


@pytest.fixture
def book(tmp_path: Path) -> Iterator[EventBook]:
    store = Store.in_dir(tmp_path)
    clock = [900.0]
    b = EventBook(store, limits_w={"site": 40_000, "r1": 16_000}, wall_clock=lambda: clock[0])
    yield b
    store.close()


def test_ramp_up_reaches_the_target_at_the_start(book: EventBook) -> None:
    book.add(ven_event(ramp_up_s=100.0), "ven")
    src = "openadr:oadr-1"
    assert book.in_force(899.0) == {}
    assert book.in_force(900.0) == {src: (40_000.0, "site")}
    assert book.in_force(950.0) == {src: (25_000.0, "site")}
    assert book.in_force(1_000.0) == {src: (10_000.0, "site")}
    assert book.in_force(1_599.0) == {src: (10_000.0, "site")}
    assert book.in_force(1_600.0) == {}


def test_opted_out_event_is_listed_but_not_in_force(book: EventBook) -> None:
    book.add(ven_event(), "ven")
    out = book.set_opt("oadr-1", "out", "ven")
    assert (out.opt, out.modified_seq) == ("out", 1)
    assert book.in_force(1_100.0) == {}
    assert [e.state(1_100.0) for e in book.list()] == ["opted-out"]
    assert [(s.event_id, s.opted_in, s.in_force) for s in book.states(1_100.0)] == [
        ("oadr-1", False, False)
    ]
    book.set_opt("oadr-1", "in", "ven")
    assert book.in_force(1_100.0) == {"openadr:oadr-1": (10_000.0, "site")}
    actions = [(r.action, r.client) for r in reversed(book.store.audit(10))]
    assert actions == [
        ("event add", "openadr:oadr-1"),
        ("event opt-out", "openadr:oadr-1"),
        ("event opt-in", "openadr:oadr-1"),
    ]


def test_the_vens_repeats_are_no_ops_and_its_cancel_is_idempotent(book: EventBook) -> None:
    first = book.add(ven_event(), "ven")
    assert book.add(ven_event(), "ven") == first
    assert book.store.counts.audit_seq == 1
    book.cancel("oadr-1", "ven", "cancelled by the VTN")
    book.cancel("oadr-1", "ven", "cancelled by the VTN")
    assert book.store.counts.audit_seq == 2
    assert book.in_force(1_100.0) == {}
    with pytest.raises(EventError) as e:
        book.add(ven_event(domain="r9"), "ven")
    assert e.value.status == 409 and "unknown domain" in e.value.reason


# -- metrics ---------------------------------------------------------------------------


async def test_metrics_show_events_in_force_the_next_one_and_opt_state(env: Env) -> None:
    start = now_utc() + timedelta(hours=1)
    await env.add(id="now", start=iso(now_utc() - timedelta(seconds=1)), target_w=25_000)
    await env.add(id="next", start=iso(start), target_w=18_000)
    await env.add(id="later", start=iso(start + timedelta(hours=1)), target_w=12_000)
    env.book.set_opt("later", "out", "alice")
    await env.agent.tick()
    text = render_text(families(env.agent)).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("siteagent_grid_")
    }
    assert got == {
        ("siteagent_grid_events_in_force", ()): 1.0,
        ("siteagent_grid_event_next_start_timestamp_seconds", ()): start.timestamp(),
        ("siteagent_grid_event_next_target_watts", ()): 18_000.0,
        ("siteagent_grid_event_opted_in", (("event", "now"),)): 1.0,
        ("siteagent_grid_event_opted_in", (("event", "next"),)): 1.0,
        ("siteagent_grid_event_opted_in", (("event", "later"),)): 0.0,
    }


# -- plan --dry-run --------------------------------------------------------------------


async def test_dry_run_plans_under_a_stored_event_in_force(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store.in_dir(state)
    book = EventBook(store, limits_w={"site": 39_000})
    now = time.time()
    book.add(
        ven_event(
            id="ev-6kw",
            source="api:alice",
            start_unix_s=now - 60,
            duration_s=3600,
            target_w=6_000.0,
        ),
        "alice",
    )
    store.close()
    before = digest(state)
    async with SimSite(2, base_address="127.5.2.1") as site:
        cfg = write_config(tmp_path, [m.address for m in site.miners], "efficiency-capping")
        code, out, err = await plan_dry_run(cfg)
    assert code == 0, err
    assert "effective cap 6000 W (from event:ev-6kw)" in out, out
    # Read only: nothing written.
    assert digest(state) == before


def test_a_store_from_before_events_reads_as_holding_none(tmp_path: Path) -> None:
    Store.in_dir(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("DROP TABLE events")  # as an agent before events left it
    db.commit()
    db.close()
    old = Store.read_only(tmp_path / DB_NAME)
    try:
        assert old.events() == [] and old.get_event("x") is None
    finally:
        old.close()
    # Opened for writing, it gains the table (the schema's CREATE ... IF NOT EXISTS).
    store = Store.in_dir(tmp_path)
    try:
        book = EventBook(store, limits_w={"site": 40_000})
        book.add(ven_event(), "ven")
        assert [e.id for e in store.events()] == ["oadr-1"]
    finally:
        store.close()
