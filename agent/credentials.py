"""Miner credentials: loaded from a file outside the config, handed to drivers as values.

The file is TOML: per-firmware defaults under ``[firmware.<name>]`` and
per-miner entries under ``[miners."<device id or address>"]``, each with
``password`` (and ``username`` where the firmware has one)::

    [firmware.braiins]
    username = "root"
    password = "..."
    [firmware.whatsminer]
    password = "..."
    [miners."10.0.1.17"]
    password = "..."

It comes from ``inventory.credentials_file`` or, when that is not set, from the
systemd credential ``miner-credentials`` (``LoadCredential=``, found under
``$CREDENTIALS_DIRECTORY``). Like ssh with a private key, a file that group or
others may read is refused. Passwords are kept in ``domain.credentials.Secret``,
which never shows itself, so they reach no log, metric, API answer or exception.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siteagent.agent.config import ConfigError, ConfigProblem
from siteagent.domain.credentials import Login, Secret
from siteagent.drivers.backends import BACKENDS, LOGIN_BACKENDS

# The systemd credential's name (LoadCredential=miner-credentials:/etc/...).
SYSTEMD_CREDENTIAL = "miner-credentials"
NO_FILE_SOURCE = (
    "pyasic's default password (no credentials file: set inventory.credentials_file "
    f"or the systemd credential {SYSTEMD_CREDENTIAL})"
)


class CredentialsError(ConfigError):
    """A credentials file that cannot be used; names the file and every problem."""


@dataclass(frozen=True, slots=True)
class _Entry:
    username: str | None
    password: Secret | None
    section: str


@dataclass(frozen=True)
class MinerCredentials:
    """Every configured login: per-firmware defaults and per-miner entries."""

    source: str = NO_FILE_SOURCE
    firmware: Mapping[str, _Entry] = field(default_factory=dict)
    miners: Mapping[str, _Entry] = field(default_factory=dict)
    # Firmware -> Login for a miner without an entry of its own (shared by them all).
    _defaults: Mapping[str, Login] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        defaults = {fw: self._login(fw, None) for fw in LOGIN_BACKENDS}
        object.__setattr__(self, "_defaults", defaults)

    def _login(self, fw: str, own: _Entry | None) -> Login:
        base = self.firmware.get(fw)
        username = (own.username if own else None) or (base.username if base else None)
        password = (own.password if own else None) or (base.password if base else None)
        where = own if own is not None and own.password is not None else base
        if where is None or password is None:
            source = self.source if self.source == NO_FILE_SOURCE else f"{self.source} (none set)"
        else:
            source = f"{self.source} [{where.section}]"
        return Login(username=username, password=password, source=source)

    def for_miner(self, device_id: str | None, address: str) -> Mapping[str, Login]:
        """The login for each firmware of the miner ``device_id`` at ``address``: its own
        entry (by device id, else by address) over the firmware's default."""
        own = (self.miners.get(device_id) if device_id else None) or self.miners.get(address)
        if own is None:
            return self._defaults
        return {fw: self._login(fw, own) for fw in LOGIN_BACKENDS}


NO_CREDENTIALS = MinerCredentials()


def credentials_path(
    configured: str | Path | None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The file to read: the configured one, else the systemd credential if present."""
    if configured is not None:
        return Path(configured)
    env = os.environ if env is None else env
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        p = Path(directory) / SYSTEMD_CREDENTIAL
        if p.exists():
            return p
    return None


def load_credentials(
    configured: str | Path | None, env: Mapping[str, str] | None = None
) -> MinerCredentials:
    """Read the miner credentials file (see the module docstring); no file: pyasic's
    defaults. Raises CredentialsError naming the file and what to fix."""
    path = credentials_path(configured, env)
    if path is None:
        return NO_CREDENTIALS
    src = str(path)

    def fail(where: str, found: str, expected: str) -> CredentialsError:
        return CredentialsError(src, [ConfigProblem(where, found, expected)])

    try:
        st = path.stat()
    except OSError as e:
        raise fail("(file)", e.strerror or str(e), "a readable credentials file") from None
    if not stat.S_ISREG(st.st_mode):
        raise fail("(file)", "not a regular file", "a TOML file of miner credentials")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise fail(
            "(file mode)",
            f"{mode:04o} (group or others may read the passwords)",
            f"0600 or 0400, readable by the agent's user only: run chmod 600 {src}",
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise fail("(file)", e.strerror or str(e), "a readable credentials file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        # The parser's message quotes no value, only where it stopped.
        raise fail("(syntax)", str(e), "valid TOML") from None
    problems: list[ConfigProblem] = []
    firmware = _section(data, "firmware", problems)
    miners = _section(data, "miners", problems)
    for key in data:
        if key not in ("firmware", "miners"):
            problems.append(
                ConfigProblem(key, f"unknown key {key!r}", "only [firmware.<name>] and [miners]")
            )
    fw_entries: dict[str, _Entry] = {}
    for name, table in firmware.items():
        where = f"firmware.{name}"
        if name == "luxos":
            problems.append(
                ConfigProblem(
                    where,
                    "credentials for LuxOS",
                    "no [firmware.luxos] section: LuxOS's API logon takes no password",
                )
            )
            continue
        if name not in LOGIN_BACKENDS:
            problems.append(
                ConfigProblem(
                    where,
                    f"unknown firmware {name!r}",
                    f"one of {', '.join(LOGIN_BACKENDS)} (firmware drivers: {', '.join(BACKENDS)})",
                )
            )
            continue
        entry = _entry(table, where, LOGIN_BACKENDS[name], problems)
        if entry is not None:
            fw_entries[name] = entry
    miner_entries: dict[str, _Entry] = {}
    for key, table in miners.items():
        entry = _entry(table, f'miners."{key}"', True, problems)
        if entry is not None:
            miner_entries[key] = entry
    if problems:
        raise CredentialsError(src, problems)
    return MinerCredentials(source=src, firmware=fw_entries, miners=miner_entries)


def _section(data: Mapping[str, Any], key: str, problems: list[ConfigProblem]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(ConfigProblem(key, type(value).__name__, "a table"))
        return {}
    return value


def _entry(
    table: object, where: str, has_username: bool, problems: list[ConfigProblem]
) -> _Entry | None:
    """One section's credentials; the problems found go to ``problems`` (values unquoted)."""
    if not isinstance(table, dict):
        problems.append(ConfigProblem(where, type(table).__name__, "a table"))
        return None
    allowed = ("username", "password") if has_username else ("password",)
    ok = True
    for key in table:
        if key not in allowed:
            problems.append(
                ConfigProblem(
                    f"{where}.{key}", f"unknown key {key!r}", f"only {' and '.join(allowed)}"
                )
            )
            ok = False
    username, password = table.get("username"), table.get("password")
    if username is not None and (not isinstance(username, str) or not username):
        problems.append(ConfigProblem(f"{where}.username", "not a non-empty string", "a user name"))
        ok = False
    if password is not None and (not isinstance(password, str) or not password):
        # Never echo the value: it is a password.
        problems.append(ConfigProblem(f"{where}.password", "not a non-empty string", "a password"))
        ok = False
    if ok and username is None and password is None:
        problems.append(ConfigProblem(where, "an empty section", "password (and/or username)"))
        ok = False
    if not ok:
        return None
    return _Entry(username, Secret(password) if isinstance(password, str) else None, where)
