"""The site meter in the loop (issue 17): cap held, margin needed, guard and UF speed.

Run: .venv/bin/python bench/bench_meter.py [--part abcd] [--miners 100] [--big 10000]

The agent is the real ``Agent`` (its scheduler, meter task, policy, ordering); the
meter is the simulator's SunSpec meter (``sim.meter.SimMeter``, a pymodbus server)
read by the real driver over Modbus TCP on loopback; its truth is the site's true
power. The miners are in-bench recording drivers (as in bench_override.py): each
obeys at once, stamps every command, and reports its draw less its own
under-reporting fraction (0 to 10 %), so what is timed is the agent and the meter
path, not firmware latency. The auxiliary load is ``sim.aux.AuxLoad`` (cooling as a
fraction of the IT load, swinging ±30 % with the weather).

(a) the cap with a moving auxiliary load and under-reporting miners, with and
    without the meter (without: a configured overhead at the aux load's mean at the
    usual load):
    seconds over the cap after the correction window, worst overshoot;
(b) the safety margin needed for 0 s over, with and without the meter: the worst
    overshoot of a run at margin 0 (the plan shifts down by the margin), then
    checked by a run at that margin;
(c) guard speed: a meter sample over the cap to the first and the last shed command;
(d) under-frequency: the trigger to the last command of the armed block.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench_override import NAMEPLATE_W, SLEEP_W, Recorder

from siteagent.agent.config import Config, parse_config
from siteagent.agent.control.devices import DeviceDriver, DeviceLink
from siteagent.agent.control.loop import Agent
from siteagent.domain import DeviceReading, DeviceState
from siteagent.sim.aux import AuxLoad
from siteagent.sim.meter import SimMeter, energy_counter

METER_HOST = "127.4.100.1"
AUX_FRAC, AUX_SWING = 0.15, 0.3


class Miner(Recorder):
    """bench_override's recording miner, reporting its draw less its under-reporting."""

    def __init__(self, device_id: str, under_report_frac: float, stamps: list[float]) -> None:
        super().__init__(device_id, stamps)
        self.under = under_report_frac

    @property
    def true_w(self) -> float:
        """What it really draws (W)."""
        return SLEEP_W if self.asleep else self.target_w

    async def read(self) -> DeviceReading:
        """Report the draw, under-reported."""
        return DeviceReading(
            self.device_id,
            time.monotonic(),
            self.true_w * (1.0 - self.under),
            DeviceState.SLEEPING if self.asleep else DeviceState.MINING,
            power_target_w=self.target_w,
        )


@dataclass
class Site:
    """Miners, the auxiliary load, and the true power the meter reads."""

    miners: list[Miner]
    aux: AuxLoad
    aux_step_w: float = 0.0  # an extra load the bench switches on

    def it_w(self) -> float:
        """IT load (W): the miners' true draw."""
        return sum(m.true_w for m in self.miners)

    def true_w(self, now_s: float | None = None) -> float:
        """True site power (W) at ``now_s``."""
        now = time.monotonic() if now_s is None else now_s
        it = self.it_w()
        return it + self.aux.power_w(it, now) + self.aux_step_w


def make_site(n: int, seed: int, period_s: float, stamps: list[float]) -> Site:
    rng = random.Random(seed)
    miners = [Miner(f"m{i:05d}", rng.uniform(0.0, 0.10), stamps) for i in range(n)]
    aux = AuxLoad(AUX_FRAC, AUX_SWING, period_s, time.monotonic(), seed)
    return Site(miners, aux)


def links(site: Site) -> list[DeviceLink]:
    def connector(m: Miner) -> Callable[[], Any]:
        async def connect() -> DeviceDriver:
            return m

        return connect

    return [
        DeviceLink(
            m.device_id,
            address=f"bench-{i}",
            domain="site",
            nameplate_power_w=NAMEPLATE_W,
            # Efficiencies differ, so the under-frequency block has an order.
            nameplate_hashrate_ths=100.0 + i % 7,
            sleep_power_w=SLEEP_W,
            connect=connector(m),
        )
        for i, m in enumerate(site.miners)
    ]


