"""Shared vocabulary of siteagent: readings, snapshots, limits, plans and errors.

This package imports nothing else of the project. ``drivers/`` and ``policies/``
both build on it and never on each other; ``agent/`` ties them together.
All quantities carry their unit in the field name (W, TH/s, s, degC).
"""

from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DeviceLost,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.types import (
    DeviceControls,
    DeviceIdentity,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Floor,
    Limits,
    Pin,
    Plan,
    PlanMode,
    Setpoint,
    SetpointTable,
    Snapshot,
    setpoint_rows,
)

__all__ = [
    "DeviceControls",
    "DeviceError",
    "DeviceFaulted",
    "DeviceIdentity",
    "DeviceKind",
    "DeviceLost",
    "DevicePermissionError",
    "DeviceReading",
    "DeviceRefused",
    "DeviceState",
    "DeviceStatus",
    "DeviceUnreachable",
    "DomainLimit",
    "Floor",
    "Limits",
    "Pin",
    "Plan",
    "PlanMode",
    "Setpoint",
    "SetpointTable",
    "Snapshot",
    "setpoint_rows",
]
