"""Telemetry and actuation in worker processes (issue 20 item 1).

At 10,000 miners a sweep costs more CPU than one core has in a telemetry
interval, so the miners are sharded over N worker processes ('spawn' context).
Each worker runs its own event loop and owns its miners' drivers and
connections; the control loop keeps the fleet state, the plan and the safety
ordering. A miner is connected once: start-up's identification (listed miners
and scan ranges) runs in the workers, which keep what they find connected and
send back its identity once, for the fleet and the inventory (``launch``,
``identify``, ``adopt``); a miner the agent identified itself is handed over
with its identity, and its worker does not ask it again.

Transport: one multiprocessing pipe per worker. A sweep sends each worker the
positions (in its shard) of the miners due and not still being read; the
worker answers in parts, at least every ``PART_S``, each one batch of numpy
columns (readings) and one of failures, never an object per reading. A command
(power target, sleep, wake) goes to the owning worker as a tuple, and its
outcome (the target taken, or the error's class and text) comes back.

Safety across workers: a reading counts from when it was taken at the latest
(the worker's delay after the ask, added to when the agent asked: the pipe's
time makes it older, never fresher). A worker that dies, or says nothing for
``telemetry.stale_after_s``, leaves its miners unread, so the fleet's staleness
rule counts them at their worst case until it is back; a miner still being read
is not asked for again, so a slow worker's work does not pile up. A command to a
dead worker fails as unreachable (no outcome known: the loop counts both levels
until a reading says). A dead worker is restarted with back-off: one warning
when it goes, one line when it reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from siteagent.agent.control.devices import within
from siteagent.agent.control.identify import KnownFirmware
from siteagent.domain import (
    DeviceError,
    DeviceFaulted,
    DeviceIdentity,
    DeviceKind,
    DevicePermissionError,
    DeviceReading,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.table import STATE_CODE, STATES

if TYPE_CHECKING:
    from siteagent.agent.control.devices import DeviceDriver

log = logging.getLogger("siteagent.workers")

# Below this many devices one process reads them all within an interval: workers would
# cost a process start and a pipe hop for nothing. Above it, a sweep outgrows one core.
AUTO_MIN_DEVICES = 2_000
# The errors a worker names by class; any other is faulted, as the single process has it.
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e
    for e in (
        DeviceError,
        DeviceUnreachable,
        DeviceFaulted,
        DeviceRefused,
        DevicePermissionError,
        TimeoutError,
    )
}
_SETTLE_KINDS = ("wake", "sleep", "lower", "raise")
# A worker answers a sweep in parts, one at least this often (s): the agent takes
# readings as they come, as it does its own, and a start-up sees its progress.
PART_S = 1.0
# A position a worker no longer reads (its miner moved: ``Shard.let_go``).
GONE = -1


def worker_count(setting: int | Literal["auto"], n_devices: int, cpus: int | None) -> int:
    """How many worker processes to run: the setting, or for "auto" none below
    ``AUTO_MIN_DEVICES`` devices and one per core less one (at least one) above."""
    if setting != "auto":
        return setting
    if n_devices < AUTO_MIN_DEVICES:
        return 0
    return max(1, (cpus or 1) - 1)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is started with: its miners and how to reach them."""

    index: int
    # Per miner: (device id, address, what the inventory knows of it or None, the
    # identity the agent has of it or None). A miner with an identity is not asked
    # again (drivers/asic.py from_inventory); one without is identified here, as the
    # agent's start-up would (its known firmware first, then pyasic's probes).
    miners: tuple[tuple[str, str, KnownFirmware | None, DeviceIdentity | None], ...]
    timeout_s: float
    concurrency: int
    credentials_file: str | None
    log_level: int


def _error_of(kind: str, text: str) -> Exception:
    cls = _ERRORS.get(kind)
    return RuntimeError(f"{kind}: {text}") if cls is None else cls(text)


