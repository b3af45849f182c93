"""GPU check: what one GPU does with this project's code, in one JSON (run by bench/gpu_check.sh).

* bf16 distillation (the project's ``Distiller``, one process) per arm and batch size: pairs/s, model
  FLOPs per pair from the encoder's shape and the batch's real token counts, and MFU against the GPU's
  dense bf16 peak;
* the OT part's share of an OT + contrastive step (cost, Sinkhorn plan and product, timed alone);
* bf16 numerics: the loss under autocast against float32, on real token states;
* query encoding throughput (the ceiling of a GPU endpoint) at batch 1, 32 and 256;
* search at 1M x 384: faiss IVF (GPU when faiss-gpu is installed, else CPU) against exact search
  (faiss-cpu flat, and a torch matmul + top-k on the GPU), with IVF's recall@10 against exact.

The student has multilingual-e5-small's shape (12 layers, 384 wide, 250k vocabulary) with random
weights unless ``--student`` names a real folder: speed depends on the shape, not the values. With
CUDA absent everything runs on CPU at ``--tiny`` sizes, which is how the tests exercise the pieces.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from optical_ray.config import DistillConfig, load_config
from optical_ray.distill import Distiller, load_bitext, load_models, prefetched, training_batches
from optical_ray.encoder import Encoder
from optical_ray.losses import LossWeights
from optical_ray.model_store import E5_PROMPTS
from optical_ray.ot import transport_cost

# Dense bf16 peak (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
ARMS = {"mse": LossWeights(ot=0, contrastive=0, mse=1), "ot+contrastive": LossWeights(ot=1, contrastive=1, mse=0),
        "contrastive": LossWeights(ot=0, contrastive=1, mse=0)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_student(folder: Path, tokenizer_dir: str, tiny: bool) -> Path:
    """An encoder folder of mE5-small's shape (or a tiny one) with random weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64} if tiny else \
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 1536}
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        **shape)
    Encoder(BertModel(config, add_pooling_layer=False), tokenizer, prompts=E5_PROMPTS, max_length=64).save(folder)
    return folder


def forward_flops_per_token(config, seq_len: float) -> float:
    """2 x the transformer layers' weights (embeddings are lookups) + the attention products."""
    d, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    weights = layers * (4 * d * d + 2 * d * ffn)
    return 2 * weights + 4 * layers * seq_len * d


def step_flops(config, translation: dict, english: dict, needs_student_english: bool) -> float:
    """Model FLOPs of one step on real (unpadded) tokens: the student's forward + backward (3x forward)
    on what it encodes, the frozen teacher's forward on the English side."""
    def flops(batch: dict) -> float:
        lengths = batch["attention_mask"].sum(1).double()
        return float(sum(n * forward_flops_per_token(config, n) for n in lengths.tolist()))

    student = flops(translation) + (flops(english) if needs_student_english else 0.0)
    return 3 * student + flops(english)


def measure_distill(model_dir: Path, arm: str, batch_size: int, device: torch.device, seconds: float,
                    prepared: str | None = None, length_buckets: int = 0) -> dict:
    """Training steps/s of one arm at one batch size, fed as the training loop feeds them: from
    ``prepared`` shards (token columns: the CPU only pads) or from texts (tokenised on the CPU), the
    next batch readied in a background thread while the GPU steps."""
    weights = ARMS[arm]
    cfg = load_config(DistillConfig, {"student": str(model_dir), "teacher": str(model_dir), "batch_size": batch_size,
                                      "steps": 1000, "bf16": True, "length_buckets": length_buckets,
                                      "data": {"bitext": prepared} if prepared else {},
                                      "loss": {"ot_weight": weights.ot, "contrastive_weight": weights.contrastive,
                                               "mse_weight": weights.mse}})
    student, teacher = load_models(cfg, device)
    distiller = Distiller(cfg, student, teacher)
    stream = training_batches(cfg, 0, columns=distiller.columns())
    for _ in range(3):  # warm-up: kernels, allocator
        batch = next(stream)
        distiller.step(batch[0], batch[1], distiller.prepare(*batch))
    # The batches and their FLOPs first, so the timed loop holds nothing but training steps.
    planned = [next(stream) for _ in range(max(3, int(seconds * 4000 / batch_size)))]
    ahead = prefetched(itertools.chain(planned, itertools.repeat(planned[-1])), distiller.prepare)
    sync(device)
    steps, started = 0, time.perf_counter()
    while steps < len(planned) and (time.perf_counter() - started < seconds or steps < 3):
        batch, inputs = next(ahead)
        distiller.step(batch[0], batch[1], inputs)
        steps += 1
    sync(device)
    ahead.close()
    elapsed = time.perf_counter() - started
    flops = sum(step_flops(student.model.config, student.tokenize(b[1], "query"),
                           student.tokenize(b[0], "passage"), bool(weights.mse)) for b in planned[:steps])
    start = time.perf_counter()
    for batch in planned[:steps]:  # what the CPU readies per step (prefetched: hidden while it is shorter)
        distiller.prepare(*batch)
    prepare_s = (time.perf_counter() - start) / steps
    out = {"arm": arm, "batch_size": batch_size, "supply": "prepared" if prepared else "texts",
           "length_buckets": length_buckets, "steps": steps, "step_s": elapsed / steps,
           "pairs_per_s": steps * batch_size / elapsed, "model_tflops_per_s": flops / elapsed / 1e12,
           "gflops_per_pair": flops / (steps * batch_size) / 1e9,
           "prepare_s_per_step": prepare_s, "prepare_share_of_step": prepare_s / (elapsed / steps), "prefetched": True}
    if weights.ot:
        out["ot_share_of_step"] = time_ot(student, teacher, planned[-1][0], planned[-1][1], cfg, device) / out["step_s"]
    del distiller, student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def prepare_shards(model_dir: Path, folder: Path, max_length: int = 64) -> str:
    """The bundled sample's bitext with the model's token columns, as `data prepare --tokenize-for`
    writes it: what a GPU run should train on."""
    from optical_ray.data import write_bitext_shards
    from optical_ray.pretokenized import tokenize_for

    pairs = load_bitext(load_config(DistillConfig, {}))
    pairs, tokens = tokenize_for(pairs, [str(model_dir)], max_length)
    write_bitext_shards(pairs, str(folder), tokens=tokens)
    return str(folder)


