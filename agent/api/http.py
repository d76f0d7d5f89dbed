"""The override API: an ASGI app (FastAPI) served by uvicorn inside the agent's event loop.

Reads (scope ``read``): status, devices, the plan with its reasons, overrides,
the audit log. Writes (scope ``operate``; lifting caps takes ``admin``):
create, cancel and resume overrides. Every write, accepted or refused, is in
the audit log before its answer leaves. Bad requests get a 4xx with a
``detail`` that says why; the OpenAPI document is at ``/openapi.json``.
"""

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Self

import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from siteagent.agent.api.auth import FailureLimiter, Principal, TokenStore, ssl_options, tokens_path
from siteagent.agent.api.auth import Scope as TokenScope
from siteagent.agent.api.overrides import (
    AuditRecord,
    EndRequest,
    Override,
    OverrideError,
    OverrideManager,
    request_models,
    ttl_too_long,
)
from siteagent.agent.api.runtime import OverrideRuntime
from siteagent.agent.api.store import Store
from siteagent.agent.config import ApiConfig, Config
from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.loop import MODES, Agent
from siteagent.domain import DeviceKind, DeviceStatus
from siteagent.domain.site import DomainTree, domain_codes, domain_loads_w

log = logging.getLogger("siteagent.api")

API_VERSION = "1"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDIT_KEY = "siteagent.audit"


# -- response models ----------------------------------------------------------------


class FieldError(BaseModel):
    """One problem with one field of a request."""

    loc: str
    msg: str


class ErrorBody(BaseModel):
    """Why a request was refused."""

    detail: str
    errors: list[FieldError] = []


class OverrideView(BaseModel):
    """An override as the API shows it."""

    id: str
    kind: str
    state: str
    description: str
    actor: str
    reason: str
    created_at_unix_s: float
    expires_at_unix_s: float
    remaining_s: float
    cap_w: float | None = None
    domain: str | None = None
    mode: str | None = None
    device_id: str | None = None
    power_w: float | None = None
    replaces: list[str] = []
    idempotency_key: str | None = None
    ended_at_unix_s: float | None = None
    ended_by: str | None = None
    end_reason: str | None = None

    @classmethod
    def of(cls, ov: Override, now_unix_s: float) -> Self:
        """The view of one override at a wall-clock time."""
        state = ov.state(now_unix_s)
        return cls(
            id=ov.id,
            kind=ov.kind,
            state=state,
            description=ov.describe(),
            actor=ov.actor,
            reason=ov.reason,
            created_at_unix_s=ov.created_at_unix_s,
            expires_at_unix_s=ov.expires_at_unix_s,
            remaining_s=max(0.0, ov.expires_at_unix_s - now_unix_s) if state == "active" else 0.0,
            cap_w=ov.cap_w,
            domain=ov.domain,
            mode=ov.mode,
            device_id=ov.device_id,
            power_w=ov.power_w,
            replaces=list(ov.replaces),
            idempotency_key=ov.idempotency_key,
            ended_at_unix_s=ov.ended_at_unix_s,
            ended_by=ov.ended_by,
            end_reason=ov.end_reason,
        )


class DomainView(BaseModel):
    """A power domain's limit in force and its load (W): devices in it and below it."""

    domain_id: str
    parent: str | None
    limit_w: float
    configured_limit_w: float
    worst_case_w: float = 0.0
    measured_w: float = 0.0


class AlarmView(BaseModel):
    """An alarm raised now: which, why, and since when (Unix s)."""

    name: str
    reason: str
    since_unix_s: float


class MeterStatusView(BaseModel):
    """One meter: its state, what it reads and what the plan counts beside the devices (W)."""

    meter_id: str
    domain: str
    state: str
    reason: str | None
    metered_w: float | None
    estimated_w: float
    unexplained_w: float | None
    planned_unexplained_w: float
    frequency_hz: float | None
    age_s: float | None


class FrequencyResponseView(BaseModel):
    """The under-frequency block: armed (W, devices), and whether it is shed and held."""

    armed_w: float
    armed_devices: int
    triggered: bool
    triggers: int


