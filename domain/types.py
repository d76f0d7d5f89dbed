"""Immutable value types shared by drivers, policies and the agent.

Units are in field names: ``_w`` watts, ``_ths`` terahashes per second, ``_s``
seconds (monotonic unless named ``_unix_s``), ``_c`` degrees Celsius.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from siteagent.domain.table import DeviceTable

T = TypeVar("T")


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


class PlanMode(enum.StrEnum):
    """Why a plan is what it is; every policy answers with one of these."""

    CAP = "cap"  # some domain heads over its capping threshold: shed to the target
    RESTORE = "restore"  # the site is below its uncapping threshold: fill back up
    HOLD = "hold"  # inside the band, or nothing to change: the previous setpoints
    OVERRIDE = "override"  # the operator's directives changed: plan again at once
    ECONOMIC = "economic"  # merit order by net value under every domain's target


@dataclass(frozen=True, slots=True)
class DeviceControls:
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
        lo, hi = self.power_target_min_w, self.power_target_max_w
        return float(
            clamp_power_w(
                power_w,
                math.nan if lo is None else lo,
                math.nan if hi is None else hi,
                self.power_target_step_w,
            )
        )


def clamp_power_w(power_w: float, lo_w: float, hi_w: float, step_w: float) -> float:
    """Clamp a wanted power (W) into [lo_w, hi_w] and down onto lo_w + k * step_w.

    NaN for a bound means none; a step of 0 or less means any value. The one
    clamping rule: ``DeviceControls`` runs it as Python, the numba kernels of
    ``policies.fill`` compile this very function (so it stays plain scalar code).
    """
    lo = power_w if math.isnan(lo_w) else lo_w
    hi = power_w if math.isnan(hi_w) else hi_w
    clamped = min(max(power_w, lo), hi)
    if step_w > 0:
        # Round down onto the step so a clamped target never exceeds what was asked.
        clamped = lo + ((clamped - lo) // step_w) * step_w
    return clamped


def clamp_power_w_array(
    power_w: npt.NDArray[np.float64],
    lo_w: npt.NDArray[np.float64],
    hi_w: npt.NDArray[np.float64],
    step_w: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """``clamp_power_w`` elementwise over arrays (W), for planners that compile nothing.

    The same operations in the same order, so each element is the very float
    ``clamp_power_w`` gives (tests/test_site.py compares them).
    """
    lo = np.where(np.isnan(lo_w), power_w, lo_w)
    hi = np.where(np.isnan(hi_w), power_w, hi_w)
    clamped = np.minimum(np.maximum(power_w, lo), hi)
    stepped = step_w > 0
    step = np.where(stepped, step_w, 1.0)
    return np.where(stepped, lo + ((clamped - lo) // step) * step, clamped)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a device is, as identified once: a miner over its management API (firmware,
    MAC, nameplate hashrate), a GPU through NVML or nvidia-smi (no firmware or hashrate)."""

    make: str
    model: str
    firmware: str
    mac: str | None
    serial: str | None
    capabilities: DeviceControls
    nameplate_power_w: float | None = None
    nameplate_hashrate_ths: float | None = None  # None: the device does not hash
    kind: DeviceKind = DeviceKind.MINER


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
    # What the inference server asks for, as a fraction of the GPU's peak capacity (its
    # node's endpoint: queue, running requests, KV cache); None where none was read.
    demand_frac: float | None = None


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
    capabilities: DeviceControls
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
class Floor:
    """Power (W) one device must keep for a customer's contract, as far as the caps allow.

    ``contract`` names the contract (its GPU node or priority class) for alarms and audit.
    """

    device_id: str
    power_w: float
    contract: str = ""


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
    # Contract floors in force this tick: every policy keeps them within the caps.
    floors: tuple[Floor, ...] = ()

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
    devices: Sequence[DeviceStatus]  # a tuple, or rows made on demand from ``table``
    meter_power_w: float | None = None
    # The devices as columns (row i is devices[i]), where the producer keeps them.
    table: DeviceTable | None = None

    @property
    def budget_w(self) -> float:
        """Worst-case device power (W), summed."""
        if self.table is not None:
            return float(self.table.budget_w.sum())
        return sum(d.budget_w for d in self.devices)

    @property
    def measured_w(self) -> float:
        """Device power as last read (W), summed; unread devices count zero."""
        if self.table is not None:
            return float(np.nansum(self.table.power_w))
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


