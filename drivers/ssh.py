"""Remote GPU nodes: ``nvidia-smi`` over one persistent SSH connection (asyncssh).

Two levels (STYLE.md): ``_SshLink`` owns the connection (keepalive, reconnect
with exponential backoff, per-command timeout, host-key verification) and runs
commands; ``SshNodeDriver`` builds the nvidia-smi commands, parses their CSV in
vendor units (W, MiB, percent, mJ), converts to SI units, clamps limits to the
GPU's constraints and turns failures into ``domain.errors``.

Host keys are always verified against a known_hosts file; there is no way to
turn that off. An unknown or changed key refuses the node with
``HostKeyRefused`` (a ``DeviceUnreachable``) naming the host and the file.

Power limits are set with ``sudo -n nvidia-smi -i N -pl W``. Whether sudo
allows that is asked at connect with ``sudo -n -l`` (which changes nothing); a
refusal then or later makes the node read-only. See docs/gpu.md for the
sudoers line.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import math
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from siteagent.domain.errors import (
    DeviceError,
    DeviceFaulted,
    DeviceLost,
    DevicePermissionError,
    DeviceRefused,
    DeviceUnreachable,
)
from siteagent.drivers.gpu import GpuInfo, GpuReading

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


class HostKeyRefused(DeviceUnreachable):
    """The node's host key is not in known_hosts (unknown host, or its key changed)."""


class AuthenticationRefused(DeviceUnreachable):
    """The node refused our user / client key."""


@dataclass(frozen=True, slots=True)
class _Field:
    """One nvidia-smi query field: its name, and whether a node may lack it."""

    name: str
    required: bool = False


# What one read asks for. Optional fields an older nvidia-smi rejects ("is not a
# valid field to query") are dropped for that node and the query retried.
QUERY_FIELDS: tuple[_Field, ...] = (
    _Field("index", required=True),
    _Field("uuid", required=True),
    _Field("name", required=True),
    _Field("power.draw", required=True),
    _Field("power.limit"),
    _Field("enforced.power.limit"),
    _Field("power.min_limit"),
    _Field("power.max_limit"),
    _Field("power.default_limit"),
    _Field("utilization.gpu"),
    _Field("temperature.gpu"),
    _Field("memory.used"),
    # Not every nvidia-smi has it; assumed millijoules since driver load, as
    # NVML's nvmlDeviceGetTotalEnergyConsumption.
    _Field("total_energy_consumption"),
)

_INVALID_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query')
_NO_HANDLE = re.compile(
    r"Unable to determine the device handle for GPU ?([0-9A-Fa-f:.]+): ([^\n]+)"
)
_SET_TO = re.compile(r"was set to ([0-9.]+) W")


@dataclass(frozen=True, slots=True)
class CommandResult:
    """One remote command's outcome and how long it took (s)."""

    exit_status: int
    stdout: str
    stderr: str
    latency_s: float

    @property
    def output(self) -> str:
        """stdout and stderr together (nvidia-smi prints errors on either)."""
        return self.stdout + self.stderr


