"""Braiins OS (BOSer): gRPC on port 50051 through pyasic's ``BOSer`` web API.

Watt power target (``SetPowerTarget``, range from ``GetConstraints``), pause and
resume. One HTTP/2 channel per miner is kept open across readings (within
``KEEP_BUDGET``), as a gRPC client of BOSer would; see ``_KeptChannelBOSerWebAPI``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import sys
import types
import typing
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import betterproto
import grpclib.const
import h2.settings
from grpclib import GRPCError, Status
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError
from grpclib.protocol import H2Protocol
from h2.exceptions import ProtocolError as H2ProtocolError
from pyasic.errors import APIError
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.web.braiins_os import BOSerWebAPI
from pyasic.web.braiins_os.boser import BOSMinerGRPCStub
from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos
from pyasic.web.braiins_os.proto.braiins.bos.v1 import (
    LoginRequest,
    LoginResponse,
    MinerStatus,
    SaveAction,
)

from domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from domain.types import DeviceState, MinerCapabilities, MinerIdentity
from drivers.backends.base import KEPT_CONNECTIONS, Behaviour, KeepBudget, Sample
from drivers.backends.nameplate import lookup

# gRPC statuses that mean "understood and declined" rather than "broken".
_REFUSED = {
    Status.INVALID_ARGUMENT,
    Status.FAILED_PRECONDITION,
    Status.OUT_OF_RANGE,
    Status.ABORTED,
    Status.ALREADY_EXISTS,
    Status.UNIMPLEMENTED,
}
_UNREACHABLE = {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED}
_NO_PERMISSION = {Status.PERMISSION_DENIED, Status.UNAUTHENTICATED}


def translate_grpc(address: str, what: str, e: BaseException) -> DeviceError:
    """Map a pyasic / grpclib / socket error to one of ours (not raised here)."""
    # pyasic's BOSer web API wraps GRPCError and ConnectionError in APIError
    # ``from`` the original; the cause is what tells the failures apart.
    cause: BaseException = e
    if isinstance(e, APIError) and e.__cause__ is not None:
        cause = e.__cause__
    msg = f"{address}: {what}: {type(cause).__name__}: {cause}"
    if isinstance(cause, GRPCError):
        detail = cause.message or cause.status.name
        msg = f"{address}: {what}: {cause.status.name}: {detail}"
        if cause.status in _REFUSED:
            return DeviceRefused(msg)
        if cause.status in _UNREACHABLE:
            return DeviceUnreachable(msg)
        if cause.status in _NO_PERMISSION:
            return DevicePermissionError(msg)
        return DeviceFaulted(msg)
    if isinstance(cause, TimeoutError):
        return DeviceUnreachable(f"{address}: {what}: no answer in time")
    if isinstance(cause, ConnectionRefusedError):
        return DeviceUnreachable(msg)
    if isinstance(cause, ConnectionError | StreamTerminatedError):
        # Reset or closed after connecting: the peer is there but talks nonsense
        # (grpclib closes the connection when the HTTP/2 framing is garbage). grpclib
        # ends a call whose connection went away under it, a GOAWAY included, with
        # StreamTerminatedError("Connection lost"): the connection_lost that follows
        # overwrites the GOAWAY's reason (grpclib/protocol.py, EventsProcessor.close).
        # A read cut so on a kept channel has been sent again already.
        return DeviceFaulted(msg)
    if isinstance(cause, OSError):
        return DeviceUnreachable(msg)
    return DeviceFaulted(msg)


class _LazyDefault:
    """A field not on the wire: its default, made on first read and kept (as betterproto)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self
        value = type(obj)._betterproto.default_gen[self.name]()
        setattr(obj, self.name, value)
        return value


class _LeanReply(betterproto.Message):
    """A betterproto message for decoding a reply only (never built, changed or sent).

    betterproto's ``Message`` hooks every attribute read and write in Python (lazy
    defaults, oneof bookkeeping, ``serialized_on_wire`` tracking): ~150 hooked reads
    and ~25 writes for one GetMinerStats reply of six messages, 170 us of a reading's
    ~1 ms. Decoding sets each field once (betterproto-rust-codec: ``cls()``, then
    ``setattr`` per field on the wire, then ``_serialized_on_wire = True``), so these
    use plain attributes: a field not on the wire reads as its default through
    ``_LazyDefault``, made then as betterproto makes it; ``serialized_on_wire`` is
    what the codec set. A oneof member other than the one sent reads as not sent
    (pyasic's types raise AttributeError for it); a reading faults on either.

    What betterproto keeps per message is a class default here until the codec sets
    it, so a decoded message is one object (no ``__dict__`` or dicts of its own):
    fewer objects for the collector to count and walk.
    """

    __getattribute__ = object.__getattribute__
    __setattr__ = object.__setattr__  # type: ignore[assignment]  # the same signature

    _serialized_on_wire = False
    _unknown_fields = b""
    # No oneof is tracked (read-only, empty).
    _group_current: Mapping[str, str] = types.MappingProxyType({})  # type: ignore[assignment]


