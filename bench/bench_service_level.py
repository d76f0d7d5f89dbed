"""Service level under bursty AI demand with the cap holding, in simulated time.

Run: .venv/bin/python bench/bench_service_level.py [--hours 24 --tick-s 5]

A hall of GPU nodes under one domain limit that cannot power them all, beside a
site of miners under the site cap. Half the nodes are under contract (a service
level of at most ``--max-queue`` requests waiting); their ids sort after the
others', so a plan that ignored contracts would serve them last. Each node runs
the simulator's inference server (sim/inference.py: a daily cycle plus seeded
bursts, a queue that grows while the node's power limits are below what demand
needs). Every tick, in simulated time: each node's vLLM metrics page is rendered
and parsed by prometheus-client's parser (``drivers.inference.parse_metrics``),
turned into demand and floors by the agent's own reader and contracts
(``agent.control.ai_demand``: the latency margin, and full capacity while a
contracted node's queue is over its service level),
planned by the policy, and the GPUs' limits set on the simulated nodes. No
sockets: the HTTP path is tested in tests/test_ai_demand.py; here the sim runs
faster than real time. Changes are applied at once (the loop's safe ordering
only delays increases by one tick).

Prints, per policy, the share of minutes in which each contracted node met its
service level (and the uncontracted nodes' for comparison), the same run without
contracts as the baseline, and whether the cap and the domain limit held at
every tick (the plan, and the simulated GPUs' true draw plus the miners'
planned power).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import asyncssh
from benchlib import mining_status

from siteagent.agent.config import Config, parse_config
from siteagent.agent.control.ai_demand import Contracts, NodeDemandReader, node_contract
from siteagent.domain import (
    DeviceControls,
    DeviceKind,
    DeviceReading,
    DeviceState,
    DeviceStatus,
    DomainLimit,
    Limits,
    Plan,
    Snapshot,
)
from siteagent.domain.table import DeviceTable
from siteagent.drivers.inference import MetricsEndpoint, MetricsSample, parse_metrics
from siteagent.policies import PolicyParams, PolicyState, get_policy
from siteagent.policies.capping import CappingParams
from siteagent.policies.economic import EconomicParams
from siteagent.policies.prices import Prices
from siteagent.sim.gpu import SimGpuNode
from siteagent.sim.inference import InferenceLoad

HALL = "ai-hall"
PRICES = Prices(0.06, 0.04, 2.0)
CAPACITY_REQUESTS = 256
START_S = 0.0  # simulated midnight


@dataclass
class Run:
    """One simulated run's outcome."""

    met: dict[str, tuple[int, int]]  # node -> (minutes over the queue limit, minutes)
    plan_over: int  # ticks whose plan exceeded the cap or the hall's limit
    true_over: int  # ticks whose true power exceeded them
    ticks: int
    wall_s: float


def nodes_config(n_nodes: int, gpus: int, max_queue: int, contracts: bool) -> Config:
    """The GPU nodes as the agent's config has them (half under contract)."""
    rows = []
    for i in range(n_nodes):
        contracted = contracts and i >= n_nodes // 2
        rows.append(
            {
                "id": node_id(i, n_nodes),
                "gpus": gpus,
                "domain": HALL,
                "demand_endpoint": f"http://127.0.0.1:{8000 + i}/metrics",
                "demand_capacity_requests": CAPACITY_REQUESTS,
                **({"contract_max_queue": max_queue} if contracted else {}),
            }
        )
    return parse_config(
        {
            "site": {"cap_w": 1e6},
            "domains": [{"id": HALL, "limit_w": 1e6}],
            "gpu_nodes": rows,
        }
    )


def node_id(i: int, n_nodes: int) -> str:
    """The first half "a-..." (no contract), the second "z-..." (contracted: sorted last)."""
    return f"a-node{i}" if i < n_nodes // 2 else f"z-node{i}"


