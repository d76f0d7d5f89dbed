"""The OpenADR 2.0b VEN: a utility's or aggregator's VTN sends events; each becomes a cap.

Built on openleadr's ``OpenADRClient`` through its public API: ``run`` registers,
syncs the events and then polls at the cadence the VTN asks for; ``on_event`` and
``on_update_event`` hand each event (new, changed or cancelled) to ``Ven.take``,
whose answer (``optIn``/``optOut``) openleadr sends back; ``add_report`` offers
TELEMETRY_USAGE reports of the site's power.

Each interval of each signal the VEN understands becomes one entry of the event
book (``agent/api/events.py``), id ``openadr:<event id>[:<interval>]``, source
``openadr:<event id>``: stored, audited, and in force through the loop's caps like
an override. A randomised start (``startafter``) is rolled once: the book keeps the
shifted start, and the same event seen again (after a restart, or modified) keeps it.

What openleadr verifies: the VTN's TLS certificate against ``ca_file``, and only when
``cert`` and ``key`` are set too (without them it builds no TLS context of its own);
so off loopback the config requires https with all three (``agent/config.py``).

A VTN that misbehaves (unreachable, slow, malformed XML) is noticed through
openleadr's own account of each request (its ``_perform_request`` log records,
taken by a filter and not printed: they repeat at every poll; the one clever part,
fenced by a test in tests/test_openadr.py that names a change); the VEN says so in
one line, raises the ``vtn-unreachable`` alarm after ``alarm_after_s``, and says
when the VTN answers again. The book keeps the events meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from openleadr import OpenADRClient

from siteagent.agent.api.events import OPT_IN as BOOK_IN
from siteagent.agent.api.events import OPT_OUT as BOOK_OUT
from siteagent.agent.api.events import EventBook, EventError, GridEvent
from siteagent.agent.config import OpenAdrConfig
from siteagent.agent.control.alarms import VTN_UNREACHABLE, unshed
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.prices import node_contract_floors
from siteagent.agent.ops.metrics import VenStatus, snapshot_power_w
from siteagent.domain import DeviceKind
from siteagent.policies.capping import min_level_w

log = logging.getLogger("siteagent.openadr")

ACTOR = "openadr"  # who the book's audit records name for the VEN's changes
OPT_IN, OPT_OUT = "optIn", "optOut"
# openleadr's SI scale codes (enums.SI_SCALE_CODE) as factors.
SCALE = {
    "p": 1e-12,
    "n": 1e-9,
    "micro": 1e-6,
    "m": 1e-3,
    "c": 1e-2,
    "d": 1e-1,
    "none": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
}
# Units of real power an itemBase may name, as factors to W (the scale applies on top).
UNITS_W = {"W": 1.0, "kW": 1e3, "MW": 1e6}
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# How often the VEN looks at the VTN's state (s): the failing line and the alarm wait
# for it, so it is short; it costs a few attribute reads.
CHECK_S = 1.0


class Unsupported(Exception):
    """An event the VEN cannot turn into caps; the message says why (it opts out)."""


@dataclass(frozen=True, slots=True)
class IntervalCap:
    """One interval of a signal as a cap: when (Unix s, before randomisation), how long, W."""

    suffix: str  # "" for an event's only interval, else ":<interval>" (":<signal>.<i>")
    start_unix_s: float
    duration_s: float
    target_w: float


def book_id(event_id: str) -> str:
    """The book's id stem for a VTN's event id (letters, digits and . _ - kept)."""
    return "openadr:" + _ID_UNSAFE.sub("-", event_id)[:100]


def _power_factor_w(signal: Mapping[str, Any]) -> float:
    """W per unit of the signal's payload, from its itemBase (unit and SI scale)."""
    m = signal.get("measurement")
    if not m:
        raise Unsupported(f"{signal['signal_name']} {signal['signal_type']} has no itemBase unit")
    unit, scale = m.get("unit"), m.get("scale") or "none"
    if unit not in UNITS_W or scale not in SCALE:
        raise Unsupported(
            f"{signal['signal_name']} in unit {unit!r} scale {scale!r}, expected real power "
            f"({', '.join(UNITS_W)})"
        )
    return UNITS_W[unit] * SCALE[scale]


