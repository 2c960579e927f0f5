"""Pareto utilities for LTS (nasjax.search.pareto)."""

import numpy as np
import pytest

from nasjax.search import pareto
from nasjax.search.pareto import dominates, lower_convex_hull_indices, parent_weights, pareto_indices


def brute_force_pareto(points):
    """methods.md Appendix A: dominated iff another point is strictly smaller everywhere."""
    keep = []
    for i, p in enumerate(points):
        if not any(np.all(q < p) for j, q in enumerate(points) if j != i):
            keep.append(i)
    return keep


def _random_sets(n_sets=50, seed=0):
    rng = np.random.default_rng(seed)
    for s in range(n_sets):
        k = 2 if s % 2 == 0 else 3
        n = int(rng.integers(1, 60))
        if s % 3 == 0:  # few distinct values: many ties
            pts = rng.integers(0, 4, size=(n, k)).astype(float)
        else:
            pts = rng.normal(size=(n, k))
        if n > 2:  # explicit duplicate rows
            dup = rng.integers(0, n, size=int(rng.integers(1, n)))
            pts = np.concatenate([pts, pts[dup]])
            pts = pts[rng.permutation(len(pts))]
        yield pts


def test_pareto_matches_brute_force():
    sizes = []
    for pts in _random_sets():
        got = pareto_indices(pts)
        assert got.dtype == np.int64
        assert got.tolist() == brute_force_pareto(pts)
        assert list(got) == sorted(got)
        sizes.append(len(got))
    assert min(sizes) >= 1 and max(sizes) > 3


def test_pareto_chunking_and_lists(monkeypatch):
    rng = np.random.default_rng(5)
    pts = rng.integers(0, 20, size=(400, 3))
    full = pareto_indices(pts)
    monkeypatch.setattr(pareto, "_CHUNK_ELEMENTS", 50)
    assert pareto_indices(pts).tolist() == full.tolist()
    assert pareto_indices(pts.tolist()).tolist() == full.tolist()
    assert pareto_indices(pts[:60]).tolist() == brute_force_pareto(pts[:60])


def test_pareto_large_is_fast():
    rng = np.random.default_rng(6)
    pts = rng.random((3000, 3))
    front = pareto_indices(pts)  # 3000^2 comparisons in numpy
    assert 0 < len(front) < 3000
    sub = np.sort(rng.choice(3000, 150, replace=False))
    # a subset's front contains every front member that is in the subset
    sub_front = set(sub[pareto_indices(pts[sub])].tolist())
    assert set(front.tolist()) & set(sub.tolist()) <= sub_front


def test_pareto_known_cases():
    assert pareto_indices(np.zeros((0, 3))).tolist() == []
    assert pareto_indices([]).tolist() == []
    assert pareto_indices([[1.0, 2.0]]).tolist() == [0]
    assert pareto_indices([[0, 0], [1, 1]]).tolist() == [0]
    # strict rule: a tie in one objective protects the point
    assert pareto_indices([[0, 1], [0, 2], [1, 0]]).tolist() == [0, 1, 2]
    assert pareto_indices([[2, 2], [2, 2], [2, 2]]).tolist() == [0, 1, 2]
    assert pareto_indices([[np.inf, 1], [1, 2], [0, 0]]).tolist() == [2]
    assert pareto_indices([[np.inf, 1], [1, 2], [0, 1]]).tolist() == [0, 2]
    with pytest.raises(ValueError, match="NaN"):
        pareto_indices([[0, np.nan], [1, 1]])
    with pytest.raises(ValueError, match="2-D"):
        pareto_indices([1, 2, 3])


def test_dominates():
    assert dominates([0, 0], [1, 1])
    assert not dominates([0, 1], [1, 1])  # not strictly better in y
    assert dominates([0, 1], [1, 1], strict=False)
    assert not dominates([1, 1], [1, 1], strict=False)
    assert not dominates([1, 1], [1, 1])
    assert not dominates([0, 2], [1, 1], strict=False)
    with pytest.raises(ValueError):
        dominates([0, 1], [0, 1, 2])


def test_lower_convex_hull_known_cases():
    pts = [(1, 10), (2, 5), (3, 4), (4, 1), (6, 2), (3, 8), (5, 3)]
    assert lower_convex_hull_indices(pts).tolist() == [0, 1, 3]
    assert lower_convex_hull_indices(pts, keep_increasing=True).tolist() == [0, 1, 3, 4]
    # collinear points are not vertices
    assert lower_convex_hull_indices([(0, 2), (1, 1), (2, 0)]).tolist() == [0, 2]
    # of equal x only the lowest y; of duplicates the first index
    assert lower_convex_hull_indices([(0, 5), (0, 1), (1, 0)]).tolist() == [1, 2]
    assert lower_convex_hull_indices([(1, 1), (0, 3), (1, 1), (0, 3)]).tolist() == [1, 0]
    # square with a centre point
    square = [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)]
    assert lower_convex_hull_indices(square).tolist() == [0]
    assert lower_convex_hull_indices(square, keep_increasing=True).tolist() == [0, 1]
    assert lower_convex_hull_indices([(3, 4)]).tolist() == [0]
    assert lower_convex_hull_indices(np.zeros((0, 2))).tolist() == []
    with pytest.raises(ValueError, match="2 columns"):
        lower_convex_hull_indices([(0, 1, 2)])
    with pytest.raises(ValueError, match="finite"):
        lower_convex_hull_indices([(0, np.inf), (1, 1)])


def test_lower_convex_hull_properties():
    rng = np.random.default_rng(7)
    for _ in range(30):
        pts = rng.random((int(rng.integers(3, 80)), 2))
        hull = lower_convex_hull_indices(pts, keep_increasing=True)
        hx, hy = pts[hull, 0], pts[hull, 1]
        assert hull[0] == np.argmin(pts[:, 0]) and hull[-1] == np.argmax(pts[:, 0])
        assert np.all(np.diff(hx) > 0)
        slopes = np.diff(hy) / np.diff(hx)
        assert np.all(np.diff(slopes) > 0)  # strictly convex
        # every point lies on or above the hull polyline
        assert np.all(pts[:, 1] >= np.interp(pts[:, 0], hx, hy) - 1e-12)
        trimmed = lower_convex_hull_indices(pts)
        assert trimmed.tolist() == hull[: len(trimmed)].tolist()
        assert trimmed[-1] == np.argmin(pts[:, 1])
        assert set(trimmed.tolist()) <= set(pareto_indices(pts).tolist())


def test_parent_weights():
    np.testing.assert_allclose(parent_weights([0, 10]), [2 / 3, 1 / 3])
    np.testing.assert_allclose(parent_weights([3, 3, 3, 3]), [0.25] * 4)
    np.testing.assert_allclose(parent_weights([0, 0]), [0.5, 0.5])
    assert parent_weights([]).shape == (0,)
    rng = np.random.default_rng(8)
    for _ in range(20):
        c = rng.integers(0, 30, size=int(rng.integers(2, 20)))
        if c.max() == c.min():
            continue
        w = parent_weights(c)
        assert w.sum() == pytest.approx(1.0)
        ref = 1.0 / ((c - c.min()) / (c.max() - c.min()) + 1.0)  # methods.md Appendix A
        np.testing.assert_allclose(w, ref / ref.sum())
        # rarely used members weigh more; the extremes differ by exactly 2x
        order = np.argsort(c, kind="stable")
        assert np.all(np.diff(w[order]) <= 1e-15)
        assert w.max() / w.min() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        parent_weights([1, -1])
    with pytest.raises(ValueError):
        parent_weights([[1, 2]])
