"""What a reloaded config changes: what applies live, what waits for a restart.

A reload (SIGHUP) validates the new file with the same loader as a start, then
puts it in force between ticks (``Agent.reconfigure``). Live: the schedule,
prices, the policy and its parameters, domains and their limits, the site cap,
margin and overhead, the telemetry and control settings, and devices added to
the inventory (adopted as a scan adopts them). What a running agent has bound
(listening sockets, the state directory, the API's tokens and limits, a tracked
device's own settings) is named here and takes effect after a restart.

A device removed from the file stays tracked, read and counted until a
restart. Its power does not stop when its line is deleted, and the agent cannot
tell a device switched off from one it cannot reach (both answer nothing):
untracked, its draw would be counted as zero while it may still be drawing.
Tracked, it counts at its reading, or at its nameplate once unreachable (the
worst-case rule), which is never less than what it draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from siteagent.agent.config import (
    Config,
    ConfigProblem,
    GpuNodeConfig,
    MinerConfig,
    default_id,
)
from siteagent.agent.control.devices import DeviceLink

RESTART = "takes effect after a restart"
# Sections a running agent has bound at start: its listening sockets (API, metrics),
# the API's tokens, TLS files and limits, and the store's directory and backups; the
# meters' read tasks and the under-frequency block (agent/control/metering.py) and the
# OpenADR VEN's registration (agent/grid/openadr.py), made once at start.
RESTART_SECTIONS = (
    "api",
    "metrics",
    "state",
    "meters",
    "metering",
    "frequency_response",
    "openadr",
)
# Keys applied now but in part only: what a tracked device's link or driver holds
# (made at its adoption) keeps the old value until a restart.
FOR_NEW_DEVICES = "applies to devices adopted from now on; tracked ones keep theirs until a restart"
PARTLY_LIVE = {
    "inventory.default_nameplate_power_w": FOR_NEW_DEVICES,
    "inventory.default_nameplate_hashrate_ths": FOR_NEW_DEVICES,
    "inventory.sleep_power_w": FOR_NEW_DEVICES,
    "inventory.credentials_file": FOR_NEW_DEVICES,
    "telemetry.timeout_s": "bounds each read now; drivers already made keep their own "
    "timeouts until a restart",
}
# What a GPU node's running link holds: all but its contract floor, which the policy reads.
GPU_NODE_LIVE_KEYS = frozenset({"contract_floor_w"})


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a valid new config changes: key paths applied now, and lines naming what waits."""

    changed: tuple[str, ...]  # key paths (or sections) whose new value is put in force now
    restart_only: tuple[str, ...]  # "api.port changed; takes effect after a restart", ...
    added_miners: tuple[MinerConfig, ...]
    added_gpu_nodes: tuple[GpuNodeConfig, ...]

    @property
    def empty(self) -> bool:
        """Whether the new config changes nothing at all."""
        return not (self.changed or self.restart_only)


def _leaves(value: object, path: str = "") -> dict[str, object]:
    """A config dump flattened to key paths; a list is one leaf (compared whole)."""
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    return {path: value}


