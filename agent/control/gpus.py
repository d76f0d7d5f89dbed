"""GPU nodes as devices of the control loop.

A node driver reads all of a node's GPUs in one command, but the loop tracks
each GPU as its own device (each has its own power limit). ``GpuNode`` shares
one read among the node's GPUs (single flight: whoever asks while a read is in
flight waits for it), and ``GpuDevice`` presents one GPU with the interface the
agent uses. A node's fixed overhead (CPUs, fans) is a ``FixedLoad`` device:
always counted, never controlled.

The node owns the tasks it shares: the loop reads each GPU under its own timeout,
so every waiter may give up on a hung node while its read goes on until the
driver's own timeout ends it. The node retrieves that outcome itself (a failure
then is already counted by the waiters' timeouts; a driver bug that nobody was
waiting for is logged once, with its traceback).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from siteagent.agent.control.ai_demand import FALLBACK_PREFIX, NodeDemand, NodeDemandReader
from siteagent.domain import (
    DeviceControls,
    DeviceError,
    DeviceFaulted,
    DeviceIdentity,
    DeviceKind,
    DeviceLost,
    DeviceReading,
    DeviceRefused,
    DeviceState,
)
from siteagent.drivers.gpu import GpuInfo, GpuNodeDriver, GpuReading

log = logging.getLogger(__name__)

T = TypeVar("T")


class GpuNode:
    """One GPU node driver, connected once and read once per sweep for all its GPUs."""

    def __init__(
        self,
        driver: GpuNodeDriver,
        *,
        max_age_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        demand: NodeDemandReader | None = None,
    ) -> None:
        self.driver = driver
        # The node's inference server, read alongside its GPUs (None: busy % alone).
        self.demand = demand
        # This read's demand, or why there is none (the GPUs' readings carry either).
        self.demand_now: NodeDemand | None = None
        self.demand_error: str | None = None
        self.max_age_s = max_age_s
        self.clock = clock
        self.infos: dict[int, GpuInfo] | None = None
        self._connecting: asyncio.Task[dict[int, GpuInfo]] | None = None
        self._reading: asyncio.Task[dict[int, GpuReading]] | None = None
        self._last: tuple[float, dict[int, GpuReading]] | None = None
        self._limits_w: dict[int, float] = {}
        self._waiting = 0
        self.drained = False
        # The latest shared connect/read's failure (None after a success).
        self.last_error: BaseException | None = None

    def _share(self, what: str, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start a task the node's GPUs share; the node retrieves its outcome."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.driver.node_id}: {what}")
        task.add_done_callback(self._retrieve)
        return task

    def _retrieve(self, task: asyncio.Task[Any]) -> None:
        # Retrieved here whether or not a waiter is left: otherwise a read that
        # outlives every waiter's timeout is reported by asyncio as never retrieved.
        if task.cancelled():
            return
        error = task.exception()
        self.last_error = error
        if error is None or isinstance(error, DeviceError) or self._waiting:
            # A device failure is counted by the waiters (or by their timeouts);
            # a waiter still there takes the error and the loop logs it.
            return
        log.error("%s failed after every reader had given up", task.get_name(), exc_info=error)

    async def _wait(self, task: asyncio.Task[T]) -> T:
        """Wait for a shared task; a waiter's own timeout cancels only its wait."""
        self._waiting += 1
        try:
            return await asyncio.shield(task)
        finally:
            self._waiting -= 1

    async def connect(self) -> dict[int, GpuInfo]:
        """Enumerate the node's GPUs (once; concurrent callers share the attempt)."""
        if self.infos is not None:
            return self.infos
        if self._connecting is None or self._connecting.done():
            self._connecting = self._share("connect", self._connect())
        return await self._wait(self._connecting)

    async def _connect(self) -> dict[int, GpuInfo]:
        infos = {g.index: g for g in await self.driver.connect()}
        self.infos = infos
        return infos

    async def readings(self) -> dict[int, GpuReading]:
        """All GPUs' latest readings: a fresh one, or the one a concurrent caller is taking."""
        last = self._last
        if last is not None and self.clock() - last[0] <= self.max_age_s:
            return last[1]
        if self._reading is None or self._reading.done():
            self._reading = self._share("read", self._read())
        return await self._wait(self._reading)

    async def _read(self) -> dict[int, GpuReading]:
        if self.demand is None:
            readings = await self.driver.read()
        else:
            # Concurrently: a slow endpoint costs the GPU read no more than its own timeout.
            readings, _ = await asyncio.gather(self.driver.read(), self._read_demand())
        result = {r.index: r for r in readings}
        self._last = (self.clock(), result)
        for r in result.values():
            if r.power_limit_w is not None:
                self._limits_w.setdefault(r.index, r.power_limit_w)
        return result

    async def _read_demand(self) -> None:
        """Read the inference server; a failure leaves busy % as the demand (the GPUs'
        readings say why), never fails the GPU read."""
        assert self.demand is not None
        try:
            self.demand_now, self.demand_error = await self.demand.read(), None
        except DeviceError as e:
            self.demand_now, self.demand_error = None, str(e)
        except Exception as e:
            # A bug in reading demand must not fail the GPUs' read: logged once (with its
            # traceback) when it starts, then the alarm carries it.
            if self.demand_error is None:
                log.exception("%s: reading AI demand failed", self.driver.node_id)
            self.demand_now, self.demand_error = None, f"{type(e).__name__}: {e}"

    def _all_at_minimum(self, limits_w: dict[int, float]) -> bool:
        infos = self.infos or {}
        return bool(infos) and all(
            limits_w.get(i, g.power_limit_max_w) <= g.power_limit_min_w for i, g in infos.items()
        )

    async def set_limit(self, index: int, power_w: float) -> float:
        """Set one GPU's limit (W), draining the node first when this takes every GPU to
        its minimum and undraining it once one comes back above."""
        # Record the intent before any await: the loop sets a node's GPUs concurrently,
        # and the last of them to go down is the one that must drain first.
        self._limits_w[index] = power_w
        if not self.drained and self._all_at_minimum(self._limits_w):
            # Move the customers' requests elsewhere before the node can no longer serve them.
            self.drained = True
            await self.driver.drain()
        applied = await self.driver.set_power_limit(index, power_w)
        self._limits_w[index] = applied
        if self.drained and not self._all_at_minimum(self._limits_w):
            self.drained = False
            await self.driver.undrain()
        return applied


