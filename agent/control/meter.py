"""The site's meters in the loop: freshness, the unexplained load, the fallback.

Each meter is read by its own task at its own interval (not per tick). The driver
(drivers/meter.py) judges each answer and says why one is unusable (garbage: NaN,
a wrong scale, negative import where there can be none; frozen: the same answer
``frozen_after_reads`` times in a row); here a meter is *garbage* or *frozen* from
such an answer until a good reading, *stale* when no good reading came for
``stale_after_s`` (no answer, a timeout), else *fresh*. A meter that is not fresh
raises one alarm (``meter-fault``) and is replaced by the fallback.

The unexplained load of a domain is its meter minus the devices' measured sum below
it: cooling, losses, lighting and miners that under-report. The plan counts it in
place of the constant ``site.overhead_w``. It is filtered by a *windowed maximum*
over ``metering.unexplained_window_s``, not an average: an average lags a rise, and
lagging a rise is what takes a site over its cap, while a maximum follows a rise at
the next sample and forgets a fall only after the window (the cost is a little
headroom, never the cap). While it climbs to new highs, the latest value is carried
on at its rate of rise over the window for ``metering.rise_horizon_s`` (the
worst-case bound until the next tick). A fall
below zero (devices over-reporting, or a shed the devices have not yet reported) is
not credited: the plan never counts less than the devices.

Why the meter minus the devices' *measured* sum, not their expected one: a device's
true draw is at least what it reports (the simulated and real firmwares that
misreport under-report), so the meter plus each device's possible rise above its
reading bounds the site's worst case. The price is that a miner's under-reporting
is counted twice (in the unexplained load, and in its budget at its commanded
level): a site whose miners under-report by 10 % plans about that much lower.

The fallback, for a meter that is not fresh: the device sum, plus the configured
overhead, plus the largest unexplained load seen over ``metering.fallback_window_s``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from siteagent.agent.config import MeterConfig
from siteagent.agent.control.alarms import METER_FAULT, Alarms
from siteagent.agent.control.fleet import Fleet
from siteagent.domain.site import DomainTree, domain_loads_w

if TYPE_CHECKING:
    # Types only: the driver brings pymodbus, which only a site with a meter loads.
    from siteagent.drivers.meter import MeterDriver, MeterReading

log = logging.getLogger("siteagent.meter")

# The driver's kinds of failure (drivers.meter.MeterErrorKind) that mark a meter bad at
# once; any other failure (unreachable, timeout) makes it stale once its last good ages.
BAD_KINDS = {"garbage": "garbage", "map": "garbage", "frozen": "frozen"}
# A read (with SunSpec discovery: several requests, each under the driver's timeout) is
# cut after this many timeouts.
BACKSTOP_TIMEOUTS = 4
# A meter reading this far below what its settled devices report is no measurement: the
# devices misreport by a few per cent, not by a fifth.
BELOW_DEVICES_FRAC = 0.2


class MeterState(enum.StrEnum):
    """What a meter's readings are worth now."""

    FRESH = "fresh"
    STALE = "stale"
    FROZEN = "frozen"
    GARBAGE = "garbage"


@dataclass(frozen=True, slots=True)
class MeteringParams:
    """How readings become the planned load (s; W)."""

    unexplained_window_s: float = 10.0
    rise_horizon_s: float = 5.0
    fallback_window_s: float = 900.0


@dataclass(frozen=True, slots=True)
class MeterView:
    """One meter as the tick sees it (W; Hz; s)."""

    meter_id: str
    domain: str
    state: MeterState
    reason: str | None  # why it is not fresh
    power_w: float | None  # the last good reading, while fresh
    frequency_hz: float | None  # the last good reading's, while fresh
    device_sum_w: float  # the devices' measured sum below the domain at the last sample
    estimated_w: float  # without the meter: that sum plus the domain's configured overhead
    unexplained_w: float | None  # the last sample's meter minus device sum
    planned_unexplained_w: float  # what the plan counts beside the devices
    age_s: float | None  # of the last good reading


class _Track:
    """One meter's state: its last good reading, its repeats, its unexplained history."""

    def __init__(self, spec: MeterConfig) -> None:
        self.spec = spec
        self.good_s: float | None = None  # when the last good reading came (clock s)
        self.power_w: float | None = None
        self.frequency_hz: float | None = None
        self.bad: tuple[MeterState, str] | None = None  # frozen or garbage, with why
        self.error: str | None = None  # the last read's failure
        self.device_sum_w = 0.0
        self.unexplained_w: float | None = None
        # (clock s, W) of every good sample's unexplained load, over the fallback window.
        self.history: deque[tuple[float, float]] = deque()


