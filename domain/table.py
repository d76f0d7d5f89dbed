"""A snapshot's devices as columns, for plans over tens of thousands of devices.

Reading 50,000 ``DeviceStatus`` objects into arrays costs more than planning
with the arrays, and most of what a plan reads does not change from one tick
to the next. So a snapshot may carry its devices as a ``DeviceTable`` too: row
``i`` is ``snapshot.devices[i]``. The part that rarely changes (ids, kinds,
domains, capabilities, nameplates) is a separate ``DeviceStatics`` that the
producer hands on unchanged, the very same object, for as long as none of it
changes, so a consumer that derived something from it can keep that while
``statics is last_statics``.

The arrays are read-only (``writeable`` is off). Missing numbers are NaN; the
awake flag is 1 (awake), 0 (asleep) or -1 (unknown); states and kinds are
indices into ``STATES`` and ``KINDS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter, is_

import numpy as np
import numpy.typing as npt

from siteagent.domain.site import domain_codes
from siteagent.domain.types import (
    DeviceControls,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    RowsOnDemand,
)

FloatArr = npt.NDArray[np.float64]
BoolArr = npt.NDArray[np.bool_]
CodeArr = npt.NDArray[np.int8]

STATES: tuple[DeviceState, ...] = tuple(DeviceState)
KINDS: tuple[DeviceKind, ...] = tuple(DeviceKind)
STATE_CODE = {s: i for i, s in enumerate(STATES)}
KIND_CODE = {k: i for i, k in enumerate(KINDS)}
AWAKE_CODE = {True: 1, False: 0, None: -1}


def floats(values: Sequence[float | None]) -> FloatArr:
    """A read-only float column of ``values``; None becomes NaN."""
    out = np.array(values, np.float64)  # None becomes NaN
    out.flags.writeable = False
    return out


def codes(values: Sequence[int]) -> CodeArr:
    """A read-only column of small integer codes."""
    out = np.array(values, np.int8)
    out.flags.writeable = False
    return out


def flags(values: Sequence[bool]) -> BoolArr:
    """A read-only boolean column."""
    out = np.array(values, np.bool_)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, slots=True, eq=False)
class ControlColumns:
    """``DeviceControls`` as columns, one entry per device (W; NaN for none)."""

    power_target: BoolArr
    power_target_min_w: FloatArr
    power_target_max_w: FloatArr
    power_target_step_w: FloatArr
    can_sleep: BoolArr


@dataclass(frozen=True, eq=False)
class DeviceStatics:
    """What a snapshot's devices have that rarely changes, one entry per device.

    Compared by identity: a producer passes on the same object while nothing in
    it changes, and makes a new one when anything does. What is derived from it
    (``rows``, ``domain_codes``, ``power_target``) is worked out once per object.
    """

    ids: tuple[str, ...]
    kinds: tuple[DeviceKind, ...]
    domains: tuple[str, ...]
    capabilities: tuple[DeviceControls, ...]
    nameplate_power_w: FloatArr
    nameplate_hashrate_ths: FloatArr
    sleep_power_w: FloatArr

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def rows(self) -> dict[str, int]:
        """Each device id's row."""
        return {d: i for i, d in enumerate(self.ids)}

    @cached_property
    def domain_codes(self) -> tuple[tuple[str, ...], npt.NDArray[np.intp]]:
        """The distinct domains (first seen first), and each row's index into them."""
        return domain_codes(self.domains)

    @cached_property
    def power_target(self) -> BoolArr:
        """Per row: whether the device takes a power target (W)."""
        return flags([c.power_target for c in self.capabilities])

    @cached_property
    def kind_codes(self) -> CodeArr:
        """Per row: the kind, as an index into ``KINDS``."""
        return codes([KIND_CODE[k] for k in self.kinds])

    @cached_property
    def id_array(self) -> npt.NDArray[np.object_]:
        """The ids as an object array, so a plan picks many by rows without a Python loop."""
        out = np.empty(len(self.ids), object)
        out[:] = self.ids
        return out

    @cached_property
    def id_rank(self) -> npt.NDArray[np.intp]:
        """Per row: the place of its id among all ids sorted (a fixed tie-break)."""
        rank = np.empty(len(self.ids), np.intp)
        rank[np.argsort(np.array(self.ids, dtype=str), kind="stable")] = np.arange(len(self.ids))
        return rank

    @cached_property
    def controls(self) -> ControlColumns:
        """The capabilities as columns."""
        caps = self.capabilities
        return ControlColumns(
            power_target=self.power_target,
            power_target_min_w=floats([c.power_target_min_w for c in caps]),
            power_target_max_w=floats([c.power_target_max_w for c in caps]),
            power_target_step_w=floats([c.power_target_step_w for c in caps]),
            can_sleep=flags([c.can_sleep for c in caps]),
        )

    @classmethod
    def of(
        cls, devices: Sequence[DeviceStatus], reuse: DeviceStatics | None = None
    ) -> DeviceStatics:
        """The statics of ``devices``; ``reuse`` itself when it holds the same values
        and the very same (immutable) capability objects."""
        ids = tuple(map(_ID, devices))
        kinds = tuple(map(_KIND, devices))
        domains = tuple(map(_DOMAIN, devices))
        caps = tuple(map(_CAPS, devices))
        nameplate = list(map(_NAMEPLATE, devices))
        hashrate = list(map(_HASHRATE, devices))
        sleep = list(map(_SLEEP, devices))
        if (
            reuse is not None
            and reuse.ids == ids
            and reuse.kinds == kinds
            and reuse.domains == domains
            and len(reuse.capabilities) == len(caps)
            and all(map(is_, reuse.capabilities, caps))
            and reuse.nameplate_power_w.tolist() == nameplate
            and reuse.nameplate_hashrate_ths.tolist() == hashrate
            and reuse.sleep_power_w.tolist() == sleep
        ):
            return reuse
        return cls(ids, kinds, domains, caps, floats(nameplate), floats(hashrate), floats(sleep))


