"""The backtest: both policies replayed, the bound above them, no cap violation."""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from siteagent.agent.tools.backtest import (
    make_prices,
    run_backtest,
    site_from_config,
    synthetic_site,
)
from siteagent.agent.tools.cli import main
from siteagent.policies.economic_params import SwitchingCosts
from siteagent.policies.prices import PricePoint


def test_economic_beats_capping_and_stays_within_the_bound() -> None:
    series = make_prices(days=2)
    out = run_backtest(synthetic_site(30, 8), series)
    by = {p["policy"]: p for p in out["policies"]}
    best = out["bound"]["margin_usd"]
    for p in by.values():
        assert p["seconds_over_cap"] == 0
        assert p["margin_usd"] <= best + 1e-6
    assert by["economic"]["margin_usd"] >= by["efficiency-capping"]["margin_usd"]
    assert out["economic_ratio_to_bound"] >= 0.97


def test_cli_writes_the_plot_and_a_json_report(tmp_path: Path, capsys: object) -> None:
    prices = tmp_path / "p.csv"
    from siteagent.agent.control.prices import write_csv

    write_csv(make_prices(days=1), prices)
    png = tmp_path / "out.png"
    code = main(
        [
            "backtest",
            "--prices",
            str(prices),
            "--miners",
            "12",
            "--gpus",
            "8",
            "--plot",
            str(png),
            "--report",
            "json",
        ]
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    report = json.loads(out[out.index("{") :])
    assert report["steps"] == 288 and "economic_ratio_to_bound" in report


# -- the command on bad input and at length (subprocesses: what a person sees) ----------

REPO = Path(__file__).resolve().parent.parent


def _backtest(*argv: str, stderr: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "siteagent.agent.tools.cli", "backtest", *argv],
        capture_output=stderr is None,
        stdout=subprocess.PIPE if stderr is not None else None,
        stderr=stderr,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_json_report_is_nothing_but_json(tmp_path: Path) -> None:
    prices = tmp_path / "p.csv"
    from siteagent.agent.control.prices import write_csv

    write_csv(make_prices(days=1), prices)
    r = _backtest("--prices", str(prices), "--miners", "6", "--gpus", "8", "--report", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # the whole of stdout: no solver banner before it
    assert report["steps"] == 288
    assert "backtest:" not in r.stderr  # no progress line when stderr is not a terminal


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing.csv", "missing.csv: No such file or directory"),
        (
            lambda d: _write(
                d / "bad.csv",
                "timestamp_unix_s,hashprice_usd_per_th_day,electricity_usd_per_kwh,"
                "ai_usd_per_gpu_hour\n1700000000,0.05,0.03,2.1\n1700000300,0.05,cheap,2.1\n",
            ),
            "bad.csv: row 3: ",
        ),
        (lambda d: _write(d / "bad.json", "[{"), "bad.json: cannot be read: "),
        (lambda d: _write(d / "empty.csv", "timestamp_unix_s\n"), "empty.csv: no price rows"),
    ],
)
def test_a_bad_price_file_is_one_line_and_exit_2(
    tmp_path: Path, make: Callable[[Path], Path], expected: str
) -> None:
    r = _backtest("--prices", str(make(tmp_path)))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("siteagent backtest: --prices ") and expected in lines[0]


def test_a_bad_plot_folder_is_refused_before_the_replay(tmp_path: Path) -> None:
    from siteagent.agent.control.prices import write_csv
    from siteagent.agent.tools.backtest import BacktestInputError, check_inputs

    prices = tmp_path / "p.csv"
    write_csv(make_prices(days=1), prices)
    a_file = _write(tmp_path / "not-a-folder", "x")
    for target, expected in [
        (tmp_path / "no" / "such" / "plot.png", "does not exist"),
        (a_file / "plot.png", "does not exist"),
        (tmp_path, "is a folder"),
    ]:
        args = argparse.Namespace(
            config=None, prices=str(prices), miners=4, gpus=8, days=None, plot=str(target)
        )
        # check_inputs is all that runs before the replay: the refusal comes from it.
        with pytest.raises(BacktestInputError, match=expected):
            check_inputs(args)
        r = _backtest("--prices", str(prices), "--miners", "4", "--plot", str(target))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [f"siteagent backtest: {check_message(args)}"]


def check_message(args: argparse.Namespace) -> str:
    from siteagent.agent.tools.backtest import BacktestInputError, check_inputs

    try:
        check_inputs(args)
    except BacktestInputError as e:
        return str(e)
    raise AssertionError("no refusal")


def test_progress_shows_on_a_terminal(tmp_path: Path) -> None:
    from siteagent.agent.control.prices import write_csv

    prices = tmp_path / "p.csv"
    write_csv(make_prices(days=2), prices)
    main_fd, tty_fd = pty.openpty()
    try:
        r = _backtest("--prices", str(prices), "--miners", "4", "--gpus", "8", stderr=tty_fd)
        os.close(tty_fd)
        seen = b""
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main_fd)
    assert r.returncode == 0
    text = seen.decode()
    assert "backtest: efficiency-capping (1 of 3), day 1 of 2" in text
    assert "backtest: bound (3 of 3), day 2 of 2" in text
    assert "backtest:" not in r.stdout  # the report itself stays clean


def test_a_site_that_loses_money_has_no_ratio_and_says_why() -> None:
    from siteagent.agent.config import load_config

    site = site_from_config(load_config(REPO / "examples" / "site.toml"))
    out = run_backtest(site, make_prices(days=1))
    assert out["bound"]["margin_usd"] <= 0
    assert out["economic_ratio_to_bound"] is None
    assert "not positive" in out["ratio_note"]
    out.pop("_bound")
    json.dumps(out.pop("_results") and out, allow_nan=False)  # valid JSON: no NaN in it


