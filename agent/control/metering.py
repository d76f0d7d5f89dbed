"""The meters' side of the Agent: their read tasks, the fast guard, the frequency response.

The Agent owns one ``SiteMetering`` and calls it at four places: its limits (the
meters' unexplained load in place of the constant overhead, a held block pinned),
its snapshot (the POI meter's power), the end of each tick (the block re-armed), and
start/stop (the read tasks). Everything else happens on a meter's reading, between
ticks: the reading judged (agent/control/meter.py), a tick requested when it is over
the capping threshold, the armed block shed when the frequency dips
(agent/control/frequency.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from siteagent.agent.config import Config, MeterConfig
from siteagent.agent.control.alarms import Alarms
from siteagent.agent.control.devices import close_quietly
from siteagent.agent.control.fleet import Fleet
from siteagent.agent.control.frequency import Event, FrequencyParams, FrequencyResponse
from siteagent.agent.control.meter import (
    MeteringParams,
    Meters,
    MeterState,
    MeterView,
    domain_unexplained_w,
    measured_sums_w,
    read_forever,
)
from siteagent.agent.control.safety import Change
from siteagent.domain import Limits, Snapshot
from siteagent.domain.site import SITE, DomainTree

if TYPE_CHECKING:
    # Types only: the driver brings pymodbus, which only a site with a meter loads.
    from siteagent.drivers.meter import MeterDriver, MeterReading

log = logging.getLogger("siteagent.meter")

MeterReaderFactory = Callable[[MeterConfig, Callable[[], float]], "MeterDriver"]


def default_meter_reader(spec: MeterConfig, clock: Callable[[], float]) -> MeterDriver:
    """The Modbus driver of a configured meter (drivers/meter.py)."""
    # Imported here: pymodbus is only for a site with a meter.
    from siteagent.drivers.meter import meter_driver

    return meter_driver(spec, clock)


def failure_kind(error: BaseException) -> str:
    """The driver's kind of a failed meter read (drivers.meter.MeterError), else a timeout's."""
    from siteagent.drivers.meter import MeterError

    return error.kind if isinstance(error, MeterError) else "timeout"


class SiteMetering:
    """The site's meters and under-frequency response, as the Agent uses them."""

    def __init__(
        self,
        config: Config,
        fleet: Fleet,
        alarms: Alarms,
        *,
        clock: Callable[[], float],
        base_limits: Callable[[], Limits],
        request_tick: Callable[[], None],
        send: Callable[[Sequence[Change]], Awaitable[list[bool]]],
        meter_reader: MeterReaderFactory = default_meter_reader,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.clock = clock
        self._base_limits = base_limits
        self._request_tick = request_tick
        self._send = send
        self._meter_reader = meter_reader
        m = config.metering
        self.meters = Meters(
            config.meters,
            MeteringParams(m.unexplained_window_s, m.rise_horizon_s, m.fallback_window_s),
            alarms,
            overhead_w={SITE: config.site.overhead_w},
            clock=clock,
        )
        fr = config.frequency_response
        self.frequency: FrequencyResponse | None = None
        self._frequency_meter = fr.meter or self.meters.by_domain().get(SITE)
        if fr.enabled:
            params = FrequencyParams(
                fr.trigger_hz,
                fr.trigger_s,
                fr.restore_after_s,
                fr.block_w,
                tuple(fr.devices),
                fr.action,
            )
            self.frequency = FrequencyResponse(params, alarms)
        self._readers: dict[str, MeterDriver] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # (perf_counter s) the last guard sample, and when the last shed began and ended.
        self.guard_requested_s: float | None = None
        self.shed_started_s: float | None = None
        self.shed_done_s: float | None = None

    # -- what the Agent asks ---------------------------------------------------------

    def limits(self, limits: Limits) -> Limits:
        """``limits`` with the meters' unexplained load in place of the constant overhead
        (a feeder's taken off what its devices may draw), and the held block pinned."""
        pins = self.frequency.pins() if self.frequency is not None else ()
        if not self.meters and not pins:
            return limits
        site_w, below = domain_unexplained_w(
            self.meters.views(self.clock()),
            {d.id: d.parent for d in self.config.domains},
            SITE,
            self.config.site.overhead_w,
        )
        domains = tuple(
            replace(d, limit_w=max(0.0, d.limit_w - below.get(d.domain_id, 0.0)))
            for d in limits.domains
        )
        return replace(limits, overhead_w=site_w, domains=domains, pins=limits.pins + pins)

    def snapshot(self, snap: Snapshot) -> Snapshot:
        """``snap`` with the POI meter's power, while it is fresh."""
        site = self.meters.by_domain().get(SITE)
        if site is None:
            return snap
        view = next(v for v in self.meters.views(snap.time_s) if v.meter_id == site)
        return replace(snap, meter_power_w=view.power_w)

    def after_tick(self, snap: Snapshot) -> tuple[MeterView, ...]:
        """Re-arm the block from the tick's snapshot; the meters as the tick saw them."""
        if self.frequency is not None:
            self.frequency.arm(snap)
        return self.meters.views(snap.time_s)

    # -- readings --------------------------------------------------------------------

    def on_reading(self, meter_id: str, reading: MeterReading) -> None:
        """Take one meter reading: its state, the fast guard, the frequency response."""
        now = self.clock()
        spec = self.meters.spec(meter_id)
        tree = DomainTree(self._base_limits())
        sums, settled = measured_sums_w(self.fleet, tree, now, self.config.telemetry.stale_after_s)
        state = self.meters.record(meter_id, reading, sums[spec.domain], now, settled[spec.domain])
        if state is not MeterState.FRESH:
            return
        if self.frequency is not None and meter_id == self._frequency_meter:
            event = self.frequency.observe(reading.frequency_hz, now)
            if event is Event.TRIGGER:
                self._shed_armed()
            elif event is Event.RESTORE:
                # The pins are gone: the plan restores the block (shed before restore, ramp).
                self._request_tick()
        if self.config.metering.fast_guard:
            threshold = self.config.policy.capping_threshold * tree.limit_w[spec.domain]
            if reading.power_w > threshold:
                # Over the capping threshold: tick now, not at the next sweep or tick.
                self.guard_requested_s = time.perf_counter()
                self._request_tick()

    def on_failure(self, meter_id: str, error: BaseException) -> None:
        """A meter read that failed: garbage and frozen at once, else stale as it ages."""
        self.meters.record_failure(meter_id, failure_kind(error), error, self.clock())

    def _shed_armed(self) -> None:
        """Send the armed block's commands now, together, outside the plan and the tick."""
        assert self.frequency is not None and self.frequency.shed is not None
        changes = self.frequency.shed.changes
        self.shed_started_s = time.perf_counter()
        log.warning("under-frequency: shedding %d device(s) now", len(changes))
        task = asyncio.get_running_loop().create_task(self._send_block(changes))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _send_block(self, changes: tuple[Change, ...]) -> None:
        results = await self._send(changes)
        self.shed_done_s = time.perf_counter()
        failed = sum(not ok for ok in results)
        if failed:
            log.warning("under-frequency: %d of %d shed command(s) failed", failed, len(changes))
        # The pins now hold the block: the next tick plans around it.
        self._request_tick()

    # -- the read tasks --------------------------------------------------------------

    def start(self) -> None:
        """Start one read task per meter on the running loop."""
        loop = asyncio.get_running_loop()
        for meter_id in self.meters.ids():
            spec = self.meters.spec(meter_id)
            reader = self._meter_reader(spec, self.clock)
            self._readers[meter_id] = reader
            task = loop.create_task(
                read_forever(
                    meter_id, reader, spec, self.on_reading, self.on_failure, clock=self.clock
                )
            )
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def stop(self) -> None:
        """Cancel the read tasks and a shed in flight; close the drivers."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_quietly(self._readers.values(), "a meter's driver")
        self._readers = {}
