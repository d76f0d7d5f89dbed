"""The simulated site's auxiliary load: cooling and the rest that no device reports.

Pure, like ``sim.power``: every function takes the time. Cooling follows the IT
load (miners and GPUs) as a fraction of it, and drifts with the weather: a slow,
seeded sum of two sines, so a run is the same run every time for a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

# The weather term is two sines: a slow one (the day's heat, compressed) and a faster,
# smaller one (clouds, wind), each with a seeded phase; together they span ±1.
_SLOW_WEIGHT, _FAST_WEIGHT = 0.7, 0.3
_FAST_PERIOD_RATIO = 0.29  # not a simple ratio, so the sum does not repeat every slow period


@dataclass(frozen=True, slots=True)
class AuxLoad:
    """Auxiliary power (W) = ``frac`` x IT load x (1 + ``drift_frac`` x weather(t))."""

    frac: float = 0.0
    drift_frac: float = 0.0  # the weather term's amplitude: 0.3 swings the aux load ±30 %
    period_s: float = 600.0  # the slow weather cycle
    t0_s: float = 0.0  # time at which the weather starts its cycle
    seed: int = 0
    _phases: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.frac <= 2.0:
            raise ValueError(f"aux frac {self.frac}: expected 0 to 2 (of the IT load)")
        if not 0.0 <= self.drift_frac < 1.0:
            raise ValueError(f"aux drift_frac {self.drift_frac}: expected 0 to below 1")
        if self.period_s <= 0:
            raise ValueError(f"aux period_s {self.period_s}: expected > 0")
        rng = random.Random(self.seed)
        object.__setattr__(self, "_phases", (rng.uniform(0, math.tau), rng.uniform(0, math.tau)))

    def weather(self, now_s: float) -> float:
        """The drift's shape at ``now_s``, in -1..1."""
        t = now_s - self.t0_s
        slow = math.sin(math.tau * t / self.period_s + self._phases[0])
        fast = math.sin(math.tau * t / (self.period_s * _FAST_PERIOD_RATIO) + self._phases[1])
        return _SLOW_WEIGHT * slow + _FAST_WEIGHT * fast

    def power_w(self, it_w: float, now_s: float) -> float:
        """Auxiliary power (W) at ``now_s`` for an IT load of ``it_w``."""
        if self.frac == 0.0:
            return 0.0
        return self.frac * max(0.0, it_w) * (1.0 + self.drift_frac * self.weather(now_s))
