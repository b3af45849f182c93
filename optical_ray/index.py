"""FAISS retrieval indexes: build from an ``index_factory`` string, measure recall against exact
search, and store index + metadata + manifest in a folder (local or s3://).

A stored index is a folder of immutable versions and a pointer: each build writes
``<root>/<version>/`` -- ``index.faiss`` (``faiss.write_index``), ``metadata.parquet`` (row i of the
index is row i: ``id``, ``text`` and ``image_id`` for captions, or a collection's own ids, texts and
metadata fields) and ``manifest.json`` (model, prompts, normalisation,
factory, count, dim, the SHA-256 of every file, recall@10 against exact search) -- and only then
rewrites ``<root>/CURRENT`` with the version's name. Readers resolve ``CURRENT``, so they see the old
version or the new one, never a mix; a build that fails leaves ``CURRENT`` where it was, and a
rebuild into a live root never disturbs what is being served. Vectors are L2-normalised, so inner
product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import storage

try:
    import faiss
except ImportError as err:  # the package's cpu or gpu extra installs it
    raise ImportError('FAISS is not installed: pip install "optical-ray[cpu]" (or "optical-ray[gpu]" on CUDA)') from err

INDEX_FILE, METADATA_FILE, MANIFEST_FILE, CURRENT_FILE = "index.faiss", "metadata.parquet", "manifest.json", "CURRENT"


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
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = faiss_exact(vectors).search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


MAX_FILTER_WIDENING = 64
# A filter matching at most this many rows is searched exactly among them (a few MB of vectors).
EXACT_FILTER_ROWS = 10_000


def filtered_search(index: faiss.Index, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` restricted to ``rows`` (the matches of a metadata filter), in FAISS: an ID
    selector in the search parameters makes it skip every other row while it searches, so no match is
    crowded out by non-matches. Exact for Flat, and for any index that can return its vectors when at
    most ``EXACT_FILTER_ROWS`` rows match (those are scored exactly). Otherwise HNSW and IVF walk their graph or lists wider (efSearch,
    nprobe) by the inverse of the filter's share of rows, up to ``MAX_FILTER_WIDENING`` times, and can
    still miss near neighbours an exact search finds (the index build measures it:
    ``filtered_recall_at_10_vs_exact`` in the manifest; bench/bench_own_data.py at scale). An index type that takes no selector is
    searched deeper and its hits outside ``rows`` dropped (over-fetching)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(rows) <= EXACT_FILTER_ROWS and not isinstance(index, faiss.IndexFlat):
        try:  # few matches: score them all (graph and list walks miss most of a rare value's rows)
            candidates = index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))
        except RuntimeError:  # codes without a direct map (IVF): the selector below
            candidates = None
        if candidates is not None:
            scores, found = faiss_exact(candidates).search(queries, k)
            return scores, np.where(found >= 0, rows[np.maximum(found, 0)], -1)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    # A graph or list walk meets matches in proportion to the filter's share of rows: widen it by the
    # inverse share (capped), or a selective filter leaves most of the k slots empty or far off.
    widen = min(index.ntotal / max(len(rows), 1), MAX_FILTER_WIDENING)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(ivf.nlist, int(np.ceil(ivf.nprobe * widen))))
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(max(index.hnsw.efSearch, k) * widen))
    else:
        params = faiss.SearchParameters(sel=selector)
    try:
        return index.search(queries, k, params=params)
    except RuntimeError:  # e.g. a pre-transform (OPQ) in front of the index
        allowed = np.zeros(index.ntotal, dtype=bool)
        allowed[rows] = True
        depth = min(index.ntotal, 8 * k)
        while True:
            scores, found = index.search(queries, depth)
            keep = (found >= 0) & allowed[np.maximum(found, 0)]
            if depth == index.ntotal or (keep.sum(axis=1) >= min(k, len(rows))).all():
                break
            depth = min(index.ntotal, 4 * depth)
        out_scores, out_rows = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1)
        for i in range(len(queries)):
            hits = np.flatnonzero(keep[i])[:k]
            out_scores[i, : len(hits)], out_rows[i, : len(hits)] = scores[i, hits], found[i, hits]
        return out_scores, out_rows


def rows_by_value(column: pa.ChunkedArray | pa.Array) -> dict:
    """Each value of a metadata column and the index rows that hold it (nulls are never matched)."""
    values = column.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    order = np.flatnonzero(valid)
    keys, inverse = np.unique(values[order].astype(str) if values.dtype == object else values[order], return_inverse=True)
    groups = np.split(order[np.argsort(inverse, kind="stable")], np.cumsum(np.bincount(inverse, minlength=len(keys)))[:-1])
    return {key.item() if hasattr(key, "item") else key: rows for key, rows in zip(keys, groups)}


def filtered_recall_vs_exact(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray,
                             k: int = 10) -> float:
    """:func:`recall_vs_exact` for a search restricted to ``rows``: the fraction of each query's exact
    top-k among ``rows`` that :func:`filtered_search` returns."""
    k = min(k, len(rows))
    _, truth = faiss_exact(vectors[rows]).search(np.ascontiguousarray(queries, dtype=np.float32), k)
    _, found = filtered_search(index, queries, k, rows)
    return float(np.mean([len(set(rows[t]) & set(f)) / k for t, f in zip(truth, found)]))


def faiss_exact(vectors: np.ndarray) -> faiss.Index:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return exact


@dataclass
class StoredIndex:
    index: faiss.Index
    metadata: pa.Table
    manifest: dict


def save_index(index: faiss.Index, metadata: pa.Table, manifest: dict, out_uri: str) -> dict:
    """Write a new version under ``out_uri`` and point ``CURRENT`` at it (last). Returns its manifest."""
    import pyarrow.parquet as pq

    if index.ntotal != metadata.num_rows:
        raise IndexFormatError(f"index holds {index.ntotal} vectors but metadata has {metadata.num_rows} rows")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / INDEX_FILE
        faiss.write_index(index, str(path))
        blobs = {INDEX_FILE: path.read_bytes()}
    buffer = io.BytesIO()
    pq.write_table(metadata, buffer, compression="zstd")
    blobs[METADATA_FILE] = buffer.getvalue()
    digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
    version = f"v{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digests[INDEX_FILE][:8]}"
    # What a serving replica holds: the index, the metadata columns and a Python object per id and text.
    replica_memory = len(blobs[INDEX_FILE]) + metadata.nbytes + 200 * metadata.num_rows
    manifest = {**manifest, "version": version, "count": int(index.ntotal), "dim": int(index.d),
                "normalized": "l2", "metric": "inner_product", "sha256": digests, "replica_memory_bytes": replica_memory}
    folder = storage.join(out_uri, version)
    for name, blob in blobs.items():
        storage.write_bytes(blob, storage.join(folder, name))
    storage.write_bytes((json.dumps(manifest, indent=2) + "\n").encode(), storage.join(folder, MANIFEST_FILE))
    storage.write_bytes((version + "\n").encode(), storage.join(out_uri, CURRENT_FILE))
    return manifest


def resolve_version(uri: str) -> str:
    """The version folder a root's ``CURRENT`` names, or ``uri`` itself when it is a version folder."""
    pointer = storage.join(uri, CURRENT_FILE)
    if storage.exists(pointer):
        version = storage.read_bytes(pointer).decode().strip()
        if not version or "/" in version:
            raise IndexFormatError(f"{pointer}: not a version name ({version!r})")
        return storage.join(uri, version)
    return uri


