"""Operator overrides: what an operator may ask, how it is checked, and how it reaches the loop.

An override is a cap (site or domain), a mode (monitor-only, mining-off,
ai-min) or a device pin / exclusion, always with an actor, a reason and an
expiry. Each one is applied to the Agent under its own id as the *source*,
so cancelling or expiring it drops exactly what it set (``Agent.clear_source``).

Caps only ever lower: the Agent takes the minimum of every cap source, and a
cap above the configured hard cap (or a domain's configured limit) is refused.
"Raising" a cap means lifting a lower override cap, which takes the admin
scope: an admin posts a cap override that ``replaces`` the lower ones (the
new cap is applied before the old ones are dropped, so the effective cap never
passes through a higher value), or cancels another actor's cap override.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from siteagent.agent.config import SITE_DOMAIN_ID
from siteagent.agent.control.loop import MODES, Agent, OverrideRefused

if TYPE_CHECKING:
    from siteagent.agent.api.store import Store

log = logging.getLogger("siteagent.overrides")

SYSTEM_ACTOR = "siteagent"
ACTIVE, EXPIRED, CANCELLED, REPLACED, NOT_RESTORED = (
    "active",
    "expired",
    "cancelled",
    "replaced",
    "not-restored",
)
# Cap, then modes, then pins: a pin restored after a restart is checked against the caps.
_RESTORE_ORDER = {"cap": 0, "mode": 1, "pin": 2, "exclude": 2}

Reason = Annotated[str, Field(min_length=1, max_length=500, description="why (free text)")]
TtlS = Annotated[float, Field(gt=0, description="how long the override lasts (s)")]
IdempotencyKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="a retried request with the same key (same token) is applied once",
    ),
]
DeviceId = Annotated[str, Field(min_length=1, max_length=256)]
OverrideId = Annotated[str, Field(min_length=1, max_length=64)]


class _Request(BaseModel):
    # Strict: "30000" or true is not a number (lax mode read true as a 1 W cap).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    reason: Reason
    ttl_s: TtlS
    idempotency_key: IdempotencyKey | None = None


class CapRequest(_Request):
    """Lower the site's (or a domain's) cap; with ``replaces`` (admin), lift lower override caps."""

    kind: Literal["cap"]
    cap_w: Annotated[float, Field(gt=0, le=1e12, description="cap (W)")]
    domain: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="a configured domain id; absent or 'site' for the site"
    )
    replaces: list[OverrideId] = Field(
        default=[], max_length=32, description="cap overrides this one ends (admin scope)"
    )


class ModeRequest(_Request):
    """Put the site in an operator mode."""

    kind: Literal["mode"]
    mode: Literal["monitor-only", "mining-off", "ai-min"]


class PinRequest(_Request):
    """Hold one device at a level: a miner's target (0 = asleep) or a GPU's power limit (W)."""

    kind: Literal["pin"]
    device_id: DeviceId
    power_w: Annotated[float, Field(ge=0, le=1e9, description="level (W); 0 sleeps a miner")]


class ExcludeRequest(_Request):
    """Leave one device alone (maintenance); it is counted at its worst case."""

    kind: Literal["exclude"]
    device_id: DeviceId


OverrideRequest = Annotated[
    CapRequest | ModeRequest | PinRequest | ExcludeRequest, Field(discriminator="kind")
]


def request_models(max_ttl_s: float) -> Any:
    """The override request union with ``ttl_s`` bounded by the configured maximum (s).

    The bound is then in the OpenAPI document too, so clients see the limit in force.
    """
    ttl: Any = (Annotated[float, Field(gt=0, le=max_ttl_s, description="how long (s)")], ...)
    models = [
        create_model(m.__name__, __base__=m, __doc__=m.__doc__, ttl_s=ttl)
        for m in (CapRequest, ModeRequest, PinRequest, ExcludeRequest)
    ]
    return Annotated[Union[tuple(models)], Field(discriminator="kind")]  # noqa: UP007


class EndRequest(BaseModel):
    """Why an operator ends overrides (cancel by id, or resume from every mode)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reason: Reason


@dataclass(frozen=True, slots=True)
class Override:
    """One accepted override, as stored; times are wall-clock (unix s) so they survive restarts."""

    id: str
    kind: str
    actor: str
    reason: str
    created_at_unix_s: float
    expires_at_unix_s: float
    client: str = ""
    cap_w: float | None = None
    domain: str | None = None
    mode: str | None = None
    device_id: str | None = None
    power_w: float | None = None
    replaces: tuple[str, ...] = ()
    idempotency_key: str | None = None
    fingerprint: str = ""
    ended_at_unix_s: float | None = None
    end_state: str | None = None
    ended_by: str | None = None
    end_reason: str | None = None

    def state(self, now_unix_s: float) -> str:
        """active, expired, cancelled, replaced or not-restored, at a wall-clock time."""
        if self.end_state is not None:
            return self.end_state
        return EXPIRED if now_unix_s >= self.expires_at_unix_s else ACTIVE

    def describe(self) -> str:
        """A short human description: 'cap site 800000 W', 'pin m1 2000 W'."""
        if self.kind == "cap":
            return f"cap {self.domain or SITE_DOMAIN_ID} {self.cap_w:.0f} W"
        if self.kind == "mode":
            return f"mode {self.mode}"
        if self.kind == "pin":
            return f"pin {self.device_id} {self.power_w:.0f} W"
        return f"exclude {self.device_id}"


