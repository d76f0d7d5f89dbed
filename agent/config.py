"""The site configuration: one TOML file, validated with pydantic.

Every error is reported with its key path, what was found and what was
expected, all at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from siteagent.domain.site import SITE
from siteagent.policies import PolicyName
from siteagent.policies.economic_params import DEFAULT_SWITCHING

# Bounds that no real value reaches, so a slip of the keyboard (a cap of 1e15 W, a
# timeout of a century) is refused instead of quietly switching a safeguard off.
MAX_POWER_W = 1e10  # 10 GW: more than any site, and than any price or rate kept in these types
MAX_DURATION_S = 366 * 24 * 3600.0  # a year
PositiveW = Annotated[float, Field(gt=0, le=MAX_POWER_W)]
# The root of the domain tree; a domain of this name would replace the site cap.
SITE_DOMAIN_ID = SITE  # the vocabulary's one name for the root (domain.site)
NonNegW = Annotated[float, Field(ge=0, le=MAX_POWER_W)]
PositiveS = Annotated[float, Field(gt=0, le=MAX_DURATION_S)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `cap_kw` must not silently fall back to a default.
    # Strict types: "5" or true is not a number (an integer still is a float); and no NaN or
    # infinity anywhere, as `cap_w = inf` would run the site uncapped.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# Rules that span keys. Each says what is wrong ("found X, expected Y") or None. The
# models' validators raise them, but pydantic skips a model's validators when any of
# its fields fails, so ``_cross_check`` applies them again to the raw document: an
# operator sees a bad band beside a bad number in one run, not on a second one.


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


def _class_names_nothing(name: str, devices: list[str], domains: list[str]) -> str | None:
    if devices or domains:
        return None
    return (
        f"found priority class {name!r} with neither devices nor domains, expected "
        'devices = ["node-a/*", ...] (device id patterns) and/or domains = ["rack-1"]'
    )


def _class_names_twice(names: list[str]) -> str | None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if not dup:
        return None
    return (
        f"found priority class name(s) {', '.join(dup)} more than once, expected "
        "each [[policy.priority_classes]] to have its own name"
    )


def _band_disordered(uncapping: float, target: float, capping: float) -> str | None:
    if uncapping < target <= capping:
        return None
    return (
        f"found uncapping_threshold {uncapping}, capping_target {target}, capping_threshold "
        f"{capping}, expected uncapping_threshold < capping_target <= capping_threshold"
    )


def _tls_unpaired(cert: str | None, key: str | None, client_ca: str | None) -> str | None:
    if (cert is None) != (key is None):
        return (
            f"found tls_cert={cert!r} and tls_key={key!r}, expected both "
            "set (TLS on) or neither (plain HTTP on localhost)"
        )
    if client_ca is not None and cert is None:
        return (
            f"found tls_client_ca={client_ca!r} without tls_cert/tls_key, expected "
            "client certificates only together with TLS"
        )
    return None


def _ssh_without_key(host: str, client_key: str | None) -> str | None:
    if host == "local" or client_key:
        return None
    return (
        f"found host {host!r} without client_key, expected client_key = the path "
        "of the SSH private key (e.g. /run/credentials/siteagent.service/ssh-key)"
    )


def _cron_unparsed(cron: str, timezone: str) -> str | None:
    try:
        cron_trigger(cron, timezone)
    except (ValueError, KeyError) as e:
        return (
            f"found cron {cron!r} / timezone {timezone!r} ({e}), expected a "
            "5-field crontab line such as '0 15 * 6-9 1-5' and an IANA timezone"
        )
    return None


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
    credentials_file: str | None = None


def _http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"https?://[^/\s]+", value):
        raise ValueError(f"found {value!r}, expected an http:// or https:// URL")
    return value


HttpUrl = Annotated[str | None, AfterValidator(_http_url)]


def _one_place(kind: str, path: str | None, url: str | None, keys: str = "path/url") -> str | None:
    if (path is None) != (url is None):
        return None
    p, u = keys.split("/")
    return (
        f"found {p}={path!r} and {u}={url!r}, expected exactly one of {p} (a local "
        f"file) or {u} (http/https) for the {kind} prices"
    )


def _ercot_places(
    market: str, path: str | None, url: str | None, dam_path: str | None, dam_url: str | None
) -> str | None:
    if market == "rtm-dam":
        return _one_place(f"ERCOT {market}", path, url) or _one_place(
            "ERCOT day-ahead", dam_path, dam_url, "dam_path/dam_url"
        )
    if dam_path is not None or dam_url is not None:
        return (
            f"found dam_path/dam_url with market = {market!r}, expected them "
            'only with market = "rtm-dam"'
        )
    return _one_place(f"ERCOT {market}", path, url)


def _sources_unused(source: str, named: list[str]) -> str | None:
    if source == "sources" and not named:
        return (
            "found source = 'sources' without [prices.electricity], [prices.hashprice] "
            "or [prices.ai], expected at least one of them"
        )
    if source != "sources" and named:
        return (
            f"found [prices.{named[0]}] with source = {source!r} (it would be "
            "ignored), expected source = 'sources'"
        )
    return None


class ErcotPricesConfig(_Strict):
    """Electricity from ERCOT settlement point prices as published (docs/prices.md)."""

    kind: Literal["ercot"]
    # "dam": day-ahead hourly; "rtm": real-time 15-min; "rtm-dam": real time, the
    # day-ahead price while the real-time report is stale.
    market: Literal["dam", "rtm", "rtm-dam"]
    settlement_point: Annotated[str, Field(min_length=1)]  # e.g. HB_NORTH, LZ_WEST
    path: str | None = None
    url: HttpUrl = None
    dam_path: str | None = None  # market = "rtm-dam": the day-ahead report
    dam_url: HttpUrl = None
    # Delivery (TDSP) and retail charges added to the wholesale price ($/kWh).
    adder_usd_per_kwh: Annotated[float, Field(ge=-1, le=1)] = 0.0
    stale_after_s: PositiveS | None = None  # none: prices.stale_after_s

    @model_validator(mode="after")
    def _places(self) -> ErcotPricesConfig:
        _raise_if(_ercot_places(self.market, self.path, self.url, self.dam_path, self.dam_url))
        return self


class HashpricePricesConfig(_Strict):
    """Hashprice from a hashprice index's JSON as published (docs/prices.md)."""

    kind: Literal["hashrate-index"]
    path: str | None = None
    url: HttpUrl = None
    # The index's unit: the query's hashunit (PHS or THS), in USD.
    unit: Literal["usd_per_ph_day", "usd_per_th_day"] = "usd_per_ph_day"
    stale_after_s: PositiveS | None = None  # none: prices.stale_after_s

    @model_validator(mode="after")
    def _places(self) -> HashpricePricesConfig:
        _raise_if(_one_place("hashprice", self.path, self.url))
        return self


