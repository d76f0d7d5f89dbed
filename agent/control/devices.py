"""How the agent talks to each device: its driver, how to connect, when to read it next.

A ``DeviceLink`` is the IO side of one device and nothing more; what the agent
knows of the device (readings, failures, commands, its worst case) is the
``Fleet``'s (agent/control/fleet.py), which also decides the link's back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from siteagent.domain import DeviceIdentity, DeviceKind, DeviceReading, DeviceUnreachable

log = logging.getLogger("siteagent.devices")


class DeviceDriver(Protocol):
    """What the agent needs of a device driver: a miner (drivers.asic.AsicDriver), a GPU
    (agent.control.gpus.GpuDevice) or a fixed load."""

    @property
    def identity(self) -> DeviceIdentity | None: ...

    async def read(self) -> DeviceReading: ...

    async def set_power_target(self, power_w: float) -> float: ...

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...


Connector = Callable[[], Awaitable[DeviceDriver]]

T = TypeVar("T")


async def within(timeout_s: float, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` (a reading, a command) under its deadline; past it, or ended by a
    cancel nobody asked of this task, it failed as ``DeviceUnreachable``.

    The second is a library's cancel that escaped it (grpclib cancels the task that
    waits on a call whose connection went away, drivers/transport/grpc.py): left as
    a ``CancelledError``, the reading or command ended with no outcome at all, and
    its miner was not asked again (a worker's reads, agent/control/workers.py). A
    cancel that was asked (the agent stopping, a tick's deadline) is raised as it
    came.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await call()
    except TimeoutError:
        raise DeviceUnreachable(f"no answer within {timeout_s:.1f} s") from None
    except asyncio.CancelledError:
        if cancel_asked():
            raise
        log.debug("a cancel nobody asked for ended a call", exc_info=True)
        raise DeviceUnreachable(UNASKED_CANCEL) from None


UNASKED_CANCEL = "no answer: the call was cancelled inside its driver"


def cancel_asked() -> bool:
    """In an ``except asyncio.CancelledError``: whether the cancel was asked of this
    task (the agent stopping, a deadline), not a library's own that escaped it
    (``within``)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


# Closes started per pass of the event loop. All at once, 10,000 of them (a scan's
# identification drivers) held the loop, and a tick due, for about 100 ms: their
# first steps ran in one pass, and a gather of them took in 10,000 results in another.
CLOSE_BATCH = 500


async def close_quietly(drivers: Iterable[object], what: str) -> None:
    """Close each driver that keeps something open (``close``: a VNish web connection, a
    Braiins OS channel), together; a failure is logged (debug), not raised."""
    closes = [c for d in drivers if (c := getattr(d, "close", None)) is not None]
    if not closes:
        return
    loop = asyncio.get_running_loop()
    all_done: asyncio.Future[None] = loop.create_future()
    left = len(closes)

    def one_done(task: asyncio.Task[object]) -> None:
        nonlocal left
        if not task.cancelled() and (e := task.exception()) is not None:
            log.debug("closing %s: %s", what, e)
        left -= 1
        if left == 0 and not all_done.done():
            all_done.set_result(None)

    tasks: list[asyncio.Task[object]] = []
    try:
        for k in range(0, len(closes), CLOSE_BATCH):
            if k:
                await asyncio.sleep(0)  # the loop runs what else is due between batches
            for close in closes[k : k + CLOSE_BATCH]:
                task = asyncio.ensure_future(close())
                task.add_done_callback(one_done)
                tasks.append(task)
        await all_done
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        raise


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What the config or a scan says of a device before it is read; the fleet starts from it."""

    kind: DeviceKind
    domain: str
    nameplate_power_w: float
    nameplate_hashrate_ths: float
    sleep_power_w: float
    # Whether each nameplate figure is the config's default for an unknown model, which
    # the model the device identifies as then replaces.
    nameplate_power_is_default: bool = False
    nameplate_hashrate_is_default: bool = False


class DeviceLink:
    """One device's IO: its id and address, how to connect, the connected driver, and
    when (clock s) to read it next. No state a snapshot reads lives here."""

    __slots__ = ("address", "connect", "device_id", "driver", "next_read_s", "node", "spec")

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
        node: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.connect = connect
        self.spec = DeviceSpec(
            kind,
            domain,
            nameplate_power_w,
            nameplate_hashrate_ths,
            sleep_power_w,
            *nameplate_is_default,
        )
        # The GPU node it is one GPU of (its failures are the node's): logged per node.
        self.node = node
        self.driver: DeviceDriver | None = None
        self.next_read_s = 0.0

    @property
    def kind(self) -> DeviceKind:
        """What kind of device it is (never changes)."""
        return self.spec.kind

    @property
    def domain(self) -> str:
        """The power domain it sits in (never changes)."""
        return self.spec.domain

    def settle_s(self, kind: str) -> float:
        """How long (s) the firmware takes to show a change of ``kind``; 0 if it does not say."""
        settle = getattr(self.driver, "settle_s", None)
        return 0.0 if settle is None else float(settle(kind))
