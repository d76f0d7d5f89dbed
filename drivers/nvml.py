"""GPUs on the agent's own host through NVML (``nvidia-ml-py``, imported as ``pynvml``).

Two levels (STYLE.md): ``_NvmlWire`` is the thin, blocking pynvml use in vendor
units (mW, mJ, percent); ``NvmlNodeDriver`` runs it off the event loop under a
timeout, converts to SI units, clamps limits to the GPU's constraints and turns
``pynvml.NVMLError`` into ``domain.errors``, raised ``from`` the original.

Privilege: setting a power limit needs root. The driver finds out at connect
without changing anything (it never calls a setter to probe): a process that is
not root is read-only and says so once. A setter refused later with
NVML_ERROR_NO_PERMISSION also makes the driver read-only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DeviceLost,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.drivers.gpu import GpuInfo, GpuReading

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML return codes by what they mean to the agent.
_LOST = {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED}
_UNREACHABLE = {
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_TIMEOUT,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
}
_REFUSED = {pynvml.NVML_ERROR_INVALID_ARGUMENT, pynvml.NVML_ERROR_NOT_SUPPORTED}


def _translate(node_id: str, what: str, e: pynvml.NVMLError) -> DeviceError:
    """Map an NVML error to one of ours (not raised here)."""
    code = getattr(e, "value", None)
    msg = f"{node_id}: {what}: NVML: {e}"
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return DevicePermissionError(f"{msg} (setting power limits needs root)")
    if code in _LOST:
        return DeviceLost(msg)
    if code in _UNREACHABLE:
        return DeviceUnreachable(msg)
    return DeviceFaulted(msg)


def _text(value: Any) -> str:
    # nvidia-ml-py returns str since 11.5xx; older releases returned bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class _RawReading:
    """One GPU's read in NVML's own units (mW, mJ, percent, bytes); None: not supported."""

    power_mw: int | None
    energy_mj: int | None
    limit_mw: int | None
    enforced_limit_mw: int | None
    utilization_pct: int | None
    temperature_c: int | None
    memory_used_bytes: int | None


class _NvmlWire:
    """Thin, blocking pynvml use. ``lib`` is the pynvml module (a fake in tests)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.handles: list[Any] = []

    def _optional(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn``; None where this GPU does not support the query."""
        try:
            return fn(*args)
        except pynvml.NVMLError as e:
            if getattr(e, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise

    def init_and_enumerate(self) -> list[tuple[str, str, int, int, int]]:
        """nvmlInit, then per GPU: (uuid, name, min mW, max mW, default mW)."""
        lib = self.lib
        lib.nvmlInit()
        count = int(lib.nvmlDeviceGetCount())
        self.handles = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        out = []
        for h in self.handles:
            lo, hi = lib.nvmlDeviceGetPowerManagementLimitConstraints(h)
            out.append(
                (
                    _text(lib.nvmlDeviceGetUUID(h)),
                    _text(lib.nvmlDeviceGetName(h)),
                    int(lo),
                    int(hi),
                    int(lib.nvmlDeviceGetPowerManagementDefaultLimit(h)),
                )
            )
        return out

    def read_all(self) -> list[_RawReading]:
        """Every GPU's readings, in NVML units."""
        lib, opt = self.lib, self._optional
        out = []
        for h in self.handles:
            util = opt(lib.nvmlDeviceGetUtilizationRates, h)
            mem = opt(lib.nvmlDeviceGetMemoryInfo, h)
            out.append(
                _RawReading(
                    power_mw=opt(lib.nvmlDeviceGetPowerUsage, h),
                    energy_mj=opt(lib.nvmlDeviceGetTotalEnergyConsumption, h),
                    limit_mw=opt(lib.nvmlDeviceGetPowerManagementLimit, h),
                    enforced_limit_mw=opt(lib.nvmlDeviceGetEnforcedPowerLimit, h),
                    utilization_pct=None if util is None else int(util.gpu),
                    temperature_c=opt(lib.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
                    memory_used_bytes=None if mem is None else int(mem.used),
                )
            )
        return out

    def power_limit_mw(self, index: int) -> int:
        return int(self.lib.nvmlDeviceGetPowerManagementLimit(self.handles[index]))

    def set_power_limit_mw(self, index: int, limit_mw: int) -> None:
        self.lib.nvmlDeviceSetPowerManagementLimit(self.handles[index], limit_mw)

    def shutdown(self) -> None:
        self.lib.nvmlShutdown()


def _is_root() -> bool:
    return os.geteuid() == 0


def _scaled(value: int | None, scale: float) -> float | None:
    return None if value is None else value * scale


class NvmlNodeDriver:
    """The GPUs of the agent's own host, through NVML."""

    def __init__(
        self,
        node_id: str = "local",
        *,
        timeout_s: float = 5.0,
        restore_on_close: bool = False,
        drain_command: str | None = None,
        undrain_command: str | None = None,
        command_timeout_s: float = 120.0,
        nvml: Any = pynvml,
        is_privileged: Callable[[], bool] = _is_root,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.read_only = True  # until connect has checked the privilege
        self.timeout_s = timeout_s
        self.restore_on_close = restore_on_close
        self.drain_command = drain_command
        self.undrain_command = undrain_command
        self.command_timeout_s = command_timeout_s
        self.infos: list[GpuInfo] = []
        self._wire = _NvmlWire(nvml)
        self._is_privileged = is_privileged
        self._clock = clock
        self._inflight: asyncio.Future[Any] | None = None
        self._original_limit_mw: dict[int, int] = {}
        self._initialised = False

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking NVML step in a thread under the timeout, translating errors."""
        if self._inflight is not None and not self._inflight.done():
            # A hung NVML call cannot be cancelled; stacking more threads on a
            # wedged driver helps nobody.
            raise DeviceUnreachable(f"{self.node_id}: {what}: an earlier NVML call is still hung")
        fut: asyncio.Future[T] = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        # Retrieve a late failure so it is not logged as never retrieved.
        fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self._inflight = fut
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(fut)
        except TimeoutError as e:
            raise DeviceUnreachable(
                f"{self.node_id}: {what}: NVML did not answer in {self.timeout_s} s"
            ) from e
        except pynvml.NVMLError as e:
            raise _translate(self.node_id, what, e) from e

    async def connect(self) -> list[GpuInfo]:
        """Initialise NVML and enumerate the GPUs with their limit constraints (W)."""
        rows = await self._call("enumerate", self._wire.init_and_enumerate)
        self._initialised = True
        self.infos = [
            GpuInfo(
                index=i,
                uuid=uuid,
                name=name,
                power_limit_min_w=lo / 1000.0,
                power_limit_max_w=hi / 1000.0,
                power_limit_default_w=default / 1000.0,
            )
            for i, (uuid, name, lo, hi, default) in enumerate(rows)
        ]
        self.read_only = not self._is_privileged()
        if self.read_only:
            log.warning(
                "%s: not running as root: NVML power limits are read-only on this node",
                self.node_id,
            )
        return self.infos

    async def read(self) -> list[GpuReading]:
        """Read every GPU: power W, energy J, limits W, utilization 0..1, degC, bytes."""
        if not self._initialised:
            raise DeviceUnreachable(f"{self.node_id}: read before connect")
        raws = await self._call("read", self._wire.read_all)
        ts = self._clock()
        return [
            GpuReading(
                index=i,
                timestamp_s=ts,
                power_w=_scaled(r.power_mw, 1e-3),
                energy_j=_scaled(r.energy_mj, 1e-3),
                power_limit_w=_scaled(r.limit_mw, 1e-3),
                enforced_power_limit_w=_scaled(r.enforced_limit_mw, 1e-3),
                utilization_frac=_scaled(r.utilization_pct, 1e-2),
                temperature_c=None if r.temperature_c is None else float(r.temperature_c),
                memory_used_bytes=r.memory_used_bytes,
            )
            for i, r in enumerate(raws)
        ]

    def _info(self, index: int) -> GpuInfo:
        if not 0 <= index < len(self.infos):
            raise DeviceRefused(f"{self.node_id}: no GPU {index} (node has {len(self.infos)})")
        return self.infos[index]

    async def set_power_limit(self, index: int, power_w: float) -> float:
        """Clamp ``power_w`` (W) to GPU ``index``'s constraints, write it if it differs."""
        info = self._info(index)
        if self.read_only:
            raise DevicePermissionError(f"{self.node_id}: GPU {index}: read-only (not root)")
        applied_w = info.clamp_power_limit_w(power_w)
        target_mw = round(applied_w * 1000)
        what = f"GPU {index}: set power limit {applied_w:.0f} W"
        current_mw = await self._call(what, self._wire.power_limit_mw, index)
        if current_mw == target_mw:
            return applied_w
        try:
            await self._call(what, self._wire.set_power_limit_mw, index, target_mw)
        except DevicePermissionError:
            self.read_only = True
            log.warning("%s: NVML refused a power limit: node is now read-only", self.node_id)
            raise
        self._original_limit_mw.setdefault(index, current_mw)
        return applied_w

    async def drain(self) -> None:
        """Run the configured drain command on this host (no-op when none)."""
        await self._run_hook("drain", self.drain_command)

    async def undrain(self) -> None:
        """Run the configured undrain command on this host (no-op when none)."""
        await self._run_hook("undrain", self.undrain_command)

    async def _run_hook(self, what: str, command: str | None) -> None:
        if not command:
            return
        proc = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(self.command_timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise DeviceUnreachable(
                f"{self.node_id}: {what} command did not finish in {self.command_timeout_s} s"
            ) from e
        if proc.returncode != 0:
            tail = out.decode(errors="replace").strip()[-300:]
            raise DeviceFaulted(f"{self.node_id}: {what} command exited {proc.returncode}: {tail}")

    async def close(self) -> None:
        """Restore the limits this driver changed (when configured to), then shut NVML down."""
        if not self._initialised:
            return
        if self.restore_on_close and not self.read_only:
            for index, limit_mw in sorted(self._original_limit_mw.items()):
                try:
                    await self._call(
                        f"GPU {index}: restore power limit",
                        self._wire.set_power_limit_mw,
                        index,
                        limit_mw,
                    )
                except DeviceError as e:
                    log.warning("%s: restoring GPU %d's power limit: %s", self.node_id, index, e)
            self._original_limit_mw.clear()
        try:
            await self._call("shutdown", self._wire.shutdown)
        except DeviceError as e:
            log.debug("%s: nvmlShutdown: %s", self.node_id, e)
        self._initialised = False
