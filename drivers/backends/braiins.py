"""Braiins OS (BOSer): gRPC on port 50051, pyasic's generated BOSer stubs on a kept channel.

Watt power target (``SetPowerTarget``, range from ``GetConstraints``), pause and
resume. One grpclib ``Channel`` per miner is kept open across readings (within
``KEEP_BUDGET``), as a gRPC client of BOSer would (``_BoserClient``); identification
and control go through pyasic's ``BOSMinerGRPCStub`` on it, and a reading's replies
are decoded by ``braiins_wire`` (only the fields a reading needs). Every library here
is used through its public API only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grpclib.const
from grpclib import GRPCError, Status
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError
from h2.exceptions import ProtocolError as H2ProtocolError
from pyasic.errors import APIError
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.web.braiins_os.boser import BOSMinerGRPCStub
from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos
from pyasic.web.braiins_os.proto.braiins.bos.v1 import LoginRequest, MinerStatus, SaveAction

from domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from domain.types import DeviceState, MinerCapabilities, MinerIdentity
from drivers.backends import braiins_wire as wire
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


# -- the login: where the credentials come from, and the one call that uses them -------


def login_credentials(miner: BOSer) -> tuple[str, str]:
    """The user name and password the miner is logged in with (pyasic's, from its settings)."""
    return str(miner.web.username), str(miner.web.pwd)


async def log_in(channel: Channel, username: str, password: str) -> str | None:
    """BOSer's Login on ``channel``: the token, from the reply's initial metadata (as
    pyasic's own login reads it); None if the miner sent none."""
    async with channel.request(
        wire.LOGIN.path,
        grpclib.const.Cardinality.UNARY_UNARY,
        wire.LOGIN.request,
        wire.LOGIN.decoded_as,
    ) as stream:
        await stream.send_message(LoginRequest(username=username, password=password), end=True)
        await stream.recv_initial_metadata()
        meta = stream.initial_metadata
        token = meta.get("authorization") if meta is not None else None
    return token if isinstance(token, str) else None


# pyasic's token lifetime (``BOSerWebAPI.auth``: 3,540 s, a minute short of BOSer's hour).
TOKEN_RENEW_S = 3540.0


# -- one HTTP/2 channel per miner, kept open across readings ---------------------------

# Streams a kept channel carries before it is closed (between readings) and a fresh one
# opened. h2 remembers every closed stream of a connection, up to 65,536 (~200 B each),
# to answer late frames on it, and grpclib offers no setting for that: a connection
# kept for days of readings (two streams each) would grow to ~13 MB. A fresh connection
# every 64 streams (~30 readings) bounds that to ~13 kB, for one TCP and HTTP/2 set-up
# per ~30 readings.
STREAMS_PER_CONNECTION = 64


class _Kept:
    """One grpclib ``Channel`` and what the adapter knows of it.

    grpclib reconnects a channel by itself when its connection was lost while idle
    (FIN, GOAWAY). Once the adapter closes one, though, it must stay closed: a call
    still holding it would otherwise open a connection that nothing tracks or closes,
    so every stream is opened through ``open``.
    """

    __slots__ = ("answered", "channel", "closed", "streams")

    def __init__(self, host: str, port: int) -> None:
        # grpclib's default codec, ProtoCodec, decodes a reply with its type's FromString.
        self.channel = Channel(host, port)
        self.answered = False  # some call on it got an answer (it has been reused since)
        self.closed = False
        self.streams = 0  # opened on it so far

    def open(self) -> Channel:
        """The channel, for one more stream (raises once the adapter closed it)."""
        if self.closed:
            raise ConnectionAbortedError("channel closed by the adapter")
        self.streams += 1
        return self.channel

    def close(self) -> None:
        self.closed = True
        self.channel.close()


class _Shared(contextlib.AbstractAsyncContextManager[None]):
    """``_BoserClient.shared()``: one per miner, entered by every call made inside as
    well (it counts them), so a call makes no context object of its own."""

    __slots__ = ("_held", "_users")

    def __init__(self, held: _Held) -> None:
        self._held = held  # not the client: that is collected as soon as it is let go
        self._users = 0

    async def __aenter__(self) -> None:
        self._users += 1

    async def __aexit__(self, *exc: object) -> None:
        self._users -= 1
        held = self._held
        kept = held.kept
        if (
            self._users == 0
            and kept is not None
            and (not held.keep or kept.streams >= STREAMS_PER_CONNECTION)
        ):
            held.drop(kept)


class _Held:
    """One miner's channel and, if it keeps it, its ``KeepBudget`` slot."""

    __slots__ = ("budget", "keep", "kept", "loop")

    def __init__(self, budget: KeepBudget) -> None:
        self.budget = budget
        self.kept: _Kept | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.keep: bool | None = None  # decided (and a slot taken) on first use

    def drop(self, kept: _Kept) -> None:
        """Close ``kept``; the next call opens a fresh one if it was the current."""
        if self.kept is kept:
            self.kept = None
        # The loop it belonged to may be closed already (a test's, a CLI run's).
        with contextlib.suppress(RuntimeError):
            kept.close()

    def release(self) -> None:
        """Close the channel and give the slot back."""
        if self.kept is not None:
            self.drop(self.kept)
        if self.keep:
            self.budget.give()
        self.keep = None


# One budget for every firmware's kept connections (see drivers.backends.base).
KEEP_BUDGET = KEPT_CONNECTIONS

# BOSer's read calls are named ``Get...`` (pyasic: ``get_...``); anything else changes
# the miner and is never sent again after an unknown outcome.
_READ_PREFIX = "get_"
_READ_METHOD_PREFIX = "Get"  # the same, as a gRPC method's name

# What a call that got no answer raises: the connection failed or ended under it.
_NO_ANSWER = (ConnectionError, OSError, StreamTerminatedError, H2ProtocolError)

T = typing.TypeVar("T")


async def _unary_calls(
    kept: _Kept, plan: Sequence[wire.Route], metadata: list[tuple[str, str]]
) -> list[Any]:
    """Unary calls with empty requests on ``kept``'s channel, each made as betterproto's
    generated stub makes one (grpclib's ``Channel.request`` stream), but every request
    sent before any reply is read, from this one task: a reading's two calls cost no
    task each (as the floor's bare client sends its two). The replies (as each route's
    ``decoded_as``) in ``plan``'s order; the first error raised ends them all (the other
    streams are reset), as ``gather`` of single calls would.
    """
    pending: list[Any] = []  # streams entered and not yet exited
    failing: Any = None  # the stream whose step raised, ended as ``async with`` ends it
    try:
        for route in plan:
            failing = kept.open().request(
                route.path,
                grpclib.const.Cardinality.UNARY_UNARY,
                route.request,
                route.decoded_as,
                metadata=metadata,
            )
            await failing.__aenter__()
            pending.append(failing)
            await failing.send_message(route.request(), end=True)
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


class _BoserClient:
    """BOSer's gRPC API for one miner over one grpclib channel, kept across readings.

    pyasic's ``BOSerWebAPI`` opens a new ``Channel`` for every call (pyasic 0.79.0,
    ``boser.py:112``, and again for the login at ``:135``): a TCP connect, the HTTP/2
    preface and a SETTINGS exchange per call, on the miner as much as here (a
    1,000-miner sweep: 1.4 ms of ours and 1.9 ms of the miner's CPU per reading), and
    takes no channel. So this calls pyasic's generated ``BOSMinerGRPCStub`` on a
    channel of its own, with pyasic's conduct (its token lifetime, one new login and
    one more try on UNAUTHENTICATED, ``APIError`` ``from`` the cause), as a gRPC
    client of BOSer (tonic, which keeps HTTP/2 connections) would:

    - a connection the miner closed while idle (reboot, GOAWAY, idle timeout) is
      reopened by grpclib on the next call;
    - a call that got no answer (reset, GOAWAY or close mid-call, or cancelled by a
      deadline: the connection may be half-open) drops the channel, so the next call
      opens a fresh one;
    - a read (``get_*``) that failed so on a channel that had answered before is sent
      once more on a fresh channel; a failure on a fresh channel is the miner's;
    - a control call is never sent again here: its outcome is unknown, and the driver
      re-reads state before any retry (``AsicDriver``'s uncertain flag);
    - a channel is closed between readings once it carried ``STREAMS_PER_CONNECTION``
      streams (the next call opens a fresh one).

    Beyond ``KEEP_BUDGET`` the channel is closed when the last call of a ``shared()``
    block ends.
    """

    def __init__(
        self, host: str, port: int, username: str, password: str, *, budget: KeepBudget
    ) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self._held = _Held(budget)
        # A miner the agent stops driving (one that moved) is collected with its
        # channel open: close it here rather than in grpclib's ``Channel.__del__``,
        # which logs an error for it.
        weakref.finalize(self, self._held.release)
        self._shared = _Shared(self._held)
        self._token: str | None = None
        self._token_at_s = 0.0  # time.monotonic() of the login that gave it
        self._login: asyncio.Future[str | None] | None = None

    @property
    def keeps_channel(self) -> bool:
        """Whether this miner's channel outlives a reading (``KEEP_BUDGET`` allowed it)."""
        return bool(self._held.keep)

    def _current(self) -> _Kept:
        """The open channel, or a new one (a channel belongs to the loop it was made in)."""
        held = self._held
        loop = asyncio.get_running_loop()
        kept = held.kept
        if kept is not None and held.loop is not loop:
            held.drop(kept)
            kept = None
        if kept is None:
            if held.keep is None:
                held.keep = held.budget.take()
            kept = held.kept = _Kept(self.host, self.port)
            held.loop = loop
        return kept

    def close(self) -> None:
        """Close the channel and give the budget its slot back (a later call starts over)."""
        self._held.release()

    def shared(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Calls made until exit (also from tasks started inside) share one channel;
        past the budget it is closed when the last of them ends."""
        return self._shared

    async def _on_channel(
        self, what: str, call: typing.Callable[[_Kept], typing.Awaitable[T]], *, read: bool
    ) -> T:
        """``call`` on the current channel; a read sent once more on a fresh one if the
        connection failed under a channel that had answered before."""
        async with self.shared():
            for attempt in (1, 2):
                kept = self._current()
                reused = kept.answered
                try:
                    result = await call(kept)
                except GRPCError as e:
                    kept.answered = True  # an answer: the connection works
                    raise APIError(f"gRPC command failed - {what}") from e
                except _NO_ANSWER as e:
                    self._held.drop(kept)
                    if read and reused and attempt == 1:
                        continue
                    raise APIError(f"gRPC command failed - {what}") from e
                except BaseException:
                    # Cancelled, most often by the driver's deadline: the connection
                    # may be half-open (a miner that lost power sends no FIN).
                    self._held.drop(kept)
                    raise
                kept.answered = True
                return result
        raise AssertionError("unreachable")  # the loop returns or raises

    async def call(self, command: str, message: Any) -> Any:
        """pyasic's stub method ``command`` ("get_constraints") with ``message``, logged in,
        on the kept channel; the reply message (pyasic's type)."""

        async def call(kept: _Kept, metadata: list[tuple[str, str]]) -> Any:
            method = getattr(BOSMinerGRPCStub(kept.open()), command)
            return await method(message, metadata=metadata)

        return await self._logged_in(command, call, read=command.startswith(_READ_PREFIX))

    async def send_reads(self, plan: Sequence[wire.Route]) -> list[Any]:
        """Reads (empty requests) sent together on the kept channel (``_unary_calls``),
        their replies decoded by ``braiins_wire`` (the fields a reading needs). Retried as
        one read is: all again on a fresh channel, or after a new login."""

        names = [route.path.rsplit("/", 1)[-1] for route in plan]
        for name in names:
            if not name.startswith(_READ_METHOD_PREFIX):
                raise ValueError(f"{name}: not a read (sent together, retried as reads)")

        async def call(kept: _Kept, metadata: list[tuple[str, str]]) -> list[Any]:
            return await _unary_calls(kept, plan, metadata)

        what = "+".join(names)
        return await self._logged_in(what, call, read=True)

    async def _logged_in(
        self,
        what: str,
        call: typing.Callable[[_Kept, list[tuple[str, str]]], typing.Awaitable[T]],
        *,
        read: bool,
    ) -> T:
        """``call`` (the channel, the token as metadata) on the kept channel (``_on_channel``)."""
        token = self._token
        if token is None or time.monotonic() - self._token_at_s >= TOKEN_RENEW_S:
            token = await self._get_auth()
        metadata = [("authorization", token)] if token is not None else []
        try:
            return await self._on_channel(what, lambda c: call(c, metadata), read=read)
        except APIError as e:
            cause = e.__cause__
            if not (isinstance(cause, GRPCError) and cause.status == Status.UNAUTHENTICATED):
                raise
        # The token expired or the miner forgot it (a reboot): the call was refused,
        # not run, so log in again and send it once more (as pyasic does).
        token = await self._get_auth()
        metadata = [("authorization", token)] if token is not None else []
        return await self._on_channel(what, lambda c: call(c, metadata), read=read)

    async def _get_auth(self) -> str | None:
        """A login on the kept channel; calls that need it at the same time (a reading's
        two or four on first contact) share one."""
        login = self._login
        if login is None or login.done() or login.get_loop() is not asyncio.get_running_loop():
            login = self._login = asyncio.ensure_future(self._log_in())
            # Read its outcome even if every caller was cancelled meanwhile.
            login.add_done_callback(lambda f: f.cancelled() or f.exception())
        # A caller's deadline cancels its wait, not the login the others wait for.
        return await asyncio.shield(login)

    async def _log_in(self) -> str | None:
        async def login(kept: _Kept) -> str | None:
            token = await log_in(kept.open(), self.username, self.password)
            if token is not None:
                self._token, self._token_at_s = token, time.monotonic()
            return token

        return await self._on_channel("login", login, read=True)


_READING = (wire.MINER_STATS, wire.MINER_DETAILS)
_MODE = (wire.PERFORMANCE_MODE,)
_COOLING = (wire.COOLING_STATE,)


class _BoserWire:
    """Thin use of BOSer's gRPC API: vendor dicts, or for a reading the decoded replies."""

    def __init__(self, miner: BOSer, budget: KeepBudget) -> None:
        username, password = login_credentials(miner)
        self.client = _BoserClient(
            str(miner.ip), int(miner.web.port), username, password, budget=budget
        )

    def shared(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Calls inside share one HTTP/2 connection (kept across readings within budget)."""
        return self.client.shared()

    def close(self) -> None:
        self.client.close()

    async def _dict(self, command: str, message: Any) -> dict[str, Any]:
        """pyasic's ``BOSerWebAPI.<command>`` reply: the message as ``to_pydict()``."""
        return dict((await self.client.call(command, message)).to_pydict())

    async def miner_details(self) -> dict[str, Any]:
        return await self._dict("get_miner_details", bos.GetMinerDetailsRequest())

    async def reading_msgs(self) -> list[Any]:
        """GetMinerStats and GetMinerDetails replies, both asked at once (every reading)."""
        return await self.client.send_reads(_READING)

    async def performance_mode_msg(self) -> wire.PerformanceMode:
        (reply,) = await self.client.send_reads(_MODE)
        return typing.cast(wire.PerformanceMode, reply)

    async def cooling_state_msg(self) -> wire.CoolingState:
        (reply,) = await self.client.send_reads(_COOLING)
        return typing.cast(wire.CoolingState, reply)

    async def constraints(self) -> dict[str, Any]:
        return await self._dict("get_constraints", bos.GetConstraintsRequest())

    async def set_power_target(self, watt: int) -> dict[str, Any]:
        # As pyasic's ``set_power_target``. SAVE_AND_APPLY persists the target, so a
        # reboot keeps what we last set; BOSer has no "apply without saving" action.
        request = bos.SetPowerTargetRequest(
            power_target=bos.Power(watt=watt),
            save_action=SaveAction(SaveAction.SAVE_AND_APPLY),
        )
        return await self._dict("set_power_target", request)

    async def pause(self) -> dict[str, Any]:
        # Not miner.stop_mining(): it swallows the error into False.
        return await self._dict("pause_mining", bos.PauseMiningRequest())

    async def resume(self) -> dict[str, Any]:
        return await self._dict("resume_mining", bos.ResumeMiningRequest())


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
        self._slow: tuple[wire.PerformanceMode, wire.CoolingState] | None = None
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
            if stats.power_w is None:
                raise self._missing("power_stats.approximated_consumption")
            seen = (details.status, float(stats.power_w))
            slow = self._slow
            if slow is None or self._slow_stale(seen):
                mode_msg, cooling_msg = await asyncio.gather(
                    self._wire.performance_mode_msg(), self._wire.cooling_state_msg()
                )
                slow = (mode_msg, cooling_msg)
                self._slow, self._slow_seen, self._slow_reads = slow, seen, 0
        self._slow_reads += 1
        mode, cooling = slow
        # Missing messages are malformed replies, missing scalars are zero (proto3
        # omits defaults), as with pyasic's messages.
        if stats.hashrate_ghs is None:
            raise self._missing("miner_stats.real_hashrate")
        if mode.target_w is None:
            raise self._missing("tuner_mode.power_target.power_target")
        power_w = float(stats.power_w)
        hashrate_ths = stats.hashrate_ghs / 1000.0
        target_w = float(mode.target_w) or None
        temperature_c = cooling.degree_c if cooling.degree_c != 0.0 else None
        status = details.status
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

    def _missing(self, path: str) -> DeviceFaulted:
        return DeviceFaulted(f"{self.address}: read: missing or malformed field: {path} not sent")

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
