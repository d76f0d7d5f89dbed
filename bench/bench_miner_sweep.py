"""One telemetry sweep of N simulated miners, three ways; prints wall, CPU, peak RSS, ratios.

(a) the agent's driver: ``AsicDriver.read()`` per miner (drivers built once from
    the known inventory, as the agent does after discovery; that setup is
    reported but not part of the sweep);
(b) naive pyasic: ``pyasic.get_miner`` + ``get_data()`` per miner;
(c) the floor: a bare asyncio client sending only the requests a reading
    strictly needs, and parsing only the fields it needs:
    Whatsminer ``summary``; LuxOS ``summary+power+config+temps``;
    Braiins OS ``GetMinerStats`` (power, hashrate) as one gRPC call on an
    HTTP/2 connection (h2, no grpclib, protobuf fields decoded by hand; the
    login token is fetched in setup, as the agent's driver has its token from
    identification; the status, ``GetMinerDetails``, is needed only when the
    hashrate or power says it may have moved, so a steady reading needs
    ``GetMinerStats`` alone), kept per miner from setup as the agent's driver
    keeps its channel (``--braiins-floor per-reading``: a new connection per
    reading, the floor before it);
    stock Antminer ``stats`` on 4028 (hashrate, power where published; the miner
    mode, a web page behind digest auth, is needed only when the hashrate or
    power says it may have moved, so a steady reading needs ``stats`` alone);
    VNish ``GET /api/v1/summary`` (power, hashrate, state; the token from
    ``unlock`` fetched in setup, as the agent's driver has its session), on
    one HTTP/1.1 connection per miner kept from setup, as the agent's driver
    keeps one (``--vnish-floor per-request``: a new connection per request,
    as pyasic's own client and the floor before it).

The agent's reading carries more than the floor's where its loop uses more:
the Braiins OS one decodes through pyasic's generated messages and grpclib. The
Braiins OS (status, performance mode, cooling), stock Antminer (miner mode) and VNish
(running preset) ones read their slow-moving values again only when they may
have moved (after a write, a restart or status change, a move in hashrate or
power, and every 12th reading), so a steady reading asks what the floor asks.

``--mix`` takes one backend, a comma list (round-robin) or ``all``.

The simulator runs in separate processes (``python -m sim.serve``), at most
``--per-process`` miners each (default: what ``ulimit -n`` holds, e.g. 2,500 Braiins
OS miners of 7 descriptors each, 5,000 of the others); each sweep runs in its own
child process so CPU time and peak RSS are its own. Concurrency is bounded.

    python bench/bench_miner_sweep.py --miners 10000 --mix whatsminer
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import itertools
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLOOR_REQUEST = {
    "whatsminer": b'{"command": "summary"}',
    "luxos": b'{"command": "summary+power+config+temps"}',
    "antminer": b'{"command": "stats"}',
}
ALL_BACKENDS = ("braiins", "whatsminer", "luxos", "antminer", "vnish")


GC_FREEZE = False
# The floor's VNish connections: "kept" (one per miner, as the agent's driver) or
# "per-request" (Connection: close, as pyasic's own web client).
VNISH_FLOOR = "kept"
# The floor's Braiins OS connections: "kept" (one HTTP/2 connection per miner, as the
# agent's driver keeps one gRPC channel) or "per-reading" (as pyasic, which opens one
# per call, and the agent's driver before it, which shared one per reading).
BRAIINS_FLOOR = "kept"
# Steady sweeps timed back to back in (a) and (c); the figures are their mean. One
# sweep carries only the slow reads of the miners whose phase it is: 12 (a whole
# cycle of SLOW_REFRESH_READS) carry each miner's once.
TIMED = 1


def _after_setup() -> None:
    """With ``--gc-freeze``: move what setup built out of the collector's sight.

    10,000 drivers are ~0.5 M tracked objects (pyasic's miner objects); every
    full collection during a sweep walks them all.
    """
    if GC_FREEZE:
        gc.collect()
        gc.freeze()


# The simulator processes' pids (``--sim-pids``): their CPU during a timed sweep is
# reported, since they share this machine's cores with the sweep.
SIM_PIDS: list[int] = []


def _sim_cpu_s() -> float:
    """CPU seconds (user + system) the simulator processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in SIM_PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _sys_cpu_s() -> float:
    """This process's system CPU seconds so far (the kernel's share of the sweep)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _usage() -> tuple[float, float]:
    """This process's CPU seconds and peak RSS (MB); the simulators' CPU is sampled
    alongside (``_sim_cpu_s``) by the sweeps."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0


async def _bounded(n: int, items: list[Any], fn: Any) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def one(x: Any) -> Any:
        async with sem:
            try:
                return await fn(x)
            except Exception as e:
                return e

    return list(await asyncio.gather(*(one(x) for x in items)))


async def sweep_agent(miners: list[dict[str, Any]], conc: int, timeout_s: float) -> dict[str, Any]:
    """(a): build drivers from the inventory, sweep once (the agent's first sweep, timed
    apart), then time one steady sweep: what the agent does every interval."""
    from siteagent.drivers.asic import AsicDriver

    t0 = time.perf_counter()
    drivers = await _bounded(
        conc,
        miners,
        lambda m: AsicDriver.from_inventory(
            m["address"],
            m["address"],
            backend=m["backend"],
            model=m.get("pyasic_model"),
            timeout_s=timeout_s,
        ),
    )
    setup_s = time.perf_counter() - t0
    ok_drivers = [d for d in drivers if isinstance(d, AsicDriver)]
    t0 = time.perf_counter()
    await _bounded(conc, ok_drivers, lambda d: d.read())
    first_s = time.perf_counter() - t0
    _after_setup()
    cpu0, _ = _usage()
    sys0 = _sys_cpu_s()
    sim0 = _sim_cpu_s()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        res = await _bounded(conc, ok_drivers, lambda d: d.read())
    wall = time.perf_counter() - t0
    cpu1, rss = _usage()
    sim_cpu = _sim_cpu_s() - sim0
    sys_cpu = _sys_cpu_s() - sys0
    ok = sum(1 for r in res if not isinstance(r, BaseException))
    out: dict[str, Any] = {
        "wall_s": wall / TIMED,
        "cpu_s": (cpu1 - cpu0) / TIMED,
        "sim_cpu_s": sim_cpu / TIMED,
        "sys_cpu_s": sys_cpu / TIMED,
        "rss_mb": rss,
        "ok": ok,
        "setup_s": setup_s,
        "first_sweep_s": first_s,
    }
    errors = [r for r in [*drivers, *res] if isinstance(r, BaseException)]
    if errors:
        out["first_error"] = repr(errors[0])
    return out


async def sweep_naive(miners: list[dict[str, Any]], conc: int, timeout_s: float) -> dict[str, Any]:
    """(b): pyasic.get_miner + get_data() per miner."""
    import pyasic

    async def one(m: dict[str, Any]) -> Any:
        async with asyncio.timeout(timeout_s * 4):
            miner = await pyasic.get_miner(m["address"])
            return await miner.get_data()

    cpu0, _ = _usage()
    sys0 = _sys_cpu_s()
    sim0 = _sim_cpu_s()
    t0 = time.perf_counter()
    res = await _bounded(conc, miners, one)
    wall = time.perf_counter() - t0
    cpu1, rss = _usage()
    sim_cpu = _sim_cpu_s() - sim0
    sys_cpu = _sys_cpu_s() - sys0
    ok = sum(1 for r in res if not isinstance(r, BaseException) and r.wattage is not None)
    return {
        "wall_s": wall,
        "cpu_s": cpu1 - cpu0,
        "sys_cpu_s": sys_cpu,
        "sim_cpu_s": sim_cpu,
        "rss_mb": rss,
        "ok": ok,
    }


# -- the floor's bare clients ---------------------------------------------------------


async def _rpc_json(address: str, request: bytes) -> Any:
    """One request on TCP 4028, the whole reply read, NUL-trimmed, parsed."""
    reader, writer = await asyncio.open_connection(address, 4028)
    writer.write(request)
    data = await reader.read(-1)
    writer.close()
    return json.loads(data.rstrip(b"\0"))


def _pb_fields(buf: bytes) -> dict[int, Any]:
    """Top-level protobuf fields (last one wins): varint int, fixed64/32 bytes, len bytes."""
    out: dict[int, Any] = {}
    i, n = 0, len(buf)
    while i < n:
        key = shift = 0
        while True:
            b = buf[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        field, wire = key >> 3, key & 7
        if wire == 0:
            v = shift = 0
            while True:
                b = buf[i]
                i += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            out[field] = v
        elif wire == 1:
            out[field], i = buf[i : i + 8], i + 8
        elif wire == 5:
            out[field], i = buf[i : i + 4], i + 4
        elif wire == 2:
            ln = shift = 0
            while True:
                b = buf[i]
                i += 1
                ln |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            out[field], i = buf[i : i + ln], i + ln
        else:
            raise ValueError(f"protobuf wire type {wire}")
    return out


def _pb_path(buf: bytes, *path: int) -> Any:
    """The field at ``path`` of nested messages (None where absent: proto3 default)."""
    node: Any = buf
    for f in path:
        if node is None:
            return None
        node = _pb_fields(node).get(f)
    return node


def _pb_str(field: int, value: str) -> bytes:
    raw = value.encode()
    return bytes([field << 3 | 2, len(raw)]) + raw


class _H2:
    """One HTTP/2 connection of the floor's: h2's state machine and the stream pair."""

    def __init__(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        import h2.config
        import h2.connection

        self.address, self.reader, self.writer = address, reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.answered = False  # some exchange on it finished (it is being reused since)

    @classmethod
    async def open(cls, address: str) -> _H2:
        """Connect; the preface and SETTINGS go out with the first request."""
        reader, writer = await asyncio.open_connection(address, 50051)
        return cls(address, reader, writer)

    async def exchange(
        self, calls: list[tuple[str, bytes]], token: str | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Unary gRPC calls as new streams: each reply's message and headers."""
        import h2.events

        conn = self.conn
        sids: list[int] = []
        for path, body in calls:
            sid = conn.get_next_available_stream_id()
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"{self.address}:50051"),
                ("te", "trailers"),
                ("content-type", "application/grpc+proto"),
            ]
            if token is not None:
                headers.append(("authorization", token))
            conn.send_headers(sid, headers)
            conn.send_data(sid, b"\0" + struct.pack(">I", len(body)) + body, end_stream=True)
            sids.append(sid)
        self.writer.write(conn.data_to_send())
        data = {sid: bytearray() for sid in sids}
        meta: dict[int, dict[bytes, bytes]] = {sid: {} for sid in sids}
        ended: set[int] = set()
        while len(ended) < len(sids):
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("closed before the replies ended")
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.DataReceived):
                    data[ev.stream_id] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    meta[ev.stream_id].update(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise ConnectionError(f"HTTP/2 {type(ev).__name__}")
            out = conn.data_to_send()
            if out:
                self.writer.write(out)
        self.answered = True
        replies = []
        for sid in sids:
            status = meta[sid].get(b"grpc-status", b"0")
            if status != b"0":
                raise RuntimeError(f"grpc-status {status!r}: {meta[sid].get(b'grpc-message')!r}")
            buf = bytes(data[sid])
            replies.append((buf[5 : 5 + struct.unpack(">I", buf[1:5])[0]], meta[sid]))
        return replies

    def close(self) -> None:
        """Close the socket (no GOAWAY: the floor sends only what a reading needs)."""
        self.writer.close()


async def _grpc_calls(
    address: str, calls: list[tuple[str, bytes]], token: str | None
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Unary gRPC calls on an HTTP/2 connection of their own: replies and headers."""
    h = await _H2.open(address)
    try:
        return await h.exchange(calls, token)
    finally:
        h.close()


async def _grpc_kept(
    m: dict[str, Any], calls: list[tuple[str, bytes]], token: str | None
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Unary gRPC calls on the miner's kept HTTP/2 connection: replies and headers.

    The agent's driver's policy: opened on first use; reopened when the miner has
    closed it; dropped after an exchange that did not finish, and the calls sent
    once more on a fresh connection if the dropped one had answered before.
    """
    for attempt in range(2):
        h = m.get("h2")
        if h is None or h.reader.at_eof():
            h = m["h2"] = await _H2.open(m["address"])
        reused = h.answered
        try:
            return await h.exchange(calls, token)
        except BaseException as e:
            h.close()
            m["h2"] = None
            if attempt or not reused or not isinstance(e, ConnectionError):
                raise
    raise AssertionError("unreachable")


async def _braiins_grpc(
    m: dict[str, Any], calls: list[tuple[str, bytes]], token: str | None
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The floor's Braiins OS calls the ``BRAIINS_FLOOR`` way."""
    if BRAIINS_FLOOR == "kept":
        return await _grpc_kept(m, calls, token)
    return await _grpc_calls(m["address"], calls, token)


BOS = "/braiins.bos.v1."
_DIGEST_NC = itertools.count(1)


async def _http_get(
    address: str, uri: str, auth: str | None, *, method: str = "GET", body: bytes = b""
) -> tuple[int, bytes, bytes]:
    """HTTP/1.1 request (Connection: close): status, head, body."""
    reader, writer = await asyncio.open_connection(address, 80)
    extra = f"Authorization: {auth}\r\n" if auth else ""
    if body:
        extra += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(
        f"{method} {uri} HTTP/1.1\r\nHost: {address}\r\n{extra}Connection: close\r\n\r\n".encode()
        + body
    )
    data = await reader.read(-1)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


async def _http_kept(
    m: dict[str, Any], uri: str, auth: str | None, *, method: str = "GET", body: bytes = b""
) -> tuple[int, bytes]:
    """HTTP/1.1 request on the miner's kept connection: status, body.

    Opened on first use, and again (once) when the miner has closed it, as the
    agent's driver does; the reply's length from its ``Content-Length``.
    """
    extra = f"Authorization: {auth}\r\n" if auth else ""
    if body:
        extra += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = f"{method} {uri} HTTP/1.1\r\nHost: {m['address']}\r\n{extra}\r\n".encode() + body
    for attempt in range(2):
        conn = m.get("http")
        if conn is None or conn[0].at_eof():
            conn = m["http"] = await asyncio.open_connection(m["address"], 80)
        reader, writer = conn
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            return int(head.split(b" ", 2)[1]), await reader.readexactly(n)
        except BaseException as e:
            # An exchange that did not finish leaves the connection out of step.
            writer.close()
            m["http"] = None
            stale = isinstance(e, asyncio.IncompleteReadError | ConnectionError)
            if attempt or not stale:
                raise
    raise AssertionError("unreachable")


async def _vnish_http(
    m: dict[str, Any], uri: str, auth: str | None, *, method: str = "GET", body: bytes = b""
) -> tuple[int, bytes]:
    """One VNish web request the ``VNISH_FLOOR`` way: status, body."""
    if VNISH_FLOOR == "kept":
        return await _http_kept(m, uri, auth, method=method, body=body)
    status, _, reply = await _http_get(m["address"], uri, auth, method=method, body=body)
    return status, reply


async def floor_setup(m: dict[str, Any]) -> None:
    """What the floor learns once per miner, untimed (the agent's is its identification)."""
    if m["backend"] == "braiins":
        login = _pb_str(1, "root") + _pb_str(2, "root")
        ((_, meta),) = await _braiins_grpc(m, [(BOS + "AuthenticationService/Login", login)], None)
        m["token"] = meta[b"authorization"].decode()
    elif m["backend"] == "vnish":
        status, body = await _vnish_http(
            m, "/api/v1/unlock", None, method="POST", body=b'{"pw": "admin"}'
        )
        if status != 200:
            raise RuntimeError(f"unlock: HTTP {status}")
        m["token"] = json.loads(body)["token"]


async def floor_read(m: dict[str, Any]) -> float:
    """One reading by the bare client; returns the power (or the mode) it parsed."""
    backend, address = m["backend"], m["address"]
    if backend == "whatsminer":
        d = await _rpc_json(address, FLOOR_REQUEST["whatsminer"])
        return float(d["SUMMARY"][0]["Power"])
    if backend == "luxos":
        d = await _rpc_json(address, FLOOR_REQUEST["luxos"])
        return float(d["power"][0]["POWER"][0]["Watts"])
    if backend == "braiins":
        ((stats, _),) = await _braiins_grpc(
            m, [(BOS + "MinerService/GetMinerStats", b"")], m["token"]
        )
        ghs = _pb_path(stats, 2, 1, 1, 1)  # miner_stats.real_hashrate.last_5s.gigahash_per_s
        _ = struct.unpack("<d", ghs)[0] if ghs is not None else 0.0
        return float(_pb_path(stats, 3, 1, 1) or 0)  # power_stats.approx_consumption.watt
    if backend == "antminer":
        stats = await _rpc_json(address, FLOOR_REQUEST["antminer"])
        row = stats["STATS"][1]
        _ = float(row["GHS 5s"]), int(row.get("Elapsed", 0))
        power = row.get("chain_power")  # "3010 W", only where the model publishes it
        return float(str(power).split()[0]) if power else 0.0
    if backend == "vnish":
        status, body = await _vnish_http(m, "/api/v1/summary", m["token"])
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        miner = json.loads(body)["miner"]
        _ = float(miner["hr_realtime"]), str(miner["miner_status"]["miner_state"])
        return float(miner["power_consumption"])
    raise ValueError(f"no floor for backend {backend!r}")


async def sweep_floor(miners: list[dict[str, Any]], conc: int, timeout_s: float) -> dict[str, Any]:
    """(c): the bare clients above, only the requests the reading needs."""
    t0 = time.perf_counter()
    await _bounded(conc, miners, floor_setup)
    setup_s = time.perf_counter() - t0
    _after_setup()

    async def one(m: dict[str, Any]) -> float:
        async with asyncio.timeout(timeout_s):
            return await floor_read(m)

    cpu0, _ = _usage()
    sys0 = _sys_cpu_s()
    sim0 = _sim_cpu_s()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        res = await _bounded(conc, miners, one)
    wall = time.perf_counter() - t0
    cpu1, rss = _usage()
    sim_cpu = _sim_cpu_s() - sim0
    sys_cpu = _sys_cpu_s() - sys0
    ok = sum(1 for r in res if isinstance(r, float))
    out: dict[str, Any] = {
        "wall_s": wall / TIMED,
        "cpu_s": (cpu1 - cpu0) / TIMED,
        "sim_cpu_s": sim_cpu / TIMED,
        "sys_cpu_s": sys_cpu / TIMED,
        "rss_mb": rss,
        "ok": ok,
        "setup_s": setup_s,
    }
    errors = [r for r in res if isinstance(r, BaseException)]
    if errors:
        out["first_error"] = repr(errors[0])
    return out


SWEEPS = {"a": sweep_agent, "b": sweep_naive, "c": sweep_floor}
PYASIC_MODEL = {"M50S": "M50S VH50", "M60S": "M60S VK30", "M30S++": "M30S++ VH40"}


def run_child(args: argparse.Namespace) -> int:
    """Child mode: run one sweep over the inventory file and print its JSON result."""
    import logging

    logging.disable(logging.WARNING)  # pyasic warns per failed miner
    miners = json.loads(Path(args.inventory).read_text())
    if args.sample:
        miners = miners[: args.sample]
    global GC_FREEZE, VNISH_FLOOR, BRAIINS_FLOOR, TIMED
    TIMED = args.timed
    SIM_PIDS[:] = [int(pid) for pid in args.sim_pids.split(",") if pid]
    GC_FREEZE = args.gc_freeze
    VNISH_FLOOR = args.vnish_floor
    BRAIINS_FLOOR = args.braiins_floor
    out = asyncio.run(SWEEPS[args.child](miners, args.concurrency, args.timeout_s))
    out["n"] = len(miners)
    print(json.dumps(out))
    return 0


# Descriptors a simulated miner holds: its listening sockets, and for Braiins OS a
# dup of each (sim.braiins keeps a port bound while its server is swapped) and the
# gRPC connection a client keeps.
# VNish: its two listeners and the web connection a client keeps.
SIM_FDS_PER_MINER = {"braiins": 7, "antminer": 2, "vnish": 3, "whatsminer": 1, "luxos": 1}


def auto_per_process(n: int, backends: list[str], concurrency: int) -> int:
    """Miners per simulator process: what its descriptor limit holds, spread evenly."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = max(SIM_FDS_PER_MINER.get(b, 6) for b in backends)
    cap = max(1, min(5000, (soft - 2 * concurrency - 200) // fds))
    procs = -(-n // cap)
    return -(-n // procs)


def start_sims(
    args: argparse.Namespace,
) -> tuple[list[subprocess.Popen[str]], list[dict[str, Any]]]:
    """Simulator processes of at most ``per_process`` miners each; their merged inventory."""
    if args.per_process <= 0:
        args.per_process = auto_per_process(args.miners, args.mix.split(","), args.concurrency)
    procs: list[subprocess.Popen[str]] = []
    miners: list[dict[str, Any]] = []
    base = ipaddress.IPv4Address(args.base)
    left, offset = args.miners, 0
    while left > 0:
        n = min(left, args.per_process)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "siteagent.sim.serve",
                "--miners",
                str(n),
                "--mix",
                args.mix,
                "--base",
                str(base + offset),
                "--sample-s",
                "3600",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout is not None
        inv = json.loads(p.stdout.readline())
        for m in inv["miners"]:
            m["pyasic_model"] = PYASIC_MODEL.get(m["model"], m["model"])
        miners.extend(inv["miners"])
        left -= n
        offset += n
    return procs, miners


def stop_sims(procs: list[subprocess.Popen[str]]) -> None:
    """End the simulator processes ``start_sims`` started, and wait for each."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Parent mode: start the simulator, run (a), (b), (c) each in a child, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=10000)
    p.add_argument("--mix", default="whatsminer")
    p.add_argument("--base", default="127.1.0.1")
    p.add_argument(
        "--per-process",
        type=int,
        default=0,
        help="miners per simulator process (0: as many as its descriptor limit holds)",
    )
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument(
        "--naive-sample",
        type=int,
        default=0,
        help="run (b) on the first N miners only and scale up (0: all)",
    )
    p.add_argument("--sweeps", default="cab")
    p.add_argument(
        "--timed",
        type=int,
        default=1,
        help="steady sweeps timed back to back in (a) and (c), reported as their mean "
        "(12: a whole cycle of the slow fields' refresh)",
    )
    p.add_argument("--child", choices=sorted(SWEEPS), help=argparse.SUPPRESS)
    p.add_argument("--inventory", help=argparse.SUPPRESS)
    p.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sim-pids", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gc.freeze() after each sweep's setup, as `siteagent run` does after its first sweep",
    )
    p.add_argument(
        "--vnish-floor",
        choices=("kept", "per-request"),
        default="kept",
        help="the floor's VNish connections: one kept per miner (as the agent's driver) "
        "or one per request (as pyasic's own client)",
    )
    p.add_argument(
        "--braiins-floor",
        choices=("kept", "per-reading"),
        default="kept",
        help="the floor's Braiins OS HTTP/2 connections: one kept per miner (as the "
        "agent's driver keeps its gRPC channel) or one per reading",
    )
    args = p.parse_args(argv)
    if args.child:
        return run_child(args)
    if args.mix == "all":
        args.mix = ",".join(ALL_BACKENDS)
    load0 = os.getloadavg()[0]
    procs, miners = start_sims(args)
    results: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(miners, f)
        for s in args.sweeps:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                s,
                "--inventory",
                f.name,
                "--concurrency",
                str(args.concurrency),
                "--timeout-s",
                str(args.timeout_s),
            ]
            if s == "b" and args.naive_sample:
                cmd += ["--sample", str(args.naive_sample)]
            cmd.append("--gc-freeze" if args.gc_freeze else "--no-gc-freeze")
            cmd += ["--vnish-floor", args.vnish_floor]
            cmd += ["--braiins-floor", args.braiins_floor]
            cmd += ["--timed", str(args.timed)]
            cmd += ["--sim-pids", ",".join(str(proc.pid) for proc in procs)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"sweep {s} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if r["n"] < len(miners):  # scaled from a sample
                k = len(miners) / r["n"]
                r.update(wall_s=r["wall_s"] * k, cpu_s=r["cpu_s"] * k, scaled_from=r["n"])
            results[s] = r
    finally:
        stop_sims(procs)
    names = {"a": "agent driver", "b": "naive pyasic", "c": "floor (bare)"}
    print(
        f"sweep of {len(miners)} simulated miners ({args.mix}) in {len(procs)} simulator "
        f"processes, concurrency {args.concurrency}{', gc frozen after setup' * args.gc_freeze}, "
        f"{os.cpu_count()} cores, load average before {load0:.2f} after {os.getloadavg()[0]:.2f}"
        + (f", (a) and (c): the mean of {args.timed} steady sweeps" if args.timed > 1 else "")
        + (f", VNish floor connections {args.vnish_floor}" if "vnish" in args.mix else "")
        + (f", Braiins OS floor connections {args.braiins_floor}" if "braiins" in args.mix else "")
    )
    n_bos = sum(1 for m in miners if m["backend"] == "braiins")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n_bos > soft // 2:
        # drivers.backends.braiins.KeepBudget: past half the descriptors, per reading.
        print(
            f"  note: ulimit -n {soft}: the agent keeps {soft // 2} of {n_bos} Braiins OS "
            "channels open, the rest are opened per reading"
        )
    for s, r in results.items():
        extra = f"  (setup {r['setup_s']:.1f} s)" if "setup_s" in r else ""
        if "first_sweep_s" in r:
            extra += f"  (first sweep {r['first_sweep_s']:.1f} s, not in the figures)"
        extra += f"  (scaled from {r['scaled_from']})" if "scaled_from" in r else ""
        extra += f"\n      first error: {r['first_error'][:300]}" if "first_error" in r else ""
        print(
            f"  ({s}) {names[s]:13s} wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s "
            f"(system {r.get('sys_cpu_s', 0.0):.2f})  peak rss {r['rss_mb']:6.0f} MB  "
            f"ok {r['ok']}/{r['n']}{extra}"
        )
        if "sim_cpu_s" in r:
            # The simulators answer on the same cores: no client can finish the sweep
            # faster than the two together fit on them.
            cores = os.cpu_count() or 1
            bound = (r["sim_cpu_s"] + r["cpu_s"]) / cores
            print(
                f"      simulators' cpu in that sweep {r['sim_cpu_s']:.2f} s: with the "
                f"sweep's own, wall >= {bound:.2f} s on {cores} cores"
            )
    if "c" in results:
        c = results["c"]
        for s in ("a", "b"):
            if s in results:
                r = results[s]
                print(
                    f"  ({s})/(c): wall x{r['wall_s'] / c['wall_s']:.1f}, "
                    f"cpu x{r['cpu_s'] / max(c['cpu_s'], 1e-9):.1f}"
                )
    if "a" in results:
        a = results["a"]
        print(
            f"  goals for (a): wall <= 5 s: {a['wall_s']:.2f} s; "
            f"cpu <= 2x (c): {a['cpu_s'] / max(results.get('c', a)['cpu_s'], 1e-9):.1f}x; "
            f"rss < 500 MB: {a['rss_mb']:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
