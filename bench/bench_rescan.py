"""A later scan of the site's ranges: in the agent's process, or in its telemetry workers.

Every ``inventory.scan_interval_s`` the agent identifies every address of its scan
ranges again, to find new, moved and missing miners. A child process builds the
agent on simulated miners found by a scan range, with ``--workers`` telemetry workers
(as ``siteagent run`` does: start-up's identification in the workers), reads every
miner once, then runs ``--scans`` scans back to back, each identifying:

- **in the agent's process** (``identifier=identify``, the single-process way, the
  baseline);
- **in the workers** (``WorkerTelemetry.identify``, what the daemon does with workers).

For each it prints the agent process's CPU, the workers' CPU, the wall time, and the
event loop's longest lateness meanwhile (a task that wakes every 50 ms: how late a
control tick would start). The simulators run in their own processes.

    python bench/bench_rescan.py --miners 4000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_miner_sweep import ALL_BACKENDS, start_sims, stop_sims
from bench_workers import _proc_cpu_s, _self_cpu_s

ROOT = Path(__file__).resolve().parent.parent
PROBE_S = 0.05


async def _probe(done: asyncio.Event, late: list[float]) -> None:
    """Wake every PROBE_S until ``done``; the longest lateness into ``late[0]``."""
    loop = asyncio.get_running_loop()
    while not done.is_set():
        t = loop.time()
        await asyncio.sleep(PROBE_S)
        late[0] = max(late[0], loop.time() - t - PROBE_S)


async def child(args: argparse.Namespace, miners: list[dict[str, Any]]) -> dict[str, Any]:
    """One agent: start-up in the workers, then the scans both ways; figures as a dict."""
    from siteagent.agent.config import parse_config
    from siteagent.agent.control.identify import identify
    from siteagent.agent.control.inventory import build_devices, scan
    from siteagent.agent.control.inventory_store import InventoryStore
    from siteagent.agent.control.loop import Agent
    from siteagent.agent.control.workers import make_workers

    addrs = [m["address"] for m in miners]
    cfg = parse_config(
        {
            "site": {"cap_w": 1e9},
            "telemetry": {"timeout_s": args.timeout_s, "workers": args.workers},
            "inventory": {"scan": [f"{addrs[0]}-{addrs[-1]}"]},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = InventoryStore(Path(tmp) / "inventory.sqlite")
        telemetry = make_workers(cfg, args.workers)
        await telemetry.launch()
        t0 = time.perf_counter()
        links = await build_devices(cfg, store, identifier=telemetry.identify)
        agent = Agent(cfg, links)
        telemetry.fleet, telemetry.clock = agent.fleet, agent.clock
        await telemetry.adopt()
        agent.telemetry = telemetry
        await agent.sweep()
        startup_s = time.perf_counter() - t0
        gc.collect()  # as `siteagent run` does once started (cli)
        gc.freeze()
        pids = [p for p in telemetry.pids() if p is not None]
        out: dict[str, Any] = {"miners": len(links), "startup_s": startup_s}
        if args.slow_ms:
            # asyncio's debug mode logs each callback that holds the loop this long.
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
            loop = asyncio.get_running_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = args.slow_ms / 1000
        ways = {"agent": identify, "workers": telemetry.identify}
        for name in args.ways.split(","):
            identifier = ways[name]
            agent.rescan = lambda identifier=identifier: scan(cfg, store, identifier=identifier)
            late = [0.0]
            done = asyncio.Event()
            prober = asyncio.ensure_future(_probe(done, late))
            main0, work0 = _self_cpu_s(), sum(_proc_cpu_s(p) for p in pids)
            w0 = time.perf_counter()
            for _ in range(args.scans):
                await agent._scan_job()
            wall = time.perf_counter() - w0
            main1, work1 = _self_cpu_s(), sum(_proc_cpu_s(p) for p in pids)
            done.set()
            await prober
            out[name] = {
                "wall_s": wall / args.scans,
                "main_cpu_s": (main1 - main0) / args.scans,
                "workers_cpu_s": (work1 - work0) / args.scans,
                "max_late_s": late[0],
                "devices": len(agent.fleet),
            }
        await telemetry.close()
        store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=4000)
    p.add_argument("--mix", default="braiins")
    p.add_argument("--base", default="127.14.0.1")
    p.add_argument("--per-process", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--scans", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--ways", default="agent,workers", help="where to identify: agent, workers")
    p.add_argument(
        "--slow-ms",
        type=float,
        default=0.0,
        help="log each callback that holds the event loop this long (asyncio debug mode)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inventory", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        miners = json.loads(Path(args.inventory).read_text())
        print(json.dumps(asyncio.run(child(args, miners))))
        return 0
    if args.mix == "all":
        args.mix = ",".join(ALL_BACKENDS)
    args.concurrency = 500  # what start_sims sizes descriptor limits for
    load0 = os.getloadavg()[0]
    procs, miners = start_sims(args)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as inv:
            json.dump(miners, inv)
            inv.flush()
            cmd = [sys.executable, __file__, "--child", "--inventory", inv.name]
            cmd += ["--workers", str(args.workers), "--scans", str(args.scans)]
            cmd += ["--timeout-s", str(args.timeout_s), "--ways", args.ways]
            cmd += ["--slow-ms", str(args.slow_ms)]
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            if args.slow_ms:
                print("\n".join(x for x in run.stderr.splitlines() if "Executing" in x))
            r = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        stop_sims(procs)
    print(
        f"{r['miners']} simulated miners ({args.mix}) found by a scan range, "
        f"{args.workers} telemetry workers, {os.cpu_count()} cores shared with the "
        f"simulators; start-up {r['startup_s']:.0f} s; load average before {load0:.2f} "
        f"after {os.getloadavg()[0]:.2f}; per scan ({args.scans} each):"
    )
    print(
        f"{'identified in':<14} {'wall':>8} {'agent CPU':>10} {'/base':>6} "
        f"{'workers CPU':>12} {'loop late (max)':>16} {'devices':>8}"
    )
    ways = args.ways.split(",")
    base = r[ways[0]]["main_cpu_s"]
    for name in ways:
        x = r[name]
        print(
            f"{name:<14} {x['wall_s']:>6.1f} s {x['main_cpu_s']:>8.2f} s "
            f"{x['main_cpu_s'] / base:>5.2f}x {x['workers_cpu_s']:>10.2f} s "
            f"{1000 * x['max_late_s']:>13.0f} ms {x['devices']:>8}"
        )
    print(json.dumps({"mix": args.mix, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
