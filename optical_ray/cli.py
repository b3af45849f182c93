"""The ``optical-ray`` command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_eval(args: argparse.Namespace) -> None:
    from . import beir
    from .data import DataError, check_languages, read_captions
    from .encoder import Encoder
    from .evaluate import evaluate, evaluate_bitext, report_markdown, write_report

    high, low = check_languages(args.high, "--high"), check_languages(args.low, "--low")
    encoder = Encoder.load(args.model, max_length=args.max_length)
    if args.beir:
        report = beir.evaluate(encoder, args.beir, args.query_langs and check_languages(args.query_langs, "--query-langs"),
                               high, low, args.split, args.batch_size)
        out = beir.write_report(report, args.out, f"{args.model}: {args.beir}")
        print((out / "report.md").read_text())
        print(f"report: {out / 'report.json'}")
        return
    if args.bitext_english:
        files = dict(args.bitext or [])
        report = evaluate_bitext(encoder, args.bitext_english, dict(zip(check_languages(list(files), "--bitext"),
                                                                        files.values())), high, low, args.batch_size)
        title = f"{args.model}: bitext retrieval of {args.bitext_english}"
    else:
        if not args.query_langs:
            raise DataError("--data needs --query-langs (the languages whose captions are the queries)")
        query_langs = check_languages(args.query_langs, "--query-langs")
        report = evaluate(encoder, read_captions(args.data, args.drop_blank), query_langs, args.corpus_lang,
                          high=high, low=low, batch_size=args.batch_size)
        title = f"{args.model}: {args.corpus_lang} corpus"
    out = write_report(report, args.out, title=title)
    print(report_markdown(report, title))
    print(f"report: {out / 'report.json'}  plot: {out / 'recall.png'}")


def _lang_file(value: str) -> tuple[str, str]:
    lang, sep, path = value.partition("=")
    if not sep or not lang or not path:
        raise argparse.ArgumentTypeError(f"expected LANG=FILE (e.g. sw=swh_Latn.devtest), got {value!r}")
    return lang, path


def cmd_distill(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .config import DistillConfig, load_config
    from .distill import distill

    cfg = load_config(DistillConfig, args.config, dict(args.set or []))
    result = distill(cfg)
    _summary(result.dev_report, cfg.steps)
    print(f"student saved to {result.model_dir}; dev report in {Path(cfg.output_dir) / 'dev'}")


def cmd_train(args: argparse.Namespace) -> None:
    import json

    from . import storage
    from .config import DistillConfig, load_config
    from .train import run_training

    cfg = load_config(DistillConfig, args.config, dict(args.set or []))
    _connect_ray(args)
    student = run_training(cfg)
    _summary(json.loads(storage.read_bytes(storage.join(cfg.output_dir, "dev", "report.json"))), cfg.steps)
    print(f"student saved to {student}")


def cmd_teacher(args: argparse.Namespace) -> None:
    from .config import TeacherConfig, load_config
    from .teacher import report_markdown
    from .train import train_teacher

    cfg = load_config(TeacherConfig, args.config, dict(args.set or []))
    _connect_ray(args)
    teacher, report = train_teacher(cfg)
    print(report_markdown(report).split("\n", 2)[2])  # the table, no title
    print(f"teacher saved to {teacher} (use it as `teacher:` in a distillation config); report in {cfg.output_dir}")


def _summary(report: dict, steps: int) -> None:
    from .distill import dev_report_markdown

    print(dev_report_markdown(report, f"Dev retrieval after {steps} steps").split("\n", 2)[2])  # the table, no title


def cmd_tune(args: argparse.Namespace) -> None:
    from .config import SweepConfig, load_config
    from .tune import run_sweep

    cfg = load_config(SweepConfig, args.config, dict(args.set or []))
    _connect_ray(args)
    result = run_sweep(cfg, resume=args.resume, verbose=args.verbose, trial_log=args.trial_log)
    if result.replayed:
        print(f"{result.replayed} trials replayed from {args.trial_log}, trained before")
    print(f"{result.trials.num_rows} trials, {result.trial_steps} training steps in all; results in "
          f"{cfg.storage_path.rstrip('/')}/{cfg.name}/ (trials.csv, best.yaml, sweep.png)")
    if result.best is None:
        print("no trial completed every step: no best.yaml")
    else:
        print("best: " + " ".join(f"{k}={v:.4g}" for k, v in result.best_params.items()))
        for knob, end in result.at_edge.items():
            print(f"the best {knob} is at the {end} end of search.{knob} {getattr(cfg.search, knob)}: "
                  "better values may lie beyond it; widen the range and sweep again")


def cmd_index(args: argparse.Namespace) -> None:
    import json

    from .corpus_index import build_corpus_index, build_document_index

    _connect_ray(args)
    if args.corpus:
        manifest = build_document_index(args.model, args.corpus, args.out, args.factory, args.id_field, args.text_field,
                                        args.metadata_fields, args.format, args.sample_queries, args.concurrency,
                                        args.batch_size)
    else:
        manifest = build_corpus_index(args.model, args.data, args.out, args.factory, args.lang, args.query_langs,
                                      args.sample_queries, args.concurrency, args.batch_size)
    print(json.dumps(manifest, indent=2))
    print(f"index written to {args.out}")


def cmd_experiment(args: argparse.Namespace) -> None:
    from .config import ExperimentConfig, load_config
    from .research.report import answer_lines
    from .research.runner import run_experiment

    cfg = load_config(ExperimentConfig, args.config, dict(args.set or []))
    if not args.report_only:
        _connect_ray(args)
    results = run_experiment(cfg, recorded_only=args.report_only, verbose=args.verbose)
    print("\n".join(answer_lines(results)))
    print(f"report: {cfg.results_dir}/RESULTS.md (plots r1_by_arm.png, gap_by_arm.png; numbers in results.json)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .config import TrainingConfig
    from .prepare import TableOptions, prepare_bitext

    prepared = prepare_bitext(
        args.out, captions=args.captions or [], languages=args.languages or [], pairing=args.pairing,
        aligned=args.aligned or [],
        tables=args.pairs or [], lang=args.lang, table_options=TableOptions(
            args.english_field, args.translation_field, args.lang_field, not args.no_header, args.format),
        exclude_images_from=args.exclude_images_from or [], exclude_texts_from=args.exclude_texts_from or [],
        max_chars=args.max_chars, drop_blank=args.drop_blank, tokenize=args.tokenize_for or [],
        max_length=args.max_length or TrainingConfig.model_fields["max_length"].default,
        rows_per_shard=args.rows_per_shard, progress=True)
    print(prepared.report.table())
    print(prepared.report.summary())
    print(f"wrote {prepared.rows} pairs in {len(prepared.shards)} shard(s) under {args.out}")


def cmd_build(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .upstream import build_tables

    checkouts = {k: Path(v) if v else None for k, v in
                 (("multi30k", args.multi30k), ("multiscript30k_repo", args.multiscript30k), ("iglue", args.iglue),
                  ("dutch", args.dutch))}
    for uri in build_tables(args.out, drop_blank=args.drop_blank, **checkouts):
        print(uri)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    args.address = "local"
    _connect_ray(args, num_cpus=2)
    run_demo(args.out, steps=args.steps)


def _connect_ray(args: argparse.Namespace, **local) -> None:
    """RAY_ADDRESS or a job's cluster when set, else a local Ray. Quiet unless --verbose: no Ray start-up
    lines, worker logs, Ray Data progress bars or Tune status tables -- errors still surface in full."""
    import ray

    if ray.is_initialized():  # called from a program (a notebook, a test) already connected to its Ray
        return
    verbose = getattr(args, "verbose", False)
    ray.init(address=args.address, logging_level=logging.INFO if verbose else logging.WARNING,
             log_to_driver=verbose, **({"dashboard_host": "127.0.0.1", **local} if args.address == "local" else {}))
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _config_options(p: argparse.ArgumentParser, schema: str, example: str, ray: bool = True) -> None:
    """--config, --set (and --address for commands that run on Ray), alike on every command."""
    p.add_argument("--config", help=f"YAML file (keys as in optical_ray.config.{schema}); without it, the "
                                     "defaults: bundled sample data, shipped models")
    p.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {example} (repeatable)")
    if ray:
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    # Also after the command, so `python jobs/distill.py --verbose ...` works.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log debug messages and show where an error was raised")


def _drop_blank_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop-blank", action="store_true",
                   help="drop blank captions and report how many per file and language (default: refuse them, "
                        "naming the file and row)")


def cmd_keys_add(args: argparse.Namespace) -> None:
    from .service.auth import add_key

    key = add_key(args.file, args.name, args.requests_per_s, args.burst, args.replace)
    print(f"key for {args.name!r} (shown once; only its SHA-256 is in {args.file}):", file=sys.stderr)
    print(key)


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from .service.auth import revoke_key

    revoke_key(args.file, args.name)
    print(f"revoked {args.name!r} in {args.file}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optical-ray",
        description="Distil multilingual text encoders with optimal transport and contrastive learning, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and show where an error was raised")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "eval", help="cross-lingual retrieval report: captions, bitext or a BEIR-layout set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One of three evaluations, each a per-language table and the gap between --high and --low:\n"
                    "  --data: caption retrieval, queries in --query-langs against the --corpus-lang captions of the "
                    "same images (R@1/5/10, MRR)\n"
                    "  --bitext-english + --bitext: bitext retrieval (FLORES/Tatoeba style), each sentence must find "
                    "its English translation among all English sentences (R@1/5/10, MRR, gap with a paired bootstrap "
                    "interval)\n"
                    "  --beir: a BEIR-layout folder (corpus.jsonl, queries.<lang>.jsonl, qrels/<split>.tsv): nDCG@10, "
                    "Recall@100, MRR@10 from ir-measures, gap with a bootstrap interval over queries",
        epilog="examples:\n"
               "  optical-ray eval --model runs/distill/model --data test.parquet --query-langs de,ay,qu --out r/\n"
               "  optical-ray eval --model runs/distill/model --bitext-english eng_Latn.devtest \\\n"
               "      --bitext sw=swh_Latn.devtest --bitext de=deu_Latn.devtest --high de --low sw --out r/\n"
               "  optical-ray eval --model runs/distill/model --beir my-set/ --high en --low sw,quy --out r/")
    p.add_argument("--model", required=True, help="model folder, or a shipped model: student-init, minilm-en")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", action="append",
                        help="caption table (Parquet file or folder, local or s3://); repeat for several")
    source.add_argument("--bitext-english", metavar="FILE", help="the English side of line-aligned evaluation bitext")
    source.add_argument("--beir", metavar="FOLDER", help="a BEIR-layout retrieval set, local or s3://")
    p.add_argument("--bitext", type=_lang_file, action="append", metavar="LANG=FILE",
                   help="with --bitext-english: a file line-aligned with it, in language LANG (repeatable)")
    p.add_argument("--query-langs", type=_csv, help="comma-separated, e.g. de,fr,ay (--data: required; --beir: "
                                                    "default every queries file)")
    p.add_argument("--corpus-lang", default="en")
    p.add_argument("--split", default="test", help="--beir: the qrels split (qrels/<split>.tsv)")
    p.add_argument("--high", type=_csv, default="de,fr,es,zh", help="high-resource group for the gap")
    p.add_argument("--low", type=_csv, default="ay,gn,qu", help="low-resource group for the gap")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: what the saved model states, else 128)")
    p.add_argument("--out", required=True, help="output folder")
    _drop_blank_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("distill", help="distil a student on bitext in this process (see configs/distill.yaml)",
                       description="Train the student with the OT / contrastive / MSE objective from a YAML "
                                   "config, evaluate on the dev set and save it.")
    _config_options(p, "DistillConfig", "loss.sinkhorn_reg=0.1", ray=False)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("train", help="distil on Ray Train: data-parallel workers, checkpoints, resume",
                       description="Same config as `distill`, plus its `ray:` section (workers, GPUs, storage, "
                                   "failures). Connects to RAY_ADDRESS (or the cluster of `ray job submit`); "
                                   "otherwise starts a local Ray. Rerunning with the same ray.name and "
                                   "ray.storage_path resumes from the latest checkpoint.")
    _config_options(p, "DistillConfig", "ray.num_workers=4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("teacher", help="train a teacher on caption<->caption retrieval (Ray Train), to distil from",
                       description="Fine-tunes `student` on retrieval between captions of the same image in "
                                   "data.lang (two captions of an image are a positive pair, the batch's others "
                                   "negatives); dev and excluded images never enter training. Runs on Ray Train "
                                   "like `train` (checkpoints, resume) and reports R@1 before and after on the dev "
                                   "and test sets (semantic protocol). See configs/teacher.yaml.")
    _config_options(p, "TeacherConfig", "steps=500")
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("tune", help="sweep Sinkhorn regularization and temperature on Ray Tune (ASHA)",
                       description="Trials of the distillation loop with sampled loss.sinkhorn_reg, "
                                   "loss.temperature (log-uniform) and optional loss weights; ASHA stops weak "
                                   "trials at dev evaluations. Writes trials.csv, best.yaml and sweep.png to "
                                   "the sweep's storage. See configs/sweep.yaml.")
    _config_options(p, "SweepConfig", "num_samples=16")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name and storage")
    p.add_argument("--trial-log", metavar="URI",
                   help="a JSON file (local or s3://) logging each finished trial; a sweep started again with it, "
                        "even on a bare machine or in new storage, replays those trials instead of training them")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("index", help="encode a caption corpus or a document collection with Ray Data and build a FAISS index",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Encodes --corpus documents (or the distinct --lang captions of --data) with the "
                                   "model (Ray Data map_batches), builds a FAISS index from --factory (GPU FAISS when "
                                   "present), reports recall@10 against exact search (for a collection also with a "
                                   "filter on each value of its metadata fields), and writes a new version "
                                   "(index.faiss, metadata.parquet, manifest.json) under --out.",
                       epilog="examples:\n"
                              "  optical-ray index --model runs/distill/model --corpus docs.jsonl --out runs/index\n"
                              "  optical-ray index --model runs/distill/model --corpus s3://b/docs.parquet --id-field doc_id \\\n"
                              "      --text-field body --metadata-fields lang,url --factory HNSW32 --out s3://b/index\n"
                              "  optical-ray index --model student-init --data test_2018_captions.parquet --query-langs de,qu "
                              "--out runs/index")
    p.add_argument("--model", required=True, help="model folder or shipped model name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="a document collection: .jsonl, .tsv, .csv or .parquet, local or s3://")
    source.add_argument("--data", action="append", help="caption table file or folder (repeatable)")
    p.add_argument("--id-field", default="id", help="--corpus: the document id field (default id)")
    p.add_argument("--text-field", default="text", help="--corpus: the text field (default text)")
    p.add_argument("--metadata-fields", type=_csv, default=None,
                   help="--corpus: the fields hits carry and searches filter on (default: every other field)")
    p.add_argument("--format", choices=["jsonl", "tsv", "csv", "parquet"], help="--corpus: instead of the file name's")
    p.add_argument("--out", required=True, help="output folder, local or s3://")
    p.add_argument("--factory", default="Flat", help='FAISS index_factory string, e.g. Flat, HNSW32, "IVF256,PQ32"')
    p.add_argument("--lang", default="en", help="--data: language of the corpus captions")
    p.add_argument("--query-langs", type=_csv, default="", help="--data: languages whose captions measure recall vs exact")
    p.add_argument("--sample-queries", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("experiment", help="the research question: loss-term arms x seeds, three protocols, gaps with CIs",
                       description="Sweeps each arm's own knobs on the dev set (same budget per arm), trains every "
                                   "arm x seed on Ray Train with the same data and steps, evaluates on every test "
                                   "set and writes RESULTS.md, results.json and plots to results_dir. With several "
                                   "`teachers`, it then trains the task teacher, chooses one on dev and runs every "
                                   "arm x seed again with the choice; last, the training-length `curve`. Finished "
                                   "runs are recorded and skipped when run again (an interrupted experiment "
                                   "continues, also in another session). See configs/experiment.yaml.")
    _config_options(p, "ExperimentConfig", "distill.steps=500")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: rewrite RESULTS.md, results.json and the plots from the "
                        "runs recorded so far (e.g. while the experiment runs elsewhere)")
    p.set_defaults(func=cmd_experiment)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True, metavar="STEP")
    p = data.add_parser(
        "prepare", help="caption tables or parallel corpora -> English<->L bitext shards (Parquet, local or s3://)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read English<->L pairs from any mix of caption tables, line-aligned files and parallel tables, "
                    "drop blank, over-long, duplicate and leaked pairs (either side occurs in an evaluation set), "
                    "and write part-NNNNN.parquet shards with a per-language report of what was kept and dropped.",
        epilog="examples:\n"
               "  optical-ray data prepare --aligned corpus.en corpus.sw --out bitext/        # OPUS Moses files\n"
               "  optical-ray data prepare --pairs pairs.tsv --lang sw --out bitext/          # TSV with header en, sw\n"
               "  optical-ray data prepare --pairs opus.tsv --no-header --english-field 0 --translation-field 1 \\\n"
               "      --lang sw --out bitext/\n"
               "  optical-ray data prepare --pairs pairs.jsonl --lang-field lang --translation-field text_l --out bitext/\n"
               "  optical-ray data prepare --captions train.parquet --languages de,ay --exclude-images-from test.parquet \\\n"
               "      --out s3://bucket/bitext/")
    p.add_argument("--captions", action="append", help="caption table file or folder (repeatable; needs --languages)")
    p.add_argument("--languages", type=_csv, help="for --captions: comma-separated tags, e.g. de,fr,ay,gn,qu")
    p.add_argument("--pairing", choices=["translation", "image_pivot"], default="translation",
                   help="for --captions: pair each caption with the English caption it translates, or with another "
                        "English description of the same image (independent descriptions included)")
    p.add_argument("--aligned", nargs=2, action="append", metavar=("ENGLISH_FILE", "OTHER_FILE"),
                   help="line-aligned files (OPUS Moses format), one sentence per line; the language is OTHER_FILE's "
                        "suffix when that is a tag (corpus.en-sw.sw -> sw), else --lang (repeatable)")
    p.add_argument("--pairs", action="append", metavar="FILE",
                   help="a parallel table: .tsv, .csv, .jsonl or .parquet, local or s3:// (repeatable)")
    p.add_argument("--lang", help="language tag of every pair of --aligned and --pairs files (e.g. sw, quy, zh-Hant)")
    p.add_argument("--lang-field", help="for --pairs: the column holding each pair's language, instead of --lang")
    p.add_argument("--english-field", default="en", help="for --pairs: the English column (default en; a position "
                                                          "such as 0 with --no-header)")
    p.add_argument("--translation-field", help="for --pairs: the other column (default: the --lang tag)")
    p.add_argument("--no-header", action="store_true", help="for --pairs: TSV/CSV without a header line")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl", "parquet"], help="for --pairs: instead of the file name's")
    p.add_argument("--exclude-images-from", action="append",
                   help="evaluation caption tables: their images and texts stay out of training (repeatable)")
    p.add_argument("--exclude-texts-from", action="append", metavar="FILE",
                   help="evaluation texts that must not be trained on: caption tables, BEIR .jsonl (text field) or "
                        "one sentence per line (FLORES, Tatoeba) (repeatable)")
    p.add_argument("--max-chars", type=int, default=1000, help="drop pairs with a side longer than this (default 1000)")
    p.add_argument("--out", required=True, help="output folder, local or s3://bucket/prefix")
    p.add_argument("--rows-per-shard", type=int, default=50_000,
                   help="pairs per Parquet file (default 50,000); pairs are written shuffled in row groups of at most "
                        "1,024, which training deals to its data.lanes so that each worker reads only its own")
    p.add_argument("--tokenize-for", action="append", metavar="MODEL",
                   help="also store the tokens MODEL reads for each side (repeatable: the student and the teacher), "
                        "so training pads them instead of tokenising on the trainer")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sentence for --tokenize-for: the training config's max_length (default: its default)")
    _drop_blank_option(p)
    p.set_defaults(func=cmd_prepare)

    p = data.add_parser("build", help="upstream repositories' files -> the caption tables (Parquet)",
                        description="Rebuild the caption tables of ../shared/data/flickr30k-ml from checkouts of "
                                    "the repositories it names (README: The data): Multi30k (github.com/multi30k/dataset), "
                                    "MultiScript30k (github.com/ufdatastudio/multi30k-extension), IGLUE "
                                    "(github.com/e-bug/iglue) and the Dutch descriptions (github.com/cltl/DutchDescriptions). "
                                    "Give any of them; each table is written as <out>/<name>.parquet.")
    p.add_argument("--multi30k", help="checkout of multi30k/dataset (task 1 and task 2 tables)")
    p.add_argument("--multiscript30k", help="checkout of ufdatastudio/multi30k-extension (needs --multi30k)")
    p.add_argument("--iglue", help="checkout of e-bug/iglue (Flickr30k val machine translations)")
    p.add_argument("--dutch", help="checkout of cltl/DutchDescriptions")
    p.add_argument("--out", required=True, help="output folder, local or s3://bucket/prefix")
    _drop_blank_option(p)
    p.set_defaults(func=cmd_build)

    keys = sub.add_parser("keys", help="the service's per-client API keys (a file of SHA-256 digests)").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    p = keys.add_parser("add", help="make a key for a client, store its digest, print the key once",
                        description="The service re-reads the file within a second: no restart. Mount the file "
                                    "(a Kubernetes Secret) and name it in the app args: auth: keys, api_keys_file: PATH.")
    p.add_argument("name", help="the client's name (in access logs and metrics)")
    p.add_argument("--file", required=True, help="the key file (created when missing)")
    p.add_argument("--requests-per-s", type=float, help="this client's rate limit (default: the app's rate_limit)")
    p.add_argument("--burst", type=int, help="requests this client may make at once before the rate applies")
    p.add_argument("--replace", action="store_true", help="rotate: a new key for an existing client (the old one stops working)")
    p.set_defaults(func=cmd_keys_add)
    p = keys.add_parser("revoke", help="remove a client's key (refused within a second, no restart)")
    p.add_argument("name")
    p.add_argument("--file", required=True)
    p.set_defaults(func=cmd_keys_revoke)

    p = sub.add_parser("demo", help="the embedded demo: evaluate, distil briefly, evaluate again",
                       description="Runs on the bundled sample data and shipped models; needs nothing else.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=150, help="distillation steps")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ours at INFO (what was dropped, where a run resumed); other libraries' INFO only with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    logging.getLogger("optical_ray").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from .config import ConfigError
    from .data import DataError
    from .e5s1 import E5S1FormatError
    from .index import IndexFormatError
    from .service.auth import KeyFileError
    from .st_folder import FolderFormatError
    from .storage import StorageError

    try:
        args.func(args)
    except (ConfigError, DataError, StorageError, E5S1FormatError, FolderFormatError, IndexFormatError, KeyFileError,
            FileNotFoundError) as err:
        if args.verbose:
            logging.getLogger("optical_ray").exception("where it failed:")
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None), getattr(args, "keys_command", None))))
        print(f"optical-ray {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
