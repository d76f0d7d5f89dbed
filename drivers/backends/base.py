"""What every firmware adapter provides: its protocol, its table of fields, one reader.

An adapter (one module per firmware) is the thin vendor level of STYLE.md: it
says what to read (a table of ``Field``s, fast and slow) and what it means,
names quantities, converts units and says what the device can do; how to talk
is ``drivers.transport``'s. ``drivers.asic.AsicDriver`` is the level above: deadlines, clamping,
write-only-on-change and the re-read-before-retry rule, the same for all.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from siteagent.domain.errors import DeviceError, DeviceFaulted
from siteagent.domain.types import DeviceControls, DeviceIdentity, DeviceState

# How the adapters talk (and how those failures are named) lives in drivers.transport;
# these names stay here for the adapters and tests that import them from base.
from siteagent.drivers.transport.http import translate_http
from siteagent.drivers.transport.rpc import no_answer, translate_rpc
from siteagent.drivers.transport.rules import KEPT_CONNECTIONS, KeepBudget

__all__ = [
    "KEPT_CONNECTIONS",
    "Backend",
    "Behaviour",
    "Field",
    "FieldReader",
    "Fields",
    "KeepBudget",
    "Moved",
    "Sample",
    "level_capabilities",
    "no_answer",
    "translate_http",
    "translate_rpc",
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading as an adapter returns it (SI units), before the driver stamps it."""

    power_w: float | None
    state: DeviceState
    hashrate_ths: float | None = None
    temperature_c: float | None = None
    power_target_w: float | None = None
    power_estimated: bool = False
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a firmware reacts to control, for the agent's settle accounting (s)."""

    # A power-target change restarts the mining service (hashrate drops to zero
    # for ``restart_s`` before ramping to the new level).
    target_change_restarts: bool = False
    restart_s: float = 0.0
    settle_s: float = 20.0
    wake_s: float = 10.0
    # Every reading logs in with the configured credentials (Braiins OS gRPC, VNish
    # web), so a good reading proves they are accepted.
    reads_log_in: bool = False
    # Identification reads what control needs besides the identity (LuxOS profiles,
    # VNish presets and units), so an identity handed over does not replace it.
    identify_keeps_state: bool = False


class Backend(Protocol):
    """One firmware's adapter for one miner."""

    name: str
    behaviour: Behaviour
    fields: FieldReader  # its table of fields, read fast every time and slow every Nth

    async def identify(self) -> DeviceIdentity: ...

    async def read(self) -> Sample: ...

    async def set_power_target(self, watt: int) -> float: ...

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError: ...


def level_capabilities(watts: Sequence[float], default_w: float) -> DeviceControls:
    """What firmware with discrete power levels (LuxOS profiles, VNish presets) lets us
    set, ``watts`` lowest first: a target from the lowest level to the highest, stepped
    by the smallest gap so that every stepped target is at or above a real level."""
    gaps = [b - a for a, b in itertools.pairwise(watts) if b > a]
    return DeviceControls(
        power_target=True,
        power_target_min_w=watts[0],
        power_target_max_w=watts[-1],
        power_target_default_w=default_w,
        power_target_step_w=min(gaps) if gaps else 1.0,
        can_sleep=True,
        reports_power=True,
    )


# -- a reading as a table of fields: fast ones every time, slow ones every Nth ---------


@dataclass(frozen=True, slots=True)
class Field:
    """One value a reading carries: the request it comes from and how it is read there.

    A fast field is read every reading; a slow one (a target, a mode, a temperature
    the loop needs only now and then) on the miner's phase of every ``Fields.every``
    readings, and whenever a watched fast value moved (``Moved``) or a write made it
    stale. ``parse`` takes the reply of ``source`` and raises (``LookupError``,
    ``TypeError``, ``ValueError``, ``AttributeError`` or a ``DeviceError``) on one
    it cannot read.
    """

    name: str
    source: str
    parse: Callable[[Any], Any]
    slow: bool = False


@dataclass(frozen=True, slots=True)
class Moved:
    """A fast field whose move since the slow fields were read makes them stale.

    ``frac`` None: any change. Otherwise a move by more than ``frac`` of
    ``max(value then, floor)``, a value appearing or vanishing (None), and with
    ``zero`` a value starting or stopping (crossing 0, as a hashrate).
    """

    name: str
    frac: float | None = None
    floor: float = 1.0
    zero: bool = False

    def moved(self, then: Any, now: Any) -> bool:
        """Whether ``now`` is far enough from ``then``."""
        if self.frac is None:
            return bool(then != now)
        if then is None or now is None:
            return (then is None) != (now is None)
        if self.zero and (then > 0) != (now > 0):
            return True
        return bool(abs(now - then) > self.frac * max(then, self.floor))


