"""Telemetry in worker processes against the single process, on simulated miners.

For each ``--workers`` count (0 is the single process, the baseline), a child
process identifies the simulated site (not timed), builds the agent, starts its
workers (``telemetry.workers``), reads every miner once to connect (not timed),
then times ``--sweeps`` sweeps back to back through ``Agent.sweep``:

- **CPU per reading**, summed over the agent's process and all its workers
  (``/proc/<pid>/stat``), against the single process (goal: within 1.15x);
- **readings per wall-second**, against the single process (goal with 2
  workers: at least 1.6x);
- **the main process's share of a core**: its CPU over the wall time of
  ``--steady-sweeps`` sweeps at ``--interval-s`` (goal at 10,000 miners and a
  15 s interval: at most 25 %).

The simulators run in their own processes (bench_miner_sweep.start_sims);
``--sim-cpus`` pins them to those cores (and the agent to the others), so what
they burn is not the agent's. On a 2-core machine shared with others, the
throughput ratio is bounded by the cores left to the agent: read it with the
load averages printed.

    python bench/bench_workers.py --miners 4000 --workers 0,1,2 --sim-cpus 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_miner_sweep import ALL_BACKENDS, start_sims, stop_sims

ROOT = Path(__file__).resolve().parent.parent
TICK_S = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU (s) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S


def _rss_mb(pid: int) -> float:
    """Resident memory (MB) of process ``pid`` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def child(args: argparse.Namespace, miners: list[dict[str, Any]]) -> dict[str, Any]:
    """One agent: identify, start the workers, time sweeps; its figures as a dict."""
    from siteagent.agent.config import parse_config
    from siteagent.agent.control.inventory import build_devices
    from siteagent.agent.control.loop import Agent
    from siteagent.agent.control.workers import start_workers

    cfg = parse_config(
        {
            "site": {"cap_w": 1e9},
            "telemetry": {
                "timeout_s": args.timeout_s,
                "concurrency": args.concurrency,
                "interval_s": args.interval_s,
                "stale_after_s": max(30.0, 3 * args.interval_s),
                "workers": args.workers,
            },
            "inventory": {"miners": [{"address": m["address"]} for m in miners]},
        }
    )
    now = [0.0]
    links = await build_devices(cfg)
    agent = Agent(cfg, links, clock=lambda: now[0])
    telemetry = await start_workers(cfg, agent.fleet, agent.clock)
    agent.telemetry = telemetry
    pids = [p for p in (telemetry.pids() if telemetry else []) if p is not None]

    sim_pids = [int(p) for p in filter(None, args.sim_pids.split(","))]

    def cpu_s() -> tuple[float, float]:
        return _self_cpu_s(), sum(_proc_cpu_s(p) for p in pids)

    def sims_cpu_s() -> float:
        return sum(_proc_cpu_s(p) for p in sim_pids)

    async def sweep() -> int:
        now[0] += 1000.0  # every miner due; a reading now is one taken in this sweep
        await agent.sweep()
        fleet = agent.fleet
        return int((fleet.last_ok_s[: len(fleet)] == now[0]).sum())

    # Drivers connect on their first read (identification aside); a worker that answers
    # a sweep late is given no other until it has, so sweep until every miner was read.
    connected = 0
    tc = time.perf_counter()
    for _ in range(args.connect_tries):
        connected = max(connected, await sweep())
        if connected == len(miners):
            break
        for shard in telemetry.shards if telemetry else []:
            await shard.idle.wait()
    connect_wall_s = time.perf_counter() - tc
    main0, workers0 = cpu_s()
    sims0 = sims_cpu_s()
    t0 = time.perf_counter()
    readings = 0
    for _ in range(args.sweeps):
        readings += await sweep()
    wall_s = time.perf_counter() - t0
    main1, workers1 = cpu_s()
    sims1 = sims_cpu_s()
    steady: dict[str, float] = {}
    if args.steady_sweeps:
        t1 = time.perf_counter()
        for k in range(args.steady_sweeps):
            await sweep()
            rest_s = t1 + (k + 1) * args.interval_s - time.perf_counter()
            if rest_s > 0:
                await asyncio.sleep(rest_s)
        main2, _ = cpu_s()
        steady = {"steady_wall_s": time.perf_counter() - t1, "steady_main_cpu_s": main2 - main1}
    rss_mb = [_rss_mb(os.getpid())] + [_rss_mb(p) for p in pids]
    if telemetry is not None:
        await telemetry.close()
    return {
        "workers": args.workers,
        "miners": len(miners),
        "connected": connected,
        "connect_wall_s": connect_wall_s,
        "readings": readings,
        "wall_s": wall_s,
        "main_cpu_s": main1 - main0,
        "workers_cpu_s": workers1 - workers0,
        "sims_cpu_s": sims1 - sims0,
        "rss_mb": rss_mb,
        **steady,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=4000)
    p.add_argument("--mix", default="whatsminer")
    p.add_argument("--base", default="127.12.0.1")
    p.add_argument("--per-process", type=int, default=0)
    p.add_argument("--workers", default="0,2", help="comma list; 0 (the single process) first")
    p.add_argument("--sweeps", type=int, default=3)
    p.add_argument("--steady-sweeps", type=int, default=0)
    p.add_argument("--interval-s", type=float, default=15.0)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--connect-tries", type=int, default=10, help="untimed sweeps to connect")
    p.add_argument("--sim-cpus", default="", help="cores for the simulators, e.g. 1 or 8-15")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inventory", default="", help=argparse.SUPPRESS)
    p.add_argument("--sim-pids", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.workers = int(args.workers)
        miners = json.loads(Path(args.inventory).read_text())
        print(json.dumps(asyncio.run(child(args, miners))))
        return 0
    if args.mix == "all":
        args.mix = ",".join(ALL_BACKENDS)
    sim_cpus = _cpus(args.sim_cpus)
    agent_cpus = set(range(os.cpu_count() or 1)) - sim_cpus or None
    load0 = os.getloadavg()
    procs, miners = start_sims(args)
    if sim_cpus:
        for proc in procs:
            os.sched_setaffinity(proc.pid, sim_cpus)
    results = []
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as inv:
            json.dump(miners, inv)
            inv.flush()
            for w in args.workers.split(","):
                cmd = [sys.executable, __file__, "--child", "--inventory", inv.name]
                cmd += ["--workers", w, "--sweeps", str(args.sweeps)]
                cmd += ["--steady-sweeps", str(args.steady_sweeps)]
                cmd += ["--interval-s", str(args.interval_s), "--timeout-s", str(args.timeout_s)]
                cmd += ["--concurrency", str(args.concurrency)]
                cmd += ["--connect-tries", str(args.connect_tries)]
                cmd += ["--sim-pids", ",".join(str(p.pid) for p in procs)]
                out = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                    preexec_fn=(lambda: os.sched_setaffinity(0, agent_cpus))
                    if agent_cpus
                    else None,
                )
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        stop_sims(procs)
    pinned = f"simulators pinned to cores {sorted(sim_cpus)}" if sim_cpus else "nothing pinned"
    print(
        f"{len(miners)} simulated miners ({args.mix}) in {len(procs)} simulator process(es), "
        f"{os.cpu_count()} cores, {pinned}; {args.sweeps} timed sweeps each; load average "
        f"before {load0[0]:.2f} after {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'workers':>7} {'read':>7} {'wall':>8} {'readings/s':>11} {'/base':>6} "
        f"{'CPU/reading':>12} {'/base':>6} {'main CPU':>9} {'workers CPU':>12} {'sims CPU':>9}  "
        f"{'RSS main + workers':<22} main share steady"
    )
    base = results[0]
    base_rate = base["readings"] / base["wall_s"]
    base_cpu = (base["main_cpu_s"] + base["workers_cpu_s"]) / max(1, base["readings"])
    for r in results:
        rate = r["readings"] / r["wall_s"]
        cpu = (r["main_cpu_s"] + r["workers_cpu_s"]) / max(1, r["readings"])
        share = (
            f"{100 * r['steady_main_cpu_s'] / r['steady_wall_s']:.1f} % of a core"
            if "steady_wall_s" in r
            else "-"
        )
        print(
            f"{r['workers']:>7} {r['readings']:>7} {r['wall_s']:>6.2f} s {rate:>11.0f} "
            f"{rate / base_rate:>5.2f}x {1e6 * cpu:>9.0f} us {cpu / base_cpu:>5.2f}x "
            f"{r['main_cpu_s']:>7.2f} s {r['workers_cpu_s']:>10.2f} s {r['sims_cpu_s']:>7.2f} s  "
            f"{' + '.join(f'{m:.0f}' for m in r['rss_mb']) + ' MB':<22} {share}"
        )
    print(json.dumps({"miners": len(miners), "mix": args.mix, "results": results}))
    return 0


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
