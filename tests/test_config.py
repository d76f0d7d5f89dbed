"""Config validation: every problem at once, each with its path, what was found and expected."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from config_keys import is_float, key_paths

from siteagent.agent.config import (
    METER_QUANTITIES,
    Config,
    ConfigError,
    ConfigProblem,
    load_config,
    parse_config,
)
from siteagent.agent.tools.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))

MINIMAL = """
[site]
cap_w = 500_000
"""

# Eight independent mistakes; an operator must see all of them in one run.
BROKEN = """
[site]
cap_w = -5
cap_kw = 2000

[[domains]]
id = "feeder-a"
limit_w = 1_000_000
parent = "rack-b"

[[domains]]
id = "rack-b"
limit_w = 100_000
parent = "feeder-a"

[[domains]]
id = "rack-c"
limit_w = 100_000
parent = "nowhere"

[inventory]
miners = [
  { address = "10.0.0.1", domain = "rack-b" },
  { address = "10.0.0.300" },
  { address = "10.0.0.1" },
]
scan = ["10.0.1.0/28", "10.0.2.9-10.0.2.3"]

[policy]
capping_threshold = 0.9
capping_target = 0.95
uncapping_threshold = 0.8
"""


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    return info.value.problems


def find(problems: list[ConfigProblem], path: str) -> list[ConfigProblem]:
    return [p for p in problems if p.path == path]


def test_minimal_config_parses_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    assert cfg.site.cap_w == 500_000
    assert cfg.site.safety_margin_w == 0
    assert cfg.domains == []
    assert cfg.inventory.miners == []
    assert cfg.policy.uncapping_threshold < cfg.policy.capping_target
    assert cfg.policy.capping_target <= cfg.policy.capping_threshold
    assert cfg.api.host == "127.0.0.1"
    assert cfg.metrics.port == 9800


def test_domain_tree_and_miners_parse(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[[domains]]
id = "feeder"
limit_w = 300_000

[[domains]]
id = "rack"
limit_w = 50_000
parent = "feeder"

[inventory]
miners = [{ address = "10.0.0.7", id = "m7", domain = "rack", nameplate_power_w = 3250 }]
scan = ["10.0.1.0/30", "10.0.2.1-10.0.2.2", "10.0.3.3"]
scan_domain = "feeder"
"""
    )
    cfg = load_config(write(tmp_path, text))
    assert [(d.id, d.parent) for d in cfg.domains] == [("feeder", None), ("rack", "feeder")]
    assert cfg.inventory.miners[0].domain == "rack"
    assert cfg.inventory.miners[0].nameplate_power_w == 3250


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, BROKEN))

    (cap,) = find(problems, "site.cap_w")
    assert cap.found == "-5"
    assert "greater than 0" in cap.expected

    (unknown,) = find(problems, "site.cap_kw")
    assert "cap_kw" in unknown.found
    assert "no such key" in unknown.expected

    (address,) = find(problems, "inventory.miners[1].address")
    assert "10.0.0.300" in address.found
    assert "IP address" in address.expected

    (scan,) = find(problems, "inventory.scan[1]")
    assert "10.0.2.9-10.0.2.3" in scan.found
    assert "range" in scan.expected

    (band,) = find(problems, "policy")
    assert "capping_target 0.95" in band.found
    assert "uncapping_threshold < capping_target <= capping_threshold" in band.expected

    (parent,) = find(problems, "domains[2].parent")
    assert parent.found == "'nowhere'"
    assert "'feeder-a'" in parent.expected and "'rack-b'" in parent.expected

    (dup,) = find(problems, "inventory.miners[2].address")
    assert "10.0.0.1" in dup.found and "second time" in dup.found
    assert "once" in dup.expected

    cycles = find(problems, "domains[0].parent") + find(problems, "domains[1].parent")
    assert len(cycles) == 2
    assert all("cycle" in p.found and p.expected == "a tree of domains" for p in cycles)

    # Nothing else: each mistake once, and no knock-on complaints about valid parts.
    assert len(problems) == 9
    message = str(ConfigError("x", problems))
    assert "9 problem(s)" in message
    for p in problems:
        assert f"{p.path}: found {p.found}; expected {p.expected}" in message


