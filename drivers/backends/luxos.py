"""LuxOS (Luxor firmware, LUXminer on TCP 4028) through pyasic's ``LUXMiner``.

Power moves in discrete profiles (``profiles`` lists each with its watts): the
driver exposes them as a power target from the lowest to the highest profile,
stepped by the profile spacing, and picks the highest profile at or below the
target. Sleep and wake are ``curtail sleep`` / ``curtail wakeup``. Control
commands need a session (pyasic logs on once and keeps the id).

ATM (Advanced Thermal Management) moves the profile on its own and LuxOS
refuses ``profileset`` while it is on. A profile change through this driver
turns ATM off and leaves it off: a controller that budgets the site's power
cannot share the knob with the firmware. (pyasic's own ``set_power_limit``
turns it back on afterwards.)
"""

from __future__ import annotations

from typing import Any

from pyasic.miners.backends.luxminer import LUXMiner

from siteagent.domain.errors import DeviceError, DeviceFaulted, DevicePermissionError, DeviceRefused
from siteagent.domain.types import DeviceIdentity, DeviceState
from siteagent.drivers.backends.base import (
    Behaviour,
    Field,
    FieldReader,
    Fields,
    Sample,
    level_capabilities,
)
from siteagent.drivers.backends.nameplate import lookup
from siteagent.drivers.transport.rpc import multicommand, rpc_call, translate_rpc

# Below this share of the lowest profile, a miner that hashes nothing is asleep.
SLEEP_FRAC = 0.1


def _max_chip_c(temps: list[dict[str, Any]]) -> float | None:
    chips = [float(t["Chip"]) for t in temps[0].get("TEMPS", [])]
    return max(chips) if chips else None


# What a reading carries: four commands in one ``summary+power+config+temps`` request,
# every reading (nothing slow).
FIELDS = Fields(
    (
        Field("ghs", "summary", lambda r: float(r[0]["SUMMARY"][0]["GHS 5s"])),
        Field("power_w", "power", lambda r: float(r[0]["POWER"][0]["Watts"])),
        Field("profile", "config", lambda r: str(r[0]["CONFIG"][0]["Profile"])),
        Field("temperature_c", "temps", _max_chip_c),
    )
)


class LuxOSBackend:
    """One LuxOS miner."""

    name = "luxos"
    # LuxOS documents ~25 W in under 5 s (sleep) and full power in under 10 s.
    behaviour = Behaviour(
        target_change_restarts=False, settle_s=10.0, wake_s=10.0, identify_keeps_state=True
    )

    def __init__(self, miner: LUXMiner) -> None:
        self.miner = miner
        self.address = str(miner.ip)
        self._profiles: list[tuple[str, float]] = []  # (name, W), lowest first
        self._lowest_w = 0.0
        self.fields = FieldReader(FIELDS, self.address)

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """Socket / JSON errors and LUXminer's STATUS E replies."""
        err = translate_rpc(self.address, what, e, control=control)
        if "session" in str(e).lower():
            # Session expired or taken over: log on afresh next time. LuxOS's logon
            # takes no password, so this is no credentials problem (which would make
            # the miner read-only): the call was declined and nothing changed.
            self.miner.rpc.session_token = None
            if isinstance(err, DevicePermissionError):
                return DeviceRefused(str(err)) if control else DeviceFaulted(str(err))
        return err

    async def _rpc(self, what: str, coro: Any) -> dict[str, Any]:
        return await rpc_call(self.address, what, coro)

    async def _multi(self, what: str, *commands: str) -> dict[str, Any]:
        d = await self._rpc(what, multicommand(self.miner.rpc, commands))
        if not any(c in d for c in commands):
            # pyasic's multicommand answers both a refused connection and a
            # garbage reply with {"multicommand": True} (it falls back to single
            # commands and drops their errors). One plain read tells them apart.
            await self._rpc(what, self.miner.rpc.send_command(commands[0]))
            raise DeviceFaulted(f"{self.address}: {what}: empty reply")
        return d

    async def identify(self) -> DeviceIdentity:
        """MAC, serial, version and profiles (one ``version+config+profiles`` request)."""
        d = await self._multi("identify", "version", "config", "profiles")
        try:
            ver = d["version"][0]["VERSION"][0]
            cfg = d["config"][0]["CONFIG"][0]
            profiles = sorted(
                (str(p["Profile Name"]), float(p["Watts"])) for p in d["profiles"][0]["PROFILES"]
            )
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: malformed reply: {e!r}") from e
        self._profiles = sorted(profiles, key=lambda p: p[1])
        if not self._profiles:
            raise DeviceFaulted(f"{self.address}: identify: no profiles")
        watts = [w for _, w in self._profiles]
        self._lowest_w = watts[0]
        model = str(self.miner.raw_model) if self.miner.raw_model is not None else "unknown"
        plate = lookup(model)
        default_w = next((w for n, w in self._profiles if n == "default"), watts[-1])
        mac, serial = cfg.get("MACAddr"), cfg.get("SerialNumber")
        return DeviceIdentity(
            make=str(self.miner.make) if self.miner.make is not None else "AntMiner",
            model=model,
            firmware=f"LuxOS {ver.get('Miner', '')}".strip(),
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial else None,
            capabilities=level_capabilities(watts, default_w),
            nameplate_power_w=plate.power_w if plate else None,
            nameplate_hashrate_ths=plate.hashrate_ths if plate else None,
        )

    async def _fetch(self, sources: tuple[str, ...]) -> dict[str, Any]:
        return await self._multi("read", *sources)

    async def read(self) -> Sample:
        """Power, hashrate, temperatures and profile in one ``summary+power+config+temps``."""
        v = await self.fields.read(self._fetch)
        ghs, power_w, profile = v["ghs"], v["power_w"], v["profile"]
        target_w = next((w for n, w in self._profiles if n == profile), None)
        errors: tuple[str, ...] = ()
        state = DeviceState.MINING
        if ghs <= 0.0:
            if power_w <= SLEEP_FRAC * max(self._lowest_w, 1.0):
                state = DeviceState.SLEEPING
            else:
                errors = ("not hashing",)
        return Sample(
            power_w=power_w,
            state=state,
            hashrate_ths=ghs / 1000.0,
            temperature_c=v["temperature_c"],
            power_target_w=target_w,
            errors=errors,
        )

    async def set_power_target(self, watt: int) -> float:
        """Highest profile at or below ``watt`` (ATM switched off first); returns its W."""
        fitting = [(n, w) for n, w in self._profiles if w <= watt]
        if not fitting:
            raise DeviceRefused(f"{self.address}: no profile at or below {watt} W")
        name, watts = fitting[-1]
        rpc = self.miner.rpc
        atm = await self._rpc("atm", rpc.atm())
        if atm.get("ATM", [{}])[0].get("Enabled"):
            await self._rpc("atmset", rpc.atmset(enabled=False))
        await self._rpc("profileset", rpc.profileset(name))
        return watts

    async def sleep(self) -> None:
        """curtail sleep."""
        await self._rpc("curtail sleep", self.miner.rpc.curtail())

    async def wake(self) -> None:
        """curtail wakeup."""
        await self._rpc("curtail wakeup", self.miner.rpc.wakeup())
