"""The event book: demand-response events at run time, stored, audited, and handed to the loop.

An event is a cap with a start and a duration, from an operator through the
API (source ``api:<actor>``), from a VTN through the OpenADR VEN
(``openadr:<event id>``), or from the config. While it is in force the loop
takes it like any other cap source (``Agent.limits``), under the name
``cap_source``: ``openadr:<event id>`` for the VEN's events, ``event:<id>``
for the others. TOML events stay in the config (``[schedule] events``); the
book holds the ones added while the agent runs.

Ramp-up: an event with ``ramp_up_s`` is in force from ``start - ramp_up_s``;
over the ramp its cap falls linearly from the domain's configured limit (the
site's hard cap for the site) to the target, so the target is fully in force
at ``start`` (the safe reading: nothing is left to shed after the start).
Other caps in force lower than the ramp still win (the loop takes the
minimum). Randomisation is the VEN's to apply before the event reaches the
book.

Every change (add, modification, cancel, opt) is one SQLite transaction that
holds the event's row and its audit record together, so the store's
acknowledged-writes check (its audit sequence number) covers events as it
covers overrides. The events not yet over are kept in memory too, in a dict
replaced whole at each change, so the loop and the metrics' thread read them
without touching SQLite.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from siteagent.agent.api.overrides import AuditRecord, OverrideError
from siteagent.agent.config import SITE_DOMAIN_ID, Config
from siteagent.agent.control.grid import GridEventState

if TYPE_CHECKING:
    from siteagent.agent.api.store import Store
    from siteagent.agent.control.loop import Agent

log = logging.getLogger("siteagent.events")

OPT_IN, OPT_OUT = "in", "out"
OPTS = (OPT_IN, OPT_OUT)
# States an event is listed in (``GridEvent.state``).
SCHEDULED, RAMPING, ACTIVE, ENDED, CANCELLED, OPTED_OUT = (
    "scheduled",
    "ramping",
    "active",
    "ended",
    "cancelled",
    "opted-out",
)
OPENADR_PREFIX = "openadr:"
API_PREFIX = "api:"
CONFIG_PREFIX = "config:"
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The longest event the API takes (s): a week, longer than any programme's event.
MAX_EVENT_S = 7 * 86400
# An event's status in its audit record: a change the agent made, like an override's expiry.
AUDIT_STATUS = 200

T = TypeVar("T")


class EventError(OverrideError):
    """An event the book refuses; ``status`` is the HTTP status that says so (as overrides)."""


@dataclass(frozen=True, slots=True)
class GridEvent:
    """One demand-response event: a cap of ``target_w`` on a domain from start for duration."""

    id: str
    name: str
    source: str  # "api:<actor>", "openadr:<event id>", "config:<name>"
    start_unix_s: float
    duration_s: float
    target_w: float  # the cap in force during the event (W)
    domain: str = SITE_DOMAIN_ID
    ramp_up_s: float = 0.0
    created_unix_s: float = 0.0
    cancelled_unix_s: float | None = None
    opt: str = OPT_IN
    modified_seq: int = 0

    @property
    def end_unix_s(self) -> float:
        """When the event ends (unix s)."""
        return self.start_unix_s + self.duration_s

    @property
    def cap_source(self) -> str:
        """The cap's source in the loop: 'openadr:<event id>' for the VEN's, 'event:<id>'."""
        if self.source.startswith(OPENADR_PREFIX):
            return self.source
        return f"event:{self.id}"

    @property
    def content(self) -> tuple[object, ...]:
        """What an add compares to tell a repeat (no-op) from a modification."""
        return (
            self.name,
            self.source,
            self.start_unix_s,
            self.duration_s,
            self.target_w,
            self.domain,
            self.ramp_up_s,
            self.opt,
        )

    def cap_w(self, now_unix_s: float, limit_w: float) -> float | None:
        """The cap (W) it sets at a time, ramping down from ``limit_w``; None if none."""
        if self.cancelled_unix_s is not None or self.opt != OPT_IN:
            return None
        if self.start_unix_s <= now_unix_s < self.end_unix_s:
            return self.target_w
        ramp_from = self.start_unix_s - self.ramp_up_s
        if self.ramp_up_s > 0 and ramp_from <= now_unix_s < self.start_unix_s:
            done = (now_unix_s - ramp_from) / self.ramp_up_s
            return max(self.target_w, limit_w - (limit_w - self.target_w) * done)
        return None

    def state(self, now_unix_s: float) -> str:
        """scheduled, ramping, active, ended, cancelled or opted-out, at a time."""
        if self.cancelled_unix_s is not None:
            return CANCELLED
        if now_unix_s >= self.end_unix_s:
            return ENDED
        if self.opt != OPT_IN:
            return OPTED_OUT
        if now_unix_s >= self.start_unix_s:
            return ACTIVE
        if self.ramp_up_s > 0 and now_unix_s >= self.start_unix_s - self.ramp_up_s:
            return RAMPING
        return SCHEDULED

    def describe(self) -> str:
        """A short human description: 'ers-0814: site 400000 W for 3600 s'."""
        return f"{self.name}: {self.domain} {self.target_w:.0f} W for {self.duration_s:.0f} s"


def event_to_json(e: GridEvent) -> str:
    """The event as stored (every field)."""
    return json.dumps(asdict(e), sort_keys=True)


def event_from_json(body: str) -> GridEvent:
    """An event as stored back to the dataclass."""
    data: dict[str, Any] = json.loads(body)
    return GridEvent(**data)


def configured_limits_w(cfg: Config) -> dict[str, float]:
    """Domain id -> configured limit (W), 'site' -> the site's hard cap."""
    return {SITE_DOMAIN_ID: cfg.site.cap_w, **{d.id: d.limit_w for d in cfg.domains}}


