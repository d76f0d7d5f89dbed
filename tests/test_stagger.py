"""A reading as a table of fields (drivers/backends/base.py): the slow fields' refresh
spread over the miners' phases, what a watched move or a write asks again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from siteagent.drivers.backends.base import Field, FieldReader, Fields, Moved

EVERY = 4


def _table() -> Fields:
    return Fields(
        (
            Field("power_w", "stats", lambda r: r["power_w"]),
            Field("status", "details", lambda r: r["status"], slow=True),
            Field("target_w", "mode", lambda r: r["target_w"], slow=True),
        ),
        watch=(Moved("power_w", frac=0.05),),
        every=EVERY,
    )


class Miner:
    """What a fetch answers, and the sources each fetch asked for."""

    def __init__(self) -> None:
        self.power_w = 3000.0
        self.status = "mining"
        self.target_w = 3000.0
        self.asked: list[tuple[str, ...]] = []

    async def fetch(self, sources: tuple[str, ...]) -> Mapping[str, Any]:
        self.asked.append(sources)
        replies = {
            "stats": {"power_w": self.power_w},
            "details": {"status": self.status},
            "mode": {"target_w": self.target_w},
        }
        return {s: replies[s] for s in sources}

    def slow_asked(self) -> list[tuple[str, ...]]:
        asked = [a for a in self.asked if a != ("stats",)]
        self.asked.clear()
        return asked


async def test_miners_made_one_after_another_spread_their_slow_reads_over_the_phases() -> None:
    table = _table()
    miners = [Miner() for _ in range(3 * EVERY)]
    readers = [FieldReader(table, f"m{i}") for i in range(len(miners))]
    assert [r.phase for r in readers] == [i % EVERY for i in range(len(miners))]
    for r, m in zip(readers, miners, strict=True):
        await r.read(m.fetch)  # the first reading asks for everything
        assert m.slow_asked() == [("details", "mode")]
    for _ in range(2 * EVERY):
        slow = 0
        for r, m in zip(readers, miners, strict=True):
            await r.read(m.fetch)
            slow += len(m.slow_asked())
        assert slow == len(miners) // EVERY  # each sweep carries its share, no more


async def test_a_write_forgets_only_what_it_can_move() -> None:
    m = Miner()
    r = FieldReader(_table(), "m", phase=0)
    await r.read(m.fetch)
    assert m.slow_asked() == [("details", "mode")]
    m.target_w = 2500.0
    r.forget("mode")
    v = await r.read(m.fetch)
    assert m.slow_asked() == [("mode",)]  # the status is kept
    assert (v["target_w"], v["status"]) == (2500.0, "mining")
    assert (await r.read(m.fetch))["target_w"] == 2500.0
    assert m.slow_asked() == []
    m.status = "paused"
    r.forget()  # everything
    assert (await r.read(m.fetch))["status"] == "paused"
    assert m.slow_asked() == [("details", "mode")]


async def test_a_forgotten_source_comes_with_the_others_when_all_are_due() -> None:
    m = Miner()
    r = FieldReader(_table(), "m", phase=0)
    await r.read(m.fetch)
    m.slow_asked()
    r.forget("details")
    m.power_w = 2000.0  # a watched move: everything is due
    await r.read(m.fetch)
    assert m.slow_asked() == [("details", "mode")]  # once, not twice
    await r.read(m.fetch)
    assert m.slow_asked() == []


async def test_forgetting_before_the_first_reading_reads_everything_once() -> None:
    m = Miner()
    r = FieldReader(_table(), "m", phase=0)
    r.forget("mode")
    await r.read(m.fetch)
    assert m.slow_asked() == [("details", "mode")]


def test_forgetting_a_source_the_table_has_no_slow_field_of_is_an_error() -> None:
    r = FieldReader(_table(), "m")
    with pytest.raises(ValueError, match="not a slow source"):
        r.forget("stats")
