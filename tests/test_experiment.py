"""The experiment: the arm table as configs, held-out languages out of training, run records, and one
cheap end-to-end run (one trained arm, one seed, tiny models) that a second call skips."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import REPO

from optical_ray.config import SAMPLE_DIR, ConfigError, ExperimentConfig, load_config, training_fields
from optical_ray.distill import load_bitext
from optical_ray.metrics import pack_ranks, unpack_ranks
from optical_ray.research.plan import ARMS, arm_config, config_key, sweep_config
from optical_ray.research.stats import group_r1


def experiment_config(tmp_path, **extra) -> ExperimentConfig:
    return load_config(ExperimentConfig, {
        "out_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
        "held_out_languages": ["gn"],
        "distill": {"data": {"languages": ["de", "es", "ay", "gn", "qu"], "dev_languages": ["de", "gn", "qu"],
                             "low_resource": ["ay", "gn", "qu"]}},
        "sweep": {"search": {"lr": [1e-5, 1e-4], "sinkhorn_reg": [0.01, 1.0], "temperature": [0.01, 0.5],
                             "ot_weight": [0.1, 10.0]}},
        **extra,
    })


@pytest.mark.parametrize("arm", [a for a in ARMS if ARMS[a].weights is not None])
def test_each_arm_becomes_its_config_and_sweeps_only_its_knobs(tmp_path, arm):
    cfg = experiment_config(tmp_path)
    run = arm_config(cfg, arm, "minilm-en", seed=2, params={"lr": 3e-5})
    weights = ARMS[arm].weights
    assert (run.loss.ot_weight, run.loss.contrastive_weight, run.loss.mse_weight) == (
        weights.ot, weights.contrastive, weights.mse)
    assert run.teacher == "minilm-en" and run.seed == 2 and run.optim.lr == 3e-5
    # The held-out language is out of training, of the dev evaluation and of the dev objective.
    assert "gn" not in run.data.languages + run.data.dev_languages + run.data.low_resource
    assert run.data.languages == ["de", "es", "ay", "qu"]
    swept = {knob for knob, bounds in vars(sweep_config(cfg, arm, "minilm-en").search).items() if bounds}
    assert swept == set(ARMS[arm].knobs) and "lr" in swept
    assert ("sinkhorn_reg" in swept) == bool(weights.ot) and ("temperature" in swept) == bool(weights.contrastive)


def test_the_image_pivot_arm_trains_on_other_descriptions_and_leaves_the_other_arms_as_they_were(tmp_path):
    pivot_table = str(SAMPLE_DIR / "val_english_captions.parquet")  # five English descriptions per image
    cfg = experiment_config(tmp_path, pivot_train=[pivot_table], arms=["none", "contrastive", "pivot-contrastive"],
                            chosen_teacher_arms=["pivot-contrastive"], teachers=["student-init", "minilm-en"])
    pivot = arm_config(cfg, "pivot-contrastive", "minilm-en", seed=0)
    assert pivot.data.pairing == "image_pivot" and pivot.data.train == [*cfg.distill.data.train, pivot_table]
    plain = arm_config(cfg, "contrastive", "minilm-en", seed=0)
    assert plain.data.pairing == "translation" and plain.data.train == cfg.distill.data.train
    assert config_key(training_fields(plain)) == config_key(training_fields(
        arm_config(experiment_config(tmp_path), "contrastive", "minilm-en", seed=0)))  # its records are still found
    with pytest.raises(ConfigError, match="chosen_teacher_arms names ot, not among the arms"):
        experiment_config(tmp_path, chosen_teacher_arms=["ot"], arms=["none", "mse"])


def test_the_untrained_arm_has_no_config(tmp_path):
    with pytest.raises(ValueError, match="not trained"):
        arm_config(experiment_config(tmp_path), "none", "student-init", 0)


def test_held_out_language_never_reaches_the_training_stream(tmp_path):
    run = arm_config(experiment_config(tmp_path), "ot+contrastive", "student-init", 0)
    pairs = load_bitext(run)
    assert pairs.num_rows > 0 and not pc.any(pc.equal(pairs["lang"], "gn")).as_py()
    assert set(pc.unique(pairs["lang"]).to_pylist()) == {"de", "es", "ay", "qu"}


def test_run_keys_follow_the_training_config_not_where_it_is_written(tmp_path):
    cfg = experiment_config(tmp_path)
    a = arm_config(cfg, "mse", "student-init", 0)
    elsewhere = arm_config(experiment_config(tmp_path / "other"), "mse", "student-init", 0)
    assert config_key(training_fields(a)) == config_key(training_fields(elsewhere))
    assert config_key(training_fields(a)) != config_key(training_fields(arm_config(cfg, "mse", "student-init", 1)))


def test_ranks_round_trip_through_a_record():
    ranks = np.array([1, 3, np.inf, 1071, 2], dtype=float)
    np.testing.assert_array_equal(unpack_ranks(json.loads(json.dumps(pack_ranks(ranks)))), ranks)


def test_experiment_end_to_end_then_resumes_without_training(ray_cluster, tiny_model_dir, tiny_teacher_dir, tmp_path,
                                                               monkeypatch, caplog, capsys):
    caplog.set_level(logging.INFO, logger="optical_ray.research.runner")
    cfg = load_config(ExperimentConfig, {
        "out_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"), "bootstrap": 50,
        "arms": ["none", "ot+contrastive"], "seeds": [0], "teachers": [str(tiny_teacher_dir), "task-trained"],
        "teacher_training": {"student": str(tiny_model_dir), "steps": 2, "batch_size": 8, "max_length": 32,
                             "test_sets": [{"name": "val_again", "data": [str(SAMPLE_DIR / "val_english_captions.parquet")]}]},
        "retune_for_teacher": True, "held_out_languages": ["gn"],
        "curve": {"arms": ["ot+contrastive"], "steps": 4, "every": 2, "seed": 1},  # not a swept seed
        "distill": {"student": str(tiny_model_dir), "steps": 2, "batch_size": 8, "max_length": 32,
                    "data": {"dev_languages": ["de", "qu"], "low_resource": ["qu"]},
                    "ray": {"num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1}},
        "sweep": {"num_samples": 1, "scheduler": "fifo", "max_concurrent_trials": 1, "cpus_per_trial": 0.5,
                  "search": {"lr": [1e-5, 1e-4], "ot_weight": [0.5, 2.0]}},
        "test_sets": [{"name": "sample_2018", "data": [str(SAMPLE_DIR / "test_2018_captions.parquet")],
                       "query_langs": ["de", "es", "ay", "gn", "qu"],
                       "groups": {"high": ["de", "es"], "trained_low": ["ay", "qu"], "held_out_low": ["gn"]},
                       "gaps": {"trained_low": ["high", "trained_low"], "held_out_low": ["high", "held_out_low"]}}],
    })
    import optical_ray.research.runner
    from optical_ray.research.runner import run_experiment

    # Tiny random teachers score by chance on dev, and the baseline happens to win: the task-trained one is
    # made the choice so that the path a real run takes (every arm swept and run again) runs here too.
    real_choice = optical_ray.research.runner.choose_teacher
    monkeypatch.setattr(optical_ray.research.runner, "choose_teacher",
                        lambda cfg, candidates, runs: (c := real_choice(cfg, candidates, runs)) and {**c, "chosen": candidates[-1]})
    results = run_experiment(cfg, verbose=False)  # as the CLI runs it: a bar of trials, not Tune's tables
    out = tmp_path / "results"
    assert "Trial status" not in capsys.readouterr().out
    # Hours-long runs say what they start and where each record went.
    assert any(m.startswith("ot+contrastive seed 0 (teacher ") and "training and evaluating" in m for m in caplog.messages)
    assert any(m.startswith("ot+contrastive seed 0: recorded in ") and m.endswith(" min") for m in caplog.messages)
    saved = json.loads((out / "results.json").read_text())
    # The task-trained teacher: trained on Ray Train, its before/after on the dev and test sets recorded.
    [teacher_record] = [json.loads(p.read_text()) for p in (out / "teachers").glob("teacher-*.json")]
    assert set(teacher_record["report"]["sets"]) == {"dev", "val_again"}
    dev = teacher_record["report"]["sets"]["dev"]
    assert dev["n_queries"] == 1500 and dev["n_images"] == 300  # each dev caption vs the other four of its image
    lo, hi = dev["change_R@1_ci95"]
    assert lo <= dev["after"]["R@1"] - dev["before"]["R@1"] <= hi
    # The choice on dev: one MSE run per candidate, the best objective wins.
    choice = saved["teacher_choice"]
    candidates = [str(tiny_teacher_dir), teacher_record["model"]]
    assert list(choice["dev_scores"]) == candidates and choice["chosen"] == teacher_record["model"]
    # The choice runs differ only in their teacher: compared on the test sets whichever teacher is chosen.
    by_teacher = choice["vs_baseline"]["sample_2018"][teacher_record["model"]]["trained_low"]
    lo, hi = by_teacher["change_ci95"]
    assert lo <= by_teacher["other"] - by_teacher["baseline"] <= hi
    assert set(by_teacher["r1"]) == {"high", "trained_low"}  # whether the gap moved from below or from above
    report = (out / "RESULTS.md").read_text()
    assert "The choice runs on the test sets" in report
    assert "| sample_2018 | task-trained | trained_low |" in report  # named for what it is, not its folder
    records = sorted(p.name for p in (out / "runs").glob("*.json"))
    mse_choice_runs = [r for r in records if r.startswith("mse-seed0-")]
    ot_runs = [r for r in records if r.startswith("ot-contrastive-seed0-")]
    assert len(mse_choice_runs) == 2 and len(records) == 1 + 2 + len(ot_runs)
    # Every arm swept and run again with the chosen teacher, compared gap by gap with the baseline's.
    sweeps = [json.loads(p.read_text()) for p in (out / "sweeps").glob("ot-contrastive-*.json")]
    assert len(ot_runs) == 2 and saved["chosen_teacher"]["teacher"] == choice["chosen"]
    assert sorted(s["teacher"] for s in sweeps) == sorted([str(tiny_teacher_dir), choice["chosen"]])
    change = saved["chosen_teacher"]["vs_baseline"]["sample_2018"]["ot+contrastive"]["trained_low"]
    lo, hi = change["change_ci95"]
    assert lo <= change["other"] - change["baseline"] <= hi
    [retuned] = [s["params"] for s in sweeps if s["teacher"] == choice["chosen"]]
    assert saved["chosen_teacher"]["arms"]["ot+contrastive"]["params"] == retuned  # its runs used its own sweep
    knobs = (out / "RESULTS.md").read_text().split("Each arm swept again under it")[1]
    assert "| (3) OT + contrastive | lr, sinkhorn_reg, temperature, ot_weight | " + ", ".join(
        f"{k} {v:.3g}" for k, v in retuned.items()) in knobs
    assert not (tmp_path / "runs" / "arms" / "ot-contrastive-seed0").exists()  # the student is gone once recorded
    assert not (tmp_path / "runs" / "ray" / "ot-contrastive-seed0").exists()  # and its checkpoints
    assert not list((tmp_path / "runs" / "ray").glob("teacher-*"))  # the teacher's too; its model stays
    assert not list((tmp_path / "runs" / "tune").glob("*"))  # and the sweeps' trials, their record kept
    assert not list((out / "trial-logs").glob("*"))  # and their trial logs, kept only until the record is
    assert saved["status"]["complete"] and saved["status"]["runs"] == len(records)
    assert "the experiment complete" in (out / "RESULTS.md").read_text()
    # The curve: one 4-step run, both kept checkpoints evaluated, only the last one left on disk.
    curve = saved["curves"]["sample_2018"]["ot+contrastive"]
    assert [(p["step"], p["pairs"]) for p in curve] == [(0, 0), (2, 16), (4, 32)]  # 0: the undistilled student
    sample = saved["tests"]["sample_2018"]
    assert curve[0]["r1"] == pytest.approx({group: group_r1(sample["arms"]["none"], langs)
                                            for group, langs in sample["groups"].items()})
    lo, hi = curve[-1]["gaps"]["held_out_low"]["ci95"]
    assert lo <= curve[-1]["gaps"]["held_out_low"]["value"] <= hi
    assert curve[-1]["gaps"]["held_out_low"]["value"] == pytest.approx(
        curve[-1]["r1"]["high"] - curve[-1]["r1"]["held_out_low"])
    assert saved["curve_teacher"] == choice["chosen"]  # the teacher the knobs were swept under
    assert saved["curve_seed"] == 1 and "the arm's swept knobs, seed 1)" in (out / "RESULTS.md").read_text()
    [storage] = (tmp_path / "runs" / "ray").glob("curve-ot-contrastive-seed1-*")
    assert sorted(p.name for p in storage.glob("step_*")) == ["step_0000004"]
    longer = saved["at_curve_length"]["sample_2018"]  # the answer's comparisons again at the curve's last step
    assert longer["step"] == 4 and list(longer["gaps"]["trained_low"]) == ["ot+contrastive/none"]
    assert "## The answer at 2 and at 4 steps" in (out / "RESULTS.md").read_text()
    assert (out / "gap_vs_pairs.png").stat().st_size > 0 and "## How the gap moves with training length" in (
        out / "RESULTS.md").read_text()
    assert set(saved["arms"]["ot+contrastive"]["params"]) == set(ARMS["ot+contrastive"].knobs)
    test = saved["tests"]["sample_2018"]
    for arm in ("none", "ot+contrastive"):
        gap = test["arms"][arm]["gaps"]["held_out_low"]
        assert gap["upper"] == ["de", "es"] and gap["lower"] == ["gn"]
        lo, hi = gap["abs"]["ci95"]
        assert lo <= gap["abs"]["value"] <= hi and test["arms"][arm]["languages"]["gn"]["n_queries"] == 1071
    lo, hi = test["arms"]["ot+contrastive"]["gaps"]["trained_low"]["abs"]["diff_ci95"]["none"]
    assert lo <= hi
    text = (out / "RESULTS.md").read_text()
    assert "**sample_2018** (translation), gap `trained_low`" in text and "(3) OT + contrastive" in text
    assert (out / "r1_by_arm.png").stat().st_size > 0 and (out / "gap_by_arm.png").stat().st_size > 0

    # A second call finds every run and sweep recorded: nothing is trained again.

    def refuse(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(optical_ray.research.runner, "run_training", refuse)
    monkeypatch.setattr(optical_ray.research.runner, "run_sweep", refuse)
    caplog.clear()
    again = run_experiment(cfg)
    assert again["tests"] == json.loads(json.dumps(results["tests"]))
    assert any(m.startswith("ot+contrastive seed 0: recorded in ") and m.endswith(", skipped") for m in caplog.messages)

    # --report-only: the results of what is recorded, nothing trained or evaluated, even with runs missing.
    import shutil

    monkeypatch.setattr(optical_ray.research.runner, "evaluate_model", refuse)
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    [baseline_run] = [p for p in (partial / "runs").glob("ot-contrastive-seed0-*.json")
                      if json.loads(p.read_text())["teacher"] == str(tiny_teacher_dir)]
    baseline_run.unlink()
    reported = run_experiment(cfg.model_copy(update={"results_dir": str(partial)}), recorded_only=True)
    assert reported["status"]["runs"] == saved["status"]["runs"] - 1 and not reported["status"]["complete"]
    assert reported["status"]["pending"][0] == "the baseline teacher's arms and seeds (1 of 2 runs)"
    assert "ot+contrastive" not in reported["tests"]["sample_2018"]["arms"]
    assert reported["tests"]["sample_2018"]["arms"]["none"]["languages"] == saved["tests"]["sample_2018"]["arms"]["none"]["languages"]


def test_the_committed_sweep_records_are_still_found_by_their_keys():
    """A change to the configs' schema must not orphan finished work: every committed sweep record of
    configs/experiment.yaml is found under the key this code computes for it (so a rerun skips it)."""
    from optical_ray.research.plan import check_sweep_config, sweep_key

    cfg, records, _ = committed("sweeps/*.json")
    for path in records:
        record = json.loads(path.read_text())
        check = path.name.startswith("check-")  # a tuning-check sweep: its own searcher seed, lr range and trials
        sweep = (check_sweep_config if check else sweep_config)(cfg, record["arm"], record["teacher"])
        assert path.name == f"{'check-' if check else ''}{record['arm'].replace('+', '-')}-{sweep_key(sweep)}.json"


def committed(pattern: str):
    """configs/experiment.yaml's committed records matching ``pattern`` (skips without any) and a runner
    that computes their keys."""
    from optical_ray.research.runner import Runner, TestData

    cfg = load_config(ExperimentConfig, REPO / "configs" / "experiment.yaml")
    records = sorted((REPO / cfg.results_dir).glob(pattern))
    if not records:
        pytest.skip(f"nothing recorded yet in {pattern}")
    return cfg, records, Runner(cfg, [TestData(spec, captions=None, query_images={}) for spec in cfg.test_sets])


def test_the_committed_run_records_are_still_found_by_their_keys():
    """Like the sweeps: every committed run record of configs/experiment.yaml is where this code looks."""
    _, records, runner = committed("runs/*-seed*.json")
    for path in records:
        record = json.loads(path.read_text())
        assert runner.run_config(record["arm"], record["seed"], record["teacher"], record["params"])[2].name == path.name


def test_knobs_one_ulp_from_a_recorded_runs_take_its_exact_values(tmp_path):
    """A sweep drawn again can land one ulp away from the knobs a run was recorded with: the run is still
    found. Knobs that really differ, or the same knobs under another teacher, are not mapped onto it."""
    from optical_ray.research.runner import Runner, write_record

    runner = Runner(experiment_config(tmp_path), [])
    recorded = {"temperature": 0.24083618651648225, "lr": 7.700029501048744e-05}
    _, key, path = runner.run_config("mse+contrastive", 0, "teacher-a", recorded)
    write_record(path, {"arm": "mse+contrastive", "seed": 0, "key": key, "teacher": "teacher-a", "params": recorded})

    one_ulp = {**recorded, "lr": float(np.nextafter(recorded["lr"], 1.0))}
    assert runner.run_config("mse+contrastive", 0, "teacher-a", one_ulp)[2] != path
    assert runner.settled("mse+contrastive", "teacher-a", one_ulp) == recorded
    assert runner.run_config("mse+contrastive", 1, "teacher-a", runner.settled("mse+contrastive", "teacher-a", one_ulp))[1] \
        == runner.run_config("mse+contrastive", 1, "teacher-a", recorded)[1]  # the other seeds share them
    other = {**recorded, "lr": recorded["lr"] * (1 + 1e-9)}
    assert runner.settled("mse+contrastive", "teacher-a", other) == other
    assert runner.settled("mse+contrastive", "teacher-b", one_ulp) == one_ulp
    assert runner.settled("contrastive", "teacher-a", one_ulp) == one_ulp


def test_every_committed_sweep_finds_its_arms_committed_first_seed_run():
    """The mechanism above on the real records: each committed sweep's knobs, settled, lead to the
    committed first-seed run of its arm under its teacher (one of them differs from its run by one ulp).
    A sweep whose arm has no run under its teacher yet is the experiment between two records (it commits
    each as it lands); tuning-check sweeps lead to runs only where they won, and are checked elsewhere."""
    cfg, sweeps, runner = committed("sweeps/*.json")
    for path in sweeps:
        sweep = json.loads(path.read_text())
        runs = [json.loads(p.read_text()) for p in (REPO / cfg.results_dir / "runs").glob(
            f"{sweep['arm'].replace('+', '-')}-seed*.json")]
        if path.name.startswith("check-") or not any(r.get("teacher") == sweep["teacher"] for r in runs):
            continue
        params = runner.settled(sweep["arm"], sweep["teacher"], sweep["params"])
        assert runner.run_config(sweep["arm"], cfg.seeds[0], sweep["teacher"], params)[2].exists(), path.name


def test_the_committed_teacher_record_is_found_by_its_key_in_any_checkout():
    """The task teacher took 84 min to train: its record must be found wherever the repository is cloned
    (keys name the bundled tables as ${sample_data}/..., not by this checkout's folder)."""
    from optical_ray.config import ExperimentConfig
    from optical_ray.research.runner import Runner

    cfg = load_config(ExperimentConfig, REPO / "configs" / "experiment.yaml")
    records = sorted((REPO / cfg.results_dir / "teachers").glob("*.json"))
    if not records:
        pytest.skip("no teacher recorded yet")
    _, key, path = Runner(cfg, []).teacher_config()
    assert [p.name for p in records] == [path.name]
    assert json.loads(records[0].read_text())["key"] == key


def test_a_recorded_teacher_whose_model_is_gone_is_trained_again_and_checked_against_its_record(
        ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    """A new machine keeps the committed records but not out_dir: the teacher is trained again from its
    record and must score as recorded on dev, or the runs made with the first one would be mixed with
    runs of another teacher."""
    import shutil

    import optical_ray.research.runner
    import optical_ray.teacher
    from optical_ray.research.runner import Runner

    cfg = experiment_config(tmp_path, teachers=["student-init", "task-trained"], teacher_training={
        "student": str(tiny_model_dir), "steps": 2, "batch_size": 8, "max_length": 32})
    runner = Runner(cfg, [])
    first = runner.task_teacher()
    teacher_cfg, _, path = runner.teacher_config()
    assert "rebuilds" not in first and len(first["report"]["sets"]) == 1  # dev only: no test set configured

    def no_report(*args, **kwargs):
        raise AssertionError("a rebuild is checked on dev alone, without the before/after report")

    monkeypatch.setattr(optical_ray.teacher, "before_and_after", no_report)
    shutil.rmtree(teacher_cfg.output_dir)
    older = {k: v for k, v in first.items() if k != "machine"}  # written before records named their machine
    path.write_text(json.dumps(older))
    again = runner.task_teacher()
    [rebuild] = again["rebuilds"]
    assert "machine" not in again and rebuild["machine"]["cpus"] == os.cpu_count()  # the rebuild's, not the first's
    assert rebuild["dev_R@1"] == pytest.approx(first["report"]["sets"]["dev"]["after"]["R@1"], abs=1e-9)
    assert json.loads(path.read_text()) == again and again["report"] == first["report"]
    assert runner.task_teacher() == again  # the model is back: nothing trained

    # A rebuild that lands elsewhere on dev is another teacher: refused, the record left as it was. (The
    # rebuild is the model just trained, kept aside: a third training would check nothing more.)
    recorded = json.loads(path.read_text())
    recorded["report"]["sets"]["dev"]["after"]["R@1"] += 0.05
    path.write_text(json.dumps(recorded))
    kept = shutil.copytree(Path(teacher_cfg.output_dir) / "student", tmp_path / "kept")
    shutil.rmtree(teacher_cfg.output_dir)
    monkeypatch.setattr(optical_ray.research.runner, "run_training", lambda cfg: kept)
    with pytest.raises(RuntimeError, match=r"another teacher.*Delete the record"):
        runner.task_teacher()
    assert json.loads(path.read_text()) == recorded


def test_teacher_comparison_is_paired_over_images_and_computed_by_hand():
    from optical_ray.config import TestSet
    from optical_ray.research.runner import TestData
    from optical_ray.research.stats import compare_teachers

    spec = TestSet(name="t", query_langs=["de", "qu"], groups={"high": ["de"], "low": ["qu"]}, gaps={"low": ["high", "low"]})
    images = np.array(["a", "b", "c", "d"])
    test = TestData(spec, captions=None, query_images={"de": images, "qu": images})

    def record(de, qu):
        return {"arm": "mse", "seed": 0, "tests": {"t": {"de": pack_ranks(np.array(de, float)),
                                                           "qu": pack_ranks(np.array(qu, float))}}}

    frozen = [record([1, 1, 1, 2], [1, 3, 2, np.inf])]   # de 0.75, qu 0.25: gap 0.50
    task = [record([1, 1, 1, 1], [1, 1, 2, 5])]           # de 1.00, qu 0.50: gap 0.50
    better = [record([1, 1, 1, 2], [1, 1, 1, 4])]         # de 0.75, qu 0.75: gap 0.00
    same = compare_teachers(test, frozen, task, ["mse"], n_resamples=200)["mse"]["low"]
    assert same["baseline"] == pytest.approx(0.5) and same["other"] == pytest.approx(0.5)
    narrower = compare_teachers(test, frozen, better, ["mse"], n_resamples=200)["mse"]["low"]
    assert narrower["other"] - narrower["baseline"] == pytest.approx(-0.5)
    assert narrower["r1"] == {"high": pytest.approx({"baseline": 0.75, "other": 0.75}),
                              "low": pytest.approx({"baseline": 0.25, "other": 0.75})}  # closed from below
    # Paired: both systems differ only on images b and c, where the gap drops by 1 each, so every
    # resample's change is -(draws of b and c) / 4 <= 0 -- never positive, as an unpaired draw could be.
    lo, hi = narrower["change_ci95"]
    assert -1.0 <= lo <= -0.5 <= hi <= 0.0
    assert compare_teachers(test, frozen, frozen, ["mse"], n_resamples=50)["mse"]["low"]["change_ci95"] == [0.0, 0.0]
    # While the other teacher's seeds land, it is compared with the baseline's same seeds only.
    seed1 = {**record([1, 1, 1, 1], [1, 1, 1, 1]), "seed": 1}     # gap 0.00: would halve the baseline's mean
    partial = compare_teachers(test, frozen + [seed1], better, ["mse"], n_resamples=50)["mse"]["low"]
    assert partial["seeds"] == [0] and partial["baseline"] == pytest.approx(0.5)
    assert compare_teachers(test, [seed1], better, ["mse"], n_resamples=50) == {}  # no seed in common


def test_the_answer_says_whether_a_gap_closed_from_below_or_from_above():
    """A gap that narrows because the high group got worse must not read like a gain: the answer gives
    each group's R@1 change beside the gap's (hand-computed case)."""
    from optical_ray.config import TestSet
    from optical_ray.research.report import answer_lines
    from optical_ray.research.runner import TestData
    from optical_ray.research.stats import summarize_test

    spec = TestSet(name="t", query_langs=["de", "qu"], groups={"high": ["de"], "low": ["qu"]}, gaps={"low": ["high", "low"]})
    images = np.array(["a", "b", "c", "d"])
    test = TestData(spec, captions=None, query_images={"de": images, "qu": images})

    def record(arm, de, qu):
        return {"arm": arm, "seed": 0, "tests": {"t": {"de": pack_ranks(np.array(de, float)),
                                                         "qu": pack_ranks(np.array(qu, float))}}}

    records = [record("none", [1, 1, 1, 2], [1, 3, 2, np.inf]),  # de 0.75, qu 0.25: gap 0.50
               record("mse", [1, 1, 2, 2], [1, 3, 2, np.inf]),   # de 0.50, qu 0.25: gap 0.25, high fell
               record("ot", [1, 1, 1, 2], [1, 1, 2, np.inf])]    # de 0.75, qu 0.50: gap 0.25, low rose
    lines = answer_lines({"tests": {"t": summarize_test(test, records, ["none", "mse", "ot"], n_resamples=200)}})
    assert len(lines) == 1 and "gap `low` (de − qu) = 0.500 without distillation" in lines[0]
    assert "(1) MSE 0.250 (-0.250; R@1 high -0.250, low +0.000)" in lines[0]
    assert "(2) OT 0.250 (-0.250; R@1 high +0.000, low +0.250)" in lines[0]


def test_what_ot_adds_to_contrastive_is_stated_under_every_teacher():
    """Adding OT to contrastive can help under one teacher and hurt under another: the answer gives the
    change for the baseline teacher's arms and for the chosen teacher's (hand-computed case)."""
    from optical_ray.config import TestSet
    from optical_ray.research.report import answer_lines
    from optical_ray.research.runner import TestData
    from optical_ray.research.stats import summarize_test

    spec = TestSet(name="t", query_langs=["de", "qu"], groups={"high": ["de"], "low": ["qu"]}, gaps={"low": ["high", "low"]})
    images = np.array(["a", "b", "c", "d"])
    test = TestData(spec, captions=None, query_images={"de": images, "qu": images})

    def record(arm, qu):
        return {"arm": arm, "seed": 0, "tests": {"t": {"de": pack_ranks(np.ones(4)), "qu": pack_ranks(np.array(qu, float))}}}

    arms = ["none", "contrastive", "ot+contrastive"]
    frozen = summarize_test(test, [record("none", [2, 2, 2, 2]), record("contrastive", [1, 2, 2, 2]),
                                   record("ot+contrastive", [1, 1, 2, 2])], arms, n_resamples=200)   # OT: gap -0.25
    task = summarize_test(test, [record("none", [2, 2, 2, 2]), record("contrastive", [1, 1, 1, 2]),
                                 record("ot+contrastive", [1, 2, 2, 2])], arms, n_resamples=200)     # OT: gap +0.50
    lines = answer_lines({"tests": {"t": frozen}, "teacher_choice": {"task_trained": {"model": "runs/teacher"}},
                          "chosen_teacher": {"teacher": "runs/teacher", "tests": {"t": task}}})
    added = [line for line in lines if "OT added to contrastive" in line]
    assert len(added) == 2
    assert "(t): gap change `low` -0.250 [" in added[0]
    assert "(t, the task-trained teacher): gap change `low` +0.500 [" in added[1]


def test_each_stated_change_is_checked_again_at_the_curves_length(tmp_path):
    """The answer at the arms' length and at the curves': the same comparisons from the curves' last
    checkpoint (paired on images, one seed), and whether each holds at both (hand-computed case)."""
    from optical_ray.config import TestSet
    from optical_ray.research.report import length_markdown
    from optical_ray.research.runner import TestData
    from optical_ray.research.stats import curve_changes, summarize_test

    spec = TestSet(name="t", query_langs=["de", "qu"], groups={"high": ["de"], "low": ["qu"]}, gaps={"low": ["high", "low"]})
    images = np.array(["a", "b", "c", "d"])
    test = TestData(spec, captions=None, query_images={"de": images, "qu": images})

    def ranks(qu):
        return {"t": {"de": pack_ranks(np.ones(4)), "qu": pack_ranks(np.array(qu, float))}}

    none = {"arm": "none", "seed": 0, "tests": ranks([2, 2, 2, 2])}                       # gap 1.00
    short = summarize_test(test, [none, {"arm": "mse", "seed": 0, "tests": ranks([2, 2, 2, 2])},     # gap 1.00
                                  {"arm": "contrastive", "seed": 0, "tests": ranks([1, 2, 2, 2])},  # gap 0.75
                                  {"arm": "ot+contrastive", "seed": 0, "tests": ranks([1, 1, 1, 1])}],  # gap 0.00
                           ["none", "mse", "contrastive", "ot+contrastive"], n_resamples=200)
    curves = [{"arm": "mse", "seed": 0, "batch_size": 8, "points": {"2": ranks([2, 2, 2, 2]), "4": ranks([1, 1, 1, 1])}},
              {"arm": "ot+contrastive", "seed": 0, "batch_size": 8, "points": {"2": ranks([1, 1, 1, 1]), "4": ranks([1, 1, 1, 1])}},
              {"arm": "contrastive", "seed": 0, "batch_size": 8, "points": {"2": ranks([1, 2, 2, 2])}}]  # not at 4 yet
    longer = curve_changes(test, curves, none, n_resamples=200)
    assert longer["step"] == 4 and set(longer["gaps"]["low"]) == {"mse/none", "ot+contrastive/none", "ot+contrastive/mse"}
    assert longer["gaps"]["low"]["mse/none"] == {"change": -1.0, "ci95": [-1.0, -1.0]}  # every image moved
    assert longer["gaps"]["low"]["ot+contrastive/mse"] == {"change": 0.0, "ci95": [0.0, 0.0]}
    results = {"tests": {"t": short}, "curve_teacher": "teacher", "at_curve_length": {"t": longer}}
    cfg = experiment_config(tmp_path, distill={"steps": 2}, seeds=[0])
    rows = {line.split(" | ")[1]: line for line in length_markdown(results, cfg) if line.startswith("| low |")}
    assert "## The answer at 2 and at 4 steps" in length_markdown(results, cfg)
    # MSE narrows the gap only in the longer run; OT + contrastive narrows it more than MSE only in the
    # shorter one (after 4 steps both find everything); against no distillation it narrows it at both.
    assert rows["(1) MSE − (0) none"].endswith("| +0.000 [+0.000, +0.000] | -1.000 [-1.000, -1.000] | "
                                               "no: no clear change → narrows |")
    assert rows["(3) OT + contrastive − (1) MSE"].endswith("| -1.000 [-1.000, -1.000] | +0.000 [+0.000, +0.000] | "
                                                           "no: narrows → no clear change |")
    assert rows["(3) OT + contrastive − (0) none"].endswith("| yes: narrows |")
    assert "(4) contrastive" not in "".join(rows)  # its curve has not reached the last step


def test_the_committed_results_md_is_what_the_report_writes_from_results_json():
    """RESULTS.md is generated, never edited by hand: from the committed results.json the report code
    writes it again byte for byte (so a refactor of the report shows up here as a diff)."""
    import json

    from optical_ray.research.report import results_markdown

    cfg = load_config(ExperimentConfig, REPO / "configs" / "experiment.yaml")
    folder = REPO / cfg.results_dir
    if not (folder / "results.json").exists():
        pytest.skip("no committed results.json")
    results = json.loads((folder / "results.json").read_text())
    assert results_markdown(results, cfg) == (folder / "RESULTS.md").read_text()


def test_the_teacher_with_the_best_dev_objective_is_chosen_once_every_candidate_has_run(tmp_path):
    from optical_ray.research.runner import choose_teacher

    cfg = experiment_config(tmp_path, teachers=["a", "b", "c"])  # objective low_r1, not the mean or the gap
    runs = {"a": {"dev": {"dev_r1_low": 0.3, "dev_r1_mean": 0.9, "dev_gap": 0.1}},
            "b": {"dev": {"dev_r1_low": 0.35, "dev_r1_mean": 0.5, "dev_gap": 0.5}}}
    assert choose_teacher(cfg, ["a", "b", "c"], runs) == {}  # c has not run yet
    runs["c"] = {"dev": {"dev_r1_low": 0.2, "dev_r1_mean": 0.6, "dev_gap": 0.0}}
    assert choose_teacher(cfg, ["a", "b", "c"], runs) == {"chosen": "b", "dev_scores": {"a": 0.3, "b": 0.35, "c": 0.2}}


def test_the_status_says_what_is_in_and_what_is_still_to_run(tmp_path):
    from optical_ray.research.report import run_status, status_line
    from optical_ray.research.runner import Teacher

    cfg = experiment_config(tmp_path, arms=["none", "mse", "ot"], seeds=[0, 1], teachers=["student-init", "minilm-en"],
                            curve={"arms": ["mse"], "steps": 40, "every": 20})
    untrained = [{"arm": "none"}]
    baseline = Teacher("student-init", {}, records=[{"arm": "mse"}] * 3)
    status = run_status(cfg, untrained, {"student-init": baseline}, {}, {}, [])
    assert status["runs"] == 4 and not status["complete"]
    assert "**partial**" in status_line(status) and "(4 of 5 runs)" in status_line(status)

    baseline.records.append({"arm": "ot"})
    choice_runs = {"student-init": {"arm": "mse"}}
    status = run_status(cfg, untrained, {"student-init": baseline}, {}, choice_runs, [])
    assert status["runs"] == 6  # the choice runs count too
    assert "**partial**" not in status_line(status) and "the teacher choice on dev (1 of 2 candidate runs)" in status_line(status)

    choice_runs["minilm-en"] = {"arm": "mse"}
    chosen = Teacher("minilm-en", {"mse": {"params": {}}}, records=[{"arm": "mse"}])  # ot not swept again yet
    runs, choice = {"student-init": baseline, "minilm-en": chosen}, {"chosen": "minilm-en"}
    status = run_status(cfg, untrained, runs, choice, choice_runs, [{"points": {"20": {}}}])
    assert status["runs"] == 8
    assert status["pending"] == ["every arm and seed with the chosen teacher (1 of 2 sweeps, 1 of 4 runs)",
                                 "the training-length curves (1 of 2 points)"]

    chosen.records += [{"arm": "ot"}] * 3
    status = run_status(cfg, untrained, runs, choice, choice_runs, [{"points": {"20": {}, "40": {}}}])
    assert status["complete"] and status_line(status) == "Status: 11 runs recorded, the experiment complete."

    # The tuning check, one arm's sweep cut short: its trial log says how far it came.
    cfg.tuning_check = load_config(ExperimentConfig, {"tuning_check": {"num_samples": 8, "lr": [1e-5, 3e-4]}}).tuning_check
    log = tmp_path / "results" / "trial-logs" / "check-mse-0123.json"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"terms": {}, "trials": {"a": {"row": {}}, "b": {"row": {}}, "c": {"reports": []}}}))
    status = run_status(cfg, untrained, runs, choice, choice_runs, [{"points": {"20": {}, "40": {}}}])
    assert status["pending"] == ["the tuning check (0 of 2 arms; check sweeps cut short: 1, their finished trials logged: 2)"]


