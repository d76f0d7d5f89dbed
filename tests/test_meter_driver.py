"""The meter driver against the simulated meter: a real pymodbus client and server on loopback.

Addresses: 127.3.0.0/16 (this module and test_sim_meter.py), port 502.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from siteagent.agent.config import ConfigError, MeterConfig, parse_config
from siteagent.drivers.meter import MeterDriver, MeterError, MeterReading, meter_driver
from siteagent.sim.meter import SIM_MAP, MeterTruth, SimMeter, energy_counter

SITE_W = 90_000.0
CAP_W = 100_000.0


class Clock:
    """A clock the test moves (the meter's energy count and frequency dips read it)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def meter_cfg(address: str, **keys: Any) -> MeterConfig:
    """A meter as the agent's config gives it (max_power_w filled from the site cap)."""
    cfg = parse_config(
        {"site": {"cap_w": CAP_W}, "meters": [{"id": "poi", "address": address, **keys}]}
    )
    return cfg.meters[0]


def truth(power_w: float = SITE_W) -> Callable[[], MeterTruth]:
    return energy_counter(lambda _t: power_w)


async def started(address: str, **kw: Any) -> SimMeter:
    m = SimMeter(kw.pop("truth", truth()), address, 502, **kw)
    await m.start()
    return m


@pytest.fixture
async def meters() -> AsyncIterator[list[Any]]:
    """Sim meters and drivers to stop and close after each test."""
    made: list[Any] = []
    yield made
    for x in made:
        await (x.close() if isinstance(x, MeterDriver) else x.stop())


def assert_near_truth(r: MeterReading, power_w: float = SITE_W) -> None:
    # The simulated meter adds 0.05 % noise per phase and rounds to its scale factor.
    assert r.power_w == pytest.approx(power_w, rel=2e-3)
    assert len(r.phase_w) == 3 and sum(r.phase_w) == pytest.approx(r.power_w, rel=1e-3)
    assert r.frequency_hz == pytest.approx(60.0, abs=0.02)
    assert r.energy_import_wh is not None and r.energy_import_wh >= 1_000_000.0


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_sunspec_discovery_finds_the_meter_at_each_base(base: int, meters: list[Any]) -> None:
    address = f"127.3.0.{1 + [40000, 0, 50000].index(base)}"
    meters.append(await started(address, base=base))
    drv = meter_driver(meter_cfg(address), clock=lambda: 42.0)
    meters.append(drv)
    r = await drv.read()
    assert r.time_s == 42.0
    assert_near_truth(r)
    # Common model 1 (66 registers + 2) sits between the marker and the meter model.
    assert drv.layout == f"SunSpec model 203 at {base + 2 + 68}"


async def test_float_model_213_reads_the_same_site(meters: list[Any]) -> None:
    meters.append(await started("127.3.0.4", model=213))
    drv = meter_driver(meter_cfg("127.3.0.4"))
    meters.append(drv)
    assert_near_truth(await drv.read())
    assert drv.layout == "SunSpec model 213 at 40070"


async def test_a_configured_base_skips_discovery_and_a_wrong_one_says_so(
    meters: list[Any],
) -> None:
    meters.append(await started("127.3.0.5", base=50000))
    right = meter_driver(meter_cfg("127.3.0.5", sunspec_base=50000))
    wrong = meter_driver(meter_cfg("127.3.0.5", sunspec_base=40000))
    meters += [right, wrong]
    assert_near_truth(await right.read())
    with pytest.raises(MeterError) as e:
        await wrong.read()
    assert e.value.kind == "map" and "no SunSpec marker 'SunS' at 40000" in e.value.reason


def map_keys(
    drop: tuple[str, ...] = (), shift: int = 0, **changes: dict[str, Any]
) -> dict[str, Any]:
    """The simulator's register map as [meters.map] keys: some dropped, moved or changed."""
    return {
        q: {**reg, "address": reg["address"] + shift, "function": "input", **changes.get(q, {})}
        for q, reg in SIM_MAP.items()
        if q not in drop
    }


async def test_a_register_map_reads_little_word_order_int32_with_a_scale(
    meters: list[Any],
) -> None:
    meters.append(await started("127.3.0.6", model="map"))
    drv = meter_driver(meter_cfg("127.3.0.6", kind="map", map=map_keys()))
    meters.append(drv)
    assert_near_truth(await drv.read())
    # The same registers read big-endian word first are a power no site draws.
    swapped = map_keys(power_w={"word_order": "big"})
    drv_big = meter_driver(meter_cfg("127.3.0.6", kind="map", map=swapped))
    meters.append(drv_big)
    with pytest.raises(MeterError) as e:
        await drv_big.read()
    assert e.value.kind == "garbage"
    assert "beyond max_power_w = 200000 W (check the map)" in e.value.reason


WRONG_MAPS = [
    # Registers the meter does not have.
    ("127.3.0.7", map_keys(power_w={"address": 2000}), "map", "input registers 2000-2001 refused"),
    # Everything one register late: the power straddles two values.
    ("127.3.0.8", map_keys(drop=("energy_import_wh",), shift=1), "garbage", "beyond max_power_w"),
    # The frequency read from half of a power value.
    (
        "127.3.0.9",
        map_keys(drop=("phase_a_w", "phase_b_w", "phase_c_w"), frequency_hz={"address": 1007}),
        "garbage",
        "Hz is outside 40-70 Hz (check the map)",
    ),
    # A plausible power that is really phase A: the phases give it away.
    (
        "127.3.0.12",
        map_keys(drop=("phase_a_w",), power_w={"address": 1002}),
        "garbage",
        "phases add up to 6",
    ),
]


@pytest.mark.parametrize(("address", "regmap", "kind", "words"), WRONG_MAPS)
async def test_a_map_pointing_at_the_wrong_registers_is_named(
    address: str, regmap: dict[str, Any], kind: str, words: str, meters: list[Any]
) -> None:
    meters.append(await started(address, model="map"))
    drv = meter_driver(meter_cfg(address, kind="map", map=regmap))
    meters.append(drv)
    with pytest.raises(MeterError) as e:
        await drv.read()
    assert e.value.kind == kind and words in e.value.reason, e.value


async def test_a_meter_without_sunspec_is_not_taken_for_one(meters: list[Any]) -> None:
    meters.append(await started("127.3.0.10", model="map"))
    drv = meter_driver(meter_cfg("127.3.0.10"))
    meters.append(drv)
    with pytest.raises(MeterError) as e:
        await drv.read()
    assert e.value.kind == "map" and "no SunSpec marker 'SunS' at 40000, 0, 50000" in e.value.reason


async def test_nothing_listening_is_unreachable() -> None:
    drv = meter_driver(meter_cfg("127.3.0.11"))
    with pytest.raises(MeterError) as e:
        await drv.read()
    assert e.value.kind == "unreachable" and "127.3.0.11:502" in e.value.reason
    await drv.close()


FAULTS = [
    (203, "garbage", {}, "garbage", "W (register 40088) is 0x8000, not implemented"),
    (213, "garbage", {"what": "nan"}, "garbage", "W (registers 40098-40099) is nan"),
    (203, "garbage", {"what": "scale"}, "garbage", "beyond max_power_w = 200000 W"),
    (213, "garbage", {"what": "scale"}, "garbage", "beyond max_power_w = 200000 W"),
    (203, "garbage", {"what": "negative"}, "garbage", "negative on an import-only connection"),
    (203, "frozen", {}, "frozen", "the same answer 10 times in a row"),
    (203, "unreachable", {}, "unreachable", "closed the connection"),
    (203, "unreachable", {"mode": "silent"}, "timeout", "no answer within timeout_s = 0.2 s"),
]


@pytest.mark.parametrize(("model", "fault", "options", "kind", "words"), FAULTS)
async def test_each_fault_is_a_meter_error_and_the_driver_recovers_after_clear(
    model: int,
    fault: str,
    options: dict[str, Any],
    kind: str,
    words: str,
    meters: list[Any],
) -> None:
    address = f"127.3.0.{20 + FAULTS.index((model, fault, options, kind, words))}"
    sim = await started(address, model=model)
    drv = meter_driver(meter_cfg(address, timeout_s=0.2))
    meters += [sim, drv]
    assert_near_truth(await drv.read())
    await sim.set_fault(fault, **options)
    with pytest.raises(MeterError) as e:
        for _ in range(10):  # a frozen meter shows only after frozen_after_reads answers
            await drv.read()
    assert e.value.kind == kind and words in e.value.reason, e.value
    await sim.set_fault("clear")
    assert_near_truth(await drv.read())


async def test_negative_power_is_a_reading_where_export_is_allowed(meters: list[Any]) -> None:
    sim = await started("127.3.0.40")
    drv = meter_driver(meter_cfg("127.3.0.40", import_only=False))
    meters += [sim, drv]
    await sim.set_fault("garbage", what="negative")
    assert (await drv.read()).power_w == pytest.approx(-SITE_W, rel=2e-3)


async def test_a_frequency_dip_is_read_then_passes(meters: list[Any]) -> None:
    clock = Clock()
    sim = await started("127.3.0.41", clock=clock)
    drv = meter_driver(meter_cfg("127.3.0.41"))
    meters += [sim, drv]
    await sim.set_fault("frequency_dip", hz=59.5, duration_s=0.5)
    r = await drv.read()
    assert r.frequency_hz == pytest.approx(59.5, abs=0.02)
    clock.t += 0.6
    r = await drv.read()
    assert r.frequency_hz == pytest.approx(60.0, abs=0.02)


async def test_the_energy_count_follows_the_power(meters: list[Any]) -> None:
    clock = Clock()
    sim = await started("127.3.0.42", truth=energy_counter(lambda _t: 36_000.0, clock))
    drv = meter_driver(meter_cfg("127.3.0.42"))
    meters += [sim, drv]
    before = (await drv.read()).energy_import_wh
    clock.t += 100.0  # 36 kW for 100 s: 1000 Wh
    after = (await drv.read()).energy_import_wh
    assert before is not None and after is not None
    assert after - before == pytest.approx(1000.0, abs=1.0)


def problems(meters: list[dict[str, Any]], domains: list[dict[str, Any]] | None = None) -> str:
    doc: dict[str, Any] = {"site": {"cap_w": CAP_W}, "meters": meters}
    if domains:
        doc["domains"] = domains
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    return str(e.value)


def test_config_names_a_bad_map() -> None:
    no_map = problems([{"id": "m", "address": "10.0.0.9", "kind": "map"}])
    assert "meters[0]: found kind = 'map' without a [meters.map] table" in no_map
    no_power = problems(
        [
            {
                "id": "m",
                "address": "10.0.0.9",
                "kind": "map",
                "map": {"frequency_hz": SIM_MAP["frequency_hz"]},
            }
        ]
    )
    assert "meters[0].map.power_w: found nothing; expected this key is required" in no_power
    bad = {**SIM_MAP, "power_w": {**SIM_MAP["power_w"], "type": "int24", "scale": 0}, "volts": {}}
    text = problems([{"id": "m", "address": "10.0.0.9", "kind": "map", "map": bad}])
    assert "meters[0].map.power_w.type: found 'int24'" in text
    assert "meters[0].map.power_w.scale: found 0; expected a non-zero factor" in text
    assert "meters[0].map.volts: found unknown key 'volts'" in text
    overlap = {**SIM_MAP, "phase_a_w": {**SIM_MAP["phase_a_w"], "address": 1001}}
    text = problems([{"id": "m", "address": "10.0.0.9", "kind": "map", "map": overlap}])
    assert "found power_w (registers 1000-1001) and phase_a_w (from 1001) overlapping" in text


def test_config_names_an_unknown_domain_and_two_meters_on_one() -> None:
    text = problems(
        [
            {"id": "poi", "address": "10.0.0.9"},
            {"id": "feeder", "address": "10.0.0.10", "domain": "feeder-b"},
            {"id": "poi-2", "address": "10.0.0.11", "domain": "site"},
            {"id": "a", "address": "10.0.0.12", "domain": "feeder-a"},
            {"id": "a2", "address": "10.0.0.13", "domain": "feeder-a"},
        ],
        domains=[{"id": "feeder-a", "limit_w": 50_000}],
    )
    assert (
        "meters[1].domain: found 'feeder-b'; expected 'site' (the whole site) or one of "
        "['feeder-a']" in text
    )
    assert "meters[2].domain: found 'site', also the domain of meters[0]" in text
    assert "meters[4].domain: found 'feeder-a', also the domain of meters[3]" in text
    assert "3 problem(s)" in text


def test_config_checks_timing_and_fills_bounds_from_the_domain_cap() -> None:
    text = problems([{"id": "m", "address": "10.0.0.9", "timeout_s": 2.0}])
    assert "meters[0]: found timeout_s 2 > interval_s 1" in text
    text = problems([{"id": "m", "address": "10.0.0.9", "stale_after_s": 1.0}])
    assert "meters[0]: found stale_after_s 1 <= interval_s 1" in text
    cfg = parse_config(
        {
            "site": {"cap_w": CAP_W},
            "domains": [{"id": "feeder-a", "limit_w": 40_000}],
            "meters": [
                {"id": "poi", "address": "10.0.0.9", "interval_s": 2.0},
                {"id": "fa", "address": "10.0.0.10", "domain": "feeder-a", "max_power_w": 1e5},
            ],
        }
    )
    poi, feeder = cfg.meters
    assert (poi.max_power_w, poi.stale_after_s) == (2 * CAP_W, 6.0)
    assert (feeder.max_power_w, feeder.stale_after_s) == (1e5, 3.0)
    cfg = parse_config(
        {
            "site": {"cap_w": CAP_W},
            "domains": [{"id": "feeder-a", "limit_w": 40_000}],
            "meters": [{"id": "fa", "address": "10.0.0.10", "domain": "feeder-a"}],
        }
    )
    assert cfg.meters[0].max_power_w == 80_000


async def test_reads_at_once_share_one_connection_and_one_discovery(meters: list[Any]) -> None:
    sim = await started("127.3.0.43")
    drv = meter_driver(meter_cfg("127.3.0.43"))
    meters += [sim, drv]
    readings = await asyncio.gather(*(drv.read() for _ in range(5)))
    assert all(r.power_w == pytest.approx(SITE_W, rel=2e-3) for r in readings)
    # Discovery is three requests (marker, common model header, meter model header), then
    # one block per read: a second discovery or connection would show here.
    assert sim.requests == 3 + 5


async def test_the_daemon_hears_an_unreachable_meter_from_the_agent_not_per_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # pymodbus warns on every failed connect: at a 1 s interval, a line a second in the
    # journal. The agent's meter state says it once (agent/control/meter.py).
    from siteagent.agent.tools.cli import _setup_logging

    _setup_logging("info")
    drv = meter_driver(meter_cfg("127.3.0.12"))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            with pytest.raises(MeterError):
                await drv.read()
    await drv.close()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pymodbus")] == []
