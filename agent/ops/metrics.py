"""Prometheus metrics, systemd status lines and loop health, read from the agent's last tick.

One path renders the latest immutable ``TickRecord`` on each scrape:
``families`` describes every sample, ``render_text`` writes the text format
(prometheus-client's ``generate_latest`` over a custom collector took about
4x as long: 786 ms against 199 ms for 10,000 devices, over the 200 ms goal;
tests/metrics_reference.py keeps that exposition as the specification the
text must equal). No IO, no awaits, and no lock but the one that copies a
duration histogram. Devices that disappear from the snapshot drop
out of the exposition by themselves. The served path (``Scrapes``) renders
the per-device families once per tick on a thread of its own, pausing while a
tick runs, and a scrape (on the HTTP server's thread) renders only the
site-wide head; both only read attributes the loop replaces whole.

Every quantity is one line in a table of small frozen descriptions
(``SITE_METRICS``, ``DEVICE_METRICS``, ``DOMAIN_METRICS``) rendered by one code
path. Names follow Prometheus conventions: the ``siteagent_`` prefix, base
units (watts, seconds, hashes per second, degrees Celsius) and ``_total`` on
counters. Label values are bounded; see systemd/README.md for the table.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np

from siteagent.agent.control.alarms import ALARM_NAMES
from siteagent.agent.control.meter import MeterView
from siteagent.agent.control.safety import table_of
from siteagent.domain import (
    DeviceKind,
    DeviceState,
    DeviceStatus,
    PlanMode,
    Snapshot,
    setpoint_rows,
)
from siteagent.domain.site import DomainTree, domain_loads_w

if TYPE_CHECKING:
    from wsgiref.types import StartResponse
    from wsgiref.types import WSGIApplication as WSGIApp

    from siteagent.agent.control.loop import Agent, TickRecord
    from siteagent.agent.control.workers import Shard, WorkerTelemetry

PREFIX = "siteagent_"
HASHES_PER_TH = 1e12
# Every mode a policy plans in, so each has a series (0 or 1) from the first scrape.
PLAN_MODES: tuple[str, ...] = tuple(m.value for m in PlanMode)
# Kinds are preset so rate() sees a zero before the first event, not a new series.
ACTUATION_KINDS = ("set_power_target", "sleep", "wake")
ACTUATION_ERROR_KINDS = ("lower", "raise", "sleep", "wake")
# A sweep waits on up to `telemetry.concurrency` reads, each bounded by its timeout.
SWEEP_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
# A tick is planning (milliseconds) plus actuations (bounded by their timeout).
TICK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Durations:
    """A thread-safe duration histogram (s) the loop observes into and a scrape copies."""

    def __init__(self, buckets_s: Sequence[float]) -> None:
        self.buckets_s = tuple(sorted(buckets_s))
        self._counts = [0] * (len(self.buckets_s) + 1)
        self._sum_s = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Record one duration (s)."""
        i = next((i for i, b in enumerate(self.buckets_s) if seconds <= b), len(self.buckets_s))
        with self._lock:
            self._counts[i] += 1
            self._sum_s += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets ending with ``+Inf``, and the sum (s)."""
        with self._lock:
            counts, total_s = list(self._counts), self._sum_s
        out: list[tuple[str, float]] = []
        running = 0
        for le, n in zip((*map(repr, self.buckets_s), "+Inf"), counts, strict=True):
            running += n
            out.append((le, float(running)))
        return out, total_s

    @property
    def count(self) -> int:
        """How many durations were observed."""
        with self._lock:
            return sum(self._counts)


@dataclass(frozen=True, slots=True)
class VenStatus:
    """The OpenADR VEN as the metrics show it; the VEN replaces it whole on each change."""

    registered: bool
    connected: bool  # the VTN's last answer was a good one
    last_answer_unix_s: float | None  # when the VTN last answered well
    events_received: int  # event messages (new or changed events) taken from the VTN
    opted_in: int  # opt-in answers sent
    opted_out: int  # opt-out answers sent


@dataclass(frozen=True, slots=True)
class View:
    """One scrape's frozen view: the last tick, and what is derived from it once per scrape."""

    record: TickRecord
    now_s: float
    setpoints: Mapping[str, tuple[bool, float | None]]  # per device: awake, target (W)
    domain_measured_w: Mapping[str, float]
    domain_worst_case_w: Mapping[str, float]
    # Once per tick, not per scrape: each is a pass over every device.
    max_reading_age_s: float | None  # oldest last-good reading, at the snapshot (s)
    by_state: Mapping[tuple[str, str], int]  # devices by (kind, state)
    controllable: int

    @property
    def lag_s(self) -> float:
        """How long ago (s) the snapshot was taken."""
        return max(0.0, self.now_s - self.record.snapshot.time_s)

    @property
    def site_power_w(self) -> float:
        """Site power (W): the meter when there is one, else device readings plus overhead."""
        return site_power_w(self.record)

    @property
    def worst_case_w(self) -> float:
        """Worst-case site power (W) as the planner accounts it."""
        return _worst_case_w(self.record)

    def age_s(self, d: DeviceStatus) -> float | None:
        """Age (s) of a device's last good reading, at scrape time."""
        return None if d.reading_age_s is None else d.reading_age_s + self.lag_s


