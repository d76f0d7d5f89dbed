"""The backtest: both policies replayed, the LP optimum above them, no cap violation."""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from siteagent.agent.tools.backtest import (
    make_prices,
    run_backtest,
    site_from_config,
    synthetic_site,
)
from siteagent.agent.tools.cli import main


def test_economic_beats_capping_and_stays_within_the_optimum() -> None:
    series = make_prices(days=2)
    out = run_backtest(synthetic_site(30, 8), series)
    by = {p["policy"]: p for p in out["policies"]}
    best = out["optimum"]["margin_usd"]
    for p in by.values():
        assert p["seconds_over_cap"] == 0
        assert p["margin_usd"] <= best + 1e-6
    assert by["economic"]["margin_usd"] >= by["efficiency-capping"]["margin_usd"]
    assert out["economic_ratio_to_optimum"] >= 0.97


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
    assert report["steps"] == 288 and "economic_ratio_to_optimum" in report


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
    assert "backtest: lp-optimum (3 of 3), day 2 of 2" in text
    assert "backtest:" not in r.stdout  # the report itself stays clean


def test_a_site_that_loses_money_has_no_ratio_and_says_why() -> None:
    from siteagent.agent.config import load_config

    site = site_from_config(load_config(REPO / "examples" / "site.toml"))
    out = run_backtest(site, make_prices(days=1))
    assert out["optimum"]["margin_usd"] <= 0
    assert out["economic_ratio_to_optimum"] is None
    assert "not positive" in out["ratio_note"]
    json.dumps(out.pop("_results") and out, allow_nan=False)  # valid JSON: no NaN in it


def test_text_report_says_n_a_not_nan(tmp_path: Path) -> None:
    from siteagent.agent.control.prices import write_csv

    prices = tmp_path / "p.csv"
    write_csv(make_prices(days=1), prices)
    r = _backtest("--prices", str(prices), "--config", str(REPO / "examples" / "site.toml"))
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout.lower()
    assert "economic / optimum margin: n/a" in r.stdout and "not positive" in r.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
