"""Does each training worker read only its share of the corpus? (issue #36 item 6). Run by hand:

    .venv/bin/python bench/bench_share.py [--pairs 2000000] [--batch 1024]

Generates a bitext corpus of ``--pairs`` pairs (8 languages, 8-14 words a side), writes it with
``data.write_bitext_shards`` (shuffled, 50,000-pair shards, row groups of 1,024 pairs), then, for one
and two workers, runs each worker's data order for one epoch's worth of steps in a fresh process and
reports what that process read (``rchar`` of /proc/self/io: every byte its read calls returned) and the
peak resident memory it added (``VmHWM`` less ``VmRSS`` once imports are done):

- **whole** -- every worker reads every shard and keeps its slice of each batch (what prepared bitext
  under 2 GiB did before lanes: ``batching.batches`` over the concatenated shards);
- **lanes** -- ``batching.lane_batches`` with 8 lanes: each worker reads the row groups of its lanes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

LANGS = ["de", "fr", "es", "cs", "ar", "uk", "ay", "qu"]


def proc(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def sentences(rng: np.random.Generator, n: int, vocab: np.ndarray) -> list[str]:
    lengths = rng.integers(8, 15, n)
    words = vocab[rng.integers(0, len(vocab), lengths.sum())]
    ends = np.cumsum(lengths)
    return [" ".join(words[end - k : end]) for end, k in zip(ends, lengths)]


def generate(folder: str, n: int) -> None:
    from optical_ray.data import write_bitext_shards

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i:04d}" for i in range(5000)])
    pairs = pa.table({"image_id": [str(i // 5) for i in range(n)], "caption_idx": pa.array(np.arange(n) % 5, pa.int32()),
                      "lang": pa.array(np.array(LANGS)[np.arange(n) % len(LANGS)]),
                      "english": sentences(rng, n, vocab), "translation": sentences(rng, n, vocab)})
    write_bitext_shards(pairs, folder, rows_per_shard=50_000)


def worker(folder: str, mode: str, rank: int, world: int, batch: int) -> dict:
    """One worker's epoch of batches, in this process: what it read and the memory it added."""
    from optical_ray import batching, storage
    from optical_ray.data import check_bitext_shards

    files = check_bitext_shards(folder)
    rss, rchar, started = proc("VmRSS"), proc("rchar", "/proc/self/io"), time.perf_counter()
    if mode == "lanes":
        stream = batching.lane_batches(files, batch, seed=0, rank=rank, world=world, lanes=8)
    else:
        pairs = pa.concat_tables([storage.read_parquet(f, columns=list(batching.TEXT_COLUMNS)) for f in files])
        stream = batching.batches(pairs, batch, seed=0, rank=rank, world=world)
    steps = sum(footer.num_rows for footer in files.values()) // batch
    pairs_seen = sum(len(next(stream)[0]) for _ in range(steps))
    return {"read_mb": (proc("rchar", "/proc/self/io") - rchar) / 1e6, "peak_mb": (proc("VmHWM") - rss) / 1024,
            "seconds": time.perf_counter() - started, "pairs": pairs_seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--worker", nargs=4, metavar=("FOLDER", "MODE", "RANK", "WORLD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, mode, rank, world = args.worker
        print(json.dumps(worker(folder, mode, int(rank), int(world), args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/bitext"
        started = time.perf_counter()
        generate(folder, args.pairs)
        size = sum(p.stat().st_size for p in Path(folder).glob("*.parquet")) / 1e6
        print(f"{args.pairs:,} pairs written in {time.perf_counter() - started:.0f} s: {size:.0f} MB of shards")
        print("| order | workers | rank | read per worker (MB) | peak RSS added (MB) | pairs handed out | s |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("whole", "lanes"):
            for world in (1, 2):
                for rank in range(world):
                    out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--worker", folder, mode,
                                          str(rank), str(world)], check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.splitlines()[-1])
                    print(f"| {mode} | {world} | {rank} | {r['read_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['pairs']:,} | "
                          f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
