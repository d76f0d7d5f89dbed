"""Driver checks against real miners listed in a rig file (see hil/README.md)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from rig import rig

from siteagent.domain import DeviceState
from siteagent.drivers.asic import AsicDriver


def _rig() -> list[dict[str, Any]]:
    return rig("miners")[2]


def _control_allowed(entry: dict[str, Any]) -> None:
    if os.environ.get("SITEAGENT_HIL_CONTROL") != "1":
        pytest.skip("control checks need SITEAGENT_HIL_CONTROL=1")
    if not entry.get("control", False):
        pytest.skip(f"{entry['address']}: control = true is not set in the rig file")


async def test_identify_and_read() -> None:
    for entry in _rig():
        timeout_s = float(entry.get("timeout_s", 10))
        drv = await AsicDriver.connect("hil", entry["address"], timeout_s=timeout_s)
        assert drv.identity is not None
        if "expect_model" in entry:
            assert drv.identity.model == entry["expect_model"]
        r = await drv.read()
        assert r.state in (DeviceState.MINING, DeviceState.SLEEPING)
        if r.state is DeviceState.MINING and r.power_w is not None:
            assert r.power_w > 0
        print(f"{entry['address']}: {drv.identity} -> {r}")


async def _wait_state(drv: AsicDriver, state: DeviceState, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if (await drv.read()).state is state:
            return time.monotonic() - start
        await asyncio.sleep(1.0)
    raise AssertionError(f"{drv.address} did not reach {state} within {timeout_s} s")


async def test_control_target_sleep_wake() -> None:
    for entry in _rig():
        _control_allowed(entry)
        timeout_s = float(entry.get("timeout_s", 10))
        drv = await AsicDriver.connect("hil", entry["address"], timeout_s=timeout_s)
        caps = drv.identity.capabilities if drv.identity else None
        before = await drv.read()
        if caps is not None and caps.power_target and caps.power_target_min_w is not None:
            applied = await drv.set_power_target(caps.power_target_min_w)
            assert applied == caps.power_target_min_w
            if before.power_target_w is not None:
                await drv.set_power_target(before.power_target_w)
        await drv.sleep()
        slept = await _wait_state(drv, DeviceState.SLEEPING, 120)
        await drv.wake()
        woke = await _wait_state(drv, DeviceState.MINING, 600)
        print(f"{entry['address']}: asleep after {slept:.1f} s, mining again after {woke:.1f} s")
