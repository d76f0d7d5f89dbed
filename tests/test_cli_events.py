"""`siteagent event add | list | cancel` against a served API on 127.5.0.0/16."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from fakesite import fake_agent, site_config
from test_api import TOKENS

from siteagent.agent.api.auth import hash_token
from siteagent.agent.api.http import ApiServer, serve_api
from siteagent.agent.tools.cli import main as cli_main
from siteagent.agent.tools.client import UsageError
from siteagent.agent.tools.event_cli import parse_instant

HOST = "127.5.1.1"
CDT = timezone(timedelta(hours=-5))


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "".join(f"{n}:{s.label}:sha256:{hash_token(t).hex()}\n" for n, (t, s) in TOKENS.items())
    )
    cfg = site_config(
        str(tmp_path),
        cap_w=40_000,
        domains=[{"id": "r1", "limit_w": 16_000}],
        api={"host": HOST, "port": 0, "tokens_file": str(tokens)},
    )
    agent = await fake_agent(cfg, 10, domain=lambda i: "r1" if i < 5 else "site")
    server = await serve_api(agent, cfg)
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["alice"][0])
    monkeypatch.setenv("SITEAGENT_URL", f"http://{HOST}:{server.port}")
    try:
        yield server
    finally:
        await server.close()
        await agent.stop()


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main, list(argv))


def local(t: datetime) -> str:
    """A time as an operator in Texas (CDT) writes it: minutes and the -05:00 offset."""
    return t.astimezone(CDT).strftime("%Y-%m-%dT%H:%M%z")


async def test_event_add_list_status_audit_cancel(
    served: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = datetime.now(UTC) + timedelta(hours=2)
    argv = ("event", "add", "--start", local(soon), "--for", "1h", "--target", "32kW")
    assert await cli(*argv, "--name", "ers-0814", "--id", "ers-0814") == 0
    out = capsys.readouterr().out
    assert "ers-0814: ers-0814: site 32000 W for 3600 s" in out and "(scheduled)" in out
    # The same command again is a no-op (same id, same content).
    assert await cli(*argv, "--name", "ers-0814", "--id", "ers-0814") == 0
    capsys.readouterr()
    ago = datetime.now(UTC) - timedelta(minutes=1)
    assert (
        await cli(
            "event",
            "add",
            "--start",
            local(ago),
            "--end",
            local(ago + timedelta(hours=1)),
            "--target",
            "12kW",
            "--domain",
            "r1",
            "--name",
            "rack-shed",
            "--json",
        )
        == 0
    )
    now_ev = json.loads(capsys.readouterr().out)
    assert (now_ev["state"], now_ev["domain"], now_ev["target_w"]) == ("active", "r1", 12_000)
    assert now_ev["duration_s"] == 3600
    assert await cli("event", "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert now_ev["id"] in lines[1] and "active" in lines[1] and "12.0 kW" in lines[1]
    assert "ers-0814" in lines[2] and "scheduled" in lines[2] and "api:alice" in lines[2]
    assert await cli("status") == 0
    out = capsys.readouterr().out
    assert "domain r1" in out and "limit 12.0 kW (lowered from 16.0 kW)" in out

    assert await cli("event", "cancel", "ers-0814", "--reason", "called off") == 0
    assert "cancelled ers-0814" in capsys.readouterr().out
    assert await cli("event", "cancel", now_ev["id"]) == 0
    capsys.readouterr()
    assert await cli("event", "list") == 0
    assert capsys.readouterr().out.strip() == "no events"
    assert await cli("event", "list", "--all") == 0
    assert capsys.readouterr().out.count("cancelled") == 2
    assert await cli("audit", "--limit", "100") == 0
    out = capsys.readouterr().out
    # The book's own records name the event's source as their client.
    book = [line for line in out.splitlines() if "api:alice" in line]
    assert sum("event add" in line for line in book) == 2
    assert sum("event cancel" in line for line in book) == 2
    assert "called off" in out
    assert served.services.runtime.events.in_force(datetime.now(UTC).timestamp()) == {}


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--start", "2026-08-14T16:00", "--for", "1h"], 2, "without a UTC offset"),
        (["--start", "tomorrow", "--for", "1h"], 2, "cannot read 'tomorrow' as a time"),
        (["--start", "2099-08-14T16:00-05:00"], 2, "--for 1h, or --end TIME"),
        (
            ["--start", "2099-08-14T16:00-05:00", "--for", "1h", "--end", "2099-08-14T18:00Z"],
            2,
            "not both",
        ),
        (["--start", "2099-08-14T16:00-05:00", "--for", "soon"], 2, "cannot read duration"),
        (["--start", "2020-08-14T16:00-05:00", "--for", "1h"], 1, "a past event cannot"),
        (
            ["--start", "2099-08-14T16:00-05:00", "--for", "1h", "--domain", "r9"],
            1,
            "refused (409): unknown domain 'r9'",
        ),
    ],
)
async def test_event_add_errors_are_clear(
    served: ApiServer,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    code: int,
    words: str,
) -> None:
    argv = ["event", "add", "--target", "400kW", "--name", "ers", *extra]
    assert await cli(*argv) == code
    assert words in capsys.readouterr().err
    assert served.services.runtime.events.list(include_past=True) == []


async def test_cancelling_another_sources_event_takes_admin(
    served: ApiServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    start = local(datetime.now(UTC) + timedelta(hours=1))
    argv = ("event", "add", "--start", start, "--for", "30m", "--target", "30kW")
    assert await cli(*argv, "--name", "n", "--id", "e1") == 0
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["bob"][0])
    assert await cli("event", "cancel", "e1") == 4
    assert "takes the admin scope" in capsys.readouterr().err
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["root"][0])
    assert await cli("event", "cancel", "e1", "--reason", "admin lifts it") == 0
    assert await cli("event", "cancel", "nope") == 1
    assert "no event 'nope'" in capsys.readouterr().err


def test_parse_instant_keeps_the_offset() -> None:
    t = parse_instant("2026-08-14T16:00-05:00", "--start")
    assert t.timestamp() == datetime(2026, 8, 14, 21, 0, tzinfo=UTC).timestamp()
    assert parse_instant("2026-08-14T21:00Z", "--start") == t
    with pytest.raises(UsageError, match="without a UTC offset"):
        parse_instant("2026-08-14T16:00", "--start")
