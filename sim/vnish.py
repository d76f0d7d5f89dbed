"""A simulated VNish (AnthillOS) Antminer: a token-authenticated web API on 80, CGMiner on 4028.

Shaped after replies recorded from a real Antminer S21 Pro on VNish 1.2.7
(block/proto-fleet, ``tests/plugin-contract/testdata/antminer-vnish``):

- ``GET /`` is the web UI's page, ``<meta name="firmware" content="AnthillOS">``
  (how pyasic recognises VNish), no login needed.
- ``POST /api/v1/unlock {"pw": ...}`` answers ``{"token": ...}``, or ``401`` for
  a wrong password. Every other ``/api/v1/`` call wants that token in
  ``Authorization`` (bare, or after ``Bearer ``), else ``401``. Tokens die when
  the password changes and when the miner reboots (the simulator's choice).
- ``GET`` ``info`` (model, MAC, serial, firmware version), ``summary`` (state,
  power, hashrate, temperatures), ``perf-summary`` (the running preset),
  ``settings`` (the configured preset, the preset switcher), ``autotune/presets``.
- ``POST`` ``settings`` (``{"miner": {"overclock": {...}}}``: preset and preset
  switcher), ``mining/stop`` / ``mining/start`` (and ``pause`` / ``resume`` /
  ``restart``), ``system/reboot``, ``find-miner``.
- On 4028, ``summary``, ``stats`` (``STATS[0].Type`` names the model, which is
  where pyasic reads it), ``pools`` and ``devdetails``; ``version`` is an
  "Invalid command", as on the recorded unit.

Power moves in presets: discrete wattage profiles, 90 W apart (the spacing of
the recorded S21 Pro list, 2550-4690 W), from about 70 % of the model's
nameplate up to the nameplate, plus two overclocking presets above it that need
a modded PSU (this unit has none). Each preset's hashrate follows the power
model's law (``sim.power``). A preset change restarts mining: no hashing for
``restart_s`` at idle power, then a ramp to the new level (``wake_s``); a
preset never run before shows ``auto-tuning`` during the ramp and is ``tuned``
afterwards. ``mining/stop`` drops to the sleep draw (tens of W) with the state
``stopped``; ``mining/start`` ramps back (``wake_s``). A preset set while
stopped is kept for the start. The preset switcher (off unless switched on)
moves the running preset on its own, as the firmware does with temperature
(``switcher_move``): the configured preset stays, the running one changes.

A declined control (``refuse_commands``) answers ``403`` with a JSON error; an
unknown preset is answered like a good one and ignored (pyasic notes that the
firmware answers ``settings`` the same way whether it applied it or not).
These two, the token lifetime and the state ``restarting`` are the
simulator's choices, not observed firmware behaviour (the recording shows
``auto-tuning``; ``stopped`` is one of the states pyasic's ``_is_mining`` knows).

The web API keeps HTTP/1.1 connections open (persistent connections, as the
web servers embedded in miner firmware do unless the client asks for
``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``) until the
client closes them, they sit idle for ``KEEPALIVE_IDLE_S`` (the simulator's
choice: the recording has no headers), the listeners close (a reboot, the
``refuse`` fault: the process behind them is gone, so are its connections), a
``garbage`` answer is sent, or ``restart_web()`` (the web server restarts
between two requests) / ``drop_next_request()`` (the connection is cut as the
next request, or the next one of a kind, arrives: unanswered, and carried out
first with ``act``) says so. ``http_connections`` counts the connections
accepted on port 80, ``dropped_requests`` the requests cut.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

from siteagent.sim.base import (
    DEFAULT_REBOOT_DOWN_S,
    HTTP_ERRORS,
    IDLE_POWER_W,
    HttpRequest,
    HttpResponse,
    SimMinerBase,
    http_response_bytes,
    json_response,
    read_http_request,
    rpc_status,
)
from siteagent.sim.faults import GARBAGE_BYTES, Fault
from siteagent.sim.power import HASHRATE_POWER_EXPONENT

VNISH_VERSION = "1.2.7"
BUILD_TIME = "2025-12-22 19:12:30"
CGMINER = "cgminer 4.11.1"
PRESET_STEP_W = 90
LOWEST_PRESET_FRAC = 0.7
OVERCLOCK_PRESETS = 2
_PAGE = (
    b'<!DOCTYPE html>\n<html lang="en">\n  <head>\n    <meta charset="UTF-8">\n'
    b'    <meta name="firmware" content="AnthillOS">\n    <title>Firmware</title>\n'
    b'    <script type="module" crossorigin src="/assets/index.js"></script>\n'
    b'  </head>\n  <body><div id="app"></div></body>\n</html>\n'
)
_SETTINGS_REPLY = {"restart_required": False, "reboot_required": False}
# A kept-alive web connection is closed after this long (s) without a request.
KEEPALIVE_IDLE_S = 60.0
# How long (s) a request may take to arrive once its first byte has.
REQUEST_READ_S = 5.0


@dataclass(slots=True)
class SimPreset:
    """One VNish preset: its name (its wattage as a string), W, TH/s, tuned or not."""

    name: str
    watts: float
    hashrate_ths: float
    tuned: bool = False
    modded_psu_required: bool = False

    def as_json(self) -> dict[str, Any]:
        """The preset as ``autotune/presets`` and ``perf-summary`` show it."""
        return {
            "name": self.name,
            "pretty": f"{int(self.watts)} watt ~ {round(self.hashrate_ths)} TH",
            "status": "tuned" if self.tuned else "untuned",
            "modded_psu_required": self.modded_psu_required,
        }


class SimVNish(SimMinerBase):
    """One simulated Antminer on VNish."""

    BACKEND: ClassVar[str] = "vnish"
    PORTS: ClassVar[tuple[int, ...]] = (80, 4028)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", "SIMVN")
        super().__init__(*args, **kwargs)
        np_w, np_ths = self.model.nameplate_power_w, self.model.nameplate_hashrate_ths
        watts: list[float] = []
        w = np_w
        while w >= np_w * LOWEST_PRESET_FRAC:
            watts.append(w)
            w -= PRESET_STEP_W
        self.presets: list[SimPreset] = [
            SimPreset(str(int(w)), w, np_ths * (w / np_w) ** HASHRATE_POWER_EXPONENT)
            for w in sorted(watts)
        ]
        for i in range(1, OVERCLOCK_PRESETS + 1):
            w = np_w + i * PRESET_STEP_W
            ths = np_ths * (w / np_w) ** HASHRATE_POWER_EXPONENT
            self.presets.append(SimPreset(str(int(w)), w, ths, modded_psu_required=True))
        stock = self._find(str(int(np_w)))
        assert stock is not None
        stock.tuned = True  # the stock preset has run since the firmware went on
        self.preset = stock.name  # configured (settings)
        self.running = stock.name  # running (perf-summary); the switcher may move it
        self.switcher_enabled = False
        self.tokens: set[str] = set()
        self.writes = 0  # control writes executed (tests check there are no blind retries)
        # Requests answered, by "GET /api/v1/summary" / "rpc stats" (tests count a sweep's cost).
        self.requests: collections.Counter[str] = collections.Counter()
        self.http_connections = 0  # accepted on port 80 (tests check connections are reused)
        self._http_writers: set[asyncio.StreamWriter] = set()
        self.dropped_requests = 0  # cut by drop_next_request
        self._drop_next: tuple[str, bool] | None = None
        self._tuning = False
        self._since_s = self.clock()
        self.power.set_target(np_w, self.clock())

    # -- ground truth ----------------------------------------------------------------

    @property
    def type_name(self) -> str:
        """The model as the firmware names it ("Antminer S19 XP")."""
        return f"Antminer {self.model.key}"

    def preset_watts(self, name: str) -> float | None:
        """Watts of the preset called ``name`` (None if there is none)."""
        p = self._find(name)
        return p.watts if p is not None else None

    def set_password(self, password: str) -> None:
        """Change the web password; every token issued before stops working."""
        self.password = password
        self.tokens.clear()

    def miner_state(self, now_s: float) -> tuple[str, float]:
        """VNish's ``miner_state`` and how long (s) it has been in it."""
        pw = self.power
        if pw.paused:
            return "stopped", now_s - self._since_s
        if pw.down(now_s):
            return "restarting", now_s - self._since_s
        if self._tuning and pw.settled(now_s):
            self._tuning = False
            p = self._find(self.running)
            if p is not None:
                p.tuned = True
        return ("auto-tuning" if self._tuning else "mining"), now_s - pw.started_s

    # -- control ---------------------------------------------------------------------

    def _find(self, name: str) -> SimPreset | None:
        return next((p for p in self.presets if p.name == name), None)

    def _run_preset(self, name: str, now_s: float) -> None:
        """Switch the running preset; mining restarts and re-tunes (unless stopped)."""
        p = self._find(name)
        if p is None or name == self.running:
            return
        self.running = name
        if self.power.paused:
            self.power.set_target(p.watts, now_s)
            return
        self._tuning = not p.tuned
        self._since_s = now_s
        self.power.restart(now_s, self.timing.restart_s, IDLE_POWER_W, p.watts)

    def switcher_move(self, steps: int = -1) -> None:
        """The preset switcher moves the running preset by ``steps`` (down when hot)."""
        names = [p.name for p in self.presets if not p.modded_psu_required]
        i = max(0, min(len(names) - 1, names.index(self.running) + steps))
        self._run_preset(names[i], self.clock())

    def reboot(self, down_s: float = DEFAULT_REBOOT_DOWN_S) -> None:
        """Spontaneous reboot: gone for ``down_s``, then mining; sessions are lost."""
        self.tokens.clear()
        self._since_s = self.clock()
        super().reboot(down_s)

    @property
    def open_http_connections(self) -> int:
        """Web connections open now."""
        return len(self._http_writers)

    def restart_web(self) -> None:
        """The web server restarts: every open web connection is closed (sessions survive)."""
        for w in list(self._http_writers):
            w.close()

    def drop_next_request(self, request: str = "", *, act: bool = False) -> None:
        """Cut the connection the next web request (``request``: only the next
        "POST /api/v1/settings") arrives on, without an answer; with ``act`` the
        miner carries it out first, so only the answer is lost."""
        self._drop_next = (request, act)

    def _dropped(self, req: HttpRequest) -> bool:
        """Whether ``req`` is the one to cut (carried out first if so asked)."""
        drop = self._drop_next
        if drop is None or (drop[0] and drop[0] != f"{req.method} {req.path.split('?', 1)[0]}"):
            return False
        self._drop_next = None
        self.dropped_requests += 1
        if drop[1]:
            self.http_request(req)
        return True

    def close_connections(self, port: int) -> None:
        """The web connections go with the web server (the process behind both is gone)."""
        if port == 80:
            self.restart_web()

    # -- CGMiner API (4028) ----------------------------------------------------------

    def rpc_command(self, cmd: str, param: Any, req: dict[str, Any]) -> dict[str, Any]:
        self.requests[f"rpc {cmd}"] += 1
        now = self.clock()
        pw = self.power
        ghs = pw.hashrate_ths(now) * 1000.0
        elapsed = max(0, int(now - pw.started_s))
        if cmd == "summary":
            out = rpc_status("S", 11, "Summary", CGMINER)
            out["SUMMARY"] = [
                {
                    "Elapsed": elapsed,
                    "GHS 5s": round(ghs, 2),
                    "GHS av": round(ghs, 2),
                    "GHS 30m": round(ghs, 2),
                    "Accepted": 0,
                    "Rejected": 0,
                    "Hardware Errors": 0,
                    "Best Share": 0,
                }
            ]
            return out
        if cmd == "stats":
            out = rpc_status("S", 70, "CGMiner stats", CGMINER)
            out["STATS"] = [
                {
                    "Type": f"{self.type_name} (Vnish {VNISH_VERSION})",
                    "Miner": "0.0.0",
                    "Cgminer": VNISH_VERSION,
                    "CompileTime": BUILD_TIME,
                },
                self._stats_row(now, ghs, elapsed),
            ]
            return out
        if cmd == "pools":
            out = rpc_status("S", 7, "1 Pool(s)", CGMINER)
            out["POOLS"] = [
                {
                    "POOL": 0,
                    "URL": "pool.invalid:3333",
                    "Type": 0,
                    "User": "sim.worker",
                    "Status": "Alive",
                    "Stratum Active": True,
                    "Accepted": 0,
                    "Rejected": 0,
                    "Stale": 0,
                }
            ]
            return out
        if cmd == "devdetails":
            out = rpc_status("S", 69, "Device Details", CGMINER)
            out["DEVDETAILS"] = [
                {
                    "DEVDETAILS": 0,
                    "Name": "BTM_SOC0",
                    "ID": 0,
                    "Driver": "bitmain_soc_drv",
                    "Kernel": "",
                    "Model": "",
                    "Device Path": "",
                }
            ]
            return out
        # ``version`` included: the recorded VNish 1.2.7 answers it this way.
        return rpc_status("E", 0, "Invalid command", CGMINER)

    def _stats_row(self, now: float, ghs: float, elapsed: int) -> dict[str, Any]:
        m, pw = self.model, self.power
        chip = round(pw.chip_temp_c(now))
        watts = self.reported_power_w(now)
        rpm = self.fan_rpm(now)
        state, _ = self.miner_state(now)
        row: dict[str, Any] = {
            "Elapsed": elapsed,
            "GHS 5s": f"{ghs:.2f}",
            "GHS av": round(ghs, 2),
            "fan_num": m.fans,
            "fan_mode": 0,
            "state": state,
            "total_rate": round(ghs, 2),
            "total_rateideal": round(m.nameplate_hashrate_ths * 1000.0, 2),
            "total_acn": m.hashboards * m.chips_per_board,
        }
        for i in range(1, m.fans + 1):
            row[f"fan{i}"] = rpm
        for i in range(1, m.hashboards + 1):
            row[f"temp{i}"] = chip - 15
            row[f"temp2_{i}"] = chip
            row[f"temp_chip{i}"] = f"{chip}-{chip - 10}-{chip}-{chip}"
            row[f"temp_pcb{i}"] = f"{chip - 15}-{chip - 25}-{chip - 15}-{chip - 15}"
            row[f"chain_consumption{i}"] = round(watts / m.hashboards)
            row[f"chain_rate{i}"] = round(ghs / m.hashboards, 2)
            row[f"chain_rateideal{i}"] = round(m.nameplate_hashrate_ths * 1000.0 / m.hashboards, 2)
            row[f"chain_acn{i}"] = m.chips_per_board
            row[f"chain_state{i}"] = "mining" if ghs > 0 else state
        return row

    # -- web API (80) ----------------------------------------------------------------

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 on one connection: requests answered in turn while it is kept alive."""
        if 80 not in self._servers:
            # Accepted just before the listener closed (a reboot, ``refuse``): gone with it.
            writer.close()
            return
        self.http_connections += 1
        self._http_writers.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_IDLE_S):
                        first = await reader.readexactly(1)
                except asyncio.IncompleteReadError:
                    return  # the client closed it
                async with asyncio.timeout(REQUEST_READ_S):
                    req, version = await read_http_request(reader, first)
                if self._dropped(req):
                    return
                if not await self._delay():
                    return
                if self.faults.fault is Fault.GARBAGE:
                    writer.write(GARBAGE_BYTES)
                    await writer.drain()
                    return
                conn = req.headers.get("connection", "").lower()
                keep = "close" not in conn and (version == "HTTP/1.1" or "keep-alive" in conn)
                writer.write(http_response_bytes(self.http_request(req), keep_alive=keep))
                await writer.drain()
                if not keep or writer.is_closing():
                    return
        except HTTP_ERRORS:
            pass
        finally:
            self._http_writers.discard(writer)
            writer.close()

    def _authorised(self, req: HttpRequest) -> bool:
        token = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(token) and token in self.tokens

    def http_request(self, req: HttpRequest) -> HttpResponse:
        path = req.path.split("?", 1)[0]
        self.requests[f"{req.method} {path}"] += 1
        if req.method == "GET" and path in ("/", "/index.html"):
            return HttpResponse(200, _PAGE, (("Content-Type", "text/html"),))
        if not path.startswith("/api/v1/"):
            return HttpResponse(404, b"not found", (("Content-Type", "text/plain"),))
        cmd = path[len("/api/v1/") :]
        if cmd == "unlock" and req.method == "POST":
            return self._unlock(req.body)
        if not self._authorised(req):
            return json_response({"error": "Unauthorized"}, 401)
        now = self.clock()
        if req.method == "GET":
            page = self._page(cmd, now)
            if page is None:
                return json_response({"error": f"no such page: {cmd}"}, 404)
            return json_response(page)
        if req.method == "POST":
            return self._post(cmd, req.body, now)
        return json_response({"error": "method not allowed"}, 405)

    def _unlock(self, body: bytes) -> HttpResponse:
        try:
            pw = json.loads(body or b"{}").get("pw")
        except (ValueError, AttributeError):
            return json_response({"error": "bad request"}, 400)
        if not isinstance(pw, str) or not secrets.compare_digest(pw, self.password):
            return json_response({"error": "Wrong password"}, 401)
        token = secrets.token_hex(16)
        self.tokens.add(token)
        return json_response({"token": token})

    def _page(self, cmd: str, now: float) -> Any:
        if cmd == "info":
            return self._info()
        if cmd == "summary":
            return self._summary(now)
        if cmd == "perf-summary":
            running = self._find(self.running)
            return {
                "current_preset": running.as_json() if running else None,
                "preset_switcher": self._switcher(),
            }
        if cmd == "settings":
            return self._settings()
        if cmd == "autotune/presets":
            return [
                {
                    "name": "disabled",
                    "pretty": "Disabled",
                    "status": "untuned",
                    "modded_psu_required": False,
                },
                *(p.as_json() for p in self.presets),
            ]
        if cmd == "status":
            state, t = self.miner_state(now)
            return {"miner_state": state, "miner_state_time": int(t)}
        return None

    def _post(self, cmd: str, body: bytes, now: float) -> HttpResponse:
        known = {
            "settings",
            "mining/stop",
            "mining/start",
            "mining/pause",
            "mining/resume",
            "mining/restart",
            "system/reboot",
            "find-miner",
        }
        if cmd not in known:
            return json_response({"error": f"no such command: {cmd}"}, 404)
        if self.refuse_commands() and cmd != "find-miner":
            return json_response(
                {"error": f"{cmd} rejected: not accepting control commands (simulated)"}, 403
            )
        if cmd == "settings":
            try:
                req = json.loads(body or b"{}")
                overclock = req["miner"].get("overclock", {})
                if not isinstance(overclock, dict):
                    raise TypeError("overclock is not an object")
            except (ValueError, LookupError, TypeError, AttributeError):
                return json_response({"error": "bad settings"}, 400)
            self._apply_overclock(overclock, now)
            return json_response(_SETTINGS_REPLY)
        if cmd == "find-miner":
            return json_response({"on": False})
        self.writes += 1
        if cmd in ("mining/stop", "mining/pause"):
            if not self.power.paused:
                self._since_s = now
                self.power.pause(now)
        elif cmd in ("mining/start", "mining/resume"):
            if self.power.paused:
                self._since_s = now
                self.power.resume(now)
        elif cmd == "mining/restart":
            self._since_s = now
            self.power.restart(now, self.timing.restart_s, IDLE_POWER_W)
        else:  # system/reboot, once this answer is out
            asyncio.get_running_loop().call_later(0.05, self.reboot)
        return json_response({"success": True})

    def _apply_overclock(self, overclock: dict[str, Any], now: float) -> None:
        switcher = overclock.get("preset_switcher")
        changed = False
        if isinstance(switcher, dict) and "enabled" in switcher:
            changed = bool(switcher["enabled"]) != self.switcher_enabled
            self.switcher_enabled = bool(switcher["enabled"])
        name = str(overclock.get("preset", self.preset))
        p = self._find(name)
        # An unknown preset, or one this PSU cannot carry, is ignored without a word.
        if p is not None and not p.modded_psu_required and name != self.preset:
            self.preset = name
            changed = True
        if changed:
            self.writes += 1
        if not self.switcher_enabled:
            self._run_preset(self.preset, now)

    # -- pages -----------------------------------------------------------------------

    def _switcher(self) -> dict[str, Any]:
        top = [p.name for p in self.presets if not p.modded_psu_required]
        return {
            "enabled": self.switcher_enabled,
            "top_preset": top[-1],
            "decrease_temp": 75,
            "rise_temp": 55,
            "check_time": 300,
            "autochange_top_preset": False,
            "ignore_fan_speed": False,
            "min_preset": top[0],
            "power_delta": 0,
        }

    def _info(self) -> dict[str, Any]:
        return {
            "miner": self.type_name,
            "model": self.model.key.lower().replace(" ", ""),
            "fw_name": "Vnish",
            "fw_version": VNISH_VERSION,
            "build_name": "vnish",
            "platform": "aml",
            "install_type": "nand",
            "build_time": BUILD_TIME,
            "algorithm": "sha256d",
            "hr_measure": "GH/s",
            "system": {
                "os": "GNU/Linux",
                "miner_name": self.model.key.lower().replace(" ", ""),
                "network_status": {
                    "mac": self.mac,
                    "dhcp": True,
                    "ip": self.address,
                    "netmask": "255.0.0.0",
                    "gateway": "127.0.0.1",
                    "dns": ["127.0.0.53"],
                    "hostname": self.hostname,
                },
                "uptime": "0:01",
            },
            "serial": self.serial,
        }

    def _summary(self, now: float) -> dict[str, Any]:
        m, pw = self.model, self.power
        ghs = pw.hashrate_ths(now) * 1000.0
        watts = self.reported_power_w(now)
        chip = round(pw.chip_temp_c(now))
        state, state_s = self.miner_state(now)
        running = self._find(self.running)
        nominal = (running.hashrate_ths if running else m.nameplate_hashrate_ths) * 1000.0
        rpm = self.fan_rpm(now)
        return {
            "miner": {
                "miner_status": {"miner_state": state, "miner_state_time": int(state_s)},
                "miner_type": f"{self.type_name} (Vnish {VNISH_VERSION})",
                "hr_stock": round(m.nameplate_hashrate_ths * 1000.0, 2),
                "average_hashrate": round(ghs / 1000.0, 5),
                "instant_hashrate": round(ghs / 1000.0, 5),
                "hr_realtime": round(ghs, 2),
                "hr_nominal": round(nominal, 2),
                "hr_average": round(ghs, 2),
                "pcb_temp": {"min": chip - 25, "max": chip - 15},
                "chip_temp": {"min": chip - 10, "max": chip},
                "power_consumption": round(watts),
                "power_usage": round(watts),
                "power_efficiency": round(watts / (ghs / 1000.0), 3) if ghs > 0 else 0.0,
                "hw_errors_percent": 0.0,
                "hw_errors": 0,
                "pools": [
                    {
                        "id": 0,
                        "url": "pool.invalid:3333",
                        "pool_type": "UserPool",
                        "user": "sim.worker",
                        "status": "active" if ghs > 0 else "working",
                    }
                ],
                "cooling": {
                    "fan_num": m.fans,
                    "fans": [
                        {"id": i, "rpm": rpm, "status": "ok", "max_rpm": 6500}
                        for i in range(m.fans)
                    ],
                    "settings": {"mode": {"name": "auto"}},
                    "fan_duty": min(100, math.ceil(rpm / 65)),
                },
                "chains": [
                    {
                        "id": i + 1,
                        "power_consumption": round(watts / m.hashboards),
                        "hashrate_rt": round(ghs / m.hashboards, 2),
                        "chip_temp": {"min": chip - 10, "max": chip},
                        "status": {"state": "mining" if ghs > 0 else state},
                    }
                    for i in range(m.hashboards)
                ],
                "found_blocks": 0,
                "best_share": 0,
            }
        }

    def _settings(self) -> dict[str, Any]:
        m = self.model
        return {
            "miner": {
                "cooling": {
                    "mode": {"name": "auto", "param": 65},
                    "fan_min_count": m.fans,
                    "fan_min_duty": 10,
                    "fan_max_duty": 100,
                },
                "misc": {"restart_temp": 90, "remain_stopped_on_reboot": False},
                "overclock": {
                    "modded_psu": False,
                    "preset": self.preset,
                    "globals": {"volt": 1300, "freq": 495},
                    "chains": [{"freq": 495, "disabled": False} for _ in range(m.hashboards)],
                    "preset_switcher": self._switcher(),
                },
                "pools": [
                    {"url": "pool.invalid:3333", "user": "sim.worker", "pass": "x"},
                    {"url": "", "user": "", "pass": ""},
                ],
            },
            "network": {"hostname": self.hostname, "dhcp": True},
            "password": None,
            "layout": None,
        }
