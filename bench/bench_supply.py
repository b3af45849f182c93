"""Can the CPU side feed a GPU step? Pairs per second per core (issue #36 item 2). Run by hand:

    .venv/bin/python bench/bench_supply.py [--teacher minilm-en] [--batches 256,1024] [--seconds 20]

On one thread (torch and the tokenizers pinned to one core), side by side in one run:

- **trainer, texts**: ``Distiller.prepare`` on the texts of a batch -- what a run on caption tables or
  shards without token columns does for every step (tokenising both forward passes, with character
  offsets for the content masks);
- **trainer, prepared**: ``Distiller.prepare`` on the token columns of shards written by ``optical-ray
  data prepare --tokenize-for`` -- padding only;
- **preparation**: ``pretokenized.add_tokens`` over the bitext once, for each model (loading excluded).

The target (issue #36): 10,000 pairs/s to a GPU worker from its 16 cores with 3x headroom, i.e. at
least 1,875 pairs/s per core on the trainer's side. The bitext is the bundled sample's captions
(10 languages, ~15k pairs).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from optical_ray import data
from optical_ray.config import SAMPLE_DIR, DistillConfig, load_config
from optical_ray.distill import Distiller
from optical_ray.encoder import Encoder
from optical_ray.pretokenized import add_tokens

LANGS = ["de", "fr", "es", "cs", "ar", "uk", "zh", "ay", "gn", "qu"]


def rate(fn, pairs_per_call: int, seconds: float) -> float:
    fn()  # warm-up
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls * pairs_per_call / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="student-init")
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs, _ = data.bitext_pairs(data.read_captions(str(SAMPLE_DIR / "train_captions.parquet")), LANGS)
    with tempfile.TemporaryDirectory() as folder:
        encoders = {m: Encoder.load(m, max_length=64) for m in sorted({"student-init", args.teacher})}
        tokenized, tokens = pairs, {}
        started = time.perf_counter()  # the tokenising itself, not the model loads
        for model, encoder in encoders.items():
            tokenized, added = add_tokens(tokenized, encoder, model)
            tokens.update(added)
        prep_rate = pairs.num_rows / (time.perf_counter() - started)
        data.write_bitext_shards(tokenized, folder, tokens=tokens)
        base = {"teacher": args.teacher, "max_length": 64}
        texts = Distiller.create(load_config(DistillConfig, base), torch.device("cpu"))
        prepared = Distiller.create(load_config(DistillConfig, {**base, "data": {"bitext": folder}}), torch.device("cpu"))
        table = pa.concat_tables([pq.read_table(f) for f in data.check_bitext_shards(folder)])
        print(f"bitext: {table.num_rows} pairs; token columns: {', '.join(prepared.columns()[2:]) or 'none'}")
        print(f"preparation (add_tokens, {len(encoders)} model(s)), one pass: {prep_rate:,.0f} pairs/s")
        for size in [int(b) for b in args.batches.split(",")]:
            batch = table.slice(0, size)
            english, translation = batch["english"].to_pylist(), batch["translation"].to_pylist()
            columns = [batch[c].combine_chunks() for c in prepared.columns()[2:]]
            slow = rate(partial(texts.prepare, english, translation), size, args.seconds)
            fast = rate(partial(prepared.prepare, english, translation, *columns), size, args.seconds)
            print(f"batch {size}: trainer, texts {slow:,.0f} pairs/s/core; trainer, prepared {fast:,.0f} pairs/s/core "
                  f"({fast / slow:.1f}x; target >= 1,875)")


if __name__ == "__main__":
    main()
