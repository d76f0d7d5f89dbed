"""The override API in process: authorization table, overrides end to end, audit, limits, CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakesite import CommandLog, fake_agent, site_config

from siteagent.agent.api.auth import Scope, TokenEntry, TokenStore, hash_token
from siteagent.agent.api.http import ApiServer, Services, create_app, make_services, serve_api
from siteagent.agent.control.loop import Agent
from siteagent.agent.tools.cli import main as cli_main

TOKENS = {
    "reader": ("tok-read-0123456789", Scope.READ),
    "alice": ("tok-operate-alice-0123", Scope.OPERATE),
    "bob": ("tok-operate-bob-456789", Scope.OPERATE),
    "root": ("tok-admin-root-abcdef", Scope.ADMIN),
}
CLIENT_ADDR = "10.1.2.3"
N = 10  # miners of 3 kW: 30 kW in all; m0000-m0004 in rack "r1" (16 kW)


class Clock:
    """A settable clock (s)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def token_store() -> TokenStore:
    return TokenStore(
        None, [TokenEntry(name, scope, hash_token(tok)) for name, (tok, scope) in TOKENS.items()]
    )


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


@dataclass
class Env:
    agent: Agent
    services: Services
    http: httpx.AsyncClient
    wall: Clock
    auth_clock: Clock
    log: CommandLog

    async def post(self, who: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/v1/overrides", json=body, headers=auth(who))

    def audit(self) -> list[dict[str, Any]]:
        return [
            {
                "actor": r.actor,
                "client": r.client,
                "action": r.action,
                "status": r.status,
                "request": r.request,
                "result": r.result,
                "override_id": r.override_id,
            }
            for r in self.services.store.audit(1000)
        ]


def cap(cap_w: float, **kw: Any) -> dict[str, Any]:
    return {"kind": "cap", "cap_w": cap_w, "ttl_s": 3600, "reason": "grid event", **kw}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    cfg = site_config(
        str(tmp_path),
        cap_w=40_000,
        domains=[{"id": "r1", "limit_w": 16_000}],
        api={"max_override_ttl_s": 7200, "max_body_bytes": 2048, "auth_failures_per_minute": 5},
    )
    log = CommandLog()
    agent = await fake_agent(cfg, N, log, domain=lambda i: "r1" if i < 5 else "site")
    wall, auth_clock = Clock(1_700_000_000.0), Clock(100.0)
    services = make_services(
        agent, cfg, wall_clock=wall, auth_clock=auth_clock, tokens=token_store()
    )
    app = create_app(services, max_body_bytes=cfg.api.max_body_bytes)
    transport = httpx.ASGITransport(app=app, client=(CLIENT_ADDR, 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
        yield Env(agent, services, http, wall, auth_clock, log)
    await agent.stop()
    services.store.close()


# -- authorization table -----------------------------------------------------------------

READS = [
    ("GET", "/v1/status"),
    ("GET", "/v1/devices"),
    ("GET", "/v1/overrides"),
    ("GET", "/v1/audit"),
]
WRITES = [
    ("POST", "/v1/overrides", cap(35_000)),
    ("POST", "/v1/overrides/resume", {"reason": "done"}),
]


@pytest.mark.parametrize(
    ("who", "read_status", "write_status"),
    [
        (None, 401, 401),
        ("bogus", 401, 401),
        ("reader", 200, 403),
        ("alice", 200, None),
        ("root", 200, None),
    ],
)
async def test_authorization_table(
    env: Env, who: str | None, read_status: int, write_status: int | None
) -> None:
    env.services.limiter.per_minute = 1000  # this test fails on purpose more than 5 times
    headers = (
        {} if who is None else ({"Authorization": "Bearer nope"} if who == "bogus" else auth(who))
    )
    for method, path in READS:
        r = await env.http.request(method, path, headers=headers)
        assert r.status_code == read_status, (method, path, r.text)
    for method, path, body in WRITES:
        r = await env.http.request(method, path, json=body, headers=headers)
        if write_status is None:
            assert r.status_code in (200, 201), (path, r.text)
        else:
            assert r.status_code == write_status, (path, r.text)
            assert r.json()["detail"]
    if write_status is not None:
        assert env.services.manager.active() == []
        assert env.agent.limits().cap_source == "site"
    r = await env.http.delete("/v1/overrides/ovr-x", params={"reason": "x"}, headers=headers)
    assert r.status_code == (write_status or 404)


async def test_openapi_document_is_served_without_a_token(env: Env) -> None:
    r = await env.http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert {"/v1/status", "/v1/overrides", "/v1/overrides/{override_id}", "/v1/plan"} <= set(
        doc["paths"]
    )
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


# -- overrides -----------------------------------------------------------------------------


async def test_cap_override_lowers_the_cap_ticks_at_once_and_shows_in_status(env: Env) -> None:
    r = await env.post("alice", cap(24_000, reason="utility asked"))
    assert r.status_code == 201, r.text
    ov = r.json()
    assert ov["state"] == "active" and ov["actor"] == "alice" and ov["cap_w"] == 24_000
    assert ov["expires_at_unix_s"] - ov["created_at_unix_s"] == 3600
    limits = env.agent.limits()
    assert limits.effective_cap_w == 24_000 and limits.cap_source == ov["id"]
    for _ in range(50):  # the immediate tick runs as soon as the handler returns
        if env.log.entries:
            break
        await asyncio.sleep(0.01)
    assert env.agent.last_tick is not None and env.log.entries, "no immediate tick"
    assert all(k in ("set_power_target", "sleep") for k in env.log.kinds())
    st = (await env.http.get("/v1/status", headers=auth("reader"))).json()
    assert st["effective_cap_w"] == 24_000 and st["cap_source"] == ov["id"]
    assert st["cap_source_override"]["reason"] == "utility asked"
    assert st["mining_w"] == 30_000 and st["ai_w"] == 0 and st["active_overrides"] == 1
    plan = (await env.http.get("/v1/plan", headers=auth("reader"))).json()
    assert plan["cap_source"] == ov["id"] and plan["setpoints"]
    assert all(sp["reason"] for sp in plan["setpoints"])
    devices = (await env.http.get("/v1/devices", headers=auth("reader"))).json()
    assert len(devices) == N and devices[0]["device_id"] == "m0000"


async def test_plan_is_404_before_any_tick(env: Env) -> None:
    r = await env.http.get("/v1/plan", headers=auth("reader"))
    assert r.status_code == 404 and "no control tick" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (cap(50_000), 409, "above the site's hard cap"),
        (cap(20_000, domain="r1"), 409, "above domain r1"),
        (cap(10_000, domain="nope"), 409, "unknown domain"),
        (cap(30_000, ttl_s=7201), 422, "longer than the maximum 2h (7200 s"),
        ({"kind": "cap", "cap_w": 30_000, "reason": "x"}, 422, "ttl_s"),
        ({"kind": "cap", "cap_w": 30_000, "ttl_s": 60}, 422, "reason"),
        (cap(-5), 422, "cap_w"),
        (cap(30_000, colour="red"), 422, "colour"),
        ({"kind": "boost", "ttl_s": 60, "reason": "x"}, 422, "kind"),
        ({"kind": "mode", "mode": "turbo", "ttl_s": 60, "reason": "x"}, 422, "mode"),
        (
            {"kind": "pin", "device_id": "ghost", "power_w": 100, "ttl_s": 60, "reason": "x"},
            409,
            "unknown device",
        ),
        ([1, 2, 3], 422, "body"),
        # Strict numbers: a string or a boolean is not one (it was read as 5 W, or 1 W).
        ({**cap(30_000), "cap_w": "30000"}, 422, "cap_w"),
        (cap(True), 422, "cap_w"),
        (cap(30_000, ttl_s="60"), 422, "ttl_s"),
        (
            {"kind": "pin", "device_id": "m0000", "power_w": "100", "ttl_s": 60, "reason": "x"},
            422,
            "power_w",
        ),
    ],
)
async def test_bad_overrides_are_refused_with_a_reason(
    env: Env, body: Any, status: int, words: str
) -> None:
    r = await env.http.post("/v1/overrides", json=body, headers=auth("alice"))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert env.services.manager.active() == []
    assert env.agent.limits().cap_source == "site"


async def test_malformed_bodies_are_4xx(env: Env) -> None:
    h = {**auth("alice"), "content-type": "application/json"}
    for raw in (
        b"{",
        b"",
        b"\xff\xfe",
        b'{"kind": "cap", "cap_w": NaN, "ttl_s": 1, "reason": "x"}',
        b'{"kind":"cap","cap_w":Infinity,"ttl_s":1,"reason":"x"}',
    ):
        r = await env.http.post("/v1/overrides", content=raw, headers=h)
        assert r.status_code == 422, (raw, r.text)
    r = await env.http.post(
        "/v1/overrides", content=b"cap=1", headers={**auth("alice"), "content-type": "text/plain"}
    )
    assert r.status_code == 422
    big = json.dumps(cap(30_000, reason="x" * 4000))
    r = await env.http.post("/v1/overrides", content=big, headers=h)
    assert r.status_code == 413 and "2048 bytes" in r.json()["detail"]
    assert env.services.manager.active() == []


async def test_pin_that_breaks_a_domain_cap_is_refused_with_the_reason(env: Env) -> None:
    # Rack r1 holds five 3 kW miners (15 kW); lower its limit to 13 kW so the plan cuts some.
    r = await env.post("alice", cap(13_000, domain="r1"))
    assert r.status_code == 201
    await env.agent.tick()
    await env.agent.sweep()
    cut = [d for d in env.agent.snapshot().devices if d.domain == "r1" and d.budget_w < 2900]
    assert cut, "the plan cut nothing in r1"
    victim = cut[0].device_id
    r = await env.post(
        "alice",
        {"kind": "pin", "device_id": victim, "power_w": 3000, "ttl_s": 600, "reason": "test"},
    )
    assert r.status_code == 409, r.text
    assert "r1" in r.json()["detail"] and "over its limit" in r.json()["detail"]
    r = await env.post(
        "bob", {"kind": "pin", "device_id": victim, "power_w": 0, "ttl_s": 600, "reason": "t"}
    )
    assert r.status_code == 201
    r = await env.post(
        "alice", {"kind": "exclude", "device_id": victim, "ttl_s": 60, "reason": "again"}
    )
    assert r.status_code == 409 and "already has override" in r.json()["detail"]
    assert len(env.agent.limits().pins) == 1


async def test_idempotency_key_applies_a_retry_once(env: Env) -> None:
    body = cap(25_000, idempotency_key="ticket-42")
    first = await env.post("alice", body)
    again = await env.post("alice", body)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert len(env.services.manager.active()) == 1
    other = await env.post("alice", {**body, "cap_w": 20_000})
    assert other.status_code == 409 and "different request" in other.json()["detail"]
    # Keys are per token: bob's ticket-42 is his own.
    assert (await env.post("bob", body)).status_code == 201


async def test_raising_a_cap_takes_admin_and_replaces(env: Env) -> None:
    low = (await env.post("alice", cap(20_000))).json()
    r = await env.post("bob", cap(35_000, replaces=[low["id"]]))
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = await env.http.delete(
        f"/v1/overrides/{low['id']}", params={"reason": "x"}, headers=auth("bob")
    )
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    assert env.agent.limits().effective_cap_w == 20_000
    r = await env.post("root", cap(35_000, replaces=[low["id"]]))
    assert r.status_code == 201, r.text
    assert env.agent.limits().effective_cap_w == 35_000
    old = (await env.http.get(f"/v1/overrides/{low['id']}", headers=auth("reader"))).json()
    assert old["state"] == "replaced" and old["ended_by"] == "root"
    r = await env.post("root", cap(38_000, replaces=[low["id"]]))
    assert r.status_code == 409 and "not active" in r.json()["detail"]


async def test_cancel_and_resume(env: Env) -> None:
    mine = (await env.post("alice", cap(25_000))).json()
    r = await env.http.delete(
        f"/v1/overrides/{mine['id']}", params={"reason": "over"}, headers=auth("alice")
    )
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert env.agent.limits().cap_source == "site"
    r = await env.http.delete(
        f"/v1/overrides/{mine['id']}", params={"reason": "again"}, headers=auth("alice")
    )
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    r = await env.http.delete(
        "/v1/overrides/ovr-none", params={"reason": "x"}, headers=auth("alice")
    )
    assert r.status_code == 404
    for mode in ("monitor-only", "mining-off"):
        r = await env.post("bob", {"kind": "mode", "mode": mode, "ttl_s": 60, "reason": "m"})
        assert r.status_code == 201
    assert env.agent.monitor_only and env.agent.limits().mining_off
    r = await env.http.post(
        "/v1/overrides/resume", json={"reason": "all clear"}, headers=auth("alice")
    )
    assert r.status_code == 200 and len(r.json()) == 2
    assert not env.agent.monitor_only and not env.agent.limits().mining_off


async def test_overrides_expire_on_time(env: Env) -> None:
    ov = (await env.post("alice", cap(25_000, ttl_s=60))).json()
    env.wall.now += 59
    assert env.services.manager.expire_due() == []
    env.wall.now += 1
    assert [o.id for o in env.services.manager.expire_due()] == [ov["id"]]
    assert env.agent.limits().cap_source == "site"
    listed = (
        await env.http.get("/v1/overrides", params={"state": "all"}, headers=auth("reader"))
    ).json()
    assert listed[0]["state"] == "expired"
    assert any(a["action"] == "expire" and a["override_id"] == ov["id"] for a in env.audit())


async def test_every_write_is_audited_accepted_or_refused(env: Env) -> None:
    await env.post("alice", cap(25_000, reason="accepted one"))
    await env.post("alice", cap(99_000, reason="too high"))
    await env.post("reader", cap(25_000, reason="wrong scope"))
    await env.http.post("/v1/overrides", json=cap(25_000, reason="no token"))
    await env.http.post("/v1/overrides", content=b"x" * 5000, headers=auth("alice"))
    rows = env.audit()[::-1]
    assert [(r["actor"], r["status"]) for r in rows] == [
        ("alice", 201),
        ("alice", 409),
        ("reader", 403),
        ("anonymous", 401),
        ("anonymous", 413),
    ]
    assert all(r["client"] == CLIENT_ADDR for r in rows)
    assert "accepted one" in rows[0]["request"] and rows[0]["result"].startswith("accepted: ovr-")
    assert "above the site's hard cap" in rows[1]["result"]
    assert all(TOKENS["alice"][0] not in r["request"] + r["result"] for r in rows)
    api_rows = (await env.http.get("/v1/audit", params={"limit": 2}, headers=auth("reader"))).json()
    assert [r["status"] for r in api_rows] == [413, 401]
    older = (
        await env.http.get(
            "/v1/audit", params={"before": api_rows[-1]["seq"]}, headers=auth("reader")
        )
    ).json()
    assert [r["status"] for r in older] == [403, 409, 201]


async def test_repeated_auth_failures_are_rate_limited(env: Env) -> None:
    for _ in range(5):
        r = await env.http.get("/v1/status", headers={"Authorization": "Bearer guess"})
        assert r.status_code == 401
    r = await env.http.get("/v1/status", headers=auth("reader"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    env.auth_clock.now += 61
    assert (await env.http.get("/v1/status", headers=auth("reader"))).status_code == 200


# -- served, and the CLI client ----------------------------------------------------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ApiServer, Path]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "".join(f"{n}:{s.label}:sha256:{hash_token(t).hex()}\n" for n, (t, s) in TOKENS.items())
    )
    cfg = site_config(str(tmp_path), cap_w=40_000, api={"port": 0, "tokens_file": str(tokens)})
    agent = await fake_agent(cfg, N)
    server = await serve_api(agent, cfg)
    try:
        yield server, tokens
    finally:
        await server.close()
        await agent.stop()


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main, list(argv))


async def test_cli_override_status_list_cancel(
    served: tuple[ApiServer, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = served
    url = f"http://127.0.0.1:{server.port}"
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["alice"][0])
    assert (
        await cli("override", "cap", "32kW", "--for", "2h", "--reason", "DR event", "--url", url)
        == 0
    )
    out = capsys.readouterr().out
    assert "cap site 32000 W" in out and "by alice" in out
    assert (
        await cli("override", "mode", "monitor-only", "--for", "30m", "--reason", "r", "--url", url)
        == 0
    )
    assert (
        await cli(
            "override",
            "pin",
            "m0003",
            "--power-w",
            "2kW",
            "--for",
            "1h",
            "--reason",
            "test rig",
            "--url",
            url,
        )
        == 0
    )
    assert (
        await cli(
            "override", "exclude", "m0004", "--for", "1h", "--reason", "fan swap", "--url", url
        )
        == 0
    )
    capsys.readouterr()
    assert await cli("status", "--url", url) == 0
    out = capsys.readouterr().out
    assert "32.0 kW effective" in out and "monitor-only" in out and "4 active" in out
    assert await cli("override", "list", "--url", url) == 0
    out = capsys.readouterr().out
    assert out.count("ovr-") == 4 and "fan swap" in out
    first = server.manager.active()[0].id
    assert await cli("override", "cancel", first, "--reason", "over", "--url", url) == 0
    assert await cli("override", "mode", "resume", "--reason", "done", "--url", url) == 0
    assert len(server.manager.active()) == 2


async def test_cli_explain_says_why_a_device_is_where_it_is(
    served: tuple[ApiServer, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = served
    url = f"http://127.0.0.1:{server.port}"
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["alice"][0])
    assert await cli("explain", "m0001", "--url", url) == 0
    out = capsys.readouterr().out
    assert "m0001 (miner" in out and "no plan yet" in out
    server.services.agent.set_cap("test", 20_000)
    await server.services.agent.tick()
    assert await cli("explain", "m0001", "--url", url) == 0
    out = capsys.readouterr().out
    assert "setpoint:" in out and "rank " in out and "effective cap" in out
    assert await cli("explain", "no-such-miner", "--url", url) == 1
    assert "no device 'no-such-miner'" in capsys.readouterr().err


async def test_cli_errors_are_clear(
    served: tuple[ApiServer, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = served
    url = f"http://127.0.0.1:{server.port}"
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["alice"][0])
    assert await cli("override", "cap", "99kW", "--for", "1h", "--reason", "x", "--url", url) == 1
    assert "refused (409)" in capsys.readouterr().err
    monkeypatch.setenv("SITEAGENT_TOKEN", "wrong")
    assert await cli("status", "--url", url) == 4
    assert "authentication failed" in capsys.readouterr().err
    token_file = tmp_path / "reader-token"
    token_file.write_text(TOKENS["reader"][0] + "\n")
    monkeypatch.delenv("SITEAGENT_TOKEN")
    assert (
        await cli(
            "override",
            "cap",
            "30kW",
            "--for",
            "1h",
            "--reason",
            "x",
            "--url",
            url,
            "--token-file",
            str(token_file),
        )
        == 4
    )
    assert "not allowed" in capsys.readouterr().err
    assert await cli("status", "--url", url) == 4
    assert "no token" in capsys.readouterr().err
    assert await cli("status", "--url", "http://127.0.0.1:9", "--token-file", str(token_file)) == 3
    assert "cannot reach the agent" in capsys.readouterr().err
    assert (
        await cli(
            "override",
            "cap",
            "lots",
            "--for",
            "1h",
            "--reason",
            "x",
            "--url",
            url,
            "--token-file",
            str(token_file),
        )
        == 2
    )
    assert "cannot read power" in capsys.readouterr().err
