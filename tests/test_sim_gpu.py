"""Simulated GPU node: power and throughput model, nvidia-smi answers, `siteagent sim` inventory."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st

from siteagent.sim.gpu import (
    H100_SXM,
    LEGACY_UNKNOWN_FIELDS,
    Demand,
    GpuFault,
    SimGpu,
    SimGpuNode,
    capacity_frac,
)

CLIENT_PUB = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def node(clock: FakeClock | None = None, gpus: int = 2) -> SimGpuNode:
    return SimGpuNode(
        "127.2.30.1", gpus=gpus, seed=5, client_public_key=CLIENT_PUB, clock=clock or FakeClock()
    )


def test_capacity_is_flat_then_proportional_then_a_cliff() -> None:
    tdp = 700.0
    assert capacity_frac(700.0, tdp) == 1.0
    assert capacity_frac(0.8 * tdp, tdp) == 1.0
    assert capacity_frac(0.7 * tdp, tdp) == pytest.approx(0.9)
    assert capacity_frac(0.5 * tdp, tdp) == pytest.approx(0.7)
    above = capacity_frac(0.6 * tdp, tdp) - capacity_frac(0.5 * tdp, tdp)
    below = capacity_frac(0.5 * tdp, tdp) - capacity_frac(0.4 * tdp, tdp)
    assert below > 2 * above  # the cliff
    assert capacity_frac(200.0, tdp) < 0.2


@given(st.floats(0, 700), st.floats(0, 700))
def test_capacity_never_falls_as_the_limit_rises(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert 0.0 <= capacity_frac(lo, 700.0) <= capacity_frac(hi, 700.0) <= 1.0


def test_demand_is_seeded_bounded_and_varies() -> None:
    a, b = Demand(7), Demand(7)
    samples = [a.at(t) for t in range(0, 3600, 10)]
    assert samples == [b.at(t) for t in range(0, 3600, 10)]
    assert all(0.05 <= u <= 1.0 for u in samples)
    assert max(samples) - min(samples) > 0.1
    assert Demand(8).at(100) != a.at(100)


def test_draw_follows_min_of_limit_and_demand_within_a_second() -> None:
    g = SimGpu(0, H100_SXM, Demand(1), 1, now_s=0.0)
    demand_w = g.target_w(0.0)
    assert g.power_w(0.0) == pytest.approx(demand_w)
    assert demand_w > 300.0  # this seed's demand needs more than the limit set below
    before_w = g.power_w(10.0)
    g.set_power_limit(250.0, 10.0)
    assert g.power_w(10.0) == before_w > 300.0  # not instantly
    assert g.power_w(11.0) == pytest.approx(250.0, rel=0.03)  # within about a second
    assert g.utilization_frac(11.0) == 1.0  # demand exceeds what 250 W serves
    assert g.throughput_tps(11.0) == pytest.approx(
        H100_SXM.peak_tokens_per_s * capacity_frac(250.0, 700.0)
    )


def test_energy_integrates_the_draw() -> None:
    g = SimGpu(0, H100_SXM, Demand(1), 1, now_s=0.0)
    g.set_power_limit(200.0, 0.0)
    g.power_w(20.0)  # settled at 200 W
    e0 = g.energy_j(20.0)
    assert g.energy_j(30.0) - e0 == pytest.approx(2000.0, rel=1e-3)


def test_query_answers_like_nvidia_smi() -> None:
    n = node()
    r = n.run(
        "nvidia-smi --query-gpu=index,name,power.limit,memory.used --format=csv,noheader,nounits"
    )
    assert r.exit_status == 0
    lines = r.stdout.splitlines()
    assert lines[0] == "0, NVIDIA H100 80GB HBM3, 700.00, 73403"
    assert len(lines) == 2
    header = n.run("nvidia-smi --query-gpu=index --format=csv").stdout.splitlines()[0]
    assert header == "index"
    n.unknown_fields = set(LEGACY_UNKNOWN_FIELDS)
    r = n.run("nvidia-smi --query-gpu=index,total_energy_consumption --format=csv,noheader")
    assert r.exit_status == 2
    assert r.stdout == 'Field "total_energy_consumption" is not a valid field to query.\n\n'


async def test_lost_gpu_is_reported_as_nvidia_smi_does() -> None:
    n = node()
    await n.set_fault(GpuFault.GPU_LOST, gpu=1)
    r = n.run("nvidia-smi --query-gpu=index --format=csv,noheader,nounits")
    assert r.exit_status == 15
    assert r.stdout == "0\n"
    assert r.stderr.startswith("Unable to determine the device handle for GPU 00000000:28:00.0")


async def test_sudo_and_power_limit_commands() -> None:
    clock = FakeClock()
    n = node(clock)
    r = n.run("nvidia-smi -i 0 -pl 300")
    assert r.exit_status == 4 and "not permitted" in r.stdout
    assert (
        n.run("sudo -n -l nvidia-smi -i 0 -pl 300").stdout == "/usr/bin/nvidia-smi -i 0 -pl 300\n"
    )
    r = n.run("sudo -n nvidia-smi -i 0 -pl 300")
    assert r.exit_status == 0
    assert "was set to 300.00 W from 700.00 W" in r.stdout
    assert n.gpus[0].power_limit_w == 300.0 and n.gpus[1].power_limit_w == 700.0
    r = n.run("sudo -n nvidia-smi -i 0 -pl 100")
    assert r.exit_status != 0 and "is not a valid power limit" in r.stdout
    await n.set_fault("sudo_refused")
    r = n.run("sudo -n nvidia-smi -i 0 -pl 400")
    assert (r.exit_status, r.stderr) == (1, "sudo: a password is required\n")
    assert n.run("ls").exit_status == 127
    assert n.run("true").exit_status == 0


def test_node_power_includes_its_overhead() -> None:
    clock = FakeClock()
    n = node(clock, gpus=8)
    assert n.overhead_w == 1500.0
    assert n.power_w() == pytest.approx(1500.0 + sum(g.power_w(clock.t) for g in n.gpus))


async def test_serve_lists_gpu_nodes_an_operator_can_use(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.sim.serve",
        "--miners",
        "0",
        "--gpu-nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--gpu-base",
        "127.2.31.1",
        "--gpu-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        inv = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert inv["miners"] == [] and "control" in inv
        nodes = inv["gpu_nodes"]
        assert [n["address"] for n in nodes] == ["127.2.31.1", "127.2.31.2"]
        n0 = nodes[0]
        assert {"address", "port", "username", "client_key", "host_key"} <= n0.keys()
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[{n0['address']}]:{n0['port']} {n0['host_key']}\n")
        async with asyncssh.connect(
            n0["address"],
            n0["port"],
            username=n0["username"],
            client_keys=[n0["client_key"]],
            known_hosts=str(known_hosts),
            agent_path=None,
            config=None,
        ) as conn:
            r = await conn.run("nvidia-smi --query-gpu=index,power.draw --format=csv,noheader")
            assert r.exit_status == 0 and len(str(r.stdout).splitlines()) == 2
        reader, writer = await asyncio.open_connection(
            inv["control"]["host"], inv["control"]["port"]
        )
        writer.write(b'{"cmd": "power"}\n')
        power = json.loads(await reader.readline())
        assert power["gpu_power_w"] > 2 * 600.0
        assert power["site_power_w"] == pytest.approx(power["gpu_power_w"], rel=0.01)
        assert power["gpu_throughput_tps"] > 0
        writer.write(
            json.dumps({"cmd": "fault", "address": n0["address"], "fault": "sudo_refused"}).encode()
            + b"\n"
        )
        assert json.loads(await reader.readline()) == {"ok": True}
        writer.write(b'{"cmd": "stop"}\n')
        assert json.loads(await reader.readline()) == {"ok": True}
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
