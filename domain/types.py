"""Immutable value types shared by drivers, policies and the agent.

Units are in field names: ``_w`` watts, ``_ths`` terahashes per second, ``_s``
seconds (monotonic unless named ``_unix_s``), ``_c`` degrees Celsius.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DeviceKind(enum.StrEnum):
    """What sort of load a device is."""

    MINER = "miner"
    GPU = "gpu"
    AUX = "aux"  # a fixed load the agent only counts: a GPU node's CPUs and fans


class DeviceState(enum.StrEnum):
    """Operating state as the agent knows it."""

    MINING = "mining"
    RUNNING = "running"  # a GPU (or fixed load) that is up; GPUs never sleep
    SLEEPING = "sleeping"
    UNREACHABLE = "unreachable"
    FAULTED = "faulted"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class MinerCapabilities:
    """What a device lets us control, in watts: a miner's power target or a GPU's power limit."""

    power_target: bool
    power_target_min_w: float | None = None
    power_target_max_w: float | None = None
    power_target_default_w: float | None = None
    power_target_step_w: float = 1.0
    can_sleep: bool = False
    reports_power: bool = True

    def clamp_power_target_w(self, power_w: float) -> float:
        """Clamp a wanted power target (W) into the device's range and onto its step."""
        lo = self.power_target_min_w if self.power_target_min_w is not None else power_w
        hi = self.power_target_max_w if self.power_target_max_w is not None else power_w
        clamped = min(max(power_w, lo), hi)
        step = self.power_target_step_w
        if step > 0:
            # Round down onto the step so a clamped target never exceeds what was asked.
            clamped = lo + ((clamped - lo) // step) * step
        return float(clamped)


@dataclass(frozen=True, slots=True)
class MinerIdentity:
    """Who a miner is, as identified once over its management API."""

    make: str
    model: str
    firmware: str
    mac: str | None
    serial: str | None
    capabilities: MinerCapabilities
    nameplate_power_w: float | None = None
    nameplate_hashrate_ths: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One good telemetry read of one device."""

    device_id: str
    timestamp_s: float
    power_w: float | None
    state: DeviceState
    hashrate_ths: float | None = None
    temperature_c: float | None = None
    power_target_w: float | None = None
    power_estimated: bool = False
    utilization_frac: float | None = None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """The agent's whole view of one device at snapshot time.

    ``budget_w`` is the device's worst-case power as the agent accounts it now
    (DESIGN.md invariant 1); ``expected_w`` is where it settles once the
    changes already sent have taken effect. Policies plan with these.
    """

    device_id: str
    kind: DeviceKind
    domain: str
    state: DeviceState
    nameplate_power_w: float
    nameplate_hashrate_ths: float
    sleep_power_w: float
    capabilities: MinerCapabilities
    budget_w: float
    expected_w: float
    controllable: bool
    reading: DeviceReading | None = None
    reading_age_s: float | None = None
    power_target_w: float | None = None
    awake: bool | None = None
    last_transition_s: float | None = None
    last_error: str | None = None
    wakes_last_hour: int = 0

    @property
    def efficiency_j_per_th(self) -> float:
        """Nameplate efficiency (J/TH); infinite for a device that hashes nothing."""
        if self.nameplate_hashrate_ths <= 0:
            return float("inf")
        return self.nameplate_power_w / self.nameplate_hashrate_ths


@dataclass(frozen=True, slots=True)
class DomainLimit:
    """A power domain (feeder, transformer, rack) and its limit (W)."""

    domain_id: str
    limit_w: float
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class Pin:
    """An operator's pin: hold one device at a level (W; 0 puts a miner to sleep), or exclude it.

    An excluded device is left alone and counted at its worst case.
    """

    device_id: str
    power_w: float | None
    exclude: bool = False
    source: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit the plan must respect, already combined.

    ``effective_cap_w`` is min(site cap, overrides, events) minus the safety
    margin; ``cap_source`` names what set it.
    """

    site_cap_w: float
    effective_cap_w: float
    cap_source: str
    overhead_w: float = 0.0
    domains: tuple[DomainLimit, ...] = ()
    pins: tuple[Pin, ...] = ()
    mining_off: bool = False
    ai_min: bool = False

    @property
    def directives_key(self) -> str:
        """A fingerprint of the operator's directives; a change forces a re-plan."""
        pins = ",".join(
            f"{p.device_id}={'x' if p.exclude else p.power_w}"
            for p in sorted(self.pins, key=lambda p: p.device_id)
        )
        return f"mining_off={self.mining_off};ai_min={self.ai_min};pins={pins}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a policy may look at, frozen at one instant."""

    time_s: float
    devices: tuple[DeviceStatus, ...]
    meter_power_w: float | None = None

    @property
    def budget_w(self) -> float:
        """Worst-case device power (W), summed."""
        return sum(d.budget_w for d in self.devices)

    @property
    def measured_w(self) -> float:
        """Device power as last read (W), summed; unread devices count zero."""
        return sum(
            d.reading.power_w
            for d in self.devices
            if d.reading is not None and d.reading.power_w is not None
        )


@dataclass(frozen=True, slots=True)
class Setpoint:
    """What one device should do, and why."""

    device_id: str
    awake: bool
    power_target_w: float | None
    planned_w: float
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """A policy's answer: a setpoint for every controllable device.

    ``mode`` is ``cap`` (shedding to the capping target), ``restore`` (filling
    back up to it) or ``hold`` (inside the hysteresis band, nothing changes).
    """

    time_s: float
    mode: str
    effective_cap_w: float
    planned_w: float
    reason: str
    setpoints: tuple[Setpoint, ...] = field(default=())
    directives_key: str = ""

    def setpoint_for(self, device_id: str) -> Setpoint | None:
        """The setpoint for one device, or None if the plan leaves it alone."""
        for sp in self.setpoints:
            if sp.device_id == device_id:
                return sp
        return None