@dataclass(frozen=True, slots=True)
class Fields:
    """One firmware's table: its fields, the fast values watched, the slow period."""

    fields: tuple[Field, ...]
    watch: tuple[Moved, ...] = ()
    every: int = 12
    fast: tuple[Field, ...] = field(init=False)
    slow: tuple[Field, ...] = field(init=False)
    fast_sources: tuple[str, ...] = field(init=False)
    slow_sources: tuple[str, ...] = field(init=False)
    # Each reader of this table takes the next phase, so one firmware's miners made one
    # after another (an inventory loaded in order) spread their slow reads evenly over
    # the ``every`` readings, whatever other firmware sits between them.
    phases: Iterator[int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", itertools.count())
        fast = tuple(f for f in self.fields if not f.slow)
        slow = tuple(f for f in self.fields if f.slow)
        object.__setattr__(self, "fast", fast)
        object.__setattr__(self, "slow", slow)
        object.__setattr__(self, "fast_sources", tuple(dict.fromkeys(f.source for f in fast)))
        object.__setattr__(self, "slow_sources", tuple(dict.fromkeys(f.source for f in slow)))


Fetch = Callable[[tuple[str, ...]], Awaitable[Mapping[str, Any]]]


class FieldReader:
    """One miner's reading of a ``Fields`` table: fast fields every time, slow ones on
    the miner's own phase of every ``every`` readings (so no sweep carries all the
    miners' slow reads), and whenever they may have moved.

    Slow fields are read on the first reading, after ``forget`` (a write), when
    ``also`` says so (a restart the adapter saw), when a watched fast value moved
    since they were read, and on reading ``k`` where ``k % every == phase``: once
    in every ``every`` readings, never older than that. A write that can move only
    some of them (a target, not the status) forgets only their sources: the next
    reading asks for those alone, unless all are due anyway.
    """

    __slots__ = ("_forgot", "_reads", "_seen", "_slow", "address", "phase", "table")

    def __init__(self, table: Fields, address: str, phase: int | None = None) -> None:
        self.table = table
        self.address = address
        self.phase = (next(table.phases) if phase is None else phase) % table.every
        self._reads = 0  # readings made so far
        self._slow: dict[str, Any] | None = None  # the slow fields as last read
        self._seen: tuple[Any, ...] = ()  # the watched fast values then
        self._forgot: tuple[str, ...] = ()  # slow sources to read again, the others kept

    def forget(self, *sources: str) -> None:
        """The slow fields may have changed (a write): read them with the next reading;
        with ``sources``, only the fields of those (what the write can move)."""
        unknown = set(sources) - set(self.table.slow_sources)
        if unknown:
            raise ValueError(f"not a slow source of this table: {sorted(unknown)}")
        if not sources:
            self._slow = None
        elif self._slow is not None:
            self._forgot = tuple(dict.fromkeys((*self._forgot, *sources)))

    def _parse(self, fields: tuple[Field, ...], replies: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return {f.name: f.parse(replies[f.source]) for f in fields}
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: read: missing or malformed field: {e!r}") from e

    def _stale(self, values: Mapping[str, Any]) -> bool:
        if self._slow is None or self._reads % self.table.every == self.phase:
            return True
        return any(
            w.moved(then, values[w.name])
            for w, then in zip(self.table.watch, self._seen, strict=True)
        )

    async def read(
        self, fetch: Fetch, also: Callable[[Mapping[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Every field by name: ``fetch(sources)`` gives the replies by source, once for
        the fast sources and, when the slow fields are due, once for the slow ones."""
        table = self.table
        values = self._parse(table.fast, await fetch(table.fast_sources))
        if table.slow and ((also is not None and also(values)) or self._stale(values)):
            self._slow = self._parse(table.slow, await fetch(table.slow_sources))
            self._seen = tuple(values[w.name] for w in table.watch)
            self._forgot = ()
        elif self._forgot and self._slow is not None:
            forgot = self._forgot
            fields = tuple(f for f in table.slow if f.source in forgot)
            self._slow = {**self._slow, **self._parse(fields, await fetch(forgot))}
            self._forgot = ()
        self._reads += 1
        if self._slow:
            values.update(self._slow)
        return values