def _slim(cls: Any, fields: Mapping[str, Any]) -> Any:
    """pyasic's message class ``cls`` with only ``fields`` (a mapping for a submessage's own).

    Field numbers, wire types and leaf classes are pyasic's generated schema;
    protobuf skips the fields a type does not declare, so a reply is decoded
    only as deep as a reading looks. pyasic's classes decode every field
    (betterproto, ~0.1 ms per submessage): 1.6 ms for a reading's four replies,
    0.7 ms this way, and with ``_LeanReply``'s plain attributes 0.01 ms for a
    steady reading's two (GetMinerStats 170 us -> 7 us, GetMinerDetails 32 -> 2.5).
    """
    meta = cls._betterproto.meta_by_field_name
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    spec = []
    for name, sub in fields.items():
        m = meta[name]
        field = betterproto.dataclass_field(
            m.number,
            m.proto_type,
            map_types=m.map_types,
            group=m.group,
            wraps=m.wraps,
            optional=m.optional,
        )
        spec.append((name, hints[name] if sub is None else _slim(hints[name], sub), field))
    slim = dataclasses.make_dataclass(
        f"Slim{cls.__name__}",
        spec,
        bases=(_LeanReply,),
        init=False,
        eq=False,
        repr=False,
    )
    slim.__module__ = __name__
    for name in fields:
        setattr(slim, name, _LazyDefault(name))
    return slim


# pyasic's reply type -> what a reading decodes of it (down to the scalars).
_SLIM: dict[Any, Any] = {
    bos.GetMinerStatsResponse: _slim(
        bos.GetMinerStatsResponse,
        {
            "miner_stats": {"real_hashrate": {"last_5_s": {"gigahash_per_second": None}}},
            "power_stats": {"approximated_consumption": {"watt": None}},
        },
    ),
    bos.GetMinerDetailsResponse: _slim(bos.GetMinerDetailsResponse, {"status": None}),
    bos.PerformanceMode: _slim(
        bos.PerformanceMode,
        {"tuner_mode": {"power_target": {"power_target": {"watt": None}}}},
    ),
    bos.GetCoolingStateResponse: _slim(
        bos.GetCoolingStateResponse,
        {"highest_temperature": {"temperature": {"degree_c": None}}},
    ),
}


class _RouteOf(BOSMinerGRPCStub):  # type: ignore[misc]  # pyasic is untyped
    """pyasic's stub answering a method with its route and ``_SLIM``'s reply type (no call)."""

    async def _unary_unary(
        self, route: str, request: Any, response_type: Any, **kwargs: Any
    ) -> tuple[str, Any]:
        return route, _SLIM.get(response_type, response_type)


_ROUTES: dict[str, tuple[str, Any]] = {}


async def _route(command: str) -> tuple[str, Any]:
    """pyasic's route for ``command`` ("get_miner_stats") and the type its reply is decoded as."""
    route = _ROUTES.get(command)
    if route is None:
        if not command.startswith(_READ_PREFIX):
            raise ValueError(f"{command}: not a read (sent together, retried as reads)")
        route = _ROUTES[command] = await getattr(_RouteOf(None), command)(None)
    return route


async def _unary_calls(
    channel: Channel, plan: Sequence[tuple[str, Any, Any]], metadata: list[tuple[str, str]]
) -> list[Any]:
    """Unary calls (route, reply type, request) on ``channel``, each made as betterproto's
    ``ServiceStub._unary_unary`` makes one, but every request sent before any reply is
    read, from this one task: a reading's two calls cost no task each (as the floor's
    bare client sends its two). The replies in ``plan``'s order; the first error raised
    ends them all (the other streams are reset), as ``gather`` of single calls would.
    """
    pending: list[Any] = []  # streams entered and not yet exited
    failing: Any = None  # the stream whose step raised, ended as ``async with`` ends it
    try:
        for route, reply_type, message in plan:
            failing = channel.request(
                route,
                grpclib.const.Cardinality.UNARY_UNARY,
                type(message),
                reply_type,
                metadata=metadata,
            )
            await failing.__aenter__()
            pending.append(failing)
            await failing.send_message(message, end=True)
        replies = []
        while pending:
            failing = pending[0]
            reply = await failing.recv_message()
            assert reply is not None  # as betterproto's stub
            del pending[0]
            await failing.__aexit__(None, None, None)  # the trailers: a status raises here
            replies.append(reply)
        return replies
    except BaseException as e:
        for stream in pending:
            if stream is not failing:
                with contextlib.suppress(Exception):
                    await stream.__aexit__(type(e), e, e.__traceback__)
        if failing in pending:
            # May raise the status the miner sent before its connection went instead.
            await failing.__aexit__(type(e), e, e.__traceback__)
        raise


