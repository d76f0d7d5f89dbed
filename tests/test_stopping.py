"""Stopping: SIGTERM at any point stops the daemon cleanly and says what it leaves (15.13)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from siteagent.sim.faults import Fault
from siteagent.sim.site import SimSite

BASE = "127.1.204.41"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a temp dir, as systemd's notify socket is."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        yield s, str(path)


async def recv_until(s: socket.socket, prefix: str, timeout_s: float) -> list[list[str]]:
    """Datagrams (as fields) up to and including the first with a field starting ``prefix``."""
    got: list[list[str]] = []
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        while True:
            fields = (await loop.sock_recv(s, 4096)).decode().split("\n")
            got.append(fields)
            if any(f.startswith(prefix) for f in fields):
                return got


def write_config(tmp_path: Path, addresses: list[str], cap_w: float, **inventory: object) -> Path:
    listed = "".join(f'[[inventory.miners]]\naddress = "{a}"\n' for a in addresses)
    extra = "".join(f"{k} = {v}\n" for k, v in inventory.items())
    cfg = tmp_path / "siteagent.toml"
    cfg.write_text(
        f"[site]\ncap_w = {cap_w}\nsafety_margin_w = 0\n"
        "[policy]\nmin_off_s = 0\nrestore_ramp_w_per_s = 1000000\n"
        "[control]\ninterval_s = 0.5\n"
        "[telemetry]\ninterval_s = 0.5\ntimeout_s = 1.0\n"
        f"[inventory]\n{extra}{listed}"
        '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
    )
    return cfg


async def start_agent(cfg: Path, notify: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    env.pop("WATCHDOG_USEC", None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.agent.tools.cli",
        "run",
        "--config",
        str(cfg),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_sigterm_during_identification_stops_cleanly_and_says_so(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    s, path = listener
    async with SimSite(3, base_address=BASE) as site:
        # Accept and never answer: each address takes its whole deadline, one at a time.
        for m in site.miners:
            site.set_fault(m.address, Fault.NO_ANSWER)
        cfg = write_config(
            tmp_path, [m.address for m in site.miners], 100_000, discovery_concurrency=1
        )
        proc = await start_agent(cfg, path)
        try:
            await recv_until(s, "STATUS=identifying miners", 60)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    assert code == 0, err
    assert re.search(
        r"stopping during startup \(identifying miners: \d of 3 done\); "
        r"nothing was changed on any device",
        err,
    ), err
    assert "Traceback" not in err, err
    stopping = await recv_until(s, "STOPPING=1", 5)
    assert "nothing was changed on any device" in stopping[-1][1]


async def test_sigterm_after_startup_says_what_it_leaves_behind(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    s, path = listener
    async with SimSite(3, base_address=BASE, settle_s=0.3, pause_s=0.2, wake_s=0.3) as site:
        one_w = min(m.nameplate_power_w for m in site.miners)
        # Room for about one miner: the agent sleeps or lowers the others.
        cfg = write_config(tmp_path, [m.address for m in site.miners], 1.2 * one_w)
        proc = await start_agent(cfg, path)
        try:
            await recv_until(s, "READY=1", 60)
            await asyncio.sleep(4.0)  # ticks every 0.5 s: the cap is met by now
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        asleep_in_sim = sum(1 for m in site.miners if m.power.paused)
    assert code == 0, err
    found = re.search(
        r"stopping: (\d+) miner\(s\) asleep, (\d+) at reduced targets, 0 GPU\(s\) at reduced "
        r"limits; they stay so until the agent starts again",
        err,
    )
    assert found, err
    asleep, reduced = int(found[1]), int(found[2])
    assert asleep == asleep_in_sim
    assert asleep + reduced >= 2  # one miner's room for three
    # The same line reaches systemd as the last STATUS (times out here otherwise).
    await recv_until(s, f"STATUS={found[0]}", 5)
