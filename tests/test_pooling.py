"""Pooling and normalisation as a model's folder says (issue #34 item 2): our embeddings equal
sentence-transformers' own for a mean-pooled, a CLS-pooled, a max-pooled and a Dense-projected model,
and a folder we save loads back the same in sentence-transformers."""

import warnings

import numpy as np
import pytest
import torch

from optical_ray.encoder import Encoder
from optical_ray.st_folder import FolderFormatError, embedding_dimension, read_settings

TEXTS = ["A dog runs across the field.", "Zwei Kinder spielen im Sand.", "Allqu phawan.", "ok"]


def st_model(path, tiny_model_dir, pooling: str, dense: int | None = None, normalize: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    transformer = models.Transformer(str(tiny_model_dir), max_seq_length=32)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        modules.append(models.Dense(transformer.get_word_embedding_dimension(), dense, activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(path))
    return model


# Mean pooling + Normalize is every shipped model's (and tests/test_models.py checks it against
# sentence-transformers); here the others.
@pytest.mark.parametrize("pooling, dense, normalize", [("max", None, False), ("lasttoken", None, True), ("cls", 16, True)])
def test_embeddings_equal_sentence_transformers(tmp_path, tiny_model_dir, pooling, dense, normalize):
    reference = st_model(tmp_path / "m", tiny_model_dir, pooling, dense, normalize)
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    encoder = Encoder.load(tmp_path / "m")
    assert (encoder.pooling, encoder.normalize, encoder.dim) == (pooling, normalize, dense or 32)
    np.testing.assert_allclose(encoder.encode(TEXTS), expected, atol=1e-5)
    assert embedding_dimension(tmp_path / "m") == (dense or 32)

    encoder.save(tmp_path / "saved")  # what we write loads in sentence-transformers the same
    from sentence_transformers import SentenceTransformer

    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(TEXTS), expected, atol=1e-5)
    np.testing.assert_allclose(Encoder.load(tmp_path / "saved").encode(TEXTS), expected, atol=1e-5)
    fresh = Encoder.load(tmp_path / "m")  # a checkpoint restores the Dense layers too (exact resume)
    for layer in fresh.dense:
        torch.nn.init.zeros_(layer[0].weight)
    fresh.load_weights(tmp_path / "saved")
    np.testing.assert_allclose(fresh.encode(TEXTS), expected, atol=1e-5)


def test_unsupported_modules_are_refused_by_name(tmp_path, tiny_model_dir):
    st_model(tmp_path / "m", tiny_model_dir, "mean")
    config = tmp_path / "m" / "1_Pooling" / "config.json"
    config.write_text('{"embedding_dimension": 32, "pooling_mode": "weightedmean", "include_prompt": true}')
    with pytest.raises(FolderFormatError, match=r"1_Pooling/config.json: pooling weightedmean is not supported"):
        read_settings(tmp_path / "m")
    config.write_text('{"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": false}')
    with pytest.raises(FolderFormatError, match=r"include_prompt: false"):
        read_settings(tmp_path / "m")


def test_a_plain_hugging_face_folder_gets_mean_pooling_with_a_warning(tmp_path, tiny_model_dir, caplog):
    plain = Encoder.load(tiny_model_dir)
    plain.model.save_pretrained(tmp_path / "hf")
    plain.tokenizer.save_pretrained(tmp_path / "hf")
    assert not read_settings(tmp_path / "hf").stated
    encoder = Encoder.load(tmp_path / "hf")
    assert "no modules.json" in caplog.text and encoder.pooling == "mean" and encoder.normalize


def test_a_cls_dense_student_is_served_in_its_own_width(tmp_path, cls_teacher_dir, ray_cluster):
    """The serving deployments' own classes in this process (Serve's local testing mode refuses
    ``@serve.batch`` in Ray 2.60): the query encoder applies CLS pooling and the Dense layer, the retriever
    takes the Dense width from the folder, and its hits are those of the library's encoder and index."""
    from optical_ray.config import SAMPLE_DIR
    from optical_ray.corpus_index import build_corpus_index
    from optical_ray.index import Searchable, load_index, resolve_version
    from optical_ray.service.app import QueryEncoder, Retriever

    model, root = str(cls_teacher_dir), str(tmp_path / "index")
    build_corpus_index(model, [str(SAMPLE_DIR / "test_2018_captions.parquet")], root, "Flat", query_langs=["de"],
                       sample_queries=10)
    query = "Ein Hund rennt über eine Wiese."
    encoder = QueryEncoder.func_or_class(model).encoder  # what its batched embed() runs
    vector = encoder.embed_tokens(encoder.tokenize([query], "query"))[0]
    retriever = Retriever.func_or_class(resolve_version(root), model)
    assert retriever.dim == vector.shape[0] == 16 and retriever.status()["dim"] == 16
    served = retriever.search(vector[None, :], 5)["results"][0]
    expected = Searchable(load_index(resolve_version(root))).search(Encoder.load(model).encode([query], "query"), 5)[0]
    assert [h["text"] for h in served] == [h["text"] for h in expected]
    np.testing.assert_allclose([h["score"] for h in served], [h["score"] for h in expected], atol=1e-5)
