"""The Braiins OS driver's copy of pyasic's BOSer proto, fenced: routes and field numbers.

A steady reading needs two scalars of one reply (GetMinerStats), and now and then
three more of three others (GetMinerDetails, GetActivePerformanceMode, GetCoolingState).
pyasic's generated betterproto messages decode every field of a reply and hook every
attribute read in Python (GetMinerStats: ~170 us, most of a reading's own CPU), so a
reading reads only those scalars from the protobuf wire format here, by the field
numbers of pyasic's generated schema, into small frozen values. grpclib decodes a
reply through ``reply_type.FromString(data)`` (``ProtoCodec``, a channel's default
codec), so these values are reply types of their own.

Everything here is a copy of pyasic's proto (``pyasic/web/braiins_os/proto``): the
routes (service and method names), the request and reply types they take, and the
numbers and wire types of the fields read (``FIELDS``).
``tests/test_braiins_wire.py`` checks each against pyasic's generated classes and
fails with "pyasic's braiins proto changed: ..." when pyasic's proto moves.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos

# Protobuf wire types (protobuf encoding spec).
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5

_NONE: frozenset[int] = frozenset()
_ONE = {n: frozenset((n,)) for n in range(1, 16)}  # one field number, as ``wanted``


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it."""
    b = buf[i]
    if b < 0x80:
        return b, i + 1
    value, shift = b & 0x7F, 7
    while True:
        i += 1
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes, wanted: frozenset[int], oneof: frozenset[int] = _NONE) -> dict[int, Any]:
    """The fields numbered ``wanted`` of one message: a varint as ``int``, the others as
    their bytes; the last occurrence wins, except that a length-delimited field's
    occurrences are joined (for a submessage, protobuf's merge). Of the members of
    ``oneof`` only the last sent counts, as protobuf's oneof."""
    out: dict[int, Any] = {}
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == VARINT:
            value, i = _varint(buf, i)
        elif wire == LEN:
            size, start = _varint(buf, i)
            i = start + size
            value = buf[start:i] if number in wanted else None
        elif wire == FIXED64:
            value, i = buf[i : i + 8], i + 8
        elif wire == FIXED32:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"field {number}: wire type {wire}")
        if i > n:
            raise ValueError(f"field {number}: truncated")
        if number in oneof:
            for other in oneof - {number}:
                out.pop(other, None)
        if number in wanted:
            if wire == LEN and type(out.get(number)) is bytes:
                value = out[number] + value
            out[number] = value
    return out


def _sub(fields: Mapping[int, Any], number: int) -> bytes | None:
    """Submessage ``number``'s bytes, or None where it was not sent."""
    value = fields.get(number)
    if value is None or type(value) is bytes:
        return value
    raise ValueError(f"field {number}: a varint where a message was expected")


def _uint(fields: Mapping[int, Any], number: int) -> int:
    """Varint field ``number``; proto3 leaves a zero off the wire."""
    value = fields.get(number, 0)
    if type(value) is int:
        return value
    raise ValueError(f"field {number}: not a varint")


def _double(fields: Mapping[int, Any], number: int) -> float:
    """Double field ``number``; proto3 leaves a zero off the wire."""
    value = fields.get(number)
    if value is None:
        return 0.0
    if type(value) is bytes and len(value) == 8:
        return float(struct.unpack("<d", value)[0])
    raise ValueError(f"field {number}: not a double")


def _path(
    buf: bytes | None, *numbers: int, oneofs: tuple[frozenset[int], ...] = ()
) -> bytes | None:
    """The submessage at ``numbers`` under ``buf``, or None where one on the way was not
    sent; ``oneofs[depth]``: that level's oneof group, if the field is in one."""
    for depth, number in enumerate(numbers):
        if buf is None:
            return None
        oneof = oneofs[depth] if depth < len(oneofs) else _NONE
        buf = _sub(_fields(buf, _ONE[number], oneof), number)
    return buf


# What a malformed reply raises in decoding (``ValueError`` names the reply).
_MALFORMED = (IndexError, ValueError, struct.error)
_1, _2_3, _12 = frozenset((1,)), frozenset((2, 3)), frozenset((12,))


def _malformed(cls: type, e: Exception) -> ValueError:
    return ValueError(f"malformed {cls.__name__} reply: {e!r}")


# -- a reading's replies: the scalars it reads, decoded from pyasic's field numbers ----
# ``FromString`` is the decoding half of grpclib's ``IProtoMessage``, which its
# ``ProtoCodec`` calls for a reply.


@dataclass(frozen=True, slots=True)
class MinerStats:
    """GetMinerStatsResponse as a reading reads it; None: a message on the way not sent."""

    power_w: int | None  # power_stats(3).approximated_consumption(1).watt(1)
    hashrate_ghs: float | None  # miner_stats(2).real_hashrate(1).last_5_s(1).gigahash_per_second(1)

    @classmethod
    def FromString(cls, data: bytes) -> MinerStats:
        """Decode a GetMinerStatsResponse."""
        try:
            top = _fields(data, _2_3)
            power = _path(_sub(top, 3), 1)
            real = _path(_sub(top, 2), 1)
            return cls(
                power_w=None if power is None else _uint(_fields(power, _1), 1),
                hashrate_ghs=(
                    None if real is None else _double(_fields(_path(real, 1) or b"", _1), 1)
                ),
            )
        except _MALFORMED as e:
            raise _malformed(cls, e) from e


