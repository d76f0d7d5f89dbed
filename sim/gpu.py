"""Simulated GPU nodes: real SSH servers on loopback answering ``nvidia-smi`` from a model.

Each node is an asyncssh server on its own loopback address. It accepts the
site's client key for one user and answers, from a power model:

- ``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits`` (fields it does
  not know: ``Field "x" is not a valid field to query.``, exit 2, as nvidia-smi);
- ``sudo -n nvidia-smi -i N -pl W`` (and ``sudo -n -l ...``, sudo's "may I?");
- ``systemctl stop|start UNIT`` (with or without ``sudo -n``): drain / undrain;
- ``true``; anything else is "command not found".

Power model (per GPU): demand u(t) in [0, 1] varies smoothly over time (seeded);
demand-driven power is idle + (TDP - idle) * u; the draw follows min(enforced
limit, demand power) with a 0.2 s time constant (settled within about a
second). Inference capacity as a fraction of peak falls with the power limit as
DOMAIN_FACTS.md describes (flat to about 80% of TDP, then roughly proportional,
a cliff below 50%); served throughput is min(demand, capacity).

With ``inference``, a node also runs a simulated inference server
(``sim/inference.py``): its GPUs serve that server's queue, and its vLLM metrics
are served over HTTP on the node's address (``metrics_url``).

Faults (per node): hang (commands never answer), disconnect (connections
dropped, listener closed), sudo_refused, gpu_lost (one GPU fell off the bus),
host_key_changed (the node comes back with a new host key).

This module imports nothing of the agent, drivers, policies or domain.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import math
import random
import shlex
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from siteagent.sim.group import DeviceGroup
from siteagent.sim.inference import InferenceLoad, InferenceService

DEFAULT_USERNAME = "siteagent"
DRAW_TAU_S = 0.2  # draw settles within about a second (99% in 0.92 s)
_MAX_STEP_S = 0.2
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SimGpuModel:
    """One GPU model as the simulator knows it (its own table, not the driver's)."""

    name: str
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    idle_w: float
    memory_total_mib: int
    peak_tokens_per_s: float


# DOMAIN_FACTS.md: H100 SXM power limit range about 200-700 W.
H100_SXM = SimGpuModel(
    name="NVIDIA H100 80GB HBM3",
    power_limit_min_w=200.0,
    power_limit_max_w=700.0,
    power_limit_default_w=700.0,
    idle_w=70.0,
    memory_total_mib=81559,
    peak_tokens_per_s=2500.0,
)

# Knee and cliff of the throughput-vs-power-limit curve, as fractions of TDP.
KNEE_FRAC = 0.8
CLIFF_FRAC = 0.5
CAPACITY_AT_CLIFF = 0.7


def capacity_frac(limit_w: float, tdp_w: float) -> float:
    """Inference capacity (fraction of peak) under a power limit (W) on a GPU of TDP (W).

    Flat to KNEE_FRAC of TDP; from there roughly proportional to the cut down to
    CLIFF_FRAC (0.7 of peak at half TDP); below that a cliff (about 2.5x steeper).
    """
    r = limit_w / tdp_w
    if r >= KNEE_FRAC:
        return 1.0
    if r >= CLIFF_FRAC:
        slope = (1.0 - CAPACITY_AT_CLIFF) / (KNEE_FRAC - CLIFF_FRAC)
        return 1.0 - (KNEE_FRAC - r) * slope
    return max(0.0, CAPACITY_AT_CLIFF - (CLIFF_FRAC - r) * 2.5)


class Demand:
    """Inference demand u(t) in [0.05, 1]: a seeded sum of slow sinusoids."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.base = rng.uniform(0.45, 0.8)
        self.waves = [
            (rng.uniform(0.05, 0.2), rng.uniform(20.0, 600.0), rng.uniform(0.0, 2 * math.pi))
            for _ in range(3)
        ]

    def at(self, t_s: float) -> float:
        """Demand (fraction of peak) at time ``t_s``."""
        u = self.base + sum(a * math.sin(2 * math.pi * t_s / p + ph) for a, p, ph in self.waves)
        return min(1.0, max(0.05, u))


class DemandModel(Protocol):
    """What a GPU is asked to serve at a time (fraction of peak)."""

    def at(self, t_s: float) -> float:
        """Demand (fraction of peak) at ``t_s``."""
        ...


class _Served:
    """A GPU's work on a node with an inference server: the sequences it runs."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def at(self, t_s: float) -> float:
        """What the GPU serves at ``t_s`` (fraction of peak)."""
        return self.service.busy_frac(t_s)


class SimGpu:
    """Ground truth of one GPU: draw, energy, utilization, temperature, throughput."""

    def __init__(
        self, index: int, model: SimGpuModel, demand: DemandModel, seed: int, now_s: float
    ) -> None:
        self.index = index
        self.model = model
        self.demand = demand
        rng = random.Random(seed)
        self.uuid = f"GPU-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        self.bus_id = f"00000000:{0x18 + 0x10 * index:02X}:00.0"
        self.power_limit_w = model.power_limit_default_w
        self.drained = False
        self.lost = False
        self._t = now_s
        self._p = self.target_w(now_s)
        self._energy_j = rng.uniform(1e8, 1e9)  # since "driver load", some days ago

    def demand_frac(self, t_s: float) -> float:
        """Offered load (fraction of peak); zero while the node is drained."""
        return 0.0 if self.drained else self.demand.at(t_s)

    def target_w(self, t_s: float) -> float:
        """Where the draw is heading (W): min(limit, demand-driven power)."""
        m = self.model
        return min(
            self.power_limit_w, m.idle_w + (m.power_limit_max_w - m.idle_w) * self.demand_frac(t_s)
        )

    def _advance(self, now_s: float) -> None:
        dt_total = now_s - self._t
        if dt_total <= 0:
            return
        if dt_total > 30.0:
            # Long unobserved: settle, and count the energy at the mean of ends.
            end = self.target_w(now_s)
            self._energy_j += 0.5 * (self._p + end) * dt_total
            self._p, self._t = end, now_s
            return
        steps = max(1, math.ceil(dt_total / _MAX_STEP_S))
        dt = dt_total / steps
        decay = math.exp(-dt / DRAW_TAU_S)
        t, p = self._t, self._p
        for _ in range(steps):
            t += dt
            target = self.target_w(t)
            # Exact energy of an exponential approach to a constant target over dt.
            self._energy_j += target * dt + (p - target) * DRAW_TAU_S * (1 - decay)
            p = target + (p - target) * decay
        self._t, self._p = now_s, p

    def power_w(self, now_s: float) -> float:
        """True draw (W) at ``now_s``."""
        self._advance(now_s)
        return self._p

    def energy_j(self, now_s: float) -> float:
        """Energy (J) since driver load."""
        self._advance(now_s)
        return self._energy_j

    def capacity_frac(self) -> float:
        """Inference capacity under the current limit (fraction of peak)."""
        return capacity_frac(self.power_limit_w, self.model.power_limit_max_w)

    def utilization_frac(self, now_s: float) -> float:
        """Busy fraction: demand over capacity, at most 1."""
        cap = self.capacity_frac()
        d = self.demand_frac(now_s)
        return 1.0 if cap <= 0 else min(1.0, d / cap)

    def throughput_tps(self, now_s: float) -> float:
        """Served tokens per second: min(demand, capacity) x peak."""
        return self.model.peak_tokens_per_s * min(self.demand_frac(now_s), self.capacity_frac())

    def temperature_c(self, now_s: float) -> float:
        """GPU temperature (degC): 30 plus a rise proportional to draw."""
        return 30.0 + 45.0 * self.power_w(now_s) / self.model.power_limit_max_w

    def memory_used_mib(self) -> int:
        """Memory used (MiB): the model's weights and KV cache while serving."""
        return 1 if self.drained else int(self.model.memory_total_mib * 0.9)

    def set_power_limit(self, power_w: float, now_s: float) -> None:
        """New limit (W); the draw follows from ``now_s``."""
        self._advance(now_s)
        self.power_limit_w = power_w


class GpuFault(enum.StrEnum):
    """What can be wrong with a simulated GPU node, settable at runtime."""

    NONE = "none"
    HANG = "hang"  # every command hangs (wedged driver): no output, no exit
    DISCONNECT = "disconnect"  # connections dropped, listener closed (node down)
    SUDO_REFUSED = "sudo_refused"  # sudo -n says a password is required
    GPU_LOST = "gpu_lost"  # GPU ``gpu`` fell off the bus
    HOST_KEY_CHANGED = "host_key_changed"  # reinstalled: comes back with a new host key


# nvidia-smi query fields: name -> how to render it from (gpu, now_s).
_FIELDS: dict[str, Callable[[SimGpu, float], str]] = {
    "index": lambda g, t: str(g.index),
    "uuid": lambda g, t: g.uuid,
    "name": lambda g, t: g.model.name,
    "pci.bus_id": lambda g, t: g.bus_id,
    "power.draw": lambda g, t: f"{g.power_w(t):.2f}",
    "power.limit": lambda g, t: f"{g.power_limit_w:.2f}",
    "enforced.power.limit": lambda g, t: f"{g.power_limit_w:.2f}",
    "power.min_limit": lambda g, t: f"{g.model.power_limit_min_w:.2f}",
    "power.max_limit": lambda g, t: f"{g.model.power_limit_max_w:.2f}",
    "power.default_limit": lambda g, t: f"{g.model.power_limit_default_w:.2f}",
    "utilization.gpu": lambda g, t: str(round(100 * g.utilization_frac(t))),
    "temperature.gpu": lambda g, t: str(round(g.temperature_c(t))),
    "memory.used": lambda g, t: str(g.memory_used_mib()),
    "memory.total": lambda g, t: str(g.model.memory_total_mib),
    # Millijoules since driver load, as NVML counts it.
    "total_energy_consumption": lambda g, t: str(round(g.energy_j(t) * 1000)),
}
# What an older driver's nvidia-smi does not know.
LEGACY_UNKNOWN_FIELDS = frozenset({"total_energy_consumption"})


@dataclass(slots=True)
class _Result:
    stdout: str = ""
    stderr: str = ""
    exit_status: int = 0


class SimGpuNode:
    """One simulated GPU node: GPUs, fault state, and its SSH listener."""

    def __init__(
        self,
        address: str,
        *,
        port: int = 0,
        gpus: int = 8,
        model: SimGpuModel = H100_SXM,
        seed: int = 0,
        username: str = DEFAULT_USERNAME,
        client_public_key: str,
        overhead_w: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        inference: InferenceLoad | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.address = address
        self.port = port
        self.metrics_port = metrics_port
        self.username = username
        self.clock = clock
        self.overhead_w = overhead_w if overhead_w is not None else 300.0 + 150.0 * gpus
        now = clock()
        # With an inference server, the GPUs serve its queue (sim/inference.py); without
        # one, each follows its own seeded demand.
        self.service: InferenceService | None = None
        if inference is not None:
            self.service = InferenceService(inference, self.capacity_frac, now)
            served = _Served(self.service)
        self.gpus = [
            SimGpu(
                i,
                model,
                served if inference is not None else Demand(seed * 1000 + i),
                seed * 1000 + i + 7,
                now,
            )
            for i in range(gpus)
        ]
        self.fault = GpuFault.NONE
        self.unknown_fields: set[str] = set()  # e.g. LEGACY_UNKNOWN_FIELDS
        self.placeholders: dict[str, str] = {}  # field -> "[N/A]" / "[Not Supported]"
        self.commands: deque[str] = deque(maxlen=10_000)  # latest commands, in order
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._authorized = asyncssh.import_authorized_keys(client_public_key)
        self._listener: asyncssh.SSHAcceptor | None = None
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self._hung: set[asyncio.Future[None]] = set()

    # -- ground truth --------------------------------------------------------------

    @property
    def host_key_line(self) -> str:
        """The host's public key as one known_hosts-style line (``type base64``)."""
        return self.host_key.export_public_key().decode().strip()

    @property
    def known_hosts_pattern(self) -> str:
        """How known_hosts names this host (``[addr]:port`` when the port is not 22)."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def power_w(self, now_s: float | None = None) -> float:
        """True node power (W): fixed overhead plus every GPU's draw."""
        t = self.clock() if now_s is None else now_s
        return self.overhead_w + sum(g.power_w(t) for g in self.gpus)

    def throughput_tps(self, now_s: float | None = None) -> float:
        """Served inference throughput (tokens/s) of the whole node."""
        t = self.clock() if now_s is None else now_s
        return sum(0.0 if g.lost else g.throughput_tps(t) for g in self.gpus)

    @property
    def drained(self) -> bool:
        """Whether the inference service is stopped."""
        return all(g.drained for g in self.gpus)

    def capacity_frac(self) -> float:
        """The node's serving capacity (fraction of peak): its GPUs' mean under their limits."""
        up = [0.0 if g.drained or g.lost else g.capacity_frac() for g in self.gpus]
        return sum(up) / len(up) if up else 0.0

    def set_power_limit(self, index: int, power_w: float, now_s: float | None = None) -> None:
        """Set one GPU's limit (W) at ``now_s``, the queue moved up to then first."""
        t = self.clock() if now_s is None else now_s
        if self.service is not None:
            self.service.advance(t)
        self.gpus[index].set_power_limit(power_w, t)

    @property
    def metrics_url(self) -> str:
        """Where the inference server's metrics are served."""
        return f"http://{self.address}:{self.metrics_port}/metrics"

    async def start_metrics(self) -> None:
        """Open the inference server's metrics endpoint (a node with one)."""
        if self.service is not None:
            await self.service.serve(self.address, self.metrics_port, self.clock)
            self.metrics_port = self.service.port

    async def stop_metrics(self) -> None:
        """Close the metrics endpoint (the server's queue goes on)."""
        if self.service is not None:
            await self.service.stop()

    # -- listener ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the SSH listener (on ``port``; 0 picks a free one, kept across restarts)."""
        node = self

        class _Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                self._conn = conn
                node._conns.add(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                node._conns.discard(self._conn)

            def begin_auth(self, username: str) -> bool:
                if username == node.username:
                    self._conn.set_authorized_keys(node._authorized)
                return True  # authentication required; a wrong user has no keys

        self._listener = await asyncssh.listen(
            self.address,
            self.port,
            server_host_keys=[self.host_key],
            server_factory=_Server,
            process_factory=self._handle,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            line_editor=False,
        )
        self.port = self._listener.get_port()
        await self.start_metrics()

    async def stop(self) -> None:
        """Close the listener, every connection and the metrics endpoint."""
        await self._close_listener()
        self._drop_connections()
        await self.stop_metrics()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None

    def _drop_connections(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        for fut in self._hung:
            fut.cancel()

    async def set_fault(self, fault: str | GpuFault, *, gpu: int = 0) -> None:
        """Inject (or with ``none`` clear) a fault; ``gpu`` names the GPU for gpu_lost."""
        fault = GpuFault(fault)
        if fault is GpuFault.NONE:
            for g in self.gpus:
                g.lost = False
            self.fault = GpuFault.NONE
            for fut in self._hung:
                fut.cancel()
            if self._listener is None:
                await self.start()
            return
        self.fault = fault
        if fault is GpuFault.GPU_LOST:
            self.gpus[gpu].lost = True
        elif fault is GpuFault.DISCONNECT:
            await self._close_listener()
            self._drop_connections()
        elif fault is GpuFault.HOST_KEY_CHANGED:
            await self._close_listener()
            self._drop_connections()
            self.host_key = asyncssh.generate_private_key("ssh-ed25519")
            await self.start()
            self.fault = GpuFault.NONE  # a re-keyed host otherwise works

    # -- commands ------------------------------------------------------------------

    async def _handle(self, process: asyncssh.SSHServerProcess[str]) -> None:
        command = process.command or ""
        self.commands.append(command)
        if self.fault is GpuFault.HANG:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._hung.add(fut)
            try:
                # A wedged nvidia-smi: nothing until the client gives up.
                await asyncio.wait(
                    [fut, asyncio.ensure_future(process.wait_closed())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                self._hung.discard(fut)
            if not fut.cancelled() or process.is_closing():
                return
        result = self.run(command)
        if result.stdout:
            process.stdout.write(result.stdout)
        if result.stderr:
            process.stderr.write(result.stderr)
        process.exit(result.exit_status)

    def run(self, command: str, *, as_root: bool = False) -> _Result:
        """Answer one shell command as the node's user (``as_root`` under sudo)."""
        try:
            argv = shlex.split(command)
        except ValueError as e:
            return _Result(stderr=f"bash: syntax error: {e}\n", exit_status=2)
        if not argv:
            return _Result()
        prog = argv[0].rsplit("/", 1)[-1]
        if prog == "true":
            return _Result()
        if prog == "sudo":
            return self._sudo(argv[1:])
        if prog == "nvidia-smi":
            return self._nvidia_smi(argv[1:], as_root=as_root)
        if prog == "systemctl" and len(argv) == 3 and argv[1] in ("stop", "start"):
            if not as_root:
                return _Result(
                    stderr=f"Failed to {argv[1]} {argv[2]}.service: Access denied\n",
                    exit_status=1,
                )
            if self.service is not None:
                self.service.advance(self.clock())
            for g in self.gpus:
                g.set_power_limit(g.power_limit_w, self.clock())
                g.drained = argv[1] == "stop"
            return _Result()
        return _Result(stderr=f"bash: {argv[0]}: command not found\n", exit_status=127)

    def _sudo(self, args: list[str]) -> _Result:
        list_only = False
        while args and args[0].startswith("-"):
            flag = args.pop(0)
            if flag == "-l":
                list_only = True
            elif flag != "-n":
                return _Result(stderr=f"sudo: unsupported option {flag}\n", exit_status=1)
        if self.fault is GpuFault.SUDO_REFUSED:
            return _Result(stderr="sudo: a password is required\n", exit_status=1)
        if not args:
            return _Result(stderr="usage: sudo -n command\n", exit_status=1)
        if list_only:
            return _Result(stdout=f"/usr/bin/{shlex.join(args)}\n")
        return self.run(shlex.join(args), as_root=True)

    def _nvidia_smi(self, args: list[str], *, as_root: bool) -> _Result:
        opts: dict[str, str] = {}
        it = iter(args)
        for a in it:
            if a.startswith("--") and "=" in a:
                k, v = a.split("=", 1)
                opts[k] = v
            elif a in ("-i", "-pl", "--id", "--power-limit"):
                opts[{"--id": "-i", "--power-limit": "-pl"}.get(a, a)] = next(it, "")
            else:
                return _Result(
                    stdout=f"ERROR: Option {a} is not recognized. Please run 'nvidia-smi -h'.\n\n",
                    exit_status=2,
                )
        if "--query-gpu" in opts:
            return self._query(opts["--query-gpu"], opts.get("--format", ""))
        if "-pl" in opts:
            return self._set_limit(opts.get("-i"), opts["-pl"], as_root=as_root)
        return _Result(stdout="(summary table not simulated)\n")

    def _lost_line(self, g: SimGpu) -> str:
        return (
            f"Unable to determine the device handle for GPU {g.bus_id}: GPU is lost.  "
            "Reboot the system to recover this GPU\n"
        )

    def _query(self, fields_csv: str, fmt: str) -> _Result:
        fields = [f.strip() for f in fields_csv.split(",") if f.strip()]
        for f in fields:
            if f not in _FIELDS or f in self.unknown_fields:
                return _Result(
                    stdout=f'Field "{f}" is not a valid field to query.\n\n', exit_status=2
                )
        fmt_opts = set(fmt.split(","))
        if "csv" not in fmt_opts:
            return _Result(stdout="(only csv output is simulated)\n", exit_status=2)
        now = self.clock()
        lines: list[str] = []
        if "noheader" not in fmt_opts:
            lines.append(", ".join(fields))
        err = ""
        for g in self.gpus:
            if g.lost:
                err += self._lost_line(g)
                continue
            lines.append(", ".join(self.placeholders.get(f) or _FIELDS[f](g, now) for f in fields))
        out = "".join(line + "\n" for line in lines)
        return _Result(stdout=out, stderr=err, exit_status=15 if err else 0)

    def _set_limit(self, index: str | None, watts: str, *, as_root: bool) -> _Result:
        try:
            targets = self.gpus if index is None else [self.gpus[int(index)]]
            power_w = float(watts)
        except (ValueError, IndexError):
            return _Result(
                stdout=f"Invalid combination of input arguments: -i {index} -pl {watts}\n",
                exit_status=2,
            )
        out = ""
        for g in targets:
            if g.lost:
                return _Result(stdout=self._lost_line(g), exit_status=15)
            if not as_root:
                return _Result(
                    stdout=(
                        f"Changing power management limit is not permitted for GPU {g.bus_id}.\n"
                        "Treating as warning and moving on.\nAll done.\n"
                    ),
                    exit_status=4,
                )
            m = g.model
            if not m.power_limit_min_w <= power_w <= m.power_limit_max_w:
                return _Result(
                    stdout=(
                        f"Provided power limit {power_w:.2f} W is not a valid power limit which "
                        f"should be between {m.power_limit_min_w:.2f} W and "
                        f"{m.power_limit_max_w:.2f} W for GPU {g.bus_id}\n"
                        "Terminating early due to previous errors.\n"
                    ),
                    exit_status=2,
                )
            old = g.power_limit_w
            self.set_power_limit(g.index, power_w)
            out += f"Power limit for GPU {g.bus_id} was set to {power_w:.2f} W from {old:.2f} W.\n"
        return _Result(stdout=out + "All done.\n")


class SimGpuSite(DeviceGroup):
    """Starts and stops simulated GPU nodes on consecutive loopback addresses.

    Keys live in ``key_dir`` (a fresh temporary directory unless given): the
    site's client key (``client_key``, OpenSSH format) and a ``known_hosts`` file
    naming every node's current host key.
    """

    def __init__(
        self,
        n_nodes: int = 2,
        gpus_per_node: int = 8,
        *,
        base_address: str = "127.2.0.1",
        port: int = 0,
        seed: int = 0,
        username: str = DEFAULT_USERNAME,
        key_dir: Path | None = None,
        model: SimGpuModel = H100_SXM,
        clock: Callable[[], float] = time.monotonic,
        inference: bool = False,
        metrics_port: int = 0,
    ) -> None:
        base = ipaddress.IPv4Address(base_address)
        last = base + max(0, n_nodes - 1)
        if not (base.is_loopback and last.is_loopback):
            raise ValueError(f"simulated GPU nodes live on loopback only, not {base_address}")
        self._own_dir = key_dir is None
        self.key_dir = (
            Path(tempfile.mkdtemp(prefix="sim-gpu-keys-")) if key_dir is None else key_dir
        )
        self.key_dir.mkdir(parents=True, exist_ok=True)
        client = asyncssh.generate_private_key("ssh-ed25519", comment="siteagent-sim-client")
        self.client_key_path = self.key_dir / "client_key"
        client.write_private_key(self.client_key_path)
        self.client_key_path.chmod(0o600)
        client.write_public_key(self.key_dir / "client_key.pub")
        pub = client.export_public_key().decode()
        self.username = username
        self.clock = clock
        self.nodes = [
            SimGpuNode(
                str(base + i),
                port=port,
                gpus=gpus_per_node,
                model=model,
                seed=seed * 100_003 + i,
                username=username,
                client_public_key=pub,
                clock=clock,
                # Each node's inference server: a daily cycle and its own bursts.
                inference=InferenceLoad(seed * 100_003 + i) if inference else None,
                metrics_port=metrics_port,
            )
            for i in range(n_nodes)
        ]
        self._by_address = {n.address: n for n in self.nodes}

    @property
    def known_hosts_path(self) -> Path:
        """A known_hosts file with every node's host key as it was last written."""
        return self.key_dir / "known_hosts"

    def write_known_hosts(self, path: Path | None = None) -> Path:
        """Write (or rewrite) the known_hosts file for the nodes' current host keys."""
        p = path or self.known_hosts_path
        p.write_text("".join(f"{n.known_hosts_pattern} {n.host_key_line}\n" for n in self.nodes))
        return p

    def devices(self) -> Sequence[SimGpuNode]:
        """The nodes, started and stopped together."""
        return self.nodes

    async def start(self) -> None:
        """Open every node's SSH listener and write known_hosts."""
        await super().start()
        self.write_known_hosts()

    async def stop(self) -> None:
        """Close every node's listener and connections; remove a temporary key dir."""
        await super().stop()
        if self._own_dir:
            shutil.rmtree(self.key_dir, ignore_errors=True)

    def node(self, address: str) -> SimGpuNode:
        """The simulated node at ``address``."""
        return self._by_address[address]

    async def set_fault(self, address: str, fault: str | GpuFault, **kw: Any) -> None:
        """Inject a fault on one node (``gpu=N`` for gpu_lost)."""
        await self.node(address).set_fault(fault, gpu=int(kw.get("gpu", 0)))

    def total_power_w(self, now_s: float | None = None) -> float:
        """True power (W) of every node, overheads included."""
        t = self.clock() if now_s is None else now_s
        return sum(n.power_w(t) for n in self.nodes)

    def total_throughput_tps(self, now_s: float | None = None) -> float:
        """Served inference throughput (tokens/s) of every node."""
        t = self.clock() if now_s is None else now_s
        return sum(n.throughput_tps(t) for n in self.nodes)

    def inventory(self) -> list[dict[str, Any]]:
        """How an operator would list the nodes: address, port, user, client key, host key."""
        return [
            {
                "address": n.address,
                "port": n.port,
                "username": n.username,
                "client_key": str(self.client_key_path),
                "host_key": n.host_key_line,
                "known_hosts": str(self.known_hosts_path),
                "gpus": len(n.gpus),
                "gpu_model": n.gpus[0].model.name if n.gpus else None,
                "overhead_w": n.overhead_w,
            }
            for n in self.nodes
        ]
