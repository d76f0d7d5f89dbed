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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from siteagent.agent.config import SITE_DOMAIN_ID, Config, ConfigError, cron_trigger
from siteagent.agent.control.ai_demand import Contracts
from siteagent.agent.control.alarms import AI_DEMAND_FALLBACK, Alarms, check_tick
from siteagent.agent.control.devices import (
    UNASKED_CANCEL,
    DeviceDriver,
    DeviceLink,
    cancel_asked,
    close_quietly,
    within,
)
from siteagent.agent.control.fleet import Fleet
from siteagent.agent.control.grid import GridCaps
from siteagent.agent.control.meter import MeterView
from siteagent.agent.control.metering import (
    MeterReaderFactory,
    SiteMetering,
    default_meter_reader,
)
from siteagent.agent.control.prices import PriceFeed, economic_params, static_prices
from siteagent.agent.control.reload import reload_problems
from siteagent.agent.control.safety import (
    Change,
    Ordered,
    Picked,
    Send,
    WithReason,
    order_changes,
    sends,
    worst_case_loads_w,
)
from siteagent.agent.ops.metrics import SWEEP_BUCKETS_S, TICK_BUCKETS_S, Durations, VenStatus
from siteagent.domain import (
    DeviceError,
    DevicePermissionError,
    DeviceReading,
    DeviceRefused,
    DeviceUnreachable,
    DomainLimit,
    Limits,
    Pin,
    Plan,
    Snapshot,
)
from siteagent.domain.site import DomainTree
from siteagent.policies import Policy, PolicyParams, PolicyState, get_policy
from siteagent.policies.capping import CappingParams
from siteagent.policies.prices import Prices

if TYPE_CHECKING:
    from siteagent.agent.control.workers import WorkerTelemetry

log = logging.getLogger("siteagent.loop")

SITE_CAP_SOURCE = "site"
MONITOR_ONLY, MINING_OFF, AI_MIN = "monitor-only", "mining-off", "ai-min"
MODES = frozenset({MONITOR_ONLY, MINING_OFF, AI_MIN})
# Why a change planned this tick was not sent: its turn (control.concurrency at once)
# had not come when the tick's actuation deadline passed.
NOT_SENT_IN_TIME = "not sent: the tick's actuation deadline passed before its turn"

V = TypeVar("V")
# Every job: never two at once, missed runs coalesced into one, however late.
JOB_OPTIONS = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}


def _change_words(what: str, old_w: float | None, new_w: float | None) -> str:
    """A cap's change in words: 'cap from ovr-1 (6000 W) added'."""
    if new_w is None:
        return f"{what} ({old_w or 0:.0f} W) removed"
    if old_w is None:
        return f"{what} ({new_w:.0f} W) added"
    return f"{what} changed from {old_w:.0f} W to {new_w:.0f} W"


def _same_device(old: DeviceLink, new: DeviceLink) -> bool:
    # Imported here: agent.inventory brings pyasic, which only a scanning agent needs.
    from siteagent.agent.control.inventory import same_device

    return same_device(old, new)


def _primed_policy(
    name: str, params: PolicyParams, snap: Snapshot, limits: Limits, prices: Prices
) -> Policy:
    """The policy ``name``, made and run once (its plan discarded), for a worker thread: a
    first switch imports and compiles what it needs (the economic policy: numba, 1-3 s),
    which would otherwise hold the event loop in the next tick. Policies are pure."""
    policy = get_policy(name, params)
    try:
        policy.plan(snap, limits, prices, PolicyState())
    except Exception as e:
        # Only a warm-up, its plan discarded: the next tick plans for real (and says why).
        log.debug("policy %s: warm-up plan failed: %s", name, e)
    return policy


class OverrideRefused(Exception):
    """An override the agent will not apply; the message says why."""


def _put(table: dict[str, V], key: str, value: V | None) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


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
    meters: tuple[MeterView, ...] = ()