def load_index(uri: str) -> StoredIndex:
    """Read the current version of a stored index (or a version folder) and check every file
    against the manifest's checksums, and the index against its count and dimension."""
    folder = resolve_version(uri)
    try:
        manifest = json.loads(storage.read_bytes(storage.join(folder, MANIFEST_FILE)))
    except storage.StorageError as err:
        raise IndexFormatError(f"{uri}: no index there ({err})") from None
    if not isinstance(manifest.get("sha256"), dict):
        raise IndexFormatError(f"{folder}: {MANIFEST_FILE} has no per-file checksums (an index written before "
                               "versioned indexes): rebuild it with `optical-ray index`")
    blobs = {}
    for name, digest in manifest["sha256"].items():
        blobs[name] = storage.read_bytes(storage.join(folder, name))
        if hashlib.sha256(blobs[name]).hexdigest() != digest:
            raise IndexFormatError(f"{folder}: {name} does not match the checksum in {MANIFEST_FILE}")
    if set(blobs) != {INDEX_FILE, METADATA_FILE}:
        raise IndexFormatError(f"{folder}: {MANIFEST_FILE} must checksum {INDEX_FILE} and {METADATA_FILE}")
    index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
    metadata = storage.read_parquet(storage.join(folder, METADATA_FILE))
    if index.ntotal != manifest["count"] or metadata.num_rows != manifest["count"] or index.d != manifest["dim"]:
        raise IndexFormatError(f"{folder}: index ({index.ntotal} x {index.d}), metadata ({metadata.num_rows} rows) and "
                               f"manifest ({manifest['count']} x {manifest['dim']}) disagree")
    return StoredIndex(index=index, metadata=metadata, manifest=manifest)


class FilterError(ValueError):
    """A search filter names a field the index has no metadata for."""


class Searchable:
    """A stored index ready to answer: ids and texts as Python lists (every hit has them), metadata
    fields as Arrow arrays (read per hit; one copy, however many fields a collection has) and, built on
    first use per field, the rows holding each value (what filters select)."""

    def __init__(self, stored: StoredIndex):
        self.index, self.version = stored.index, stored.manifest.get("version")
        meta = stored.metadata
        self.ids, self.texts = meta["id"].to_pylist(), meta["text"].to_pylist()
        self.image_ids = meta["image_id"].to_pylist() if "image_id" in meta.column_names else None
        self.fields = {name: meta[name].combine_chunks() for name in meta.column_names
                       if name not in ("id", "text", "image_id")}
        self._rows: dict[str, dict] = {}

    def rows(self, where: dict) -> np.ndarray:
        """The rows matching every ``field: value`` of ``where``."""
        matched = None
        for field, value in where.items():
            if field not in self.fields:
                known = ", ".join(self.fields) or "none: this index has no metadata fields"
                raise FilterError(f"filter: no metadata field {field!r} in this index (fields: {known})")
            if field not in self._rows:
                self._rows[field] = rows_by_value(self.fields[field])
            rows = self._rows[field].get(value, np.empty(0, np.int64))
            matched = rows if matched is None else np.intersect1d(matched, rows)
        return matched

    def search(self, vectors: np.ndarray, k: int, where: dict | None = None) -> list[list[dict]]:
        """Each query's hits: id, score, text, and image_id (caption indexes) or metadata (collections)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if where:
            rows = self.rows(where)
            if not len(rows):
                return [[] for _ in vectors]
            scores, found = filtered_search(self.index, vectors, min(k, len(rows)), rows)
        else:
            scores, found = self.index.search(vectors, k)
        return [[self.hit(r, s) for s, r in zip(score_row, row) if r >= 0] for score_row, row in zip(scores, found)]

    def hit(self, row: int, score: float) -> dict:
        hit = {"id": self.ids[row], "score": float(score), "text": self.texts[row]}
        if self.image_ids is not None:
            hit["image_id"] = self.image_ids[row]
        if self.fields:
            hit["metadata"] = {name: column[row].as_py() for name, column in self.fields.items()}
        return hit
