"""This tree's Serve app against another commit's, side by side in one run (issue #35 item 6: what the
per-request work of keys, rate limits, request ids and the access log costs). Run by hand:

    .venv/bin/python bench/bench_serve_ab.py --base 601123e [--seconds 10] [--rounds 2]

Both apps run at once on one local Ray (started by this process, gone with it), deployed with
`serve deploy` from one config: ``base`` imports the other commit's ``optical_ray`` (a ``git worktree``, shipped to its
replicas as the application's runtime_env ``working_dir``, a ``local://`` folder), ``head`` this tree's. Each has
serve/config.yaml's deployments with one replica each, the shipped student and a Flat index of
test_2018's 1,071 English captions, and its key checked on every request: ``base`` its one
environment key, ``head`` a per-client key file with a rate limit (never reached here) and the JSON
access log. The sweeps alternate base, head, base, head... at 1 and 16 clients (one non-English
caption per request) on ``/search`` and on the embeddings route, and the table gives head / base.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import load, test_queries

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY = "bench-key-not-secret"
PORT = 8125


def app_spec(name: str, index: str, runtime_env: dict | None, args: dict) -> dict:
    spec = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    spec.update(name=name, route_prefix=f"/{name}")
    spec["args"] = {"model": "student-init", "index_uri": index, **args}
    for deployment in spec["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        deployment["ray_actor_options"] = {"num_cpus": 0.1}
        if deployment["name"] == "Retriever":
            deployment["user_config"] = {}
    if runtime_env:
        spec["runtime_env"] = runtime_env
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against (e.g. the last one before #35)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of base and head per setting")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    base_tree = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base], check=True,
                   capture_output=True)
    os.environ.update(OPTICAL_RAY_API_KEY=KEY, RAY_USAGE_STATS_ENABLED="0")  # before Ray starts: its workers inherit it
    try:
        from optical_ray.config import SAMPLE_DIR
        from optical_ray.corpus_index import build_corpus_index
        from optical_ray.service.auth import digest

        # Before the index build (Ray Data would start a Ray without a dashboard for `serve deploy`).
        context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        index = str(work / "index")
        build_corpus_index("student-init", [str(SAMPLE_DIR / "test_2018_captions.parquet")], index, "Flat")
        keys = work / "keys.yaml"
        keys.write_text(yaml.safe_dump({"bench": {"sha256": digest(KEY), "requests_per_s": 100000, "burst": 100000}}))
        config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": PORT},
                  "logging_config": {"enable_access_log": False},
                  "applications": [
                      app_spec("base", index, {"working_dir": f"local://{base_tree}"}, {"auth": "api_key"}),
                      app_spec("head", index, None, {"auth": "keys", "api_keys_file": str(keys),
                                                     "rate_limit": {"requests_per_s": 100000, "burst": 100000}})]}
        (work / "serve.yaml").write_text(yaml.safe_dump(config))
        subprocess.run([str(BIN / "serve"), "deploy", str(work / "serve.yaml"), "--address",
                        f"http://{context.dashboard_url}"], check=True)
        deadline = time.time() + 600
        def up(app: str) -> bool:
            # A real search, not a health route: the ingress answers those before the encoder and
            # the index are loaded.
            try:
                return httpx.post(f"http://127.0.0.1:{PORT}/{app}/search", json={"queries": ["a dog"], "k": 1},
                                  headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
            except httpx.HTTPError:  # the proxy or the app still starting
                return False

        while not all(up(app) for app in ("base", "head")):
            if time.time() > deadline:
                raise RuntimeError("the two apps did not come up in 10 minutes")
            time.sleep(3)
        queries = test_queries()
        headers = {"Authorization": f"Bearer {KEY}"}
        routes = {"search": ("/search", "/search", lambda q: {"queries": [q], "k": 10}),
                  "embeddings": ("/embeddings", "/v1/embeddings", lambda q: {"input": [q]})}
        results: dict = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
                         "base": args.base}
        for route, (base_path, head_path, body) in routes.items():
            for app, path in (("base", base_path), ("head", head_path)):  # warm-up
                asyncio.run(load(f"http://127.0.0.1:{PORT}/{app}{path}", body, 4, 2, queries, headers))
            for clients in (1, 16):
                runs = {"base": [], "head": []}
                for _ in range(args.rounds):
                    for app, path in (("base", base_path), ("head", head_path)):
                        runs[app].append(asyncio.run(load(f"http://127.0.0.1:{PORT}/{app}{path}", body, clients,
                                                          args.seconds, queries, headers)))
                best = {app: {"qps": max(r["qps"] for r in rs), "p50_ms": min(r["p50_ms"] for r in rs)}
                        for app, rs in runs.items()}
                results[f"{route}_{clients}"] = {"runs": runs, "best": best}
                print(f"{route:<10} {clients:>2} clients: base {best['base']['qps']:6.1f} QPS p50 {best['base']['p50_ms']:6.1f} ms"
                      f" | head {best['head']['qps']:6.1f} QPS p50 {best['head']['p50_ms']:6.1f} ms"
                      f" | head/base QPS {best['head']['qps'] / best['base']['qps']:.3f},"
                      f" p50 {best['head']['p50_ms'] / best['base']['p50_ms']:.3f}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        ray.shutdown()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
