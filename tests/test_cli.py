"""The command line: the eval report's fixed format (from an s3:// URI), errors that name the input,
and --help on every command."""

import json

import pytest

from optical_ray.cli import build_parser, main
from optical_ray.config import SAMPLE_DIR


def test_eval_writes_the_report_format_from_s3(s3, tiny_model_dir, tmp_path, capsys):
    key = "eval/test_2018.parquet"
    s3["client"].upload_file(str(SAMPLE_DIR / "test_2018_captions.parquet"), s3["bucket"], key)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", f"s3://{s3['bucket']}/{key}",
                 "--query-langs", "de,fr,ay,qu", "--corpus-lang", "en", "--high", "de,fr", "--low", "ay,qu",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"languages", "gap"}
    for lang in ("de", "fr", "ay", "qu"):
        metrics = report["languages"][lang]
        assert set(metrics) == {"R@1", "R@5", "R@10", "MRR", "n_queries"} and metrics["n_queries"] == 1071
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1
    r1 = {lang: m["R@1"] for lang, m in report["languages"].items()}
    assert report["gap"]["high"] == ["de", "fr"] and report["gap"]["low"] == ["ay", "qu"]
    assert report["gap"]["R@1"] == pytest.approx((r1["de"] + r1["fr"]) / 2 - (r1["ay"] + r1["qu"]) / 2)
    assert "| de | high |" in (out / "report.md").read_text()
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "no-such-model", "--data", "x.parquet", "--query-langs", "de", "--out", "o"],
     "model 'no-such-model': not one of student-init, minilm-en"),
    (["eval", "--model", "student-init", "--data", "x.parquet", "--query-langs", "de", "--out", "o"],
     "no such file or folder"),
    (["eval", "--model", "student-init", "--data", str(SAMPLE_DIR / "val_captions.parquet"), "--query-langs", "xx",
      "--out", "o"], "--query-langs: 'xx' is not a valid BCP-47"),
    (["distill", "--set", "stepz=3"], "unknown key stepz"),
])
def test_errors_name_the_bad_input_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_malformed_option_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "student-init", "--bitext-english", "en.txt", "--bitext", "sw", "--out", "o"])
    assert exit_info.value.code == 2 and "expected LANG=FILE (e.g. sw=swh_Latn.devtest), got 'sw'" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    parser = build_parser()
    for command in ("eval", "distill", "train", "tune", "index", "experiment", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: optical-ray " + command in capsys.readouterr().out


def test_data_prepare_writes_bitext_shards_without_evaluation_images(tmp_path, capsys):
    import pyarrow.parquet as pq

    from optical_ray.data import DataError, check_bitext_shards, image_ids

    out = tmp_path / "bitext"
    val = str(SAMPLE_DIR / "val_captions.parquet")
    code = main(["data", "prepare", "--captions", str(SAMPLE_DIR / "train_captions.parquet"), "--captions", val,
                 "--languages", "de,qu", "--exclude-images-from", val, "--out", str(out), "--rows-per-shard", "1000"])
    assert code == 0
    shards = check_bitext_shards(str(out))
    assert len(shards) == 3  # 3,000 pairs (1,500 images x 2 languages) in shards of 1,000
    pairs = pq.read_table(out)
    assert pairs.num_rows == 2998 and not set(pairs["image_id"].to_pylist()) & image_ids([val])
    printed = capsys.readouterr().out
    assert "600 evaluation images" in printed  # 300 val images x 2 languages, counted
    # Two Quechua machine translations run away into repetition: over-long, dropped and counted
    assert "2 over 1000 characters" in printed and "| qu | 1498 | 300 | 2 |" in printed

    # Prepared again into the same folder in one shard: the two stale parts left there are never read.
    assert main(["data", "prepare", "--captions", str(SAMPLE_DIR / "train_captions.parquet"), "--languages", "de,qu",
                 "--exclude-images-from", val, "--out", str(out), "--rows-per-shard", "3000"]) == 0
    assert len(list(out.glob("part-*.parquet"))) == 3 and list(check_bitext_shards(str(out))) == [str(out / "part-00000.parquet")]
    # A preparation that never finished (no marker) is refused by name.
    (out / "_SUCCESS.json").unlink()
    with pytest.raises(DataError, match="no _SUCCESS.json"):
        check_bitext_shards(str(out))


def test_distill_prints_one_bar_and_a_table_not_ray_or_library_chatter(tmp_path, tiny_model_dir, tiny_teacher_dir):
    """What a user sees from `optical-ray distill`: the step bar, the evaluation bar, the dev table and
    where the student is -- fitting on one screen, with no Ray progress bars or library INFO lines."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "optical_ray.cli", "distill", "--set", f"student={tiny_model_dir}",
         "--set", f"teacher={tiny_teacher_dir}", "--set", f"output_dir={tmp_path / 'run'}", "--set", "steps=4",
         "--set", "batch_size=8", "--set", "max_length=32", "--set", "data.dev_languages=de,qu"],
        capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in (out.stdout + out.stderr).replace("\r", "\n").splitlines() if line.strip()]
    bars = {line.split(":")[0] for line in lines if "it/s" in line or "step/s" in line or "s/step" in line or "batch" in line}
    assert "distill" in bars, lines
    final = [line for line in lines if "|" not in line or line.startswith("|")]  # tqdm redraws collapse into bars
    assert len(final) <= 24, "\n".join(final)
    assert "| de | high |" in out.stdout and "student saved to" in out.stdout
    noise = [line for line in lines if any(word in line for word in ("Running", "INFO ", "(pid=", "TrainingReport",
                                                                      "faiss", "Ray", "Loading"))]
    assert not noise, noise
