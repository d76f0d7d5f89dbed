"""openleadr's own VTN on loopback for the VEN's tests and bench, with what it heard, a
proxy that can misbehave in front of it, and TLS certificates made on the spot."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from openleadr import OpenADRServer, objects, utils

from siteagent.agent.api.runtime import OverrideRuntime
from siteagent.agent.config import Config, parse_config
from siteagent.agent.control.devices import DeviceLink
from siteagent.agent.control.inventory import build_devices
from siteagent.agent.control.loop import Agent, TickRecord
from siteagent.agent.grid.openadr import Ven
from siteagent.agent.ops.metrics import site_power_w
from siteagent.sim.site import SimSite

PREFIX = "/OpenADR2/Simple/2.0b"
VEN_ID = "ven-site"
POLL_S = 1
SLOW_S = 11.0  # longer than openleadr's read timeout (10 s)


def free_port(host: str) -> int:
    """A port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def utc(unix_s: float) -> dt.datetime:
    """A Unix time as an aware datetime."""
    return dt.datetime.fromtimestamp(unix_s, dt.UTC)


@dataclass
class Vtn:
    """openleadr's OpenADRServer on ``host:port``; records opt answers and reports."""

    host: str
    port: int = 0
    tls: tuple[Path, Path, Path] | None = None  # server cert, key, CA of client certs
    opts: dict[str, str] = field(default_factory=dict)
    reports_w: list[float] = field(default_factory=list)
    registrations: int = 0
    server: OpenADRServer | None = None

    @property
    def url(self) -> str:
        """The VTN's URL for the VEN."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{PREFIX}"

    async def start(self) -> Vtn:
        """Listen (on the same port again after ``stop``)."""
        if not self.port:
            self.port = free_port(self.host)
        cert, key, ca = (str(p) for p in self.tls) if self.tls else (None, None, None)
        s = OpenADRServer(
            vtn_id="VTN-TEST",
            http_host=self.host,
            http_port=self.port,
            http_cert=cert,
            http_key=key,
            http_ca_file=ca,
            requested_poll_freq=dt.timedelta(seconds=POLL_S),
            show_fingerprint=False,
        )
        s.add_handler("on_create_party_registration", self._register)
        s.add_handler("on_register_report", self._offer)
        if self.server is not None:  # the events it had, as a restarted VTN keeps them
            s.events.update(self.server.events)
        self.server = s
        await s.run()
        return self

    async def stop(self) -> None:
        """Stop listening; the events stay for ``start``."""
        if self.server is not None:
            await self.server.stop()

    def _register(self, info: dict[str, Any]) -> tuple[str, str]:
        self.registrations += 1
        return VEN_ID, "reg-1"

    def _offer(
        self,
        ven_id: str,
        resource_id: str,
        measurement: str,
        unit: str,
        scale: str,
        min_sampling_interval: dt.timedelta,
        max_sampling_interval: dt.timedelta,
    ) -> Any:
        async def take(data: list[tuple[dt.datetime, float]]) -> None:
            self.reports_w.extend(v for _, v in data)

        return take, min_sampling_interval

    def _opt(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts[event_id] = opt_type

    def add(
        self,
        event_id: str,
        signal_name: str,
        signal_type: str,
        intervals: list[tuple[float, float, float]],  # (start unix s, duration s, payload)
        *,
        unit: tuple[str, str] | None = None,  # itemBase (unit, scale), e.g. ("W", "k")
        startafter_s: float | None = None,
        ramp_up_s: float | None = None,
    ) -> None:
        """Queue an event for the VEN, as a utility's VTN sends it."""
        assert self.server is not None
        start_s = min(s for s, _, _ in intervals)
        end_s = max(s + d for s, d, _ in intervals)
        measurement = None
        if unit is not None:
            measurement = objects.Measurement(
                name="powerReal",
                description="RealPower",
                unit=unit[0],
                scale=unit[1],
                power_attributes=objects.PowerAttributes(hertz=60, voltage=480, ac=True),
            )
        event = objects.Event(
            event_descriptor=objects.EventDescriptor(
                event_id=event_id,
                modification_number=0,
                market_context="oadr://test",
                event_status="far",
                created_date_time=dt.datetime.now(dt.UTC),
            ),
            event_signals=[
                objects.EventSignal(
                    intervals=[
                        objects.Interval(
                            dtstart=utc(s), duration=dt.timedelta(seconds=d), signal_payload=p
                        )
                        for s, d, p in intervals
                    ],
                    signal_name=signal_name,
                    signal_type=signal_type,
                    signal_id=f"{event_id}-signal",
                    measurement=measurement,
                )
            ],
            targets=[{"ven_id": VEN_ID}],
            active_period=None,
        )
        self.server.add_raw_event(VEN_ID, event, callback=self._opt)
        # add_raw_event derives the active period from the intervals and drops the rest:
        # set it whole, with the tolerance and ramp-up a utility's event carries.
        period = objects.ActivePeriod(
            dtstart=utc(start_s), duration=dt.timedelta(seconds=end_s - start_s)
        )
        if startafter_s is not None:
            period.tolerance = {"startafter": dt.timedelta(seconds=startafter_s)}
        if ramp_up_s is not None:
            period.ramp_up_period = dt.timedelta(seconds=ramp_up_s)
        event.active_period = period

    def modify(self, event_id: str, payloads: list[float]) -> None:
        """Change an event's interval payloads, as a VTN modifies an event (its modification
        number goes up, so the VEN's on_update_event hears it)."""
        assert self.server is not None
        event = utils.find_by(self.server.events[VEN_ID], "event_descriptor.event_id", event_id)
        for interval, payload in zip(event.event_signals[0].intervals, payloads, strict=True):
            interval.signal_payload = payload
        utils.increment_event_modification_number(event)
        self.opts.pop(event_id, None)
        self.server.event_callbacks[event_id] = (event, self._opt)
        self.server.events_updated[VEN_ID] = True

    def cancel(self, event_id: str) -> None:
        """Cancel an event (openleadr marks it and raises its modification number)."""
        assert self.server is not None
        self.server.cancel_event(VEN_ID, event_id)


