"""`siteagent demo`: the agent driving a simulated site through a cap drop and a raise.

The simulated miners run in their own process (`python -m sim.serve`) and speak
Braiins OS's real protocols on loopback addresses; the agent discovers and
drives them through pyasic exactly as it would real ones. The report's power
samples are the simulator's own ground truth, not the agent's belief.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siteagent.agent.config import Config, load_config
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent, TickRecord
from siteagent.domain import DeviceKind, DeviceState, Snapshot

log = logging.getLogger("siteagent.demo")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "data" / "demo.toml"
GRID = "grid-event"
# With --meter: the simulated site's auxiliary load (cooling, a fraction of the IT load,
# swinging ±30 % with the weather over a cycle the demo sees whole), its miners'
# under-reporting, and how often the agent reads the meter.
METER_SIM_ARGS = (
    *("--aux-frac", "0.15", "--aux-drift-frac", "0.3", "--aux-period-s", "60"),
    *("--under-report", "braiins=0.1"),
)
METER_PORT = 5020
METER_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Phase:
    """One stretch of the demo: the cap as a fraction of the site's full power, for a time."""

    name: str
    cap_frac: float
    duration_s: float


PHASES = (
    Phase("initial cap", 0.80, 30.0),
    Phase("cap lowered", 0.40, 30.0),
    Phase("cap raised", 0.70, 30.0),
)


class SimClient:
    """The control channel of a simulated site running in another process."""

    def __init__(self, proc: asyncio.subprocess.Process, inventory: dict[str, Any]) -> None:
        self.proc = proc
        self.inventory = inventory
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, miners: int, base: str, sim_args: list[str]) -> SimClient:
        """Spawn the simulator and read its inventory line."""
        # Through `siteagent sim`, so the simulator starts as the command does (its log
        # setup and warning filters, e.g. asyncssh's DSA deprecations at import).
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "siteagent.agent.tools.cli",
            "sim",
            "--miners",
            str(miners),
            "--base",
            base,
            *sim_args,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
        except TimeoutError:
            proc.kill()
            raise RuntimeError("the simulator did not start within 120 s") from None
        if not line:
            await proc.wait()
            raise RuntimeError(f"the simulator exited with status {proc.returncode}")
        return cls(proc, json.loads(line))

    async def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return the reply."""
        async with self._lock:
            if self._writer is None:
                ctl = self.inventory["control"]
                self._reader, self._writer = await asyncio.open_connection(ctl["host"], ctl["port"])
            assert self._reader is not None
            self._writer.write(json.dumps(req).encode() + b"\n")
            await self._writer.drain()
            reply: dict[str, Any] = json.loads(await self._reader.readline())
            return reply

    async def close(self) -> None:
        """Stop the simulator and wait for it to exit."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ask({"cmd": "stop"}), timeout=5)
        if self._writer is not None:
            self._writer.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def demo_config(base: Config, sim_inventory: dict[str, Any], hard_cap_w: float) -> Config:
    """The demo's config: the packaged one, with the simulated miners' range to scan."""
    addresses = [m["address"] for m in sim_inventory["miners"]]
    data = base.model_dump()
    data["site"]["cap_w"] = hard_cap_w
    data["inventory"]["scan"] = [f"{addresses[0]}-{addresses[-1]}"]
    data["inventory"]["miners"] = []
    data["gpu_nodes"] = [
        {
            "id": f"gpu-node-{i + 1}",
            "host": n["address"],
            "port": n["port"],
            "username": n["username"],
            "client_key": n["client_key"],
            "known_hosts": n["known_hosts"],
            "gpus": n["gpus"],
            "overhead_w": n["overhead_w"],
        }
        for i, n in enumerate(sim_inventory.get("gpu_nodes", []))
    ]
    data["meters"] = [
        {
            "id": m["id"],
            "domain": m["domain"],
            "address": m["address"],
            "port": m["port"],
            "unit_id": m["unit_id"],
            "interval_s": METER_INTERVAL_S,
            "timeout_s": METER_INTERVAL_S,
        }
        for m in sim_inventory.get("meters", [])
    ]
    return Config.model_validate(data)