class _SshLink:
    """One persistent SSH connection to a node: connect, keepalive, backoff, run."""

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        username: str,
        client_keys: Sequence[str | Path],
        known_hosts: str | Path,
        *,
        connect_timeout_s: float,
        keepalive_interval_s: float,
        keepalive_count_max: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        clock: Callable[[], float],
    ) -> None:
        if not str(known_hosts):
            raise ValueError("known_hosts is required: host keys are always verified")
        self.node_id = node_id
        self.host = host
        self.port = port
        self.username = username
        self.client_keys = [str(k) for k in client_keys]
        self.known_hosts = Path(known_hosts)
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_count_max = keepalive_count_max
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self.failures = 0
        self.next_attempt_s = 0.0
        self.last_error: DeviceError | None = None
        self.connects = 0

    @property
    def where(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The live connection, (re)connecting if needed unless backing off."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            if self._conn is not None:
                self._conn = None
                log.warning("%s: SSH connection to %s lost", self.node_id, self.where)
            now = self._clock()
            if now < self.next_attempt_s and self.last_error is not None:
                raise type(self.last_error)(
                    f"{self.last_error} (next attempt in {self.next_attempt_s - now:.1f} s, "
                    f"after {self.failures} failure(s))"
                )
            try:
                conn = await self._connect()
            except DeviceError as e:
                self.failures += 1
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self.failures - 1))
                self.next_attempt_s = self._clock() + delay
                if self.failures == 1:
                    log.warning("%s: %s", self.node_id, e)
                self.last_error = e
                raise
            if self.failures:
                log.info("%s: SSH connection to %s restored", self.node_id, self.where)
            self.failures = 0
            self.last_error = None
            self.connects += 1
            self._conn = conn
            return conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        what = f"{self.node_id}: connect {self.where}"
        if not self.known_hosts.is_file():
            raise HostKeyRefused(
                f"{what}: known_hosts file {self.known_hosts} does not exist; "
                "host keys are always verified (see docs/gpu.md)"
            )
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                return await asyncssh.connect(
                    self.host,
                    self.port,
                    username=self.username,
                    client_keys=self.client_keys,
                    known_hosts=str(self.known_hosts),
                    # No ssh-agent, no ~/.ssh/config, no password prompts: the
                    # agent's configuration alone decides how it logs in.
                    agent_path=None,
                    config=None,
                    password=None,
                    kbdint_auth=False,
                    keepalive_interval=self.keepalive_interval_s,
                    keepalive_count_max=self.keepalive_count_max,
                    connect_timeout=self.connect_timeout_s,
                )
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostKeyRefused(
                f"{what}: host key not trusted by known_hosts {self.known_hosts} (unknown host "
                f"or changed key): node refused; verify the key out of band and update the "
                f"file: {e.reason}"
            ) from e
        except asyncssh.PermissionDenied as e:
            raise AuthenticationRefused(
                f"{what}: authentication refused for user {self.username!r} with keys "
                f"{self.client_keys}: {e.reason}"
            ) from e
        except TimeoutError as e:
            raise DeviceUnreachable(f"{what}: no answer in {self.connect_timeout_s} s") from e
        except (asyncssh.Error, OSError) as e:
            raise DeviceUnreachable(f"{what}: {type(e).__name__}: {e}") from e

    def drop(self) -> None:
        """Abort the connection (after a timeout or error); the next call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
            log.warning("%s: SSH connection to %s dropped", self.node_id, self.where)

    async def run(self, command: str, timeout_s: float) -> CommandResult:
        """Run one command on the node under ``timeout_s`` (s)."""
        conn = await self.connection()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                r = await conn.run(command, check=False)
        except TimeoutError as e:
            # A hung command may mean a wedged node; a fresh connection costs
            # one handshake and clears any half-open channel.
            self.drop()
            raise DeviceUnreachable(
                f"{self.node_id}: {command!r} did not finish in {timeout_s} s"
            ) from e
        except (asyncssh.Error, OSError) as e:
            self.drop()
            raise DeviceUnreachable(f"{self.node_id}: {command!r}: {type(e).__name__}: {e}") from e
        latency = time.perf_counter() - t0
        stdout = r.stdout if isinstance(r.stdout, str) else ""
        stderr = r.stderr if isinstance(r.stderr, str) else ""
        # exit_status is None when the channel closed without one (killed by a signal).
        status = r.exit_status if r.exit_status is not None else 255
        return CommandResult(status, stdout, stderr, latency)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                async with asyncio.timeout(2.0):
                    await conn.wait_closed()
            except TimeoutError:
                conn.abort()


def _value(raw: str) -> str | None:
    """A CSV cell, or None for ``[N/A]``, ``[Not Supported]`` and other bracketed notes."""
    v = raw.strip()
    if not v or (v.startswith("[") and v.endswith("]")):
        return None
    return v


def _float(cell: str | None) -> float | None:
    if cell is None:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


class SshNodeDriver:
    """One remote GPU node, read and controlled with nvidia-smi over SSH."""

    def __init__(
        self,
        node_id: str,
        host: str,
        *,
        port: int = 22,
        username: str,
        client_keys: Sequence[str | Path],
        known_hosts: str | Path,
        command_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        keepalive_interval_s: float = 15.0,
        keepalive_count_max: int = 3,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        drain_command: str | None = None,
        undrain_command: str | None = None,
        hook_timeout_s: float = 120.0,
        nvidia_smi: str = "nvidia-smi",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.read_only = True  # until connect has asked sudo
        self.read_only_reason: str | None = "not connected yet"
        self.command_timeout_s = command_timeout_s
        self.drain_command = drain_command
        self.undrain_command = undrain_command
        self.hook_timeout_s = hook_timeout_s
        self.nvidia_smi = nvidia_smi
        self.infos: list[GpuInfo] = []
        self.fields: list[_Field] = list(QUERY_FIELDS)
        self._clock = clock
        self._limit_w: dict[int, float] = {}
        self.link = _SshLink(
            node_id,
            host,
            port,
            username,
            client_keys,
            known_hosts,
            connect_timeout_s=connect_timeout_s,
            keepalive_interval_s=keepalive_interval_s,
            keepalive_count_max=keepalive_count_max,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            clock=clock,
        )

    async def run_command(self, command: str, timeout_s: float | None = None) -> CommandResult:
        """Run one shell command on the node over the persistent connection (timeout s)."""
        return await self.link.run(command, timeout_s or self.command_timeout_s)

    # -- reading -------------------------------------------------------------------

    def _query_command(self) -> str:
        names = ",".join(f.name for f in self.fields)
        return f"{shlex.quote(self.nvidia_smi)} --query-gpu={names} --format=csv,noheader,nounits"

    async def _query(self) -> list[dict[str, str | None]]:
        """Run the query, dropping optional fields this nvidia-smi rejects; rows by field."""
        while True:
            r = await self.run_command(self._query_command())
            bad = _INVALID_FIELD.search(r.output)
            if bad is None:
                break
            field = next((f for f in self.fields if f.name == bad.group(1)), None)
            if field is None or field.required:
                raise DeviceFaulted(
                    f"{self.node_id}: nvidia-smi does not know required field {bad.group(1)!r}"
                )
            log.info("%s: nvidia-smi lacks %r; reading without it", self.node_id, field.name)
            self.fields.remove(field)
        lost = _NO_HANDLE.search(r.output)
        if lost is not None:
            bus_id, why = lost.group(1), lost.group(2).strip()
            msg = f"{self.node_id}: GPU {bus_id}: {why}"
            raise DeviceLost(msg) if "lost" in why.lower() else DeviceFaulted(msg)
        if r.exit_status != 0:
            raise DeviceFaulted(
                f"{self.node_id}: nvidia-smi exited {r.exit_status}: {r.output.strip()[-300:]}"
            )
        names = [f.name for f in self.fields]
        rows: list[dict[str, str | None]] = []
        for cells in csv.reader(r.stdout.splitlines(), skipinitialspace=True):
            if not cells:
                continue
            if len(cells) != len(names):
                raise DeviceFaulted(
                    f"{self.node_id}: nvidia-smi row has {len(cells)} cells, expected "
                    f"{len(names)}: {cells!r}"
                )
            rows.append({n: _value(c) for n, c in zip(names, cells, strict=True)})
        if not rows:
            raise DeviceFaulted(f"{self.node_id}: nvidia-smi listed no GPUs")
        return rows

    async def connect(self) -> list[GpuInfo]:
        """Connect, enumerate the GPUs with their limits (W), and ask sudo about control."""
        rows = await self._query()
        infos = []
        for row in rows:
            index = row["index"]
            if index is None or not index.isdigit():
                raise DeviceFaulted(f"{self.node_id}: nvidia-smi gave GPU index {index!r}")
            limit = _float(row.get("power.limit"))
            default = _float(row.get("power.default_limit")) or limit
            lo = _float(row.get("power.min_limit")) or default
            hi = _float(row.get("power.max_limit")) or default
            if lo is None or hi is None or default is None:
                raise DeviceFaulted(
                    f"{self.node_id}: GPU {index} reports no power limits; it cannot be capped"
                )
            infos.append(
                GpuInfo(
                    index=int(index),
                    uuid=row["uuid"] or "",
                    name=row["name"] or "",
                    power_limit_min_w=lo,
                    power_limit_max_w=hi,
                    power_limit_default_w=default,
                )
            )
            if limit is not None:
                self._limit_w[int(index)] = limit
        self.infos = sorted(infos, key=lambda i: i.index)
        await self._check_sudo()
        return self.infos

    async def _check_sudo(self) -> None:
        """Ask sudo (``-l``: list, change nothing) whether we may set a power limit."""
        info = self.infos[0]
        probe = (
            f"sudo -n -l {shlex.quote(self.nvidia_smi)} -i {info.index} "
            f"-pl {int(info.power_limit_default_w)}"
        )
        r = await self.run_command(probe)
        if r.exit_status == 0:
            self.read_only, self.read_only_reason = False, None
            return
        self.read_only = True
        self.read_only_reason = f"sudo refused {probe!r}: {r.output.strip()[-200:]}"
        log.warning(
            "%s: read-only: %s (see docs/gpu.md for the sudoers line)",
            self.node_id,
            self.read_only_reason,
        )

    async def read(self) -> list[GpuReading]:
        """Read every GPU: power W, energy J, limits W, utilization 0..1, degC, bytes."""
        rows = await self._query()
        ts = self._clock()
        out = []
        for row in rows:
            index = int(row["index"] or -1)
            limit = _float(row.get("power.limit"))
            if limit is not None:
                self._limit_w[index] = limit
            util = _float(row.get("utilization.gpu"))
            mem = _float(row.get("memory.used"))
            energy = _float(row.get("total_energy_consumption"))
            out.append(
                GpuReading(
                    index=index,
                    timestamp_s=ts,
                    power_w=_float(row.get("power.draw")),
                    energy_j=None if energy is None else energy / 1000.0,
                    power_limit_w=limit,
                    enforced_power_limit_w=_float(row.get("enforced.power.limit")),
                    utilization_frac=None if util is None else util / 100.0,
                    temperature_c=_float(row.get("temperature.gpu")),
                    memory_used_bytes=None if mem is None else int(mem * _MIB),
                )
            )
        return out

    # -- control -------------------------------------------------------------------

    async def set_power_limit(self, index: int, power_w: float) -> float:
        """Clamp ``power_w`` (W) to GPU ``index``'s range; set it with sudo if it differs."""
        info = next((i for i in self.infos if i.index == index), None)
        if info is None:
            raise DeviceRefused(f"{self.node_id}: no GPU {index}")
        if self.read_only:
            raise DevicePermissionError(f"{self.node_id}: read-only: {self.read_only_reason}")
        applied_w = info.clamp_power_limit_w(power_w)
        current = self._limit_w.get(index)
        if current is not None and math.isclose(current, applied_w, abs_tol=0.5):
            return applied_w
        cmd = f"sudo -n {shlex.quote(self.nvidia_smi)} -i {index} -pl {int(applied_w)}"
        r = await self.run_command(cmd)
        out = r.output
        if r.exit_status == 0:
            m = _SET_TO.search(out)
            applied_w = float(m.group(1)) if m else applied_w
            self._limit_w[index] = applied_w
            return applied_w
        where = f"{self.node_id}: GPU {index}: {cmd!r}"
        if out.lstrip().startswith("sudo:") or "not permitted" in out or "Insufficient Perm" in out:
            self.read_only = True
            self.read_only_reason = f"{cmd!r} refused: {out.strip()[-200:]}"
            log.warning("%s: read-only from now: %s", self.node_id, self.read_only_reason)
            raise DevicePermissionError(f"{where}: refused: {out.strip()[-200:]}")
        lost = _NO_HANDLE.search(out)
        if lost is not None:
            raise DeviceLost(f"{where}: {lost.group(2).strip()}")
        if "not a valid power limit" in out:
            raise DeviceRefused(f"{where}: {out.strip()[-300:]}")
        raise DeviceFaulted(f"{where}: exited {r.exit_status}: {out.strip()[-300:]}")

    async def drain(self) -> None:
        """Run the node's drain command (no-op when none is configured)."""
        await self._hook("drain", self.drain_command)

    async def undrain(self) -> None:
        """Run the node's undrain command (no-op when none is configured)."""
        await self._hook("undrain", self.undrain_command)

    async def _hook(self, what: str, command: str | None) -> None:
        if not command:
            return
        r = await self.run_command(command, self.hook_timeout_s)
        if r.exit_status != 0:
            raise DeviceFaulted(
                f"{self.node_id}: {what} command {command!r} exited {r.exit_status}: "
                f"{r.output.strip()[-300:]}"
            )

    async def close(self) -> None:
        """Close the SSH connection (limits stay as set: nvidia-smi keeps them until reboot)."""
        await self.link.close()
