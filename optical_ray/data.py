"""Caption tables and the bitext built from them.

A caption table is Parquet with the columns of ``CAPTION_COLUMNS`` (the schema of the shared
multilingual Flickr30k data). :func:`read_captions` validates it and names the file, row (counting
from 0) and field of anything wrong. :func:`bitext_pairs` joins each non-English caption to the
English caption it translates (or, pivoting on the image, to another English description of the same
picture), keeps evaluation images out, and accounts for every row it drops.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import languages, storage

log = logging.getLogger(__name__)

CAPTION_COLUMNS = {"image_id": pa.string(), "caption_idx": pa.int32(), "lang": pa.string(),
                   "text": pa.string(), "source": pa.string()}
BITEXT_COLUMNS = {"image_id": pa.string(), "caption_idx": pa.int32(), "lang": pa.string(),
                  "english": pa.string(), "translation": pa.string()}

# Sources whose non-English rows are independent descriptions of the image, not translations of
# the English caption with the same index: they cannot be bitext.
INDEPENDENT_SOURCES = ("multi30k-task2", "cltl-dutch-descriptions")


class DataError(ValueError):
    """Bad input data; the message names the file, row and field."""


def read_captions(uris: str | list[str], drop_blank: bool = False) -> pa.Table:
    """Read and validate caption tables (files or folders of ``*.parquet``, local or s3://)."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    files = [f for uri in uris for f in storage.list_files(uri, suffix=".parquet")]
    if not files:
        raise DataError(f"no Parquet files under {', '.join(uris)}")
    return pa.concat_tables([validate_captions(storage.read_parquet(f), f, drop_blank) for f in files])


def validate_captions(table: pa.Table, name: str, drop_blank: bool = False) -> pa.Table:
    """The table with exactly ``CAPTION_COLUMNS`` in their types, or a DataError naming the problem.

    A blank caption is refused, naming its row, unless ``drop_blank``: then blank rows are dropped and
    counted per language in the log (public caption sets do have a few)."""
    columns = {}
    for column, kind in CAPTION_COLUMNS.items():
        if column not in table.column_names:
            raise DataError(f"{name}: missing column {column!r} (has: {', '.join(table.column_names)})")
        values = table.column(column)
        if pa.types.is_integer(kind) and not pa.types.is_integer(values.type):
            raise DataError(f"{name}: column {column!r} has type {values.type}, expected an integer")
        if pa.types.is_string(kind) and not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise DataError(f"{name}: column {column!r} has type {values.type}, expected a string")
        if values.null_count:
            row = first_row(pc.is_null(values))
            raise DataError(f"{name}: row {row}: field {column!r} is missing (null)")
        columns[column] = values.cast(kind)
    table = pa.table(columns)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table["text"])), 0)
    if pc.any(blank).as_py():
        if not drop_blank:
            raise DataError(f"{name}: row {first_row(blank)}: field 'text' is empty (drop_blank: true drops such rows)")
        log.warning("%s: dropped %s", name, count_by_language(table.filter(blank)["lang"], "blank caption"))
        table = table.filter(pc.invert(blank))
    bad = languages.invalid(pc.unique(table["lang"]).to_pylist())
    if bad:
        tag, why = next(iter(bad.items()))
        row = first_row(pc.equal(table["lang"], tag))
        raise DataError(f"{name}: row {row}: field 'lang': {tag!r} is {why}")
    return table


def count_by_language(langs, what: str) -> str:
    """``"3 blank captions (de 2, nl 1)"``."""
    counts = Counter(langs.to_pylist() if hasattr(langs, "to_pylist") else langs)
    total = sum(counts.values())
    return f"{total} {what}{'s' if total != 1 else ''} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"


def check_languages(langs: list[str], what: str = "languages") -> list[str]:
    """``langs`` if each is a valid language tag (:mod:`optical_ray.languages`), else a DataError naming
    ``what`` and every bad tag."""
    bad = languages.invalid(langs)
    if bad:
        raise DataError(f"{what}: {languages.describe(bad)}")
    return list(langs)


