"""What every simulated miner shares: its listeners, its faults, and its JSON and HTTP APIs.

One listening socket per port (no duplicates, so 10,000 miners with one port
each fit under a 20,000 descriptor limit), one request per connection (the
CGMiner-style API on 4028 answers one JSON document and closes; HTTP answers
with ``Connection: close``), and the per-miner faults of ``sim.faults``:
no answer, slow, garbage, refused connection, refused commands, misreported
power, plus a spontaneous reboot (listeners gone for ``down_s``, then the miner
comes back with its uptime reset and ramps up again).

The ports follow a fault at once: ``refuse`` and a reboot close them, and
leaving those binds them again, before ``set_fault`` returns; only starting the
servers on them is asynchronous (``ready``), and connections that arrive
meanwhile wait in the backlog. A firmware whose server on a port depends on
the fault (``server_kind``: Braiins OS answers raw bytes instead of HTTP/2 on
its gRPC port under ``garbage``) has it swapped with the port kept bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from siteagent.sim.faults import (
    DEFAULT_MISREPORT_FACTOR,
    DEFAULT_SLOW_DELAY_S,
    GARBAGE_BYTES,
    Fault,
    FaultState,
    GroundTruth,
)
from siteagent.sim.power import MinerPowerModel, PowerTiming, SimModel
from siteagent.sim.wire import read_json_request

DEFAULT_REBOOT_DOWN_S = 5.0
# What a miner draws while its controller boots or its mining service restarts.
IDLE_POWER_W = 60.0
# The one pool every simulated miner mines on.
POOL_URL = "stratum+tcp://pool.invalid:3333"
POOL_USER = "sim.worker"


class Listener(Protocol):
    """A server on one listening socket (asyncio's, or grpclib's)."""

    def close(self) -> None:
        """Stop listening now (the socket is closed)."""

    async def wait_closed(self) -> None:
        """Wait until it is closed."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One parsed HTTP/1.1 request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a handler answers; ``Content-Length`` and ``Connection`` are added."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


_REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 400: "Bad Request"}

# What a client that goes away, stalls or sends nonsense raises while a request is read.
HTTP_ERRORS = (
    ConnectionError,
    TimeoutError,
    ValueError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
)


async def read_http_request(
    reader: asyncio.StreamReader, first: bytes = b""
) -> tuple[HttpRequest, str]:
    """One HTTP/1.x request from ``reader`` (``first``: its bytes already read), and the
    HTTP version it names."""
    head = first + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, version = ([*lines[0].split(" ", 2), "", ""])[:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(n) if n else b""
    return HttpRequest(method, path, headers, body), version


def http_response_bytes(resp: HttpResponse, *, keep_alive: bool) -> bytes:
    """``resp`` on the wire, saying whether the connection stays open after it."""
    out = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}"]
    out += [f"{k}: {v}" for k, v in resp.headers]
    out += [f"Content-Length: {len(resp.body)}"]
    out += ["Connection: keep-alive" if keep_alive else "Connection: close", "", ""]
    return "\r\n".join(out).encode("latin-1") + resp.body


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    """A JSON body with the given status."""
    return HttpResponse(status, json.dumps(obj).encode())