def config(
    state: str,
    cap_w: float,
    *,
    margin_w: float,
    meter_port: int | None,
    overhead_w: float = 0.0,
    fast: bool = True,
    **extra: Any,
) -> Config:
    data: dict[str, Any] = {
        "site": {
            "cap_w": cap_w,
            "safety_margin_w": margin_w,
            "overhead_w": overhead_w,
            "correction_window_s": 15,
        },
        "policy": {
            "min_off_s": 0,
            # A band close under the cap, as a site runs that wants its power.
            "capping_threshold": 1.0,
            "capping_target": 0.99,
            "uncapping_threshold": 0.96,
            "restore_ramp_w_per_s": 0.02 * cap_w,
        },
        # (c) and (d) sweep between their runs, not while they are timed.
        "telemetry": {
            "interval_s": 1 if fast else 3600,
            "stale_after_s": 10 if fast else 3600,
            "concurrency": 10_000,
        },
        "control": {"interval_s": 1 if fast else 3600, "concurrency": 10_000},
        "state": {"dir": state},
        **extra,
    }
    if meter_port is not None:
        data["meters"] = [
            {
                "id": "poi",
                "address": METER_HOST,
                "port": meter_port,
                "interval_s": 0.25 if fast else 0.1,
                "timeout_s": 0.25 if fast else 0.1,
            }
        ]
    return parse_config(data)


async def start_meter(site: Site, port: int) -> SimMeter:
    meter = SimMeter(energy_counter(lambda _: site.true_w()), METER_HOST, port)
    await meter.start()
    return meter


async def poll_until(
    cond: Callable[[], bool], *, step_s: float = 0.01, limit_s: float = 30
) -> None:
    """Wait until ``cond`` holds (polled: the bench only watches the agent)."""
    for _ in range(int(limit_s / step_s)):
        if cond():
            return
        await asyncio.sleep(step_s)
    raise TimeoutError("the bench waited in vain")


# -- (a), (b): the cap with a moving auxiliary load --------------------------------------


async def cap_run(
    n: int, *, metered: bool, margin_w: float, run_s: float, seed: int, port: int
) -> tuple[float, float, float, float]:
    """One run: seconds over the cap after the window, worst overshoot (W), the cap (W),
    and the mean true draw over the cap after the window (what the cap was used for)."""
    stamps: list[float] = []
    site = make_site(n, seed, period_s=run_s / 1.5, stamps=stamps)
    full_it_w = n * NAMEPLATE_W
    cap_w = 0.85 * full_it_w * (1 + AUX_FRAC)
    # Without the meter the operator configures the aux load as once measured at the
    # site's usual load under the cap (85 % of its miners' full power), in mild weather.
    overhead_w = 0.0 if metered else AUX_FRAC * 0.85 * full_it_w
    meter = await start_meter(site, port) if metered else None
    try:
        with tempfile.TemporaryDirectory() as state:
            cfg = config(
                state,
                cap_w,
                margin_w=margin_w,
                meter_port=port if metered else None,
                overhead_w=overhead_w,
            )
            agent = Agent(cfg, links(site))
            await agent.sweep()
            agent.start()
            t0 = time.monotonic()
            seconds, worst, dt = 0.0, 0.0, 0.1
            drawn: list[float] = []
            try:
                while (now := time.monotonic()) - t0 < run_s:
                    true_w = site.true_w(now)
                    if now - t0 >= cfg.site.correction_window_s:
                        drawn.append(true_w)
                        if true_w > cap_w:
                            seconds += dt
                            worst = max(worst, true_w - cap_w)
                    await asyncio.sleep(dt)
            finally:
                await agent.stop()
    finally:
        if meter is not None:
            await meter.stop()
    return seconds, worst, cap_w, statistics.fmean(drawn) / cap_w