def test_valid_scan_entries_do_not_hide_a_bad_one(tmp_path: Path) -> None:
    text = MINIMAL + '[inventory]\nscan = ["10.0.0.0/30", "not-an-ip", "10.0.0.9"]\n'
    problems = problems_of(write(tmp_path, text))
    assert [p.path for p in problems] == ["inventory.scan[1]"]
    assert "'not-an-ip'" in problems[0].found


def test_cross_section_checks_on_an_otherwise_valid_file(tmp_path: Path) -> None:
    text = """
[site]
cap_w = 1000
safety_margin_w = 1000

[[domains]]
id = "a"
limit_w = 10

[[domains]]
id = "a"
limit_w = 20

[inventory]
miners = [
  { address = "10.0.0.1", id = "m", domain = "b" },
  { address = "10.0.0.2", id = "m" },
]
scan_domain = "zzz"
"""
    problems = problems_of(write(tmp_path, text))
    paths = sorted(p.path for p in problems)
    assert paths == [
        "domains[1].id",
        "inventory.miners[0].domain",
        "inventory.miners[1].id",
        "inventory.scan_domain",
        "site.safety_margin_w",
    ]
    (domain,) = find(problems, "domains[1].id")
    assert domain.found == "'a', also the domain of domains[0]"
    (miner,) = find(problems, "inventory.miners[1].id")
    assert miner.found == "'m', also inventory.miners[0]"
    (margin,) = find(problems, "site.safety_margin_w")
    assert "less than site.cap_w" in margin.expected


def test_domain_may_not_take_the_sites_name(tmp_path: Path) -> None:
    # "site" names the root of the tree; a domain called that would replace the site cap.
    text = MINIMAL + '[[domains]]\nid = "site"\nlimit_w = 10_000_000\n'
    problems = problems_of(write(tmp_path, text))
    assert [p.path for p in problems] == ["domains[0].id"]
    assert problems[0].found == "'site'"


def test_missing_required_section(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "[policy]\nmin_off_s = 10\n"))
    assert [(p.path, p.found, p.expected) for p in problems] == [
        ("site", "nothing", "this key is required")
    ]


def test_wrong_type_names_found_value(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, '[site]\ncap_w = "lots"\n'))
    assert [p.path for p in problems] == ["site.cap_w"]
    assert problems[0].found == "'lots'"
    assert "number" in problems[0].expected


def test_toml_syntax_error(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "[site]\ncap_w = = 5\n"))
    assert len(problems) == 1
    assert problems[0].path == "(syntax)"
    assert "line 2" in problems[0].found
    assert problems[0].expected == "valid TOML"


def test_missing_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "nope.toml")
    assert len(problems) == 1
    assert problems[0].path == "(file)"
    assert problems[0].expected == "a readable TOML file"


def test_parse_config_reports_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"site": {"cap_w": 0}}, "inline")
    assert info.value.source == "inline"
    assert str(info.value).startswith("inline: 1 problem(s)")


@pytest.mark.skipif(not EXAMPLES, reason="no examples/*.toml in this checkout")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.site.cap_w > cfg.site.safety_margin_w


def test_packaged_demo_config_is_valid() -> None:
    cfg = load_config(REPO / "agent" / "data" / "demo.toml")
    assert cfg.site.cap_w > 0


# -- strict numbers: no NaN, no infinity, no strings or booleans as numbers ---------------

