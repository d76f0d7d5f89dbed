"""The override runtime: the store, the overrides in force, and the work that keeps them.

It restores the stored overrides into the Agent when it opens (before the first
tick), ends each override at its expiry time, backs the store up, and audits
alarms. It runs with or without the HTTP API: the API is handed a runtime and
only translates requests into calls on it, so overrides expire and restore
whether or not anything listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from siteagent.agent.api.events import EventBook, configured_limits_w
from siteagent.agent.api.overrides import AuditRecord, OverrideManager
from siteagent.agent.api.store import Store, keep_backups
from siteagent.agent.config import Config
from siteagent.agent.control.alarms import AlarmEvent
from siteagent.agent.control.loop import Agent

log = logging.getLogger("siteagent.overrides")

# The status of an audit record the agent wrote itself, not an HTTP request's.
AGENT_AUDIT_STATUS = 0
# Expiry runs on the wall clock, the timer on the loop's monotonic one: a step of the
# wall clock (NTP at boot, a suspended host) is noticed within this long (s).
RECHECK_S = 10.0
# After a failed expiry (the store refused the write), try again this soon (s).
RETRY_S = 1.0


class Timer(Protocol):
    """A pending call that can be cancelled (``asyncio.TimerHandle``)."""

    def cancel(self) -> None:
        """Do not make the call."""


# Call a function after a delay (s): ``loop.call_later`` in production.
CallLater = Callable[[float, Callable[[], None]], Timer]


def alarm_auditor(store: Store) -> Callable[[AlarmEvent], None]:
    """A listener that appends an audit record for each alarm raised or cleared."""

    def audit(event: AlarmEvent) -> None:
        a = event.alarm
        if event.raised:
            action, result = f"alarm raised: {a.name}", a.reason
        else:
            action = f"alarm cleared: {a.name}"
            result = f"cleared after {event.duration_s:.0f} s; was: {a.reason}"
        store.append_audit(
            AuditRecord(
                time_unix_s=event.time_unix_s,
                actor="siteagent",
                client="local",
                action=action,
                request="",
                status=AGENT_AUDIT_STATUS,
                result=result,
            )
        )

    return audit


class OverrideRuntime:
    """Owns the store and the override manager; expires each override at its end time."""

    def __init__(
        self,
        manager: OverrideManager,
        *,
        call_later: CallLater | None = None,
        backup_interval_s: float | None = None,
        backups_kept: int = 1,
    ) -> None:
        self.manager = manager
        self.agent = manager.agent
        self.store = manager.store
        self.wall_clock = manager.wall_clock
        manager.on_change = self._rearm
        self._call_later = call_later
        self._backup_interval_s = backup_interval_s
        self._backups_kept = backups_kept
        self._timer: Timer | None = None
        self._backups: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._failing = False
        self._audit = alarm_auditor(manager.store)
        # Run-time grid events (API, OpenADR VEN), from the same store; the agent takes
        # their caps and ticks at their starts.
        self.events = EventBook(
            manager.store,
            limits_w=configured_limits_w(self.agent.config),
            wall_clock=manager.wall_clock,
        )
        self.events.attach(self.agent)

    @classmethod
    def open(
        cls,
        agent: Agent,
        cfg: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        call_later: CallLater | None = None,
    ) -> OverrideRuntime:
        """Open the store in ``[state] dir``, restore its overrides into ``agent``, audit alarms."""
        store = Store.in_dir(cfg.state.dir)
        try:
            manager = OverrideManager(
                agent, store, max_ttl_s=cfg.api.max_override_ttl_s, wall_clock=wall_clock
            )
            runtime = cls(
                manager,
                call_later=call_later,
                backup_interval_s=cfg.state.backup_interval_s,
                backups_kept=cfg.state.backups_kept,
            )
            runtime.manager.restore()
        except BaseException:
            store.close()
            raise
        agent.alarms.subscribe(runtime.audit_alarm)
        return runtime

    def audit_alarm(self, event: AlarmEvent) -> None:
        """Append the audit record of an alarm raised or cleared (while the store is open)."""
        # The Agent may outlive a closed runtime (a second API in a test, a stop in progress).
        if not self._closed:
            self._audit(event)

    def start(self) -> None:
        """Arm expiry and start the backups, on the running event loop."""
        loop = asyncio.get_running_loop()
        if self._call_later is None:
            self._call_later = loop.call_later
        self._started = True
        self._rearm()
        if self._backup_interval_s is not None and self._backups is None:
            # The store lives in the state directory, where its backups go (``Store.in_dir``).
            self._backups = loop.create_task(
                keep_backups(self.store.path.parent, self._backup_interval_s, self._backups_kept)
            )

    async def close(self) -> None:
        """Stop expiry and backups, close the store; what is stored stays for the next start."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._backups is not None:
            self._backups.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backups
            self._backups = None
        self.store.close()

    def _rearm(self) -> None:
        """Set the one timer to the next expiry (or none when nothing is in force)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._started or self._closed or self._call_later is None:
            return
        due = self.manager.next_expiry_unix_s()
        if due is None:
            return
        delay_s = min(max(0.0, due - self.wall_clock()), RECHECK_S)
        self._timer = self._call_later(delay_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._closed or self._call_later is None:
            return
        try:
            self.manager.expire_due()
        except Exception:
            if not self._failing:
                log.exception("expiring overrides failed; retrying every %.0f s", RETRY_S)
            self._failing = True
            self._timer = self._call_later(RETRY_S, self._expire)
            return
        if self._failing:
            log.info("expiring overrides works again")
            self._failing = False
        self._rearm()