def site_power_w(record: TickRecord) -> float:
    """Site power (W) at a tick: the meter when there is one, else readings plus overhead."""
    return snapshot_power_w(record.snapshot, record.limits.overhead_w)


def snapshot_power_w(snap: Snapshot, overhead_w: float) -> float:
    """Site power (W) in a snapshot: the meter when there is one, else readings plus
    ``overhead_w``."""
    meter = snap.meter_power_w
    if meter is not None:
        return meter
    return snap.measured_w + overhead_w


def _worst_case_w(record: TickRecord) -> float:
    return record.snapshot.budget_w + record.limits.overhead_w


def make_view(record: TickRecord, now_s: float) -> View:
    """Derive one scrape's view of a tick record; pure."""
    snap, limits = record.snapshot, record.limits
    tree = DomainTree(limits)
    tab = table_of(snap)
    names, code = tab.statics.domain_codes
    measured_w = np.nan_to_num(tab.power_w, nan=0.0)  # an unread device counts zero
    measured = domain_loads_w(tree, names, code, measured_w, limits.overhead_w)
    worst = domain_loads_w(tree, names, code, tab.budget_w, limits.overhead_w)
    devices = snap.devices
    by_state = {(k.value, st.value): 0 for k in DeviceKind for st in DeviceState}
    for d in devices:
        by_state[(d.kind.value, d.state.value)] += 1
    return View(
        record=record,
        now_s=now_s,
        setpoints={
            dev: (awake, target)
            for _, dev, awake, target, _ in setpoint_rows(record.plan.setpoints)
        },
        domain_measured_w=measured,
        domain_worst_case_w=worst,
        max_reading_age_s=max(
            (d.reading_age_s for d in devices if d.reading_age_s is not None), default=None
        ),
        by_state=by_state,
        controllable=sum(d.controllable for d in devices),
    )


def _reading_w(d: DeviceStatus) -> float | None:
    return None if d.reading is None else d.reading.power_w


def _planned_target_w(v: View, d: DeviceStatus) -> float | None:
    sp = v.setpoints.get(d.device_id)
    return None if sp is None or not sp[0] else sp[1]


def _planned_awake(v: View, d: DeviceStatus) -> float | None:
    sp = v.setpoints.get(d.device_id)
    return None if sp is None else float(sp[0])


def _hashrate_hps(d: DeviceStatus) -> float | None:
    r = d.reading
    return None if r is None or r.hashrate_ths is None else r.hashrate_ths * HASHES_PER_TH


def _temperature_c(d: DeviceStatus) -> float | None:
    return None if d.reading is None else d.reading.temperature_c


def _measured_label(d: DeviceStatus) -> tuple[str, ...]:
    estimated = d.reading is not None and d.reading.power_estimated
    return ("false",) if estimated else ("true",)


@dataclass(frozen=True, slots=True)
class SiteMetric:
    """A site-wide gauge: one sample, or none while its value is unknown (None)."""

    name: str
    help: str
    value: Callable[[View], float | None]
    label_names: tuple[str, ...] = ()
    label_values: Callable[[View], tuple[str, ...]] | None = None


@dataclass(frozen=True, slots=True)
class DeviceMetric:
    """A per-device gauge labelled ``device``; devices whose value is None are left out."""

    name: str
    help: str
    value: Callable[[View, DeviceStatus], float | None]
    extra_labels: tuple[str, ...] = ()
    extra_values: Callable[[DeviceStatus], tuple[str, ...]] | None = None


@dataclass(frozen=True, slots=True)
class DomainMetric:
    """A per-domain gauge labelled ``domain``, over the configured domains."""

    name: str
    help: str
    value: Callable[[View, str, float], float | None]