async def part_ab(n: int, run_s: float, port: int) -> None:
    print(
        f"(a) cap held: {n} miners under-reporting 0-10 %, aux {AUX_FRAC:.0%} of IT "
        f"swinging ±{AUX_SWING:.0%}, {run_s:.0f} s runs, margin 0"
    )
    print(f"{'':14} {'s over':>7} {'worst W':>9} {'worst/cap':>10} {'mean draw/cap':>14}")
    found: dict[bool, tuple[float, float]] = {}
    for metered in (True, False):
        s, w, cap, used = await cap_run(
            n, metered=metered, margin_w=0.0, run_s=run_s, seed=1, port=port
        )
        found[metered] = (w, cap)
        name = "with meter" if metered else "without meter"
        print(f"{name:14} {s:7.1f} {w:9.0f} {w / cap:9.2%} {used:13.1%}")
    print("(b) margin needed for 0 s over (worst overshoot at margin 0), then checked:")
    print(f"{'':14} {'margin W':>9} {'of cap':>7} {'s over at it':>13} {'worst W':>8}")
    for metered in (True, False):
        w, cap = found[metered]
        margin = w * 1.05 + 1.0
        s, w2, _, _ = await cap_run(
            n, metered=metered, margin_w=margin, run_s=run_s, seed=1, port=port
        )
        name = "with meter" if metered else "without meter"
        print(f"{name:14} {margin:9.0f} {margin / cap:6.2%} {s:13.1f} {w2:8.0f}")
    (wm, cap), (wn, _) = found[True], found[False]
    print(
        f"margin needed: with the meter {wm / cap:.2%} of the cap (goal <= 1 %), without "
        f"{wn / cap:.2%}"
    )


# -- (c): guard speed --------------------------------------------------------------------


async def part_c(n: int, runs: int, port: int) -> None:
    stamps: list[float] = []
    site = make_site(n, 2, period_s=1e9, stamps=stamps)
    site = Site(site.miners, AuxLoad())  # no weather: the step is the only change
    cap_w = n * NAMEPLATE_W * 1.02
    meter = await start_meter(site, port)
    print(
        f"(c) guard: {n} miners at {site.it_w() / 1e6:.1f} MW, cap {cap_w / 1e6:.1f} MW; "
        "no scheduled tick (control.interval_s 3600); an aux step takes the meter over"
    )
    print(
        f"{'step MW':>8} {'sent':>6} {'sample->first':>14} {'sample->last':>13} "
        f"{'step->sample':>13} {'plan ms':>8}"
    )
    firsts: list[float] = []
    lasts: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as state:
            cfg = config(state, cap_w, margin_w=0.0, meter_port=port, fast=False)
            ticked = asyncio.Event()
            agent = Agent(cfg, links(site), on_tick=lambda _: ticked.set())
            await agent.sweep()
            await agent.tick()
            agent.start()
            await asyncio.sleep(1.0)
            for _ in range(runs):
                stamps.clear()
                ticked.clear()
                agent.metering.guard_requested_s = None
                # Each run's step takes the meter 5 % over the cap, wherever the last left it.
                step_w = 1.05 * cap_w - site.true_w()
                stepped = time.perf_counter()
                site.aux_step_w = site.aux_step_w + step_w
                await asyncio.wait_for(ticked.wait(), timeout=30)
                await poll_until(lambda: bool(stamps))
                await asyncio.sleep(0.5)  # every command of that tick
                record = agent.last_tick
                assert record is not None and agent.metering.guard_requested_s is not None
                sample = agent.metering.guard_requested_s
                first, last = min(stamps) - sample, max(stamps) - sample
                firsts.append(first)
                lasts.append(last)
                print(
                    f"{step_w / 1e6:8.2f} {len(stamps):6d} {first * 1e3:11.1f} ms "
                    f"{last * 1e3:10.1f} ms {(sample - stepped) * 1e3:10.1f} ms "
                    f"{record.plan_duration_s * 1e3:8.1f}"
                )
                await agent.sweep()
                await agent.tick()
            await agent.stop()
    finally:
        await meter.stop()
    print(
        f"sample -> first shed: median {statistics.median(firsts) * 1e3:.0f} ms, "
        f"max {max(firsts) * 1e3:.0f} ms (goal 250 ms); -> last: median "
        f"{statistics.median(lasts) * 1e3:.0f} ms, max {max(lasts) * 1e3:.0f} ms (goal 1000 ms)"
    )


