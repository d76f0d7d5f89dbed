"""A simulated Whatsminer (MicroBT, btminer, API V2) on TCP 4028.

Reads are plain CGMiner-style JSON (``summary``, ``status``, ``devdetails``,
``get_version``, ``get_miner_info`` ...). Writes go through the V2 privileged
path as the real firmware does it: ``get_token`` hands out ``salt``,
``newsalt`` and ``time``; the client derives ``host_passwd_md5`` (md5-crypt of
the admin password with ``salt``) and ``host_sign`` (md5-crypt of that plus
``time`` with ``newsalt``) and sends ``{"enc": 1, "data": AES-ECB(json)}`` keyed
by SHA-256 of ``host_passwd_md5``. This server decrypts with its own admin
password, checks the sign, and answers encrypted. A wrong password cannot
decrypt, and is answered ``check token err`` like the firmware.

``adjust_power_limit`` restarts the mining service (no hashing for
``restart_s``, then a ramp to the new limit); ``power_off`` / ``power_on`` stop
and start hashing. Firmware dated before 2024-11 so pyasic takes the V2 path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
from typing import Any, ClassVar

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from passlib.hash import md5_crypt  # type: ignore[import-untyped]

from siteagent.sim.base import IDLE_POWER_W, SimMinerBase, pools_reply, rpc_status

FW_VERSION = "20230911.12.Rel"
API_VERSION = "2.0.5"
TOKEN_LIFETIME_S = 1800.0 + 60.0  # pyasic reuses a token for 30 minutes
_SALT_CHARS = string.ascii_letters + string.digits


def _crypt(word: str, salt: str) -> str:
    """The hash part of md5-crypt(word, salt): what btminer calls the derived secret."""
    return str(md5_crypt.using(salt=salt).hash(word)).split("$")[3]


def _aes(secret_md5: str) -> Cipher[modes.ECB]:
    key = hashlib.sha256(secret_md5.encode()).digest()
    return Cipher(algorithms.AES(key), modes.ECB())


def _ok(code: int = 131, msg: Any = "API command OK") -> dict[str, Any]:
    return {"STATUS": "S", "When": 0, "Code": code, "Msg": msg, "Description": ""}


def _err(code: int, msg: str) -> dict[str, Any]:
    return {"STATUS": "E", "When": 0, "Code": code, "Msg": msg, "Description": ""}


class SimWhatsminer(SimMinerBase):
    """One simulated Whatsminer (btminer API V2)."""

    BACKEND: ClassVar[str] = "whatsminer"
    PORTS: ClassVar[tuple[int, ...]] = (4028,)
    RPC_TRAILER: ClassVar[bytes] = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", "SIMWM")
        super().__init__(*args, **kwargs)
        self.salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(8))
        self._passwd_md5 = _crypt(self.password, self.salt)
        self._signs: dict[str, float] = {}  # host_sign -> expiry (clock s)
        self._token_n = 0
        self.writes = 0  # privileged commands executed (tests check no blind retries)

    def set_password(self, password: str) -> None:
        """Change the admin password (as the Whatsminer tool does); old tokens die."""
        self.password = password
        self._passwd_md5 = _crypt(password, self.salt)
        self._signs.clear()

    # -- reads -----------------------------------------------------------------------

    def rpc_request(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("enc") is not None:
            return self._privileged(req)
        return super().rpc_request(req)

    def rpc_command(self, cmd: str, param: Any, req: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        m, pw = self.model, self.power
        ths = pw.hashrate_ths(now)
        mhs = ths * 1e6
        chip = round(pw.chip_temp_c(now), 1)
        if cmd == "get_version":
            return _ok(
                131,
                {"api_ver": API_VERSION, "fw_ver": FW_VERSION, "platform": "H6OS", "chip": "K"},
            )
        if cmd == "devdetails":
            out = rpc_status("S", 69, "Device Details")
            out["DEVDETAILS"] = [
                {
                    "DEVDETAILS": i,
                    "Name": "SM",
                    "ID": i,
                    "Driver": "bitmicro",
                    "Kernel": "",
                    "Model": m.devdetails_model,
                }
                for i in range(m.hashboards)
            ]
            return out
        if cmd == "summary":
            out = rpc_status("S", 11, "Summary")
            rpm = self.fan_rpm(now)
            out["SUMMARY"] = [
                {
                    "Elapsed": max(0, int(now - pw.started_s)),
                    "MHS av": mhs,
                    "MHS 5s": mhs,
                    "MHS 1m": mhs,
                    "MHS 5m": mhs,
                    "MHS 15m": mhs,
                    "Temperature": chip,
                    "Chip Temp Max": chip,
                    "Env Temp": 25.0,
                    "Fan Speed In": rpm,
                    "Fan Speed Out": rpm,
                    "Power": round(self.reported_power_w(now)),
                    "Power Limit": int(pw.target_w),
                    "Power Mode": "Normal",
                    "Factory GHS": int(m.nameplate_hashrate_ths * 1000),
                    "Power Fanspeed": 3000,
                    "Error Code Count": 0,
                    "MAC": self.mac,
                    "Firmware Version": f"'{FW_VERSION}'",
                }
            ]
            return out
        if cmd == "status":
            return _ok(
                131,
                {
                    "mineroff": "true" if pw.paused else "false",
                    "mineroff_reason": "",
                    "mineroff_time": "",
                    "FirmwareVersion": f"'{FW_VERSION}'",
                    "power_mode": "",
                    "hash_percent": "",
                },
            )
        if cmd == "get_miner_info":
            return _ok(
                131,
                {
                    "ip": self.address,
                    "proto": "dhcp",
                    "netmask": "255.0.0.0",
                    "dns": "127.0.0.53",
                    "mac": self.mac,
                    "ledstat": "auto",
                    "gateway": "127.0.0.1",
                    "hostname": self.hostname,
                    "minersn": self.serial,
                },
            )
        if cmd == "devs":
            out = rpc_status("S", 9, f"{m.hashboards} ASC(s)")
            out["DEVS"] = [
                {
                    "ASC": i,
                    "Slot": i,
                    "Enabled": "Y",
                    "Status": "Alive",
                    "Temperature": round(chip - 10, 1),
                    "Chip Temp Avg": chip,
                    "MHS 1m": mhs / m.hashboards,
                    "Effective Chips": m.chips_per_board,
                    "PCB SN": f"{self.serial}-HB{i}",
                }
                for i in range(m.hashboards)
            ]
            return out
        if cmd == "pools":
            return pools_reply()
        if cmd == "get_psu":
            return _ok(131, {"name": "P221B", "fan_speed": "3000", "vin": "230"})
        if cmd == "get_error_code":
            return _ok(131, {"error_code": []})
        if cmd == "get_token":
            return _ok(134, self._issue_token(now))
        return _err(14, "invalid cmd")

    # -- privileged (encrypted) writes -----------------------------------------------

    def _issue_token(self, now_s: float) -> dict[str, str]:
        self._token_n += 1
        t = f"{self._token_n % 10000:04d}"
        newsalt = "".join(secrets.choice(_SALT_CHARS) for _ in range(8))
        sign = _crypt(self._passwd_md5 + t, newsalt)
        self._signs = {s: exp for s, exp in self._signs.items() if exp > now_s}
        self._signs[sign] = now_s + TOKEN_LIFETIME_S
        return {"time": t, "salt": self.salt, "newsalt": newsalt}

    def _encrypt(self, reply: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(reply).encode()
        data += b"\0" * (-len(data) % 16)
        enc = _aes(self._passwd_md5).encryptor()
        return {"enc": base64.b64encode(enc.update(data) + enc.finalize()).decode()}

    def _privileged(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            dec = _aes(self._passwd_md5).decryptor()
            raw = dec.update(base64.b64decode(str(req["data"]))) + dec.finalize()
            cmd = json.loads(raw.rstrip(b"\0").decode())
            if not isinstance(cmd, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            # Wrong admin password: the client's key cannot produce our plaintext.
            return _err(135, "check token err")
        now = self.clock()
        if self._signs.get(str(cmd.get("token")), 0.0) <= now:
            return _err(135, "check token err")
        return self._encrypt(self._execute(str(cmd.get("cmd")), cmd, now))

    def _execute(self, name: str, cmd: dict[str, Any], now_s: float) -> dict[str, Any]:
        if name not in ("power_off", "power_on", "adjust_power_limit"):
            return _err(14, "invalid cmd")
        if self.refuse_commands():
            return _err(132, f"{name} rejected: not accepting control commands (simulated)")
        pw, m = self.power, self.model
        self.writes += 1
        if name == "power_off":
            pw.pause(now_s)
        elif name == "power_on":
            pw.resume(now_s)
        else:
            try:
                limit = int(str(cmd.get("power_limit")))
            except ValueError:
                return _err(14, "invalid power_limit")
            lo, hi = int(m.power_target_min_w), int(m.power_target_max_w)
            if not lo <= limit <= hi:
                return _err(14, f"power_limit {limit} out of range [{lo}, {hi}]")
            if pw.paused:
                pw.target_w = float(limit)  # applies at the next power_on
            else:
                # The mining service restarts to apply a new limit.
                pw.restart(now_s, self.timing.restart_s, IDLE_POWER_W, float(limit))
        return _ok()