@dataclass
class BitextReport:
    """How many pairs were kept per language and how many rows were dropped, for which reason.

    ``dropped`` maps each language to a Counter of reasons; every row read is either kept or counted
    there, so nothing is lost silently."""

    pairs: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)

    def drop(self, langs: pa.Array | pa.ChunkedArray | list[str], reason: str) -> None:
        """Count the rows of languages ``langs`` (one per dropped row) as dropped for ``reason``."""
        for lang, n in Counter(langs.to_pylist() if hasattr(langs, "to_pylist") else langs).items():
            self.dropped.setdefault(lang, Counter())[reason] += n

    def keep(self, langs: pa.Array | pa.ChunkedArray) -> None:
        self.pairs.update(Counter(langs.to_pylist()))

    def reasons(self) -> Counter:
        """Dropped rows by reason, over all languages."""
        return sum(self.dropped.values(), Counter())

    def merge(self, other: BitextReport) -> BitextReport:
        for lang, reasons in other.dropped.items():
            self.dropped.setdefault(lang, Counter()).update(reasons)
        self.pairs.update(other.pairs)
        return self

    def summary(self) -> str:
        kept = ", ".join(f"{lang} {n}" for lang, n in sorted(self.pairs.items()))
        lost = "; ".join(f"{n} {why}" for why, n in self.reasons().most_common()) or "none"
        return f"bitext pairs: {kept or 'none'}. Dropped rows: {lost}."

    def table(self) -> str:
        """Per language: pairs kept and rows dropped by reason (a Markdown table)."""
        reasons = [why for why, _ in self.reasons().most_common()]
        rows = ["| language | kept |" + "".join(f" {why} |" for why in reasons), "|" + " --- |" * (2 + len(reasons))]
        for lang in sorted(set(self.pairs) | set(self.dropped)):
            lost = self.dropped.get(lang, Counter())
            rows.append(f"| {lang} | {self.pairs.get(lang, 0)} |" + "".join(f" {lost[why]} |" for why in reasons))
        return "\n".join(rows)


PAIRINGS = ("translation", "image_pivot")


def bitext_pairs(captions: pa.Table, langs: list[str], exclude_images: set[str] | None = None,
                 pairing: str = "translation") -> tuple[pa.Table, BitextReport]:
    """English <-> L pairs for each L in ``langs``.

    ``translation``: each L caption with the English caption it translates, joined on (image_id,
    caption_idx); rows of independent-description sources cannot be bitext and are dropped.
    ``image_pivot``: each L caption -- translation or independent description -- with a *different*
    English description of the same image (the next caption index after its own that the tables have),
    so what is learnt is describing the same picture rather than matching a translation.

    Rows without an English partner, duplicates and rows of ``exclude_images`` are dropped and counted in
    the report.
    """
    check_languages(langs, "bitext languages")
    if pairing not in PAIRINGS:
        raise DataError(f"pairing {pairing!r} is not one of {', '.join(PAIRINGS)}")
    report = BitextReport()
    exclude = pa.array(sorted(exclude_images or ()), type=pa.string())

    held_out = pc.is_in(captions["image_id"], value_set=exclude)
    english = captions.filter(pc.and_(pc.equal(captions["lang"], "en"), pc.invert(held_out)))
    english = unique_rows(english.select(["image_id", "caption_idx", "text"]), ["image_id", "caption_idx"])
    english = english.rename_columns(["image_id", "english_idx" if pairing == "image_pivot" else "caption_idx", "english"])

    others = captions.filter(pc.is_in(captions["lang"], value_set=pa.array(langs)))
    drops = [("image_id", exclude, "evaluation images")]
    if pairing == "translation":
        drops.insert(0, ("source", pa.array(INDEPENDENT_SOURCES), "independent descriptions (not translations)"))
    for column, values, reason in drops:
        mask = pc.is_in(others[column], value_set=values)
        report.drop(others["lang"].filter(mask), reason)
        others = others.filter(pc.invert(mask))
    unique = unique_rows(others.select(["image_id", "caption_idx", "lang", "text"]), ["image_id", "caption_idx", "lang", "text"])
    report.drop(removed_languages(others["lang"], unique["lang"]), "duplicates")
    others = unique

    if pairing == "translation":
        joined = others.join(english, keys=["image_id", "caption_idx"], join_type="inner")
        report.drop(removed_languages(others["lang"], joined["lang"]), "no English caption with the same image_id and caption_idx")
    else:
        joined = pivot_join(others, english)
        report.drop(removed_languages(others["lang"], joined["lang"]), "no other English description of the image")
    pairs = pa.table({
        "image_id": joined["image_id"], "caption_idx": joined["caption_idx"], "lang": joined["lang"],
        "english": joined["english"], "translation": joined["text"],
    }).sort_by([("lang", "ascending"), ("image_id", "ascending"), ("caption_idx", "ascending")])
    report.keep(pairs["lang"])
    missing = [lang for lang in langs if not report.pairs.get(lang)]
    if missing:
        raise DataError(f"no bitext pairs for language(s) {', '.join(missing)} in the given tables")
    log.info(report.summary())
    return pairs, report