# One row in every list section, so each key of the model has a place to be set.
FULL: dict[str, Any] = {
    "site": {"cap_w": 10_000},
    "domains": [{"id": "rack", "limit_w": 5_000}],
    "inventory": {"miners": [{"address": "10.0.0.1"}]},
    "gpu_nodes": [{"id": "node", "gpus": 1}],
    "schedule": {
        "windows": [{"name": "w", "cron": "0 15 * 6-9 1-5", "duration_s": 60, "cap_w": 100}],
        "events": [
            {
                "name": "e",
                "start": datetime(2026, 8, 14, tzinfo=UTC),
                "duration_s": 60,
                "target_w": 0,
            }
        ],
    },
    "policy": {"name": "economic", "priority_classes": [{"name": "c", "devices": ["node/*"]}]},
    "prices": {
        "source": "sources",
        "electricity": {
            "kind": "ercot",
            "market": "dam",
            "settlement_point": "HB_NORTH",
            "path": "/p",
        },
        "hashprice": {"kind": "hashrate-index", "path": "/h.json"},
        "ai": {
            "kind": "contract",
            "usd_per_gpu_hour": 2.0,
            "schedule": [
                {
                    "start": datetime(2026, 12, 1, tzinfo=UTC),
                    "end": datetime(2027, 1, 1, tzinfo=UTC),
                    "usd_per_gpu_hour": 2.5,
                }
            ],
        },
    },
    "meters": [
        {
            "id": "poi",
            "address": "10.0.0.9",
            "kind": "map",
            "map": {
                q: {"address": 1000 + 2 * i, "type": "int32"}
                for i, q in enumerate(METER_QUANTITIES)
            },
        }
    ],
    "openadr": {"vtn_url": "http://127.0.0.1:8080/OpenADR2/Simple/2.0b", "ven_name": "v"},
}
FLOAT_KEYS = [path for path, annotation in key_paths(Config) if is_float(annotation)]


def with_key(path: str, value: object) -> tuple[dict[str, Any], str]:
    """FULL with ``path`` set to ``value``; and the path as problems name it (rows: [0])."""
    doc = copy.deepcopy(FULL)
    *sections, key = path.split(".")
    table: Any = doc
    for part in sections:
        name = part.removesuffix("[]")
        table = table.setdefault(name, [{}] if part.endswith("[]") else {})
        if part.endswith("[]"):
            table = table[0]
    table[key] = value
    return doc, path.replace("[]", "[0]")


def test_the_full_document_is_valid() -> None:
    cfg = parse_config(copy.deepcopy(FULL))
    assert cfg.gpu_nodes[0].id == "node" and cfg.schedule.events[0].target_w == 0
    assert len(FLOAT_KEYS) >= 39  # the walk found the nested and listed ones too


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "5", True])
@pytest.mark.parametrize("path", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_and_non_numbers(path: str, value: object) -> None:
    doc, named = with_key(path, value)
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    problems = info.value.problems
    # Exactly the key itself: no knock-on complaints from rules that read it.
    assert [p.path for p in problems] == [named], problems
    (p,) = problems
    assert p.found == repr(value)
    expected = "a finite number" if isinstance(value, float) else "a valid number"
    assert p.expected == expected


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("api.port", True),
        ("api.port", "8800"),
        ("telemetry.concurrency", 10.0),
        ("gpu_nodes[].gpus", "2"),
        ("gpu_nodes[].restore_limits_on_exit", "yes"),
        ("gpu_nodes[].restore_limits_on_exit", 1),
        ("site.name", 5),
    ],
)
def test_other_keys_take_their_own_type_only(path: str, value: object) -> None:
    doc, named = with_key(path, value)
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert [(p.path, p.found) for p in info.value.problems] == [(named, repr(value))]