class AiPricePeriodConfig(_Strict):
    """A period of an AI contract with its own price per GPU-hour."""

    start: AwareDatetime
    end: AwareDatetime
    usd_per_gpu_hour: NonNegW

    @model_validator(mode="after")
    def _ordered(self) -> AiPricePeriodConfig:
        if self.end <= self.start:
            raise ValueError(
                f"found end {self.end} not after start {self.start}, expected end > start"
            )
        return self


class AiContractPricesConfig(_Strict):
    """The AI price per GPU-hour from a contract, optionally by period."""

    kind: Literal["contract"]
    usd_per_gpu_hour: NonNegW  # outside every period of the schedule
    schedule: list[AiPricePeriodConfig] = []

    @model_validator(mode="after")
    def _apart(self) -> AiContractPricesConfig:
        periods = sorted(self.schedule, key=lambda p: p.start)
        for a, b in pairwise(periods):
            if b.start < a.end:
                raise ValueError(
                    f"found schedule periods {a.start}..{a.end} and {b.start}..{b.end} "
                    "overlapping, expected periods apart"
                )
        return self


class PricesConfig(_Strict):
    """Prices: static values, or a series from a file or an HTTP feed, with stale fallbacks."""

    hashprice_usd_per_th_day: NonNegW = 0.05
    electricity_usd_per_kwh: NonNegW = 0.05
    ai_usd_per_gpu_hour: NonNegW = 2.0
    source: Literal["static", "file", "http", "sources"] = "static"
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
    # source = "sources": each price from its own published source (docs/prices.md);
    # a price without one is the static value above.
    electricity: ErcotPricesConfig | None = None
    hashprice: HashpricePricesConfig | None = None
    ai: AiContractPricesConfig | None = None

    @model_validator(mode="after")
    def _sources_used(self) -> PricesConfig:
        named = [k for k in ("electricity", "hashprice", "ai") if getattr(self, k) is not None]
        _raise_if(_sources_unused(self.source, named))
        return self


class PriorityClassConfig(_Strict):
    """Devices the economic policy serves before later classes and the merit order."""

    name: Annotated[str, Field(min_length=1)]
    devices: list[Annotated[str, Field(min_length=1)]] = []  # id patterns (fnmatch: *, ?, [])
    domains: list[Annotated[str, Field(min_length=1)]] = []  # every device in these domains
    # A contract for every GPU node whose GPUs the class holds (as gpu_nodes[].contract_*):
    # GPU power kept per GPU, and a service level (requests waiting) kept at demand's power.
    contract_floor_w_per_gpu: NonNegW = 0.0
    contract_max_queue: Annotated[int, Field(ge=0, le=1_000_000)] | None = None

    @model_validator(mode="after")
    def _names_something(self) -> PriorityClassConfig:
        _raise_if(_class_names_nothing(self.name, self.devices, self.domains))
        return self


