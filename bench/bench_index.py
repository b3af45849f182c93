"""FAISS factories at scale (issue: retrieval serving). Run by hand:

    .venv/bin/python bench/bench_index.py [--n 1000000] [--queries 1000]

Vectors: a synthetic mixture of 2,000 Gaussian clusters in 384 dimensions, L2-normalised (caption
embeddings are clustered too; uniform random vectors have no neighbours worth finding and would make
every approximate index look bad). Queries are fresh points from the same mixture. For each factory:
build time, single-thread-batch QPS (all queries in one search call, both cores) and recall@10
against exact search (Flat).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from optical_ray.index import build_index


def mixture(n: int, dim: int, centers: np.ndarray, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        k = min(100_000, n - start)
        pick = rng.integers(0, len(centers), k)
        x = centers[pick] + spread * rng.standard_normal((k, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:start + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    xb = mixture(args.n, args.dim, centers, rng)
    xq = mixture(args.queries, args.dim, centers, rng)
    print(f"{args.n:,} x {args.dim} vectors, {args.queries} queries, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")

    flat = build_index(xb, "Flat")
    start = time.perf_counter()
    _, truth = flat.search(xq, 10)
    flat_qps = args.queries / (time.perf_counter() - start)
    print(f"{'Flat':<22} build {0:6.1f} s  QPS {flat_qps:9.0f}  recall@10 1.000  speed-up 1.0x")

    for factory, params in (("IVF4096,Flat", {"nprobe": [8, 32]}), ("IVF4096,SQ8", {"nprobe": [8, 32]}),
                            ("IVF4096,PQ48", {"nprobe": [32]}), ("HNSW32", {"efSearch": [64, 128]})):
        start = time.perf_counter()
        index = build_index(xb, factory)
        built = time.perf_counter() - start
        (name, values), = params.items()
        for value in values:
            faiss.ParameterSpace().set_index_parameter(index, name, value)
            start = time.perf_counter()
            _, found = index.search(xq, 10)
            qps = args.queries / (time.perf_counter() - start)
            recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
            print(f"{factory + f' {name}={value}':<22} build {built:6.1f} s  QPS {qps:9.0f}  recall@10 {recall:.3f}  "
                  f"speed-up {qps / flat_qps:.1f}x", flush=True)


if __name__ == "__main__":
    main()