@dataclass(frozen=True, slots=True)
class MinerDetails:
    """GetMinerDetailsResponse as a reading reads it."""

    status: int  # status(12), a MinerStatus; 0 (UNSPECIFIED) when not sent

    @classmethod
    def FromString(cls, data: bytes) -> MinerDetails:
        """Decode a GetMinerDetailsResponse."""
        try:
            return cls(status=_uint(_fields(data, _12), 12))
        except _MALFORMED as e:
            raise _malformed(cls, e) from e


# PerformanceMode's oneof "mode" (manual_mode 1, tuner_mode 2) and
# TunerPerformanceMode's oneof "target" (power_target 1, hashrate_target 2).
_MODE_ONEOF = frozenset((1, 2))
_TARGET_ONEOF = frozenset((1, 2))


@dataclass(frozen=True, slots=True)
class PerformanceMode:
    """PerformanceMode (GetActivePerformanceMode's reply) as a reading reads it."""

    # tuner_mode(2).power_target(1).power_target(1).watt(1); None: not in power-target
    # tuner mode (or a message on the way not sent)
    target_w: int | None

    @classmethod
    def FromString(cls, data: bytes) -> PerformanceMode:
        """Decode a PerformanceMode."""
        try:
            power = _path(data, 2, 1, 1, oneofs=(_MODE_ONEOF, _TARGET_ONEOF))
            return cls(target_w=None if power is None else _uint(_fields(power, _1), 1))
        except _MALFORMED as e:
            raise _malformed(cls, e) from e


@dataclass(frozen=True, slots=True)
class CoolingState:
    """GetCoolingStateResponse as a reading reads it."""

    degree_c: float  # highest_temperature(2).temperature(3).degree_c(1); 0 when not sent

    @classmethod
    def FromString(cls, data: bytes) -> CoolingState:
        """Decode a GetCoolingStateResponse."""
        try:
            return cls(degree_c=_double(_fields(_path(data, 2, 3) or b"", _1), 1))
        except _MALFORMED as e:
            raise _malformed(cls, e) from e


# -- routes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One unary BOSer method: its gRPC path, pyasic's request and reply types, and the
    type its reply is decoded as here (pyasic's own where the reply is read whole)."""

    path: str
    request: Any
    reply: Any
    decoded_as: Any


MINER_STATS: Final = Route(
    "/braiins.bos.v1.MinerService/GetMinerStats",
    bos.GetMinerStatsRequest,
    bos.GetMinerStatsResponse,
    MinerStats,
)
MINER_DETAILS: Final = Route(
    "/braiins.bos.v1.MinerService/GetMinerDetails",
    bos.GetMinerDetailsRequest,
    bos.GetMinerDetailsResponse,
    MinerDetails,
)
PERFORMANCE_MODE: Final = Route(
    "/braiins.bos.v1.PerformanceService/GetActivePerformanceMode",
    bos.GetPerformanceModeRequest,
    bos.PerformanceMode,
    PerformanceMode,
)
COOLING_STATE: Final = Route(
    "/braiins.bos.v1.CoolingService/GetCoolingState",
    bos.GetCoolingStateRequest,
    bos.GetCoolingStateResponse,
    CoolingState,
)
# The token comes in the reply's initial metadata, which pyasic's stub does not
# return, so the driver opens this stream itself (as pyasic's own login does).
LOGIN: Final = Route(
    "/braiins.bos.v1.AuthenticationService/Login",
    bos.LoginRequest,
    bos.LoginResponse,
    bos.LoginResponse,
)
ROUTES: Final = (MINER_STATS, MINER_DETAILS, PERFORMANCE_MODE, COOLING_STATE, LOGIN)

# Every field read above: pyasic's class, the field's name, number and wire type, and
# its oneof group if in one.
FIELDS: Final[tuple[tuple[Any, str, int, int, str | None], ...]] = (
    (bos.GetMinerStatsResponse, "miner_stats", 2, LEN, None),
    (bos.GetMinerStatsResponse, "power_stats", 3, LEN, None),
    (bos.WorkSolverStats, "real_hashrate", 1, LEN, None),
    (bos.RealHashrate, "last_5_s", 1, LEN, None),
    (bos.GigaHashrate, "gigahash_per_second", 1, FIXED64, None),
    (bos.MinerPowerStats, "approximated_consumption", 1, LEN, None),
    (bos.Power, "watt", 1, VARINT, None),
    (bos.GetMinerDetailsResponse, "status", 12, VARINT, None),
    (bos.PerformanceMode, "manual_mode", 1, LEN, "mode"),
    (bos.PerformanceMode, "tuner_mode", 2, LEN, "mode"),
    (bos.TunerPerformanceMode, "power_target", 1, LEN, "target"),
    (bos.TunerPerformanceMode, "hashrate_target", 2, LEN, "target"),
    (bos.PowerTargetMode, "power_target", 1, LEN, None),
    (bos.GetCoolingStateResponse, "highest_temperature", 2, LEN, None),
    (bos.TemperatureSensor, "temperature", 3, LEN, None),
    (bos.Temperature, "degree_c", 1, FIXED64, None),
)