class PolicyConfig(_Strict):
    """The capping policy and its hysteresis band, as fractions of the effective cap."""

    name: PolicyName = "efficiency-capping"  # a name in policies.POLICIES
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
    # Switching in money (economic policy plans with them; the backtest charges them).
    miner_wear_usd_per_cycle: NonNegW = DEFAULT_SWITCHING.miner_wear_usd_per_cycle
    miner_restart_usd_per_cycle: NonNegW = DEFAULT_SWITCHING.miner_restart_usd_per_cycle
    miner_wake_s: Annotated[float, Field(ge=0, le=MAX_DURATION_S)] = DEFAULT_SWITCHING.miner_wake_s
    gpu_drain_usd: NonNegW = DEFAULT_SWITCHING.gpu_drain_usd
    gpu_undrain_usd: NonNegW = DEFAULT_SWITCHING.gpu_undrain_usd
    miner_depreciation_usd_per_h: NonNegW = DEFAULT_SWITCHING.miner_depreciation_usd_per_h
    gpu_depreciation_usd_per_h: NonNegW = DEFAULT_SWITCHING.gpu_depreciation_usd_per_h
    switch_horizon_s: PositiveS = DEFAULT_SWITCHING.horizon_s
    # Served first, in this order, before the merit order (e.g. contracted AI capacity).
    priority_classes: list[PriorityClassConfig] = []

    @model_validator(mode="after")
    def _class_names_unique(self) -> PolicyConfig:
        _raise_if(_class_names_twice([c.name for c in self.priority_classes]))
        return self

    @model_validator(mode="after")
    def _band_ordered(self) -> PolicyConfig:
        _raise_if(
            _band_disordered(self.uncapping_threshold, self.capping_target, self.capping_threshold)
        )
        return self


class TelemetryConfig(_Strict):
    """How often and how patiently devices are read."""

    interval_s: PositiveS = 5.0
    timeout_s: PositiveS = 3.0
    stale_after_s: PositiveS = 30.0
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 500
    max_backoff_s: PositiveS = 60.0
    # Miners read and commanded in this many worker processes (0: in the agent's own);
    # "auto": none below agent.control.workers.AUTO_MIN_DEVICES, else one per core less one.
    # At 10,000 miners on 2 cores, 2 workers did 98 % of the sweeps with the oldest reading
    # at 1.5 intervals (one process: 65 %, 2.5) in 812 MB (bench/bench_keeps_up.py).
    workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = "auto"


class ControlConfig(_Strict):
    """The control tick and actuation."""

    interval_s: PositiveS = 5.0
    actuation_timeout_s: PositiveS = 10.0
    confirm_timeout_s: PositiveS = 120.0
    # Changes sent at once, in the tick's order. All of a tick's changes share one
    # deadline, actuation_timeout_s from its first send; one whose turn has not come by
    # then is not sent, and the next tick plans it again.
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 500


class MeteringConfig(_Strict):
    """How the loop uses the meters' readings (agent/control/meter.py)."""

    # The unexplained load the plan counts: its maximum over this window.
    unexplained_window_s: PositiveS = 10.0
    # A rising unexplained load is carried on at its rate of rise for this long.
    rise_horizon_s: Annotated[float, Field(ge=0, le=MAX_DURATION_S)] = 5.0
    # A meter not fresh: the devices, the overhead, and the largest unexplained load
    # seen over this window.
    fallback_window_s: PositiveS = 900.0
    # A meter sample over the capping threshold ticks at once.
    fast_guard: bool = True


def _block_unset(enabled: bool, block_w: float, devices: list[str]) -> str | None:
    if not enabled or block_w > 0 or devices:
        return None
    return (
        f"found enabled = true with block_w = {block_w:g} and no devices, expected "
        "block_w = the power (W) to shed, or devices = [id patterns] of the block"
    )


class FrequencyResponseConfig(_Strict):
    """Under-frequency response: a block of miners shed at once on a frequency dip."""

    enabled: bool = False
    meter: str | None = None  # the meter whose frequency counts; default the site's
    trigger_hz: Annotated[float, Field(ge=40, le=70)] = 59.7
    trigger_s: Annotated[float, Field(ge=0, le=60)] = 0.2
    restore_after_s: PositiveS = 300.0
    block_w: NonNegW = 0.0
    devices: list[str] = []
    action: Literal["sleep", "min_power"] = "sleep"

    @model_validator(mode="after")
    def _block_set(self) -> FrequencyResponseConfig:
        _raise_if(_block_unset(self.enabled, self.block_w, self.devices))
        return self


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
        _raise_if(_tls_unpaired(self.tls_cert, self.tls_key, self.tls_client_ca))
        return self


