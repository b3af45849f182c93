"""The experiment runner end to end with tiny models: teacher choice and sweep on dev, four arms on
Ray Train, test evaluation with bootstrap intervals, RESULTS.md and plots."""

import json

import pytest

from optical_ray.config import SAMPLE_DIR, ExperimentConfig, load_config
from optical_ray.experiment import ARMS, run_experiment


@pytest.mark.timeout(900)
def test_experiment_runs_every_arm_and_writes_the_report(ray_cluster, tiny_model_dir, tiny_teacher_dir, tmp_path):
    cfg = load_config(ExperimentConfig, {
        "out_dir": str(tmp_path / "exp"), "teachers": [str(tiny_teacher_dir), str(tiny_model_dir)], "bootstrap": 50,
        "distill": {"student": str(tiny_model_dir), "steps": 4, "batch_size": 8, "eval_every": 2, "max_length": 32,
                    "data": {"dev_languages": ["de", "qu"]},
                    "ray": {"num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1}},
        "sweep": {"num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 2, "cpus_per_trial": 0.5},
        "test_sets": [{"name": "sample_2018", "data": [str(SAMPLE_DIR / "test_2018_captions.parquet")],
                       "query_langs": ["de", "es", "ay", "qu"], "high": ["de", "es"], "low": ["ay", "qu"]}],
    })
    results = run_experiment(cfg)

    out = tmp_path / "exp"
    saved = json.loads((out / "results.json").read_text())
    assert saved["teacher"] in cfg.teachers and set(saved["teacher_dev_scores"]) == set(cfg.teachers)
    swept = load_config(ExperimentConfig, str(out / "experiment.yaml")).sweep.distill  # what the sweep ran
    assert swept.teacher == saved["teacher"] and swept.student == str(tiny_model_dir) and swept.eval_every == 2
    assert saved["sweep_trials"] == 2 and 1e-3 <= saved["sinkhorn_reg"] <= 1.0
    arms = saved["tests"]["sample_2018"]
    assert list(arms) == list(ARMS)
    for report in arms.values():
        assert report["languages"]["qu"]["n_queries"] == 1071
        lo, hi = report["gap"]["ci95"]
        assert lo <= report["gap"]["R@1"] <= hi
    for arm, report in arms.items():
        assert set(report["gap"]["diff_ci95"]) == set(ARMS) - {arm}
        if arm == "none":
            continue
        lo, hi = report["gap"]["diff_ci95"]["none"]
        assert lo <= report["gap"]["R@1"] - arms["none"]["gap"]["R@1"] <= hi
    # Arms trained with different objectives end in different students.
    assert len({json.dumps(r["languages"]) for r in arms.values()}) > 1
    text = (out / "RESULTS.md").read_text()
    assert "**Answer.** On sample_2018 OT + contrastive distillation" in text
    assert f"{arms['none']['gap']['R@1']:.3f}" in text
    lo, hi = arms["ot+contrastive"]["gap"]["diff_ci95"]["mse"]
    assert f"[{lo:+.3f}, {hi:+.3f}] |" in text  # the paired change vs (1) in arm (3)'s row
    assert (out / "r1_by_arm.png").stat().st_size > 0 and (out / "gap_by_arm.png").stat().st_size > 0
    assert results["wall_time_s"] > 0
