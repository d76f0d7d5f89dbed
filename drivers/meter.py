"""Site meter over Modbus TCP (pymodbus): SunSpec meters by discovery, others by a register map.

A read takes total real power (W, import positive), per-phase power, grid
frequency (Hz) and imported energy (Wh) in as few requests as the layout allows
(one block for a SunSpec meter), under the meter's own ``timeout_s``. Anything
the meter answers that cannot be its real state (NaN, SunSpec's "not
implemented" values, a scale factor out of range, a power beyond
``max_power_w``, negative import on an import-only connection, phases that do
not add up to the total, the same answer ``frozen_after_reads`` times) is a
``MeterError`` naming what was wrong, never a number: the loop then falls back
to the device sum, so a broken meter can never uncap the site.

Only this module imports pymodbus on the agent's side. pymodbus logs a warning
of its own (logger ``pymodbus.logging``) on each failed connect; the agent's
logging setup decides whether those reach the journal.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from sunspec2 import mdef

from siteagent.domain.errors import DeviceError

__all__ = [
    "MAP_QUANTITIES",
    "SUNSPEC_BASES",
    "MeterDriver",
    "MeterError",
    "MeterErrorKind",
    "MeterReading",
    "meter_driver",
]

MeterErrorKind = Literal["unreachable", "timeout", "garbage", "frozen", "map"]
RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
WordOrder = Literal["big", "little"]
RegisterFunction = Literal["holding", "input"]

# Where SunSpec devices put their "SunS" marker, in the order the standard tries them.
SUNSPEC_BASES = (40000, 0, 50000)
_SUNS = (0x5375, 0x6E53)  # "SunS"
_END_MODEL = 0xFFFF
INT_METER_MODELS = range(201, 205)  # integer values plus scale factors
FLOAT_METER_MODELS = range(211, 215)  # float32 values
# A chain longer than this is a device answering nonsense, not a real SunSpec map.
_MAX_MODELS = 64
# SunSpec's "not implemented" values per point type.
_NI_INT16 = 0x8000
_NI_UINT16 = 0xFFFF
_NI_ACC32 = 0
_NOT_IMPLEMENTED_SHOWN = {"int16": "0x8000", "sunssf": "0x8000", "uint16": "0xFFFF", "acc32": "0"}
# Modbus allows at most 125 registers per read.
_MAX_READ_REGS = 125
# Scale factors outside this range are not in SunSpec's meters (±10 is the spec's bound).
_MAX_SF = 10
# Grid frequency of any real grid is near 50 or 60 Hz; outside this band the
# register is not a frequency (a wrong scale factor or map), not a grid event.
FREQUENCY_PLAUSIBLE_HZ = (40.0, 70.0)
# An import-only connection may read a little below zero at no load (meter noise);
# this fraction of max_power_w is noise, more is an error (a sign or map slip).
NEGATIVE_NOISE_FRAC = 0.001
# Phases must add up to the total within this fraction of max_power_w (rounding of
# scaled integers; a meter's own summation), more means the map is wrong.
PHASE_SUM_TOLERANCE_FRAC = 0.01

# The quantities a register map may name; power_w is required.
MAP_QUANTITIES = (
    "power_w",
    "phase_a_w",
    "phase_b_w",
    "phase_c_w",
    "frequency_hz",
    "energy_import_wh",
)
_PHASES = ("phase_a_w", "phase_b_w", "phase_c_w")
_TYPE_REGS: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_TYPE_STRUCT: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
}


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One answer of a meter; ``time_s`` is the reader's monotonic clock when it came."""

    time_s: float
    power_w: float  # total real power, import positive
    phase_w: tuple[float, ...]  # the phases the meter implements, A first
    frequency_hz: float | None
    energy_import_wh: float | None


class MeterError(DeviceError):
    """A meter read that gave no usable reading: ``kind`` says which way, ``reason`` what."""

    def __init__(self, meter_id: str, kind: MeterErrorKind, reason: str) -> None:
        self.meter_id = meter_id
        self.kind: MeterErrorKind = kind
        self.reason = reason
        super().__init__(f"meter {meter_id}: {kind}: {reason}")


class RegisterSettings(Protocol):
    """Where one quantity lives in a non-SunSpec meter (``agent.config.RegisterConfig``)."""

    @property
    def address(self) -> int: ...
    @property
    def type(self) -> RegisterType: ...
    @property
    def scale(self) -> float: ...
    @property
    def word_order(self) -> WordOrder: ...
    @property
    def function(self) -> RegisterFunction: ...


