"""Parallel corpora in the formats people have, read into English <-> L bitext pairs.

OPUS / Moses line-aligned files (``corpus.en`` + ``corpus.sw``), TSV and CSV (columns by name, or by
position in a file without a header), JSON Lines and Parquet (fields by name), local or s3://. Tables
are parsed by pyarrow's own readers; a problem is a :class:`~optical_ray.data.DataError` naming the file,
the line or row, and the field. Every reader returns a table with the columns of
``data.BITEXT_COLUMNS``; as these corpora have no images, ``image_id`` holds the name of the file a pair
came from and ``caption_idx`` its row (aligned files: its line, counting from 0), so a pair can always
be traced back.

:func:`clean_pairs` then drops blank, over-long, leaked (either side occurs in an evaluation set) and
duplicate pairs, counting each per language: ``optical-ray data prepare`` writes the same bitext shards
from any of these as from caption tables.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from . import data, languages, storage
from .data import DataError

# File name endings and the table format they mean.
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def table_format(uri: str, format: str | None = None) -> str:
    """``format``, or the one the file name's suffix stands for; neither: an error naming the file."""
    found = format or FORMATS.get(PurePosixPath(uri).suffix.lower())
    if found not in FORMATS.values():
        raise DataError(f"{uri}: unknown table format {found!r}: name the file .tsv, .csv, .jsonl or .parquet, "
                        "or give the format (--format)")
    return found


def read_aligned(english_uri: str, other_uri: str, lang: str | None = None) -> pa.Table:
    """Pairs from two line-aligned files (OPUS's Moses format): line i of ``other_uri`` translates line
    i of ``english_uri``. Their language is ``other_uri``'s last suffix when that is a language tag
    (``corpus.en-sw.sw`` -> sw), else ``lang``."""
    suffix = PurePosixPath(other_uri).suffix.lstrip(".")
    if not languages.problem(suffix):
        lang = suffix
    elif lang is None:
        raise DataError(f"{other_uri}: cannot tell its language from the file name (its suffix {suffix!r} is "
                        "not a language tag): give the language (--lang)")
    _check_tag(lang, other_uri)
    english, other = read_lines(english_uri), read_lines(other_uri)
    if len(english) != len(other):
        raise DataError(f"line counts differ: {english_uri} has {len(english)} lines, {other_uri} has {len(other)}; "
                        "aligned files must have one line per sentence in the same order")
    return _pairs(_name(other_uri), pa.array(english, pa.string()), pa.array(other, pa.string()), lang)


def read_table(uri: str, english: str = "en", translation: str | None = None, lang: str | None = None,
               lang_field: str | None = None, header: bool = True, format: str | None = None) -> pa.Table:
    """Pairs from one table: TSV, CSV, JSON Lines or Parquet (``format``, else from the file name).

    ``english`` and ``translation`` name the columns (fields) of the two sides; in a TSV or CSV without
    a ``header`` they are positions (``0``, ``1``). Every row is in ``lang``, or in the language its
    ``lang_field`` names. ``translation`` defaults to ``lang`` (a TSV with the header ``en  sw``)."""
    if (lang is None) == (lang_field is None):
        raise DataError(f"{uri}: give either the language of every pair (--lang) or the field that holds it (--lang-field)")
    if lang is not None:
        _check_tag(lang, uri)
    translation = translation or lang or "translation"
    format = table_format(uri, format)
    fields = [english, translation] + ([lang_field] if lang_field else [])
    if format in ("tsv", "csv"):
        table = _read_delimited(uri, fields, header, "\t" if format == "tsv" else ",")
    elif format == "jsonl":
        table = read_json_fields(uri, fields)
    else:
        table = _read_parquet(uri, fields)
    if lang_field:
        langs = table.column(2)
        bad = languages.invalid(pc.unique(langs).to_pylist())
        if bad:
            tag, why = next(iter(bad.items()))
            row = data.first_row(pc.equal(langs, tag))
            raise DataError(f"{uri}: row {row}: field {lang_field!r}: {tag!r} is {why}")
    else:
        langs = pa.repeat(lang, table.num_rows).cast(pa.string())
    return _pairs(_name(uri), table.column(0), table.column(1), langs)


