"""Build a retrieval index for a corpus (caption tables, or a team's own document collection): encode it with Ray Data (the encoder as a callable class in
``map_batches``, so each actor loads the model once), then build, measure and store the FAISS index
(:mod:`optical_ray.index`)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import ray

from . import data
from .documents import read_documents
from .encoder import Encoder
from .index import build_index, filtered_recall_vs_exact, recall_vs_exact, rows_by_value, save_index
from .model_store import model_revision

log = logging.getLogger(__name__)


class EncodeTexts:
    """Ray Data callable class: adds an ``embedding`` column for the ``text`` column."""

    def __init__(self, model: str, prompt: str, batch_size: int):
        self.encoder = Encoder.load(model)
        self.prompt, self.batch_size = prompt, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["embedding"] = self.encoder.encode(list(batch["text"]), self.prompt, self.batch_size)
        return batch


def encode_corpus(model: str, corpus: pa.Table, concurrency: int = 1, batch_size: int = 64) -> np.ndarray:
    """Passage embeddings [rows, dim] in the table's row order."""
    dataset = ray.data.from_arrow(corpus.append_column("row", pa.array(np.arange(corpus.num_rows))))
    encoded = dataset.map_batches(EncodeTexts, fn_constructor_kwargs={"model": model, "prompt": "passage",
                                                                       "batch_size": batch_size},
                                  batch_size=batch_size * 8, concurrency=concurrency, batch_format="numpy")
    rows, vectors = [], []
    for batch in encoded.iter_batches(batch_size=4096, batch_format="numpy"):
        rows.append(batch["row"])
        vectors.append(np.stack(batch["embedding"]))
    order = np.argsort(np.concatenate(rows))
    return np.concatenate(vectors)[order].astype(np.float32)


def build_corpus_index(model: str, data_uris: list[str], out_uri: str, factory: str = "Flat", lang: str = "en",
                       query_langs: list[str] | None = None, sample_queries: int = 200, concurrency: int = 1,
                       batch_size: int = 64, seed: int = 0) -> dict:
    """Index the distinct ``lang`` captions of the tables; report recall@10 of the factory against
    exact search for up to ``sample_queries`` captions of each query language. Returns the manifest."""
    captions = data.read_captions(data_uris)
    corpus = data.corpus_captions(captions, lang)
    log.info("encoding %d %s captions", corpus.num_rows, lang)
    vectors = encode_corpus(model, corpus, concurrency, batch_size)
    index = build_index(vectors, factory, seed=seed)

    recall = {}
    encoder = Encoder.load(model)
    rng = np.random.default_rng(seed)
    for query_lang in data.check_languages(query_langs or [], "query languages"):
        texts = data.query_captions(captions, query_lang)["text"].to_pylist()
        sample = [texts[i] for i in rng.choice(len(texts), min(sample_queries, len(texts)), replace=False)]
        recall[query_lang] = recall_vs_exact(index, vectors, encoder.encode(sample, "query"), k=10)
    metadata = pa.table({"id": pa.array(np.arange(corpus.num_rows)), "image_id": corpus["image_id"], "text": corpus["text"]})
    manifest = {"model": str(model), "model_revision": model_revision(model), "prompts": {"corpus": "passage", "queries": "query"}, "factory": factory,
                "lang": lang, "recall_at_10_vs_exact": recall}
    return save_index(index, metadata, manifest, out_uri)


# Filtered recall is measured for each value of a metadata field with at most this many values (a
# language, a source), not for fields such as URLs whose every value is one document.
MEASURED_FILTER_VALUES = 20


def build_document_index(model: str, corpus_uri: str, out_uri: str, factory: str = "Flat", id_field: str = "id",
                         text_field: str = "text", metadata_fields: list[str] | None = None, format: str | None = None,
                         sample_queries: int = 200, concurrency: int = 1, batch_size: int = 64, seed: int = 0) -> dict:
    """Index a document collection (:func:`optical_ray.documents.read_documents`); hits carry each
    document's id, text and metadata fields. The manifest states recall@10 against exact search,
    overall and with a filter on each value of every metadata field of at most
    ``MEASURED_FILTER_VALUES`` values, measured with ``sample_queries`` of the collection's own texts
    encoded as queries (a stand-in for real ones). Returns the manifest."""
    docs = read_documents(corpus_uri, id_field, text_field, metadata_fields, format)
    log.info("encoding %d documents of %s", docs.num_rows, corpus_uri)
    vectors = encode_corpus(model, docs.select(["text"]), concurrency, batch_size)
    index = build_index(vectors, factory, seed=seed)
    rng = np.random.default_rng(seed)
    texts = docs["text"].to_pylist()
    sample = rng.choice(len(texts), min(sample_queries, len(texts)), replace=False)
    queries = Encoder.load(model).encode([texts[i] for i in sample], "query")
    fields = docs.column_names[2:]
    filtered = {}
    for field in fields:
        values = rows_by_value(docs[field])
        if len(values) <= MEASURED_FILTER_VALUES:
            filtered[field] = {str(v): filtered_recall_vs_exact(index, vectors, queries, rows) for v, rows in values.items()}
    manifest = {"model": str(model), "model_revision": model_revision(model), "prompts": {"corpus": "passage", "queries": "query"}, "factory": factory,
                "collection": corpus_uri, "fields": {"id": id_field, "text": text_field}, "metadata_fields": fields,
                "recall_at_10_vs_exact": {"documents": recall_vs_exact(index, vectors, queries, k=10)},
                "filtered_recall_at_10_vs_exact": filtered}
    return save_index(index, docs, manifest, out_uri)
