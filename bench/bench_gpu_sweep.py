"""Time telemetry sweeps of simulated GPU nodes over SSH, against a trivial command.

Run: .venv/bin/python bench/bench_gpu_sweep.py [--nodes 125 --gpus-per-node 8 --sweeps 10]

Starts ``python -m sim.serve --miners 0 --gpu-nodes N`` in its own process (the
nodes are real asyncssh servers on loopback), writes a known_hosts file from the
inventory's host keys as an operator would, and drives one ``SshNodeDriver`` per
node. The first sweep connects (handshake + enumerate + sudo check); the later
ones reuse the connections and are what the goal (<= 2 s wall for 1,000 GPUs)
is about. The baseline is the same sweep of ``true`` over the same connections:
the ratio says how much nvidia-smi parsing and the model add to bare SSH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from siteagent.drivers.ssh import SshNodeDriver

GOAL_S = 2.0


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _dist(name: str, xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return (
        f"{name:<28} n={len(ms):<5} p50={_pct(ms, 0.5):7.1f} ms  p90={_pct(ms, 0.9):7.1f} ms  "
        f"p99={_pct(ms, 0.99):7.1f} ms  max={max(ms):7.1f} ms"
    )


async def _sweep(
    drivers: list[SshNodeDriver], one: Callable[[SshNodeDriver], Awaitable[Any]]
) -> tuple[float, list[float]]:
    """Run ``one`` on every node concurrently; wall time (s) and per-node latencies (s)."""
    lat: list[float] = []

    async def timed(d: SshNodeDriver) -> None:
        t0 = time.perf_counter()
        await one(d)
        lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(timed(d) for d in drivers))
    return time.perf_counter() - t0, lat


async def run(args: argparse.Namespace) -> int:
    """Start the sim, sweep, print the numbers; exit status 1 if the goal is missed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "siteagent.sim.serve",
        "--miners",
        "0",
        "--gpu-nodes",
        str(args.nodes),
        "--gpus-per-node",
        str(args.gpus_per_node),
        "--gpu-base",
        args.gpu_base,
        "--gpu-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    drivers: list[SshNodeDriver] = []
    try:
        t_start = time.perf_counter()
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        inventory = json.loads(line)
        nodes = inventory["gpu_nodes"]
        print(f"sim: {len(nodes)} nodes up in {time.perf_counter() - t_start:.2f} s")
        with tempfile.TemporaryDirectory() as tmp:
            known_hosts = Path(tmp) / "known_hosts"
            known_hosts.write_text(
                "".join(f"[{n['address']}]:{n['port']} {n['host_key']}\n" for n in nodes)
            )
            drivers = [
                SshNodeDriver(
                    f"gpu-node-{i:03d}",
                    n["address"],
                    port=n["port"],
                    username=n["username"],
                    client_keys=[n["client_key"]],
                    known_hosts=known_hosts,
                    command_timeout_s=10.0,
                    connect_timeout_s=30.0,
                )
                for i, n in enumerate(nodes)
            ]
            wall, lat = await _sweep(drivers, lambda d: d.connect())
            gpus = sum(len(d.infos) for d in drivers)
            print(f"first sweep (connect + enumerate + sudo -l): {wall:.3f} s wall, {gpus} GPUs")
            print(_dist("  per node", lat))

            reads: list[float] = []
            walls: list[float] = []
            for _ in range(args.sweeps):
                wall, lat = await _sweep(drivers, lambda d: d.read())
                walls.append(wall)
                reads.extend(lat)
            base_walls: list[float] = []
            base: list[float] = []
            for _ in range(args.sweeps):
                wall, lat = await _sweep(drivers, lambda d: d.run_command("true"))
                base_walls.append(wall)
                base.extend(lat)
            connects = sum(d.link.connects for d in drivers)
    finally:
        await asyncio.gather(*(d.close() for d in drivers), return_exceptions=True)
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()

    med, worst = statistics.median(walls), max(walls)
    base_med = statistics.median(base_walls)
    print(f"read sweeps (connections reused, {connects} connects in all): {args.sweeps} sweeps")
    print(f"  wall: median {med:.3f} s, max {worst:.3f} s  (goal <= {GOAL_S} s)")
    print(_dist("  per nvidia-smi query", reads))
    print(f"baseline sweeps of `true`: wall median {base_med:.3f} s")
    print(_dist("  per `true`", base))
    print(f"ratio read / baseline (median wall): {med / base_med:.2f}x")
    ok = worst <= GOAL_S
    print("goal met" if ok else "GOAL MISSED")
    return 0 if ok else 1


def main() -> int:
    """Parse options and run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=125)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--sweeps", type=int, default=10)
    p.add_argument("--gpu-base", default="127.2.128.1")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