def test_holm_within_each_family_of_reported_changes():
    """Three arms against no distillation form one family: Holm's adjusted p-values by hand
    (0.01, 0.04, 0.03 -> 0.03, 0.06, 0.06), and each change says what survives which level."""
    from optical_ray.research.stats import families

    def gap(value, p=None, ci=(-0.1, -0.01), ci_images=(-0.1, -0.02)):
        g = {"value": value, "diff_p": {}, "diff_ci95": {}, "diff_ci95_images": {}}
        if p is not None:
            g.update(diff_p={"none": p}, diff_ci95={"none": list(ci)}, diff_ci95_images={"none": list(ci_images)})
        return {"gaps": {"low": {"abs": g}}}

    results = {"teacher": "student-init", "tests": {"t": {"arms": {
        "none": gap(0.5), "mse": gap(0.4, 0.01), "ot": gap(0.45, 0.04, ci=(-0.1, 0.01)), "contrastive": gap(0.42, 0.03)}}}}
    family = families(results)["vs_none/student-init"]
    assert [c["arm"] for c in family] == ["mse", "ot", "contrastive"]
    assert [c["p_holm"] for c in family] == pytest.approx([0.03, 0.06, 0.06])
    assert [c["clear_holm"] for c in family] == ["smaller", "unclear", "unclear"]
    assert [c["clear_seeds"] for c in family] == ["smaller", "unclear", "smaller"]
    assert all(c["clear_images"] == "smaller" for c in family)
    assert family[0]["change"] == pytest.approx(-0.1)

    # The comparisons between arms that the answer states are families of their own: the family of
    # every arm against no distillation keeps its adjusted p-values.
    combined = gap(0.38, 0.02)["gaps"]["low"]["abs"]
    for against, p in (("contrastive", 0.01), ("mse", 0.2)):
        combined["diff_p"][against], combined["diff_ci95"][against] = p, [-0.06, -0.01]
        combined["diff_ci95_images"][against] = [-0.05, -0.02]
    results["tests"]["t"]["arms"]["ot+contrastive"] = {"gaps": {"low": {"abs": combined}}}
    found = families(results)
    assert list(found) == ["vs_none/student-init", "ot_added/student-init", "ot_contrastive_vs_mse/student-init"]
    assert [(c["arm"], c["against"], c["p_holm"]) for c in found["ot_added/student-init"]] == [
        ("ot+contrastive", "contrastive", 0.01)]
    assert found["ot_contrastive_vs_mse/student-init"][0]["change"] == pytest.approx(0.38 - 0.4)
    assert [c["p_holm"] for c in found["vs_none/student-init"]] == pytest.approx([0.04, 0.06, 0.06, 0.06])