def clean_pairs(pairs: pa.Table, report: data.BitextReport, exclude_texts: set[str] = frozenset(),
                max_chars: int = 1000) -> pa.Table:
    """``pairs`` less blank ones (either side), over-long ones (either side over ``max_chars``
    characters: truncating one side of a translation breaks it), leaked ones (either side, trimmed,
    is in ``exclude_texts``: text from an evaluation set must not be trained on, whatever image or file
    it came with) and duplicates (the same language, English and translation). Each is counted per
    language in ``report``, whose ``pairs`` become the pairs kept."""
    sides = [pc.utf8_trim_whitespace(pairs[c]) for c in ("english", "translation")]
    checks = [(pc.or_(*[pc.equal(pc.utf8_length(side), 0) for side in sides]), "blank"),
              (pc.or_(*[pc.greater(pc.utf8_length(pairs[c]), max_chars) for c in ("english", "translation")]),
               f"over {max_chars} characters")]
    if exclude_texts:
        held = pa.array(sorted(exclude_texts), pa.string())
        checks.append((pc.or_(*[pc.is_in(side, value_set=held) for side in sides]), "in an evaluation set"))
    dropped = pa.repeat(False, pairs.num_rows)
    for mask, reason in checks:
        mask = pc.and_(mask, pc.invert(dropped))  # a pair is counted once, for its first reason
        report.drop(pairs["lang"].filter(mask), reason)
        dropped = pc.or_(dropped, mask)
    pairs = pairs.filter(pc.invert(dropped))
    unique = data.unique_rows(pairs, ["lang", "english", "translation"])
    report.drop(data.removed_languages(pairs["lang"], unique["lang"]), "duplicate pairs")
    report.pairs = Counter(unique["lang"].to_pylist())
    return unique


def read_texts(uris: list[str]) -> set[str]:
    """The texts of evaluation sets, trimmed, for :func:`clean_pairs`' leakage guard: the ``text``
    column of caption tables and BEIR-style ``.jsonl`` files (queries, corpus), every line of any other
    file (FLORES- or Tatoeba-style sentence files)."""
    texts: set[str] = set()
    for uri in uris:
        for path in storage.list_files(uri):
            format = FORMATS.get(PurePosixPath(path).suffix.lower())
            if format == "parquet":
                column = _read_parquet(path, ["text"]).column(0)
            elif format == "jsonl":
                column = read_json_fields(path, ["text"]).column(0)
            else:
                column = pa.array(read_lines(path), pa.string())
            texts.update(pc.utf8_trim_whitespace(column).to_pylist())
    texts.discard("")
    return texts


def _pairs(origin: str, english: pa.Array, translation: pa.Array, langs: pa.Array | str) -> pa.Table:
    n = len(english)
    langs = pa.repeat(langs, n).cast(pa.string()) if isinstance(langs, str) else langs
    return pa.table({"image_id": pa.repeat(origin, n).cast(pa.string()), "caption_idx": pa.array(range(n), pa.int32()),
                     "lang": langs, "english": english, "translation": translation})