class Column(Protocol):
    """One column of a table: a list, or a one-dimensional numpy array."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: Any, /) -> Any: ...


class RowsOnDemand(Sequence[T]):
    """A sequence whose items are made only when asked for (50,000 objects cost more
    than what most consumers do with them). Subclasses give ``__len__`` and ``_at``.
    Equal to any sequence of equal items."""

    __slots__ = ()

    def _at(self, i: int) -> T:
        """Item ``i`` (0 <= i < len), made or kept."""
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[T]: ...
    def __getitem__(self, i: int | slice) -> T | Sequence[T]:
        if isinstance(i, slice):
            return tuple(self)[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._at(i)

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self)):
            yield self._at(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


class SetpointTable(RowsOnDemand[Setpoint]):
    """Setpoints held as columns, each ``Setpoint`` (and its reason) made when asked for.

    A plan for 50,000 devices is computed as arrays; building 50,000 objects and
    reason strings would cost more than the plan. ``head`` comes first as given
    (pinned devices); column ``i`` is the ``len(head) + i``-th setpoint. A
    ``power_target_w`` of NaN means None. Equal to any sequence of equal setpoints.
    """

    __slots__ = ("_awake", "_head", "_ids", "_index", "_planned", "_reason", "_rows", "_target")

    def __init__(
        self,
        head: Sequence[Setpoint],
        ids: Sequence[str],
        awake: Column,
        power_target_w: Column,
        planned_w: Column,
        reason: Callable[[int], str],
        rows: Column | None = None,
    ) -> None:
        self._head = tuple(head)
        self._ids = ids
        self._awake = awake
        self._target = power_target_w
        self._planned = planned_w
        self._reason = reason
        self._rows = rows
        self._index: dict[str, int] | None = None

    @property
    def rows(self) -> Column | None:
        """Column: each id's row in the snapshot the plan was made from, where known."""
        return self._rows

    @property
    def ids(self) -> Sequence[str]:
        """Device ids of the columns, in order (the head excluded)."""
        return self._ids

    @property
    def awake(self) -> Column:
        """Column: awake, per id."""
        return self._awake

    @property
    def power_target_w(self) -> Column:
        """Column: the power target (W), NaN for none, per id."""
        return self._target

    @property
    def planned_w(self) -> Column:
        """Column: planned power (W), per id."""
        return self._planned

    @property
    def head(self) -> tuple[Setpoint, ...]:
        """The setpoints given whole, ahead of the columns."""
        return self._head

    @property
    def reasons(self) -> Callable[[int], str]:
        """The words of column ``i``'s setpoint, made when called."""
        return self._reason

    def __len__(self) -> int:
        return len(self._head) + len(self._ids)

    def _make(self, i: int) -> Setpoint:
        target = float(self._target[i])
        return Setpoint(
            self._ids[i],
            bool(self._awake[i]),
            None if target != target else target,
            float(self._planned[i]),
            self._reason(i),
        )

    def _at(self, i: int) -> Setpoint:
        h = len(self._head)
        return self._head[i] if i < h else self._make(i - h)

    def find(self, device_id: str) -> Setpoint | None:
        """The setpoint for one device, found through an index built on first use."""
        for sp in self._head:
            if sp.device_id == device_id:
                return sp
        if self._index is None:
            self._index = {d: i for i, d in enumerate(self._ids)}
        i = self._index.get(device_id)
        return None if i is None else self._make(i)


def setpoint_rows(
    setpoints: Sequence[Setpoint],
) -> Iterator[tuple[int, str, bool, float | None, float]]:
    """(index, device id, awake, power target W or None, planned W) of each setpoint.

    Where the plan holds columns (``SetpointTable``) no ``Setpoint`` and no reason is
    made: a consumer that needs only the numbers of 50,000 devices reads them here.
    """
    if not isinstance(setpoints, SetpointTable):
        for i, sp in enumerate(setpoints):
            yield i, sp.device_id, sp.awake, sp.power_target_w, sp.planned_w
        return
    head = setpoints.head
    for i, sp in enumerate(head):
        yield i, sp.device_id, sp.awake, sp.power_target_w, sp.planned_w
    cols = zip(
        setpoints.ids,
        _as_list(setpoints.awake),
        _as_list(setpoints.power_target_w),
        _as_list(setpoints.planned_w),
        strict=True,
    )
    for i, (dev, awake, target, planned) in enumerate(cols, start=len(head)):
        yield i, dev, bool(awake), None if target != target else float(target), float(planned)


def _as_list(col: Column) -> list[Any]:
    tolist = getattr(col, "tolist", None)
    return list(tolist()) if callable(tolist) else [col[i] for i in range(len(col))]


@dataclass(frozen=True, slots=True)
class Plan:
    """A policy's answer: a setpoint for every controllable device.

    ``mode`` is a ``PlanMode`` (compared equal to its value, e.g. ``"cap"``).
    """

    time_s: float
    mode: str
    effective_cap_w: float
    planned_w: float
    reason: str
    setpoints: Sequence[Setpoint] = field(default=())
    directives_key: str = ""
    # Devices whose contract floor the plan could not keep under the caps (caps win).
    broken_floors: tuple[str, ...] = ()

    def setpoint_for(self, device_id: str) -> Setpoint | None:
        """The setpoint for one device, or None if the plan leaves it alone."""
        if isinstance(self.setpoints, SetpointTable):
            return self.setpoints.find(device_id)
        for sp in self.setpoints:
            if sp.device_id == device_id:
                return sp
        return None
