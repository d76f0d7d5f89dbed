"""The site configuration: one TOML file, validated with pydantic.

Every error is reported with its key path, what was found and what was
expected, all at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PositiveW = Annotated[float, Field(gt=0)]
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


class InventoryConfig(_Strict):
    """Which miners the agent drives: a static list and ranges to discover."""

    miners: list[MinerConfig] = []
    scan: list[str] = []
    scan_domain: str | None = None
    default_nameplate_power_w: PositiveW = 3500.0
    default_nameplate_hashrate_ths: PositiveW = 100.0
    sleep_power_w: NonNegW = 25.0
    discovery_concurrency: Annotated[int, Field(ge=1, le=2000)] = 100

    @field_validator("scan")
    @classmethod
    def _ranges_parse(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_address_range(item)  # raises ValueError naming the item
        return value


class PricesConfig(_Strict):
    """Static prices; live feeds come with the economic policy."""

    hashprice_usd_per_th_day: NonNegW = 0.05
    electricity_usd_per_kwh: NonNegW = 0.05


class PolicyConfig(_Strict):
    """The capping policy and its hysteresis band, as fractions of the effective cap."""

    name: Literal["efficiency-capping"] = "efficiency-capping"
    capping_threshold: Fraction = 1.0
    capping_target: Fraction = 0.97
    uncapping_threshold: Fraction = 0.92
    min_off_s: NonNegW = 300.0
    restore_ramp_w_per_s: PositiveW = 10_000.0

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


class ListenConfig(_Strict):
    """A host:port to listen on; localhost unless configured otherwise."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)]


class StateConfig(_Strict):
    """Where state lives."""

    dir: str = "/var/lib/siteagent"


class Config(_Strict):
    """The whole configuration file."""

    site: SiteConfig
    domains: list[DomainConfig] = []
    inventory: InventoryConfig = InventoryConfig()
    prices: PricesConfig = PricesConfig()
    policy: PolicyConfig = PolicyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    control: ControlConfig = ControlConfig()
    api: ListenConfig = ListenConfig(port=8800)
    metrics: ListenConfig = ListenConfig(port=9800)
    state: StateConfig = StateConfig()


def _cross_check(cfg: Config) -> list[ConfigProblem]:
    """Checks that span sections: references resolve, ids unique, margins sane."""
    problems: list[ConfigProblem] = []
    ids = [d.id for d in cfg.domains]
    known = set(ids)
    choices = f"one of {sorted(known)}" if known else "no domain (none are defined)"
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(ConfigProblem("domains", f"id {dup!r} twice", "unique domain ids"))
    for i, d in enumerate(cfg.domains):
        if d.parent is not None and d.parent not in known:
            problems.append(
                ConfigProblem(
                    f"domains[{i}].parent",
                    repr(d.parent),
                    f"{choices}, or no parent (directly under the site)",
                )
            )
    problems.extend(_domain_cycles(cfg.domains))
    addresses: set[str] = set()
    for i, m in enumerate(cfg.inventory.miners):
        if m.domain is not None and m.domain not in known:
            problems.append(ConfigProblem(f"inventory.miners[{i}].domain", repr(m.domain), choices))
        if m.address in addresses:
            problems.append(
                ConfigProblem(
                    f"inventory.miners[{i}].address",
                    f"{m.address} listed a second time",
                    "each miner listed once",
                )
            )
        addresses.add(m.address)
    scan_domain = cfg.inventory.scan_domain
    if scan_domain is not None and scan_domain not in known:
        problems.append(ConfigProblem("inventory.scan_domain", repr(scan_domain), choices))
    if cfg.site.safety_margin_w >= cfg.site.cap_w:
        problems.append(
            ConfigProblem(
                "site.safety_margin_w",
                str(cfg.site.safety_margin_w),
                f"less than site.cap_w ({cfg.site.cap_w})",
            )
        )
    return problems


def _domain_cycles(domains: list[DomainConfig]) -> list[ConfigProblem]:
    parent = {d.id: d.parent for d in domains}
    problems = []
    for i, d in enumerate(domains):
        seen = {d.id}
        node = d.parent
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
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, list(_problems(e))) from None
    problems = _cross_check(cfg)
    if problems:
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
