"""A minimal recording site for API tests and the override benchmark.

Each device's driver obeys at once and records every command with its time,
so a test can ask what was sent and when, without sockets or simulated
firmware. Protocol-level behaviour is tested elsewhere against sim/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from siteagent.agent.config import Config, parse_config
from siteagent.agent.control.devices import DeviceDriver, DeviceLink
from siteagent.agent.control.loop import Agent
from siteagent.domain import DeviceControls, DeviceIdentity, DeviceReading, DeviceState

SLEEP_W = 25.0


@dataclass
class CommandLog:
    """Every command sent to any fake device: (perf_counter time, device, kind, value)."""

    entries: list[tuple[float, str, str, float | None]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        """The kinds of command sent, in order."""
        return [e[2] for e in self.entries]


class RecordingDriver:
    """A miner that obeys at once and records what it was told."""

    def __init__(self, device_id: str, nameplate_w: float, log: CommandLog) -> None:
        self.device_id = device_id
        self.nameplate_w = nameplate_w
        self.log = log
        self.target_w = nameplate_w
        self.asleep = False
        self.identity: DeviceIdentity | None = DeviceIdentity(
            make="fake",
            model="recorder",
            firmware="1",
            mac=None,
            serial=None,
            capabilities=DeviceControls(
                power_target=True,
                power_target_min_w=nameplate_w * 0.5,
                power_target_max_w=nameplate_w,
                power_target_default_w=nameplate_w,
                power_target_step_w=1.0,
                can_sleep=True,
            ),
            nameplate_power_w=nameplate_w,
            nameplate_hashrate_ths=100.0,
        )

    async def read(self) -> DeviceReading:
        """Report the current level."""
        return DeviceReading(
            device_id=self.device_id,
            timestamp_s=time.monotonic(),
            power_w=SLEEP_W if self.asleep else self.target_w,
            state=DeviceState.SLEEPING if self.asleep else DeviceState.MINING,
            hashrate_ths=0.0 if self.asleep else 100.0 * self.target_w / self.nameplate_w,
            power_target_w=self.target_w,
        )

    async def set_power_target(self, power_w: float) -> float:
        """Take a new target (W) at once."""
        self.log.entries.append((time.perf_counter(), self.device_id, "set_power_target", power_w))
        self.target_w = power_w
        return power_w

    async def sleep(self) -> None:
        """Sleep at once."""
        self.log.entries.append((time.perf_counter(), self.device_id, "sleep", None))
        self.asleep = True

    async def wake(self) -> None:
        """Wake at once."""
        self.log.entries.append((time.perf_counter(), self.device_id, "wake", None))
        self.asleep = False


def site_config(
    state_dir: str,
    *,
    cap_w: float,
    domains: list[dict[str, Any]] | None = None,
    api: dict[str, Any] | None = None,
) -> Config:
    """A config for a fake site; timers slow so tests drive the ticks."""
    return parse_config(
        {
            "site": {"name": "fake", "cap_w": cap_w},
            "domains": domains or [],
            "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1e9},
            "telemetry": {"interval_s": 60, "stale_after_s": 3600},
            "control": {"interval_s": 60},
            "state": {"dir": state_dir},
            "api": api or {},
        }
    )


def fake_trackers(
    n: int,
    log: CommandLog,
    *,
    nameplate_w: float = 3000.0,
    domain: Callable[[int], str] = lambda i: "site",
) -> list[DeviceLink]:
    """n recording miners, m0000..; connected on their first read."""

    def connector(driver: RecordingDriver) -> Callable[[], Any]:
        async def connect() -> DeviceDriver:
            return driver

        return connect

    out = []
    for i in range(n):
        device_id = f"m{i:04d}"
        d = RecordingDriver(device_id, nameplate_w, log)
        out.append(
            DeviceLink(
                device_id,
                address=f"fake-{i}",
                domain=domain(i),
                nameplate_power_w=nameplate_w,
                nameplate_hashrate_ths=100.0,
                sleep_power_w=SLEEP_W,
                connect=connector(d),
            )
        )
    return out


async def fake_agent(cfg: Config, n: int, log: CommandLog | None = None, **kw: Any) -> Agent:
    """An Agent over n recording miners, read once."""
    agent = Agent(cfg, fake_trackers(n, log or CommandLog(), **kw))
    await agent.sweep()
    return agent
