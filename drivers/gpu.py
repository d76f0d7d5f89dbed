"""What every GPU node driver gives the agent, local (NVML) or remote (nvidia-smi over SSH).

``GpuInfo`` is what a GPU is (enumerated once at connect), ``GpuReading`` one read
of it, both in SI units. ``GpuNodeDriver`` is the interface the agent drives;
``drivers.nvml.NvmlNodeDriver`` and ``drivers.ssh.SshNodeDriver`` implement it.

A node's fixed overhead (CPU, fans, NICs) is configuration, not something a
driver reads, so nothing here carries it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as enumerated: identity and its power-limit constraints (W)."""

    index: int
    uuid: str
    name: str
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float

    def clamp_power_limit_w(self, power_w: float) -> float:
        """Clamp a wanted power limit (W) into [min, max], rounded down to whole watts.

        Whole watts because ``nvidia-smi -pl`` takes them and NVML's milliwatt
        setter is usually rounded by the driver anyway; rounding down keeps the
        applied limit at or below what was asked, but never below the minimum.
        """
        lo = math.ceil(self.power_limit_min_w)
        hi = math.floor(self.power_limit_max_w)
        if math.isnan(power_w):
            raise ValueError("power limit is NaN")
        return float(min(max(math.floor(power_w), lo), hi))


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One read of one GPU: power W, energy J since driver load, limits W, utilization 0..1.

    ``power_limit_w`` is the limit set through NVML / nvidia-smi;
    ``enforced_power_limit_w`` the one in force (other limiters, e.g. the BMC,
    can hold it lower). Fields the GPU does not report are None.
    """

    index: int
    timestamp_s: float
    power_w: float | None
    energy_j: float | None
    power_limit_w: float | None
    enforced_power_limit_w: float | None
    utilization_frac: float | None
    temperature_c: float | None
    memory_used_bytes: int | None


@runtime_checkable
class GpuNodeDriver(Protocol):
    """One GPU node: its GPUs read together, their power limits set one by one.

    ``read_only`` is True when control is not permitted (no root for NVML, sudo
    refused over SSH); it is known after ``connect`` and can become True later
    when a write is refused.
    """

    node_id: str
    read_only: bool

    async def connect(self) -> list[GpuInfo]:
        """Enumerate the node's GPUs; raises ``domain.errors`` on failure."""
        ...

    async def read(self) -> list[GpuReading]:
        """Read every GPU of the node once, under the driver's timeout."""
        ...

    async def set_power_limit(self, index: int, power_w: float) -> float:
        """Clamp and apply GPU ``index``'s power limit (W); returns the applied W."""
        ...

    async def drain(self) -> None:
        """Run the node's configured drain command (no-op when none)."""
        ...

    async def undrain(self) -> None:
        """Run the node's configured undrain command (no-op when none)."""
        ...

    async def close(self) -> None:
        """Release the node (and restore limits where configured to)."""
        ...
