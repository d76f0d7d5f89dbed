"""The site configuration: one TOML file, validated with pydantic.

Every error is reported with its key path, what was found and what was
expected, all at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PositiveW = Annotated[float, Field(gt=0)]
# The root of the domain tree; a domain of this name would replace the site cap.
SITE_DOMAIN_ID = "site"
NonNegW = Annotated[float, Field(ge=0)]
PositiveS = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `cap_kw` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Strict):
    """The site as a whole."""

    name: str = "site"
    cap_w: PositiveW
    safety_margin_w: NonNegW = 0.0
    overhead_w: NonNegW = 0.0
    correction_window_s: PositiveS = 30.0


class DomainConfig(_Strict):
    """A power domain below the site (feeder, transformer, PDU, rack)."""

    id: Annotated[str, Field(min_length=1)]
    limit_w: PositiveW
    parent: str | None = None


class MinerConfig(_Strict):
    """A miner listed by address."""

    address: str
    id: str | None = None
    domain: str | None = None
    nameplate_power_w: PositiveW | None = None
    nameplate_hashrate_ths: PositiveW | None = None

    @field_validator("address")
    @classmethod
    def _address_is_ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"found {value!r}, expected an IP address such as '10.0.1.17'"
            ) from None
        return value


def _address_range(text: str) -> str:
    parse_address_range(text)  # raises ValueError naming the item
    return text


class InventoryConfig(_Strict):
    """Which miners the agent drives: a static list and ranges to discover."""

    miners: list[MinerConfig] = []
    # Validated item by item, so each bad range is reported at its own index.
    scan: list[Annotated[str, AfterValidator(_address_range)]] = []
    scan_domain: str | None = None
    default_nameplate_power_w: PositiveW = 3500.0
    default_nameplate_hashrate_ths: PositiveW = 100.0
    sleep_power_w: NonNegW = 25.0
    discovery_concurrency: Annotated[int, Field(ge=1, le=2000)] = 100
    scan_interval_s: PositiveS = 3600.0
    # Miner passwords (agent/credentials.py); none: the systemd credential, else pyasic's.
    credentials_file: Path | None = None


class PricesConfig(_Strict):
    """Prices: static values, or a series from a file or an HTTP feed, with stale fallbacks."""

    hashprice_usd_per_th_day: NonNegW = 0.05
    electricity_usd_per_kwh: NonNegW = 0.05
    ai_usd_per_gpu_hour: NonNegW = 2.0
    source: Literal["static", "file", "http"] = "static"
    path: str | None = None
    url: str | None = None
    poll_interval_s: PositiveS = 300.0
    stale_after_s: PositiveS = 900.0
    # What a stale electricity price is taken to be: high, so the planner sheds rather than loses.
    fallback_electricity_usd_per_kwh: NonNegW = 0.25
    # Stale prices: "hold" the last fresh ones (or the static ones, none fresh since the
    # start) for stale_hold_s, then the high price; "high": the high price at once.
    stale_fallback: Literal["hold", "high"] = "hold"
    stale_hold_s: NonNegW = 3600.0


class PriorityClassConfig(_Strict):
    """Devices the economic policy serves before later classes and the merit order."""

    name: Annotated[str, Field(min_length=1)]
    devices: list[Annotated[str, Field(min_length=1)]] = []  # id patterns (fnmatch: *, ?, [])
    domains: list[Annotated[str, Field(min_length=1)]] = []  # every device in these domains

    @model_validator(mode="after")
    def _names_something(self) -> PriorityClassConfig:
        if not self.devices and not self.domains:
            raise ValueError(
                f"found priority class {self.name!r} with neither devices nor domains, expected "
                'devices = ["node-a/*", ...] (device id patterns) and/or domains = ["rack-1"]'
            )
        return self


class PolicyConfig(_Strict):
    """The capping policy and its hysteresis band, as fractions of the effective cap."""

    name: Literal["efficiency-capping", "economic"] = "efficiency-capping"
    capping_threshold: Fraction = 1.0
    capping_target: Fraction = 0.97
    uncapping_threshold: Fraction = 0.92
    min_off_s: NonNegW = 300.0
    # Each sleep/wake cycle wears a miner; 0 means no limit beyond min_off_s.
    max_wakes_per_hour: Annotated[int, Field(ge=0, le=60)] = 4
    restore_ramp_w_per_s: PositiveW = 10_000.0
    # Economic policy only (policies/economic.py).
    default_utilization_frac: Fraction = 0.6
    keep_margin_usd_per_kwh: NonNegW = 0.01
    # Served first, in this order, before the merit order (e.g. contracted AI capacity).
    priority_classes: list[PriorityClassConfig] = []

    @model_validator(mode="after")
    def _class_names_unique(self) -> PolicyConfig:
        names = [c.name for c in self.priority_classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"found priority class name(s) {', '.join(dup)} more than once, expected "
                "each [[policy.priority_classes]] to have its own name"
            )
        return self

    @model_validator(mode="after")
    def _band_ordered(self) -> PolicyConfig:
        if not self.uncapping_threshold < self.capping_target <= self.capping_threshold:
            raise ValueError(
                f"found uncapping_threshold {self.uncapping_threshold}, capping_target "
                f"{self.capping_target}, capping_threshold {self.capping_threshold}, expected "
                "uncapping_threshold < capping_target <= capping_threshold"
            )
        return self


class TelemetryConfig(_Strict):
    """How often and how patiently devices are read."""

    interval_s: PositiveS = 5.0
    timeout_s: PositiveS = 3.0
    stale_after_s: PositiveS = 30.0
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 500
    max_backoff_s: PositiveS = 60.0


class ControlConfig(_Strict):
    """The control tick and actuation."""

    interval_s: PositiveS = 5.0
    actuation_timeout_s: PositiveS = 10.0
    confirm_timeout_s: PositiveS = 120.0
    # Changes sent at once, in the tick's order. All of a tick's changes share one
    # deadline, actuation_timeout_s from its first send; one whose turn has not come by
    # then is not sent, and the next tick plans it again.
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 500


class ListenConfig(_Strict):
    """A host:port to listen on; localhost unless configured otherwise."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)]