def time_ot(student: Encoder, teacher: Encoder, english: list[str], translation: list[str], cfg, device) -> float:
    """Seconds for the OT part alone (cost, plan, product, backward) on one batch's real token states."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        t = teacher(teacher.tokenize(english, "passage"))
        s = student(student.tokenize(translation, "query"))
    y = s.token_states.detach().requires_grad_(True)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        value, _ = transport_cost(t.token_states, t.content_mask, y, s.content_mask, cfg.loss.sinkhorn_reg,
                                  cfg.loss.sinkhorn_iters)
        value.mean().backward()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def bf16_agreement(model_dir: Path, device: torch.device) -> dict:
    """The objective under bf16 autocast vs float32 on the same real token states."""
    from optical_ray.losses import DistillationObjective

    encoder = Encoder.load(model_dir, max_length=64).to(device).eval()
    cfg = load_config(DistillConfig, {"student": str(model_dir)})
    pairs = load_bitext(cfg).slice(0, 64)
    with torch.no_grad():
        t = encoder(encoder.tokenize(pairs["english"].to_pylist(), "passage"))
        s = encoder(encoder.tokenize(pairs["translation"].to_pylist(), "query"))
        objective = DistillationObjective(LossWeights(ot=1, contrastive=1, mse=1), 0.05, 0.02)
        reference, _ = objective(t, s, s)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            mixed, _ = objective(t, s, s)
    return {"float32": float(reference), "bf16_autocast": float(mixed), "abs_diff": abs(float(reference - mixed)),
            "dtype_under_autocast": str(mixed.dtype)}


def measure_encode(model_dir: Path, device: torch.device, queries: list[str]) -> dict:
    encoder = Encoder.load(model_dir, max_length=64).to(device)
    out = {}
    for batch_size in (1, 32, 256):
        n = min(len(queries), 200 if batch_size == 1 else 4096)
        encoder.encode(queries[:batch_size], "query", batch_size)  # warm-up
        for precision in ("float32", "bf16"):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                encoder.encode(queries[:n], "query", batch_size)
            sync(device)
            out[f"batch{batch_size}_{precision}_queries_per_s"] = n / (time.perf_counter() - start)
    return out


def clustered_vectors(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    """Unit vectors around ``centers`` directions: random data without clusters is IVF's worst case,
    unlike sentence embeddings."""
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centers, dim, generator=g), dim=1)
    x = c[torch.randint(0, centers, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g) / dim ** 0.5
    return torch.nn.functional.normalize(x, dim=1).numpy().astype(np.float32)


def measure_search(n: int, dim: int, n_queries: int, device: torch.device, nlist: int) -> dict:
    import faiss

    corpus = clustered_vectors(n, dim, centers=max(16, n // 100), seed=0)
    queries = clustered_vectors(n_queries, dim, centers=max(16, n // 100), seed=1)
    k, out = 10, {"n": n, "dim": dim, "queries": n_queries, "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    # Exact neighbours: faiss-cpu flat on a slice of the queries (timed), all of them on the GPU if any.
    sample = min(n_queries, 1000)
    (_, exact), seconds = timed(lambda: flat.search(queries[:sample], k))
    out["faiss_cpu_flat_queries_per_s"] = sample / seconds
    if device.type == "cuda":
        gpu_corpus = torch.from_numpy(corpus).to(device)
        gpu_queries = torch.from_numpy(queries).to(device)

        def torch_exact(dtype):
            corpus_d = gpu_corpus.to(dtype)
            ids = [torch.topk(chunk.to(dtype) @ corpus_d.T, k, dim=1).indices for chunk in gpu_queries.split(1024)]
            sync(device)
            return torch.cat(ids).cpu().numpy()

        exact = torch_exact(torch.float32)
        torch_exact(torch.bfloat16)
        found, seconds = timed(lambda: torch_exact(torch.bfloat16))
        out["torch_gpu_exact_bf16_queries_per_s"] = n_queries / seconds
        out["torch_gpu_exact_bf16_recall_at_10"] = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(found, exact)]))
    else:
        queries = queries[:sample]
    ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    where = "cpu"
    if out["faiss_gpus"]:
        ivf = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, ivf)
        where = "gpu"
    train = corpus[np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)]
    _, out[f"faiss_{where}_ivf_train_s"] = timed(lambda: ivf.train(train))
    _, out[f"faiss_{where}_ivf_add_s"] = timed(lambda: ivf.add(corpus))
    faiss.ParameterSpace().set_index_parameter(ivf, "nprobe", 32)
    (_, approx), seconds = timed(lambda: ivf.search(queries, k))
    out[f"faiss_{where}_ivf_nprobe32_queries_per_s"] = len(queries) / seconds
    out["ivf_recall_at_10"] = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/gpu_check.json")
    parser.add_argument("--tokenizer", default=None, help="folder with the XLM-R tokenizer (default: student-init's)")
    parser.add_argument("--student", default=None, help="a real student folder instead of random mE5-small weights")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (what the CPU tests run)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per distillation setting")
    parser.add_argument("--arms", default=",".join(ARMS), help="distillation arms to time (comma-separated)")
    parser.add_argument("--sizes", default="32,256,1024", help="batch sizes to time (comma-separated)")
    parser.add_argument("--distill-only", action="store_true", help="skip numerics, encoding and search")
    parser.add_argument("--supply", default="prepared,texts",
                        help="how batches reach the step: prepared (token columns from data prepare --tokenize-for, "
                             "the CPU pads) and/or texts (tokenised on the CPU)")
    parser.add_argument("--length-buckets", type=int, default=8, help="length_buckets of the prepared runs (0: none)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    result: dict = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "peak_bf16_flops": peak,
                    "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run cut short still leaves what it measured
        out.write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        if args.student:
            model_dir = Path(args.student)
        else:
            from optical_ray.model_store import student_init_path

            model_dir = build_student(Path(tmp) / "student", args.tokenizer or str(student_init_path()), args.tiny)
        result["student"] = "random weights, mE5-small shape" if not (args.student or args.tiny) else str(args.student or "tiny")
        sizes = (8,) if args.tiny else tuple(int(b) for b in args.sizes.split(","))
        result["tokenizers_parallelism"] = os.environ.get("TOKENIZERS_PARALLELISM", "")
        result["distill"] = []
        shards = prepare_shards(model_dir, Path(tmp) / "bitext") if "prepared" in args.supply else None
        settings = [(shards, args.length_buckets) if supply == "prepared" else (None, 0) for supply in args.supply.split(",")]
        for arm, batch_size, (prepared, buckets) in itertools.product(args.arms.split(","), sizes, settings):
            row = measure_distill(model_dir, arm, batch_size, device, 0.5 if args.tiny else args.seconds, prepared, buckets)
            if peak:
                row["mfu"] = row["model_tflops_per_s"] * 1e12 / peak
            result["distill"].append(row)
            print(json.dumps(row), flush=True)
            save()
        if args.distill_only:
            return
        result["bf16_numerics"] = bf16_agreement(model_dir, device)
        save()
        from optical_ray.config import SAMPLE_DIR
        from optical_ray.data import query_captions, read_captions

        captions = read_captions(str(SAMPLE_DIR / "test_2018_captions.parquet"))
        queries = [t for lang in ("de", "fr", "es", "zh") for t in query_captions(captions, lang)["text"].to_pylist()]
        result["encode"] = measure_encode(model_dir, device, queries)
        save()
    result["search"] = measure_search(20_000 if args.tiny else 1_000_000, 384, 100 if args.tiny else 10_000, device,
                                      nlist=64 if args.tiny else 4096)
    save()
    print(json.dumps({k: v for k, v in result.items() if k != "distill"}, indent=1))


if __name__ == "__main__":
    main()
