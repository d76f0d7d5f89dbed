"""The sd_notify protocol against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.loop import Agent
from siteagent.agent.ops.metrics import site_summary
from siteagent.agent.ops.sdnotify import Notifier, supervise, watchdog_period_s


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a temp dir, as systemd's notify socket is."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2.0)
        yield s, str(path)


def received(s: socket.socket) -> list[str]:
    return s.recv(4096).decode().split("\n")


def nothing_waiting(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(4096)
    except BlockingIOError:
        return True
    finally:
        s.settimeout(2.0)
    return False


def fill(path: str) -> int:
    """Send to the socket until its queue is full (nobody reads it); how many were queued."""
    n = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        while True:
            try:
                s.sendto(b"FILLER=1", path)
            except BlockingIOError:
                return n
            n += 1


def drain(s: socket.socket) -> list[list[str]]:
    """Every message waiting on the socket, without waiting for more."""
    out = []
    s.setblocking(False)
    try:
        while True:
            out.append(s.recv(4096).decode().split("\n"))
    except BlockingIOError:
        return out
    finally:
        s.settimeout(2.0)


def not_blocking(s: socket.socket, send: Callable[[], bool]) -> bool:
    """``send()`` on a thread: its result, or a failure if it blocked (then drained free)."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(send()), daemon=True)
    thread.start()
    thread.join(timeout=10.0)  # a bound on waiting, not a timing
    blocked = thread.is_alive()
    while thread.is_alive():
        drain(s)
        thread.join(timeout=0.05)
    assert not blocked, "the send blocked on a full socket"
    return result[0]