class ApiConfig(ListenConfig):
    """The override API: where it listens, who may use it, and how much it accepts.

    Tokens live hashed in ``tokens_file`` (``siteagent token create``); TLS is on
    when ``tls_cert`` and ``tls_key`` are set, and client certificates signed by
    ``tls_client_ca`` are then required (mTLS).
    """

    port: Annotated[int, Field(ge=0, le=65535)] = 8800
    tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_override_ttl_s: PositiveS = 24 * 3600.0
    max_body_bytes: Annotated[int, Field(ge=256, le=1_048_576)] = 16_384
    auth_failures_per_minute: Annotated[int, Field(ge=1, le=100_000)] = 10

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"found tls_cert={self.tls_cert!r} and tls_key={self.tls_key!r}, expected both "
                "set (TLS on) or neither (plain HTTP on localhost)"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                f"found tls_client_ca={self.tls_client_ca!r} without tls_cert/tls_key, expected "
                "client certificates only together with TLS"
            )
        return self


class GpuNodeConfig(_Strict):
    """A GPU node: the agent's own host through NVML (``host = "local"``) or one over SSH."""

    id: Annotated[str, Field(min_length=1)]
    gpus: Annotated[int, Field(ge=1, le=64)]
    gpu_max_power_w: PositiveW = 700.0
    host: str = "local"
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    username: str = "siteagent"
    client_key: str | None = None
    known_hosts: str = "/etc/siteagent/known_hosts"
    domain: str | None = None
    overhead_w: NonNegW = 0.0
    drain_command: str | None = None
    # GPU power (W, whole node) kept for a customer; the economic policy never plans below it.
    contract_floor_w: NonNegW = 0.0
    undrain_command: str | None = None
    restore_limits_on_exit: bool = False

    @model_validator(mode="after")
    def _ssh_needs_a_key(self) -> GpuNodeConfig:
        if self.host != "local" and not self.client_key:
            raise ValueError(
                f"found host {self.host!r} without client_key, expected client_key = the path "
                "of the SSH private key (e.g. /run/credentials/siteagent.service/ssh-key)"
            )
        return self


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """An APScheduler trigger for a standard crontab line (0 or 7 = Sunday in its 5th field).

    APScheduler 3 numbers weekdays from Monday (its issue 286), so "1-5" would mean
    Tuesday to Saturday; weekday numbers are turned into names first.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5")
    fields[4] = re.sub(r"(?<![/\d])([0-7])(?!\d)", lambda m: _CRON_DAYS[int(m.group(1))], fields[4])
    minute, hour, day, month, day_of_week = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=day_of_week,
        timezone=timezone,
    )


class CapWindowConfig(_Strict):
    """A recurring window (a crontab line for its start, a duration) with a lower site cap,
    e.g. the afternoons that are likely 4CP peaks."""

    name: Annotated[str, Field(min_length=1)]
    cron: str
    duration_s: PositiveS
    cap_w: NonNegW
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _cron_parses(self) -> CapWindowConfig:
        try:
            cron_trigger(self.cron, self.timezone)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"found cron {self.cron!r} / timezone {self.timezone!r} ({e}), expected a "
                "5-field crontab line such as '0 15 * 6-9 1-5' and an IANA timezone"
            ) from None
        return self


class DemandResponseConfig(_Strict):
    """A demand-response event: hold the site at or under ``target_w`` from ``start`` on."""

    name: Annotated[str, Field(min_length=1)]
    start: AwareDatetime
    duration_s: PositiveS
    target_w: NonNegW


class ScheduleConfig(_Strict):
    """Caps that come and go with the clock."""

    windows: list[CapWindowConfig] = []
    events: list[DemandResponseConfig] = []


class StateConfig(_Strict):
    """Where state lives."""

    dir: str = "/var/lib/siteagent"
    # The store is backed up at each start and then every interval, into <dir>/backups.
    backup_interval_s: PositiveS = 3600.0
    backups_kept: Annotated[int, Field(ge=1, le=10_000)] = 24


class Config(_Strict):
    """The whole configuration file."""

    site: SiteConfig
    domains: list[DomainConfig] = []
    inventory: InventoryConfig = InventoryConfig()
    gpu_nodes: list[GpuNodeConfig] = []
    schedule: ScheduleConfig = ScheduleConfig()
    prices: PricesConfig = PricesConfig()
    policy: PolicyConfig = PolicyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    control: ControlConfig = ControlConfig()
    api: ApiConfig = ApiConfig()
    metrics: ListenConfig = ListenConfig(port=9800)
    state: StateConfig = StateConfig()


def _table(data: object, key: str) -> Mapping[str, Any]:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _rows(data: object, key: str) -> list[tuple[int, Mapping[str, Any]]]:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, list):
        return []
    return [(i, row) for i, row in enumerate(value) if isinstance(row, Mapping)]


def _text(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    return value if isinstance(value, str) else None


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _cross_check(data: Mapping[str, Any]) -> list[ConfigProblem]:
    """Checks that span sections: references resolve, ids unique, margins sane.

    They read the raw document, skipping whatever the schema already rejects,
    so they are reported together with the schema's problems in one pass.
    """
    problems: list[ConfigProblem] = []
    domains = [(i, _text(d, "id"), _text(d, "parent")) for i, d in _rows(data, "domains")]
    ids = [d_id for _, d_id, _ in domains if d_id is not None]
    known = set(ids)
    choices = f"one of {sorted(known)}" if known else "no domain (none are defined)"
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(ConfigProblem("domains", f"id {dup!r} twice", "unique domain ids"))
    for i, d_id, parent in domains:
        if d_id == SITE_DOMAIN_ID:
            problems.append(
                ConfigProblem(
                    f"domains[{i}].id",
                    repr(d_id),
                    f"a name other than {SITE_DOMAIN_ID!r} (the whole site is called that)",
                )
            )
        if parent is not None and parent not in known:
            problems.append(
                ConfigProblem(
                    f"domains[{i}].parent",
                    repr(parent),
                    f"{choices}, or no parent (directly under the site)",
                )
            )
    problems.extend(_domain_cycles(domains))
    inventory = _table(data, "inventory")
    addresses: set[str] = set()
    miner_ids: set[str] = set()
    for i, m in _rows(inventory, "miners"):
        domain = _text(m, "domain")
        if domain is not None and domain not in known:
            problems.append(ConfigProblem(f"inventory.miners[{i}].domain", repr(domain), choices))
        address = _text(m, "address")
        if address is not None and address in addresses:
            problems.append(
                ConfigProblem(
                    f"inventory.miners[{i}].address",
                    f"{address} listed a second time",
                    "each miner listed once",
                )
            )
        if address is not None:
            addresses.add(address)
        # Two miners under one id would leave one of them unmanaged and uncounted.
        miner_id = _text(m, "id")
        if miner_id is not None and miner_id in miner_ids:
            problems.append(
                ConfigProblem(
                    f"inventory.miners[{i}].id", f"{miner_id!r} a second time", "unique miner ids"
                )
            )
        if miner_id is not None:
            miner_ids.add(miner_id)
    node_ids: set[str] = set()
    for i, n in _rows(data, "gpu_nodes"):
        domain = _text(n, "domain")
        if domain is not None and domain not in known:
            problems.append(ConfigProblem(f"gpu_nodes[{i}].domain", repr(domain), choices))
        node_id = _text(n, "id")
        if node_id is not None and node_id in node_ids:
            problems.append(
                ConfigProblem(f"gpu_nodes[{i}].id", f"{node_id!r} a second time", "unique node ids")
            )
        if node_id is not None:
            node_ids.add(node_id)
    scan_domain = _text(inventory, "scan_domain")
    if scan_domain is not None and scan_domain not in known:
        problems.append(ConfigProblem("inventory.scan_domain", repr(scan_domain), choices))
    site = _table(data, "site")
    cap_w, margin_w = _number(site, "cap_w"), _number(site, "safety_margin_w")
    if cap_w is not None and cap_w > 0 and margin_w is not None and margin_w >= cap_w:
        problems.append(
            ConfigProblem("site.safety_margin_w", str(margin_w), f"less than site.cap_w ({cap_w})")
        )
    return problems


def _domain_cycles(domains: list[tuple[int, str | None, str | None]]) -> list[ConfigProblem]:
    parent = {d_id: p for _, d_id, p in domains if d_id is not None}
    problems = []
    for i, d_id, first in domains:
        seen = {d_id}
        node = first
        while node is not None and node in parent:
            if node in seen:
                problems.append(
                    ConfigProblem(
                        f"domains[{i}].parent", f"a cycle through {node!r}", "a tree of domains"
                    )
                )
                break
            seen.add(node)
            node = parent[node]
    return problems


def parse_address_range(text: str) -> list[str]:
    """Expand '10.0.0.0/28', '10.0.0.5-10.0.0.9' or one address into addresses."""
    text = text.strip()
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            hosts = list(net.hosts()) if net.num_addresses > 2 else list(net)
            if len(hosts) > 65536:
                raise ValueError("more than 65536 addresses")
            return [str(h) for h in hosts]
        if "-" in text:
            lo_s, hi_s = (p.strip() for p in text.split("-", 1))
            lo, hi = ipaddress.ip_address(lo_s), ipaddress.ip_address(hi_s)
            if lo.version != hi.version or int(hi) < int(lo):
                raise ValueError("the end is before the start")
            if int(hi) - int(lo) >= 65536:
                raise ValueError("more than 65536 addresses")
            return [str(ipaddress.ip_address(n)) for n in range(int(lo), int(hi) + 1)]
        return [str(ipaddress.ip_address(text))]
    except ValueError as e:
        raise ValueError(
            f"found {text!r} ({e}), expected a CIDR such as '10.0.1.0/24', "
            "a range such as '10.0.1.10-10.0.1.60' or one address"
        ) from None


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file, with where it is and what was expected."""

    path: str
    found: str
    expected: str

    def __str__(self) -> str:
        return f"{self.path}: found {self.found}; expected {self.expected}"


