"""A simulated LuxOS (Luxor firmware, LUXminer) Antminer on TCP 4028.

Profiles (``profiles`` / ``profileset``) from half the nameplate to the
nameplate in even steps, ``curtail`` sleep / wakeup, and ATM (Advanced Thermal
Management, ``atm`` / ``atmset``). Control commands carry a session id as the
first parameter (``session`` / ``logon``), as LuxOS wants. While ATM is on the
firmware refuses ``profileset`` and may move the profile on its own
(``atm_move``, or every ``atm_period_s`` seconds when that is set).
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

from siteagent.sim.base import SimMinerBase, pools_reply, rpc_status

LUXOS_VERSION = "2024.11.18.191234-f54cd2ae"
PROFILE_STEPS = 6  # 50 %, 60 %, ... 100 % of nameplate
_CONTROL = {"curtail", "profileset", "atmset"}


class SimLuxOS(SimMinerBase):
    """One simulated LuxOS miner."""

    BACKEND: ClassVar[str] = "luxos"
    PORTS: ClassVar[tuple[int, ...]] = (4028,)

    def __init__(self, *args: Any, atm_period_s: float | None = None, **kwargs: Any) -> None:
        # A ``password`` is kept and never asked for: LuxOS's API logon carries none.
        kwargs.setdefault("prefix", "SIMLUX")
        super().__init__(*args, **kwargs)
        np = self.model.nameplate_power_w
        step = np * 0.5 / (PROFILE_STEPS - 1)
        # (name, watts, TH/s), lowest first; "default" is stock.
        self.profiles: list[tuple[str, float, float]] = []
        for i in range(PROFILE_STEPS):
            w = round(np * 0.5 + i * step)
            name = "default" if i == PROFILE_STEPS - 1 else f"{int(200 + 40 * i)}MHz"
            ths = self.model.nameplate_hashrate_ths * (w / np) ** 0.85
            self.profiles.append((name, float(w), ths))
        self.profile = "default"
        self.power.set_target(float(np), self.clock())
        self.atm_enabled = False
        self.atm_period_s = atm_period_s
        self._atm_last_s = self.clock()
        self.session_id = ""
        self.writes = 0

    def _profile_watts(self, name: str) -> float | None:
        return next((w for n, w, _ in self.profiles if n == name), None)

    def atm_move(self, steps: int = -1) -> None:
        """ATM moves the profile by ``steps`` on its own (negative: down, as when hot)."""
        names = [n for n, _, _ in self.profiles]
        i = max(0, min(len(names) - 1, names.index(self.profile) + steps))
        self._apply_profile(names[i])

    def _apply_profile(self, name: str) -> None:
        self.profile = name
        watts = self._profile_watts(name)
        assert watts is not None
        self.power.set_target(watts, self.clock())

    def _atm_tick(self, now_s: float) -> None:
        if self.atm_enabled and self.atm_period_s and now_s - self._atm_last_s >= self.atm_period_s:
            self._atm_last_s = now_s
            self.atm_move(-1)

    def rpc_command(self, cmd: str, param: Any, req: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        self._atm_tick(now)
        pw, m = self.power, self.model
        if cmd in _CONTROL:
            return self._control(cmd, str(param or "").split(","))
        if cmd == "version":
            out = rpc_status("S", 22, "LUXminer versions", f"LUXminer {LUXOS_VERSION}")
            out["VERSION"] = [
                {
                    "API": "3.7",
                    "LUXminer": LUXOS_VERSION,
                    "Miner": LUXOS_VERSION,
                    "Type": m.devdetails_model.replace("Bitmain ", ""),
                }
            ]
            return out
        if cmd == "config":
            out = rpc_status("S", 33, "LUXminer config")
            out["CONFIG"] = [
                {
                    "MACAddr": self.mac.lower(),
                    "SerialNumber": self.serial,
                    "Hostname": self.hostname,
                    "Profile": self.profile,
                    "IsAtmEnabled": self.atm_enabled,
                    "RedLed": "off",
                    "Model": m.devdetails_model,
                }
            ]
            return out
        if cmd == "profiles":
            out = rpc_status("S", 330, "Profiles")
            out["PROFILES"] = [
                {
                    "Profile Name": n,
                    "Watts": int(w),
                    "Hashrate": round(ths, 2),
                    "IsTuned": True,
                    "Frequency": 200 + 40 * i,
                    "Voltage": 12.5,
                    "Step": str(i - PROFILE_STEPS + 1),
                }
                for i, (n, w, ths) in enumerate(self.profiles)
            ]
            return out
        if cmd == "power":
            out = rpc_status("S", 336, "Power")
            out["POWER"] = [{"Watts": round(self.reported_power_w(now)), "PSU": False}]
            return out
        if cmd == "summary":
            ghs = pw.hashrate_ths(now) * 1000.0
            out = rpc_status("S", 11, "Summary")
            out["SUMMARY"] = [
                {"Elapsed": max(0, int(now - pw.started_s)), "GHS 5s": ghs, "GHS av": ghs}
            ]
            return out
        if cmd == "temps":
            chip = round(pw.chip_temp_c(now), 1)
            out = rpc_status("S", 201, f"{m.hashboards} Temp(s)")
            out["TEMPS"] = [
                {"TEMPS": i, "ID": i, "Board": round(chip - 10, 1), "Chip": chip}
                for i in range(m.hashboards)
            ]
            return out
        if cmd == "tempctrl":
            out = rpc_status("S", 200, "Temperature control")
            out["TEMPCTRL"] = [{"Mode": "Auto", "Target": 75, "Hot": 85, "Dangerous": 95}]
            return out
        if cmd == "fans":
            rpm = self.fan_rpm(now)
            out = rpc_status("S", 202, f"{m.fans} Fan(s)")
            out["FANS"] = [{"ID": i, "RPM": rpm, "Speed": 50} for i in range(m.fans)]
            out["FANCTRL"] = [{"MinFans": m.fans}]
            return out
        if cmd == "groups":
            out = rpc_status("S", 74, "1 Group(s)")
            out["GROUPS"] = [{"GROUP": 0, "Name": "default", "Quota": 1}]
            return out
        if cmd == "pools":
            return pools_reply({"GROUP": 0})
        if cmd == "stats":
            ghs = pw.hashrate_ths(now) * 1000.0
            chip = int(pw.chip_temp_c(now))
            board: dict[str, Any] = {
                "Elapsed": max(0, int(now - pw.started_s)),
                "total_rateideal": m.nameplate_hashrate_ths * 1000.0,
                "rate_unit": "GH",
            }
            for b in range(1, m.hashboards + 1):
                board[f"chain_rate{b}"] = f"{ghs / m.hashboards:.2f}"
                board[f"chain_acn{b}"] = m.chips_per_board
                board[f"temp_chip{b}"] = f"{chip}-{chip}-{chip}-{chip}"
                board[f"temp_pcb{b}"] = f"{chip - 10}-{chip - 10}-{chip - 10}-{chip - 10}"
            out = rpc_status("S", 70, "CGMiner stats")
            out["STATS"] = [{"STATS": 0, "ID": "LUX0"}, board]
            return out
        if cmd == "atm":
            out = rpc_status("S", 339, "ATM configuration values")
            out["ATM"] = [{"Enabled": self.atm_enabled, "MaxProfile": "default"}]
            return out
        if cmd == "session":
            out = rpc_status("S", 324, "Session")
            out["SESSION"] = [{"SessionID": self.session_id}]
            return out
        if cmd == "logon":
            if self.session_id:
                return rpc_status("E", 328, "Another session is active")
            self.session_id = secrets.token_hex(4)
            out = rpc_status("S", 325, "Logon")
            out["SESSION"] = [{"SessionID": self.session_id}]
            return out
        return rpc_status("E", 14, "Invalid command")

    def _control(self, cmd: str, args: list[str]) -> dict[str, Any]:
        if not self.session_id or args[0] != self.session_id:
            return rpc_status("E", 45, "Invalid session id")
        if self.refuse_commands():
            return rpc_status(
                "E", 46, f"{cmd} rejected: not accepting control commands (simulated)"
            )
        now = self.clock()
        arg = args[1] if len(args) > 1 else ""
        if cmd == "curtail":
            self.writes += 1
            if arg == "sleep":
                self.power.pause(now)
            elif arg == "wakeup":
                self.power.resume(now)
            else:
                return rpc_status("E", 14, f"curtail: unknown mode {arg!r}")
            return rpc_status("S", 337, f"Curtail {arg}")
        if cmd == "atmset":
            for kv in args[1:]:
                if kv.startswith("enabled="):
                    self.atm_enabled = kv.split("=", 1)[1] == "true"
                    self._atm_last_s = now
            return rpc_status("S", 340, "Advanced Thermal Management configuration updated")
        if self.atm_enabled:
            return rpc_status("E", 342, "Cannot set profile while ATM is enabled")
        if self._profile_watts(arg) is None:
            return rpc_status("E", 343, f"Profile {arg!r} not found")
        self.writes += 1
        self._apply_profile(arg)
        out = rpc_status("S", 331, "Profile set")
        out["PROFILE"] = [{"Profile": arg}]
        return out