MetricNames = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class DemandMetricsConfig(_Strict):
    """Which metrics of a node's Prometheus endpoint measure its AI demand (vLLM's names by
    default; TGI, Triton, Dynamo or any exporter by naming theirs). Each role lists names
    tried in order: the first the endpoint exposes is read (vLLM renamed its KV-cache
    gauge)."""

    waiting: MetricNames = ["vllm:num_requests_waiting"]
    running: MetricNames = ["vllm:num_requests_running"]
    kv_cache_frac: MetricNames = ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
    tokens_per_s: MetricNames = ["vllm:generation_tokens_total"]  # a counter, read as a rate


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
    # GPU power (W, whole node) kept for a customer; no policy plans below it (caps win).
    contract_floor_w: NonNegW = 0.0
    # AI demand from the inference server (agent/control/ai_demand.py): its Prometheus
    # endpoint, the metrics read there, the concurrent requests the node runs at full
    # power, and the fraction of capacity kept spare for latency.
    demand_endpoint: str | None = None
    demand_metrics: DemandMetricsConfig = DemandMetricsConfig()
    demand_capacity_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    latency_margin: Annotated[float, Field(ge=0, le=0.9)] = 0.2
    # The contract's service level: at most this many requests waiting. A node with a
    # service level is kept at the power its demand needs (caps win).
    contract_max_queue: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    undrain_command: str | None = None
    restore_limits_on_exit: bool = False

    @model_validator(mode="after")
    def _ssh_needs_a_key(self) -> GpuNodeConfig:
        _raise_if(_ssh_without_key(self.host, self.client_key))
        return self

    @property
    def contracted(self) -> bool:
        """Whether a customer's contract holds this node up (a floor or a service level)."""
        return self.contract_floor_w > 0 or self.contract_max_queue is not None


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CRON_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
# One item of a crontab field: *, a number or a range, either with a step; or a month or
# weekday name or a range of names, without a step. APScheduler 3 matches names by a
# prefix (its name patterns lack an end anchor), so it would read "MON-FRI-" as
# "MON-FRI" and "mon-fri/2" as "mon-fri": each item must be whole before it gets there.
_CRON_ITEM = re.compile(r"(?:\*|\d+(?:-\d+)?)(?:/\d+)?|[a-z]{3}(?:-[a-z]{3})?", re.IGNORECASE)


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """An APScheduler trigger for a standard crontab line (0 or 7 = Sunday in its 5th field).

    APScheduler 3 numbers weekdays from Monday (its issue 286), so "1-5" would mean
    Tuesday to Saturday; weekday numbers are turned into names first.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5")
    for name, field in zip(_CRON_FIELDS, fields, strict=True):
        for item in field.split(","):
            if not _CRON_ITEM.fullmatch(item):
                raise ValueError(
                    f"{item!r} in the {name} field is not *, a number, a range or a name, "
                    "with a step (/n) only after * or numbers"
                )
    days = fields[4]
    fields[4] = re.sub(r"(?<![/\d])([0-7])(?!\d)", lambda m: _CRON_DAYS[int(m.group(1))], days)
    if any(not _CRON_ITEM.fullmatch(item) for item in fields[4].split(",")):
        # Weekday numbers became names, and APScheduler would drop a step after names.
        raise ValueError(f"{days!r}: a step over weekday numbers; list the days instead (1,3,5)")
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
        _raise_if(_cron_unparsed(self.cron, self.timezone))
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


def _vtn_unverified(
    vtn_url: str, cert: str | None, key: str | None, ca_file: str | None
) -> str | None:
    """Why the VEN could not verify this VTN (None if it can): off loopback, openleadr
    checks the VTN's certificate only over https with cert, key and ca_file all set."""
    if (cert is None) != (key is None):
        return (
            f"found cert={cert!r} and key={key!r}, expected both set (TLS with a client "
            "certificate) or neither"
        )
    url = urlsplit(vtn_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"found vtn_url {vtn_url!r}, expected an http:// or https:// URL with a host"
    host = url.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name: may resolve anywhere
    if loopback:
        return None
    if url.scheme != "https" or cert is None or ca_file is None:
        return (
            f"found vtn_url {vtn_url!r} (off loopback) with cert={cert!r}, key={key!r}, "
            f"ca_file={ca_file!r}, expected an https:// vtn_url and cert, key and ca_file "
            "all set: the VEN takes events only from a VTN whose certificate ca_file signs"
        )
    return None


class OpenAdrConfig(_Strict):
    """The OpenADR 2.0b VEN (agent/grid/openadr.py): which VTN, who we are, how to answer."""

    vtn_url: Annotated[str, Field(min_length=1)]
    ven_name: Annotated[str, Field(min_length=1)]
    ven_id: str | None = None
    poll_interval_s: PositiveS = 10.0
    cert: str | None = None
    key: str | None = None
    ca_file: str | None = None
    # SIMPLE levels 1, 2, 3 -> site cap (W); 0 means no cap at that level.
    simple_levels_w: Annotated[list[NonNegW], Field(min_length=3, max_length=3)] = [0.0, 0.0, 0.0]
    opt_out_when: Literal["floor", "never"] = "floor"
    report_interval_s: PositiveS = 60.0
    # After this long without a good answer from the VTN, the vtn-unreachable alarm.
    alarm_after_s: PositiveS = 300.0

    @model_validator(mode="after")
    def _vtn_verified(self) -> OpenAdrConfig:
        _raise_if(_vtn_unverified(self.vtn_url, self.cert, self.key, self.ca_file))
        return self


class StateConfig(_Strict):
    """Where state lives."""

    dir: str = "/var/lib/siteagent"
    # The store is backed up at each start and then every interval, into <dir>/backups.
    backup_interval_s: PositiveS = 3600.0
    backups_kept: Annotated[int, Field(ge=1, le=10_000)] = 24


RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
_REGISTER_WORDS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


class RegisterConfig(_Strict):
    """Where one quantity lives in a meter's registers; value = raw x scale, in the key's unit."""

    address: Annotated[int, Field(ge=0, le=65535)]
    type: RegisterType
    scale: float = 1.0
    word_order: Literal["big", "little"] = "big"  # "little": the low 16-bit word first
    function: Literal["holding", "input"] = "holding"  # Modbus function code 3 or 4

    @field_validator("scale")
    @classmethod
    def _scale_nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("found 0, expected a non-zero factor (raw x scale = the value)")
        return value


class MeterMapConfig(_Strict):
    """A register map for a meter that does not speak SunSpec; power_w is required."""

    power_w: RegisterConfig  # total real power, import positive
    phase_a_w: RegisterConfig | None = None
    phase_b_w: RegisterConfig | None = None
    phase_c_w: RegisterConfig | None = None
    frequency_hz: RegisterConfig | None = None
    energy_import_wh: RegisterConfig | None = None


# The quantities a register map may name, in the map's order.
METER_QUANTITIES = tuple(MeterMapConfig.model_fields)


def _meter_kind_mismatch(kind: str, has_map: bool) -> str | None:
    if kind == "map" and not has_map:
        return (
            "found kind = 'map' without a [meters.map] table, expected a map with at least "
            "power_w = { address = ..., type = ... }, or kind = 'sunspec'"
        )
    if kind == "sunspec" and has_map:
        return (
            "found a [meters.map] table with kind = 'sunspec' (which ignores it), "
            "expected kind = 'map', or no map"
        )
    return None


def _map_overlaps(spans: list[tuple[str, int, int, str]]) -> str | None:
    """Two quantities reading the same registers: a map copied with a slip."""
    spans = sorted(spans, key=lambda s: (s[3], s[1]))
    for (a, lo_a, hi_a, fa), (b, lo_b, _, fb) in itertools.pairwise(spans):
        if fa == fb and lo_b < hi_a:
            return (
                f"found {a} (registers {lo_a}-{hi_a - 1}) and {b} (from {lo_b}) overlapping, "
                "expected each quantity in registers of its own"
            )
    return None


def _meter_timing(interval_s: float, timeout_s: float, stale_after_s: float | None) -> str | None:
    if timeout_s > interval_s:
        return (
            f"found timeout_s {timeout_s:g} > interval_s {interval_s:g}, expected a read "
            "to end before the next one starts (timeout_s <= interval_s)"
        )
    if stale_after_s is not None and stale_after_s <= interval_s:
        return (
            f"found stale_after_s {stale_after_s:g} <= interval_s {interval_s:g}, expected "
            "stale_after_s longer than one interval (default: 3 x interval_s)"
        )
    return None


class MeterConfig(_Strict):
    """A Modbus TCP power meter: the site's point of interconnection, or a domain's feeder."""

    id: Annotated[str, Field(min_length=1)]
    domain: Annotated[str, Field(min_length=1)] = SITE_DOMAIN_ID
    address: str
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1
    kind: Literal["sunspec", "map"] = "sunspec"
    sunspec_base: Literal[0, 40000, 50000] | None = None  # None: discover (40000, 0, 50000)
    map: MeterMapConfig | None = None
    interval_s: PositiveS = 1.0
    timeout_s: PositiveS = 0.5
    stale_after_s: PositiveS | None = None  # None: 3 x interval_s
    frozen_after_reads: Annotated[int, Field(ge=2, le=100_000)] = 10
    max_power_w: PositiveW | None = None  # None: 2 x the cap of its domain
    import_only: bool = True

    @field_validator("address")
    @classmethod
    def _address_is_ip(cls, value: str) -> str:
        return MinerConfig._address_is_ip(value)

    @model_validator(mode="after")
    def _consistent(self) -> MeterConfig:
        _raise_if(_meter_kind_mismatch(self.kind, self.map is not None))
        _raise_if(_meter_timing(self.interval_s, self.timeout_s, self.stale_after_s))
        if self.map is not None:
            _raise_if(_map_overlaps(_map_spans(self.map.model_dump())))
        if self.stale_after_s is None:
            return self.model_copy(update={"stale_after_s": 3 * self.interval_s})
        return self


def _map_spans(regmap: Mapping[str, Any]) -> list[tuple[str, int, int, str]]:
    """(quantity, first register, end, function) of each well-formed entry of a map."""
    out = []
    for name, reg in regmap.items():
        if not isinstance(reg, Mapping):
            continue
        address, type_ = reg.get("address"), reg.get("type")
        if isinstance(address, int) and type_ in _REGISTER_WORDS:
            function = str(reg.get("function", "holding"))
            out.append((name, address, address + _REGISTER_WORDS[type_], function))
    return out


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
    metering: MeteringConfig = MeteringConfig()
    frequency_response: FrequencyResponseConfig = FrequencyResponseConfig()
    api: ApiConfig = ApiConfig()
    metrics: ListenConfig = ListenConfig(port=9800)
    state: StateConfig = StateConfig()
    meters: list[MeterConfig] = []
    openadr: OpenAdrConfig | None = None

    @model_validator(mode="after")
    def _meter_bounds(self) -> Config:
        # A meter's plausibility bound defaults to twice the cap of what it meters:
        # a reading beyond it is a wrong scale factor or map, not the site's load.
        caps = {d.id: d.limit_w for d in self.domains} | {SITE_DOMAIN_ID: self.site.cap_w}
        if all(m.max_power_w is not None for m in self.meters):
            return self
        meters = [
            m
            if m.max_power_w is not None
            else m.model_copy(update={"max_power_w": 2 * caps.get(m.domain, self.site.cap_w)})
            for m in self.meters
        ]
        return self.model_copy(update={"meters": meters})


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


class _Invalid:
    """A key's value that its own schema refuses (reported there, so rules skip it)."""


_INVALID = _Invalid()


@functools.cache
def _adapter(model: type[BaseModel], key: str) -> TypeAdapter[Any]:
    field = model.model_fields[key]
    annotation: Any = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation, config=_Strict.model_config)