@dataclass(frozen=True, slots=True)
class Ending:
    """An override ended by a write: cancelled, expired, replaced or not restored."""

    override_id: str
    end_state: str
    ended_by: str
    ended_at_unix_s: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One write to the agent, accepted or refused: who, from where, what, and what came of it."""

    time_unix_s: float
    actor: str
    client: str
    action: str
    request: str
    status: int
    result: str
    override_id: str | None = None
    seq: int | None = None


class OverrideError(Exception):
    """A request the manager refuses; ``status`` is the HTTP status that says so.

    422: the request itself is malformed; 409: well formed, but refused against the
    site as configured or as it is now (a cap above the hard cap, an unknown device or
    domain, a pin that would break a cap, a reused idempotency key); 403: scope; 404.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def duration_text(seconds: float) -> str:
    """Seconds as the CLI writes them: '3d', '24h', '90m', '45s', '1h30m'."""
    s = round(seconds)
    if s >= 2 * 86400 and s % 86400 == 0:
        return f"{s // 86400}d"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v]
    return "".join(parts) or "0s"


def ttl_too_long(ttl_s: float, max_ttl_s: float) -> str:
    """Why a ttl_s over the maximum is refused, and the key that raises the maximum."""
    return (
        f"ttl_s {ttl_s:g} ({duration_text(ttl_s)}) is longer than the maximum "
        f"{duration_text(max_ttl_s)} ({max_ttl_s:g} s; api.max_override_ttl_s: raise it "
        "in the config for longer overrides)"
    )


