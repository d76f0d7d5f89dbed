"""Time to the first READY of the whole agent (`siteagent run`) at two site sizes.

The daemon starts as systemd starts it (``Type=notify``: a real notify socket)
against simulated miners in separate processes (bench_miner_sweep.start_sims), on
a fresh state directory (no inventory: every address identified with pyasic's
probes) or, with ``--warm``, on the inventory of a start before it (known
firmware: no probes). For each size it prints the time to READY and, from the
agent's own log lines, identification and the first sweep; then each as a ratio
of the large size to the small one against the ratio of sizes (goal: READY at
10,000 miners within 10x the time at 1,000).

    python bench/bench_startup.py --sizes 1000,3000 --mix braiins
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_miner_sweep import ALL_BACKENDS, start_sims, stop_sims

ROOT = Path(__file__).resolve().parent.parent
_IDENTIFIED = re.compile(r"identified (\d+) device\(s\) in \d+ address\(es\) in ([\d.]+) s")
_SWEPT = re.compile(r"first sweep: (\d+) of (\d+) device\(s\) read in ([\d.]+) s")
_FULL_SWEEP = re.compile(r"first sweep of (\d+) device\(s\) in ([\d.]+) s")


def write_config(path: Path, miners: list[dict[str, Any]], state: Path, workers: str) -> None:
    """A site config that scans the simulators' address range, as a site would."""
    addrs = sorted(ipaddress.IPv4Address(m["address"]) for m in miners)
    cap_w = int(sum(float(m["nameplate_power_w"]) for m in miners) * 0.8)
    path.write_text(
        f"[site]\ncap_w = {cap_w}\n"
        f"[telemetry]\ninterval_s = 5\ntimeout_s = 10\nconcurrency = 500\nworkers = {workers}\n"
        "[control]\ninterval_s = 5\n"
        f'[inventory]\nscan = ["{addrs[0]}-{addrs[-1]}"]\n'
        '[metrics]\nhost = "127.0.0.1"\nport = 0\n[api]\nhost = "127.0.0.1"\nport = 0\n'
        f'[state]\ndir = "{state}"\n'
    )


def start_once(cfg: Path, tmp: Path, ready_s: float) -> dict[str, Any]:
    """One daemon from start to READY; the time and what its log said of each phase."""
    sock_path = str(tmp / "notify.sock")
    Path(sock_path).unlink(missing_ok=True)
    log_path = tmp / "agent.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, log_path.open("w") as log:
        s.bind(sock_path)
        s.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        env.pop("WATCHDOG_USEC", None)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "siteagent.agent.tools.cli", "run", "-c", str(cfg)],
            cwd=ROOT,
            env=env,
            stderr=log,
        )
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited {proc.returncode} before READY")
                if time.monotonic() - t0 > ready_s:
                    raise RuntimeError(f"no READY in {ready_s:.0f} s")
                try:
                    fields = s.recv(4096).decode().split("\n")
                except TimeoutError:
                    continue
                if "READY=1" in fields:
                    break
            ready_after_s = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    out: dict[str, Any] = {"ready_s": ready_after_s}
    if m := _IDENTIFIED.search(text):
        out["devices"], out["identify_s"] = int(m[1]), float(m[2])
    if m := _SWEPT.search(text):
        out["read_at_ready"], out["first_sweep_s"] = int(m[1]), float(m[3])
    elif m := _FULL_SWEEP.search(text):
        out["read_at_ready"], out["first_sweep_s"] = int(m[1]), float(m[2])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,3000")
    p.add_argument("--mix", default="braiins")
    p.add_argument("--base", default="127.13.0.1")
    p.add_argument("--per-process", type=int, default=0)
    p.add_argument("--warm", action="store_true", help="start again on the inventory kept")
    p.add_argument("--workers", default="0", help='telemetry.workers: 0, N or "auto"')
    p.add_argument("--ready-s", type=float, default=900.0)
    args = p.parse_args(argv)
    if args.mix == "all":
        args.mix = ",".join(ALL_BACKENDS)
    sizes = [int(n) for n in args.sizes.split(",")]
    args.miners, args.concurrency = max(sizes), 500
    load0 = os.getloadavg()[0]
    procs, miners = start_sims(args)
    results = []
    try:
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp_name:
                tmp = Path(tmp_name)
                cfg = tmp / "siteagent.toml"
                workers = '"auto"' if args.workers == "auto" else args.workers
                write_config(cfg, miners[:n], tmp / "state", workers)
                r = start_once(cfg, tmp, args.ready_s)
                if args.warm:
                    r = start_once(cfg, tmp, args.ready_s)
                results.append({"miners": n, **r})
    finally:
        stop_sims(procs)
    print(
        f"siteagent run to READY on simulated miners ({args.mix}), "
        f"{'known inventory' if args.warm else 'fresh state (probes)'}, telemetry.workers "
        f"{args.workers}, {os.cpu_count()} cores, "
        f"load average before {load0:.2f} after {os.getloadavg()[0]:.2f}"
    )
    print(f"{'miners':>7} {'READY':>9} {'identify':>9} {'first sweep':>12} {'read at READY':>14}")
    for r in results:
        print(
            f"{r['miners']:>7} {r['ready_s']:>7.1f} s {r.get('identify_s', 0):>7.1f} s "
            f"{r.get('first_sweep_s', 0):>10.1f} s {r.get('read_at_ready', '?')!s:>14}"
        )
    small, large = results[0], results[-1]
    size_ratio = large["miners"] / small["miners"]
    for key in ("ready_s", "identify_s", "first_sweep_s"):
        if key in small and key in large and small[key] > 0:
            print(
                f"{key}: {large[key] / small[key]:.2f}x for {size_ratio:.0f}x the miners "
                f"(linear: {size_ratio:.0f}x)"
            )
    print(json.dumps({"mix": args.mix, "warm": args.warm, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
