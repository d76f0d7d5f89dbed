"""Reload on SIGHUP (`systemctl reload`): re-read the config, apply it only if valid.

The file is read and validated by the loader a start uses; a config that fails
(or that a running agent cannot take: a domain dropped while devices sit in it)
is refused whole, each problem on its own log line, the alarm
``config-reload-failed`` raised, and the config in force stays. A valid one is
put in force between ticks (``Agent.reconfigure``); what it changes that only a
restart can apply is named, one line per key. Every reload, applied or refused,
is one log line and one audit record (actor ``reload``), and systemd hears
RELOADING=1 before and READY=1 after (Type=notify units).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from siteagent.agent.api.overrides import AuditRecord
from siteagent.agent.api.store import Store
from siteagent.agent.config import Config, ConfigError, ConfigProblem, load_config
from siteagent.agent.control.alarms import CONFIG_RELOAD_FAILED
from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.loop import Agent
from siteagent.agent.control.reload import (
    ReloadPlan,
    config_summary,
    plan_reload,
    reload_problems,
    tracked_addresses,
)
from siteagent.agent.ops.sdnotify import Notifier

log = logging.getLogger("siteagent.reload")

RELOAD_ACTOR = "reload"
# The audit status of a reload: 200 applied, 422 refused (the file's content is unusable).
APPLIED_STATUS, REFUSED_STATUS = 200, 422


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The last reload: whether it was applied, when (Unix s), and what it said."""

    ok: bool
    time_unix_s: float
    line: str


class Reloader:
    """Re-reads ``config_path`` into a running ``agent`` when asked (SIGHUP)."""

    def __init__(
        self,
        config_path: str | Path,
        agent: Agent,
        *,
        store: Store | None = None,
        notifier: Notifier | None = None,
        status: Callable[[], str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config_path = str(config_path)
        self.agent = agent
        self.store = store
        self.notifier = notifier
        self.status = status
        self.wall_clock = wall_clock
        self.last: ReloadResult | None = None
        self._again = False
        self._running: asyncio.Task[None] | None = None

    def request(self) -> None:
        """Reload soon (a signal handler's call); asked during a reload, once more after it."""
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.get_running_loop().create_task(self._reloads())

    async def _reloads(self) -> None:
        again = True
        while again:
            self._again = False
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed while reading or applying the config")
            again = self._again

    async def reload(self) -> ReloadResult:
        """Read, validate and (if valid) apply the config file; the result is also ``last``."""
        started = time.perf_counter()
        self._notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return await self._reload(started)
        except Exception as e:
            # Not a problem of the file (those are refused above): say so, and raise it.
            self.agent.alarms.raise_alarm(CONFIG_RELOAD_FAILED, f"reload failed: {e!r}")
            self.agent.last_reload = (False, self.wall_clock())
            raise
        finally:
            # Always: systemd holds the unit in "reloading" until it hears READY=1.
            status = self.status() if self.status is not None else "reload done"
            self._notify("READY=1", f"STATUS={status}")

    async def _reload(self, started: float) -> ReloadResult:
        agent = self.agent
        try:
            # Off the event loop: validating and comparing thousands of listed miners.
            new, plan = await asyncio.to_thread(
                _read_and_plan,
                self.config_path,
                agent.config,
                agent.domains_in_use(),
                tracked_addresses(agent.fleet.links()),
            )
            added = _links(new, plan)
            tighter = await agent.reconfigure(new, added)
        except ConfigError as e:
            return self._refused(e.problems, started)
        for line in plan.restart_only:
            log.warning("%s", line)
        took_ms = (time.perf_counter() - started) * 1000
        if plan.empty:
            line = f"{self.config_path} applied; nothing changed ({took_ms:.0f} ms)"
        else:
            cap = agent.limits().effective_cap_w
            line = (
                f"{self.config_path} applied: {config_summary(plan)}; "
                f"{len(plan.restart_only)} change(s) wait for a restart; effective cap "
                f"{cap:.0f} W{' (lowered: ticking now)' if tighter else ''} ({took_ms:.0f} ms)"
            )
        log.info("%s", line)
        agent.alarms.clear(CONFIG_RELOAD_FAILED)
        return self._done(True, line, plan)

    def _refused(self, problems: list[ConfigProblem], started: float) -> ReloadResult:
        for p in problems:
            log.error("%s", p)
        took_ms = (time.perf_counter() - started) * 1000
        line = (
            f"{self.config_path} refused, {len(problems)} problem(s) "
            f"(first: {problems[0]}); the config in force stays ({took_ms:.0f} ms)"
        )
        log.error("%s", line)
        self.agent.alarms.raise_alarm(
            CONFIG_RELOAD_FAILED,
            f"{self.config_path}: {len(problems)} problem(s), first: {problems[0]}",
        )
        return self._done(False, line, None)

    def _done(self, ok: bool, line: str, plan: ReloadPlan | None) -> ReloadResult:
        now = self.wall_clock()
        result = ReloadResult(ok, now, line)
        self.last = result
        self.agent.last_reload = (ok, now)
        if self.store is not None:
            self.store.append_audit(
                AuditRecord(
                    time_unix_s=now,
                    actor=RELOAD_ACTOR,
                    client="SIGHUP",
                    action="reload applied" if ok else "reload refused",
                    request=self.config_path,
                    status=APPLIED_STATUS if ok else REFUSED_STATUS,
                    result=result.line
                    + ("" if plan is None else "".join(f"; {n}" for n in plan.restart_only)),
                )
            )
        return result

    def _notify(self, *fields: str) -> None:
        if self.notifier is not None:
            self.notifier.notify(*fields)


class ReloadSignal:
    """SIGHUP's handler: a reload once the agent runs; asked during startup, done after it."""

    def __init__(self) -> None:
        self._reloader: Reloader | None = None
        self._running = False
        self._pending = False
        self._stopped = False

    def __call__(self) -> None:
        if self._stopped:
            log.info("not done: the agent is stopping")
        elif self._running and self._reloader is not None:
            self._reloader.request()
        elif not self._pending:
            self._pending = True
            log.info("asked during startup; done once startup ends")

    def prepare(self, reloader: Reloader) -> None:
        """The reloader to use once ``start`` is called."""
        self._reloader = reloader

    def start(self) -> None:
        """The agent runs (READY sent): reload now if asked during startup, and on each signal."""
        self._running = True
        if self._pending and self._reloader is not None:
            self._reloader.request()

    def stop(self) -> None:
        """The agent is stopping: signals from now on reload nothing."""
        self._stopped = True


def _read_and_plan(
    path: str, old: Config, in_use: Mapping[str, Iterable[str]], tracked: Mapping[str, str]
) -> tuple[Config, ReloadPlan]:
    """The new config and what it changes; ConfigError listing every problem (a worker
    thread's work: it reads only frozen configs and the copies it is handed)."""
    new = load_config(path)
    problems = reload_problems(new, in_use)
    if problems:
        raise ConfigError(path, problems)
    return new, plan_reload(old, new, tracked)


def _links(new: Config, plan: ReloadPlan) -> list[DeviceLink]:
    """Links to the devices a reload adds, made as a start makes them; each connects (and
    a miner is identified) on its first read. CredentialsError if the miners' is unusable."""
    # Imported here: agent.control.inventory brings pyasic.
    from siteagent.agent.control.inventory import credentials, gpu_links, miner_link, node_driver

    links: list[DeviceLink] = []
    if plan.added_miners:
        creds = credentials(new)
        links += [miner_link(new, m, creds) for m in plan.added_miners]
    for n in plan.added_gpu_nodes:
        links += gpu_links(new, n, node_driver(new, n))
    return links