def _value(model: type[BaseModel], row: Mapping[str, Any], key: str) -> Any:
    """``key`` of ``row`` as ``model`` reads it: its default when absent, ``_INVALID``
    when its schema refuses it or it is required and absent (reported on its own)."""
    if key not in row:
        field = model.model_fields[key]
        return _INVALID if field.is_required() else field.get_default(call_default_factory=True)
    try:
        return _adapter(model, key).validate_python(row[key])
    except ValidationError:
        return _INVALID


def _values(model: type[BaseModel], row: Mapping[str, Any], *keys: str) -> list[Any] | None:
    """The values of ``keys`` (see ``_value``), or None when any of them is invalid."""
    out = [_value(model, row, k) for k in keys]
    return None if any(v is _INVALID for v in out) else out


def _rule(path: str, problem: str | None) -> list[ConfigProblem]:
    return [] if problem is None else [ConfigProblem(path, *_split_found(problem))]


def default_id(address: str) -> str:
    """A stable device id for a miner known only by its address."""
    return "miner-" + address.replace(".", "-").replace(":", "-")


def gpu_device_id(node_id: str, index: int) -> str:
    """The device id of GPU ``index`` of a GPU node."""
    return f"{node_id}/gpu{index}"


def overhead_device_id(node_id: str) -> str:
    """The device id of a GPU node's fixed overhead (CPUs, fans, NICs)."""
    return f"{node_id}/overhead"