class Agent:
    """Owns the fleet, the cap sources and the loop; the only place IO meets decisions."""

    def __init__(
        self,
        config: Config,
        links: Iterable[DeviceLink],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_tick: Callable[[TickRecord], None] | None = None,
        rescan: Callable[[], Awaitable[list[DeviceLink]]] | None = None,
        meter_reader: MeterReaderFactory = default_meter_reader,
    ) -> None:
        self.config = config
        self.fleet = Fleet(links)
        self.clock = clock
        self.on_tick = on_tick
        self.rescan = rescan
        self.wall_clock = wall_clock
        self._windows = [(w, cron_trigger(w.cron, w.timezone)) for w in config.schedule.windows]
        self.params = CappingParams(
            capping_threshold=config.policy.capping_threshold,
            capping_target=config.policy.capping_target,
            uncapping_threshold=config.policy.uncapping_threshold,
            min_off_s=config.policy.min_off_s,
            max_wakes_per_hour=config.policy.max_wakes_per_hour,
        )
        # Conditions an operator must hear about once (a broken floor, stale prices, ...).
        self.alarms = Alarms(wall_clock=lambda: self.wall_clock().timestamp())
        # Contracts on GPU nodes: each tick's floors from the inference servers' demand.
        self.contracts = Contracts(config)
        self._tick_line: tuple[str, int] | None = None
        # Prices for the economic policy: static, or a file/HTTP series refreshed on a schedule.
        self.price_feed = PriceFeed(config, alarms=self.alarms)
        self.prices: Callable[[], Prices] = self.price_feed.prices
        self.economic_params = economic_params(config)
        # The configured policy, chosen by name (its module imported only now), and what it
        # derived last tick; the agent hands that back with each snapshot.
        self.policy = get_policy(
            config.policy.name, PolicyParams(self.params, self.economic_params)
        )
        self.policy_state = PolicyState()
        self._caps: dict[str, float] = {SITE_CAP_SOURCE: config.site.cap_w}
        self._domain_caps: dict[str, dict[str, float]] = {d.id: {} for d in config.domains}
        self._modes: dict[str, str] = {}
        self._pins: dict[str, Pin] = {}
        # Run-time grid events (the event book), and the instants a tick is due at (their starts).
        self.grid_caps: GridCaps | None = None
        self._tick_times: dict[str, datetime] = {}
        self._tick_lock = asyncio.Lock()
        # Read by other threads (the metrics renderer waits while a tick runs).
        self.ticking = False
        self._tick_waiting = False
        self._sweep_lock = asyncio.Lock()
        self._scheduler: AsyncIOScheduler | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Devices that refused a command: (refusals in a row, clock time of the next try).
        self._refused: dict[str, tuple[int, float]] = {}
        self.last_plan: Plan | None = None
        self.last_tick: TickRecord | None = None
        # When (clock) the last tick ended: the watchdog asks that ticks keep ending.
        self.last_tick_done_s: float | None = None
        self.last_increase_s: float | None = None
        self.actuations: Counter[str] = Counter()
        self.actuation_errors: Counter[str] = Counter()
        self.sweeps = 0
        self.ticks = 0
        self.sweep_durations = Durations(SWEEP_BUCKETS_S)
        self.tick_durations = Durations(TICK_BUCKETS_S)
        self.last_sweep_s: float | None = None
        # The last reload (SIGHUP): whether it was applied, and when (Unix s); None before one.
        self.last_reload: tuple[bool, float] | None = None
        # The OpenADR VEN's state for the metrics, when one runs (agent/grid/openadr.py).
        self.ven_status: VenStatus | None = None
        # The meters and the under-frequency response (agent/control/metering.py).
        self.metering = SiteMetering(
            config,
            self.fleet,
            self.alarms,
            clock=clock,
            base_limits=self._limits,
            request_tick=self.request_tick,
            send=self._send_now,
            meter_reader=meter_reader,
        )
        self.meters = self.metering.meters
        self.frequency = self.metering.frequency
        # Miners read and commanded in worker processes (telemetry.workers); None: all here.
        self.telemetry: WorkerTelemetry | None = None

    # -- limits ------------------------------------------------------------------

    def set_cap(self, source: str, cap_w: float | None) -> None:
        """Add, change or (with None) drop one cap constraint (W); a drop ticks at once."""
        if cap_w is None and source == SITE_CAP_SOURCE:
            raise ValueError("the site's own cap cannot be removed")
        what = _change_words(f"cap from {source}", self._caps.get(source), cap_w)
        self._changing(lambda: _put(self._caps, source, cap_w), what)

    def set_domain_cap(self, domain_id: str, source: str, cap_w: float | None) -> None:
        """Add, change or drop one cap (W) on a domain; KeyError for an unknown domain."""
        if domain_id not in self._domain_caps:
            raise KeyError(domain_id)
        caps = self._domain_caps[domain_id]
        what = _change_words(f"{domain_id} cap from {source}", caps.get(source), cap_w)
        self._changing(lambda: _put(caps, source, cap_w), what)

    def set_mode(self, source: str, mode: str | None) -> None:
        """Set (or with None clear) an operator mode: monitor-only, mining-off or ai-min."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        what = f"mode {mode} from {source} set" if mode else f"mode from {source} cleared"
        self._changing(lambda: _put(self._modes, source, mode), what)

    def set_pin(
        self, source: str, device_id: str, power_w: float | None, *, exclude: bool = False
    ) -> None:
        """Pin a device at a level (W; 0 sleeps a miner) or exclude it; None clears the pin.

        A pin that would take any domain's worst case over its limit is refused.
        """
        if power_w is None and not exclude:
            self._changing(lambda: self._pins.pop(source, None), f"pin from {source} cleared")
            return
        if device_id not in self.fleet:
            raise OverrideRefused(f"unknown device {device_id!r}")
        if not exclude:
            assert power_w is not None
            if power_w < 0:
                raise OverrideRefused(f"a pin needs a power of 0 W or more, not {power_w}")
            self._check_pin_fits(self.fleet.row(device_id), power_w)
        pin = Pin(device_id, power_w, exclude, source)
        held = "excluded from control" if exclude else f"pinned at {power_w:.0f} W"
        self._changing(lambda: _put(self._pins, source, pin), f"{device_id} {held} by {source}")

    def clear_source(self, source: str) -> None:
        """Drop every cap, mode and pin set under one source (an override's id)."""

        def drop() -> None:
            if source != SITE_CAP_SOURCE:
                self._caps.pop(source, None)
            for caps in self._domain_caps.values():
                caps.pop(source, None)
            self._modes.pop(source, None)
            self._pins.pop(source, None)

        self._changing(drop, f"{source} ended ({self._held_by(source)})")

    def _held_by(self, source: str) -> str:
        """What ``source`` holds, in words: 'cap 6000 W, mode mining-off'."""
        held = []
        if source != SITE_CAP_SOURCE and source in self._caps:
            held.append(f"cap {self._caps[source]:.0f} W")
        held += [f"{d} cap {c[source]:.0f} W" for d, c in self._domain_caps.items() if source in c]
        if source in self._modes:
            held.append(f"mode {self._modes[source]}")
        pin = self._pins.get(source)
        if pin is not None:
            held.append(f"{'exclusion' if pin.exclude else 'pin'} of {pin.device_id}")
        return ", ".join(held) or "nothing in force"

    def _check_pin_fits(self, row: int, power_w: float) -> None:
        now = self.clock()
        stale = self.config.telemetry.stale_after_s
        fleet = self.fleet
        current = fleet.budget_w(row, now, stale)
        t = fleet.link(row)
        level = float(fleet.sleep_w[row]) if power_w == 0 else power_w
        delta = level - current
        if delta <= 0:
            return  # a pin that lowers a device never breaks a cap
        limits = self.limits()
        tree = DomainTree(limits)
        load = worst_case_loads_w(tree, self.snapshot(), limits.overhead_w)
        for node in tree.chain(t.domain):
            if load[node] + delta > tree.limit_w[node]:
                raise OverrideRefused(
                    f"pinning {t.device_id} at {power_w:.0f} W would take {node} to "
                    f"{load[node] + delta:.0f} W (worst case), over its limit "
                    f"{tree.limit_w[node]:.0f} W"
                )

    def _changing(self, change: Callable[[], object], what: str) -> None:
        before = self.limits()
        change()
        after = self.limits()
        if after.effective_cap_w == before.effective_cap_w:
            log.info("%s; no change of effective cap (%.0f W)", what, after.effective_cap_w)
        else:
            log.info(
                "%s: effective cap %.0f W -> %.0f W",
                what,
                before.effective_cap_w,
                after.effective_cap_w,
            )
        lowered = after.effective_cap_w < before.effective_cap_w or any(
            a.limit_w < b.limit_w for a, b in zip(after.domains, before.domains, strict=True)
        )
        if lowered or after.directives_key != before.directives_key:
            self.request_tick()

    def change_caps(self, change: Callable[[], object], what: str) -> None:
        """Make a change to a cap source kept outside the agent (the event book), as
        ``set_cap`` does: logged, and a tick at once when it lowers a cap."""
        self._changing(change, what)

    def set_grid_caps(self, caps: GridCaps | None) -> None:
        """Take run-time grid events' caps (site and domain) into the limits from now on."""
        self._changing(lambda: setattr(self, "grid_caps", caps), "grid events source set")

    def tick_at(self, key: str, when_unix_s: float | None) -> None:
        """Run a control tick at a wall-clock instant (an event's start); None forgets it."""
        now = self.wall_clock()
        # Instants gone by are done with (APScheduler drops its date jobs once run).
        self._tick_times = {k: t for k, t in self._tick_times.items() if t > now and k != key}
        if when_unix_s is not None:
            self._tick_times[key] = datetime.fromtimestamp(when_unix_s, UTC)
        self._schedule_tick_at(key)

    def _schedule_tick_at(self, key: str) -> None:
        sched = self._scheduler
        if sched is None:
            return  # start() schedules what is due
        job_id = f"tick-at:{key}"
        if sched.get_job(job_id) is not None:
            sched.remove_job(job_id)
        when = self._tick_times.get(key)
        if when is not None and when > self.wall_clock():
            sched.add_job(
                self._tick_soon,
                "date",
                run_date=when,
                id=job_id,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )

    def _grid_caps_now(self, now: datetime) -> Mapping[str, tuple[float, str]]:
        return {} if self.grid_caps is None else self.grid_caps.in_force(now.timestamp())

    @property
    def monitor_only(self) -> bool:
        """Whether an operator asked for no actuation at all."""
        return MONITOR_ONLY in self._modes.values()

    def scheduled_caps(self, now: datetime | None = None) -> dict[str, float]:
        """Caps (W) of the windows and demand-response events in force at ``now``."""
        now = now or self.wall_clock()
        out: dict[str, float] = {}
        for w, trigger in self._windows:
            # In force if the window's latest start lies within its duration before now.
            start = trigger.get_next_fire_time(None, now - timedelta(seconds=w.duration_s))
            if start is not None and start <= now < start + timedelta(seconds=w.duration_s):
                out[f"window:{w.name}"] = w.cap_w
        for e in self.config.schedule.events:
            if e.start <= now < e.start + timedelta(seconds=e.duration_s):
                out[f"demand-response:{e.name}"] = e.target_w
        for source, (cap_w, domain) in self._grid_caps_now(now).items():
            if domain == SITE_DOMAIN_ID:
                out[source] = cap_w
        return out

    def limits(self) -> Limits:
        """Every limit in force now, combined into the effective cap; the meters' load."""
        return self.metering.limits(self._limits())

    def _limits(self) -> Limits:
        now = self.wall_clock()
        caps = {**self._caps, **self.scheduled_caps(now)}
        source, cap = min(caps.items(), key=lambda kv: (kv[1], kv[0]))
        effective = max(0.0, cap - self.config.site.safety_margin_w)
        grid = self._grid_caps_now(now)
        domains = tuple(
            DomainLimit(
                d.id,
                min(
                    [
                        d.limit_w,
                        *self._domain_caps[d.id].values(),
                        *(c for c, dom in grid.values() if dom == d.id),
                    ]
                ),
                d.parent,
            )
            for d in self.config.domains
        )
        modes = set(self._modes.values())
        return Limits(
            site_cap_w=self.config.site.cap_w,
            effective_cap_w=effective,
            cap_source=source,
            overhead_w=self.config.site.overhead_w,
            domains=domains,
            pins=tuple(self._pins.values()),
            mining_off=MINING_OFF in modes,
            ai_min=AI_MIN in modes,
        )

    # -- telemetry ---------------------------------------------------------------

    async def sweep(self, *, wait_for_workers: bool = True) -> None:
        """Read every device concurrently, each under its own timeout. Without
        ``wait_for_workers`` it returns once the worker processes are asked (the sweep
        counts as done when they have answered): the scheduler's next sweep is then
        not skipped while a slow worker answers, and asks only for the miners that
        worker is not still reading (agent/control/workers.py)."""
        async with self._sweep_lock:
            started = time.perf_counter()
            now = self.clock()
            sem = asyncio.Semaphore(self.config.telemetry.concurrency)
            links = self.fleet.links()
            due = [row for row, link in enumerate(links) if link.next_read_s <= now]
            remote: list[Awaitable[None]] = []
            if self.telemetry is not None:
                due, remote = self.telemetry.split(due)
            local = asyncio.gather(*(self._read_one(row, sem) for row in due))
            answered = asyncio.ensure_future(self._answered(local, remote, started))
            await local
        if wait_for_workers:
            await answered
        else:
            self._background.add(answered)
            answered.add_done_callback(self._background.discard)

    async def _answered(
        self, local: Awaitable[list[None]], remote: list[Awaitable[None]], started: float
    ) -> None:
        """Wait for both parts of a sweep, the agent's and the workers', then count it."""
        await asyncio.gather(local, *remote)
        self.sweeps += 1
        self.last_sweep_s = self.clock()
        self.sweep_durations.observe(time.perf_counter() - started)

    async def _read_one(self, row: int, sem: asyncio.Semaphore) -> None:
        tcfg = self.config.telemetry
        fleet = self.fleet
        t = fleet.link(row)

        async def read() -> DeviceReading:
            if t.driver is None:
                fleet.attach(row, await t.connect())
            assert t.driver is not None
            return await t.driver.read()

        async with sem:
            try:
                reading = await within(tcfg.timeout_s, read)
            except DeviceError as e:
                fleet.record_failure(row, e, self.clock(), tcfg.interval_s, tcfg.max_backoff_s)
                return
            except Exception as e:
                # A driver bug must not take the loop down: the device is faulted, we go on.
                log.exception("%s: unexpected error while reading", t.device_id)
                fleet.record_failure(row, e, self.clock(), tcfg.interval_s, tcfg.max_backoff_s)
                return
        fleet.record_reading(row, reading, self.clock(), self.config.control.confirm_timeout_s)

    # -- control -----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Freeze every device's view at this instant (columns, devices made on demand)."""
        snap = self.fleet.snapshot(self.clock(), self.config.telemetry.stale_after_s)
        return self.metering.snapshot(snap)

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
            self.ticking = True
            try:
                return await self._tick()
            finally:
                self.ticking = False

    async def _tick(self) -> TickRecord:
        started = time.perf_counter()
        snap = self.snapshot()
        limits = self.floored(self.limits(), snap)
        plan = self.plan(snap, limits)
        ordered = order_changes(
            plan, snap, limits, max_increase_w=self._ramp_allowance(snap.time_s)
        )
        if self.monitor_only:
            ordered = ordered.hold_all("monitor-only override: nothing is sent")
        # What each change sends, from the ordering's columns: a Change, with its
        # setpoint's words, is made only where read (a change held back, a decision log).
        send = sends(ordered.now)
        ordered, send = self._hold_refused(ordered, send, snap.time_s)
        plan_duration = time.perf_counter() - started
        # At most control.concurrency at once, in the tick's order: a cap drop at a
        # 10,000-miner site changes thousands, and each call in flight holds its own
        # buffers and streams. All share one deadline, so the tick takes no longer than
        # before; a change whose turn has not come by then is not sent, and the next
        # tick plans it again. (A tick sends only decreases or only increases, each
        # counted at its worst case, so sending part of them is safe.)
        sem = asyncio.Semaphore(self.config.control.concurrency)
        deadline = asyncio.get_running_loop().time() + self.config.control.actuation_timeout_s
        results = await asyncio.gather(*(self._apply(c, sem, deadline) for c in send))
        outcome = list(zip(send, results, strict=True))
        applied = tuple(c.device_id for c, ok in outcome if ok)
        failed = tuple(c.device_id for c, ok in outcome if ok is False)
        late = [k for k, ok in enumerate(results) if ok is None]
        if late:
            log.warning(
                "tick: %d of %d change(s) not sent within %.0f s; the next tick plans them again",
                len(late),
                len(send),
                self.config.control.actuation_timeout_s,
            )
            sent = [k for k, ok in enumerate(results) if ok is not None]
            held = WithReason(Picked(ordered.now, late), NOT_SENT_IN_TIME)
            ordered = ordered.holding(Picked(ordered.now, sent), held)
        if any(not c.is_decrease for c, ok in outcome if ok is not None):
            self.last_increase_s = snap.time_s
        self.last_plan = plan
        self.ticks += 1
        check_tick(self.alarms, snap, limits, plan, self.contracts.node_floors_w(limits))
        self.alarms.update(AI_DEMAND_FALLBACK, self.contracts.fallback_reason(snap))
        # The tick line when something was sent or the plan's state moved, not every tick.
        line = (plan.mode, len(ordered.deferred))
        if ordered.now or (plan.mode != "hold" and line != self._tick_line):
            log.info(
                "tick: %s (%s); %d change(s) sent, %d deferred, %d failed",
                plan.mode,
                plan.reason,
                len(applied),
                len(ordered.deferred),
                len(failed),
            )
        self._tick_line = line
        meters = self.metering.after_tick(snap)
        record = TickRecord(
            snap.time_s, snap, limits, plan, ordered, applied, failed, plan_duration, meters
        )
        self.last_tick = record
        self.last_tick_done_s = self.clock()
        self.tick_durations.observe(time.perf_counter() - started)
        if self.on_tick is not None:
            self.on_tick(record)
        return record

    def _hold_refused(
        self, ordered: Ordered, send: list[Send], now_s: float
    ) -> tuple[Ordered, list[Send]]:
        """Hold changes for devices that refused one, until their back-off ends: a device
        that refuses is not asked again every tick (holding a change sends less, never more)."""
        waiting = {d for d, (_, retry_s) in self._refused.items() if retry_s > now_s}
        if not waiting or not any(c.device_id in waiting for c in send):
            return ordered, send
        held = [k for k, c in enumerate(send) if c.device_id in waiting]
        now = [k for k, c in enumerate(send) if c.device_id not in waiting]
        why = "refused its last command; asked again after its back-off"
        held_back = WithReason(Picked(ordered.now, held), why)
        return ordered.holding(Picked(ordered.now, now), held_back), [send[k] for k in now]

    def floored(self, limits: Limits, snap: Snapshot) -> Limits:
        """``limits`` with this snapshot's contract floors (``ai_demand.Contracts``)."""
        if not self.contracts.contracts:
            return limits
        return replace(limits, floors=self.contracts.floors(snap))

    def plan(self, snap: Snapshot, limits: Limits) -> Plan:
        """The configured policy's plan for this snapshot, against the last plan adopted."""
        limits = self.floored(limits, snap)
        state = PolicyState(self.last_plan, self.policy_state.derived)
        prices = self.prices() if self.policy.reads_prices else None
        plan, self.policy_state = self.policy.plan(snap, limits, prices, state)
        return plan

    def _ramp_allowance(self, now_s: float) -> float:
        # Increases are rate-limited: what one step may add is the ramp rate over
        # the time since the last increase, at most one control interval's worth.
        interval = self.config.control.interval_s
        since = interval if self.last_increase_s is None else now_s - self.last_increase_s
        return self.config.policy.restore_ramp_w_per_s * min(max(since, 0.0), interval)

    async def _send_now(self, changes: Sequence[Change]) -> list[bool]:
        """Send ``changes`` at once, together, outside a tick (the under-frequency block)."""
        deadline = asyncio.get_running_loop().time() + self.config.control.actuation_timeout_s
        return list(await asyncio.gather(*(self._apply_now(c, deadline) for c in sends(changes))))

    async def _apply(self, c: Send, sem: asyncio.Semaphore, deadline: float) -> bool | None:
        """Send ``c`` in its turn: whether the device took it, None if not sent by the
        deadline (``loop.time()``)."""
        try:
            async with asyncio.timeout_at(deadline):
                await sem.acquire()
        except TimeoutError:
            return None
        try:
            return await self._apply_now(c, deadline)
        finally:
            sem.release()

    async def _apply_now(self, c: Send, deadline: float) -> bool:
        fleet = self.fleet
        row = fleet.row(c.device_id)
        driver = fleet.link(row).driver
        if driver is None or fleet.read_only[row]:
            return False
        try:
            async with asyncio.timeout_at(deadline):
                if c.kind == "sleep":
                    await driver.sleep()
                else:
                    if c.set_target_w is not None:
                        applied = await driver.set_power_target(c.set_target_w)
                        self.actuations["set_power_target"] += 1
                        c = Send(c.device_id, c.kind, c.old_w, c.new_w, applied)
                    if c.kind == "wake":
                        await driver.wake()
        except DevicePermissionError as e:
            # Our credentials refused: nothing changed; it is read-only from now on.
            self.actuation_errors[c.kind] += 1
            fleet.mark_read_only(row, e)
            return False
        except DeviceRefused as e:
            # Refused outright: nothing changed on the device.
            self.actuation_errors[c.kind] += 1
            refusals, _ = self._refused.get(c.device_id, (0, 0.0))
            # One line when it starts refusing, one when it accepts again; between, back off.
            if refusals == 0:
                log.warning("%s: %s refused: %s; retrying with back-off", c.device_id, c.kind, e)
            else:
                log.debug("%s: %s refused again: %s", c.device_id, c.kind, e)
            delay_s = min(
                self.config.control.interval_s * 2**refusals, self.config.telemetry.max_backoff_s
            )
            self._refused[c.device_id] = (refusals + 1, self.clock() + delay_s)
            fleet.read_soon(row)
            return False
        except asyncio.CancelledError:
            if cancel_asked():
                raise
            return self._failed_change(c, row, DeviceUnreachable(UNASKED_CANCEL))
        except (TimeoutError, DeviceError) as e:
            return self._failed_change(c, row, e)
        if c.kind in ("sleep", "wake"):
            self.actuations[c.kind] += 1
        refused = self._refused.pop(c.device_id, None)
        if refused is not None:
            log.info("%s: %s accepted again after %d refusal(s)", c.device_id, c.kind, refused[0])
        fleet.record_command(row, c.kind, c.old_w, c.new_w, c.set_target_w, self.clock())
        return True

    def _failed_change(self, c: Send, row: int, e: Exception) -> bool:
        """A change sent with no outcome known (timed out, cut, unreachable): logged,
        and counted at both its levels until a reading says which."""
        fleet = self.fleet
        self.actuation_errors[c.kind] += 1
        why = str(e) or (
            "not done within control.actuation_timeout_s "
            f"({self.config.control.actuation_timeout_s:g} s)"
            if isinstance(e, TimeoutError)
            else type(e).__name__
        )
        log.warning("%s: %s failed: %s", c.device_id, c.kind, why)
        # We do not know what the device did. Count both outcomes: recorded as
        # sent but unconfirmed, it counts at the higher of its old and new level
        # until a fresh reading says which; no retry before that reading
        # (these APIs have no idempotency key).
        fleet.record_command(row, c.kind, c.old_w, c.new_w, c.set_target_w, self.clock())
        fleet.read_soon(row)
        return False

    # -- scheduling --------------------------------------------------------------

    def start(self) -> None:
        """Schedule telemetry sweeps and control ticks on the running event loop."""
        sched = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        first = datetime.now() + timedelta(seconds=0.01)
        common = JOB_OPTIONS
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
        self._schedule_windows(sched)
        if self.price_feed.live:
            sched.add_job(
                self._price_job,
                "interval",
                seconds=self.config.prices.poll_interval_s,
                id="prices",
                next_run_time=first,
                **common,
            )
        if self.rescan is not None:
            sched.add_job(
                self._scan_job,
                "interval",
                seconds=self.config.inventory.scan_interval_s,
                id="inventory",
                **common,
            )
        sched.start()
        self._scheduler = sched
        for key in list(self._tick_times):
            self._schedule_tick_at(key)
        self.metering.start()

    def _schedule_windows(self, sched: AsyncIOScheduler) -> None:
        # A window or event that lowers the cap ticks at its start, not up to a tick later.
        common = JOB_OPTIONS
        for w, trigger in self._windows:
            sched.add_job(self._tick_soon, trigger, id=f"window:{w.name}", **common)
        for e in self.config.schedule.events:
            if e.start > self.wall_clock():
                sched.add_job(
                    self._tick_soon, "date", run_date=e.start, id=f"event:{e.name}", **common
                )

    def domains_in_use(self) -> dict[str, list[str]]:
        """Domain -> what needs it now: the tracked devices in it and the sources of its caps."""
        out: dict[str, list[str]] = {}
        for t in self.fleet.links():
            out.setdefault(t.domain, []).append(t.device_id)
        for domain_id, caps in self._domain_caps.items():
            for source in caps:
                out.setdefault(domain_id, []).append(f"a cap from {source}")
        out.pop(SITE_CAP_SOURCE, None)  # the root of the tree, never a configured domain
        return out

    async def reconfigure(self, config: Config, added: Iterable[DeviceLink] = ()) -> bool:
        """Put a reloaded ``config`` in force between ticks, adopting ``added`` devices.

        A tick sees the old config or the new one, never half of each. ConfigError,
        nothing changed, if it drops a domain a tracked device or a cap in force still
        uses (``agent.control.reload.reload_problems``). Returns whether the limits got
        tighter (a tick is then requested at once). Drivers of moved devices are closed.
        """
        old = self.config
        econ = economic_params(config)
        policy = None
        if old.policy != config.policy or old.gpu_nodes != config.gpu_nodes:
            params = PolicyParams(econ.capping, econ)
            snap, limits = self.snapshot(), self.limits()
            policy = await asyncio.to_thread(
                _primed_policy, config.policy.name, params, snap, limits, static_prices(config)
            )
        async with self._tick_lock:
            # Again under the lock: a scan or an override may have come since the check.
            problems = reload_problems(config, self.domains_in_use())
            if problems:
                raise ConfigError("the reloaded config", problems)
            before = self.limits()
            self.config = config
            self._windows = [(w, cron_trigger(w.cron, w.timezone)) for w in config.schedule.windows]
            self._domain_caps = {d.id: self._domain_caps.get(d.id, {}) for d in config.domains}
            self._caps[SITE_CAP_SOURCE] = config.site.cap_w
            self.economic_params = econ
            self.params = econ.capping
            self.contracts = Contracts(config, self.contracts.curve)
            if policy is not None:
                # Policies are pure between ticks: the plan adopted last (kept) is all a new
                # one needs; what the old one derived is its own, so it starts afresh.
                self.policy = policy
                self.policy_state = PolicyState()
            self.price_feed.reconfigure(config)
            dropped = self.adopt(added)
            if self._scheduler is not None:
                self._reschedule(self._scheduler, old)
            after = self.limits()
        was_w = {d.domain_id: d.limit_w for d in before.domains}
        tighter = after.effective_cap_w < before.effective_cap_w or any(
            d.limit_w < was_w.get(d.domain_id, float("inf")) for d in after.domains
        )
        if tighter or after.directives_key != before.directives_key:
            self.request_tick()
        await self.close_dropped(dropped)
        return tighter

    def _reschedule(self, sched: AsyncIOScheduler, old: Config) -> None:
        """Bring the scheduler's jobs in line with a reloaded config."""
        new = self.config
        for job_id, was_s, now_s in (
            ("telemetry", old.telemetry.interval_s, new.telemetry.interval_s),
            ("control", old.control.interval_s, new.control.interval_s),
            ("inventory", old.inventory.scan_interval_s, new.inventory.scan_interval_s),
        ):
            if was_s != now_s and sched.get_job(job_id) is not None:
                sched.reschedule_job(job_id, trigger="interval", seconds=now_s)
        for job in sched.get_jobs():
            if job.id.startswith(("window:", "event:")):
                job.remove()
        self._schedule_windows(sched)
        if old.prices == new.prices:
            return
        if sched.get_job("prices") is not None:
            sched.remove_job("prices")
        if self.price_feed.live:
            # Read at once: a new source's first prices should not wait a whole interval.
            sched.add_job(
                self._price_job,
                "interval",
                seconds=new.prices.poll_interval_s,
                id="prices",
                next_run_time=datetime.now(),
                **JOB_OPTIONS,
            )

    def adopt(self, found: Iterable[DeviceLink]) -> list[DeviceDriver]:
        """Take in what a scan found: new devices join; a known one at a new address moves.

        Returns the drivers of moved devices, which no link holds any more (the
        caller closes them: ``close_dropped``).
        """
        dropped: list[DeviceDriver] = []
        rows: list[int] = []  # new or moved: the telemetry workers take them
        for t in found:
            old = self.fleet.get_link(t.device_id)
            if old is None:
                log.info("%s (%s): new device, now tracked", t.device_id, t.address)
                self.fleet.add(t)
                rows.append(self.fleet.row(t.device_id))
            elif old.address != t.address and not _same_device(old, t):
                # Another device under a taken id: counted (once), never controlled.
                if f"{t.device_id}@{t.address}" not in self.fleet:
                    from siteagent.agent.control.inventory import counted_only

                    self.fleet.add(counted_only(t, old))
            elif old.address != t.address:
                log.warning("%s: moved from %s to %s", t.device_id, old.address, t.address)
                row = self.fleet.row(t.device_id)
                driver = self.fleet.move(row, t)
                rows.append(row)
                if driver is not None:
                    dropped.append(driver)
        if self.telemetry is not None:
            # Read where the others are, not here: a large site grows by whole racks.
            # Told even of none: each closes what the scan's identification left it.
            dropped += self.telemetry.take(rows)
        return dropped

    async def close_dropped(self, drivers: list[DeviceDriver]) -> None:
        """Close drivers no link holds (what they keep open: VNish and Braiins OS
        connections), once the sweep and the tick that may still be using them end."""
        if not drivers:
            return
        async with self._sweep_lock:
            pass
        async with self._tick_lock:
            pass
        await close_quietly(drivers, "a moved miner's old driver")

    async def _tick_soon(self) -> None:
        # A coroutine, so APScheduler runs it on the loop rather than in a worker thread.
        self.request_tick()

    async def _price_job(self) -> None:
        try:
            await self.price_feed.refresh()
        except Exception:
            log.exception("price refresh failed")

    async def _scan_job(self) -> None:
        if self.rescan is None:
            return
        try:
            await self.close_dropped(self.adopt(await self.rescan()))
        except Exception:
            log.exception("inventory scan failed")

    async def _sweep_job(self) -> None:
        try:
            await self.sweep(wait_for_workers=False)
        except asyncio.CancelledError:
            # Only the scheduler's shutdown (``stop``) cancels it: not an error.
            log.info("telemetry sweep cut short: the agent is stopping")
        except Exception:
            log.exception("telemetry sweep failed")

    async def _tick_job(self) -> None:
        try:
            await self.tick()
        except Exception:
            log.exception("control tick failed")

    async def stop(self) -> None:
        """Stop scheduling; let a tick in flight finish; leave devices where they are.

        The scheduler's shutdown cancels the jobs it is running, so it waits until
        the tick in flight has finished (a write cut there would leave its outcome
        unknown); a sweep in flight only reads, and is cancelled.
        """
        sched, self._scheduler = self._scheduler, None
        if sched is not None:
            sched.pause()
        async with self._tick_lock:
            if sched is not None:
                sched.shutdown(wait=False)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.metering.stop()