class Proxy:
    """An HTTP hop in front of a VTN that passes, answers garbage, answers late (after
    openleadr's 10 s read timeout), or is gone."""

    def __init__(self, host: str, target: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.target = target
        self.mode = "pass"
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The proxy's URL for the VEN."""
        return f"http://{self.host}:{self.port}{PREFIX}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.mode == "garbage":
            return web.Response(text="<oadrPayload><unclosed", content_type="application/xml")
        if self.mode == "slow":
            await asyncio.sleep(SLOW_S)
        async with ClientSession() as s:
            url = self.target + request.path.removeprefix(PREFIX)
            async with s.post(url, data=body, headers={"content-type": "application/xml"}) as r:
                return web.Response(
                    body=await r.read(), status=r.status, content_type="application/xml"
                )

    async def start(self) -> None:
        """Listen (again)."""
        app = web.Application()
        app.router.add_post(PREFIX + "/{service}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        """Stop listening: the VTN is unreachable."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(
    directory: Path, name: str
) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA: its PEM path, key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_leaf(
    directory: Path,
    name: str,
    ca: tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate],
    host: str,
) -> tuple[Path, Path]:
    """A certificate for ``host`` (IP SAN) signed by ``ca``: its PEM path and key path."""
    _, ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def until(what: str, ok: Callable[[], object], timeout_s: float = 20.0) -> None:
    """Wait for ``ok()`` to hold (polling); fail naming ``what`` if it does not in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not ok():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.05)


# -- a site with a VEN: config, agent, book, simulated miners ------------------------------

HOST = "127.6.0.1"
SIM_BASE = "127.6.1.1"
N_MINERS = 6


def config(
    tmp_path: Path,
    vtn_url: str,
    *,
    site: dict[str, Any] | None = None,
    addresses: list[str] | None = None,
    **openadr: Any,
) -> Config:
    """A site whose VEN polls ``vtn_url``; fast telemetry and ticks; state under tmp_path."""
    data: dict[str, Any] = {
        "site": {"cap_w": 100_000, "safety_margin_w": 0, "correction_window_s": 5, **(site or {})},
        "policy": {"min_off_s": 0, "restore_ramp_w_per_s": 1_000_000},
        "telemetry": {"interval_s": 0.5, "timeout_s": 1.0, "stale_after_s": 30},
        "control": {"interval_s": 1, "actuation_timeout_s": 3, "confirm_timeout_s": 30},
        "state": {"dir": str(tmp_path / "state")},
        "openadr": {
            "vtn_url": vtn_url,
            "ven_name": "site-test",
            "report_interval_s": 1,
            "simple_levels_w": [9_000, 6_000, 3_000],
            "opt_out_when": "never",
            "alarm_after_s": 2,
            **openadr,
        },
    }
    if addresses:
        data["inventory"] = {"scan": [f"{addresses[0]}-{addresses[-1]}"], "sleep_power_w": 25}
    return parse_config(data)


class Site:
    """A real Agent and its override runtime (the event book) on one state dir, and a VEN."""

    def __init__(self, cfg: Config, agent: Agent, runtime: OverrideRuntime, ven: Ven) -> None:
        self.cfg, self.agent, self.runtime, self.ven = cfg, agent, runtime, ven
        self.book = runtime.events

    @classmethod
    async def open(
        cls,
        cfg: Config,
        links: list[DeviceLink] | None = None,
        *,
        seed: int = 1,
        on_tick: Callable[[TickRecord], None] | None = None,
    ) -> Site:
        """Open the store, restore its events into a new Agent, read the devices, start
        the VEN."""
        assert cfg.openadr is not None
        agent = Agent(cfg, links or [], on_tick=on_tick)
        runtime = OverrideRuntime.open(agent, cfg)
        runtime.start()
        if links:
            await agent.sweep()  # as `siteagent run`: the VEN starts once the site is read
        ven = Ven(agent, runtime.events, cfg.openadr, rng=random.Random(seed), check_s=0.1)
        await ven.start()
        return cls(cfg, agent, runtime, ven)

    async def close(self) -> None:
        """Stop the VEN and the agent, close the store (the events stay in it)."""
        await self.ven.stop()
        await self.agent.stop()
        await self.runtime.close()


@dataclass(frozen=True)
class Compliance:
    """One event against the simulated site: what the simulator drew, when the agent shed."""

    target_w: float
    start_unix_s: float
    window_s: float
    samples: tuple[tuple[float, float], ...]  # (unix s, the simulator's own power W)
    sheds_unix_s: tuple[float, ...]  # ticks that sent a decrease the device took
    reports_w: tuple[float, ...]  # TELEMETRY_USAGE values the VTN received
    tick_powers_w: tuple[float, ...]  # site power the agent saw at each tick

    @property
    def after_window(self) -> list[float]:
        """The simulator's power (W) from start + correction window to the end."""
        return [w for t, w in self.samples if t >= self.start_unix_s + self.window_s]

    @property
    def seconds_over(self) -> float:
        """Sampled time (s) over the target after the correction window (0.05 s samples)."""
        return 0.05 * sum(1 for w in self.after_window if w > self.target_w)

    @property
    def under_after_s(self) -> float | None:
        """From the start until the simulator's power went under the target for good (s);
        None if it was over at the end."""
        if not self.samples or self.samples[-1][1] > self.target_w:
            return None
        over = [t for t, w in self.samples if w > self.target_w]
        return max(0.0, (max(over) if over else self.start_unix_s) - self.start_unix_s)

    @property
    def last_shed_s(self) -> float | None:
        """From the start to the last shed command sent (s); None if nothing was shed."""
        return max(self.sheds_unix_s) - self.start_unix_s if self.sheds_unix_s else None


