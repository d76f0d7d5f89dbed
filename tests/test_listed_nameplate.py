"""A listed miner's nameplate: the config's own figures, then its identified model's, then
the default; whether it is identified at startup or on a later read."""

from __future__ import annotations

from siteagent.agent.config import parse_config
from siteagent.agent.control.inventory import build_devices, close_drivers
from siteagent.agent.control.loop import Agent
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.power import SIM_MODELS, PowerTiming
from siteagent.sim.site import SimSite

BASE = "127.1.206.1"  # this module's own loopback range
LATE = "127.1.206.9"  # a listed miner that answers only after startup
TIMEOUT_S = 1.0
XP_W, XP_THS = 3010.0, 140.0  # an S19 XP's stock nameplate (drivers/backends/nameplate.py)


async def test_listed_miners_keep_their_identified_model_unless_the_config_says() -> None:
    cfg = parse_config(
        {
            "site": {"cap_w": 100_000},
            "inventory": {
                "miners": [
                    {"address": "127.1.206.1", "id": "plain"},
                    {"address": "127.1.206.2", "id": "own-hashrate", "nameplate_hashrate_ths": 150},
                    {"address": "127.1.206.3", "id": "own-power", "nameplate_power_w": 3300},
                    {"address": LATE, "id": "late"},
                ],
                "default_nameplate_power_w": 3500,
                "default_nameplate_hashrate_ths": 100,
            },
            "telemetry": {"timeout_s": TIMEOUT_S},
        }
    )
    async with SimSite(3, base_address=BASE, models=["S19 XP"], backends=["braiins"]):
        trackers = await build_devices(cfg)
        by_id = {t.device_id: t for t in trackers}
        assert by_id["late"].driver is None  # nothing answered there at startup
        late = SimBraiinsMiner(LATE, SIM_MODELS["S19 XP"], PowerTiming(), index=9)
        await late.start()
        try:
            agent = Agent(cfg, trackers)
            await agent.sweep()  # the first read connects "late" and identifies it
            assert by_id["late"].driver is not None
            snap = agent.snapshot()
            nameplates = {
                d.device_id: (d.nameplate_power_w, d.nameplate_hashrate_ths) for d in snap.devices
            }
        finally:
            await close_drivers(trackers)
            await late.stop()
    assert nameplates == {
        "plain": (XP_W, XP_THS),  # was the default's 3500 W / 100 TH/s: 35.0 J/TH
        "own-hashrate": (XP_W, 150.0),
        "own-power": (3300.0, XP_THS),
        "late": (XP_W, XP_THS),
    }
