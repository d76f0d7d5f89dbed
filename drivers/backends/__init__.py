"""Firmware adapters, one module per firmware; ``select_backend`` picks one for a pyasic miner."""

from __future__ import annotations

from typing import Any

from pyasic.miners.backends.antminer import AntminerModern
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.miners.backends.btminer import BTMinerV2
from pyasic.miners.backends.luxminer import LUXMiner
from pyasic.miners.backends.vnish import VNish
from pyasic.miners.factory import MINER_CLASSES, MinerTypes

from drivers.backends.antminer import AntminerBackend
from drivers.backends.base import Backend
from drivers.backends.braiins import BraiinsBackend
from drivers.backends.luxos import LuxOSBackend
from drivers.backends.vnish import VNishBackend
from drivers.backends.whatsminer import WhatsminerBackend

__all__ = ["BACKENDS", "Backend", "known_backend", "select_backend"]

BACKENDS = ("braiins", "whatsminer", "luxos", "antminer", "vnish")


_TYPES = {
    "braiins": MinerTypes.BRAIINS_OS,
    "whatsminer": MinerTypes.WHATSMINER,
    "luxos": MinerTypes.LUX_OS,
    "antminer": MinerTypes.ANTMINER,
    "vnish": MinerTypes.VNISH,
}


def known_backend(address: str, backend: str, model: str | None) -> Backend | None:
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
            return select_backend(classes[k](address))
    return select_backend(classes[None](address))


def select_backend(miner: Any) -> Backend | None:
    """The adapter for a miner pyasic identified, or None for firmware we cannot drive."""
    if isinstance(miner, BOSer):
        return BraiinsBackend(miner)
    if isinstance(miner, BTMinerV2):
        return WhatsminerBackend(miner)
    if isinstance(miner, LUXMiner):
        return LuxOSBackend(miner)
    if isinstance(miner, VNish):
        return VNishBackend(miner)
    if isinstance(miner, AntminerModern):
        # Stock firmware only: pyasic's class for an unknown model is not modern.
        return AntminerBackend(miner)
    return None