def fingerprint(req: CapRequest | ModeRequest | PinRequest | ExcludeRequest) -> str:
    """A digest of what a request asks (without its idempotency key), to spot a reused key."""
    body = req.model_dump(exclude={"idempotency_key"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def new_override_id() -> str:
    """A fresh, unguessable override id."""
    return "ovr-" + secrets.token_hex(6)


class OverrideManager:
    """The overrides in force: checks requests, applies them to the Agent, persists, expires."""

    def __init__(
        self,
        agent: Agent,
        store: Store,
        *,
        max_ttl_s: float,
        wall_clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_override_id,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.agent = agent
        self.store = store
        self.max_ttl_s = max_ttl_s
        self.wall_clock = wall_clock
        self.new_id = new_id
        # Told when the overrides in force change: whoever times expiry re-arms on it.
        self.on_change = on_change
        self._active: dict[str, Override] = {}

    # -- reading -----------------------------------------------------------------

    def active(self) -> list[Override]:
        """Overrides in force now, oldest first."""
        return sorted(self._active.values(), key=lambda o: (o.created_at_unix_s, o.id))

    def get(self, override_id: str) -> Override | None:
        """An active override from memory, or any override from the store."""
        return self._active.get(override_id) or self.store.get_override(override_id)

    # -- writing -----------------------------------------------------------------

    def create(
        self,
        req: CapRequest | ModeRequest | PinRequest | ExcludeRequest,
        *,
        actor: str,
        client: str,
        admin: bool,
    ) -> tuple[Override, bool]:
        """Check, apply and persist one override; (override, False) for an idempotent replay."""
        now = self.wall_clock()
        digest = fingerprint(req)
        if req.idempotency_key is not None:
            seen = self.store.by_idempotency_key(actor, req.idempotency_key)
            if seen is not None:
                if seen.fingerprint != digest:
                    raise OverrideError(
                        409,
                        f"idempotency key {req.idempotency_key!r} was used for a different "
                        f"request (override {seen.id}); use a new key",
                    )
                return seen, False
        if not math.isfinite(req.ttl_s) or req.ttl_s > self.max_ttl_s:
            raise OverrideError(422, ttl_too_long(req.ttl_s, self.max_ttl_s))
        ov = Override(
            id=self.new_id(),
            kind=req.kind,
            actor=actor,
            reason=req.reason,
            created_at_unix_s=now,
            expires_at_unix_s=now + req.ttl_s,
            client=client,
            idempotency_key=req.idempotency_key,
            fingerprint=digest,
        )
        replaced: list[Override] = []
        if isinstance(req, CapRequest):
            domain = None if req.domain in (None, SITE_DOMAIN_ID) else req.domain
            ov = replace(ov, cap_w=req.cap_w, domain=domain, replaces=tuple(req.replaces))
            replaced = self._check_cap(ov, admin)
        elif isinstance(req, ModeRequest):
            ov = replace(ov, mode=req.mode)
        else:
            power = req.power_w if isinstance(req, PinRequest) else None
            ov = replace(ov, device_id=req.device_id, power_w=power)
            self._check_pin_free(ov)
        self._apply(ov)
        endings = [Ending(r.id, REPLACED, actor, now, f"replaced by {ov.id}") for r in replaced]
        try:
            self.store.insert_override(ov, endings)
        except Exception:
            # Not recorded means not accepted: take it back out of the loop.
            self.agent.clear_source(ov.id)
            raise
        self._active[ov.id] = ov
        for r in replaced:
            self._drop(r.id)
        self._changed()
        log.info(
            "override %s by %s: %s for %.0f s (%s)",
            ov.id,
            actor,
            ov.describe(),
            req.ttl_s,
            ov.reason,
        )
        return ov, True

    def cancel(
        self, override_id: str, *, actor: str, admin: bool, reason: str | None = None
    ) -> Override:
        """End one active override now, saying why; lifting another's cap takes admin."""
        ov = self._active.get(override_id)
        if ov is None:
            known = self.store.get_override(override_id)
            if known is None:
                raise OverrideError(404, f"no override {override_id!r}")
            state = known.state(self.wall_clock())
            raise OverrideError(409, f"override {override_id} is already {state}")
        if ov.kind == "cap" and ov.actor != actor and not admin:
            raise OverrideError(
                403,
                f"override {ov.id} is a cap set by {ov.actor}; cancelling it raises the cap, "
                "which takes the admin scope",
            )
        now = self.wall_clock()
        self.store.end_overrides([Ending(ov.id, CANCELLED, actor, now, reason)])
        self._drop(ov.id)
        self._changed()
        log.info("override %s (%s) cancelled by %s", ov.id, ov.describe(), actor)
        return replace(
            ov, ended_at_unix_s=now, end_state=CANCELLED, ended_by=actor, end_reason=reason
        )

    def resume(self, *, actor: str, reason: str | None = None) -> list[Override]:
        """End every active mode override (monitor-only, mining-off, ai-min)."""
        now = self.wall_clock()
        modes = [o for o in self.active() if o.kind == "mode"]
        self.store.end_overrides([Ending(o.id, CANCELLED, actor, now, reason) for o in modes])
        for o in modes:
            self._drop(o.id)
        if modes:
            self._changed()
        return [
            replace(o, ended_at_unix_s=now, end_state=CANCELLED, ended_by=actor, end_reason=reason)
            for o in modes
        ]

    def expire_due(self) -> list[Override]:
        """End every override whose time is up; returns them."""
        now = self.wall_clock()
        due = [o for o in self.active() if o.expires_at_unix_s <= now]
        if not due:
            return []
        self.store.end_overrides(
            [Ending(o.id, EXPIRED, SYSTEM_ACTOR, now, "expired at its end time") for o in due]
        )
        for o in due:
            self._drop(o.id)
            log.info("override %s (%s) expired", o.id, o.describe())
            self._audit_system("expire", o, f"expired at its end time ({o.expires_at_unix_s:.0f})")
        self._changed()
        return due

    def next_expiry_unix_s(self) -> float | None:
        """When the next active override expires (unix s), or None."""
        return min((o.expires_at_unix_s for o in self._active.values()), default=None)

    def restore(self) -> tuple[list[Override], list[Override]]:
        """Re-apply the stored overrides after a start; (restored, ended) lists.

        One that expired while the agent was down is ended, never applied; one the
        agent now refuses (an unknown device, a cap it would break) is ended too.
        """
        now = self.wall_clock()
        restored: list[Override] = []
        ended: list[Override] = []
        stored = sorted(
            self.store.open_overrides(),
            key=lambda o: (_RESTORE_ORDER.get(o.kind, 3), o.created_at_unix_s, o.id),
        )
        for ov in stored:
            if ov.expires_at_unix_s <= now:
                self.store.end_overrides(
                    [Ending(ov.id, EXPIRED, SYSTEM_ACTOR, now, "expired while the agent was down")]
                )
                self._audit_system(
                    "expire", ov, "expired while the agent was down; not applied after restart"
                )
                ended.append(ov)
                continue
            try:
                self._apply(ov)
            except OverrideError as e:
                self.store.end_overrides(
                    [Ending(ov.id, NOT_RESTORED, SYSTEM_ACTOR, now, f"not restored: {e.reason}")]
                )
                self._audit_system("restore", ov, f"not restored: {e.reason}", status=409)
                log.warning("override %s (%s) not restored: %s", ov.id, ov.describe(), e.reason)
                ended.append(ov)
                continue
            self._active[ov.id] = ov
            restored.append(ov)
        if restored or ended:
            log.info("overrides: %d restored, %d ended while down", len(restored), len(ended))
        self._changed()
        return restored, ended

    def apply_in_force(self) -> list[Override]:
        """Apply the stored overrides in force now, writing nothing (``plan --dry-run``):
        one that expired or that the agent refuses is left out, not ended."""
        now = self.wall_clock()
        applied: list[Override] = []
        stored = sorted(
            self.store.open_overrides(),
            key=lambda o: (_RESTORE_ORDER.get(o.kind, 3), o.created_at_unix_s, o.id),
        )
        for ov in stored:
            if ov.expires_at_unix_s <= now:
                continue
            try:
                self._apply(ov)
            except OverrideError as e:
                log.warning("override %s (%s) left out: %s", ov.id, ov.describe(), e.reason)
                continue
            self._active[ov.id] = ov
            applied.append(ov)
        return applied

    # -- internals ---------------------------------------------------------------

    def _check_cap(self, ov: Override, admin: bool) -> list[Override]:
        cfg = self.agent.config
        if ov.domain is None:
            hard_w, what = cfg.site.cap_w, "the site's hard cap"
        else:
            limits = {d.id: d.limit_w for d in cfg.domains}
            if ov.domain not in limits:
                known = sorted(limits) or ["(none configured)"]
                raise OverrideError(
                    409, f"unknown domain {ov.domain!r}; expected 'site' or one of {known}"
                )
            hard_w, what = limits[ov.domain], f"domain {ov.domain}'s configured limit"
        assert ov.cap_w is not None
        if ov.cap_w > hard_w:
            raise OverrideError(
                409,
                f"cap_w {ov.cap_w:.0f} W is above {what} ({hard_w:.0f} W); an override can "
                "lower a cap, or with the admin scope lift lower override caps up to it",
            )
        if not ov.replaces:
            return []
        if not admin:
            raise OverrideError(
                403, "replacing other cap overrides (raising the cap) takes the admin scope"
            )
        out = []
        for rid in dict.fromkeys(ov.replaces):
            r = self._active.get(rid)
            if r is None:
                raise OverrideError(409, f"override {rid!r} is not active; nothing to replace")
            if r.kind != "cap" or r.domain != ov.domain:
                raise OverrideError(
                    409,
                    f"override {rid} is {r.describe()}; a cap on "
                    f"{ov.domain or SITE_DOMAIN_ID} can only replace caps on the same domain",
                )
            out.append(r)
        return out

    def _check_pin_free(self, ov: Override) -> None:
        for o in self._active.values():
            if o.device_id is not None and o.device_id == ov.device_id:
                raise OverrideError(
                    409,
                    f"device {ov.device_id} already has override {o.id} ({o.describe()}); "
                    "cancel it first",
                )

    def _apply(self, ov: Override) -> None:
        """Hand one override to the Agent under its id; OverrideError if the Agent refuses."""
        a = self.agent
        try:
            if ov.kind == "cap":
                if ov.domain is None:
                    a.set_cap(ov.id, ov.cap_w)
                else:
                    a.set_domain_cap(ov.domain, ov.id, ov.cap_w)
            elif ov.kind == "mode":
                if ov.mode not in MODES:
                    raise OverrideError(422, f"unknown mode {ov.mode!r}")
                a.set_mode(ov.id, ov.mode)
            elif ov.kind in ("pin", "exclude"):
                assert ov.device_id is not None
                if ov.kind == "pin":
                    a.set_pin(ov.id, ov.device_id, ov.power_w)
                else:
                    a.set_pin(ov.id, ov.device_id, None, exclude=True)
            else:
                raise OverrideError(422, f"unknown override kind {ov.kind!r}")
        except OverrideRefused as e:
            a.clear_source(ov.id)
            raise OverrideError(409, f"refused: {e}") from e
        except KeyError as e:
            a.clear_source(ov.id)
            raise OverrideError(409, f"unknown domain {e.args[0]!r}") from e

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _drop(self, override_id: str) -> None:
        self._active.pop(override_id, None)
        self.agent.clear_source(override_id)

    def _audit_system(self, action: str, ov: Override, result: str, status: int = 200) -> None:
        self.store.append_audit(
            AuditRecord(
                time_unix_s=self.wall_clock(),
                actor=SYSTEM_ACTOR,
                client="-",
                action=action,
                request=json.dumps({"override": ov.id, "what": ov.describe(), "by": ov.actor}),
                status=status,
                result=result,
                override_id=ov.id,
            )
        )
