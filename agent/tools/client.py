"""The command-line client of the API: `siteagent override ...`, `status`, `devices`,
`explain`, `audit`, `token`.

The token comes from $SITEAGENT_TOKEN or ``--token-file``; the agent's address
from ``--url``, $SITEAGENT_URL, or the ``[api]`` section of ``--config``.
Exit codes: 0 done, 1 refused by the agent, 2 bad usage, 3 agent unreachable,
4 authentication or permission failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8800"
DEFAULT_CONFIG = "/etc/siteagent/siteagent.toml"
TOKEN_ENV, URL_ENV = "SITEAGENT_TOKEN", "SITEAGENT_URL"

_POWER_UNITS = {"w": 1.0, "kw": 1e3, "mw": 1e6}
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_POWER_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmM]?[wW])?\s*$")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([smhd])")


class UsageError(Exception):
    """Bad input on the command line."""


def parse_power_w(text: str) -> float:
    """'800kW', '1.2MW', '2000W' or '2000' (W) to watts."""
    m = _POWER_RE.match(text)
    if m is None:
        raise UsageError(f"cannot read power {text!r}; write e.g. 800kW, 1.2MW or 2000W")
    return float(m.group(1)) * _POWER_UNITS[(m.group(2) or "w").lower()]


def parse_duration_s(text: str) -> float:
    """'2h', '30m', '1h30m', '90s', '1d' or a plain number of seconds to seconds."""
    t = text.strip().lower()
    try:
        return float(t)
    except ValueError:
        pass
    parts = _DURATION_RE.findall(t)
    if not parts or _DURATION_RE.sub("", t).strip():
        raise UsageError(f"cannot read duration {text!r}; write e.g. 30m, 2h, 1h30m or 90s")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Seconds as '1h59m', '4m10s', '12s'."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def format_power(power_w: float | None) -> str:
    """Watts as kW (or MW above 10 MW) with one decimal."""
    if power_w is None:
        return "-"
    if abs(power_w) >= 10e6:
        return f"{power_w / 1e6:.2f} MW"
    return f"{power_w / 1e3:.1f} kW"


# -- talking to the agent ------------------------------------------------------------


class ClientError(Exception):
    """A request that did not succeed; ``code`` is the exit code to use."""

    def __init__(self, code: int, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


def _config_url(path: str) -> tuple[str, dict[str, Any]]:
    from siteagent.agent.config import load_config

    cfg = load_config(path)
    host = cfg.api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.api.tls_cert else "http"
    return f"{scheme}://{host}:{cfg.api.port}", {}


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text("utf-8").strip()
        except OSError as e:
            raise ClientError(EXIT_USAGE, f"cannot read token file {args.token_file}: {e}") from e
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ClientError(
            EXIT_AUTH,
            f"no token: set ${TOKEN_ENV} or pass --token-file "
            "(make one with `siteagent token create NAME --scope operate`)",
        )
    return token


class ApiClient:
    """A thin, synchronous client of the override API that turns failures into ClientError."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        verify: bool | str = True,
        cert: tuple[str, str] | None = None,
        timeout_s: float = 10.0,
        transport: Any = None,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify if cert is None else _ssl_context(verify, cert),
            timeout=timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer, or ClientError with the agent's reason."""
        import httpx

        try:
            r = self._http.request(method, path, json=json_body, params=params)
        except httpx.ConnectError as e:
            raise ClientError(
                EXIT_UNREACHABLE,
                f"cannot reach the agent at {self.base_url}: {e} (is it running? "
                "check --url / [api] host and port)",
            ) from e
        except httpx.TimeoutException as e:
            raise ClientError(
                EXIT_UNREACHABLE, f"the agent at {self.base_url} did not answer in time"
            ) from e
        except httpx.TransportError as e:
            raise ClientError(EXIT_UNREACHABLE, f"talking to {self.base_url} failed: {e}") from e
        if r.status_code < 400:
            return r.json()
        try:
            detail = str(r.json().get("detail", r.text))
        except (ValueError, AttributeError):
            detail = r.text.strip() or r.reason_phrase
        if r.status_code == 401:
            raise ClientError(
                EXIT_AUTH, f"authentication failed: {detail} (check ${TOKEN_ENV} / --token-file)"
            )
        if r.status_code == 403:
            raise ClientError(EXIT_AUTH, f"not allowed: {detail}")
        if r.status_code == 429:
            raise ClientError(EXIT_AUTH, f"rate limited: {detail}")
        if r.status_code >= 500:
            raise ClientError(EXIT_REFUSED, f"the agent failed ({r.status_code}): {detail}")
        raise ClientError(EXIT_REFUSED, f"refused ({r.status_code}): {detail}", r.status_code)