class ConfigError(Exception):
    """A config file that cannot be used; carries every problem found."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def _loc_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _problems(err: ValidationError) -> Iterator[ConfigProblem]:
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        found = "nothing" if e["type"] == "missing" else repr(e.get("input"))
        if e["type"] == "extra_forbidden":
            yield ConfigProblem(
                _loc_path(loc), f"unknown key {loc[-1]!r}", "no such key (check the spelling)"
            )
            continue
        if e["type"] == "missing":
            yield ConfigProblem(_loc_path(loc), "nothing", "this key is required")
            continue
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "value_error":
            # Our own validators already say what was found and what is expected.
            yield ConfigProblem(_loc_path(loc), *_split_found(msg))
            continue
        if len(found) > 80:
            found = found[:77] + "..."
        yield ConfigProblem(
            _loc_path(loc), found, _lower_first(msg.removeprefix("Input should be "))
        )


def _split_found(text: str) -> tuple[str, str]:
    if text.startswith("found ") and ", expected " in text:
        found, _, expected = text.removeprefix("found ").partition(", expected ")
        return found, expected
    return "an invalid value", text


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    cfg: Config | None = None
    problems: list[ConfigProblem] = []
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems.extend(_problems(e))
    problems.extend(_cross_check(data))
    if problems or cfg is None:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            str(p), [ConfigProblem("(file)", e.strerror or str(e), "a readable TOML file")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), [ConfigProblem("(syntax)", str(e), "valid TOML")]) from None
    return parse_config(data, str(p))
