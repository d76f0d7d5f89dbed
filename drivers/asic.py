"""ASIC miner driver: Braiins OS (BOSer, gRPC) miners through pyasic.

Two levels (STYLE.md): ``_BoserWire`` is the thin pyasic use (one method per
vendor call, returning pyasic's dicts); ``AsicDriver`` names quantities, converts
units (GH/s -> TH/s), clamps to the device's constraints and turns every vendor
error into one of ``domain.errors``, raised ``from`` the original.

This is the only module of the project that imports pyasic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyasic
from grpclib import GRPCError, Status
from pyasic.errors import APIError
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.web.braiins_os.proto.braiins.bos.v1 import MinerStatus, SaveAction

from domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from domain.types import DeviceReading, DeviceState, MinerCapabilities, MinerIdentity

log = logging.getLogger(__name__)

# Nameplate figures by pyasic model name (stock firmware, approximate; see
# DOMAIN_FACTS.md). The simulator keeps its own table on purpose.
NAMEPLATE: Mapping[str, tuple[float, float]] = {
    # model: (power W, hashrate TH/s)
    "S19j Pro": (3068.0, 104.0),
    "S19 XP": (3010.0, 140.0),
    "S21": (3500.0, 200.0),
    "S21 Pro": (3510.0, 234.0),
}

# Ports identification probes, to tell "nothing answers" from "answers nonsense".
_PROBE_PORTS = (80, 4028, 50051)

# gRPC statuses that mean "understood and declined" rather than "broken".
_REFUSED = {
    Status.INVALID_ARGUMENT,
    Status.FAILED_PRECONDITION,
    Status.OUT_OF_RANGE,
    Status.ABORTED,
    Status.ALREADY_EXISTS,
    Status.UNIMPLEMENTED,
}
_UNREACHABLE = {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED}
_NO_PERMISSION = {Status.PERMISSION_DENIED, Status.UNAUTHENTICATED}


def _translate(address: str, what: str, e: BaseException) -> DeviceError:
    """Map a pyasic / grpclib / socket error to one of ours (not raised here)."""
    # pyasic's BOSer web API wraps GRPCError and ConnectionError in APIError
    # ``from`` the original; the cause is what tells the failures apart.
    cause: BaseException = e
    if isinstance(e, APIError) and e.__cause__ is not None:
        cause = e.__cause__
    msg = f"{address}: {what}: {type(cause).__name__}: {cause}"
    if isinstance(cause, GRPCError):
        detail = cause.message or cause.status.name
        msg = f"{address}: {what}: {cause.status.name}: {detail}"
        if cause.status in _REFUSED:
            return DeviceRefused(msg)
        if cause.status in _UNREACHABLE:
            return DeviceUnreachable(msg)
        if cause.status in _NO_PERMISSION:
            return DevicePermissionError(msg)
        return DeviceFaulted(msg)
    if isinstance(cause, TimeoutError):
        return DeviceUnreachable(f"{address}: {what}: no answer in time")
    if isinstance(cause, ConnectionRefusedError):
        return DeviceUnreachable(msg)
    if isinstance(cause, ConnectionError):
        # Reset or closed after connecting: the peer is there but talks nonsense
        # (grpclib closes the connection when the HTTP/2 framing is garbage).
        return DeviceFaulted(msg)
    if isinstance(cause, OSError):
        return DeviceUnreachable(msg)
    return DeviceFaulted(msg)


class _BoserWire:
    """Thin use of pyasic's BOSer web (gRPC) API: vendor dicts in, vendor dicts out."""

    def __init__(self, miner: BOSer) -> None:
        self.miner = miner

    async def miner_details(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_miner_details())

    async def miner_stats(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_miner_stats())

    async def performance_mode(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_active_performance_mode())

    async def cooling_state(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_cooling_state())

    async def constraints(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_constraints())

    async def set_power_target(self, watt: int) -> dict[str, Any]:
        # SAVE_AND_APPLY persists the target, so a reboot keeps what we last set;
        # BOSer has no "apply without saving" action.
        return dict(
            await self.miner.web.set_power_target(
                watt, save_action=SaveAction(SaveAction.SAVE_AND_APPLY)
            )
        )

    async def pause(self) -> dict[str, Any]:
        # Not miner.stop_mining(): it swallows the error into False.
        return dict(await self.miner.web.pause_mining())

    async def resume(self) -> dict[str, Any]:
        return dict(await self.miner.web.resume_mining())