def pivot_join(others: pa.Table, english: pa.Table) -> pa.Table:
    """Each row of ``others`` with one English description of its image whose index differs from its
    own: the first after it, cyclically (index 2 of captions 0-4 gets 3; 4 gets 0)."""
    joined = others.join(english, keys="image_id", join_type="inner")
    own, theirs = joined["caption_idx"].to_numpy(), joined["english_idx"].to_numpy()
    joined = joined.filter(pa.array(own != theirs))
    step = (joined["english_idx"].to_numpy() - joined["caption_idx"].to_numpy()) % 1000  # 1 first: the next index
    joined = joined.append_column("_step", pa.array(step)).sort_by(
        [("image_id", "ascending"), ("caption_idx", "ascending"), ("lang", "ascending"), ("text", "ascending"),
         ("_step", "ascending")])
    return unique_rows(joined, ["image_id", "caption_idx", "lang", "text"]).drop_columns(["_step", "english_idx"])


def removed_languages(before: pa.ChunkedArray, after: pa.ChunkedArray) -> list[str]:
    """The languages of the rows a filter removed: ``before``'s counts less ``after``'s."""
    return list((Counter(before.to_pylist()) - Counter(after.to_pylist())).elements())


def caption_pairs(captions: pa.Table, lang: str = "en", exclude_images: set[str] | None = None) -> pa.Table:
    """(query, passage) pairs of two captions of the same image in ``lang``: each caption paired with
    its image's next one (the last with the first), so every caption is a query once and a passage
    once per epoch. Images in ``exclude_images`` and images with a single caption give no pairs."""
    rows = captions.filter(pc.equal(captions["lang"], lang))
    if exclude_images:
        rows = rows.filter(pc.invert(pc.is_in(rows["image_id"], value_set=pa.array(sorted(exclude_images)))))
    rows = unique_rows(rows.select(["image_id", "caption_idx", "text"]), ["image_id", "text"])
    rows = rows.sort_by([("image_id", "ascending"), ("caption_idx", "ascending")])
    images, texts = rows["image_id"].to_numpy(zero_copy_only=False), rows["text"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    sizes = np.diff(np.r_[starts, len(images)])
    # Within each image of n captions, row i pairs with row (i + 1) mod n.
    first = np.repeat(starts, sizes)
    nxt = first + (np.arange(len(images)) - first + 1) % np.repeat(sizes, sizes)
    keep = np.repeat(sizes, sizes) > 1
    if not keep.any():
        raise DataError(f"no image has two {lang!r} captions in the given tables: no caption pairs to train on")
    idx = np.flatnonzero(keep)
    return pa.table({"image_id": images[idx], "query": texts[idx], "passage": texts[nxt[idx]]})


PREPARED_MARKER = "_SUCCESS.json"


# Shards are written in row groups of at most ROW_GROUP_ROWS pairs, and a corpus in at least
# MIN_ROW_GROUPS of them when it has the rows: training deals row groups to its lanes
# (batching.lane_batches), so any lane count up to MIN_ROW_GROUPS finds row groups to deal.
ROW_GROUP_ROWS, MIN_ROW_GROUPS = 1024, 64


def write_bitext_shards(pairs: pa.Table, out_uri: str, rows_per_shard: int = 50_000,
                        tokens: dict[str, dict] | None = None) -> list[str]:
    """Write bitext pairs as ``part-NNNNN.parquet`` shards under a folder URI (local or s3://).

    The pairs are written in a shuffled order (seed 0), so that every row group is a sample of the
    whole corpus -- every language, every source -- and a training worker that reads only its own row
    groups (:func:`optical_ray.batching.lane_batches`) still mixes them in each batch.

    ``_SUCCESS.json`` (the parts, rows per language, and what each token column of ``tokens`` holds:
    :mod:`optical_ray.pretokenized`) is removed first and written last: a folder
    without it holds an unfinished preparation and is refused, and parts it does not list -- left
    there by an earlier, larger preparation -- are never read."""
    storage.delete(storage.join(out_uri, PREPARED_MARKER))
    pairs = pairs.take(np.random.default_rng(0).permutation(pairs.num_rows))
    group_rows = max(1, min(ROW_GROUP_ROWS, pairs.num_rows // MIN_ROW_GROUPS))
    paths, digests = [], {}
    for i, start in enumerate(range(0, max(pairs.num_rows, 1), rows_per_shard)):
        path = storage.join(out_uri, f"part-{i:05d}.parquet")
        buffer = io.BytesIO()
        pq.write_table(pairs.slice(start, rows_per_shard), buffer, compression="zstd", row_group_size=group_rows)
        storage.write_bytes(buffer.getvalue(), path)
        digests[path.rsplit("/", 1)[-1]] = hashlib.sha256(buffer.getvalue()).hexdigest()
        paths.append(path)
    langs, counts = np.unique(pairs["lang"].to_numpy(zero_copy_only=False), return_counts=True)
    marker = {"parts": [p.rsplit("/", 1)[-1] for p in paths], "rows": pairs.num_rows,
              "pairs_per_language": {str(lang): int(n) for lang, n in zip(langs, counts)}, "tokens": tokens or {},
              "sha256": digests}
    storage.write_bytes((json.dumps(marker, indent=1) + "\n").encode(), storage.join(out_uri, PREPARED_MARKER))
    return paths


def check_bitext_shards(uri: str) -> dict[str, pq.FileMetaData]:
    """The shard files a finished preparation under ``uri`` lists, each with its footer (read here for
    the schema, and kept: training deals their row groups to lanes without reading them again). A
    missing bucket or key, an unfinished preparation, a corrupt shard or a wrong schema fails here,
    naming the URI, before any training starts."""
    storage.list_files(uri)  # a missing bucket or folder is named here
    marker = storage.join(uri, PREPARED_MARKER)
    if not storage.exists(marker):
        raise DataError(f"{uri}: no {PREPARED_MARKER}, so the bitext preparation there never finished "
                        "(rerun `optical-ray data prepare`)")
    files = [storage.join(uri, part) for part in json.loads(storage.read_bytes(marker))["parts"]]
    if not files:
        raise DataError(f"{uri}: no Parquet bitext shards")
    footers = {}
    for path in files:
        footers[path] = storage.parquet_footer(path)
        missing = [c for c in BITEXT_COLUMNS if c not in footers[path].schema.to_arrow_schema().names]
        if missing:
            raise DataError(f"{path}: not a bitext shard, missing column(s) {', '.join(missing)}")
    return footers


def bitext_fingerprint(uri: str) -> str:
    """What a finished preparation holds, as one digest: the SHA-256 of its ``_SUCCESS.json``, which
    lists every part with its own SHA-256 (older preparations: their parts and row counts)."""
    return hashlib.sha256(storage.read_bytes(storage.join(uri, PREPARED_MARKER))).hexdigest()


def prepared_tokens(uri: str) -> dict[str, dict]:
    """What the token columns of a finished preparation hold, by ids column (empty: none were added)."""
    return json.loads(storage.read_bytes(storage.join(uri, PREPARED_MARKER))).get("tokens", {})


def image_ids(uris: list[str], drop_blank: bool = False) -> set[str]:
    """All image ids in the given caption tables (used to keep evaluation images out of training)."""
    if not uris:
        return set()
    return set(read_captions(uris, drop_blank)["image_id"].to_pylist())


def query_captions(captions: pa.Table, lang: str) -> pa.Table:
    """The captions in ``lang``, in order: the queries of a retrieval evaluation. They come from one
    source, the first in the table that has ``lang`` (so Multi30k's German and IGLUE's machine-translated
    German, or a translation and an independent description, are never mixed in one score)."""
    queries = captions.filter(pc.equal(captions["lang"], lang))
    if queries.num_rows == 0:
        raise DataError(f"no captions in query language {lang!r} in the evaluation data")
    return queries.filter(pc.equal(queries["source"], queries["source"][0]))


def corpus_captions(captions: pa.Table, lang: str = "en") -> pa.Table:
    """The distinct (image_id, text) captions in ``lang`` with the ``caption_idx`` of their first row:
    the same caption from two source tables is one corpus entry."""
    corpus = captions.filter(pc.equal(captions["lang"], lang))
    if corpus.num_rows == 0:
        raise DataError(f"no captions in corpus language {lang!r} in the given tables")
    return unique_rows(corpus.select(["image_id", "caption_idx", "text"]), ["image_id", "text"])


def source_caption_rows(queries: pa.Table, captions: pa.Table, corpus: pa.Table, lang: str = "en") -> np.ndarray:
    """For each query, the corpus row of the ``lang`` caption it was translated from -- the one with
    the query's (image_id, caption_idx) -- or -1 when there is none."""
    english = captions.filter(pc.equal(captions["lang"], lang))
    text_of = dict(zip(zip(english["image_id"].to_pylist(), english["caption_idx"].to_pylist()),
                       english["text"].to_pylist()))
    row_of = {key: i for i, key in enumerate(zip(corpus["image_id"].to_pylist(), corpus["text"].to_pylist()))}
    rows = []
    for image, idx in zip(queries["image_id"].to_pylist(), queries["caption_idx"].to_pylist()):
        text = text_of.get((image, idx))
        rows.append(row_of.get((image, text), -1) if text is not None else -1)
    return np.array(rows, dtype=np.int64)


def without_images(captions: pa.Table, uris: list[str]) -> pa.Table:
    """``captions`` less every image of the tables at ``uris`` (e.g. the dev split)."""
    held_out = image_ids(uris)
    if not held_out:
        return captions
    return captions.filter(pc.invert(pc.is_in(captions["image_id"], value_set=pa.array(sorted(held_out)))))


def unique_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    """First row of each distinct ``keys`` combination, in the original order."""
    indexed = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    first = indexed.group_by(keys, use_threads=False).aggregate([("_row", "min")])
    return table.take(np.sort(first["_row_min"].to_numpy()))


def first_row(mask: pa.ChunkedArray | pa.Array) -> int:
    """The position of ``mask``'s first true value: the row an error names."""
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
