"""The kept gRPC channel: one grpclib ``Channel`` per miner across readings (Braiins OS).

The rules of ``drivers.transport.rules`` for HTTP/2: a channel is kept between
readings while ``KEPT_CONNECTIONS`` allows (else it is closed when the last call of a
``shared()`` block ends) and renewed every ``STREAMS_PER_CONNECTION`` streams; a
call that got no answer (reset, GOAWAY or close mid-call, or cancelled by a
deadline: the connection may be half-open) drops the channel, so the next call
opens a fresh one; a read that failed so on a channel that had answered before is
sent once more on a fresh channel (``once_more_if_dropped``); a failure on a fresh
channel is the miner's; a write is never sent again. grpclib reconnects a channel by
itself when its connection was lost while idle (reboot, GOAWAY, idle timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import typing
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpclib.const
from grpclib import GRPCError, Status
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError
from h2.exceptions import ProtocolError as H2ProtocolError
from pyasic.errors import APIError

from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.drivers.transport.rules import KEPT_CONNECTIONS, KeepBudget, once_more_if_dropped

T = typing.TypeVar("T")

# Streams a kept channel carries before it is closed (between readings) and a fresh one
# opened. h2 remembers every closed stream of a connection, up to 65,536 (~200 B each),
# to answer late frames on it, and grpclib offers no setting for that: a connection
# kept for days of readings (two streams each) would grow to ~13 MB. A fresh connection
# every 64 streams (~30 readings) bounds that to ~13 kB, for one TCP and HTTP/2 set-up
# per ~30 readings.
STREAMS_PER_CONNECTION = 64

# What a call that got no answer raises: the connection failed or ended under it.
NO_ANSWER = (ConnectionError, OSError, StreamTerminatedError, H2ProtocolError)


class _Kept:
    """One grpclib ``Channel`` and what is known of it.

    grpclib reconnects a channel by itself when its connection was lost while idle
    (FIN, GOAWAY). Once closed here, though, it must stay closed: a call still
    holding it would otherwise open a connection that nothing tracks or closes, so
    every stream is opened through ``open``.
    """

    __slots__ = ("answered", "channel", "closed", "streams")

    def __init__(self, host: str, port: int) -> None:
        # grpclib's default codec, ProtoCodec, decodes a reply with its type's FromString.
        self.channel = Channel(host, port)
        self.answered = False  # some call on it got an answer (it has been reused since)
        self.closed = False
        self.streams = 0  # opened on it so far

    def open(self) -> Channel:
        """The channel, for one more stream (raises once it was closed here)."""
        if self.closed:
            raise ConnectionAbortedError("channel closed by the driver")
        self.streams += 1
        return self.channel

    def close(self) -> None:
        self.closed = True
        self.channel.close()


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


class _Shared(contextlib.AbstractAsyncContextManager[None]):
    """``KeptChannel.shared()``: one per miner, entered by every call made inside as
    well (it counts them), so a call makes no context object of its own."""

    __slots__ = ("_held", "_users")

    def __init__(self, held: _Held) -> None:
        self._held = held  # not the channel's owner: that is collected once let go
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


class UnaryRoute(Protocol):
    """One unary gRPC method: its path, its request type, the type its reply decodes as."""

    @property
    def path(self) -> str: ...

    @property
    def request(self) -> Any: ...

    @property
    def decoded_as(self) -> Any: ...


class KeptChannel:
    """One miner's gRPC channel, kept across readings (grpclib, public API only)."""

    def __init__(self, host: str, port: int, *, budget: KeepBudget = KEPT_CONNECTIONS) -> None:
        self.host, self.port = host, port
        self._held = _Held(budget)
        # A miner no longer driven (one that moved) is collected with its channel
        # open: close it here rather than in grpclib's ``Channel.__del__``, which
        # logs an error for it.
        weakref.finalize(self, self._held.release)
        self._shared = _Shared(self._held)

    @property
    def keeps_channel(self) -> bool:
        """Whether this miner's channel outlives a reading (the budget allowed it)."""
        return bool(self._held.keep)

    @property
    def current(self) -> _Kept | None:
        """The channel open now, if any (for tests and diagnostics)."""
        return self._held.kept

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

    async def call(self, call: Callable[[_Kept], Awaitable[T]], *, write: bool) -> T:
        """``call`` on the current channel; a read sent once more on a fresh one if the
        connection failed under a channel that had answered before. Raises what
        ``call`` raised (a ``GRPCError`` is an answer: the channel stays)."""
        reused = False

        async def attempt() -> T:
            nonlocal reused
            kept = self._current()
            reused = kept.answered
            try:
                result = await own_task(call(kept))
            except GRPCError:
                kept.answered = True  # an answer: the connection works
                raise
            except BaseException:
                # No answer, or cancelled (most often by the driver's deadline): the
                # connection may be half-open (a miner that lost power sends no FIN).
                self._held.drop(kept)
                raise
            finally:
                if kept.closed:
                    # Dropped under this call (by another call of this miner's) while it
                    # waited to connect: grpclib connected the closed channel again.
                    kept.channel.close()
            kept.answered = True
            return result

        async with self._shared:
            return await once_more_if_dropped(
                attempt, write=write, dropped=lambda e: reused and isinstance(e, NO_ANSWER)
            )


async def own_task(call: Awaitable[T]) -> T:
    """Await ``call`` in a task of its own; the caller's cancellation reaches it.

    grpclib ends a call whose connection went away (a GOAWAY, or a close by another
    call of the same miner) by cancelling the task that waits on it and raising its
    ``StreamTerminatedError`` in the ``CancelledError``'s place, without taking the
    cancel back (``Task.uncancel``). Left on the caller's task, that cancel turns the
    caller's next deadline (``asyncio.timeout``) into a ``CancelledError`` that escapes
    it, or into no error at all: a reading that ended so was never answered, and its
    miner never read again (30 miners of 10,000 in one run). In a task of its own the
    cancel ends with the call. A cancel of the caller's own, though, must still end it
    as one: if the call ended some other way after it (grpclib made it its error, or
    the reply came first), it is raised here as the ``CancelledError`` it was.
    """
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()
    try:
        result: T = await asyncio.ensure_future(call)
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        if task.cancelling() > before:
            raise asyncio.CancelledError() from e
        raise
    if task.cancelling() > before:
        raise asyncio.CancelledError()
    return result


async def unary_calls(
    kept: _Kept, plan: Sequence[UnaryRoute], metadata: list[tuple[str, str]]
) -> list[Any]:
    """Unary calls with empty requests on ``kept``'s channel, each made as
    betterproto's generated stub makes one (grpclib's ``Channel.request`` stream),
    but every request sent before any reply is read, from this one task: a
    reading's calls cost no task each. The replies (as each route's ``decoded_as``)
    in ``plan``'s order; the first error raised ends them all (the other streams
    are reset), as ``gather`` of single calls would.
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
