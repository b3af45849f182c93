"""Retrieval sets in the BEIR layout (Thakur et al., 2021, arXiv 2104.08663), one query file per language.

A set is a folder::

    corpus.jsonl          {"_id": ..., "text": ..., "title": ... (optional)}
    queries.jsonl         {"_id": ..., "text": ...}   the English queries (optional)
    queries.<lang>.jsonl  the same query ids in language <lang> (sw, quy, zh-Hant, ...)
    qrels/<split>.tsv     query-id <tab> corpus-id <tab> score, with a header line

Queries in every language share the qrels, so languages are compared on the same information needs
and their gap gets a paired bootstrap interval over query ids. nDCG@10, Recall@100 and MRR@10 come
from ir-measures (pytrec_eval underneath), not from code of ours; the search is exact inner product
(FAISS Flat) over the encoded corpus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ir_measures
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from ir_measures import RR, R, nDCG

from . import languages, metrics, parallel, storage
from .data import DataError
from .encoder import Encoder
from .index import build_index

MEASURES = {"nDCG@10": nDCG @ 10, "R@100": R @ 100, "MRR@10": RR @ 10}
DEPTH = 100  # documents retrieved per query: enough for Recall@100


@dataclass
class RetrievalSet:
    corpus: pa.Table  # _id, text
    queries: dict[str, pa.Table]  # language -> _id, text
    qrels: list[ir_measures.Qrel]


def load_set(uri: str, split: str = "test", english_lang: str = "en") -> RetrievalSet:
    """Read a BEIR-layout folder (local or s3://); every file problem names the file and line."""
    corpus = parallel.read_json_fields(storage.join(uri, "corpus.jsonl"), ["_id", "text"], optional=["title"])
    if "title" in corpus.column_names:  # BEIR's own encoders read title and text together
        title = pc.fill_null(corpus["title"], "")
        text = pc.if_else(pc.equal(title, ""), corpus["text"], pc.binary_join_element_wise(title, corpus["text"], " "))
        corpus = pa.table({"_id": corpus["_id"], "text": text})
    queries = {}
    for path in storage.list_files(uri, suffix=".jsonl"):
        name = path.rsplit("/", 1)[-1]
        if name == "queries.jsonl":
            queries[english_lang] = parallel.read_json_fields(path, ["_id", "text"])
        elif name.startswith("queries.") and name.count(".") == 2:
            lang = name.split(".")[1]
            why = languages.problem(lang)
            if why:
                raise DataError(f"{path}: the language in the file name, {lang!r}, is {why}")
            queries[lang] = parallel.read_json_fields(path, ["_id", "text"])
    if not queries:
        raise DataError(f"{uri}: no queries.jsonl or queries.<lang>.jsonl")
    qrels_uri = storage.join(uri, "qrels", f"{split}.tsv")
    table = pacsv.read_csv(pa.BufferReader(storage.read_bytes(qrels_uri)),
                           parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                           convert_options=pacsv.ConvertOptions(column_types={"query-id": pa.string(), "corpus-id": pa.string()}))
    missing = [c for c in ("query-id", "corpus-id", "score") if c not in table.column_names]
    if missing:
        raise DataError(f"{qrels_uri}: no column {missing[0]!r} (the header has: {', '.join(table.column_names)})")
    qrels = [ir_measures.Qrel(q, d, int(s)) for q, d, s in
             zip(table["query-id"].to_pylist(), table["corpus-id"].to_pylist(), table["score"].to_pylist())]
    return RetrievalSet(corpus, queries, qrels)


def search(encoder: Encoder, data: RetrievalSet, langs: Sequence[str] | None = None, batch_size: int = 64,
           progress: bool = True) -> dict[str, list[ir_measures.ScoredDoc]]:
    """Per language, each judged query's top ``DEPTH`` corpus documents by inner product."""
    judged = {q.query_id for q in data.qrels}
    corpus_emb = encoder.encode(data.corpus["text"].to_pylist(), "passage", batch_size,
                                progress="encode corpus" if progress else None)
    index = build_index(corpus_emb, "Flat", use_gpu=False)
    doc_ids = data.corpus["_id"].to_pylist()
    runs = {}
    for lang in langs or list(data.queries):
        if lang not in data.queries:
            raise DataError(f"no queries.{lang}.jsonl in the retrieval set (languages: {', '.join(data.queries)})")
        queries = data.queries[lang].filter(pc.is_in(data.queries[lang]["_id"], value_set=pa.array(sorted(judged))))
        emb = encoder.encode(queries["text"].to_pylist(), "query", batch_size,
                             progress=f"encode {lang} queries" if progress else None)
        scores, rows = index.search(np.ascontiguousarray(emb, dtype=np.float32), min(DEPTH, len(doc_ids)))
        runs[lang] = [ir_measures.ScoredDoc(q, doc_ids[r], float(s)) for q, row_s, row_r in
                      zip(queries["_id"].to_pylist(), scores, rows) for s, r in zip(row_s, row_r) if r >= 0]
    return runs


def evaluate(encoder: Encoder, uri: str, langs: Sequence[str] | None = None, high: Sequence[str] = (),
             low: Sequence[str] = (), split: str = "test", batch_size: int = 64, progress: bool = True) -> dict:
    """The report of :func:`build_report` for the BEIR-layout set at ``uri``."""
    data = load_set(uri, split)
    return build_report(data.qrels, search(encoder, data, langs, batch_size, progress), high, low)


def per_query(qrels: list[ir_measures.Qrel], run: list[ir_measures.ScoredDoc]) -> dict[str, dict[str, float]]:
    """measure name -> {query id: value}; a judged query that retrieved nothing scores 0."""
    values = {name: {q.query_id: 0.0 for q in qrels} for name in MEASURES}
    names = {str(m): name for name, m in MEASURES.items()}
    for m in ir_measures.iter_calc(list(MEASURES.values()), qrels, run):
        values[names[str(m.measure)]][m.query_id] = m.value
    return values


def build_report(qrels: list[ir_measures.Qrel], runs: dict[str, list[ir_measures.ScoredDoc]], high: Sequence[str],
                 low: Sequence[str], resamples: int = 1000, seed: int = 0) -> dict:
    """Per language the mean of each measure, and the nDCG@10 gap between the ``high`` and ``low``
    groups with a 95% bootstrap interval over query ids (paired: one draw serves every language)."""
    scores = {lang: per_query(qrels, run) for lang, run in runs.items()}
    query_ids = sorted({q.query_id for q in qrels})
    report = {"languages": {lang: {name: float(np.mean(list(v.values()))) for name, v in s.items()} |
                            {"n_queries": len(query_ids)} for lang, s in scores.items()}}
    high = [lang for lang in high if lang in scores]
    low = [lang for lang in low if lang in scores]
    gap = {"high": high, "low": low, "measure": "nDCG@10", "value": None, "interval": None}
    if high and low:
        weights = metrics.image_resamples(len(query_ids), resamples, seed)
        per_lang = {lang: np.array([scores[lang]["nDCG@10"][q] for q in query_ids]) for lang in high + low}
        draws = {lang: weights @ v / len(query_ids) for lang, v in per_lang.items()}
        gap["value"] = metrics.resource_gap({lang: v.mean() for lang, v in per_lang.items()}, high, low)
        gap["interval"] = list(metrics.percentile_interval(metrics.resource_gap(draws, high, low)))
    report["gap"] = gap
    return report


def report_markdown(report: dict, title: str) -> str:
    gap = report["gap"]
    lines = [f"# {title}", "", "| language | group | " + " | ".join(MEASURES) + " | queries |",
             "|---|---|" + "---|" * len(MEASURES) + "---|"]
    for lang, m in report["languages"].items():
        group = "high" if lang in gap["high"] else "low" if lang in gap["low"] else ""
        lines.append(f"| {lang} | {group} | " + " | ".join(f"{m[k]:.3f}" for k in MEASURES) + f" | {m['n_queries']} |")
    lines.append("")
    if gap["value"] is None:
        lines.append("Gap: not computed (a group has no evaluated language).")
    else:
        lo, hi = gap["interval"]
        lines.append(f"Gap (mean nDCG@10 of {', '.join(gap['high'])} minus {', '.join(gap['low'])}): "
                     f"**{gap['value']:.3f}** [95% bootstrap over queries: {lo:.3f}, {hi:.3f}]")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str, title: str) -> Path:
    """report.json and report.md (the table) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report, title))
    return out
