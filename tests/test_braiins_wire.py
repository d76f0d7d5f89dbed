"""The fence around ``drivers/backends/braiins_wire.py``: what it copies of pyasic's proto.

Each test checks one assumption against pyasic's generated classes through their
public use (building a message and encoding it with ``bytes()``, a service's
``__mapping__`` as grpclib's server reads it) and fails with "pyasic's braiins proto
changed: ..." when pyasic's proto moves, so an upgrade says what to re-check.
"""

from __future__ import annotations

import sys
import typing
from typing import Any

import betterproto
import grpclib.const
import pytest
from grpclib.encoding.proto import ProtoCodec
from pyasic.web.braiins_os.proto.braiins.bos import v1 as bos

from siteagent.drivers.backends import braiins_wire as wire

RECHECK = "re-check drivers/backends/braiins_wire.py"

# A value of each wire type, to put a field on the wire alone.
SAMPLE = {wire.VARINT: 7, wire.FIXED64: 1.5}


def _changed(what: str) -> str:
    return f"pyasic's braiins proto changed: {what}; {RECHECK}"


def _sample(cls: Any, name: str, wire_type: int) -> Any:
    """A value for field ``name`` of ``cls`` that puts it on the wire."""
    if wire_type != wire.LEN:
        return SAMPLE[wire_type]
    # A submessage: pyasic's own class for it, empty, as decoded (betterproto sends a
    # message it decoded, however empty).
    field_type = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))[name]
    return field_type.FromString(b"")


@pytest.mark.parametrize(
    ("cls", "name", "number", "wire_type", "group"),
    wire.FIELDS,
    ids=[f"{c.__name__}.{n}" for c, n, *_ in wire.FIELDS],
)
def test_each_field_read_is_where_pyasics_proto_puts_it(
    cls: Any, name: str, number: int, wire_type: int, group: str | None
) -> None:
    try:
        value = _sample(cls, name, wire_type)
        data = bytes(cls(**{name: value}))
    except (TypeError, AttributeError, KeyError) as e:
        pytest.fail(_changed(f"{cls.__name__} has no field {name!r} ({e!r})"))
    tag = (number << 3) | wire_type
    assert data[:1] == bytes([tag]), _changed(
        f"{cls.__name__}.{name} is no longer field {number} of wire type {wire_type} "
        f"(encoded as {data.hex()})"
    )
    if group is not None:
        assert betterproto.which_one_of(cls(**{name: value}), group)[0] == name, _changed(
            f"{cls.__name__}.{name} is no longer in oneof {group!r}"
        )


SERVICES = (
    bos.MinerServiceBase,
    bos.PerformanceServiceBase,
    bos.CoolingServiceBase,
    bos.AuthenticationServiceBase,
)


def test_each_route_is_pyasics_with_its_request_and_reply_types() -> None:
    # ``__mapping__`` is what grpclib's server serves a generated service by.
    served: dict[str, Any] = {}
    for service in SERVICES:
        served.update(service().__mapping__())
    for route in wire.ROUTES:
        handler = served.get(route.path)
        assert handler is not None, _changed(f"no method {route.path}")
        assert handler.cardinality is grpclib.const.Cardinality.UNARY_UNARY, _changed(
            f"{route.path} is {handler.cardinality.name}"
        )
        assert handler.request_type is route.request, _changed(
            f"{route.path} takes {handler.request_type.__name__}"
        )
        assert handler.reply_type is route.reply, _changed(
            f"{route.path} answers {handler.reply_type.__name__}"
        )


def test_grpclibs_codec_decodes_a_reply_through_its_type() -> None:
    # The driver's channel uses grpclib's default codec, ProtoCodec, which decodes with
    # ``reply_type.FromString`` (grpclib's IProtoMessage; the decoded types never
    # encode, so they have only that half).
    data = bytes(bos.GetMinerDetailsResponse(status=bos.MinerStatus.NORMAL))
    decoded: Any = ProtoCodec().decode(data, typing.cast(Any, wire.MinerDetails))
    assert decoded == wire.MinerDetails(status=int(bos.MinerStatus.NORMAL)), (
        f"grpclib's ProtoCodec no longer decodes through FromString; {RECHECK}"
    )


# -- each reply as pyasic's own type reads it, full and with parts left off the wire ---

GHS = bos.GigaHashrate(gigahash_per_second=140_000.0)
POWER = bos.Power(watt=3010)


def _stats(msg: bos.GetMinerStatsResponse) -> wire.MinerStats:
    """What a reading reads of pyasic's own decoded GetMinerStatsResponse."""
    on = betterproto.serialized_on_wire
    ps, ms = msg.power_stats, msg.miner_stats
    power = ps.approximated_consumption
    return wire.MinerStats(
        power_w=power.watt if on(ps) and on(power) else None,
        hashrate_ghs=(
            ms.real_hashrate.last_5_s.gigahash_per_second
            if on(ms) and on(ms.real_hashrate)
            else None
        ),
    )


def _mode(msg: bos.PerformanceMode) -> wire.PerformanceMode:
    on = betterproto.serialized_on_wire
    if betterproto.which_one_of(msg, "mode")[0] != "tuner_mode" or not on(msg.tuner_mode):
        return wire.PerformanceMode(target_w=None)
    tuner = msg.tuner_mode
    if betterproto.which_one_of(tuner, "target")[0] != "power_target":
        return wire.PerformanceMode(target_w=None)
    target = tuner.power_target
    if not on(target) or not on(target.power_target):
        return wire.PerformanceMode(target_w=None)
    return wire.PerformanceMode(target_w=target.power_target.watt)