SITE_METRICS: tuple[SiteMetric, ...] = (
    SiteMetric(
        "site_power_watts",
        "Site power: the meter when present, else device readings plus configured overhead.",
        lambda v: v.site_power_w,
    ),
    SiteMetric(
        "meter_power_watts",
        "Site power read from the meter (absent without one).",
        lambda v: v.record.snapshot.meter_power_w,
    ),
    SiteMetric(
        "site_worst_case_power_watts",
        "Worst-case site power the planner accounts (unconfirmed and unreachable at maximum).",
        lambda v: v.worst_case_w,
    ),
    SiteMetric("site_cap_watts", "Hard site power cap.", lambda v: v.record.limits.site_cap_w),
    SiteMetric(
        "effective_cap_watts",
        "Effective cap: the lowest cap in force minus the safety margin; source names it.",
        lambda v: v.record.limits.effective_cap_w,
        ("source",),
        lambda v: (v.record.limits.cap_source,),
    ),
    SiteMetric(
        "headroom_watts",
        "Effective cap minus worst-case site power (negative when over).",
        lambda v: v.record.limits.effective_cap_w - v.worst_case_w,
    ),
    SiteMetric(
        "overhead_power_watts",
        "Non-device site load the plan counts: the configured overhead, or with a site "
        "meter the planned unexplained load.",
        lambda v: v.record.limits.overhead_w,
    ),
    SiteMetric(
        "plan_power_watts",
        "Site power the current plan settles at.",
        lambda v: v.record.plan.planned_w,
    ),
    SiteMetric(
        "plan_duration_seconds",
        "Time the last tick spent planning and ordering (no IO).",
        lambda v: v.record.plan_duration_s,
    ),
    SiteMetric(
        "last_tick_age_seconds", "Time since the last successful control tick.", lambda v: v.lag_s
    ),
    SiteMetric(
        "deferred_changes",
        "Changes the last tick held back (shed before restore, budget, ramp).",
        lambda v: float(len(v.record.ordered.deferred)),
    ),
    SiteMetric(
        "failed_changes",
        "Changes the last tick sent that failed.",
        lambda v: float(len(v.record.failed)),
    ),
    SiteMetric(
        "telemetry_max_age_seconds",
        "Age of the oldest last-good device reading (absent with no readings).",
        lambda v: None if v.max_reading_age_s is None else v.max_reading_age_s + v.lag_s,
    ),
)

DEVICE_METRICS: tuple[DeviceMetric, ...] = (
    DeviceMetric(
        "device_power_watts",
        "Device power as last read; measured=false where the driver estimated it.",
        lambda v, d: _reading_w(d),
        ("measured",),
        _measured_label,
    ),
    DeviceMetric(
        "device_worst_case_power_watts",
        "Device power the planner counts now (invariant 1).",
        lambda v, d: d.budget_w,
    ),
    DeviceMetric(
        "device_nameplate_power_watts", "Device nameplate power.", lambda v, d: d.nameplate_power_w
    ),
    DeviceMetric(
        "device_hashrate_hashes_per_second",
        "Miner hashrate as last read.",
        lambda v, d: _hashrate_hps(d),
    ),
    DeviceMetric(
        "device_temperature_celsius",
        "Hottest temperature the device reported.",
        lambda v, d: _temperature_c(d),
    ),
    DeviceMetric(
        "device_power_target_watts",
        "Power target applied (last commanded or reported).",
        lambda v, d: d.power_target_w,
    ),
    DeviceMetric(
        "device_planned_power_target_watts",
        "Power target of the current plan (absent when the plan sleeps it).",
        _planned_target_w,
    ),
    DeviceMetric(
        "device_planned_awake",
        "1 if the current plan keeps the device mining, 0 if it sleeps it.",
        _planned_awake,
    ),
    DeviceMetric(
        "device_utilization_ratio",
        "GPU utilization as last read, 0 to 1.",
        lambda v, d: d.reading.utilization_frac if d.reading else None,
    ),
    DeviceMetric(
        "device_telemetry_age_seconds",
        "Age of the device's last good reading.",
        lambda v, d: v.age_s(d),
    ),
)

