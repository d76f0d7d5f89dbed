"""Reload on SIGHUP (issue 18 item 3): a valid config is applied live, an invalid one refused.

Driven end to end: `siteagent run` as a subprocess over simulated miners on
loopback, the config file rewritten on disk, SIGHUP sent as `systemctl reload`
sends it, and systemd's notify socket listened to as systemd listens.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siteagent.agent.api.store import DB_NAME, Store
from siteagent.agent.config import ConfigError, parse_config
from siteagent.agent.control.devices import DeviceDriver, DeviceLink
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.reload import plan_reload
from siteagent.agent.tools.reload import Reloader
from siteagent.sim.faults import Fault
from siteagent.sim.gpu import SimGpuSite
from siteagent.sim.site import SimSite

# This module's own loopback range: 127.9.0.0/16, one /24 per test.
CAP_BASE, BAD_BASE, RESTART_BASE, WINDOW_BASE, ADD_BASE = (
    "127.9.1.1",
    "127.9.2.1",
    "127.9.3.1",
    "127.9.4.1",
    "127.9.5.1",
)
GPU_MINER_BASE, GPU_BASE, STARTUP_BASE = "127.9.6.1", "127.9.7.1", "127.9.8.1"
WAIT_S = 60.0  # an upper bound for each step on a loaded machine, never a timing goal


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a temp dir, as systemd's notify socket is."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        yield s, str(path)


async def notified(s: socket.socket, field_: str) -> list[list[str]]:
    """Datagrams (as fields) up to and including the first with a field starting ``field_``."""
    got: list[list[str]] = []
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT_S):
        while True:
            fields = (await loop.sock_recv(s, 4096)).decode().split("\n")
            got.append(fields)
            if any(f.startswith(field_) for f in fields):
                return got


def site_toml(tmp_path: Path, addresses: list[str], cap_w: float, extra: str = "") -> str:
    """A config for the simulated site; ``extra`` is appended (more tables)."""
    listed = "".join(f'[[inventory.miners]]\naddress = "{a}"\n' for a in addresses)
    return (
        f"[site]\ncap_w = {cap_w}\nsafety_margin_w = 0\n"
        "[policy]\nmin_off_s = 0\nrestore_ramp_w_per_s = 1000000\n"
        "[control]\ninterval_s = 0.5\n"
        "[telemetry]\ninterval_s = 0.5\ntimeout_s = 1.0\n"
        f"{listed}"
        '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        f"{extra}"
    )


@dataclass
class Daemon:
    """A running `siteagent run`, its log lines collected as they come."""

    proc: asyncio.subprocess.Process
    config: Path
    notify: socket.socket
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode().rstrip("\n"))

    @property
    def log(self) -> str:
        """Everything logged so far."""
        return "\n".join(self.lines)

    async def line(self, pattern: str, after: int = 0) -> re.Match[str]:
        """The first log line from index ``after`` on matching ``pattern`` (waits for it)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                for text in self.lines[after:]:
                    if found := re.search(pattern, text):
                        return found
                if self.proc.returncode is not None:
                    raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log}")
                await asyncio.sleep(0.05)

    async def reload(self, text: str) -> int:
        """Write ``text`` as the config and send SIGHUP; the log index before it."""
        mark = len(self.lines)
        self.config.write_text(text)
        self.proc.send_signal(signal.SIGHUP)
        return mark

    async def metrics(self) -> str:
        """One scrape of the agent's metrics."""
        port = (await self.line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics"))[1]

        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return str(r.read().decode())

        return await asyncio.to_thread(get)

    async def metric(self, name: str) -> float | None:
        """The value of one unlabelled (or fully labelled) sample, ``name`` as written; None
        while it is not exposed (the site's gauges come with the first tick)."""
        text = await self.metrics()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return None if found is None else float(found[1])


@pytest.fixture
async def daemon(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> AsyncIterator[list[Daemon]]:
    """Starts agents on request (``start``); stops each at the end of the test."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.returncode is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(d.proc.wait(), 20)
            except TimeoutError:
                d.proc.kill()
                await d.proc.wait()
        if d.reader is not None:
            await d.reader


async def start(
    started: list[Daemon],
    tmp_path: Path,
    listener: tuple[socket.socket, str],
    text: str,
    *,
    until_field: str = "READY=1",
) -> Daemon:
    """Write ``text`` as the config and run the agent on it until it notifies ``until_field``
    (a prefix: READY=1 by default)."""
    s, path = listener
    cfg = tmp_path / "siteagent.toml"
    cfg.write_text(text)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    env.pop("WATCHDOG_USEC", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.agent.tools.cli",
        "run",
        "--config",
        str(cfg),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    d = Daemon(proc, cfg, s)
    d.reader = asyncio.get_running_loop().create_task(d._read())
    started.append(d)
    await notified(s, until_field)
    return d


async def until(cond: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``cond`` until it holds (fails after ``WAIT_S``)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            if await cond():
                return
            await asyncio.sleep(0.1)


async def power_under(site: SimSite, cap_w: float) -> None:
    """Wait until the simulator's own power is at or under ``cap_w``."""

    async def under() -> bool:
        return site.total_power_w() <= cap_w

    await until(under)


def audit_actions(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(actor, action, result) of every audit record in the agent's store, oldest first."""
    store = Store.read_only(tmp_path / "state" / DB_NAME)
    try:
        return [(r.actor, r.action, r.result) for r in reversed(store.audit(1000))]
    finally:
        store.close()


# -- end to end ------------------------------------------------------------------


async def test_a_lower_cap_is_applied_on_sighup_and_the_site_goes_under_it(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with SimSite(3, base_address=CAP_BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3) as site:
        addresses = [m.address for m in site.miners]
        one_w = min(m.nameplate_power_w for m in site.miners)
        d = await start(daemon, tmp_path, listener, site_toml(tmp_path, addresses, 100_000))
        assert site.total_power_w() > 2 * one_w  # all three run: the cap holds none back
        cap_w = 1.2 * one_w
        mark = await d.reload(site_toml(tmp_path, addresses, cap_w))
        applied = await d.line(r"reload: .* applied: (.*)", mark)
        assert "site.cap_w" in applied[1], applied.string
        assert "(lowered: ticking now)" in applied.string
        # systemd hears the reload begin and end (Type=notify).
        got = await notified(d.notify, "READY=1")
        assert any("RELOADING=1" in f for f in got), got
        reloading = next(f for f in got if "RELOADING=1" in f)
        assert any(x.startswith("MONOTONIC_USEC=") for x in reloading), reloading
        await power_under(site, cap_w)
        assert await d.metric("siteagent_site_cap_watts") == cap_w
        assert await d.metric("siteagent_config_reload_last_success") == 1.0
    reloads = [a for a in audit_actions(tmp_path) if a[0] == "reload"]
    assert [a[1] for a in reloads] == ["reload applied"], reloads
    assert "site.cap_w" in reloads[0][2]


async def test_an_invalid_config_is_refused_naming_the_key_and_the_old_cap_stays(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with SimSite(3, base_address=BAD_BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3) as site:
        addresses = [m.address for m in site.miners]
        one_w = min(m.nameplate_power_w for m in site.miners)
        d = await start(daemon, tmp_path, listener, site_toml(tmp_path, addresses, 100_000))
        # A lower cap beside a misspelt key: the whole file is refused, the cap included.
        bad = site_toml(tmp_path, addresses, 1.2 * one_w).replace(
            "safety_margin_w = 0\n", "safety_margin_w = 0\ncap_kw = 5\n"
        )
        mark = await d.reload(bad)
        await d.line(
            r"reload: site\.cap_kw: found unknown key 'cap_kw'; expected no such key", mark
        )
        refused = await d.line(r"reload: .* refused, 1 problem\(s\)", mark)
        assert "the config in force stays" in refused.string
        assert not re.search(r"reload: .* applied", "\n".join(d.lines[mark:]))
        # A tick after the refusal still plans under the old cap; the alarm says why.
        ticks = await d.metric("siteagent_ticks_total")
        assert ticks is not None

        async def ticked() -> bool:
            return (await d.metric("siteagent_ticks_total") or 0) >= ticks + 2

        await until(ticked)
        assert await d.metric("siteagent_site_cap_watts") == 100_000
        assert await d.metric("siteagent_config_reload_last_success") == 0.0
        assert await d.metric('siteagent_alarm{alarm="config-reload-failed"}') == 1.0
        assert site.total_power_w() > 2 * one_w  # nothing was shed for the refused cap
        # The file fixed: the next reload applies it and clears the alarm.
        mark = await d.reload(site_toml(tmp_path, addresses, 1.2 * one_w))
        await d.line(r"reload: .* applied", mark)
        assert await d.metric("siteagent_config_reload_last_success") == 1.0
        assert await d.metric('siteagent_alarm{alarm="config-reload-failed"}') == 0.0
        await power_under(site, 1.2 * one_w)
    reloads = [a[1] for a in audit_actions(tmp_path) if a[0] == "reload"]
    assert reloads == ["reload refused", "reload applied"]


async def test_a_change_only_a_restart_applies_is_named(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with SimSite(1, base_address=RESTART_BASE, settle_s=0.3) as site:
        addresses = [m.address for m in site.miners]
        text = site_toml(tmp_path, addresses, 100_000)
        d = await start(daemon, tmp_path, listener, text)
        moved = text.replace(
            '[api]\nhost = "127.0.0.1"\nport = 0', '[api]\nhost = "127.0.0.1"\nport = 1'
        )
        assert moved != text
        mark = await d.reload(moved)
        await d.line(r"reload: api\.port changed; takes effect after a restart", mark)
        applied = await d.line(r"reload: .* applied: (.*)", mark)
        assert "1 change(s) wait for a restart" in applied.string
    reloads = [a for a in audit_actions(tmp_path) if a[0] == "reload"]
    assert "api.port changed; takes effect after a restart" in reloads[-1][2]


async def test_a_changed_schedule_window_applies(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with SimSite(3, base_address=WINDOW_BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3) as site:
        addresses = [m.address for m in site.miners]
        one_w = min(m.nameplate_power_w for m in site.miners)
        # A window that is never in force (29 February, 03:00, for a minute) ...
        window = (
            '[[schedule.windows]]\nname = "peak"\ncron = "{cron}"\n'
            "duration_s = 86400\ncap_w = {cap_w}\n"
        )
        later = window.format(cron="0 3 29 2 *", cap_w=1.2 * one_w)
        d = await start(daemon, tmp_path, listener, site_toml(tmp_path, addresses, 100_000, later))
        # ... moved to one in force now (every minute, for a day).
        now = window.format(cron="* * * * *", cap_w=1.2 * one_w)
        mark = await d.reload(site_toml(tmp_path, addresses, 100_000, now))
        applied = await d.line(r"reload: .* applied: (.*)", mark)
        assert "schedule.windows" in applied[1]
        await power_under(site, 1.2 * one_w)
        exposition = await d.metrics()
        assert 'siteagent_effective_cap_watts{source="window:peak"}' in exposition


async def test_an_added_miner_is_adopted(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with SimSite(2, base_address=ADD_BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3) as site:
        first, second = (m.address for m in site.miners)
        one_w = min(m.nameplate_power_w for m in site.miners)
        d = await start(daemon, tmp_path, listener, site_toml(tmp_path, [first], 100_000))
        new_id = "miner-" + second.replace(".", "-")
        assert new_id not in await d.metrics()
        # Room for about one miner of the two: the added one is read and controlled.
        mark = await d.reload(site_toml(tmp_path, [first, second], 1.2 * one_w))
        applied = await d.line(r"reload: .* applied: (.*)", mark)
        assert "1 miner(s) added" in applied[1]
        await d.line(rf"{new_id} \({re.escape(second)}\): new device, now tracked", mark)

        async def read() -> bool:
            return f'siteagent_device_power_watts{{device="{new_id}"' in await d.metrics()

        await until(read)
        await power_under(site, 1.2 * one_w)


async def test_an_added_gpu_node_is_adopted(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with (
        SimSite(1, base_address=GPU_MINER_BASE, settle_s=0.3) as site,
        SimGpuSite(1, 2, base_address=GPU_BASE, port=0, key_dir=tmp_path / "keys") as gpus,
    ):
        addresses = [m.address for m in site.miners]
        d = await start(daemon, tmp_path, listener, site_toml(tmp_path, addresses, 100_000))
        n = gpus.inventory()[0]
        node = (
            f'[[gpu_nodes]]\nid = "gpu-a"\nhost = "{n["address"]}"\nport = {n["port"]}\n'
            f'username = "{n["username"]}"\nclient_key = "{n["client_key"]}"\n'
            f'known_hosts = "{n["known_hosts"]}"\ngpus = {n["gpus"]}\n'
            f"overhead_w = {n['overhead_w']}\n"
        )
        mark = await d.reload(site_toml(tmp_path, addresses, 100_000, node))
        applied = await d.line(r"reload: .* applied: (.*)", mark)
        assert "1 GPU node(s) added" in applied[1]

        async def read() -> bool:
            text = await d.metrics()
            return all(
                f'siteagent_device_power_watts{{device="gpu-a/gpu{i}"' in text for i in range(2)
            )

        await until(read)  # each GPU connected over SSH and read


async def test_a_sighup_during_startup_is_done_once_startup_ends(
    tmp_path: Path, listener: tuple[socket.socket, str], daemon: list[Daemon]
) -> None:
    async with SimSite(1, base_address=STARTUP_BASE, settle_s=0.3) as site:
        addresses = [m.address for m in site.miners]
        # Accept and never answer: identification takes its whole deadline.
        site.set_fault(addresses[0], Fault.NO_ANSWER)
        text = site_toml(tmp_path, addresses, 100_000)
        d = await start(daemon, tmp_path, listener, text, until_field="STATUS=identifying miners")
        mark = await d.reload(site_toml(tmp_path, addresses, 50_000))
        await d.line(r"siteagent\.reload: asked during startup; done once startup ends", mark)
        site.set_fault(addresses[0], Fault.NONE)
        await notified(d.notify, "READY=1")
        applied = await d.line(r"reload: .* applied: (.*)", mark)
        assert "site.cap_w" in applied[1]

        async def capped() -> bool:  # at the tick the lowered cap asks for
            return await d.metric("siteagent_site_cap_watts") == 50_000

        await until(capped)


# -- in process ------------------------------------------------------------------


async def _not_connected() -> DeviceDriver:
    # The agent here is reloaded, never run: nothing connects.
    raise AssertionError("not connected in this test")


def _link(device_id: str, domain: str) -> DeviceLink:
    return DeviceLink(
        device_id,
        address="127.9.0.9",
        domain=domain,
        nameplate_power_w=3000.0,
        nameplate_hashrate_ths=100.0,
        sleep_power_w=20.0,
        connect=_not_connected,
    )


async def test_dropping_a_domain_a_tracked_device_sits_in_is_refused(tmp_path: Path) -> None:
    domains = [{"id": "rack-1", "limit_w": 5000}, {"id": "rack-2", "limit_w": 5000}]
    agent = Agent(
        parse_config({"site": {"cap_w": 10000}, "domains": domains}), [_link("m1", "rack-1")]
    )
    cfg_path = tmp_path / "site.toml"
    reloader = Reloader(cfg_path, agent)
    cfg_path.write_text('[site]\ncap_w = 8000\n[[domains]]\nid = "rack-2"\nlimit_w = 5000\n')
    result = await reloader.reload()
    assert not result.ok
    assert "domains: found domain 'rack-1' removed while m1 use(s) it" in result.line
    assert agent.config.site.cap_w == 10000  # nothing of the refused file applied
    assert [d.id for d in agent.config.domains] == ["rack-1", "rack-2"]
    # Dropping the unused one is fine, and lowers what it should.
    cfg_path.write_text('[site]\ncap_w = 8000\n[[domains]]\nid = "rack-1"\nlimit_w = 4000\n')
    result = await reloader.reload()
    assert result.ok, result.line
    limits = agent.limits()
    assert limits.site_cap_w == 8000
    assert [(d.domain_id, d.limit_w) for d in limits.domains] == [("rack-1", 4000)]


def test_a_removed_miner_stays_tracked_and_is_named() -> None:
    old = parse_config(
        {"site": {"cap_w": 10000}, "inventory": {"miners": [{"address": "127.9.0.1"}]}}
    )
    new = parse_config({"site": {"cap_w": 10000}})
    plan = plan_reload(old, new, {"127.9.0.1": "miner-127-9-0-1"})
    assert plan.changed == ()
    assert plan.restart_only == (
        "inventory.miners: 127.9.0.1 (miner-127-9-0-1) removed; still tracked and counted "
        "(at its worst case once unreachable) until a restart",
    )


async def _reloaded(agent: Agent, tmp_path: Path, text: str) -> None:
    """Reload ``agent`` from a file holding ``text``, and check it was applied."""
    path = tmp_path / "site.toml"
    path.write_text(text)
    result = await Reloader(path, agent).reload()
    assert result.ok, result.line


async def test_a_shorter_control_interval_reschedules_the_ticks(tmp_path: Path) -> None:
    agent = Agent(parse_config({"site": {"cap_w": 10_000}, "control": {"interval_s": 600}}), [])
    agent.start()
    try:
        await _reloaded(agent, tmp_path, "[site]\ncap_w = 10000\n[control]\ninterval_s = 0.1\n")
        ticks = agent.ticks

        async def ticking() -> bool:
            return agent.ticks >= ticks + 3  # never, at one tick per 600 s

        await until(ticking)
    finally:
        await agent.stop()


async def test_a_demand_response_event_added_by_a_reload_ticks_at_its_start(
    tmp_path: Path,
) -> None:
    quiet = "[site]\ncap_w = 10000\n[control]\ninterval_s = 600\n[telemetry]\ninterval_s = 600\n"
    agent = Agent(parse_config(tomllib.loads(quiet)), [])
    agent.start()
    try:
        start_at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        event = (
            f'[[schedule.events]]\nname = "ers"\nstart = {start_at}\n'
            "duration_s = 600\ntarget_w = 1000\n"
        )
        await _reloaded(agent, tmp_path, quiet + event)

        async def in_force() -> bool:
            last = agent.last_tick
            return last is not None and last.limits.cap_source == "demand-response:ers"

        await until(in_force)  # no control tick is due for 600 s: the event's own job ran it
    finally:
        await agent.stop()


async def test_a_reload_switches_the_policy_and_its_parameters_between_ticks(
    tmp_path: Path,
) -> None:
    agent = Agent(parse_config({"site": {"cap_w": 10_000}}), [])
    await agent.tick()
    assert agent.policy.name == "efficiency-capping"
    assert agent.policy_state.derived is not None  # its layout, kept for the next plan
    await _reloaded(
        agent,
        tmp_path,
        '[site]\ncap_w = 10000\n[policy]\nname = "economic"\ncapping_target = 0.95\n'
        "keep_margin_usd_per_kwh = 0.02\n",
    )
    assert agent.policy.name == "economic"
    assert agent.params.capping_target == 0.95
    assert agent.economic_params.keep_margin_usd_per_kwh == 0.02
    assert agent.policy_state.derived is None  # what the old policy derived is not handed on


async def test_a_domain_capped_since_the_check_is_not_dropped(tmp_path: Path) -> None:
    # The check runs again under the tick lock: an override made while the file was read
    # (here: before reconfigure is called at all) keeps its domain.
    domains = [{"id": "rack-1", "limit_w": 5000}]
    agent = Agent(parse_config({"site": {"cap_w": 10_000}, "domains": domains}), [])
    agent.set_domain_cap("rack-1", "ovr-1", 3000)
    with pytest.raises(ConfigError) as refused:
        await agent.reconfigure(parse_config({"site": {"cap_w": 8000}}))
    assert "domain 'rack-1' removed while a cap from ovr-1 use(s) it" in str(refused.value)
    assert agent.config.site.cap_w == 10_000  # nothing of it applied
    assert [(d.domain_id, d.limit_w) for d in agent.limits().domains] == [("rack-1", 3000)]


def test_meter_frequency_and_openadr_changes_wait_for_a_restart() -> None:
    # Their read tasks, the armed block and the VEN's registration are made at start: a
    # reload that claimed them live would leave the old meter and the old trigger in force.
    old = parse_config({"site": {"cap_w": 10000}})
    new = parse_config(
        {
            "site": {"cap_w": 10000},
            "meters": [{"id": "poi", "address": "127.9.9.1"}],
            "frequency_response": {"enabled": True, "block_w": 1000},
            "openadr": {"vtn_url": "http://127.9.9.2:8080/OpenADR2/Simple/2.0b", "ven_name": "v"},
        }
    )
    plan = plan_reload(old, new, {})
    assert plan.changed == ()
    sections = {line.split(" ")[0].partition(".")[0] for line in plan.restart_only}
    assert sections == {"meters", "frequency_response", "openadr"}
