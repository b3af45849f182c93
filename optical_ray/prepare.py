"""``optical-ray data prepare``: bitext shards from caption tables and parallel corpora in any mix.

Every source is read into the same pairs (:mod:`optical_ray.data` for caption tables,
:mod:`optical_ray.parallel` for the rest), cleaned once with one accounting per language, optionally
tokenised for the models that will train on them (:mod:`optical_ray.pretokenized`), and written as the
shards that training, tuning and the experiment read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from . import data, parallel
from .pretokenized import tokenize_for


@dataclass
class TableOptions:
    """How to read the ``tables`` of :func:`prepare_bitext` (see :func:`optical_ray.parallel.read_table`)."""

    english: str = "en"
    translation: str | None = None
    lang_field: str | None = None
    header: bool = True
    format: str | None = None


@dataclass
class Prepared:
    shards: list[str]
    rows: int
    report: data.BitextReport = field(default_factory=data.BitextReport)


def prepare_bitext(out: str, captions: list[str] = (), languages: list[str] = (), pairing: str = "translation",
                   aligned: list[tuple[str, str]] = (), tables: list[str] = (), table_options: TableOptions | None = None,
                   lang: str | None = None, exclude_images_from: list[str] = (), exclude_texts_from: list[str] = (),
                   max_chars: int = 1000, drop_blank: bool = False, tokenize: list[str] = (), max_length: int = 64,
                   rows_per_shard: int = 50_000, progress: bool = False) -> Prepared:
    """Read every source, clean the pairs (:func:`optical_ray.parallel.clean_pairs`), tokenise them for
    each model of ``tokenize`` and write shards under ``out``.

    ``captions`` are caption tables paired for ``languages`` (``pairing``: see :func:`data.bitext_pairs`); ``aligned`` are (English file, L file)
    pairs; ``tables`` are TSV/CSV/JSON Lines/Parquet files read with ``table_options``. ``lang`` is the
    language of the aligned files and tables that do not name theirs. The images of
    ``exclude_images_from`` (caption tables) stay out, and so does every pair with a side whose text
    occurs in them or in ``exclude_texts_from``."""
    if not (captions or aligned or tables):
        raise data.DataError("nothing to prepare: give caption tables, aligned files or parallel tables")
    if captions and not languages:
        raise data.DataError("caption tables need the languages to pair with English (--languages)")
    report = data.BitextReport()
    parts = []
    if captions:
        pairs, report = data.bitext_pairs(data.read_captions(captions, drop_blank), languages,
                                          data.image_ids(exclude_images_from, drop_blank), pairing)
        parts.append(pairs)
    parts += [parallel.read_aligned(english, other, lang) for english, other in aligned]
    options = table_options or TableOptions()
    parts += [parallel.read_table(uri, options.english, options.translation, None if options.lang_field else lang,
                                  options.lang_field, options.header, options.format) for uri in tables]
    held_out = parallel.read_texts(list(exclude_images_from) + list(exclude_texts_from))
    pairs = parallel.clean_pairs(pa.concat_tables(parts), report, held_out, max_chars)
    if not pairs.num_rows:
        raise data.DataError(f"no pairs left to write ({report.summary()})")
    pairs, tokens = tokenize_for(pairs, list(tokenize), max_length, progress=progress)
    return Prepared(data.write_bitext_shards(pairs, out, rows_per_shard, tokens), pairs.num_rows, report)
