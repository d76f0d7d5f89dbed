"""Nothing the agent writes to disk holds its event loop (issue 20 item 4).

Addresses: 127.1.218.0/24.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.devices import CLOSE_BATCH, close_quietly
from siteagent.agent.control.inventory import scan
from siteagent.agent.control.inventory_store import InventoryStore
from siteagent.sim.site import SimSite

BASE = "127.1.218.1"


class _Said(logging.Handler):
    """Sets an event when a log line containing ``text`` is emitted (on the loop's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_scan_waiting_on_the_inventory_write_lets_the_loop_run(tmp_path: Path) -> None:
    """Another connection holds the inventory's write lock when a scan records what it
    found; the loop goes on, and the holder, a task on that loop, lets go after 20 of
    its turns. A write on the loop's thread would hold the loop until SQLite's busy
    timeout (5 s) and fail with "database is locked"."""
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000},
            "inventory": {"scan": ["127.1.218.1-127.1.218.2"]},
            "telemetry": {"timeout_s": 1.0},
        }
    )
    path = tmp_path / "inventory.sqlite"
    store = InventoryStore(path)
    site = SimSite(n_miners=1, base_address=BASE)
    await site.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    said = _Said("discovery: ")
    inventory_log = logging.getLogger("siteagent.inventory")
    inventory_log.addHandler(said)
    turns = 0

    async def hold_then_release() -> None:
        nonlocal turns
        # The scan has identified its miners and is about to record them.
        await said.event.wait()
        while turns < 20:
            await asyncio.sleep(0.01)
            turns += 1
        blocker.execute("COMMIT")

    try:
        blocker.execute("BEGIN IMMEDIATE")
        holder = asyncio.create_task(hold_then_release())
        links = await scan(cfg, store)
        await holder
    finally:
        inventory_log.removeHandler(said)
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await site.stop()
    assert turns == 20
    assert [t.address for t in links] == [BASE]
    assert [m.address for m in store.miners()] == [BASE]
    store.close()


def test_the_inventory_is_usable_from_a_worker_thread(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path / "inventory.sqlite")
    try:
        report = asyncio.run(asyncio.to_thread(store.record_scan, [], ["127.1.218.9"]))
        assert report.seen == 0
        assert asyncio.run(asyncio.to_thread(store.miners)) == []
    finally:
        store.close()


@pytest.fixture(autouse=True)
def _quiet_sim(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="siteagent.inventory")


async def test_closing_many_drivers_lets_the_loop_run_between_batches() -> None:
    """A scan's 10,000 identification drivers are closed in batches: the loop runs
    other work (a tick due) between them, rather than all 10,000 closes' first steps in
    one pass. Every driver is closed; one whose close fails is logged, not raised."""
    turns = 0
    seen: list[int] = []  # the other task's turns as each close ran
    stop = asyncio.Event()

    async def other() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    class Driver:
        async def close(self) -> None:
            seen.append(turns)

    class Broken:
        async def close(self) -> None:
            raise OSError("connection already gone")

    n = 4 * CLOSE_BATCH
    task = asyncio.ensure_future(other())
    await asyncio.sleep(0)
    await close_quietly([Driver() for _ in range(n)] + [Broken()] + [object()], "a test driver")
    stop.set()
    await task
    assert len(seen) == n
    # One batch per pass of the loop: the other task had a turn between each.
    assert len(set(seen)) >= 4
    assert seen == sorted(seen)
