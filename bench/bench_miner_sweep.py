"""One telemetry sweep of N simulated miners, three ways; prints wall, CPU, peak RSS, ratios.

(a) the agent's driver: ``AsicDriver.read()`` per miner (drivers built once from
    the known inventory, as the agent does after discovery; that setup is
    reported but not part of the sweep);
(b) naive pyasic: ``pyasic.get_miner`` + ``get_data()`` per miner;
(c) the floor: a bare asyncio client sending the one request a reading needs
    (Whatsminer ``summary``; LuxOS ``summary+power+config+temps``).

The simulator runs in separate processes (``python -m sim.serve``), at most
``--per-process`` miners each (file-descriptor limit); each sweep runs in its own
child process so CPU time and peak RSS are its own. Concurrency is bounded.

    python bench/bench_miner_sweep.py --miners 10000 --mix whatsminer
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLOOR_REQUEST = {
    "whatsminer": b'{"command": "summary"}',
    "luxos": b'{"command": "summary+power+config+temps"}',
}


def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0


async def _bounded(n: int, items: list[Any], fn: Any) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def one(x: Any) -> Any:
        async with sem:
            try:
                return await fn(x)
            except Exception as e:
                return e

    return list(await asyncio.gather(*(one(x) for x in items)))


async def sweep_agent(miners: list[dict[str, Any]], conc: int, timeout_s: float) -> dict[str, Any]:
    """(a): build drivers from the inventory, then one timed read sweep."""
    from drivers.asic import AsicDriver

    t0 = time.perf_counter()
    drivers = await _bounded(
        conc,
        miners,
        lambda m: AsicDriver.from_inventory(
            m["address"],
            m["address"],
            backend=m["backend"],
            model=m.get("pyasic_model"),
            timeout_s=timeout_s,
        ),
    )
    setup_s = time.perf_counter() - t0
    ok_drivers = [d for d in drivers if isinstance(d, AsicDriver)]
    cpu0, _ = _usage()
    t0 = time.perf_counter()
    res = await _bounded(conc, ok_drivers, lambda d: d.read())
    wall = time.perf_counter() - t0
    cpu1, rss = _usage()
    ok = sum(1 for r in res if not isinstance(r, BaseException))
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "rss_mb": rss, "ok": ok, "setup_s": setup_s}


async def sweep_naive(miners: list[dict[str, Any]], conc: int, timeout_s: float) -> dict[str, Any]:
    """(b): pyasic.get_miner + get_data() per miner."""
    import pyasic

    async def one(m: dict[str, Any]) -> Any:
        async with asyncio.timeout(timeout_s * 4):
            miner = await pyasic.get_miner(m["address"])
            return await miner.get_data()

    cpu0, _ = _usage()
    t0 = time.perf_counter()
    res = await _bounded(conc, miners, one)
    wall = time.perf_counter() - t0
    cpu1, rss = _usage()
    ok = sum(1 for r in res if not isinstance(r, BaseException) and r.wattage is not None)
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "rss_mb": rss, "ok": ok}


async def sweep_floor(miners: list[dict[str, Any]], conc: int, timeout_s: float) -> dict[str, Any]:
    """(c): one request per miner, bare asyncio, parse the power out."""

    async def one(m: dict[str, Any]) -> float:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(m["address"], 4028)
            writer.write(FLOOR_REQUEST[m["backend"]])
            data = await reader.read()
            writer.close()
        d = json.loads(data.rstrip(b"\0"))
        if m["backend"] == "whatsminer":
            return float(d["SUMMARY"][0]["Power"])
        return float(d["power"][0]["POWER"][0]["Watts"])

    cpu0, _ = _usage()
    t0 = time.perf_counter()
    res = await _bounded(conc, miners, one)
    wall = time.perf_counter() - t0
    cpu1, rss = _usage()
    ok = sum(1 for r in res if isinstance(r, float))
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "rss_mb": rss, "ok": ok}


SWEEPS = {"a": sweep_agent, "b": sweep_naive, "c": sweep_floor}
PYASIC_MODEL = {"M50S": "M50S VH50", "M60S": "M60S VK30", "M30S++": "M30S++ VH40"}


def run_child(args: argparse.Namespace) -> int:
    """Child mode: run one sweep over the inventory file and print its JSON result."""
    import logging

    logging.disable(logging.WARNING)  # pyasic warns per failed miner
    miners = json.loads(Path(args.inventory).read_text())
    if args.sample:
        miners = miners[: args.sample]
    out = asyncio.run(SWEEPS[args.child](miners, args.concurrency, args.timeout_s))
    out["n"] = len(miners)
    print(json.dumps(out))
    return 0


def start_sims(
    args: argparse.Namespace,
) -> tuple[list[subprocess.Popen[str]], list[dict[str, Any]]]:
    """Simulator processes of at most ``per_process`` miners each; their merged inventory."""
    procs: list[subprocess.Popen[str]] = []
    miners: list[dict[str, Any]] = []
    base = ipaddress.IPv4Address(args.base)
    left, offset = args.miners, 0
    while left > 0:
        n = min(left, args.per_process)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sim.serve",
                "--miners",
                str(n),
                "--mix",
                args.mix,
                "--base",
                str(base + offset),
                "--sample-s",
                "3600",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout is not None
        inv = json.loads(p.stdout.readline())
        for m in inv["miners"]:
            m["pyasic_model"] = PYASIC_MODEL.get(m["model"], m["model"])
        miners.extend(inv["miners"])
        left -= n
        offset += n
    return procs, miners


def main(argv: list[str] | None = None) -> int:
    """Parent mode: start the simulator, run (a), (b), (c) each in a child, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=10000)
    p.add_argument("--mix", default="whatsminer")
    p.add_argument("--base", default="127.1.0.1")
    p.add_argument("--per-process", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument(
        "--naive-sample",
        type=int,
        default=0,
        help="run (b) on the first N miners only and scale up (0: all)",
    )
    p.add_argument("--sweeps", default="cab")
    p.add_argument("--child", choices=sorted(SWEEPS), help=argparse.SUPPRESS)
    p.add_argument("--inventory", help=argparse.SUPPRESS)
    p.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(args)
    procs, miners = start_sims(args)
    results: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(miners, f)
        for s in args.sweeps:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                s,
                "--inventory",
                f.name,
                "--concurrency",
                str(args.concurrency),
                "--timeout-s",
                str(args.timeout_s),
            ]
            if s == "b" and args.naive_sample:
                cmd += ["--sample", str(args.naive_sample)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"sweep {s} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if r["n"] < len(miners):  # scaled from a sample
                k = len(miners) / r["n"]
                r.update(wall_s=r["wall_s"] * k, cpu_s=r["cpu_s"] * k, scaled_from=r["n"])
            results[s] = r
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    names = {"a": "agent driver", "b": "naive pyasic", "c": "floor (bare)"}
    print(f"sweep of {len(miners)} simulated miners ({args.mix}), concurrency {args.concurrency}")
    for s, r in results.items():
        extra = f"  (setup {r['setup_s']:.1f} s)" if "setup_s" in r else ""
        extra += f"  (scaled from {r['scaled_from']})" if "scaled_from" in r else ""
        print(
            f"  ({s}) {names[s]:13s} wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
            f"peak rss {r['rss_mb']:6.0f} MB  ok {r['ok']}/{r['n']}{extra}"
        )
    if "c" in results:
        c = results["c"]
        for s in ("a", "b"):
            if s in results:
                r = results[s]
                print(
                    f"  ({s})/(c): wall x{r['wall_s'] / c['wall_s']:.1f}, "
                    f"cpu x{r['cpu_s'] / max(c['cpu_s'], 1e-9):.1f}"
                )
    if "a" in results:
        a = results["a"]
        print(
            f"  goals for (a): wall <= 5 s: {a['wall_s']:.2f} s; "
            f"cpu <= 2x (c): {a['cpu_s'] / max(results.get('c', a)['cpu_s'], 1e-9):.1f}x; "
            f"rss < 500 MB: {a['rss_mb']:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