DOMAIN_METRICS: tuple[DomainMetric, ...] = (
    DomainMetric(
        "domain_power_watts",
        "Measured device power summed over the domain.",
        lambda v, dom, limit: v.domain_measured_w.get(dom, 0.0),
    ),
    DomainMetric(
        "domain_worst_case_power_watts",
        "Worst-case device power summed over the domain.",
        lambda v, dom, limit: v.domain_worst_case_w.get(dom, 0.0),
    ),
    DomainMetric("domain_limit_watts", "Power limit of the domain.", lambda v, dom, limit: limit),
)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family, ready to render: label names, and (label values, value) samples."""

    name: str
    type: str
    help: str
    label_names: tuple[str, ...]
    samples: Sequence[tuple[tuple[str, ...], float]]


@dataclass(frozen=True, slots=True)
class HistogramFamily:
    """A duration histogram: cumulative ``(le, count)`` buckets and the sum (s)."""

    name: str
    help: str
    buckets: list[tuple[str, float]]
    sum_s: float


def _one(name: str, type_: str, help_text: str, value: float) -> Family:
    return Family(PREFIX + name, type_, help_text, (), [((), value)])


def families(agent: Agent, *, version: str = "unknown") -> Iterator[Family | HistogramFamily]:
    """Every metric family of the agent now, from immutable state; no IO."""
    record = agent.last_tick
    now_s = agent.clock()
    v = None if record is None else make_view(record, now_s)
    yield from head_families(agent, v, now_s, version=version)
    if v is not None:
        yield from device_families(v)


def head_families(
    agent: Agent, v: View | None, now_s: float, *, version: str = "unknown"
) -> Iterator[Family | HistogramFamily]:
    """The site-wide families (counters, histograms, alarms, the tick's site gauges) at
    ``now_s``: a hundred-odd samples, cheap enough to render on every scrape."""
    yield Family(
        PREFIX + "build_info", "gauge", "Version of the agent.", ("version",), [((version,), 1.0)]
    )
    yield _one("ticks_total", "counter", "Control ticks completed.", float(agent.ticks))
    yield _one("sweeps_total", "counter", "Telemetry sweeps completed.", float(agent.sweeps))
    for name, help_text, counts, preset in (
        (
            "actuations_total",
            "Commands devices accepted, by kind.",
            agent.actuations,
            ACTUATION_KINDS,
        ),
        (
            "actuation_errors_total",
            "Commands that failed or timed out, by kind of change.",
            agent.actuation_errors,
            ACTUATION_ERROR_KINDS,
        ),
    ):
        # One C-level copy: the loop thread may add a key while we render.
        seen = dict.fromkeys(preset, 0) | dict(counts)
        by_kind = [((kind,), float(n)) for kind, n in sorted(seen.items())]
        yield Family(PREFIX + name, "counter", help_text, ("kind",), by_kind)
    for name, help_text, durations in (
        ("tick_duration_seconds", "Wall time of control ticks.", agent.tick_durations),
        ("sweep_duration_seconds", "Wall time of telemetry sweeps.", agent.sweep_durations),
    ):
        buckets, sum_s = durations.cumulative()
        yield HistogramFamily(PREFIX + name, help_text, buckets, sum_s)
    if agent.last_sweep_s is not None:
        age_s = max(0.0, now_s - agent.last_sweep_s)
        yield _one("last_sweep_age_seconds", "gauge", "Time since the last telemetry sweep.", age_s)
    yield from _alarm_families(agent)
    if agent.telemetry is not None:
        yield from _worker_families(agent.telemetry)
    if agent.ven_status is not None:
        yield from _ven_families(agent.ven_status)
    yield from grid_event_families(agent)
    ok, at_unix_s = agent.last_reload or (True, 0.0)
    yield _one(
        "config_reload_last_success",
        "gauge",
        "1 if the last config reload (SIGHUP) was applied (or none yet), 0 if it was refused.",
        float(ok),
    )
    yield _one(
        "config_reload_last_timestamp_seconds",
        "gauge",
        "When (Unix time) the last config reload was applied or refused; 0 before any.",
        at_unix_s,
    )
    yield from _frequency_families(agent)
    if v is None:
        return
    yield from _meter_families(v.record)
    record = v.record
    for m in SITE_METRICS:
        value = m.value(v)
        if value is not None:
            labels = () if m.label_values is None else m.label_values(v)
            yield Family(PREFIX + m.name, "gauge", m.help, m.label_names, [(labels, value)])
    mode = record.plan.mode
    yield Family(
        PREFIX + "plan_mode",
        "gauge",
        f"1 for the current plan mode ({', '.join(PLAN_MODES)}), 0 for the others.",
        ("mode",),
        [((name,), float(name == mode)) for name in sorted({*PLAN_MODES, mode})],
    )
    yield Family(
        PREFIX + "devices",
        "gauge",
        "Devices by kind and state.",
        ("kind", "state"),
        [(key, float(n)) for key, n in sorted(v.by_state.items())],
    )
    yield _one(
        "devices_controllable",
        "gauge",
        "Devices fresh enough to be commanded.",
        float(v.controllable),
    )


def device_families(v: View) -> Iterator[Family]:
    """The per-device and per-domain families of one tick's view (over 100,000 samples at
    10,000 devices: the served path renders them once per tick, ``Scrapes``)."""
    record = v.record
    devices = record.snapshot.devices
    yield Family(
        PREFIX + "device_info",
        "gauge",
        "Always 1: a device's kind and power domain.",
        ("device", "kind", "domain"),
        [((d.device_id, d.kind.value, d.domain), 1.0) for d in devices],
    )
    yield Family(
        PREFIX + "device_state",
        "gauge",
        "Always 1, labelled with the device's current state.",
        ("device", "state"),
        [((d.device_id, d.state.value), 1.0) for d in devices],
    )
    for dm in DEVICE_METRICS:
        samples: list[tuple[tuple[str, ...], float]] = []
        extra = dm.extra_values
        for d in devices:
            value = dm.value(v, d)
            if value is not None:
                ids = (d.device_id,) if extra is None else (d.device_id, *extra(d))
                samples.append((ids, value))
        if samples:
            yield Family(PREFIX + dm.name, "gauge", dm.help, ("device", *dm.extra_labels), samples)
    domains = record.limits.domains
    if domains:
        for dom_m in DOMAIN_METRICS:
            dom_samples: list[tuple[tuple[str, ...], float]] = []
            for dom in domains:
                value = dom_m.value(v, dom.domain_id, dom.limit_w)
                if value is not None:
                    dom_samples.append(((dom.domain_id,), value))
            yield Family(PREFIX + dom_m.name, "gauge", dom_m.help, ("domain",), dom_samples)


# Per telemetry worker process (agent/control/workers.py Shard): name, type, help, value.
WORKER_METRICS: tuple[tuple[str, str, str, Callable[[Shard], float]], ...] = (
    (
        "telemetry_worker_up",
        "gauge",
        "1 while the telemetry worker process is running.",
        lambda s: float(s.alive),
    ),
    (
        "telemetry_worker_devices",
        "gauge",
        "Devices the telemetry worker reads and commands.",
        lambda s: float(s.n_devices),
    ),
    (
        # A backlog shows here before the readings age.
        "telemetry_worker_reads_in_flight",
        "gauge",
        "Readings asked of the telemetry worker and not yet answered.",
        lambda s: float(len(s.in_flight)),
    ),
    (
        "telemetry_worker_restarts_total",
        "counter",
        "Times the telemetry worker was restarted after it exited.",
        lambda s: float(s.restarts),
    ),
)


def _worker_families(telemetry: WorkerTelemetry) -> Iterator[Family]:
    shards = list(telemetry.shards)
    for name, type_, help_text, value in WORKER_METRICS:
        samples = [((str(s.spec.index),), value(s)) for s in shards]
        yield Family(PREFIX + name, type_, help_text, ("worker",), samples)


# The states a meter can be in (agent/control/meter.py MeterState), each always present.
METER_STATES = ("fresh", "stale", "frozen", "garbage")


def _meter_families(record: TickRecord) -> Iterator[Family]:
    """Per meter (one per domain): metered and estimated power, the unexplained load."""
    views = record.meters
    if not views:
        return
    per_domain: tuple[tuple[str, str, Callable[[MeterView], float | None]], ...] = (
        (
            "domain_metered_power_watts",
            "Power the domain's meter reads (absent while the meter is not fresh).",
            lambda m: m.power_w,
        ),
        (
            "domain_estimated_power_watts",
            "Power estimated without the meter: devices' measured sum, plus the configured "
            "overhead at the site.",
            lambda m: m.estimated_w,
        ),
        (
            "unexplained_power_watts",
            "Meter minus the devices' measured sum at the last sample (absent when not fresh).",
            lambda m: m.unexplained_w,
        ),
        (
            "planned_unexplained_power_watts",
            "Load the plan counts beside the devices: the unexplained load's recent maximum "
            "(or rise), or the fallback while the meter is not fresh.",
            lambda m: m.planned_unexplained_w,
        ),
        (
            "meter_frequency_hertz",
            "Grid frequency the meter reads (absent when not fresh or not read).",
            lambda m: m.frequency_hz,
        ),
    )
    for name, help_text, value in per_domain:
        samples = [((m.domain,), w) for m in views if (w := value(m)) is not None]
        yield Family(PREFIX + name, "gauge", help_text, ("domain",), samples)
    yield Family(
        PREFIX + "meter_state",
        "gauge",
        f"1 for the meter's state ({', '.join(METER_STATES)}), 0 for the others.",
        ("meter", "domain", "state"),
        [
            ((m.meter_id, m.domain, st), float(m.state.value == st))
            for m in views
            for st in METER_STATES
        ],
    )


def _frequency_families(agent: Agent) -> Iterator[Family]:
    fr = agent.frequency
    if fr is None:
        return
    yield _one(
        "frequency_response_armed_watts",
        "gauge",
        "Power the armed under-frequency block would shed (the held block's while triggered).",
        fr.armed.power_w,
    )
    yield _one(
        "frequency_response_armed_devices",
        "gauge",
        "Devices in the armed under-frequency block.",
        float(len(fr.armed.changes)),
    )
    yield _one(
        "frequency_response_triggered",
        "gauge",
        "1 while an under-frequency block is shed and held, else 0.",
        float(fr.triggered),
    )
    yield _one(
        "frequency_response_triggers_total",
        "counter",
        "Under-frequency triggers since the agent started.",
        float(fr.triggers),
    )


def _alarm_families(agent: Agent) -> Iterator[Family]:
    # Every alarm name is always present (0 when clear): a fixed, bounded label set.
    raised = {a.name: a for a in agent.alarms.active()}
    yield Family(
        PREFIX + "alarm",
        "gauge",
        "1 while the alarm is raised, else 0 (reasons: `siteagent status`).",
        ("alarm",),
        [((name,), float(name in raised)) for name in ALARM_NAMES],
    )
    yield Family(
        PREFIX + "alarm_since_timestamp_seconds",
        "gauge",
        "When (Unix time) the alarm was raised; 0 when it is not raised.",
        ("alarm",),
        [((name,), raised[name].since_unix_s if name in raised else 0.0) for name in ALARM_NAMES],
    )


def _ven_families(ven: VenStatus) -> Iterator[Family]:
    yield _one(
        "openadr_registered",
        "gauge",
        "1 while the VEN is registered with its VTN.",
        float(ven.registered),
    )
    yield _one(
        "openadr_connected",
        "gauge",
        "1 while the VTN's last answer was a good one.",
        float(ven.connected),
    )
    if ven.last_answer_unix_s is not None:
        yield _one(
            "openadr_last_answer_timestamp_seconds",
            "gauge",
            "When (Unix time) the VTN last answered a poll or request well.",
            ven.last_answer_unix_s,
        )
    yield _one(
        "openadr_events_received_total",
        "counter",
        "Events (new or changed) the VEN took from its VTN.",
        float(ven.events_received),
    )
    yield Family(
        PREFIX + "openadr_opt_answers_total",
        "counter",
        "Opt-in and opt-out answers the VEN gave its VTN.",
        ("opt",),
        [(("in",), float(ven.opted_in)), (("out",), float(ven.opted_out))],
    )


def grid_event_families(agent: Agent) -> Iterator[Family]:
    """Run-time grid events (the event book): in force, the next one, each one's opt state.

    A handful of samples read from memory, so rendered at each scrape with the head;
    the ``event`` label is bounded by the events not yet over."""
    book = agent.grid_caps
    if book is None:
        return
    states = book.states(agent.wall_clock().timestamp())
    yield _one(
        "grid_events_in_force",
        "gauge",
        "Grid events (demand response) whose cap is in force now, ramp-up included.",
        float(sum(e.in_force for e in states)),
    )
    upcoming = [e for e in states if e.opted_in and not e.in_force]
    if upcoming:
        nxt = min(upcoming, key=lambda e: e.start_unix_s)
        yield _one(
            "grid_event_next_start_timestamp_seconds",
            "gauge",
            "When (Unix time) the next opted-in grid event starts (absent when none).",
            nxt.start_unix_s,
        )
        yield _one(
            "grid_event_next_target_watts",
            "gauge",
            "Cap the next opted-in grid event sets (absent when none).",
            nxt.target_w,
        )
    if not states:
        return
    yield Family(
        PREFIX + "grid_event_opted_in",
        "gauge",
        "1 if the site takes part in the grid event, 0 if opted out; events not yet over.",
        ("event",),
        [((e.event_id,), float(e.opted_in)) for e in states],
    )


# -- rendering ----------------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", '"': '\\"'})


def _value_text(value: float) -> str:
    if math.isfinite(value):
        return repr(float(value))
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def render_text(
    fams: Iterable[Family | HistogramFamily], escaped: dict[str, str] | None = None
) -> bytes:
    """The Prometheus text format (0.0.4) of the families.

    prometheus-client's ``generate_latest`` validates and escapes every label
    name on every sample, about 5 us a sample; a 10,000-miner site has over
    100,000, so the scrape renders here with each label value escaped once
    (``escaped`` carries that across calls that render one exposition in parts).
    """
    out: list[str] = []
    if escaped is None:
        escaped = {}

    def esc(text: str) -> str:
        e = escaped.get(text)
        if e is None:
            e = escaped[text] = text.translate(_ESCAPES)
        return e

    for fam in fams:
        help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        if isinstance(fam, HistogramFamily):
            out.append(f"# HELP {fam.name} {help_text}\n# TYPE {fam.name} histogram\n")
            for le, n in fam.buckets:
                out.append(f'{fam.name}_bucket{{le="{le}"}} {_value_text(n)}\n')
            count = fam.buckets[-1][1] if fam.buckets else 0.0
            out.append(f"{fam.name}_count {_value_text(count)}\n")
            out.append(f"{fam.name}_sum {_value_text(fam.sum_s)}\n")
            continue
        out.append(f"# HELP {fam.name} {help_text}\n# TYPE {fam.name} {fam.type}\n")
        names = fam.label_names
        if not names:
            out.extend(f"{fam.name} {_value_text(value)}\n" for _, value in fam.samples)
        elif len(names) == 1:
            head = f'{fam.name}{{{names[0]}="'
            out.extend(f'{head}{esc(lv[0])}"}} {_value_text(value)}\n' for lv, value in fam.samples)
        else:
            heads = [f'{n}="' for n in names]
            for lv, value in fam.samples:
                labels = '",'.join(h + esc(x) for h, x in zip(heads, lv, strict=True))
                out.append(f'{fam.name}{{{labels}"}} {_value_text(value)}\n')
    return "".join(out).encode()


# A gzip member's header: deflate, no name, no time, fastest compression, unknown OS.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
# Level 1: a few times smaller at a fraction of the cost of the default level.
GZIP_LEVEL = 1


@dataclass(frozen=True, slots=True)
class Rendered:
    """One tick's device families, rendered: the text, and the same as raw deflate."""

    view: View
    text: bytes
    deflated: bytes  # ends the deflate stream (final block)
    render_s: float  # wall time the render took, waits for ticks included


