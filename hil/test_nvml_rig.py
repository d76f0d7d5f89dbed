"""Read-only NVML checks on this host's real GPUs (enumerate, power, limits, energy).

They never set anything: the driver is built read-only (``is_privileged`` says
no), so a set would raise before reaching NVML. Skipped, saying why, where NVML
cannot initialise (no driver or no GPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pynvml
import pytest

from siteagent.drivers.nvml import NvmlNodeDriver


def _nvml_or_skip() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA GPU here: pynvml.nvmlInit() failed: {e}")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("NVML initialised but lists no GPU")
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture
async def drv() -> AsyncIterator[NvmlNodeDriver]:
    _nvml_or_skip()
    d = NvmlNodeDriver("hil-local", is_privileged=lambda: False, restore_on_close=False)
    await d.connect()
    yield d
    await d.close()


async def test_enumerate_and_limits(drv: NvmlNodeDriver) -> None:
    assert drv.read_only  # by construction: these checks never write
    for info in drv.infos:
        print(f"GPU {info.index}: {info}")
        assert info.uuid.startswith(("GPU-", "MIG-"))
        assert 0 < info.power_limit_min_w <= info.power_limit_default_w <= info.power_limit_max_w


async def test_read_power_limits_and_energy(drv: NvmlNodeDriver) -> None:
    first = await drv.read()
    await asyncio.sleep(1.0)
    second = await drv.read()
    assert len(first) == len(second) == len(drv.infos)
    for info, a, b in zip(drv.infos, first, second, strict=True):
        print(f"GPU {info.index}: {b}")
        assert b.power_w is not None and 0 < b.power_w <= info.power_limit_max_w * 1.2
        assert b.power_limit_w is not None
        assert info.power_limit_min_w <= b.power_limit_w <= info.power_limit_max_w
        if b.enforced_power_limit_w is not None:
            assert b.enforced_power_limit_w <= b.power_limit_w + 1e-6
        if a.energy_j is not None and b.energy_j is not None:
            assert b.energy_j >= a.energy_j  # a counter since driver load
            # Energy over the second should be near the draw (W x s), loosely.
            assert b.energy_j - a.energy_j <= info.power_limit_max_w * 3 * (
                b.timestamp_s - a.timestamp_s
            )
