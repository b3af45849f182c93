"""Serving throughput (issue: retrieval serving). Run by hand:

    .venv/bin/python bench/bench_serve.py [--seconds 15]

Deploys serve/config.yaml's application (the shipped student, a Flat index over the 1,071 English
test_2018 captions, access log off) on a local Ray, then measures /search QPS and p50/p99 latency at
1, 4 and 16 concurrent clients (one query per request), with @serve.batch (max_batch_size 32) and
without it (max_batch_size 1), one QueryEncoder replica each. Both variants run in this one process,
one after the other, so the machine's load is as alike as it gets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx
import numpy as np
import ray
from ray import serve

from optical_ray.config import SAMPLE_DIR

QUERIES = ["Ein Hund rennt über eine Wiese.", "Dos niños juegan en la playa.", "Un homme fait du vélo.",
           "一个女人在读书。", "Allqu pampapi phawaykachan.", "Warmi liwru ñawirichkan."]


async def load(url: str, clients: int, seconds: float) -> tuple[float, float, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker(i: int):
            while time.perf_counter() < stop:
                start = time.perf_counter()
                r = await client.post(url, json={"queries": [QUERIES[(i + len(latencies)) % len(QUERIES)]], "k": 10})
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = sys.path[0]
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    from optical_ray.indexing import build_corpus_index
    from optical_ray.service.app import QueryEncoder, Retriever, SearchAPI

    index_uri = os.path.join(tempfile.mkdtemp(), "index")
    build_corpus_index("student-init", [str(SAMPLE_DIR / "test_2018_captions.parquet")], index_uri, "Flat")
    serve.start(http_options={"host": "127.0.0.1", "port": 8123}, logging_config={"enable_access_log": False})
    results = {}
    for name, batch in (("@serve.batch (32)", 32), ("no batching", 1)):
        encoder = QueryEncoder.options(user_config={"max_batch_size": batch, "batch_wait_timeout_s": 0.005},
                                       max_ongoing_requests=32, num_replicas=1, ray_actor_options={"num_cpus": 1})
        app = SearchAPI.options(ray_actor_options={"num_cpus": 0.25}).bind(
            encoder.bind("student-init"), Retriever.options(ray_actor_options={"num_cpus": 0.25}).bind(index_uri, "student-init"),
            auth="none")  # loopback only
        serve.run(app, name="bench", route_prefix="/")
        asyncio.run(load("http://127.0.0.1:8123/search", 4, 3))  # warm-up
        for clients in (1, 4, 16):
            results[(name, clients)] = asyncio.run(load("http://127.0.0.1:8123/search", clients, args.seconds))
            qps, p50, p99 = results[(name, clients)]
            print(f"{name:<18} {clients:>2} clients: {qps:7.1f} QPS  p50 {p50 * 1e3:7.1f} ms  p99 {p99 * 1e3:7.1f} ms", flush=True)
        serve.delete("bench")
    ratio = results[("@serve.batch (32)", 16)][0] / results[("no batching", 16)][0]
    print(f"QPS at 16 clients, batched / unbatched: {ratio:.2f}x")
    serve.shutdown()


if __name__ == "__main__":
    main()