class Scrapes:
    """The served exposition: each tick's device families rendered once, served until the
    next tick, behind the site-wide families rendered at each scrape.

    Rendering 10,000 devices' families is most of a scrape (about 190 ms, GIL held):
    done per scrape it missed the 200 ms goal over HTTP with gzip, and it slowed a
    tick running meanwhile. Here a thread renders them once after each tick, pausing
    between families while a tick runs (``Agent.ticking``), so a tick waits at most
    for one family; a scrape renders only the head (counters, ages, alarms, the
    site's gauges, at the scrape's time) and sends the cached bytes after it. The
    text equals ``render_text(families(agent))`` at the render's time, except that a
    device's telemetry age is as of that render (at most one tick old).
    """

    def __init__(self, agent: Agent, *, version: str = "unknown", poll_s: float = 0.05) -> None:
        self.agent = agent
        self.version = version
        self.poll_s = poll_s
        self.renders = 0
        self._latest: Rendered | None = None
        self._lock = threading.Lock()  # one render at a time
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Render after each tick, on a thread of its own, until ``close``."""
        self._thread = threading.Thread(target=self._run, name="metrics-render", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop rendering."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            self.refresh()

    def current(self) -> Rendered | None:
        """What a scrape serves: the latest render (the previous tick's until the render
        thread has rendered the last one); rendered now only if there is none yet."""
        latest = self._latest
        if latest is not None or self.agent.last_tick is None:
            return latest
        return self.refresh()

    def refresh(self) -> Rendered | None:
        """Render the last tick's device families if they are not yet; the latest render."""
        latest = self._latest
        if self.agent.last_tick is None or (
            latest is not None and latest.view.record is self.agent.last_tick
        ):
            return latest
        with self._lock:
            started = time.perf_counter()
            # After a tick in progress ends, its record is the one to render.
            self._between_ticks()
            record = self.agent.last_tick
            if record is not None and (
                self._latest is None or self._latest.view.record is not record
            ):
                self._latest = self._render(record, started)
                self.renders += 1
            return self._latest

    def _render(self, record: TickRecord, started: float) -> Rendered:
        v = make_view(record, self.agent.clock())
        escaped: dict[str, str] = {}
        parts: list[bytes] = []
        fams = device_families(v)
        while True:
            self._between_ticks()
            fam = next(fams, None)
            if fam is None:
                break
            self._between_ticks()
            parts.append(render_text((fam,), escaped))
        text = b"".join(parts)
        # zlib lets go of the GIL while it compresses.
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = z.compress(text) + z.flush(zlib.Z_FINISH)
        return Rendered(v, text, deflated, time.perf_counter() - started)

    def _between_ticks(self) -> None:
        # Polled, not signalled: the loop sets a flag and owes the renderer nothing.
        while self.agent.ticking and not self._closed.is_set():
            time.sleep(0.002)

    def body(self, *, gzipped: bool) -> list[bytes]:
        """One scrape's body, in parts: the head rendered now, then the cached families."""
        rendered = self.current()
        now_s = self.agent.clock()
        v = None if rendered is None else dataclasses.replace(rendered.view, now_s=now_s)
        head = render_text(head_families(self.agent, v, now_s, version=self.version))
        tail = b"" if rendered is None else rendered.text
        if not gzipped:
            return [head, tail]
        # One gzip member: the head's deflate, flushed to a byte boundary, then the cached
        # stream's blocks (they refer only to their own data), then CRC and size of both.
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        if rendered is None:
            head_z = z.compress(head) + z.flush(zlib.Z_FINISH)
            tail_z = b""
        else:
            head_z = z.compress(head) + z.flush(zlib.Z_SYNC_FLUSH)
            tail_z = rendered.deflated
        crc = zlib.crc32(tail, zlib.crc32(head))
        trailer = struct.pack("<II", crc, (len(head) + len(tail)) & 0xFFFFFFFF)
        return [_GZIP_HEADER, head_z, tail_z, trailer]