def test_an_integer_is_a_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[site]\ncap_w = 8000\n[telemetry]\ntimeout_s = 3\n"))
    assert cfg.site.cap_w == 8000.0 and isinstance(cfg.site.cap_w, float)
    assert cfg.telemetry.timeout_s == 3.0


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("site.cap_w", 1e12),
        ("domains[].limit_w", 1e15),
        ("telemetry.timeout_s", 1e9),
        ("control.actuation_timeout_s", 1e9),
        ("api.max_override_ttl_s", 1e10),
    ],
)
def test_absurd_values_are_refused(path: str, value: float) -> None:
    doc, named = with_key(path, value)
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    (p,) = info.value.problems
    assert p.path == named and "less than or equal to" in p.expected


def test_inf_in_a_toml_file_is_refused_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[site]\ncap_w = inf\n[telemetry]\ntimeout_s = nan\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "site.cap_w: found inf; expected a finite number" in err
    assert "telemetry.timeout_s: found nan; expected a finite number" in err


# -- ids: one namespace for miners, GPU devices, GPU nodes and domains ---------------------

CLASHING_IDS = """
[site]
cap_w = 8000

[[domains]]
id = "rack-1"
limit_w = 6000

[[gpu_nodes]]
id = "gpu-node-1"
gpus = 2
overhead_w = 150

[[gpu_nodes]]
id = "rack-1"
gpus = 1

[inventory]
miners = [
  { address = "127.1.206.1", id = "gpu-node-1/gpu0" },
  { address = "127.1.206.2", id = "gpu-node-1/gpu1" },
  { address = "127.1.206.3", id = "gpu-node-1/overhead" },
  { address = "127.1.206.4" },
  { address = "127.1.206.5", id = "miner-127-1-206-4" },
  { address = "127.1.206.6", id = "site" },
  { address = "127.1.206.7", id = "gpu-node-1" },
]
"""


def test_an_id_taken_twice_is_refused_naming_both_places(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, CLASHING_IDS)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    unique = "expected ids unique across miners, GPU devices and domains"
    for line in [
        "gpu_nodes[1].id: found 'rack-1', also the domain of domains[0]",
        "inventory.miners[0].id: found 'gpu-node-1/gpu0', also the GPU device of gpu_nodes[0] "
        "('gpu-node-1', GPU 0)",
        "inventory.miners[1].id: found 'gpu-node-1/gpu1', also the GPU device of gpu_nodes[0] "
        "('gpu-node-1', GPU 1)",
        "inventory.miners[2].id: found 'gpu-node-1/overhead', also the overhead device of "
        "gpu_nodes[0] ('gpu-node-1')",
        "inventory.miners[4].id: found 'miner-127-1-206-4', also the default id of "
        "inventory.miners[3] (address 127.1.206.4)",
        "inventory.miners[5].id: found 'site', also the site itself (the root of the domain tree)",
        "inventory.miners[6].id: found 'gpu-node-1', also gpu_nodes[0]",
    ]:
        assert f"  {line}; {unique}\n" in err, line
    assert "7 problem(s)" in err


