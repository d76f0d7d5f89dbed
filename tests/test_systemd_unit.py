"""The systemd unit: `systemd-analyze verify` accepts it; it agrees with the agent defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from siteagent.agent.config import parse_config
from siteagent.agent.control.identify import identify_deadline_s
from siteagent.agent.tools.cli import (
    EXIT_FAIL,
    EXIT_NEEDS_OPERATOR,
    EXIT_USAGE,
    parser,
    startup_extend_s,
)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "siteagent.service"
BINARY = "/opt/siteagent/venv/bin/siteagent"


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value, in order (systemd keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    """A systemd time span in plain seconds or with a single s/min suffix."""
    for suffix, scale in (("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * scale
    return float(value)


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is required on CI (apt-get install -y systemd)")
        pytest.skip("systemd-analyze not installed (apt-get install -y systemd)")
    return path


def _unit_with_real_binary(tmp_path: Path) -> Path:
    # verify checks that ExecStart's program exists and is executable; the installed
    # path does not exist here, so point it at a stand-in and change nothing else.
    stand_in = tmp_path / "siteagent"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={BINARY} ") == 1
    unit = tmp_path / "siteagent.service"
    unit.write_text(text.replace(f"ExecStart={BINARY} ", f"ExecStart={stand_in} "))
    return unit


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _unit_with_real_binary(tmp_path)
    out = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and misplaced settings, warning on stderr only.
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _unit_with_real_binary(tmp_path)
    out = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    assert "Overall exposure level" in out.stdout


def test_unit_settings() -> None:
    u = unit_entries(UNIT.read_text())
    svc = u["Service"]
    want = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "Restart": ["on-failure"],
        "User": ["siteagent"],
        "StateDirectory": ["siteagent"],
        "ConfigurationDirectory": ["siteagent"],
        "ProtectSystem": ["strict"],
        "NoNewPrivileges": ["yes"],
        "PrivateTmp": ["yes"],
        "ProtectHome": ["yes"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
    }
    for key, values in want.items():
        assert svc.get(key) == values, (key, svc.get(key))
    creds = dict(v.split(":", 1) for v in svc["LoadCredential"])
    assert creds["api-tokens"] == "/etc/siteagent/api-tokens"
    assert creds["ssh-key"].startswith("/etc/siteagent/")
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_agrees_with_the_agent_defaults() -> None:
    svc = unit_entries(UNIT.read_text())["Service"]
    (exec_start,) = svc["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == BINARY
    args = parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == "/etc/siteagent/siteagent.toml"
    # The config default of the CLI is the file the unit names.
    assert parser().parse_args(["run"]).config == args.config
    cfg = parse_config({"site": {"cap_w": 1000}})
    assert cfg.state.dir == "/var/lib/siteagent"
    control = cfg.control
    # Pings stop once no tick succeeded for 3 intervals plus an actuation timeout;
    # the watchdog must not fire before that.
    (watchdog,) = svc["WatchdogSec"]
    assert seconds(watchdog) > 3 * control.interval_s + control.actuation_timeout_s
    # Startup asks for more time only while it progresses (EXTEND_TIMEOUT_USEC), so the
    # start limit must be finite (it bounds a stall) and give the first message, after
    # the interpreter and the config, as long as any later step has.
    (start,) = svc["TimeoutStartSec"]
    extend_s = startup_extend_s(identify_deadline_s(cfg.telemetry.timeout_s))
    assert extend_s <= seconds(start) < float("inf")
    # Stopping waits out the tick in flight, whose actuations are bounded by their timeout.
    (stop,) = svc["TimeoutStopSec"]
    assert seconds(stop) > control.actuation_timeout_s + cfg.telemetry.timeout_s


def test_the_unit_restarts_transient_failures_but_not_what_needs_an_operator() -> None:
    svc = unit_entries(UNIT.read_text())["Service"]
    assert svc["Restart"] == ["on-failure"]
    (prevent,) = svc["RestartPreventExitStatus"]
    codes = {int(c) for c in prevent.split()}
    # A refused config or credentials file, a refused store: the same line every
    # RestartSec until someone acts, so the unit stays failed instead.
    assert codes == {EXIT_USAGE, EXIT_NEEDS_OPERATOR}
    # A port taken or an unusable state directory may pass: restarted.
    assert EXIT_FAIL not in codes


def test_systemd_names_the_exit_codes_as_the_readme_does() -> None:
    tool = _systemd_analyze()
    out = subprocess.run(
        [tool, "exit-status", str(EXIT_USAGE), str(EXIT_NEEDS_OPERATOR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # What `systemctl status` shows after the code (status=78/CONFIG).
    names = {int(f[1]): f[0] for f in (line.split() for line in out.stdout.splitlines()[1:])}
    assert names == {EXIT_USAGE: "INVALIDARGUMENT", EXIT_NEEDS_OPERATOR: "CONFIG"}
    readme = (UNIT.parent / "README.md").read_text()
    for code, name in names.items():
        assert f"status={code}/{name}" in readme
