"""What the agent knows of every device between ticks: the one writer of device state.

The fleet keeps, for each device, its last good reading and when it came, its
failures and last error, what the agent last commanded and any change not yet
confirmed. The loop tells it explicitly: ``record_reading``, ``record_failure``,
``record_command``, ``mark_read_only``, ``attach``. It keeps this state as
columns, one row a device, so that a snapshot of 50,000 devices costs a few
array operations: the worst-case rule (``domain.worst_case``) runs over them.
It logs a line when a device fails and one when it recovers, never one per
failed read (for a GPU node's GPUs failing together: one for the node), and
backs a failing device's link off exponentially.

Each device's IO (driver, connect, next read) is its ``DeviceLink``
(agent/control/devices.py); the fleet holds the links in row order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from siteagent.agent.control.devices import DeviceDriver, DeviceLink
from siteagent.domain import (
    DeviceControls,
    DeviceError,
    DeviceFaulted,
    DeviceKind,
    DevicePermissionError,
    DeviceReading,
    DeviceState,
    Snapshot,
)
from siteagent.domain.table import (
    STATE_CODE,
    STATES,
    DeviceStatics,
    DeviceTable,
    TableDevices,
    floats,
)
from siteagent.domain.worst_case import (
    ACTIVE_STATES,
    CONFIRM_SLACK_FRAC,
    CONFIRM_SLACK_W,
    NO_READING,
    DeviceFacts,
    sleep_draw_max_w,
    worst_case,
)

log = logging.getLogger("siteagent.devices")

_UNREACHABLE = STATE_CODE[DeviceState.UNREACHABLE]
_FAULTED = STATE_CODE[DeviceState.FAULTED]
_UNKNOWN = STATE_CODE[DeviceState.UNKNOWN]
_SLEEPING = DeviceState.SLEEPING
_NO_CONTROL = DeviceControls(power_target=False)
# The columns (name, dtype, value of a new row); grown together, doubling.
_COLUMNS: tuple[tuple[str, Any, float], ...] = (
    ("state", np.int8, _UNKNOWN),
    ("last_ok_s", np.float64, math.nan),
    ("awake", np.int8, -1),
    ("power_target_w", np.float64, math.nan),
    ("last_transition_s", np.float64, math.nan),
    ("nameplate_w", np.float64, 0.0),
    ("sleep_w", np.float64, 0.0),
    ("controls", np.bool_, False),  # a power target or sleep to control
    ("has_driver", np.bool_, False),
    ("read_only", np.bool_, False),  # refused our credentials: sent nothing
    ("reading_state", np.int8, NO_READING),
    ("reading_power_w", np.float64, math.nan),  # NaN: no reading, or none in it
    ("utilization_frac", np.float64, math.nan),
    ("demand_frac", np.float64, math.nan),
    ("has_pending", np.bool_, False),
    ("pending_old_w", np.float64, 0.0),
)


@dataclass(frozen=True, slots=True)
class Pending:
    """A change sent but not yet seen in a reading."""

    kind: str
    old_w: float
    new_w: float
    issued_s: float
    target_w: float | None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device as the fleet knows it at the moment asked (for status, tests, words)."""

    device_id: str
    kind: DeviceKind
    domain: str
    address: str
    driver: DeviceDriver | None
    capabilities: DeviceControls
    nameplate_power_w: float
    nameplate_hashrate_ths: float
    sleep_power_w: float
    state: DeviceState
    last_good: DeviceReading | None
    last_ok_s: float | None
    failures: int
    last_error: str | None
    read_only: str | None  # why no change is sent to it (it refused our credentials)
    pending: Pending | None
    awake: bool | None
    power_target_w: float | None
    last_transition_s: float | None
    next_read_s: float


def shown_error(read_only: str | None, last_error: str | None) -> str | None:
    """A device's error as status shows it: why it is read-only first, then the last one."""
    if read_only is None:
        return last_error
    if last_error is None or last_error in read_only:
        return read_only
    return f"{read_only}; last error: {last_error}"


class DuplicateDeviceError(ValueError):
    """A second device under an id already taken: it would hide the first from the accounting."""


def clash_message(device_id: str, first: DeviceLink, second: DeviceLink) -> str:
    """Says which two devices (kind, address) share ``device_id``."""
    return (
        f"device id {device_id!r} is taken twice: by a {first.kind} at {first.address} and "
        f"by a {second.kind} at {second.address}; every device and domain needs its own id"
    )


def _nan_none(x: float) -> float | None:
    return None if x != x else x


