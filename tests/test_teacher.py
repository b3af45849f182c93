"""The task-trained teacher (optical_ray.teacher): positives from the same image, no evaluation image in
its training data, its loss against a hand computation, the bf16 path. On Ray Train, with its report,
it runs in tests/test_experiment.py's end-to-end experiment."""

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from optical_ray import data
from optical_ray.config import SAMPLE_DIR, TeacherConfig, load_config
from optical_ray.distill import distill
from optical_ray.encoder import Encoder
from optical_ray.losses import info_nce
from optical_ray.teacher import CaptionRetrieval, training_pairs


def captions(rows):
    image, idx, text = zip(*rows)
    return pa.table({"image_id": list(image), "caption_idx": list(idx), "lang": ["en"] * len(rows),
                     "text": list(text), "source": ["multi30k-task2"] * len(rows)})


def test_caption_pairs_join_two_captions_of_the_same_image():
    table = captions([("b", 1, "b1"), ("a", 2, "a2"), ("a", 0, "a0"), ("c", 0, "c0"), ("a", 1, "a1"), ("b", 0, "b0"),
                      ("d", 0, "d0"), ("d", 1, "d1")])
    pairs = data.caption_pairs(table, "en", exclude_images={"d"})
    assert list(zip(pairs["query"].to_pylist(), pairs["passage"].to_pylist())) == [
        ("a0", "a1"), ("a1", "a2"), ("a2", "a0"), ("b0", "b1"), ("b1", "b0")]  # c: one caption; d: excluded
    assert pairs["image_id"].to_pylist() == ["a", "a", "a", "b", "b"]
    with pytest.raises(data.DataError, match="no image has two 'en' captions"):
        data.caption_pairs(captions([("a", 0, "a0"), ("b", 0, "b0")]))


def test_no_dev_or_evaluation_image_reaches_the_teachers_training_pairs():
    sample = SAMPLE_DIR
    # Training tables that *include* the dev and test images: they must be filtered out, not absent.
    cfg = load_config(TeacherConfig, {"data": {"train": [str(sample / "train_english_captions.parquet"),
                                                         str(sample / "val_english_captions.parquet")],
                                               "exclude_images_from": [str(sample / "test_2018_captions.parquet")]}})
    pairs = training_pairs(cfg)
    trained = set(pairs["image_id"].to_pylist())
    dev = data.image_ids([str(sample / "val_english_captions.parquet")])
    assert trained and not trained & dev
    assert trained == data.image_ids([str(sample / "train_english_captions.parquet")]) - data.image_ids(
        [str(sample / "test_2018_captions.parquet")])
    text_image = {(r["image_id"], r["text"]) for r in data.read_captions(cfg.data.train).to_pylist()}
    assert all((r["image_id"], r["query"]) in text_image and (r["image_id"], r["passage"]) in text_image
               and r["query"] != r["passage"] for r in pairs.to_pylist())


def test_the_teacher_loss_is_infonce_between_query_and_passage_encodings(tmp_path, tiny_model_dir):
    cfg = load_config(TeacherConfig, {"student": str(tiny_model_dir), "temperature": 0.1, "max_length": 32})
    learner = CaptionRetrieval.create(cfg, torch.device("cpu"))
    learner.student.eval()
    queries, passages = ["a dog runs", "two men talk", "a red car"], ["a dog is running", "men chatting", "a car"]
    with torch.no_grad():
        loss, parts = learner.loss(learner.prepare(queries, passages))
        q = learner.student(learner.student.tokenize(queries, "query")).embedding
        p = learner.student(learner.student.tokenize(passages, "passage")).embedding
    logits = q @ p.T / 0.1
    by_hand = (torch.nn.functional.cross_entropy(logits, torch.arange(3)) +
               torch.nn.functional.cross_entropy(logits.T, torch.arange(3))) / 2
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-4) == pytest.approx(float(info_nce(q, p, 0.1)), rel=1e-4)
    assert parts["contrastive"] == pytest.approx(float(loss))


def test_the_bf16_path_runs_under_cpu_autocast(tiny_model_dir):
    """What a GPU run does (bf16 autocast), on CPU: the step trains and its loss stays float32-close."""
    cfg = load_config(TeacherConfig, {"student": str(tiny_model_dir), "max_length": 32, "optim": {"lr": 1e-3}})
    queries, passages = ["a dog runs", "two men talk", "a red car"], ["a dog is running", "men chatting", "a car"]
    losses = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        learner = CaptionRetrieval.create(cfg, torch.device("cpu"))
        learner.bf16 = bf16
        losses.append(learner.step(queries, passages)["loss"])
    assert np.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], rel=0.05)


def test_a_teacher_trains_in_one_process_and_says_what_it_is(tmp_path, tiny_model_dir):
    cfg = load_config(TeacherConfig, {"student": str(tiny_model_dir), "output_dir": str(tmp_path / "teacher"),
                                      "steps": 4, "batch_size": 8, "log_every": 2, "max_length": 32})
    result = distill(cfg, progress=False, learner=CaptionRetrieval)
    assert set(result.dev_report["languages"]) == {"en"}
    assert result.dev_report["languages"]["en"]["n_queries"] == 1500  # 300 dev images x 5 captions
    front = yaml.safe_load((result.model_dir / "README.md").read_text().split("---\n")[1])
    assert front["language"] == ["en"] and "caption-retrieval" in front["tags"]
    assert Encoder.load(result.model_dir).dim == Encoder.load(tiny_model_dir).dim
