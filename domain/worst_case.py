"""Worst-case accounting (DESIGN.md invariant 1), once, over every device's columns.

What power to count for each device now, given what the agent last read,
commanded and has not yet seen confirmed: a device that is not answering, or
whose reading is stale, counts at its nameplate (or more) unless it is known to
be asleep; a change in flight counts at its old level too until a reading
confirms it; a device that refused our credentials counts at its worst case
whatever it was told. The rule works on arrays (one row per device) so that a
snapshot of 50,000 devices costs a few array operations; tests/device_reference.py
is the same rule written per device, its specification, and tests/test_fleet.py
checks the two agree over random histories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from siteagent.domain.table import STATE_CODE, BoolArr, CodeArr, FloatArr
from siteagent.domain.types import DeviceState

# A lowered miner is confirmed once it reads no more than this above its new level.
CONFIRM_SLACK_FRAC = 0.02
CONFIRM_SLACK_W = 20.0
# A measured draw this far above what was commanded means the device is not obeying.
DISOBEY_SLACK_FRAC = 0.05
DISOBEY_SLACK_W = 50.0
# States in which a device draws its working power.
ACTIVE_STATES = frozenset({DeviceState.MINING, DeviceState.RUNNING})
# The reading-state code of a device never read.
NO_READING = -1

_UNREACHABLE = STATE_CODE[DeviceState.UNREACHABLE]
_FAULTED = STATE_CODE[DeviceState.FAULTED]
_UNKNOWN = STATE_CODE[DeviceState.UNKNOWN]
_SLEEPING = STATE_CODE[DeviceState.SLEEPING]


def sleep_draw_max_w(sleep_power_w: float) -> float:
    """The most (W) a sleeping miner may be seen to draw: its sleep level twice, and slack."""
    return 2 * sleep_power_w + CONFIRM_SLACK_W


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the agent knows of every device, one row each (the inputs of the rule).

    ``state`` and ``reading_state`` are codes into ``domain.table.STATES``
    (``reading_state`` is ``NO_READING`` before a first good reading); ``awake``
    is 1, 0 or -1 (unknown); missing numbers are NaN.
    """

    state: CodeArr  # the device's state as last recorded (a failure's, or its reading's)
    last_ok_s: FloatArr  # when the last good reading came (clock s)
    awake: CodeArr  # by our command, or by its last reading with nothing in flight
    power_target_w: FloatArr  # last commanded or read target
    nameplate_power_w: FloatArr
    sleep_power_w: FloatArr
    reading_state: CodeArr  # the last good reading's state
    reading_power_w: FloatArr  # the last good reading's draw
    pending: BoolArr  # a change sent and not yet confirmed
    pending_old_w: FloatArr  # that change's level before it (W)
    read_only: BoolArr  # refused our credentials: nothing we send reaches it
    can_control: BoolArr  # connected, and takes a power target or sleeps


@dataclass(frozen=True, slots=True)
class WorstCase:
    """The rule's answer per row."""

    fresh: BoolArr  # a recent good reading, and the device answering
    state: CodeArr  # the state a snapshot shows (stale: unreachable, or unknown if never read)
    budget_w: FloatArr  # worst-case power to count now (W)
    expected_w: FloatArr  # where it settles once the changes already sent take effect (W)
    controllable: BoolArr  # fresh, connected, not read-only, with something to control


def worst_case(f: DeviceFacts, now_s: float, stale_after_s: float) -> WorstCase:
    """Every device's worst-case and expected power (W) and shown state at ``now_s``."""
    state, last_ok, awake = f.state, f.last_ok_s, f.awake
    seen = ~np.isnan(last_ok)
    answering = (state != _UNREACHABLE) & (state != _FAULTED) & (state != _UNKNOWN)
    with np.errstate(invalid="ignore"):
        fresh = seen & (now_s - last_ok <= stale_after_s) & answering
    nameplate, sleep, target = f.nameplate_power_w, f.sleep_power_w, f.power_target_w
    # The level it was last told to run at.
    commanded = np.where(
        awake == 0, sleep, np.where((awake == 1) & ~np.isnan(target), target, nameplate)
    )
    power = f.reading_power_w
    measured = np.where(np.isnan(power), 0.0, power)
    pending = f.pending
    # Asleep by our command and by its last reading, with nothing in flight. The draw
    # must agree with the state (no draw reported counts as a sleeping one): a miner
    # that says "sleeping" while still drawing is not known to be off.
    with np.errstate(invalid="ignore"):
        sleep_draw = np.isnan(power) | (power <= 2 * sleep + CONFIRM_SLACK_W)
    reads_sleeping = (f.reading_state == _SLEEPING) & sleep_draw
    known_asleep = (awake == 0) & ~pending & reads_sleeping
    worst = np.maximum(np.maximum(nameplate, commanded), measured)
    budget_stale = np.where(known_asleep, sleep, worst)
    budget_fresh = np.maximum(commanded, measured)
    # Until confirmed, a change counts at its old level too; for a raise that replaced
    # an unconfirmed decrease, that old level is the one still unproven.
    budget_fresh = np.where(pending, np.maximum(budget_fresh, f.pending_old_w), budget_fresh)
    budget = np.where(fresh, budget_fresh, budget_stale)
    # Read-only: it may run at its nameplate whatever it was told, unless a fresh
    # reading says it is asleep.
    ro = f.read_only
    worst_ro = np.where(pending, np.maximum(worst, f.pending_old_w), worst)
    budget = np.where(ro, np.where(fresh & reads_sleeping, sleep, worst_ro), budget)
    disobeys = ~pending & (measured > commanded * (1 + DISOBEY_SLACK_FRAC) + DISOBEY_SLACK_W)
    expected = np.where(fresh & ~ro, np.where(disobeys, measured, commanded), budget)
    lost = ~fresh & (state != _UNREACHABLE) & (state != _FAULTED)
    shown = np.where(lost, np.where(seen, _UNREACHABLE, _UNKNOWN), state).astype(np.int8)
    controllable = fresh & f.can_control & ~ro
    return WorstCase(fresh, shown, budget, expected, controllable)