def over_cap(
    samples: list[tuple[float, float]],
    caps: list[tuple[float, float]],
    window_s: float,
) -> tuple[float, float]:
    """Seconds the site spent above its cap, outside the correction window after each drop.

    ``caps`` is the cap timeline as (start t_s, cap W). The window also follows
    the start, where the agent finds the site above its first cap.
    """
    seconds = 0.0
    worst = 0.0
    for (t, w), (t_next, _) in itertools.pairwise(samples):
        idx = max((i for i, (start, _) in enumerate(caps) if start <= t), default=0)
        start, cap = caps[idx]
        lowered = idx == 0 or cap < caps[idx - 1][1]
        if w > cap and not (lowered and t - start < window_s):
            seconds += t_next - t
            worst = max(worst, w - cap)
    return seconds, worst


async def run_demo(
    miners: int = 50,
    *,
    gpu_nodes: int = 4,
    gpus_per_node: int = 8,
    base: str = "127.1.0.1",
    gpu_base: str = "127.2.0.1",
    config_path: Path = DEMO_CONFIG,
    time_scale: float = 1.0,
    out: Any = sys.stdout,
    meter: bool = False,
    meter_address: str = "127.3.0.1",
) -> dict[str, Any]:
    """Run the whole demo; print a status line per tick; return the report.

    With ``meter`` the site has an auxiliary load and under-reporting miners, and the
    agent reads the simulated SunSpec meter at ``meter_address``.
    """
    cfg0 = load_config(config_path)
    metered = [*METER_SIM_ARGS, "--meter", *("--meter-address", meter_address)] if meter else []
    sim = await SimClient.start(
        miners,
        base,
        [
            *("--settle-s", "4", "--pause-s", "2", "--wake-s", "5", "--sample-s", "0.25"),
            *("--gpu-nodes", str(gpu_nodes), "--gpus-per-node", str(gpus_per_node)),
            *("--gpu-base", gpu_base, "--gpu-port", "0"),
            *metered,
            *(("--meter-port", str(METER_PORT)) if meter else ()),
        ],
    )
    try:
        report = await _run(sim, cfg0, miners, time_scale, out)
    finally:
        await sim.close()
    if meter:
        report["meter"] = True
    return report


