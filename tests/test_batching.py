"""The training order of prepared bitext: lanes of row groups, each worker reading only its own."""

import pyarrow as pa
import pytest

from optical_ray import batching, data, storage
from optical_ray.config import ConfigError, DistillConfig, load_config

N = 230


def shards(tmp_path, n=N, rows_per_shard=60, **columns):
    """Prepared shards of ``n`` pairs; ``columns`` adds columns or replaces the generated ones."""
    pairs = pa.table({"english": [f"en {i}" for i in range(n)], "translation": [f"xx {i}" for i in range(n)],
                      "lang": ["de", "qu"] * (n // 2), "image_id": [str(i // 5) for i in range(n)],
                      "caption_idx": pa.array([i % 5 for i in range(n)], pa.int32()), **columns})
    data.write_bitext_shards(pairs, str(tmp_path / "bitext"), rows_per_shard=rows_per_shard)
    return data.check_bitext_shards(str(tmp_path / "bitext"))  # each shard's footer, as training reads them


def steps(stream, n):
    return [next(stream) for _ in range(n)]


def test_shards_are_written_shuffled_in_at_least_64_row_groups(tmp_path):
    files = shards(tmp_path)
    footers = list(files.values())
    assert [f.num_rows for f in footers] == [60, 60, 60, 50]
    assert sum(f.num_row_groups for f in footers) >= data.MIN_ROW_GROUPS
    written = pa.concat_tables([storage.read_parquet(f) for f in files])["english"].to_pylist()
    assert sorted(written) == sorted(f"en {i}" for i in range(N)) and written != [f"en {i}" for i in range(N)]


def test_lanes_resume_exactly_and_give_every_worker_count_the_same_batches(tmp_path):
    files = shards(tmp_path)
    first = steps(batching.lane_batches(files, 16, seed=5), 60)  # 2 pairs a lane a step: ~4 lane epochs
    assert all(len(english) == len(translation) == 16 for english, translation in first)
    assert all(t == e.replace("en", "xx") for english, translation in first for e, t in zip(english, translation))
    lane_epoch = [pair for english, _ in first[:10] for pair in english]  # 20 of each lane's ~29 pairs
    assert len(set(lane_epoch)) == len(lane_epoch)  # no pair twice within a lane's epoch
    assert {pair for english, _ in first for pair in english} == {f"en {i}" for i in range(N)}  # none dropped
    for start in (3, 14, 41):
        assert steps(batching.lane_batches(files, 16, seed=5, start_step=start), 60 - start) == first[start:]
    for world in (2, 4, 8):
        workers = [batching.lane_batches(files, 16, seed=5, start_step=7, rank=r, world=world) for r in range(world)]
        for english, translation in first[7:30]:
            parts = [next(w) for w in workers]
            assert [e for p in parts for e in p[0]] == english and [t for p in parts for t in p[1]] == translation
    assert next(batching.lane_batches(files, 16, seed=6)) != first[0]  # the seed decides the order


def test_each_worker_reads_only_the_row_groups_of_its_lanes(tmp_path, monkeypatch):
    files = shards(tmp_path, n=2000, rows_per_shard=500)
    read = []
    real = storage.read_row_group
    monkeypatch.setattr(storage, "read_row_group", lambda uri, g, *a: read.append((uri, g)) or real(uri, g, *a))
    monkeypatch.setattr(storage, "parquet_footer", None)  # the footers check_bitext_shards read are not read again

    def groups_read(rank, world):
        read.clear()
        steps(batching.lane_batches(files, 32, seed=1, rank=rank, world=world), 40)
        return set(read)

    whole = groups_read(0, 1)
    halves = [groups_read(r, 2) for r in range(2)]
    quarters = [groups_read(r, 4) for r in range(4)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == whole
    assert set().union(*quarters) == whole and sum(map(len, quarters)) == len(whole)
    assert max(map(len, quarters)) < 0.3 * len(whole)


def test_length_buckets_within_lanes_resume_exactly(tmp_path):
    files = shards(tmp_path, english=["w " * (i % 37 + 1) for i in range(N)], translation=[f"t{i}" for i in range(N)])
    first = steps(batching.lane_batches(files, 16, seed=5, length_buckets=2), 30)
    assert len({t for batch in first[:10] for t in batch[1]}) == 10 * 16
    assert steps(batching.lane_batches(files, 16, seed=5, start_step=9, length_buckets=2), 21) == first[9:]


def test_token_columns_come_as_arrow_lists_in_lane_order(tmp_path):
    ids = pa.array([[i, i + 1] for i in range(N)], pa.list_(pa.int32()))
    files = shards(tmp_path, ids=ids)
    columns = ("english", "translation", "ids")
    english, _, tokens = next(batching.lane_batches(files, 16, seed=2, columns=columns))
    assert isinstance(tokens, pa.Array) and [t[0] for t in tokens.to_pylist()] == [int(e.split()[1]) for e in english]


def test_too_few_row_groups_or_uneven_lanes_are_refused_by_name(tmp_path):
    files = shards(tmp_path, n=6, rows_per_shard=6)  # 6 row groups of one pair
    with pytest.raises(ValueError, match=r"6 row groups, fewer than the 8 lanes \(data.lanes\)"):
        next(batching.lane_batches(files, 8, seed=0))
    with pytest.raises(ValueError, match=r"batch_size 12 does not split into 8 lanes"):
        next(batching.lane_batches(files, 12, seed=0))
    with pytest.raises(ConfigError, match=r"batch_size 20 does not split into data.lanes 8"):
        load_config(DistillConfig, {"batch_size": 20, "data": {"bitext": str(tmp_path / "bitext")}})
    with pytest.raises(ConfigError, match=r"data.lanes 8 do not split over ray.num_workers 3"):
        load_config(DistillConfig, {"data": {"bitext": str(tmp_path / "bitext")}, "ray": {"num_workers": 3}})


def test_training_reads_prepared_shards_in_lanes(tmp_path):
    from optical_ray.distill import training_batches

    files = shards(tmp_path)
    cfg = load_config(DistillConfig, {"batch_size": 16, "data": {"bitext": str(tmp_path / "bitext"), "lanes": 4}})
    assert next(training_batches(cfg, start_step=3)) == next(batching.lane_batches(files, 16, cfg.seed, 3, lanes=4))
