"""An inference server's Prometheus endpoint (vLLM, TGI, Triton, NVIDIA Dynamo, any exporter).

One kept HTTP connection per node (httpx, with a timeout), the text parsed by
prometheus-client's own parser. A read returns the named metrics, each summed
over its label sets (vLLM labels its gauges by model; a node serving two
models queues both). What the numbers mean (demand, power) is decided in
``agent/control/ai_demand.py``; this module only reads.

Errors become the project's own: no answer or a refused connection is
``DeviceUnreachable``; an answer that is not the text format (or lacks every
metric asked for) is ``DeviceFaulted``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from siteagent.domain.errors import DeviceFaulted, DeviceUnreachable

# A scrape answer larger than this is no metrics page of an inference server.
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MetricsSample:
    """The metrics read at ``timestamp_s`` (monotonic s): name -> value, summed over labels."""

    timestamp_s: float
    values: dict[str, float]


def parse_metrics(text: str, names: Collection[str]) -> dict[str, float]:
    """The samples named in ``names`` from Prometheus text, each summed over its label sets.

    ValueError for text the parser refuses; names absent from the text are absent
    from the result. A counter's sample keeps its ``_total`` name.
    """
    wanted = set(names)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                if not math.isfinite(s.value):
                    raise ValueError(f"{s.name} is {s.value}")
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


class MetricsEndpoint:
    """One node's metrics URL, read over a kept connection."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.clock = clock
        self._client = httpx.AsyncClient(timeout=timeout_s, transport=transport)

    async def read(self, names: Collection[str]) -> MetricsSample:
        """The metrics ``names`` as the endpoint has them now."""
        try:
            response = await self._client.get(self.url)
        except httpx.HTTPError as e:
            raise DeviceUnreachable(f"{self.url}: {type(e).__name__} {e}".rstrip()) from e
        if response.status_code != 200:
            raise DeviceFaulted(f"{self.url}: HTTP {response.status_code}")
        if len(response.content) > MAX_BODY_BYTES:
            raise DeviceFaulted(f"{self.url}: {len(response.content)} bytes, not a metrics page")
        try:
            values = parse_metrics(response.text, names)
        except ValueError as e:
            raise DeviceFaulted(f"{self.url}: not Prometheus text ({e})") from e
        if not values:
            raise DeviceFaulted(f"{self.url}: none of {', '.join(sorted(names))} is exposed")
        return MetricsSample(self.clock(), values)

    async def close(self) -> None:
        """Close the kept connection."""
        await self._client.aclose()