def test_a_default_id_that_clashes_names_the_address(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[inventory]\nminers = [{ address = "10.0.0.9", id = "miner-10-0-0-1" },'
        ' { address = "10.0.0.1" }]\n'
    )
    (p,) = problems_of(write(tmp_path, text))
    assert p.path == "inventory.miners[1].address"
    assert p.found == "10.0.0.1 (default id 'miner-10-0-0-1'), also inventory.miners[0]"


def test_distinct_ids_pass(tmp_path: Path) -> None:
    text = CLASHING_IDS.replace('id = "rack-1"\ngpus', 'id = "node-2"\ngpus')
    text = text.split("[inventory]")[0]
    text += '[inventory]\nminers = [{ address = "127.1.206.1", id = "gpu-node-1/gpu2" }]\n'
    cfg = load_config(write(tmp_path, text))
    assert [n.id for n in cfg.gpu_nodes] == ["gpu-node-1", "node-2"]


# -- every problem in one run -----------------------------------------------------------

# Each section holds a bad value beside a cross-key mistake that pydantic's model
# validators would only report once the value is fixed (a second run).
MANY_PROBLEMS = """
[site]
cap_w = 8000

[[gpu_nodes]]
id = "node-a"
gpus = 2
gpu_max_power_w = 700
contract_floor_w = 1500
host = "10.0.9.1"
port = 0

[policy]
min_off_s = -1
capping_threshold = 0.9
capping_target = 0.95
uncapping_threshold = 0.8

[[policy.priority_classes]]
name = "contracted"
devices = ["node-a/*"]

[[schedule.windows]]
name = "weekdays"
cron = "0 15 * * MON-FRI-"
duration_s = -5
cap_w = 4000

[api]
port = 70000
tls_cert = "/etc/siteagent/cert.pem"
"""


def test_every_problem_in_every_section_in_one_run(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, MANY_PROBLEMS))
    seen = sorted((p.path, p.found) for p in problems)
    assert len(seen) == 10, "\n".join(map(str, problems))

    def one(path: str, phrase: str) -> ConfigProblem:
        (p,) = [p for p in problems if p.path == path and phrase in str(p)]
        return p

    one("gpu_nodes[0].port", "greater than or equal to 1")
    one("gpu_nodes[0]", "without client_key")
    over = one("gpu_nodes[0].contract_floor_w", "above the node's maximum")
    assert over.found == "1500 W, above the node's maximum of 2 GPU(s) x 700 W = 1400 W"
    # Every policy keeps contract floors now (policies/floors.py): none is refused for it.
    assert not [p for p in problems if "ignores it" in str(p)]
    one("policy.min_off_s", "greater than or equal to 0")
    one("policy", "uncapping_threshold < capping_target <= capping_threshold")
    classes = one("policy.priority_classes", "ignores them")
    assert 'policy.name = "economic"' in classes.expected
    one("schedule.windows[0].duration_s", "greater than 0")
    cron = one("schedule.windows[0]", "'MON-FRI-' in the day_of_week field")
    assert cron.expected.startswith("a 5-field crontab line")
    one("api.port", "less than or equal to 65535")
    one("api", "tls_key=None")


def test_a_floor_within_the_node_under_the_economic_policy_passes(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[policy]\nname = "economic"\n'
        '[[gpu_nodes]]\nid = "n"\ngpus = 2\ngpu_max_power_w = 700\ncontract_floor_w = 1400\n'
    )
    assert load_config(write(tmp_path, text)).gpu_nodes[0].contract_floor_w == 1400


@pytest.mark.parametrize("cron", ["0 15 * * MON-FRI-", "0 15 * jan-mar/2 *", "0 15 * * 1-5/2"])
def test_cron_lines_apscheduler_would_misread_are_refused(cron: str) -> None:
    window = {"name": "w", "cron": cron, "duration_s": 60, "cap_w": 100}
    with pytest.raises(ConfigError) as info:
        parse_config({"site": {"cap_w": 1000}, "schedule": {"windows": [window]}})
    (p,) = info.value.problems
    assert p.path == "schedule.windows[0]" and repr(cron) in p.found


def test_a_window_or_event_name_used_twice_is_refused_naming_both() -> None:
    # The name is the cap's source and the id of the tick at its start: twice, the daemon
    # failed at start (and a reload after its swap) with the scheduler's duplicate-id error.
    window = {"name": "peak", "cron": "0 15 * * *", "duration_s": 60, "cap_w": 100}
    event = {"name": "ers", "start": datetime(2026, 8, 14, tzinfo=UTC), "duration_s": 60}
    schedule = {
        "windows": [window, {**window, "cap_w": 50}],
        "events": [{**event, "target_w": 10}, {**event, "target_w": 20}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config({"site": {"cap_w": 1000}, "schedule": schedule})
    found = {(p.path, p.found) for p in info.value.problems}
    assert found == {
        ("schedule.windows[1].name", "'peak', also schedule.windows[0].name"),
        ("schedule.events[1].name", "'ers', also schedule.events[0].name"),
    }
