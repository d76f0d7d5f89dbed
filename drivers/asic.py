"""ASIC miner driver: one interface over every supported firmware, through pyasic.

Two levels (STYLE.md): the adapters in ``drivers/backends/`` are the thin vendor
use (one module per firmware: Braiins OS, Whatsminer, LuxOS, ...), each naming
quantities in SI units and saying what the device can do; ``AsicDriver`` is the
same for all of them: a deadline on every call, clamping to the device's range,
writing only what differs, never retrying a write whose outcome is unknown
without re-reading state first (these APIs have no idempotency key), and every
vendor error turned into one of ``domain.errors``, raised ``from`` the original.

Only this module and ``drivers/backends/`` import pyasic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import pyasic

from siteagent.domain.credentials import Login
from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.domain.types import DeviceIdentity, DeviceReading, DeviceState
from siteagent.drivers.backends import known_backend, select_backend
from siteagent.drivers.backends.base import Backend, translate_rpc
from siteagent.drivers.backends.nameplate import NAMEPLATE

__all__ = ["NAMEPLATE", "AsicDriver", "discover"]

log = logging.getLogger(__name__)

# Ports identification probes, to tell "nothing answers" from "answers nonsense".
_PROBE_PORTS = (80, 4028, 50051)

T = TypeVar("T")


class AsicDriver:
    """One miner of any supported firmware: identify, read, set power target, sleep, wake."""

    def __init__(
        self,
        device_id: str,
        address: str,
        backend: Backend,
        *,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        login: Login | None = None,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.identity: DeviceIdentity | None = None
        self.timeout_s = timeout_s
        self.backend = backend
        self._clock = clock
        self._last_target_w: float | None = None
        self._last_state: DeviceState | None = None
        # Set when a write's outcome is unknown (no answer in time): the next
        # write re-reads state first instead of blindly repeating it.
        self._uncertain = False
        # The credentials the adapter was given (None: pyasic's defaults), to name
        # where to fix them when the miner refuses them.
        self.login = login or Login()
        # Whether the miner took our credentials: False once it refused them, True
        # once a call that needs them succeeded (None: nothing has told yet).
        self.login_ok: bool | None = None

    def settle_s(self, kind: str) -> float:
        """How long (s) this firmware takes to show a change of ``kind`` ("wake", "sleep",
        "lower", "raise"): its wake time, or its settle time plus a restart where a
        target change restarts mining."""
        b = self.backend.behaviour
        if kind == "wake":
            return b.wake_s
        if kind in ("lower", "raise") and b.target_change_restarts:
            return b.settle_s + b.restart_s
        return b.settle_s

    @property
    def backend_name(self) -> str:
        """Which firmware adapter drives this miner ("braiins", "whatsminer", ...)."""
        return self.backend.name

    @classmethod
    async def connect(
        cls,
        device_id: str,
        address: str,
        *,
        timeout_s: float = 5.0,
        logins: Mapping[str, Login] | None = None,
    ) -> AsicDriver:
        """Identify the miner at ``address`` and read its capabilities (timeout in s);
        ``logins`` by firmware replace pyasic's default credentials."""
        backend = await _get_backend(address, timeout_s, logins)
        login = (logins or {}).get(backend.name)
        drv = cls(device_id, address, backend, timeout_s=timeout_s, login=login)
        await drv.identify()
        return drv

    @classmethod
    async def from_inventory(
        cls,
        device_id: str,
        address: str,
        *,
        backend: str,
        model: str | None,
        timeout_s: float = 5.0,
        logins: Mapping[str, Login] | None = None,
        identity: DeviceIdentity | None = None,
    ) -> AsicDriver:
        """Connect to a miner the inventory already knows (firmware, model): no probes.
        With ``identity`` (what this miner said when it was just identified, e.g. by the
        agent before handing the miner to a worker process) it is not asked again."""
        b = known_backend(address, backend, model, logins)
        if b is None:
            raise DeviceFaulted(f"{address}: unknown backend {backend!r}")
        login = (logins or {}).get(backend)
        drv = cls(device_id, address, b, timeout_s=timeout_s, login=login)
        if identity is None or b.behaviour.identify_keeps_state:
            await drv.identify()
        else:
            drv.identity = identity
        return drv

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, control: bool) -> T:
        """Run one adapter call under the timeout, translating its errors."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
        except DevicePermissionError as e:
            raise self._refused_login(e) from e
        except DeviceError as e:
            if control and isinstance(e, DeviceUnreachable):
                self._uncertain = True
            raise
        except Exception as e:
            err = self.backend.translate(what, e, control=control)
            if isinstance(err, DevicePermissionError):
                raise self._refused_login(err) from e
            if control and isinstance(err, DeviceUnreachable | DeviceFaulted):
                self._uncertain = True
            raise err from e
        if control or self.backend.behaviour.reads_log_in:
            self.login_ok = True
        return result

    def _refused_login(self, e: DevicePermissionError) -> DevicePermissionError:
        """The miner refused our credentials: one error that says where to fix them."""
        self.login_ok = False
        detail = str(e)
        pw = self.login.password
        if pw is not None and pw.reveal():
            # Whatever the vendor library put in its message, never the password.
            detail = detail.replace(pw.reveal(), "***")
        return DevicePermissionError(
            f"authentication failed for {self.backend.name} at {self.address}: check the "
            f"password for this miner in {self.login.source} ({detail})"
        )

    async def identify(self) -> DeviceIdentity:
        """(Re)read identity and capabilities (power-target range W, sleep) from the miner."""
        self.identity = await self._call("identify", self.backend.identify, control=False)
        return self.identity

    async def read(self) -> DeviceReading:
        """One reading: power W, hashrate TH/s, hottest temperature degC, state, target W."""
        s = await self._call("read", self.backend.read, control=False)
        self._last_target_w = s.power_target_w
        self._last_state = s.state
        self._uncertain = False
        return DeviceReading(
            device_id=self.device_id,
            timestamp_s=self._clock(),
            power_w=s.power_w,
            state=s.state,
            hashrate_ths=s.hashrate_ths,
            temperature_c=s.temperature_c,
            power_target_w=s.power_target_w,
            power_estimated=s.power_estimated,
            errors=s.errors,
        )

    async def _reread_if_uncertain(self) -> None:
        if self._uncertain:
            # A failure here propagates: we do not write blind.
            await self.read()

    async def set_power_target(self, power_w: float) -> float:
        """Clamp ``power_w`` (W) to the device's range, write it if it changed, return it."""
        ident = self.identity or await self.identify()
        caps = ident.capabilities
        if not caps.power_target:
            raise DeviceRefused(f"{self.address}: {self.backend.name} has no power target")
        applied_w = caps.clamp_power_target_w(power_w)
        await self._reread_if_uncertain()
        if self._last_target_w is not None and math.isclose(applied_w, self._last_target_w):
            return applied_w
        watt = int(applied_w)
        try:
            applied_w = await self._call(
                f"set power target {watt} W",
                lambda: self.backend.set_power_target(watt),
                control=True,
            )
        except DeviceRefused as e:
            raise DeviceRefused(
                f"{e} (device range {caps.power_target_min_w:.0f}-{caps.power_target_max_w:.0f} W)"
            ) from e
        self._last_target_w = applied_w
        return applied_w

    async def sleep(self) -> None:
        """Stop mining (the firmware's pause / power off / curtail); idempotent."""
        await self._reread_if_uncertain()
        await self._call("sleep", self.backend.sleep, control=True)
        self._last_state = DeviceState.SLEEPING

    async def wake(self) -> None:
        """Resume mining; idempotent."""
        await self._reread_if_uncertain()
        await self._call("wake", self.backend.wake, control=True)
        self._last_state = None

    async def close(self) -> None:
        """Release what the adapter keeps open between calls (VNish: its web connection)."""
        close: Callable[[], Awaitable[None]] | None = getattr(self.backend, "close", None)
        if close is not None:
            await close()