def _ssl_context(verify: bool | str, cert: tuple[str, str]) -> Any:
    import ssl

    ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert[0], cert[1])
    return ctx


def client_from_args(args: argparse.Namespace) -> ApiClient:
    """A client for the agent named on the command line (or in the environment)."""
    url = args.url or os.environ.get(URL_ENV)
    if url is None and args.config:
        url, _ = _config_url(args.config)
    if url is None and Path(DEFAULT_CONFIG).exists():
        try:
            url, _ = _config_url(DEFAULT_CONFIG)
        except Exception:
            url = None
    verify: bool | str = args.cacert or True
    cert = (args.client_cert, args.client_key) if args.client_cert else None
    return ApiClient(url or DEFAULT_URL, _token(args), verify=verify, cert=cert)


# -- commands --------------------------------------------------------------------------


def _override_body(args: argparse.Namespace) -> dict[str, Any]:
    ttl_s = parse_duration_s(args.ttl)
    body: dict[str, Any] = {
        "reason": args.reason,
        "ttl_s": ttl_s,
        "idempotency_key": args.idempotency_key or f"cli-{uuid.uuid4().hex}",
    }
    if args.what == "cap":
        body.update(kind="cap", cap_w=parse_power_w(args.power))
        if args.domain:
            body["domain"] = args.domain
        if args.replaces:
            body["replaces"] = args.replaces
    elif args.what == "mode":
        body.update(kind="mode", mode=args.mode)
    elif args.what == "pin":
        body.update(kind="pin", device_id=args.device, power_w=parse_power_w(args.power_w))
    else:
        body.update(kind="exclude", device_id=args.device)
    return body


def override_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Overrides as an aligned table; ended ones say who ended them and why."""
    if not rows:
        return "no overrides"
    ended = any(o["state"] != "active" for o in rows)
    head = ("ID", "STATE", "WHAT", "ACTOR", "LEFT", "REASON", *(("ENDED",) if ended else ()))
    lines = [
        (
            str(o["id"]),
            str(o["state"]),
            str(o["description"]),
            str(o["actor"]),
            format_duration(float(o["remaining_s"])) if o["state"] == "active" else "-",
            str(o["reason"]),
            *((_ending(o),) if ended else ()),
        )
        for o in rows
    ]
    return _table(head, lines)


def _ending(o: Mapping[str, Any]) -> str:
    """'by bob: load test over' for an ended override; '-' for an active one."""
    if o["state"] == "active":
        return "-"
    by = o.get("ended_by")
    why = o.get("end_reason")
    text = f"by {by}" if by else "by ?"
    return f"{text}: {why}" if why else f"{text} (no reason recorded)"


def devices_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Devices as an aligned table: the ids `explain` takes, where and what each one is."""
    if not rows:
        return "no devices"
    head = ("ID", "KIND", "DOMAIN", "STATE", "POWER", "ADDRESS", "MODEL")

    def model(d: Mapping[str, Any]) -> str:
        return " ".join(str(x) for x in (d.get("make"), d.get("model")) if x) or "-"

    lines = [
        (
            str(d["device_id"]),
            str(d["kind"]),
            str(d["domain"]),
            str(d["state"]),
            format_power(d["power_w"]),
            str(d.get("address") or "-"),
            model(d),
        )
        for d in rows
    ]
    return _table(head, lines)


def audit_table(rows: Sequence[Mapping[str, Any]], limit: int) -> str:
    """Audit records (newest first) as an aligned table, with how to page back."""
    if not rows:
        return "no audit records"
    import datetime

    head = ("SEQ", "TIME (UTC)", "ACTOR", "CLIENT", "STATUS", "ACTION", "RESULT")
    lines = [
        (
            str(r["seq"]),
            datetime.datetime.fromtimestamp(float(r["time_unix_s"]), datetime.UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
            str(r["actor"]),
            str(r["client"]),
            str(r["status"]),
            str(r["action"]),
            str(r["result"]),
        )
        for r in rows
    ]
    text = _table(head, lines)
    if len(rows) >= limit:
        text += f"\n(older: siteagent audit --before {rows[-1]['seq']})"
    return text


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*r).rstrip() for r in (head, *rows))


