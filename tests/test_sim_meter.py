"""The simulated site's ground truth (auxiliary load, under-reporting) and `siteagent sim --meter`.

Addresses: 127.3.0.0/16 (this module and test_meter_driver.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from siteagent.agent.config import parse_config
from siteagent.drivers.meter import MeterError, meter_driver
from siteagent.sim.aux import AuxLoad
from siteagent.sim.meter import SimMeter, energy_counter
from siteagent.sim.serve import SimServer
from siteagent.sim.site import SimSite


class Clock:
    def __init__(self, t: float = 5000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_no_aux_load_unless_asked_for() -> None:
    clock = Clock()
    site = SimSite(3, base_address="127.3.10.1", clock=clock)
    assert site.true_power_w() == site.total_power_w() > 0
    assert site.reported_power_w() == site.total_power_w()


def test_aux_load_follows_the_it_load_and_swings_within_its_drift() -> None:
    aux = AuxLoad(frac=0.3, drift_frac=0.3, period_s=600.0, seed=7)
    seen = [aux.power_w(100_000.0, t) / 30_000.0 for t in range(0, 1200, 5)]
    assert min(seen) >= 0.7 - 1e-9 and max(seen) <= 1.3 + 1e-9
    assert max(seen) - min(seen) > 0.3  # it does move: most of the ±30 % is used
    assert aux.power_w(50_000.0, 123.0) == pytest.approx(aux.power_w(100_000.0, 123.0) / 2)
    # Seeded: the same seed is the same weather, another seed another.
    again = AuxLoad(frac=0.3, drift_frac=0.3, period_s=600.0, seed=7)
    other = AuxLoad(frac=0.3, drift_frac=0.3, period_s=600.0, seed=8)
    assert aux.power_w(1e5, 321.0) == again.power_w(1e5, 321.0) != other.power_w(1e5, 321.0)
    with pytest.raises(ValueError, match="drift_frac"):
        AuxLoad(frac=0.3, drift_frac=1.5)


def test_the_site_truth_adds_aux_and_under_reporting_lowers_only_the_reports() -> None:
    clock = Clock()
    site = SimSite(
        4,
        base_address="127.3.10.1",
        clock=clock,
        backends=("antminer", "braiins"),
        aux=AuxLoad(frac=0.25, t0_s=clock()),
        under_report={"antminer": 0.1},
    )
    miners_w = site.total_power_w()
    assert site.true_power_w() == pytest.approx(1.25 * miners_w)
    assert site.true_power_w(other_it_w=10_000.0) == pytest.approx(1.25 * (miners_w + 10_000.0))
    for m in site.miners:
        frac = 0.1 if site.backend_of(m) == "antminer" else 0.0
        assert m.reported_power_w(clock()) == pytest.approx(m.power_w() * (1 - frac))
    server = SimServer(site, sample_s=1.0)
    reply = server.answer({"cmd": "power"})
    assert reply["site_power_w"] == pytest.approx(1.25 * miners_w)
    assert reply["aux_power_w"] == pytest.approx(0.25 * miners_w)
    assert reply["reported_power_w"] < miners_w
    with pytest.raises(ValueError, match="unknown backend"):
        SimSite(1, base_address="127.3.10.1", under_report={"stock": 0.1})


async def luxos_watts(address: str) -> int:
    """The power a LuxOS miner reports over its own RPC (port 4028)."""
    reader, writer = await asyncio.open_connection(address, 4028)
    writer.write(json.dumps({"command": "power"}).encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    watts: int = json.loads(raw.rstrip(b"\0"))["POWER"][0]["Watts"]
    return watts


async def test_an_under_reporting_firmware_says_so_over_its_protocol() -> None:
    site = SimSite(2, base_address="127.3.11.1", backends=("luxos",), under_report={"luxos": 0.1})
    await site.start()
    try:
        true_w = site.miners[0].power_w()
        assert await luxos_watts("127.3.11.1") == pytest.approx(0.9 * true_w, abs=1.0)
    finally:
        await site.stop()


async def sim(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.agent.tools.cli",
        "sim",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def ask(port: int, req: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(json.dumps(req).encode() + b"\n")
    await writer.drain()
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 10))
    writer.close()
    return reply


async def test_sim_meter_is_in_the_inventory_reads_the_truth_and_takes_faults() -> None:
    proc = await sim(
        "--miners", "3", "--base", "127.3.20.1",
        "--meter", "--meter-address", "127.3.21.1",
        "--aux-frac", "0.3", "--aux-drift-frac", "0.3", "--under-report", "braiins=0.1",
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        inv = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert inv["meters"] == [
            {
                "id": "poi",
                "address": "127.3.21.1",
                "port": 502,
                "unit_id": 1,
                "domain": "site",
                "model": 203,
            }
        ]
        control = inv["control"]["port"]
        cfg = parse_config(
            {"site": {"cap_w": 20_000}, "meters": [{"id": "poi", "address": "127.3.21.1"}]}
        )
        drv = meter_driver(cfg.meters[0])
        reading = await drv.read()
        truth = await ask(control, {"cmd": "power"})
        # The meter reads the true site (miners + 30 % cooling), not the miners' own reports.
        assert reading.power_w == pytest.approx(truth["site_power_w"], rel=0.01)
        assert truth["aux_power_w"] > 0 and truth["reported_power_w"] < reading.power_w
        reply = await ask(control, {"cmd": "fault", "meter": "poi", "fault": "garbage"})
        assert reply == {"ok": True}
        with pytest.raises(MeterError, match="0x8000"):
            await drv.read()
        reply = await ask(control, {"cmd": "fault", "meter": "127.3.21.1", "fault": "clear"})
        assert reply == {"ok": True} and (await drv.read()).power_w > 0
        reply = await ask(control, {"cmd": "fault", "meter": "poi", "fault": "melt"})
        assert "unknown meter fault 'melt'" in reply["error"]
        await drv.close()
    finally:
        proc.terminate()
        await proc.wait()


async def test_sim_refuses_a_bad_under_report_flag() -> None:
    proc = await sim("--miners", "1", "--base", "127.3.22.1", "--under-report", "stock=0.1")
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"'stock=0.1': expected BACKEND=FRAC" in err


@pytest.mark.parametrize("model", [203, 213])
async def test_a_scale_factor_too_small_reads_as_a_light_load(model: int) -> None:
    # Nothing in the meter's answer gives this one away: the loop must compare the
    # reading with the devices' own reports (a negative unexplained load).
    meter = SimMeter(
        energy_counter(lambda _t: 90_000.0), f"127.3.12.{model - 200}", 502, model=model
    )
    await meter.start()
    cfg = parse_config(
        {"site": {"cap_w": 100_000}, "meters": [{"id": "poi", "address": meter.address}]}
    )
    drv = meter_driver(cfg.meters[0])
    try:
        await meter.set_fault("garbage", what="scale_low")
        assert (await drv.read()).power_w == pytest.approx(90.0, rel=0.01)
    finally:
        await drv.close()
        await meter.stop()