def _named(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, str(e)


# -- the worker process ---------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """A worker process's entry point: serve reads and commands until told to stop."""
    # As the agent's own: asyncssh's import names DSA, which cryptography deprecates.
    from cryptography.utils import CryptographyDeprecationWarning

    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh\.")
    logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("siteagent").setLevel(spec.log_level)
    # The agent's own SIGINT reaches its workers too; the agent stops them.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_Worker(conn, spec).serve())


class _Worker:
    """One worker's loop: its shard's drivers, reads in batches, commands one by one."""

    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        from siteagent.agent.credentials import load_credentials

        self.conn = conn
        self.spec = spec
        self.creds = load_credentials(spec.credentials_file)
        self.drivers: list[Any] = [None] * len(spec.miners)
        # Identified at the agent's start-up and not yet assigned (by address).
        self.found: dict[str, Any] = {}
        self.sem = asyncio.Semaphore(spec.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.connected = 0  # drivers made since the collector last froze the heap

    async def serve(self) -> None:
        """Take requests from the pipe until told to stop (or the agent is gone)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def readable() -> None:
            try:
                while self.conn.poll():
                    inbox.put_nowait(self.conn.recv())
            except (EOFError, OSError):
                inbox.put_nowait(("stop",))  # the agent is gone: so is its worker

        loop.add_reader(self.conn.fileno(), readable)
        self.conn.send(("ready", os.getpid()))
        while True:
            msg = await inbox.get()
            if msg[0] == "stop":
                break
            if msg[0] == "read":
                self._spawn(self._sweep(msg[1], msg[2], time.monotonic()))
            elif msg[0] == "cmd":
                self._spawn(self._command(*msg[1:]))
            elif msg[0] == "identify":
                self._spawn(self._identify(*msg[1:]))
            elif msg[0] == "assign":
                await self._assign(msg[1])
            elif msg[0] == "add":
                await self._add(msg[1])
            elif msg[0] == "drop":
                self._drop(msg[1])
        loop.remove_reader(self.conn.fileno())
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        from siteagent.agent.control.devices import close_quietly

        await close_quietly([d for d in self.drivers if d is not None], "a worker's driver")

    async def _identify(
        self,
        req: int,
        addresses: list[str],
        known: dict[str, KnownFirmware],
        ids: dict[str, str],
        concurrency: int,
        quiet_s: float | None,
    ) -> None:
        """Identify ``addresses`` as the agent's start-up does (agent/control/identify.py)
        and keep the miners found connected; say how many are done as they finish."""
        from siteagent.agent.control.identify import identify
        from siteagent.agent.credentials import CredentialsError, load_credentials

        # Read again, as the agent's own scans do: a fixed password is taken at the next
        # (the agent read the file just before it asked: a broken one stops it there).
        with contextlib.suppress(CredentialsError):
            self.creds = load_credentials(self.spec.credentials_file)
        done = 0

        def one_done() -> None:
            nonlocal done
            done += 1

        task = asyncio.ensure_future(
            identify(
                addresses,
                known,
                concurrency=concurrency,
                timeout_s=self.spec.timeout_s,
                on_done=one_done,
                creds=self.creds,
                ids=ids,
                quiet_s=quiet_s,
            )
        )
        told = 0
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=PART_S)
                if done > told:
                    self.conn.send(("progress", req, done - told))
                    told = done
        except asyncio.CancelledError:
            await _cancelled({task})
            raise
        found = task.result()
        self.found.update(found)
        self.connected += len(found)
        answer = [
            (a, d.identity, tuple(d.settle_s(k) for k in _SETTLE_KINDS)) for a, d in found.items()
        ]
        self.conn.send(("identified", req, answer, done - told))

    async def _assign(
        self, miners: tuple[tuple[str, str, KnownFirmware | None, DeviceIdentity | None], ...]
    ) -> None:
        """Take ``miners`` as this worker's, with the drivers identification left here;
        close those not among them (the agent took another way to them)."""
        from siteagent.agent.control.devices import close_quietly

        self.spec = dataclasses.replace(self.spec, miners=miners)
        self.drivers = [self.found.pop(m[1], None) for m in miners]
        for (device_id, *_), drv in zip(miners, self.drivers, strict=True):
            if drv is not None:
                drv.device_id = device_id  # readings carry the device's id, not the address
        left, self.found = list(self.found.values()), {}
        await close_quietly(left, "an identification driver")

    async def _add(
        self, miners: tuple[tuple[str, str, KnownFirmware | None, DeviceIdentity | None], ...]
    ) -> None:
        """Take ``miners`` as this worker's too (after its own), with the drivers a scan's
        identification left here; close the rest of those (the agent reads them as it
        did, or another worker took them)."""
        from siteagent.agent.control.devices import close_quietly

        self.spec = dataclasses.replace(self.spec, miners=self.spec.miners + miners)
        for device_id, address, _, _ in miners:
            drv = self.found.pop(address, None)
            if drv is not None:
                drv.device_id = device_id
            self.drivers.append(drv)
        left, self.found = list(self.found.values()), {}
        await close_quietly(left, "an identification driver")

    def _drop(self, i: int) -> None:
        """Let go of the miner at position ``i`` (it moved): close its driver; it is not
        asked for again."""
        from siteagent.agent.control.devices import close_quietly

        drv, self.drivers[i] = self.drivers[i], None
        if drv is not None:
            self._spawn(close_quietly([drv], "a moved miner's old driver"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _driver(self, i: int) -> Any:
        from siteagent.agent.control.identify import connect_known
        from siteagent.drivers.asic import AsicDriver

        drv = self.drivers[i]
        if drv is not None:
            return drv
        device_id, address, known, identity = self.spec.miners[i]
        logins = self.creds.for_miner(device_id, address)
        timeout_s = self.spec.timeout_s
        if known is not None and identity is not None:
            drv = await AsicDriver.from_inventory(
                device_id,
                address,
                backend=known.backend,
                model=known.model,
                timeout_s=timeout_s,
                logins=logins,
                identity=identity,
            )
        else:
            drv = await connect_known(address, known, timeout_s, logins)
            drv.device_id = device_id  # readings carry the device's id, not the address
        self.drivers[i] = drv
        self.connected += 1
        if drv.identity != identity:  # identified here: the agent learns what it said
            settle = tuple(drv.settle_s(k) for k in _SETTLE_KINDS)
            self.conn.send(("identity", i, drv.identity, settle))
        return drv

    async def _read(self, i: int) -> tuple[int, Any]:
        from siteagent.agent.control.identify import identify_deadline_s

        async def read() -> tuple[DeviceReading, bool | None]:
            drv = await self._driver(i)
            return await drv.read(), drv.login_ok

        async with self.sem:
            # A miner not yet connected is identified first, under identification's deadline.
            timeout_s = self.spec.timeout_s
            if self.drivers[i] is None:
                timeout_s += identify_deadline_s(timeout_s)
            try:
                return i, await within(timeout_s, read)
            except Exception as e:
                if not isinstance(e, DeviceError):
                    log.exception("%s: unexpected error while reading", self.spec.miners[i][0])
                return i, e

    async def _sweep(
        self, seq: int, positions: np.ndarray[Any, np.dtype[np.int32]], asked_s: float
    ) -> None:
        done: list[tuple[int, Any]] = []

        def one_done(task: asyncio.Task[tuple[int, Any]]) -> None:
            if not task.cancelled():  # cancelled: the worker is stopping
                done.append(task.result())

        left = {asyncio.ensure_future(self._read(int(i))) for i in positions}
        for task in left:
            task.add_done_callback(one_done)
        try:
            while left:
                _, left = await asyncio.wait(left, timeout=PART_S)
                if left and done:
                    self._answer(seq, asked_s, done, final=False)
                    done = []
        except asyncio.CancelledError:
            await _cancelled(left)  # the worker is stopping: its reads end before its drivers
            raise
        self._answer(seq, asked_s, done, final=True)
        if self.connected:
            # As the agent does once its drivers are made (cli): what a driver holds lives
            # as long as the worker, so keep it out of the collector's passes.
            self.connected = 0
            gc.collect()
            gc.freeze()

    def _answer(
        self, seq: int, asked_s: float, results: list[tuple[int, Any]], *, final: bool
    ) -> None:
        """Send one part of sweep ``seq`` (asked for at ``asked_s`` on this process's
        monotonic clock, as the readings' times): its readings as columns, its failures."""
        ok = [(i, r) for i, r in results if isinstance(r, tuple)]
        bad = [(i, r) for i, r in results if isinstance(r, Exception)]
        readings = [r for _, (r, _) in ok]
        cols = {
            "pos": np.fromiter((i for i, _ in ok), np.int32, len(ok)),
            "time_s": np.fromiter((r.timestamp_s for r in readings), np.float64, len(ok)),
            "state": np.fromiter((STATE_CODE[r.state] for r in readings), np.int8, len(ok)),
            "power_w": _floats([r.power_w for r in readings]),
            "hashrate_ths": _floats([r.hashrate_ths for r in readings]),
            "temperature_c": _floats([r.temperature_c for r in readings]),
            "power_target_w": _floats([r.power_target_w for r in readings]),
            "utilization_frac": _floats([r.utilization_frac for r in readings]),
            "estimated": np.fromiter((r.power_estimated for r in readings), np.bool_, len(ok)),
            "login_ok": np.fromiter(
                (-1 if lo is None else int(lo) for _, (_, lo) in ok), np.int8, len(ok)
            ),
        }
        # Firmware error texts are rare: only the rows that have any.
        errors = [(k, r.errors) for k, r in enumerate(readings) if r.errors]
        failed = (
            np.fromiter((i for i, _ in bad), np.int32, len(bad)),
            [_named(e) for _, e in bad],
        )
        self.conn.send(("readings", seq, cols, errors, failed, final, asked_s))

    async def _command(self, cmd_id: int, i: int, kind: str, value: float) -> None:
        async def send() -> float:
            drv = await self._driver(i)
            if kind == "target":
                return float(await drv.set_power_target(value))
            if kind == "sleep":
                await drv.sleep()
            else:
                await drv.wake()
            return value

        try:
            # At most a connect (identify), a re-read of an uncertain state and the
            # write, each under the timeout: never left hanging.
            value = await within(self.spec.timeout_s * 4, send)
        except Exception as e:
            self.conn.send(("done", cmd_id, *_named(e), value))
            return
        self.conn.send(("done", cmd_id, "", "", value))


async def _cancelled(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait for each to end (as the worker stops): none is left
    running into its driver's close, to fail there and be logged as an error nobody
    took in (171 tracebacks at one stop)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _floats(values: Sequence[float | None]) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.fromiter((math.nan if v is None else v for v in values), np.float64, len(values))


def _none(x: float) -> float | None:
    return None if x != x else float(x)


# -- the agent's side ----------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Held:
    """A miner a telemetry worker identified at start-up and keeps connected."""

    identity: DeviceIdentity | None
    shard: int  # the worker's index
    settle: tuple[float, ...]  # its firmware's settle times (``_SETTLE_KINDS``)
    dropped: bool = False  # start-up took another way to it (closed by its worker)

    async def close(self) -> None:
        """Not to be adopted: its worker closes it when the miners are assigned."""
        self.dropped = True


class RemoteDriver:
    """A miner driven by a worker process: what the loop calls on a driver, sent there."""

    def __init__(self, shard: Shard, position: int, identity: DeviceIdentity | None) -> None:
        self.shard = shard
        self.position = position
        self.identity = identity
        self.settle: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
        # Whether the miner took our credentials, as the worker's driver last said.
        self.login_ok: bool | None = None

    def settle_s(self, kind: str) -> float:
        """How long (s) the firmware takes to show a change of ``kind`` (the worker's word)."""
        return self.settle[_SETTLE_KINDS.index(kind)] if kind in _SETTLE_KINDS else 0.0

    async def read(self) -> DeviceReading:
        """Never called: the worker reads its miners in batches."""
        raise DeviceUnreachable("read by its worker process")

    async def set_power_target(self, power_w: float) -> float:
        """Sent to the owning worker; the target the miner took."""
        return await self.shard.command(self.position, "target", power_w)

    async def sleep(self) -> None:
        """Sent to the owning worker."""
        await self.shard.command(self.position, "sleep", 0.0)

    async def wake(self) -> None:
        """Sent to the owning worker."""
        await self.shard.command(self.position, "wake", 0.0)


class _Pipe:
    """The agent's end of one worker's pipe, kept off the event loop: one thread sends
    (in order; a send that finds the pipe full, 10,000 addresses to identify while the
    worker is busy, waits there and not on the loop), one receives (and unpickles) and
    hands each message to the loop. Both end when the worker does (its end closes);
    the receiver then closes the pipe."""

    def __init__(
        self,
        conn: Connection,
        on_message: Callable[[_Pipe, tuple[Any, ...]], None],
        name: str,
    ) -> None:
        self.conn = conn
        self._out: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        loop = asyncio.get_running_loop()
        self._sender = threading.Thread(target=self._send_all, name=f"{name}-send", daemon=True)
        self._receiver = threading.Thread(
            target=self._receive_all, args=(loop, on_message), name=f"{name}-recv", daemon=True
        )
        self._sender.start()
        self._receiver.start()

    def send(self, msg: tuple[Any, ...]) -> None:
        """Send ``msg`` to the worker after those sent before it; never blocks."""
        self._out.put(msg)

    async def ended(self) -> None:
        """Wait until both threads have ended and the pipe is closed."""
        await asyncio.to_thread(self._receiver.join)

    def _send_all(self) -> None:
        while (msg := self._out.get()) is not None:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                return  # the worker is gone: the receiver sees its end close

    def _receive_all(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[_Pipe, tuple[Any, ...]], None],
    ) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    return
                except Exception:  # one message that does not unpickle: the next may
                    log.exception("telemetry worker: a message could not be read")
                    continue
                loop.call_soon_threadsafe(on_message, self, msg)
        except RuntimeError:
            return  # the loop is closed: the agent has stopped
        finally:
            self._out.put(None)
            self._sender.join()
            self.conn.close()


class Shard:
    """The agent's end of one worker process: its rows, its pipe, its liveness."""

    def __init__(self, owner: WorkerTelemetry, spec: WorkerSpec, rows: list[int]) -> None:
        self.owner = owner
        self.spec = spec
        self.rows = rows
        self.process: BaseProcess | None = None
        self.pipe: _Pipe | None = None
        self.alive = False
        self.said_down = False  # said it is down (or late); says once it is back
        self.restarts = 0
        self._seq = 0
        # The sweeps asked for and not fully answered: number -> when asked (clock s;
        # their readings count from then on), its end, the positions asked. A miner
        # still being read is not asked for again, so a slow worker's work does not
        # pile up sweep on sweep.
        self._asked: dict[int, tuple[float, asyncio.Future[None], list[int]]] = {}
        self.said_unanswered = False  # said once that a sweep left miners unanswered
        # Positions asked for and not yet answered -> the sweep that asked.
        self.in_flight: dict[int, int] = {}
        # Miners given it since the worker was last told (``add``, ``send_added``).
        self._added: list[tuple[str, str, KnownFirmware | None, DeviceIdentity | None]] = []
        self.heard_s = -math.inf  # when the worker last answered (event loop's clock, s)
        self.idle = asyncio.Event()  # set while no sweep is outstanding
        self.idle.set()
        self._next_cmd = 0
        self._commands: dict[int, asyncio.Future[float]] = {}
        # Identifications asked of it: number -> (what it found, told of each one done).
        self._identifying: dict[
            int, tuple[asyncio.Future[list[tuple[Any, ...]]], Callable[[], object] | None]
        ] = {}
        self.started: asyncio.Future[None] | None = None
        # Set while the worker is up (it said ready) and while it is down (exited).
        self.up = asyncio.Event()
        self.down = asyncio.Event()

    def start(self) -> None:
        """Spawn the worker process and listen to its pipe and its exit."""
        loop = asyncio.get_running_loop()
        if self.restarts:
            # A restarted worker connects with what its miners said last, not at start.
            self.spec = self.owner.respec(self)
        ours, theirs = self.owner.ctx.Pipe(duplex=True)
        proc = self.owner.ctx.Process(
            target=worker_main,
            args=(theirs, self.spec),
            name=f"siteagent-worker-{self.spec.index}",
            daemon=True,
        )
        proc.start()
        theirs.close()
        self.pipe = _Pipe(ours, self._take, f"siteagent-worker-{self.spec.index}")
        self.process, self.alive = proc, True
        self.down.clear()
        self.started = loop.create_future()
        loop.add_reader(proc.sentinel, self._exited)

    def _take(self, pipe: _Pipe, msg: tuple[Any, ...]) -> None:
        if pipe is not self.pipe:
            return  # from a worker that has exited since
        what = msg[0]
        if what == "readings":
            seq, cols, errors, failed, final, asked_w = msg[1:7]
            asked = self._asked.get(seq)
            if asked is None:
                return  # a sweep from before the worker was restarted
            self.heard_s = asyncio.get_running_loop().time()
            flight = self.in_flight
            for p in itertools.chain(cols["pos"].tolist(), failed[0].tolist()):
                if flight.get(p) == seq:
                    del flight[p]
            # Late or not, each reading counts from when it was taken at the latest:
            # a late one is stale on arrival (worst case) but says what the miner is.
            self.owner.record_batch(self, asked[0], asked_w, cols, errors, failed)
            if self.said_down:
                self.said_down = False
                log.info(
                    "telemetry worker %d (pid %s) back: its %d miner(s) read again",
                    self.spec.index,
                    self.process.pid if self.process else "?",
                    self.n_devices,
                )
            if final:
                del self._asked[seq]
                self._unanswered(seq, asked[2])
                if not asked[1].done():
                    asked[1].set_result(None)
                if not self._asked:
                    self.idle.set()
        elif what == "identity":
            self.owner.record_identity(self, msg[1], msg[2], msg[3])
        elif what in ("progress", "identified"):
            asking = self._identifying.get(msg[1])
            if asking is None:
                return
            for _ in range(msg[2] if what == "progress" else msg[3]):
                if asking[1] is not None:
                    asking[1]()
            if what == "identified":
                del self._identifying[msg[1]]
                if not asking[0].done():
                    asking[0].set_result(msg[2])
        elif what == "done":
            done = self._commands.pop(msg[1], None)
            if done is not None and not done.done():
                kind, text, value = msg[2], msg[3], msg[4]
                if kind:
                    done.set_exception(_error_of(kind, text))
                else:
                    done.set_result(value)
        elif what == "ready":
            self.up.set()
            if self.started is not None and not self.started.done():
                self.started.set_result(None)

    def _unanswered(self, seq: int, asked: list[int]) -> None:
        """Sweep ``seq``'s last part came: any miner it asked and left unanswered will
        never be (a reading ended with no outcome at all), so it is asked again at the
        next sweep, rather than never: said once, as a fault of the worker's. (One it
        answered may be asked by a later sweep already: that one is its own.)"""
        flight = self.in_flight
        left = [p for p in asked if flight.get(p) == seq]
        if not left:
            return
        for p in left:
            del flight[p]
        if not self.said_unanswered:
            self.said_unanswered = True
            log.warning(
                "telemetry worker %d ended a sweep without answering %d of its miner(s) "
                "(first: %s): asked again at the next sweep; said once",
                self.spec.index,
                len(left),
                self.spec.miners[left[0]][0],
            )

    def _exited(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.in_flight.clear()
        self.up.clear()
        self.down.set()
        loop = asyncio.get_running_loop()
        proc = self.process
        assert proc is not None
        loop.remove_reader(proc.sentinel)
        self.pipe = None  # it closes as the worker's end has (_Pipe)
        proc.join(timeout=0)
        if self.owner.stopping:
            return
        log.warning(
            "telemetry worker %d (pid %s) exited (code %s): its %d miner(s) are not read and "
            "count at their worst case until it is back; restarting it",
            self.spec.index,
            proc.pid,
            proc.exitcode,
            self.n_devices,
        )
        self.said_down = True
        self._fail_all(DeviceUnreachable(f"telemetry worker {self.spec.index} exited"))
        self.restarts += 1
        delay_s = min(2.0 ** (self.restarts - 1) * 0.5, self.owner.max_backoff_s)
        loop.call_later(delay_s, self._restart)

    def _restart(self) -> None:
        if not self.owner.stopping and not self.alive:
            self.start()

    def _fail_all(self, error: Exception) -> None:
        for fut in self._commands.values():
            if not fut.done():
                fut.set_exception(error)
        self._commands.clear()
        for _, end, _ in self._asked.values():
            if not end.done():
                end.set_result(None)
        self._asked.clear()
        self.idle.set()
        for found, _ in self._identifying.values():
            if not found.done():
                found.set_result([])  # nothing it identified is connected any more
        self._identifying.clear()
        if self.started is not None and not self.started.done():
            self.started.set_result(None)

    async def identify(
        self,
        addresses: list[str],
        known: dict[str, KnownFirmware],
        ids: dict[str, str],
        concurrency: int,
        quiet_s: float | None,
        on_done: Callable[[], object] | None,
    ) -> list[tuple[str, DeviceIdentity | None, tuple[float, ...]]]:
        """Have the worker identify ``addresses`` and keep what it finds connected: each
        found (address, identity, settle times); nothing if it dies meanwhile."""
        if not self.alive or self.pipe is None or not addresses:
            return []
        self._next_cmd += 1
        req = self._next_cmd
        found: asyncio.Future[list[tuple[Any, ...]]] = asyncio.get_running_loop().create_future()
        self._identifying[req] = (found, on_done)
        self.pipe.send(("identify", req, addresses, known, ids, concurrency, quiet_s))
        return await found

    def clear(self) -> None:
        """No miners yet (``add`` gives it them, ``assign`` tells the worker)."""
        self.rows = []
        self.spec = dataclasses.replace(self.spec, miners=())
        self._added = []

    def assign(self) -> None:
        """Tell the worker that its miners are those ``add`` gave it since ``clear``, with
        the drivers its identification left it; it closes the others."""
        self._added = []
        if self.alive and self.pipe is not None:
            self.pipe.send(("assign", self.spec.miners))

    def add(
        self, row: int, miner: tuple[str, str, KnownFirmware | None, DeviceIdentity | None]
    ) -> int:
        """Make fleet ``row`` (``miner``) this worker's too; its position. The worker is
        told at the next ``send_added``."""
        self.rows.append(row)
        self.spec = dataclasses.replace(self.spec, miners=(*self.spec.miners, miner))
        self._added.append(miner)
        return len(self.rows) - 1

    def send_added(self) -> None:
        """Tell the worker of the miners ``add`` gave it (none: it closes what a scan's
        identification left it). A worker that is down has them in its spec."""
        added, self._added = tuple(self._added), []
        if self.alive and self.pipe is not None:
            self.pipe.send(("add", added))

    def let_go(self, position: int) -> None:
        """The miner at ``position`` moved (another worker reads it at its new address):
        the worker closes its driver, and it is not asked for again."""
        self.rows[position] = GONE
        if self.alive and self.pipe is not None:
            self.pipe.send(("drop", position))

    @property
    def n_devices(self) -> int:
        """The miners this worker reads and commands."""
        return sum(1 for r in self.rows if r != GONE)

    async def sweep(self, positions: list[int], deadline_s: float) -> None:
        """Have the worker read ``positions`` and wait for its answer (``ask``)."""
        answer = self.ask(positions, deadline_s)
        if answer is not None:
            await answer

    def ask(self, positions: list[int], deadline_s: float) -> Awaitable[None] | None:
        """Ask the worker now to read ``positions`` (those it is not reading already):
        what waits for its answer up to ``deadline_s`` and says once that it is late if
        it said nothing in that time (its miners go stale: counted at their worst
        case); None if nothing was asked."""
        if not self.alive or self.pipe is None:
            return None  # not read: stale in time, so counted at its worst case
        ask = [p for p in positions if p not in self.in_flight]
        if not ask:
            return None
        self._seq += 1
        self.in_flight.update(dict.fromkeys(ask, self._seq))
        asked_s = self.owner.clock()
        loop = asyncio.get_running_loop()
        end: asyncio.Future[None] = loop.create_future()
        self._asked[self._seq] = (asked_s, end, ask)
        self.idle.clear()
        self.pipe.send(("read", self._seq, np.asarray(ask, np.int32)))
        return self._answer(end, loop.time(), deadline_s)

    async def _answer(self, end: asyncio.Future[None], sent_s: float, deadline_s: float) -> None:
        await asyncio.wait({end}, timeout=deadline_s)
        # Whether it is silent is a matter of real time (the loop's clock), not the agent's.
        silent = asyncio.get_running_loop().time() - max(self.heard_s, sent_s) >= deadline_s
        if not end.done() and silent and self.alive and not self.said_down:
            self.said_down = True
            log.warning(
                "telemetry worker %d (pid %s) did not answer within %.0f s: its %d miner(s) "
                "count at their worst case until it answers in time",
                self.spec.index,
                self.process.pid if self.process else "?",
                deadline_s,
                self.n_devices,
            )

    async def command(self, position: int, kind: str, value: float) -> float:
        """Send one command to the worker; its outcome (the target taken) or its error."""
        if not self.alive or self.pipe is None:
            raise DeviceUnreachable(f"telemetry worker {self.spec.index} is down")
        self._next_cmd += 1
        cmd_id = self._next_cmd
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._commands[cmd_id] = fut
        try:
            self.pipe.send(("cmd", cmd_id, position, kind, value))
            return await fut
        finally:
            self._commands.pop(cmd_id, None)

    def stop(self) -> None:
        """Ask the worker to close its drivers and end."""
        if self.alive and self.pipe is not None:
            with contextlib.suppress(OSError):
                self.pipe.send(("stop",))


class WorkerTelemetry:
    """The miners read and commanded in worker processes; the fleet written here only."""

    def __init__(
        self,
        fleet: Any,
        *,
        workers: int,
        timeout_s: float,
        concurrency: int,
        confirm_timeout_s: float,
        interval_s: float,
        stale_after_s: float,
        max_backoff_s: float,
        credentials_file: str | None,
        clock: Callable[[], float],
    ) -> None:
        self.fleet = fleet
        self.n = workers
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.confirm_timeout_s = confirm_timeout_s
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.max_backoff_s = max_backoff_s
        self.credentials_file = credentials_file
        self.clock = clock
        self.ctx = multiprocessing.get_context("spawn")
        self.shards: list[Shard] = []
        self.stopping = False
        # What the inventory knows of the miners not identified yet (by address):
        # their workers identify them, their known firmware first.
        self.known: Mapping[str, KnownFirmware] = {}
        # The miners the workers identified at start-up and keep connected (by address).
        self.held: dict[str, Held] = {}
        # Each miner's driver in its worker, by fleet row (the one it had if it moved).
        self.remotes: dict[int, RemoteDriver] = {}

    async def start(self) -> None:
        """Start the workers and hand each its share of the fleet's miners."""
        await self.launch()
        await self.adopt()

    async def launch(self) -> None:
        """Start the worker processes, with no miners yet (``identify``, then ``adopt``)."""
        level = logging.getLogger("siteagent").getEffectiveLevel()
        for k in range(self.n):
            spec = WorkerSpec(k, (), self.timeout_s, self.concurrency, self.credentials_file, level)
            self.shards.append(Shard(self, spec, []))
        for shard in self.shards:
            shard.start()
        await asyncio.gather(*(s.started for s in self.shards if s.started is not None))

    async def identify(
        self,
        addresses: Sequence[str],
        known: Mapping[str, KnownFirmware],
        *,
        concurrency: int,
        timeout_s: float,
        on_done: Callable[[], object] | None = None,
        creds: object = None,
        ids: Mapping[str, str] | None = None,
        quiet_s: float | None = None,
    ) -> dict[str, Held]:
        """Start-up's identification (agent/control/identify.py ``identify``, whose
        signature this has), shared over the workers, which keep what they find
        connected for ``adopt``: by address, each miner found. ``timeout_s`` and
        ``creds`` are the workers' own (the config's, as here)."""
        self.known = known
        ids = ids or {}
        n = len(self.shards)
        parts = [list(addresses[k::n]) for k in range(n)]
        answers = await asyncio.gather(
            *(
                shard.identify(
                    part,
                    {a: known[a] for a in part if a in known},
                    {a: ids[a] for a in part if a in ids},
                    max(1, -(-concurrency // n)),
                    quiet_s,
                    on_done,
                )
                for shard, part in zip(self.shards, parts, strict=True)
            )
        )
        for shard, found in zip(self.shards, answers, strict=True):
            for address, identity, settle in found:
                self.held[address] = Held(identity, shard.spec.index, settle)
        return dict(self.held)

    async def adopt(self) -> None:
        """Hand each worker its share of the fleet's miners: those it identified at
        start-up, then the rest to even the shares. A driver the agent made is closed
        (its worker opens its own, without asking the miner who it is again)."""
        fleet = self.fleet
        rows = [
            r
            for r, link in enumerate(fleet.links())
            if link.kind is DeviceKind.MINER and math.isfinite(link.next_read_s)
        ]
        parts: list[list[int]] = [[] for _ in self.shards]
        rest: list[int] = []
        for row in rows:
            held = self.held.get(fleet.link(row).address)
            if held is not None and not held.dropped:
                parts[held.shard].append(row)
            else:
                rest.append(row)
        for row in rest:
            min(parts, key=len).append(row)
        old_drivers: list[DeviceDriver] = []
        for shard, part in zip(self.shards, parts, strict=True):
            shard.clear()
            for row in part:
                held = self.held.get(fleet.link(row).address)
                self._hand(shard, row, None if held is None or held.dropped else held, old_drivers)
            shard.assign()
        self.held = {}
        from siteagent.agent.control.devices import close_quietly

        # The identification's connections: each worker opens its own.
        await close_quietly(old_drivers, "an identification driver")
        log.info("telemetry: %d miner(s) in %d worker process(es)", len(rows), len(self.shards))

    def _hand(
        self, shard: Shard, row: int, held: Held | None, old_drivers: list[DeviceDriver]
    ) -> None:
        """Make fleet ``row`` ``shard``'s (told at its ``send_added``), with what the
        agent knows of it: the identity its driver or its worker found (``held``), or
        the inventory's word. A driver the agent made goes to ``old_drivers`` (to close:
        its worker opens its own, without asking the miner who it is again)."""
        link = self.fleet.link(row)
        drv = link.driver
        ident = getattr(drv, "identity", None) or (held.identity if held else None)
        known = (
            self.known.get(link.address)
            if ident is None
            else KnownFirmware.identified(ident, link.address)
        )
        pos = shard.add(row, (link.device_id, link.address, known, ident))
        remote = RemoteDriver(shard, pos, ident)
        if drv is not None and hasattr(drv, "settle_s"):
            remote.settle = tuple(drv.settle_s(k) for k in _SETTLE_KINDS)
            old_drivers.append(drv)
        elif held is not None:
            remote.settle = held.settle
        self.fleet.attach(row, remote)
        self.remotes[row] = remote

    def take(self, rows: Sequence[int]) -> list[DeviceDriver]:
        """Have the workers read and command ``rows`` too: miners a scan or a reload
        added, or that moved (``Agent.adopt``). Each goes to the worker that identified
        it if it did (its connection kept), else to the running one with the fewest; a
        moved one's old worker lets go of it. Returns the drivers the agent made for
        them, for the caller to close. Every worker is told, so each closes what a
        scan's identification left it and no one took."""
        fleet = self.fleet
        held, self.held = self.held, {}
        old_drivers: list[DeviceDriver] = []
        for row in rows:
            link = fleet.link(row)
            if link.kind is not DeviceKind.MINER or not math.isfinite(link.next_read_s):
                continue  # not read at all (an id taken twice: counted at its nameplate)
            if isinstance(link.driver, RemoteDriver):
                continue
            old = self.remotes.pop(row, None)
            if old is not None:
                old.shard.let_go(old.position)
            h = held.get(link.address)
            shard = (
                self.shards[h.shard]
                if h is not None and self.shards[h.shard].alive
                else min(self.shards, key=lambda s: (not s.alive, s.n_devices))
            )
            self._hand(shard, row, h, old_drivers)
        for shard in self.shards:
            shard.send_added()
        return old_drivers

    def respec(self, shard: Shard) -> WorkerSpec:
        """``shard``'s spec with the identities the agent has now of its miners."""
        miners = list(shard.spec.miners)
        for pos, row in enumerate(shard.rows):
            if row == GONE:
                continue
            drv = self.fleet.link(row).driver
            if isinstance(drv, RemoteDriver) and drv.shard is shard and drv.identity is not None:
                device_id, address, _, _ = miners[pos]
                known = KnownFirmware.identified(drv.identity, address)
                miners[pos] = (device_id, address, known, drv.identity)
        return dataclasses.replace(shard.spec, miners=tuple(miners))

    def owner(self, row: int) -> RemoteDriver | None:
        """The remote driver of ``row`` if a worker reads it."""
        drv = self.fleet.link(row).driver
        return drv if isinstance(drv, RemoteDriver) else None

    def split(self, due: Sequence[int]) -> tuple[list[int], list[Awaitable[None]]]:
        """The due rows the agent reads itself; the workers asked (now) to read the
        others, and what waits for their answers."""
        local: list[int] = []
        by_shard: dict[int, list[int]] = {}
        for row in due:
            drv = self.owner(row)
            if drv is None:
                local.append(row)
            else:
                by_shard.setdefault(drv.shard.spec.index, []).append(drv.position)
        # A worker that says nothing for stale_after_s leaves its miners stale: late.
        deadline_s = self.stale_after_s
        asked = (self.shards[k].ask(pos, deadline_s) for k, pos in by_shard.items())
        return local, [a for a in asked if a is not None]

    def record_identity(
        self, shard: Shard, pos: int, ident: DeviceIdentity | None, settle: tuple[float, ...]
    ) -> None:
        """A worker connected a miner: adopt what it identified."""
        row = shard.rows[pos]
        if row == GONE:
            return  # moved away since
        drv = self.fleet.link(row).driver
        if not isinstance(drv, RemoteDriver) or drv.shard is not shard or drv.position != pos:
            return  # moved away since
        drv.identity = ident
        drv.settle = (settle + (0.0,) * 4)[:4]
        self.fleet.attach(row, drv)

    def record_batch(
        self,
        shard: Shard,
        sent_s: float,
        asked_w: float,
        cols: dict[str, np.ndarray[Any, Any]],
        errors: list[tuple[int, tuple[str, ...]]],
        failed: tuple[np.ndarray[Any, Any], list[tuple[str, str]]],
    ) -> None:
        """A part of a worker's sweep: each reading and failure into the fleet, as the
        agent's own. The sweep was asked for at ``sent_s`` (this clock) and reached the
        worker at ``asked_w`` (its clock, the readings' own): a reading taken ``d`` s
        after that is timed ``sent_s + d``, which is no later than it was taken (the
        pipe took time), so none counts fresher than it is; never later than now."""
        fleet, rows = self.fleet, shard.rows
        now = self.clock()
        errs = dict(errors)
        pos = cols["pos"].tolist()
        time_s = cols["time_s"].tolist()
        state = cols["state"].tolist()
        power = cols["power_w"].tolist()
        hashrate = cols["hashrate_ths"].tolist()
        temp = cols["temperature_c"].tolist()
        target = cols["power_target_w"].tolist()
        util = cols["utilization_frac"].tolist()
        estimated = cols["estimated"].tolist()
        login_ok = cols["login_ok"].tolist()
        for k, p in enumerate(pos):
            row = rows[p]
            if row == GONE:
                continue  # read at the address it moved from
            taken_s = min(now, sent_s + max(0.0, time_s[k] - asked_w))
            link = fleet.link(row)
            drv = link.driver
            if not isinstance(drv, RemoteDriver) or drv.shard is not shard or drv.position != p:
                continue
            drv.login_ok = None if login_ok[k] < 0 else bool(login_ok[k])
            reading = DeviceReading(
                device_id=link.device_id,
                timestamp_s=time_s[k],
                power_w=_none(power[k]),
                state=STATES[state[k]],
                hashrate_ths=_none(hashrate[k]),
                temperature_c=_none(temp[k]),
                power_target_w=_none(target[k]),
                power_estimated=estimated[k],
                utilization_frac=_none(util[k]),
                errors=errs.get(k, ()),
            )
            fleet.record_reading(row, reading, taken_s, self.confirm_timeout_s)
        for p, (kind, text) in zip(failed[0].tolist(), failed[1], strict=True):
            row = rows[p]
            if row == GONE:
                continue
            drv = fleet.link(row).driver
            if isinstance(drv, RemoteDriver) and drv.shard is shard and drv.position == p:
                fleet.record_failure(
                    row, _error_of(kind, text), now, self.interval_s, self.max_backoff_s
                )

    def pids(self) -> list[int | None]:
        """Each worker's process id (None while it is down)."""
        return [s.process.pid if s.alive and s.process else None for s in self.shards]

    async def close(self) -> None:
        """Stop every worker (each closes its drivers) and wait for them to end."""
        self.stopping = True
        for s in self.shards:
            s.stop()
        for s in self.shards:
            proc = s.process
            if proc is not None:
                await asyncio.to_thread(proc.join, 10.0)
                if proc.is_alive():
                    proc.kill()
                    await asyncio.to_thread(proc.join, 10.0)
            pipe = s.pipe
            if s.alive and pipe is not None:
                s.alive = False
                s.pipe = None
                if proc is not None:
                    asyncio.get_running_loop().remove_reader(proc.sentinel)
                # The worker has ended, so has its end of the pipe: ours closes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pipe.ended(), 10.0)


def workers_for(cfg: Any, n_devices: int) -> int:
    """How many worker processes ``telemetry.workers`` asks for at ``n_devices``, on the
    cores this process may run on (systemd's CPUAffinity, a container), not the host's."""
    return worker_count(cfg.telemetry.workers, n_devices, len(os.sched_getaffinity(0)))


def make_workers(
    cfg: Any, n: int, fleet: Any = None, clock: Callable[[], float] = time.monotonic
) -> WorkerTelemetry:
    """``n`` telemetry workers as ``cfg`` says, not started (``fleet`` and ``clock``:
    the agent's, which may be set once it is built)."""
    t = cfg.telemetry
    return WorkerTelemetry(
        fleet,
        workers=n,
        timeout_s=t.timeout_s,
        # telemetry.concurrency stays the site's bound on reads in flight, shared out.
        concurrency=max(1, -(-t.concurrency // n)),
        confirm_timeout_s=cfg.control.confirm_timeout_s,
        interval_s=t.interval_s,
        stale_after_s=t.stale_after_s,
        max_backoff_s=t.max_backoff_s,
        credentials_file=cfg.inventory.credentials_file,
        clock=clock,
    )


async def start_workers(cfg: Any, fleet: Any, clock: Callable[[], float]) -> WorkerTelemetry | None:
    """The worker processes ``telemetry.workers`` asks for at this fleet's size, started
    with its miners (None for none: the agent reads every device itself). The start-up
    that identifies in the workers (cli) uses ``launch``, ``identify`` and ``adopt``."""
    n = workers_for(cfg, len(fleet))
    if n == 0:
        return None
    telemetry = make_workers(cfg, n, fleet, clock)
    await telemetry.start()
    return telemetry
