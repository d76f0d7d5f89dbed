"""How long a reload (SIGHUP) takes at a site of listed miners, against the file's own check.

A reload reads and validates the file with the loader a start uses, compares it
with the config in force, and puts it in force between ticks. The baseline is
that validation alone (`siteagent check-config`'s work) in the same process; each
kind of reload is printed in milliseconds and as a ratio to it:

- **cap**: the site cap lowered, nothing else;
- **adopt**: 10% more miners listed (links made; they connect on their first read);
- **refused**: a misspelt key, the file refused.

The agent here is built from links that are never read (no simulators): a reload
does no device IO, only the first reads of adopted miners do, after it.

    python bench/bench_reload.py --miners 1000
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import statistics
import tempfile
import time
from pathlib import Path

from siteagent.agent.config import load_config
from siteagent.agent.control.inventory import miner_link
from siteagent.agent.control.loop import Agent
from siteagent.agent.tools.reload import Reloader


def site_toml(n: int, cap_w: float, extra: str = "") -> str:
    """A site of ``n`` listed miners in ten racks."""
    first = ipaddress.IPv4Address("10.20.0.1")
    racks = "".join(f'[[domains]]\nid = "rack-{r}"\nlimit_w = 400000\n' for r in range(10))
    miners = "".join(
        f'[[inventory.miners]]\naddress = "{first + i}"\ndomain = "rack-{i % 10}"\n'
        for i in range(n)
    )
    return f"[site]\ncap_w = {cap_w}\n{extra}[telemetry]\ninterval_s = 600\n{racks}{miners}"


class LoopProbe:
    """The longest the event loop was held (s) while it runs: a 1 ms sleeper's lateness."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst_s = max(self.worst_s, time.perf_counter() - t - 0.001)

    async def stop(self) -> float:
        """Stop probing; the worst hold seen (s)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst_s


async def timed(
    reloader: Reloader, path: Path, text: str, back: str, runs: int
) -> tuple[float, float]:
    """Median wall time (s) of a reload to ``text``, and the median of the longest hold of
    the event loop (s) during each; the file is put ``back`` between runs."""
    times, holds = [], []
    for _ in range(runs):
        await asyncio.to_thread(path.write_text, text)
        probe = LoopProbe()
        t = time.perf_counter()
        await reloader.reload()
        times.append(time.perf_counter() - t)
        holds.append(await probe.stop())
        await asyncio.to_thread(path.write_text, back)
        assert (await reloader.reload()).ok
        await asyncio.sleep(0.05)  # the tick a lowered cap asked for, outside the next run
    return statistics.median(times), statistics.median(holds)


async def main(n: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site.toml"
        start = site_toml(n, 3_000_000)
        path.write_text(start)
        cfg = load_config(path)
        agent = Agent(cfg, [miner_link(cfg, m) for m in cfg.inventory.miners])
        reloader = Reloader(path, agent)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            load_config(path)
            times.append(time.perf_counter() - t)
        base_s = statistics.median(times)
        print(f"{n} listed miners: validating the file (baseline) {base_s * 1000:.1f} ms")
        cap_s, cap_hold_s = await timed(reloader, path, site_toml(n, 2_000_000), start, runs)
        refused_s, refused_hold_s = await timed(
            reloader, path, site_toml(n, 2_000_000, "cap_kw = 5\n"), start, runs
        )
        print(
            f"  cap lowered:  {cap_s * 1000:7.1f} ms  ({cap_s / base_s:.2f}x the baseline), "
            f"event loop held at most {cap_hold_s * 1000:.1f} ms"
        )
        print(
            f"  refused:      {refused_s * 1000:7.1f} ms  ({refused_s / base_s:.2f}x), "
            f"event loop held at most {refused_hold_s * 1000:.1f} ms"
        )
        # Adopting changes the fleet for good: one run, measured last.
        path.write_text(site_toml(n + n // 10, 3_000_000))
        t = time.perf_counter()
        result = await reloader.reload()
        adopt_s = time.perf_counter() - t
        assert result.ok and len(agent.fleet) == n + n // 10, result.line
        print(
            f"  {n // 10} miners added: {adopt_s * 1000:7.1f} ms  ({adopt_s / base_s:.2f}x, "
            "one run)"
        )


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # each reload logs its lines; not what is measured
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--miners", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    asyncio.run(main(args.miners, args.runs))
