"""Worst-case accounting written per device: the specification of ``domain.worst_case``.

``ReferenceDevice`` is one device's memory as plainly as it can be written: what
the agent read, commanded and has not yet seen confirmed, and from these the power
to count for it (DESIGN.md invariant 1). The agent keeps every device as columns
(agent/control/fleet.py) and computes the same over arrays; tests/test_fleet.py drives
random histories through both and compares the two field for field. Confirming a
change from a reading is one rule of the fleet's (``confirms``), used here as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from siteagent.agent.control.devices import DeviceDriver
from siteagent.agent.control.fleet import Pending, confirms, shown_error
from siteagent.domain import (
    DeviceControls,
    DeviceError,
    DeviceFaulted,
    DeviceKind,
    DevicePermissionError,
    DeviceReading,
    DeviceState,
    DeviceStatus,
)
from siteagent.domain.worst_case import CONFIRM_SLACK_W, DISOBEY_SLACK_FRAC, DISOBEY_SLACK_W


@dataclass
class ReferenceDevice:
    """One device's state, and its worst case computed from it alone."""

    device_id: str
    domain: str
    nameplate_power_w: float
    nameplate_hashrate_ths: float
    sleep_power_w: float
    kind: DeviceKind = DeviceKind.MINER
    nameplate_power_is_default: bool = False
    nameplate_hashrate_is_default: bool = False
    driver: DeviceDriver | None = None
    capabilities: DeviceControls = field(default_factory=lambda: DeviceControls(power_target=False))
    last_good: DeviceReading | None = None
    last_ok_s: float | None = None
    state: DeviceState = DeviceState.UNKNOWN
    failures: int = 0
    last_error: str | None = None
    awake: bool | None = None
    power_target_w: float | None = None
    last_transition_s: float | None = None
    wakes_s: list[float] | None = None
    pending: Pending | None = None
    read_only: str | None = None

    # -- what happens to it ---------------------------------------------------------

    def attach(self, driver: DeviceDriver) -> None:
        """Connected: adopt what the driver identified."""
        self.driver = driver
        ident = driver.identity
        if ident is not None:
            self.capabilities = ident.capabilities
            if ident.nameplate_power_w:
                old_w = 0.0 if self.nameplate_power_is_default else self.nameplate_power_w
                self.nameplate_power_w = max(old_w, ident.nameplate_power_w)
            if ident.nameplate_hashrate_ths and (
                self.nameplate_hashrate_is_default or self.nameplate_hashrate_ths <= 0
            ):
                self.nameplate_hashrate_ths = ident.nameplate_hashrate_ths

    def record_reading(
        self, reading: DeviceReading, now_s: float, confirm_timeout_s: float
    ) -> None:
        """A good reading: confirm or expire the change in flight, adopt the device's word."""
        if self.read_only is not None and getattr(self.driver, "login_ok", None) is True:
            self.read_only = None
        self.last_good = reading
        self.last_ok_s = now_s
        self.state = reading.state
        self.failures = 0
        self.last_error = None
        p = self.pending
        if p is not None:
            settle = getattr(self.driver, "settle_s", None)
            within_s = max(confirm_timeout_s, 0.0 if settle is None else settle(p.kind))
            if confirms(p, reading, self.sleep_power_w) or now_s - p.issued_s > within_s:
                self.pending = None
        if self.pending is None:
            self.awake = reading.state is not DeviceState.SLEEPING
            if reading.power_target_w is not None:
                self.power_target_w = reading.power_target_w

    def record_failure(self, error: Exception) -> None:
        """A failed read."""
        faulted = isinstance(error, DeviceFaulted) or not isinstance(error, DeviceError)
        if isinstance(error, DevicePermissionError):
            self.mark_read_only(error)
        self.state = DeviceState.FAULTED if faulted else DeviceState.UNREACHABLE
        self.last_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.failures += 1

    def mark_read_only(self, error: Exception) -> None:
        """Our credentials refused."""
        self.read_only = f"read-only: {error}"

    def record_command(
        self, kind: str, old_w: float, new_w: float, target_w: float | None, now_s: float
    ) -> None:
        """A change the device accepted."""
        if kind in ("sleep", "wake"):
            self.awake = kind == "wake"
            self.last_transition_s = now_s
        if kind == "wake":
            self.wakes_s = [*(self.wakes_s or []), now_s]
        if target_w is not None:
            self.power_target_w = target_w
        self.pending = Pending(kind, old_w, new_w, now_s, target_w)

    # -- the rule ---------------------------------------------------------------------

    def fresh(self, now_s: float, stale_after_s: float) -> bool:
        """A recent good reading, and the device answering."""
        return (
            self.last_ok_s is not None
            and now_s - self.last_ok_s <= stale_after_s
            and self.state
            not in (DeviceState.UNREACHABLE, DeviceState.FAULTED, DeviceState.UNKNOWN)
        )

    def commanded_w(self) -> float:
        """The level (W) it was last told to run at."""
        if self.awake is False:
            return self.sleep_power_w
        if self.awake and self.power_target_w is not None:
            return self.power_target_w
        return self.nameplate_power_w

    def measured_w(self) -> float:
        """Its last good reading's draw (W); 0 if none."""
        r = self.last_good
        return 0.0 if r is None or r.power_w is None else r.power_w

    def reads_sleeping(self) -> bool:
        """Its last reading says it sleeps, at a sleeping miner's draw (none reported: yes)."""
        r = self.last_good
        return (
            r is not None
            and r.state is DeviceState.SLEEPING
            and (r.power_w is None or r.power_w <= 2 * self.sleep_power_w + CONFIRM_SLACK_W)
        )

    def budget_w(self, now_s: float, stale_after_s: float) -> float:
        """Worst-case power (W) to count for it now."""
        fresh = self.fresh(now_s, stale_after_s)
        worst = max(self.nameplate_power_w, self.commanded_w(), self.measured_w())
        if self.read_only is not None:
            if fresh and self.reads_sleeping():
                return self.sleep_power_w
            return max(worst, self.pending.old_w) if self.pending is not None else worst
        if not fresh:
            known_asleep = self.awake is False and self.pending is None and self.reads_sleeping()
            return self.sleep_power_w if known_asleep else worst
        w = max(self.commanded_w(), self.measured_w())
        return w if self.pending is None else max(w, self.pending.old_w)

    def expected_w(self, now_s: float, stale_after_s: float) -> float:
        """Power (W) it settles at once the changes already sent take effect."""
        if self.read_only is not None or not self.fresh(now_s, stale_after_s):
            return self.budget_w(now_s, stale_after_s)
        cmd, measured = self.commanded_w(), self.measured_w()
        if self.pending is None and measured > cmd * (1 + DISOBEY_SLACK_FRAC) + DISOBEY_SLACK_W:
            return measured
        return cmd

    def status(self, now_s: float, stale_after_s: float) -> DeviceStatus:
        """The snapshot's view of it."""
        fresh = self.fresh(now_s, stale_after_s)
        state = self.state
        if not fresh and state not in (DeviceState.UNREACHABLE, DeviceState.FAULTED):
            state = DeviceState.UNKNOWN if self.last_ok_s is None else DeviceState.UNREACHABLE
        # Wakes more than an hour old are forgotten as they are asked about.
        self.wakes_s = [w for w in self.wakes_s or [] if now_s - w <= 3600.0]
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
            wakes_last_hour=len(self.wakes_s),
            last_error=shown_error(self.read_only, self.last_error),
        )
