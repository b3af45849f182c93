import numpy as np
import pytest

from optical_ray import metrics


def test_ranks_recall_and_mrr_by_hand():
    scores = np.array([[0.9, 0.8, 0.1],   # relevant item 0 is first -> rank 1
                       [0.9, 0.8, 0.1],   # relevant item 1 is second -> rank 2
                       [0.2, 0.5, 0.4]])  # relevant item 2 is second -> rank 2
    relevant = np.eye(3, dtype=bool)
    ranks = metrics.first_relevant_rank(scores, relevant)
    np.testing.assert_array_equal(ranks, [1, 2, 2])
    assert metrics.recall_at(ranks, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at(ranks, 2) == 1.0
    assert metrics.mean_reciprocal_rank(ranks) == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_ties_are_pessimistic_and_duplicates_of_other_images_count_against():
    # Corpus items 0 and 1 are the same caption of two different images: identical scores.
    scores = np.array([[0.7, 0.7, 0.2]])
    assert metrics.first_relevant_rank(scores, np.array([[True, False, False]]))[0] == 2
    assert metrics.first_relevant_rank(scores, np.array([[False, True, False]]))[0] == 2
    # Two relevant captions of the same image tied at the top: still a hit at 1.
    assert metrics.first_relevant_rank(scores, np.array([[True, True, False]]))[0] == 1


def test_query_without_relevant_item_is_never_a_hit():
    ranks = metrics.first_relevant_rank(np.array([[0.3, 0.1]]), np.array([[False, False]]))
    assert np.isinf(ranks[0]) and metrics.recall_at(ranks, 10) == 0.0 and metrics.mean_reciprocal_rank(ranks) == 0.0


def test_ranks_by_label_chunks_equal_one_shot():
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(50, 8)), rng.normal(size=(40, 8))
    ql, cl = rng.integers(0, 20, 50), rng.integers(0, 20, 40)
    full = metrics.first_relevant_rank(q @ c.T, ql[:, None] == cl[None, :])
    np.testing.assert_array_equal(metrics.ranks_by_label(q, c, ql, cl, chunk=7), full)


def test_gap_and_bootstrap_interval():
    r1 = {"de": 0.9, "fr": 0.8, "ay": 0.1, "qu": 0.3}
    assert metrics.resource_gap(r1, ["de", "fr"], ["ay", "qu"]) == pytest.approx(0.65)
    rng = np.random.default_rng(1)
    hits = {"de": rng.random(400) < 0.9, "ay": rng.random(400) < 0.2}
    point = metrics.resource_gap({k: v.mean() for k, v in hits.items()}, ["de"], ["ay"])
    lo, hi = metrics.bootstrap_gap_ci(hits, ["de"], ["ay"], n_resamples=300)
    assert lo < point < hi and 0.05 < hi - lo < 0.2


def test_paired_bootstrap_of_a_gap_difference():
    rng = np.random.default_rng(2)
    before = {"de": rng.random(400) < 0.9, "ay": rng.random(400) < 0.2}
    assert metrics.bootstrap_gap_ci(before, ["de"], ["ay"], baseline=before) == (0.0, 0.0)
    # 20 of the low language's misses become hits: the gap shrinks by exactly 20/400 = 0.05.
    after = {"de": before["de"], "ay": before["ay"].copy()}
    after["ay"][np.flatnonzero(~before["ay"])[:20]] = True
    lo, hi = metrics.bootstrap_gap_ci(after, ["de"], ["ay"], n_resamples=500, baseline=before)
    assert lo < -0.05 < hi < 0  # a clear change, found only because the queries are paired
    unpaired = [metrics.bootstrap_gap_ci(h, ["de"], ["ay"], n_resamples=500) for h in (after, before)]
    assert unpaired[0][1] > unpaired[1][0]  # the two separate intervals overlap
    with pytest.raises(ValueError, match="ay: 400 queries vs 399 in the baseline"):
        metrics.bootstrap_gap_ci(after, ["de"], ["ay"], baseline={"de": before["de"], "ay": before["ay"][:-1]})
