"""Startup at scale under systemd: more time only while startup makes progress.

Driven through the real notification protocol: an AF_UNIX datagram socket as
``$NOTIFY_SOCKET``, as systemd listens. Identification goes through the store's
known firmware where it can, is bounded, and hands its drivers to the trackers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control import identify as identification
from siteagent.agent.control import inventory
from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.identify import KnownFirmware, identify, identify_deadline_s
from siteagent.agent.control.inventory import build_devices, known_by_address
from siteagent.agent.control.inventory_store import InventoryStore
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.sdnotify import Notifier, StartupProgress, watch_startup
from siteagent.agent.tools.cli import _run_agent, startup_extend_s
from siteagent.drivers.asic import AsicDriver
from siteagent.sim.site import SimSite

BASE = "127.1.230.1"  # this module's own loopback ranges
STALL_BASE = "127.1.231.1"
EXTEND_30_S = "EXTEND_TIMEOUT_USEC=30000000"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a temp dir, as systemd's notify socket is."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        yield s, str(path)


def drain(s: socket.socket) -> list[list[str]]:
    """Every datagram waiting, each as its fields."""
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


async def recv(s: socket.socket, timeout_s: float) -> list[str]:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 4096), timeout_s)
    return data.decode().split("\n")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_extends_only_when_a_step_finished(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    clock = FakeClock()
    p = StartupProgress(Notifier(path), extend_s=30.0, stall_note_s=10.0, clock=clock)
    p.phase("identifying miners", 10_000)
    assert drain(s) == [[EXTEND_30_S, "STATUS=identifying miners: 0 of 10,000"]]
    for _ in range(4_000):
        p.step()
    clock.now += 1
    assert p.check()
    assert drain(s) == [[EXTEND_30_S, "STATUS=identifying miners: 4,000 of 10,000"]]
    # Nothing finished: no extension, however often it is checked.
    for _ in range(9):
        clock.now += 1
        assert not p.check()
    assert drain(s) == []
    # Past stall_note_s a STATUS says so, still without extending.
    clock.now += 1
    assert not p.check()
    assert drain(s) == [["STATUS=identifying miners: 4,000 of 10,000; nothing finished for 10 s"]]
    clock.now += 1
    assert not p.check()
    assert drain(s) == []
    p.step()
    assert p.check()
    assert drain(s) == [[EXTEND_30_S, "STATUS=identifying miners: 4,001 of 10,000"]]
    # A new phase is progress; a count callable replaces step().
    read = [0]
    p.phase("first sweep", 10_000, count=lambda: read[0])
    read[0] = 7_500
    assert p.check()
    assert drain(s) == [
        [EXTEND_30_S, "STATUS=first sweep: 0 of 10,000"],
        [EXTEND_30_S, "STATUS=first sweep: 7,500 of 10,000"],
    ]
    p.phase("starting the control loop")
    assert drain(s) == [[EXTEND_30_S, "STATUS=starting the control loop"]]


async def test_watch_checks_every_period(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    p = StartupProgress(Notifier(path), extend_s=30.0)
    p.phase("identifying miners", 3)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 3:
            raise asyncio.CancelledError
        if len(slept) != 2:  # the second period finishes nothing
            p.step()

    with pytest.raises(asyncio.CancelledError):
        await watch_startup(p, period_s=1.5, sleep=fake_sleep)
    assert slept == [1.5] * 4
    statuses = [f[1] for f in drain(s) if f[0] == EXTEND_30_S]
    assert statuses == [
        "STATUS=identifying miners: 0 of 3",
        "STATUS=identifying miners: 1 of 3",
        "STATUS=identifying miners: 2 of 3",
    ]


def test_the_extension_outlasts_the_slowest_step() -> None:
    cfg = parse_config({"site": {"cap_w": 1000}})
    deadline = identify_deadline_s(cfg.telemetry.timeout_s)
    assert startup_extend_s(deadline) >= 3 * deadline
    assert startup_extend_s(deadline) >= cfg.telemetry.timeout_s * 3
    assert startup_extend_s(0.1) == 30.0


def _config(tmp_path: Path, addresses: list[str], **inventory: object) -> Path:
    listed = "".join(f'[[inventory.miners]]\naddress = "{a}"\n' for a in addresses)
    extra = "".join(f"{k} = {v}\n" for k, v in inventory.items())
    cfg = tmp_path / "siteagent.toml"
    cfg.write_text(
        "[site]\ncap_w = 1000000\n[control]\ninterval_s = 0.5\n"
        "[telemetry]\ninterval_s = 0.5\ntimeout_s = 3.0\n"
        f"[inventory]\n{extra}{listed}"
        '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
    )
    return cfg


async def test_a_slow_startup_reports_progress_and_extends_until_ready(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """The real daemon on miners slow to answer, identified one at a time."""
    s, path = listener
    async with SimSite(5, base_address=BASE, backends=["whatsminer"]) as site:
        for m in site.miners:
            site.set_fault(m.address, "slow", delay_s=0.3)
        cfg = _config(tmp_path, [m.address for m in site.miners], discovery_concurrency=1)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        env.pop("WATCHDOG_USEC", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "siteagent.agent.tools.cli", "run", "--config", str(cfg), env=env
        )
        try:
            before_ready: list[list[str]] = []
            while True:
                fields = await recv(s, 60.0)
                if fields[0] == "READY=1":
                    break
                before_ready.append(fields)
            assert fields[1].startswith("STATUS=5 device(s)"), fields
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert all(f[0] == EXTEND_30_S and f[1].startswith("STATUS=") for f in before_ready), (
        before_ready
    )
    statuses = [f[1].removeprefix("STATUS=") for f in before_ready]
    identifying = [t for t in statuses if t.startswith("identifying miners: ")]
    counts = [int(t.split(": ")[1].split(" of ")[0]) for t in identifying]
    assert identifying[0] == "identifying miners: 0 of 5", statuses
    # Progress between the start and the end: identified one by one, about 1 s each.
    assert any(0 < c < 5 for c in counts), statuses
    assert counts == sorted(counts) and len(set(counts)) == len(counts), statuses
    assert "first sweep: 0 of 5" in statuses, statuses
    assert statuses[-1] == "starting the control loop", statuses


async def test_a_stalled_startup_stops_extending(
    listener: tuple[socket.socket, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identification that finishes two addresses, then nothing: no more extensions."""
    s, path = listener
    stuck = asyncio.Event()

    async def stalls(
        cfg: object, store: object, *, on_identified: object = None, **_: object
    ) -> list[DeviceLink]:
        assert callable(on_identified)
        on_identified()
        await asyncio.sleep(0.3)
        on_identified()
        stuck.set()
        await asyncio.Event().wait()  # never finishes
        return []

    monkeypatch.setattr(inventory, "build_devices", stalls)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    cfg = _config(tmp_path, [STALL_BASE, "127.1.231.2", "127.1.231.3"])
    task = asyncio.create_task(_run_agent(str(cfg)))
    try:
        await asyncio.wait_for(stuck.wait(), 10)
        await asyncio.sleep(3.5)  # three more checks, all finding nothing new
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    got = drain(s)
    extends = [f for f in got if f[0].startswith("EXTEND_TIMEOUT_USEC=")]
    assert [f[1] for f in extends] == [
        "STATUS=identifying miners: 0 of 3",
        "STATUS=identifying miners: 2 of 3",
    ], got
    assert not any("READY=1" in f for f in got)