_IDS_EXPECTED = "ids unique across miners, GPU devices and domains"


def _unique_ids(data: Mapping[str, Any]) -> list[ConfigProblem]:
    """Every id the config makes (domains, GPU nodes and their devices, miners) once.

    A miner under a GPU device's id would replace that device in the agent's
    table: the GPU would go uncounted while still drawing power.
    """
    problems: list[ConfigProblem] = []
    # id -> the place that took it first, in words
    owner: dict[str, str] = {SITE_DOMAIN_ID: "the site itself (the root of the domain tree)"}

    def claim(device_id: str, path: str, place: str, found: str | None = None) -> bool:
        first = owner.get(device_id)
        if first is not None:
            shown = found or repr(device_id)
            problems.append(ConfigProblem(path, f"{shown}, also {first}", _IDS_EXPECTED))
            return False
        owner[device_id] = place
        return True

    for i, d in _rows(data, "domains"):
        d_id = _text(d, "id")
        # A domain called "site" has a check of its own, with its own advice.
        if d_id is not None and d_id != SITE_DOMAIN_ID:
            claim(d_id, f"domains[{i}].id", f"the domain of domains[{i}]")
    for i, n in _rows(data, "gpu_nodes"):
        node_id = _text(n, "id")
        if node_id is None or not claim(node_id, f"gpu_nodes[{i}].id", f"gpu_nodes[{i}]"):
            continue  # its devices' ids would only repeat the node's problem
        gpus, overhead_w = _value(GpuNodeConfig, n, "gpus"), _value(GpuNodeConfig, n, "overhead_w")
        for g in range(gpus if isinstance(gpus, int) else 0):
            where = f"the GPU device of gpu_nodes[{i}] ({node_id!r}, GPU {g})"
            claim(gpu_device_id(node_id, g), f"gpu_nodes[{i}].id", where)
        if isinstance(overhead_w, float) and overhead_w > 0:
            where = f"the overhead device of gpu_nodes[{i}] ({node_id!r})"
            claim(overhead_device_id(node_id), f"gpu_nodes[{i}].id", where)
    listed: set[str] = set()
    for i, m in _rows(_table(data, "inventory"), "miners"):
        miner_id, address = _text(m, "id"), _text(m, "address")
        if miner_id is not None:
            claim(miner_id, f"inventory.miners[{i}].id", f"inventory.miners[{i}]")
        elif address is not None and address not in listed:  # twice: reported as such
            d_id = default_id(address)
            claim(
                d_id,
                f"inventory.miners[{i}].address",
                f"the default id of inventory.miners[{i}] (address {address})",
                found=f"{address} (default id {d_id!r})",
            )
        if address is not None:
            listed.add(address)
    return problems


def _unique_schedule_names(data: Mapping[str, Any]) -> list[ConfigProblem]:
    """Each window's and each event's name once: the name is the cap's source (in logs,
    metrics and the audit) and the id of the tick scheduled at its start."""
    problems: list[ConfigProblem] = []
    schedule = _table(data, "schedule")
    for key in ("windows", "events"):
        first: dict[str, int] = {}
        for i, row in _rows(schedule, key):
            name = _text(row, "name")
            if name is None:
                continue
            if name in first:
                problems.append(
                    ConfigProblem(
                        f"schedule.{key}[{i}].name",
                        f"{name!r}, also schedule.{key}[{first[name]}].name",
                        f"a name used once among schedule.{key}",
                    )
                )
            else:
                first[name] = i
    return problems


