"""The event API: add, list and cancel demand-response events (``/v1/events``).

Same tokens and scopes as the overrides: reading takes ``read``, adding and
cancelling ``operate``; cancelling an event another source added (another
actor's, or a VTN's) raises the cap, so it takes ``admin``, as lifting another
actor's cap override does. Each request is in the audit log (the API's guard),
and each change the book makes too, with the event's source.
"""

from __future__ import annotations

from typing import Annotated, Self

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from siteagent.agent.api.auth import Scope as TokenScope
from siteagent.agent.api.events import (
    API_PREFIX,
    EventError,
    EventRequest,
    GridEvent,
    event_of_request,
)
from siteagent.agent.api.http import _ERRORS, _WRITE_ERRORS, Operator, Reader, Svc, _audit

EventIdPath = Annotated[str, Path(min_length=1, max_length=128)]


class EventView(BaseModel):
    """A grid event as the API shows it."""

    id: str
    name: str
    source: str
    state: str
    description: str
    cap_source: str
    start_unix_s: float
    end_unix_s: float
    duration_s: float
    target_w: float
    domain: str
    ramp_up_s: float
    opt: str
    created_unix_s: float
    cancelled_unix_s: float | None
    modified_seq: int

    @classmethod
    def of(cls, e: GridEvent, now_unix_s: float) -> Self:
        """The view of one event at a wall-clock time."""
        return cls(
            id=e.id,
            name=e.name,
            source=e.source,
            state=e.state(now_unix_s),
            description=e.describe(),
            cap_source=e.cap_source,
            start_unix_s=e.start_unix_s,
            end_unix_s=e.end_unix_s,
            duration_s=e.duration_s,
            target_w=e.target_w,
            domain=e.domain,
            ramp_up_s=e.ramp_up_s,
            opt=e.opt,
            created_unix_s=e.created_unix_s,
            cancelled_unix_s=e.cancelled_unix_s,
            modified_seq=e.modified_seq,
        )


router = APIRouter(tags=["events"])


@router.get("/v1/events", response_model=list[EventView], responses=_ERRORS)
async def list_events(
    _: Reader, s: Svc, all: Annotated[bool, Query(description="every event, past too")] = False
) -> list[EventView]:
    """Events not cancelled and not over (soonest first); with all=true, every event."""
    now = s.wall_clock()
    return [EventView.of(e, now) for e in s.runtime.events.list(include_past=all)]


@router.post(
    "/v1/events",
    response_model=EventView,
    status_code=201,
    responses={**_WRITE_ERRORS, 200: {"model": EventView, "description": "a repeat or a change"}},
)
async def add_event(
    request: Request, principal: Operator, s: Svc, body: Annotated[EventRequest, Body()]
) -> JSONResponse:
    """Add an event (201); the same id again: 200, unchanged or modified."""
    ctx = _audit(request)
    book = s.runtime.events
    now = s.wall_clock()
    event = event_of_request(body, actor=principal.name, now_unix_s=now)
    ctx.override_id = event.id
    known = book.get(event.id)
    stored = book.add(event, principal.name)
    if known is None:
        ctx.result = f"event added: {stored.id} {stored.describe()}"
    elif known.modified_seq == stored.modified_seq:
        ctx.result = f"repeat of event {stored.id}: unchanged"
    else:
        ctx.result = f"event modified: {stored.id} {stored.describe()}"
    view = EventView.of(stored, now)
    return JSONResponse(view.model_dump(), status_code=201 if known is None else 200)


@router.delete("/v1/events/{event_id}", response_model=EventView, responses=_WRITE_ERRORS)
async def cancel_event(
    request: Request,
    principal: Operator,
    s: Svc,
    event_id: EventIdPath,
    reason: Annotated[str, Query(min_length=1, max_length=500)] = "no reason given",
) -> EventView:
    """Cancel an event: its cap ends now. Another source's event takes admin."""
    ctx = _audit(request)
    ctx.override_id = event_id
    book = s.runtime.events
    known = book.get(event_id)
    if known is None:
        raise EventError(404, f"no event {event_id!r}")
    if known.cancelled_unix_s is not None:
        raise EventError(409, f"event {event_id} is already cancelled")
    own = known.source == API_PREFIX + principal.name
    if not own and principal.scope < TokenScope.ADMIN:
        raise EventError(
            403,
            f"event {event_id} comes from {known.source}; cancelling it raises the cap, "
            "which takes the admin scope",
        )
    ended = book.cancel(event_id, principal.name, reason)
    ctx.result = f"event cancelled: {ended.id} {ended.describe()} ({reason})"
    return EventView.of(ended, s.wall_clock())
