"""Retrieval metrics: rank of the first relevant item, Recall@k, MRR, the high/low-resource gap and
bootstrap confidence intervals. Pure numpy; every function is checked against hand-computed cases.

Ties are broken pessimistically: an irrelevant item scoring exactly as high as the best relevant
item ranks before it. Duplicate captions of different images embed identically, so an optimistic
rule would credit a query with a hit it cannot tell from a miss.
"""

from __future__ import annotations

import numpy as np


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scoring relevant item; ``inf`` when it has none.

    scores, relevant: [queries, corpus] (float, bool).
    """
    best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)
    ahead = (~relevant & (scores >= best[:, None])).sum(axis=1)
    return np.where(np.isfinite(best), 1.0 + ahead, np.inf)


def ranks_by_label(queries: np.ndarray, corpus: np.ndarray, query_labels: np.ndarray,
                   corpus_labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Ranks for dot-product retrieval, where an item is relevant when its label equals the query's.

    Queries are scored in chunks so memory stays at chunk x corpus.
    """
    ranks = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        stop = start + chunk
        scores = queries[start:stop] @ corpus.T
        relevant = query_labels[start:stop, None] == corpus_labels[None, :]
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


def resource_gap(recall_by_lang: dict[str, float], high: list[str], low: list[str]) -> float:
    """Mean over the high-resource languages minus mean over the low-resource ones."""
    return float(np.mean([recall_by_lang[lang] for lang in high]) - np.mean([recall_by_lang[lang] for lang in low]))


def bootstrap_gap_ci(hits_by_lang: dict[str, np.ndarray], high: list[str], low: list[str],
                     n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                     baseline: dict[str, np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`resource_gap`, resampling each language's queries
    (0/1 hit indicators) independently with replacement.

    With ``baseline`` -- the same queries' hits under another system, in the same order -- the
    interval is of the gap *difference* (this system's gap minus the baseline's), each resample
    drawing the same queries for both (a paired bootstrap). It is much narrower than comparing two
    separate intervals, because per-query difficulty is shared by both systems.
    """
    rng = np.random.default_rng(seed)
    langs = [*high, *low]
    draws = np.zeros(n_resamples)
    for lang in langs:
        hits = np.asarray(hits_by_lang[lang], dtype=float)
        if baseline is not None:
            if len(baseline[lang]) != len(hits):
                raise ValueError(f"{lang}: {len(hits)} queries vs {len(baseline[lang])} in the baseline")
            hits = hits - np.asarray(baseline[lang], dtype=float)
        sign = 1.0 / len(high) if lang in high else -1.0 / len(low)
        idx = rng.integers(0, len(hits), size=(n_resamples, len(hits)))
        draws += sign * hits[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
