"""Braiins OS (BOSer): gRPC on port 50051 through pyasic's ``BOSer`` web API.

Watt power target (``SetPowerTarget``, range from ``GetConstraints``), pause and
resume. The behaviour is what drivers/asic.py had before the backends split.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

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
from domain.types import DeviceState, MinerCapabilities, MinerIdentity
from drivers.backends.base import Behaviour, Sample
from drivers.backends.nameplate import lookup

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


def translate_grpc(address: str, what: str, e: BaseException) -> DeviceError:
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


class BraiinsBackend:
    """One Braiins OS miner through pyasic's BOSer class."""

    name = "braiins"
    # Braiins OS target changes can restart the tuner and ramp for minutes (user
    # reports); the simulator ramps over its settle time without a restart.
    behaviour = Behaviour(target_change_restarts=False, settle_s=20.0, wake_s=10.0)

    def __init__(self, miner: BOSer) -> None:
        self.miner = miner
        self.address = str(miner.ip)
        self._wire = _BoserWire(miner)

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """gRPC status codes carry the refusal / permission distinction here."""
        return translate_grpc(self.address, what, e)

    async def identify(self) -> MinerIdentity:
        """Identity and power-target constraints (W) from GetMinerDetails / GetConstraints."""
        details, constraints = await asyncio.gather(
            self._wire.miner_details(), self._wire.constraints()
        )
        try:
            pt = constraints["tunerConstraints"]["powerTarget"]
            lo, hi, default = _watt(pt, "min"), _watt(pt, "max"), _watt(pt, "default")
            bos_version = str(details.get("bosVersion", {}).get("current", ""))
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: unusable constraints: {e!r}") from e
        if not 0 < lo <= hi:
            raise DeviceFaulted(f"{self.address}: identify: power target range {lo}-{hi} W")
        model = str(self.miner.raw_model) if self.miner.raw_model is not None else "unknown"
        plate = lookup(model)
        mac = details.get("macAddress")
        serial = details.get("serialNumber")
        return MinerIdentity(
            make=str(self.miner.make) if self.miner.make is not None else "unknown",
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
            nameplate_power_w=plate.power_w if plate else None,
            nameplate_hashrate_ths=plate.hashrate_ths if plate else None,
        )

    async def read(self) -> Sample:
        """Power W, hashrate TH/s, hottest temperature degC, state, target W (4 gRPC calls)."""
        stats, details, mode, cooling = await asyncio.gather(
            self._wire.miner_stats(),
            self._wire.miner_details(),
            self._wire.performance_mode(),
            self._wire.cooling_state(),
        )
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
        return Sample(
            power_w=power_w,
            state=state,
            hashrate_ths=hashrate_ths,
            temperature_c=temperature_c,
            power_target_w=target_w,
        )

    async def set_power_target(self, watt: int) -> float:
        """SetPowerTarget (saved and applied); returns the target the miner echoes (W)."""
        reply = await self._wire.set_power_target(watt)
        try:
            return _watt(reply, "powerTarget")
        except (LookupError, TypeError, AttributeError, ValueError):
            return float(watt)

    async def sleep(self) -> None:
        """PauseMining (idempotent: an already paused miner says so)."""
        await self._wire.pause()

    async def wake(self) -> None:
        """ResumeMining (idempotent)."""
        await self._wire.resume()