class StatusView(BaseModel):
    """The site at a glance."""

    site: str
    time_unix_s: float
    site_power_w: float
    worst_case_w: float
    site_cap_w: float
    effective_cap_w: float
    safety_margin_w: float
    cap_source: str
    cap_source_override: OverrideView | None
    mining_w: float
    ai_w: float
    aux_w: float
    devices: int
    devices_by_state: dict[str, int]
    modes: list[str]
    pins: int
    plan_mode: str | None
    plan_reason: str | None
    last_tick_age_s: float | None
    active_overrides: int
    domains: list[DomainView]
    alarms: list[AlarmView] = []
    meters: list[MeterStatusView] = []
    frequency_response: FrequencyResponseView | None = None


class DeviceView(BaseModel):
    """One device as the agent sees it."""

    device_id: str
    kind: str
    domain: str
    state: str
    power_w: float | None
    budget_w: float
    expected_w: float
    nameplate_power_w: float
    power_target_w: float | None
    awake: bool | None
    controllable: bool
    hashrate_ths: float | None
    temperature_c: float | None
    reading_age_s: float | None
    last_error: str | None
    override: str | None
    address: str | None = None
    make: str | None = None
    model: str | None = None
    firmware: str | None = None
    nameplate_hashrate_ths: float = 0.0


class SetpointView(BaseModel):
    """What the plan wants of one device, and why."""

    device_id: str
    awake: bool
    power_target_w: float | None
    planned_w: float
    reason: str


class DeferredView(BaseModel):
    """A change the plan wants but the safe ordering held back, and why."""

    device_id: str
    kind: str
    reason: str


class PlanView(BaseModel):
    """The last control tick's plan, what was sent and what was held back."""

    tick_age_s: float
    mode: str
    reason: str
    effective_cap_w: float
    cap_source: str
    planned_w: float
    plan_duration_s: float
    setpoints: list[SetpointView]
    sent: list[str]
    failed: list[str]
    deferred: list[DeferredView]


class AuditView(BaseModel):
    """One audit record."""

    seq: int
    time_unix_s: float
    actor: str
    client: str
    action: str
    request: str
    status: int
    result: str
    override_id: str | None

    @classmethod
    def of(cls, r: AuditRecord) -> Self:
        """The view of one stored audit record."""
        return cls(**{**asdict(r), "seq": r.seq or 0})


# -- audit and body limit ------------------------------------------------------------


@dataclass(slots=True)
class AuditContext:
    """What the handlers learn about a write, for its audit record."""

    actor: str = "anonymous"
    override_id: str | None = None
    result: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _error_json(
    status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> list[Message]:
    body = json.dumps({"detail": detail}).encode()
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        },
        {"type": "http.response.body", "body": body},
    ]


