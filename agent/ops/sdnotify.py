"""The systemd notification protocol (sd_notify(3)), without libsystemd.

A notification is one datagram of newline-separated ``KEY=value`` fields sent
to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a name starting with ``@``
is in the abstract namespace. Outside systemd the variable is unset and every
call is a no-op. The watchdog wants ``WATCHDOG=1`` within ``$WATCHDOG_USEC``;
we ping at half that, and only while the caller says the loop is healthy, so a
stalled loop is restarted by systemd rather than kept alive by a timer.

The send never blocks: the daemon's event loop sends these, and a notify
socket that systemd does not drain (its queue full) blocked a plain ``sendto``
and froze the loop (no sweeps, no ticks, no API). A message that finds the
socket full, or no socket, is dropped; the newest value of each of its fields
is kept and goes out with the next message (coalesced), so READY, STOPPING,
the latest STATUS and the latest extension still arrive once the socket drains.
``WATCHDOG=1`` is not carried: it vouches for the loop at the moment it is
sent, and the next period's ping (sent only while healthy) replaces it.

Startup is held to the same rule: ``StartupProgress`` asks for more time
(``EXTEND_TIMEOUT_USEC``) only when a step of startup has finished since it
last asked, so ``TimeoutStartSec`` bounds a stall, not a large site's startup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("siteagent.sdnotify")


# Not carried over to the next message when dropped: see the module's docstring.
_NOT_CARRIED = frozenset({"WATCHDOG"})


class Notifier:
    """Sends notifications to systemd; does nothing when not started by it."""

    def __init__(self, socket_path: str | None) -> None:
        self.socket_path = socket_path or None
        self._failing = False
        # Fields of dropped messages, newest value per key, in first-dropped order.
        self._pending: dict[str, str] = {}
        self.dropped = 0  # messages dropped since start

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` (none set: a no-op notifier)."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self.socket_path is not None

    @property
    def pending(self) -> tuple[str, ...]:
        """``KEY=value`` fields of dropped messages that the next message will carry."""
        return tuple(f"{k}={v}" for k, v in self._pending.items())

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram, never blocking; True if it was sent.

        A message that cannot be sent now (socket full or missing) is dropped; its
        fields but ``WATCHDOG`` ride along with the next message, newest value per key.
        """
        if self.socket_path is None:
            return False
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]
        message = dict(self._pending)
        for f in fields:
            # A newline would split the field into a second, bogus assignment.
            key, _, value = f.replace("\n", " ").partition("=")
            message[key] = value
        payload = "\n".join(f"{k}={v}" for k, v in message.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(payload, address)
        except BlockingIOError:
            self._dropped(message, "its queue is full (systemd is not reading it)")
            return False
        except OSError as e:
            self._dropped(message, str(e))
            return False
        self._pending.clear()
        if self._failing:
            log.info("notifying systemd at %s again", self.socket_path)
            self._failing = False
        return True

    def _dropped(self, message: dict[str, str], why: str) -> None:
        self.dropped += 1
        self._pending = {k: v for k, v in message.items() if k not in _NOT_CARRIED}
        # Log the first failure and the recovery only: a watchdog ping fails every period.
        if not self._failing:
            log.warning(
                "cannot notify systemd at %s: %s; dropping notifications until it can be "
                "sent, then sending the newest of each",
                self.socket_path,
                why,
            )
            self._failing = True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (READY=1), with an optional status line."""
        return self.notify("READY=1", *([] if status is None else [f"STATUS={status}"]))

    def status(self, text: str) -> bool:
        """A free-form status line for ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Keep-alive ping (WATCHDOG=1)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (STOPPING=1)."""
        return self.notify("STOPPING=1", *([] if status is None else [f"STATUS={status}"]))

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask for ``seconds`` more before the current timeout (EXTEND_TIMEOUT_USEC, systemd
        244+; older ones ignore it); the next such message must come within them."""
        usec = f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}"
        return self.notify(usec, *([] if status is None else [f"STATUS={status}"]))