def metrics_app(scrapes: Scrapes) -> WSGIApp:
    """A WSGI app answering every GET with the text exposition (gzipped when accepted)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        gzipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
        body = scrapes.body(gzipped=gzipped)
        headers = [("Content-Type", CONTENT_TYPE)]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(sum(map(len, body)))))
        start_response("200 OK", headers)
        return body

    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # One line per scrape would drown the journal.
        pass


@dataclass(slots=True)
class MetricsServer:
    """The metrics HTTP server on its own thread; serves any path, /metrics included."""

    server: WSGIServer
    thread: threading.Thread
    scrapes: Scrapes

    @property
    def port(self) -> int:
        """The port it listens on (useful after asking for port 0)."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)
        self.scrapes.close()


def serve_metrics(agent: Agent, host: str, port: int, *, version: str = "unknown") -> MetricsServer:
    """Serve the agent's metrics over HTTP on host:port (0 picks a free port)."""
    server_class: type[WSGIServer] = _ThreadingWSGIServer
    if ":" in host:
        server_class = type(
            "_ThreadingWSGIServer6", (_ThreadingWSGIServer,), {"address_family": socket.AF_INET6}
        )
    scrapes = Scrapes(agent, version=version)
    server = make_server(host, port, metrics_app(scrapes), server_class, _QuietHandler)
    scrapes.start()
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread, scrapes)


