"""Price series lookup, staleness fallbacks, and the file formats."""

from __future__ import annotations

import json
from pathlib import Path

from siteagent.agent.control.prices import load_series, parse_csv, write_csv
from siteagent.agent.tools.backtest import make_prices
from siteagent.policies.prices import PriceFallback, PricePoint, PriceSeries, resolve

SERIES = PriceSeries([PricePoint(100.0, 0.05, 0.04, 2.0, 0.5), PricePoint(0.0, 0.06, 0.03, 2.1)])
FALLBACK = PriceFallback(stale_after_s=60.0, electricity_usd_per_kwh=0.3)


def test_lookup_takes_the_last_point_at_or_before() -> None:
    assert SERIES.at(-1.0) is None
    point = SERIES.at(99.0)
    assert point is not None and point.hashprice_usd_per_th_day == 0.06
    point = SERIES.at(100.0)
    assert point is not None and point.ai_demand_frac == 0.5


def test_fresh_point_is_used_as_is() -> None:
    p = resolve(SERIES.at(130.0), 130.0, FALLBACK)
    assert (p.electricity_usd_per_kwh, p.stale) == (0.04, ())


def test_stale_or_missing_point_means_the_stated_high_fallback() -> None:
    for point, now in ((SERIES.at(500.0), 500.0), (None, 0.0)):
        p = resolve(point, now, FALLBACK)
        assert p.electricity_usd_per_kwh == 0.3
        assert "electricity" in p.stale and "stale" in p.note


def test_csv_round_trip_and_json(tmp_path: Path) -> None:
    pts = make_prices(days=1)
    write_csv(pts, tmp_path / "p.csv")
    back = load_series(tmp_path / "p.csv")
    assert len(back) == 288
    assert abs(back.points[5].electricity_usd_per_kwh - pts[5].electricity_usd_per_kwh) < 1e-5
    rows = [
        {
            "timestamp_unix_s": 1,
            "hashprice_usd_per_th_day": 0.05,
            "electricity_usd_per_kwh": 0.1,
            "ai_usd_per_gpu_hour": 2,
        }
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert load_series(tmp_path / "p.json").points[0].ai_demand_frac is None


def test_bad_csv_names_the_row() -> None:
    try:
        parse_csv("timestamp_unix_s,hashprice_usd_per_th_day\n1,x\n")
    except ValueError as e:
        assert "row 2" in str(e)
    else:
        raise AssertionError("expected a PriceFormatError")


def test_shipped_sample_is_30_days_at_5_minutes_and_realistic() -> None:
    series = load_series(Path(__file__).parent.parent / "agent" / "data" / "prices_30d.csv")
    assert len(series) == 30 * 288
    pts = series.points
    assert all(0.04 <= p.hashprice_usd_per_th_day <= 0.06 for p in pts)
    assert max(p.electricity_usd_per_kwh for p in pts) > 0.4  # a few spikes
    assert 1.5 < min(p.ai_usd_per_gpu_hour for p in pts) < max(p.ai_usd_per_gpu_hour for p in pts)
    assert (Path(__file__).parent.parent / "agent" / "data" / "prices_30d.csv").stat().st_size < 1e6
