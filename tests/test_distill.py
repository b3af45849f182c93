import json
from pathlib import Path

import pytest
import torch
import yaml

from optical_ray.batching import batches
from optical_ray.config import ConfigError, DistillConfig, load_config
from optical_ray.distill import Distiller, distill, load_bitext, load_models
from optical_ray.encoder import Encoder


def tiny_config(tmp_path, student, teacher, **overrides):
    base = {"student": str(student), "teacher": str(teacher), "output_dir": str(tmp_path / "run"), "steps": 6,
            "batch_size": 8, "log_every": 2, "max_length": 32, "data": {"dev_languages": ["de", "qu"]},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    base.update(overrides)
    return load_config(DistillConfig, base)


def test_distill_trains_saves_and_reports(tmp_path, tiny_model_dir, tiny_teacher_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_teacher_dir, loss={"mse_weight": 1.0})
    result = distill(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    assert {"loss", "loss_ot", "loss_contrastive", "loss_mse", "lr", "pairs_per_s"} <= set(lines[0])
    report = json.loads((tmp_path / "run" / "dev" / "report.json").read_text())
    assert set(report["languages"]) == {"de", "qu"} and report["languages"]["de"]["n_queries"] == 300
    root = tmp_path / "run" / "student"
    assert result.model_dir.parent == root and (root / "LATEST").read_text().strip() == result.model_dir.name
    card = (result.model_dir / "README.md").read_text()  # a model card, as sentence-transformers saves
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "sentence-similarity" and "de" in front["language"] and "qu" in front["language"]
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {f"R@1 {lang} -> en": round(report["languages"][lang]["R@1"], 4) for lang in ("de", "qu")}
    saved = Encoder.load(root)  # the root means its latest version
    start = Encoder.load(tiny_model_dir)
    changed = [n for (n, p), (_, q) in zip(saved.named_parameters(), start.named_parameters()) if not torch.equal(p, q)]
    assert changed and "model.embeddings.word_embeddings.weight" not in changed  # frozen by default


def test_a_retrained_student_is_a_new_version_never_an_overwrite(tmp_path, tiny_model_dir, tiny_teacher_dir):
    from optical_ray.model_store import publish, resolve_model

    first = publish(tiny_model_dir, str(tmp_path / "students"))
    second = publish(tiny_teacher_dir, str(tmp_path / "students"))
    assert first != second and resolve_model(tmp_path / "students") == Path(second)
    assert Encoder.load(first).model.config == Encoder.load(tiny_model_dir).model.config  # still there, unchanged
    (tmp_path / "students" / "LATEST").write_text("../elsewhere\n")
    with pytest.raises(FileNotFoundError, match="does not name a version"):
        resolve_model(tmp_path / "students")


def test_targets_are_the_corpus_side_english(tmp_path, tiny_model_dir, tiny_teacher_dir):
    """Evaluation retrieves English *passages* with translated *queries*; the MSE targets must be the
    teacher's passage embeddings, and the student's English side a passage too."""
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_teacher_dir, loss={"mse_weight": 1.0, "ot_weight": 0.0,
                                                                      "contrastive_weight": 0.0})
    student, teacher = load_models(cfg, torch.device("cpu"))
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # so the training-mode forward equals the eval-mode encodings below
    english, translation = ["A dog runs on the grass.", "Two men talk."], ["Un perro corre.", "Zwei Männer reden."]

    def expected_mse(english_prompt):
        target = torch.from_numpy(teacher.encode(english, english_prompt))
        return float(torch.nn.functional.mse_loss(torch.from_numpy(student.encode(english, english_prompt)), target)
                     + torch.nn.functional.mse_loss(torch.from_numpy(student.encode(translation, "query")), target))

    as_passage, as_query = expected_mse("passage"), expected_mse("query")
    assert abs(as_passage - as_query) > 1e-4  # the prompt matters for this model, so the check can fail
    assert Distiller(cfg, student, teacher).step(english, translation)["loss_mse"] == pytest.approx(as_passage, rel=1e-4)


def test_same_seed_same_losses(tmp_path, tiny_model_dir, tiny_teacher_dir):
    runs = [distill(tiny_config(tmp_path / str(i), tiny_model_dir, tiny_teacher_dir, steps=3, log_every=1),
                    progress=False).history for i in range(2)]
    assert [m["loss"] for m in runs[0]] == [m["loss"] for m in runs[1]]


class Crash(Exception):
    pass


TRAIN_STEP = Distiller.step


def record_batches(monkeypatch, seen: list, crash_at: int | None = None):
    """Distiller.step records every batch it trains on; with ``crash_at`` it raises there instead."""
    def recording(self, english, translation, inputs=None):
        if crash_at is not None and self.step_count == crash_at:
            raise Crash(f"killed at step {crash_at}")
        seen.append((self.step_count, english, translation))
        return TRAIN_STEP(self, english, translation, inputs)

    monkeypatch.setattr(Distiller, "step", recording)


def test_an_interrupted_run_resumes_exactly(tmp_path, tiny_model_dir, tiny_teacher_dir, monkeypatch):
    """Killed in step 6 with checkpoints every 2 steps, then run again: it resumes at step 4, the pairs
    consumed are exactly the uninterrupted run's (none twice, none skipped) and so are the weights."""
    def cfg(name):
        return tiny_config(tmp_path / name, tiny_model_dir, tiny_teacher_dir, steps=8, checkpoint_every=2,
                           log_every=1, optim={"lr": 1e-3, "warmup_steps": 2})

    straight: list = []
    record_batches(monkeypatch, straight)
    expected = distill(cfg("straight"), progress=False)

    interrupted: list = []
    record_batches(monkeypatch, interrupted, crash_at=5)
    with pytest.raises(Crash):
        distill(cfg("interrupted"), progress=False)
    assert sorted(p.name for p in (tmp_path / "interrupted" / "run" / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]
    record_batches(monkeypatch, interrupted)
    resumed = distill(cfg("interrupted"), progress=False)

    steps = [s for s, *_ in interrupted]
    assert steps == [0, 1, 2, 3, 4, 4, 5, 6, 7]  # step 4 ran, was lost with the crash, and ran again
    del interrupted[4]
    assert interrupted == straight
    assert [m["step"] for m in resumed.history] == [5, 6, 7, 8]
    logged = [json.loads(line)["step"] for line in (tmp_path / "interrupted" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))  # what was logged after the checkpoint was dropped, then logged again
    a, b = Encoder.load(expected.model_dir), Encoder.load(resumed.model_dir)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    assert resumed.dev_report["languages"] == expected.dev_report["languages"]


def test_resuming_with_a_changed_config_is_refused_naming_the_keys(tmp_path, tiny_model_dir, tiny_teacher_dir):
    distill(tiny_config(tmp_path, tiny_model_dir, tiny_teacher_dir, steps=2), progress=False)
    changed = tiny_config(tmp_path, tiny_model_dir, tiny_teacher_dir, steps=2, loss={"sinkhorn_reg": 0.2},
                          optim={"lr": 5e-4, "warmup_steps": 2})
    with pytest.raises(ConfigError, match=r"another config \(loss.sinkhorn_reg: 0.05 -> 0.2; optim.lr: 0.001 -> 0.0005\)"):
        distill(changed, progress=False)
    # where it writes and how often it checkpoints are not part of what it trains
    distill(tiny_config(tmp_path, tiny_model_dir, tiny_teacher_dir, steps=2, checkpoint_every=1), progress=False)


def test_two_workers_take_the_halves_of_one_global_batch(tmp_path, tiny_model_dir):
    pairs = load_bitext(tiny_config(tmp_path, tiny_model_dir, tiny_model_dir))
    whole = batches(pairs, 8, seed=1, start_step=3)
    halves = [batches(pairs, 8, seed=1, start_step=3, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        english, translation = next(whole)
        (e0, t0), (e1, t1) = next(halves[0]), next(halves[1])
        assert (e0 + e1, t0 + t1) == (english, translation)
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        next(batches(pairs, 8, seed=1, world=3))


def test_batches_restart_mid_epoch_like_an_uninterrupted_stream(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_model_dir)
    pairs = load_bitext(cfg)
    stream = batches(pairs, 64, seed=3)
    first = [next(stream) for _ in range(200)]  # crosses epoch boundaries (140 batches per epoch)
    restarted = batches(pairs, 64, seed=3, start_step=150)
    assert [next(restarted) for _ in range(50)] == first[150:]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(batches(pairs.slice(0, 3), 8, seed=0))


def test_a_teacher_of_another_width_is_distilled_through_a_learned_map(tmp_path, tiny_model_dir, cls_teacher_dir):
    teacher = cls_teacher_dir
    assert (Encoder.load(teacher).pooling, Encoder.load(teacher).dim) == ("cls", 16)
    cfg = tiny_config(tmp_path, tiny_model_dir, teacher, steps=4, checkpoint_every=2,
                      loss={"ot_weight": 1.0, "contrastive_weight": 1.0, "mse_weight": 1.0})
    result = distill(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(m) >= {"loss_ot", "loss_contrastive", "loss_mse"} for m in lines)
    # The map into the teacher's space is trained and checkpointed, and the saved student leaves it out.
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000004" / "train_state.pt", weights_only=True)
    assert state["to_teacher"]["states.weight"].shape == (24, 32) and state["to_teacher"]["embedding.weight"].shape == (16, 32)
    saved = Encoder.load(result.model_dir)
    assert saved.dim == 32 and not hasattr(saved, "to_teacher")
    assert not any("to_teacher" in p.name for p in result.model_dir.rglob("*"))


def test_a_run_refuses_to_resume_on_bitext_prepared_again(tmp_path, tiny_model_dir, tiny_teacher_dir):
    from optical_ray.config import SAMPLE_DIR
    from optical_ray.prepare import prepare_bitext

    bitext = str(tmp_path / "bitext")
    captions = [str(SAMPLE_DIR / "train_captions.parquet")]
    prepare_bitext(bitext, captions=captions, languages=["de", "qu"])
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_teacher_dir, steps=2, checkpoint_every=2,
                      data={"bitext": bitext, "dev_languages": ["de", "qu"]})
    distill(cfg, progress=False)
    distill(cfg, progress=False)  # the same data: resumes (nothing left to train)
    prepare_bitext(bitext, captions=captions, languages=["de", "ay"])  # the same URI, other pairs
    with pytest.raises(ConfigError, match=r"holds a run on other data: the bitext at .*bitext was prepared again"):
        distill(cfg, progress=False)