class GuardMiddleware:
    """Caps request bodies, and writes every write request's audit record before it answers."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        max_body_bytes: int,
        wall_clock: Callable[[], float],
    ) -> None:
        self.app = app
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.wall_clock = wall_clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        ctx = AuditContext()
        scope[AUDIT_KEY] = ctx
        body, refusal = await self._read_body(scope, receive)
        if refusal is not None:
            status, detail = refusal
            messages = _error_json(status, detail)
        else:
            messages = await self._run(scope, body, receive)
        if method in WRITE_METHODS:
            self._audit(scope, ctx, body, messages)
        for m in messages:
            await send(m)

    async def _read_body(
        self, scope: Scope, receive: Receive
    ) -> tuple[bytes, tuple[int, str] | None]:
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return b"", (400, "Content-Length is not a number")
                if declared > limit:
                    return b"", (413, f"request body over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", (413, f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None

    async def _run(self, scope: Scope, body: bytes, receive: Receive) -> list[Message]:
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        try:
            await self.app(scope, replay, capture)
        except Exception:
            log.exception("API request %s %s failed", scope["method"], scope["path"])
            return _error_json(500, "internal error (logged by the agent)")
        return messages

    def _audit(self, scope: Scope, ctx: AuditContext, body: bytes, messages: list[Message]) -> None:
        status = 500
        response = b""
        for m in messages:
            if m["type"] == "http.response.start":
                status = int(m["status"])
            elif m["type"] == "http.response.body":
                response += m.get("body", b"")
        result = ctx.result
        if result is None:
            try:
                result = str(json.loads(response).get("detail", ""))
            except (ValueError, AttributeError):
                result = ""
            result = result or f"status {status}"
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")
        action = f"{scope['method']} {scope['path']}" + (f"?{query}" if query else "")
        try:
            self.store.append_audit(
                AuditRecord(
                    time_unix_s=self.wall_clock(),
                    actor=ctx.actor,
                    client=str(client[0]) if client else "unknown",
                    action=action,
                    request=body.decode("utf-8", "replace"),
                    status=status,
                    result=result,
                    override_id=ctx.override_id,
                )
            )
        except Exception:
            log.exception("could not write the audit record for %s", action)


# -- the app ---------------------------------------------------------------------------


@dataclass(slots=True)
class Services:
    """What the handlers work with: the override runtime, and who may call."""

    runtime: OverrideRuntime
    tokens: TokenStore
    limiter: FailureLimiter

    @property
    def agent(self) -> Agent:
        """The agent the overrides steer."""
        return self.runtime.agent

    @property
    def manager(self) -> OverrideManager:
        """The overrides in force."""
        return self.runtime.manager

    @property
    def store(self) -> Store:
        """Overrides and the audit log."""
        return self.runtime.store

    def wall_clock(self) -> float:
        """Now (Unix s), by the runtime's clock."""
        return self.runtime.wall_clock()


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed request",
        401: "no token, or a token not known",
        403: "the token's scope does not allow this",
        413: "request body too large",
        422: "the request is not valid; detail says why",
        429: "too many failed authentications from this address",
    }.items()
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"model": ErrorBody, "description": "no such override"},
    409: {"model": ErrorBody, "description": "refused: conflicts with the site's state"},
}
_NOT_FOUND = {**_ERRORS, 404: _WRITE_ERRORS[404]}


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _audit(request: Request) -> AuditContext:
    ctx = request.scope.get(AUDIT_KEY)
    if not isinstance(ctx, AuditContext):
        ctx = AuditContext()
        request.scope[AUDIT_KEY] = ctx
    return ctx


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


Svc = Annotated[Services, Depends(_services)]
_bearer = HTTPBearer(auto_error=False, description="a token from `siteagent token create`")


