"""Bitext tokenised at preparation: the trainer pads what the tokenizer would have made, and trains the same."""

import logging

import numpy as np
import pyarrow as pa
import pytest
import torch

from optical_ray import batching, data, pretokenized
from optical_ray.cli import main
from optical_ray.config import SAMPLE_DIR, DistillConfig, load_config, training_fields
from optical_ray.distill import Distiller, distill, load_models
from optical_ray.encoder import Encoder

TEXTS = ["A dog.", "Zwei Kinder spielen im Sand am Strand, während ihre Eltern zusehen und lachen.",
         "Allqu phawan.", "一只狗在草地上奔跑。", "x " * 40]


def test_collated_tokens_are_the_tokenizers_padded_to_a_multiple_of_8(tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir, max_length=24).eval()
    for prompt in ("query", "passage", None):
        reference = encoder.tokenize(TEXTS, prompt)
        ids, content = pretokenized.token_lists(encoder, TEXTS, prompt)
        batch = pretokenized.collate(ids.take(pa.array([4, 0, 1, 2, 3])), content.take(pa.array([4, 0, 1, 2, 3])),
                                     encoder.pad_id)
        batch = {k: v[[1, 2, 3, 4, 0]] for k, v in batch.items()}  # back to TEXTS' order
        width = reference["input_ids"].shape[1]
        assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= width == 24  # truncated
        for key in ("input_ids", "attention_mask", "content_mask"):
            assert torch.equal(batch[key][:, :width], reference[key].to(batch[key].dtype)), key
        assert not batch["attention_mask"][:, width:].any() and (batch["input_ids"][:, width:] == encoder.pad_id).all()
        with torch.no_grad():
            np.testing.assert_allclose(encoder(batch).embedding.numpy(), encoder(reference).embedding.numpy(), atol=1e-6)


def test_the_key_names_tokenizer_prompt_and_length(tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir, max_length=24)
    key = pretokenized.token_key(encoder, "query")
    encoder.tokenize(TEXTS, "query")  # a call sets padding and truncation on the tokenizer: not part of the key
    assert pretokenized.token_key(encoder, "query") == key
    assert pretokenized.token_key(encoder, "passage") != key  # E5's prompts differ
    assert pretokenized.token_key(Encoder.load(tiny_model_dir, max_length=32), "query") != key
    assert pretokenized.token_key(Encoder.load("minilm-en", max_length=24), "query") != key


def prepare(tmp_path, *models, max_length=32):
    out = str(tmp_path / "bitext")
    args = ["data", "prepare", "--captions", str(SAMPLE_DIR / "train_captions.parquet"), "--languages", "de,qu",
            "--exclude-images-from", str(SAMPLE_DIR / "val_captions.parquet"), "--out", out, "--rows-per-shard", "700",
            "--max-length", str(max_length)]
    for model in models:
        args += ["--tokenize-for", str(model)]
    assert main(args) == 0
    return out


def distill_config(tmp_path, bitext, student, teacher, **overrides):
    base = {"student": str(student), "teacher": str(teacher), "output_dir": str(tmp_path / "run"), "steps": 3,
            "batch_size": 8, "max_length": 32, "checkpoint_every": 0,
            "data": {"bitext": bitext, "dev_languages": ["de", "qu"]}, "optim": {"lr": 1e-3, "warmup_steps": 1},
            "loss": {"mse_weight": 1.0}}
    base.update(overrides)
    return load_config(DistillConfig, base)


