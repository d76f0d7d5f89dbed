"""A simulated site meter: a pymodbus Modbus TCP server on loopback reading the site's truth.

It serves, as holding registers (function codes 3 and 4 read the same), either
a SunSpec map (the "SunS" marker at ``base``, common model 1, meter model 203
with integers and scale factors or 213 with floats, the end model), or, with
``model="map"``, the plain layout of ``SIM_MAP`` for register-map tests. Values
come from ``truth()`` on every request, with a little seeded measurement noise
(a real meter's last digit moves, which is what tells it from a frozen one).

Faults, settable while it runs (``await meter.set_fault(name, **options)``):

- ``unreachable``: ``mode="refuse"`` (default) closes the listener and every
  connection; ``mode="silent"`` keeps them and never answers (timeouts).
- ``frozen``: keeps serving the last values.
- ``garbage``: ``what="not_implemented"`` (W = 0x8000, or NaN for a float
  model, the default), ``"nan"`` (NaN; 0x8000 on an integer model),
  ``"scale"`` (a scale factor 1000 times too large), ``"scale_low"`` (1000
  times too small: a plausible small load, which only a comparison with the
  devices' own reports can tell), ``"negative"`` (import served as export).
- ``frequency_dip``: ``hz`` (default 59.5) for ``duration_s`` (default 1 s).
- ``clear``: all of the above off, the listener back if it was closed.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

__all__ = ["METER_FAULTS", "SIM_MAP", "MeterTruth", "SimMeter", "energy_counter"]

METER_FAULTS = ("unreachable", "frozen", "garbage", "frequency_dip", "clear")
GARBAGE_KINDS = ("not_implemented", "nan", "scale", "scale_low", "negative")
# How much a wrong scale factor skews the served power: 10 ** 3 up, or down.
_SCALE_SHIFT = {"scale": 3, "scale_low": -3}
SUNS = (0x5375, 0x6E53)  # "SunS"
NOT_IMPLEMENTED_INT16 = 0x8000
NAN_REGS = (0x7FC0, 0x0000)  # float32 quiet NaN, big-endian words

# The plain (non-SunSpec) layout served with model="map": quantity -> register
# description in the shape of the agent's [[meters]] map entries. Integers in
# little-endian word order (low word first), as many Modbus meters do.
SIM_MAP: dict[str, dict[str, Any]] = {
    "power_w": {"address": 1000, "type": "int32", "scale": 0.1, "word_order": "little"},
    "phase_a_w": {"address": 1002, "type": "int32", "scale": 0.1, "word_order": "little"},
    "phase_b_w": {"address": 1004, "type": "int32", "scale": 0.1, "word_order": "little"},
    "phase_c_w": {"address": 1006, "type": "int32", "scale": 0.1, "word_order": "little"},
    "frequency_hz": {"address": 1008, "type": "uint16", "scale": 0.01, "word_order": "big"},
    "energy_import_wh": {"address": 1009, "type": "uint32", "scale": 1.0, "word_order": "little"},
}
_MAP_BASE, _MAP_LEN = 1000, 11


@dataclass(frozen=True, slots=True)
class MeterTruth:
    """What the meter would read if it were perfect."""

    power_w: float
    phase_w: tuple[float, ...]
    frequency_hz: float
    energy_wh: float


def energy_counter(
    power_w: Callable[[float], float],
    clock: Callable[[], float] = time.monotonic,
    *,
    phases: int = 3,
    frequency_hz: float = 60.0,
    start_wh: float = 1_000_000.0,
) -> Callable[[], MeterTruth]:
    """A truth callback for ``power_w(now)``: split evenly over phases, energy integrated."""
    state = {"t": clock(), "wh": start_wh}

    def truth() -> MeterTruth:
        now = clock()
        p = power_w(now)
        # Import only: a site that exported would count it on another register.
        state["wh"] += max(0.0, p) * max(0.0, now - state["t"]) / 3600.0
        state["t"] = now
        return MeterTruth(p, tuple(p / phases for _ in range(phases)), frequency_hz, state["wh"])

    return truth


@functools.cache
def _offsets(model_id: int) -> tuple[dict[str, int], int]:
    """Point name -> offset from the model's ID register, and the model's length L."""
    path = importlib.resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    points = json.loads(path.read_text(encoding="utf-8"))["group"]["points"]
    out, offset = {}, 0
    for p in points:
        out[p["name"]] = offset
        offset += int(p["size"])
    return out, offset - 2


def _text_regs(text: str, n_regs: int) -> list[int]:
    raw = text.encode("ascii")[: 2 * n_regs].ljust(2 * n_regs, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def _s16(v: int) -> int:
    return v & 0xFFFF


def _f32(v: float) -> tuple[int, int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", v))
    return hi, lo


def _u32_little(v: int) -> tuple[int, int]:
    v &= 0xFFFFFFFF
    return v & 0xFFFF, v >> 16


class SimMeter:
    """A Modbus TCP meter on ``address:port`` serving ``truth()``."""

    def __init__(
        self,
        truth: Callable[[], MeterTruth],
        address: str = "127.0.0.1",
        port: int = 502,
        unit_id: int = 1,
        *,
        model: int | Literal["map"] = 203,
        base: int = 40000,
        noise_frac: float = 0.0005,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if model not in (203, 213, "map"):
            raise ValueError(f"model {model!r}: expected 203, 213 or 'map'")
        self.truth = truth
        self.address = address
        self.port = port
        self.unit_id = unit_id
        self.model = model
        self.base = base
        self.noise_frac = noise_frac
        self._rng = random.Random(seed)
        self._clock = clock
        self._server: ModbusTcpServer | None = None
        self._regs = self._initial_registers()
        self._start = _MAP_BASE if model == "map" else base
        self._device = SimDevice(
            id=unit_id,
            simdata=[
                SimData(
                    self._start, values=list(self._regs), datatype=DataType.REGISTERS, readonly=True
                )
            ],
            action=self._on_request,
        )
        self.fault: str | None = None
        self.fault_options: dict[str, Any] = {}
        self._dip: tuple[float, float] | None = None  # (hz, until_s)
        self._answering = asyncio.Event()
        self._answering.set()
        self.requests = 0

    @property
    def meter_offset(self) -> int:
        """Registers from ``base`` to the meter model's ID register (SunSpec only)."""
        return 2 + 2 + _offsets(1)[1]

    def _initial_registers(self) -> list[int]:
        if self.model == "map":
            return [0] * _MAP_LEN
        common = [1, _offsets(1)[1]]
        common += _text_regs("siteagent", 16) + _text_regs("sim-meter", 16)
        common += _text_regs("", 8) + _text_regs("1.0", 8) + _text_regs("SIM-0001", 16)
        common += [self.unit_id, 0]
        _, length = _offsets(self.model)
        meter = [self.model, length] + [0] * length
        return [*SUNS, *common, *meter, 0xFFFF, 0]

    async def start(self) -> None:
        """Listen on address:port (the server answers from now on)."""
        server = ModbusTcpServer(self._device, address=(self.address, self.port))
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        """Close the listener and every connection."""
        self._answering.set()  # release silent requests, so their tasks end
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    async def set_fault(self, fault: str, **options: Any) -> None:
        """Inject a fault (see the module docstring) or ``clear`` them."""
        if fault not in METER_FAULTS:
            raise ValueError(f"unknown meter fault {fault!r}; expected one of {METER_FAULTS}")
        if fault == "clear":
            self.fault, self.fault_options, self._dip = None, {}, None
            self._answering.set()
            if self._server is None:
                await self.start()
            return
        if fault == "frequency_dip":
            hz = float(options.get("hz", 59.5))
            self._dip = (hz, self._clock() + float(options.get("duration_s", 1.0)))
            return
        if fault == "garbage" and options.get("what", "not_implemented") not in GARBAGE_KINDS:
            raise ValueError(
                f"garbage what={options.get('what')!r}; expected one of {GARBAGE_KINDS}"
            )
        self.fault, self.fault_options = fault, dict(options)
        if fault == "unreachable":
            if options.get("mode", "refuse") == "silent":
                self._answering.clear()
            else:
                server, self._server = self._server, None
                if server is not None:
                    await server.shutdown()  # type: ignore[no-untyped-call]

    async def _on_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this on each access: refresh the registers from the truth."""
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # a meter is read-only
        await self._answering.wait()
        self.requests += 1
        if self.fault != "frozen":
            self._fill(registers)
        return None

    def _frequency_hz(self, truth_hz: float) -> float:
        if self._dip is not None:
            hz, until_s = self._dip
            if self._clock() < until_s:
                return hz
            self._dip = None
        return truth_hz

    def _measured(self) -> _Measured:
        t = self.truth()
        n = self.noise_frac
        phases = tuple(p * (1.0 + self._rng.uniform(-n, n)) for p in t.phase_w)
        hz = self._frequency_hz(t.frequency_hz) + self._rng.uniform(-0.004, 0.004)
        power = sum(phases) if phases else t.power_w * (1.0 + self._rng.uniform(-n, n))
        garbage = (
            self.fault_options.get("what", "not_implemented") if self.fault == "garbage" else None
        )
        if garbage == "negative":
            power, phases = -power, tuple(-p for p in phases)
        return _Measured(power, phases, hz, t.energy_wh, garbage)

    def _fill(self, regs: list[int]) -> None:
        m = self._measured()
        if self.model == "map":
            _fill_map(regs, m)
            return
        at = self.base + self.meter_offset - self._start
        offsets, _ = _offsets(int(self.model))
        fill = _fill_float if self.model == 213 else _fill_int
        fill(regs, at, offsets, m)


@dataclass(frozen=True, slots=True)
class _Measured:
    """What the meter measured this request, and the garbage fault to serve it with."""

    power_w: float
    phase_w: tuple[float, ...]
    frequency_hz: float
    energy_wh: float
    garbage: str | None


def _fill_int(regs: list[int], at: int, o: dict[str, int], m: _Measured) -> None:
    """Model 203: int16 values with scale factors; ``at`` is the model's ID register."""
    # The smallest power-of-ten scale that fits the largest value in an int16.
    biggest = max([abs(m.power_w), *(abs(p) for p in m.phase_w), 1.0])
    sf = max(-1, math.ceil(math.log10(biggest / 32000.0)))
    scale = 10.0**sf
    regs[at + o["W"]] = _s16(round(m.power_w / scale))
    for name, p in zip(("WphA", "WphB", "WphC"), m.phase_w, strict=False):
        regs[at + o[name]] = _s16(round(p / scale))
    regs[at + o["W_SF"]] = _s16(sf + _SCALE_SHIFT.get(m.garbage or "", 0))
    if m.garbage in ("not_implemented", "nan"):
        regs[at + o["W"]] = NOT_IMPLEMENTED_INT16
    regs[at + o["Hz"]] = _s16(round(m.frequency_hz * 100))
    regs[at + o["Hz_SF"]] = _s16(-2)
    wh = round(m.energy_wh)
    regs[at + o["TotWhImp"]], regs[at + o["TotWhImp"] + 1] = wh >> 16 & 0xFFFF, wh & 0xFFFF
    regs[at + o["TotWh_SF"]] = 0