def changed_paths(old: Config, new: Config) -> list[str]:
    """Every key path (lists whole) whose value differs between ``old`` and ``new``."""
    a, b = _leaves(old.model_dump(mode="json")), _leaves(new.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _miner_id(m: MinerConfig) -> str:
    return m.id or default_id(m.address)


def _miner_changes(
    old: Sequence[MinerConfig], new: Sequence[MinerConfig], tracked: Mapping[str, str]
) -> tuple[list[MinerConfig], list[str]]:
    """Listed miners to adopt, and lines for the ones removed or changed (by address)."""
    before = {m.address: m for m in old}
    added: list[MinerConfig] = []
    notes: list[str] = []
    for i, m in enumerate(new):
        was = before.pop(m.address, None)
        where = f"inventory.miners[{i}] ({m.address})"
        if was is None and m.address in tracked:
            # Found by a scan under its own id: one device, never counted twice.
            notes.append(f"{where} already tracked as {tracked[m.address]}; {RESTART}")
        elif was is None:
            added.append(m)
        elif was != m:
            notes.append(f"{where} changed; {RESTART}")
    for address, m in before.items():
        notes.append(
            f"inventory.miners: {address} ({_miner_id(m)}) removed; still tracked and counted "
            f"(at its worst case once unreachable) until a restart"
        )
    return added, notes


def _gpu_node_changes(
    old: Sequence[GpuNodeConfig], new: Sequence[GpuNodeConfig]
) -> tuple[list[GpuNodeConfig], list[str]]:
    """GPU nodes to adopt, and lines for the ones removed or changed (by id)."""
    before = {n.id: n for n in old}
    added: list[GpuNodeConfig] = []
    notes: list[str] = []
    for i, n in enumerate(new):
        was = before.pop(n.id, None)
        if was is None:
            added.append(n)
            continue
        a, b = was.model_dump(), n.model_dump()
        keys = sorted(k for k in a if a[k] != b[k] and k not in GPU_NODE_LIVE_KEYS)
        if keys:
            notes.append(f"gpu_nodes[{i}] ({n.id}): {', '.join(keys)} changed; {RESTART}")
    for node_id in before:
        notes.append(
            f"gpu_nodes: {node_id} removed; its devices stay tracked and counted until a restart"
        )
    return added, notes


def plan_reload(old: Config, new: Config, tracked: Mapping[str, str]) -> ReloadPlan:
    """Sort what ``new`` changes against ``old`` into live changes and restart-only lines;
    ``tracked``: address -> device id of every device the agent tracks now."""
    live: list[str] = []
    restart: list[str] = []
    for path in changed_paths(old, new):
        section = path.partition(".")[0]
        if section in RESTART_SECTIONS:
            restart.append(f"{path} changed; {RESTART}")
        elif path in PARTLY_LIVE:
            restart.append(f"{path} changed; {PARTLY_LIVE[path]}")
            live.append(path)
        elif path not in ("inventory.miners", "gpu_nodes"):
            live.append(path)
    miners, miner_notes = _miner_changes(old.inventory.miners, new.inventory.miners, tracked)
    nodes, node_notes = _gpu_node_changes(old.gpu_nodes, new.gpu_nodes)
    if miners:
        live.append("inventory.miners")
    floors = [{n.id: n.contract_floor_w for n in c.gpu_nodes} for c in (old, new)]
    if nodes or floors[0] != floors[1]:
        live.append("gpu_nodes")
    return ReloadPlan(
        tuple(live), tuple(restart + miner_notes + node_notes), tuple(miners), tuple(nodes)
    )


def reload_problems(new: Config, in_use: Mapping[str, Iterable[str]]) -> list[ConfigProblem]:
    """What makes a valid config unusable by a running agent: a domain it drops that
    tracked devices sit in, or that a cap in force names (``in_use``: domain -> holders)."""
    kept = {d.id for d in new.domains}
    problems: list[ConfigProblem] = []
    for domain, holders in sorted(in_use.items()):
        if domain in kept:
            continue
        names = sorted(holders)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        problems.append(
            ConfigProblem(
                "domains",
                f"domain {domain!r} removed while {shown} use(s) it",
                f"domain {domain!r} kept until a restart (tracked devices keep their domain)",
            )
        )
    return problems


def tracked_addresses(links: Iterable[DeviceLink]) -> dict[str, str]:
    """Address -> device id of every tracked device (GPU devices share their node's)."""
    return {t.address: t.device_id for t in links}


def config_summary(plan: ReloadPlan) -> str:
    """The live changes of a reload in words: 'site.cap_w, schedule.windows; 1 miner added'."""
    parts = [", ".join(plan.changed) or "nothing live"]
    if plan.added_miners:
        parts.append(f"{len(plan.added_miners)} miner(s) added")
    if plan.added_gpu_nodes:
        parts.append(f"{len(plan.added_gpu_nodes)} GPU node(s) added")
    return "; ".join(parts)
