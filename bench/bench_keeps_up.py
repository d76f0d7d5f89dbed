"""Does telemetry keep up in the whole daemon? Sweeps, reading age, CPU and memory.

Runs `siteagent run` as systemd would (``Type=notify``) against simulated miners in
separate processes, with ``telemetry.interval_s`` and ``telemetry.workers`` as given,
and samples its own ``/metrics`` every few seconds for ``--run-s`` seconds after READY
(issue 20's goals):

- **sweeps completed** against those expected (``run_s / interval_s``; goal ≥ 95 %);
- **the oldest reading** seen (``siteagent_telemetry_max_age_seconds``; goal: never
  past 2 intervals);
- **the main process's share of a core** (its own CPU over the run; goal ≤ 25 %);
- **the whole agent's RSS**: the main process and its worker processes, summed (and
  their PSS, which counts a page shared between them, a library's, once);
- **the cores used** over the run by the whole agent (main process and workers) and,
  apart, by the simulators, which share the machine's cores with it.

Each ``--workers`` value runs in turn against the same simulators; 0 (the single
process) first, as the baseline.

    python bench/bench_keeps_up.py --miners 10000 --interval-s 15 --workers 0,2 --run-s 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_agent_rss import ROOT, memory_kb, write_config
from bench_miner_sweep import ALL_BACKENDS, start_sims, stop_sims

TICKS_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_S


def children(pid: int) -> list[int]:
    """The direct children of a process (the agent's workers)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def pss_kb(pid: int) -> int:
    """A process's proportional set size (kB): its private pages, and its share of the
    pages it shares (libraries, with the other processes of the agent)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> dict[str, float]:
    """The few samples this bench reads from the agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in (
            "siteagent_sweeps_total",
            "siteagent_telemetry_max_age_seconds",
            "siteagent_last_tick_age_seconds",
        ):
            out[name] = float(value)
        elif name.startswith("siteagent_telemetry_worker_reads_in_flight{"):
            out["in_flight"] = out.get("in_flight", 0.0) + float(value)
        elif name.startswith("siteagent_actuations_total{"):
            out["actuations"] = out.get("actuations", 0.0) + float(value)
        elif name.startswith("siteagent_devices{"):
            state = name.split('state="', 1)[1].split('"', 1)[0]
            out[f"state:{state}"] = out.get(f"state:{state}", 0.0) + float(value)
    return out


def timeline_line(t_s: float, m: dict[str, float], before: dict[str, float]) -> str:
    """One sample of the run, as --timeline prints it (commands: since ``before``)."""
    states = " ".join(
        f"{k.removeprefix('state:')}={v:.0f}"
        for k, v in sorted(m.items())
        if k.startswith("state:")
    )
    return (
        f"{t_s:6.0f} s sweeps {m.get('siteagent_sweeps_total', 0):5.0f} oldest "
        f"{m.get('siteagent_telemetry_max_age_seconds', 0):6.1f} s tick age "
        f"{m.get('siteagent_last_tick_age_seconds', 0):5.1f} s in flight "
        f"{m.get('in_flight', 0):6.0f} commands "
        f"{m.get('actuations', 0) - before.get('actuations', 0):5.0f}  {states}"
    )


def run_agent(
    miners: list[dict[str, Any]],
    workers: int,
    interval_s: float,
    run_s: float,
    ready_s: float,
    policy: str = "efficiency-capping",
    timeline: bool = False,
    sim_pids: tuple[int, ...] = (),
) -> dict[str, Any]:
    """One daemon from start to READY plus run_s seconds, sampled every few seconds
    (``sim_pids``: the simulators, whose CPU over the run is reported beside the agent's)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "siteagent.toml"
        write_config(cfg, miners, policy, Path(tmp) / "state", 500)
        port = free_port()
        text = cfg.read_text()
        text = text.replace(
            "[telemetry]\ninterval_s = 5\n", f"[telemetry]\ninterval_s = {interval_s:g}\n"
        )
        text = text.replace("concurrency = 500\n", f"concurrency = 500\nworkers = {workers}\n", 1)
        text = text.replace(
            '[metrics]\nhost = "127.0.0.1"\nport = 0',
            f'[metrics]\nhost = "127.0.0.1"\nport = {port}',
        )
        cfg.write_text(text)
        sock_path = str(Path(tmp) / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(sock_path)
            s.settimeout(1.0)
            env = dict(os.environ, NOTIFY_SOCKET=sock_path)
            env.pop("WATCHDOG_USEC", None)
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "siteagent.agent.tools.cli"),
                    *("--log-level", "warning", "run", "-c", str(cfg)),
                ],
                cwd=ROOT,
                env=env,
            )
            try:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"agent exited {proc.returncode} before READY")
                    if time.monotonic() - t0 > ready_s:
                        raise RuntimeError(f"no READY in {ready_s:.0f} s")
                    try:
                        if "READY=1" in s.recv(4096).decode().split("\n"):
                            break
                    except TimeoutError:
                        continue
                ready_after_s = time.monotonic() - t0
                first = scrape(port)
                cpu0, t1 = cpu_s(proc.pid), time.monotonic()
                sims0 = sum(cpu_s(p) for p in sim_pids)
                # Each process of the agent's CPU when first and last seen over the run
                # (a worker restarted meanwhile counts from its start).
                agent_cpu = {p: (cpu_s(p), cpu_s(p)) for p in [proc.pid, *children(proc.pid)]}
                max_age_s, peak_mb, peak_pss_mb, max_lag_s = 0.0, 0.0, 0.0, 0.0
                before = first
                while time.monotonic() - t1 < run_s:
                    time.sleep(5.0)
                    m = scrape(port)
                    if timeline:
                        print(timeline_line(time.monotonic() - t1, m, before), flush=True)
                    before = m
                    max_age_s = max(max_age_s, m.get("siteagent_telemetry_max_age_seconds", 0.0))
                    max_lag_s = max(max_lag_s, m.get("siteagent_last_tick_age_seconds", 0.0))
                    pids = [proc.pid, *children(proc.pid)]
                    for p in pids:
                        now_cpu = cpu_s(p)
                        agent_cpu[p] = (agent_cpu.get(p, (0.0, 0.0))[0], now_cpu)
                    rss = sum(memory_kb(p)["VmRSS"] for p in pids)
                    peak_mb = max(peak_mb, rss / 1024)
                    peak_pss_mb = max(peak_pss_mb, sum(pss_kb(p) for p in pids) / 1024)
                wall_s = time.monotonic() - t1
                main_share = (cpu_s(proc.pid) - cpu0) / wall_s
                sims_share = (sum(cpu_s(p) for p in sim_pids) - sims0) / wall_s
                agent_share = sum(b - a for a, b in agent_cpu.values()) / wall_s
                last = scrape(port)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    done = last["siteagent_sweeps_total"] - first["siteagent_sweeps_total"]
    expected = wall_s / interval_s
    return {
        "workers": workers,
        "ready_after_s": ready_after_s,
        "sweeps_done": done,
        "sweeps_expected": expected,
        "sweeps_share": done / expected,
        "max_age_s": max_age_s,
        "max_age_intervals": max_age_s / interval_s,
        "main_core_share": main_share,
        "agent_cores": agent_share,
        "sim_cores": sims_share,
        "peak_rss_mb": peak_mb,
        "peak_pss_mb": peak_pss_mb,
        "max_tick_age_s": max_lag_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=10000)
    p.add_argument("--mix", default="braiins")
    p.add_argument("--base", default="127.1.0.1")
    p.add_argument("--per-process", type=int, default=0, help="miners per simulator process")
    p.add_argument("--workers", default="0,2", help="comma list; the first is the baseline")
    p.add_argument("--interval-s", type=float, default=15.0)
    p.add_argument("--run-s", type=float, default=300.0, help="seconds sampled after READY")
    p.add_argument("--ready-s", type=float, default=900.0, help="give up without READY after")
    p.add_argument("--policy", default="efficiency-capping", help="or economic")
    p.add_argument(
        "--timeline",
        action="store_true",
        help="print each sample: sweeps, oldest reading, reads in flight, commands accepted "
        "since the last sample, devices by state",
    )
    args = p.parse_args(argv)
    if args.mix == "all":
        args.mix = ",".join(ALL_BACKENDS)
    args.concurrency = 500  # what start_sims sizes descriptor limits for
    load0 = os.getloadavg()[0]
    procs, miners = start_sims(args)
    results = []
    try:
        for w in (int(x) for x in args.workers.split(",")):
            results.append(
                run_agent(
                    miners,
                    w,
                    args.interval_s,
                    args.run_s,
                    args.ready_s,
                    args.policy,
                    args.timeline,
                    tuple(p.pid for p in procs),
                )
            )
    finally:
        stop_sims(procs)
    print(
        f"siteagent run on {len(miners)} simulated miners ({args.mix}), telemetry every "
        f"{args.interval_s:g} s, policy {args.policy}, {args.run_s:.0f} s sampled after READY, "
        f"{os.cpu_count()} cores "
        f"shared with the simulators, load average before {load0:.2f} after "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'workers':>7} {'READY':>8} {'sweeps done/expected':>21} {'oldest reading':>22} "
        f"{'main process':>13} {'whole agent RSS':>16} {'PSS':>8} {'cores: agent':>13} "
        f"{'simulators':>10}"
    )
    for r in results:
        print(
            f"{r['workers']:>7} {r['ready_after_s']:>6.0f} s "
            f"{r['sweeps_done']:>6.0f}/{r['sweeps_expected']:<5.1f} ({r['sweeps_share']:>4.0%}) "
            f"{r['max_age_s']:>7.1f} s ({r['max_age_intervals']:.2f} intervals) "
            f"{r['main_core_share']:>11.0%} {r['peak_rss_mb']:>13.0f} MB "
            f"{r['peak_pss_mb']:>5.0f} MB {r['agent_cores']:>13.2f} {r['sim_cores']:>10.2f}"
        )
    print(json.dumps({"miners": len(miners), "mix": args.mix, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
