"""The one control loop: read -> snapshot -> plan -> order safely -> apply -> publish.

Telemetry sweeps and control ticks run on their own cadences under
APScheduler; ticks never overlap (one lock), missed runs coalesce, and a cap
drop runs a tick at once instead of waiting for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent.config import Config
from agent.devices import DeviceTracker
from agent.safety import Change, Ordered, order_changes
from domain import DeviceError, DeviceUnreachable, DomainLimit, Limits, Plan, Snapshot
from policies.capping import CappingParams
from policies.capping import plan as capping_plan

log = logging.getLogger("siteagent.loop")

SITE_CAP_SOURCE = "site"


@dataclass(frozen=True, slots=True)
class TickRecord:
    """What one control tick saw and did, for status lines and the decision log."""

    time_s: float
    snapshot: Snapshot
    limits: Limits
    plan: Plan
    ordered: Ordered
    applied: tuple[str, ...]
    failed: tuple[str, ...]
    plan_duration_s: float


class Agent:
    """Owns the trackers, the cap sources and the loop; the only place IO meets decisions."""

    def __init__(
        self,
        config: Config,
        trackers: Iterable[DeviceTracker],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_tick: Callable[[TickRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.trackers = {t.device_id: t for t in trackers}
        self.clock = clock
        self.on_tick = on_tick
        self.params = CappingParams(
            capping_threshold=config.policy.capping_threshold,
            capping_target=config.policy.capping_target,
            uncapping_threshold=config.policy.uncapping_threshold,
            min_off_s=config.policy.min_off_s,
        )
        self._caps: dict[str, float] = {SITE_CAP_SOURCE: config.site.cap_w}
        self._domains = tuple(DomainLimit(d.id, d.limit_w, d.parent) for d in config.domains)
        self._tick_lock = asyncio.Lock()
        self._tick_waiting = False
        self._sweep_lock = asyncio.Lock()
        self._scheduler: AsyncIOScheduler | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.last_plan: Plan | None = None
        self.last_tick: TickRecord | None = None
        self.last_increase_s: float | None = None
        self.actuations: Counter[str] = Counter()
        self.actuation_errors: Counter[str] = Counter()
        self.sweeps = 0
        self.ticks = 0

    # -- limits ------------------------------------------------------------------

    def set_cap(self, source: str, cap_w: float | None) -> None:
        """Add, change or (with None) drop one cap constraint (W); a drop ticks at once."""
        before = self.limits().effective_cap_w
        if cap_w is None:
            if source == SITE_CAP_SOURCE:
                raise ValueError("the site's own cap cannot be removed")
            self._caps.pop(source, None)
        else:
            self._caps[source] = cap_w
        after = self.limits().effective_cap_w
        log.info("cap from %s now %s; effective cap %.0f W -> %.0f W", source, cap_w, before, after)
        if after < before:
            self.request_tick()

    def limits(self) -> Limits:
        """Every limit in force now, combined into the effective cap."""
        source, cap = min(self._caps.items(), key=lambda kv: (kv[1], kv[0]))
        effective = max(0.0, cap - self.config.site.safety_margin_w)
        return Limits(
            site_cap_w=self.config.site.cap_w,
            effective_cap_w=effective,
            cap_source=source,
            overhead_w=self.config.site.overhead_w,
            domains=self._domains,
        )

    # -- telemetry ---------------------------------------------------------------

    async def sweep(self) -> None:
        """Read every device concurrently, each under its own timeout."""
        async with self._sweep_lock:
            now = self.clock()
            sem = asyncio.Semaphore(self.config.telemetry.concurrency)
            due = [t for t in self.trackers.values() if t.next_read_s <= now]
            await asyncio.gather(*(self._read_one(t, sem) for t in due))
            self.sweeps += 1

    async def _read_one(self, t: DeviceTracker, sem: asyncio.Semaphore) -> None:
        tcfg = self.config.telemetry
        async with sem:
            try:
                async with asyncio.timeout(tcfg.timeout_s):
                    if t.driver is None:
                        t.attach(await t.connect())
                    assert t.driver is not None
                    reading = await t.driver.read()
            except TimeoutError:
                err = DeviceUnreachable(f"no answer within {tcfg.timeout_s:.1f} s")
                t.record_failure(err, self.clock(), tcfg.interval_s, tcfg.max_backoff_s)
                return
            except DeviceError as e:
                t.record_failure(e, self.clock(), tcfg.interval_s, tcfg.max_backoff_s)
                return
            except Exception as e:
                # A driver bug must not take the loop down: the device is faulted, we go on.
                log.exception("%s: unexpected error while reading", t.device_id)
                t.record_failure(e, self.clock(), tcfg.interval_s, tcfg.max_backoff_s)
                return
        t.record_reading(reading, self.clock(), self.config.control.confirm_timeout_s)

    # -- control -----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Freeze every tracker's view at this instant."""
        now = self.clock()
        stale = self.config.telemetry.stale_after_s
        return Snapshot(now, tuple(t.status(now, stale) for t in self.trackers.values()))

    def request_tick(self) -> None:
        """Run a control tick as soon as the current one (if any) ends."""
        if self._tick_waiting:
            return
        self._tick_waiting = True
        task = asyncio.get_running_loop().create_task(self._requested_tick())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _requested_tick(self) -> None:
        try:
            await self.tick()
        except Exception:
            log.exception("immediate tick failed")

    async def tick(self) -> TickRecord:
        """One control tick; never overlaps another."""
        async with self._tick_lock:
            self._tick_waiting = False
            return await self._tick()

    async def _tick(self) -> TickRecord:
        started = time.perf_counter()
        snap = self.snapshot()
        limits = self.limits()
        plan = capping_plan(snap, limits, self.params, self.last_plan)
        ordered = order_changes(
            plan, snap, limits, max_increase_w=self._ramp_allowance(snap.time_s)
        )
        plan_duration = time.perf_counter() - started
        results = await asyncio.gather(*(self._apply(c) for c in ordered.now))
        applied = tuple(c.device_id for c, ok in zip(ordered.now, results, strict=True) if ok)
        failed = tuple(c.device_id for c, ok in zip(ordered.now, results, strict=True) if not ok)
        if any(not c.is_decrease for c in ordered.now):
            self.last_increase_s = snap.time_s
        self.last_plan = plan
        self.ticks += 1
        if plan.mode != "hold" or ordered.now:
            log.info(
                "tick: %s (%s); %d change(s) sent, %d deferred, %d failed",
                plan.mode,
                plan.reason,
                len(applied),
                len(ordered.deferred),
                len(failed),
            )
        record = TickRecord(
            snap.time_s, snap, limits, plan, ordered, applied, failed, plan_duration
        )
        self.last_tick = record
        if self.on_tick is not None:
            self.on_tick(record)
        return record

    def _ramp_allowance(self, now_s: float) -> float:
        # Increases are rate-limited: what one step may add is the ramp rate over
        # the time since the last increase, at most one control interval's worth.
        interval = self.config.control.interval_s
        since = interval if self.last_increase_s is None else now_s - self.last_increase_s
        return self.config.policy.restore_ramp_w_per_s * min(max(since, 0.0), interval)

    async def _apply(self, c: Change) -> bool:
        t = self.trackers[c.device_id]
        driver = t.driver
        if driver is None:
            return False
        try:
            async with asyncio.timeout(self.config.control.actuation_timeout_s):
                if c.kind == "sleep":
                    await driver.sleep()
                else:
                    if c.set_target_w is not None:
                        applied = await driver.set_power_target(c.set_target_w)
                        self.actuations["set_power_target"] += 1
                        c = Change(c.device_id, c.kind, c.setpoint, c.old_w, c.new_w, applied)
                    if c.kind == "wake":
                        await driver.wake()
        except (TimeoutError, DeviceError) as e:
            self.actuation_errors[c.kind] += 1
            log.warning("%s: %s failed: %s", c.device_id, c.kind, e or type(e).__name__)
            # We do not know what the device did: count it at its old level and
            # trust only a fresh reading before trying again (no idempotency key).
            t.next_read_s = 0.0
            return False
        if c.kind in ("sleep", "wake"):
            self.actuations[c.kind] += 1
        t.record_command(c.kind, c.old_w, c.new_w, c.set_target_w, self.clock())
        return True

    # -- scheduling --------------------------------------------------------------

    def start(self) -> None:
        """Schedule telemetry sweeps and control ticks on the running event loop."""
        sched = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        first = datetime.now() + timedelta(seconds=0.01)
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        sched.add_job(
            self._sweep_job,
            "interval",
            seconds=self.config.telemetry.interval_s,
            id="telemetry",
            next_run_time=first,
            **common,
        )
        sched.add_job(
            self._tick_job,
            "interval",
            seconds=self.config.control.interval_s,
            id="control",
            next_run_time=first + timedelta(seconds=self.config.control.interval_s),
            **common,
        )
        sched.start()
        self._scheduler = sched

    async def _sweep_job(self) -> None:
        try:
            await self.sweep()
        except Exception:
            log.exception("telemetry sweep failed")

    async def _tick_job(self) -> None:
        try:
            await self.tick()
        except Exception:
            log.exception("control tick failed")

    async def stop(self) -> None:
        """Stop scheduling; let a tick in flight finish; leave devices where they are."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        async with self._tick_lock:
            pass
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
