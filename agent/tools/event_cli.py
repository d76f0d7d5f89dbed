"""`siteagent event add | list | cancel`: demand-response events through the API client.

Units are read as `siteagent override` reads them (``parse_power_w``,
``parse_duration_s``): ``--target 400kW --for 1h``. A start or end must carry
its UTC offset (``2026-08-14T16:00-05:00``): an event is an instant the grid
operator named, never the local time of whichever machine runs the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from siteagent.agent.tools.client import (
    EXIT_OK,
    ApiClient,
    UsageError,
    _connection_options,
    _emit,
    _table,
    cmd_client,
    format_duration,
    format_power,
    parse_duration_s,
    parse_power_w,
)


def parse_instant(text: str, flag: str) -> dt.datetime:
    """An ISO 8601 time with a UTC offset ('2026-08-14T16:00-05:00', '...Z')."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise UsageError(
            f"{flag}: cannot read {text!r} as a time; write e.g. 2026-08-14T16:00-05:00"
        ) from e
    if t.utcoffset() is None:
        raise UsageError(
            f"{flag}: found {text!r} without a UTC offset, expected one, "
            "e.g. 2026-08-14T16:00-05:00 or 2026-08-14T21:00Z"
        )
    return t


def event_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/events body of `event add`."""
    if (args.duration is None) == (args.end is None):
        raise UsageError("give how long the event lasts: --for 1h, or --end TIME (not both)")
    body: dict[str, Any] = {
        "name": args.name,
        "start": parse_instant(args.start, "--start").isoformat(),
        "target_w": parse_power_w(args.target),
    }
    if args.duration is not None:
        body["duration_s"] = parse_duration_s(args.duration)
    else:
        body["end"] = parse_instant(args.end, "--end").isoformat()
    if args.domain:
        body["domain"] = args.domain
    if args.ramp_up:
        body["ramp_up_s"] = parse_duration_s(args.ramp_up)
    if args.id:
        body["id"] = args.id
    return body


def _utc(t_unix_s: float) -> str:
    return dt.datetime.fromtimestamp(t_unix_s, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def event_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Events as an aligned table: id, state, when, how long, the cap, where from."""
    if not rows:
        return "no events"
    head = ("ID", "NAME", "STATE", "START", "FOR", "TARGET", "DOMAIN", "OPT", "SOURCE")
    lines = [
        (
            str(e["id"]),
            str(e["name"]),
            str(e["state"]),
            _utc(float(e["start_unix_s"])),
            format_duration(float(e["duration_s"])),
            format_power(float(e["target_w"])),
            str(e["domain"]),
            str(e["opt"]),
            str(e["source"]),
        )
        for e in rows
    ]
    return _table(head, lines)


def event_command(args: argparse.Namespace, client: ApiClient, out: TextIO) -> int:
    """Run `event add`, `event list` or `event cancel` against the agent."""
    if args.what == "list":
        rows = client.request("GET", "/v1/events", params={"all": "true" if args.all else "false"})
        _emit(args, rows, event_table, out)
        return EXIT_OK
    if args.what == "cancel":
        params = {"reason": args.reason} if args.reason else None
        e = client.request("DELETE", f"/v1/events/{args.id}", params=params)
        _emit(args, e, lambda x: f"cancelled {x['id']} ({x['description']})", out)
        return EXIT_OK
    e = client.request("POST", "/v1/events", json_body=event_body(args))
    _emit(
        args,
        e,
        lambda x: (
            f"{x['id']}: {x['description']} from {_utc(float(x['start_unix_s']))} "
            f"({x['state']}), cap source {x['cap_source']}"
        ),
        out,
    )
    return EXIT_OK


def add_event_commands(sub: Any) -> None:
    """Register `event add`, `event list` and `event cancel`."""
    ev = sub.add_parser("event", help="add, list or cancel demand-response events")
    esub = ev.add_subparsers(dest="what", required=True)
    a = esub.add_parser("add", help="add an event: --start TIME --for 1h --target 400kW --name N")
    a.add_argument("--start", required=True, help="ISO 8601 with offset: 2026-08-14T16:00-05:00")
    a.add_argument("--for", dest="duration", default=None, help="how long: 1h, 90m, 2h30m")
    a.add_argument("--end", default=None, help="or when it ends (ISO 8601 with offset)")
    a.add_argument("--target", required=True, help="the cap during the event: 400kW, 1.2MW")
    a.add_argument("--name", required=True, help="the event's name (e.g. the programme's)")
    a.add_argument("--domain", default=None, help="a domain id (default: the whole site)")
    a.add_argument("--ramp-up", default=None, help="reach the target over this before start")
    a.add_argument("--id", default=None, help="the event's id (default: a fresh one)")
    ls = esub.add_parser("list", help="events not cancelled and not over (--all: every event)")
    ls.add_argument("--all", action="store_true")
    cn = esub.add_parser("cancel", help="cancel an event by id: its cap ends now")
    cn.add_argument("id")
    cn.add_argument("--reason", default=None, help="why (goes into the audit log)")
    for p in (a, ls, cn):
        _connection_options(p)
    ev.set_defaults(func=cmd_client)