def test_chosen_teacher_arms_run_with_the_chosen_teacher_only(tmp_path, monkeypatch):
    """The runner's order, without training: the baseline teacher's arms, the choice, then every arm with
    the chosen teacher -- including the arms that run with it only."""
    from optical_ray.research import runner

    cfg = experiment_config(tmp_path, arms=["none", "contrastive", "pivot-contrastive"], seeds=[0],
                            teachers=["student-init", "minilm-en"], chosen_teacher_arms=["pivot-contrastive"])
    trained = []
    monkeypatch.setattr(runner, "load_test_sets", lambda cfg: [])
    monkeypatch.setattr(runner, "write_results", lambda *args, **kwargs: {})
    monkeypatch.setattr(runner.Runner, "untrained", lambda self: {"arm": "none"})
    monkeypatch.setattr(runner.Runner, "sweep", lambda self, arm, teacher: {"params": {}, "trials": []})
    monkeypatch.setattr(runner.Runner, "settled", lambda self, arm, teacher, params: params)

    def train(self, arm, seed, teacher, params):
        trained.append((arm, teacher))
        return {"arm": arm, "seed": seed, "teacher": teacher, "dev": {"dev_r1_low": 0.5 if teacher == "minilm-en" else 0.1}}

    monkeypatch.setattr(runner.Runner, "trained", train)
    runner.run_experiment(cfg)
    assert trained == [("contrastive", "student-init"), ("mse", "student-init"), ("mse", "minilm-en"),
                       ("contrastive", "minilm-en"), ("pivot-contrastive", "minilm-en")]