class Fleet:
    """Every device's state, one row each in the order added; the loop's one writer of it.

    A device never replaces another under the same id (``DuplicateDeviceError``):
    the one replaced would draw power that no snapshot counts.
    """

    state: np.ndarray[Any, np.dtype[np.int8]]
    last_ok_s: np.ndarray[Any, np.dtype[np.float64]]
    awake: np.ndarray[Any, np.dtype[np.int8]]
    power_target_w: np.ndarray[Any, np.dtype[np.float64]]
    last_transition_s: np.ndarray[Any, np.dtype[np.float64]]
    nameplate_w: np.ndarray[Any, np.dtype[np.float64]]
    sleep_w: np.ndarray[Any, np.dtype[np.float64]]
    controls: np.ndarray[Any, np.dtype[np.bool_]]
    has_driver: np.ndarray[Any, np.dtype[np.bool_]]
    read_only: np.ndarray[Any, np.dtype[np.bool_]]
    reading_state: np.ndarray[Any, np.dtype[np.int8]]
    reading_power_w: np.ndarray[Any, np.dtype[np.float64]]
    utilization_frac: np.ndarray[Any, np.dtype[np.float64]]
    demand_frac: np.ndarray[Any, np.dtype[np.float64]]
    has_pending: np.ndarray[Any, np.dtype[np.bool_]]
    pending_old_w: np.ndarray[Any, np.dtype[np.float64]]

    def __init__(self, links: Iterable[DeviceLink] = ()) -> None:
        self._n = 0
        for name, dtype, fill in _COLUMNS:
            setattr(self, name, np.full(16, fill, dtype))
        self._links: list[DeviceLink] = []
        self._rows: dict[str, int] = {}
        self._hashrate_ths: list[float] = []
        self._capabilities: list[DeviceControls] = []
        self._readings: list[DeviceReading | None] = []
        self._last_error: list[str | None] = []
        self._read_only: list[str | None] = []  # why it is read-only, or None
        self._errors: list[str | None] = []  # what status shows (``shown_error``)
        self._failures: list[int] = []
        self._pending: list[Pending | None] = []
        # Wake times (clock s), oldest first, of rows woken in the last hour (or since checked).
        self._wakes: dict[int, list[float]] = {}
        # A GPU node's devices failing together: (node id, their error) -> their rows.
        self._nodes_down: dict[tuple[str, str], set[int]] = {}
        self._statics: DeviceStatics | None = None
        for link in links:
            self.add(link)

    # -- membership -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._rows))

    def row(self, device_id: str) -> int:
        """The row of ``device_id`` (KeyError if unknown)."""
        return self._rows[device_id]

    def links(self) -> list[DeviceLink]:
        """Every device's link, in row order."""
        return list(self._links)

    def link(self, row: int) -> DeviceLink:
        """The link of the device in ``row``."""
        return self._links[row]

    def get_link(self, device_id: str) -> DeviceLink | None:
        """The link of ``device_id``, or None if it is not in the fleet."""
        row = self._rows.get(device_id)
        return None if row is None else self._links[row]

    def add(self, link: DeviceLink) -> int:
        """Take in a new device (its row); a connected link's identity is adopted at once."""
        old = self.get_link(link.device_id)
        if old is not None:
            if old is link:
                return self._rows[link.device_id]
            raise DuplicateDeviceError(clash_message(link.device_id, old, link))
        row = self._n
        if row == len(self.state):
            self._grow(2 * row)
        self._n = row + 1
        spec = link.spec
        self._links.append(link)
        self._rows[link.device_id] = row
        self.nameplate_w[row] = spec.nameplate_power_w
        self.sleep_w[row] = spec.sleep_power_w
        self._hashrate_ths.append(spec.nameplate_hashrate_ths)
        self._capabilities.append(_NO_CONTROL)
        self._readings.append(None)
        self._last_error.append(None)
        self._read_only.append(None)
        self._errors.append(None)
        self._failures.append(0)
        self._pending.append(None)
        self._statics = None
        if link.driver is not None:
            self.attach(row, link.driver)
        return row

    def _grow(self, capacity: int) -> None:
        for name, dtype, fill in _COLUMNS:
            old = getattr(self, name)
            new = np.full(capacity, fill, dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def __getitem__(self, device_id: str) -> DeviceRecord:
        return self.record(self._rows[device_id])

    def get(self, device_id: str) -> DeviceRecord | None:
        """``device_id``'s record, or None if it is not in the fleet."""
        row = self._rows.get(device_id)
        return None if row is None else self.record(row)

    def records(self) -> list[DeviceRecord]:
        """Every device's record, in row order."""
        return [self.record(row) for row in range(self._n)]

    def record(self, row: int) -> DeviceRecord:
        """The device in ``row`` as the fleet knows it now."""
        link, spec = self._links[row], self._links[row].spec
        awake = int(self.awake[row])
        return DeviceRecord(
            device_id=link.device_id,
            kind=spec.kind,
            domain=spec.domain,
            address=link.address,
            driver=link.driver,
            capabilities=self._capabilities[row],
            nameplate_power_w=float(self.nameplate_w[row]),
            nameplate_hashrate_ths=self._hashrate_ths[row],
            sleep_power_w=float(self.sleep_w[row]),
            state=STATES[self.state[row]],
            last_good=self._readings[row],
            last_ok_s=_nan_none(float(self.last_ok_s[row])),
            failures=self._failures[row],
            last_error=self._last_error[row],
            read_only=self._read_only[row],
            pending=self._pending[row],
            awake=None if awake < 0 else awake == 1,
            power_target_w=_nan_none(float(self.power_target_w[row])),
            last_transition_s=_nan_none(float(self.last_transition_s[row])),
            next_read_s=link.next_read_s,
        )

    def tried(self) -> int:
        """How many devices have been read, or failed a read, at least once."""
        failed = np.array(self._failures, np.int64) > 0
        return int(np.count_nonzero(failed | ~np.isnan(self.last_ok_s[: self._n])))

    # -- what the loop tells it -------------------------------------------------------

    def attach(self, row: int, driver: DeviceDriver) -> None:
        """Use a connected driver; adopt what it identified (nameplate, capabilities)."""
        link = self._links[row]
        link.driver = driver
        self.has_driver[row] = True
        ident = driver.identity
        if ident is None:
            return
        spec = link.spec
        self._capabilities[row] = caps = ident.capabilities
        self.controls[row] = caps.power_target or caps.can_sleep
        if ident.nameplate_power_w:
            # A default is a guess for an unknown model: the known model's figure
            # replaces it. A configured figure only grows to the model's.
            old_w = 0.0 if spec.nameplate_power_is_default else float(self.nameplate_w[row])
            self.nameplate_w[row] = max(old_w, ident.nameplate_power_w)
        hashrate = self._hashrate_ths[row]
        if ident.nameplate_hashrate_ths and (spec.nameplate_hashrate_is_default or hashrate <= 0):
            self._hashrate_ths[row] = ident.nameplate_hashrate_ths
        self._statics = None

    def move(self, row: int, found: DeviceLink) -> DeviceDriver | None:
        """The device in ``row`` is now where ``found`` (a scan's link to it) says: drop
        its driver (returned, for the caller to close) and read it at once."""
        own = self._links[row]
        dropped = own.driver
        own.address, own.connect, own.driver = found.address, found.connect, None
        own.next_read_s = 0.0
        self.has_driver[row] = False
        return dropped

    def read_soon(self, row: int) -> None:
        """Read the device in ``row`` at the next sweep, whatever its back-off."""
        self._links[row].next_read_s = 0.0

    def record_reading(
        self, row: int, reading: DeviceReading, now_s: float, confirm_timeout_s: float
    ) -> None:
        """Take a good reading: confirm or expire pending changes, adopt the device's state."""
        link = self._links[row]
        code = self.state[row]
        if self._read_only[row] is not None and getattr(link.driver, "login_ok", None) is True:
            # A reading that logs in with the credentials proves them accepted again.
            log.info(
                "%s (%s): credentials accepted again; no longer read-only (%s)",
                link.device_id,
                link.address,
                reading.state,
            )
            self._read_only[row] = None
            self.read_only[row] = False
        elif code in (_UNREACHABLE, _FAULTED):
            self._recovered(row, link, reading.state)
        state = reading.state
        self._readings[row] = reading
        self.last_ok_s[row] = now_s
        self.state[row] = STATE_CODE[state]
        self.reading_state[row] = STATE_CODE[state]
        power, util = reading.power_w, reading.utilization_frac
        self.reading_power_w[row] = math.nan if power is None else power
        self.utilization_frac[row] = math.nan if util is None else util
        demand = reading.demand_frac
        self.demand_frac[row] = math.nan if demand is None else demand
        self._failures[row] = 0
        self._last_error[row] = None
        self._errors[row] = self._read_only[row]
        p = self._pending[row]
        if p is not None:
            if confirms(p, reading, float(self.sleep_w[row])):
                p = None
            elif now_s - p.issued_s > max(confirm_timeout_s, link.settle_s(p.kind)):
                # A change counts at its worst case for at least as long as the firmware
                # takes to show it (a VNish wake, a Whatsminer restart).
                log.warning(
                    "%s: %s to %.0f W not confirmed after %.0f s; trusting its readings again",
                    link.device_id,
                    p.kind,
                    p.new_w,
                    now_s - p.issued_s,
                )
                p = None
            if p is None:
                self._pending[row] = None
                self.has_pending[row] = False
                self.pending_old_w[row] = 0.0
        if p is None:
            # No command in flight: the device's own word is the truth, so a
            # change made behind our back (or one that did not take) is seen.
            self.awake[row] = state is not _SLEEPING
            if reading.power_target_w is not None:
                self.power_target_w[row] = reading.power_target_w

    def _recovered(self, row: int, link: DeviceLink, state: DeviceState) -> None:
        node = link.node
        if node is not None:
            episodes = [key for key, rows in self._nodes_down.items() if row in rows]
            for key in episodes:
                # One of a node's devices back: the node's line says so when the last one is.
                rows = self._nodes_down[key]
                rows.discard(row)
                if not rows:
                    del self._nodes_down[key]
                    log.info("%s (%s): recovered, %s", node, link.address, state)
            if episodes:
                return
        log.info(
            "%s (%s): recovered, %s after %d failed read(s)",
            link.device_id,
            link.address,
            state,
            self._failures[row],
        )

    def record_failure(
        self, row: int, error: Exception, now_s: float, interval_s: float, max_backoff_s: float
    ) -> None:
        """Take a failed read: mark the device, log once on the change, back off."""
        link = self._links[row]
        new_state = (
            DeviceState.FAULTED if isinstance(error, DeviceFaulted) else DeviceState.UNREACHABLE
        )
        if not isinstance(error, DeviceError):
            new_state = DeviceState.FAULTED
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        code = STATE_CODE[new_state]
        if isinstance(error, DevicePermissionError):
            self.mark_read_only(row, error)  # its one warning says it all
        elif code != self.state[row]:
            self._failed(row, link, new_state, text)
        self.state[row] = code
        self._last_error[row] = text
        self._errors[row] = shown_error(self._read_only[row], text)
        failures = self._failures[row] = self._failures[row] + 1
        link.next_read_s = now_s + min(interval_s * 2 ** (failures - 1), max_backoff_s)

    def _failed(self, row: int, link: DeviceLink, state: DeviceState, text: str) -> None:
        node = link.node
        if node is None:
            log.warning("%s (%s): %s (%s)", link.device_id, link.address, state, text)
            return
        # A node that goes down takes its GPUs with it, each failing with the node's
        # error: one line for the node, not one per GPU.
        down = self._nodes_down.get((node, text))
        if down is None:
            self._nodes_down[node, text] = {row}
            log.warning("%s (%s): %s %s (%s)", node, link.address, link.device_id, state, text)
        else:
            down.add(row)
            log.debug("%s (%s): %s, as others of %s", link.device_id, link.address, state, node)

    def mark_read_only(self, row: int, error: Exception) -> None:
        """The device refused our credentials: send it nothing more and count it at its
        worst case (one warning, however often it is told)."""
        link = self._links[row]
        if self._read_only[row] is None:
            log.warning(
                "%s (%s): read-only: %s; no change is sent to it and it counts at its "
                "worst case until its credentials are accepted",
                link.device_id,
                link.address,
                error,
            )
        why = self._read_only[row] = f"read-only: {error}"
        self.read_only[row] = True
        self._errors[row] = shown_error(why, self._last_error[row])

    def record_command(
        self,
        row: int,
        kind: str,
        old_w: float,
        new_w: float,
        target_w: float | None,
        now_s: float,
    ) -> None:
        """Remember a change the device accepted; it counts at its worst case until confirmed."""
        if kind in ("sleep", "wake"):
            self.awake[row] = kind == "wake"
            self.last_transition_s[row] = now_s
        if kind == "wake":
            self._wakes.setdefault(row, []).append(now_s)
        if target_w is not None:
            self.power_target_w[row] = target_w
        self._pending[row] = Pending(kind, old_w, new_w, now_s, target_w)
        self.has_pending[row] = True
        self.pending_old_w[row] = old_w

    # -- what it tells ------------------------------------------------------------------

    def wakes_in_last_hour(self, row: int, now_s: float) -> int:
        """How many times the agent woke the device in ``row`` in the hour before ``now_s``."""
        wakes = self._wakes.get(row)
        if wakes is None:
            return 0
        old = 0
        while old < len(wakes) and now_s - wakes[old] > 3600.0:
            old += 1
        if old:
            del wakes[:old]
        if not wakes:
            del self._wakes[row]
        return len(wakes)

    def _facts(self, rows: slice) -> DeviceFacts:
        return DeviceFacts(
            state=self.state[rows],
            last_ok_s=self.last_ok_s[rows],
            awake=self.awake[rows],
            power_target_w=self.power_target_w[rows],
            nameplate_power_w=self.nameplate_w[rows],
            sleep_power_w=self.sleep_w[rows],
            reading_state=self.reading_state[rows],
            reading_power_w=self.reading_power_w[rows],
            pending=self.has_pending[rows],
            pending_old_w=self.pending_old_w[rows],
            read_only=self.read_only[rows],
            can_control=self.has_driver[rows] & self.controls[rows],
        )

    def budget_w(self, row: int, now_s: float, stale_after_s: float) -> float:
        """Worst-case power (W) to count for the device in ``row`` now."""
        return float(worst_case(self._facts(slice(row, row + 1)), now_s, stale_after_s).budget_w[0])

    def statics(self) -> DeviceStatics:
        """What rarely changes, the same object until something in it does."""
        if self._statics is None:
            n = self._n
            specs = [link.spec for link in self._links]
            self._statics = DeviceStatics(
                tuple(link.device_id for link in self._links),
                tuple(s.kind for s in specs),
                tuple(s.domain for s in specs),
                tuple(self._capabilities),
                floats(self.nameplate_w[:n].tolist()),
                floats(self._hashrate_ths),
                floats(self.sleep_w[:n].tolist()),
            )
        return self._statics

    def table(self, now_s: float, stale_after_s: float) -> DeviceTable:
        """Every device's view at ``now_s`` as columns (the worst-case rule over them)."""
        n = self._n
        wakes = np.zeros(n)
        for row in list(self._wakes):
            count = self.wakes_in_last_hour(row, now_s)
            if count:
                wakes[row] = count
        rows = slice(0, n)
        w = worst_case(self._facts(rows), now_s, stale_after_s)
        cols: list[Any] = [
            w.state,
            w.budget_w,
            w.expected_w,
            w.controllable,
            self.awake[rows].copy(),
            self.power_target_w[rows].copy(),
            self.last_transition_s[rows].copy(),
            wakes,
            self.utilization_frac[rows].copy(),
            now_s - self.last_ok_s[rows],
            self.reading_power_w[rows].copy(),
            self.demand_frac[rows].copy(),
        ]
        for c in cols:
            c.flags.writeable = False
        return DeviceTable(self.statics(), *cols)

    def snapshot(self, now_s: float, stale_after_s: float) -> Snapshot:
        """The snapshot at ``now_s``: the columns, and the devices made from them on demand."""
        tab = self.table(now_s, stale_after_s)
        devices = TableDevices(tab, self._readings.copy(), self._errors.copy())
        return Snapshot(now_s, devices, table=tab)


def _sleep_draw(power_w: float | None, sleep_power_w: float) -> bool:
    """Whether a reading's draw (W) is that of a sleeping miner; no draw reported counts as yes."""
    return power_w is None or power_w <= sleep_draw_max_w(sleep_power_w)


def confirms(p: Pending, r: DeviceReading, sleep_power_w: float) -> bool:
    """Whether reading ``r`` shows the change ``p`` took effect (a sleeping miner asleep at
    its sleep draw, a lowered one at its new level with the new target, ...)."""
    power = r.power_w
    if p.kind == "sleep":
        return r.state is DeviceState.SLEEPING and _sleep_draw(power, sleep_power_w)
    if p.kind == "lower":
        # Low draw alone proves nothing if the miner is still asleep from before (a wake
        # in flight) or has not yet taken the new target (a raise still queued ahead).
        return (
            r.state in ACTIVE_STATES
            and _took_target(p, r)
            and power is not None
            and power <= p.new_w * (1 + CONFIRM_SLACK_FRAC) + CONFIRM_SLACK_W
        )
    if p.kind == "wake":
        return r.state in ACTIVE_STATES
    # raise: the device took the new target.
    return p.target_w is None or (
        r.power_target_w is not None and abs(r.power_target_w - p.target_w) < 1.0
    )


def _took_target(p: Pending, r: DeviceReading) -> bool:
    """Whether the reading shows the commanded target, where both are known."""
    if p.target_w is None or r.power_target_w is None:
        return True
    return abs(r.power_target_w - p.target_w) < 1.0