def status_table(st: Mapping[str, Any]) -> str:
    """The status answer as a readable two-column table."""
    hard = format_power(st["site_cap_w"])
    cap = f"{format_power(st['effective_cap_w'])} effective (hard cap {hard}"
    if st.get("safety_margin_w"):
        cap += f", margin {format_power(st['safety_margin_w'])}"
    cap += f") from {st['cap_source']}"
    src = st.get("cap_source_override")
    if src:
        cap += (
            f": {src['description']} by {src['actor']}, "
            f"{format_duration(float(src['remaining_s']))} left ({src['reason']})"
        )
    by_state = ", ".join(f"{k} {v}" for k, v in sorted(st["devices_by_state"].items()))
    tick = st.get("last_tick_age_s")
    plan = "no tick yet"
    if st.get("plan_mode") is not None:
        plan = f"{st['plan_mode']}: {st['plan_reason']}"
        if tick is not None:
            plan += f" ({format_duration(float(tick))} ago)"
    rows = [
        ("site", f"{st['site']}"),
        (
            "power",
            f"{format_power(st['site_power_w'])} measured, "
            f"{format_power(st['worst_case_w'])} worst case",
        ),
        ("cap", cap),
        ("mining", format_power(st["mining_w"])),
        ("AI", format_power(st["ai_w"])),
        ("aux", format_power(st["aux_w"])),
        ("plan", plan),
        ("modes", ", ".join(st["modes"]) or "normal"),
        ("devices", f"{st['devices']} ({by_state or 'none'})"),
        ("overrides", f"{st['active_overrides']} active, {st['pins']} pin(s)"),
    ]
    for d in st.get("domains", []):
        lim = f"limit {format_power(d['limit_w'])}"
        if d["limit_w"] < d["configured_limit_w"]:
            lim += f" (lowered from {format_power(d['configured_limit_w'])})"
        if "worst_case_w" in d:  # an agent older than the per-domain load says only its limit
            lim = (
                f"{format_power(d['measured_w'])} measured, "
                f"{format_power(d['worst_case_w'])} worst case, {lim}"
            )
        rows.append((f"domain {d['domain_id']}", lim))
    alarms = st.get("alarms") or []
    rows.append(("alarms", "none" if not alarms else f"{len(alarms)} raised"))
    now = float(st.get("time_unix_s", 0.0))
    for a in alarms:
        since = format_duration(max(0.0, now - float(a["since_unix_s"])))
        rows.append((f"alarm {a['name']}", f"{a['reason']} (for {since})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def explain_text(device: Mapping[str, Any], plan: Mapping[str, Any] | None) -> str:
    """Why one device is where it is: its state, the plan's setpoint and reason, this tick."""

    def w(v: Any) -> str:
        return "unknown" if v is None else format_power(float(v))

    d = device
    what = " ".join(str(x) for x in (d.get("make"), d.get("model")) if x) or "model unknown"
    firmware = d.get("firmware") or "unknown"
    lines = [
        f"{d['device_id']} ({d['kind']}, domain {d['domain']}): {d['state']}",
        f"  {what}, firmware {firmware}, at {d.get('address') or 'unknown address'}",
        f"  power {w(d['power_w'])} measured, counted at {w(d['budget_w'])} worst case, "
        f"target {w(d['power_target_w'])}, nameplate {w(d['nameplate_power_w'])}",
    ]
    if d["kind"] == "miner":
        h = d.get("hashrate_ths")
        lines.append(
            f"  hashrate {'unknown' if h is None else f'{float(h):.1f} TH/s'}, "
            f"nameplate {float(d.get('nameplate_hashrate_ths') or 0.0):.1f} TH/s"
        )
    if d.get("last_error"):
        lines.append(f"  last error: {d['last_error']}")
    if d.get("override"):
        lines.append(f"  override: {d['override']}")
    if not d["controllable"]:
        lines.append("  not controllable now: counted at its worst case, never planned")
    if plan is None:
        lines.append("  no plan yet (the agent has not ticked)")
        return "\n".join(lines)
    lines.append(
        f"  plan ({plan['mode']}, {format_duration(float(plan['tick_age_s']))} ago): "
        f"{plan['reason']}; effective cap {w(plan['effective_cap_w'])} from {plan['cap_source']}"
    )
    sp = next((x for x in plan["setpoints"] if x["device_id"] == d["device_id"]), None)
    if sp is not None:
        lines.append(f"  setpoint: {sp['reason']}")
    held = [x for x in plan["deferred"] if x["device_id"] == d["device_id"]]
    if d["device_id"] in plan["sent"]:
        lines.append("  this tick: the change was sent")
    elif d["device_id"] in plan["failed"]:
        lines.append("  this tick: the change failed; it is counted at its worst case")
    for x in held:
        lines.append(f"  this tick: {x['kind']} held back: {x['reason']}")
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str], out: TextIO) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2), file=out)
    else:
        print(text(data), file=out)


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        client = client_from_args(args)
    except (ClientError, UsageError) as e:
        print(f"siteagent: {e}", file=err)
        return e.code if isinstance(e, ClientError) else EXIT_USAGE
    except Exception as e:  # a config file that cannot be read, mostly
        print(f"siteagent: {e}", file=err)
        return EXIT_USAGE
    try:
        return _dispatch(args, client, out)
    except UsageError as e:
        print(f"siteagent: {e}", file=err)
        return EXIT_USAGE
    except ClientError as e:
        print(f"siteagent: {e}", file=err)
        return e.code
    finally:
        client.close()