def signal_target_w(
    signal: Mapping[str, Any],
    payload: float,
    *,
    simple_levels_w: Sequence[float],
    site_cap_w: float,
    site_power_w: float,
) -> float | None:
    """The cap (W) one interval's payload asks for; None for no cap; Unsupported if unknown.

    SIMPLE: levels 1-3 from the config (0 there, or level 0: no cap). LOAD_DISPATCH:
    ``setpoint`` absolute, ``delta`` from the site's power now, in the itemBase's units.
    LOAD_CONTROL: ``x-loadControlCapacity`` a fraction of the site cap,
    ``x-loadControlSetpoint`` absolute, ``x-loadControlPercentOffset`` from the power now.
    """
    name, kind = signal["signal_name"], signal["signal_type"]

    if name == "SIMPLE":
        level = round(payload)
        if level <= 0:
            return None
        cap_w = simple_levels_w[min(level, 3) - 1]
        return cap_w if cap_w > 0 else None
    if name == "LOAD_DISPATCH" and kind == "setpoint":
        return max(0.0, payload * _power_factor_w(signal))
    if name == "LOAD_DISPATCH" and kind == "delta":
        return max(0.0, site_power_w + payload * _power_factor_w(signal))
    if name == "LOAD_CONTROL" and kind == "x-loadControlCapacity":
        return max(0.0, min(payload, 1.0)) * site_cap_w
    if name == "LOAD_CONTROL" and kind == "x-loadControlSetpoint":
        return max(0.0, payload * _power_factor_w(signal))
    if name == "LOAD_CONTROL" and kind == "x-loadControlPercentOffset":
        return max(0.0, site_power_w * (1.0 + payload / 100.0))
    raise Unsupported(f"signal {name} of type {kind}")


def interval_caps(
    event: Mapping[str, Any],
    *,
    simple_levels_w: Sequence[float],
    site_cap_w: float,
    site_power_w: float,
) -> list[IntervalCap]:
    """Every interval of every signal the VEN understands, as caps (before randomisation).

    An event whose signals the VEN understands none of is Unsupported; a signal it does
    not understand beside one it does is left out (the caps it sets are all lower ones).
    """
    signals = event["event_signals"]
    kept: list[tuple[int, Mapping[str, Any], list[tuple[int, float, float, float]]]] = []
    reasons = []
    for j, signal in enumerate(signals):
        rows = []
        try:
            for i, interval in enumerate(signal["intervals"]):
                target_w = signal_target_w(
                    signal,
                    float(interval["signal_payload"]),
                    simple_levels_w=simple_levels_w,
                    site_cap_w=site_cap_w,
                    site_power_w=site_power_w,
                )
                if target_w is not None:
                    start_s = interval["dtstart"].timestamp()
                    rows.append((i, start_s, interval["duration"].total_seconds(), target_w))
        except Unsupported as e:
            reasons.append(str(e))
            continue
        kept.append((j, signal, rows))
    if not kept:
        raise Unsupported("; ".join(reasons) or "no signal")
    caps = []
    for j, signal, rows in kept:
        many = len(signal["intervals"]) > 1
        for i, start_s, duration_s, target_w in rows:
            suffix = (
                (f":{j}.{i}" if many else f":{j}") if len(kept) > 1 else (f":{i}" if many else "")
            )
            caps.append(IntervalCap(suffix, start_s, duration_s, target_w))
    return caps


def site_power_now_w(agent: Agent) -> float:
    """The site's power now (W): the meter if any, else the devices' last readings plus
    the overhead (call it once the agent has read its devices)."""
    return snapshot_power_w(agent.snapshot(), agent.config.site.overhead_w)


