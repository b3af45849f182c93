"""Ray Train and Ray Data benchmarks (issues: distributed distillation, speed against peers). Run by hand:

    .venv/bin/python bench/bench_train.py [--steps 30]

1. Ray Train with 1 worker vs the plain single-process loop: same data, steps and threads; pairs/s
   over the training steps (model loading and Ray start-up excluded on both sides).
2. Ray Data reading bitext shards: from an S3 endpoint (moto's server on 127.0.0.1) vs local Parquet.
3. Ray Train with 2 workers (1 thread each) vs 1 worker (2 threads) on this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

from optical_ray import storage
from optical_ray.config import DistillConfig, load_config
from optical_ray.data import bitext_pairs, read_captions, write_bitext_shards
from optical_ray.distill import distill

SHARED = "../shared/data/flickr30k-ml"


def ray_pairs_per_s(cfg: DistillConfig) -> float:
    """Steady pairs/s of a Ray Train run: its last reported pairs_per_s (timed from the first step)."""

    def loop(config):
        from optical_ray import distill
        from optical_ray.train import train_loop_per_worker

        original = distill.Distiller.step
        state = {"start": None, "n": 0}

        def timed_step(self, english, translation, inputs=None):
            if state["start"] is None:
                state["start"] = time.perf_counter()
            out = original(self, english, translation, inputs)
            state["n"] += len(english)
            out["pairs_per_s"] = state["n"] / (time.perf_counter() - state["start"])
            return out

        distill.Distiller.step = timed_step
        train_loop_per_worker(config)

    from ray.train.torch import TorchTrainer

    from optical_ray.config import to_dict, with_absolute_paths
    from optical_ray.train import run_config, scaling_config

    cfg = with_absolute_paths(cfg)

    result = TorchTrainer(loop, train_loop_config={"distill": to_dict(cfg)}, scaling_config=scaling_config(cfg),
                          run_config=run_config(cfg)).fit()
    return result.metrics["pairs_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-train-")
    base = {"steps": args.steps, "batch_size": args.batch, "eval_every": 0, "log_every": 5,
            "data": {"dev_languages": ["de"], "dev": [SHARED + "/multi30k_task1_val.parquet"]},
            "output_dir": f"{work}/out"}

    # The S3 endpoint first: Ray's workers take the AWS_* variables from the environment Ray starts in.
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)

    # [1] Ray Train, 1 worker using 2 threads, vs the plain loop with 2 threads.
    plain = distill(load_config(DistillConfig, base), progress=False).history[-1]["pairs_per_s"]
    one = ray_pairs_per_s(load_config(DistillConfig, {**base, "ray": {
        "num_workers": 1, "cpus_per_worker": 1, "torch_threads": 2, "storage_path": f"{work}/ray", "name": "one"}}))
    print(f"[1] pairs/s over {args.steps} steps of {args.batch}: plain loop {plain:.2f}, Ray Train 1 worker {one:.2f} "
          f"-> {one / plain:.2f}x")

    # [3] 2 workers x 1 thread vs 1 worker x 2 threads (same global batch).
    two = ray_pairs_per_s(load_config(DistillConfig, {**base, "ray": {
        "num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1, "storage_path": f"{work}/ray", "name": "two"}}))
    print(f"[3] Ray Train 2 workers x 1 thread {two:.2f} pairs/s vs 1 worker x 2 threads {one:.2f} -> {two / one:.2f}x")

    # [2] Ray Data: bitext shards from S3 (moto on loopback) vs local Parquet.
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench-bitext")
    captions = read_captions([SHARED + "/multi30k_task1_train.parquet", SHARED + "/multiscript30k_mt_train.parquet"])
    pairs, _ = bitext_pairs(captions, ["de", "fr", "cs", "ar", "ay", "es", "gn", "qu", "uk", "zh"])
    write_bitext_shards(pairs, f"{work}/bitext", rows_per_shard=25_000)
    write_bitext_shards(pairs, "s3://bench-bitext/bitext", rows_per_shard=25_000)

    def rows_per_s(uri: str) -> float:
        files = storage.list_files(uri, ".parquet")
        fs, _ = storage.resolve(files[0])
        start = time.perf_counter()
        ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs)
        n = sum(len(b["english"]) for b in ds.iter_batches(batch_size=4096, batch_format="numpy"))
        assert n == pairs.num_rows
        return n / (time.perf_counter() - start)

    local, s3 = [], []
    for _ in range(3):  # interleaved
        local.append(rows_per_s(f"{work}/bitext"))
        s3.append(rows_per_s("s3://bench-bitext/bitext"))
    local, s3 = statistics.median(local), statistics.median(s3)
    print(f"[2] Ray Data read of {pairs.num_rows} bitext rows: local {local:,.0f} rows/s, S3 (moto) {s3:,.0f} rows/s "
          f"-> {s3 / local:.2f}x")
    server.stop()


if __name__ == "__main__":
    main()
