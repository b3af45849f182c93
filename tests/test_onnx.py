"""The ONNX Runtime query encoder (optical_ray.onnx_encoder): the same embeddings and R@1 as the torch
encoder (float32), int8 close, files where sentence-transformers looks, a read-only model cached."""

import os

import numpy as np
import pytest

from optical_ray.config import SAMPLE_DIR
from optical_ray.data import read_captions
from optical_ray.encoder import Encoder
from optical_ray.evaluate import evaluate
from optical_ray.onnx_encoder import OnnxEncoder, load_query_encoder, onnx_folder

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("onnx") / "student"
    return Encoder.load(tiny_model_dir).save(folder)


def test_float32_onnx_gives_the_torch_embeddings_and_r1(model):
    captions = read_captions([str(SAMPLE_DIR / "test_2018_captions.parquet")])
    texts = captions["text"].to_pylist()[:300]
    torch_encoder, onnx_encoder = Encoder.load(model), OnnxEncoder(model, "onnx")
    np.testing.assert_allclose(onnx_encoder.encode(texts, "query", 32), torch_encoder.encode(texts, "query", 32), atol=1e-5)
    assert (model / "onnx" / "model.onnx").is_file()  # sentence-transformers' place for it
    langs = ["de", "ay", "qu"]
    expected = evaluate(torch_encoder, captions, langs, progress=False)["languages"]
    measured = evaluate(onnx_encoder, captions, langs, progress=False)["languages"]
    for lang in langs:
        assert abs(measured[lang]["R@1"] - expected[lang]["R@1"]) <= 0.005, lang


def test_int8_onnx_stays_close_to_float32(model):
    texts = ["A dog runs across the field.", "Zwei Männer sprechen.", "a red car parked on the street"]
    reference = Encoder.load(model).encode(texts, "query")
    int8 = load_query_encoder(str(model), "onnx-int8").encode(texts, "query")
    assert (model / "onnx" / "model_qint8.onnx").is_file()
    cosine = (int8 * reference).sum(axis=1)
    assert np.all(cosine > 0.9) and np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)


def test_a_read_only_model_exports_into_the_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTICAL_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert onnx_folder(model).is_relative_to(tmp_path / "cache")


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="encoder backend must be one of torch, onnx, onnx-int8, got 'tensorrt'"):
        load_query_encoder("student-init", "tensorrt")
