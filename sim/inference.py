"""A simulated inference server on a GPU node: demand, a queue, and vLLM's metrics over HTTP.

Demand model (``InferenceLoad``): the load offered, as a fraction of the node's
full-power capacity, is a daily cycle (a trough at night, a peak in the
afternoon) plus bursts: a seeded, deterministic set per hour, each rising and
falling over a raised cosine of one to ten minutes. At most ``max_load`` (a node
is sized for its peak): every burst can be served at full power.

Queue model (``InferenceService``), a fluid vLLM: ``capacity_requests`` sequences
run at once at full power, each for ``request_s``. Under power limits the node
runs fewer at once, capacity x ``capacity_requests`` (capacity: the GPUs' mean
fraction of peak under their limits, ``gpu.capacity_frac``; 0 while drained).
Requests arrive at load x ``capacity_requests`` / ``request_s`` per second; those
that find no free sequence wait. So the queue grows while the node's power is
below what demand needs and drains once it is above. Integrated in steps of
``step_s`` as the node's clock moves (lazily, like the GPUs' draw).

Service level: each minute's largest queue is kept, so the simulator measures
the minutes in which more than a contract's ``max_queue`` requests waited.

Metrics (``/metrics`` on the node's address, aiohttp): vLLM's names,
``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` (sequences held over those the KV cache fits at full
power) and the counter ``vllm:generation_tokens_total``. ``garbage`` makes it
answer something that is not the text format.

This module imports nothing of the agent, drivers, policies or domain.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from aiohttp import web

# Bursts: how many an hour at most, their height (fraction of capacity) and length (s).
BURSTS_PER_HOUR = 3
BURST_HEIGHT = (0.1, 0.35)
BURST_LENGTH_S = (60.0, 600.0)
DAY_S = 86_400.0


class InferenceLoad:
    """Offered load (fraction of the node's full-power capacity): a daily cycle plus bursts."""

    def __init__(
        self,
        seed: int,
        *,
        night: float = 0.2,
        peak: float = 0.6,
        peak_hour: float = 14.0,
        max_load: float = 0.95,
        bursts: bool = True,
    ) -> None:
        self.seed = seed
        self.night, self.peak, self.peak_hour = night, peak, peak_hour
        self.max_load = max_load
        self.bursts = bursts
        self._hours: dict[int, list[tuple[float, float, float]]] = {}

    def _bursts_of(self, hour: int) -> list[tuple[float, float, float]]:
        """The bursts (start s, length s, height) starting in ``hour``, made once per hour."""
        kept = self._hours.get(hour)
        if kept is None:
            rng = random.Random(self.seed * 1_000_003 + hour)
            kept = []
            for _ in range(rng.randint(0, BURSTS_PER_HOUR)):
                start = hour * 3600.0 + rng.uniform(0.0, 3600.0)
                kept.append((start, rng.uniform(*BURST_LENGTH_S), rng.uniform(*BURST_HEIGHT)))
            if len(self._hours) > 64:
                self._hours.clear()
            self._hours[hour] = kept
        return kept

    def at(self, t_s: float) -> float:
        """The load offered at ``t_s`` (s since the simulated midnight)."""
        hour_of_day = (t_s % DAY_S) / 3600.0
        # A cosine with its top at the peak hour and its bottom twelve hours away.
        daily = self.night + (self.peak - self.night) * 0.5 * (
            1.0 + math.cos(2 * math.pi * (hour_of_day - self.peak_hour) / 24.0)
        )
        extra = 0.0
        if self.bursts:
            h = math.floor(t_s / 3600.0)
            for hour in (h - 1, h):
                for start, length, height in self._bursts_of(hour):
                    x = (t_s - start) / length
                    if 0.0 <= x <= 1.0:
                        extra += height * 0.5 * (1.0 - math.cos(2 * math.pi * x))
        return min(self.max_load, daily + extra)


class InferenceService:
    """The node's inference server: a fluid queue fed by ``load`` and served at the
    capacity its GPUs' power limits allow (``capacity()``), and its metrics endpoint."""

    def __init__(
        self,
        load: InferenceLoad,
        capacity: Callable[[], float],
        now_s: float,
        *,
        capacity_requests: int = 256,
        request_s: float = 8.0,
        peak_tokens_per_s: float = 20_000.0,
        step_s: float = 1.0,
    ) -> None:
        self.load = load
        self.capacity = capacity
        self.capacity_requests = capacity_requests
        self.request_s = request_s
        self.peak_tokens_per_s = peak_tokens_per_s
        self.step_s = step_s
        self._t = now_s
        self.running = load.at(now_s) * capacity_requests
        self.waiting = 0.0
        self.tokens_total = 0.0
        self.minute_max: dict[int, float] = {}  # minute index -> largest queue in it
        self.garbage = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    def advance(self, now_s: float) -> None:
        """Move the queue to ``now_s`` at the capacity in force since the last call."""
        if now_s <= self._t:
            return
        slots = max(0.0, self.capacity()) * self.capacity_requests
        t = self._t
        while t < now_s:
            dt = min(self.step_s, now_s - t)
            arrivals = self.load.at(t) * self.capacity_requests / self.request_s * dt
            done = self.running / self.request_s * dt
            in_system = max(0.0, self.running + self.waiting + arrivals - done)
            self.running = min(in_system, slots)
            self.waiting = in_system - self.running
            self.tokens_total += self.peak_tokens_per_s * self.running / self.capacity_requests * dt
            minute = int(t // 60.0)  # the minute this step lies in
            t += dt
            if self.waiting > self.minute_max.get(minute, 0.0) or minute not in self.minute_max:
                self.minute_max[minute] = self.waiting
        self._t = now_s

    def busy_frac(self, now_s: float) -> float:
        """What the GPUs serve (fraction of peak): the sequences running over full capacity."""
        self.advance(now_s)
        return self.running / self.capacity_requests

    def minutes_over(self, max_queue: float, since_s: float = 0.0) -> tuple[int, int]:
        """(minutes in which more than ``max_queue`` requests waited, minutes simulated),
        from ``since_s`` on."""
        first = int(since_s // 60.0)
        mins = [w for m, w in self.minute_max.items() if m >= first]
        return sum(1 for w in mins if w > max_queue), len(mins)

    def exposition(self, now_s: float) -> str:
        """The metrics page at ``now_s``, as vLLM writes it."""
        self.advance(now_s)
        if self.garbage:
            return "<html><body>502 Bad Gateway</body></html>\n{not: metrics}\n"
        label = '{model_name="sim-llm"}'
        kv = self.running / self.capacity_requests
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {self.running:.3f}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {self.waiting:.3f}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {kv:.6f}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{label} {self.tokens_total:.1f}",
        ]
        return "\n".join(lines) + "\n"

    async def serve(self, address: str, port: int, clock: Callable[[], float]) -> None:
        """Serve ``/metrics`` on ``address``:``port`` (0: a free port, kept across restarts)."""

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                text=self.exposition(clock()), content_type="text/plain", charset="utf-8"
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, address, port or self.port)
        await site.start()
        self._runner = runner
        if not self.port:
            self.port = int(runner.addresses[0][1])  # the port 0 picked

    async def stop(self) -> None:
        """Close the endpoint (the queue goes on)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
