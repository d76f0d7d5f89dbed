"""The backtest: both policies replayed, the LP optimum above them, no cap violation."""

from __future__ import annotations

import json
from pathlib import Path

from agent.backtest import make_prices, run_backtest, synthetic_site
from agent.cli import main


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
    from agent.prices import write_csv

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
