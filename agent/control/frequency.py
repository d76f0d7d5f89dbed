"""Under-frequency response: a block of miners chosen in advance, shed at once on a dip.

The block is chosen at every tick (``arm``), outside the plan: the awake,
controllable miners of lowest value first (the least efficient, J/TH, shed first)
until ``block_w``, or the configured devices. When the meter's frequency stays
below ``trigger_hz`` for ``trigger_s`` (``observe``), the agent sends the block's
commands straight out, together, without waiting for a tick; the block is then
held (pinned asleep or at its minimum) until the frequency has been back at or
above ``trigger_hz`` for ``restore_after_s``, after which the normal plan restores
it (shed before restore, ramp) and the block is chosen again.

Each trigger raises the ``under-frequency`` alarm (one log line, an audit record
through the alarm listeners) and its restore clears it.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass

import numpy as np

from siteagent.agent.control.alarms import UNDER_FREQUENCY, Alarms
from siteagent.agent.control.safety import LOWER, SLEEP, Change
from siteagent.domain import DeviceKind, Pin, Setpoint, Snapshot
from siteagent.domain.table import DeviceTable

# The source under which the held block's pins are set (shown in plans and status).
SOURCE = "frequency-response"
SLEEP_ACTION, MIN_POWER_ACTION = "sleep", "min_power"


class Event(enum.Enum):
    """What a frequency sample set off."""

    TRIGGER = "trigger"
    RESTORE = "restore"


@dataclass(frozen=True, slots=True)
class FrequencyParams:
    """The trigger (Hz, s), the hold (s) and the block (W, device id patterns, action)."""

    trigger_hz: float
    trigger_s: float
    restore_after_s: float
    block_w: float
    devices: tuple[str, ...] = ()
    action: str = SLEEP_ACTION


@dataclass(frozen=True, slots=True)
class Armed:
    """The block ready to shed: its commands, and the power (W) they take off."""

    changes: tuple[Change, ...]
    power_w: float


NOTHING_ARMED = Armed((), 0.0)


class FrequencyResponse:
    """The armed block, the trigger's timing, and the held block's pins."""

    def __init__(self, params: FrequencyParams, alarms: Alarms) -> None:
        self.params = params
        self.alarms = alarms
        self.armed = NOTHING_ARMED
        self.shed: Armed | None = None  # the block shed and held, until restored
        self.triggered_s: float | None = None
        self.triggers = 0
        self._below_since_s: float | None = None
        self._back_since_s: float | None = None

    @property
    def triggered(self) -> bool:
        """Whether a block is shed and held now."""
        return self.shed is not None

    def arm(self, snap: Snapshot) -> Armed:
        """Choose the block from ``snap`` (not while one is held): lowest value first."""
        if self.shed is not None:
            return self.armed
        tab = snap.table if snap.table is not None else DeviceTable.of(snap.devices)
        st = tab.statics
        sleep = self.params.action == SLEEP_ACTION
        caps = st.capabilities
        ok = np.fromiter(
            (
                k is DeviceKind.MINER
                and (c.can_sleep if sleep else c.power_target and c.power_target_min_w is not None)
                for k, c in zip(st.kinds, caps, strict=True)
            ),
            bool,
            len(st),
        )
        ok &= tab.controllable & (tab.awake == 1)
        if self.params.devices:
            pats = self.params.devices
            ok &= np.fromiter(
                (any(fnmatch.fnmatchcase(d, p) for p in pats) for d in st.ids), bool, len(st)
            )
        rows = np.flatnonzero(ok)
        floor_w = (
            st.sleep_power_w[rows]
            if sleep
            else np.array([caps[r].power_target_min_w or 0.0 for r in rows.tolist()], float)
        )
        drop_w = np.maximum(tab.expected_w[rows] - floor_w, 0.0)
        if not self.params.devices:
            # Lowest value first: the most joules per terahash; then just enough of them.
            with np.errstate(divide="ignore", invalid="ignore"):
                j_per_th = st.nameplate_power_w[rows] / st.nameplate_hashrate_ths[rows]
            order = np.argsort(-np.nan_to_num(j_per_th, nan=np.inf), kind="stable")
            rows, floor_w, drop_w = rows[order], floor_w[order], drop_w[order]
            before = np.cumsum(drop_w) - drop_w
            keep = before < self.params.block_w
            rows, floor_w, drop_w = rows[keep], floor_w[keep], drop_w[keep]
        kind = SLEEP if sleep else LOWER
        changes = tuple(
            Change(
                st.ids[r],
                kind,
                Setpoint(st.ids[r], not sleep, None if sleep else f, f, "under-frequency shed"),
                float(tab.budget_w[r]),
                f,
                None if sleep else f,
            )
            for r, f in zip(rows.tolist(), floor_w.tolist(), strict=True)
        )
        self.armed = Armed(changes, float(drop_w.sum()))
        return self.armed

    def observe(self, frequency_hz: float | None, now_s: float) -> Event | None:
        """Take one frequency sample (Hz) at ``now_s``: a trigger, a restore, or nothing."""
        p = self.params
        if frequency_hz is None:
            return None
        if frequency_hz < p.trigger_hz:
            self._back_since_s = None
            if self._below_since_s is None:
                self._below_since_s = now_s
            if self.shed is None and now_s - self._below_since_s >= p.trigger_s:
                return self._trigger(frequency_hz, now_s)
            return None
        self._below_since_s = None
        if self.shed is None:
            return None
        if self._back_since_s is None:
            self._back_since_s = now_s
        if now_s - self._back_since_s >= p.restore_after_s:
            return self._restore(frequency_hz, now_s)
        return None

    def _trigger(self, frequency_hz: float, now_s: float) -> Event:
        self.shed, self.triggered_s = self.armed, now_s
        self.triggers += 1
        self.alarms.raise_alarm(
            UNDER_FREQUENCY,
            f"frequency {frequency_hz:.3f} Hz below {self.params.trigger_hz:.3f} Hz for "
            f"{self.params.trigger_s:.2f} s: shedding {len(self.armed.changes)} miner(s) "
            f"({self.armed.power_w:.0f} W, {self.params.action}), held until it has been "
            f"back for {self.params.restore_after_s:g} s",
        )
        return Event.TRIGGER

    def _restore(self, frequency_hz: float, now_s: float) -> Event:
        self.shed, self.triggered_s, self._back_since_s = None, None, None
        self.armed = NOTHING_ARMED
        self.alarms.clear(UNDER_FREQUENCY)
        return Event.RESTORE

    def pins(self) -> tuple[Pin, ...]:
        """The held block's pins (asleep, or at its minimum), while one is held."""
        if self.shed is None:
            return ()
        return tuple(
            Pin(c.device_id, 0.0 if c.kind == SLEEP else c.new_w, source=SOURCE)
            for c in self.shed.changes
        )