def test_the_tuning_check_reruns_only_an_arm_its_second_sweep_clearly_beats(tmp_path, monkeypatch):
    """Under the chosen teacher each arm is swept again with a searcher seed of its own and the check's
    lr range; only the arm whose best trial beats its runs' dev objective by more than their seed sd is
    rerun, with the check's knobs."""
    from optical_ray.research import runner
    from optical_ray.research.plan import check_sweep_config

    cfg = experiment_config(tmp_path, arms=["none", "mse", "contrastive"], seeds=[0, 1],
                            tuning_check={"num_samples": 8, "lr": [1e-5, 3e-4]})
    check = check_sweep_config(cfg, "mse", "student-init")
    assert check.num_samples == 8 and check.search.lr == [1e-5, 3e-4] and check.seed != cfg.sweep.seed
    assert check.seed != check_sweep_config(cfg, "contrastive", "student-init").seed

    dev = {("mse", 0): 0.40, ("mse", 1): 0.42, ("contrastive", 0): 0.50, ("contrastive", 1): 0.60}
    best = {"mse": 0.45, "contrastive": 0.58}  # mse: +0.04 > sd 0.014, rerun; contrastive: +0.03 < sd 0.071
    trained = []
    monkeypatch.setattr(runner, "load_test_sets", lambda cfg: [])
    monkeypatch.setattr(runner, "write_results", lambda *args, **kwargs: {})
    monkeypatch.setattr(runner.Runner, "untrained", lambda self: {"arm": "none"})
    monkeypatch.setattr(runner.Runner, "settled", lambda self, arm, teacher, params: params)

    def sweep(self, arm, teacher, check=False):
        trials = [{"status": "OK", "steps": cfg.distill.steps, "objective": best[arm]}] if check else []
        return {"params": {"lr": 2e-4 if check else 3e-5}, "trials": trials}

    def train(self, arm, seed, teacher, params):
        trained.append((arm, seed, params["lr"]))
        score = dev[(arm, seed)] if params["lr"] == 3e-5 else 0.5
        return {"arm": arm, "seed": seed, "teacher": teacher, "dev": {"dev_r1_low": score}}

    monkeypatch.setattr(runner.Runner, "sweep", sweep)
    monkeypatch.setattr(runner.Runner, "trained", train)
    runner.run_experiment(cfg)
    assert [t for t in trained if t[2] == 2e-4] == [("mse", 0, 2e-4), ("mse", 1, 2e-4)]
    verdict = runner.tuning_verdict(cfg, [{"dev": {"dev_r1_low": v}} for v in (0.5, 0.6)],
                                    {"trials": [{"status": "OK", "steps": 99, "objective": 0.9}]})
    assert verdict["best"] is None and not verdict["rerun"]  # a trial ASHA stopped early is not a finished one