# -- one HTTP/2 channel per miner, kept open across readings ---------------------------

# Closed streams h2 remembers per connection. h2 keeps up to 2**16 of them
# (``H2Connection.MAX_CLOSED_STREAMS``, h2 4.x ``connection.py``) to answer late frames
# on a closed stream; at ~200 B each, a connection kept for days of readings (two
# streams each) would hold ~13 MB. A reading opens at most four streams at once, so a
# few more than that covers any late frame. h2 checks the limit on every insert.
CLOSED_STREAMS_KEPT = 16


def _bound_closed_streams(protocol: H2Protocol) -> None:
    closed = getattr(protocol.connection._connection, "_closed_streams", None)
    if closed is not None and hasattr(closed, "_size_limit"):
        closed._size_limit = CLOSED_STREAMS_KEPT


class _ListDeque(list[Any]):
    """A short ``collections.deque`` as a list: a deque takes about 760 B even empty,
    this about 70 B, and a kept channel holds over a dozen for its whole life.

    - h2's per-setting values (the current one first, then those awaiting an ACK):
      h2 uses ``len``, ``[0]``, ``append`` and ``popleft`` on them (h2 4.x
      ``settings.py``), on two or three values; a connection holds a dozen (its
      own settings and the peer's), a third of a kept channel's memory.
    - An HPACK dynamic table's entries (newest first), two per connection (its
      encoder's and its decoder's): hpack uses ``appendleft``, ``pop``, ``clear``,
      ``len``, ``[i]`` and iteration on them (hpack 4.x ``table.py``); a 4 kB table
      holds a few dozen entries at most.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class _LeanSettings(h2.settings.Settings):
    """h2's ``Settings`` with its per-setting values in ``_ListDeque``."""

    def __setitem__(self, key: Any, value: int) -> None:
        super().__setitem__(key, value)  # a new setting gets a deque: replace it
        values: dict[Any, Any] = self._settings  # typed as deques by h2
        if type(values[key]) is not _ListDeque:
            values[key] = _ListDeque(values[key])


def _lean_settings(conn: Any) -> None:
    """``conn``'s (an ``h2.connection.H2Connection``'s) settings into ``_LeanSettings``."""
    for name in ("local_settings", "remote_settings"):
        settings = getattr(conn, name, None)
        values = getattr(settings, "_settings", None)
        if type(settings) is not h2.settings.Settings or not isinstance(values, dict):
            continue  # not the h2 this was written against: leave it be
        settings.__class__ = _LeanSettings
        for key, items in values.items():
            values[key] = _ListDeque(items)


def _lean_tables(conn: Any) -> None:
    """``conn``'s (an ``h2.connection.H2Connection``'s) HPACK tables into lists."""
    for coder in (getattr(conn, "encoder", None), getattr(conn, "decoder", None)):
        table: Any = getattr(coder, "header_table", None)
        entries = getattr(table, "dynamic_entries", None)
        if type(entries) is collections.deque:  # else not the hpack this was written for
            table.dynamic_entries = _ListDeque(entries)


def _lean_events(connection: Any) -> None:
    """The waiters of a grpclib ``Connection``'s two events (kept as long as it is) in
    lists: asyncio's ``Event`` makes a 760 B deque for them up front, where its
    ``Lock`` makes one only once a task waits. ``Event`` appends, removes and iterates
    them (CPython 3.11-3.13 ``asyncio/locks.py``), and they are empty while idle."""
    for name in ("write_ready", "stream_close_waiter"):
        event: Any = getattr(connection, name, None)
        waiters = getattr(event, "_waiters", None)
        if type(waiters) is collections.deque and isinstance(event, asyncio.Event):
            lean: Any = event
            lean._waiters = list(waiters)


