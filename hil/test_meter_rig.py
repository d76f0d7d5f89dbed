"""Read-only checks against real power meters listed in a rig file (see hil/README.md).

A meter is described in the rig file exactly as in the agent's config
(``[[meters]]``, the same keys), so a map that passes here is the map to deploy.
Only Modbus reads are sent (function codes 3 and 4); nothing is written.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rig import rig

from siteagent.agent.config import MeterConfig, parse_config
from siteagent.drivers.meter import meter_driver

# The rig's meters are checked against this cap unless the rig file sets cap_w.
DEFAULT_RIG_CAP_W = 10_000_000.0


def _rig_meters() -> list[tuple[MeterConfig, dict[str, Any]]]:
    path, data, entries = rig("meters")
    # The rig-only keys are taken out; the rest must be a valid [[meters]] entry.
    extras = [{k: e.pop(k) for k in ("reads",) if k in e} for e in entries]
    cap_w = float(data.get("cap_w", DEFAULT_RIG_CAP_W))
    # Each on its own: a rig's meters need not be one per domain of one site.
    meters = [
        parse_config({"site": {"cap_w": cap_w}, "meters": [e]}, source=path).meters[0]
        for e in entries
    ]
    return list(zip(meters, extras, strict=True))


async def test_read_each_meter() -> None:
    for cfg, extra in _rig_meters():
        drv = meter_driver(cfg)
        readings, latencies_s = [], []
        try:
            for _ in range(int(extra.get("reads", 5))):
                start = time.monotonic()
                readings.append(await drv.read())  # a MeterError fails the check, with its reason
                latencies_s.append(time.monotonic() - start)
                await asyncio.sleep(cfg.interval_s)
        finally:
            await drv.close()
        first, last = readings[0], readings[-1]
        if first.energy_import_wh is not None and last.energy_import_wh is not None:
            assert last.energy_import_wh >= first.energy_import_wh, "the energy count went back"
        print(
            f"{cfg.id} ({cfg.address}:{cfg.port} unit {cfg.unit_id}, {drv.layout}): "
            f"{first.power_w:.0f} W, phases {[round(p) for p in first.phase_w]}, "
            f"{first.frequency_hz} Hz, {first.energy_import_wh} Wh; "
            f"read in {1000 * min(latencies_s):.1f}-{1000 * max(latencies_s):.1f} ms"
        )
