"""A simulated site: N miners of a firmware mix on consecutive loopback addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence

from siteagent.sim.antminer import SimAntminer
from siteagent.sim.aux import AuxLoad
from siteagent.sim.base import SimMinerBase
from siteagent.sim.braiins import SimBraiinsMiner
from siteagent.sim.faults import Fault
from siteagent.sim.group import DeviceGroup
from siteagent.sim.luxos import SimLuxOS
from siteagent.sim.power import SIM_MODELS, PowerTiming
from siteagent.sim.vnish import SimVNish
from siteagent.sim.whatsminer import SimWhatsminer

DEFAULT_MODEL_MIX = ("S19 XP", "S21", "S19j Pro")
WHATSMINER_MODELS = ("M50S", "M60S", "M30S++")

SimMiner = SimMinerBase

# Backend name -> miner class (Whatsminers run ``WHATSMINER_MODELS``, the others ``models``).
BACKEND_CLASSES: dict[str, type[SimMinerBase]] = {
    "braiins": SimBraiinsMiner,
    "whatsminer": SimWhatsminer,
    "luxos": SimLuxOS,
    "antminer": SimAntminer,
    "vnish": SimVNish,
}
BACKEND_NAMES = tuple(BACKEND_CLASSES)


class SimSite(DeviceGroup):
    """Starts and stops simulated miners; answers ground-truth power questions."""

    def __init__(
        self,
        n_miners: int = 3,
        *,
        base_address: str = "127.1.0.1",
        models: Sequence[str] = DEFAULT_MODEL_MIX,
        settle_s: float = 20.0,
        pause_s: float = 3.0,
        wake_s: float = 10.0,
        sleep_power_w: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        backends: Sequence[str] = ("braiins",),
        restart_s: float = 5.0,
        password: str | None = None,
        aux: AuxLoad | None = None,
        under_report: Mapping[str, float] | None = None,
    ) -> None:
        base = ipaddress.IPv4Address(base_address)
        if not base.is_loopback:
            raise ValueError(f"simulated miners live on loopback only, not {base_address}")
        unknown = [m for m in models if m not in SIM_MODELS]
        if unknown or not models:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(SIM_MODELS)}")
        last = base + max(0, n_miners - 1)
        if not last.is_loopback:
            raise ValueError(f"{n_miners} miners from {base_address} leave 127.0.0.0/8")
        bad = [b for b in backends if b not in BACKEND_NAMES]
        if bad or not backends:
            raise ValueError(f"unknown backend(s) {bad}; known: {list(BACKEND_NAMES)}")
        under = dict(under_report or {})
        bad = [b for b in under if b not in BACKEND_NAMES]
        if bad:
            raise ValueError(f"under-report for unknown backend(s) {bad}; known: {BACKEND_NAMES}")
        if any(not 0.0 <= f < 1.0 for f in under.values()):
            raise ValueError(f"under-report fractions {under}: expected 0 to below 1")
        timing = PowerTiming(
            settle_s=settle_s,
            pause_s=pause_s,
            wake_s=wake_s,
            sleep_power_w=sleep_power_w,
            restart_s=restart_s,
        )
        self.clock = clock
        self.miners: list[SimMiner] = []
        first = int(base) - int(ipaddress.IPv4Address("127.0.0.0"))
        # Every miner's management password, where not its firmware's default.
        pw: dict[str, str] = {} if password is None else {"password": password}
        for i in range(n_miners):
            backend = backends[i % len(backends)]
            k = i // len(backends)
            address, index = str(base + i), first + i
            cls = BACKEND_CLASSES[backend]
            mix = WHATSMINER_MODELS if backend == "whatsminer" else tuple(models)
            miner = cls(
                address, SIM_MODELS[mix[k % len(mix)]], timing, index=index, clock=clock, **pw
            )
            miner.under_report_frac = under.get(backend, 0.0)
            self.miners.append(miner)
        self._by_address = {m.address: m for m in self.miners}
        # Cooling and auxiliaries: none unless asked for, so the defaults stay the sum.
        self.aux = aux if aux is not None else AuxLoad(t0_s=clock())

    def devices(self) -> Sequence[SimMiner]:
        """The miners, started and stopped together."""
        return self.miners

    @staticmethod
    def backend_of(m: SimMiner) -> str:
        """The firmware a simulated miner runs ("braiins", "whatsminer", ...)."""
        return m.BACKEND

    def miner(self, address: str) -> SimMiner:
        """The simulated miner at ``address``."""
        return self._by_address[address]

    def total_power_w(self, now_s: float | None = None) -> float:
        """True miner power (W), summed over miners, at ``now_s`` (default: now)."""
        t = self.clock() if now_s is None else now_s
        return sum(m.power_w(t) for m in self.miners)

    def aux_power_w(self, it_w: float, now_s: float) -> float:
        """Auxiliary power (W) for an IT load of ``it_w`` at ``now_s``."""
        return self.aux.power_w(it_w, now_s)

    def true_power_w(self, now_s: float | None = None, other_it_w: float = 0.0) -> float:
        """What the site's meter sees (W): miners, ``other_it_w`` (GPU nodes) and auxiliaries."""
        t = self.clock() if now_s is None else now_s
        it_w = self.total_power_w(t) + other_it_w
        return it_w + self.aux_power_w(it_w, t)

    def reported_power_w(self, now_s: float | None = None) -> float:
        """The sum of what the miners report (W): under-reported where a firmware does."""
        t = self.clock() if now_s is None else now_s
        return sum(m.reported_power_w(t) for m in self.miners)

    def set_fault(self, address: str, fault: str | Fault, **kw: float) -> None:
        """Inject a fault on one miner (``delay_s`` for slow, ``factor`` for misreport)."""
        self.miner(address).set_fault(fault, **kw)

    async def ready(self) -> None:
        """Wait until every miner's listeners match its last fault."""
        await asyncio.gather(*(m.ready() for m in self.miners))