class _Dispatch:
    """A dispatch table (event or frame class to one of ``owner``'s methods) that binds
    the method when looked up. h2's connection and grpclib's events processor each
    build theirs as a dict of bound methods, a dozen each, about 1.2 kB per kept
    channel; this holds the owner and one table of method names per class, shared.
    A class not in the table raises ``KeyError``, as the dict does."""

    __slots__ = ("_names", "_owner")
    _shared: typing.ClassVar[dict[type, dict[type, str]]] = {}

    def __init__(self, owner: Any, names: dict[type, str]) -> None:
        self._owner = owner
        self._names = names

    def __getitem__(self, key: type) -> Any:
        return getattr(self._owner, self._names[key])

    @classmethod
    def replace(cls, owner: Any, attribute: str) -> None:
        """``owner.<attribute>`` as a ``_Dispatch``, if it is a dict of its own methods."""
        table = getattr(owner, attribute, None)
        if type(table) is not dict:
            return  # not the library this was written for: leave it be
        names: dict[type, str] = {}
        for key, method in table.items():
            func = getattr(method, "__func__", None)
            if getattr(method, "__self__", None) is not owner or func is None:
                return
            if getattr(owner, func.__name__, None) != method:
                return
            names[key] = func.__name__
        shared = cls._shared.setdefault(type(owner), names)
        setattr(owner, attribute, cls(owner, shared if shared == names else names))


class _BoundedH2Protocol(H2Protocol):
    """grpclib's client protocol, its h2 connection remembering few closed streams and
    keeping its settings, HPACK tables and events' waiters in lists, and its two
    dispatch tables unbound."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _bound_closed_streams(self)
        h2_conn = getattr(self.connection, "_connection", None)
        _lean_settings(h2_conn)
        _lean_tables(h2_conn)
        _lean_events(self.connection)
        if h2_conn is not None:
            _Dispatch.replace(h2_conn, "_frame_dispatch_table")
        processor = getattr(self, "processor", None)
        if processor is not None:
            _Dispatch.replace(processor, "processors")


class _KeptChannel(Channel):
    """A grpclib ``Channel`` meant to live across readings.

    grpclib reconnects a channel by itself when its connection was lost while idle
    (FIN, GOAWAY: ``Channel.__connect__`` checks ``connection_lost``). Once the
    adapter closes one, though, it must stay closed: a call still holding it would
    otherwise open a connection that nothing tracks or closes.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.answered = False  # some call on it got an answer (it has been reused since)
        self.closed = False

    def _protocol_factory(self) -> H2Protocol:
        p = super()._protocol_factory()
        return _BoundedH2Protocol(p.handler, p.config, p.h2_config)

    async def __connect__(self) -> H2Protocol:
        if self.closed:
            raise ConnectionAbortedError("channel closed by the adapter")
        return await super().__connect__()

    def close(self) -> None:
        self.closed = True
        super().close()


# One budget for every firmware's kept connections (see drivers.backends.base).
KEEP_BUDGET = KEPT_CONNECTIONS

# BOSer's read calls are named ``Get...`` (pyasic: ``get_...``); anything else changes
# the miner and is never sent again after an unknown outcome.
_READ_PREFIX = "get_"

# What a call that got no answer raises: the connection failed or ended under it.
_NO_ANSWER = (ConnectionError, OSError, StreamTerminatedError, H2ProtocolError)

T = typing.TypeVar("T")