class Meters:
    """Every configured meter: what each says, what it is worth, what the plan counts."""

    def __init__(
        self,
        specs: Iterable[MeterConfig],
        params: MeteringParams,
        alarms: Alarms,
        *,
        overhead_w: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tracks = {s.id: _Track(s) for s in specs}
        self.params = params
        self.alarms = alarms
        # The configured overhead per domain, which the fallback keeps counting.
        self.overhead_w = dict(overhead_w or {})
        self.clock = clock
        self.samples = 0
        # A meter never read is stale once it has had its stale_after_s since the start:
        # a first read that fails (a connection still opening) is not yet an alarm.
        self.started_s = clock()

    def __bool__(self) -> bool:
        return bool(self._tracks)

    def ids(self) -> list[str]:
        """The meters' ids, as configured."""
        return list(self._tracks)

    def spec(self, meter_id: str) -> MeterConfig:
        """One meter's config."""
        return self._tracks[meter_id].spec

    def by_domain(self) -> dict[str, str]:
        """Each metered domain's meter id (one meter per domain)."""
        return {t.spec.domain: m for m, t in self._tracks.items()}

    # -- what the meters say -----------------------------------------------------------

    def record(
        self,
        meter_id: str,
        reading: MeterReading,
        device_sum_w: float,
        now_s: float,
        settled_sum_w: float = 0.0,
    ) -> MeterState:
        """Take one reading and the devices' measured sum (W) below its domain at
        ``now_s``; garbage if it is well below what the settled devices report alone."""
        t = self._tracks[meter_id]
        self.samples += 1
        t.error, t.bad = None, None
        if reading.power_w < (1.0 - BELOW_DEVICES_FRAC) * settled_sum_w:
            # A scale factor too small or a map on the wrong registers reads as a light
            # load, which only the devices' own reports give away.
            t.bad = (
                MeterState.GARBAGE,
                f"reads {reading.power_w:.0f} W, below the {settled_sum_w:.0f} W its settled "
                "devices report alone (a scale factor or map error?)",
            )
            return self._judged(meter_id, now_s)
        t.good_s, t.power_w, t.frequency_hz = now_s, reading.power_w, reading.frequency_hz
        t.device_sum_w = device_sum_w
        t.unexplained_w = reading.power_w - device_sum_w
        t.history.append((now_s, t.unexplained_w))
        horizon = now_s - max(self.params.fallback_window_s, self.params.unexplained_window_s)
        while t.history and t.history[0][0] < horizon:
            t.history.popleft()
        return self._judged(meter_id, now_s)

    def record_failure(
        self, meter_id: str, kind: str, error: BaseException, now_s: float
    ) -> MeterState:
        """A read that failed, of the driver's ``kind``: garbage or frozen at once, else
        stale once its last good reading ages."""
        t = self._tracks[meter_id]
        t.error = str(error) or type(error).__name__
        bad = BAD_KINDS.get(kind)
        if bad is not None:
            t.bad = (MeterState(bad), t.error)
        return self._judged(meter_id, now_s)

    def state(self, meter_id: str, now_s: float) -> tuple[MeterState, str | None]:
        """A meter's state at ``now_s`` and why it is not fresh."""
        t = self._tracks[meter_id]
        if t.bad is not None:
            return t.bad
        stale_s = self._stale_s(t)
        if t.good_s is None or now_s - t.good_s > stale_s:
            since = "never read" if t.good_s is None else f"{now_s - t.good_s:.1f} s"
            why = f"no good reading ({since}; stale after {stale_s:.1f} s)"
            return MeterState.STALE, why + (f": {t.error}" if t.error else "")
        return MeterState.FRESH, None

    @staticmethod
    def _stale_s(t: _Track) -> float:
        return t.spec.stale_after_s or 3 * t.spec.interval_s

    def _judged(self, meter_id: str, now_s: float) -> MeterState:
        state, _ = self.state(meter_id, now_s)
        self.check(now_s)
        return state

    def check(self, now_s: float) -> None:
        """Raise, update or clear the meter alarm for every meter's state at ``now_s``."""
        faults = []
        for m, t in self._tracks.items():
            state, why = self.state(m, now_s)
            starting = t.good_s is None and now_s - self.started_s <= self._stale_s(t)
            if state is not MeterState.FRESH and not (starting and t.bad is None):
                fallback_w = self.planned_unexplained_w(m, now_s)
                faults.append(
                    f"meter {m} ({self._tracks[m].spec.domain}) {state.value}: {why}; "
                    f"counting the device sum + {fallback_w:.0f} W"
                )
        self.alarms.update(METER_FAULT, "; ".join(faults) or None)

    # -- what the plan counts ----------------------------------------------------------

    def planned_unexplained_w(self, meter_id: str, now_s: float) -> float:
        """What the plan counts beside the devices in the meter's domain (W).

        Fresh: the windowed maximum of the unexplained load, or its fast rise
        extrapolated, whichever is higher, never below zero. Not fresh: the
        configured overhead plus the largest unexplained load seen over the fallback
        window.
        """
        t = self._tracks[meter_id]
        state, _ = self.state(meter_id, now_s)
        if state is MeterState.FRESH:
            return max(0.0, self._window_max_w(t, now_s), self._rising_w(t, now_s))
        seen = self._seen_max_w(t, now_s - self.params.fallback_window_s)
        return self.overhead_w.get(t.spec.domain, 0.0) + max(0.0, seen)

    @staticmethod
    def _seen_max_w(t: _Track, since_s: float) -> float:
        return max((w for s, w in t.history if s >= since_s), default=0.0)

    def _window_max_w(self, t: _Track, now_s: float) -> float:
        return self._seen_max_w(t, now_s - self.params.unexplained_window_s)

    def _rising_w(self, t: _Track, now_s: float) -> float:
        """The latest unexplained load, carried on while it climbs to new highs (W).

        Only a rise above everything else in the window is carried on, at its rate
        over the window (from the window's oldest sample, over at least the window's
        length): a steady climb at its rate; a step (a chiller starting) at a fraction
        of it, the window's maximum holding the step itself; a return to the usual
        level after a dip (a shed the meter saw before the devices reported it) not at
        all, being no new high. Over less than the window's length a rate would turn
        one noisy sample into a site's worth.
        """
        window_s = self.params.unexplained_window_s
        recent = [(s, w) for s, w in t.history if s >= now_s - window_s]
        if len(recent) < 2:
            return 0.0
        (s0, w0), (s1, w1) = recent[0], recent[-1]
        if w1 <= max(w for _, w in recent[:-1]):
            return w1
        rate = (w1 - w0) / max(s1 - s0, window_s)
        return w1 + max(0.0, rate) * self.params.rise_horizon_s

    def views(self, now_s: float) -> tuple[MeterView, ...]:
        """Every meter as the tick sees it at ``now_s``."""
        out = []
        for m, t in self._tracks.items():
            state, why = self.state(m, now_s)
            fresh = state is MeterState.FRESH
            out.append(
                MeterView(
                    meter_id=m,
                    domain=t.spec.domain,
                    state=state,
                    reason=why,
                    power_w=t.power_w if fresh else None,
                    frequency_hz=t.frequency_hz if fresh else None,
                    device_sum_w=t.device_sum_w,
                    estimated_w=t.device_sum_w + self.overhead_w.get(t.spec.domain, 0.0),
                    unexplained_w=t.unexplained_w if fresh else None,
                    planned_unexplained_w=self.planned_unexplained_w(m, now_s),
                    age_s=None if t.good_s is None else max(0.0, now_s - t.good_s),
                )
            )
        return tuple(out)


def domain_unexplained_w(
    views: Sequence[MeterView], parents: Mapping[str, str | None], root: str, overhead_w: float
) -> tuple[float, dict[str, float]]:
    """What the plan counts beside the devices: at the root (the site), and in each domain
    below it (W).

    A metered domain counts its meter's planned unexplained load; an unmetered one the
    sum of its children's; the site counts its own meter's, or without one the
    configured overhead plus its children's (a feeder's unexplained load is the site's
    load too).
    """
    planned = {v.domain: v.planned_unexplained_w for v in views}
    children: dict[str, list[str]] = {}
    for d, p in parents.items():
        children.setdefault(p or root, []).append(d)
    below: dict[str, float] = {}

    def walk(node: str) -> float:
        total = sum(walk(c) for c in children.get(node, []))
        if node in planned:
            total = planned[node]
        below[node] = total
        return total

    site_w = walk(root)
    if root not in planned:
        site_w += overhead_w
    below.pop(root, None)
    return site_w, {d: w for d, w in below.items() if w > 0}


def measured_sums_w(
    fleet: Fleet, tree: DomainTree, now_s: float, stale_after_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Every domain's devices' measured sum (W) as last read (unread devices count zero),
    and the same over the settled devices only: read within ``stale_after_s`` with no
    command of ours in flight (a shed device's last reading is not yet its draw)."""
    st = fleet.statics()
    names, code = st.domain_codes
    n = len(fleet)
    w = np.nan_to_num(fleet.reading_power_w[:n], nan=0.0)
    with np.errstate(invalid="ignore"):
        settled = ~fleet.has_pending[:n] & (now_s - fleet.last_ok_s[:n] <= stale_after_s)
    return (
        domain_loads_w(tree, names, code, w),
        domain_loads_w(tree, names, code, np.where(settled, w, 0.0)),
    )


async def read_forever(
    meter_id: str,
    reader: MeterDriver,
    spec: MeterConfig,
    on_reading: Callable[[str, MeterReading], None],
    on_failure: Callable[[str, BaseException], None],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Read one meter at its interval until cancelled.

    The driver keeps each read's timeout (and drops its connection when one passes,
    so a late answer cannot be taken for the next one's); the bound here only stops a
    read that hangs past it. A failure is logged at debug level only: the meter alarm
    is its one line.
    """
    while True:
        started = clock()
        try:
            async with asyncio.timeout(BACKSTOP_TIMEOUTS * spec.timeout_s):
                reading = await reader.read()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("meter %s: read failed: %s", meter_id, e or type(e).__name__)
            on_failure(meter_id, e)
        else:
            on_reading(meter_id, reading)
        await asyncio.sleep(max(0.0, spec.interval_s - (clock() - started)))