async def compliance_run(
    tmp_path: Path,
    *,
    via: str = "openadr",
    ramp_up_s: float | None = None,
    duration_s: float = 12.0,
) -> Compliance:
    """A cap of half the miners' nameplate from now + 3 s for ``duration_s``, against a real
    Agent and simulated miners on loopback: by an OpenADR event from openleadr's VTN
    (``via="openadr"``), or, as the baseline, by ``Agent.set_cap`` at the start."""
    sim = SimSite(n_miners=N_MINERS, base_address=SIM_BASE, settle_s=0.5, pause_s=0.3, wake_s=0.5)
    await sim.start()
    vtn = await Vtn(HOST).start()
    sheds: list[float] = []
    powers: list[float] = []

    def on_tick(record: TickRecord) -> None:
        powers.append(site_power_w(record))
        sent = set(record.applied)
        if any(c.is_decrease and c.device_id in sent for c in record.ordered.now):
            sheds.append(time.time())

    try:
        full_w = sum(m.nameplate_power_w for m in sim.miners)
        cfg = config(
            tmp_path, vtn.url, site={"cap_w": full_w * 2}, addresses=[m.address for m in sim.miners]
        )
        site = await Site.open(cfg, await build_devices(cfg), on_tick=on_tick)
        try:
            site.agent.start()
            await until("registered", lambda: site.ven.registered)
            target_w = 0.5 * full_w
            start = time.time() + 3.0
            if via == "openadr":
                vtn.add(
                    "ev-c",
                    "LOAD_DISPATCH",
                    "setpoint",
                    [(start, duration_s, target_w / 1000)],
                    unit=("W", "k"),
                    ramp_up_s=ramp_up_s,
                )
                await until("in the book", lambda: site.book.get("openadr:ev-c") is not None)
            samples: list[tuple[float, float]] = []
            capped = False
            while time.time() < start + duration_s:
                if via != "openadr" and not capped and time.time() >= start:
                    # The baseline's start is when the cap is set (the loop wakes late).
                    start = time.time()
                    site.agent.set_cap("baseline", target_w)
                    capped = True
                samples.append((time.time(), sim.total_power_w(time.monotonic())))
                await asyncio.sleep(0.05)
            lead_s = ramp_up_s or 0.0
            return Compliance(
                target_w=target_w,
                start_unix_s=start,
                window_s=cfg.site.correction_window_s,
                samples=tuple(samples),
                sheds_unix_s=tuple(t for t in sheds if t >= start - lead_s),
                reports_w=tuple(vtn.reports_w),
                tick_powers_w=tuple(powers),
            )
        finally:
            await site.close()
    finally:
        await vtn.stop()
        await sim.stop()
