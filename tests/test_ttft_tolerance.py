"""benchmarks/ttft_tolerance.py's band of cycle scales within a TTFT limit (docs/calibration.md, *What the TTFT goals
ask of the cycle*): the figure the docs quote is this interpolation."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "ttft_tolerance", Path(__file__).resolve().parents[1] / "benchmarks" / "ttft_tolerance.py"
)
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)


def test_band_ends_are_interpolated_where_the_error_reaches_the_limit():
    s = [0.98, 0.99, 1.0, 1.01, 1.02]
    assert tt.tolerance_band(s, [-40.0, -20.0, -10.0, 10.0, 40.0], 15.0) == pytest.approx((0.995, 1.01 + 0.01 / 6))


def test_band_is_the_region_around_the_least_error_not_another_one_and_stops_at_the_grid():
    s = [0.9, 1.0, 1.1, 1.2, 1.3]
    # two regions inside the limit; the one with the least |error| (1.2–1.3) is returned, its right end the grid's
    assert tt.tolerance_band(s, [5.0, 30.0, 20.0, 1.0, 2.0], 10.0) == pytest.approx((1.1 + 0.1 * 10 / 19, 1.3))


def test_no_band_when_no_scale_is_within_the_limit():
    assert tt.tolerance_band([1.0, 1.1], [-20.0, 30.0], 15.0) is None
