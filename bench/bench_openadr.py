"""Event compliance through the OpenADR VEN: from an event's start to the last shed command.

Run: .venv/bin/python bench/bench_openadr.py [--runs 2] [--duration 12]

openleadr's own VTN on loopback sends a LOAD_DISPATCH setpoint of half the simulated
miners' nameplate, starting 3 s after it is queued; the real Agent (telemetry every
0.5 s, a tick every 1 s, its event book in SQLite) and the VEN take it; six simulated
Braiins OS miners over pyasic obey with their own settle times. Sampled every 0.05 s
by the simulator's own power: time over the target after the correction window (the
goal is 0 s), and the time from the event's start to the last shed command sent. The
baseline, in the same process: the same cap set directly (``Agent.set_cap``) at the
same instant. Also with a ramp-up, where the book lowers the cap before the start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from oadr_vtn import Compliance, compliance_run


async def runs(via: str, n: int, duration_s: float, ramp_up_s: float | None) -> list[Compliance]:
    out = []
    for _ in range(n):
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            out.append(
                await compliance_run(Path(tmp), via=via, ramp_up_s=ramp_up_s, duration_s=duration_s)
            )
    return out


def line(name: str, results: list[Compliance]) -> float:
    sheds = [r.last_shed_s for r in results if r.last_shed_s is not None]
    unders = [r.under_after_s for r in results if r.under_after_s is not None]
    over = sum(r.seconds_over for r in results)
    peak = max(max(r.after_window) / r.target_w for r in results)
    last = statistics.median(sheds) if sheds else float("nan")
    print(
        f"{name:30s} last shed command after start: median {last:5.2f} s "
        f"(runs {', '.join(f'{s:.2f}' for s in sheds)}); site under target (simulator's "
        f"power) after {', '.join(f'{u:.2f}' for u in unders)} s; over target after the "
        f"{results[0].window_s:.0f} s window: {over:.2f} s; peak {peak:.2f} x target"
    )
    return last


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--duration", type=float, default=12.0)
    args = p.parse_args()
    # The VTN's own lines (one per poll and report, a banner per start) would bury them.
    logging.getLogger("openleadr").setLevel(logging.ERROR)
    base = line(
        "baseline: Agent.set_cap at start", await runs("cap", args.runs, args.duration, None)
    )
    event = line(
        "OpenADR event (no ramp-up)", await runs("openadr", args.runs, args.duration, None)
    )
    ramp = line("OpenADR event, 5 s ramp-up", await runs("openadr", args.runs, args.duration, 5.0))
    print(f"ratio event / baseline: {event / base:.2f}; ramp-up / baseline: {ramp / base:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
