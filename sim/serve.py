"""Run a simulated site in its own process, so other programs can drive it.

Prints, first, one JSON line with the inventory and the address of a small
control channel (JSON lines over TCP on loopback) that answers:

- ``{"cmd": "power"}`` -> ``{"t_s": ..., "site_power_w": ...}`` (ground truth)
- ``{"cmd": "samples"}`` -> ``{"samples": [[t_s, site_power_w], ...]}`` recorded
  every ``--sample-s`` seconds since start (``t_s`` on CLOCK_MONOTONIC, which all
  processes of the machine share)
- ``{"cmd": "fault", "address": ..., "fault": ..., ...}`` -> ``{"ok": true}``
- ``{"cmd": "stop"}`` -> ``{"ok": true}``, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

from sim.site import SimSite


class SimServer:
    """A SimSite plus its sampler and control channel."""

    def __init__(self, site: SimSite, sample_s: float) -> None:
        self.site = site
        self.sample_s = sample_s
        self.samples: list[tuple[float, float]] = []
        self.stopped = asyncio.Event()

    async def sample_forever(self) -> None:
        """Record the site's true power (W) every sample_s seconds."""
        while True:
            now = time.monotonic()
            self.samples.append((round(now, 3), round(self.site.total_power_w(now), 1)))
            await asyncio.sleep(self.sample_s)

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        """One control request to its reply."""
        cmd = req.get("cmd")
        if cmd == "power":
            now = time.monotonic()
            return {"t_s": now, "site_power_w": self.site.total_power_w(now)}
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
                    reply = self.answer(json.loads(line))
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
    )
    await site.start()
    server = SimServer(site, args.sample_s)
    control = await asyncio.start_server(server.handle, "127.0.0.1", args.control_port)
    port = control.sockets[0].getsockname()[1]
    inventory = {
        "control": {"host": "127.0.0.1", "port": port},
        "miners": [
            {
                "address": m.address,
                "backend": "braiins",
                "model": m.model.key,
                "nameplate_power_w": m.nameplate_power_w,
                "nameplate_hashrate_ths": m.nameplate_hashrate_ths,
            }
            for m in site.miners
        ],
    }
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
        await site.stop()


def parser() -> argparse.ArgumentParser:
    """Command-line options of the simulated site."""
    p = argparse.ArgumentParser(prog="siteagent sim", description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=50, help="number of simulated miners")
    p.add_argument("--base", default="127.1.0.1", help="first miner's loopback address")
    p.add_argument("--settle-s", type=float, default=20.0, help="power-target settle time (s)")
    p.add_argument("--pause-s", type=float, default=3.0, help="time to fall asleep (s)")
    p.add_argument("--wake-s", type=float, default=10.0, help="time to wake (s)")
    p.add_argument("--sample-s", type=float, default=0.25, help="ground-truth sampling (s)")
    p.add_argument("--control-port", type=int, default=0, help="control channel port (0: any)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the simulated site until stopped."""
    args = parser().parse_args(argv)
    if not args.base.startswith("127."):
        print("siteagent sim: --base must be a loopback address (127.x.y.z)", file=sys.stderr)
        return 2
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
