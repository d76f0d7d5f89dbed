"""Power model of a simulated ASIC miner: pure, every function takes the time.

Nothing here reads a clock or does IO, so tests drive time by passing ``now_s``.
Power moves linearly from where it is towards where it is going, so it never
overshoots the higher of the old and new level (a real tuner ramps the PSU
voltage and chip frequencies; we only need the envelope to be honest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Hashrate grows a little slower than power: chips run more efficiently at lower
# voltage, so J/TH improves when a miner is tuned down (hashrate ~ power ** 0.85).
HASHRATE_POWER_EXPONENT = 0.85


@dataclass(frozen=True, slots=True)
class SimModel:
    """One miner model as the simulator knows it (its own table, not the driver's)."""

    key: str
    devdetails_model: str
    nameplate_power_w: float
    nameplate_hashrate_ths: float
    power_target_min_w: float
    power_target_max_w: float
    power_target_default_w: float
    hashboards: int = 3
    chips_per_board: int = 110
    fans: int = 4


def _model(key: str, name: str, power_w: float, hashrate_ths: float, chips: int) -> SimModel:
    # BOSer's tuner accepts targets well below stock; half the nameplate is a
    # plausible floor for air-cooled units, and stock power is the ceiling here.
    return SimModel(
        key=key,
        devdetails_model=name,
        nameplate_power_w=power_w,
        nameplate_hashrate_ths=hashrate_ths,
        power_target_min_w=float(math.ceil(power_w * 0.5)),
        power_target_max_w=power_w,
        power_target_default_w=power_w,
        chips_per_board=chips,
    )


# Nameplate figures: DOMAIN_FACTS.md (stock firmware, approximate).
SIM_MODELS: dict[str, SimModel] = {
    m.key: m
    for m in (
        _model("S19 XP", "Bitmain Antminer S19 XP", 3010.0, 140.0, 110),
        _model("S21", "Bitmain Antminer S21", 3500.0, 200.0, 108),
        _model("S19j Pro", "Bitmain Antminer S19j Pro", 3068.0, 104.0, 126),
        _model("M50S", "M50S_VH51", 3276.0, 126.0, 105),
        _model("M60S", "M60S_VK31", 3441.0, 186.0, 111),
        _model("M30S++", "M30S++_VH41", 3472.0, 112.0, 111),
    )
}


@dataclass(frozen=True, slots=True)
class PowerTiming:
    """How fast a simulated miner moves (s) and what it draws asleep (W)."""

    settle_s: float = 20.0
    pause_s: float = 3.0
    wake_s: float = 10.0
    sleep_power_w: float = 20.0
    # Whatsminer: a power-limit change restarts the mining service for this long.
    restart_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Ramp:
    """A linear move from ``start_w`` at ``t0_s`` to ``end_w`` at ``t0_s + duration_s``."""

    start_w: float
    end_w: float
    t0_s: float
    duration_s: float

    def at(self, now_s: float) -> float:
        """Power (W) on this ramp at ``now_s``; flat before and after it."""
        if self.duration_s <= 0 or now_s >= self.t0_s + self.duration_s:
            return self.end_w
        if now_s <= self.t0_s:
            return self.start_w
        frac = (now_s - self.t0_s) / self.duration_s
        return self.start_w + (self.end_w - self.start_w) * frac


class MinerPowerModel:
    """Ground-truth power and hashrate of one miner as a function of time."""

    def __init__(self, model: SimModel, timing: PowerTiming, now_s: float) -> None:
        self.model = model
        self.timing = timing
        self.target_w = model.power_target_default_w
        self.paused = False
        self._ramp = Ramp(self.target_w, self.target_w, now_s, 0.0)
        self.started_s = now_s
        # Until this time the mining service is down (restart or reboot): no hashing.
        self.down_until_s = now_s

    def power_w(self, now_s: float) -> float:
        """True wall power (W) at ``now_s``."""
        return self._ramp.at(now_s)

    def settled(self, now_s: float) -> bool:
        """Whether the last change has finished at ``now_s``."""
        return now_s >= self._ramp.t0_s + self._ramp.duration_s

    def hashrate_ths(self, now_s: float) -> float:
        """Hashrate (TH/s) at ``now_s``: zero while paused, else follows power."""
        if self.paused or now_s < self.down_until_s:
            return 0.0
        p = self.power_w(now_s)
        if p <= self.timing.sleep_power_w:
            return 0.0
        ratio = p / self.model.nameplate_power_w
        return self.model.nameplate_hashrate_ths * float(ratio**HASHRATE_POWER_EXPONENT)

    def chip_temp_c(self, now_s: float) -> float:
        """Hottest chip (degC): ambient 25 plus a rise proportional to power."""
        return 25.0 + 50.0 * self.power_w(now_s) / self.model.nameplate_power_w

    def set_target(self, target_w: float, now_s: float) -> None:
        """New power target (W); ramps there over ``settle_s`` unless paused."""
        self.target_w = target_w
        if not self.paused:
            self._move(target_w, self.timing.settle_s, now_s)

    def pause(self, now_s: float) -> bool:
        """Stop hashing; power falls to the sleep draw. Returns True if already paused."""
        if self.paused:
            return True
        self.paused = True
        self._move(self.timing.sleep_power_w, self.timing.pause_s, now_s)
        return False

    def resume(self, now_s: float) -> bool:
        """Start hashing; power ramps back to the target. Returns True if already mining."""
        if not self.paused:
            return True
        self.paused = False
        self._move(self.target_w, self.timing.wake_s, now_s)
        return False

    def restart(
        self, now_s: float, down_s: float, idle_w: float, target_w: float | None = None
    ) -> None:
        """Mining service (or the whole miner) restarts: ``idle_w`` for ``down_s``, then ramps.

        Used for a Whatsminer power-limit change (the service restarts) and a
        spontaneous reboot. The miner comes back mining, at ``target_w`` if given.
        """
        if target_w is not None:
            self.target_w = target_w
        self.paused = False
        self.down_until_s = now_s + down_s
        self.started_s = now_s + down_s
        self._ramp = Ramp(idle_w, self.target_w, now_s + down_s, self.timing.wake_s)

    def down(self, now_s: float) -> bool:
        """Whether the mining service is restarting at ``now_s``."""
        return now_s < self.down_until_s

    def _move(self, end_w: float, full_s: float, now_s: float) -> None:
        # Starting from the power of this instant (not the old end point) keeps a
        # change that interrupts a ramp continuous and inside [old, new].
        start = self.power_w(now_s)
        self._ramp = Ramp(start, end_w, now_s, full_s)