def new_event_id() -> str:
    """A fresh, unguessable event id."""
    return "evt-" + secrets.token_hex(6)


def _finite(value: float, what: str, *, minimum: float, strict: bool = False) -> None:
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"over {minimum:g}" if strict else f"{minimum:g} or more"
        raise EventError(422, f"{what}: found {value!r}, expected a finite number {bound}")


class EventBook:
    """The run-time events: stored in the store, audited, read by the loop and the metrics."""

    def __init__(
        self,
        store: Store,
        *,
        limits_w: Mapping[str, float],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits_w = dict(limits_w)
        self.wall_clock = wall_clock
        now = wall_clock()
        self._live: dict[str, GridEvent] = {
            e.id: e for e in store.events() if e.cancelled_unix_s is None and e.end_unix_s > now
        }
        self._agent: Agent | None = None

    def attach(self, agent: Agent) -> None:
        """Feed ``agent``: its caps include the events in force; it ticks at each start."""
        self._agent = agent
        agent.set_grid_caps(self)
        for e in self._live.values():
            self._schedule(e)

    # -- reading (memory only: any thread) ------------------------------------------

    def get(self, event_id: str) -> GridEvent | None:
        """One event by id, any state."""
        live = self._live.get(event_id)
        return live if live is not None else self.store.get_event(event_id)

    def list(self, include_past: bool = False) -> builtins.list[GridEvent]:
        """Events not cancelled and not over, soonest first; with include_past, every event."""
        if include_past:
            return sorted(self.store.events(), key=lambda e: (e.start_unix_s, e.id))
        now = self.wall_clock()
        live = [e for e in self._live.values() if e.end_unix_s > now]
        return sorted(live, key=lambda e: (e.start_unix_s, e.id))

    def in_force(self, now_unix_s: float) -> dict[str, tuple[float, str]]:
        """Cap source -> (cap W, domain) of every event in force (or ramping) at a time."""
        out: dict[str, tuple[float, str]] = {}
        for e in self._live.values():
            cap = e.cap_w(now_unix_s, self.limits_w.get(e.domain, math.inf))
            if cap is None:
                continue
            seen = out.get(e.cap_source)
            if seen is None or cap < seen[0]:
                out[e.cap_source] = (cap, e.domain)
        return out

    def states(self, now_unix_s: float) -> builtins.list[GridEventState]:
        """Every event not cancelled and not yet over, soonest first, for the metrics."""
        live = sorted(
            (e for e in self._live.values() if e.end_unix_s > now_unix_s),
            key=lambda e: (e.start_unix_s, e.id),
        )
        return [
            GridEventState(
                event_id=e.id,
                opted_in=e.opt == OPT_IN,
                in_force=e.cap_w(now_unix_s, self.limits_w.get(e.domain, math.inf)) is not None,
                start_unix_s=e.start_unix_s,
                target_w=e.target_w,
            )
            for e in live
        ]

    # -- writing ------------------------------------------------------------------

    def add(self, event: GridEvent, actor: str) -> GridEvent:
        """Add an event, or modify the one with its id; the same content again is a no-op."""
        self._check(event)
        now = self.wall_clock()
        old = self.get(event.id)
        if old is not None:
            if old.cancelled_unix_s is not None:
                raise EventError(409, f"event {old.id} was cancelled; add it under a new id")
            if old.source != event.source:
                raise EventError(
                    409,
                    f"event {old.id} comes from {old.source}, not {event.source}; "
                    "only its source can change it",
                )
            if old.content == event.content:
                return old
            new = replace(
                event,
                created_unix_s=old.created_unix_s,
                cancelled_unix_s=None,
                modified_seq=old.modified_seq + 1,
            )
            self._write(
                new, actor, "event modify", f"modified: {new.describe()} ({_diff(old, new)})"
            )
            return new
        new = replace(event, created_unix_s=now, cancelled_unix_s=None, modified_seq=0)
        self._write(new, actor, "event add", f"added: {new.describe()}")
        return new

    def cancel(self, event_id: str, actor: str, reason: str) -> GridEvent:
        """End an event now (its cap is dropped); cancelling a cancelled event is a no-op."""
        old = self.get(event_id)
        if old is None:
            raise EventError(404, f"no event {event_id!r}")
        if old.cancelled_unix_s is not None:
            return old
        new = replace(old, cancelled_unix_s=self.wall_clock())
        self._write(new, actor, "event cancel", f"cancelled: {old.describe()} ({reason})")
        return new

    def set_opt(self, event_id: str, opt: str, actor: str) -> GridEvent:
        """Opt in or out of an event; an opted-out event is kept and listed but not in force."""
        if opt not in OPTS:
            raise EventError(422, f"opt: found {opt!r}, expected one of {list(OPTS)}")
        old = self.get(event_id)
        if old is None:
            raise EventError(404, f"no event {event_id!r}")
        if old.cancelled_unix_s is not None:
            raise EventError(409, f"event {old.id} is cancelled")
        if old.opt == opt:
            return old
        new = replace(old, opt=opt, modified_seq=old.modified_seq + 1)
        self._write(new, actor, f"event opt-{opt}", f"opted {opt}: {old.describe()}")
        return new

    # -- internals ---------------------------------------------------------------

    def _check(self, e: GridEvent) -> None:
        if not EVENT_ID_RE.match(e.id):
            raise EventError(
                422, f"id: found {e.id!r}, expected 1-128 of letters, digits and . _ : -"
            )
        if not e.name or len(e.name) > 128:
            raise EventError(422, f"name: found {e.name!r}, expected 1-128 characters")
        _finite(e.start_unix_s, "start_unix_s", minimum=0.0)
        _finite(e.duration_s, "duration_s", minimum=0.0, strict=True)
        _finite(e.target_w, "target_w", minimum=0.0)
        _finite(e.ramp_up_s, "ramp_up_s", minimum=0.0)
        if e.opt not in OPTS:
            raise EventError(422, f"opt: found {e.opt!r}, expected one of {list(OPTS)}")
        if e.domain not in self.limits_w:
            known = sorted(self.limits_w)
            raise EventError(409, f"unknown domain {e.domain!r}; expected one of {known}")

    def _write(self, new: GridEvent, actor: str, action: str, result: str) -> None:
        """Store the event with its audit record (one transaction), then hand it to the loop."""
        record = AuditRecord(
            time_unix_s=self.wall_clock(),
            actor=actor,
            client=new.source,
            action=action,
            request=event_to_json(new),
            status=AUDIT_STATUS,
            result=result,
            override_id=new.id,
        )

        def change() -> None:
            self.store.write_event(new, record)
            now = self.wall_clock()
            # Events over are dropped here: memory holds what is not over yet.
            live = {i: e for i, e in self._live.items() if e.end_unix_s > now and i != new.id}
            if new.cancelled_unix_s is None and new.end_unix_s > now:
                live[new.id] = new
            # Replaced whole: the metrics' thread reads the old or the new dict, never half.
            self._live = live

        what = f"event {new.id} ({new.source}) {action.removeprefix('event ')}"
        if self._agent is None:
            change()
        else:
            self._agent.change_caps(change, what)
        log.info("%s by %s: %s", what, actor, result)
        self._schedule(new)

    def _schedule(self, e: GridEvent) -> None:
        if self._agent is None:
            return
        pending = e.cancelled_unix_s is None and e.opt == OPT_IN
        self._agent.tick_at(e.cap_source, e.start_unix_s if pending else None)


def _diff(old: GridEvent, new: GridEvent) -> str:
    names = ("name", "source", "start_unix_s", "duration_s", "target_w", "domain", "ramp_up_s")
    changed = [
        f"{n} {getattr(old, n)!r} -> {getattr(new, n)!r}"
        for n in (*names, "opt")
        if getattr(old, n) != getattr(new, n)
    ]
    return ", ".join(changed) or "no change"


# -- the API's request ---------------------------------------------------------------

Name = Annotated[str, Field(min_length=1, max_length=128, description="the event's name")]
EventId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="the event's id: the same id again is a no-op, changed content modifies it",
    ),
]
# Datetimes come as ISO 8601 strings in JSON: strict mode would refuse every one. Naive
# ones pass here and are refused in ``event_of_request`` with the offset to add.
Instant = Annotated[datetime, Field(strict=False)]


