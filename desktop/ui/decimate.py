"""Which points of a line to draw: at most two per pixel column, the two the eye needs.

A line with more points than its plot has pixel columns draws many points into
one column, and all that column shows of them is a vertical stroke from their
lowest to their highest. :func:`decimate` keeps, per column, exactly those two
points (peak-preserving min/max), in their order along the line, so the drawn
line reaches every extreme the full line reaches, at the step where it reached
it, and never more than two points a pixel go to the painter. A column with one
point keeps it: a sparse line is drawn whole. Non-finite values are kept too:
they are the line's gaps (the painter breaks the line there).

Pure numpy; no Qt.
"""
from __future__ import annotations

import numpy as np


def decimate(x: np.ndarray, y: np.ndarray, x0: float, width: float) -> np.ndarray:
    """Indices of the points to draw: per run of points in one pixel column, its lowest and highest.

    Column ``k`` holds ``x0 + k * width <= x < x0 + (k + 1) * width``. A run is consecutive
    points in one column (x need not grow: a line that comes back into a column starts a
    new run there). Points whose x or y is not finite are all kept.

    Args:
        x: [n] the points' x values.
        y: [n] their y values.
        x0: where column 0 starts (the view's left edge).
        width: a column's width in x units (> 0): the view's x span over its width in pixels.

    Returns:
        [k] int64, ascending (the line's own order); k <= 2 * runs + the non-finite points.
    """
    if not len(x):
        return np.zeros(0, dtype=np.int64)
    finite = np.isfinite(x) & np.isfinite(y)
    at = np.flatnonzero(finite)  # [m] the finite points' indices
    if not len(at):
        return np.arange(len(x), dtype=np.int64)
    column = np.floor((x[at] - x0) / width)  # [m]
    values = y[at]  # [m]
    new_run = np.empty(len(at), dtype=bool)  # [m] True where a run starts
    new_run[0] = True
    np.not_equal(column[1:], column[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)  # [r]
    lengths = np.diff(np.append(starts, len(at)))  # [r]
    lowest = _first_hit(values == np.repeat(np.minimum.reduceat(values, starts), lengths), column)  # [r]
    highest = _first_hit(values == np.repeat(np.maximum.reduceat(values, starts), lengths), column)  # [r]
    keep = ~finite  # [n] (a mask, not np.unique: sorting the indices cost a third of the call)
    keep[at[lowest]] = True
    keep[at[highest]] = True
    return np.flatnonzero(keep)


def _first_hit(hit: np.ndarray, column: np.ndarray) -> np.ndarray:
    """Per run (each has at least one hit), the position of its first hit. ``hit``, ``column``: [m].

    Two hits in a row belong to different runs exactly when their columns differ: every run has
    a hit, so hits of two runs in a row are of neighbouring runs, which are of different columns.
    """
    positions = np.flatnonzero(hit)
    first = np.empty(len(positions), dtype=bool)
    first[0] = True
    np.not_equal(column[positions[1:]], column[positions[:-1]], out=first[1:])
    return positions[first]