def test_a_sweep_cut_short_leaves_its_trial_log_with_the_records_until_its_record_is_written(tmp_path, monkeypatch):
    """The session ends mid-sweep: its Ray storage goes with the machine, its trial log stays beside the
    records (to be committed); the sweep finished elsewhere says how many trials came from the log, and
    the log goes once the record holds them."""
    import pyarrow as pa

    from optical_ray.research import runner
    from optical_ray.tune import SweepResult

    cfg = experiment_config(tmp_path, arms=["none", "mse"], tuning_check={"num_samples": 8, "lr": [1e-5, 3e-4]})
    logs = []

    def cut_short(sweep, resume, verbose, trial_log):
        logs.append(trial_log)
        Path(trial_log).parent.mkdir(parents=True, exist_ok=True)
        Path(trial_log).write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_sweep", cut_short)
    with pytest.raises(KeyboardInterrupt):
        runner.Runner(cfg, []).sweep("mse", "student-init", check=True)
    [log] = logs
    assert Path(log).parent == tmp_path / "results" / "trial-logs" and Path(log).name.startswith("check-mse-")
    assert Path(log).exists()

    finished = SweepResult(trials=pa.table({"lr": [1e-4], "objective": [0.5]}), best=cfg.distill, trial_steps=200,
                           best_params={"lr": 1e-4}, replayed=1)
    monkeypatch.setattr(runner, "run_sweep", lambda sweep, resume, verbose, trial_log: finished)
    record = runner.Runner(cfg, []).sweep("mse", "student-init", check=True)
    assert record["trials_from_log"] == 1 and record["params"] == {"lr": 1e-4}
    assert not Path(log).exists() and (tmp_path / "results" / "sweeps" / (Path(log).stem + ".json")).exists()