class MapSettings(Protocol):
    """A register map: one entry per quantity (``agent.config.MeterMapConfig``)."""

    @property
    def power_w(self) -> RegisterSettings: ...
    @property
    def phase_a_w(self) -> RegisterSettings | None: ...
    @property
    def phase_b_w(self) -> RegisterSettings | None: ...
    @property
    def phase_c_w(self) -> RegisterSettings | None: ...
    @property
    def frequency_hz(self) -> RegisterSettings | None: ...
    @property
    def energy_import_wh(self) -> RegisterSettings | None: ...


class MeterSettings(Protocol):
    """What the driver reads of a meter's configuration (``agent.config.MeterConfig``)."""

    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def unit_id(self) -> int: ...
    @property
    def kind(self) -> Literal["sunspec", "map"]: ...
    @property
    def sunspec_base(self) -> int | None: ...
    @property
    def map(self) -> MapSettings | None: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def frozen_after_reads(self) -> int: ...
    @property
    def max_power_w(self) -> float | None: ...
    @property
    def import_only(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Block:
    """One Modbus read: ``count`` registers from ``address`` with a function code."""

    function: RegisterFunction
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class _Values:
    """Decoded, not yet checked: what the meter says."""

    power_w: float
    phase_w: tuple[float, ...]
    frequency_hz: float | None
    energy_import_wh: float | None


class _Garbage(Exception):
    """Raised by a layout's decoder; the driver turns it into MeterError(kind)."""

    def __init__(self, kind: MeterErrorKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: MeterErrorKind = kind
        self.reason = reason


class _Refused(Exception):
    """The meter answered a request with a Modbus exception (no such register)."""


@dataclass(frozen=True, slots=True)
class _Point:
    offset: int  # registers from the model's ID register
    type: str
    sf: str | None


@functools.cache
def sunspec_points(model_id: int) -> dict[str, _Point]:
    """Point name -> offset (registers from the model's ID), type and scale-factor name."""
    path = importlib.resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    with importlib.resources.as_file(path) as p:
        model_def: dict[str, Any] = mdef.from_json_file(str(p))
    out: dict[str, _Point] = {}
    offset = 0
    for point in model_def[mdef.GROUP][mdef.POINTS]:
        out[point[mdef.NAME]] = _Point(offset, point[mdef.TYPE], point.get(mdef.SF))
        offset += int(point[mdef.SIZE])
    return out


class _SunSpecLayout:
    """A SunSpec meter model (201-204 or 211-214) whose ID register is at ``address``."""

    def __init__(self, model_id: int, address: int) -> None:
        self.model_id = model_id
        self.address = address
        self.points = sunspec_points(model_id)
        last = "TotWh_SF" if model_id in INT_METER_MODELS else "TotWhImp"
        last_point = self.points[last]
        span = last_point.offset + (2 if last_point.type in ("acc32", "float32") else 1)
        # From the model's ID to the last point we need: one read (55 or 70 registers).
        self.blocks = (_Block("holding", address, span),)

    def describe(self) -> str:
        """Which model at which address, for error messages."""
        return f"SunSpec model {self.model_id} at {self.address}"

    def decode(self, regs: Sequence[int]) -> _Values:
        """What the registers say, or _Garbage naming the point that is wrong."""
        if regs[0] != self.model_id:
            raise _Garbage(
                "map",
                f"register {self.address} holds model id {regs[0]}, expected {self.model_id} "
                "(the meter's map changed; discovering again)",
            )
        if self.model_id in FLOAT_METER_MODELS:
            return self._decode_float(regs)
        return self._decode_int(regs)

    def _int(self, regs: Sequence[int], name: str) -> int | None:
        p = self.points[name]
        if p.type in ("acc32", "uint32"):
            v = (regs[p.offset] << 16) | regs[p.offset + 1]
            return None if v == _NI_ACC32 else v
        raw = regs[p.offset]
        if p.type == "uint16":
            return None if raw == _NI_UINT16 else raw
        if raw == _NI_INT16:  # int16 and sunssf
            return None
        return raw - 0x10000 if raw & 0x8000 else raw

    def _scaled(self, regs: Sequence[int], name: str, *, required: bool = False) -> float | None:
        """A point times ten to its scale factor; None where not implemented, unless required."""
        raw = self._int(regs, name)
        sf_name = self.points[name].sf
        sf = self._int(regs, sf_name) if sf_name is not None else 0
        if raw is None or sf is None:
            if not required:
                return None  # not every meter measures frequency or energy
            missing = name if raw is None else str(sf_name)
            at = self.address + self.points[missing].offset
            shown = _NOT_IMPLEMENTED_SHOWN[self.points[missing].type]
            raise _Garbage("garbage", f"{missing} (register {at}) is {shown}, not implemented")
        if abs(sf) > _MAX_SF:
            at = self.address + self.points[str(sf_name)].offset
            raise _Garbage(
                "garbage", f"{sf_name} (register {at}) is {sf}, expected a scale factor in -10..10"
            )
        return raw * 10.0**sf

    def _decode_int(self, regs: Sequence[int]) -> _Values:
        w = self._scaled(regs, "W", required=True)
        assert w is not None  # required: raised instead
        phases = tuple(
            v for n in ("WphA", "WphB", "WphC") if (v := self._scaled(regs, n)) is not None
        )
        return _Values(w, phases, self._scaled(regs, "Hz"), self._scaled(regs, "TotWhImp"))

    def _float(self, regs: Sequence[int], name: str) -> float:
        o = self.points[name].offset
        value: float = struct.unpack(">f", struct.pack(">HH", regs[o], regs[o + 1]))[0]
        return value

    def _decode_float(self, regs: Sequence[int]) -> _Values:
        w = self._float(regs, "W")
        if not math.isfinite(w):
            at = self.address + self.points["W"].offset
            raise _Garbage("garbage", f"W (registers {at}-{at + 1}) is {w}, not a power")
        phases = tuple(
            v for n in ("WphA", "WphB", "WphC") if math.isfinite(v := self._float(regs, n))
        )
        hz = self._float(regs, "Hz")
        wh = self._float(regs, "TotWhImp")
        return _Values(
            w, phases, hz if math.isfinite(hz) else None, wh if math.isfinite(wh) else None
        )


class _MapLayout:
    """A meter described by a register map in the configuration."""

    def __init__(self, regmap: MapSettings) -> None:
        self.regmap: dict[str, RegisterSettings] = {
            name: reg for name in MAP_QUANTITIES if (reg := getattr(regmap, name)) is not None
        }
        self.blocks = _blocks(self.regmap)

    def describe(self) -> str:
        """The map, for error messages."""
        return "the configured register map"

    def decode_blocks(self, blocks: Sequence[Sequence[int]]) -> _Values:
        """What the registers say, or _Garbage naming the map key that is wrong."""
        values: dict[str, float] = {}
        for name, reg in self.regmap.items():
            raw = _slice(self.blocks, blocks, reg)
            v = _unpack(raw, reg.type, reg.word_order)
            if not math.isfinite(v):
                if name == "power_w":
                    raise _Garbage(
                        "garbage", f"map.power_w (register {reg.address}) is {v}, not a power"
                    )
                continue  # an optional quantity the meter does not give
            values[name] = v * reg.scale
        phases = tuple(values[p] for p in _PHASES if p in values)
        return _Values(
            values["power_w"],
            phases,
            values.get("frequency_hz"),
            values.get("energy_import_wh"),
        )


def _unpack(raw: Sequence[int], type_: str, word_order: str) -> float:
    words = list(reversed(raw)) if word_order == "little" else list(raw)
    packed = struct.pack(f">{len(words)}H", *words)
    value: float = struct.unpack(_TYPE_STRUCT[type_], packed)[0]
    return float(value)


def _blocks(regmap: Mapping[str, RegisterSettings]) -> tuple[_Block, ...]:
    """As few reads as cover every mapped register (each at most 125 registers)."""
    out: list[_Block] = []
    for function in ("holding", "input"):
        spans = sorted(
            (r.address, r.address + _TYPE_REGS[r.type])
            for r in regmap.values()
            if r.function == function
        )
        start = end = -1
        for lo, hi in spans:
            if start >= 0 and hi - start <= _MAX_READ_REGS:
                end = max(end, hi)
                continue
            if start >= 0:
                out.append(_Block(function, start, end - start))
            start, end = lo, hi
        if start >= 0:
            out.append(_Block(function, start, end - start))
    return tuple(out)


def _slice(
    blocks: Sequence[_Block], data: Sequence[Sequence[int]], reg: RegisterSettings
) -> Sequence[int]:
    n = _TYPE_REGS[reg.type]
    for block, regs in zip(blocks, data, strict=True):
        if (
            block.function == reg.function
            and block.address <= reg.address < block.address + block.count
        ):
            o = reg.address - block.address
            return regs[o : o + n]
    raise AssertionError(f"register {reg.address} in no block")  # _blocks covers every one


class MeterDriver:
    """One meter: lazy connection, SunSpec discovery or a map, checked readings."""

    def __init__(
        self,
        cfg: MeterSettings,
        max_power_w: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.max_power_w = max_power_w
        self._clock = clock
        self._client: AsyncModbusTcpClient | None = None
        self._layout: _SunSpecLayout | _MapLayout | None = (
            _MapLayout(cfg.map) if cfg.kind == "map" and cfg.map is not None else None
        )
        self._last_regs: tuple[int, ...] | None = None
        self._lost = asyncio.Event()  # set when the current connection closes
        # One read at a time (the sweep and a fast guard may both ask): reads share
        # one connection, the discovered layout and the frozen count.
        self._lock = asyncio.Lock()
        self._same_reads = 0

    @property
    def layout(self) -> str | None:
        """What the driver reads ("SunSpec model 203 at 40002", ...); None before discovery."""
        return None if self._layout is None else self._layout.describe()

    def _error(self, kind: MeterErrorKind, reason: str) -> MeterError:
        return MeterError(self.cfg.id, kind, reason)

    async def read(self) -> MeterReading:
        """Read power and phases (W), frequency (Hz), imported energy (Wh); MeterError if not."""
        async with self._lock:
            return await self._read()

    async def _read(self) -> MeterReading:
        if self._layout is None:
            self._layout = await self._discover()
        layout = self._layout
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                client = await self._connected()
                data = [await self._request(client, b) for b in layout.blocks]
        except TimeoutError as e:
            self._drop()
            raise self._error(
                "timeout", f"no answer within timeout_s = {self.cfg.timeout_s:g} s"
            ) from e
        except _Refused as e:
            # The registers are not there (any more): a wrong map, or a meter that changed.
            if isinstance(layout, _SunSpecLayout):
                self._layout = None
            raise self._error("map", f"{layout.describe()}: {e}") from e
        now = self._clock()
        try:
            if isinstance(layout, _SunSpecLayout):
                values = layout.decode(data[0])
            else:
                values = layout.decode_blocks(data)
            self._check(values)
        except _Garbage as e:
            if e.kind == "map":
                self._layout = None
            raise self._error(e.kind, e.reason) from None
        self._check_frozen(tuple(r for block in data for r in block))
        return MeterReading(
            time_s=now,
            power_w=values.power_w,
            phase_w=values.phase_w,
            frequency_hz=values.frequency_hz,
            energy_import_wh=values.energy_import_wh,
        )

    def _check(self, v: _Values) -> None:
        """Refuse values the meter cannot really be seeing."""
        limit = self.max_power_w
        where = "check the scale factor" if self.cfg.kind == "sunspec" else "check the map"
        for name, w in (
            ("power", v.power_w),
            *((f"phase {i + 1}", p) for i, p in enumerate(v.phase_w)),
        ):
            if not math.isfinite(w) or abs(w) > limit:
                raise _Garbage(
                    "garbage",
                    f"{name} {w:g} W is beyond max_power_w = {limit:g} W ({where})",
                )
        if self.cfg.import_only and v.power_w < -NEGATIVE_NOISE_FRAC * limit:
            raise _Garbage(
                "garbage",
                f"power {v.power_w:g} W is negative on an import-only connection "
                "(import_only = true; a sign or map error, or set import_only = false)",
            )
        if len(v.phase_w) >= 2:
            total = sum(v.phase_w)
            if abs(total - v.power_w) > PHASE_SUM_TOLERANCE_FRAC * limit:
                raise _Garbage(
                    "garbage",
                    f"phases add up to {total:g} W but the total is {v.power_w:g} W ({where})",
                )
        lo, hi = FREQUENCY_PLAUSIBLE_HZ
        if v.frequency_hz is not None and not lo <= v.frequency_hz <= hi:
            raise _Garbage(
                "garbage",
                f"frequency {v.frequency_hz:g} Hz is outside {lo:g}-{hi:g} Hz ({where})",
            )
        e = v.energy_import_wh
        if e is not None and (not math.isfinite(e) or e < 0):
            raise _Garbage("garbage", f"imported energy {e:g} Wh is not a meter count ({where})")

    def _check_frozen(self, regs: tuple[int, ...]) -> None:
        # A live meter's registers move (noise in the last digit, the energy count):
        # the very same answer read after read is a meter whose front end has hung.
        if regs == self._last_regs:
            self._same_reads += 1
        else:
            self._last_regs, self._same_reads = regs, 1
        if self._same_reads >= self.cfg.frozen_after_reads:
            raise self._error(
                "frozen",
                f"the same answer {self._same_reads} times in a row "
                f"(frozen_after_reads = {self.cfg.frozen_after_reads})",
            )

    async def _discover(self) -> _SunSpecLayout | _MapLayout:
        """Find the SunSpec marker, then the first meter model in the model chain."""
        bases = (self.cfg.sunspec_base,) if self.cfg.sunspec_base is not None else SUNSPEC_BASES
        base: int | None = None
        for candidate in bases:
            try:
                marker = await self._discovery_request(_Block("holding", candidate, 2))
            except _Refused:
                continue
            if tuple(marker) == _SUNS:
                base = candidate
                break
        if base is None:
            tried = ", ".join(str(b) for b in bases)
            raise self._error(
                "map",
                f"no SunSpec marker 'SunS' at {tried}; expected a SunSpec meter "
                "(or set kind = 'map' with a register map)",
            )
        address, seen = base + 2, []
        for _ in range(_MAX_MODELS):
            try:
                model_id, length = await self._discovery_request(_Block("holding", address, 2))
            except _Refused:
                break
            if model_id == _END_MODEL:
                break
            seen.append(model_id)
            if model_id in INT_METER_MODELS or model_id in FLOAT_METER_MODELS:
                return _SunSpecLayout(model_id, address)
            address += 2 + length
        raise self._error(
            "map",
            f"no meter model (201-204, 211-214) in the SunSpec chain at {base}; "
            f"found models {seen}",
        )

    async def _discovery_request(self, block: _Block) -> list[int]:
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                return await self._request(await self._connected(), block)
        except TimeoutError as e:
            self._drop()
            raise self._error(
                "timeout",
                f"no answer to SunSpec discovery at {block.address} "
                f"within timeout_s = {self.cfg.timeout_s:g} s",
            ) from e

    async def _connected(self) -> AsyncModbusTcpClient:
        if self._client is not None and self._client.connected:
            return self._client
        self._drop()
        # No retries and no automatic reconnection inside pymodbus: each read is
        # one try under our own deadline, and the next read reconnects.
        lost = asyncio.Event()
        client = AsyncModbusTcpClient(
            self.cfg.address,
            port=self.cfg.port,
            timeout=self.cfg.timeout_s * 2,
            retries=0,
            reconnect_delay=0,
            trace_connect=lambda up: None if up else lost.set(),
        )
        self._lost = lost
        try:
            ok = await client.connect()
        except (ModbusException, OSError) as e:
            client.close()
            raise self._unreachable(e) from e
        if not ok:
            client.close()
            raise self._error(
                "unreachable", f"no Modbus TCP connection to {self.cfg.address}:{self.cfg.port}"
            )
        self._client = client
        return client

    def _unreachable(self, e: BaseException) -> MeterError:
        return self._error(
            "unreachable", f"{self.cfg.address}:{self.cfg.port}: {type(e).__name__}: {e}"
        )

    async def _request(self, client: AsyncModbusTcpClient, block: _Block) -> list[int]:
        call = (
            client.read_holding_registers
            if block.function == "holding"
            else client.read_input_registers
        )
        # pymodbus leaves a request whose connection closes waiting for its timeout;
        # a meter that hung up is unreachable now, not timeout_s later.
        request = asyncio.ensure_future(
            call(block.address, count=block.count, device_id=self.cfg.unit_id)
        )
        hangup = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait((request, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            hung_up = not request.done()
            if hung_up:
                request.cancel()
        if hung_up:
            self._drop()
            raise self._error(
                "unreachable", f"{self.cfg.address}:{self.cfg.port} closed the connection"
            )
        try:
            rr = request.result()
        except (ModbusException, OSError) as e:
            self._drop()
            raise self._unreachable(e) from e
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            raise _Refused(
                f"{block.function} registers {block.address}-{block.address + block.count - 1} "
                f"refused (Modbus exception {code})"
            )
        regs = list(rr.registers)
        if len(regs) != block.count:
            raise self._error(
                "garbage",
                f"{len(regs)} registers from {block.address}, expected {block.count}",
            )
        return regs

    def _drop(self) -> None:
        # A connection that failed or timed out mid-request may deliver a late answer
        # to the next request: start over with a fresh one.
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close(self) -> None:
        """Close the connection (the next read opens a new one)."""
        self._drop()
        await asyncio.sleep(0)


def meter_driver(cfg: MeterSettings, clock: Callable[[], float] = time.monotonic) -> MeterDriver:
    """The driver for a configured meter (``max_power_w`` must be set, as the config does)."""
    if cfg.max_power_w is None:
        raise ValueError(f"meter {cfg.id}: max_power_w is unset; the config fills it in")
    if cfg.kind == "map" and not cfg.map:
        raise ValueError(f"meter {cfg.id}: kind = 'map' without a map")
    return MeterDriver(cfg, cfg.max_power_w, clock)
