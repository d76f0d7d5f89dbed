"""Nameplate figures per model, shipped as data (stock firmware, approximate).

Sources: DOMAIN_FACTS.md. Used for worst-case accounting and, for firmware that
reports no power (stock Antminer on many models), as the basis of an estimate.
The simulator keeps its own table on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Nameplate:
    """One model's stock figures: power (W), hashrate (TH/s)."""

    power_w: float
    hashrate_ths: float
    # Stock Antminer "low power" miner mode draws about this share of normal.
    low_mode_frac: float = 0.7


# Keys are pyasic's model names (``miner.raw_model``), upper-cased for lookup.
_TABLE: dict[str, Nameplate] = {
    "S19J PRO": Nameplate(3068.0, 104.0),
    "S19 XP": Nameplate(3010.0, 140.0),
    "S21": Nameplate(3500.0, 200.0),
    "S21 PRO": Nameplate(3510.0, 234.0),
    "M30S++": Nameplate(3472.0, 112.0),
    "M50S": Nameplate(3276.0, 126.0),
    "M60S": Nameplate(3441.0, 186.0),
}
NAMEPLATE: Mapping[str, Nameplate] = _TABLE


# Whatsminer models carry a chip-bin suffix (M30S++VE40, M50SVH50): match the family.
def _norm(model: str) -> str:
    return model.upper().replace(" ", "").replace("_", "")


_NORM = {_norm(k): v for k, v in _TABLE.items()}
_FAMILIES = sorted(_NORM, key=len, reverse=True)


def lookup(model: str | None) -> Nameplate | None:
    """The nameplate of ``model`` (pyasic's name; a Whatsminer bin suffix is ignored)."""
    if not model:
        return None
    key = _norm(model)
    if key in _NORM:
        return _NORM[key]
    for fam in _FAMILIES:
        if key.startswith(fam) and key[len(fam) : len(fam) + 1] == "V":
            return _NORM[fam]
    return None
