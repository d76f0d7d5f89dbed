"""What the agent knows about each device between ticks.

A tracker keeps the last good reading and its age, the last error, what the
agent last commanded and any change not yet confirmed, and from these
computes the device's worst-case power (DESIGN.md invariant 1). It logs a
line when a device fails and one when it recovers, never one per failed read,
and backs off exponentially while a device keeps failing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.columns import COLUMN_FIELDS, TrackerColumns, shown_error
from domain import (
    DeviceError,
    DeviceFaulted,
    DeviceKind,
    DevicePermissionError,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    MinerCapabilities,
    MinerIdentity,
)

log = logging.getLogger("siteagent.devices")

# States in which a device draws its working power.
ACTIVE_STATES = frozenset({DeviceState.MINING, DeviceState.RUNNING})
# A lowered miner is confirmed once it reads no more than this above its new level.
CONFIRM_SLACK_FRAC = 0.02
CONFIRM_SLACK_W = 20.0
# A measured draw this far above what was commanded means the device is not obeying.
DISOBEY_SLACK_FRAC = 0.05
DISOBEY_SLACK_W = 50.0


class MinerDriver(Protocol):
    """What the agent needs of a miner driver (drivers.asic.AsicDriver provides it)."""

    @property
    def identity(self) -> MinerIdentity | None: ...

    async def read(self) -> DeviceReading: ...

    async def set_power_target(self, power_w: float) -> float: ...

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...


Connector = Callable[[], Awaitable[MinerDriver]]


async def close_quietly(drivers: Iterable[object], what: str) -> None:
    """Close each driver that keeps something open (``close``: a VNish web connection, a
    Braiins OS channel), together; a failure is logged (debug), not raised."""
    closes = [c() for d in drivers if (c := getattr(d, "close", None)) is not None]
    for result in await asyncio.gather(*closes, return_exceptions=True):
        if isinstance(result, BaseException):
            log.debug("closing %s: %s", what, result)


@dataclass(slots=True)
class Pending:
    """A change sent but not yet seen in a reading."""

    kind: str
    old_w: float
    new_w: float
    issued_s: float
    target_w: float | None


class DeviceTracker:
    """The agent's memory of one device.

    Bound to the agent's ``TrackerColumns``, it writes every attribute a snapshot
    reads through to its row there as it changes (see agent/columns.py).
    """

    # Slots, not an instance dict: about 1.5 kB less a device (10,000 at a site).
    __slots__ = (
        "_columns",
        "_row",
        "address",
        "awake",
        "capabilities",
        "connect",
        "device_id",
        "domain",
        "driver",
        "failures",
        "kind",
        "last_error",
        "last_good",
        "last_ok_s",
        "last_transition_s",
        "nameplate_hashrate_is_default",
        "nameplate_hashrate_ths",
        "nameplate_power_is_default",
        "nameplate_power_w",
        "next_read_s",
        "pending",
        "power_target_w",
        "read_only",
        "settle_s",
        "sleep_power_w",
        "state",
        "wakes_s",
    )

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in COLUMN_FIELDS:
            cols = self._columns
            if cols is not None:
                cols.write(self._row, name, value)

    def bind_columns(self, cols: TrackerColumns, row: int) -> None:
        """Write this tracker's state to ``row`` of ``cols`` from now on (and now)."""
        old = self._columns
        if old is not None and old is not cols:
            old.valid = False  # its row for this tracker would go stale
        object.__setattr__(self, "_columns", cols)
        object.__setattr__(self, "_row", row)
        for name in COLUMN_FIELDS:
            cols.write(row, name, getattr(self, name))
        if self.wakes_s:
            cols.woken.add(row)

    def __init__(
        self,
        device_id: str,
        *,
        address: str,
        domain: str,
        nameplate_power_w: float,
        nameplate_hashrate_ths: float,
        sleep_power_w: float,
        connect: Connector,
        kind: DeviceKind = DeviceKind.MINER,
        nameplate_is_default: tuple[bool, bool] = (False, False),
    ) -> None:
        self._columns: TrackerColumns | None = None
        # (power, hashrate): whether each nameplate figure is the config's default for an
        # unknown model, which the model the device identifies as then replaces.
        self.nameplate_power_is_default, self.nameplate_hashrate_is_default = nameplate_is_default
        self._row = -1
        self.device_id = device_id
        self.address = address
        self.kind = kind
        self.domain = domain
        self.nameplate_power_w = nameplate_power_w
        self.nameplate_hashrate_ths = nameplate_hashrate_ths
        self.sleep_power_w = sleep_power_w
        self.connect = connect
        self.driver: MinerDriver | None = None
        self.capabilities = MinerCapabilities(power_target=False)
        self.last_good: DeviceReading | None = None
        self.last_ok_s: float | None = None
        self.state = DeviceState.UNKNOWN
        self.failures = 0
        self.last_error: str | None = None
        self.next_read_s = 0.0
        self.awake: bool | None = None
        self.power_target_w: float | None = None
        self.last_transition_s: float | None = None
        # Oldest first; a list, as most devices are never woken (an empty deque is 760 B).
        self.wakes_s: list[float] = []
        self.pending: Pending | None = None
        # How long the firmware takes to show a change, by kind (s); from the driver.
        self.settle_s: Callable[[str], float] | None = None
        # Why no change is sent to this device (it refused our credentials), or None.
        self.read_only: str | None = None

    # -- telemetry -------------------------------------------------------------

    def attach(self, driver: MinerDriver) -> None:
        """Use a connected driver; adopt what it identified (nameplate, capabilities)."""
        self.driver = driver
        self.settle_s = getattr(driver, "settle_s", None)
        ident = driver.identity
        if ident is not None:
            self.capabilities = ident.capabilities
            if ident.nameplate_power_w:
                # A default is a guess for an unknown model: the known model's figure
                # replaces it. A configured figure only grows to the model's.
                old_w = 0.0 if self.nameplate_power_is_default else self.nameplate_power_w
                self.nameplate_power_w = max(old_w, ident.nameplate_power_w)
            if ident.nameplate_hashrate_ths and (
                self.nameplate_hashrate_is_default or self.nameplate_hashrate_ths <= 0
            ):
                self.nameplate_hashrate_ths = ident.nameplate_hashrate_ths

    def record_reading(
        self, reading: DeviceReading, now_s: float, confirm_timeout_s: float
    ) -> None:
        """Take a good reading: confirm or expire pending changes, adopt the device's state."""
        if self.read_only is not None and getattr(self.driver, "login_ok", None) is True:
            # A reading that logs in with the credentials proves them accepted again.
            log.info(
                "%s (%s): credentials accepted again; no longer read-only (%s)",
                self.device_id,
                self.address,
                reading.state,
            )
            self.read_only = None
        elif self.state in (DeviceState.UNREACHABLE, DeviceState.FAULTED):
            log.info(
                "%s (%s): recovered, %s after %d failed read(s)",
                self.device_id,
                self.address,
                reading.state,
                self.failures,
            )
        self.last_good = reading
        self.last_ok_s = now_s
        self.state = reading.state
        self.failures = 0
        self.last_error = None
        p = self.pending
        if p is not None:
            if _confirms(p, reading, self.sleep_power_w):
                self.pending = None
            elif now_s - p.issued_s > self._confirm_within_s(p.kind, confirm_timeout_s):
                log.warning(
                    "%s: %s to %.0f W not confirmed after %.0f s; trusting its readings again",
                    self.device_id,
                    p.kind,
                    p.new_w,
                    now_s - p.issued_s,
                )
                self.pending = None
        if self.pending is None:
            # No command in flight: the device's own word is the truth, so a
            # change made behind our back (or one that did not take) is seen.
            self.awake = reading.state is not DeviceState.SLEEPING
            if reading.power_target_w is not None:
                self.power_target_w = reading.power_target_w

    def _confirm_within_s(self, kind: str, configured_s: float) -> float:
        """A change counts at its worst case for at least as long as the firmware
        takes to show it (a VNish wake, a Whatsminer restart), never less than configured."""
        firmware_s = self.settle_s(kind) if self.settle_s is not None else 0.0
        return max(configured_s, firmware_s)

    def record_failure(
        self, error: Exception, now_s: float, interval_s: float, max_backoff_s: float
    ) -> None:
        """Take a failed read: mark the device, log once on the change, back off."""
        new_state = (
            DeviceState.FAULTED if isinstance(error, DeviceFaulted) else DeviceState.UNREACHABLE
        )
        if not isinstance(error, DeviceError):
            new_state = DeviceState.FAULTED
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if isinstance(error, DevicePermissionError):
            self.mark_read_only(error)  # its one warning says it all
        elif new_state is not self.state:
            log.warning("%s (%s): %s (%s)", self.device_id, self.address, new_state, text)
        self.state = new_state
        self.last_error = text
        self.failures += 1
        self.next_read_s = now_s + min(interval_s * 2 ** (self.failures - 1), max_backoff_s)

    def mark_read_only(self, error: Exception) -> None:
        """The device refused our credentials: send it nothing more and count it at its
        worst case (one warning, however often it is told)."""
        if self.read_only is None:
            log.warning(
                "%s (%s): read-only: %s; no change is sent to it and it counts at its "
                "worst case until its credentials are accepted",
                self.device_id,
                self.address,
                error,
            )
        self.read_only = f"read-only: {error}"

    def record_command(
        self, kind: str, old_w: float, new_w: float, target_w: float | None, now_s: float
    ) -> None:
        """Remember a change the device accepted; it counts at its worst case until confirmed."""
        if kind in ("sleep", "wake"):
            self.awake = kind == "wake"
            self.last_transition_s = now_s
        if kind == "wake":
            self.wakes_s.append(now_s)
            if self._columns is not None:
                self._columns.woken.add(self._row)
        if target_w is not None:
            self.power_target_w = target_w
        self.pending = Pending(kind, old_w, new_w, now_s, target_w)

    def wakes_in_last_hour(self, now_s: float) -> int:
        """How many times the agent woke this device in the hour before ``now_s``."""
        wakes = self.wakes_s
        old = 0
        while old < len(wakes) and now_s - wakes[old] > 3600.0:
            old += 1
        if old:
            del wakes[:old]
        return len(wakes)

    # -- accounting --------------------------------------------------------------

    def fresh(self, now_s: float, stale_after_s: float) -> bool:
        """Whether the last good reading is recent and the device is answering."""
        return (
            self.last_ok_s is not None
            and now_s - self.last_ok_s <= stale_after_s
            and self.state
            not in (DeviceState.UNREACHABLE, DeviceState.FAULTED, DeviceState.UNKNOWN)
        )

    def commanded_w(self) -> float:
        """The level (W) the device was last told to run at."""
        if self.awake is False:
            return self.sleep_power_w
        if self.awake and self.power_target_w is not None:
            return self.power_target_w
        return self.nameplate_power_w

    def _measured_w(self) -> float:
        r = self.last_good
        if r is None or r.power_w is None:
            return 0.0
        return r.power_w

    def known_asleep(self) -> bool:
        """Asleep by our command and by its last reading, with nothing in flight."""
        r = self.last_good
        # The draw must agree with the state: a miner that says "sleeping" while still
        # drawing (its sleep timed out unconfirmed) is not known to be off.
        return (
            self.awake is False
            and self.pending is None
            and r is not None
            and r.state is DeviceState.SLEEPING
            and _sleep_draw(r.power_w, self.sleep_power_w)
        )

    def _reads_asleep(self, now_s: float, stale_after_s: float) -> bool:
        """A fresh reading says it sleeps, at a sleeping miner's draw."""
        r = self.last_good
        return (
            self.fresh(now_s, stale_after_s)
            and r is not None
            and r.state is DeviceState.SLEEPING
            and _sleep_draw(r.power_w, self.sleep_power_w)
        )

    def budget_w(self, now_s: float, stale_after_s: float) -> float:
        """Worst-case power (W) to count for this device now."""
        if self.read_only is not None:
            # Nothing we send reaches it: it may run at its nameplate whatever it
            # was told, unless a fresh reading says it is asleep.
            if self._reads_asleep(now_s, stale_after_s):
                return self.sleep_power_w
            w = max(self.nameplate_power_w, self.commanded_w(), self._measured_w())
            return max(w, self.pending.old_w) if self.pending is not None else w
        if not self.fresh(now_s, stale_after_s):
            if self.known_asleep():
                return self.sleep_power_w
            return max(self.nameplate_power_w, self.commanded_w(), self._measured_w())
        w = max(self.commanded_w(), self._measured_w())
        if self.pending is not None:
            # Until confirmed, a change counts at its old level too; for a raise that
            # replaced an unconfirmed decrease, that old level is the one still unproven.
            w = max(w, self.pending.old_w)
        return w

    def expected_w(self, now_s: float, stale_after_s: float) -> float:
        """Power (W) the device settles at once the changes already sent take effect."""
        if self.read_only is not None or not self.fresh(now_s, stale_after_s):
            return self.budget_w(now_s, stale_after_s)
        cmd = self.commanded_w()
        measured = self._measured_w()
        if self.pending is None and measured > cmd * (1 + DISOBEY_SLACK_FRAC) + DISOBEY_SLACK_W:
            return measured
        return cmd

    def status(self, now_s: float, stale_after_s: float) -> DeviceStatus:
        """Freeze the tracker into the snapshot's view of this device."""
        fresh = self.fresh(now_s, stale_after_s)
        state = self.state
        if not fresh and state not in (DeviceState.UNREACHABLE, DeviceState.FAULTED):
            state = DeviceState.UNKNOWN if self.last_ok_s is None else DeviceState.UNREACHABLE
        return DeviceStatus(
            device_id=self.device_id,
            kind=self.kind,
            domain=self.domain,
            state=state,
            nameplate_power_w=self.nameplate_power_w,
            nameplate_hashrate_ths=self.nameplate_hashrate_ths,
            sleep_power_w=self.sleep_power_w,
            capabilities=self.capabilities,
            budget_w=self.budget_w(now_s, stale_after_s),
            expected_w=self.expected_w(now_s, stale_after_s),
            controllable=fresh
            and self.driver is not None
            and self.read_only is None
            and (self.capabilities.power_target or self.capabilities.can_sleep),
            reading=self.last_good,
            reading_age_s=None if self.last_ok_s is None else now_s - self.last_ok_s,
            power_target_w=self.power_target_w,
            awake=self.awake,
            last_transition_s=self.last_transition_s,
            wakes_last_hour=self.wakes_in_last_hour(now_s),
            last_error=shown_error(self.read_only, self.last_error),
        )


def _sleep_draw(power_w: float | None, sleep_power_w: float) -> bool:
    """Whether a reading's draw (W) is that of a sleeping miner; no draw reported counts as yes."""
    return power_w is None or power_w <= 2 * sleep_power_w + CONFIRM_SLACK_W


def _confirms(p: Pending, r: DeviceReading, sleep_power_w: float) -> bool:
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