async def _probe_any(address: str, timeout_s: float) -> bool:
    """True if any management port of ``address`` accepts a TCP connection."""

    async def one(port: int) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(address, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    return any(await asyncio.gather(*(one(p) for p in _PROBE_PORTS)))


async def _get_backend(
    address: str, timeout_s: float, logins: Mapping[str, Login] | None = None
) -> Backend:
    """pyasic.get_miner under a deadline, wrapped in the adapter for its firmware."""
    try:
        # get_miner has per-probe timeouts but no overall deadline.
        async with asyncio.timeout(timeout_s):
            miner = await pyasic.get_miner(address)
    except TimeoutError as e:
        raise DeviceUnreachable(f"{address}: identification: no answer in {timeout_s} s") from e
    except Exception as e:
        raise translate_rpc(address, "identification", e, control=False) from e
    if miner is None:
        # pyasic says None both when nothing listens and when what answers is
        # unrecognisable; a plain TCP connect tells the two apart.
        if await _probe_any(address, min(timeout_s, 1.0)):
            raise DeviceFaulted(f"{address}: answers, but pyasic cannot identify it")
        raise DeviceUnreachable(f"{address}: nothing answers on ports {_PROBE_PORTS}")
    backend = select_backend(miner, logins)
    if backend is None:
        # Includes pyasic's fallback to the legacy BOSMiner class for a Braiins
        # model it does not know (pyasic issues #129, #140).
        raise DeviceFaulted(
            f"{address}: {type(miner).__name__} ({miner.model}) runs firmware this "
            "driver cannot control"
        )
    return backend


async def discover(
    addresses: Iterable[str], *, concurrency: int = 50, timeout_s: float = 5.0
) -> list[tuple[str, DeviceIdentity]]:
    """Identify miners at ``addresses``, ``concurrency`` at a time (timeout per miner, s)."""
    # Unbounded get_miner() fan-out fails wholesale (PYASIC_NOTES: 1,000 at once
    # identified none), so bound it.
    sem = asyncio.Semaphore(max(1, concurrency))
    addrs = list(addresses)

    async def one(address: str) -> tuple[str, DeviceIdentity] | None:
        async with sem:
            try:
                drv = await AsicDriver.connect(address, address, timeout_s=timeout_s)
            except DeviceError as e:
                log.debug("discover: %s: %s", address, e)
                return None
        return (address, drv.identity) if drv.identity is not None else None

    found = await asyncio.gather(*(one(a) for a in addrs))
    return [f for f in found if f is not None]