def _watt(d: Mapping[str, Any], *path: str) -> float:
    """A ``Power`` message's watts at ``path``; proto3 drops a zero ``watt`` field."""
    node: Any = d
    for key in path:
        node = node[key]
    return float(node.get("watt", 0))


class AsicDriver:
    """One Braiins OS miner: identify, read, set power target, sleep, wake."""

    def __init__(
        self,
        device_id: str,
        address: str,
        miner: BOSer,
        *,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.identity: MinerIdentity | None = None
        self.timeout_s = timeout_s
        self._clock = clock
        self._miner = miner
        self._wire = _BoserWire(miner)
        self._last_target_w: float | None = None

    @classmethod
    async def connect(cls, device_id: str, address: str, *, timeout_s: float = 5.0) -> AsicDriver:
        """Identify the miner at ``address`` and read its capabilities (timeout in s)."""
        miner = await _get_miner(address, timeout_s)
        drv = cls(device_id, address, miner, timeout_s=timeout_s)
        await drv.identify()
        return drv

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one vendor call under the timeout, translating its errors."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await fn()
        except DeviceError:
            raise
        except Exception as e:
            raise _translate(self.address, what, e) from e

    async def identify(self) -> MinerIdentity:
        """(Re)read identity and power-target constraints (W) from the miner."""
        details, constraints = await self._call(
            "identify",
            lambda: asyncio.gather(self._wire.miner_details(), self._wire.constraints()),
        )
        try:
            pt = constraints["tunerConstraints"]["powerTarget"]
            lo, hi, default = _watt(pt, "min"), _watt(pt, "max"), _watt(pt, "default")
            bos_version = str(details.get("bosVersion", {}).get("current", ""))
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: unusable constraints: {e!r}") from e
        if not 0 < lo <= hi:
            raise DeviceFaulted(f"{self.address}: identify: power target range {lo}-{hi} W")
        model = str(self._miner.raw_model) if self._miner.raw_model is not None else "unknown"
        nameplate = NAMEPLATE.get(model)
        mac = details.get("macAddress")
        serial = details.get("serialNumber")
        self.identity = MinerIdentity(
            make=str(self._miner.make) if self._miner.make is not None else "unknown",
            model=model,
            firmware=f"Braiins OS {bos_version}".strip(),
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial else None,
            capabilities=MinerCapabilities(
                power_target=True,
                power_target_min_w=lo,
                power_target_max_w=hi,
                power_target_default_w=default,
                power_target_step_w=1.0,
                can_sleep=True,
                reports_power=True,
            ),
            nameplate_power_w=nameplate[0] if nameplate else None,
            nameplate_hashrate_ths=nameplate[1] if nameplate else None,
        )
        return self.identity

    async def read(self) -> DeviceReading:
        """One reading: power W, hashrate TH/s, hottest temperature degC, state, target W."""
        stats, details, mode, cooling = await self._call(
            "read",
            lambda: asyncio.gather(
                self._wire.miner_stats(),
                self._wire.miner_details(),
                self._wire.performance_mode(),
                self._wire.cooling_state(),
            ),
        )
        ts = self._clock()
        try:
            power_w = _watt(stats, "powerStats", "approximatedConsumption")
            # A zero hashrate arrives as an empty message (proto3 omits defaults).
            last5 = stats["minerStats"]["realHashrate"].get("last5S", {})
            hashrate_ths = float(last5.get("gigahashPerSecond", 0.0)) / 1000.0
            target = mode["tunerMode"]["powerTarget"]["powerTarget"]
            target_w = float(target.get("watt", 0)) or None
            temp = cooling.get("highestTemperature", {}).get("temperature", {}).get("degreeC")
            temperature_c = float(temp) if temp is not None else None
            status = details.get("status")
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: read: missing or malformed field: {e!r}") from e
        if status is not None and int(status) == MinerStatus.PAUSED:
            state = DeviceState.SLEEPING
        elif status is not None and int(status) == MinerStatus.NORMAL:
            state = DeviceState.MINING
        else:
            state = DeviceState.UNKNOWN
        self._last_target_w = target_w
        return DeviceReading(
            device_id=self.device_id,
            timestamp_s=ts,
            power_w=power_w,
            state=state,
            hashrate_ths=hashrate_ths,
            temperature_c=temperature_c,
            power_target_w=target_w,
        )

    async def set_power_target(self, power_w: float) -> float:
        """Clamp ``power_w`` (W) to the device's range, write it if it changed, return it."""
        ident = self.identity or await self.identify()
        caps = ident.capabilities
        applied_w = caps.clamp_power_target_w(power_w)
        if self._last_target_w is not None and math.isclose(applied_w, self._last_target_w):
            return applied_w
        watt = int(applied_w)
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await self._wire.set_power_target(watt)
        except Exception as e:
            err = _translate(self.address, f"set power target {watt} W", e)
            if isinstance(err, DeviceRefused):
                err = DeviceRefused(
                    f"{err} (device range {caps.power_target_min_w:.0f}-"
                    f"{caps.power_target_max_w:.0f} W)"
                )
            raise err from e
        try:
            applied_w = _watt(reply, "powerTarget")
        except (LookupError, TypeError, AttributeError, ValueError):
            applied_w = float(watt)
        self._last_target_w = applied_w
        return applied_w

    async def sleep(self) -> None:
        """Pause mining (BOSer PauseMining; idempotent: an already paused miner says so)."""
        await self._call("pause mining", self._wire.pause)

    async def wake(self) -> None:
        """Resume mining (BOSer ResumeMining; idempotent)."""
        await self._call("resume mining", self._wire.resume)


async def _probe_any(address: str, timeout_s: float) -> bool:
    """True if any management port of ``address`` accepts a TCP connection."""

    async def one(port: int) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(address, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    return any(await asyncio.gather(*(one(p) for p in _PROBE_PORTS)))


async def _get_miner(address: str, timeout_s: float) -> BOSer:
    """pyasic.get_miner under a deadline, checked to be a BOSer (gRPC) miner."""
    try:
        # get_miner has per-probe timeouts but no overall deadline.
        async with asyncio.timeout(timeout_s):
            miner = await pyasic.get_miner(address)
    except TimeoutError as e:
        raise DeviceUnreachable(f"{address}: identification: no answer in {timeout_s} s") from e
    except Exception as e:
        raise _translate(address, "identification", e) from e
    if miner is None:
        # pyasic says None both when nothing listens and when what answers is
        # unrecognisable; a plain TCP connect tells the two apart.
        if await _probe_any(address, min(timeout_s, 1.0)):
            raise DeviceFaulted(f"{address}: answers, but pyasic cannot identify it")
        raise DeviceUnreachable(f"{address}: nothing answers on ports {_PROBE_PORTS}")
    if not isinstance(miner, BOSer):
        # Includes pyasic's fallback to the legacy BOSMiner class for a Braiins
        # model it does not know (pyasic issues #129, #140).
        raise DeviceFaulted(
            f"{address}: {type(miner).__name__} ({miner.model}) is not a Braiins OS "
            "(BOSer) miner this driver can control"
        )
    return miner


async def discover(
    addresses: Iterable[str], *, concurrency: int = 50, timeout_s: float = 5.0
) -> list[tuple[str, MinerIdentity]]:
    """Identify miners at ``addresses``, ``concurrency`` at a time (timeout per miner, s)."""
    # Unbounded get_miner() fan-out fails wholesale (PYASIC_NOTES: 1,000 at once
    # identified none), so bound it.
    sem = asyncio.Semaphore(max(1, concurrency))
    addrs = list(addresses)

    async def one(address: str) -> tuple[str, MinerIdentity] | None:
        async with sem:
            try:
                drv = await AsicDriver.connect(address, address, timeout_s=timeout_s)
            except DeviceError as e:
                log.debug("discover: %s: %s", address, e)
                return None
        return (address, drv.identity) if drv.identity is not None else None

    found = await asyncio.gather(*(one(a) for a in addrs))
    return [f for f in found if f is not None]