@dataclass(frozen=True, slots=True, eq=False)
class DeviceTable:
    """A snapshot's devices as columns (row ``i`` is the snapshot's ``devices[i]``)."""

    statics: DeviceStatics
    state: CodeArr  # index into STATES
    budget_w: FloatArr
    expected_w: FloatArr
    controllable: BoolArr
    awake: CodeArr  # 1 awake, 0 asleep, -1 unknown
    power_target_w: FloatArr
    last_transition_s: FloatArr
    wakes_last_hour: FloatArr
    utilization_frac: FloatArr  # from the last good reading
    reading_age_s: FloatArr
    power_w: FloatArr  # the last good reading's draw (W)
    # The inference server's demand (fraction of peak) with the last good reading; None:
    # no column (every row unread).
    demand_frac: FloatArr | None = None

    def __len__(self) -> int:
        return len(self.statics)

    @classmethod
    def of(cls, devices: Sequence[DeviceStatus], reuse: DeviceStatics | None = None) -> DeviceTable:
        """The columns of ``devices``; their statics are ``reuse`` where nothing changed."""
        readings = list(map(_READING, devices))
        return cls(
            statics=DeviceStatics.of(devices, reuse),
            state=codes(list(map(STATE_CODE.__getitem__, map(_STATE, devices)))),
            budget_w=floats(list(map(_BUDGET, devices))),
            expected_w=floats(list(map(_EXPECTED, devices))),
            controllable=flags(list(map(_CONTROLLABLE, devices))),
            awake=codes(list(map(AWAKE_CODE.__getitem__, map(_AWAKE, devices)))),
            power_target_w=floats(list(map(_TARGET, devices))),
            last_transition_s=floats(list(map(_SINCE, devices))),
            wakes_last_hour=floats(list(map(_WAKES, devices))),
            utilization_frac=floats([None if r is None else r.utilization_frac for r in readings]),
            reading_age_s=floats(list(map(_AGE, devices))),
            power_w=floats([None if r is None else r.power_w for r in readings]),
            demand_frac=floats([None if r is None else r.demand_frac for r in readings]),
        )


class TableDevices(RowsOnDemand[DeviceStatus]):
    """A ``DeviceTable``'s rows as ``DeviceStatus`` objects, each made when first asked for.

    A producer that keeps columns hands this on as the snapshot's ``devices``: a
    consumer that reads a few devices (a pin, an explain) pays for those alone. The
    readings and last errors, which the table does not hold, come alongside (row
    order). Equal to any sequence of equal statuses.
    """

    __slots__ = ("_errors", "_made", "_readings", "_table")

    def __init__(
        self,
        table: DeviceTable,
        readings: Sequence[DeviceReading | None],
        errors: Sequence[str | None],
    ) -> None:
        if not len(readings) == len(errors) == len(table):
            raise ValueError("a row of readings and of errors for every row of the table")
        self._table, self._readings, self._errors = table, readings, errors
        self._made: list[DeviceStatus | None] = [None] * len(table)

    @property
    def table(self) -> DeviceTable:
        """The columns these rows are made from."""
        return self._table

    def __len__(self) -> int:
        return len(self._made)

    def _make(self, i: int) -> DeviceStatus:
        t, st = self._table, self._table.statics
        awake = int(t.awake[i])
        target = float(t.power_target_w[i])
        since = float(t.last_transition_s[i])
        age = float(t.reading_age_s[i])
        d = DeviceStatus(
            device_id=st.ids[i],
            kind=st.kinds[i],
            domain=st.domains[i],
            state=STATES[t.state[i]],
            nameplate_power_w=float(st.nameplate_power_w[i]),
            nameplate_hashrate_ths=float(st.nameplate_hashrate_ths[i]),
            sleep_power_w=float(st.sleep_power_w[i]),
            capabilities=st.capabilities[i],
            budget_w=float(t.budget_w[i]),
            expected_w=float(t.expected_w[i]),
            controllable=bool(t.controllable[i]),
            reading=self._readings[i],
            reading_age_s=None if age != age else age,
            power_target_w=None if target != target else target,
            awake=None if awake < 0 else awake == 1,
            last_transition_s=None if since != since else since,
            last_error=self._errors[i],
            wakes_last_hour=int(t.wakes_last_hour[i]),
        )
        self._made[i] = d
        return d

    def _at(self, i: int) -> DeviceStatus:
        d = self._made[i]
        return d if d is not None else self._make(i)


_ID = attrgetter("device_id")
_KIND = attrgetter("kind")
_DOMAIN = attrgetter("domain")
_CAPS = attrgetter("capabilities")
_NAMEPLATE = attrgetter("nameplate_power_w")
_HASHRATE = attrgetter("nameplate_hashrate_ths")
_SLEEP = attrgetter("sleep_power_w")
_STATE = attrgetter("state")
_BUDGET = attrgetter("budget_w")
_EXPECTED = attrgetter("expected_w")
_CONTROLLABLE = attrgetter("controllable")
_AWAKE = attrgetter("awake")
_TARGET = attrgetter("power_target_w")
_SINCE = attrgetter("last_transition_s")
_WAKES = attrgetter("wakes_last_hour")
_AGE = attrgetter("reading_age_s")
_READING = attrgetter("reading")
