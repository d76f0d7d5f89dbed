"""Run a simulated site in its own process, so other programs can drive it.

Prints, first, one JSON line with the inventory and the address of a small
control channel (JSON lines over TCP on loopback) that answers:

- ``{"cmd": "power"}`` -> ``{"t_s": ..., "site_power_w": ...}`` (ground truth)
- ``{"cmd": "samples"}`` -> ``{"samples": [[t_s, site_power_w], ...]}`` recorded
  every ``--sample-s`` seconds since start (``t_s`` on CLOCK_MONOTONIC, which all
  processes of the machine share)
- ``{"cmd": "fault", "address": ..., "fault": ..., ...}`` -> ``{"ok": true}``
- ``{"cmd": "stop"}`` -> ``{"ok": true}``, then the process exits.

With ``--gpu-nodes N`` the inventory also lists ``gpu_nodes`` (simulated GPU
nodes, SSH servers on loopback: ``address``, ``port``, ``username``,
``client_key`` path, ``host_key`` line, ``known_hosts`` path, ``gpus``,
``overhead_w``); ``site_power_w`` then includes their power (overheads
included), ``power`` also answers ``gpu_power_w`` and ``gpu_throughput_tps``,
and ``fault`` accepts a GPU node's address with the faults of ``sim.gpu``.

With ``--aux-frac F`` the site draws an auxiliary load (cooling) of F x its IT
load, drifting ±``--aux-drift-frac`` with a seeded weather term; with
``--under-report BACKEND=FRAC`` miners of that firmware report FRAC less power
than they draw. ``site_power_w`` is then the true figure a meter would read, and
``power`` also answers ``aux_power_w`` and ``reported_power_w`` (the miners' sum).

With ``--meter`` the site has a SunSpec Modbus TCP meter (``sim.meter``) reading
that true power; the inventory lists ``meters`` (``id``, ``address``, ``port``,
``unit_id``, ``domain``, ``model``) and
``{"cmd": "fault", "meter": <id or address>, "fault": ..., ...}`` injects the
faults of ``sim.meter`` (``unreachable``, ``frozen``, ``garbage``,
``frequency_dip``, ``clear``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from typing import Any

from siteagent.sim.aux import AuxLoad
from siteagent.sim.gpu import SimGpuSite
from siteagent.sim.meter import METER_FAULTS, SimMeter, energy_counter
from siteagent.sim.site import BACKEND_NAMES, SimSite

# The simulated POI meter's id in the inventory and the control channel.
SIM_METER_ID = "poi"


class SimServer:
    """A SimSite plus its sampler and control channel."""

    def __init__(self, site: SimSite, sample_s: float, gpu_site: SimGpuSite | None = None) -> None:
        self.site = site
        self.gpu_site = gpu_site
        self.sample_s = sample_s
        self.samples: list[tuple[float, float]] = []
        self.stopped = asyncio.Event()
        self.meters: dict[str, SimMeter] = {}

    def add_meter(
        self, meter_id: str, address: str, port: int, *, model: int = 203, base: int = 40000
    ) -> SimMeter:
        """A SunSpec meter on the site's true power (start it with ``await meter.start()``)."""
        meter = SimMeter(
            energy_counter(self.true_power_w, self.site.clock),
            address,
            port,
            model=model,
            base=base,
            clock=self.site.clock,
        )
        self.meters[meter_id] = meter
        return meter

    def meter(self, key: str) -> SimMeter:
        """A meter by its id or its address."""
        if key in self.meters:
            return self.meters[key]
        for m in self.meters.values():
            if m.address == key:
                return m
        raise KeyError(f"no meter {key!r}; meters: {sorted(self.meters)}")

    async def sample_forever(self) -> None:
        """Record the site's true power (W) every sample_s seconds."""
        while True:
            now = time.monotonic()
            self.samples.append((round(now, 3), round(self.total_power_w(now), 1)))
            await asyncio.sleep(self.sample_s)

    def gpu_power_w(self, now: float) -> float:
        """True power (W) of the GPU nodes, overheads included (0 without them)."""
        return self.gpu_site.total_power_w(now) if self.gpu_site is not None else 0.0

    def true_power_w(self, now: float) -> float:
        """What the site's meter sees (W): miners, GPU nodes and auxiliary load."""
        return self.site.true_power_w(now, other_it_w=self.gpu_power_w(now))

    def total_power_w(self, now: float) -> float:
        """True site power (W): the metered figure, auxiliaries included when there are any."""
        return self.true_power_w(now)

    async def answer_async(self, req: dict[str, Any]) -> dict[str, Any]:
        """One control request to its reply; GPU-node and meter faults need the event loop."""
        if req.get("cmd") == "fault" and "meter" in req:
            fault = str(req["fault"])
            if fault not in METER_FAULTS:
                return {"error": f"unknown meter fault {fault!r}; expected one of {METER_FAULTS}"}
            extra = {k: v for k, v in req.items() if k not in ("cmd", "meter", "fault")}
            await self.meter(str(req["meter"])).set_fault(fault, **extra)
            return {"ok": True}
        gpu = self.gpu_site
        if gpu is not None and req.get("cmd") == "fault":
            address = str(req.get("address"))
            if any(n.address == address for n in gpu.nodes):
                extra = {k: v for k, v in req.items() if k not in ("cmd", "address", "fault")}
                await gpu.set_fault(address, str(req["fault"]), **extra)
                if req["fault"] == "host_key_changed":
                    return {"ok": True, "host_key": gpu.node(address).host_key_line}
                return {"ok": True}
        return self.answer(req)

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        """One control request to its reply."""
        cmd = req.get("cmd")
        if cmd == "power":
            now = time.monotonic()
            reply: dict[str, Any] = {"t_s": now, "site_power_w": self.total_power_w(now)}
            it_w = self.site.total_power_w(now) + self.gpu_power_w(now)
            if self.site.aux.frac > 0:
                reply["aux_power_w"] = self.site.aux_power_w(it_w, now)
            if any(m.under_report_frac > 0 for m in self.site.miners):
                reply["reported_power_w"] = self.site.reported_power_w(now)
            if self.gpu_site is not None:
                reply["gpu_power_w"] = self.gpu_site.total_power_w(now)
                reply["gpu_throughput_tps"] = self.gpu_site.total_throughput_tps(now)
            return reply
        if cmd == "samples":
            return {"samples": self.samples}
        if cmd == "fault":
            extra = {k: v for k, v in req.items() if k not in ("cmd", "address", "fault")}
            self.site.set_fault(str(req["address"]), str(req["fault"]), **extra)
            return {"ok": True}
        if cmd == "stop":
            self.stopped.set()
            return {"ok": True}
        return {"error": f"unknown cmd {cmd!r}; expected power, samples, fault or stop"}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve JSON-line requests on one connection."""
        try:
            while line := await reader.readline():
                try:
                    reply = await self.answer_async(json.loads(line))
                except (ValueError, KeyError, TypeError) as e:
                    reply = {"error": f"bad request: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def serve(args: argparse.Namespace) -> None:
    """Start the site, print its inventory line, serve until stopped."""
    site = SimSite(
        n_miners=args.miners,
        base_address=args.base,
        settle_s=args.settle_s,
        pause_s=args.pause_s,
        wake_s=args.wake_s,
        backends=[b.strip() for b in args.mix.split(",") if b.strip()],
        restart_s=args.restart_s,
        password=args.password,
        aux=AuxLoad(
            frac=args.aux_frac,
            drift_frac=args.aux_drift_frac,
            period_s=args.aux_period_s,
            t0_s=time.monotonic(),
            seed=args.seed,
        ),
        under_report=dict(args.under_report),
    )
    await site.start()
    gpu_site: SimGpuSite | None = None
    if args.gpu_nodes > 0:
        gpu_site = SimGpuSite(
            args.gpu_nodes,
            args.gpus_per_node,
            base_address=args.gpu_base,
            port=args.gpu_port,
            seed=args.seed,
        )
        await gpu_site.start()
    server = SimServer(site, args.sample_s, gpu_site)
    control = await asyncio.start_server(server.handle, "127.0.0.1", args.control_port)
    port = control.sockets[0].getsockname()[1]
    inventory = {
        "control": {"host": "127.0.0.1", "port": port},
        "miners": [
            {
                "address": m.address,
                "backend": site.backend_of(m),
                "model": m.model.key,
                "nameplate_power_w": m.nameplate_power_w,
                "nameplate_hashrate_ths": m.nameplate_hashrate_ths,
            }
            for m in site.miners
        ],
    }
    if gpu_site is not None:
        inventory["gpu_nodes"] = gpu_site.inventory()
    if args.meter:
        meter = server.add_meter(
            SIM_METER_ID, args.meter_address, args.meter_port, model=args.meter_model
        )
        await meter.start()
        inventory["meters"] = [
            {
                "id": SIM_METER_ID,
                "address": meter.address,
                "port": meter.port,
                "unit_id": meter.unit_id,
                "domain": "site",
                "model": meter.model,
            }
        ]
    print(json.dumps(inventory), flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopped.set)
    sampler = asyncio.create_task(server.sample_forever())
    try:
        await server.stopped.wait()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        control.close()
        for m in server.meters.values():
            await m.stop()
        await site.stop()
        if gpu_site is not None:
            await gpu_site.stop()


def parser() -> argparse.ArgumentParser:
    """Command-line options of the simulated site."""
    p = argparse.ArgumentParser(prog="siteagent sim", description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=50, help="number of simulated miners")
    p.add_argument("--base", default="127.1.0.1", help="first miner's loopback address")
    p.add_argument("--settle-s", type=float, default=20.0, help="power-target settle time (s)")
    p.add_argument("--pause-s", type=float, default=3.0, help="time to fall asleep (s)")
    p.add_argument("--wake-s", type=float, default=10.0, help="time to wake (s)")
    p.add_argument(
        "--mix",
        default="braiins",
        help="firmwares, comma-separated, round-robin "
        "(braiins, whatsminer, luxos, antminer, vnish)",
    )
    p.add_argument(
        "--restart-s", type=float, default=5.0, help="Whatsminer service restart on a limit (s)"
    )
    p.add_argument(
        "--password",
        default=None,
        help="every miner's management password instead of its firmware's default (LuxOS has none)",
    )
    p.add_argument("--sample-s", type=float, default=0.25, help="ground-truth sampling (s)")
    p.add_argument("--control-port", type=int, default=0, help="control channel port (0: any)")
    p.add_argument("--gpu-nodes", type=int, default=0, help="number of simulated GPU nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per simulated node")
    p.add_argument("--gpu-base", default="127.2.0.1", help="first GPU node's loopback address")
    p.add_argument("--gpu-port", type=int, default=2222, help="GPU nodes' SSH port (0: any)")
    p.add_argument("--seed", type=int, default=0, help="seed of the GPU demand and weather")
    p.add_argument("--meter", action="store_true", help="serve a SunSpec Modbus TCP site meter")
    p.add_argument("--meter-address", default="127.0.0.1", help="the meter's loopback address")
    p.add_argument("--meter-port", type=int, default=502, help="the meter's Modbus TCP port")
    p.add_argument(
        "--meter-model", type=int, choices=(203, 213), default=203, help="SunSpec meter model"
    )
    p.add_argument(
        "--aux-frac", type=float, default=0.0, help="auxiliary (cooling) load, fraction of IT load"
    )
    p.add_argument(
        "--aux-drift-frac",
        type=float,
        default=0.0,
        help="weather swing of the aux load (0.3: ±30%%)",
    )
    p.add_argument("--aux-period-s", type=float, default=600.0, help="weather cycle (s)")
    p.add_argument(
        "--under-report",
        action="append",
        type=_under_report,
        default=[],
        metavar="BACKEND=FRAC",
        help="miners of BACKEND report FRAC less power than they draw (repeatable)",
    )
    return p


def _under_report(text: str) -> tuple[str, float]:
    backend, sep, frac = text.partition("=")
    try:
        value = float(frac)
    except ValueError:
        value = math.nan
    if not sep or backend not in BACKEND_NAMES or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected BACKEND=FRAC, BACKEND one of {', '.join(BACKEND_NAMES)}, "
            "FRAC from 0 to below 1 (0.1: reports a tenth less)"
        )
    return backend, value


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the simulated site until stopped."""
    args = parser().parse_args(argv)
    if not args.base.startswith("127."):
        print("siteagent sim: --base must be a loopback address (127.x.y.z)", file=sys.stderr)
        return 2
    if not args.gpu_base.startswith("127."):
        print("siteagent sim: --gpu-base must be a loopback address (127.x.y.z)", file=sys.stderr)
        return 2
    if not args.meter_address.startswith("127."):
        print("siteagent sim: --meter-address must be a loopback address", file=sys.stderr)
        return 2
    if not (0.0 <= args.aux_frac <= 2.0 and 0.0 <= args.aux_drift_frac < 1.0):
        print(
            "siteagent sim: --aux-frac must be 0 to 2, --aux-drift-frac 0 to below 1",
            file=sys.stderr,
        )
        return 2
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