def test_the_tuning_check_is_reported_with_its_verdict_and_the_reruns_change():
    from optical_ray.research.report import tuning_check_markdown

    results = {"tuning_check": {"student-init": {"mse": {
        "chosen": {"lr": 3.37e-5}, "params": {"lr": 2.1e-4}, "trials": 8, "dev_mean": 0.41, "dev_sd": 0.014,
        "at_edge": {"lr": {"end": "high", "range": [1e-5, 2.5e-4]}},
        "best": 0.45, "rerun": True, "rerun_seeds": [0, 1],
        "vs_chosen_knobs": {"test_2018_flickr": {"trained_low": {"baseline": 0.692, "other": 0.650,
                                                                 "change_ci95": [-0.06, -0.02]}}}}}}}
    text = "\n".join(tuning_check_markdown(results))
    assert ("| (1) MSE | lr 3.37e-05 | 0.410 ± 0.014 | 0.450 (8 trials) | lr 0.00021 (lr at the high end of "
            "[1e-05, 0.00025]) | yes (seeds rerun: 0, 1) |") in text
    assert "(1) MSE rerun with the check's knobs, test_2018_flickr: `trained_low` 0.692 → 0.650 [-0.060, -0.020]" in text
    assert tuning_check_markdown({}) == []
    results["tuning_check"]["student-init"]["mse"].update(rerun_seeds=[], vs_chosen_knobs={}, at_edge={})
    assert "| lr 0.00021 | yes (seeds rerun: none yet) |" in "\n".join(tuning_check_markdown(results))


