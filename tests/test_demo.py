"""`siteagent demo` end to end: a simulator process, discovery through pyasic, the report."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from siteagent.agent.tools.demo import over_cap, run_demo


def test_over_cap_ignores_the_correction_window_after_drops_only() -> None:
    caps = [(0.0, 100.0), (10.0, 50.0), (20.0, 80.0)]

    def w(t: float) -> float:
        return 120.0 if t < 2 else 90.0 if t < 10 else 60.0 if t < 13 else 45.0 if t < 20 else 90.0

    samples = [(i / 2, w(i / 2)) for i in range(51)]  # 0 .. 25 s
    # Over the first cap until 2 s and over the lowered one until 13 s: both inside
    # a 5 s window. From 20 s, 90 W over the raised cap of 80 W: a raise opens no window.
    seconds, worst = over_cap(samples, caps, window_s=5.0)
    assert seconds == pytest.approx(5.0)
    assert worst == pytest.approx(10.0)
    seconds, worst = over_cap(samples, caps, window_s=1.0)
    assert seconds == pytest.approx(1.0 + 2.0 + 5.0)
    assert worst == pytest.approx(20.0)


@pytest.mark.slow
async def test_demo_keeps_the_simulated_site_under_its_cap(
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    report = await run_demo(
        10,
        gpu_nodes=1,
        gpus_per_node=4,
        base="127.1.40.1",
        gpu_base="127.2.40.1",
        time_scale=0.6,
        out=out,
    )
    assert report["miners"] == 10
    assert report["gpus"] == 4
    assert report["cap_changes"] == 2
    assert report["seconds_over_cap"] == 0, out.getvalue()
    assert (
        report["actuations"].get("set_power_target", 0) + report["actuations"].get("sleep", 0) > 0
    )
    samples = report["samples"]
    assert len(samples) > 50
    # The samples are the simulator's truth and they moved with the caps.
    lowered = [s for s in samples if s["cap_w"] == min(c["cap_w"] for c in report["caps"])]
    assert max(s["site_power_w"] for s in samples) > lowered[-1]["site_power_w"]
    assert lowered[-1]["site_power_w"] <= lowered[-1]["cap_w"]
    lines = out.getvalue().splitlines()
    assert sum(1 for line in lines if line.startswith("t=")) >= 10
    # The simulator it spawns starts as `siteagent sim` does: no warnings at import.
    assert "DeprecationWarning" not in capfd.readouterr().err


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "check-config", "examples/site.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[site]\ncap_w = -1\nbogus = 2\n[policy]\ncapping_target = 2\n")
    res = subprocess.run(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert "site.cap_w" in res.stderr and "site.bogus" in res.stderr
    assert "policy.capping_target" in res.stderr
    assert "3 problem(s)" in res.stderr


def test_version() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and res.stdout.startswith("siteagent 0.")


def test_run_with_an_unusable_state_dir_exits_with_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[site]\ncap_w = 1000\n[state]\ndir = "{blocker}"\n')
    res = subprocess.run(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1, res.stderr
    assert "siteagent run: cannot start:" in res.stderr
    assert "Traceback" not in res.stderr
