"""The OpenADR 2.0b VEN against openleadr's own VTN on loopback (127.6.x.x): events become
caps in the book, the simulated site complies, cancels end them, restarts keep them, a
misbehaving or unverified VTN changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from oadr_vtn import (
    HOST,
    Proxy,
    Site,
    Vtn,
    compliance_run,
    config,
    free_port,
    make_ca,
    make_leaf,
    until,
)
from openleadr import OpenADRClient

from siteagent.agent.api.events import GridEvent
from siteagent.agent.config import ConfigError, parse_config
from siteagent.agent.control.alarms import VTN_UNREACHABLE
from siteagent.agent.grid.openadr import Unsupported, interval_caps, signal_target_w
from siteagent.agent.ops.metrics import families, render_text


@pytest.fixture
async def vtn() -> AsyncIterator[Vtn]:
    v = await Vtn(HOST).start()
    try:
        yield v
    finally:
        await v.stop()


def entry(site: Site, event_id: str) -> GridEvent | None:
    return site.book.get(event_id)


# -- signals to caps (no network) ---------------------------------------------------------


def _signal(name: str, kind: str, unit: tuple[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"signal_name": name, "signal_type": kind}
    if unit is not None:
        out["measurement"] = {"name": "powerReal", "unit": unit[0], "scale": unit[1]}
    return out


@pytest.mark.parametrize(
    ("signal", "payload", "expected_w"),
    [
        (_signal("SIMPLE", "level"), 0, None),  # level 0: no cap
        (_signal("SIMPLE", "level"), 1, 9_000.0),
        (_signal("SIMPLE", "level"), 3, 3_000.0),
        (_signal("LOAD_DISPATCH", "setpoint", ("W", "k")), 4.5, 4_500.0),
        (_signal("LOAD_DISPATCH", "setpoint", ("W", "M")), 0.002, 2_000.0),
        (_signal("LOAD_DISPATCH", "setpoint", ("W", "none")), 700, 700.0),
        (_signal("LOAD_DISPATCH", "setpoint", ("kW", "none")), 3, 3_000.0),
        (_signal("LOAD_DISPATCH", "delta", ("W", "k")), -2, 8_000.0),  # from 10 kW now
        (_signal("LOAD_CONTROL", "x-loadControlCapacity"), 0.25, 25_000.0),  # of the cap
        (_signal("LOAD_CONTROL", "x-loadControlPercentOffset"), -30, 7_000.0),
        (_signal("LOAD_CONTROL", "x-loadControlSetpoint", ("W", "k")), 5, 5_000.0),
    ],
)
def test_each_signal_becomes_a_cap_in_watts(
    signal: dict[str, Any], payload: float, expected_w: float | None
) -> None:
    got = signal_target_w(
        signal,
        payload,
        simple_levels_w=[9_000, 6_000, 3_000],
        site_cap_w=100_000,
        site_power_w=10_000,
    )
    assert got == (None if expected_w is None else pytest.approx(expected_w))


@pytest.mark.parametrize(
    "signal",
    [
        _signal("LOAD_DISPATCH", "setpoint"),  # no itemBase: unknown units, not guessed
        _signal("LOAD_DISPATCH", "setpoint", ("Wh", "k")),  # energy, not power
        _signal("LOAD_DISPATCH", "multiplier", ("W", "k")),
        _signal("ELECTRICITY_PRICE", "price"),
    ],
)
def test_a_signal_the_ven_cannot_read_is_unsupported(signal: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        signal_target_w(signal, 1.0, simple_levels_w=[1, 2, 3], site_cap_w=1, site_power_w=1)


def test_an_event_with_one_readable_signal_keeps_it_and_names_its_intervals() -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 8, 14, 21, tzinfo=UTC)
    intervals = [
        {"dtstart": t0, "duration": timedelta(minutes=30), "signal_payload": 2.0},
        {
            "dtstart": t0 + timedelta(minutes=30),
            "duration": timedelta(minutes=30),
            "signal_payload": 0.0,
        },
    ]
    event = {
        "event_signals": [
            {**_signal("ELECTRICITY_PRICE", "price"), "intervals": intervals},
            {**_signal("SIMPLE", "level"), "intervals": intervals},
        ]
    }
    caps = interval_caps(event, simple_levels_w=[9_000, 6_000, 3_000], site_cap_w=1, site_power_w=1)
    # The SIMPLE signal's first interval (level 2); its level-0 interval sets no cap.
    assert [(c.suffix, c.start_unix_s, c.duration_s, c.target_w) for c in caps] == [
        (":0", t0.timestamp(), 1800.0, 6_000.0)
    ]


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("openadr", "named"),
    [
        ({"vtn_url": "http://vtn.example.net/OpenADR2/Simple/2.0b"}, "https://"),
        (
            {"vtn_url": "https://vtn.example.net/x", "cert": "/c.pem", "key": "/k.pem"},
            "ca_file=None",
        ),
        ({"vtn_url": "https://10.1.2.3/x", "ca_file": "/ca.pem"}, "cert=None"),
        ({"vtn_url": "http://127.6.0.1:8080/x", "cert": "/c.pem"}, "key=None"),
    ],
)
def test_off_loopback_the_vtn_must_be_verified(openadr: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": {"cap_w": 1000}, "openadr": {"ven_name": "v", **openadr}})
    (problem,) = info.value.problems
    assert problem.path == "openadr"
    assert named in str(problem)
    assert "ca_file" in problem.expected or "both" in problem.expected


def test_on_loopback_plain_http_is_allowed_and_levels_must_be_finite() -> None:
    cfg = parse_config(
        {"site": {"cap_w": 1000}, "openadr": {"vtn_url": "http://127.6.0.1:1/x", "ven_name": "v"}}
    )
    assert cfg.openadr is not None and cfg.openadr.opt_out_when == "floor"
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "site": {"cap_w": 1000},
                "openadr": {
                    "vtn_url": "http://127.6.0.1:1/x",
                    "ven_name": "v",
                    "simple_levels_w": [float("inf"), 0, 0],
                },
            }
        )
    assert [p.path for p in info.value.problems] == ["openadr.simple_levels_w[0]"]


# -- against openleadr's VTN ------------------------------------------------------------------


async def test_the_ven_registers_and_simple_and_dispatch_events_become_caps(
    vtn: Vtn, tmp_path: Path
) -> None:
    site = await Site.open(config(tmp_path, vtn.url))
    try:
        await until("registered", lambda: site.ven.registered)
        start = round(time.time()) + 120.0
        vtn.add("ev-simple", "SIMPLE", "level", [(start, 600, 2)])
        vtn.add(
            "ev-dispatch",
            "LOAD_DISPATCH",
            "setpoint",
            [(start, 300, 4.5), (start + 300, 300, 3.0)],
            unit=("W", "k"),
        )
        await until(
            "both events in the book",
            lambda: entry(site, "openadr:ev-simple") and entry(site, "openadr:ev-dispatch:1"),
        )
        simple = entry(site, "openadr:ev-simple")
        first, second = entry(site, "openadr:ev-dispatch:0"), entry(site, "openadr:ev-dispatch:1")
        assert simple is not None and first is not None and second is not None
        assert (simple.source, simple.start_unix_s, simple.duration_s, simple.target_w) == (
            "openadr:ev-simple",
            start,
            600.0,
            6_000.0,
        )
        assert (first.start_unix_s, first.duration_s, first.target_w) == (start, 300.0, 4_500.0)
        assert (second.start_unix_s, second.target_w) == (start + 300, 3_000.0)
        assert simple.opt == first.opt == "in"
        # In force at their times, lowest first; nothing before the start.
        assert site.book.in_force(start - 1) == {}
        assert site.book.in_force(start + 1) == {
            "openadr:ev-simple": (6_000.0, "site"),
            "openadr:ev-dispatch": (4_500.0, "site"),
        }
        assert site.book.in_force(start + 301)["openadr:ev-dispatch"] == (3_000.0, "site")
        await until("the VTN heard both opt-ins", lambda: len(vtn.opts) == 2)
        assert vtn.opts == {"ev-simple": "optIn", "ev-dispatch": "optIn"}
        # Audited under the VEN's name.
        actions = [(r.actor, r.action) for r in site.runtime.store.audit(50)]
        assert ("openadr", "event add") in actions
        text = render_text(families(site.agent)).decode()
        assert "siteagent_openadr_registered 1.0" in text
        assert 'siteagent_openadr_opt_answers_total{opt="in"} 2.0' in text
    finally:
        await site.close()


async def test_the_vtn_cancels_and_the_cap_ends(vtn: Vtn, tmp_path: Path) -> None:
    site = await Site.open(config(tmp_path, vtn.url))
    try:
        now = time.time()
        vtn.add("ev-1", "SIMPLE", "level", [(now - 5, 600, 3)])
        await until("in force", lambda: "openadr:ev-1" in site.book.in_force(time.time()))
        assert site.agent.limits().cap_source == "openadr:ev-1"
        assert site.agent.limits().effective_cap_w == 3_000.0
        vtn.cancel("ev-1")
        await until("cancelled", lambda: site.book.in_force(time.time()) == {})
        held = entry(site, "openadr:ev-1")
        assert held is not None and held.cancelled_unix_s is not None
        assert site.agent.limits().cap_source == "site"
    finally:
        await site.close()


async def test_a_modified_event_changes_its_caps_and_one_cancelled_here_is_refused(
    vtn: Vtn, tmp_path: Path
) -> None:
    site = await Site.open(config(tmp_path, vtn.url))
    try:
        start = round(time.time()) + 120.0
        vtn.add(
            "ev-mod",
            "LOAD_DISPATCH",
            "setpoint",
            [(start, 300, 4.5), (start + 300, 300, 3.0)],
            unit=("W", "k"),
        )
        vtn.add("ev-here", "SIMPLE", "level", [(start, 300, 1)])
        await until("both in the book", lambda: len(site.book.list()) == 3)
        await until("both answered", lambda: len(vtn.opts) == 2)
        # An operator cancels one here; the VTN then modifies both.
        site.book.cancel("openadr:ev-here", "operator", "not today")
        vtn.modify("ev-mod", [4.0, 2.5])
        vtn.modify("ev-here", [2])
        await until("both answered again", lambda: len(vtn.opts) == 2)
        first, second = entry(site, "openadr:ev-mod:0"), entry(site, "openadr:ev-mod:1")
        assert first is not None and second is not None
        assert (first.target_w, second.target_w) == (4_000.0, 2_500.0)
        assert first.modified_seq == second.modified_seq == 1
        assert (first.start_unix_s, second.start_unix_s) == (start, start + 300)
        # The one cancelled here stays cancelled, and the VTN hears that the site is out.
        assert vtn.opts == {"ev-mod": "optIn", "ev-here": "optOut"}
        here = entry(site, "openadr:ev-here")
        assert here is not None and here.cancelled_unix_s is not None
        assert site.book.in_force(start + 1) == {"openadr:ev-mod": (4_000.0, "site")}
    finally:
        await site.close()


async def test_opt_out_when_the_target_is_below_what_cannot_be_shed(
    vtn: Vtn, tmp_path: Path
) -> None:
    # 2 kW of overhead that no plan can shed: a 1.5 kW target is one the site cannot meet.
    cfg = config(tmp_path, vtn.url, site={"overhead_w": 2_000}, opt_out_when="floor")
    site = await Site.open(cfg)
    try:
        await site.agent.tick()  # the VEN judges from what the last tick saw
        now = time.time()
        vtn.add("too-low", "LOAD_DISPATCH", "setpoint", [(now + 60, 600, 1.5)], unit=("W", "k"))
        vtn.add("fine", "LOAD_DISPATCH", "setpoint", [(now + 60, 600, 2.5)], unit=("W", "k"))
        await until("both answered", lambda: len(vtn.opts) == 2)
        assert vtn.opts == {"too-low": "optOut", "fine": "optIn"}
        low, fine = entry(site, "openadr:too-low"), entry(site, "openadr:fine")
        assert low is not None and low.opt == "out" and fine is not None and fine.opt == "in"
        # Opted out: kept and listed, never in force.
        assert site.book.in_force(now + 61) == {"openadr:fine": (2_500.0, "site")}
    finally:
        await site.close()


async def test_a_restart_in_the_middle_of_an_event_keeps_it_and_its_random_start(
    vtn: Vtn, tmp_path: Path
) -> None:
    cfg = config(tmp_path, vtn.url)
    first = await Site.open(cfg, seed=1)
    now = time.time()
    # Started 20 s ago, with a randomised start of up to 10 s: in force either way.
    vtn.add("ev-r", "SIMPLE", "level", [(now - 20, 600, 2)], startafter_s=10)
    try:
        await until("in force", lambda: "openadr:ev-r" in first.book.in_force(time.time()))
        held = entry(first, "openadr:ev-r")
        assert held is not None
        offset_s = held.start_unix_s - (now - 20)
        assert 0 < offset_s <= 10
    finally:
        await first.close()
    # Restarted while the VTN is down: the stored event is in force before any poll.
    await vtn.stop()
    second = await Site.open(cfg, seed=2)
    try:
        assert second.agent.limits().cap_source == "openadr:ev-r"
        assert second.agent.limits().effective_cap_w == 6_000.0
        # The VTN comes back and sends the event again: the VEN keeps its first roll.
        await vtn.start()
        await until("registered again", lambda: second.ven.registered)
        await until("event seen again", lambda: second.ven.events_received >= 1)
        again = entry(second, "openadr:ev-r")
        assert again is not None
        assert again.start_unix_s == held.start_unix_s and again.modified_seq == 0
        assert second.agent.limits().cap_source == "openadr:ev-r"
    finally:
        await second.close()


@contextlib.asynccontextmanager
async def behind_proxy(
    vtn: Vtn, tmp_path: Path, event_id: str
) -> AsyncIterator[tuple[Site, Proxy]]:
    """A site whose VEN reaches ``vtn`` through a proxy, registered, with one event in force."""
    proxy = Proxy(HOST, f"http://{HOST}:{vtn.port}/OpenADR2/Simple/2.0b")
    await proxy.start()
    site = await Site.open(config(tmp_path, proxy.url))
    try:
        vtn.add(event_id, "SIMPLE", "level", [(time.time() - 1, 600, 1)])
        source = f"openadr:{event_id}"
        await until("in force", lambda: source in site.book.in_force(time.time()))
        await until("registered", lambda: site.ven.registered)
        yield site, proxy
    finally:
        await site.close()
        await proxy.stop()


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The VEN's log lines that contain ``text``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "siteagent.openadr" and text in r.getMessage()
    ]


async def test_openleadr_still_reports_a_failed_request_where_the_ven_listens() -> None:
    """The fence around the one clever part: the VEN hears of a failed request from
    openleadr's client log records made in ``OpenADRClient._perform_request`` (at WARNING
    or above). If openleadr moves or drops them, this says so plainly."""
    vtn_url = f"http://{HOST}:{free_port(HOST)}/OpenADR2/Simple/2.0b"  # nothing listens
    client = OpenADRClient(ven_name="fence", vtn_url=vtn_url, show_fingerprint=False)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("openleadr")
    logger.addHandler(handler)
    try:
        assert await client.poll() == (None, {})
    finally:
        logger.removeHandler(handler)
        await client.stop()
    failed = [r for r in records if r.module == "client" and r.levelno >= logging.WARNING]
    assert failed, "openleadr no longer logs a failed request: the VEN would hear of none"
    where = {r.funcName for r in failed}
    assert where == {"_perform_request"}, (
        f"openleadr now logs a failed request from {where}, not _perform_request: "
        "update _LibraryLog in agent/grid/openadr.py"
    )


async def test_a_vtn_that_misbehaves_is_said_once_and_the_events_stay(
    vtn: Vtn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="siteagent.openadr")
    async with behind_proxy(vtn, tmp_path, "ev-m") as (site, proxy):
        failing = "does not answer well"
        # Malformed XML: one line, naming it; the event stays in force.
        proxy.mode = "garbage"
        await until("malformed said", lambda: said(caplog, failing))
        polls = site.ven.events_received
        await asyncio.sleep(3 * 1.0 + 0.5)  # three more polls, each answered with garbage
        assert len(said(caplog, failing)) == 1
        assert "XML" in said(caplog, failing)[0]
        assert site.ven.events_received == polls
        assert site.agent.limits().cap_source == "openadr:ev-m"
        status = site.agent.ven_status
        assert status is not None and not status.connected
        proxy.mode = "pass"
        await until("recovery said", lambda: said(caplog, "answers again"))
        assert site.agent.ven_status is not None and site.agent.ven_status.connected
        # Unreachable: said once, the alarm after alarm_after_s, the event still in force.
        await proxy.stop()
        await until("unreachable said", lambda: len(said(caplog, failing)) == 2)
        await until("alarm", lambda: site.agent.alarms.get(VTN_UNREACHABLE) is not None)
        assert site.agent.limits().cap_source == "openadr:ev-m"
        await proxy.start()
        await until("recovered", lambda: len(said(caplog, "answers again")) == 2)
        assert site.agent.alarms.get(VTN_UNREACHABLE) is None
        assert entry(site, "openadr:ev-m") is not None


async def test_a_slow_vtn_is_said_once_and_the_events_stay(
    vtn: Vtn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="siteagent.openadr")
    async with behind_proxy(vtn, tmp_path, "ev-s") as (site, proxy):
        # Past openleadr's 10 s read timeout: one line, naming it; the event stays.
        proxy.mode = "slow"
        await until("slowness said", lambda: said(caplog, "does not answer well"), timeout_s=30)
        assert "Timeout" in said(caplog, "does not answer well")[0]
        assert site.agent.limits().cap_source == "openadr:ev-s"
        proxy.mode = "pass"
        await until("recovery said", lambda: said(caplog, "answers again"), timeout_s=30)
        assert len(said(caplog, "does not answer well")) == 1
        assert site.agent.limits().cap_source == "openadr:ev-s"


async def test_a_vtn_whose_certificate_the_ca_does_not_sign_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="siteagent.openadr")
    ours = make_ca(tmp_path, "our-ca")  # the CA the VEN is configured to trust
    theirs = make_ca(tmp_path, "other-ca")  # an impostor's
    ven_cert, ven_key = make_leaf(tmp_path, "ven", ours, HOST)
    good_cert, good_key = make_leaf(tmp_path, "vtn-good", ours, HOST)
    bad_cert, bad_key = make_leaf(tmp_path, "vtn-bad", theirs, HOST)
    tls: dict[str, Any] = {"cert": str(ven_cert), "key": str(ven_key), "ca_file": str(ours[0])}

    async def events_taken(server_cert: Path, server_key: Path, name: str) -> tuple[bool, int]:
        vtn = await Vtn(HOST, tls=(server_cert, server_key, ours[0])).start()
        vtn.add("ev-tls", "SIMPLE", "level", [(time.time() - 1, 600, 3)])
        site = await Site.open(config(tmp_path / name, vtn.url, **tls))
        try:
            await until("an answer or a failure", lambda: site.ven.registered or site.ven.failure)
            await asyncio.sleep(2.0)  # polls in which an event could have come
            return site.ven.registered, len(site.book.list())
        finally:
            await site.close()
            await vtn.stop()

    # The impostor: TLS fails, nothing registered, no event taken.
    assert await events_taken(bad_cert, bad_key, "bad") == (False, 0)
    refused = [r.message for r in caplog.records if "does not answer well" in r.message]
    assert refused and "certificate" in refused[0].lower()
    # The same VTN with a certificate our CA signed: registered, the event taken.
    assert await events_taken(good_cert, good_key, "good") == (True, 1)


# -- the simulated site under an event --------------------------------------------------------


async def test_the_simulated_site_goes_under_the_event_target_and_stays_there(
    tmp_path: Path,
) -> None:
    run = await compliance_run(tmp_path)
    assert len(run.after_window) > 50
    # By the simulator's own power: under the target from start + correction window on.
    assert run.seconds_over == 0.0, max(run.after_window)
    assert max(run.after_window) <= run.target_w
    assert run.last_shed_s is not None  # the agent shed for it (it started above the target)
    # TELEMETRY_USAGE reports reached the VTN with the power the agent read (no meter: the
    # measured sum plus overhead), between the least and the most its ticks saw.
    assert run.reports_w
    low, high = min(run.tick_powers_w), max(run.tick_powers_w)
    # (A sweep between two ticks may read a little outside what the ticks saw.)
    assert all(0.95 * low <= r <= 1.05 * high for r in run.reports_w), (run.reports_w, low, high)
