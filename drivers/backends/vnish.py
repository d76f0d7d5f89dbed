"""VNish (AnthillOS) on Antminers through pyasic's ``VNish`` and its web client.

VNish moves power in *presets*: discrete wattage profiles listed by
``autotune/presets`` ("2550 watt ~ 170 TH"). The driver exposes them as a power
target from the lowest to the highest usable preset, stepped by the preset
spacing, and picks the highest preset at or below the target. Presets that need
a modded PSU are left out unless the miner says it has one. A preset change
restarts mining (no hashing for a while, then a ramp; a preset never run before
auto-tunes during the ramp). Sleep and wake are ``mining/stop`` and
``mining/start``. Everything goes over the web API on port 80, which wants the
token pyasic gets from ``unlock`` with the web password (pyasic's setting
``default_vnish_web_password``, "admin").

The preset switcher moves the running preset on its own with temperature (up
to its top preset when cool): a controller that budgets the site's power
cannot share the knob, so a preset change through this driver switches it off
and leaves it off (as the LuxOS adapter does with ATM).

pyasic quirks worked around (pyasic 0.79.0):

- ``VNish.set_power_limit`` never changes anything: ``MiningModeConfig.from_vnish``
  calls ``cls.preset.from_vnish`` (config/mining/__init__.py:770), which on the
  enum member resolves to ``MiningModeConfig.from_vnish`` itself, finds no
  ``miner`` key and returns the normal mode, so the ``MiningModePreset`` check
  (miners/backends/vnish.py:332) returns False. It would also take only presets
  marked ``tuned`` (vnish.py:338), and a unit fresh from install lists them all
  ``untuned``. The adapter writes ``settings`` itself, through the web client.
- ``VNish.get_config`` answers any ``APIError`` with an empty config
  (vnish.py:321): the adapter reads ``settings`` and ``autotune/presets`` itself
  so an unreachable miner is not mistaken for one without presets.
- The firmware answers ``settings`` the same whether it applied them or not
  (web/vnish.py:173): the write is checked by reading ``settings`` back.
- ``VNish.resume_mining`` sends ``mining/resume``, the counterpart of
  ``pause``, while ``stop_mining`` sends ``mining/stop``: the adapter calls the
  web client's ``stop_mining`` / ``start_mining`` pair.
- ``VNishWebAPI.auth`` swallows every failure (web/vnish.py:36-53: a warning,
  then ``None`` or the old token) whether the password was refused or no
  connection was made. The adapter logs on explicitly and, when that fails,
  asks the 4028 API (``summary``) whether the miner answers at all: if it
  does, the password is wrong.
- ``send_command`` answers any status but 200 by logging on again and giving up
  without retrying (``get_data_retries`` is 1; web/vnish.py:91-94, 117: "Failed
  to send command to miner"). The adapter logs on itself: refused -> permission
  error; accepted -> the session had expired, so it sends the call once more;
  a second refusal with a good session is the firmware declining the call.
- ``_get_wattage`` reads ``power_usage``; the adapter reads
  ``power_consumption`` (both carry watts on the recorded 1.2.7, but
  ``power_usage`` is the older name).
- ``VNishWebAPI`` builds a new httpx client and transport for every request
  (web/vnish.py:37, :66), so every reading opens a TCP connection: most of a
  reading's CPU at 10,000 miners. ``_KeptConnectionWebAPI`` is pyasic's client
  on ``drivers.transport.http.KeptSession``: one kept-alive connection per miner,
  on aiohttp (see there for why and for what is retried).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from pyasic import settings
from pyasic.errors import APIError
from pyasic.miners.backends.vnish import VNish
from pyasic.web.vnish import VNishWebAPI

from siteagent.domain.errors import DeviceError, DeviceFaulted, DevicePermissionError, DeviceRefused
from siteagent.domain.types import DeviceIdentity, DeviceState
from siteagent.drivers.backends.base import (
    KEPT_CONNECTIONS,
    Behaviour,
    Field,
    FieldReader,
    Fields,
    Moved,
    Sample,
    level_capabilities,
)
from siteagent.drivers.backends.nameplate import lookup
from siteagent.drivers.transport.http import KEEPALIVE_EXPIRY_S, KeptSession, translate_http
from siteagent.drivers.transport.rpc import no_answer
from siteagent.drivers.transport.rules import all_of

__all__ = [
    "FIELDS",
    "KEEPALIVE_BUDGET",
    "KEEPALIVE_EXPIRY_S",
    "PRESET_REFRESH_READS",
    "VNishBackend",
]

# The running preset is read again at least this often (readings), and whenever power
# moves by more than this fraction since it was read.
PRESET_REFRESH_READS = 12
PRESET_POWER_FRAC = 0.05

# What pyasic's web client says for any HTTP status but 200 (web/vnish.py:117).
_NOT_200 = "Failed to send command to miner"
# ``miner_state`` values in which the miner does not mine on purpose.
_SLEEP_STATES = frozenset({"stopped", "shutting-down"})
# ``info.hr_measure`` -> TH/s per unit of ``hr_realtime``.
_TO_THS = {"GH/s": 1e-3, "TH/s": 1.0, "MH/s": 1e-6}


# The budget of kept connections this process shares with the Braiins OS channels.
KEEPALIVE_BUDGET = KEPT_CONNECTIONS


class _KeptConnectionWebAPI(VNishWebAPI):  # type: ignore[misc]  # pyasic is untyped
    """pyasic's VNish web client, its requests sharing one kept-alive HTTP/1.1 connection.

    ``auth`` and ``send_command`` are pyasic 0.79.0's (web/vnish.py:36-117: the
    same requests, headers, timeouts, re-login on a status other than 200,
    ``APIError`` texts and warnings), sent with aiohttp instead of httpx on one
    ``aiohttp.ClientSession`` per miner made on first use and closed by
    ``aclose`` (the driver's ``close``). An httpx request cost 0.75 ms of CPU
    on a kept connection against 0.14-0.33 ms for aiohttp and 0.05-0.09 ms for a
    bare asyncio exchange (2,000 simulated miners, one ``summary`` each); at
    10,000 miners that is most of a sweep. Its pool holds one connection
    (requests of one miner queue for it; a miner's web server is small), kept
    for ``KEEPALIVE_EXPIRY_S`` between requests while ``KEEPALIVE_BUDGET``
    allows, and otherwise closed after each request. aiohttp closes a
    connection whose exchange did not finish (a timeout, a cancel, a cut) rather
    than pooling it, so a late answer is never read as the next request's.

    What differs from pyasic: a request goes out on the miner's ``KeptSession``
    (``drivers.transport.http``: one connection kept while ``KEEPALIVE_BUDGET``
    allows); a read (GET) or ``unlock`` that fails as a connection closed under it
    is sent once more, on a fresh connection; a write (POST) is never sent again
    after a transport error, even where pyasic's ``get_data_retries`` would (these
    APIs have no idempotency key: the driver reads state before any retry), and its
    error is raised ``from`` the transport's.
    """

    def __init__(self, ip: str) -> None:
        super().__init__(ip)
        self.session = KeptSession(KEEPALIVE_BUDGET)
        # One parsed URL per command: parsing the string costs a fifth of a request.
        self._urls: dict[str, yarl.URL] = {}

    def _url(self, command: str) -> yarl.URL:
        url = self._urls.get(command)
        if url is None:
            url = self._urls[command] = yarl.URL(f"http://{self.ip}:{self.port}/api/v1/{command}")
        return url

    @property
    def keeps_connection(self) -> bool:
        """Whether this miner's client keeps its connection between requests."""
        return self.session.keeps_connection

    async def aclose(self) -> None:
        """Close the kept connection (a later request opens a new one)."""
        await self.session.aclose()

    async def auth(self) -> str | None:
        """pyasic's ``unlock`` on the kept connection: the token, or None / the old one."""
        url = self._url("unlock")
        try:
            # A login asks nothing of the miner: a read, sent once more if cut.
            status, body = await self.session.request(
                "POST", url, write=False, json_body={"pw": self.pwd}
            )
        except (aiohttp.ClientError, TimeoutError):
            warnings.warn(f"Could not authenticate web token with miner: {self}", stacklevel=2)
        else:
            if status != 200:
                warnings.warn(f"Could not authenticate web token with miner: {self}", stacklevel=2)
                return None
            self.token = json.loads(body)["token"]
        token: str | None = self.token
        return token

    async def send_command(
        self,
        command: str,
        ignore_errors: bool = False,
        allow_warning: bool = True,
        privileged: bool = False,
        **parameters: Any,
    ) -> dict[str, Any]:
        """pyasic's ``send_command`` on the kept connection (a read once more if it was cut)."""
        post = privileged or parameters != {}
        if self.token is None:
            await self.auth()
        url = self._url(command)
        timeout = float(settings.get("api_function_timeout", 5))
        retries = settings.get("get_data_retries", 1)
        for attempt in range(retries):
            auth = self.token
            if auth is None:
                raise APIError(f"Could not authenticate web token with miner: {self}")
            if command.startswith("system"):
                auth = "Bearer " + auth
            headers = {"Authorization": auth}
            try:
                status, body = await self.session.request(
                    "POST" if post else "GET",
                    url,
                    write=post,
                    headers=headers,
                    json_body=parameters if post else None,
                    limit_s=timeout,
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                if post or attempt == retries - 1:
                    raise APIError(f"HTTP error sending '{command}' to {self.ip}: {e}") from e
                continue
            if status != 200:
                await self.auth()  # refresh the token, as pyasic does
                continue
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if attempt == retries - 1:
                    text = body.decode(errors="replace") or "empty response"
                    raise APIError(
                        f"JSON decode error for '{command}' from {self.ip}: {e} - Response: {text}"
                    ) from e
                continue
            return data if data else {"success": True}
        raise APIError(f"Failed to send command to miner: {self}")


def _kept_web(miner: VNish) -> _KeptConnectionWebAPI:
    """The miner's web client as the kept-connection kind (pyasic's settings and token kept)."""
    web = miner.web
    if isinstance(web, _KeptConnectionWebAPI):
        return web
    kept = _KeptConnectionWebAPI(str(web.ip))
    kept.username, kept.pwd, kept.port, kept.token = web.username, web.pwd, web.port, web.token
    miner.web = kept
    return kept


def _miner(summary: dict[str, Any]) -> dict[str, Any]:
    miner: dict[str, Any] = summary["miner"]
    return miner


def _power_w(summary: dict[str, Any]) -> float | None:
    miner = _miner(summary)
    power = miner.get("power_consumption", miner.get("power_usage"))
    return float(power) if power is not None else None


def _chip_c(summary: dict[str, Any]) -> float | None:
    chip = (_miner(summary).get("chip_temp") or {}).get("max")
    return float(chip) if chip is not None else None


def _failed(summary: dict[str, Any]) -> list[str]:
    return [
        str(c.get("status", {}).get("description", f"chain {c.get('id')}"))
        for c in _miner(summary).get("chains", [])
        if c.get("status", {}).get("state") == "failure"
    ]


def _current_preset(perf: dict[str, Any]) -> dict[str, Any]:
    current = perf.get("current_preset") or {}
    if not isinstance(current, dict):
        raise TypeError(f"malformed preset: {current!r}")
    return current


# What a reading carries and where it comes from: ``summary`` every reading, the
# running preset (``perf-summary``) when it may have moved. Between the agent's own
# writes the preset moves only by hand or by the firmware's preset switcher (off once
# the agent has written one): it is read again after any write, when the state
# changes or mining restarts, when power moves by more than PRESET_POWER_FRAC since
# it was read, and once every PRESET_REFRESH_READS readings.
FIELDS = Fields(
    (
        Field("state", "summary", lambda s: str(_miner(s)["miner_status"]["miner_state"])),
        Field(
            "state_s",
            "summary",
            lambda s: float(_miner(s)["miner_status"].get("miner_state_time", 0)),
        ),
        Field("power_w", "summary", _power_w),
        Field("hr_realtime", "summary", lambda s: float(_miner(s)["hr_realtime"])),
        Field("temperature_c", "summary", _chip_c),
        Field("failed", "summary", _failed),
        Field("preset", "perf-summary", _current_preset, slow=True),
    ),
    watch=(Moved("state"), Moved("power_w", frac=PRESET_POWER_FRAC)),
    every=PRESET_REFRESH_READS,
)


@dataclass(frozen=True, slots=True)
class Preset:
    """One usable preset: its name (what ``settings`` takes) and its wattage (W)."""

    name: str
    watts: float


def _preset_watts(p: dict[str, Any]) -> float | None:
    """W of one ``autotune/presets`` entry ("3250 watt ~ 218 TH"), None for "disabled"."""
    pretty = str(p.get("pretty", ""))
    if "watt" in pretty:
        return float(pretty.split("watt", 1)[0].strip())
    try:
        return float(str(p["name"]))
    except ValueError:
        return None


class VNishBackend:
    """One Antminer on VNish."""

    name = "vnish"
    # Chosen, not measured: a preset change restarts the miner process (chains
    # re-initialise) before the tuner ramps to the new level; start is a cold
    # chain initialisation too.
    behaviour = Behaviour(
        target_change_restarts=True,
        restart_s=20.0,
        settle_s=60.0,
        wake_s=60.0,
        reads_log_in=True,
        identify_keeps_state=True,
    )

    def __init__(self, miner: VNish) -> None:
        self.miner = miner
        self.address = str(miner.ip)
        self.web = _kept_web(miner)
        self._presets: list[Preset] = []  # usable, lowest first
        self._ths_per_unit = 1e-3
        self._last_state: tuple[str, float] | None = None
        self._restarted = False  # the reading being made saw mining restart
        self.fields = FieldReader(FIELDS, self.address)

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """aiohttp errors of the web client, socket / JSON errors of the 4028 API."""
        return translate_http(self.address, what, e, control=control)

    async def close(self) -> None:
        """Close the miner's kept web connection."""
        await self.web.aclose()

    # -- transport ---------------------------------------------------------------------

    async def _login(self, what: str) -> None:
        """Get a web token unless pyasic holds one (one ``unlock``)."""
        web = self.miner.web
        if web.token is not None:
            return
        if await web.auth() is not None:
            return
        # auth() says the same for a refused password and a refused connection.
        reply = await self.miner.rpc.summary()
        if not reply:
            raise no_answer(self.address, what)
        raise DevicePermissionError(
            f"{self.address}: {what}: web login refused (wrong web password?)"
        )

    async def _web(self, what: str, call: Callable[[], Awaitable[Any]], *, control: bool) -> Any:
        """One web call; a status other than 200 is resolved into what it meant."""
        await self._login(what)
        try:
            return await call()
        except APIError as e:
            if _NOT_200 not in str(e):
                raise
            first = e
        # pyasic logged on again after the non-200 status, and gave up. Log on
        # here to learn whether that worked.
        if await self.miner.web.auth() is None:
            raise DevicePermissionError(
                f"{self.address}: {what}: web login refused (wrong web password?)"
            ) from first
        try:
            return await call()
        except APIError as e:
            if _NOT_200 not in str(e):
                raise
            text = f"{self.address}: {what}: the firmware declined it (HTTP status not 200)"
            raise (DeviceRefused(text) if control else DeviceFaulted(text)) from e

    async def _web_dict(
        self, what: str, call: Callable[[], Awaitable[Any]], *, control: bool = False
    ) -> dict[str, Any]:
        reply = await self._web(what, call, control=control)
        if not isinstance(reply, dict):
            raise DeviceFaulted(f"{self.address}: {what}: reply is not an object")
        return reply

    # -- the Backend protocol ----------------------------------------------------------

    async def identify(self) -> DeviceIdentity:
        """MAC, serial, version (``info``), presets, modded PSU (``settings``): 3 web calls."""
        web = self.miner.web
        await self._login("identify")
        info, presets, settings = await all_of(
            self._web_dict("info", web.info),
            self._web("autotune/presets", web.autotune_presets, control=False),
            self._web_dict("settings", web.settings),
        )
        try:
            net = info["system"]["network_status"]
            mac, serial, fw = net.get("mac"), info.get("serial"), str(info["fw_version"])
            self._ths_per_unit = _TO_THS.get(str(info.get("hr_measure", "GH/s")), 1e-3)
            modded_psu = bool(settings["miner"]["overclock"].get("modded_psu", False))
            rows = presets.get("presets", []) if isinstance(presets, dict) else presets
            usable: list[Preset] = []
            for p in rows:
                w = _preset_watts(p)
                if w is None or (p.get("modded_psu_required") and not modded_psu):
                    continue
                usable.append(Preset(str(p["name"]), w))
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: malformed reply: {e!r}") from e
        if not usable:
            raise DeviceFaulted(f"{self.address}: identify: no usable presets")
        self._presets = sorted(usable, key=lambda p: p.watts)
        watts = [p.watts for p in self._presets]
        model = str(self.miner.raw_model) if self.miner.raw_model is not None else "unknown"
        plate = lookup(model)
        stock = [w for w in watts if plate is None or w <= plate.power_w]
        return DeviceIdentity(
            make=str(self.miner.make) if self.miner.make is not None else "AntMiner",
            model=model,
            firmware=f"VNish {fw}",
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial and serial != "N/A" else None,
            capabilities=level_capabilities(watts, stock[-1] if stock else watts[-1]),
            nameplate_power_w=plate.power_w if plate else None,
            nameplate_hashrate_ths=plate.hashrate_ths if plate else None,
        )

    async def _fetch(self, sources: tuple[str, ...]) -> dict[str, Any]:
        """The replies of ``FIELDS``' sources: each a web call of pyasic's client
        (``perf-summary`` is its ``perf_summary``)."""
        web = self.miner.web
        return {
            source: await self._web_dict(source, getattr(web, source.replace("-", "_")))
            for source in sources
        }

    def _restart_seen(self, v: Mapping[str, Any]) -> bool:
        """Whether mining restarted since the last reading (same state, its time fell)."""
        last = self._last_state
        self._restarted = last is not None and last[0] == v["state"] and v["state_s"] < last[1]
        return self._restarted

    async def read(self) -> Sample:
        """Power, hashrate, temperature, state (``summary``) and preset (``perf-summary``).

        One web call (``summary``), plus ``perf-summary`` when the running preset may
        have moved (``FIELDS``), and one ``unlock`` on first contact or after the miner
        dropped the session.
        """
        await self._login("read")
        v = await self.fields.read(self._fetch, self._restart_seen)
        state_name, power_w, failed = v["state"], v["power_w"], v["failed"]
        hashrate_ths = v["hr_realtime"] * self._ths_per_unit
        current = v["preset"]
        preset = str(current["name"]) if current.get("name") is not None else None
        target_w = next((p.watts for p in self._presets if p.name == preset), None)
        if target_w is None and preset is not None and preset != "disabled":
            target_w = _preset_watts(current)
        errors: tuple[str, ...] = ()
        if self._restarted:
            errors = ("mining restarted (uptime reset)",)
        self._last_state = (state_name, v["state_s"])
        if state_name in _SLEEP_STATES:
            state = DeviceState.SLEEPING
        else:
            state = DeviceState.MINING
            if state_name == "failure" or failed:
                errors = (*errors, f"firmware reports failure: {'; '.join(failed) or state_name}")
            elif hashrate_ths <= 0.0:
                errors = (*errors, f"mining restarting ({state_name})")
        return Sample(
            power_w=power_w,
            state=state,
            hashrate_ths=hashrate_ths,
            temperature_c=v["temperature_c"],
            power_target_w=target_w,
            errors=errors,
        )

    async def set_power_target(self, watt: int) -> float:
        """Highest preset at or below ``watt`` (preset switcher off); returns its W.

        Reads ``settings``, writes the overclock section back with only the
        preset (and the switcher) changed, reads ``settings`` again to check.
        Nothing is written when that preset is already set and the switcher off.
        """
        self.fields.forget()  # whatever happens, read the preset again
        fitting = [p for p in self._presets if p.watts <= watt]
        if not fitting:
            raise DeviceRefused(f"{self.address}: no preset at or below {watt} W")
        preset = fitting[-1]
        web = self.miner.web
        what = f"set preset {preset.name}"
        settings = await self._web_dict(what, web.settings, control=True)
        try:
            overclock = dict(settings["miner"]["overclock"])
            switcher = overclock.get("preset_switcher")
        except (LookupError, TypeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: {what}: malformed settings: {e!r}") from e
        switcher_on = isinstance(switcher, dict) and bool(switcher.get("enabled"))
        if str(overclock.get("preset")) == preset.name and not switcher_on:
            return preset.watts
        overclock["preset"] = preset.name
        if isinstance(switcher, dict):
            overclock["preset_switcher"] = {**switcher, "enabled": False}
        await self._web(
            what,
            lambda: web.send_command("settings", privileged=True, miner={"overclock": overclock}),
            control=True,
        )
        after = await self._web_dict(f"{what} (check)", web.settings, control=True)
        try:
            now = str(after["miner"]["overclock"]["preset"])
        except (LookupError, TypeError) as e:
            raise DeviceFaulted(f"{self.address}: {what}: malformed settings: {e!r}") from e
        if now != preset.name:
            raise DeviceRefused(f"{self.address}: {what}: the firmware kept preset {now}")
        return preset.watts

    async def sleep(self) -> None:
        """``mining/stop`` (the web API stays up, power falls to tens of W)."""
        self.fields.forget()
        reply = await self._web_dict("mining stop", self.miner.web.stop_mining, control=True)
        if reply.get("success") is False:
            raise DeviceRefused(f"{self.address}: mining stop: {reply}")

    async def wake(self) -> None:
        """``mining/start``."""
        self.fields.forget()
        reply = await self._web_dict("mining start", self.miner.web.start_mining, control=True)
        if reply.get("success") is False:
            raise DeviceRefused(f"{self.address}: mining start: {reply}")
