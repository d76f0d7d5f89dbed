"""Remote GPU driver against simulated nodes over real SSH on loopback: reads, control, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from siteagent.domain.errors import (
    DeviceFaulted,
    DeviceLost,
    DevicePermissionError,
    DeviceUnreachable,
)
from siteagent.drivers.gpu import GpuNodeDriver
from siteagent.drivers.ssh import AuthenticationRefused, HostKeyRefused, SshNodeDriver
from siteagent.sim.gpu import LEGACY_UNKNOWN_FIELDS, SimGpuNode, SimGpuSite

BASE = "127.2.20.1"  # this module's own loopback range


@pytest.fixture
async def site() -> AsyncIterator[SimGpuSite]:
    async with SimGpuSite(2, 4, base_address=BASE, seed=3) as s:
        yield s


def make(site: SimGpuSite, node: SimGpuNode, **kw: Any) -> SshNodeDriver:
    opts: dict[str, Any] = {
        "port": node.port,
        "username": site.username,
        "client_keys": [site.client_key_path],
        "known_hosts": site.known_hosts_path,
        "command_timeout_s": 0.5,
        "connect_timeout_s": 1.0,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 1.0,
    }
    opts.update(kw)
    return SshNodeDriver(f"node-{node.address}", node.address, **opts)


async def test_connect_enumerates_and_reads_si_units(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(site, node)
    assert isinstance(d, GpuNodeDriver)
    infos = await d.connect()
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
    assert infos[0].uuid == node.gpus[0].uuid
    assert (infos[0].power_limit_min_w, infos[0].power_limit_max_w) == (200.0, 700.0)
    assert d.read_only is False
    readings = await d.read()
    assert len(readings) == 4
    for r, g in zip(readings, node.gpus, strict=True):
        assert r.power_w is not None and 70.0 <= r.power_w <= 700.0
        assert r.power_w == pytest.approx(g.power_w(time.monotonic()), abs=10)
        assert r.energy_j is not None and r.energy_j > 1e5
        assert r.power_limit_w == 700.0 and r.enforced_power_limit_w == 700.0
        assert r.utilization_frac is not None and 0.0 <= r.utilization_frac <= 1.0
        assert r.memory_used_bytes is not None and r.memory_used_bytes > 2**30
        assert r.temperature_c is not None
    await d.read()
    assert d.link.connects == 1  # one persistent connection
    await d.close()


async def test_set_power_limit_clamps_writes_changes_and_draw_follows(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(site, node)
    await d.connect()
    assert await d.set_power_limit(1, 5000.0) == 700.0  # already there: nothing sent
    assert await d.set_power_limit(1, 120.0) == 200.0
    assert await d.set_power_limit(1, 200.4) == 200.0
    pl = [c for c in node.commands if " -pl " in c and "-l " not in c]
    assert pl == ["sudo -n nvidia-smi -i 1 -pl 200"]
    assert node.gpus[1].power_limit_w == 200.0
    await asyncio.sleep(1.0)
    r = (await d.read())[1]
    assert r.power_limit_w == 200.0
    assert r.power_w is not None and r.power_w <= 200.0 * 1.03  # followed within about 1 s
    await d.close()


async def test_hang_times_out_then_recovers(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(site, node)
    await d.connect()
    await node.set_fault("hang")
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachable, match="did not finish"):
        await d.read()
    assert time.monotonic() - t0 < 1.5
    await node.set_fault("none")
    assert len(await d.read()) == 4  # reconnected
    assert d.link.connects == 2
    await d.close()


async def test_disconnect_backs_off_and_reconnects(site: SimGpuSite) -> None:
    node = site.nodes[1]
    d = make(site, node)
    await d.connect()
    await node.set_fault("disconnect")
    with pytest.raises(DeviceUnreachable):
        await d.read()
    with pytest.raises(DeviceUnreachable):
        await d.read()  # connect refused: first failure, backoff starts
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachable, match="next attempt in"):
        await d.read()  # inside the backoff: no attempt at all
    assert time.monotonic() - t0 < 0.1
    await node.set_fault("none")
    await asyncio.sleep(0.25)
    assert len(await d.read()) == 4
    assert d.link.connects == 2 and d.link.failures == 0
    await d.close()


async def test_sudo_refused_at_connect_is_read_only(site: SimGpuSite) -> None:
    node = site.nodes[0]
    await node.set_fault("sudo_refused")
    d = make(site, node)
    await d.connect()
    assert d.read_only is True
    assert d.read_only_reason is not None and "password is required" in d.read_only_reason
    with pytest.raises(DevicePermissionError, match="read-only"):
        await d.set_power_limit(0, 300.0)
    assert not any(" -pl " in c and "-l " not in c for c in node.commands)  # never tried
    assert len(await d.read()) == 4  # reading still works
    await d.close()


async def test_sudo_refused_later_marks_the_node_read_only(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(site, node)
    await d.connect()
    assert d.read_only is False
    await node.set_fault("sudo_refused")
    with pytest.raises(DevicePermissionError, match="password is required"):
        await d.set_power_limit(2, 300.0)
    assert d.read_only is True
    assert node.gpus[2].power_limit_w == 700.0
    await d.close()


async def test_gpu_lost(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(site, node)
    await d.connect()
    await node.set_fault("gpu_lost", gpu=2)
    with pytest.raises(DeviceLost, match=r"00000000:38:00.0: GPU is lost"):
        await d.read()
    with pytest.raises(DeviceLost):
        await d.set_power_limit(2, 300.0)
    await node.set_fault("none")
    assert len(await d.read()) == 4
    await d.close()


async def test_changed_host_key_refuses_the_node(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(site, node)
    await d.connect()
    await node.set_fault("host_key_changed")
    with pytest.raises(DeviceUnreachable):
        await d.read()  # the old connection is gone
    await asyncio.sleep(0.25)
    with pytest.raises(HostKeyRefused) as ei:
        await d.read()
    msg = str(ei.value)
    assert node.address in msg and str(site.known_hosts_path) in msg
    assert isinstance(ei.value, DeviceUnreachable)
    site.write_known_hosts()  # the operator verified and accepted the new key
    await asyncio.sleep(1.0)
    assert len(await d.read()) == 4
    await d.close()


async def test_unknown_host_and_missing_known_hosts_are_refused(
    site: SimGpuSite, tmp_path: Path
) -> None:
    node = site.nodes[0]
    other = tmp_path / "known_hosts"
    other.write_text(
        f"[{site.nodes[1].address}]:{site.nodes[1].port} {site.nodes[1].host_key_line}\n"
    )
    with pytest.raises(HostKeyRefused, match=str(other)):
        await make(site, node, known_hosts=other).connect()
    missing = tmp_path / "nope"
    with pytest.raises(HostKeyRefused, match="does not exist"):
        await make(site, node, known_hosts=missing).connect()
    with pytest.raises(ValueError, match="always verified"):
        make(site, node, known_hosts="")


async def test_wrong_user_is_refused(site: SimGpuSite) -> None:
    with pytest.raises(AuthenticationRefused, match="mallory"):
        await make(site, site.nodes[0], username="mallory").connect()


async def test_older_nvidia_smi_without_a_field(site: SimGpuSite) -> None:
    node = site.nodes[1]
    node.unknown_fields = set(LEGACY_UNKNOWN_FIELDS)
    d = make(site, node)
    await d.connect()
    r = (await d.read())[0]
    assert r.energy_j is None and r.power_w is not None
    queries = [c for c in node.commands if "--query-gpu" in c]
    assert "total_energy_consumption" in queries[0]
    assert all("total_energy_consumption" not in q for q in queries[1:])  # retried once, then not
    await d.close()


async def test_na_and_not_supported_read_as_none(site: SimGpuSite) -> None:
    node = site.nodes[1]
    node.placeholders = {"temperature.gpu": "[N/A]", "enforced.power.limit": "[Not Supported]"}
    d = make(site, node)
    await d.connect()
    r = (await d.read())[0]
    assert r.temperature_c is None and r.enforced_power_limit_w is None
    assert r.power_limit_w == 700.0
    await d.close()


async def test_drain_and_undrain_hooks(site: SimGpuSite) -> None:
    node = site.nodes[0]
    d = make(
        site,
        node,
        drain_command="sudo -n systemctl stop vllm",
        undrain_command="sudo -n systemctl start vllm",
    )
    await d.connect()
    await d.drain()
    assert node.drained
    await d.undrain()
    assert not node.drained
    bad = make(site, node, drain_command="systemctl stop vllm")
    with pytest.raises(DeviceFaulted, match="Access denied"):
        await bad.drain()
    await make(site, node).drain()  # none configured: no-op
    await d.close()
    await bad.close()