def _fill_float(regs: list[int], at: int, o: dict[str, int], m: _Measured) -> None:
    """Model 213: float32 values, NaN where not implemented."""
    k = 10.0 ** _SCALE_SHIFT.get(m.garbage or "", 0)
    nan = m.garbage in ("not_implemented", "nan")
    regs[at + o["W"]], regs[at + o["W"] + 1] = NAN_REGS if nan else _f32(m.power_w * k)
    for name, p in zip(("WphA", "WphB", "WphC"), m.phase_w, strict=False):
        regs[at + o[name]], regs[at + o[name] + 1] = _f32(p * k)
    regs[at + o["Hz"]], regs[at + o["Hz"] + 1] = _f32(m.frequency_hz)
    regs[at + o["TotWhImp"]], regs[at + o["TotWhImp"] + 1] = _f32(m.energy_wh)


def _fill_map(regs: list[int], m: _Measured) -> None:
    """``SIM_MAP``: int32 deciwatts and uint32 Wh low word first, uint16 centihertz."""
    k = 10.0 ** _SCALE_SHIFT.get(m.garbage or "", 0)
    regs[0], regs[1] = _u32_little(round(m.power_w * k * 10))
    if m.garbage in ("not_implemented", "nan"):
        regs[0], regs[1] = 0x0000, 0x8000  # int32 minimum: the usual "no value"
    for i, p in enumerate(m.phase_w[:3]):
        regs[2 + 2 * i], regs[3 + 2 * i] = _u32_little(round(p * k * 10))
    regs[8] = round(m.frequency_hz * 100) & 0xFFFF
    regs[9], regs[10] = _u32_little(round(m.energy_wh))