class EventRequest(BaseModel):
    """Add (or modify, by id) a demand-response event: a cap of target_w from start."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        # Exactly one of the two (not null), in the schema too (``event_of_request`` checks).
        json_schema_extra={
            "oneOf": [
                {"required": ["duration_s"], "properties": {"duration_s": {"type": "number"}}},
                {"required": ["end"], "properties": {"end": {"type": "string"}}},
            ]
        },
    )

    name: Name
    start: Instant = Field(description="ISO 8601 with a UTC offset: 2026-08-14T16:00-05:00")
    duration_s: Annotated[float, Field(gt=0, le=MAX_EVENT_S)] | None = Field(
        default=None, description="how long (s); or give end"
    )
    end: Instant | None = Field(default=None, description="when it ends; or give duration_s")
    target_w: Annotated[float, Field(ge=0, le=1e12, description="the cap during the event (W)")]
    domain: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default=SITE_DOMAIN_ID, description="a configured domain id, or 'site'"
    )
    ramp_up_s: Annotated[float, Field(ge=0, le=86400)] = 0.0
    id: EventId | None = None


def event_of_request(
    req: EventRequest, *, actor: str, now_unix_s: float, new_id: Callable[[], str] = new_event_id
) -> GridEvent:
    """The event an API request asks for; EventError if its times do not make one.

    422 for what the schema says too (an offset, duration_s or end); 409 for times that
    are well formed but make no event now (an end not after the start, an event over)."""
    for key, t in (("start", req.start), ("end", req.end)):
        if t is not None and t.utcoffset() is None:
            raise EventError(
                422,
                f"{key}: found {t.isoformat(timespec='minutes')} without a UTC offset, expected "
                "ISO 8601 with one, e.g. 2026-08-14T16:00-05:00 or 2026-08-14T21:00Z",
            )
    start = req.start.timestamp()
    if (req.duration_s is None) == (req.end is None):
        raise EventError(422, "give either duration_s or end, not both and not neither")
    if req.end is not None:
        end = req.end.timestamp()
        if end <= start:
            raise EventError(409, f"end {_iso(req.end)} is not after start {_iso(req.start)}")
        duration_s = end - start
        if duration_s > MAX_EVENT_S:
            raise EventError(
                409,
                f"from start {_iso(req.start)} to end {_iso(req.end)} is "
                f"{duration_s / 86400:.1f} days, longer than an event may last "
                f"({MAX_EVENT_S / 86400:.0f} days)",
            )
    else:
        assert req.duration_s is not None
        duration_s = req.duration_s
    if start + duration_s <= now_unix_s:
        raise EventError(
            409,
            f"the event ends at {_iso_unix(start + duration_s)}, before now "
            f"({_iso_unix(now_unix_s)}); a past event cannot be added",
        )
    return GridEvent(
        id=req.id or new_id(),
        name=req.name,
        source=API_PREFIX + actor,
        start_unix_s=start,
        duration_s=duration_s,
        target_w=req.target_w,
        domain=req.domain,
        ramp_up_s=req.ramp_up_s,
    )


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _iso_unix(t_unix_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_unix_s))
