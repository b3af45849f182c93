"""RESULTS.md is a function of the committed records alone: regenerated from them (nothing trained,
``--report-only``) on any machine, it equals the committed file byte for byte. A change to the research
harness that moves a number or a word shows up here, and is committed with the regenerated report."""

import shutil
from pathlib import Path

import pytest

from optical_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "experiment"


def test_results_md_regenerates_from_the_committed_records(tmp_path, monkeypatch):
    # The config's own data_root (relative to the repository): the records' keys hold the test sets' paths.
    monkeypatch.chdir(REPO)
    if not (REPO.parent / "shared" / "data" / "flickr30k-ml" / "multi30k_task1_val.parquet").is_file():
        pytest.skip("the test sets are read from ../shared/data/flickr30k-ml, not found")
    for records in ("runs", "sweeps", "teachers", "curves", "trial-logs"):  # trial logs: sweeps cut short
        if (RESULTS / records).is_dir():
            shutil.copytree(RESULTS / records, tmp_path / records)
    assert main(["experiment", "--config", str(REPO / "configs" / "experiment.yaml"), "--report-only",
                 "--set", f"results_dir={tmp_path}"]) == 0
    regenerated, committed = (tmp_path / "RESULTS.md").read_text(), (RESULTS / "RESULTS.md").read_text()
    assert regenerated == committed, "RESULTS.md differs from what the records give: regenerate it " \
                                     "(optical-ray experiment --config configs/experiment.yaml --report-only)"
