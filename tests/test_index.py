"""Stored indexes: immutable versions behind a CURRENT pointer, every file checksummed."""

import faiss
import numpy as np
import pyarrow as pa
import pytest

from optical_ray import storage
from optical_ray.index import (
    CURRENT_FILE,
    INDEX_FILE,
    METADATA_FILE,
    IndexFormatError,
    load_index,
    resolve_version,
    save_index,
)


def small_index(n: int, dim: int = 8, seed: int = 0) -> tuple[faiss.Index, pa.Table]:
    index = faiss.IndexFlatIP(dim)
    index.add(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))
    return index, pa.table({"id": np.arange(n), "image_id": [f"img{i}" for i in range(n)], "text": ["t"] * n})


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "index")
    bucket = request.getfixturevalue("s3")["bucket"]
    return f"s3://{bucket}/versioned-{request.node.name.split('[')[0][-20:]}"


def test_a_rebuild_is_a_new_version_and_the_old_one_stays_readable(root):
    first = save_index(*small_index(10), {"model": "m"}, root)
    first_folder = resolve_version(root)
    second = save_index(*small_index(12, seed=1), {"model": "m"}, root)
    assert first["version"] != second["version"]
    assert storage.read_bytes(storage.join(root, CURRENT_FILE)).decode().strip() == second["version"]
    assert load_index(root).index.ntotal == 12 and load_index(first_folder).index.ntotal == 10
    assert set(second["sha256"]) == {INDEX_FILE, METADATA_FILE} and second["normalized"] == "l2"


def test_a_failed_build_leaves_current_where_it_was(root):
    save_index(*small_index(10), {"model": "m"}, root)
    index, meta = small_index(11)
    with pytest.raises(IndexFormatError, match="11 vectors but metadata has 10 rows"):
        save_index(index, meta.slice(0, 10), {"model": "m"}, root)
    assert load_index(root).index.ntotal == 10


def test_tampered_metadata_fails_its_checksum(root):
    save_index(*small_index(10), {"model": "m"}, root)
    folder = resolve_version(root)
    storage.write_parquet(small_index(10)[1].set_column(1, "image_id", pa.array(["evil"] * 10)),
                          storage.join(folder, METADATA_FILE))
    with pytest.raises(IndexFormatError, match=f"{METADATA_FILE} does not match the checksum"):
        load_index(root)


def test_no_index_there_is_a_clear_error(tmp_path):
    with pytest.raises(IndexFormatError, match="no index there"):
        load_index(str(tmp_path / "nothing"))