def test_the_answer_is_restated_at_the_knobs_each_arm_has_after_the_tuning_check(tmp_path):
    """MSE rerun with the check's knobs (both seeds), contrastive kept its first knobs (no rerun), OT's
    reruns still running: the restated answer uses MSE's reruns and contrastive's first runs, leaves OT out,
    and its rows are the gaps by hand, at both knobs."""
    from optical_ray.config import TestSet
    from optical_ray.research.report import multiplicity_markdown, tuned_answer, tuned_markdown
    from optical_ray.research.runner import Teacher, TestData
    from optical_ray.research.stats import families, summarize_test

    cfg = experiment_config(tmp_path, arms=["none", "mse", "ot", "contrastive"], seeds=[0, 1], bootstrap=200)
    spec = TestSet(name="t", query_langs=["de", "qu"], groups={"high": ["de"], "low": ["qu"]}, gaps={"low": ["high", "low"]})
    images = np.array([f"i{k}" for k in range(20)])
    test = TestData(spec, captions=None, query_images={"de": images, "qu": images})

    def record(arm, seed, de, qu):  # de, qu: how many of the 20 queries are found first
        hits = lambda n: pack_ranks(np.where(np.arange(20) < n, 1.0, 2.0))
        return {"arm": arm, "seed": seed, "teacher": "t", "tests": {"t": {"de": hits(de), "qu": hits(qu)}}}

    untrained = [record("none", None, 16, 4)]                                         # gap 0.60
    teacher = Teacher("t", records=[record(arm, seed, 16, qu) for arm, qu in (("mse", 8), ("ot", 8), ("contrastive", 10))
                                    for seed in (0, 1)])                                # gaps 0.40, 0.40, 0.30
    check = {"params": {"lr": 2e-4}, "trials": 8, "dev_mean": 0.4, "dev_sd": 0.01, "best": 0.5}
    teacher.checks = {"mse": {**check, "rerun": True, "records": [record("mse", 0, 16, 12), record("mse", 1, 16, 11)]},
                      "contrastive": {**check, "rerun": False, "records": []},
                      "ot": {**check, "rerun": True, "records": [record("ot", 0, 16, 14)]}}
    tuned = tuned_answer(cfg, [test], untrained, {"t": teacher})
    assert tuned["knobs"] == {"mse": "check", "contrastive": "first"} and tuned["pending"] == ["ot"]
    arms = tuned["tests"]["t"]["arms"]
    assert list(arms) == ["none", "mse", "contrastive"]
    assert arms["mse"]["gaps"]["low"]["abs"]["value"] == pytest.approx(0.8 - 0.575)  # the reruns' qu: 12, 11 of 20
    assert arms["contrastive"]["gaps"]["low"]["abs"]["value"] == pytest.approx(0.3)

    first = {"teacher": "t", "tests": {"t": {"protocol": "translation", "gaps": spec.gaps,
                                             "arms": summarize_test(test, untrained + teacher.records, cfg.arms, 200)["arms"]}}}
    text = "\n".join(tuned_markdown({**first, "tuned": tuned}))
    row = next(line for line in text.splitlines() if line.startswith("| low | (1) MSE − (0) none |"))
    assert row.split(" | ")[2].startswith("-0.200 [") and row.split(" | ")[3].startswith("-0.375 [")
    assert row.endswith("| yes: narrows |")
    assert "Not in yet (check or reruns to come): (2) OT." in text
    found = families({**first, "tuned": tuned})
    table = "\n".join(multiplicity_markdown({**first, "tuned": tuned, "multiplicity": found}))
    assert "| every arm vs no distillation, at the tuning check's knobs | `t` | 2 |" in table
    teacher.checks["mse"]["records"].pop()
    assert tuned_answer(cfg, [test], untrained, {"t": teacher}) == {}  # no arm fully rerun: the answer above


