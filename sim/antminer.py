"""A simulated stock Antminer (Bitmain firmware): CGMiner-style API on 4028, CGI on 80.

Port 80 answers everything with HTTP digest authentication, realm ``antMiner
Configuration`` (user ``root``, password ``root`` unless set otherwise), as
the stock web UI does: ``GET /`` without credentials is a ``401`` with that
realm, which is how pyasic recognises stock firmware. The CGI pages are
``get_system_info`` (model, MAC, serial), ``get_miner_conf`` /
``set_miner_conf`` (pools and ``bitmain-work-mode`` / ``miner-mode``: 0 normal,
1 sleep, 3 low power), ``summary``, ``stats``, ``get_blink_status`` and
``get_network_info``. Port 4028 answers ``version`` (its ``Type`` names the
model), ``summary``, ``stats`` and ``pools``.

There is no watt target: power moves only by miner mode. A mode change
restarts mining (no hashing for ``restart_s``, then a ramp to the new level);
sleep stops hashing. Only some models report their power (``chain_power`` in
``stats``); the others publish none, as on many real units.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, ClassVar

from siteagent.sim.base import (
    IDLE_POWER_W,
    POOL_URL,
    POOL_USER,
    HttpRequest,
    HttpResponse,
    SimMinerBase,
    json_response,
)
from siteagent.sim.base import rpc_status as _status

REALM = "antMiner Configuration"
USERNAME = "root"
BMMINER_VERSION = "1.0.0"
COMPILE_TIME = "Thu Jan 11 10:44:43 CST 2024"
FS_VERSION = "Thu Jan 11 10:44:43 CST 2024"
# Low-power mode draws this share of normal (the simulator's own figure).
LOW_MODE_FRAC = 0.7
# Models whose stock firmware reports power (the simulator's own table).
REPORTS_POWER_MODELS = frozenset({"S21"})
MODE_NORMAL, MODE_SLEEP, MODE_LOW = 0, 1, 3


def _md5(s: str) -> str:
    return hashlib.md5(s.encode(), usedforsecurity=False).hexdigest()  # HTTP digest is MD5


def _parse_digest(header: str) -> dict[str, str]:
    if not header.lower().startswith("digest "):
        return {}
    out: dict[str, str] = {}
    for part in header[7:].split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return out


class SimAntminer(SimMinerBase):
    """One simulated Antminer on stock firmware."""

    BACKEND: ClassVar[str] = "antminer"
    PORTS: ClassVar[tuple[int, ...]] = (80, 4028)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", "SIMAM")
        kwargs.setdefault("password", "root")
        super().__init__(*args, **kwargs)
        self.nonce = secrets.token_hex(16)
        self.mode = MODE_NORMAL
        self.pools: list[dict[str, str]] = [{"url": POOL_URL, "user": POOL_USER, "pass": "x"}]
        self.writes = 0  # set_miner_conf calls executed (tests check no blind retries)

    # -- ground truth ----------------------------------------------------------------

    @property
    def reports_power(self) -> bool:
        """Whether this model's firmware publishes its power."""
        return self.model.key in REPORTS_POWER_MODELS

    @property
    def low_power_w(self) -> float:
        """What low-power mode draws (W)."""
        return float(round(self.model.nameplate_power_w * LOW_MODE_FRAC))

    @property
    def type_name(self) -> str:
        """The model as the firmware names it ("Antminer S19 XP")."""
        return f"Antminer {self.model.key}"

    def set_password(self, password: str) -> None:
        """Change the web password (root's) as the web UI does."""
        self.password = password

    # -- control ---------------------------------------------------------------------

    def apply_mode(self, mode: int, now_s: float) -> None:
        """Switch miner mode; leaving or changing a mining mode restarts mining."""
        if mode == self.mode:
            return
        self.mode = mode
        pw = self.power
        if mode == MODE_SLEEP:
            pw.pause(now_s)
            return
        target = self.low_power_w if mode == MODE_LOW else self.model.nameplate_power_w
        pw.restart(now_s, self.timing.restart_s, IDLE_POWER_W, target)

    # -- CGMiner-style API (4028) ----------------------------------------------------

    def _stats_rows(self, now: float) -> list[dict[str, Any]]:
        m, pw = self.model, self.power
        ghs = pw.hashrate_ths(now) * 1000.0
        chip = pw.chip_temp_c(now)
        rpm = self.fan_rpm(now)
        row: dict[str, Any] = {
            "STATS": 0,
            "ID": "BTM_SOC0",
            "Elapsed": max(0, int(now - pw.started_s)),
            "Calls": 0,
            "Wait": 0.0,
            "Max": 0.0,
            "Min": 99999999.0,
            "GHS 5s": round(ghs, 2),
            "GHS av": round(ghs, 2),
            "rate_30m": round(ghs, 2),
            "Mode": 2,
            "miner_count": m.hashboards,
            "frequency": 490,
            "fan_num": m.fans,
            "temp_num": m.hashboards,
            "total_rateideal": round(m.nameplate_hashrate_ths * 1000.0, 2),
            "rate_unit": "GH",
            "total_rate": round(ghs, 2),
            "total_acn": m.hashboards * m.chips_per_board,
            "miner_version": "uart_trans.1.3",
        }
        for i in range(1, m.fans + 1):
            row[f"fan{i}"] = rpm
        for i in range(1, m.hashboards + 1):
            c = round(chip)
            row[f"temp{i}"] = c - 15
            row[f"temp2_{i}"] = c - 10
            row[f"temp_pcb{i}"] = f"{c - 16}-{c - 15}-{c - 14}-{c - 15}"
            row[f"temp_chip{i}"] = f"{c - 3}-{c - 2}-{c}-{c - 1}"
            row[f"chain_acn{i}"] = m.chips_per_board
            row[f"chain_rate{i}"] = f"{ghs / m.hashboards:.2f}"
            row[f"chain_rateideal{i}"] = round(m.nameplate_hashrate_ths * 1000 / m.hashboards, 2)
        if self.reports_power:
            row["chain_power"] = f"{round(self.reported_power_w(now))} W"
        head = {
            "BMMiner": BMMINER_VERSION,
            "Miner": "uart_trans.1.3",
            "CompileTime": COMPILE_TIME,
            "Type": self.type_name,
        }
        return [head, row]

    def rpc_command(self, cmd: str, param: Any, req: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        ghs = self.power.hashrate_ths(now) * 1000.0
        if cmd == "version":
            out = _status("S", 22, "BMMiner versions", f"bmminer {BMMINER_VERSION}")
            out["VERSION"] = [
                {
                    "BMMiner": BMMINER_VERSION,
                    "API": "3.1",
                    "Miner": "uart_trans.1.3",
                    "CompileTime": COMPILE_TIME,
                    "Type": self.type_name,
                }
            ]
            return out
        if cmd == "summary":
            out = _status("S", 11, "Summary", f"bmminer {BMMINER_VERSION}")
            out["SUMMARY"] = [
                {
                    "Elapsed": max(0, int(now - self.power.started_s)),
                    "GHS 5s": round(ghs, 2),
                    "GHS av": round(ghs, 2),
                    "rate_30m": round(ghs, 2),
                    "Found Blocks": 0,
                    "Accepted": 0,
                    "Rejected": 0,
                    "Hardware Errors": 0,
                }
            ]
            return out
        if cmd == "stats":
            out = _status("S", 70, "BMMiner stats", f"bmminer {BMMINER_VERSION}")
            out["STATS"] = self._stats_rows(now)
            return out
        if cmd == "pools":
            out = _status("S", 7, f"{len(self.pools)} Pool(s)", f"bmminer {BMMINER_VERSION}")
            out["POOLS"] = [
                {
                    "POOL": i,
                    "URL": p["url"],
                    "Status": "Alive",
                    "Priority": i,
                    "Stratum Active": i == 0,
                    "User": p["user"],
                    "Accepted": 0,
                    "Rejected": 0,
                    "Stale": 0,
                    "Diff": "",
                }
                for i, p in enumerate(self.pools)
            ]
            return out
        return _status("E", 14, "Invalid command")

    # -- web (80): digest-authenticated CGI ------------------------------------------

    def _challenge(self) -> HttpResponse:
        header = f'Digest realm="{REALM}", nonce="{self.nonce}", qop="auth"'
        return HttpResponse(
            401,
            b"<html><body>401 Unauthorized</body></html>",
            (("Content-Type", "text/html"), ("WWW-Authenticate", header)),
        )

    def _authorised(self, req: HttpRequest) -> bool:
        d = _parse_digest(req.headers.get("authorization", ""))
        if not d or d.get("username") != USERNAME or d.get("nonce") != self.nonce:
            return False
        ha1 = _md5(f"{USERNAME}:{REALM}:{self.password}")
        ha2 = _md5(f"{req.method}:{d.get('uri', '')}")
        if d.get("qop"):
            want = _md5(f"{ha1}:{self.nonce}:{d.get('nc', '')}:{d.get('cnonce', '')}:auth:{ha2}")
        else:
            want = _md5(f"{ha1}:{self.nonce}:{ha2}")
        return secrets.compare_digest(want, d.get("response", ""))

    def http_request(self, req: HttpRequest) -> HttpResponse:
        if not self._authorised(req):
            return self._challenge()
        path = req.path.split("?", 1)[0]
        if not path.startswith("/cgi-bin/") or not path.endswith(".cgi"):
            return HttpResponse(404, b"not found", (("Content-Type", "text/plain"),))
        page = path[len("/cgi-bin/") : -len(".cgi")]
        now = self.clock()
        if page == "get_system_info":
            return json_response(
                {
                    "minertype": self.type_name,
                    "nettype": "DHCP",
                    "netdevice": "eth0",
                    "macaddr": self.mac,
                    "hostname": self.hostname,
                    "ipaddress": self.address,
                    "netmask": "255.0.0.0",
                    "gateway": "127.0.0.1",
                    "dnsservers": "127.0.0.53",
                    "system_mode": "GNU/Linux",
                    "system_kernel_version": "Linux 4.9.113 #1 SMP PREEMPT",
                    "system_filesystem_version": FS_VERSION,
                    "firmware_type": "Release",
                    "serinum": self.serial,
                }
            )
        if page == "get_network_info":
            return json_response(
                {
                    "nettype": "DHCP",
                    "netdevice": "eth0",
                    "macaddr": self.mac,
                    "ipaddress": self.address,
                    "netmask": "255.0.0.0",
                    "conf_nettype": "DHCP",
                    "conf_hostname": self.hostname,
                    "conf_ipaddress": "",
                    "conf_netmask": "",
                    "conf_gateway": "",
                    "conf_dnsservers": "",
                }
            )
        if page == "get_miner_conf":
            return json_response(
                {
                    "pools": self.pools,
                    "api-listen": True,
                    "api-network": True,
                    "api-groups": "A:stats:pools:devs:summary:version",
                    "api-allow": "A:0/0,W:*",
                    "bitmain-fan-ctrl": False,
                    "bitmain-fan-pwm": "100",
                    "bitmain-use-vil": True,
                    "bitmain-freq": "",
                    "bitmain-voltage": "1400",
                    "bitmain-ccdelay": "0",
                    "bitmain-pwth": "0",
                    "bitmain-work-mode": str(self.mode),
                    "bitmain-freq-level": "100",
                }
            )
        if page == "set_miner_conf":
            return json_response(self._set_conf(req.body, now))
        if page == "get_blink_status":
            return json_response({"blink": False})
        if page == "summary":
            ghs = self.power.hashrate_ths(now) * 1000.0
            return json_response(
                {
                    "STATUS": {"STATUS": "S", "when": 0, "Msg": "summary", "api_version": "1.0.0"},
                    "INFO": {"miner_version": "uart_trans.1.3", "type": self.type_name},
                    "SUMMARY": [
                        {
                            "elapsed": max(0, int(now - self.power.started_s)),
                            "rate_5s": round(ghs, 2),
                            "rate_avg": round(ghs, 2),
                            "rate_unit": "GH/s",
                            "status": [
                                {"type": "rate", "status": "s", "code": 0, "msg": ""},
                                {"type": "network", "status": "s", "code": 0, "msg": ""},
                                {"type": "fans", "status": "s", "code": 0, "msg": ""},
                                {"type": "temp", "status": "s", "code": 0, "msg": ""},
                            ],
                        }
                    ],
                }
            )
        if page == "stats":
            return json_response({"STATUS": {"STATUS": "S"}, "STATS": [{"chain": []}]})
        return HttpResponse(404, b"not found", (("Content-Type", "text/plain"),))

    def _set_conf(self, body: bytes, now_s: float) -> dict[str, Any]:
        try:
            conf = json.loads(body or b"{}")
            if not isinstance(conf, dict):
                raise TypeError("not an object")
            mode = int(conf.get("miner-mode", self.mode))
        except (ValueError, TypeError):
            return {"stats": "error", "code": "M001", "msg": "invalid configuration"}
        if self.refuse_commands():
            return {
                "stats": "error",
                "code": "M002",
                "msg": "set_miner_conf rejected: not accepting control commands (simulated)",
            }
        if mode not in (MODE_NORMAL, MODE_SLEEP, MODE_LOW):
            return {"stats": "error", "code": "M001", "msg": f"invalid miner-mode {mode}"}
        pools = conf.get("pools")
        if isinstance(pools, list):
            kept = [
                {
                    "url": str(p.get("url", "")),
                    "user": str(p.get("user", "")),
                    "pass": str(p.get("pass", "")),
                }
                for p in pools
                if isinstance(p, dict) and p.get("url")
            ]
            if kept:
                self.pools = kept
        self.writes += 1
        self.apply_mode(mode, now_s)
        return {"stats": "success", "code": "M000", "msg": "OK!"}
