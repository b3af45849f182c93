"""Serving throughput against its ceiling and a peer (issue: serving speed). Run by hand:

    .venv/bin/python bench/bench_serve.py [--seconds 12] [--infinity /path/to/venv/bin/infinity_emb]

One run, one machine, one student folder (the shipped student, saved as a sentence-transformers folder),
the same queries (test_2018's non-English captions, one per request), 1, 4 and 16 concurrent clients:

(a) the bare model, the ceiling: ``Encoder.encode`` in batches of 32 in this process (queries/s);
(b) this project's Serve app (serve/config.yaml's deployments, one QueryEncoder replica, ``@serve.batch``
    up to 32, access log off): ``POST /embeddings`` (embed only) and ``POST /search`` (embed + FAISS
    Flat over the 1,071 English test_2018 captions), per encoder backend (torch, onnx, onnx-int8);
(c) infinity-emb serving the same folder (``--infinity``: its own venv, see
    ../shared/docs/stack-on-this-machine.md), its OpenAI ``/embeddings`` route, torch engine on the CPU.

The load generator (httpx, asyncio) shares the machine's cores with every server: compare ratios
within one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx
import numpy as np
import pyarrow.compute as pc
import ray
from ray import serve

from optical_ray.config import SAMPLE_DIR
from optical_ray.data import read_captions
from optical_ray.encoder import Encoder

CLIENTS = (1, 4, 16)


def test_queries() -> list[str]:
    captions = read_captions([str(SAMPLE_DIR / "test_2018_captions.parquet")])
    return captions.filter(pc.not_equal(captions["lang"], "en"))["text"].to_pylist()


async def load(url: str, body, clients: int, seconds: float, queries: list[str], headers: dict | None = None) -> dict:
    """``clients`` concurrent loops, each posting one query per request: QPS, p50, p99."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        async def worker(i: int):
            n = i
            while time.perf_counter() < stop:
                start = time.perf_counter()
                r = await client.post(url, json=body(queries[n % len(queries)]))
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
                n += clients
        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    return {"qps": len(latencies) / elapsed, "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "p99_ms": 1e3 * float(np.percentile(latencies, 99))}


def sweep_clients(name: str, url: str, body, seconds: float, queries: list[str]) -> dict:
    asyncio.run(load(url, body, 4, 2, queries))  # warm-up
    out = {}
    for clients in CLIENTS:
        out[clients] = asyncio.run(load(url, body, clients, seconds, queries))
        r = out[clients]
        print(f"{name:<34} {clients:>2} clients: {r['qps']:7.1f} QPS  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms",
              flush=True)
    return out


def bare_model(folder: str, queries: list[str], seconds: float) -> float:
    encoder = Encoder.load(folder)
    encoder.encode(queries[:64], "query", batch_size=32)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode(queries[done % len(queries):][:32] or queries[:32], "query", batch_size=32)
        done += 32
    return done / (time.perf_counter() - start)


def infinity(binary: str, folder: str, port: int, queries: list[str], seconds: float) -> dict:
    server = subprocess.Popen([binary, "v2", "--model-id", folder, "--engine", "torch", "--device", "cpu",
                               "--port", str(port), "--host", "127.0.0.1", "--batch-size", "32"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"infinity-emb did not start (exit {server.poll()})") from None
                time.sleep(2)
        # E5 wants the prompt in the text; the Serve app adds it itself.
        return sweep_clients("(c) infinity-emb /embeddings", f"http://127.0.0.1:{port}/embeddings",
                             lambda q: {"input": [f"query: {q}"], "model": folder}, seconds, queries)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--infinity", help="infinity_emb executable in its own venv; without it (c) is skipped")
    parser.add_argument("--backends", default="torch,onnx,onnx-int8")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    queries = test_queries()
    folder = str(Encoder.load("student-init").save(os.path.join(tempfile.mkdtemp(), "student")))
    results: dict = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
    results["bare_model_qps"] = bare_model(folder, queries, args.seconds)
    print(f"(a) bare model, Encoder.encode batch 32: {results['bare_model_qps']:.1f} queries/s", flush=True)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = sys.path[0]
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    from optical_ray.corpus_index import build_corpus_index
    from optical_ray.service.app import QueryEncoder, Retriever, SearchAPI

    index_uri = os.path.join(tempfile.mkdtemp(), "index")
    build_corpus_index(folder, [str(SAMPLE_DIR / "test_2018_captions.parquet")], index_uri, "Flat")
    serve.start(http_options={"host": "127.0.0.1", "port": 8123}, logging_config={"enable_access_log": False})
    for backend in args.backends.split(","):
        encoder = QueryEncoder.options(user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
                                       max_ongoing_requests=32, num_replicas=1, ray_actor_options={"num_cpus": 1})
        app = SearchAPI.options(ray_actor_options={"num_cpus": 0.25}).bind(
            encoder.bind(folder, backend), Retriever.options(ray_actor_options={"num_cpus": 0.25}).bind(index_uri, folder),
            auth="none", model=folder)  # loopback only
        serve.run(app, name="bench", route_prefix="/")
        results[f"serve_{backend}_embeddings"] = sweep_clients(f"(b) Serve /embeddings, {backend}", "http://127.0.0.1:8123/embeddings",
                                                               lambda q: {"input": [q]}, args.seconds, queries)
        results[f"serve_{backend}_search"] = sweep_clients(f"(b) Serve /search, {backend}", "http://127.0.0.1:8123/search",
                                                           lambda q: {"queries": [q], "k": 10}, args.seconds, queries)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    if args.infinity:
        results["infinity_embeddings"] = infinity(args.infinity, folder, 8124, queries, args.seconds)
    ceiling = results["bare_model_qps"]
    for key in [k for k in results if k.startswith(("serve_", "infinity"))]:
        at16 = results[key][16]["qps"]
        peer = results.get("infinity_embeddings", {}).get(16, {}).get("qps")
        print(f"{key:<32} at 16 clients: {at16 / ceiling:.2f}x the bare model"
              + (f", {at16 / peer:.2f}x infinity-emb" if peer else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