class SimMinerBase(GroundTruth):
    """One simulated miner: power model, faults, and its listeners on ``PORTS``."""

    BACKEND: ClassVar[str] = ""
    PORTS: ClassVar[tuple[int, ...]] = ()
    RPC_PORT: ClassVar[int] = 4028
    # Bytes after a 4028 reply: cgminer-style firmware ends with a NUL.
    RPC_TRAILER: ClassVar[bytes] = b"\x00"
    # The first three bytes of the simulated MACs (locally administered).
    MAC_PREFIX: ClassVar[str] = "02:43:AC"

    def __init__(
        self,
        address: str,
        model: SimModel,
        timing: PowerTiming,
        *,
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
        password: str = "admin",
        prefix: str = "SIM",
    ) -> None:
        self.address = address
        self.model = model
        self.timing = timing
        self.clock = clock
        self.power = MinerPowerModel(model, timing, clock())
        self.faults = FaultState()
        self.password = password
        self.index = index
        self.mac = (
            self.MAC_PREFIX + ":" + ":".join(f"{(index >> s) & 0xFF:02X}" for s in (16, 8, 0))
        )
        self.serial = f"{prefix}{index:08d}"
        self.hostname = f"sim-{self.BACKEND}-{index:04d}"
        # Each port's listening socket while the miner is up, and the server on it
        # (which owns that socket) once started, with the kind it was started as.
        self._socks: dict[int, socket.socket] = {}
        self._servers: dict[int, Listener] = {}
        self._kinds: dict[int, Hashable] = {}
        self._starting: set[int] = set()
        self._closing: list[Listener] = []
        self._released = asyncio.Event()
        self._reboot: asyncio.TimerHandle | None = None
        self._pending: asyncio.Task[None] | None = None
        self.rebooting = False

    # -- ground truth ----------------------------------------------------------------

    def refuse_commands(self) -> bool:
        """Whether control commands are to be refused now."""
        return self.faults.fault is Fault.REFUSE_COMMANDS

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the listeners."""
        self._reconcile()
        await self.ready()

    async def stop(self) -> None:
        """Close every listener and release hung connections."""
        if self._reboot is not None:
            self._reboot.cancel()
        self._released.set()
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self._pending
        self._shut()
        await self._wait_closed()

    async def ready(self) -> None:
        """Wait until the servers match the last fault set (the ports already do)."""
        if self._pending is not None:
            await self._pending

    def set_fault(self, fault: str | Fault, **kw: float) -> None:
        """Switch fault now (``delay_s`` slow, ``factor`` misreport, ``down_s`` reboot)."""
        f = Fault(fault)
        if f is Fault.REBOOT:
            self.reboot(float(kw.get("down_s", DEFAULT_REBOOT_DOWN_S)))
            return
        self.faults = FaultState(
            fault=f,
            delay_s=float(kw.get("delay_s", DEFAULT_SLOW_DELAY_S)),
            factor=float(kw.get("factor", DEFAULT_MISREPORT_FACTOR)),
        )
        self._release()
        self._reconcile()

    def reboot(self, down_s: float = DEFAULT_REBOOT_DOWN_S) -> None:
        """Spontaneous reboot: no listener for ``down_s``, then mining again, uptime reset."""
        now = self.clock()
        self.rebooting = True
        self.power.restart(now, down_s, IDLE_POWER_W)
        self._release()
        self._reconcile()
        if self._reboot is not None:
            self._reboot.cancel()

        def back() -> None:
            self.rebooting = False
            self._reconcile()

        self._reboot = asyncio.get_running_loop().call_later(down_s, back)

    # -- what a firmware says about its servers --------------------------------------

    def server_kind(self, port: int) -> Hashable:
        """Which server ``port`` wants under the current fault; when it changes, the
        server is swapped (the base serves every port the same way under every fault)."""
        return None

    async def start_server(self, port: int, sock: socket.socket) -> Listener:
        """Start the server of ``port`` on its bound, listening ``sock`` (it owns it then)."""
        handler = self._serve_rpc if port == self.RPC_PORT else self._serve_http
        return await asyncio.start_server(handler, sock=sock)

    def close_connections(self, port: int) -> None:
        """End the connections the server on ``port`` keeps open, as it closes (the
        process behind both is gone); one request per connection keeps none."""

    # -- listeners -------------------------------------------------------------------

    def _release(self) -> None:
        """Wake connections held by no_answer/slow so they see the new state."""
        self._released.set()
        self._released = asyncio.Event()

    def _reconcile(self) -> None:
        """Close or bind the ports for the current state now; (re)start servers next."""
        if self.faults.fault is Fault.REFUSE or self.rebooting:
            self._shut()
        else:
            self._bind()
        prev = self._pending

        async def apply() -> None:
            if prev is not None:
                with contextlib.suppress(Exception):
                    await prev
            await self._start_servers()

        self._pending = asyncio.get_running_loop().create_task(apply())

    def _bind(self) -> None:
        for port in self.PORTS:
            if port in self._socks:
                continue
            # proto must say TCP: asyncio only sets TCP_NODELAY on accepted sockets
            # whose proto is IPPROTO_TCP, and without it Nagle plus delayed ACKs add
            # ~40 ms to every exchange on a kept connection.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.address, port))
                sock.listen(128)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            self._socks[port] = sock

    def _shut(self) -> None:
        """Close every server and listening socket now: connections are refused at once."""
        for port in list(self._servers):
            self._close_server(port)
        for port, sock in self._socks.items():
            # A server starting on it closes it when it finds the port shut.
            if port not in self._starting:
                sock.close()
        self._socks.clear()

    def _close_server(self, port: int) -> None:
        srv = self._servers.pop(port)
        del self._kinds[port]
        srv.close()
        self.close_connections(port)
        self._closing.append(srv)

    async def _start_servers(self) -> None:
        """Start the servers the current fault wants on the bound ports."""
        for port in self.PORTS:
            sock = self._socks.get(port)
            kind = self.server_kind(port)
            if sock is None or (port in self._servers and self._kinds[port] == kind):
                continue
            if port in self._servers:
                # A swap: the dup keeps the port bound while the old server closes.
                sock = sock.dup()
                self._socks[port] = sock
                self._close_server(port)
            self._starting.add(port)
            try:
                srv = await self.start_server(port, sock)
            except BaseException:
                sock.close()
                if self._socks.get(port) is sock:
                    del self._socks[port]
                raise
            finally:
                self._starting.discard(port)
            if self._socks.get(port) is not sock:  # shut meanwhile
                srv.close()
                self.close_connections(port)
                self._closing.append(srv)
                continue
            self._servers[port], self._kinds[port] = srv, kind
        await self._wait_closed()

    async def _wait_closed(self) -> None:
        closing, self._closing = self._closing, []
        for srv in closing:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)

    # -- fault behaviour -------------------------------------------------------------

    async def _delay(self) -> bool:
        """Apply no_answer / slow before answering; False if the caller must not answer."""
        f = self.faults
        if f.fault is Fault.NO_ANSWER:
            await self._released.wait()
            return False
        if f.fault is Fault.SLOW:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(f.delay_s):
                    await self._released.wait()
        return True

    # -- JSON socket API (port 4028) -------------------------------------------------

    async def _serve_rpc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await read_json_request(reader)
            if not await self._delay():
                return
            if self.faults.fault is Fault.GARBAGE:
                writer.write(GARBAGE_BYTES)
            else:
                writer.write(json.dumps(self.rpc_reply(raw)).encode() + self.RPC_TRAILER)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def rpc_reply(self, raw: bytes) -> dict[str, Any]:
        """The JSON reply to one request on port 4028."""
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError):
            return rpc_status("E", 23, "Invalid JSON")
        return self.rpc_request(req)

    def rpc_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """One parsed request to its reply (``+``-joined commands: object keyed by command)."""
        command = str(req.get("command", ""))
        cmds = command.split("+")
        param = req.get("parameter")
        if len(cmds) == 1:
            return self.rpc_command(cmds[0], param, req)
        return {c: [self.rpc_command(c, None, req)] for c in cmds}

    def rpc_command(self, cmd: str, param: Any, req: dict[str, Any]) -> dict[str, Any]:
        """One command's reply; subclasses answer their firmware's commands."""
        return rpc_status("E", 14, "Invalid command")

    # -- HTTP (port 80) --------------------------------------------------------------

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                req, _ = await read_http_request(reader)
            if not await self._delay():
                return
            if self.faults.fault is Fault.GARBAGE:
                writer.write(GARBAGE_BYTES)
            else:
                writer.write(http_response_bytes(self.http_request(req), keep_alive=False))
            await writer.drain()
        except HTTP_ERRORS:
            pass
        finally:
            writer.close()

    def http_request(self, req: HttpRequest) -> HttpResponse:
        """One HTTP request to its response; subclasses serve their firmware's pages."""
        return HttpResponse(404, b"not found", (("Content-Type", "text/plain"),))


def rpc_status(code: str, num: int, msg: str, desc: str = "") -> dict[str, Any]:
    """A CGMiner-style reply with only its STATUS section."""
    return {
        "STATUS": [
            {"STATUS": code, "When": int(time.time()), "Code": num, "Msg": msg, "Description": desc}
        ],
        "id": 1,
    }


def pools_reply(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``pools`` reply: the one pool every simulated miner mines on (``extra``: more
    fields of its row, as a firmware names them)."""
    out = rpc_status("S", 7, "1 Pool(s)")
    out["POOLS"] = [
        {
            "POOL": 0,
            "URL": POOL_URL,
            "Status": "Alive",
            "Stratum Active": True,
            "User": POOL_USER,
            "Accepted": 0,
            "Rejected": 0,
            **(extra or {}),
        }
    ]
    return out
