"""Miner credentials: a file outside the config, read-only on a refused login, no leaks.

Every simulated miner here runs a non-default management password. With
pyasic's defaults (no credentials file) or a wrong password in the file, no
write lands: the miner becomes read-only with one warning, counts at its worst
case, and is not asked again each tick. With the right password from a 0600
file, a write lands on the simulator. LuxOS is not among them: its API's logon
carries no password (pyasic 0.79 and Luxor's own tooling send a bare
``logon``), so a ``[firmware.luxos]`` section is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api import auth, token_store
from test_devices import CAPS, StubDriver
from test_fleet import STALE_S, check, new_link, reference
from test_loop import make_config

from siteagent.agent.api.http import create_app, make_services
from siteagent.agent.config import Config
from siteagent.agent.control.fleet import Fleet
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.agent.credentials import (
    NO_FILE_SOURCE,
    CredentialsError,
    load_credentials,
)
from siteagent.agent.ops.metrics import families, render_text
from siteagent.domain import DeviceIdentity, DevicePermissionError, DeviceReading, DeviceState
from siteagent.domain.credentials import Login, Secret
from siteagent.sim.site import SimSite

FIRMWARES = ["antminer", "braiins", "vnish", "whatsminer"]
# The simulators' password, and a wrong one the agent is given. Whatsminer's admin
# password is at most 8 bytes.
SIM_PASSWORD = "Kq7wZp2x"
WRONG_PASSWORD = "Wr0ngPw9"


def address(block: int, fw: str) -> str:
    return f"127.1.202.{block + FIRMWARES.index(fw)}"


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    return d


def write_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def config_for(addr: str, tmp_path: Path, cap_w: float, creds: Path | None) -> Config:
    # Listed: a scanned miner that refuses the login is not identified, so not tracked.
    inv: dict[str, Any] = {"miners": [{"address": addr}], "scan": []}
    if creds is not None:
        inv["credentials_file"] = str(creds)
    return make_config([addr], cap_w, inventory=inv, state={"dir": str(tmp_path / "state")}, api={})


async def one_miner(fw: str, addr: str) -> SimSite:
    site = SimSite(
        1,
        base_address=addr,
        backends=[fw],
        settle_s=0.3,
        pause_s=0.2,
        wake_s=0.3,
        restart_s=0.2,
        password=SIM_PASSWORD,
    )
    await site.start()
    return site


async def ticks(agent: Agent, n: int) -> None:
    for _ in range(n):
        await agent.sweep()
        await agent.tick()
        await asyncio.sleep(0.05)


def untouched(site: SimSite) -> bool:
    m = site.miners[0]
    return not m.power.paused and m.power.target_w >= m.model.power_target_default_w


# -- the loader ------------------------------------------------------------------------


def test_a_file_group_or_others_may_read_is_refused(secret_dir: Path) -> None:
    p = write_file(secret_dir / "creds.toml", '[firmware.braiins]\npassword = "x"\n', 0o644)
    with pytest.raises(CredentialsError) as ei:
        load_credentials(p)
    text = str(ei.value)
    assert str(p) in text
    assert "0644" in text
    assert f"chmod 600 {p}" in text


def test_mode_0400_and_0600_are_accepted(secret_dir: Path) -> None:
    for mode in (0o600, 0o400):
        p = secret_dir / f"creds-{mode:o}.toml"
        write_file(p, '[firmware.whatsminer]\npassword = "pw"\n', mode)
        logins = load_credentials(p).for_miner("m1", "10.0.0.1")
        pw = logins["whatsminer"].password
        assert pw is not None and pw.reveal() == "pw"


@pytest.mark.parametrize(
    ("text", "where", "said"),
    [
        ('[firmware.bitmain]\npassword = "x"\n', "firmware.bitmain", "unknown firmware"),
        ('[firmware.luxos]\npassword = "x"\n', "firmware.luxos", "takes no password"),
        ('[firmware.braiins]\npasword = "x"\n', "firmware.braiins.pasword", "unknown key"),
        ('[firmware.whatsminer]\nusername = "a"\n', "firmware.whatsminer.username", "unknown"),
        ('[miners."10.0.0.1"]\npassword = ""\n', 'miners."10.0.0.1".password', "non-empty"),
        ("[other]\nx = 1\n", "other", "unknown key"),
    ],
)
def test_bad_entries_are_named(secret_dir: Path, text: str, where: str, said: str) -> None:
    p = write_file(secret_dir / "creds.toml", text)
    with pytest.raises(CredentialsError) as ei:
        load_credentials(p)
    assert len(ei.value.problems) == 1
    problem = ei.value.problems[0]
    assert problem.path == where
    assert said in str(problem)
    assert str(p) in str(ei.value)


def test_a_miners_own_entry_wins_by_id_then_address(secret_dir: Path) -> None:
    p = write_file(
        secret_dir / "creds.toml",
        '[firmware.braiins]\nusername = "admin"\npassword = "fleet"\n'
        '[miners."10.0.0.1"]\npassword = "by-address"\n'
        '[miners.rack-7]\npassword = "by-id"\n',
    )
    creds = load_credentials(p)

    def pw(login: Login) -> str | None:
        return login.password.reveal() if login.password is not None else None

    assert pw(creds.for_miner("other", "10.0.0.9")["braiins"]) == "fleet"
    assert pw(creds.for_miner("other", "10.0.0.1")["braiins"]) == "by-address"
    by_id = creds.for_miner("rack-7", "10.0.0.1")["braiins"]
    assert pw(by_id) == "by-id"
    assert by_id.username == "admin"  # the firmware's user name under its own password
    assert by_id.source == f'{p} [miners."rack-7"]'
    # A firmware without a default gets the miner's own entry, or pyasic's default.
    assert pw(creds.for_miner("rack-7", "10.0.0.1")["vnish"]) == "by-id"
    assert creds.for_miner("other", "10.0.0.9")["vnish"].password is None


def test_the_systemd_credential_is_used_when_no_file_is_configured(secret_dir: Path) -> None:
    write_file(secret_dir / "miner-credentials", '[firmware.vnish]\npassword = "from-systemd"\n')
    env = {"CREDENTIALS_DIRECTORY": str(secret_dir)}
    login = load_credentials(None, env).for_miner(None, "10.0.0.1")["vnish"]
    assert login.password is not None and login.password.reveal() == "from-systemd"
    assert str(secret_dir / "miner-credentials") in login.source
    # None there and none configured: pyasic's defaults.
    assert load_credentials(None, {}).for_miner(None, "10.0.0.1")["vnish"].source == NO_FILE_SOURCE


def test_a_secret_never_shows_itself(secret_dir: Path) -> None:
    s = Secret("hunter22")
    assert "hunter22" not in repr(s) + str(s) + f"{s}" + f"{s!r}"
    p = write_file(secret_dir / "creds.toml", '[firmware.antminer]\npassword = "hunter22"\n')
    creds = load_credentials(p)
    assert "hunter22" not in repr(creds)
    assert "hunter22" not in repr(creds.for_miner(None, "10.0.0.1"))


def test_read_only_counts_at_nameplate_unless_a_fresh_reading_says_asleep() -> None:
    link = new_link(0)
    fleet, ref = Fleet([link]), reference(link)

    def status(now_s: float) -> Any:
        check(fleet, [ref], now_s)  # the fleet and the per-device specification agree
        return fleet.snapshot(now_s, STALE_S).devices[0]

    driver = StubDriver(DeviceIdentity("Bitmain", "S19", "fw", None, None, CAPS, 3600.0, 210.0))
    fleet.attach(0, driver)
    ref.attach(driver)
    r = DeviceReading("d0", 1000.0, 2000.0, DeviceState.MINING, power_target_w=2000.0)
    fleet.record_reading(0, r, 1000.0, 60.0)
    ref.record_reading(r, 1000.0, 60.0)
    assert status(1000.0).budget_w == 2000.0
    err = DevicePermissionError("authentication failed for braiins at 127.1.0.1")
    fleet.mark_read_only(0, err)
    ref.mark_read_only(err)
    r = DeviceReading("d0", 1001.0, 2000.0, DeviceState.MINING)
    fleet.record_reading(0, r, 1001.0, 60.0)
    ref.record_reading(r, 1001.0, 60.0)
    d = status(1001.0)
    assert d.budget_w == d.nameplate_power_w == 3600.0 and not d.controllable
    assert d.last_error == "read-only: authentication failed for braiins at 127.1.0.1"
    r = DeviceReading("d0", 1002.0, 20.0, DeviceState.SLEEPING)
    fleet.record_reading(0, r, 1002.0, 60.0)
    ref.record_reading(r, 1002.0, 60.0)
    assert status(1002.0).budget_w == d.sleep_power_w
    assert status(1002.0 + STALE_S + 1).budget_w == d.nameplate_power_w


# -- against the simulators --------------------------------------------------------------


async def leaked_anywhere(agent: Agent, cfg: Config, secret: str) -> list[str]:
    """Where ``secret`` shows: metrics text, API answers (status, devices, OpenAPI)."""
    where = []
    if secret in render_text(families(agent, version="1")).decode():
        where.append("metrics")
    services = make_services(agent, cfg, tokens=token_store())
    try:
        app = create_app(services, max_body_bytes=cfg.api.max_body_bytes)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            for path in ("/v1/status", "/v1/devices", "/openapi.json"):
                r = await http.get(path, headers=auth("reader"))
                assert r.status_code == 200, (path, r.text)
                if secret in r.text:
                    where.append(path)
    finally:
        services.store.close()
    return where


@pytest.mark.parametrize("how", ["pyasic-default", "wrong-password"])
@pytest.mark.parametrize("fw", FIRMWARES)
async def test_refused_credentials_make_the_miner_read_only_with_one_warning(
    fw: str, how: str, tmp_path: Path, secret_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    addr = address(10 if how == "pyasic-default" else 20, fw)
    creds = None
    if how == "wrong-password":
        user = 'username = "root"\n' if fw in ("braiins", "antminer") else ""
        creds = write_file(
            secret_dir / "creds.toml", f'[firmware.{fw}]\n{user}password = "{WRONG_PASSWORD}"\n'
        )
    site = await one_miner(fw, addr)
    trackers = []
    try:
        m = site.miners[0]
        cfg = config_for(addr, tmp_path, 0.4 * m.nameplate_power_w, creds)
        trackers = await build_devices(cfg)
        agent = Agent(cfg, trackers)
        await ticks(agent, 4)
        for t in trackers:
            t.next_read_s = 0.0  # read again now, as after the back-off
        await ticks(agent, 4)

        assert untouched(site), "a write landed with refused credentials"
        (d0,) = agent.fleet.records()
        assert d0.read_only is not None
        assert f"authentication failed for {fw} at {addr}" in d0.read_only
        expected_source = str(creds) if creds is not None else "no credentials file"
        assert expected_source in d0.read_only
        (d,) = agent.snapshot().devices
        assert not d.controllable
        assert d.last_error is not None and d.last_error.startswith("read-only: authentication")
        # Counted at its worst case: it mines, so at its nameplate (or more).
        assert d.state is not DeviceState.SLEEPING
        assert d.budget_w >= d0.nameplate_power_w
        assert sum(agent.actuation_errors.values()) <= 1  # asked once at most, not per tick
        warnings = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING
            and (t.device_id in r.getMessage() or addr in r.getMessage())
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "read-only" in warnings[0].getMessage()

        leaks = await leaked_anywhere(agent, cfg, WRONG_PASSWORD)
        assert not leaks
        assert WRONG_PASSWORD not in caplog.text
        assert WRONG_PASSWORD not in repr(cfg)
        await agent.stop()
    finally:
        await close_drivers(trackers)
        await site.stop()


@pytest.mark.parametrize("fw", FIRMWARES)
async def test_the_right_password_from_a_0600_file_lets_writes_land(
    fw: str, tmp_path: Path, secret_dir: Path
) -> None:
    addr = address(30, fw)
    user = 'username = "root"\n' if fw in ("braiins", "antminer") else ""
    # A per-miner entry for two firmwares, the firmware's default for the others.
    section = f'miners."{addr}"' if fw in ("braiins", "whatsminer") else f"firmware.{fw}"
    creds = write_file(
        secret_dir / "creds.toml",
        f'[firmware.{fw}]\npassword = "{WRONG_PASSWORD}"\n'
        * (section != f"firmware.{fw}")
        + f"[{section}]\n{user if section.startswith('firmware') else ''}"
        f'password = "{SIM_PASSWORD}"\n',
    )
    site = await one_miner(fw, addr)
    trackers = []
    try:
        m = site.miners[0]
        cfg = config_for(addr, tmp_path, 0.4 * m.nameplate_power_w, creds)
        trackers = await build_devices(cfg)
        agent = Agent(cfg, trackers)
        for _ in range(20):
            await ticks(agent, 1)
            if not untouched(site):
                break
        assert not untouched(site), [t.last_error for t in agent.fleet.records()]
        assert all(t.read_only is None for t in agent.fleet.records())
        await agent.stop()
    finally:
        await close_drivers(trackers)
        await site.stop()


async def test_a_0644_file_stops_the_agent_before_it_drives_anything(
    tmp_path: Path, secret_dir: Path
) -> None:
    p = write_file(secret_dir / "creds.toml", '[firmware.vnish]\npassword = "x"\n', 0o644)
    cfg = config_for("127.1.202.40", tmp_path, 10_000, p)
    with pytest.raises(CredentialsError, match="chmod 600"):
        await build_devices(cfg)
