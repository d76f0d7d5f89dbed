"""Config validation: every problem at once, each with its path, what was found and expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, ConfigError, ConfigProblem, load_config, parse_config

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
        "domains",
        "inventory.miners[0].domain",
        "inventory.miners[1].id",
        "inventory.scan_domain",
        "site.safety_margin_w",
    ]
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