def _cooling(msg: bos.GetCoolingStateResponse) -> wire.CoolingState:
    return wire.CoolingState(degree_c=msg.highest_temperature.temperature.degree_c)


def _details(msg: bos.GetMinerDetailsResponse) -> wire.MinerDetails:
    return wire.MinerDetails(status=int(msg.status))


READ_AS = {
    bos.GetMinerStatsResponse: _stats,
    bos.PerformanceMode: _mode,
    bos.GetCoolingStateResponse: _cooling,
    bos.GetMinerDetailsResponse: _details,
}
TUNER = bos.TunerPerformanceMode(
    power_target=bos.PowerTargetMode(power_target=bos.Power(watt=2500))
)
REPLIES = [
    bos.GetMinerStatsResponse(
        pool_stats=bos.PoolStats(accepted_shares=7),
        miner_stats=bos.WorkSolverStats(
            real_hashrate=bos.RealHashrate(last_5_s=GHS, last_15_s=GHS, last_1_m=GHS),
            nominal_hashrate=bos.GigaHashrate(gigahash_per_second=141_000.0),
            found_blocks=2,
        ),
        power_stats=bos.MinerPowerStats(
            approximated_consumption=POWER,
            efficiency=bos.PowerEfficiency(joule_per_terahash=21.5),
        ),
    ),
    bos.GetMinerStatsResponse(),
    bos.GetMinerStatsResponse(pool_stats=bos.PoolStats(accepted_shares=7)),
    bos.GetMinerStatsResponse(
        miner_stats=bos.WorkSolverStats(real_hashrate=bos.RealHashrate(last_15_s=GHS)),
        power_stats=bos.MinerPowerStats(approximated_consumption=bos.Power(watt=0)),
    ),
    bos.GetMinerStatsResponse(
        power_stats=bos.MinerPowerStats(approximated_consumption=bos.Power(watt=2**40))
    ),
    bos.PerformanceMode(tuner_mode=TUNER),
    bos.PerformanceMode(manual_mode=bos.ManualPerformanceMode()),
    bos.PerformanceMode(tuner_mode=bos.TunerPerformanceMode()),
    bos.PerformanceMode(
        tuner_mode=bos.TunerPerformanceMode(hashrate_target=bos.HashrateTargetMode())
    ),
    bos.PerformanceMode(tuner_mode=bos.TunerPerformanceMode(power_target=bos.PowerTargetMode())),
    bos.GetCoolingStateResponse(
        fans=[bos.FanState(position=0, rpm=4200)],
        highest_temperature=bos.TemperatureSensor(id=3, temperature=bos.Temperature(degree_c=71.5)),
    ),
    bos.GetCoolingStateResponse(fans=[bos.FanState(rpm=4200)]),
    bos.GetMinerDetailsResponse(
        uid="abc", hostname="m1", mac_address="02:00:00:00:00:01", status=bos.MinerStatus.PAUSED
    ),
    bos.GetMinerDetailsResponse(uid="abc"),
]
DECODED_AS = {route.reply: route.decoded_as for route in wire.ROUTES}


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: f"{type(r).__name__}:{bytes(r).hex()}")
def test_a_reply_decodes_as_pyasics_own_type_reads(reply: Any) -> None:
    data = bytes(reply)
    expected = READ_AS[type(reply)](type(reply).FromString(data))
    got = DECODED_AS[type(reply)].FromString(data)
    assert got == expected, _changed(f"{type(reply).__name__} {data.hex()} reads as {got}")


def test_a_oneof_member_sent_last_wins_as_in_pyasics_type() -> None:
    # Protobuf: of a oneof's members on the wire, the last one sent is the one set.
    tuner, manual = (
        bytes(bos.PerformanceMode(tuner_mode=TUNER)),
        bytes(bos.PerformanceMode(manual_mode=bos.ManualPerformanceMode())),
    )
    for data in (tuner + manual, manual + tuner):
        expected = _mode(bos.PerformanceMode.FromString(data))
        assert wire.PerformanceMode.FromString(data) == expected


def test_a_submessage_sent_twice_is_merged_as_in_pyasics_type() -> None:
    power = bytes(
        bos.GetMinerStatsResponse(power_stats=bos.MinerPowerStats(approximated_consumption=POWER))
    )
    hashrate = bytes(
        bos.GetMinerStatsResponse(
            miner_stats=bos.WorkSolverStats(real_hashrate=bos.RealHashrate(last_5_s=GHS))
        )
    )
    data = power + hashrate + bytes(bos.GetMinerStatsResponse(power_stats=bos.MinerPowerStats()))
    expected = _stats(bos.GetMinerStatsResponse.FromString(data))
    assert wire.MinerStats.FromString(data) == expected == wire.MinerStats(3010, 140_000.0)


@pytest.mark.parametrize(
    "data",
    [b"\x1a\x05\x0a\x02", b"\x1a", b"\xff" * 11, b"\x1b", b"\x1a\x02\x08\x80"],
    ids=["truncated", "no-length", "long-varint", "group", "truncated-varint"],
)
def test_a_reply_that_is_not_protobuf_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed MinerStats reply"):
        wire.MinerStats.FromString(data)
