"""Parallel corpora in the formats people have: aligned files, TSV/CSV, JSON Lines, Parquet."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optical_ray import data, parallel
from optical_ray.cli import main
from optical_ray.data import BitextReport, DataError

EN = ["A dog runs.", "Two kids play.", 'She said "hi".', "A cat\u2028sleeps."]
SW = ["Mbwa anakimbia.", "Watoto wawili wanacheza.", 'Alisema "habari".', "Paka analala."]


def write_lines(path, lines, end="\n"):
    path.write_bytes(end.join(lines).encode() + end.encode())
    return str(path)


def test_aligned_files_pair_line_by_line_and_take_the_language_from_the_name(tmp_path):
    en = write_lines(tmp_path / "corpus.en-sw.en", EN)
    sw = write_lines(tmp_path / "corpus.en-sw.sw", SW, end="\r\n")  # Windows line ends
    pairs = parallel.read_aligned(en, sw)
    assert pairs.column_names == list(data.BITEXT_COLUMNS)
    assert pairs["english"].to_pylist() == EN  # U+2028 inside a sentence does not split it
    assert pairs["translation"].to_pylist() == SW
    assert set(pairs["lang"].to_pylist()) == {"sw"}
    assert pairs["image_id"][0].as_py() == "corpus.en-sw.sw" and pairs["caption_idx"].to_pylist() == [0, 1, 2, 3]


def test_aligned_files_name_both_counts_bad_encoding_and_unknown_language(tmp_path):
    en = write_lines(tmp_path / "c.en", EN)
    sw = write_lines(tmp_path / "c.sw", SW[:3])
    with pytest.raises(DataError, match=r"c.en has 4 lines, .*c.sw has 3"):
        parallel.read_aligned(en, sw)
    bad = tmp_path / "c.wo"
    bad.write_bytes(b"ok\nok\n\xff\xfe broken\nok\n")
    with pytest.raises(DataError, match=r"c.wo: line 3: not UTF-8"):
        parallel.read_aligned(en, str(bad))
    with pytest.raises(DataError, match=r"c.sentences: cannot tell its language .* give the language \(--lang\)"):
        parallel.read_aligned(en, write_lines(tmp_path / "c.sentences", SW))
    assert set(parallel.read_aligned(en, write_lines(tmp_path / "c.sentences", SW), lang="sw")["lang"].to_pylist()) == {"sw"}


def test_tsv_by_header_or_position_keeps_bare_quotes(tmp_path):
    rows = [f"{e}\t{s}" for e, s in zip(EN, SW)]
    with_header = write_lines(tmp_path / "p.tsv", ["en\tsw", *rows])
    pairs = parallel.read_table(with_header, lang="sw")
    assert pairs["english"].to_pylist() == EN and pairs["translation"].to_pylist() == SW
    no_header = write_lines(tmp_path / "opus.tsv", [f"{s}\t{e}" for e, s in zip(EN, SW)])
    pairs = parallel.read_table(no_header, english="1", translation="0", lang="sw", header=False)
    assert pairs["english"].to_pylist() == EN and pairs["translation"].to_pylist() == SW


def test_delimited_errors_name_line_and_columns(tmp_path):
    short = write_lines(tmp_path / "p.tsv", ["en\tsw", "A dog.\tMbwa.", "only one field", "x\ty"])
    with pytest.raises(DataError, match=r"p.tsv: not readable as TSV .*Row #3: Expected 2 columns, got 1"):
        parallel.read_table(short, lang="sw")
    good = write_lines(tmp_path / "q.tsv", ["english\tswahili", "A dog.\tMbwa."])
    with pytest.raises(DataError, match=r"q.tsv: no column 'en' \(the header has: english, swahili\)"):
        parallel.read_table(good, lang="sw")
    with pytest.raises(DataError, match=r"without a header, columns are positions 0-1; got 'en'"):
        parallel.read_table(good, lang="sw", header=False)
    with pytest.raises(DataError, match=r"either the language of every pair \(--lang\) or the field"):
        parallel.read_table(good, english="english", translation="swahili")


def test_csv_quotes_and_numbers_stay_text(tmp_path):
    path = write_lines(tmp_path / "p.csv", ["en,yo", '"Hello, world.",Pẹlẹ o', "1.50,1.50"])
    pairs = parallel.read_table(path, lang="yo")
    assert pairs["english"].to_pylist() == ["Hello, world.", "1.50"]
    assert pairs["translation"].to_pylist() == ["Pẹlẹ o", "1.50"]


def test_json_lines_with_a_language_field_and_their_errors(tmp_path):
    lines = [json.dumps({"en": e, "text": s, "lang": lang, "meta": {"id": i}})
             for i, (e, s, lang) in enumerate(zip(EN, SW, ["sw", "sw", "quy", "zh-Hant"]))]
    path = write_lines(tmp_path / "p.jsonl", lines)
    pairs = parallel.read_table(path, translation="text", lang_field="lang")
    assert pairs["lang"].to_pylist() == ["sw", "sw", "quy", "zh-Hant"] and pairs["translation"].to_pylist() == SW
    bad = write_lines(tmp_path / "b.jsonl", [lines[0], json.dumps({"en": "x", "text": 3, "lang": "sw"})])
    with pytest.raises(DataError, match=r"b.jsonl: line 2: field 'text' is a int, expected a string"):
        parallel.read_table(bad, translation="text", lang_field="lang")
    missing = write_lines(tmp_path / "m.jsonl", [lines[0], json.dumps({"en": "x", "lang": "sw"})])
    with pytest.raises(DataError, match=r"m.jsonl: line 2: field 'text' is missing"):
        parallel.read_table(missing, translation="text", lang_field="lang")
    with pytest.raises(DataError, match=r"p.jsonl: no field 'sw' \(the first line has: en, text, lang, meta\)"):
        parallel.read_table(path, lang="sw")
    tag = write_lines(tmp_path / "t.jsonl", [lines[0], json.dumps({"en": "x", "text": "y", "lang": "Swahili"})])
    with pytest.raises(DataError, match=r"t.jsonl: row 1: field 'lang': 'Swahili' is not a valid BCP-47"):
        parallel.read_table(tag, translation="text", lang_field="lang")
    broken = write_lines(tmp_path / "j.jsonl", [lines[0], '{"en": "x", "text": '])
    with pytest.raises(DataError, match=r"j.jsonl: line 2: not valid JSON"):
        parallel.read_table(broken, translation="text", lang_field="lang")


def test_parquet_with_a_column_map(tmp_path, s3):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"source_text": EN, "target_text": SW, "n": list(range(4))}), path)
    s3["client"].upload_file(str(path), s3["bucket"], "parallel/p.parquet")
    for uri in (str(path), f"s3://{s3['bucket']}/parallel/p.parquet"):
        pairs = parallel.read_table(uri, english="source_text", translation="target_text", lang="sw")
        assert pairs["translation"].to_pylist() == SW
    with pytest.raises(DataError, match=r"p.parquet: column 'n' has type int64, expected a string"):
        parallel.read_table(str(path), english="source_text", translation="n", lang="sw")
    with pytest.raises(DataError, match=r"no column 'en' \(has: source_text, target_text, n\)"):
        parallel.read_table(str(path), lang="sw")


def test_clean_pairs_counts_every_dropped_pair_once_per_language(tmp_path):
    table = pa.table({
        "image_id": ["f"] * 7, "caption_idx": pa.array(range(7), pa.int32()),
        "lang": ["sw", "sw", "sw", "sw", "sw", "wo", "wo"],
        "english": ["A dog.", "  ", "A dog.", "x" * 30, "Seen in test.", "A dog.", "A cat."],
        "translation": ["Mbwa.", "Tupu.", "Mbwa.", "Ndefu.", "   ", "Xaj.", " Held out text "],
    })
    report = BitextReport()
    kept = parallel.clean_pairs(table, report, exclude_texts={"Held out text", "Seen in test."}, max_chars=20)
    assert kept["caption_idx"].to_pylist() == [0, 5]
    assert report.pairs == {"sw": 1, "wo": 1}
    # row 4 is both blank and leaked: counted once, for the first reason
    assert report.dropped == {"sw": {"blank": 2, "over 20 characters": 1, "duplicate pairs": 1},
                              "wo": {"in an evaluation set": 1}}
    assert "| sw | 1 | 2 |" in report.table()


def test_prepare_mixes_sources_guards_leaks_and_reports_per_language(tmp_path, capsys):
    en = write_lines(tmp_path / "c.en", EN + ["A held-out sentence."])
    sw = write_lines(tmp_path / "c.sw", SW + ["Sentensi."])
    tsv = write_lines(tmp_path / "w.tsv", ["en\two", "A dog runs.\tXaj bi daw na.", "\tblank"])
    flores = write_lines(tmp_path / "devtest.en", ["A held-out sentence."])
    assert main(["data", "prepare", "--aligned", en, sw, "--pairs", tsv, "--lang", "wo", "--out", str(tmp_path / "out"),
                 "--exclude-texts-from", flores]) == 0
    printed = capsys.readouterr().out
    assert "| sw | 4 | 0 | 1 |" in printed and "| wo | 1 | 1 | 0 |" in printed  # kept, blank, leaked
    files = data.check_bitext_shards(str(tmp_path / "out"))
    written = pq.read_table(next(iter(files)))
    assert sorted(written.filter(pa.compute.equal(written["lang"], "sw"))["translation"].to_pylist()) == sorted(SW)
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["pairs_per_language"] == {"sw": 4, "wo": 1}
