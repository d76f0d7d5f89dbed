"""Every tracker's state as columns, so a snapshot of 50,000 devices costs milliseconds.

Freezing each tracker into a ``DeviceStatus`` costs about 15 us a device (0.8 s
at 50,000 on this machine), more than planning with them. So the trackers
write what a snapshot reads into arrays as it changes (``DeviceTracker``'s
attribute writes go through to its row here: a ``record_reading`` costs
about 8 us instead of 1.2-1.5 us, against the hundreds of us to thousands of
us the reading itself costs through pyasic), and ``snapshot`` works out every
device's worst case with a few array operations. The rules are ``DeviceTracker``'s (``fresh``,
``budget_w``, ``expected_w``, ``status``), written again over columns;
tests/test_columns.py checks the two agree, field for field, over random
histories of readings, failures and commands.

The snapshot's ``devices`` are made from the columns only when a consumer
asks for them (``domain.table.TableDevices``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from domain import DeviceReading, DeviceState, Snapshot
from domain.table import (
    AWAKE_CODE,
    STATE_CODE,
    DeviceStatics,
    DeviceTable,
    TableDevices,
    floats,
)

if TYPE_CHECKING:
    from agent.devices import DeviceTracker

_UNREACHABLE = STATE_CODE[DeviceState.UNREACHABLE]
_FAULTED = STATE_CODE[DeviceState.FAULTED]
_UNKNOWN = STATE_CODE[DeviceState.UNKNOWN]
_SLEEPING = STATE_CODE[DeviceState.SLEEPING]
_NO_READING = -1

# Tracker attributes that are part of the statics: a write makes new statics.
STATIC_FIELDS = frozenset(
    {
        "device_id",
        "kind",
        "domain",
        "capabilities",
        "nameplate_power_w",
        "nameplate_hashrate_ths",
        "sleep_power_w",
    }
)
# Every tracker attribute a snapshot reads (written through to the columns).
COLUMN_FIELDS = STATIC_FIELDS | {
    "state",
    "last_ok_s",
    "awake",
    "power_target_w",
    "last_transition_s",
    "last_good",
    "last_error",
    "pending",
    "driver",
    "read_only",
}


def shown_error(read_only: str | None, last_error: str | None) -> str | None:
    """A device's error as status shows it: why it is read-only first, then the last one."""
    if read_only is None:
        return last_error
    if last_error is None or last_error in read_only:
        return read_only
    return f"{read_only}; last error: {last_error}"