def gpu_status(
    device_id: str, node: SimGpuNode, index: int, demand: float, t_s: float
) -> DeviceStatus:
    """One simulated GPU as the agent's snapshot shows it."""
    g = node.gpus[index]
    caps = DeviceControls(
        power_target=True,
        power_target_min_w=g.model.power_limit_min_w,
        power_target_max_w=g.model.power_limit_max_w,
    )
    power = g.power_w(t_s)
    reading = DeviceReading(
        device_id,
        t_s,
        power,
        DeviceState.RUNNING,
        power_target_w=g.power_limit_w,
        utilization_frac=g.utilization_frac(t_s),
        demand_frac=demand,
    )
    return DeviceStatus(
        device_id,
        DeviceKind.GPU,
        HALL,
        DeviceState.RUNNING,
        g.model.power_limit_max_w,
        0.0,
        0.0,
        caps,
        g.power_limit_w,
        g.power_limit_w,
        True,
        reading=reading,
        reading_age_s=0.0,
        power_target_w=g.power_limit_w,
        awake=True,
    )


def simulate(
    policy_name: str,
    *,
    contracts: bool,
    hours: float,
    tick_s: float,
    n_nodes: int,
    gpus: int,
    miners: int,
    max_queue: int,
    seed: int,
) -> Run:
    """One run in simulated time; see the module doc."""
    clock = [START_S]
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    cfg = nodes_config(n_nodes, gpus, max_queue, contracts)
    book = Contracts(cfg)
    readers = []
    for n in cfg.gpu_nodes:
        assert n.demand_endpoint is not None
        contract = node_contract(cfg, n)
        readers.append(
            NodeDemandReader(
                n,
                MetricsEndpoint(n.demand_endpoint),  # never read: the pages come from the sim
                None if contract is None else contract.max_queue,
            )
        )
    nodes = [
        SimGpuNode(
            f"127.8.9.{i + 1}",
            gpus=gpus,
            seed=seed + i,
            client_public_key=key,
            clock=lambda: clock[0],
            inference=InferenceLoad(seed * 1009 + i),
        )
        for i in range(n_nodes)
    ]
    overhead_w = sum(n.overhead_w for n in nodes)
    rng = random.Random(seed)
    rigs = [mining_status(f"m{k:05d}", "site", rng) for k in range(miners)]
    # The hall fits about 70 % of its GPUs at full power; the site cap fits the hall at
    # its limit and a third of the miners.
    hall_limit_w = overhead_w + 0.7 * n_nodes * gpus * 700.0
    mining_w = sum(m.nameplate_power_w for m in rigs)
    cap_w = hall_limit_w + mining_w / 3
    limits = Limits(cap_w, cap_w, "site", 0.0, (DomainLimit(HALL, hall_limit_w),))
    policy = get_policy(policy_name, PolicyParams(CappingParams(min_off_s=0), EconomicParams()))
    state = PolicyState()
    overheads = [
        DeviceStatus(
            f"{node_id(i, n_nodes)}/overhead",
            DeviceKind.AUX,
            HALL,
            DeviceState.RUNNING,
            n.overhead_w,
            0.0,
            n.overhead_w,
            DeviceControls(power_target=False),
            n.overhead_w,
            n.overhead_w,
            False,
        )
        for i, n in enumerate(nodes)
    ]
    miner_w = {m.device_id: m.nameplate_power_w for m in rigs}
    plan_over = true_over = ticks = 0
    end = START_S + hours * 3600.0
    started = time.perf_counter()
    last: Plan | None = None
    while clock[0] < end:
        t = clock[0]
        devices: list[DeviceStatus] = []
        for i, node in enumerate(nodes):
            assert node.service is not None
            # The agent's reader, fed the page its endpoint would serve now.
            reader = readers[i]
            sample = MetricsSample(t, parse_metrics(node.service.exposition(t), reader.names))
            need = reader.meaning(sample).need_frac
            devices += [
                gpu_status(f"{node_id(i, n_nodes)}/gpu{j}", node, j, need, t) for j in range(gpus)
            ]
        devices += overheads
        for m in rigs:
            w = miner_w[m.device_id]
            awake = w > m.sleep_power_w
            devices.append(
                DeviceStatus(
                    m.device_id,
                    m.kind,
                    m.domain,
                    DeviceState.MINING if awake else DeviceState.SLEEPING,
                    m.nameplate_power_w,
                    m.nameplate_hashrate_ths,
                    m.sleep_power_w,
                    m.capabilities,
                    w,
                    w,
                    True,
                    power_target_w=w if awake else m.power_target_w,
                    awake=awake,
                    last_transition_s=None,
                )
            )
        # Columns, as the agent's snapshots carry them.
        snap = Snapshot(t, tuple(devices), table=DeviceTable.of(devices))
        floored = Limits(
            limits.site_cap_w,
            limits.effective_cap_w,
            limits.cap_source,
            limits.overhead_w,
            limits.domains,
            floors=book.floors(snap),
        )
        last, state = policy.plan(snap, floored, PRICES, PolicyState(last, state.derived))
        hall_w = overhead_w
        for sp in last.setpoints:
            if sp.device_id in miner_w:
                miner_w[sp.device_id] = sp.planned_w if sp.awake else 25.0
                continue
            node_name, gpu_name = sp.device_id.split("/")
            i = int(node_name.split("node")[1])
            if sp.power_target_w is not None:
                nodes[i].set_power_limit(int(gpu_name[3:]), sp.power_target_w, t)
            hall_w += sp.planned_w
        if last.planned_w > cap_w + 1e-6 or hall_w > hall_limit_w + 1e-6:
            plan_over += 1
        clock[0] = t + tick_s
        true_hall = sum(n.power_w(clock[0]) for n in nodes)
        if true_hall > hall_limit_w + 1e-6 or true_hall + sum(miner_w.values()) > cap_w + 1e-6:
            true_over += 1
        ticks += 1
    wall = time.perf_counter() - started
    met = {}
    for i, node in enumerate(nodes):
        assert node.service is not None
        node.service.advance(end)
        # The first half hour is the start-up (every limit at its default).
        met[node_id(i, n_nodes)] = node.service.minutes_over(max_queue, START_S + 1800.0)
    return Run(met, plan_over, true_over, ticks, wall)


