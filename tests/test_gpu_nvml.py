"""The local NVML driver, run without a GPU: an autospec'd pynvml fed recorded H100 values."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pynvml
import pytest

from siteagent.domain.errors import (
    DeviceFaulted,
    DeviceLost,
    DevicePermissionError,
    DeviceUnreachable,
)
from siteagent.drivers.gpu import GpuNodeDriver
from siteagent.drivers.nvml import NvmlNodeDriver

# Recorded from an H100 SXM (NVML units: mW, mJ, percent, bytes).
H100 = {
    "uuid": "GPU-3f1b6f5c-2a4e-8d7b-91c0-5e6f7a8b9c0d",
    "name": "NVIDIA H100 80GB HBM3",
    "constraints_mw": [200000, 700000],
    "default_mw": 700000,
    "limit_mw": 700000,
    "enforced_mw": 700000,
    "power_mw": 351234,
    "energy_mj": 123456789012,
    "util_pct": 87,
    "temperature_c": 54,
    "memory_used_bytes": 75_161_927_680,
}


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class RecordedNvml:
    """An autospec'd pynvml module answering from per-GPU recorded values."""

    gpus: list[dict[str, Any]]
    lib: Any = field(init=False)
    threads: set[int] = field(default_factory=set)
    failures: dict[str, pynvml.NVMLError] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lib = mock.create_autospec(pynvml)
        self.lib = lib

        def gpu(h: str) -> dict[str, Any]:
            self.threads.add(threading.get_ident())
            return self.gpus[int(h.split("-")[1])]

        def getter(name: str, key: str) -> Any:
            def fn(h: str, *_: Any) -> Any:
                if name in self.failures:
                    raise self.failures[name]
                return gpu(h)[key]

            return fn

        lib.nvmlDeviceGetCount.return_value = len(self.gpus)
        lib.nvmlDeviceGetHandleByIndex.side_effect = lambda i: f"handle-{i}"
        for name, key in {
            "nvmlDeviceGetUUID": "uuid",
            "nvmlDeviceGetName": "name",
            "nvmlDeviceGetPowerManagementLimitConstraints": "constraints_mw",
            "nvmlDeviceGetPowerManagementDefaultLimit": "default_mw",
            "nvmlDeviceGetPowerManagementLimit": "limit_mw",
            "nvmlDeviceGetEnforcedPowerLimit": "enforced_mw",
            "nvmlDeviceGetPowerUsage": "power_mw",
            "nvmlDeviceGetTotalEnergyConsumption": "energy_mj",
            "nvmlDeviceGetTemperature": "temperature_c",
        }.items():
            getattr(lib, name).side_effect = getter(name, key)
        lib.nvmlDeviceGetUtilizationRates.side_effect = lambda h: SimpleNamespace(
            gpu=gpu(h)["util_pct"], memory=30
        )
        lib.nvmlDeviceGetMemoryInfo.side_effect = lambda h, version=None: SimpleNamespace(
            used=gpu(h)["memory_used_bytes"], total=85_520_809_984
        )

        def set_limit(h: str, limit_mw: int) -> None:
            if "nvmlDeviceSetPowerManagementLimit" in self.failures:
                raise self.failures["nvmlDeviceSetPowerManagementLimit"]
            gpu(h)["limit_mw"] = gpu(h)["enforced_mw"] = limit_mw

        lib.nvmlDeviceSetPowerManagementLimit.side_effect = set_limit


@pytest.fixture
def nvml() -> RecordedNvml:
    return RecordedNvml([dict(H100), dict(H100, uuid="GPU-second", power_mw=402000)])


def driver(nvml: RecordedNvml, *, root: bool = True, **kw: Any) -> NvmlNodeDriver:
    return NvmlNodeDriver("local", nvml=nvml.lib, is_privileged=lambda: root, **kw)


async def test_connect_enumerates_in_watts_without_touching_a_setter(nvml: RecordedNvml) -> None:
    d = driver(nvml)
    assert isinstance(d, GpuNodeDriver)
    infos = await d.connect()
    assert [i.index for i in infos] == [0, 1]
    assert infos[0].uuid == H100["uuid"] and infos[0].name == "NVIDIA H100 80GB HBM3"
    assert (infos[0].power_limit_min_w, infos[0].power_limit_max_w) == (200.0, 700.0)
    assert infos[0].power_limit_default_w == 700.0
    assert d.read_only is False
    nvml.lib.nvmlInit.assert_called_once_with()
    nvml.lib.nvmlDeviceSetPowerManagementLimit.assert_not_called()


async def test_read_converts_units_off_the_event_loop(nvml: RecordedNvml) -> None:
    d = driver(nvml, clock=lambda: 42.0)
    await d.connect()
    nvml.threads.clear()
    r0, r1 = await d.read()
    assert r0.index == 0 and r0.timestamp_s == 42.0
    assert r0.power_w == pytest.approx(351.234)
    assert r0.energy_j == pytest.approx(123456789.012)
    assert r0.power_limit_w == 700.0 and r0.enforced_power_limit_w == 700.0
    assert r0.utilization_frac == pytest.approx(0.87)
    assert r0.temperature_c == 54.0
    assert r0.memory_used_bytes == 75_161_927_680
    assert r1.power_w == pytest.approx(402.0)
    assert threading.get_ident() not in nvml.threads  # every NVML call ran in a worker thread
    nvml.lib.nvmlDeviceGetTemperature.assert_called_with("handle-1", pynvml.NVML_TEMPERATURE_GPU)


