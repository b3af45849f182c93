"""Cross-lingual caption retrieval: queries in language L against the English captions.

A query is a hit at k when one of its top-k corpus captions belongs to the query's image. The report
(``report.json``) holds R@1/5/10, MRR and the query count per language, and the high/low-resource
gap: mean R@1 of the high group minus mean R@1 of the low group.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import metrics
from .data import DataError, corpus_captions, query_captions, source_caption_rows
from .encoder import Encoder
from .parallel import read_lines

# Models compared with each other (before and after training, the experiment's arms) are scored at one
# length, whatever each saved folder states, so truncation is not what differs between them. 128 tokens
# hold all but 0.4% of the shared test captions; the rest are mostly degenerate machine translations.
COMPARISON_MAX_LENGTH = 128


def rank_queries(encoder: Encoder, captions: pa.Table, query_langs: list[str], corpus_lang: str = "en",
                 batch_size: int = 64, progress: bool = True, mask_source: bool = False) -> dict[str, np.ndarray]:
    """Per language, the 1-based rank of each query's first caption of its own image.

    With ``mask_source`` the corpus caption a query was translated from (same image_id and
    caption_idx) is left out of its ranking: the query must find its image through the *other*
    captions, which describe the picture in other words (semantic retrieval, not translation matching).
    """
    corpus = corpus_captions(captions, corpus_lang)
    corpus_emb = encoder.encode(corpus["text"].to_pylist(), "passage", batch_size,
                                progress=f"encode {corpus_lang} corpus" if progress else None)
    labels, corpus_labels = np.unique(corpus["image_id"].to_numpy(), return_inverse=True)
    ranks = {}
    for lang in query_langs:
        queries = query_captions(captions, lang)
        query_images = queries["image_id"].to_numpy()
        query_emb = encoder.encode(queries["text"].to_pylist(), "query", batch_size,
                                   progress=f"encode {lang} queries" if progress else None)
        # Queries whose image has no corpus caption get label -1: never a hit, but still counted.
        pos = np.minimum(np.searchsorted(labels, query_images), len(labels) - 1)
        query_labels = np.where(labels[pos] == query_images, pos, -1)
        masked = source_caption_rows(queries, captions, corpus, corpus_lang) if mask_source else None
        ranks[lang] = metrics.ranks_by_label(query_emb, corpus_emb, query_labels, corpus_labels, masked=masked)
    return ranks


def build_report(ranks: dict[str, np.ndarray], high: Sequence[str] = (), low: Sequence[str] = ()) -> dict:
    """The report.json structure; the gap covers the group members that were evaluated (the groups
    come from the caller's configuration: none here)."""
    languages = {lang: metrics.retrieval_metrics(r) for lang, r in ranks.items()}
    high = [lang for lang in high if lang in languages]
    low = [lang for lang in low if lang in languages]
    gap = None
    if high and low:
        gap = metrics.resource_gap({lang: m["R@1"] for lang, m in languages.items()}, high, low)
    return {"languages": languages, "gap": {"high": high, "low": low, "R@1": gap}}


def evaluate(encoder: Encoder, captions: pa.Table, query_langs: list[str], corpus_lang: str = "en",
             high: Sequence[str] = (), low: Sequence[str] = (), batch_size: int = 64,
             progress: bool = True, mask_source: bool = False) -> dict:
    ranks = rank_queries(encoder, captions, query_langs, corpus_lang, batch_size, progress, mask_source)
    return build_report(ranks, high, low)


def rank_bitext(encoder: Encoder, english: list[str], others: dict[str, list[str]], batch_size: int = 64,
                progress: bool = True) -> dict[str, np.ndarray]:
    """Bitext retrieval (FLORES / Tatoeba style): per language, the 1-based rank of each sentence's
    English translation (the line with its number) among all the English sentences. Identical English
    sentences count as the same translation."""
    _, labels = np.unique(np.array(english, dtype=object), return_inverse=True)
    corpus = encoder.encode(english, "passage", batch_size, progress="encode English" if progress else None)
    ranks = {}
    for lang, sentences in others.items():
        if len(sentences) != len(english):
            raise DataError(f"bitext {lang}: {len(sentences)} sentences for {len(english)} English ones; the files "
                            "must be line-aligned")
        queries = encoder.encode(sentences, "query", batch_size, progress=f"encode {lang}" if progress else None)
        ranks[lang] = metrics.ranks_by_label(queries, corpus, labels, labels)
    return ranks


def read_bitext(english_uri: str, files: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """The English lines and each language's (``files``: language -> file, local or s3://), checked to
    be line-aligned."""
    english = read_lines(english_uri)
    others = {}
    for lang, uri in files.items():
        others[lang] = read_lines(uri)
        if len(others[lang]) != len(english):
            raise DataError(f"line counts differ: {english_uri} has {len(english)} lines, {uri} has {len(others[lang])}")
    return english, others


def bitext_report(encoder: Encoder, english: list[str], others: dict[str, list[str]], high: Sequence[str] = (),
                  low: Sequence[str] = (), batch_size: int = 64, progress: bool = True) -> dict:
    """:func:`rank_bitext` as a report, with the gap's paired bootstrap interval."""
    ranks = rank_bitext(encoder, english, others, batch_size, progress)
    report = build_report(ranks, high, low)
    report["gap"]["interval"] = gap_interval(ranks, high, low)
    return report


def evaluate_bitext(encoder: Encoder, english_uri: str, files: dict[str, str], high: Sequence[str] = (),
                    low: Sequence[str] = (), batch_size: int = 64, progress: bool = True) -> dict:
    """:func:`bitext_report` on line-aligned files."""
    english, others = read_bitext(english_uri, files)
    return bitext_report(encoder, english, others, high, low, batch_size, progress)


def gap_interval(ranks: dict[str, np.ndarray], high: Sequence[str], low: Sequence[str], resamples: int = 1000,
                 seed: int = 0) -> list[float] | None:
    """A 95% bootstrap interval of the R@1 gap for queries that are the same items in every language
    (line i of multi-way parallel bitext): one draw of items serves all languages, so it is paired."""
    high, low = [g for g in high if g in ranks], [g for g in low if g in ranks]
    if not (high and low):
        return None
    n = len(next(iter(ranks.values())))
    weights = metrics.image_resamples(n, resamples, seed)
    draws = {lang: metrics.weighted_recall(ranks[lang] <= 1, np.arange(n), weights) for lang in high + low}
    return list(metrics.percentile_interval(metrics.resource_gap(draws, high, low)))


def write_report(report: dict, out_dir: str | Path, title: str = "Cross-lingual caption retrieval") -> Path:
    """report.json, report.md (a table) and recall.png (R@1 per language, groups marked)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report, title))
    plot_recall(report, out / "recall.png", title)
    return out


def report_markdown(report: dict, title: str) -> str:
    gap = report["gap"]
    lines = [f"# {title}", "", "| language | group | R@1 | R@5 | R@10 | MRR | queries |", "|---|---|---|---|---|---|---|"]
    for lang, m in report["languages"].items():
        group = "high" if lang in gap["high"] else "low" if lang in gap["low"] else ""
        lines.append(f"| {lang} | {group} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['MRR']:.3f} | {m['n_queries']} |")
    lines.append("")
    if gap["R@1"] is None:
        lines.append("Gap: not computed (a group has no evaluated language).")
    else:
        interval = f" [95% paired bootstrap: {gap['interval'][0]:.3f}, {gap['interval'][1]:.3f}]" if gap.get("interval") else ""
        lines.append(f"Gap (mean R@1 of {', '.join(gap['high'])} minus mean R@1 of {', '.join(gap['low'])}): "
                     f"**{gap['R@1']:.3f}**{interval}")
    return "\n".join(lines) + "\n"


def plot_recall(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gap = report["gap"]
    langs = list(report["languages"])
    colors = ["tab:blue" if lang in gap["high"] else "tab:orange" if lang in gap["low"] else "tab:gray" for lang in langs]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(langs) + 2), 3.5))
    ax.bar(langs, [report["languages"][lang]["R@1"] for lang in langs], color=colors)
    ax.set_ylim(0, 1)
    ax.set_ylabel("R@1")
    subtitle = "" if gap["R@1"] is None else f" (gap {gap['R@1']:.3f})"
    ax.set_title(title + subtitle, fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="high-resource"), Patch(color="tab:orange", label="low-resource"),
                       Patch(color="tab:gray", label="other")], fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