def test_text_report_says_n_a_not_nan(tmp_path: Path) -> None:
    from siteagent.agent.control.prices import write_csv

    prices = tmp_path / "p.csv"
    write_csv(make_prices(days=1), prices)
    r = _backtest("--prices", str(prices), "--config", str(REPO / "examples" / "site.toml"))
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout.lower()
    assert "economic / bound margin: n/a" in r.stdout and "not positive" in r.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the bound bounds ---------------------------------------------------------------

SHIPPED = REPO / "agent" / "data"


def _assert_bounded(out: dict[str, Any]) -> None:
    """No policy over the cap, none above the bound, in all or on any day."""
    best = out["bound"]["margin_usd"]
    for p in out["policies"]:
        assert p["seconds_over_cap"] == 0, p
        assert p["margin_usd"] <= best + 1e-6, (p["policy"], p["margin_usd"], best)
    for day in out["days"]:
        for p in out["policies"]:
            assert day[f"{p['policy']}_margin_usd"] <= day["bound_margin_usd"] + 1e-6, day


@pytest.mark.parametrize("name", ["prices_30d.csv", "prices_30d_b.csv"])
def test_the_bound_is_above_every_policy_on_both_shipped_series(name: str) -> None:
    from siteagent.agent.control.prices import load_series

    series = list(load_series(SHIPPED / name).points)[:288]
    _assert_bounded(run_backtest(synthetic_site(16, 8), series))


def test_the_bound_is_above_the_economic_policy_where_the_former_lp_was_not() -> None:
    # Low AI demand: the former LP's straight pieces undervalued the GPUs, and at 0.97
    # of each limit it earned $0.73 here where the economic policy earned $0.88.
    series = [PricePoint(1_717_200_000.0 + 300.0 * k, 0.05, 0.05, 2.0, 0.2) for k in range(3)]
    _assert_bounded(run_backtest(synthetic_site(3, 8, 0.6), series))


@st.composite
def small_series(draw: st.DrawFn) -> list[PricePoint]:
    """A few hours of prices: negative to spiking electricity, any demand."""
    n = draw(st.integers(2, 24))
    t0 = 1_717_200_000.0 + draw(st.integers(0, 287)) * 300.0
    return [
        PricePoint(
            t0 + 300.0 * k,
            draw(st.floats(0.02, 0.08)),
            draw(st.one_of(st.floats(-0.05, 0.2), st.floats(0.2, 3.0))),
            draw(st.floats(0.5, 4.0)),
            draw(st.floats(0.02, 1.0)),
        )
        for k in range(n)
    ]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_series(), st.integers(1, 10), st.sampled_from([0, 8]), st.floats(0.2, 1.0))
def test_the_bound_is_above_every_policy_on_any_series(
    series: list[PricePoint], miners: int, gpus: int, cap_frac: float
) -> None:
    from siteagent.agent.tools.backtest import NoBound

    try:
        out = run_backtest(synthetic_site(miners, gpus, cap_frac), series)
    except NoBound:
        reject()  # a site no policy can keep under its limits: nothing to bound
    _assert_bounded(out)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.1, 5.0), st.floats(0.0, 1.0))
def test_the_gpu_hull_never_undervalues_a_limit(demand: float, ai: float, at: float) -> None:
    from siteagent.agent.tools.backtest import _gpu_hull, gpu_draw_w
    from siteagent.sim.gpu import H100_SXM, capacity_frac

    m = H100_SXM
    limit = m.power_limit_min_w + at * (m.power_limit_max_w - m.power_limit_min_w)
    draw = gpu_draw_w(limit, demand)
    revenue = ai * min(demand, capacity_frac(limit, m.power_limit_max_w))
    lo, hi, lines = _gpu_hull(demand, ai)
    assert lo - 1e-9 <= draw <= hi + 1e-9
    assert all(revenue <= a + b * draw + 1e-9 for a, b in lines)


def test_switching_costs_count_in_the_bound_too() -> None:
    from siteagent.agent.tools.backtest import bound

    site = synthetic_site(12, 8)
    series = make_prices(days=1)
    free = bound(site, series, SwitchingCosts())
    cheap = bound(site, series, SwitchingCosts(miner_wear_usd_per_cycle=0.02))
    dear = bound(site, series, SwitchingCosts(miner_wear_usd_per_cycle=5.0))
    assert free.sleep_wake_cycles > dear.sleep_wake_cycles
    assert dear.margin_usd < cheap.margin_usd < free.margin_usd
    # Charged per wake (no wake time here: wear alone).
    assert cheap.switching_usd == pytest.approx(0.02 * cheap.sleep_wake_cycles) != 0.0


def test_json_report_has_each_day_against_the_bound(tmp_path: Path) -> None:
    from siteagent.agent.control.prices import write_csv

    prices = tmp_path / "p.csv"
    write_csv(make_prices(days=2), prices)
    r = _backtest("--prices", str(prices), "--miners", "6", "--gpus", "8", "--report", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [d["date"] for d in report["days"]] == ["2024-06-01", "2024-06-02"]
    for d in report["days"]:
        assert d["economic_margin_usd"] <= d["bound_margin_usd"] + 1e-6
        assert "economic_cycles" in d and "economic_ratio_to_bound" in d
    assert {p["policy"] for p in report["policies"]} == {"economic", "efficiency-capping"}
    assert all("cycles_per_day" in p and "switching_usd" in p for p in report["policies"])


def test_a_site_whose_limits_cannot_be_kept_has_no_bound_and_says_when() -> None:
    from siteagent.agent.tools.backtest import NoBound

    with pytest.raises(NoBound, match="on 2024-06-01 the limits cannot be kept"):
        run_backtest(synthetic_site(4, 8, 0.05), make_prices(days=1)[:5])
