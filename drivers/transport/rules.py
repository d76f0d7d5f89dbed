"""The rules every kept connection follows: the budget, the one retry of a read, no resent write."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")


@overload
async def all_of(a: Awaitable[A], b: Awaitable[B], /) -> tuple[A, B]: ...
@overload
async def all_of(a: Awaitable[A], b: Awaitable[B], c: Awaitable[C], /) -> tuple[A, B, C]: ...
async def all_of(*aws: Awaitable[Any]) -> tuple[Any, ...]:
    """The requests of one exchange sent together, as ``asyncio.gather``, but each to
    its end: the first error is raised once all have ended. With gather, the others
    ran on unawaited after one failed, and an error one of them raised then was
    logged as never retrieved."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return tuple(results)


class KeepBudget:
    """How many miners may keep a connection open: half the process's descriptors.

    A kept connection holds a descriptor for as long as the miner is driven. Past this
    many, a miner's connection lives for one reading or call (as pyasic's does), so the
    other half stays for the connections other firmwares open per request (bounded
    by the telemetry concurrency), the API, the database and SSH. One budget serves
    every firmware that keeps connections (Braiins OS channels, VNish web
    connections), so together they never take more than that half. ``limit``
    overrides the soft ``RLIMIT_NOFILE``, read again at each ``take``.
    """

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self.held = 0

    def limit(self) -> int:
        """Miners (connections) that may be kept now."""
        if self._limit is not None:
            return self._limit
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return 1 << 30 if soft == resource.RLIM_INFINITY else soft // 2

    def take(self) -> bool:
        """Whether one more miner may keep its connection (if so it is counted)."""
        if self.held >= self.limit():
            return False
        self.held += 1
        return True

    def give(self) -> None:
        """A miner that kept its connection is no longer driven."""
        self.held = max(0, self.held - 1)


KEPT_CONNECTIONS = KeepBudget()
"""The one budget of kept connections in this process, shared by every firmware."""


async def once_more_if_dropped(
    send: Callable[[], Awaitable[T]],
    *,
    write: bool,
    dropped: Callable[[BaseException], bool],
) -> T:
    """``send()``, and for a read once more if it failed as ``dropped`` says (a kept
    connection that went away under it); a write is sent once, whatever happens.

    ``send`` takes the connection to use each time it is called (the one that
    failed is closed by then, so the second goes out on a fresh one). A read asks
    nothing of the miner; a write (a target, a pause) sent again after an unknown
    outcome could be carried out twice, and these APIs have no idempotency key:
    ``AsicDriver`` reads the miner before it writes again.
    """
    if write:
        return await send()
    try:
        return await send()
    except Exception as e:
        if not dropped(e):
            raise
    return await send()