def _rules(data: Mapping[str, Any]) -> list[ConfigProblem]:
    """The models' cross-key rules on the raw document, and rules across sections."""
    problems: list[ConfigProblem] = _unique_schedule_names(data)
    policy = _table(data, "policy")
    band = _values(
        PolicyConfig, policy, "uncapping_threshold", "capping_target", "capping_threshold"
    )
    if band is not None:
        problems += _rule("policy", _band_disordered(*band))
    classes = _rows(policy, "priority_classes")
    names = [n for _, c in classes if isinstance(n := _value(PriorityClassConfig, c, "name"), str)]
    problems += _rule("policy", _class_names_twice(names))
    for i, c in classes:
        named = _values(PriorityClassConfig, c, "name", "devices", "domains")
        if named is not None:
            problems += _rule(f"policy.priority_classes[{i}]", _class_names_nothing(*named))
    # The efficiency-capping policy plans with its band alone (policies/capping.py):
    # classes written for it would be promises nobody keeps. (Contract floors it keeps,
    # by the rule every policy shares: policies/floors.py.)
    capping = _value(PolicyConfig, policy, "name") == "efficiency-capping"
    if capping and classes:
        problems.append(
            ConfigProblem(
                "policy.priority_classes",
                f"{len(classes)} class(es) under policy.name = 'efficiency-capping', which "
                "ignores them",
                'policy.name = "economic", or no [[policy.priority_classes]]',
            )
        )
    prices = _table(data, "prices")
    source = _value(PricesConfig, prices, "source")
    if isinstance(source, str):
        named = [k for k in ("electricity", "hashprice", "ai") if k in prices]
        problems += _rule("prices", _sources_unused(source, named))
    places = _values(
        ErcotPricesConfig,
        _table(prices, "electricity"),
        "market",
        "path",
        "url",
        "dam_path",
        "dam_url",
    )
    if places is not None:
        problems += _rule("prices.electricity", _ercot_places(*places))
    places = _values(HashpricePricesConfig, _table(prices, "hashprice"), "path", "url")
    if "hashprice" in prices and places is not None:
        problems += _rule("prices.hashprice", _one_place("hashprice", *places))
    problems += _class_contract_problems(classes, _rows(data, "gpu_nodes"))
    tls = _values(ApiConfig, _table(data, "api"), "tls_cert", "tls_key", "tls_client_ca")
    if tls is not None:
        problems += _rule("api", _tls_unpaired(*tls))
    for i, n in _rows(data, "gpu_nodes"):
        ssh = _values(GpuNodeConfig, n, "host", "client_key")
        if ssh is not None:
            problems += _rule(f"gpu_nodes[{i}]", _ssh_without_key(*ssh))
        problems += _demand_problems(i, n)
        floor = _values(GpuNodeConfig, n, "contract_floor_w", "gpus", "gpu_max_power_w")
        if floor is None:
            continue
        floor_w, gpus, max_w = floor
        if floor_w > gpus * max_w:
            problems.append(
                ConfigProblem(
                    f"gpu_nodes[{i}].contract_floor_w",
                    f"{floor_w:g} W, above the node's maximum of {gpus} GPU(s) x "
                    f"{max_w:g} W = {gpus * max_w:g} W",
                    "a floor the node can deliver (at most gpus x gpu_max_power_w)",
                )
            )
    vtn = _values(OpenAdrConfig, _table(data, "openadr"), "vtn_url", "cert", "key", "ca_file")
    if vtn is not None:
        problems += _rule("openadr", _vtn_unverified(*vtn))
    for i, w in _rows(_table(data, "schedule"), "windows"):
        cron = _values(CapWindowConfig, w, "cron", "timezone")
        if cron is not None:
            problems += _rule(f"schedule.windows[{i}]", _cron_unparsed(*cron))
    block = _values(
        FrequencyResponseConfig, _table(data, "frequency_response"), "enabled", "block_w", "devices"
    )
    if block is not None:
        problems += _rule("frequency_response", _block_unset(*block))
    problems += _frequency_meter_unknown(data)
    return problems


def _frequency_meter_unknown(data: Mapping[str, Any]) -> list[ConfigProblem]:
    """An enabled under-frequency response needs a meter whose frequency it reads."""
    fr = _table(data, "frequency_response")
    if _value(FrequencyResponseConfig, fr, "enabled") is not True:
        return []
    meters = _rows(data, "meters")
    ids = [i for _, m in meters if isinstance(i := _text(m, "id"), str)]
    named = _text(fr, "meter")
    if named is not None:
        if named in ids:
            return []
        return [ConfigProblem("frequency_response.meter", repr(named), f"one of {ids}")]
    if any((_text(m, "domain") or SITE_DOMAIN_ID) == SITE_DOMAIN_ID for _, m in meters):
        return []
    return [
        ConfigProblem(
            "frequency_response.meter",
            "no meter named and no meter at the site",
            "a [[meters]] entry at the site (the POI meter), or meter = the id of one",
        )
    ]