def _dispatch(args: argparse.Namespace, client: ApiClient, out: TextIO) -> int:
    if args.command == "status":
        _emit(args, client.request("GET", "/v1/status"), status_table, out)
        return EXIT_OK
    if args.command == "devices":
        _emit(args, client.request("GET", "/v1/devices"), devices_table, out)
        return EXIT_OK
    if args.command == "event":
        from siteagent.agent.tools.event_cli import event_command

        return event_command(args, client, out)
    if args.command == "audit":
        params: dict[str, Any] = {"limit": args.limit}
        if args.before is not None:
            params["before"] = args.before
        rows = client.request("GET", "/v1/audit", params=params)
        _emit(args, rows, lambda r: audit_table(r, args.limit), out)
        return EXIT_OK
    if args.command == "explain":
        devices = client.request("GET", "/v1/devices")
        device = next((d for d in devices if d["device_id"] == args.device), None)
        if device is None:
            known = ", ".join(sorted(d["device_id"] for d in devices)[:10])
            raise ClientError(EXIT_REFUSED, f"no device {args.device!r} (some known: {known})")
        try:
            plan = client.request("GET", "/v1/plan")
        except ClientError as e:
            if e.http_status != 404:
                raise
            plan = None
        _emit(args, {"device": device, "plan": plan}, lambda x: explain_text(device, plan), out)
        return EXIT_OK
    what = args.what
    if what == "list":
        params = {"state": "all" if args.all else "active"}
        _emit(args, client.request("GET", "/v1/overrides", params=params), override_table, out)
        return EXIT_OK
    if what == "cancel":
        ov = client.request("DELETE", f"/v1/overrides/{args.id}", params={"reason": args.reason})
        _emit(args, ov, lambda o: f"cancelled {o['id']} ({o['description']})", out)
        return EXIT_OK
    if what == "mode" and args.mode == "resume":
        ended = client.request("POST", "/v1/overrides/resume", json_body={"reason": args.reason})
        _emit(
            args,
            ended,
            lambda e: "resumed: ended " + (", ".join(o["id"] for o in e) or "no mode override"),
            out,
        )
        return EXIT_OK
    if args.ttl is None:
        raise UsageError("--for is required (how long the override lasts, e.g. 2h)")
    ov = client.request("POST", "/v1/overrides", json_body=_override_body(args))
    _emit(
        args,
        ov,
        lambda o: (
            f"{o['id']}: {o['description']} until "
            f"{format_duration(float(o['remaining_s']))} from now, by {o['actor']}"
        ),
        out,
    )
    return EXIT_OK