async def test_not_root_is_read_only_and_never_writes(nvml: RecordedNvml) -> None:
    d = driver(nvml, root=False)
    await d.connect()
    assert d.read_only is True
    with pytest.raises(DevicePermissionError, match="read-only"):
        await d.set_power_limit(0, 300)
    nvml.lib.nvmlDeviceSetPowerManagementLimit.assert_not_called()


async def test_set_clamps_to_constraints_and_writes_only_changes(nvml: RecordedNvml) -> None:
    d = driver(nvml)
    await d.connect()
    setter = nvml.lib.nvmlDeviceSetPowerManagementLimit
    assert await d.set_power_limit(0, 1000.0) == 700.0  # already 700 W: nothing written
    setter.assert_not_called()
    assert await d.set_power_limit(0, 150.0) == 200.0
    setter.assert_called_once_with("handle-0", 200000)
    assert await d.set_power_limit(0, 350.9) == 350.0  # whole watts, rounded down
    setter.assert_called_with("handle-0", 350000)
    assert await d.set_power_limit(0, 350.2) == 350.0
    assert setter.call_count == 2
    assert (await d.read())[0].power_limit_w == 350.0


async def test_no_permission_from_nvml_makes_the_node_read_only(nvml: RecordedNvml) -> None:
    d = driver(nvml)
    await d.connect()
    nvml.failures["nvmlDeviceSetPowerManagementLimit"] = _err(pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(DevicePermissionError) as ei:
        await d.set_power_limit(1, 300.0)
    assert isinstance(ei.value.__cause__, pynvml.NVMLError)
    assert d.read_only is True


async def test_gpu_lost_is_device_lost(nvml: RecordedNvml) -> None:
    d = driver(nvml)
    await d.connect()
    nvml.failures["nvmlDeviceGetPowerUsage"] = _err(pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(DeviceLost, match="GPU is lost") as ei:
        await d.read()
    assert isinstance(ei.value.__cause__, pynvml.NVMLError_GpuIsLost)


async def test_unsupported_queries_read_as_none(nvml: RecordedNvml) -> None:
    d = driver(nvml)
    await d.connect()
    nvml.failures["nvmlDeviceGetTotalEnergyConsumption"] = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    r = (await d.read())[0]
    assert r.energy_j is None
    assert r.power_w == pytest.approx(351.234)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, DeviceUnreachable),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, DeviceUnreachable),
        (pynvml.NVML_ERROR_UNKNOWN, DeviceFaulted),
    ],
)
async def test_init_errors_are_mapped(
    nvml: RecordedNvml, code: int, error: type[Exception]
) -> None:
    nvml.lib.nvmlInit.side_effect = _err(code)
    with pytest.raises(error):
        await driver(nvml).connect()


async def test_restore_on_close_puts_back_what_it_changed(nvml: RecordedNvml) -> None:
    d = driver(nvml, restore_on_close=True)
    await d.connect()
    await d.set_power_limit(0, 300.0)
    await d.set_power_limit(0, 250.0)
    await d.close()
    setter = nvml.lib.nvmlDeviceSetPowerManagementLimit
    assert setter.call_args_list[-1] == mock.call("handle-0", 700000)
    assert nvml.gpus[0]["limit_mw"] == 700000 and nvml.gpus[1]["limit_mw"] == 700000
    nvml.lib.nvmlShutdown.assert_called_once_with()


async def test_without_restore_close_leaves_the_safe_state(nvml: RecordedNvml) -> None:
    d = driver(nvml)
    await d.connect()
    await d.set_power_limit(0, 300.0)
    await d.close()
    assert nvml.gpus[0]["limit_mw"] == 300000
    nvml.lib.nvmlShutdown.assert_called_once_with()


async def test_a_hung_nvml_call_times_out_and_is_not_stacked(nvml: RecordedNvml) -> None:
    d = driver(nvml, timeout_s=0.2)
    await d.connect()
    release = threading.Event()
    nvml.lib.nvmlDeviceGetPowerUsage.side_effect = lambda h: release.wait(5) and 1000
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachable, match="did not answer"):
        await d.read()
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(DeviceUnreachable, match="still hung"):
        await d.read()
    release.set()
    # The hung thread needs a moment to return; under load that can take a while.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            readings = await d.read()
            break
        except DeviceUnreachable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert readings[0].power_w == pytest.approx(1.0)


async def test_drain_and_undrain_run_local_commands(nvml: RecordedNvml) -> None:
    d = driver(nvml, drain_command="true", undrain_command="echo no >&2; exit 3")
    await d.drain()
    with pytest.raises(DeviceFaulted, match="exited 3: no"):
        await d.undrain()
    await driver(nvml).drain()  # none configured: no-op


async def test_names_as_bytes_from_old_bindings(nvml: RecordedNvml) -> None:
    nvml.gpus[0]["name"] = b"NVIDIA H100 80GB HBM3"
    infos = await driver(nvml).connect()
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
