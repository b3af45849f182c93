"""A team's own document collection to index and serve: JSON Lines, TSV/CSV or Parquet, local or s3://.

Each document has an id, a text and any metadata fields (a language, a URL, a date) that hits carry and
searches can filter on. Fields are named by the user (defaults ``id`` and ``text``; metadata: every
other top-level field unless named). Parsing is pyarrow's; a problem names the file, the row and the
field, and no document is dropped: a missing id or text, an empty text or a repeated id is an error.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from . import storage
from .data import DataError, first_row
from .parallel import json_problem, table_format

# The stored metadata table's own columns; a user's metadata field may not take these names.
RESERVED = ("id", "text", "image_id")


def read_documents(uri: str, id_field: str = "id", text_field: str = "text", metadata_fields: list[str] | None = None,
                   format: str | None = None) -> pa.Table:
    """Columns ``id`` (string), ``text`` and one per metadata field (scalar values), in file order."""
    format = table_format(uri, format)
    raw = storage.read_bytes(uri) if format != "parquet" else None
    try:
        if format == "jsonl":
            table = pajson.read_json(pa.BufferReader(raw))
        elif format in ("tsv", "csv"):
            table = pacsv.read_csv(pa.BufferReader(raw), read_options=pacsv.ReadOptions(use_threads=False),
                                   parse_options=pacsv.ParseOptions(delimiter="\t" if format == "tsv" else ",",
                                                                    quote_char=False if format == "tsv" else '"'))
        else:
            table = storage.read_parquet(uri)
    except pa.ArrowInvalid as err:
        if format == "jsonl":  # pyarrow's message counts in blocks, not lines: find the line
            raise DataError(json_problem(uri, raw, [id_field, text_field], strings=False)) from None
        raise DataError(f"{uri}: not readable as {format} ({err})") from None
    names = table.column_names
    for f in (id_field, text_field, *(metadata_fields or [])):
        if f not in names:
            raise DataError(f"{uri}: no field {f!r} (fields: {', '.join(names)})")
    if metadata_fields is None:
        metadata_fields = [n for n in names if n not in (id_field, text_field)]
    columns = {"id": table[id_field], "text": table[text_field]}
    for f in metadata_fields:
        if f in RESERVED:
            raise DataError(f"{uri}: a metadata field may not be called {f!r} (hits use that name)")
        kind = table[f].type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
                or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind)):
            raise DataError(f"{uri}: metadata field {f!r} holds {kind} values; only strings, numbers and booleans "
                            "can be filtered on (name the metadata fields to keep)")
        columns[f] = table[f]
    for name, field in (("id", id_field), ("text", text_field)):
        if columns[name].null_count:
            raise DataError(f"{uri}: row {first_row(pc.is_null(columns[name]))}: field {field!r} is missing (null)")
        try:
            columns[name] = columns[name].cast(pa.string())
        except pa.ArrowInvalid:
            raise DataError(f"{uri}: field {field!r} holds {columns[name].type} values, expected strings") from None
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(columns["text"])), 0)
    if pc.any(blank).as_py():
        raise DataError(f"{uri}: row {first_row(blank)}: field {text_field!r} is empty")
    repeated = [i for i, n in Counter(columns["id"].to_pylist()).items() if n > 1]
    if repeated:
        rows = pc.indices_nonzero(pc.equal(columns["id"], repeated[0])).to_pylist()
        raise DataError(f"{uri}: id {repeated[0]!r} is used by rows {', '.join(map(str, rows[:5]))}"
                        f"{f' and {len(repeated) - 1} other id(s) repeat too' if len(repeated) > 1 else ''}: ids must be unique")
    return pa.table(columns)
