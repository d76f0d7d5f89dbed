"""Caps that come with the clock: cron windows (likely 4CP peaks) and demand-response events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from siteagent.agent.config import cron_trigger, parse_config
from siteagent.agent.control.loop import Agent

T0 = datetime(2026, 7, 7, 15, 59, 0, tzinfo=UTC)  # a Tuesday


def agent_at(now: list[datetime], **schedule: Any) -> Agent:
    cfg = parse_config({"site": {"cap_w": 10_000, "safety_margin_w": 100}, "schedule": schedule})
    return Agent(cfg, [], wall_clock=lambda: now[0])


def test_a_cron_window_lowers_the_cap_for_its_duration_only() -> None:
    now = [T0]
    window = {"name": "4cp", "cron": "0 16 * 6-9 1-5", "duration_s": 3600, "cap_w": 6000}
    agent = agent_at(now, windows=[window])
    assert agent.limits().effective_cap_w == 9900
    now[0] = T0 + timedelta(minutes=1)  # 16:00, the window opens
    limits = agent.limits()
    assert limits.effective_cap_w == 5900 and limits.cap_source == "window:4cp"
    now[0] = T0 + timedelta(minutes=60, seconds=59)  # 16:59:59, still inside
    assert agent.limits().cap_source == "window:4cp"
    now[0] = T0 + timedelta(minutes=61)  # 17:00, closed
    assert agent.limits().effective_cap_w == 9900
    now[0] = datetime(2026, 7, 11, 16, 30, tzinfo=UTC)  # Saturday: no window
    assert agent.limits().cap_source == "site"


def test_a_demand_response_event_holds_the_site_under_its_target() -> None:
    now = [T0]
    event = {
        "name": "ercot-ers",
        "start": T0 + timedelta(minutes=10),
        "duration_s": 1800,
        "target_w": 2000,
    }
    agent = agent_at(now, events=[event])
    assert agent.limits().cap_source == "site"
    now[0] = T0 + timedelta(minutes=10)
    assert agent.limits().effective_cap_w == 1900
    assert agent.limits().cap_source == "demand-response:ercot-ers"
    now[0] = T0 + timedelta(minutes=40)
    assert agent.limits().cap_source == "site"


async def test_an_event_starting_ticks_at_once() -> None:
    start = datetime.now(UTC) + timedelta(seconds=0.5)
    cfg = parse_config(
        {
            "site": {"cap_w": 10_000},
            "control": {"interval_s": 600},
            "telemetry": {"interval_s": 600},
            "schedule": {
                "events": [{"name": "dr", "start": start, "duration_s": 60, "target_w": 1000}]
            },
        }
    )
    agent = Agent(cfg, [])
    agent.start()
    try:
        await asyncio.sleep(0.3)
        before = agent.ticks
        await asyncio.sleep(1.0)
        assert agent.ticks == before + 1
        assert agent.last_tick is not None
        assert agent.last_tick.limits.cap_source == "demand-response:dr"
    finally:
        await agent.stop()


def test_cron_weekdays_mean_what_crontab_means() -> None:
    # crontab: 1-5 is Monday to Friday, 0 and 7 are Sunday (APScheduler 3 alone disagrees).
    trigger = cron_trigger("0 16 * * 1-5", "UTC")
    saturday = datetime(2026, 7, 11, 0, 0, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, saturday) == datetime(2026, 7, 13, 16, 0, tzinfo=UTC)
    sunday = cron_trigger("0 16 * * 0", "UTC").get_next_fire_time(None, saturday)
    assert sunday == datetime(2026, 7, 12, 16, 0, tzinfo=UTC)
    assert cron_trigger("0 16 * * 7", "UTC").get_next_fire_time(None, saturday) == sunday
    # A step is not a weekday.
    every_other = cron_trigger("0 0 * * */2", "UTC")
    assert every_other.get_next_fire_time(None, saturday) is not None
