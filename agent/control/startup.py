"""Start-up that does not wait on stragglers (issue 20 item 5).

The agent may control its site as soon as every device it knows of is in the
fleet: a device not yet read counts at its worst case (domain/worst_case: never
read is unknown, and unknown is its nameplate). So neither identification nor
the first sweep waits out a device that does not answer: each waits until
everything has finished, or until nothing has finished for a quiet spell after
something did (what is left is hanging, each under its own timeout). A miner
found by a scan range is the exception: until identified it is in no snapshot,
so identification waits for every scanned address (each bounded by
``identify_deadline_s``); only listed miners, already counted, are left to
connect on a later read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

# The longest quiet spell a phase waits on, after which what is left is taken as hanging.
QUIET_MAX_S = 2.0


def straggler_quiet_s(timeout_s: float) -> float:
    """How long (s) a start-up phase waits with nothing finishing before it goes on
    without the devices left: half a read's timeout, at most ``QUIET_MAX_S``."""
    return min(QUIET_MAX_S, timeout_s / 2)


async def until_quiet(
    progress: Callable[[], int],
    finished: Callable[[], bool],
    quiet_s: float,
    *,
    ready: Callable[[], bool] = lambda: True,
    poll_s: float = 0.1,
) -> bool:
    """Wait until ``finished()``, or until ``ready()`` and ``progress()`` has not grown
    for ``quiet_s`` since it last did (once it has: a phase where nothing has finished
    yet is waited out). True if it finished."""
    loop = asyncio.get_running_loop()
    last, since = progress(), loop.time()
    while not finished():
        await asyncio.sleep(poll_s)
        now, count = loop.time(), progress()
        if count != last:
            last, since = count, now
        elif last > 0 and now - since >= quiet_s and ready():
            return finished()
    return True


async def settle_tasks(
    tasks: Sequence[asyncio.Future[Any]],
    quiet_s: float | None,
    must: Sequence[asyncio.Future[Any]] = (),
) -> None:
    """Wait for ``tasks``; with ``quiet_s``, only until every one of ``must`` is done and
    none has finished for ``quiet_s``: the rest are cancelled (and awaited)."""
    if not tasks:
        return
    if quiet_s is None:
        await asyncio.wait(tasks)
        return
    done = 0

    def one_done(_: object) -> None:
        nonlocal done
        done += 1

    for t in tasks:
        t.add_done_callback(one_done)
    await until_quiet(
        lambda: done,
        lambda: done == len(tasks),
        quiet_s,
        ready=lambda: all(t.done() for t in must),
    )
    left = [t for t in tasks if not t.done()]
    for t in left:
        t.cancel()
    await asyncio.gather(*left, return_exceptions=True)
