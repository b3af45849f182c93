"""The training order: which pairs each step trains on, as a pure function of ``(seed, step)``.

Two orders, one for each kind of training data:

- :func:`batches` for pairs held in memory (built from caption tables at the start of a run): each
  epoch is one permutation of every pair.
- :func:`lane_batches` for prepared bitext shards (``optical-ray data prepare``): the corpus is read
  in *lanes* of row groups, so that each data-parallel worker reads only the row groups that hold its
  part of each global batch, not the whole corpus.

In both, starting at ``start_step`` yields exactly what a run from step 0 would have reached (resuming
replays no pair and skips none), and worker ``rank`` of ``world`` gets positions
``rank·B/world … (rank+1)·B/world`` of the same global batch: one worker and eight train on the same
pairs in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage

TEXT_COLUMNS = ("english", "translation")


def batches(pairs: pa.Table, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
            columns: tuple[str, ...] = TEXT_COLUMNS, length_buckets: int = 0) -> Iterator[tuple[list, ...]]:
    """Endless training batches of ``columns`` (bitext: english, translation, and any token columns
    :mod:`optical_ray.pretokenized` added), one list per column.

    Each epoch is a fresh permutation drawn from ``(seed, epoch)``; a step takes the next
    ``batch_size`` pairs of it (the epoch's remainder is dropped). ``length_buckets``: see
    :func:`bucket_by_length`."""
    if pairs.num_rows < batch_size:
        raise ValueError(f"{pairs.num_rows} bitext pairs cannot fill one batch of {batch_size}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {world} workers")
    values = [column_values(pairs[c]) for c in columns]
    lengths = pair_lengths(pairs, columns) if length_buckets else None
    per_epoch, local = pairs.num_rows // batch_size, batch_size // world
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(pairs.num_rows)
        if length_buckets:
            order = bucket_by_length(order, lengths, batch_size, length_buckets, [seed, epoch])
        for i in range(offset, per_epoch):
            first = i * batch_size + rank * local
            idx = order[first : first + local]
            yield tuple(take(column, idx) for column in values)
            step += 1


def lane_batches(shards: Mapping[str, pq.FileMetaData], batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world: int = 1, columns: tuple[str, ...] = TEXT_COLUMNS, lanes: int = 8, length_buckets: int = 0
                 ) -> Iterator[tuple[list, ...]]:
    """:func:`batches` for bitext shards, each worker reading only its share of them. ``shards``: each
    shard's URI and footer, as :func:`optical_ray.data.check_bitext_shards` returns them.

    Every row group of every shard is dealt, in an order drawn from ``(seed, epoch)``, to one of
    ``lanes`` lanes; a lane reads its row groups one after another, each one's rows in an order drawn
    from ``(seed, epoch, shard, row group)``, and runs on into its next epoch without waiting for the
    other lanes. Global batch ``i`` is chunk ``i`` (``batch_size / lanes`` rows) of every lane, lane 0
    first. Nothing in that depends on the number of workers, and worker ``rank`` of ``world`` is handed
    the chunks of lanes ``rank·lanes/world`` to ``(rank+1)·lanes/world`` -- its positions of the batch
    -- so it opens only their row groups: reads and memory per worker fall as workers are added.

    A lane's row groups are a sample of the whole corpus because :func:`optical_ray.data.write_bitext_shards`
    writes the pairs in a shuffled order. Each lane sees each of its pairs once per lane epoch; no pair
    is dropped. ``length_buckets``: :func:`bucket_by_length` within each row group, in chunks."""
    if batch_size % lanes:
        raise ValueError(f"batch_size {batch_size} does not split into {lanes} lanes (data.lanes)")
    if lanes % world:
        raise ValueError(f"{lanes} lanes (data.lanes) do not split evenly over {world} workers")
    files, footers = list(shards), list(shards.values())
    groups = [(f, g, footer.row_group(g).num_rows) for f, footer in enumerate(footers)
              for g in range(footer.num_row_groups) if footer.row_group(g).num_rows]
    if len(groups) < lanes:
        raise ValueError(f"the bitext shards ({files[0].rsplit('/', 1)[0] if files else 'none'}) hold "
                         f"{len(groups)} row groups, fewer than the {lanes} lanes (data.lanes) they are dealt to: "
                         "prepare them again with `optical-ray data prepare` or lower data.lanes")
    chunk = batch_size // lanes

    def rows(lane: int) -> Iterator[tuple[list, np.ndarray]]:
        """Lane ``lane``'s rows from ``start_step`` on, as (column values of a row group, rows of it)."""
        skip, epoch = start_step * chunk, 0
        while True:
            for u in np.random.default_rng([seed, epoch]).permutation(len(groups))[lane::lanes]:
                f, g, n = groups[u]
                if skip >= n:  # before the start: not read
                    skip -= n
                    continue
                table = storage.read_row_group(files[f], g, list(columns), footers[f])
                order = np.random.default_rng([seed, epoch, f, g]).permutation(n)
                if length_buckets:
                    order = bucket_by_length(order, pair_lengths(table, columns), chunk, length_buckets, [seed, epoch, f, g])
                yield [column_values(table[c]) for c in columns], order[skip:]
                skip = 0
            epoch += 1

    mine = [rows(lane) for lane in range(rank * lanes // world, (rank + 1) * lanes // world)]
    held: list[tuple[list, np.ndarray]] = [(([],) * len(columns), np.empty(0, dtype=np.int64)) for _ in mine]
    while True:
        pieces = []
        for k, lane in enumerate(mine):
            values, order = held[k]
            need = chunk
            while len(order) < need:  # the chunk runs on into the lane's next row group
                pieces.append((values, order))
                need -= len(order)
                values, order = next(lane)
            pieces.append((values, order[:need]))
            held[k] = (values, order[need:])
        yield tuple(gather(pieces, k, 0, len(mine) * chunk) for k in range(len(columns)))


def column_values(column: pa.ChunkedArray) -> list | pa.Array:
    """A column as batches hand it out: text as a Python list, token lists (:mod:`optical_ray.pretokenized`)
    as one Arrow array, which stays compact in memory and is padded without a Python loop."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.combine_chunks()
    return column.to_pylist()


def take(values: list | pa.Array, idx: np.ndarray) -> list | pa.Array:
    return values.take(pa.array(idx)) if isinstance(values, pa.Array) else [values[j] for j in idx]


def pair_lengths(pairs: pa.Table, columns: tuple[str, ...]) -> np.ndarray:
    """Characters per row over the first two (text) ``columns``: what bucketing sorts by."""
    return sum(pc.utf8_length(pairs[c]).to_numpy(zero_copy_only=False) for c in columns[:2])


def bucket_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, window: int, seed: list[int]) -> np.ndarray:
    """``order`` with pairs of similar length in the same batch: each run of ``window`` batches is
    sorted by length, cut into batches, and those batches are shuffled (from ``seed`` and the window's
    number). A permutation of ``order``, so an epoch still sees each pair once, and a function of its
    arguments, so resuming stays exact. A batch of short pairs pads to a short length: on a GPU the
    tokens padded away are work saved."""
    out = order.copy()
    span = window * batch_size
    for w, start in enumerate(range(0, len(order), span)):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        full = len(chunk) // batch_size * batch_size  # a short last window keeps its tail in place
        blocks = chunk[:full].reshape(-1, batch_size)
        blocks = blocks[np.random.default_rng([*seed, w]).permutation(len(blocks))]
        out[start : start + full] = blocks.reshape(-1)
        out[start + full : start + len(chunk)] = chunk[full:]
    return out


def gather(pieces: list[tuple[list, np.ndarray]], k: int, lo: int, hi: int) -> list | pa.Array:
    """Positions ``lo:hi`` of column ``k`` of a batch filled from several row groups: ``pieces`` are each
    row group's column values and the rows taken from it, in batch order."""
    parts, start = [], 0
    for values, idx in pieces:
        inside = idx[max(lo - start, 0) : max(hi - start, 0)]
        if len(inside):
            parts.append(take(values[k], inside))
        start += len(idx)
    if parts and isinstance(parts[0], pa.Array):
        return pa.concat_arrays(parts)
    return [item for part in parts for item in part]
