"""The CLI client against a served API: status load, devices, explain, audit, list --all, refusals.

The API listens on 127.1.205.1 (this module's range); the agent runs over recording miners.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakesite import fake_agent, site_config

from siteagent.agent.api.auth import Scope, hash_token
from siteagent.agent.api.http import ApiServer, ApiStartError, serve_api
from siteagent.agent.api.store import Store
from siteagent.agent.tools.cli import main as cli_main
from siteagent.agent.tools.cli import parser

HOST = "127.1.205.1"
TOKENS = {
    "alice": ("tok-operate-alice-0123", Scope.OPERATE),
    "bob": ("tok-operate-bob-456789", Scope.OPERATE),
}
N = 8  # miners of 3 kW; m0000-m0003 in rack "r1" (limit 16 kW)


def _tokens_file(tmp_path: Path) -> Path:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "".join(f"{n}:{s.label}:sha256:{hash_token(t).hex()}\n" for n, (t, s) in TOKENS.items())
    )
    return tokens


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    cfg = site_config(
        str(tmp_path),
        cap_w=40_000,
        domains=[{"id": "r1", "limit_w": 16_000}],
        api={"host": HOST, "port": 0, "tokens_file": str(_tokens_file(tmp_path))},
    )
    agent = await fake_agent(cfg, N, domain=lambda i: "r1" if i < 4 else "site")
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


async def test_status_shows_each_domains_load_next_to_its_limit(
    served: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("status", "--json") == 0
    (r1,) = [d for d in json.loads(capsys.readouterr().out)["domains"] if d["domain_id"] == "r1"]
    assert r1["worst_case_w"] == pytest.approx(4 * 3000.0)
    assert r1["measured_w"] == pytest.approx(4 * 3000.0)
    assert await cli("status") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("domain r1"))
    assert "12.0 kW measured, 12.0 kW worst case, limit 16.0 kW" in line


async def test_devices_lists_the_ids_explain_takes_and_explain_says_what_the_device_is(
    served: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("devices") == 0
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if x.startswith("m0003"))
    assert row.split() == [
        "m0003",
        "miner",
        "r1",
        "mining",
        "3.0",
        "kW",
        "fake-3",
        "fake",
        "recorder",
    ]
    assert await cli("explain", "m0003") == 0
    out = capsys.readouterr().out
    assert "fake recorder, firmware 1, at fake-3" in out
    assert "hashrate 100.0 TH/s, nameplate 100.0 TH/s" in out
    with pytest.raises(SystemExit):
        parser().parse_args(["explain", "--help"])
    help_text = capsys.readouterr().out
    assert "siteagent devices" in help_text and "status --json" not in help_text


async def test_audit_pages_back_newest_first(
    served: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    for power in ("39kW", "38kW", "37kW"):
        assert await cli("override", "cap", power, "--for", "1h", "--reason", "grid") == 0
    capsys.readouterr()
    assert await cli("audit", "--limit", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["SEQ", "TIME", "(UTC)"]
    assert "cap site 37000 W" in out[1] and "cap site 38000 W" in out[2]
    assert out[3] == "(older: siteagent audit --before 2)"
    assert await cli("audit", "--before", "2", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in rows] == [1]
    assert rows[0]["actor"] == "alice" and "39000 W" in rows[0]["result"]
    with pytest.raises(SystemExit) as e:
        await cli("audit", "--limit", "0")
    assert e.value.code == 2
    assert "--limit: found '0', expected a whole number from 1" in capsys.readouterr().err


async def test_list_all_says_who_ended_an_override_and_why(
    served: ApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("override", "mode", "ai-min", "--for", "1h", "--reason", "test") == 0
    ov = served.manager.active()[0].id
    monkeypatch.setenv("SITEAGENT_TOKEN", TOKENS["bob"][0])
    assert await cli("override", "cancel", ov, "--reason", "load test over") == 0
    capsys.readouterr()
    assert await cli("override", "list", "--all") == 0
    out = capsys.readouterr().out
    assert "ENDED" in out.splitlines()[0]
    assert "by bob: load test over" in next(x for x in out.splitlines() if ov in x)
    # Stored, not just answered: the store read afresh has it.
    stored = served.services.store.get_override(ov)
    assert stored is not None and stored.end_reason == "load test over"


def test_a_database_from_before_end_reasons_opens_and_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE overrides (id TEXT PRIMARY KEY, actor TEXT NOT NULL, idempotency_key TEXT,
            created_at_unix_s REAL NOT NULL, expires_at_unix_s REAL NOT NULL,
            ended_at_unix_s REAL, end_state TEXT, ended_by TEXT, body TEXT NOT NULL);
        CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, time_unix_s REAL NOT NULL,
            actor TEXT NOT NULL, client TEXT NOT NULL, action TEXT NOT NULL,
            request TEXT NOT NULL, status INTEGER NOT NULL, result TEXT NOT NULL,
            override_id TEXT);
        PRAGMA user_version=1;
        """
    )
    body = {
        "id": "ovr-old",
        "kind": "mode",
        "actor": "alice",
        "reason": "r",
        "created_at_unix_s": 1.0,
        "expires_at_unix_s": 2.0,
        "mode": "ai-min",
    }
    db.execute(
        "INSERT INTO overrides VALUES ('ovr-old', 'alice', NULL, 1, 2, 1.5, 'cancelled', 'bob', ?)",
        (json.dumps(body),),
    )
    db.commit()
    db.close()
    store = Store(path)
    try:
        old = store.get_override("ovr-old")
        assert old is not None and old.ended_by == "bob" and old.end_reason is None
    finally:
        store.close()