class TrackerColumns:
    """The trackers' state, one row each (in the order given), written through by them."""

    def __init__(self, trackers: Iterable[DeviceTracker]) -> None:
        self.trackers = list(trackers)
        n = len(self.trackers)
        self.state = np.zeros(n, np.int8)
        self.last_ok_s = np.full(n, np.nan)
        self.awake = np.full(n, -1, np.int8)
        self.power_target_w = np.full(n, np.nan)
        self.last_transition_s = np.full(n, np.nan)
        self.nameplate_w = np.zeros(n)
        self.sleep_w = np.zeros(n)
        self.controls = np.zeros(n, bool)  # a power target or sleep to control
        self.has_driver = np.zeros(n, bool)
        self.read_only = np.zeros(n, bool)  # refused our credentials: sent nothing
        self.reading_state = np.full(n, _NO_READING, np.int8)
        self.reading_power_w = np.full(n, np.nan)  # NaN: no reading, or none in it
        self.utilization_frac = np.full(n, np.nan)
        self.has_pending = np.zeros(n, bool)
        self.pending_old_w = np.zeros(n)
        self.readings: list[DeviceReading | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.woken: set[int] = set()  # rows with a wake in the last hour (or since checked)
        self.statics: DeviceStatics | None = None
        self.valid = True  # False once a tracker is bound to other columns
        for row, t in enumerate(self.trackers):
            t.bind_columns(self, row)

    def write(self, row: int, name: str, value: Any) -> None:
        """Take one tracker attribute's new value (see ``COLUMN_FIELDS``)."""
        if name in STATIC_FIELDS:
            self.statics = None
            if name == "nameplate_power_w":
                self.nameplate_w[row] = value
            elif name == "sleep_power_w":
                self.sleep_w[row] = value
            elif name == "capabilities":
                self.controls[row] = value.power_target or value.can_sleep
        elif name == "state":
            self.state[row] = STATE_CODE[value]
        elif name == "last_ok_s":
            self.last_ok_s[row] = np.nan if value is None else value
        elif name == "awake":
            self.awake[row] = AWAKE_CODE[value]
        elif name == "power_target_w":
            self.power_target_w[row] = np.nan if value is None else value
        elif name == "last_transition_s":
            self.last_transition_s[row] = np.nan if value is None else value
        elif name == "last_good":
            self.readings[row] = value
            if value is None:
                self.reading_state[row] = _NO_READING
                self.reading_power_w[row] = self.utilization_frac[row] = np.nan
            else:
                self.reading_state[row] = STATE_CODE[value.state]
                power, util = value.power_w, value.utilization_frac
                self.reading_power_w[row] = np.nan if power is None else power
                self.utilization_frac[row] = np.nan if util is None else util
        elif name == "last_error":
            self.errors[row] = shown_error(getattr(self.trackers[row], "read_only", None), value)
        elif name == "read_only":
            self.read_only[row] = value is not None
            self.errors[row] = shown_error(value, self.trackers[row].last_error)
        elif name == "pending":
            self.has_pending[row] = value is not None
            self.pending_old_w[row] = 0.0 if value is None else value.old_w
        elif name == "driver":
            self.has_driver[row] = value is not None

    def _statics(self) -> DeviceStatics:
        if self.statics is None:
            ts = self.trackers
            self.statics = DeviceStatics(
                tuple(t.device_id for t in ts),
                tuple(t.kind for t in ts),
                tuple(t.domain for t in ts),
                tuple(t.capabilities for t in ts),
                floats([t.nameplate_power_w for t in ts]),
                floats([t.nameplate_hashrate_ths for t in ts]),
                floats([t.sleep_power_w for t in ts]),
            )
        return self.statics

    def table(self, now_s: float, stale_after_s: float) -> DeviceTable:
        """Every device's view at ``now_s``, as ``DeviceTracker.status`` would freeze it."""
        from agent.devices import (
            CONFIRM_SLACK_W,
            DISOBEY_SLACK_FRAC,
            DISOBEY_SLACK_W,
        )

        n = len(self.trackers)
        wakes = np.zeros(n)
        for row in list(self.woken):
            count = self.trackers[row].wakes_in_last_hour(now_s)
            if count:
                wakes[row] = count
            else:
                self.woken.discard(row)
        state, last_ok, awake = self.state, self.last_ok_s, self.awake
        seen = ~np.isnan(last_ok)
        answering = (state != _UNREACHABLE) & (state != _FAULTED) & (state != _UNKNOWN)
        with np.errstate(invalid="ignore"):
            fresh = seen & (now_s - last_ok <= stale_after_s) & answering
        nameplate, sleep, target = self.nameplate_w, self.sleep_w, self.power_target_w
        commanded = np.where(
            awake == 0, sleep, np.where((awake == 1) & ~np.isnan(target), target, nameplate)
        )
        power = self.reading_power_w
        measured = np.where(np.isnan(power), 0.0, power)
        pending = self.has_pending
        # Asleep by our command and by its last reading, with nothing in flight; no draw
        # reported counts as a sleeping one.
        with np.errstate(invalid="ignore"):
            sleep_draw = np.isnan(power) | (power <= 2 * sleep + CONFIRM_SLACK_W)
        known_asleep = (awake == 0) & ~pending & (self.reading_state == _SLEEPING) & sleep_draw
        worst = np.maximum(np.maximum(nameplate, commanded), measured)
        budget_stale = np.where(known_asleep, sleep, worst)
        budget_fresh = np.maximum(commanded, measured)
        budget_fresh = np.where(pending, np.maximum(budget_fresh, self.pending_old_w), budget_fresh)
        budget = np.where(fresh, budget_fresh, budget_stale)
        # Read-only (credentials refused): nameplate unless a fresh reading says asleep.
        ro = self.read_only
        reads_asleep = fresh & (self.reading_state == _SLEEPING) & sleep_draw
        worst_ro = np.where(pending, np.maximum(worst, self.pending_old_w), worst)
        budget = np.where(ro, np.where(reads_asleep, sleep, worst_ro), budget)
        disobeys = ~pending & (measured > commanded * (1 + DISOBEY_SLACK_FRAC) + DISOBEY_SLACK_W)
        expected = np.where(fresh & ~ro, np.where(disobeys, measured, commanded), budget)
        lost = ~fresh & (state != _UNREACHABLE) & (state != _FAULTED)
        shown = np.where(lost, np.where(seen, _UNREACHABLE, _UNKNOWN), state).astype(np.int8)
        controllable = fresh & self.has_driver & self.controls & ~ro
        age = now_s - last_ok
        cols = [
            shown,
            budget,
            expected,
            controllable,
            awake.copy(),
            target.copy(),
            self.last_transition_s.copy(),
            wakes,
            self.utilization_frac.copy(),
            age,
            power.copy(),
        ]
        for c in cols:
            c.flags.writeable = False
        return DeviceTable(self._statics(), *cols)

    def snapshot(self, now_s: float, stale_after_s: float) -> Snapshot:
        """The snapshot at ``now_s``: the columns, and the devices made from them on demand."""
        tab = self.table(now_s, stale_after_s)
        devices = TableDevices(tab, self.readings.copy(), self.errors.copy())
        return Snapshot(now_s, devices, table=tab)


class DuplicateDeviceError(ValueError):
    """A second device under an id already taken: it would hide the first from the accounting."""


def clash_message(device_id: str, first: DeviceTracker, second: DeviceTracker) -> str:
    """Says which two devices (kind, address) share ``device_id``."""
    return (
        f"device id {device_id!r} is taken twice: by a {first.kind} at {first.address} and "
        f"by a {second.kind} at {second.address}; every device and domain needs its own id"
    )


class Trackers(dict[str, "DeviceTracker"]):
    """The agent's trackers by id; counts changes, so columns are rebuilt when it changes.

    A tracker never replaces another under the same id (``DuplicateDeviceError``):
    the one replaced would draw power that no snapshot counts.
    """

    version = 0

    def __init__(self, items: Iterable[tuple[str, DeviceTracker]] = ()) -> None:
        super().__init__()
        for key, value in items:
            self[key] = value

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key: str, value: DeviceTracker) -> None:
        old = self.get(key)
        if old is not None and old is not value:
            raise DuplicateDeviceError(clash_message(key, old, value))
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, key: str, *default: Any) -> Any:
        self._changed()
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, DeviceTracker]:
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        self._changed()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value  # one at a time, so a clash is refused here too
        self._changed()

    def setdefault(self, key: str, default: DeviceTracker) -> DeviceTracker:
        self._changed()
        return super().setdefault(key, default)
