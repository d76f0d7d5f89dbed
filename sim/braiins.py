"""A simulated Braiins OS (BOSer) miner that speaks the real protocols on loopback.

Each miner owns one loopback address and serves, on it (listeners, faults and
the JSON API's framing from ``sim.base``):

- HTTP on port 80: a page naming "Braiins OS" (what pyasic's web probe looks for);
- the CGMiner-style JSON API on TCP 4028: one JSON reply, then close;
  ``+``-joined multi-commands answered as an object keyed by command;
- gRPC on port 50051 (``braiins.bos.v1``) through grpclib, keeping each HTTP/2
  connection open until the client closes it, as BOSer (a tonic server) does.
  A reboot, ``refuse`` or a server swap for a fault ends them; tests can also end
  them on purpose (``goaway``, ``drop_connections``, ``cut_next_call``) and count
  them (``grpc_connections``, ``grpc_calls``).

The gRPC message and service classes come from pyasic's generated betterproto
package. They are used here only as the wire schema (the ``.proto`` contract a
real BOSer server is generated from), never as client code: nothing else of
pyasic is imported, and nothing of the agent, drivers or policies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, ClassVar, cast

import grpclib.const
import grpclib.server
from grpclib import GRPCError, Status
from grpclib.protocol import H2Protocol
from h2.errors import ErrorCodes

# Wire schema only (see module docstring).
from pyasic.web.braiins_os.proto.braiins.bos import ApiVersion, ApiVersionServiceBase
from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos

from siteagent.sim.base import (
    POOL_URL,
    POOL_USER,
    HttpRequest,
    HttpResponse,
    Listener,
    SimMinerBase,
    pools_reply,
    rpc_status,
)
from siteagent.sim.faults import Fault

GRPC_PORT = 50051

# A real BOSer login token lives an hour and is refreshed on use.
TOKEN_TIMEOUT_S = 3600
BOS_VERSION = "2024-09-03-0-d4b1b5b4-24.09-plus"

GARBAGE_GRPC_BYTES = b"\x8b\x00\xff\xfe garbage \x13\x37 no http/2 frame \x00\x01\x02"

_PAGE = (
    "<!DOCTYPE html><html><head><title>Braiins OS</title></head>"
    f"<body>Braiins OS {BOS_VERSION} (simulated)</body></html>"
).encode()


class SimBraiinsMiner(SimMinerBase):
    """One simulated BOSer miner: its JSON API's replies, its web page, its gRPC server."""

    BACKEND: ClassVar[str] = "braiins"
    PORTS: ClassVar[tuple[int, ...]] = (80, 4028, GRPC_PORT)
    MAC_PREFIX: ClassVar[str] = "02:42:AC"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", "SIMBOS")
        kwargs.setdefault("password", "root")
        super().__init__(*args, **kwargs)
        self.hostname = f"sim-bos-{self.index:04d}"
        self.uid = f"sim-{self.index:08d}"
        self.token = f"simtoken{self.index:06d}x"
        # HTTP/2 connections on the gRPC port: open now, accepted so far, requests by
        # method name ("GetMinerStats"), and the calls whose connection is to be cut
        # (method -> for each call to cut, whether the miner carries it out first).
        self._grpc_conns: set[_SimH2Protocol] = set()
        self.grpc_connections = 0
        self.grpc_calls: collections.Counter[str] = collections.Counter()
        self._cuts: dict[str, list[bool]] = {}
        self._fails: dict[str, list[Status]] = {}
        self._details_parts: tuple[bytes, bytes] | None = None

    # -- the gRPC port's server --------------------------------------------------------

    def server_kind(self, port: int) -> Hashable:
        """On the gRPC port: grpclib speaks HTTP/2 unless the fault needs raw bytes."""
        if port == GRPC_PORT and self.faults.fault in (Fault.NO_ANSWER, Fault.GARBAGE):
            return "raw"
        return super().server_kind(port)

    async def start_server(self, port: int, sock: socket.socket) -> Listener:
        """grpclib's server (or the raw one) on the gRPC port; the base's on the others."""
        if port != GRPC_PORT:
            return await super().start_server(port, sock)
        if self.server_kind(port) == "raw":
            return await asyncio.start_server(self._serve_raw_grpc, sock=sock)
        server = _SimGrpcServer([_Guarded(self)], self)
        await server.start(sock=sock)
        return server

    def close_connections(self, port: int) -> None:
        """Kept gRPC connections would go on being served by the server taken away
        (grpclib's Server.close only stops listening and cancels the calls in flight)."""
        if port == GRPC_PORT:
            self.drop_connections()

    # -- the gRPC port's connections, for tests -------------------------------------

    @property
    def grpc_open_connections(self) -> int:
        """HTTP/2 connections open on the gRPC port now (not being closed)."""
        return sum(1 for c in self._grpc_conns if c.open)

    def goaway(self) -> None:
        """End every gRPC connection as a server shutting down or closing idle
        connections does: GOAWAY (NO_ERROR, the last stream it took), then close."""
        for conn in list(self._grpc_conns):
            conn.goaway()

    def drop_connections(self, *, reset: bool = False) -> None:
        """Close every gRPC connection without GOAWAY: FIN, or RST with ``reset``."""
        for conn in list(self._grpc_conns):
            conn.drop(reset=reset)

    def cut_next_call(self, method: str, *, applied: bool, calls: int = 1) -> None:
        """The next ``calls`` calls of ``method`` ("SetPowerTarget") get no reply: the
        connection is reset instead; ``applied``: whether the miner carries them out."""
        self._cuts[method] = [applied] * calls

    def fail_next_call(self, method: str, status: Status, *, calls: int = 1) -> None:
        """The next ``calls`` calls of ``method`` ("GetMinerDetails") are answered with the
        gRPC ``status`` instead of a reply (the connection stays up)."""
        self._fails[method] = [status] * calls

    # -- HTTP (port 80) --------------------------------------------------------------

    def http_request(self, req: HttpRequest) -> HttpResponse:
        """Every page is the one naming the firmware."""
        return HttpResponse(200, _PAGE, (("Content-Type", "text/html; charset=utf-8"),))

    # -- CGMiner-style JSON API (port 4028) ------------------------------------------

    def rpc_command(self, cmd: str, param: Any, req: dict[str, Any]) -> dict[str, Any]:
        """BOSer's reply to one command of its CGMiner-style API."""
        now_s = self.clock()
        m, pw = self.model, self.power
        hr_ths = pw.hashrate_ths(now_s)
        mhs = hr_ths * 1e6
        per_board_mhs = mhs / m.hashboards
        elapsed = int(now_s - pw.started_s)
        if cmd == "version":
            out = rpc_status("S", 22, "BOSer versions", f"BOSer boser-buildroot {BOS_VERSION}")
            out["VERSION"] = [{"BOSer": BOS_VERSION, "API": "3.7"}]
            return out
        if cmd == "devdetails":
            out = rpc_status("S", 69, "Device Details")
            out["DEVDETAILS"] = [
                {
                    "DEVDETAILS": i,
                    "Name": "",
                    "ID": i,
                    "Driver": "",
                    "Kernel": "",
                    "Model": m.devdetails_model,
                    "Device Path": "",
                    "Chips": m.chips_per_board,
                    "Frequency": 0.0,
                    "Voltage": 0.0,
                }
                for i in range(m.hashboards)
            ]
            return out
        if cmd == "summary":
            out = rpc_status("S", 11, "Summary")
            out["SUMMARY"] = [
                {
                    "Elapsed": elapsed,
                    "MHS av": mhs,
                    "MHS 5s": mhs,
                    "MHS 1m": mhs,
                    "MHS 5m": mhs,
                    "MHS 15m": mhs,
                    "Accepted": 0,
                    "Rejected": 0,
                    "Hardware Errors": 0,
                }
            ]
            return out
        if cmd in ("devs", "edevs"):
            out = rpc_status("S", 9, f"{m.hashboards} ASC(s)")
            out["DEVS"] = [
                {
                    "ASC": i,
                    "Name": "",
                    "ID": i,
                    "Enabled": "Y",
                    "Status": "Alive",
                    "Temperature": round(pw.chip_temp_c(now_s) - 10, 1),
                    "MHS av": per_board_mhs,
                    "MHS 5s": per_board_mhs,
                    "MHS 1m": per_board_mhs,
                    "MHS 5m": per_board_mhs,
                    "MHS 15m": per_board_mhs,
                    "Nominal MHS": m.nameplate_hashrate_ths * 1e6 / m.hashboards,
                }
                for i in range(m.hashboards)
            ]
            return out
        if cmd == "temps":
            out = rpc_status("S", 201, f"{m.hashboards} Temp(s)")
            chip = round(pw.chip_temp_c(now_s), 1)
            out["TEMPS"] = [
                {"TEMPS": i, "ID": i, "Board": round(chip - 10, 1), "Chip": chip}
                for i in range(m.hashboards)
            ]
            return out
        if cmd == "fans":
            out = rpc_status("S", 202, f"{m.fans} Fan(s)")
            rpm = self.fan_rpm(now_s)
            out["FANS"] = [
                {"FANS": i, "ID": i, "RPM": rpm, "Speed": rpm * 100 // 6000} for i in range(m.fans)
            ]
            return out
        if cmd == "pools":
            return pools_reply({"Get Failures": 0, "Remote Failures": 0})
        if cmd == "tunerstatus":
            out = rpc_status("S", 100, "Tuner Status")
            target = int(pw.target_w)
            reported = int(self.reported_power_w(now_s))
            out["TUNERSTATUS"] = [
                {
                    "TUNERSTATUS": 0,
                    "PowerLimit": target,
                    "DynamicPowerScaling": "Disabled",
                    "ApproximateMinerPowerConsumption": reported,
                    "ApproximateChainPowerConsumption": max(0, reported - 150),
                    "TunerChainStatus": [
                        {
                            "HashchainIndex": i,
                            "PowerLimitWatt": target // m.hashboards,
                            "ApproximatePowerConsumptionWatt": reported // m.hashboards,
                            "Status": "Paused" if pw.paused else "Stable",
                        }
                        for i in range(m.hashboards)
                    ],
                }
            ]
            return out
        return rpc_status("E", 14, f"Invalid command: {cmd}")

    def details_parts(self) -> tuple[bytes, bytes]:
        """GetMinerDetailsResponse's constant fields, encoded once: 1-9 and 16."""
        if self._details_parts is None:
            name = self.model.devdetails_model.replace("Bitmain ", "")
            identity = (
                _pb_uint(1, int(bos.MinerBrand.ANTMINER)) + _pb_str(3, name) + _pb_str(4, name)
            )
            version = _pb_str(1, BOS_VERSION) + _pb_str(2, "24.09") + _pb_uint(3, 1)  # bos_plus
            head = (
                _pb_str(1, self.uid)
                + _pb_msg(2, identity)
                + _pb_uint(3, int(bos.Platform.AM3_AML))
                + _pb_uint(4, int(bos.BosMode.NAND))
                + _pb_msg(5, version)
                + _pb_str(6, self.hostname)
                + _pb_str(7, self.mac)
                + _pb_msg(9, _ghs_bytes(self.model.nameplate_hashrate_ths))
            )
            # serial_number is ``optional``: sent even when empty.
            tail = _varint(16 << 3 | 2) + _varint(len(self.serial.encode())) + self.serial.encode()
            self._details_parts = (head, tail)
        return self._details_parts

    # -- raw bytes on the gRPC port (no_answer, garbage) -----------------------------

    async def _serve_raw_grpc(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self.faults.fault is Fault.GARBAGE:
                # Answer the HTTP/2 preface with bytes that are no HTTP/2 frame.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await reader.read(24)
                writer.write(GARBAGE_GRPC_BYTES * 4)
                await writer.drain()
            else:
                await self._released.wait()
        except ConnectionError:
            pass
        finally:
            writer.close()

    # -- gRPC request checks ---------------------------------------------------------

    async def grpc_guard(self, path: str, stream: grpclib.server.Stream[Any, Any]) -> None:
        """Faults and authentication before any gRPC handler runs."""
        await self._delay()
        if path.endswith("/Login") or path.endswith("/GetApiVersion"):
            return
        # BOSer wants the token from Login in the ``authorization`` metadata.
        if stream.metadata is None or stream.metadata.get("authorization") != self.token:
            raise GRPCError(Status.UNAUTHENTICATED, "missing or invalid authorization token")

    def check_control(self, what: str) -> None:
        """Raise the gRPC error a control call gets under refuse_commands."""
        if self.refuse_commands():
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"{what} rejected: miner is not accepting control commands (simulated)",
            )


# --- gRPC services ------------------------------------------------------------------
# The ServiceBase classes are pyasic's generated betterproto code (untyped for
# mypy), hence the ignores on the class lines.


def _power(watt: float) -> bos.Power:
    return bos.Power(watt=max(0, round(watt)))


def _ghs(ths: float) -> bos.GigaHashrate:
    return bos.GigaHashrate(gigahash_per_second=ths * 1000.0)


# --- the hot replies, encoded by hand ---------------------------------------------
# A reading costs four gRPC calls, and betterproto's encoder takes ~0.3-0.7 ms per
# reply (it compares every field with its default through __getattribute__): at
# 10,000 miners the simulator, not the client, set the pace. The four replies a
# reading asks for are encoded here instead, byte for byte what betterproto
# emits for the same message (fields in number order, proto3 defaults omitted,
# a submessage that was set sent even when empty); constant parts are encoded by
# betterproto once per miner. grpclib's ProtoCodec sends ``SerializeToString()``
# of an instance of the reply type, which ``_encoded`` provides.


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_uint(field: int, n: int, *, always: bool = False) -> bytes:
    """A varint field; proto3 omits a zero unless the field is ``optional``."""
    return _varint(field << 3) + _varint(n) if n or always else b""


def _pb_double(field: int, x: float) -> bytes:
    return bytes([field << 3 | 1]) + struct.pack("<d", x) if x != 0.0 else b""


def _pb_msg(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _pb_str(field: int, value: str) -> bytes:
    """A string field; proto3 omits an empty one."""
    return _pb_msg(field, value.encode()) if value else b""


class _Encoded:
    """Mixin: a reply message whose wire bytes are already made."""

    _raw: bytes

    def SerializeToString(self) -> bytes:  # grpclib's codec calls this name
        return self._raw


_ENCODED_TYPES: dict[type[Any], type[Any]] = {}


def _encoded(reply_type: type[Any], raw: bytes) -> Any:
    """An instance of ``reply_type`` (grpclib checks the type) that sends ``raw``."""
    cls = _ENCODED_TYPES.get(reply_type)
    if cls is None:
        cls = type(f"Encoded{reply_type.__name__}", (_Encoded, reply_type), {})
        _ENCODED_TYPES[reply_type] = cls
    msg = object.__new__(cls)
    object.__setattr__(msg, "_raw", raw)
    return msg


def _ghs_bytes(ths: float) -> bytes:
    """A ``GigaHashrate`` message's payload."""
    return _pb_double(1, ths * 1000.0)


def _power_bytes(watt: float) -> bytes:
    """A ``Power`` message's payload (as ``_power``)."""
    return _pb_uint(1, max(0, round(watt)))


def miner_stats_bytes(m: SimBraiinsMiner, now: float) -> bytes:
    """GetMinerStatsResponse as ``bytes(bos.GetMinerStatsResponse(...))`` of before."""
    ths = m.power.hashrate_ths(now)
    reported = m.reported_power_w(now)
    hr = _ghs_bytes(ths)
    real = b"".join(_pb_msg(f, hr) for f in (1, 2, 3, 4, 5))  # last 5 s ... last 5 min
    solver = _pb_msg(1, real) + _pb_msg(2, _ghs_bytes(m.model.nameplate_hashrate_ths))
    efficiency = _pb_double(1, reported / ths if ths > 0 else 0.0)
    power = _pb_msg(1, _power_bytes(reported)) + _pb_msg(2, efficiency)
    return _pb_msg(1, b"") + _pb_msg(2, solver) + _pb_msg(3, power)


def miner_details_bytes(m: SimBraiinsMiner, now: float) -> bytes:
    """GetMinerDetailsResponse: fields 1-9 and 16 are constant, 10-12 are encoded here."""
    head, tail = m.details_parts()
    uptime = int(now - m.power.started_s)
    status = bos.MinerStatus.PAUSED if m.power.paused else bos.MinerStatus.NORMAL
    return (
        head + _pb_uint(10, uptime) + _pb_uint(11, uptime + 60) + _pb_uint(12, int(status)) + tail
    )


def performance_mode_bytes(m: SimBraiinsMiner) -> bytes:
    """PerformanceMode(tuner_mode=TunerPerformanceMode(power_target=PowerTargetMode(...)))."""
    return _pb_msg(2, _pb_msg(1, _pb_msg(1, _power_bytes(m.power.target_w))))


def cooling_state_bytes(m: SimBraiinsMiner, now: float) -> bytes:
    """GetCoolingStateResponse: the fans (``position`` is optional: sent when 0) and the
    hottest temperature."""
    rpm = m.fan_rpm(now)
    fan = _pb_uint(2, rpm)
    fans = b"".join(_pb_msg(1, _pb_uint(1, i, always=True) + fan) for i in range(m.model.fans))
    hottest = _pb_msg(2, _pb_msg(3, _pb_double(1, m.power.chip_temp_c(now))))
    return fans + hottest


class _OfMiner:
    """A gRPC service of one simulated miner."""

    def __init__(self, m: SimBraiinsMiner) -> None:
        self.m = m


class _Miner(_OfMiner, bos.MinerServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def get_miner_details(
        self, get_miner_details_request: bos.GetMinerDetailsRequest
    ) -> bos.GetMinerDetailsResponse:
        m = self.m
        return _encoded(bos.GetMinerDetailsResponse, miner_details_bytes(m, m.clock()))

    async def get_miner_status(self, get_miner_status_request: bos.GetMinerStatusRequest) -> Any:
        # Server-streaming in the .proto; BOSer sends the current status first.
        yield bos.GetMinerStatusResponse(
            status=bos.MinerStatus.PAUSED if self.m.power.paused else bos.MinerStatus.NORMAL
        )

    async def get_miner_stats(
        self, get_miner_stats_request: bos.GetMinerStatsRequest
    ) -> bos.GetMinerStatsResponse:
        m = self.m
        return _encoded(bos.GetMinerStatsResponse, miner_stats_bytes(m, m.clock()))

    async def get_hashboards(
        self, get_hashboards_request: bos.GetHashboardsRequest
    ) -> bos.GetHashboardsResponse:
        m = self.m
        now = m.clock()
        chip = m.power.chip_temp_c(now)
        per_board = m.power.hashrate_ths(now) / m.model.hashboards
        return bos.GetHashboardsResponse(
            hashboards=[
                bos.Hashboard(
                    id=str(i + 1),
                    enabled=True,
                    chips_count=m.model.chips_per_board,
                    highest_chip_temp=bos.TemperatureSensor(
                        temperature=bos.Temperature(degree_c=chip)
                    ),
                    board_temp=bos.Temperature(degree_c=chip - 10.0),
                    stats=bos.WorkSolverStats(
                        real_hashrate=bos.RealHashrate(last_5_s=_ghs(per_board))
                    ),
                    serial_number=f"{m.serial}-HB{i}",
                )
                for i in range(m.model.hashboards)
            ]
        )


class _Performance(_OfMiner, bos.PerformanceServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def get_active_performance_mode(
        self, get_performance_mode_request: bos.GetPerformanceModeRequest
    ) -> bos.PerformanceMode:
        return _encoded(bos.PerformanceMode, performance_mode_bytes(self.m))

    async def set_power_target(
        self, set_power_target_request: bos.SetPowerTargetRequest
    ) -> bos.SetPowerTargetResponse:
        m = self.m
        m.check_control("SetPowerTarget")
        watt = set_power_target_request.power_target.watt
        lo, hi = m.model.power_target_min_w, m.model.power_target_max_w
        if not lo <= watt <= hi:
            # BOSer answers a value outside GetConstraints with a precondition
            # error (its REST mapping is 412) naming the allowed range.
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"Power target {watt} W is out of range: allowed {lo:.0f}-{hi:.0f} W",
            )
        m.power.set_target(float(watt), m.clock())
        return bos.SetPowerTargetResponse(power_target=_power(watt))


class _Actions(_OfMiner, bos.ActionsServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def pause_mining(
        self, pause_mining_request: bos.PauseMiningRequest
    ) -> bos.PauseMiningResponse:
        self.m.check_control("PauseMining")
        # Idempotent, as BOSer's .proto says: a second pause reports already_paused.
        return bos.PauseMiningResponse(already_paused=self.m.power.pause(self.m.clock()))

    async def resume_mining(
        self, resume_mining_request: bos.ResumeMiningRequest
    ) -> bos.ResumeMiningResponse:
        self.m.check_control("ResumeMining")
        return bos.ResumeMiningResponse(already_mining=self.m.power.resume(self.m.clock()))

    async def get_locate_device_status(
        self, get_locate_device_status_request: bos.GetLocateDeviceStatusRequest
    ) -> bos.LocateDeviceStatusResponse:
        return bos.LocateDeviceStatusResponse(enabled=False)


class _Configuration(_OfMiner, bos.ConfigurationServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def get_constraints(
        self, get_constraints_request: bos.GetConstraintsRequest
    ) -> bos.GetConstraintsResponse:
        mdl = self.m.model
        return bos.GetConstraintsResponse(
            tuner_constraints=bos.TunerConstraints(
                power_target=bos.PowerConstraints(
                    default=_power(mdl.power_target_default_w),
                    min=_power(mdl.power_target_min_w),
                    max=_power(mdl.power_target_max_w),
                ),
                enabled=bos.BooleanConstraint(default=True),
                default_mode=bos.TunerMode.POWER_TARGET,
            )
        )

    async def get_miner_configuration(
        self, get_miner_configuration_request: bos.GetMinerConfigurationRequest
    ) -> bos.GetMinerConfigurationResponse:
        return bos.GetMinerConfigurationResponse(
            tuner=bos.TunerConfiguration(
                enabled=True,
                tuner_mode=bos.TunerMode.POWER_TARGET,
                power_target=_power(self.m.power.target_w),
            )
        )


class _Cooling(_OfMiner, bos.CoolingServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def get_cooling_state(
        self, get_cooling_state_request: bos.GetCoolingStateRequest
    ) -> bos.GetCoolingStateResponse:
        m = self.m
        return _encoded(bos.GetCoolingStateResponse, cooling_state_bytes(m, m.clock()))


class _Pools(bos.PoolServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def get_pool_groups(
        self, get_pool_groups_request: bos.GetPoolGroupsRequest
    ) -> bos.GetPoolGroupsResponse:
        return bos.GetPoolGroupsResponse(
            pool_groups=[
                bos.PoolGroup(
                    name="default",
                    pools=[
                        bos.Pool(
                            uid="0",
                            url=POOL_URL,
                            user=POOL_USER,
                            enabled=True,
                            alive=True,
                            active=True,
                            stats=bos.PoolStats(accepted_shares=0),
                        )
                    ],
                )
            ]
        )


class _ApiVersion(ApiVersionServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def get_api_version(self, api_version_request: Any) -> ApiVersion:
        return ApiVersion(major=1, minor=3, patch=0)


class _Auth(_OfMiner, bos.AuthenticationServiceBase):  # type: ignore[misc]  # pyasic is untyped
    async def login_stream(
        self, stream: grpclib.server.Stream[bos.LoginRequest, bos.LoginResponse]
    ) -> None:
        """Login: the token travels in the reply's initial metadata, as on BOSer."""
        req = await stream.recv_message()
        if req is None or req.username != "root" or req.password != self.m.password:
            raise GRPCError(Status.UNAUTHENTICATED, "invalid username or password")
        await stream.send_initial_metadata(metadata={"authorization": self.m.token})
        await stream.send_message(bos.LoginResponse(token=self.m.token, timeout_s=TOKEN_TIMEOUT_S))


Handler = Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]


class _Guarded:
    """All services of one miner, each handler wrapped in the miner's fault/auth guard."""

    def __init__(self, m: SimBraiinsMiner) -> None:
        self.m = m
        auth = _Auth(m)
        self.handlers: dict[str, grpclib.const.Handler] = {}
        for svc in (
            _Miner(m),
            _Performance(m),
            _Actions(m),
            _Configuration(m),
            _Cooling(m),
            _Pools(),
            _ApiVersion(),
            auth,
        ):
            for path, h in svc.__mapping__().items():
                func: Handler = h.func
                if path.endswith("/Login"):
                    func = auth.login_stream
                self.handlers[path] = grpclib.const.Handler(
                    self._wrap(path, func), h.cardinality, h.request_type, h.reply_type
                )

    def _wrap(self, path: str, func: Handler) -> Handler:
        method = path.rsplit("/", 1)[-1]

        async def guarded(stream: grpclib.server.Stream[Any, Any]) -> None:
            m = self.m
            m.grpc_calls[method] += 1
            await m.grpc_guard(path, stream)
            fails = m._fails.get(method)
            if fails:
                raise GRPCError(fails.pop(), f"{method} failed (simulated)")
            cuts = m._cuts.get(method)
            applied = cuts.pop() if cuts else None
            if applied is None:
                await func(stream)
                return
            if applied:
                await func(cast(grpclib.server.Stream[Any, Any], _Unanswered(stream)))
            else:
                await stream.recv_message()
            # grpclib's server Stream sends nothing more once its transport is closing.
            m.drop_connections(reset=True)

        return guarded

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self.handlers


class _Unanswered:
    """A handler's server stream whose reply is dropped (the connection is cut instead)."""

    def __init__(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        self._stream = stream

    async def recv_message(self) -> Any:
        return await self._stream.recv_message()

    async def send_message(self, message: Any) -> None:
        pass


class _SimH2Protocol(H2Protocol):
    """grpclib's server protocol for one connection, known to its miner so that the
    miner can count and end it."""

    def __init__(self, proto: H2Protocol, miner: SimBraiinsMiner) -> None:
        super().__init__(proto.handler, proto.config, proto.h2_config)
        self.miner = miner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = cast(asyncio.Transport, transport)
        self.miner._grpc_conns.add(self)
        self.miner.grpc_connections += 1

    @property
    def open(self) -> bool:
        """Connected and not being closed."""
        return self.transport is not None and not self.transport.is_closing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.miner._grpc_conns.discard(self)
        super().connection_lost(exc)

    def goaway(self) -> None:
        """GOAWAY (NO_ERROR, the highest stream taken), flushed, then close."""
        if self.transport is None or self.transport.is_closing():
            return
        h2c = self.connection._connection
        h2c.close_connection(
            error_code=ErrorCodes.NO_ERROR, last_stream_id=h2c.highest_inbound_stream_id
        )
        self.connection.flush()
        self.transport.close()  # after what is buffered, the GOAWAY included

    def drop(self, *, reset: bool) -> None:
        """Close (FIN), or reset (RST: SO_LINGER 0, then abort)."""
        if self.transport is None:
            return
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        else:
            self.transport.close()


class _SimGrpcServer(grpclib.server.Server):
    """grpclib's server, each connection's protocol a ``_SimH2Protocol`` of ``miner``."""

    def __init__(self, handlers: list[Any], miner: SimBraiinsMiner) -> None:
        super().__init__(handlers)
        self._miner = miner

    def _protocol_factory(self) -> H2Protocol:
        return _SimH2Protocol(super()._protocol_factory(), self._miner)
