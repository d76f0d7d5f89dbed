"""Whatsminer (MicroBT btminer, API V2 on TCP 4028) through pyasic's ``BTMinerV2``.

Power limit through ``adjust_power_limit`` (the firmware restarts its mining
service to apply it), sleep and wake through ``power_off`` / ``power_on``. The
writes are encrypted by pyasic (md5-crypt of the admin password, AES-ECB);
a wrong password comes back as ``check token err`` -> DevicePermissionError.

btminer V2 publishes no power-limit range: the ceiling is the model's nameplate
(the firmware refuses more than "the ordinary power of the machine") and the
floor is half of it, an assumption the firmware enforces with a refusal that
the driver reports together with this range.
"""

from __future__ import annotations

import math
from typing import Any

from pyasic.miners.backends.btminer import BTMinerV2

from siteagent.domain.errors import DeviceError, DeviceFaulted
from siteagent.domain.types import DeviceControls, DeviceIdentity, DeviceState
from siteagent.drivers.backends.base import Behaviour, Field, FieldReader, Fields, Sample
from siteagent.drivers.backends.nameplate import lookup
from siteagent.drivers.transport.rpc import no_answer, rpc_call, translate_rpc
from siteagent.drivers.transport.rules import all_of

# Share of the ceiling assumed as the lowest accepted power limit.
MIN_LIMIT_FRAC = 0.5


def _first(reply: dict[str, Any], key: str) -> dict[str, Any]:
    section = reply[key]
    row = section[0] if isinstance(section, list) else section
    if not isinstance(row, dict):
        raise TypeError(f"{key} is not an object")
    return row


def _temperature_c(summary: dict[str, Any]) -> float | None:
    row = _first(summary, "SUMMARY")
    temp = row.get("Chip Temp Max", row.get("Temperature"))
    return float(temp) if temp is not None else None


# What a reading carries: ``summary`` every reading (nothing slow); ``status`` only when
# nothing hashes, to tell sleep apart (``WhatsminerBackend.read``).
FIELDS = Fields(
    (
        Field("power_w", "summary", lambda s: float(_first(s, "SUMMARY")["Power"])),
        Field("hashrate_ths", "summary", lambda s: float(_first(s, "SUMMARY")["MHS 1m"]) / 1e6),
        Field("limit_w", "summary", lambda s: float(_first(s, "SUMMARY")["Power Limit"])),
        Field("temperature_c", "summary", _temperature_c),
        Field("elapsed_s", "summary", lambda s: int(_first(s, "SUMMARY").get("Elapsed", 0))),
    )
)


# What ``type(name, bases, {})`` puts in a class of its own (Protocol and ABC bookkeeping).
class WhatsminerBackend:
    """One Whatsminer (btminer API V2)."""

    name = "whatsminer"
    behaviour = Behaviour(target_change_restarts=True, restart_s=5.0, settle_s=20.0, wake_s=10.0)

    def __init__(self, miner: BTMinerV2) -> None:
        self.miner = miner
        self.address = str(miner.ip)
        self._elapsed_s: int | None = None
        self.fields = FieldReader(FIELDS, self.address)

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """Socket / JSON errors, and btminer's STATUS E replies."""
        return translate_rpc(self.address, what, e, control=control)

    async def _rpc(self, what: str, coro: Any) -> dict[str, Any]:
        return await rpc_call(self.address, what, coro)

    async def _write(self, what: str, coro: Any) -> dict[str, Any]:
        try:
            return await self._rpc(what, coro)
        except LookupError as e:
            # pyasic's get_token indexes the reply without a check: a refused or
            # empty answer to ``get_token`` surfaces as KeyError('Msg').
            raise no_answer(self.address, f"{what} (get_token)") from e

    async def identify(self) -> DeviceIdentity:
        """MAC and serial (get_miner_info), firmware (get_version), limit (summary)."""
        rpc = self.miner.rpc
        info, version, summary = await all_of(
            self._rpc("get_miner_info", rpc.get_miner_info()),
            self._rpc("get_version", rpc.get_version()),
            self._rpc("summary", rpc.summary()),
        )
        try:
            msg = info["Msg"]
            mac, serial = msg.get("mac"), msg.get("minersn")
            fw = version["Msg"]["fw_ver"]
            limit_w = float(_first(summary, "SUMMARY")["Power Limit"])
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: malformed reply: {e!r}") from e
        model = str(self.miner.raw_model) if self.miner.raw_model is not None else "unknown"
        plate = lookup(model)
        hi = plate.power_w if plate else limit_w
        lo = float(math.ceil(hi * MIN_LIMIT_FRAC))
        return DeviceIdentity(
            make="WhatsMiner",
            model=model,
            firmware=f"Whatsminer {fw}",
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial else None,
            capabilities=DeviceControls(
                power_target=True,
                power_target_min_w=lo,
                power_target_max_w=hi,
                power_target_default_w=hi,
                power_target_step_w=1.0,
                can_sleep=True,
                reports_power=True,
            ),
            nameplate_power_w=plate.power_w if plate else None,
            nameplate_hashrate_ths=plate.hashrate_ths if plate else None,
        )

    async def _fetch(self, sources: tuple[str, ...]) -> dict[str, Any]:
        return {"summary": await self._rpc("summary", self.miner.rpc.summary())}

    async def read(self) -> Sample:
        """One ``summary`` (plus ``status`` only when nothing hashes, to tell sleep apart)."""
        v = await self.fields.read(self._fetch)
        power_w, hashrate_ths, elapsed = v["power_w"], v["hashrate_ths"], v["elapsed_s"]
        target_w, temperature_c = v["limit_w"] or None, v["temperature_c"]
        errors: tuple[str, ...] = ()
        if self._elapsed_s is not None and elapsed < self._elapsed_s:
            errors = ("mining service restarted (uptime reset)",)
        self._elapsed_s = elapsed
        state = DeviceState.MINING
        if hashrate_ths <= 0.0:
            status = await self._rpc("status", self.miner.rpc.status())
            try:
                off = str(status["Msg"]["mineroff"]).lower() == "true"
            except (LookupError, TypeError) as e:
                raise DeviceFaulted(f"{self.address}: read: malformed status: {e!r}") from e
            if off:
                state = DeviceState.SLEEPING
            else:
                # Powered on but not hashing: the service is restarting (after a
                # limit change or a reboot) and will ramp back by itself.
                errors = (*errors, "mining service restarting")
        return Sample(
            power_w=None if power_w < 0 else power_w,  # btminer says -1 when it cannot tell
            state=state,
            hashrate_ths=hashrate_ths,
            temperature_c=temperature_c,
            power_target_w=target_w,
            errors=errors,
        )

    async def set_power_target(self, watt: int) -> float:
        """adjust_power_limit (restarts the mining service); returns the limit set (W)."""
        await self._write("adjust_power_limit", self.miner.rpc.adjust_power_limit(watt))
        return float(watt)

    async def sleep(self) -> None:
        """power_off (hashboards off; the API stays up)."""
        await self._write("power_off", self.miner.rpc.power_off(respbefore=True))

    async def wake(self) -> None:
        """power_on."""
        await self._write("power_on", self.miner.rpc.power_on())
