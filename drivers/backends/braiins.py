"""Braiins OS (BOSer): gRPC on port 50051, pyasic's generated BOSer stubs on a kept channel.

Watt power target (``SetPowerTarget``, range from ``GetConstraints``), pause and
resume. One grpclib ``Channel`` per miner is kept open across readings (within
``KEEP_BUDGET``; ``drivers.transport.grpc``), as a gRPC client of BOSer would
(``_BoserClient``); identification and control go through pyasic's
``BOSMinerGRPCStub`` on it, and a reading's replies are decoded by ``braiins_wire``
(only the fields a reading needs), as ``FIELDS`` says. Every library here is used
through its public API only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

import grpclib.const
from grpclib import GRPCError, Status
from grpclib.client import Channel
from pyasic.errors import APIError
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.web.braiins_os.boser import BOSMinerGRPCStub
from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos
from pyasic.web.braiins_os.proto.braiins.bos.v1 import LoginRequest, MinerStatus, SaveAction

from siteagent.domain.errors import DeviceError, DeviceFaulted
from siteagent.domain.types import DeviceControls, DeviceIdentity, DeviceState
from siteagent.drivers.backends import braiins_wire as wire
from siteagent.drivers.backends.base import (
    KEPT_CONNECTIONS,
    Behaviour,
    Field,
    FieldReader,
    Fields,
    KeepBudget,
    Moved,
    Sample,
)
from siteagent.drivers.backends.nameplate import lookup
from siteagent.drivers.transport.grpc import (
    NO_ANSWER,
    STREAMS_PER_CONNECTION,
    KeptChannel,
    translate_grpc,
    unary_calls,
)
from siteagent.drivers.transport.rules import all_of

__all__ = [
    "FIELDS",
    "KEEP_BUDGET",
    "SLOW_REFRESH_READS",
    "STREAMS_PER_CONNECTION",
    "BraiinsBackend",
    "translate_grpc",
]

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

# One budget for every firmware's kept connections (drivers.transport.rules).
KEEP_BUDGET = KEPT_CONNECTIONS

# BOSer's read calls are named ``Get...`` (pyasic: ``get_...``); anything else changes
# the miner and is never sent again after an unknown outcome.
_READ_PREFIX = "get_"
_READ_METHOD_PREFIX = "Get"  # the same, as a gRPC method's name

T = typing.TypeVar("T")


class _BoserClient:
    """BOSer's gRPC API for one miner on its kept channel (``drivers.transport.grpc``).

    pyasic's ``BOSerWebAPI`` opens a new ``Channel`` for every call (pyasic 0.79.0,
    ``boser.py:112``, and again for the login at ``:135``): a TCP connect, the HTTP/2
    preface and a SETTINGS exchange per call, on the miner as much as here (a
    1,000-miner sweep: 1.4 ms of ours and 1.9 ms of the miner's CPU per reading), and
    takes no channel. So this calls pyasic's generated ``BOSMinerGRPCStub`` on a
    ``KeptChannel``, with pyasic's conduct (its token lifetime, one new login and one
    more try on UNAUTHENTICATED, ``APIError`` ``from`` the cause), as a gRPC client of
    BOSer (tonic, which keeps HTTP/2 connections) would. How the channel is kept,
    renewed and when a call goes out again is the transport's (one rule for all).
    """

    def __init__(
        self, host: str, port: int, username: str, password: str, *, budget: KeepBudget
    ) -> None:
        self.username, self.password = username, password
        self.channel = KeptChannel(host, port, budget=budget)
        self._token: str | None = None
        self._token_at_s = 0.0  # time.monotonic() of the login that gave it
        self._login: asyncio.Future[str | None] | None = None

    @property
    def keeps_channel(self) -> bool:
        """Whether this miner's channel outlives a reading (``KEEP_BUDGET`` allowed it)."""
        return self.channel.keeps_channel

    def close(self) -> None:
        """Close the channel and give the budget its slot back (a later call starts over)."""
        self.channel.close()

    def shared(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Calls made until exit (also from tasks started inside) share one channel."""
        return self.channel.shared()

    async def _on_channel(
        self, what: str, call: typing.Callable[[Any], typing.Awaitable[T]], *, read: bool
    ) -> T:
        """``call`` on the kept channel; pyasic's ``APIError`` ``from`` a status or a
        connection that failed (after the transport's one retry of a read)."""
        try:
            return await self.channel.call(call, write=not read)
        except (GRPCError, *NO_ANSWER) as e:
            raise APIError(f"gRPC command failed - {what}") from e

    async def call(self, command: str, message: Any) -> Any:
        """pyasic's stub method ``command`` ("get_constraints") with ``message``, logged in,
        on the kept channel; the reply message (pyasic's type)."""

        async def call(kept: Any, metadata: list[tuple[str, str]]) -> Any:
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

        async def call(kept: Any, metadata: list[tuple[str, str]]) -> list[Any]:
            return await unary_calls(kept, plan, metadata)

        what = "+".join(names)
        return await self._logged_in(what, call, read=True)

    async def _logged_in(
        self,
        what: str,
        call: typing.Callable[[Any, list[tuple[str, str]]], typing.Awaitable[T]],
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
        async def login(kept: Any) -> str | None:
            token = await log_in(kept.open(), self.username, self.password)
            if token is not None:
                self._token, self._token_at_s = token, time.monotonic()
            return token

        return await self._on_channel("login", login, read=True)


# Where each of ``FIELDS``' sources comes from.
_ROUTES = {
    "stats": wire.MINER_STATS,
    "details": wire.MINER_DETAILS,
    "mode": wire.PERFORMANCE_MODE,
    "cooling": wire.COOLING_STATE,
}


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

    async def reads(self, sources: Sequence[str]) -> dict[str, Any]:
        """The replies of ``FIELDS``' ``sources`` (GetMinerStats every reading; the
        details, mode and cooling state when due), asked at once, by source."""
        replies = await self.client.send_reads([_ROUTES[s] for s in sources])
        return dict(zip(sources, replies, strict=True))

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


# The status, target and cooling state are read again at least this often (readings),
# and whenever power, or the hashrate, moves by more than its fraction since they were
# read (as the Antminer driver's miner mode).
SLOW_REFRESH_READS = 12
SLOW_POWER_FRAC = 0.05
SLOW_HASHRATE_FRAC = 0.10


def _power_w(stats: wire.MinerStats) -> float:
    if stats.power_w is None:
        raise LookupError("power_stats.approximated_consumption not sent")
    return float(stats.power_w)


def _hashrate_ths(stats: wire.MinerStats) -> float:
    # Missing messages are malformed replies, missing scalars are zero (proto3 omits
    # defaults), as with pyasic's messages.
    if stats.hashrate_ghs is None:
        raise LookupError("miner_stats.real_hashrate not sent")
    return stats.hashrate_ghs / 1000.0


def _target_w(mode: wire.PerformanceMode) -> float | None:
    if mode.target_w is None:
        raise LookupError("tuner_mode.power_target.power_target not sent")
    return float(mode.target_w) or None


def _temperature_c(cooling: wire.CoolingState) -> float | None:
    return cooling.degree_c if cooling.degree_c != 0.0 else None


# What a reading carries and where it comes from: GetMinerStats every reading; the
# status (GetMinerDetails: paused or mining), the performance mode (the target) and
# the cooling state (temperature), sent together, when they may have moved. The
# status moves by a write (the agent's: read again after it) or by hand, and a pause,
# a resume or a stop shows in the hashrate, which stops or starts: the slow fields
# are read again when the hashrate starts or stops or moves by more than
# SLOW_HASHRATE_FRAC, when power moves by more than SLOW_POWER_FRAC since they were
# read, and once every SLOW_REFRESH_READS readings (on the miner's own phase), so a
# steady reading is one call, and nothing of the status or the temperature is older
# than that. After the agent's own write, the next reading asks again for what that
# write can move: the target after a target, the status after a pause or a resume.
FIELDS = Fields(
    (
        Field("power_w", "stats", _power_w),
        Field("hashrate_ths", "stats", _hashrate_ths),
        Field("status", "details", attrgetter("status"), slow=True),
        Field("power_target_w", "mode", _target_w, slow=True),
        Field("temperature_c", "cooling", _temperature_c, slow=True),
    ),
    watch=(
        Moved("hashrate_ths", frac=SLOW_HASHRATE_FRAC, floor=0.0, zero=True),
        Moved("power_w", frac=SLOW_POWER_FRAC),
    ),
    every=SLOW_REFRESH_READS,
)


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
        self.fields = FieldReader(FIELDS, self.address)

    def translate(self, what: str, e: BaseException, *, control: bool) -> DeviceError:
        """gRPC status codes carry the refusal / permission distinction here."""
        return translate_grpc(self.address, what, e)

    async def identify(self) -> DeviceIdentity:
        """Identity and power-target constraints (W) from GetMinerDetails / GetConstraints."""
        async with self._wire.shared():
            details, constraints = await all_of(
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
        return DeviceIdentity(
            make=str(self.miner.make) if self.miner.make is not None else "unknown",
            model=model,
            firmware=f"Braiins OS {bos_version}".strip(),
            mac=str(mac).upper() if mac else None,
            serial=str(serial) if serial else None,
            capabilities=DeviceControls(
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
        """Power W, hashrate TH/s, hottest temperature degC, state, target W (``FIELDS``)."""
        async with self._wire.shared():
            v = await self.fields.read(self._wire.reads)
        status = v["status"]
        if status == MinerStatus.PAUSED:
            state = DeviceState.SLEEPING
        elif status == MinerStatus.NORMAL:
            state = DeviceState.MINING
        else:
            state = DeviceState.UNKNOWN
        return Sample(
            power_w=v["power_w"],
            state=state,
            hashrate_ths=v["hashrate_ths"],
            temperature_c=v["temperature_c"],
            power_target_w=v["power_target_w"],
        )

    async def set_power_target(self, watt: int) -> float:
        """SetPowerTarget (saved and applied); returns the target the miner echoes (W)."""
        self.fields.forget("mode")  # whatever happens, read the target again
        reply = await self._wire.set_power_target(watt)
        try:
            return _watt(reply, "powerTarget")
        except (LookupError, TypeError, AttributeError, ValueError):
            return float(watt)

    async def sleep(self) -> None:
        """PauseMining (idempotent: an already paused miner says so)."""
        self.fields.forget("details")  # the status: paused
        await self._wire.pause()

    async def wake(self) -> None:
        """ResumeMining (idempotent)."""
        self.fields.forget("details")
        await self._wire.resume()

    async def close(self) -> None:
        """Close the kept gRPC channel (the next call would open a new one)."""
        self._wire.close()