def test_ready_status_watchdog_stopping(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("hold: site 1.0 kW")
    assert received(s) == ["READY=1", "STATUS=hold: site 1.0 kW"]
    assert n.status("two\nlines")
    # A newline would split the field into a second, bogus assignment.
    assert received(s) == ["STATUS=two lines"]
    assert n.watchdog()
    assert received(s) == ["WATCHDOG=1"]
    assert n.stopping()
    assert received(s) == ["STOPPING=1"]
    assert nothing_waiting(s)


def test_abstract_namespace_socket() -> None:
    name = f"siteagent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2.0)
        assert Notifier(f"@{name}").ready()
        assert received(s) == ["READY=1"]


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone.sock"))
    assert not n.watchdog()
    assert not n.watchdog()


@pytest.mark.parametrize(
    ("env", "period"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_period_is_half_the_timeout(env: dict[str, str], period: float | None) -> None:
    assert watchdog_period_s(env) == period


async def test_supervise_pings_only_while_healthy(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    health = iter([True, False, True])
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await supervise(
            Notifier(path),
            healthy=lambda: next(health),
            status=lambda: "hold: site 1.0 kW",
            period_s=30.0,
            sleep=fake_sleep,
        )
    assert slept == [30.0, 30.0, 30.0]
    assert received(s) == ["WATCHDOG=1", "STATUS=hold: site 1.0 kW"]
    stalled = received(s)
    assert stalled[0].startswith("STATUS=stalled")
    assert not any(f.startswith("WATCHDOG") for f in stalled)
    assert received(s) == ["WATCHDOG=1", "STATUS=hold: site 1.0 kW"]
    assert nothing_waiting(s)


async def test_supervise_without_watchdog_sends_status_only(
    listener: tuple[socket.socket, str],
) -> None:
    s, path = listener

    async def stop(seconds: float) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await supervise(
            Notifier(path),
            healthy=lambda: True,
            status=lambda: "ok",
            period_s=5.0,
            sleep=stop,
            watchdog=False,
        )
    assert received(s) == ["STATUS=ok"]


def test_siteagent_run_talks_to_systemd_and_stops_on_sigterm(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """The real daemon, no devices: READY after the first sweep, pings, STOPPING, exit 0."""
    s, path = listener
    s.settimeout(20.0)
    cfg = tmp_path / "siteagent.toml"
    cfg.write_text(
        "[site]\ncap_w = 10000\n[control]\ninterval_s = 0.5\n[telemetry]\ninterval_s = 0.5\n"
        '[metrics]\nhost = "127.0.0.1"\nport = 0\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
    )
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "run", "--config", str(cfg)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Before READY: startup's progress, each message asking for more time.
        ready = received(s)
        while ready[0] != "READY=1":
            assert ready[0].startswith("EXTEND_TIMEOUT_USEC="), ready
            assert ready[1].startswith("STATUS="), ready
            ready = received(s)
        assert ready[1].startswith("STATUS="), ready
        s.settimeout(5.0)
        fields: list[str] = []
        while not any(f.startswith("STATUS=hold") for f in fields):
            fields = received(s)
        assert fields[0] == "WATCHDOG=1", fields
        proc.send_signal(signal.SIGTERM)
        while fields[0] != "STOPPING=1":
            fields = received(s)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert "metrics on http://127.0.0.1:" in log, log


def test_a_full_socket_drops_and_coalesces_never_blocks(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """systemd not draining its socket: each message is dropped at once (no blocking send);
    the newest READY/STATUS go out with the next message once it drains; a ping is not
    carried (it vouched for the loop when it was sent); one warning, one recovery line."""
    s, path = listener
    assert fill(path) > 0
    n = Notifier(path)
    caplog.set_level(logging.INFO, logger="siteagent.sdnotify")
    assert not not_blocking(s, lambda: n.ready("starting"))
    assert not n.notify("WATCHDOG=1", "STATUS=tick 1")
    assert not n.status("tick 2")
    assert n.dropped == 3
    assert n.pending == ("READY=1", "STATUS=tick 2")
    assert all(m == ["FILLER=1"] for m in drain(s))
    assert n.watchdog()
    assert received(s) == ["READY=1", "STATUS=tick 2", "WATCHDOG=1"]
    assert not n.pending
    assert nothing_waiting(s)
    # A dropped ping is not carried to a later message.
    fill(path)
    assert not n.watchdog()
    assert not n.pending
    drain(s)
    assert n.status("stalled")
    assert received(s) == ["STATUS=stalled"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if "again" in r.getMessage()]
    assert len(warnings) == 2 and "queue is full" in warnings[0].getMessage()
    assert len(infos) == 2


def test_a_full_notify_socket_does_not_stop_the_loop(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """READY, then the scheduled ticks and the supervisor's STATUS/WATCHDOG every period,
    with systemd's socket full and never read: the ticks go on (issue 20: the daemon
    froze after READY, no sweeps, no ticks, no API)."""
    s, path = listener
    fill(path)
    cfg = parse_config(
        {
            "site": {"cap_w": 10_000},
            "control": {"interval_s": 0.05},
            "telemetry": {"interval_s": 0.05},
        }
    )
    agent = Agent(cfg, [])
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def run_agent() -> None:
        stop = asyncio.Event()
        running.append((asyncio.get_running_loop(), stop))
        notifier = Notifier(path)
        notifier.ready("first sweep done")
        agent.start()
        supervisor = asyncio.create_task(
            supervise(
                notifier, healthy=lambda: True, status=lambda: site_summary(agent), period_s=0.01
            )
        )
        await stop.wait()
        supervisor.cancel()
        await agent.stop()

    caplog.set_level(logging.INFO, logger="siteagent.sdnotify")
    # The loop runs on its own thread, so a blocking send freezes that thread, not the test.
    thread = threading.Thread(target=asyncio.run, args=(run_agent(),), daemon=True)
    thread.start()
    # A bound on waiting, not a timed assertion: 10 ticks need 0.5 s at 20 per second.
    give_up_s = time.monotonic() + 30.0
    while agent.ticks < 10 and time.monotonic() < give_up_s:
        time.sleep(0.05)
    ticks = agent.ticks
    loop, stop = running[0]
    loop.call_soon_threadsafe(stop.set)
    # Drain so that a send blocked on the full queue returns and the thread can end.
    while thread.is_alive() and time.monotonic() < give_up_s + 10.0:
        drain(s)
        thread.join(timeout=0.05)
    assert ticks >= 10, f"the loop stopped ticking after {ticks} tick(s)"
    assert not thread.is_alive()
    full = [r for r in caplog.records if "queue is full" in r.getMessage()]
    assert len(full) == 1
