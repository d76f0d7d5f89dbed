"""Peak memory of the whole agent (`siteagent run`) on a simulated site, per policy.

bench_miner_sweep.py measures the drivers alone; this runs the daemon itself,
as systemd would (``Type=notify``: a real notify socket), against simulated
miners in separate processes, and reads its resident set from ``/proc``:

- **RSS at READY**: after identification and the first sweep;
- **peak RSS** (``VmHWM``): the highest over READY plus ``--run-s`` seconds of
  sweeps and control ticks.

Each policy named in ``--policies`` runs in turn against the same simulators and
the same inventory (a fresh state directory each). The first policy is the
baseline; the others are printed as a ratio to it, and every one as a ratio to
the 1 GB goal of the 10,000-miner site (issues 16 and 20; it was 500 MB before the
drivers gave up reaching into their libraries' private state).

    python bench/bench_agent_rss.py --miners 10000 --mix braiins
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_miner_sweep import ALL_BACKENDS, start_sims, stop_sims

GOAL_MB = 1000.0
ROOT = Path(__file__).resolve().parent.parent


def memory_kb(pid: int) -> dict[str, int]:
    """A process's VmRSS, VmHWM (peak RSS), RssAnon and RssFile (shared libraries and
    other file-backed pages: code the kernel can drop and read back), in kB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def write_config(
    path: Path, miners: list[dict[str, Any]], policy: str, state: Path, control_concurrency: int
) -> None:
    """A site config that scans the simulators' address range, as a site would."""
    addrs = sorted(ipaddress.IPv4Address(m["address"]) for m in miners)
    cap_w = int(sum(float(m["nameplate_power_w"]) for m in miners) * 0.8)
    path.write_text(
        f"[site]\ncap_w = {cap_w}\n"
        "[telemetry]\ninterval_s = 5\ntimeout_s = 10\nconcurrency = 500\n"
        f"[control]\ninterval_s = 5\nconcurrency = {control_concurrency}\n"
        f'[inventory]\nscan = ["{addrs[0]}-{addrs[-1]}"]\n'
        f'[policy]\nname = "{policy}"\n'
        '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
        f'[state]\ndir = "{state}"\n'
    )


def run_agent(
    miners: list[dict[str, Any]],
    policy: str,
    run_s: float,
    ready_s: float,
    control_concurrency: int,
) -> dict[str, Any]:
    """One daemon from start to READY plus run_s seconds; its memory and timings."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "siteagent.toml"
        write_config(cfg, miners, policy, Path(tmp) / "state", control_concurrency)
        sock_path = str(Path(tmp) / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(sock_path)
            s.settimeout(1.0)
            env = dict(os.environ, NOTIFY_SOCKET=sock_path)
            env.pop("WATCHDOG_USEC", None)
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "siteagent.agent.tools.cli",
                    "--log-level",
                    "warning",
                    "run",
                    "-c",
                    str(cfg),
                ],
                cwd=ROOT,
                env=env,
            )
            try:
                status = ""
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"agent exited {proc.returncode} before READY")
                    if time.monotonic() - t0 > ready_s:
                        raise RuntimeError(f"no READY in {ready_s:.0f} s (last: {status})")
                    try:
                        fields = s.recv(4096).decode().split("\n")
                    except TimeoutError:
                        continue
                    status = next((f for f in fields if f.startswith("STATUS=")), status)
                    if "READY=1" in fields:
                        break
                ready_after_s = time.monotonic() - t0
                at_ready = memory_kb(proc.pid)
                t1 = time.monotonic()
                while time.monotonic() - t1 < run_s:
                    time.sleep(1.0)
                end = memory_kb(proc.pid)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    status = status.removeprefix("STATUS=")
    return {
        "policy": policy,
        "ready_after_s": ready_after_s,
        "ready_status": status,
        "devices": int(status.split(" device(s)")[0]) if " device(s)" in status else None,
        "rss_at_ready_mb": at_ready["VmRSS"] / 1024,
        "peak_mb": end["VmHWM"] / 1024,
        "anon_end_mb": end["RssAnon"] / 1024,
        "file_end_mb": end["RssFile"] / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=10000)
    p.add_argument("--mix", default="braiins")
    p.add_argument("--base", default="127.1.0.1")
    p.add_argument("--per-process", type=int, default=0, help="miners per simulator process")
    p.add_argument("--policies", default="efficiency-capping,economic")
    p.add_argument("--run-s", type=float, default=60.0, help="seconds to run after READY")
    p.add_argument("--ready-s", type=float, default=600.0, help="give up without READY after")
    p.add_argument(
        "--control-concurrency", type=int, default=500, help="control.concurrency: changes at once"
    )
    args = p.parse_args(argv)
    if args.mix == "all":
        args.mix = ",".join(ALL_BACKENDS)
    args.concurrency = 500  # what start_sims sizes descriptor limits for
    load0 = os.getloadavg()[0]
    procs, miners = start_sims(args)
    results = []
    try:
        for policy in args.policies.split(","):
            results.append(
                run_agent(miners, policy, args.run_s, args.ready_s, args.control_concurrency)
            )
    finally:
        stop_sims(procs)
    print(
        f"siteagent run on {len(miners)} simulated miners ({args.mix}) in {len(procs)} simulator "
        f"processes, {args.run_s:.0f} s after READY, control.concurrency "
        f"{args.control_concurrency}, {os.cpu_count()} cores, "
        f"load average before {load0:.2f} after {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'policy':20} {'devices':>7} {'READY after':>12} {'RSS at READY':>13} {'peak RSS':>10} "
        f"{'/base':>6} {'/goal':>6}   at the end: anon + file-backed"
    )
    base = results[0]["peak_mb"] if results else 1.0
    for r in results:
        print(
            f"{r['policy']:20} {r['devices']!s:>7} {r['ready_after_s']:>10.1f} s "
            f"{r['rss_at_ready_mb']:>10.0f} MB {r['peak_mb']:>7.0f} MB "
            f"{r['peak_mb'] / base:>5.2f}x {r['peak_mb'] / GOAL_MB:>5.2f}x   "
            f"{r['anon_end_mb']:.0f} + {r['file_end_mb']:.0f} MB"
        )
        if r["devices"] != len(miners):
            print(f"  note: {r['policy']} started with {r['devices']} of {len(miners)} miners")
    print(json.dumps({"miners": len(miners), "mix": args.mix, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
