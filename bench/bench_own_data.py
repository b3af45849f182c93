"""A team's own data at scale (issue #32). Run by hand:

    .venv/bin/python bench/bench_own_data.py [--pairs 1000000] [--docs 100000] [--queries 1000]

1. ``data prepare`` rows/s: a generated TSV of ``--pairs`` English<->sw pairs (sentences drawn from the
   bundled captions, numbered so that none is a duplicate) against the caption-table path on the
   bundled sample's caption tables, both through :func:`optical_ray.prepare.prepare_bitext` (read,
   clean, write shards), side by side in one run; the ratio is what to compare on a noisy box.
2. BEIR evaluation: the time ir-measures takes per 1,000 queries (nDCG@10, Recall@100, MRR@10 over
   top-100 runs) and FAISS Flat search over ``--docs`` documents, against the student's time to encode
   those 1,000 queries on this CPU: the metric library must not be the bottleneck. Corpus vectors are
   random (encoding 100k documents is the index bench's business), qrels give each query 3 documents.
3. Filtered search: recall@10 against exact filtered search for HNSW32 on ``--docs`` clustered vectors
   with a language-like field of 11 values (one 1/11 of the rows each) and one rare value (1%).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ir_measures
import numpy as np
import pyarrow.parquet as pq

from optical_ray import beir
from optical_ray.config import SAMPLE_DIR
from optical_ray.encoder import Encoder
from optical_ray.index import build_index, filtered_recall_vs_exact
from optical_ray.prepare import prepare_bitext


def prepare_rates(n_pairs: int, folder: Path) -> dict:
    captions = pq.read_table(SAMPLE_DIR / "train_captions.parquet")
    english = [t for t, lang in zip(captions["text"].to_pylist(), captions["lang"].to_pylist()) if lang == "en"]
    tsv = folder / "pairs.tsv"
    with tsv.open("w") as f:
        f.write("en\tsw\n")
        for i in range(n_pairs):
            sentence = english[i % len(english)]
            f.write(f"{sentence} ({i})\tsw {i}: {sentence}\n")
    started = time.perf_counter()
    done = prepare_bitext(str(folder / "tsv-out"), tables=[str(tsv)], lang="sw")
    tsv_s = time.perf_counter() - started
    started = time.perf_counter()
    langs = ["de", "fr", "es", "cs", "ar", "uk", "zh", "ay", "gn", "qu"]
    captioned = prepare_bitext(str(folder / "captions-out"), captions=[str(SAMPLE_DIR / "train_captions.parquet")],
                               languages=langs)
    captions_s = time.perf_counter() - started
    return {"tsv_pairs": done.rows, "tsv_rows_per_s": n_pairs / tsv_s, "tsv_s": tsv_s,
            "caption_rows": captions.num_rows, "caption_pairs": captioned.rows,
            "caption_rows_per_s": captions.num_rows / captions_s, "caption_s": captions_s}


def beir_rates(n_docs: int, n_queries: int) -> dict:
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((n_docs, 384), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    captions = pq.read_table(SAMPLE_DIR / "test_2018_captions.parquet")
    texts = [t for t, lang in zip(captions["text"].to_pylist(), captions["lang"].to_pylist()) if lang == "de"][:n_queries]
    encoder = Encoder.load("student-init")
    encoder.encode(texts[:8], "query")  # warm-up
    started = time.perf_counter()
    queries = encoder.encode(texts, "query", 64)
    encode_s = time.perf_counter() - started
    index = build_index(corpus, "Flat", use_gpu=False)
    started = time.perf_counter()
    scores, rows = index.search(np.ascontiguousarray(queries), beir.DEPTH)
    search_s = time.perf_counter() - started
    run = [ir_measures.ScoredDoc(f"q{i}", f"d{r}", float(s)) for i, (srow, rrow) in enumerate(zip(scores, rows))
           for s, r in zip(srow, rrow)]
    qrels = [ir_measures.Qrel(f"q{i}", f"d{d}", 1) for i in range(len(texts)) for d in rng.choice(n_docs, 3, replace=False)]
    started = time.perf_counter()
    beir.build_report(qrels, {"de": run}, high=[], low=[])
    measure_s = time.perf_counter() - started
    per_1k = 1000 / len(texts)
    return {"queries": len(texts), "docs": n_docs, "encode_s_per_1k": encode_s * per_1k,
            "search_s_per_1k": search_s * per_1k, "measures_s_per_1k": measure_s * per_1k}


def filtered_recall(n_docs: int) -> dict:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((2000, 384), dtype=np.float32)
    pick = rng.integers(0, 2000, n_docs + 200)
    x = centers[pick] + 0.35 * rng.standard_normal((n_docs + 200, 384), dtype=np.float32) / np.sqrt(384)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vectors, queries = x[:n_docs], x[n_docs:]
    lang = rng.integers(0, 11, n_docs)
    rare = np.flatnonzero(rng.random(n_docs) < 0.01)
    out = {}
    for factory in ("Flat", "HNSW32"):
        index = build_index(vectors, factory, use_gpu=False)
        out[factory] = {"one of 11 values": filtered_recall_vs_exact(index, vectors, queries, np.flatnonzero(lang == 0)),
                        "1% of rows": filtered_recall_vs_exact(index, vectors, queries, rare),
                        "no filter": filtered_recall_vs_exact(index, vectors, queries, np.arange(n_docs))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        prepare = prepare_rates(args.pairs, Path(folder))
    print(f"data prepare: TSV {prepare['tsv_rows_per_s']:,.0f} rows/s ({prepare['tsv_pairs']:,} pairs in "
          f"{prepare['tsv_s']:.1f} s); caption tables {prepare['caption_rows_per_s']:,.0f} rows/s "
          f"({prepare['caption_rows']:,} rows -> {prepare['caption_pairs']:,} pairs in {prepare['caption_s']:.1f} s); "
          f"ratio TSV/captions {prepare['tsv_rows_per_s'] / prepare['caption_rows_per_s']:.2f}")
    rates = beir_rates(args.docs, args.queries)
    print(f"BEIR, per 1,000 queries over {rates['docs']:,} documents: encode {rates['encode_s_per_1k']:.2f} s, "
          f"FAISS Flat search {rates['search_s_per_1k']:.3f} s, ir-measures {rates['measures_s_per_1k']:.3f} s "
          f"(measures / encode = {rates['measures_s_per_1k'] / rates['encode_s_per_1k']:.3f})")
    for factory, recall in filtered_recall(args.docs).items():
        print(f"filtered recall@10 vs exact, {factory}: " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))


if __name__ == "__main__":
    main()