class _KeptChannelBOSerWebAPI(BOSerWebAPI):  # type: ignore[misc]  # pyasic is untyped
    """pyasic's BOSer web API over one HTTP/2 channel per miner, kept across readings.

    pyasic opens a new grpclib ``Channel`` for every call (pyasic 0.79.0,
    ``pyasic/web/braiins_os/boser.py:112``: ``async with Channel(self.ip,
    self.port) as c:`` in ``BOSerWebAPI.send_command``, and again for the login at
    ``:135``): a TCP connect, the HTTP/2 preface and a SETTINGS exchange per call, on
    the miner as much as here (a 1,000-miner sweep: 1.4 ms of ours and 1.9 ms of the
    miner's CPU per reading). The channel cannot be passed in, so ``send_command`` and
    ``_get_auth`` are pyasic's own (same stub, same re-login on UNAUTHENTICATED, same
    ``APIError`` ``from`` the cause) on a channel this object keeps, as a gRPC client of
    BOSer (tonic, which keeps HTTP/2 connections) would:

    - a connection the miner closed while idle (reboot, GOAWAY, idle timeout) is
      reopened by grpclib on the next call;
    - a call that got no answer (reset, GOAWAY or close mid-call, or cancelled by a
      deadline: the connection may be half-open) drops the channel, so the next call
      opens a fresh one;
    - a read (``get_*``) that failed so on a channel that had answered before is sent
      once more on a fresh channel; a failure on a fresh channel is the miner's;
    - a control call is never sent again here: its outcome is unknown, and the driver
      re-reads state before any retry (``AsicDriver``'s uncertain flag).

    Beyond ``KEEP_BUDGET`` the channel is closed when the last call of a ``shared()``
    block ends.
    """

    def __init__(self, ip: str, *, budget: KeepBudget = KEEP_BUDGET) -> None:
        super().__init__(ip)
        self._held = _Held(budget)
        # A miner the agent stops driving (one that moved) is collected with its
        # channel open: close it here rather than in grpclib's ``Channel.__del__``,
        # which logs an error for it.
        weakref.finalize(self, self._held.release)
        self._shared = _Shared(self._held)
        self._login: asyncio.Future[str | None] | None = None

    @property
    def keeps_channel(self) -> bool:
        """Whether this miner's channel outlives a reading (``KEEP_BUDGET`` allowed it)."""
        return bool(self._held.keep)

    def _current(self) -> _KeptChannel:
        """The open channel, or a new one (a channel belongs to the loop it was made in)."""
        held = self._held
        loop = asyncio.get_running_loop()
        channel = held.channel
        if channel is not None and held.loop is not loop:
            held.drop(channel)
            channel = None
        if channel is None:
            if held.keep is None:
                held.keep = held.budget.take()
            channel = held.channel = _KeptChannel(str(self.ip), self.port)
            held.loop = loop
        return channel

    def close(self) -> None:
        """Close the channel and give the budget its slot back (a later call starts over)."""
        self._held.release()

    def shared(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Calls made until exit (also from tasks started inside) share one channel;
        past the budget it is closed when the last of them ends."""
        return self._shared

    async def _on_channel(
        self, what: str, call: typing.Callable[[_KeptChannel], typing.Awaitable[T]], *, read: bool
    ) -> T:
        """``call`` on the current channel; a read sent once more on a fresh one if the
        connection failed under a channel that had answered before."""
        async with self.shared():
            for attempt in (1, 2):
                channel = self._current()
                reused = channel.answered
                try:
                    result = await call(channel)
                except GRPCError as e:
                    channel.answered = True  # an answer: the connection works
                    raise APIError(f"gRPC command failed - {what}") from e
                except _NO_ANSWER as e:
                    self._held.drop(channel)
                    if read and reused and attempt == 1:
                        continue
                    raise APIError(f"gRPC command failed - {what}") from e
                except BaseException:
                    # Cancelled, most often by the driver's deadline: the connection
                    # may be half-open (a miner that lost power sends no FIN).
                    self._held.drop(channel)
                    raise
                channel.answered = True
                return result
        raise AssertionError("unreachable")  # the loop returns or raises

    async def send_command(
        self,
        command: str,
        ignore_errors: bool = False,
        allow_warning: bool = True,
        privileged: bool = False,
        **parameters: Any,
    ) -> dict[str, Any]:
        reply = await self.send_message(command, parameters["message"], privileged=privileged)
        return dict(reply.to_pydict())

    async def send_message(self, command: str, message: Any, *, privileged: bool) -> Any:
        """pyasic's ``send_command`` on the kept channel, returning the reply message."""

        async def call(channel: _KeptChannel, metadata: list[tuple[str, str]]) -> Any:
            return await getattr(BOSMinerGRPCStub(channel), command)(message, metadata=metadata)

        return await self._logged_in(
            command, call, read=command.startswith(_READ_PREFIX), privileged=privileged
        )

    async def send_reads(self, calls: Sequence[tuple[str, Any]]) -> list[Any]:
        """Privileged reads (``get_*``: pyasic's command, request) sent together on the kept
        channel (``_unary_calls``), their replies decoded only as deep as ``_SLIM``'s types.

        ``to_pydict()`` (pyasic ``boser.py:119``, its own version in
        ``better_monkey.py``) walks every field of the reply again: about as much
        CPU as decoding it. A reading needs four fields of four replies. Retried as
        one read is: all again on a fresh channel, or after a new login.
        """
        plan = [(*(_ROUTES.get(c) or await _route(c)), message) for c, message in calls]

        async def call(channel: _KeptChannel, metadata: list[tuple[str, str]]) -> list[Any]:
            return await _unary_calls(channel, plan, metadata)

        what = "+".join(command for command, _ in calls)
        return await self._logged_in(what, call, read=True, privileged=True)

    async def _logged_in(
        self,
        what: str,
        call: typing.Callable[[_KeptChannel, list[tuple[str, str]]], typing.Awaitable[T]],
        *,
        read: bool,
        privileged: bool,
    ) -> T:
        """``call`` (the channel, the token as metadata) on the kept channel (``_on_channel``)."""
        token = await self.auth() if privileged else None
        metadata = [("authorization", token)] if token is not None else []
        try:
            return await self._on_channel(what, lambda c: call(c, metadata), read=read)
        except APIError as e:
            cause = e.__cause__
            if not (
                privileged
                and isinstance(cause, GRPCError)
                and cause.status == Status.UNAUTHENTICATED
            ):
                raise
        # The token expired or the miner forgot it (a reboot): the call was refused,
        # not run, so log in again and send it once more (as pyasic does).
        await self._get_auth()
        token = await self.auth()
        metadata = [("authorization", token)] if token is not None else []
        return await self._on_channel(what, lambda c: call(c, metadata), read=read)

    async def _get_auth(self) -> str | None:
        """pyasic's login on the kept channel; calls that need it at the same time (a
        reading's two or four on first contact) share one."""
        login = self._login
        if login is None or login.done() or login.get_loop() is not asyncio.get_running_loop():
            login = self._login = asyncio.ensure_future(self._log_in())
            # Read its outcome even if every caller was cancelled meanwhile.
            login.add_done_callback(lambda f: f.cancelled() or f.exception())
        # A caller's deadline cancels its wait, not the login the others wait for.
        return await asyncio.shield(login)

    async def _log_in(self) -> str | None:
        """pyasic's ``_get_auth`` (``boser.py:135``: the token in the reply's initial
        metadata) on the kept channel instead of a channel of its own."""

        async def login(channel: _KeptChannel) -> str | None:
            req = LoginRequest(username=self.username, password=self.pwd)
            async with channel.request(
                "/braiins.bos.v1.AuthenticationService/Login",
                grpclib.const.Cardinality.UNARY_UNARY,
                LoginRequest,
                LoginResponse,
            ) as stream:
                await stream.send_message(req, end=True)
                await stream.recv_initial_metadata()
                meta = stream.initial_metadata
                auth = meta.get("authorization") if meta is not None else None
            if isinstance(auth, str):
                self.token = auth
                self._auth_time = datetime.datetime.now()
                return auth
            return None

        return await self._on_channel("login", login, read=True)


class _Shared(contextlib.AbstractAsyncContextManager[None]):
    """``_KeptChannelBOSerWebAPI.shared()``: one per miner, entered by every call made
    inside as well (it counts them), so a call makes no context object of its own."""

    __slots__ = ("_held", "_users")

    def __init__(self, held: _Held) -> None:
        self._held = held  # not the web API: that is collected as soon as it is let go
        self._users = 0

    async def __aenter__(self) -> None:
        self._users += 1

    async def __aexit__(self, *exc: object) -> None:
        self._users -= 1
        held = self._held
        if self._users == 0 and not held.keep and held.channel is not None:
            held.drop(held.channel)


class _Held:
    """One miner's channel and, if it keeps it, its ``KeepBudget`` slot."""

    def __init__(self, budget: KeepBudget) -> None:
        self.budget = budget
        self.channel: _KeptChannel | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.keep: bool | None = None  # decided (and a slot taken) on first use

    def drop(self, channel: _KeptChannel) -> None:
        """Close ``channel``; the next call opens a fresh one if it was the current."""
        if self.channel is channel:
            self.channel = None
        # The loop it belonged to may be closed already (a test's, a CLI run's).
        with contextlib.suppress(RuntimeError):
            channel.close()

    def release(self) -> None:
        """Close the channel and give the slot back."""
        if self.channel is not None:
            self.drop(self.channel)
        if self.keep:
            self.budget.give()
        self.keep = None


def _kept_web(miner: BOSer, budget: KeepBudget) -> _KeptChannelBOSerWebAPI:
    """The miner's web API as the kept-channel kind (pyasic's settings kept)."""
    web = miner.web
    if isinstance(web, _KeptChannelBOSerWebAPI) and web._held.budget is budget:
        return web
    if isinstance(web, _KeptChannelBOSerWebAPI):
        web.close()
    kept = _KeptChannelBOSerWebAPI(str(web.ip), budget=budget)
    kept.username, kept.pwd, kept.port = web.username, web.pwd, web.port
    miner.web = kept
    return kept


_READING_CALLS = (
    ("get_miner_stats", bos.GetMinerStatsRequest()),
    ("get_miner_details", bos.GetMinerDetailsRequest()),
)
_MODE_CALL = (("get_active_performance_mode", bos.GetPerformanceModeRequest()),)
_COOLING_CALL = (("get_cooling_state", bos.GetCoolingStateRequest()),)


class _BoserWire:
    """Thin use of pyasic's BOSer web (gRPC) API: vendor dicts, or for a reading the messages."""

    def __init__(self, miner: BOSer, budget: KeepBudget) -> None:
        self.miner = miner
        self.web = _kept_web(miner, budget)

    def shared(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Calls inside share one HTTP/2 connection (kept across readings within budget)."""
        return self.web.shared()

    def close(self) -> None:
        self.web.close()

    async def miner_details(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_miner_details())

    # The reading's four calls: pyasic's ``get_miner_stats`` etc. (``boser.py:447``,
    # ``:442``, ``:408``, ``:210``), each ``send_command(<name>,
    # message=<Request>(), privileged=True)``, returning the messages themselves.
    # The requests are empty and never changed: built once.

    async def reading_msgs(self) -> list[Any]:
        """GetMinerStats and GetMinerDetails replies, both asked at once (every reading)."""
        return await self.web.send_reads(_READING_CALLS)

    async def performance_mode_msg(self) -> Any:
        (reply,) = await self.web.send_reads(_MODE_CALL)
        return reply

    async def cooling_state_msg(self) -> Any:
        (reply,) = await self.web.send_reads(_COOLING_CALL)
        return reply

    async def constraints(self) -> dict[str, Any]:
        return dict(await self.miner.web.get_constraints())

    async def set_power_target(self, watt: int) -> dict[str, Any]:
        # SAVE_AND_APPLY persists the target, so a reboot keeps what we last set;
        # BOSer has no "apply without saving" action.
        return dict(
            await self.miner.web.set_power_target(
                watt, save_action=SaveAction(SaveAction.SAVE_AND_APPLY)
            )
        )

    async def pause(self) -> dict[str, Any]:
        # Not miner.stop_mining(): it swallows the error into False.
        return dict(await self.miner.web.pause_mining())

    async def resume(self) -> dict[str, Any]:
        return dict(await self.miner.web.resume_mining())


def _on_wire(msg: Any, *path: str) -> Any:
    """The submessage at ``path``; KeyError where one was not sent (as the dict lacks it)."""
    for name in path:
        msg = getattr(msg, name)
        if not betterproto.serialized_on_wire(msg):
            raise KeyError(name)
    return msg


def _watt(d: Mapping[str, Any], *path: str) -> float:
    """A ``Power`` message's watts at ``path``; proto3 drops a zero ``watt`` field."""
    node: Any = d
    for key in path:
        node = node[key]
    return float(node.get("watt", 0))


# The target and cooling state are read again at least this often (readings), and
# whenever power moves by more than this fraction since they were read.
SLOW_REFRESH_READS = 12
SLOW_POWER_FRAC = 0.05


class BraiinsBackend:
    """One Braiins OS miner through pyasic's BOSer class."""

    name = "braiins"
    # Braiins OS target changes can restart the tuner and ramp for minutes (user
    # reports); the simulator ramps over its settle time without a restart.
    behaviour = Behaviour(
        target_change_restarts=False, settle_s=20.0, wake_s=10.0, reads_log_in=True
    )

    def __init__(self, miner: BOSer, *, budget: KeepBudget = KEEP_BUDGET) -> None:
        self.miner = miner
        self.address = str(miner.ip)
        self._wire = _BoserWire(miner, budget)
        # The performance mode (target) and cooling state as last read, and the status
        # and power seen then; read again only when a reading gives reason to.
        self._slow: tuple[Any, Any] | None = None
        self._slow_seen: tuple[int, float] = (0, 0.0)
        self._slow_reads = 0

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """gRPC status codes carry the refusal / permission distinction here."""
        return translate_grpc(self.address, what, e)

    async def identify(self) -> MinerIdentity:
        """Identity and power-target constraints (W) from GetMinerDetails / GetConstraints."""
        async with self._wire.shared():
            details, constraints = await asyncio.gather(
                self._wire.miner_details(), self._wire.constraints()
            )
        try:
            pt = constraints["tunerConstraints"]["powerTarget"]
            lo, hi, default = _watt(pt, "min"), _watt(pt, "max"), _watt(pt, "default")
            bos_version = str(details.get("bosVersion", {}).get("current", ""))
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: identify: unusable constraints: {e!r}") from e
        if not 0 < lo <= hi:
            raise DeviceFaulted(f"{self.address}: identify: power target range {lo}-{hi} W")
        model = str(self.miner.raw_model) if self.miner.raw_model is not None else "unknown"
        plate = lookup(model)
        mac = details.get("macAddress")
        serial = details.get("serialNumber")
        return MinerIdentity(
            make=str(self.miner.make) if self.miner.make is not None else "unknown",
            model=model,
            firmware=f"Braiins OS {bos_version}".strip(),
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial else None,
            capabilities=MinerCapabilities(
                power_target=True,
                power_target_min_w=lo,
                power_target_max_w=hi,
                power_target_default_w=default,
                power_target_step_w=1.0,
                can_sleep=True,
                reports_power=True,
            ),
            nameplate_power_w=plate.power_w if plate else None,
            nameplate_hashrate_ths=plate.hashrate_ths if plate else None,
        )

    async def read(self) -> Sample:
        """Power W, hashrate TH/s, hottest temperature degC, state, target W.

        Two gRPC calls (stats, details) sent together on one channel. The performance
        mode (the target) and the cooling state (temperature) are asked for too when
        they may have moved: after any write, when the status changes, when power moves by
        more than ``SLOW_POWER_FRAC`` since they were read, and at least every
        ``SLOW_REFRESH_READS`` readings (the temperature is never older than that).
        """
        async with self._wire.shared():
            stats, details = await self._wire.reading_msgs()
            try:
                seen = (
                    int(details.status),
                    float(_on_wire(stats, "power_stats", "approximated_consumption").watt),
                )
            except (LookupError, TypeError, AttributeError, ValueError) as e:
                raise DeviceFaulted(
                    f"{self.address}: read: missing or malformed field: {e!r}"
                ) from e
            slow = self._slow
            if slow is None or self._slow_stale(seen):
                mode_msg, cooling_msg = await asyncio.gather(
                    self._wire.performance_mode_msg(), self._wire.cooling_state_msg()
                )
                slow = (mode_msg, cooling_msg)
                self._slow, self._slow_seen, self._slow_reads = slow, seen, 0
        self._slow_reads += 1
        mode, cooling = slow
        try:
            # Missing messages are malformed replies, missing scalars are zero
            # (proto3 omits defaults), as with pyasic's dicts.
            power_w = float(_on_wire(stats, "power_stats", "approximated_consumption").watt)
            real = _on_wire(stats, "miner_stats", "real_hashrate")
            hashrate_ths = float(real.last_5_s.gigahash_per_second) / 1000.0
            target = _on_wire(mode, "tuner_mode", "power_target", "power_target")
            target_w = float(target.watt) or None
            temp = float(cooling.highest_temperature.temperature.degree_c)
            temperature_c = temp if temp != 0.0 else None
            status = int(details.status)
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise DeviceFaulted(f"{self.address}: read: missing or malformed field: {e!r}") from e
        if status == MinerStatus.PAUSED:
            state = DeviceState.SLEEPING
        elif status == MinerStatus.NORMAL:
            state = DeviceState.MINING
        else:
            state = DeviceState.UNKNOWN
        return Sample(
            power_w=power_w,
            state=state,
            hashrate_ths=hashrate_ths,
            temperature_c=temperature_c,
            power_target_w=target_w,
        )

    def _slow_stale(self, seen: tuple[int, float]) -> bool:
        """Whether the mode and cooling last read may be out of date."""
        if self._slow is None or self._slow_reads >= SLOW_REFRESH_READS:
            return True
        status, power_w = self._slow_seen
        return seen[0] != status or abs(seen[1] - power_w) > SLOW_POWER_FRAC * max(power_w, 1.0)

    async def set_power_target(self, watt: int) -> float:
        """SetPowerTarget (saved and applied); returns the target the miner echoes (W)."""
        self._slow = None  # whatever happens, read the target again
        reply = await self._wire.set_power_target(watt)
        try:
            return _watt(reply, "powerTarget")
        except (LookupError, TypeError, AttributeError, ValueError):
            return float(watt)

    async def sleep(self) -> None:
        """PauseMining (idempotent: an already paused miner says so)."""
        self._slow = None
        await self._wire.pause()

    async def wake(self) -> None:
        """ResumeMining (idempotent)."""
        self._slow = None
        await self._wire.resume()

    async def close(self) -> None:
        """Close the kept gRPC channel (the next call would open a new one)."""
        self._wire.close()