# -- (d): under-frequency ----------------------------------------------------------------


async def part_d(n: int, runs: int, port: int) -> None:
    stamps: list[float] = []
    site = make_site(n, 3, period_s=1e9, stamps=stamps)
    site = Site(site.miners, AuxLoad())
    block_w = 0.1 * n * NAMEPLATE_W
    meter = await start_meter(site, port)
    print(
        f"(d) under-frequency: {n} miners, block {block_w / 1e6:.1f} MW (sleep), "
        "trigger 59.7 Hz for 0 s, meter read every 100 ms"
    )
    print(f"{'sent':>6} {'trigger->first':>15} {'trigger->last':>14} {'dip->trigger':>13}")
    lasts: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as state:
            cfg = config(
                state,
                n * NAMEPLATE_W * 2,
                margin_w=0.0,
                meter_port=port,
                fast=False,
                frequency_response={
                    "enabled": True,
                    "trigger_hz": 59.7,
                    "trigger_s": 0.0,
                    "restore_after_s": 0.5,
                    "block_w": block_w,
                },
            )
            agent = Agent(cfg, links(site))
            await agent.sweep()
            await agent.tick()
            agent.start()
            await asyncio.sleep(1.0)
            fr = agent.frequency
            assert fr is not None
            for _ in range(runs):
                stamps.clear()
                triggers = fr.triggers
                dipped = time.perf_counter()
                await meter.set_fault("frequency_dip", hz=59.5, duration_s=0.3)
                done_before = agent.metering.shed_done_s

                def shed_done(before: float | None = done_before, seen: int = triggers) -> bool:
                    return fr.triggers > seen and agent.metering.shed_done_s not in (None, before)

                await poll_until(shed_done, step_s=0.005)
                started = agent.metering.shed_started_s
                assert started is not None
                block = len(fr.shed.changes) if fr.shed is not None else 0
                shed = sorted(stamps)[:block]
                last = max(shed) - started
                lasts.append(last)
                print(
                    f"{len(shed):6d} {(min(shed) - started) * 1e3:12.1f} ms "
                    f"{last * 1e3:11.1f} ms {(started - dipped) * 1e3:10.1f} ms"
                )
                await poll_until(lambda: not fr.triggered)
                await asyncio.sleep(0.5)
                await agent.sweep()
                await agent.tick()
                await agent.sweep()
                await agent.tick()
            await agent.stop()
    finally:
        await meter.stop()
    print(
        f"trigger -> last command of the block: median {statistics.median(lasts) * 1e3:.0f} ms, "
        f"max {max(lasts) * 1e3:.0f} ms (goal 500 ms)"
    )


async def bench(args: argparse.Namespace) -> None:
    if "a" in args.part or "b" in args.part:
        await part_ab(args.miners, args.run_s, 15100)
    if "c" in args.part:
        await part_c(args.big, args.runs, 15101)
    if "d" in args.part:
        await part_d(args.big, args.runs, 15102)


def main() -> None:
    """Parse arguments and run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="abcd")
    p.add_argument("--miners", type=int, default=100, help="miners for (a) and (b)")
    p.add_argument("--run-s", type=float, default=60.0, help="length of each (a)/(b) run")
    p.add_argument("--big", type=int, default=10_000, help="miners for (c) and (d)")
    p.add_argument("--runs", type=int, default=3, help="runs of (c) and (d)")
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
