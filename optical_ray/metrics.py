"""Retrieval metrics: rank of the first relevant item, Recall@k, MRR, the high/low-resource gap and
bootstrap confidence intervals. Pure numpy; every function is checked against hand-computed cases.

Ties are broken pessimistically: an irrelevant item scoring exactly as high as the best relevant
item ranks before it. Duplicate captions of different images embed identically, so an optimistic
rule would credit a query with a hit it cannot tell from a miss.
"""

from __future__ import annotations

import base64
import math
import zlib

import numpy as np


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scoring relevant item; ``inf`` when it has none.

    scores, relevant: [queries, corpus] (float, bool).
    """
    best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)
    ahead = (~relevant & (scores >= best[:, None])).sum(axis=1)
    return np.where(np.isfinite(best), 1.0 + ahead, np.inf)


def ranks_by_label(queries: np.ndarray, corpus: np.ndarray, query_labels: np.ndarray,
                   corpus_labels: np.ndarray, chunk: int = 1024, masked: np.ndarray | None = None) -> np.ndarray:
    """Ranks for dot-product retrieval, where an item is relevant when its label equals the query's.

    ``masked`` (optional, [queries]) names one corpus row per query that is left out of its ranking
    (-1: none), e.g. the caption the query was translated from. Queries are scored in chunks so
    memory stays at chunk x corpus.
    """
    ranks = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        stop = start + chunk
        scores = queries[start:stop] @ corpus.T
        relevant = query_labels[start:stop, None] == corpus_labels[None, :]
        if masked is not None:
            rows = np.flatnonzero(masked[start:stop] >= 0)
            scores[rows, masked[start:stop][rows]] = -np.inf
            relevant[rows, masked[start:stop][rows]] = False
        ranks[start:stop] = first_relevant_rank(scores, relevant)
    return ranks


def recall_at(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks <= k))


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / ranks))


def retrieval_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float | int]:
    out: dict[str, float | int] = {f"R@{k}": recall_at(ranks, k) for k in ks}
    out["MRR"] = mean_reciprocal_rank(ranks)
    out["n_queries"] = len(ranks)
    return out


def resource_gap(recall_by_lang: dict, high: list[str], low: list[str]):
    """Mean over the high-resource languages minus mean over the low-resource ones (elementwise when
    the recalls are arrays of bootstrap draws)."""
    gap = np.mean([recall_by_lang[lang] for lang in high], axis=0) - np.mean([recall_by_lang[lang] for lang in low], axis=0)
    return float(gap) if np.ndim(gap) == 0 else gap


def relative_error_gap(recall_by_lang: dict, high: list[str], low: list[str]):
    """How many times more often the low group misses than the high group: (1 - mean R@1 of the low
    group) / (1 - mean R@1 of the high group). Unlike the absolute gap it does not shrink just because
    every language nears 1."""
    high_r = np.mean([recall_by_lang[lang] for lang in high], axis=0)
    low_r = np.mean([recall_by_lang[lang] for lang in low], axis=0)
    gap = (1.0 - low_r) / np.maximum(1.0 - high_r, 1e-12)
    return float(gap) if np.ndim(gap) == 0 else gap


def image_resamples(n_images: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap weights [n_resamples, n_images]: how often each image is drawn in each resample of
    ``n_images`` images with replacement. One draw serves every language, seed and system, so their
    queries of the same image stay together (they describe the same picture) and comparisons are paired."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples).astype(float)


def seed_resamples(n_seeds: int, n_resamples: int, key: str) -> np.ndarray:
    """Bootstrap weights [n_resamples, n_seeds]: how often each training seed of one system is drawn in
    each resample of its ``n_seeds`` seeds with replacement -- the outer level of a hierarchical
    bootstrap (Davison & Hinkley 1997, ch. 3.8) whose inner level is :func:`image_resamples`. ``key``
    names the system, so each one's seeds are drawn independently and reproducibly."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_resamples).astype(float)


def weighted_recall(hits: np.ndarray, query_images: np.ndarray, weights: np.ndarray,
                    seed_weights: np.ndarray | None = None) -> np.ndarray:
    """R@k under image weights, averaged over training seeds: [resamples].

    hits: [seeds, queries] 0/1; query_images: [queries] image index of each query; weights:
    [resamples, images] from :func:`image_resamples` (all-ones rows give the plain mean). A query counts
    as often as its image was drawn. ``seed_weights`` [resamples, seeds] (:func:`seed_resamples`) draws
    the seeds too, so the spread between training runs enters the interval; None: every seed once.
    """
    hits = np.atleast_2d(np.asarray(hits, dtype=float))
    n_images = weights.shape[1]
    per_image = np.zeros((hits.shape[0], n_images))
    np.add.at(per_image.T, query_images, hits.T)
    queries_per_image = np.bincount(query_images, minlength=n_images).astype(float)
    recall = (weights @ per_image.T) / (weights @ queries_per_image)[:, None]  # [resamples, seeds]
    if seed_weights is None:
        return recall.mean(axis=1)
    return (recall * seed_weights).sum(axis=1) / seed_weights.sum(axis=1)


def bootstrap_p(estimate: float, draws: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0": a Wald test with the bootstrap standard error
    (``estimate`` / sd of its bootstrap ``draws``, normal approximation). Unlike counting draws beyond
    0, it does not bottom out at 1 / resamples, which a multiple-testing correction over tens of
    comparisons needs (Holm's first threshold for 40 is 0.00125)."""
    se = float(np.std(draws, ddof=1))
    if se == 0.0:
        return 1.0 if estimate == 0 else 0.0
    return math.erfc(abs(estimate) / se / math.sqrt(2))


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# Ranks travel in the records compactly: uint32, 0 for "never found" (inf), zlib, base64.
def pack_ranks(ranks: np.ndarray) -> str:
    values = np.where(np.isfinite(ranks), ranks, 0).astype("<u4")
    return base64.b64encode(zlib.compress(values.tobytes(), 9)).decode()


def unpack_ranks(packed: str) -> np.ndarray:
    values = np.frombuffer(zlib.decompress(base64.b64decode(packed)), dtype="<u4").astype(float)
    return np.where(values == 0, np.inf, values)