def test_image_pivot_pairs_are_compared_with_translation_pairs_per_language_group():
    """Arm (6) minus arm (4), mean R@1 per group, by hand: two seeds each; the interval holds the change."""
    from optical_ray.config import TestSet
    from optical_ray.research.report import pivot_markdown
    from optical_ray.research.runner import TestData
    from optical_ray.research.stats import group_r1_changes

    spec = TestSet(name="indep", query_langs=["de", "nl"], groups={"high": ["de"], "unseen": ["nl"]},
                   gaps={"unseen": ["high", "unseen"]})
    images = np.array([f"i{k}" for k in range(20)])
    test = TestData(spec, captions=None, query_images={"de": images, "nl": images})
    hits = lambda n: np.where(np.arange(20) < n, 1.0, 2.0)

    def record(arm, seed, de, nl):
        return {"arm": arm, "seed": seed, "teacher": "t", "tests": {"indep": {"de": pack_ranks(hits(de)), "nl": pack_ranks(hits(nl))}}}

    records = [record("contrastive", 0, 16, 10), record("contrastive", 1, 16, 12),          # de 0.80, nl 0.55
               record("pivot-contrastive", 0, 16, 14), record("pivot-contrastive", 1, 15, 14)]  # de 0.775, nl 0.70
    changes = group_r1_changes(test, records, "pivot-contrastive", "contrastive", n_resamples=300)
    assert changes["unseen"]["change"] == pytest.approx(0.15) and changes["high"]["change"] == pytest.approx(-0.025)
    lo, hi = changes["unseen"]["ci95"]
    assert lo <= 0.15 <= hi
    assert group_r1_changes(test, records, "pivot-contrastive", "mse", n_resamples=10) == {}
    text = "\n".join(pivot_markdown({"pivot_vs_translation": {"t": {"indep": changes}}}))
    assert "- indep: high (de) -0.025 [" in text and "unseen (nl) +0.150 [" in text
