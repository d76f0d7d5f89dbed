"""What every firmware adapter provides, and the error mapping they share.

An adapter (one module per firmware) is the thin vendor level of STYLE.md: it
calls pyasic, names quantities, converts units and says what the device can
do. ``drivers.asic.AsicDriver`` is the level above: deadlines, clamping,
write-only-on-change and the re-read-before-retry rule, the same for all.
"""

from __future__ import annotations

import itertools
import json
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx
from pyasic.errors import APIError

from domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from domain.types import DeviceState, MinerCapabilities, MinerIdentity


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading as an adapter returns it (SI units), before the driver stamps it."""

    power_w: float | None
    state: DeviceState
    hashrate_ths: float | None = None
    temperature_c: float | None = None
    power_target_w: float | None = None
    power_estimated: bool = False
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a firmware reacts to control, for the agent's settle accounting (s)."""

    # A power-target change restarts the mining service (hashrate drops to zero
    # for ``restart_s`` before ramping to the new level).
    target_change_restarts: bool = False
    restart_s: float = 0.0
    settle_s: float = 20.0
    wake_s: float = 10.0
    # Every reading logs in with the configured credentials (Braiins OS gRPC, VNish
    # web), so a good reading proves they are accepted.
    reads_log_in: bool = False


class Backend(Protocol):
    """One firmware's adapter for one miner."""

    name: str
    behaviour: Behaviour

    async def identify(self) -> MinerIdentity: ...

    async def read(self) -> Sample: ...

    async def set_power_target(self, watt: int) -> float: ...

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError: ...


def translate_rpc(address: str, what: str, e: BaseException, *, control: bool) -> DeviceError:
    """Map an error of pyasic's socket / HTTP clients to one of ours (not raised here).

    pyasic's RPC clients raise ``APIError`` both for an answer that is not JSON
    ("Decode Error ...") and for a well-formed error status (``STATUS: E``). The
    first is a broken device; the second is the firmware declining: a refusal
    for a control call, a fault for a read (a read that is declined is useless).
    """
    cause: BaseException = e.__cause__ if isinstance(e, APIError) and e.__cause__ else e
    msg = f"{address}: {what}: {type(cause).__name__}: {cause}"
    if isinstance(cause, TimeoutError):
        return DeviceUnreachable(f"{address}: {what}: no answer in time")
    if isinstance(cause, ConnectionRefusedError):
        return DeviceUnreachable(msg)
    if isinstance(cause, ConnectionError):
        return DeviceFaulted(msg)
    if isinstance(cause, OSError):
        return DeviceUnreachable(msg)
    if isinstance(cause, APIError):
        text = str(cause)
        if "Decode Error" in text or "decode error" in text:
            return DeviceFaulted(msg)
        if "No data" in text or "Connection refused" in text:
            return DeviceUnreachable(msg)
        low = text.lower()
        # Whatsminer: wrong admin password ("check token err") or write API
        # disabled ("can't access write cmd"); LuxOS / VNish: bad session.
        if any(w in low for w in ("token", "write cmd", "unauthor", "session", "password")):
            return DevicePermissionError(msg)
        return DeviceRefused(msg) if control else DeviceFaulted(msg)
    if isinstance(cause, (LookupError, TypeError, ValueError, AttributeError)):
        return DeviceFaulted(f"{address}: {what}: missing or malformed field: {cause!r}")
    return DeviceFaulted(msg)


def no_answer(address: str, what: str) -> DeviceUnreachable:
    """pyasic's socket client returns ``{}`` when the connection is refused."""
    return DeviceUnreachable(f"{address}: {what}: no answer (connection refused or empty reply)")


def _http_cause(e: BaseException) -> BaseException | None:
    """The httpx, aiohttp or JSON error behind ``e``, following ``__cause__`` and
    ``__context__``."""
    cur: BaseException | None = e
    for _ in range(8):
        if cur is None:
            return None
        if isinstance(cur, httpx.HTTPError | aiohttp.ClientError | json.JSONDecodeError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def translate_http(address: str, what: str, e: BaseException, *, control: bool) -> DeviceError:
    """Map an error of pyasic's raising web clients to one of ours (not raised).

    Those clients (``VNishWebAPI.send_command`` among them) re-raise httpx's
    errors as ``APIError`` from inside the ``except`` block without ``from``:
    the transport error survives only as the implicit ``__context__``. The
    VNish adapter's own client raises aiohttp's ``from``. A timeout or a
    connection never made is unreachable; anything else the
    transport or the JSON parser rejected (a reply that is not HTTP, a
    connection dropped mid-answer, a body that is not JSON) is faulted. The
    rest (an ``APIError`` of its own, a missing field) goes to ``translate_rpc``.
    """
    cause = None if isinstance(e, TimeoutError) else _http_cause(e)
    if cause is None:
        return translate_rpc(address, what, e, control=control)
    msg = f"{address}: {what}: {type(cause).__name__}: {cause}"
    if isinstance(cause, httpx.TimeoutException | TimeoutError):
        return DeviceUnreachable(f"{address}: {what}: no answer in time")
    if isinstance(cause, httpx.ConnectError | aiohttp.ClientConnectorError):
        return DeviceUnreachable(msg)
    return DeviceFaulted(msg)


def level_capabilities(watts: Sequence[float], default_w: float) -> MinerCapabilities:
    """What firmware with discrete power levels (LuxOS profiles, VNish presets) lets us
    set, ``watts`` lowest first: a target from the lowest level to the highest, stepped
    by the smallest gap so that every stepped target is at or above a real level."""
    gaps = [b - a for a, b in itertools.pairwise(watts) if b > a]
    return MinerCapabilities(
        power_target=True,
        power_target_min_w=watts[0],
        power_target_max_w=watts[-1],
        power_target_default_w=default_w,
        power_target_step_w=min(gaps) if gaps else 1.0,
        can_sleep=True,
        reports_power=True,
    )


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