def cmd_client(args: argparse.Namespace) -> int:
    """`siteagent override ...`, `siteagent status` and `siteagent explain`."""
    return _run(args, sys.stdout, sys.stderr)


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create a token, print it once, store only its hash."""
    from siteagent.agent.api.auth import Scope, TokenFileError, create_token, tokens_path

    path = args.tokens_file
    if path is None:
        from siteagent.agent.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_USAGE
        path = tokens_path(cfg.api, cfg.state.dir)
    try:
        token = create_token(path, args.name, Scope.parse(args.scope))
    except (ValueError, OSError, TokenFileError) as e:
        print(f"siteagent: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    print(
        f"token {args.name!r} ({args.scope}) added to {path}; it is shown only now",
        file=sys.stderr,
    )
    return EXIT_OK


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", help=f"the agent's API (default ${URL_ENV}, --config, or {DEFAULT_URL})"
    )
    p.add_argument("--config", "-c", default=None, help="read the API address from this config")
    p.add_argument("--token-file", default=None, help=f"file holding the token (else ${TOKEN_ENV})")
    p.add_argument("--cacert", default=None, help="CA bundle to verify the agent's certificate")
    p.add_argument("--client-cert", default=None, help="client certificate (mTLS)")
    p.add_argument("--client-key", default=None, help="client certificate's key (mTLS)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def _write_options(p: argparse.ArgumentParser, *, ttl: bool = True) -> None:
    if ttl:
        p.add_argument("--for", dest="ttl", default=None, help="how long: 30m, 2h, 1h30m")
        p.add_argument("--idempotency-key", default=None, help="default: a fresh one per call")
    p.add_argument("--reason", required=True, help="why (goes into the audit log)")


def _positive_int(text: str) -> int:
    """An audit sequence number: a whole number from 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"found {text!r}, expected a whole number from 1")
    return int(text)


def _page_size(text: str) -> int:
    """Records per page: 1 to 1000, as the API allows."""
    n = _positive_int(text)
    if n > 1000:
        raise argparse.ArgumentTypeError(f"found {n}, expected at most 1000 records a page")
    return n


def add_commands(sub: Any) -> None:
    """Register `status`, `devices`, `explain`, `audit`, `override` and `token`."""
    s = sub.add_parser("status", help="the site at a glance, from the running agent")
    _connection_options(s)
    s.set_defaults(func=cmd_client)

    e = sub.add_parser("explain", help="why a device is where it is, from the running agent")
    e.add_argument("device", help="the device id (`siteagent devices` lists them)")
    _connection_options(e)
    e.set_defaults(func=cmd_client)

    dv = sub.add_parser("devices", help="every device: id, kind, domain, state, power, address")
    _connection_options(dv)
    dv.set_defaults(func=cmd_client)

    a = sub.add_parser("audit", help="the audit log of writes, newest first")
    a.add_argument("--limit", type=_page_size, default=50, help="records per page (1-1000)")
    a.add_argument(
        "--before", type=_positive_int, default=None, help="page back: records before this SEQ"
    )
    _connection_options(a)
    a.set_defaults(func=cmd_client)

    o = sub.add_parser("override", help="create, list or cancel operator overrides")
    osub = o.add_subparsers(dest="what", required=True)
    c = osub.add_parser("cap", help="lower the site (or a domain) cap: cap 800kW --for 2h")
    c.add_argument("power", help="the cap: 800kW, 1.2MW, 750000W")
    c.add_argument("--domain", default=None, help="a domain id (default: the whole site)")
    c.add_argument(
        "--replaces", nargs="+", default=None, help="lift these cap overrides (admin scope)"
    )
    _write_options(c)
    m = osub.add_parser("mode", help="monitor-only, mining-off, ai-min, or resume")
    m.add_argument("mode", choices=["monitor-only", "mining-off", "ai-min", "resume"])
    _write_options(m)
    pn = osub.add_parser("pin", help="hold a device at a level: pin DEVICE --power-w 2000")
    pn.add_argument("device")
    pn.add_argument("--power-w", required=True, help="level: 2000, 2kW; 0 sleeps a miner")
    _write_options(pn)
    ex = osub.add_parser("exclude", help="leave a device alone (maintenance)")
    ex.add_argument("device")
    _write_options(ex)
    ls = osub.add_parser("list", help="active overrides (--all: every state)")
    ls.add_argument("--all", action="store_true")
    cn = osub.add_parser("cancel", help="cancel an override by id")
    cn.add_argument("id")
    _write_options(cn, ttl=False)
    for p in (c, m, pn, ex, ls, cn):
        _connection_options(p)
    o.set_defaults(func=cmd_client)

    from siteagent.agent.tools.event_cli import add_event_commands

    add_event_commands(sub)

    t = sub.add_parser("token", help="manage API tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="create a token; prints it once, stores its hash")
    tc.add_argument("name")
    tc.add_argument("--scope", default="read", choices=["read", "operate", "admin"])
    tc.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    tc.add_argument("--tokens-file", default=None, help="default: [api] tokens_file or state dir")
    tc.set_defaults(func=cmd_token_create)
