"""What the loop and the metrics need of run-time grid events, without knowing where they live.

The event book (``agent/api/events.py``, over the SQLite store) implements
``GridCaps``; the loop takes its caps in force into the effective cap and the
domain caps, and the metrics render its ``states``. Both read memory only:
the metrics read them from the scrape's thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GridEventState:
    """One event not yet over (cancelled ones left out), as the metrics show it."""

    event_id: str
    opted_in: bool
    in_force: bool
    start_unix_s: float
    target_w: float


class GridCaps(Protocol):
    """Caps from grid events at run time (demand response from the API or a VTN)."""

    def in_force(self, now_unix_s: float) -> Mapping[str, tuple[float, str]]:
        """Cap source -> (cap in W, domain id or 'site') of every event in force at a time."""
        ...

    def states(self, now_unix_s: float) -> Sequence[GridEventState]:
        """Every event not cancelled and not yet over at a time, soonest start first."""
        ...