def require(needed: TokenScope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller's token, checked for ``needed``; 401/403/429 otherwise."""

    async def check(
        request: Request,
        s: Svc,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        client = _client(request)
        wait_s = s.limiter.blocked_for_s(client)
        if wait_s > 0:
            raise StarletteHTTPException(
                429,
                f"too many failed authentications from {client}; retry in {wait_s:.0f} s",
                headers={"Retry-After": str(max(1, round(wait_s)))},
            )
        principal = None if creds is None else s.tokens.check(creds.credentials)
        if principal is None:
            s.limiter.failed(client)
            what = "missing bearer token" if creds is None else "unknown token"
            raise StarletteHTTPException(401, what, headers={"WWW-Authenticate": "Bearer"})
        _audit(request).actor = principal.name
        if principal.scope < needed:
            raise StarletteHTTPException(
                403,
                f"token {principal.name!r} has scope {principal.scope.label}; "
                f"this needs {needed.label}",
            )
        return principal

    return check


Reader = Annotated[Principal, Depends(require(TokenScope.READ))]
Operator = Annotated[Principal, Depends(require(TokenScope.OPERATE))]


# -- errors ----------------------------------------------------------------------------


async def _override_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OverrideError)
    return JSONResponse({"detail": exc.reason}, status_code=exc.status)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(loc=".".join(str(p) for p in e.get("loc", ())), msg=str(e.get("msg", "invalid")))
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e.loc}: {e.msg}" for e in errors[:5]) or "invalid request"
    # A ttl over the maximum is the one refusal an operator can fix in the config:
    # say the maximum and its key instead of the validator's words.
    for e in exc.errors():
        if e.get("loc", ())[-1:] == ("ttl_s",) and e.get("type") == "less_than_equal":
            summary = ttl_too_long(float(e["input"]), _services(request).manager.max_ttl_s)
            break
    body = ErrorBody(detail=summary, errors=errors)
    return JSONResponse(body.model_dump(), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        {"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


_HANDLERS: tuple[tuple[type[Exception], Callable[[Request, Exception], Awaitable[Any]]], ...] = (
    (OverrideError, _override_error),
    (RequestValidationError, _invalid),
    (StarletteHTTPException, _http_error),
)


# -- reads -----------------------------------------------------------------------------

reads = APIRouter(tags=["read"])


@reads.get("/v1/status", response_model=StatusView, responses=_ERRORS)
async def status(_: Reader, s: Svc) -> StatusView:
    """Site power, cap, effective cap and what sets it, the mining/AI split."""
    return _status(s)


@reads.get("/v1/devices", response_model=list[DeviceView], responses=_ERRORS)
async def devices(_: Reader, s: Svc) -> list[DeviceView]:
    """Every device as the agent sees it now."""
    pinned = {o.device_id: o.id for o in s.manager.active() if o.device_id is not None}
    fleet = s.agent.fleet
    return [
        _device(d, pinned.get(d.device_id), fleet.get_link(d.device_id))
        for d in s.agent.snapshot().devices
    ]


@reads.get(
    "/v1/plan",
    response_model=PlanView,
    responses={**_ERRORS, 404: {"model": ErrorBody, "description": "no tick yet"}},
)
async def plan(_: Reader, s: Svc) -> PlanView:
    """The last tick's plan with every setpoint's reason, what was sent and held back."""
    return _plan(s)


@reads.get("/v1/overrides", response_model=list[OverrideView], responses=_ERRORS)
async def overrides(
    _: Reader,
    s: Svc,
    state: Annotated[Literal["active", "all"], Query()] = "active",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[OverrideView]:
    """Active overrides (oldest first), or with state=all the newest of every state."""
    now = s.wall_clock()
    active = state == "active"
    found = s.manager.active()[:limit] if active else s.store.recent_overrides(limit)
    return [OverrideView.of(o, now) for o in found]


@reads.get("/v1/overrides/{override_id}", response_model=OverrideView, responses=_NOT_FOUND)
async def get_override(
    _: Reader, s: Svc, override_id: Annotated[str, Path(min_length=1, max_length=64)]
) -> OverrideView:
    """One override, any state."""
    ov = s.manager.get(override_id)
    if ov is None:
        raise OverrideError(404, f"no override {override_id!r}")
    return OverrideView.of(ov, s.wall_clock())


@reads.get("/v1/audit", response_model=list[AuditView], responses=_ERRORS)
async def audit(
    _: Reader,
    s: Svc,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> list[AuditView]:
    """The newest audit records, newest first; page back with before=SEQ."""
    return [AuditView.of(r) for r in s.store.audit(limit, before)]


# -- writes ----------------------------------------------------------------------------


def writes(max_ttl_s: float) -> APIRouter:
    """The override writes; a request's ``ttl_s`` is bounded by ``max_ttl_s`` (s)."""
    router = APIRouter(tags=["write"])
    override_request = request_models(max_ttl_s)

    @router.post(
        "/v1/overrides",
        response_model=OverrideView,
        status_code=201,
        responses={**_WRITE_ERRORS, 200: {"model": OverrideView, "description": "a replay"}},
    )
    async def create_override(
        request: Request,
        principal: Operator,
        s: Svc,
        body: Annotated[override_request, Body()],  # type: ignore[valid-type]
    ) -> JSONResponse:
        """Create an override (operate; replacing other caps takes admin); 200 on a replay."""
        ctx = _audit(request)
        ov, created = s.manager.create(
            body,
            actor=principal.name,
            client=_client(request),
            admin=principal.scope >= TokenScope.ADMIN,
        )
        ctx.override_id = ov.id
        ctx.result = (
            f"accepted: {ov.id} {ov.describe()}"
            if created
            else f"replay of {ov.id} (idempotency key {ov.idempotency_key})"
        )
        view = OverrideView.of(ov, s.wall_clock())
        return JSONResponse(view.model_dump(), status_code=201 if created else 200)

    router.add_api_route(
        "/v1/overrides/{override_id}",
        cancel_override,
        methods=["DELETE"],
        response_model=OverrideView,
        responses=_WRITE_ERRORS,
    )
    router.add_api_route(
        "/v1/overrides/resume",
        resume,
        methods=["POST"],
        response_model=list[OverrideView],
        responses=_WRITE_ERRORS,
    )
    return router


async def cancel_override(
    request: Request,
    principal: Operator,
    s: Svc,
    override_id: Annotated[str, Path(min_length=1, max_length=64)],
    reason: Annotated[str, Query(min_length=1, max_length=500)],
) -> OverrideView:
    """Cancel an active override; another actor's cap takes admin to lift."""
    ctx = _audit(request)
    ctx.override_id = override_id
    ov = s.manager.cancel(
        override_id,
        actor=principal.name,
        admin=principal.scope >= TokenScope.ADMIN,
        reason=reason,
    )
    ctx.result = f"cancelled: {ov.id} {ov.describe()} ({reason})"
    return OverrideView.of(ov, s.wall_clock())


async def resume(
    request: Request, principal: Operator, s: Svc, body: Annotated[EndRequest, Body()]
) -> list[OverrideView]:
    """End every mode override (monitor-only, mining-off, ai-min): normal operation."""
    ended = s.manager.resume(actor=principal.name, reason=body.reason)
    ended_ids = ", ".join(o.id for o in ended) or "nothing"
    _audit(request).result = f"resumed: ended {ended_ids} ({body.reason})"
    now = s.wall_clock()
    return [OverrideView.of(o, now) for o in ended]


def create_app(services: Services, *, max_body_bytes: int = 16_384) -> ASGIApp:
    """The API as an ASGI app, wrapped in the body limit and the audit trail."""
    app = FastAPI(
        title="siteagent",
        version=API_VERSION,
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.services = services
    app.include_router(reads)
    app.include_router(writes(services.manager.max_ttl_s))
    # Imported here: the event routes use this module's dependencies (tokens, audit).
    from siteagent.agent.api.event_routes import router as event_router

    app.include_router(event_router)
    for exc, handler in _HANDLERS:
        app.add_exception_handler(exc, handler)
    return GuardMiddleware(
        app, store=services.store, max_body_bytes=max_body_bytes, wall_clock=services.wall_clock
    )


def _measured_w(d: DeviceStatus) -> float:
    return 0.0 if d.reading is None or d.reading.power_w is None else d.reading.power_w


def _status(s: Services) -> StatusView:
    agent = s.agent
    snap, limits = agent.snapshot(), agent.limits()
    by_kind = {k: 0.0 for k in DeviceKind}
    by_state: dict[str, int] = {}
    for d in snap.devices:
        by_kind[d.kind] += _measured_w(d)
        by_state[d.state.value] = by_state.get(d.state.value, 0) + 1
    source_ov = s.manager.get(limits.cap_source) if limits.cap_source.startswith("ovr-") else None
    active = s.manager.active()
    modes = sorted({o.mode for o in active if o.kind == "mode" and o.mode in MODES})
    record = agent.last_tick
    configured = {d.id: d.limit_w for d in agent.config.domains}
    tree = DomainTree(limits)
    names, code = domain_codes([d.domain for d in snap.devices])
    measured = domain_loads_w(tree, names, code, [_measured_w(d) for d in snap.devices])
    worst = domain_loads_w(tree, names, code, [d.budget_w for d in snap.devices])
    now = s.wall_clock()
    return StatusView(
        site=agent.config.site.name,
        time_unix_s=now,
        site_power_w=(snap.meter_power_w or snap.measured_w + limits.overhead_w),
        worst_case_w=snap.budget_w + limits.overhead_w,
        site_cap_w=limits.site_cap_w,
        effective_cap_w=limits.effective_cap_w,
        safety_margin_w=agent.config.site.safety_margin_w,
        cap_source=limits.cap_source,
        cap_source_override=None if source_ov is None else OverrideView.of(source_ov, now),
        mining_w=by_kind[DeviceKind.MINER],
        ai_w=by_kind[DeviceKind.GPU],
        aux_w=by_kind[DeviceKind.AUX] + limits.overhead_w,
        devices=len(snap.devices),
        devices_by_state=by_state,
        modes=modes,
        pins=len(limits.pins),
        plan_mode=None if record is None else record.plan.mode,
        plan_reason=None if record is None else record.plan.reason,
        last_tick_age_s=None if record is None else max(0.0, agent.clock() - record.time_s),
        active_overrides=len(active),
        domains=[
            DomainView(
                domain_id=d.domain_id,
                parent=d.parent,
                limit_w=d.limit_w,
                configured_limit_w=configured.get(d.domain_id, d.limit_w),
                worst_case_w=worst.get(d.domain_id, 0.0),
                measured_w=measured.get(d.domain_id, 0.0),
            )
            for d in limits.domains
        ],
        alarms=[
            AlarmView(name=a.name, reason=a.reason, since_unix_s=a.since_unix_s)
            for a in agent.alarms.active()
        ],
        meters=[
            MeterStatusView(
                meter_id=m.meter_id,
                domain=m.domain,
                state=m.state.value,
                reason=m.reason,
                metered_w=m.power_w,
                estimated_w=m.estimated_w,
                unexplained_w=m.unexplained_w,
                planned_unexplained_w=m.planned_unexplained_w,
                frequency_hz=m.frequency_hz,
                age_s=m.age_s,
            )
            for m in agent.meters.views(agent.clock())
        ],
        frequency_response=None
        if agent.frequency is None
        else FrequencyResponseView(
            armed_w=agent.frequency.armed.power_w,
            armed_devices=len(agent.frequency.armed.changes),
            triggered=agent.frequency.triggered,
            triggers=agent.frequency.triggers,
        ),
    )


def _device(d: DeviceStatus, override: str | None, t: DeviceLink | None) -> DeviceView:
    r = d.reading
    ident = None if t is None or t.driver is None else t.driver.identity
    return DeviceView(
        device_id=d.device_id,
        kind=d.kind.value,
        domain=d.domain,
        state=d.state.value,
        power_w=None if r is None else r.power_w,
        budget_w=d.budget_w,
        expected_w=d.expected_w,
        nameplate_power_w=d.nameplate_power_w,
        power_target_w=d.power_target_w,
        awake=d.awake,
        controllable=d.controllable,
        hashrate_ths=None if r is None else r.hashrate_ths,
        temperature_c=None if r is None else r.temperature_c,
        reading_age_s=d.reading_age_s,
        last_error=d.last_error,
        override=override,
        address=None if t is None else t.address,
        make=None if ident is None else ident.make,
        model=None if ident is None else ident.model,
        firmware=None if ident is None else ident.firmware,
        nameplate_hashrate_ths=d.nameplate_hashrate_ths,
    )


def _plan(s: Services) -> PlanView:
    record = s.agent.last_tick
    if record is None:
        raise OverrideError(404, "no control tick has run yet")
    p = record.plan
    return PlanView(
        tick_age_s=max(0.0, s.agent.clock() - record.time_s),
        mode=p.mode,
        reason=p.reason,
        effective_cap_w=p.effective_cap_w,
        cap_source=record.limits.cap_source,
        planned_w=p.planned_w,
        plan_duration_s=record.plan_duration_s,
        setpoints=[
            SetpointView(
                device_id=sp.device_id,
                awake=sp.awake,
                power_target_w=sp.power_target_w,
                planned_w=sp.planned_w,
                reason=sp.reason,
            )
            for sp in p.setpoints
        ],
        sent=list(record.applied),
        failed=list(record.failed),
        deferred=[
            DeferredView(device_id=c.device_id, kind=c.kind, reason=why)
            for c, why in record.ordered.deferred
        ],
    )


# -- serving -------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the agent owns SIGTERM and shuts the API down."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiStartError(Exception):
    """The API could not start (address in use, TLS files unreadable, ...)."""


class ApiServer:
    """A running API: the uvicorn server over an override runtime (closed with it if its own)."""

    def __init__(
        self,
        services: Services,
        server: _Server,
        serving: asyncio.Task[None],
        port: int,
        scheme: str,
        *,
        owns_runtime: bool = False,
    ) -> None:
        self.services = services
        self.server = server
        self.serving = serving
        self.port = port
        self.scheme = scheme
        self.owns_runtime = owns_runtime

    @property
    def manager(self) -> OverrideManager:
        """The override manager behind the API."""
        return self.services.manager

    async def close(self) -> None:
        """Stop taking requests, let those in flight finish; close the runtime if it is its own."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.serving, timeout=5.0)
        except (TimeoutError, Exception):
            self.serving.cancel()
        if self.owns_runtime:
            await self.services.runtime.close()


def _check_tls_files(cfg: Config) -> None:
    """ApiStartError naming the key and the path of a TLS file that cannot be read."""
    api = cfg.api
    for key, path in (
        ("api.tls_cert", api.tls_cert),
        ("api.tls_key", api.tls_key),
        ("api.tls_client_ca", api.tls_client_ca),
    ):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ApiStartError(f"{key}: {path}: {e.strerror or e}") from e


def plain_http_warning(host: str, port: int, *, tls: bool) -> str | None:
    """The start-up warning for an API that takes tokens in the clear off this machine."""
    if tls or _is_loopback(host):
        return None
    return (
        f"override API on plain HTTP at {host}:{port}: bearer tokens cross the network in "
        "the clear; set api.tls_cert and api.tls_key, or bind api.host to 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (0.0.0.0 and :: are not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve anywhere


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise ApiStartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.setblocking(False)
    return sock


def make_services(
    agent: Agent,
    cfg: Config,
    *,
    runtime: OverrideRuntime | None = None,
    wall_clock: Callable[[], float] = time.time,
    auth_clock: Callable[[], float] = time.monotonic,
    tokens: TokenStore | None = None,
) -> Services:
    """The handlers' services over ``runtime`` (of ``agent``), loading the tokens.

    Without a runtime, one is opened on ``cfg`` (restoring the stored overrides into
    ``agent``) and not started: its owner expires overrides and closes it.
    """
    if runtime is None:
        runtime = OverrideRuntime.open(agent, cfg, wall_clock=wall_clock)
    elif runtime.agent is not agent:
        raise ValueError("the override runtime steers another agent than the API's")
    if tokens is None:
        token_file = tokens_path(cfg.api, cfg.state.dir)
        tokens = TokenStore(token_file)
        if not tokens.entries():
            log.warning(
                "no API tokens in %s: every request will be refused; create one with "
                "`siteagent token create NAME --scope operate`",
                token_file,
            )
    limiter = FailureLimiter(cfg.api.auth_failures_per_minute, clock=auth_clock)
    return Services(runtime=runtime, tokens=tokens, limiter=limiter)


async def serve_api(
    agent: Agent,
    cfg: Config,
    *,
    runtime: OverrideRuntime | None = None,
    wall_clock: Callable[[], float] = time.time,
    auth_clock: Callable[[], float] = time.monotonic,
) -> ApiServer:
    """Serve the API on ``[api]`` host:port over ``runtime``.

    Without a runtime (tests, benches), the server opens and starts its own, which
    restores the stored overrides, and closes it when it closes.
    """
    _check_tls_files(cfg)
    own = runtime is None
    services = make_services(
        agent, cfg, runtime=runtime, wall_clock=wall_clock, auth_clock=auth_clock
    )
    if own:
        services.runtime.start()
    try:
        return await _serve(services, cfg.api, owns_runtime=own)
    except BaseException:
        if own:
            await services.runtime.close()
        raise


async def _serve(services: Services, api: ApiConfig, *, owns_runtime: bool) -> ApiServer:
    app = create_app(services, max_body_bytes=api.max_body_bytes)
    sock = _bind(api.host, api.port)
    tls = ssl_options(api)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=3,
        **tls,
    )
    try:
        # Load here (TLS files, the app) so a bad file is an error now, not in a task.
        config.load()
    except Exception as e:
        sock.close()
        raise ApiStartError(f"API did not start: {e}") from e
    server = _Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            sock.close()
            err = serving.exception()
            raise ApiStartError(f"API did not start: {err!r}") from err
        await asyncio.sleep(0.01)
    port = sock.getsockname()[1]
    scheme = "https" if tls else "http"
    log.info("override API on %s://%s:%d", scheme, api.host, port)
    warning = plain_http_warning(api.host, port, tls=bool(tls))
    if warning is not None:
        log.warning("%s", warning)
    return ApiServer(services, server, serving, port, scheme, owns_runtime=owns_runtime)
