"""Pareto-front utilities for LiteTransformerSearch (methods.md §3(b), Appendix A). Pure numpy.

Conventions: rows are candidates, columns objectives, and every objective is
*minimised* (LTS uses ``(max_params - params, latency, peak_memory)``; pass ``-params``
or ``max - params`` for a maximised quantity).

* :func:`pareto_indices`: LTS's non-dominated filter, where a point is dominated only by
  a point that is **strictly** smaller in every coordinate (archai's ``neurips-lts``
  code). So ties and duplicates are all kept: two points equal in one objective never
  dominate each other.
* :func:`lower_convex_hull_indices`: the lower convex hull of 2-D points, the "convex
  hull" selection variant (archai's ``calculate_convex_hull``, Andrew's monotone chain):
  only hull *vertices* are returned (collinear and duplicate points are dropped), and by
  default the hull is cut at its lowest point so that it runs from the smallest x to
  the smallest y, i.e. the convex part of the Pareto front of (x, y), both minimised.
* :func:`parent_weights`: LTS's parent-sampling weights, favouring front members that
  appeared in few past populations.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pareto_indices", "dominates", "lower_convex_hull_indices", "parent_weights"]

# elements of the (chunk, n, k) comparison tensor built at a time by pareto_indices
_CHUNK_ELEMENTS = 4_000_000


def _as_points(points, what: str, n_cols: int | None = None) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return pts.reshape(0, n_cols or (pts.shape[-1] if pts.ndim == 2 else 0))
    if pts.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (candidates x objectives), got shape {pts.shape}")
    if n_cols is not None and pts.shape[1] != n_cols:
        raise ValueError(f"{what}: expected {n_cols} columns, got shape {pts.shape}")
    if np.isnan(pts).any():
        raise ValueError(f"{what}: contains NaN (use +inf for a failed candidate)")
    return pts


def dominates(a, b, strict: bool = True) -> bool:
    """Whether point ``a`` dominates point ``b`` (all objectives minimised).

    ``strict=True`` (LTS): ``a`` is strictly smaller in every coordinate.
    ``strict=False`` (the usual Pareto dominance): ``a <= b`` everywhere and ``a < b``
    somewhere.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"dominates: points of different shapes {a.shape} and {b.shape}")
    if strict:
        return bool(np.all(a < b))
    return bool(np.all(a <= b) and np.any(a < b))


def pareto_indices(points) -> np.ndarray:
    """Sorted indices of the non-dominated rows of ``points`` (all objectives minimised).

    Row ``i`` is dominated iff some row is strictly smaller in every coordinate (LTS's
    rule; see :func:`dominates`). Vectorised: the O(n^2 k) comparisons are done by
    broadcasting over chunks of rows. ``+inf`` is allowed (a failed candidate), NaN is not.

    Returns:
      int64 array of row indices in increasing order (empty for no points).
    """
    pts = _as_points(points, "pareto_indices")
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = pts.shape[1]
    dominated = np.zeros(n, dtype=bool)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * k))
    for start in range(0, n, chunk):
        block = pts[start : start + chunk]  # (c, k): the rows being tested
        # better[c, j]: row j is strictly smaller than block row c in every objective
        better = np.all(pts[None, :, :] < block[:, None, :], axis=2)
        dominated[start : start + chunk] = better.any(axis=1)
    return np.flatnonzero(~dominated).astype(np.int64)


def lower_convex_hull_indices(points_2d, keep_increasing: bool = False) -> np.ndarray:
    """Indices of the vertices of the lower convex hull of 2-D points, by increasing x.

    ``x`` is e.g. latency and ``y`` e.g. ``-params`` or validation loss, both minimised.
    Andrew's monotone chain on the points sorted by (x, y): of several points with the
    same x only the lowest (first index on ties) can be a vertex, and collinear points
    between two vertices are not vertices. With ``keep_increasing=False`` (default, as
    archai's ``allow_increase=False``) the hull stops at its lowest point: the result runs
    from the leftmost-lowest point down to the lowest point (first by x on ties), which is
    the convex part of the (x, y) Pareto front. ``keep_increasing=True`` returns the whole
    lower hull up to the rightmost x.

    Returns:
      int64 array of row indices (empty for no points).
    """
    pts = _as_points(points_2d, "lower_convex_hull_indices", n_cols=2)
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.isfinite(pts).all():
        raise ValueError("lower_convex_hull_indices: points must be finite")
    order = np.lexsort((np.arange(n), pts[:, 1], pts[:, 0]))  # by x, then y, then index
    xs = pts[order, 0]
    first_of_x = np.ones(n, dtype=bool)
    first_of_x[1:] = xs[1:] != xs[:-1]
    hull: list[int] = []
    for i in order[first_of_x]:
        xi, yi = pts[i]
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = pts[hull[-2]], pts[hull[-1]]
            # keep hull[-1] only for a strict counter-clockwise turn hull[-2] -> hull[-1] -> i
            if (x1 - x0) * (yi - y0) - (y1 - y0) * (xi - x0) > 0:
                break
            hull.pop()
        hull.append(int(i))
    if not keep_increasing:
        ys = pts[hull, 1]
        hull = hull[: int(np.argmin(ys)) + 1]
    return np.asarray(hull, dtype=np.int64)


def parent_weights(counts) -> np.ndarray:
    """LTS parent-sampling probabilities (methods.md Appendix A), summing to 1.

    ``counts[i]`` is how many past populations front member ``i`` appeared in;
    ``w_i = 1 / (1 + (c_i - min c) / (max c - min c))``, so the least used members get
    weight 1 and the most used 1/2 before normalisation. Equal counts (including all
    zero, where the reference formula divides 0 by 0) give uniform weights.
    """
    c = np.asarray(counts, dtype=float)
    if c.ndim != 1:
        raise ValueError(f"parent_weights: expected a 1-D list of counts, got shape {c.shape}")
    if c.size == 0:
        return np.zeros(0)
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("parent_weights: counts must be finite and non-negative")
    span = c.max() - c.min()
    if span == 0:
        return np.full(c.size, 1.0 / c.size)
    w = 1.0 / ((c - c.min()) / span + 1.0)
    return w / w.sum()