def least_site_power_w(agent: Agent) -> float:
    """The least the site can draw now (W): overhead, what cannot be shed at its worst
    case (a device not yet read or unreachable at nameplate), every other device at its
    minimum, pins as the last plan holds them, contract floors kept."""
    snap, limits = agent.snapshot(), agent.limits()
    least_w = unshed(snap.devices, limits, agent.last_plan).total_w + limits.overhead_w
    # A contract floor holds its node's GPUs above their own minimum.
    gpus = {d.device_id: d for d in snap.devices if d.kind is DeviceKind.GPU and d.controllable}
    for floor_w, ids in node_contract_floors(agent.config).values():
        own_w = sum(min_level_w(gpus[g]) for g in ids if g in gpus)
        least_w += max(0.0, floor_w - own_w)
    return least_w


class _LibraryLog(logging.Filter):
    """Takes openleadr's client records: a request's failure goes to the VEN (said once
    there, not at every poll); the client's routine lines (each report, each poll) drop."""

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        super().__init__()
        self.on_failure = on_failure

    def filter(self, record: logging.LogRecord) -> bool:
        if record.module != "client":
            return True
        if record.funcName == "_perform_request" and record.levelno >= logging.WARNING:
            self.on_failure(record.getMessage())
        return False


class Ven:
    """The VEN: registers with the VTN, takes its events into the book, reports power."""

    def __init__(
        self,
        agent: Agent,
        book: EventBook,
        cfg: OpenAdrConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        check_s: float = CHECK_S,
    ) -> None:
        self.agent = agent
        self.book = book
        self.cfg = cfg
        self.wall_clock = wall_clock
        self.rng = rng or random.SystemRandom()
        self.check_s = check_s
        self.client: OpenADRClient | None = None
        self.registered = False
        self.events_received = 0
        self.opted = {OPT_IN: 0, OPT_OUT: 0}
        self.last_answer_unix_s: float | None = None
        self.failing_since: float | None = None
        self.failure: str | None = None
        self._failure_said = False
        self._task: asyncio.Task[None] | None = None
        self._filter = _LibraryLog(self._failed)
        self._publish()

    # -- life ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start registering and polling in the background (the VTN may be down)."""
        logging.getLogger("openleadr").addFilter(self._filter)
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self) -> None:
        """Stop polling; the book keeps the events for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_client()
        logging.getLogger("openleadr").removeFilter(self._filter)

    async def _close_client(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            await client.stop()

    def _make_client(self) -> OpenADRClient:
        c = self.cfg
        client = OpenADRClient(
            ven_name=c.ven_name,
            vtn_url=c.vtn_url,
            ven_id=c.ven_id,
            cert=c.cert,
            key=c.key,
            ca_file=c.ca_file,
            show_fingerprint=False,
        )
        client.add_handler("on_event", self.take)
        client.add_handler("on_update_event", self.take)
        client.add_hook("after_parse_xml", self._answered)
        interval = timedelta(seconds=c.report_interval_s)
        client.add_report(
            self.report_power_w,
            resource_id=c.ven_name,
            measurement="REAL_POWER",
            unit="W",
            sampling_rate=interval,
            report_duration=interval,
        )
        return client

    async def _supervise(self) -> None:
        """Register (again) whenever the VEN is not registered; say what fails, once."""
        loop = asyncio.get_running_loop()
        # Apart from registering: a registration waits out openleadr's timeouts (up to
        # 15 s a request), and what fails meanwhile is said all the same.
        watch = loop.create_task(self._watch())
        next_try = loop.time()
        try:
            while True:
                client = self.client
                unregistered = client is None or client.registration_id is None
                # openleadr tries once; the VEN tries again at its own interval.
                if unregistered and loop.time() >= next_try and not await self._register():
                    next_try = loop.time() + self.cfg.poll_interval_s
                await asyncio.sleep(self.check_s)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch(self) -> None:
        while True:
            self._check()
            await asyncio.sleep(self.check_s)

    async def _register(self) -> bool:
        """Register with a new client; whether the VTN took the registration."""
        if self.registered:
            log.warning("OpenADR: registration with %s lost; registering again", self.cfg.vtn_url)
            self.registered = False
            self._publish()
        await self._close_client()
        client = self._make_client()
        self.client = client
        try:
            await client.run()
        except Exception as e:  # openleadr lets a few malformed answers through as errors
            self._failed(f"registration failed: {type(e).__name__}: {e}")
        if client.registration_id is None:
            self._failed(self.failure or "the VTN gave no registration id")
            await self._close_client()
            return False
        self.registered = True
        log.info(
            "OpenADR: registered with %s as VEN %s (registration %s)",
            self.cfg.vtn_url,
            client.ven_id,
            client.registration_id,
        )
        self._publish()
        return True

    # -- the VTN's health ----------------------------------------------------------

    def _answered(self, message_type: str, payload: object) -> None:
        """openleadr parsed a message from the VTN: it answers."""
        now = self.wall_clock()
        if self.failing_since is not None:
            if self._failure_said:
                log.info(
                    "OpenADR: VTN %s answers again after %.0f s",
                    self.cfg.vtn_url,
                    now - self.failing_since,
                )
            self.agent.alarms.clear(VTN_UNREACHABLE)
        self.failing_since, self.failure, self._failure_said = None, None, False
        self.last_answer_unix_s = now
        self._publish()

    def _failed(self, detail: str) -> None:
        if self.failing_since is None:
            self.failing_since = self.wall_clock()
        self.failure = detail
        self._publish()

    def _check(self) -> None:
        """Say a failure once (with openleadr's detail), and raise the alarm after a while."""
        if self.failing_since is None:
            return
        held = len(self.book.list())
        if not self._failure_said:
            self._failure_said = True
            log.warning(
                "OpenADR: VTN %s does not answer well: %s; the %d event(s) in the book stay "
                "as they are, retrying",
                self.cfg.vtn_url,
                self.failure,
                held,
            )
        failing_s = self.wall_clock() - self.failing_since
        if failing_s >= self.cfg.alarm_after_s:
            self.agent.alarms.update(
                VTN_UNREACHABLE,
                f"no good answer from VTN {self.cfg.vtn_url} for {failing_s:.0f} s: "
                f"{self.failure}; {held} event(s) kept",
            )

    def _publish(self) -> None:
        # Replaced whole: the metrics' thread reads one or the other.
        self.agent.ven_status = VenStatus(
            registered=self.registered,
            connected=self.registered and self.failing_since is None,
            last_answer_unix_s=self.last_answer_unix_s,
            events_received=self.events_received,
            opted_in=self.opted[OPT_IN],
            opted_out=self.opted[OPT_OUT],
        )

    # -- reports -------------------------------------------------------------------

    def report_power_w(self) -> float:
        """The site's power now (W) for TELEMETRY_USAGE: the meter if any, else the devices'
        measured sum plus overhead."""
        return site_power_now_w(self.agent)

    # -- events --------------------------------------------------------------------

    def take(self, event: dict[str, Any]) -> str:
        """Take one event (new, changed or cancelled) into the book; the opt answer."""
        desc = event["event_descriptor"]
        event_id, status = str(desc["event_id"]), desc.get("event_status")
        self.events_received += 1
        try:
            if status == "cancelled":
                self._end(event_id, "cancelled by the VTN")
                return self._answer(OPT_IN)
            return self._answer(self._take(event_id, event))
        except EventError as e:
            # The book refused it (an operator cancelled it here): the VTN hears no.
            log.warning("OpenADR: event %s opted out: the event book refused it: %s", event_id, e)
            with contextlib.suppress(Exception):
                self._end(event_id, f"refused by the book: {e}", quiet=True)
            return self._answer(OPT_OUT)
        except Exception as e:
            # Never let an event through half-taken: say it, opt out, keep the rest.
            log.exception("OpenADR: event %s could not be taken; opting out", event_id)
            with contextlib.suppress(Exception):
                self._end(event_id, f"could not be taken: {e}", quiet=True)
            return self._answer(OPT_OUT)

    def _answer(self, opt: str) -> str:
        self.opted[opt] += 1
        self._publish()
        return opt

    def _take(self, event_id: str, event: dict[str, Any]) -> str:
        try:
            caps = interval_caps(
                event,
                simple_levels_w=self.cfg.simple_levels_w,
                site_cap_w=self.agent.config.site.cap_w,
                site_power_w=site_power_now_w(self.agent),
            )
        except Unsupported as e:
            log.warning("OpenADR: event %s opted out: %s", event_id, e)
            self._end(event_id, f"unsupported: {e}", quiet=True)
            return OPT_OUT
        opt = OPT_IN
        least_w = least_site_power_w(self.agent)
        lowest_w = min((c.target_w for c in caps), default=None)
        if self.cfg.opt_out_when == "floor" and lowest_w is not None and lowest_w < least_w:
            opt = OPT_OUT
            log.warning(
                "OpenADR: event %s opted out: its target %.0f W is below the %.0f W the site "
                "cannot shed (overhead, unreachable devices, contract floors)",
                event_id,
                lowest_w,
                least_w,
            )
        stem = book_id(event_id)
        period = event.get("active_period") or {}
        offset_s = self._offset_s(stem, caps, period)
        ramp = period.get("ramp_up")
        ramp_up_s = ramp.total_seconds() if isinstance(ramp, timedelta) else 0.0
        first = min((c.start_unix_s for c in caps), default=None)
        wanted = set()
        for c in caps:
            wanted.add(stem + c.suffix)
            self.book.add(
                GridEvent(
                    id=stem + c.suffix,
                    name=f"openadr {event_id}"[:128],
                    source=stem,
                    start_unix_s=c.start_unix_s + offset_s,
                    duration_s=c.duration_s,
                    target_w=c.target_w,
                    ramp_up_s=ramp_up_s if c.start_unix_s == first else 0.0,
                    opt=BOOK_IN if opt == OPT_IN else BOOK_OUT,
                ),
                ACTOR,
            )
        # Intervals a modification dropped end now.
        for held in self.book.list():
            if held.source == stem and held.id not in wanted:
                self.book.cancel(held.id, ACTOR, "dropped by the VTN's modification")
        return opt

    def _offset_s(self, stem: str, caps: Sequence[IntervalCap], period: Mapping[str, Any]) -> float:
        """The randomised start's offset (s): the one the book holds for this event if it
        fits its window (a restart, a modification), else rolled now."""
        tolerance = period.get("tolerance") or {}
        after = (tolerance.get("tolerate") or {}).get("startafter")
        window_s = after.total_seconds() if isinstance(after, timedelta) else 0.0
        if window_s <= 0 or not caps:
            return 0.0
        for c in caps:
            held = self.book.get(stem + c.suffix)
            if held is not None and held.cancelled_unix_s is None:
                offset_s = held.start_unix_s - c.start_unix_s
                if 0.0 <= offset_s <= window_s:
                    return offset_s
        return self.rng.uniform(0.0, window_s)

    def _end(self, event_id: str, reason: str, *, quiet: bool = False) -> None:
        stem = book_id(event_id)
        ended = [e for e in self.book.list() if e.source == stem]
        for e in ended:
            self.book.cancel(e.id, ACTOR, reason)
        if ended and not quiet:
            log.info("OpenADR: event %s %s: %d cap(s) ended", event_id, reason, len(ended))
