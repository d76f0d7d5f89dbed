"""Pieces the benchmarks share: timing and synthetic devices."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from siteagent.domain import DeviceControls, DeviceKind, DeviceState, DeviceStatus

NAMEPLATES_W = (3010.0, 3068.0, 3500.0, 3510.0)
HASHRATES_THS = (104.0, 140.0, 200.0, 234.0)


def median_s(fn: Callable[[], object], runs: int) -> float:
    """Median wall time (s) of fn over runs."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def mining_status(device_id: str, domain: str, rng: random.Random) -> DeviceStatus:
    """A controllable miner at full power, its target range half to full nameplate."""
    nameplate = rng.choice(NAMEPLATES_W)
    caps = DeviceControls(
        power_target=True,
        power_target_min_w=nameplate * 0.5,
        power_target_max_w=nameplate,
        can_sleep=True,
    )
    return DeviceStatus(
        device_id=device_id,
        kind=DeviceKind.MINER,
        domain=domain,
        state=DeviceState.MINING,
        nameplate_power_w=nameplate,
        nameplate_hashrate_ths=rng.choice(HASHRATES_THS),
        sleep_power_w=25.0,
        capabilities=caps,
        budget_w=nameplate,
        expected_w=nameplate,
        controllable=True,
        power_target_w=nameplate,
        awake=True,
    )
