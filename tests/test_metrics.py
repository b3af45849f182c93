import math

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


def test_gaps_by_hand():
    r1 = {"de": 0.9, "fr": 0.8, "ay": 0.1, "qu": 0.3}
    assert metrics.resource_gap(r1, ["de", "fr"], ["ay", "qu"]) == pytest.approx(0.65)
    assert metrics.relative_error_gap(r1, ["de", "fr"], ["ay", "qu"]) == pytest.approx(0.8 / 0.15)


def test_image_weighted_recall_by_hand():
    # 3 images; 4 queries of images 0, 0, 1, 2; two training seeds.
    query_images = np.array([0, 0, 1, 2])
    hits = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
    weights = np.array([[1.0, 1.0, 1.0],   # every image once: the plain mean, 0.5 for both seeds
                        [2.0, 0.0, 1.0]])  # image 0 twice, image 2 once: seed 0 2/5, seed 1 4/5
    np.testing.assert_allclose(metrics.weighted_recall(hits, query_images, weights), [0.5, 0.6])


def test_image_resamples_draw_whole_images():
    weights = metrics.image_resamples(50, 200, seed=1)
    assert weights.shape == (200, 50) and (weights.sum(axis=1) == 50).all()
    assert (weights == np.round(weights)).all() and 0.5 < weights.mean(axis=0).min()


def test_paired_image_bootstrap_of_a_gap_difference():
    """The same image draws for two systems: a change of 20 hits in 400 is clear, although two
    separate intervals overlap."""
    rng = np.random.default_rng(2)
    images = np.arange(400)
    before = {"de": (rng.random(400) < 0.9)[None], "ay": (rng.random(400) < 0.2)[None]}
    after = {"de": before["de"], "ay": before["ay"].copy()}
    after["ay"][0, np.flatnonzero(~before["ay"][0])[:20]] = True
    weights = metrics.image_resamples(400, 500, seed=0)

    def gap(h):
        return metrics.resource_gap({lang: metrics.weighted_recall(v, images, weights) for lang, v in h.items()},
                                    ["de"], ["ay"])

    lo, hi = metrics.percentile_interval(gap(after) - gap(before))
    assert lo < -0.05 < hi < 0
    assert metrics.percentile_interval(gap(before) - gap(before)) == (0.0, 0.0)
    separate = [metrics.percentile_interval(gap(h)) for h in (after, before)]
    assert separate[0][1] > separate[1][0]


def test_seed_weighted_recall_by_hand():
    """The outer level of the hierarchical bootstrap: each resample also draws the training seeds."""
    query_images = np.array([0, 0, 1, 2])
    hits = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
    weights = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    seeds = np.array([[2.0, 0.0],   # seed 0 twice: its plain mean, 0.5
                      [0.0, 2.0]])  # seed 1 twice under image weights (2, 0, 1): 4/5
    np.testing.assert_allclose(metrics.weighted_recall(hits, query_images, weights, seeds), [0.5, 0.8])
    draws = metrics.seed_resamples(3, 400, "ot+contrastive/student-init")
    assert draws.shape == (400, 3) and (draws.sum(axis=1) == 3).all()
    assert (draws == metrics.seed_resamples(3, 400, "ot+contrastive/student-init")).all()
    assert not (draws == metrics.seed_resamples(3, 400, "contrastive/student-init")).all()


def test_seed_spread_widens_the_interval_of_a_change():
    """Two arms equal on average but with seeds far apart: over images alone their difference looks
    clear, with the seeds drawn too it does not."""
    rng = np.random.default_rng(4)
    images = np.arange(500)
    weights = metrics.image_resamples(500, 400, seed=0)
    a = np.stack([rng.random(500) < p for p in (0.45, 0.55)])  # seed spread 0.1
    b = np.stack([rng.random(500) < p for p in (0.49, 0.49)])
    seeds_a, seeds_b = (metrics.seed_resamples(2, 400, key) for key in ("a", "b"))
    images_only = metrics.weighted_recall(a, images, weights) - metrics.weighted_recall(b, images, weights)
    with_seeds = (metrics.weighted_recall(a, images, weights, seeds_a)
                  - metrics.weighted_recall(b, images, weights, seeds_b))
    lo, hi = metrics.percentile_interval(with_seeds)
    assert lo < 0 < hi
    assert hi - lo > 1.5 * np.subtract(*metrics.percentile_interval(images_only)[::-1])


def test_bootstrap_p_is_a_wald_test_on_the_bootstrap_standard_error():
    draws = np.array([0.0, 0.1, 0.2, 0.1, 0.0, 0.2])  # sd 0.0894
    z = 0.1 / np.std(draws, ddof=1)
    assert metrics.bootstrap_p(0.1, draws) == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))))
    assert metrics.bootstrap_p(0.0, draws) == 1.0 and metrics.bootstrap_p(0.2, np.zeros(4)) == 0.0