class StartupProgress:
    """Startup's progress for systemd: STATUS lines, and more time only while it moves.

    Startup runs in phases ("identifying miners", "first sweep"), each with a
    count of finished steps (``step()``, or a ``count`` callable). A new phase,
    and each ``check()`` that finds the count grown since the last extension,
    send ``EXTEND_TIMEOUT_USEC`` for ``extend_s`` with a STATUS line ("first
    sweep: 7,500 of 10,000"). A ``check()`` that finds nothing finished sends
    no extension, only (every ``stall_note_s``) a STATUS saying so: a stalled
    startup is ended by systemd ``extend_s`` after its last step, or at
    ``TimeoutStartSec`` if that is later. ``check()`` is meant to run every
    second or so (``watch_startup``), which also bounds the message rate.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        extend_s: float,
        stall_note_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.extend_s = extend_s
        self.stall_note_s = stall_note_s
        self.clock = clock
        self.label = "starting"
        self.total = 0
        self.extensions = 0
        self._steps = 0
        self._count: Callable[[], int] | None = None
        self._extended_at = 0  # the count the last extension was sent for
        self._progress_s = self._noted_s = clock()

    def phase(self, label: str, total: int = 0, count: Callable[[], int] | None = None) -> None:
        """Begin a phase of ``total`` steps (counted by ``step()`` or by ``count``)."""
        self.label, self.total, self._count, self._steps = label, total, count, 0
        self._extend(self.done())

    def step(self) -> None:
        """One more step of the current phase has finished."""
        self._steps += 1

    def done(self) -> int:
        """Steps of the current phase finished so far."""
        return self._count() if self._count is not None else self._steps

    def line(self, done: int | None = None) -> str:
        """The STATUS line: "identifying miners: 4,000 of 10,000"."""
        if not self.total:
            return self.label
        return f"{self.label}: {self.done() if done is None else done:,} of {self.total:,}"

    def check(self) -> bool:
        """Extend the start timeout if a step finished since the last extension; True if so."""
        done = self.done()
        if done != self._extended_at:
            self._extend(done)
            return True
        now = self.clock()
        idle_s = now - self._progress_s
        if idle_s >= self.stall_note_s and now - self._noted_s >= self.stall_note_s:
            self._noted_s = now
            log.warning("startup: %s; nothing finished for %.0f s", self.line(done), idle_s)
            self.notifier.status(f"{self.line(done)}; nothing finished for {idle_s:.0f} s")
        return False

    def _extend(self, done: int) -> None:
        self._extended_at = done
        self._progress_s = self._noted_s = self.clock()
        self.extensions += 1
        self.notifier.extend_timeout(self.extend_s, self.line(done))


async def watch_startup(
    progress: StartupProgress,
    *,
    period_s: float = 1.0,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """``progress.check()`` every ``period_s`` (s), until cancelled."""
    while True:
        await sleep(period_s)
        progress.check()


def watchdog_period_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None if not asked for.

    ``$WATCHDOG_PID``, when set, must be our pid: the variables may have been
    inherited from a parent the watchdog is really meant for.
    """
    env = os.environ if env is None else env
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text and pid_text.strip() != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1e6 / 2


async def supervise(
    notifier: Notifier,
    *,
    healthy: Callable[[], bool],
    status: Callable[[], str],
    period_s: float,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    watchdog: bool = True,
) -> None:
    """Each period (s): a STATUS line, and WATCHDOG=1 only while ``healthy()``; until cancelled."""
    was_healthy = True
    while True:
        ok = healthy()
        if ok != was_healthy:
            if ok:
                log.info("control loop healthy again; watchdog pings resume")
            else:
                log.error("control loop stalled; withholding watchdog pings")
            was_healthy = ok
        line = status() if ok else f"stalled: no successful control tick recently; {status()}"
        if ok and watchdog:
            notifier.notify("WATCHDOG=1", f"STATUS={line}")
        else:
            notifier.status(line)
        await sleep(period_s)