# -- systemd status and health ---------------------------------------------------------


def site_summary(agent: Agent) -> str:
    """One line for systemd's STATUS: plan mode, site power against the cap, device states."""
    record = agent.last_tick
    n = len(agent.fleet)
    if record is None:
        return f"{n} device(s), {agent.sweeps} sweep(s); waiting for the first control tick"
    limits = record.limits
    states: dict[str, int] = {}
    for d in record.snapshot.devices:
        states[d.state.value] = states.get(d.state.value, 0) + 1
    by_state = ", ".join(f"{k} {states[k]}" for k in sorted(states)) or "no devices"
    return (
        f"{record.plan.mode}: site {site_power_w(record) / 1000:.1f} kW "
        f"(worst case {_worst_case_w(record) / 1000:.1f} kW) of effective cap "
        f"{limits.effective_cap_w / 1000:.1f} kW from {limits.cap_source}; "
        f"{n} device(s): {by_state}"
    )


def stale_tick_s(agent: Agent) -> float:
    """How long (s) without a successful tick before the loop counts as stalled."""
    control = agent.config.control
    # A healthy tick may wait out one interval plus its slowest actuation; allow three.
    return 3 * control.interval_s + control.actuation_timeout_s


def loop_healthy(agent: Agent, started_s: float) -> bool:
    """Whether a control tick ended recently (or the agent started recently).

    Counted from the tick's end, not its snapshot: two ticks in a row that each
    send changes until their deadline (a cap drop at 10,000 miners) are a loop at
    work, and from the first one's snapshot they took 25 s (``stale_tick_s``)."""
    done_s = agent.last_tick_done_s
    last_s = started_s if done_s is None else max(done_s, started_s)
    return agent.clock() - last_s <= stale_tick_s(agent)
