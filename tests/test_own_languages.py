"""README "Your own languages", walked end to end on files this test writes (no shared data): a
Swahili TSV and a Wolof OPUS/Moses corpus (two languages outside the shared data) are prepared, a
student is distilled briefly from a CLS-pooled teacher of another width with line-aligned dev bitext as
its dev set, swept on Ray Tune with a BEIR-layout set as the dev objective, evaluated on the BEIR set and
on bitext, and a JSON Lines collection is indexed and searched with a metadata filter."""

import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from optical_ray.cli import main
from optical_ray.config import SAMPLE_DIR
from optical_ray.encoder import Encoder
from optical_ray.index import Searchable, load_index


def pseudo(text: str, lang: str) -> str:
    """A stand-in translation (this test checks the plumbing, not what is learnt): words reversed, tagged."""
    return f"{lang}: " + " ".join(reversed(text.split()))


def test_a_team_walks_its_own_languages_end_to_end(tmp_path, tiny_model_dir, cls_teacher_dir,
                                                    ray_cluster, capsys):
    captions = pq.read_table(SAMPLE_DIR / "train_captions.parquet")
    english = [t for t, lang in zip(captions["text"].to_pylist(), captions["lang"].to_pylist()) if lang == "en"][:400]
    train, dev = english[:300], english[300:340]

    (tmp_path / "sw.tsv").write_text("en\tsw\n" + "".join(f"{e}\t{pseudo(e, 'sw')}\n" for e in train[:200]))
    (tmp_path / "opus.en-wo.en").write_text("".join(f"{e}\n" for e in train[200:]))
    (tmp_path / "opus.en-wo.wo").write_text("".join(f"{pseudo(e, 'wo')}\n" for e in train[200:]))
    for lang in ("en", "sw", "wo"):  # dev bitext, FLORES style: one file per language, line-aligned
        (tmp_path / f"dev.{lang}").write_text("".join(f"{e if lang == 'en' else pseudo(e, lang)}\n" for e in dev))
    bitext = tmp_path / "bitext"
    assert main(["data", "prepare", "--pairs", str(tmp_path / "sw.tsv"), "--lang", "sw",
                 "--aligned", str(tmp_path / "opus.en-wo.en"), str(tmp_path / "opus.en-wo.wo"),
                 "--exclude-texts-from", str(tmp_path / "dev.en"), "--out", str(bitext)]) == 0
    assert "| sw | 200 |" in capsys.readouterr().out

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "text": e} for i, e in enumerate(dev)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for lang in ("sw", "wo"):
        (beir / f"queries.{lang}.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": pseudo(e, lang)}) + "\n"
                                                            for i, e in enumerate(dev)))
    for split, queries in (("dev", range(20)), ("test", range(20, len(dev)))):
        (beir / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in queries))
    dev_files = {lang: str(tmp_path / f"dev.{lang}") for lang in ("en", "sw", "wo")}
    # The teacher: CLS-pooled, another width, a Dense layer (a LaBSE-like teacher in miniature).
    overrides = [f"student={tiny_model_dir}", f"teacher={cls_teacher_dir}", f"output_dir={tmp_path / 'run'}",
                 "steps=4", "batch_size=8", "max_length=32", f"data.bitext={bitext}", "data.dev_languages=sw,wo",
                 "data.high_resource=sw", "data.low_resource=wo", f"data.dev_bitext={json.dumps(dev_files)}"]
    assert main(["distill", *[arg for o in overrides for arg in ("--set", o)]]) == 0
    dev_report = json.loads((tmp_path / "run" / "dev" / "report.json").read_text())
    assert set(dev_report["languages"]) == {"sw", "wo"} and dev_report["languages"]["sw"]["n_queries"] == 40
    assert len(dev_report["gap"]["interval"]) == 2
    root = tmp_path / "run" / "student"
    card = yaml.safe_load((root / (root / "LATEST").read_text().strip() / "README.md").read_text().split("---\n")[1])
    assert card["model-index"][0]["results"][0]["dataset"] == {"type": "bitext", "name": dev_files["en"]}
    student = str(tmp_path / "run" / "student")  # a version root: LATEST names the newest

    sweep = [f"distill.student={tiny_model_dir}", f"distill.teacher={cls_teacher_dir}", "distill.steps=2",
             "distill.eval_every=2", "distill.batch_size=8", "distill.max_length=32", f"distill.data.bitext={bitext}",
             f"distill.data.dev_beir={beir}", "distill.data.dev_languages=sw,wo", "distill.data.high_resource=sw",
             "distill.data.low_resource=wo", "objective=low_ndcg10", "scheduler=fifo", "num_samples=2",
             f"storage_path={tmp_path / 'tune'}", "name=own"]
    assert main(["tune", "--address", ray_cluster["address"], *[arg for o in sweep for arg in ("--set", o)]]) == 0
    trials = pacsv.read_csv(tmp_path / "tune" / "own" / "trials.csv").to_pylist()
    assert len(trials) == 2 and all(t["status"] == "OK" and t["objective"] == t["dev_ndcg10_wo"] for t in trials)
    assert yaml.safe_load((tmp_path / "tune" / "own" / "best.yaml").read_text())["data"]["dev_beir"] == str(beir)

    assert main(["eval", "--model", student, "--beir", str(beir), "--high", "sw", "--low", "wo",
                 "--out", str(tmp_path / "beir-report")]) == 0
    assert set(json.loads((tmp_path / "beir-report" / "report.json").read_text())["languages"]) == {"sw", "wo"}
    assert main(["eval", "--model", student, "--bitext-english", dev_files["en"], "--bitext", f"sw={dev_files['sw']}",
                 "--bitext", f"wo={dev_files['wo']}", "--high", "sw", "--low", "wo", "--out", str(tmp_path / "bitext-report")]) == 0

    collection = tmp_path / "docs.jsonl"
    collection.write_text("".join(json.dumps({"id": f"doc-{i}", "text": pseudo(e, lang), "lang": lang}) + "\n"
                                  for i, (e, lang) in enumerate((e, lang) for e in english[:100] for lang in ("sw", "wo"))))
    assert main(["index", "--model", student, "--corpus", str(collection), "--out", str(tmp_path / "index"),
                 "--address", ray_cluster["address"], "--sample-queries", "20"]) == 0
    served = Searchable(load_index(str(tmp_path / "index")))
    hits = served.search(Encoder.load(student).encode([pseudo(english[0], "sw")], "query"), 5, {"lang": "wo"})[0]
    assert len(hits) == 5 and {h["metadata"]["lang"] for h in hits} == {"wo"}