async def test_a_ttl_over_the_maximum_says_the_maximum_and_its_key(
    served: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("override", "cap", "30kW", "--for", "3d", "--reason", "long event") == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "siteagent: refused (422): ttl_s 259200 (3d) is longer than the maximum 24h "
        "(86400 s; api.max_override_ttl_s: raise it in the config for longer overrides)"
    )
    assert served.manager.active() == []


async def test_a_missing_tls_file_is_named_with_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "present.pem"
    cert.write_text("not used")
    cfg = site_config(
        str(tmp_path),
        cap_w=40_000,
        api={
            "host": HOST,
            "port": 0,
            "tls_cert": str(cert),
            "tls_key": str(tmp_path / "gone.key"),
            "tokens_file": str(_tokens_file(tmp_path)),
        },
    )
    agent = await fake_agent(cfg, 1)
    try:
        with pytest.raises(ApiStartError) as e:
            await serve_api(agent, cfg)
    finally:
        await agent.stop()
    assert str(e.value) == f"api.tls_key: {tmp_path / 'gone.key'}: No such file or directory"


@pytest.mark.parametrize(
    ("host", "tls", "warns"),
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("10.20.0.5", False, True),
        ("agent.site.example", False, True),
        ("10.20.0.5", True, False),
        ("127.0.0.1", False, False),
        ("127.1.205.1", False, False),
        ("::1", False, False),
        ("localhost", False, False),
    ],
)
def test_plain_http_off_this_machine_warns(host: str, tls: bool, warns: bool) -> None:
    from siteagent.agent.api.http import plain_http_warning

    text = plain_http_warning(host, 8800, tls=tls)
    assert (text is not None) == warns
    if text is not None:
        assert f"plain HTTP at {host}:8800" in text and "api.tls_cert" in text


async def test_a_loopback_api_starts_without_the_warning(
    served: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The served fixture already started: start one more, watching its log.
    cfg = served.services.agent.config
    with caplog.at_level(logging.WARNING, logger="siteagent.api"):
        other = await serve_api(served.services.agent, cfg)
    await other.close()
    assert not [r for r in caplog.records if "plain HTTP" in r.getMessage()]


def test_demo_takes_a_gpu_base() -> None:
    args = parser().parse_args(["demo", "--gpu-base", "127.2.205.1"])
    assert args.gpu_base == "127.2.205.1"


@pytest.mark.slow
def test_demo_runs_its_gpu_nodes_at_the_gpu_base() -> None:
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "siteagent.agent.tools.cli",
            "demo",
            *("--miners", "2", "--gpu-nodes", "1", "--gpus-per-node", "1"),
            *("--base", "127.1.205.10", "--gpu-base", "127.2.205.10", "--time-scale", "0.2"),
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "1 GPU node(s) over SSH at 127.2.205.10;" in r.stdout
