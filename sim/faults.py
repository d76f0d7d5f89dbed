"""What every simulated miner shares: its faults, and its ground truth.

The faults are set at runtime from Python (tests, ``sim.serve``'s control
channel) and acted out on the wire by each firmware's servers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from siteagent.sim.power import MinerPowerModel, SimModel


class Fault(enum.StrEnum):
    """What can be wrong with a simulated miner, settable at runtime."""

    NONE = "none"
    NO_ANSWER = "no_answer"  # accept every connection, never answer (all ports)
    REFUSE = "refuse"  # listeners closed: connection refused
    SLOW = "slow"  # answer after ``delay_s`` seconds
    GARBAGE = "garbage"  # answer bytes that are neither JSON, HTTP/2 nor protobuf
    REFUSE_COMMANDS = "refuse_commands"  # reads work, control calls fail
    MISREPORT_POWER = "misreport_power"  # reported power is true power x ``factor``
    REBOOT = "reboot"  # spontaneous reboot: gone for ``down_s``, back mining, uptime reset


DEFAULT_SLOW_DELAY_S = 2.0
DEFAULT_MISREPORT_FACTOR = 0.8
# ASCII on the JSON and HTTP ports: pyasic's identification probe decodes the
# reply as UTF-8 without a guard, and a non-UTF-8 reply escapes get_miner() as a
# UnicodeDecodeError from a task nobody awaits. On the gRPC port anything goes.
GARBAGE_BYTES = b"~~ garbage: not json, not http {{{ ]]] \t\x01\x02 ~~"


@dataclass(frozen=True, slots=True)
class FaultState:
    """The active fault and its parameters."""

    fault: Fault = Fault.NONE
    delay_s: float = DEFAULT_SLOW_DELAY_S
    factor: float = DEFAULT_MISREPORT_FACTOR


class GroundTruth:
    """A simulated miner's true and reported power; mixed into every firmware's miner."""

    model: SimModel
    power: MinerPowerModel
    faults: FaultState
    clock: Callable[[], float]

    @property
    def nameplate_power_w(self) -> float:
        """Stock power (W) of this miner's model."""
        return self.model.nameplate_power_w

    @property
    def nameplate_hashrate_ths(self) -> float:
        """Stock hashrate (TH/s) of this miner's model."""
        return self.model.nameplate_hashrate_ths

    def power_w(self, now_s: float | None = None) -> float:
        """True wall power (W) at ``now_s`` (default: the miner's clock)."""
        return self.power.power_w(self.clock() if now_s is None else now_s)

    def fan_rpm(self, now_s: float) -> int:
        """Fan speed (RPM) at ``now_s``: the simulator's own law, rising with true power."""
        return int(2000 + 3000 * self.power.power_w(now_s) / self.model.nameplate_power_w)

    # The firmware's own under-estimate (stock Antminers estimate, not measure): reported
    # power is true power x (1 - under_report_frac). Set per backend by SimSite.
    under_report_frac: float = 0.0

    def reported_power_w(self, now_s: float) -> float:
        """Power (W) as the firmware reports it (under-reporting and a fault may skew it)."""
        p = self.power.power_w(now_s) * (1.0 - self.under_report_frac)
        if self.faults.fault is Fault.MISREPORT_POWER:
            p *= self.faults.factor
        return p