def test_a_step_on_prepared_tokens_tokenises_nothing_and_computes_the_same_loss(tmp_path, monkeypatch):
    # A teacher with another tokenizer (MiniLM's WordPiece, no prompts) beside the student's (XLM-R, E5 prompts).
    bitext = prepare(tmp_path, "student-init", "minilm-en")
    assert len(data.prepared_tokens(bitext)) == 4  # two sides for each of two tokenizers
    cfg = distill_config(tmp_path, bitext, "student-init", "minilm-en")
    student, teacher = load_models(cfg, torch.device("cpu"))
    learner = Distiller(cfg, student, teacher)
    assert set(learner.token_columns) == {"teacher", "student"}
    assert len(learner.columns()) == 2 + 2 + 4  # texts; the teacher's English; the student's translation and English
    batch = next(learner.batches(0))
    with torch.no_grad():
        columns, learner.token_columns = learner.token_columns, {}  # as if the bitext had no token columns
        by_text = learner.loss(learner.prepare(batch[0], batch[1]))[0]
        learner.token_columns = columns
        with monkeypatch.context() as patched:
            patched.setattr(Encoder, "tokenize", lambda *a, **k: pytest.fail("tokenised on the trainer"))
            prepared = learner.prepare(*batch)
        assert all(t.shape[1] % 8 == 0 for t in (prepared["teacher"]["input_ids"], prepared["student"]["input_ids"]))
        by_tokens = learner.loss(prepared)[0]
    assert float(by_tokens) == pytest.approx(float(by_text), rel=1e-5)


def test_prepared_tokens_for_another_length_are_not_used(tmp_path, tiny_model_dir, caplog):
    bitext = prepare(tmp_path, tiny_model_dir, max_length=16)
    cfg = distill_config(tmp_path, bitext, tiny_model_dir, tiny_model_dir)  # trains at max_length 32
    with caplog.at_level(logging.WARNING, logger="optical_ray.pretokenized"):
        learner = Distiller(cfg, *load_models(cfg, torch.device("cpu")))
    assert learner.token_columns == {} and learner.columns() == ("english", "translation")
    assert "max_length 16" in caplog.text and "tokenising it on the trainer" in caplog.text


def test_training_on_prepared_tokens_ends_where_training_on_texts_does(tmp_path, tiny_model_dir, tiny_teacher_dir):
    plain = prepare(tmp_path / "plain")
    tokens = prepare(tmp_path / "tokens", tiny_model_dir, tiny_teacher_dir)
    runs = [distill(distill_config(tmp_path / name, bitext, tiny_model_dir, tiny_teacher_dir), progress=False)
            for name, bitext in (("plain", plain), ("tokens", tokens))]
    losses = [[m["loss"] for m in run.history] for run in runs]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    weights = [Encoder.load(run.model_dir).state_dict() for run in runs]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5)


def test_length_buckets_keep_the_order_a_function_of_seed_and_step(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    pairs = pa.table({"english": ["w " * int(k) for k in rng.integers(1, 40, n)],
                      "translation": ["v " * int(k) for k in rng.integers(1, 40, n)]})
    lengths = batching.pair_lengths(pairs, ("english", "translation"))

    def spread(stream, steps):
        return np.mean([np.ptp([len(e) + len(t) for e, t in zip(*next(stream))]) for _ in range(steps)])

    stream = batching.batches(pairs, 10, seed=2, length_buckets=5)
    first = [next(stream) for _ in range(75)]  # 30 batches per epoch: two and a half epochs
    assert sorted(e for batch in first[:30] for e in batch[0]) == sorted(pairs["english"].to_pylist())  # each pair once
    resumed = batching.batches(pairs, 10, seed=2, start_step=37, length_buckets=5)
    assert [next(resumed) for _ in range(38)] == first[37:]
    halves = [batching.batches(pairs, 10, seed=2, start_step=37, rank=r, world=2, length_buckets=5) for r in range(2)]
    (e0, t0), (e1, t1) = next(halves[0]), next(halves[1])
    assert (e0 + e1, t0 + t1) == first[37]
    # Bucketed batches hold pairs of similar length: far less padding than batches as drawn.
    assert spread(batching.batches(pairs, 10, seed=2, length_buckets=5), 30) < 0.5 * spread(batching.batches(pairs, 10, seed=2), 30)
    order = batching.bucket_by_length(np.arange(n), lengths, 10, 5, [2, 0])
    assert sorted(order) == list(range(n))


def test_length_buckets_at_their_default_leave_the_records_keys_alone(tmp_path):
    cfg = load_config(DistillConfig, {})
    assert "length_buckets" not in training_fields(cfg)
    assert training_fields(load_config(DistillConfig, {"length_buckets": 8}))["length_buckets"] == 8
