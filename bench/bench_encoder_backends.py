"""The query encoder's backends side by side (issue: serving speed): torch, ONNX Runtime float32 and
ONNX Runtime int8, on the same student and the same queries, in one run. Run by hand:

    .venv/bin/python bench/bench_encoder_backends.py [--model student-init] [--seconds 10]

* quality: R@1 per language on the bundled test_2018_flickr captions (1,071 images) per backend, and
  the difference from torch (the target: float32 within 0.005 for every language);
* speed: queries/s of ``encode`` at batch 1 (one query per call, an idle endpoint) and batch 32 (what
  ``@serve.batch`` fills under load), each backend timed in turn for ``--seconds``, interleaved in
  rounds so machine noise falls on all alike; ratios to torch are the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import pyarrow.compute as pc
import torch

from optical_ray.config import SAMPLE_DIR
from optical_ray.data import read_captions
from optical_ray.evaluate import evaluate
from optical_ray.onnx_encoder import BACKENDS, load_query_encoder

LANGS = ["de", "fr", "es", "zh", "cs", "ar", "uk", "ay", "gn", "qu"]


def queries_per_s(encoder, texts: list[str], batch: int, seconds: float) -> float:
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
        encoder.encode(chunk, "query", batch_size=batch)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="student-init")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    captions = read_captions([str(SAMPLE_DIR / "test_2018_captions.parquet")])
    texts = captions.filter(pc.not_equal(captions["lang"], "en"))["text"].to_pylist()
    encoders = {backend: load_query_encoder(args.model, backend) for backend in BACKENDS}
    r1 = {b: {lang: m["R@1"] for lang, m in evaluate(e, captions, LANGS, progress=False)["languages"].items()}
          for b, e in encoders.items()}
    speed: dict[str, dict[int, list[float]]] = {b: {1: [], 32: []} for b in encoders}
    for _ in range(args.rounds):
        for batch in (1, 32):
            for backend, encoder in encoders.items():
                speed[backend][batch].append(queries_per_s(encoder, texts, batch, args.seconds / args.rounds))
    result = {"model": args.model, "machine": f"{platform.platform()}, {torch.get_num_threads()} torch threads",
              "r1": r1, "qps": {b: {k: sum(v) / len(v) for k, v in s.items()} for b, s in speed.items()}}
    print(json.dumps(result, indent=1))
    print("\n| backend | " + " | ".join(LANGS) + " | max abs ΔR@1 vs torch | QPS batch 1 (× torch) | QPS batch 32 (× torch) |")
    print("|---|" + "---|" * (len(LANGS) + 3))
    for b in encoders:
        delta = max(abs(r1[b][lang] - r1["torch"][lang]) for lang in LANGS)
        q = result["qps"]
        print(f"| {b} | " + " | ".join(f"{r1[b][lang]:.3f}" for lang in LANGS) + f" | {delta:.3f} | "
              f"{q[b][1]:.1f} ({q[b][1] / q['torch'][1]:.2f}×) | {q[b][32]:.1f} ({q[b][32] / q['torch'][32]:.2f}×) |")


if __name__ == "__main__":
    main()
