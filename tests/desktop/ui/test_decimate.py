"""Decimation for the screen: the lowest and highest point of every pixel column survive, in order."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from desktop.ui.decimate import decimate


def columns_extremes_kept(x: np.ndarray, y: np.ndarray, x0: float, width: float, keep: np.ndarray) -> None:
    """Every column's lowest and highest finite value is among the kept points of that column."""
    column = np.floor((x - x0) / width)
    finite = np.isfinite(y)
    for c in np.unique(column[finite]):
        here, kept = (column == c) & finite, np.zeros(len(x), dtype=bool)
        kept[keep] = True
        assert y[here].min() in y[here & kept] and y[here].max() in y[here & kept]


def test_a_long_line_keeps_each_columns_lowest_and_highest_point_and_nothing_else() -> None:
    rng = np.random.default_rng(1)
    x = np.arange(1.0, 5001.0)  # steps, as the state records them
    y = np.cumsum(rng.standard_normal(5000))
    y[1233] = 1e3  # one spike: a pixel column must still show it
    keep = decimate(x, y, 0.0, 50.0)  # 100 columns of 50 steps
    assert np.all(np.diff(keep) > 0)  # the line's own order, no point twice
    assert len(keep) <= 2 * 101
    assert 1233 in keep
    columns_extremes_kept(x, y, 0.0, 50.0, keep)


def test_a_sparse_line_is_kept_whole_and_gaps_stay_gaps() -> None:
    x = np.arange(0.0, 10.0)
    y = np.array([0.1, 0.2, np.nan, 0.4, 0.5, 0.6, np.nan, np.nan, 0.9, 1.0])
    assert decimate(x, y, 0.0, 1.0).tolist() == list(range(10))  # one point a column: every one
    keep = decimate(x, y, 0.0, 5.0)  # two columns: their extremes, and every NaN (the line breaks there)
    assert {2, 6, 7} <= set(keep.tolist()) and {0, 4, 5, 9} <= set(keep.tolist())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-1e6, 1e6) | st.just(float("nan"))), min_size=1,
                max_size=200),
       st.floats(0.1, 20.0))
def test_any_line_keeps_every_columns_extremes(points, width) -> None:
    x, y = (np.array(v, dtype=np.float64) for v in zip(*points))  # x in any order: runs per column
    keep = decimate(x, y, -50.0, width)
    assert np.all(np.diff(keep) > 0)
    assert set(np.flatnonzero(np.isnan(y)).tolist()) <= set(keep.tolist())
    columns_extremes_kept(x, y, -50.0, width, keep)