class GpuDevice:
    """One GPU of a node, as the fleet sees a device."""

    def __init__(self, device_id: str, node: GpuNode, index: int) -> None:
        self.device_id = device_id
        self.node = node
        self.index = index

    @property
    def info(self) -> GpuInfo:
        """The GPU's enumerated identity and constraints."""
        infos = self.node.infos
        if infos is None or self.index not in infos:
            raise DeviceLost(f"{self.node.driver.node_id}: GPU {self.index} is not enumerated")
        return infos[self.index]

    @property
    def identity(self) -> DeviceIdentity:
        """Identity and control range; read-only nodes offer no control."""
        info = self.info
        return DeviceIdentity(
            make="NVIDIA",
            model=info.name,
            firmware="",
            mac=None,
            serial=info.uuid,
            capabilities=DeviceControls(
                power_target=not self.node.driver.read_only,
                power_target_min_w=info.power_limit_min_w,
                power_target_max_w=info.power_limit_max_w,
                power_target_default_w=info.power_limit_default_w,
                can_sleep=False,
            ),
            nameplate_power_w=info.power_limit_max_w,
            kind=DeviceKind.GPU,
        )

    async def read(self) -> DeviceReading:
        """This GPU's share of the node's read, as a device reading."""
        r = (await self.node.readings()).get(self.index)
        if r is None:
            raise DeviceLost(f"{self.node.driver.node_id}: GPU {self.index} missing from the read")
        if r.power_w is None:
            raise DeviceFaulted(f"{self.node.driver.node_id}: GPU {self.index} reported no power")
        demand, error = self.node.demand_now, self.node.demand_error
        limit = r.power_limit_w
        if r.enforced_power_limit_w is not None:
            # The limit in force is what bounds the draw (a BMC can hold it lower).
            limit = (
                r.enforced_power_limit_w if limit is None else min(limit, r.enforced_power_limit_w)
            )
        return DeviceReading(
            device_id=self.device_id,
            timestamp_s=r.timestamp_s,
            power_w=r.power_w,
            state=DeviceState.RUNNING,
            temperature_c=r.temperature_c,
            power_target_w=limit,
            utilization_frac=r.utilization_frac,
            demand_frac=None if demand is None else demand.need_frac,
            errors=() if error is None else (FALLBACK_PREFIX + error,),
        )

    async def set_power_target(self, power_w: float) -> float:
        """Set this GPU's power limit (W); returns what was applied."""
        return await self.node.set_limit(self.index, power_w)

    async def sleep(self) -> None:
        """GPUs do not sleep; the policy never asks."""
        raise DeviceRefused("a GPU cannot sleep; lower its power limit instead")

    async def wake(self) -> None:
        """GPUs do not sleep; the policy never asks."""
        raise DeviceRefused("a GPU cannot sleep or wake")


class FixedLoad:
    """A constant load (W) that is always counted: a GPU node's CPUs, fans and NICs."""

    def __init__(self, device_id: str, power_w: float) -> None:
        self.device_id = device_id
        self.power_w = power_w

    @property
    def identity(self) -> DeviceIdentity | None:
        """Nothing to identify."""
        return None

    async def read(self) -> DeviceReading:
        """The configured draw, marked as an estimate."""
        return DeviceReading(
            device_id=self.device_id,
            timestamp_s=time.monotonic(),
            power_w=self.power_w,
            state=DeviceState.RUNNING,
            power_estimated=True,
        )

    async def set_power_target(self, power_w: float) -> float:
        """Not controllable."""
        raise DeviceRefused("a fixed load cannot be controlled")

    async def sleep(self) -> None:
        """Not controllable."""
        raise DeviceRefused("a fixed load cannot be controlled")

    async def wake(self) -> None:
        """Not controllable."""
        raise DeviceRefused("a fixed load cannot be controlled")
