"""Stock Antminer (Bitmain firmware) through pyasic's ``AntminerModern``.

Stock firmware has no watt target, only a miner mode set through the web CGI
``set_miner_conf`` (HTTP digest auth, realm ``antMiner``): 0 normal, 1 sleep,
3 low power. The driver exposes it as a two-step power target, from the
low-power draw to the nameplate (step = the difference), so the planner picks
normal or low; sleep and wake are modes 1 and 0. A mode change restarts
mining (no hashing for a while, then a ramp). The write sends back the
configuration read just before (pools kept), with only the mode changed.

Many models publish no power: the adapter then estimates it from the model's
nameplate and the mode (normal: nameplate; low: its low-mode share; sleep: a
small standby figure) and marks the reading ``power_estimated``. The estimate
is the mode's level, not the ramp: during a restart it is above the truth.

pyasic's web client answers every failure with ``{"success": False,
"message": ...}`` instead of raising; the adapter maps the message (a refused
or timed-out connection -> unreachable; a reply that is not HTTP or not JSON,
or a connection closed without an answer -> faulted; any status other than
200, in practice a 401 for a wrong password -> permission error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyasic.config import MinerConfig, MiningModeConfig
from pyasic.miners.backends.antminer import AntminerModern

from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.types import DeviceControls, DeviceIdentity, DeviceState
from siteagent.drivers.backends.base import Behaviour, Field, FieldReader, Fields, Moved, Sample
from siteagent.drivers.backends.nameplate import lookup
from siteagent.drivers.transport.http import KeptDigest
from siteagent.drivers.transport.rpc import rpc_call, translate_rpc
from siteagent.drivers.transport.rules import all_of

MODE_NORMAL, MODE_SLEEP, MODE_LOW = 0, 1, 3
# The miner mode is read again at least this often (readings), and whenever the
# hashrate or the reported power moves by more than these fractions since it was read.
MODE_REFRESH_READS = 12
MODE_HASHRATE_FRAC = 0.10
MODE_POWER_FRAC = 0.05
# What an estimate says a sleeping miner draws (W): control board and fans idling.
SLEEP_ESTIMATE_W = 30.0
# In pyasic's web error message: no connection made, or none answered in time.
# ("Server disconnected without sending a response": it accepted and answered
# nothing HTTP can parse, e.g. bytes without a line end -> faulted.)
_UNREACHABLE_WORDS = (
    "connection attempts failed",
    "refused",
    "timed out",
    "timeout",
    "unreachable",
)


def _mode_config(mode: int) -> Any:
    if mode == MODE_SLEEP:
        return MiningModeConfig.sleep()
    if mode == MODE_LOW:
        return MiningModeConfig.low()
    return MiningModeConfig.normal()


def _max_temp(row: dict[str, Any]) -> float | None:
    temps: list[float] = []
    for k, v in row.items():
        if k.startswith("temp_chip"):
            temps += [float(t) for t in str(v).split("-") if t.strip()]
    return max(temps) if temps else None


def _power(row: dict[str, Any]) -> float | None:
    raw = row.get("chain_power")
    if raw is None:
        return None
    return float(str(raw).split()[0])


def _row(stats: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = stats["STATS"][1]
    return row


# What a reading carries and where it comes from: ``stats`` (4028) every reading, the
# miner mode (web ``get_miner_conf``) when it may have moved. The mode moves only by a
# write (the agent's: read again after it) or by hand, and a mode change shows in the
# hashrate (and power, where reported): the conf is read again after any write, after
# a restart, when hashrate moves by more than MODE_HASHRATE_FRAC or starts or stops,
# when reported power moves by more than MODE_POWER_FRAC, and once every
# MODE_REFRESH_READS readings.
FIELDS = Fields(
    (
        Field("hashrate_ths", "stats", lambda s: float(_row(s)["GHS 5s"]) / 1000.0),
        Field("elapsed_s", "stats", lambda s: int(_row(s).get("Elapsed", 0))),
        Field("temperature_c", "stats", lambda s: _max_temp(_row(s))),
        Field("reported_w", "stats", lambda s: _power(_row(s))),
        Field("mode", "conf", lambda c: int(c["bitmain-work-mode"]), slow=True),
    ),
    watch=(
        Moved("hashrate_ths", frac=MODE_HASHRATE_FRAC, floor=0.0, zero=True),
        Moved("reported_w", frac=MODE_POWER_FRAC),
    ),
    every=MODE_REFRESH_READS,
)


class AntminerBackend:
    """One Antminer on stock firmware."""

    name = "antminer"
    behaviour = Behaviour(target_change_restarts=True, restart_s=10.0, settle_s=30.0, wake_s=30.0)

    def __init__(self, miner: AntminerModern) -> None:
        self.miner = miner
        self.address = str(miner.ip)
        model = str(miner.raw_model) if miner.raw_model is not None else None
        self._plate = lookup(model)
        self._high_w: float | None = self._plate.power_w if self._plate else None
        self._low_w: float | None = (
            float(round(self._plate.power_w * self._plate.low_mode_frac)) if self._plate else None
        )
        self._elapsed_s: int | None = None
        self._restarted = False  # the reading being made saw the uptime fall
        self.fields = FieldReader(FIELDS, self.address)
        # Mode to wake into (the mining mode before sleep, or one set while asleep).
        self._wake_mode = MODE_NORMAL
        self._read_web = KeptDigest(miner.web)

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """Socket / JSON errors of the 4028 API (the web errors are mapped where they occur)."""
        return translate_rpc(self.address, what, e, control=control)

    # -- transport ---------------------------------------------------------------------

    async def _rpc(self, what: str, coro: Any) -> dict[str, Any]:
        return await rpc_call(self.address, what, coro)

    async def _web(self, what: str, coro: Any) -> dict[str, Any]:
        reply = await coro
        if not isinstance(reply, dict):
            raise DeviceFaulted(f"{self.address}: {what}: reply is not an object")
        if reply.get("success") is False and "message" in reply:
            msg = str(reply.get("message"))
            text = f"{self.address}: {what}: {msg}"
            low = msg.lower()
            if "unknown error" in low:
                # pyasic says this for any status but 200: behind digest auth, a 401.
                raise DevicePermissionError(f"{text} (HTTP status not 200: wrong web password?)")
            if "decode" in low:
                raise DeviceFaulted(text)
            if any(w in low for w in _UNREACHABLE_WORDS):
                raise DeviceUnreachable(text)
            raise DeviceFaulted(text)
        return reply

    async def _conf(self, what: str, *, reading: bool = False) -> tuple[dict[str, Any], int]:
        if not reading:
            self.fields.forget()  # a write may follow: whatever happens, read the mode again
        call = self._read_web.get("get_miner_conf") if reading else self.miner.web.get_miner_conf()
        conf = await self._web(what, call)
        try:
            mode = int(conf["bitmain-work-mode"])
        except (LookupError, TypeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: {what}: malformed miner conf: {e!r}") from e
        return conf, mode

    async def _set_mode(self, what: str, conf: dict[str, Any], mode: int) -> None:
        try:
            cfg = MinerConfig.from_am_modern(conf)
        except (LookupError, TypeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: {what}: malformed miner conf: {e!r}") from e
        cfg.mining_mode = _mode_config(mode)
        reply = await self._web(what, self.miner.web.set_miner_conf(cfg.as_am_modern()))
        if reply.get("stats") != "success" and reply.get("code") != "M000":
            raise DeviceRefused(
                f"{self.address}: {what}: {reply.get('code', '?')}: {reply.get('msg', reply)}"
            )

    # -- the Backend protocol ----------------------------------------------------------

    async def identify(self) -> DeviceIdentity:
        """MAC and serial (web get_system_info), firmware (version), power report (stats)."""
        info, version, stats = await all_of(
            self._web("get_system_info", self._read_web.get("get_system_info")),
            self._rpc("version", self.miner.rpc.version()),
            self._rpc("stats", self.miner.rpc.stats()),
        )
        try:
            mac, serial = info.get("macaddr"), info.get("serinum")
            ver = version["VERSION"][0]
            fw = str(ver.get("CompileTime") or info.get("system_filesystem_version") or "")
            reports_power = _power(stats["STATS"][1]) is not None
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: malformed reply: {e!r}") from e
        model = str(self.miner.raw_model) if self.miner.raw_model is not None else "unknown"
        plate = self._plate
        lo, hi = self._low_w, self._high_w
        return DeviceIdentity(
            make=str(self.miner.make) if self.miner.make is not None else "AntMiner",
            model=model,
            firmware=f"Antminer stock {fw}".strip(),
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial else None,
            capabilities=DeviceControls(
                # Without a nameplate the two modes have no wattage to plan with.
                power_target=lo is not None and hi is not None,
                power_target_min_w=lo,
                power_target_max_w=hi,
                power_target_default_w=hi,
                power_target_step_w=(hi - lo) if lo is not None and hi is not None else 1.0,
                can_sleep=True,
                reports_power=reports_power,
            ),
            nameplate_power_w=plate.power_w if plate else None,
            nameplate_hashrate_ths=plate.hashrate_ths if plate else None,
        )

    async def _fetch(self, sources: tuple[str, ...]) -> dict[str, Any]:
        """The replies of ``FIELDS``' sources: ``stats`` on 4028, the conf on the web."""
        if sources == FIELDS.slow_sources:
            conf, _ = await self._conf("read", reading=True)
            return {"conf": conf}
        return {"stats": await self._rpc("stats", self.miner.rpc.stats())}

    def _restart_seen(self, v: Mapping[str, Any]) -> bool:
        """Whether mining restarted since the last reading (its uptime fell)."""
        elapsed = v["elapsed_s"]
        self._restarted = self._elapsed_s is not None and elapsed < self._elapsed_s
        self._elapsed_s = elapsed
        return self._restarted

    async def read(self) -> Sample:
        """``stats`` (4028), and the miner conf (web, for the mode) when the mode may
        have moved (``FIELDS``)."""
        v = await self.fields.read(self._fetch, self._restart_seen)
        hashrate_ths, temperature_c, reported_w, mode = (
            v["hashrate_ths"],
            v["temperature_c"],
            v["reported_w"],
            v["mode"],
        )
        errors: tuple[str, ...] = ()
        if self._restarted:
            errors = ("mining restarted (uptime reset)",)
        target_w: float | None = None
        estimate: float | None = SLEEP_ESTIMATE_W
        if mode == MODE_SLEEP:
            state = DeviceState.SLEEPING
        else:
            state = DeviceState.MINING
            target_w = self._low_w if mode == MODE_LOW else self._high_w
            estimate = target_w
            if hashrate_ths <= 0.0:
                errors = (*errors, "mining restarting (miner mode change or reboot)")
        if reported_w is not None:
            return Sample(
                power_w=reported_w,
                state=state,
                hashrate_ths=hashrate_ths,
                temperature_c=temperature_c,
                power_target_w=target_w,
                errors=errors,
            )
        return Sample(
            power_w=estimate if self._plate is not None else None,
            state=state,
            hashrate_ths=hashrate_ths,
            temperature_c=temperature_c,
            power_target_w=target_w,
            power_estimated=self._plate is not None,
            errors=errors,
        )

    async def set_power_target(self, watt: int) -> float:
        """Normal mode at the nameplate, else low power; returns that mode's W.

        A miner asleep stays asleep: the mode is remembered for ``wake``.
        """
        if self._low_w is None or self._high_w is None:
            raise DeviceRefused(f"{self.address}: model without a nameplate: no mode wattage")
        mode, watts = (
            (MODE_NORMAL, self._high_w) if watt >= self._high_w else (MODE_LOW, self._low_w)
        )
        what = f"set miner-mode {mode}"
        conf, current = await self._conf(what)
        if current == MODE_SLEEP:
            self._wake_mode = mode
        elif current != mode:
            await self._set_mode(what, conf, mode)
        return watts

    async def sleep(self) -> None:
        """miner-mode 1 (remembering the mining mode to wake into)."""
        conf, current = await self._conf("sleep")
        if current == MODE_SLEEP:
            return
        self._wake_mode = MODE_LOW if current == MODE_LOW else MODE_NORMAL
        await self._set_mode("sleep (miner-mode 1)", conf, MODE_SLEEP)

    async def wake(self) -> None:
        """Back to the mining mode of before sleep (normal unless low was chosen)."""
        conf, current = await self._conf("wake")
        if current != MODE_SLEEP:
            return
        await self._set_mode(f"wake (miner-mode {self._wake_mode})", conf, self._wake_mode)
