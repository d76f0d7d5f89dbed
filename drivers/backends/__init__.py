"""Firmware adapters, one module per firmware; ``select_backend`` picks one for a pyasic miner."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyasic.miners.backends.antminer import AntminerModern
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.miners.backends.btminer import BTMinerV2
from pyasic.miners.backends.luxminer import LUXMiner
from pyasic.miners.backends.vnish import VNish
from pyasic.miners.factory import MINER_CLASSES, MinerTypes

from siteagent.domain.credentials import Login
from siteagent.drivers.backends.antminer import AntminerBackend
from siteagent.drivers.backends.base import Backend
from siteagent.drivers.backends.braiins import BraiinsBackend
from siteagent.drivers.backends.luxos import LuxOSBackend
from siteagent.drivers.backends.vnish import VNishBackend
from siteagent.drivers.backends.whatsminer import WhatsminerBackend

__all__ = ["BACKENDS", "LOGIN_BACKENDS", "Backend", "known_backend", "select_backend"]

BACKENDS = ("braiins", "whatsminer", "luxos", "antminer", "vnish")
# Firmware whose API takes a password, and whether it also takes a user name. LuxOS
# is not here: its API's ``logon`` carries no password (pyasic 0.79 and Luxor's own
# luxos tooling send a bare ``logon``); the session is its only gate.
LOGIN_BACKENDS: dict[str, bool] = {
    "braiins": True,  # gRPC Login (user, password)
    "antminer": True,  # web digest auth (user, password)
    "vnish": False,  # web ``unlock`` with the password
    "whatsminer": False,  # the admin password behind the write token
}


_TYPES = {
    "braiins": MinerTypes.BRAIINS_OS,
    "whatsminer": MinerTypes.WHATSMINER,
    "luxos": MinerTypes.LUX_OS,
    "antminer": MinerTypes.ANTMINER,
    "vnish": MinerTypes.VNISH,
}


def known_backend(
    address: str,
    backend: str,
    model: str | None,
    logins: Mapping[str, Login] | None = None,
) -> Backend | None:
    """The adapter for a miner whose firmware and model are already known (no probes).

    pyasic's ``get_miner`` costs two racing probes and a model query; a miner the
    inventory already identified is rebuilt from pyasic's class table instead.
    """
    mtype = _TYPES.get(backend)
    if mtype is None:
        return None
    classes = MINER_CLASSES[mtype]
    key = (model or "").upper()
    for k in (key, key.replace(" ", ""), f"ANTMINER {key}", f"BITMAIN {key}"):
        if k and k in classes:
            return select_backend(classes[k](address), logins)
    return select_backend(classes[None](address), logins)


def backend_name(miner: Any) -> str | None:
    """Which adapter drives a miner pyasic made, or None for firmware we cannot drive."""
    if isinstance(miner, BOSer):
        return "braiins"
    if isinstance(miner, BTMinerV2):
        return "whatsminer"
    if isinstance(miner, LUXMiner):
        return "luxos"
    if isinstance(miner, VNish):
        return "vnish"
    if isinstance(miner, AntminerModern):
        # Stock firmware only: pyasic's class for an unknown model is not modern.
        return "antminer"
    return None


def use_login(miner: Any, name: str, login: Login | None) -> None:
    """Give pyasic's clients of ``miner`` (firmware ``name``) the configured credentials.

    Through the clients' public attributes (``web.username`` / ``web.pwd``,
    ``rpc.pwd``), before the adapter is built: the Braiins OS and VNish adapters
    copy them into their kept-connection clients when they are made.
    """
    if login is None or name not in LOGIN_BACKENDS:
        return
    password = login.password.reveal() if login.password is not None else None
    if name == "whatsminer":
        if password is not None:
            miner.rpc.pwd = password
        return
    if login.username is not None and LOGIN_BACKENDS[name]:
        miner.web.username = login.username
    if password is not None:
        miner.web.pwd = password


_ADAPTERS: dict[str, Any] = {
    "braiins": BraiinsBackend,
    "whatsminer": WhatsminerBackend,
    "luxos": LuxOSBackend,
    "vnish": VNishBackend,
    "antminer": AntminerBackend,
}


def select_backend(miner: Any, logins: Mapping[str, Login] | None = None) -> Backend | None:
    """The adapter for a miner pyasic identified, or None for firmware we cannot drive;
    ``logins`` (by firmware) replace pyasic's default credentials."""
    name = backend_name(miner)
    if name is None:
        return None
    use_login(miner, name, (logins or {}).get(name))
    adapter: Backend = _ADAPTERS[name](miner)
    return adapter