async def _run(
    sim: SimClient, cfg0: Config, miners: int, time_scale: float, out: Any
) -> dict[str, Any]:
    mining_w = sum(float(m["nameplate_power_w"]) for m in sim.inventory["miners"])
    nodes = sim.inventory.get("gpu_nodes", [])
    gpu_full_w = sum(700.0 * n["gpus"] + float(n["overhead_w"]) for n in nodes)
    full_w = mining_w + gpu_full_w
    cfg = demo_config(cfg0, sim.inventory, hard_cap_w=full_w)
    trackers = await build_devices(cfg)
    found = sum(1 for t in trackers if t.kind is DeviceKind.MINER)
    at = f" at {', '.join(str(n['address']) for n in nodes)}" if nodes else ""
    print(
        f"demo: {found} of {miners} simulated Braiins OS miners found by pyasic, "
        f"{len(nodes)} GPU node(s) over SSH{at}; full power {full_w / 1000:.1f} kW "
        f"({mining_w / 1000:.1f} kW mining, {gpu_full_w / 1000:.1f} kW AI)",
        file=out,
        flush=True,
    )
    t0 = time.monotonic()
    cap_now = {"w": full_w}
    sim_power = {"w": 0.0}

    def site_w(snap: Snapshot) -> float:
        # The meter when the site has one, else what the devices report.
        return snap.measured_w if snap.meter_power_w is None else snap.meter_power_w

    def status(rec: TickRecord) -> None:
        snap = rec.snapshot
        miners_ = [d for d in snap.devices if d.kind is DeviceKind.MINER]
        mining = sum(1 for d in miners_ if d.state is DeviceState.MINING)
        asleep = sum(1 for d in miners_ if d.state is DeviceState.SLEEPING)
        other = len(miners_) - mining - asleep
        ai_w = sum(
            d.reading.power_w or 0.0
            for d in snap.devices
            if d.kind is not DeviceKind.MINER and d.reading is not None
        )
        print(
            f"t={rec.time_s - t0:5.1f}s  site {site_w(snap) / 1000:6.1f} kW "
            f"(sim {sim_power['w'] / 1000:6.1f})  cap {cap_now['w'] / 1000:6.1f} kW  "
            f"effective {rec.limits.effective_cap_w / 1000:6.1f} kW  AI {ai_w / 1000:5.1f} kW  "
            f"mining {mining:3d}  asleep {asleep:3d}  other {other:2d}  "
            f"{rec.plan.mode:7s} sent {len(rec.applied):2d} "
            f"deferred {len(rec.ordered.deferred):2d}",
            file=out,
            flush=True,
        )

    agent = Agent(cfg, trackers, on_tick=status)

    async def poll_power() -> None:
        while True:
            with contextlib.suppress(Exception):
                sim_power["w"] = float((await sim.ask({"cmd": "power"}))["site_power_w"])
            await asyncio.sleep(0.5)

    poller = asyncio.create_task(poll_power())
    await agent.sweep()  # the first sweep completes before the loop takes control
    caps: list[tuple[float, float]] = []
    started = time.monotonic()
    agent.start()
    try:
        for phase in PHASES:
            cap_w = round(phase.cap_frac * full_w)
            cap_now["w"] = cap_w
            caps.append((time.monotonic(), cap_w))
            print(f"demo: {phase.name}: cap {cap_w / 1000:.1f} kW", file=out, flush=True)
            agent.set_cap(GRID, cap_w)
            await asyncio.sleep(phase.duration_s * time_scale)
    finally:
        await agent.stop()
        await close_drivers(trackers)
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    ended = time.monotonic()
    raw = (await sim.ask({"cmd": "samples"}))["samples"]
    samples = [(float(t), float(w)) for t, w in raw if started <= t <= ended]
    seconds, worst = over_cap(samples, caps, cfg.site.correction_window_s)

    def cap_at(t: float) -> float:
        return [c for s, c in caps if s <= t][-1] if t >= caps[0][0] else caps[0][1]

    final = agent.snapshot()
    gpus = [d for d in final.devices if d.kind is DeviceKind.GPU]
    report = {
        "miners": found,
        "gpu_nodes": len(nodes),
        "gpus": len(gpus),
        "duration_s": round(ended - started, 1),
        "cap_changes": len(caps) - 1,
        "caps": [{"t_s": round(s - started, 2), "cap_w": c} for s, c in caps],
        "correction_window_s": cfg.site.correction_window_s,
        "samples": [
            {"t_s": round(t - started, 2), "site_power_w": w, "cap_w": cap_at(t)}
            for t, w in samples
        ],
        "seconds_over_cap": round(seconds, 2),
        "max_over_cap_w": round(worst, 1),
        "actuations": dict(Counter(agent.actuations)),
        "actuation_errors": dict(Counter(agent.actuation_errors)),
        "ticks": agent.ticks,
        "sweeps": agent.sweeps,
        "final": {
            "mining": sum(1 for d in final.devices if d.state is DeviceState.MINING),
            "asleep": sum(1 for d in final.devices if d.state is DeviceState.SLEEPING),
            "gpu_power_limits_w": sorted({d.power_target_w or 0.0 for d in gpus}),
            "site_power_w": round(samples[-1][1], 1) if samples else None,
        },
    }
    return report


def summary(report: dict[str, Any]) -> str:
    """A few human lines about a demo report."""
    acts = ", ".join(f"{k} {v}" for k, v in sorted(report["actuations"].items())) or "none"
    peak = max((s["site_power_w"] for s in report["samples"]), default=0.0)
    caps = " -> ".join(f"{c['cap_w'] / 1000:.1f} kW" for c in report["caps"])
    return "\n".join(
        [
            "demo summary",
            f"  miners driven through pyasic: {report['miners']}; GPUs over SSH: "
            f"{report['gpus']} on {report['gpu_nodes']} node(s)",
            f"  duration: {report['duration_s']} s, {report['ticks']} ticks, "
            f"{report['sweeps']} sweeps",
            f"  cap changes: {report['cap_changes']} ({caps})",
            f"  peak simulated site power: {peak / 1000:.1f} kW",
            f"  seconds over cap after the {report['correction_window_s']:.0f} s correction "
            f"window: {report['seconds_over_cap']} (worst {report['max_over_cap_w']:.0f} W)",
            f"  actuations: {acts}",
            f"  at the end: {report['final']['mining']} mining, {report['final']['asleep']} asleep",
        ]
    )