def report(name: str, contracts: bool, run: Run, n_nodes: int) -> float:
    """Print one run; returns the worst contracted node's share of minutes met."""
    worst = 1.0
    lines = []
    for node, (over, minutes) in sorted(run.met.items()):
        share = 1.0 - over / max(minutes, 1)
        contracted = node.startswith("z-")
        if contracted:
            worst = min(worst, share)
        tag = "contract" if contracted and contracts else "no contract"
        lines.append(f"    {node:10s} {tag:11s} {100 * share:7.3f} % of {minutes} min")
    print(
        f"{name:18s} contracts={'on ' if contracts else 'off'} "
        f"worst z-node {100 * worst:7.3f} % of minutes met; "
        f"plan over a limit in {run.plan_over}/{run.ticks} ticks, true power over in "
        f"{run.true_over}; {run.ticks} ticks in {run.wall_s:.1f} s wall "
        f"({run.ticks / max(run.wall_s, 1e-9):.0f} ticks/s)"
    )
    for line in lines:
        print(line)
    return worst


def main() -> None:
    """Run both policies with and without contracts and print the service levels."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--tick-s", type=float, default=5.0)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--miners", type=int, default=60)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", choices=["efficiency-capping", "economic", "both"], default="both")
    args = ap.parse_args()
    names = ["efficiency-capping", "economic"] if args.policy == "both" else [args.policy]
    print(
        f"{args.hours:g} h simulated, a tick every {args.tick_s:g} s; {args.nodes} nodes x "
        f"{args.gpus} GPUs (z-nodes contracted: at most {args.max_queue} waiting), "
        f"{args.miners} miners; goal: contracted nodes meet it in >= 99.9 % of minutes"
    )
    for name in names:
        kw = {
            "hours": args.hours,
            "tick_s": args.tick_s,
            "n_nodes": args.nodes,
            "gpus": args.gpus,
            "miners": args.miners,
            "max_queue": args.max_queue,
            "seed": args.seed,
        }
        with_c = report(name, True, simulate(name, contracts=True, **kw), args.nodes)
        without = report(name, False, simulate(name, contracts=False, **kw), args.nodes)
        goal = "MET" if with_c >= 0.999 else "MISSED"
        print(
            f"{name}: contracted nodes' worst share of minutes met {100 * with_c:.3f} % with "
            f"contracts vs {100 * without:.3f} % without (baseline); goal {goal}"
        )


if __name__ == "__main__":
    main()