def read_lines(uri: str) -> list[str]:
    """The lines of a UTF-8 text file. Split on newlines only: str.splitlines would also split on
    characters such as U+2028 or U+0085 inside a sentence, silently misaligning every later pair."""
    raw = storage.read_bytes(uri)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{uri}: line {line}: not UTF-8 ({err.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def _read_delimited(uri: str, fields: list[str], header: bool, delimiter: str) -> pa.Table:
    raw = pa.py_buffer(storage.read_bytes(uri))
    # TSV has no quoting (OPUS's TSV holds bare quotes inside sentences); CSV does. One thread, so that
    # pyarrow's "Row #N" of a malformed row is its line in the file.
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False)
    read = pacsv.ReadOptions(use_threads=False, autogenerate_column_names=not header)
    try:
        names = pacsv.open_csv(pa.BufferReader(raw), read_options=read, parse_options=parse).schema.names
        columns = [_column(uri, f, names, header) for f in fields]
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, include_columns=columns,
                                       strings_can_be_null=False)
        table = pacsv.read_csv(pa.BufferReader(raw), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as err:
        raise DataError(f"{uri}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'} ({err})") from None
    return table.select(columns)


def _column(uri: str, field: str, names: list[str], header: bool) -> str:
    """The column ``field`` names: itself with a header, ``f<position>`` (pyarrow's name) without one."""
    if not header:
        if not field.isdigit() or int(field) >= len(names):
            raise DataError(f"{uri}: without a header, columns are positions 0-{len(names) - 1}; got {field!r}")
        return f"f{field}"
    if field not in names:
        raise DataError(f"{uri}: no column {field!r} (the header has: {', '.join(names)})")
    return field


def read_json_fields(uri: str, fields: list[str], optional: Sequence[str] = ()) -> pa.Table:
    """String ``fields`` of a JSON Lines file (other fields are ignored), and the ``optional`` ones that
    occur in it; a missing or non-string field is an error naming the line."""
    raw = storage.read_bytes(uri)
    schema = pa.schema([(f, pa.string()) for f in dict.fromkeys([*fields, *optional])])
    try:
        table = pajson.read_json(pa.BufferReader(raw), parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="ignore"))
    except pa.ArrowInvalid:
        raise DataError(json_problem(uri, raw, fields)) from None
    for f in fields:
        if table.num_rows and table[f].null_count == table.num_rows:
            first = next((json.loads(line) for line in raw.splitlines() if line.strip()), {})
            raise DataError(f"{uri}: no field {f!r} (the first line has: {', '.join(first) or 'nothing'})")
        if table[f].null_count:
            raise DataError(json_problem(uri, raw, fields))
    return table.select([*fields, *[f for f in optional if table[f].null_count < table.num_rows]])


def json_problem(uri: str, raw: bytes, fields: list[str], strings: bool = True) -> str:
    """Where a JSON Lines file pyarrow refused goes wrong, found line by line (only on this error path):
    a line that is not a JSON object, or a missing (or, with ``strings``, non-string) ``fields`` value."""
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            return f"{uri}: line {number}: not valid JSON ({err})"
        if not isinstance(record, dict):
            return f"{uri}: line {number}: not a JSON object"
        for f in fields:
            if record.get(f) is None:
                return f"{uri}: line {number}: field {f!r} is missing (null)"
            if strings and not isinstance(record[f], str):
                return f"{uri}: line {number}: field {f!r} is a {type(record[f]).__name__}, expected a string"
    return f"{uri}: not readable as JSON Lines"


def _read_parquet(uri: str, fields: list[str]) -> pa.Table:
    names = storage.read_parquet_schema(uri).names
    missing = [f for f in fields if f not in names]
    if missing:
        raise DataError(f"{uri}: no column {missing[0]!r} (has: {', '.join(names)})")
    table = storage.read_parquet(uri, columns=list(dict.fromkeys(fields)))
    for f in fields:
        if not (pa.types.is_string(table[f].type) or pa.types.is_large_string(table[f].type)):
            raise DataError(f"{uri}: column {f!r} has type {table[f].type}, expected a string")
        if table[f].null_count:
            raise DataError(f"{uri}: row {data.first_row(pc.is_null(table[f]))}: field {f!r} is missing (null)")
    return table.select(fields).cast(pa.schema([(f, pa.string()) for f in fields]))


def _check_tag(lang: str, where: str) -> None:
    why = languages.problem(lang)
    if why:
        raise DataError(f"{where}: language {lang!r} is {why}")


def _name(uri: str) -> str:
    return PurePosixPath(uri).name
