"""Evaluation a CLIR practitioner recognises: BEIR-layout sets (ir-measures) and bitext retrieval."""

import json
import math

import ir_measures
import numpy as np
import pytest

from optical_ray import beir, evaluate
from optical_ray.cli import main
from optical_ray.data import DataError

Q, S = ir_measures.Qrel, ir_measures.ScoredDoc


def test_measures_match_a_hand_computed_case():
    qrels = [Q("q1", "d1", 1), Q("q1", "d2", 1), Q("q2", "d3", 2)]
    runs = {"en": [S("q1", "d2", 0.9), S("q1", "dx", 0.8), S("q1", "d1", 0.5), S("q2", "dy", 0.9)],
            "sw": [S("q1", "dx", 0.9), S("q1", "d1", 0.8), S("q2", "d3", 0.7)]}
    report = beir.build_report(qrels, runs, high=["en"], low=["sw"], resamples=200)
    en, sw = report["languages"]["en"], report["languages"]["sw"]
    # en, q1: relevant at ranks 1 and 3 -> DCG 1 + 1/log2(4), ideal 1 + 1/log2(3); q2 retrieves nothing relevant
    assert en["nDCG@10"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)) / 2)
    assert en["MRR@10"] == pytest.approx((1 + 0) / 2) and en["R@100"] == pytest.approx((2 / 2 + 0) / 2)
    # sw, q1: one of two relevant at rank 2; q2: the relevant one at rank 1
    assert sw["nDCG@10"] == pytest.approx((1 / math.log2(3) / (1 + 1 / math.log2(3)) + 1) / 2)
    assert sw["MRR@10"] == pytest.approx((1 / 2 + 1) / 2) and sw["R@100"] == pytest.approx((1 / 2 + 1) / 2)
    gap = report["gap"]
    assert gap["value"] == pytest.approx(en["nDCG@10"] - sw["nDCG@10"])
    assert gap["interval"][0] <= gap["value"] <= gap["interval"][1]


def write_set(root, docs, queries_by_lang, qrels):
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t, "lang": lang}) + "\n"
                                               for i, t, lang in docs))
    for lang, queries in queries_by_lang.items():
        name = "queries.jsonl" if lang == "en" else f"queries.{lang}.jsonl"
        (root / name).write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    return root


DOCS = [("d1", "A dog runs on the beach.", "en"), ("d2", "Two children play football.", "en"),
        ("d3", "A woman reads a book in the park.", "en"), ("d4", "A cat sleeps on a sofa.", "en")]
QUERIES = {"en": [("q1", "dog on the beach"), ("q2", "kids playing soccer"), ("q3", "cat sleeping")],
           "de": [("q1", "Hund am Strand"), ("q2", "Kinder spielen Fußball"), ("q3", "schlafende Katze")],
           "sw": [("q1", "mbwa ufukweni"), ("q2", "watoto wanacheza mpira"), ("q3", "paka amelala")]}
QRELS = [("q1", "d1"), ("q2", "d2"), ("q3", "d4")]


def test_a_beir_set_is_evaluated_per_language_from_the_cli(tmp_path, capsys):
    root = write_set(tmp_path / "set", DOCS, QUERIES, QRELS)
    assert main(["eval", "--model", "student-init", "--beir", str(root), "--high", "en,de", "--low", "sw",
                 "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["languages"]) == {"en", "de", "sw"}
    assert report["languages"]["en"]["MRR@10"] == pytest.approx(1.0)  # e5-small gets these three right
    assert report["gap"]["high"] == ["en", "de"] and len(report["gap"]["interval"]) == 2
    assert "| sw | low |" in capsys.readouterr().out


def test_beir_files_are_checked_by_name(tmp_path):
    root = write_set(tmp_path / "set", DOCS, {"en": QUERIES["en"]}, QRELS)
    (root / "queries.Swahili.jsonl").write_text(json.dumps({"_id": "q1", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"queries.Swahili.jsonl: the language in the file name, 'Swahili', is not a valid"):
        beir.load_set(str(root))
    (root / "queries.Swahili.jsonl").unlink()
    (root / "qrels" / "test.tsv").write_text("qid\tdocid\tscore\nq1\td1\t1\n")
    with pytest.raises(DataError, match=r"test.tsv: no column 'query-id' \(the header has: qid, docid, score\)"):
        beir.load_set(str(root))


def test_bitext_retrieval_finds_each_translation_among_all_english_sentences(tmp_path):
    english = ["A dog runs on the beach.", "Two children play football.", "A cat sleeps on a sofa.",
               "A cat sleeps on a sofa."]  # a repeated sentence: either line is its translation
    german = ["Ein Hund rennt am Strand.", "Zwei Kinder spielen Fußball.", "Eine Katze schläft auf einem Sofa.",
              "Eine Katze schläft auf dem Sofa."]
    files = {}
    for lang, lines in (("en", english), ("de", german), ("sw", german[:3])):
        files[lang] = tmp_path / f"flores.{lang}"
        files[lang].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"flores.en has 4 lines, .*flores.sw has 3"):
        evaluate.evaluate_bitext(None, str(files["en"]), {"sw": str(files["sw"])})
    from optical_ray.encoder import Encoder

    report = evaluate.evaluate_bitext(Encoder.load("student-init"), str(files["en"]), {"de": str(files["de"]),
                                      "en": str(files["en"])}, high=["en"], low=["de"], progress=False)
    assert report["languages"]["de"]["R@1"] == 1.0 and report["languages"]["en"]["R@1"] == 1.0
    assert report["gap"]["R@1"] == 0.0 and report["gap"]["interval"] == [0.0, 0.0]
    assert np.isclose(report["languages"]["de"]["MRR"], 1.0)
    assert main(["eval", "--model", "student-init", "--bitext-english", str(files["en"]), "--bitext",
                 f"de={files['de']}", "--high", "de", "--low", "de", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["languages"]["de"]["n_queries"] == 4