def _class_contract_problems(
    classes: list[tuple[int, Mapping[str, Any]]], nodes: list[tuple[int, Mapping[str, Any]]]
) -> list[ConfigProblem]:
    """A class's service level needs every GPU node it holds to name its demand endpoint."""
    problems: list[ConfigProblem] = []
    for i, c in classes:
        queue = c.get("contract_max_queue")
        if queue is None:
            continue
        patterns, domains = c.get("devices") or [], c.get("domains") or []
        blind = [
            str(n.get("id"))
            for _, n in nodes
            if n.get("demand_endpoint") is None
            and isinstance(n.get("id"), str)
            and (
                n.get("domain") in domains
                or any(fnmatchcase(f"{n['id']}/gpu0", str(p)) for p in patterns)
            )
        ]
        if blind:
            problems.append(
                ConfigProblem(
                    f"policy.priority_classes[{i}].contract_max_queue",
                    f"{queue!r} for GPU node(s) {', '.join(blind)} without a demand_endpoint",
                    "a demand_endpoint on every GPU node the class holds, or no contract_max_queue",
                )
            )
    return problems


def _demand_problems(i: int, node: Mapping[str, Any]) -> list[ConfigProblem]:
    """A node's demand endpoint must be an http(s) URL; a service level needs one to be
    measured (busy % says nothing of a queue)."""
    problems: list[ConfigProblem] = []
    url = node.get("demand_endpoint")
    if isinstance(url, str) and urlsplit(url).scheme not in ("http", "https"):
        problems.append(
            ConfigProblem(
                f"gpu_nodes[{i}].demand_endpoint",
                repr(url),
                "an http:// or https:// URL of the node's Prometheus metrics "
                '(vLLM: "http://HOST:8000/metrics")',
            )
        )
    queue = node.get("contract_max_queue")
    if queue is not None and url is None:
        problems.append(
            ConfigProblem(
                f"gpu_nodes[{i}].contract_max_queue",
                f"{queue!r} without gpu_nodes[{i}].demand_endpoint",
                "a demand_endpoint to read the queue from, or no contract_max_queue",
            )
        )
    return problems


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
    for i, n in _rows(data, "gpu_nodes"):
        domain = _text(n, "domain")
        if domain is not None and domain not in known:
            problems.append(ConfigProblem(f"gpu_nodes[{i}].domain", repr(domain), choices))
    problems.extend(_unique_ids(data))
    problems.extend(_rules(data))
    problems.extend(_meter_rules(data, known))
    scan_domain = _text(inventory, "scan_domain")
    if scan_domain is not None and scan_domain not in known:
        problems.append(ConfigProblem("inventory.scan_domain", repr(scan_domain), choices))
    site = _table(data, "site")
    margin = _values(SiteConfig, site, "cap_w", "safety_margin_w")
    if margin is not None and margin[1] >= margin[0]:
        cap_w, margin_w = margin
        problems.append(
            ConfigProblem("site.safety_margin_w", str(margin_w), f"less than site.cap_w ({cap_w})")
        )
    return problems


def _meter_rules(data: Mapping[str, Any], domains: set[str]) -> list[ConfigProblem]:
    """Each meter on a known domain, one meter per domain, ids unique, maps that make sense."""
    problems: list[ConfigProblem] = []
    choices = f"{SITE_DOMAIN_ID!r} (the whole site) or one of {sorted(domains)}"
    by_domain: dict[str, int] = {}
    ids: dict[str, int] = {}
    for i, m in _rows(data, "meters"):
        domain = _text(m, "domain") or SITE_DOMAIN_ID
        if domain != SITE_DOMAIN_ID and domain not in domains:
            problems.append(ConfigProblem(f"meters[{i}].domain", repr(domain), choices))
        elif domain in by_domain:
            problems.append(
                ConfigProblem(
                    f"meters[{i}].domain",
                    f"{domain!r}, also the domain of meters[{by_domain[domain]}]",
                    "one meter per domain (the site's POI meter, a feeder's meter)",
                )
            )
        else:
            by_domain[domain] = i
        meter_id = _text(m, "id")
        if meter_id is not None and meter_id in ids:
            problems.append(
                ConfigProblem(
                    f"meters[{i}].id", f"{meter_id!r}, also meters[{ids[meter_id]}]", "unique ids"
                )
            )
        elif meter_id is not None:
            ids[meter_id] = i
        kind = _value(MeterConfig, m, "kind")
        if isinstance(kind, str):
            problems += _rule(f"meters[{i}]", _meter_kind_mismatch(kind, "map" in m))
        timing = _values(MeterConfig, m, "interval_s", "timeout_s", "stale_after_s")
        if timing is not None:
            problems += _rule(f"meters[{i}]", _meter_timing(*timing))
        problems += _rule(f"meters[{i}]", _map_overlaps(_map_spans(_table(m, "map"))))
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
        # A rule whose model validated is reported by pydantic and by _cross_check alike.
        raise ConfigError(source, list(dict.fromkeys(problems)))
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
