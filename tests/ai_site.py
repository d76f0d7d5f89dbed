"""A simulated GPU node with an inference server, on a clock the test moves (AI demand tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from siteagent.sim.gpu import SimGpuSite


class Clock:
    """Simulated time (s; from the afternoon's peak of demand): the sim and the agent follow it."""

    def __init__(self, t: float = 14 * 3600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def wall(self) -> datetime:
        """The wall clock that moves with it."""
        return datetime.fromtimestamp(1.7e9 + self.t, UTC)


@asynccontextmanager
async def node_site(base_address: str, seed: int) -> AsyncIterator[tuple[SimGpuSite, Clock]]:
    """One node of two GPUs serving vLLM's metrics on ``base_address``."""
    clock = Clock()
    site = SimGpuSite(1, 2, base_address=base_address, seed=seed, inference=True, clock=clock)
    await site.start()
    try:
        yield site, clock
    finally:
        await site.stop()


def node_config(site: SimGpuSite, **extra: Any) -> dict[str, Any]:
    """The node as ``gpu_nodes[0]`` of a config, its demand endpoint named."""
    n = site.inventory()[0]
    return {
        "id": "gpu-a",
        "host": n["address"],
        "port": n["port"],
        "username": n["username"],
        "client_key": n["client_key"],
        "known_hosts": n["known_hosts"],
        "gpus": n["gpus"],
        "overhead_w": n["overhead_w"],
        "demand_endpoint": site.nodes[0].metrics_url,
        **extra,
    }
