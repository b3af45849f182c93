"""FAISS retrieval indexes: build from an ``index_factory`` string, measure recall against exact
search, and store index + metadata + manifest in a folder (local or s3://).

A stored index is three files: ``index.faiss`` (``faiss.write_index``), ``metadata.parquet`` (row i
of the index is row i: ``id``, ``image_id``, ``text``) and ``manifest.json`` (model, factory, count,
dim, the index file's SHA-256, and recall@10 against exact search). Vectors are L2-normalised, so
inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from . import storage

INDEX_FILE, METADATA_FILE, MANIFEST_FILE = "index.faiss", "metadata.parquet", "manifest.json"


class IndexFormatError(ValueError):
    """A bad factory string, or a stored index that does not match its manifest."""


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(vectors: np.ndarray, factory: str, use_gpu: bool | None = None, seed: int = 0) -> faiss.Index:
    """An inner-product index over ``vectors`` [n, d] from an ``index_factory`` string ("Flat",
    "HNSW32", "IVF1024,PQ32", ...). Trained on the vectors themselves when the type needs training.
    On a GPU build of FAISS (the ``gpu`` extra) with a GPU present, training and adding run there
    and the index is moved back to the CPU for storage."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexFormatError(f"invalid FAISS factory string {factory!r}: {str(err).splitlines()[-1]}") from None
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if use_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    if not index.is_trained:
        n_train = min(len(vectors), 256 * 1024)
        sample = vectors[np.random.default_rng(seed).choice(len(vectors), n_train, replace=False)]
        index.train(sample)
    index.add(vectors)
    return faiss.index_gpu_to_cpu(index) if use_gpu else index


def recall_vs_exact(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k (inner product over ``vectors``) that ``index``
    also returns in its top-k."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


@dataclass
class StoredIndex:
    index: faiss.Index
    metadata: pa.Table
    manifest: dict


def save_index(index: faiss.Index, metadata: pa.Table, manifest: dict, out_uri: str) -> dict:
    """Write the three files; the manifest goes last, so a folder with a manifest is complete."""
    if index.ntotal != metadata.num_rows:
        raise IndexFormatError(f"index holds {index.ntotal} vectors but metadata has {metadata.num_rows} rows")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / INDEX_FILE
        faiss.write_index(index, str(path))
        blob = path.read_bytes()
    manifest = {**manifest, "count": int(index.ntotal), "dim": int(index.d), "sha256": hashlib.sha256(blob).hexdigest()}
    storage.write_bytes(blob, storage.join(out_uri, INDEX_FILE))
    storage.write_parquet(metadata, storage.join(out_uri, METADATA_FILE))
    storage.write_bytes((json.dumps(manifest, indent=2) + "\n").encode(), storage.join(out_uri, MANIFEST_FILE))
    return manifest


def load_index(uri: str) -> StoredIndex:
    """Read a stored index and check it against its manifest (checksum, count, dimension)."""
    manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST_FILE)))
    blob = storage.read_bytes(storage.join(uri, INDEX_FILE))
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise IndexFormatError(f"{uri}: {INDEX_FILE} does not match the checksum in {MANIFEST_FILE}")
    index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    metadata = storage.read_parquet(storage.join(uri, METADATA_FILE))
    if index.ntotal != manifest["count"] or metadata.num_rows != manifest["count"] or index.d != manifest["dim"]:
        raise IndexFormatError(f"{uri}: index ({index.ntotal} x {index.d}), metadata ({metadata.num_rows} rows) and "
                          f"manifest ({manifest['count']} x {manifest['dim']}) disagree")
    return StoredIndex(index=index, metadata=metadata, manifest=manifest)