async def test_build_trackers_hands_its_drivers_to_the_trackers(tmp_path: Path) -> None:
    """Identified once: the first sweep reads, it does not identify again."""
    async with SimSite(4, base_address="127.1.232.1", backends=["whatsminer", "luxos"]) as site:
        addrs = [m.address for m in site.miners]
        cfg = parse_config(
            {
                "site": {"cap_w": 1_000_000},
                "telemetry": {"timeout_s": 2.0},
                "inventory": {
                    "miners": [{"address": addrs[0]}, {"address": "127.1.232.200"}],
                    "scan": [f"{addrs[1]}-{addrs[-1]}"],
                },
            }
        )
        done: list[int] = []
        store = InventoryStore(tmp_path / "inventory.sqlite")
        trackers = await build_devices(cfg, store, on_identified=lambda: done.append(1))
        assert len(done) == 5  # two listed, three scanned
        by_address = {t.address: t for t in trackers}
        assert sorted(by_address) == sorted([*addrs, "127.1.232.200"])
        assert by_address["127.1.232.200"].driver is None  # connects on a later read
        for a in addrs:
            drv = by_address[a].driver
            assert isinstance(drv, AsicDriver) and drv.device_id == by_address[a].device_id
        # The store knows the listed miner too: the next start skips pyasic's probes.
        assert sorted(known_by_address(store)) == sorted(addrs)
        agent = Agent(cfg, trackers)
        await agent.sweep()
        for a in addrs:
            r = agent.fleet[by_address[a].device_id].last_good
            assert r is not None and r.device_id == by_address[a].device_id
        store.close()


async def test_known_miners_skip_the_probes_unless_another_miner_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SimSite(3, base_address="127.1.233.1", backends=["whatsminer"]) as site:
        addrs = [m.address for m in site.miners]
        store = InventoryStore(tmp_path / "inventory.sqlite")
        found = await identify(addrs, {}, concurrency=3, timeout_s=2.0)
        store.record_scan([(a, d.identity) for a, d in found.items() if d.identity], addrs)
        known = known_by_address(store)
        # Swap two addresses' records: each now names another miner's MAC.
        known[addrs[0]], known[addrs[1]] = known[addrs[1]], known[addrs[0]]
        probed: list[str] = []
        real_connect = AsicDriver.connect

        async def counting_connect(
            device_id: str, address: str, *, timeout_s: float, **kw: Any
        ) -> AsicDriver:
            probed.append(address)
            return await real_connect(device_id, address, timeout_s=timeout_s, **kw)

        monkeypatch.setattr(AsicDriver, "connect", counting_connect)
        firmware = {a: k for a, m in known.items() if (k := KnownFirmware.of(m)) is not None}
        again = await identify(addrs, firmware, concurrency=3, timeout_s=2.0)
        assert sorted(again) == sorted(addrs)
        assert sorted(probed) == sorted(addrs[:2])  # the third was known and the same
        macs = {a: d.identity.mac for a, d in again.items() if d.identity is not None}
        assert macs == {a: d.identity.mac for a, d in found.items() if d.identity is not None}
        assert len(set(macs.values())) == 3
        store.close()


async def test_identification_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight, most = 0, 0

    async def one(address: str, known: object, timeout_s: float, *_: object, **__: object) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1

    monkeypatch.setattr(identification, "identify_one", one)
    finished: list[int] = []
    out = await identify(
        [f"10.0.0.{i}" for i in range(50)],
        {},
        concurrency=7,
        timeout_s=1.0,
        on_done=lambda: finished.append(1),
    )
    assert out == {} and most == 7 and len(finished) == 50
