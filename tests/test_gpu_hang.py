"""A hung GPU node under the real loop: bounded by the read's timeout, counted at its worst
case, and no task left with an exception nobody retrieved."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from siteagent.agent.config import gpu_device_id, parse_config
from siteagent.agent.control.gpus import GpuDevice, GpuNode
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.domain import DeviceKind, DeviceState
from siteagent.domain.errors import DeviceUnreachable
from siteagent.drivers.gpu import GpuInfo, GpuNodeDriver, GpuReading
from siteagent.sim.gpu import SimGpuSite

GPU_BASE = "127.2.216.1"  # this module's own loopback range
TIMEOUT_S = 0.4
NEVER_RETRIEVED = "exception was never retrieved"


@pytest.fixture
async def gpus() -> AsyncIterator[SimGpuSite]:
    async with SimGpuSite(1, 4, base_address=GPU_BASE, port=0, seed=11) as s:
        yield s


async def make_agent(gpus: SimGpuSite) -> Agent:
    node = gpus.inventory()[0]
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000},
            "gpu_nodes": [
                {
                    "id": "gpu-h",
                    "host": node["address"],
                    "port": node["port"],
                    "username": node["username"],
                    "client_key": node["client_key"],
                    "known_hosts": node["known_hosts"],
                    "gpus": node["gpus"],
                    "overhead_w": node["overhead_w"],
                }
            ],
            "telemetry": {"interval_s": 60, "timeout_s": TIMEOUT_S},
            "control": {"interval_s": 60},
        }
    )
    return Agent(cfg, await build_devices(cfg))


async def sweep_now(agent: Agent) -> None:
    """A sweep that reads every device now, whatever its back-off says."""
    for link in agent.fleet.links():
        link.next_read_s = 0.0
    await agent.sweep()


class _Drops(logging.Handler):
    """Counts the SSH driver's "dropped" lines: it drops the connection when its command
    times out, the moment the node's shared read fails on its own."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "dropped" in record.getMessage():
            self.count += 1
            self.changed.set()

    async def reach(self, count: int) -> None:
        """Wait until ``count`` drops were logged, then let the task's callbacks run."""
        async with asyncio.timeout(30):  # a guard against a hang, not a measure of speed
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.sleep(0)


@pytest.fixture
def drops() -> Iterator[_Drops]:
    handler = _Drops()
    logger = logging.getLogger("siteagent.drivers.ssh")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def never_retrieved(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    """Whatever asyncio said about task exceptions nobody retrieved (log or stderr)."""
    gc.collect()  # asyncio says it when the task is collected
    logged = [r.getMessage() for r in caplog.records if NEVER_RETRIEVED in r.getMessage()]
    err = capfd.readouterr().err
    return "\n".join(logged) + (err if NEVER_RETRIEVED in err else "")


async def test_a_hung_node_over_several_sweeps_leaves_no_unretrieved_task(
    gpus: SimGpuSite,
    drops: _Drops,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    agent = await make_agent(gpus)
    await sweep_now(agent)
    gpu_ids = [gpu_device_id("gpu-h", i) for i in range(4)]
    assert all(agent.fleet[i].state is DeviceState.RUNNING for i in gpu_ids)
    device = agent.fleet[gpu_ids[0]].driver
    assert isinstance(device, GpuDevice)
    node = device.node
    await gpus.nodes[0].set_fault("hang")
    await asyncio.sleep(node.max_age_s)  # past the reading the GPUs share
    for sweep in range(1, 5):
        # The sweep returns although the node never answers: each GPU's read ends at
        # the read's timeout, while the node's shared read goes on to its own.
        await sweep_now(agent)
        for i in gpu_ids:
            assert agent.fleet[i].state is DeviceState.UNREACHABLE
            assert "no answer within" in (agent.fleet[i].last_error or "")
        await drops.reach(sweep)
        # A failed shared read is collected once the next sweep starts a new one.
        assert never_retrieved(caplog, capfd) == ""
    assert isinstance(node.last_error, DeviceUnreachable)  # the node kept the outcome
    snap = agent.snapshot()
    for d in snap.devices:
        if d.kind is DeviceKind.GPU:
            # Unconfirmed: counted at its worst case, the GPU's nameplate (max limit).
            assert d.state is DeviceState.UNREACHABLE
            assert d.budget_w == d.nameplate_power_w == 700.0
    # The node's GPUs failed together with the node's error: one line for the node,
    # not one per GPU, and not one per sweep.
    unreachable = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "unreachable" in r.getMessage()
    ]
    assert len(unreachable) == 1, [r.getMessage() for r in unreachable]
    await gpus.nodes[0].set_fault("none")
    await sweep_now(agent)
    assert all(agent.fleet[i].state is DeviceState.RUNNING for i in gpu_ids)
    await close_drivers(agent.fleet.links())
    assert never_retrieved(caplog, capfd) == ""


async def test_a_node_hung_from_the_start_shares_one_connect_and_leaves_nothing_unretrieved(
    gpus: SimGpuSite,
    drops: _Drops,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    await gpus.nodes[0].set_fault("hang")
    agent = await make_agent(gpus)
    gpu_ids = [gpu_device_id("gpu-h", i) for i in range(4)]
    for sweep in range(1, 4):
        await sweep_now(agent)
        for i in gpu_ids:
            t = agent.fleet[i]
            assert t.driver is None and t.state is DeviceState.UNREACHABLE
        await drops.reach(sweep)
        assert never_retrieved(caplog, capfd) == ""
    # Never read: each GPU counts at its nameplate.
    for d in agent.snapshot().devices:
        if d.kind is DeviceKind.GPU:
            assert d.budget_w == d.nameplate_power_w == 700.0
    await gpus.nodes[0].set_fault("none")
    await sweep_now(agent)
    assert all(agent.fleet[i].state is DeviceState.RUNNING for i in gpu_ids)
    await close_drivers(agent.fleet.links())


class _BuggyDriver:
    """A node driver whose read fails with a bug (not a device error) once released."""

    node_id = "buggy"
    read_only = True

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def connect(self) -> list[GpuInfo]:
        return [GpuInfo(0, "GPU-0", "test GPU", 100.0, 300.0, 300.0)]

    async def read(self) -> list[GpuReading]:
        await self.release.wait()
        raise ZeroDivisionError("a driver bug")

    async def set_power_limit(self, index: int, power_w: float) -> float:
        raise AssertionError("not called")

    async def drain(self) -> None:
        pass

    async def undrain(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_driver_bug_after_every_reader_gave_up_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    driver = _BuggyDriver()
    assert isinstance(driver, GpuNodeDriver)
    node = GpuNode(driver)
    await node.connect()
    readers = [GpuDevice(f"buggy-gpu{i}", node, 0) for i in range(3)]
    for r in readers:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await r.read()
    driver.release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    bugs = [r for r in caplog.records if r.name == "siteagent.agent.control.gpus"]
    assert len(bugs) == 1 and bugs[0].levelno == logging.ERROR
    assert "buggy: read failed after every reader had given up" in bugs[0].getMessage()
    assert bugs[0].exc_info is not None and bugs[0].exc_info[0] is ZeroDivisionError
    del node, readers
    assert never_retrieved(caplog, capfd) == ""
