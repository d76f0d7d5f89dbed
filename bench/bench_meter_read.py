"""One meter read on loopback: latency and the reader's CPU, against a bare pymodbus read.

The simulated meter runs in its own process (its CPU is not the agent's); this
process reads it ``--reads`` times through ``MeterDriver.read()`` (one block
request, decoding, plausibility and frozen checks) and through a bare
``AsyncModbusTcpClient.read_holding_registers`` of the same block, the baseline.
It prints the median and 99th-percentile latency and the CPU per read of each,
and the driver's ratio to the baseline.

    python bench/bench_meter_read.py --reads 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient

from siteagent.agent.config import parse_config
from siteagent.drivers.meter import meter_driver
from siteagent.sim.meter import SimMeter, energy_counter

ADDRESS, PORT = "127.3.40.1", 5020


@dataclass(frozen=True)
class Figures:
    median_ms: float
    p99_ms: float
    cpu_us: float


async def serve(model: int | Literal["map"]) -> None:
    """Serve a simulated meter until killed."""
    meter = SimMeter(energy_counter(lambda _t: 1_500_000.0), ADDRESS, PORT, model=model)
    await meter.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def timed(fn: Callable[[], Awaitable[object]], reads: int) -> Figures:
    """Latency (ms) and this process's CPU (us) per call of ``fn``."""
    for _ in range(20):  # warm up: connection, discovery, caches
        await fn()
    lat = []
    cpu0 = time.process_time()
    for _ in range(reads):
        t = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    lat.sort()
    return Figures(
        1000 * statistics.median(lat), 1000 * lat[int(0.99 * (len(lat) - 1))], 1e6 * cpu / reads
    )


async def bench(model: str, reads: int) -> None:
    """Print the figures of one meter model."""
    keys: dict[str, object] = {"id": "poi", "address": ADDRESS, "port": PORT}
    if model == "map":
        keys |= {
            "kind": "map",
            "map": {
                "power_w": {"address": 1000, "type": "int32", "scale": 0.1, "word_order": "little"},
                "phase_a_w": {
                    "address": 1002,
                    "type": "int32",
                    "scale": 0.1,
                    "word_order": "little",
                },
                "phase_b_w": {
                    "address": 1004,
                    "type": "int32",
                    "scale": 0.1,
                    "word_order": "little",
                },
                "phase_c_w": {
                    "address": 1006,
                    "type": "int32",
                    "scale": 0.1,
                    "word_order": "little",
                },
                "frequency_hz": {"address": 1008, "type": "uint16", "scale": 0.01},
                "energy_import_wh": {"address": 1009, "type": "uint32", "word_order": "little"},
            },
        }
    cfg = parse_config({"site": {"cap_w": 2_000_000}, "meters": [keys]}).meters[0]
    # frozen_after_reads at its bound: this bench reads faster than the meter's noise moves.
    drv = meter_driver(cfg.model_copy(update={"frozen_after_reads": 100_000}))
    await drv.read()
    first, count = {"203": (40070, 55), "213": (40070, 70), "map": (1000, 11)}[model]
    raw = AsyncModbusTcpClient(ADDRESS, port=PORT)
    await raw.connect()

    async def bare() -> None:
        rr = await raw.read_holding_registers(first, count=count, device_id=1)
        assert not rr.isError()

    base = await timed(bare, reads)
    ours = await timed(drv.read, reads)
    raw.close()
    await drv.close()
    print(f"model {model}: {drv.layout}")
    for name, f in (("bare pymodbus read", base), ("MeterDriver.read()", ours)):
        print(
            f"  {name:20s} median {f.median_ms:6.3f} ms  p99 {f.p99_ms:6.3f} ms  "
            f"CPU {f.cpu_us:6.1f} us/read"
        )
    print(
        f"  ratio driver/bare: latency {ours.median_ms / base.median_ms:.2f}x, "
        f"CPU {ours.cpu_us / base.cpu_us:.2f}x"
    )


def main() -> None:
    """Run the bench for each model, each against its own server process."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--models", default="203,213,map")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve if args.serve == "map" else int(args.serve)))
        return
    for model in args.models.split(","):
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", model], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            asyncio.run(bench(model, args.reads))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
