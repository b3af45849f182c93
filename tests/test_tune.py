"""Ray Tune: a 6-trial ASHA sweep with tiny models on 2 CPUs, storage on S3 (moto on 127.0.0.1)."""

import io
import json

import pyarrow.csv as pacsv
import pytest
import yaml

from optical_ray import storage
from optical_ray.config import ConfigError, DistillConfig, SweepConfig, load_config
from optical_ray.distill import distill
from optical_ray.tune import make_tuner, run_sweep


def sweep_config(tiny_model_dir, tiny_teacher_dir, bucket, **overrides):
    return load_config(SweepConfig, {
        "num_samples": 6, "max_concurrent_trials": 2, "objective": "mean_r1", "cpus_per_trial": 1, "grace_period": 1, "reduction_factor": 2,
        "storage_path": f"s3://{bucket}/tune", "name": "tiny", "seed": 0,
        "search": {"sinkhorn_reg": [0.01, 1.0], "temperature": [0.02, 0.5]},
        "distill": {"student": str(tiny_model_dir), "teacher": str(tiny_teacher_dir), "steps": 12, "batch_size": 8,
                    "eval_every": 3, "max_length": 32, "optim": {"lr": 1e-3, "warmup_steps": 1},
                    # Many dev queries, so that trials of random tiny models rarely tie on the objective.
                    "data": {"dev_languages": ["de", "fr", "cs", "ar", "ay", "es", "gn", "qu", "uk", "zh"]}},
        **overrides,
    })


def trial_results(s3, bucket):
    """Every trial's result.json line count, keyed by trial folder."""
    objects = s3["client"].list_objects_v2(Bucket=bucket, Prefix="tune/tiny/")["Contents"]
    counts = {}
    for obj in objects:
        if obj["Key"].endswith("/result.json"):
            body = s3["client"].get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            counts[obj["Key"].split("/")[-2]] = len(body.splitlines())
    return counts


@pytest.mark.timeout(900)
def test_asha_sweep_on_s3_writes_results_and_best_config_that_trains(ray_cluster, s3, tiny_model_dir, tiny_teacher_dir, tmp_path):
    bucket = s3["bucket"]
    cfg = sweep_config(tiny_model_dir, tiny_teacher_dir, bucket)
    trial_log = f"s3://{bucket}/logs/tiny.json"
    result = run_sweep(cfg, trial_log=trial_log)

    trials = pacsv.read_csv(io.BytesIO(storage.read_bytes(f"s3://{bucket}/tune/tiny/trials.csv"))).to_pylist()
    assert len(trials) == 6 and all(t["status"] == "OK" for t in trials)
    assert all(0.01 <= t["sinkhorn_reg"] <= 1.0 and 0.02 <= t["temperature"] <= 0.5 for t in trials)
    steps = sorted(t["steps"] for t in trials)
    assert steps[-1] == 12 and steps[0] < 12, f"ASHA stopped no trial early: {steps}"
    assert result.trial_steps == sum(steps) < 6 * 12
    assert storage.read_bytes(f"s3://{bucket}/tune/tiny/sweep.png")[:4] == b"\x89PNG"

    best = yaml.safe_load(storage.read_bytes(f"s3://{bucket}/tune/tiny/best.yaml"))
    finished = [t for t in trials if t["steps"] == 12]
    top = max(finished, key=lambda t: t["objective"])
    assert best["loss"]["sinkhorn_reg"] == pytest.approx(top["sinkhorn_reg"])
    assert best["loss"]["temperature"] == pytest.approx(top["temperature"])
    best_path = tmp_path / "best.yaml"
    best_path.write_text(yaml.safe_dump(best))
    trained = distill(load_config(DistillConfig, best_path, {"steps": 2, "output_dir": str(tmp_path / "best")}), progress=False)
    assert (trained.model_dir / "model.safetensors").is_file()

    # Resuming the finished sweep reruns nothing: every trial's results stay as they were.
    before = trial_results(s3, bucket)
    again = run_sweep(cfg, resume=True)
    assert trial_results(s3, bucket) == before and again.trials.num_rows == 6
    assert json.dumps(sorted(again.trials.column("objective").to_pylist())) == json.dumps(sorted(t["objective"] for t in trials))

    # Resuming with another search space or budget would go on with the old one: refused, naming them.
    changed = cfg.model_copy(update={"num_samples": cfg.num_samples + 1,
                                     "search": cfg.search.model_copy(update={"temperature": [0.02, 0.3]})})
    with pytest.raises(ConfigError, match=rf"started with other terms: num_samples {cfg.num_samples} -> "
                                          rf"{cfg.num_samples + 1}, search.temperature .* -> \[0.02, 0.3\]"):
        run_sweep(changed, resume=True)
    assert trial_results(s3, bucket) == before

    # The trial log holds every finished trial's row. With the sweep's storage lost, the sweep started
    # again draws the same trials, replays the logged ones and trains only those the log lacks.
    log = json.loads(storage.read_bytes(trial_log))
    assert sorted(t["row"]["trial"] for t in log["trials"].values()) == sorted(t["trial"] for t in trials)
    assert all(t["row"] == row for row in result.trials.to_pylist() for t in log["trials"].values()
               if t["row"]["trial"] == row["trial"])
    lost = sorted(log["trials"])[:2]
    for key in lost:
        del log["trials"][key]
    storage.write_bytes(json.dumps(log).encode(), trial_log)
    # Resources are not terms of the sweep: all six at once, four of them replays that train nothing.
    elsewhere = cfg.model_copy(update={"name": "tiny-elsewhere", "cpus_per_trial": 0.5, "max_concurrent_trials": 6})
    again = run_sweep(elsewhere, trial_log=trial_log)
    assert again.replayed == 4
    rows = {row["trial"]: row for row in again.trials.to_pylist()}
    kept = [t["row"] for t in log["trials"].values()]
    assert all(rows[row["trial"]] == row for row in kept)  # a replayed trial keeps its row
    knobs = ("sinkhorn_reg", "temperature")
    assert sorted(tuple(r[k] for k in knobs) for r in rows.values()) == sorted(tuple(t[k] for k in knobs) for t in trials)
    objects = s3["client"].list_objects_v2(Bucket=bucket, Prefix="tune/tiny-elsewhere/")["Contents"]
    trained = {obj["Key"].split("/")[2] for obj in objects if "/checkpoint_" in obj["Key"]}
    assert len(trained) == 2, f"only the two trials missing from the log train again: {sorted(trained)}"
    assert len(json.loads(storage.read_bytes(trial_log))["trials"]) == 6  # and are logged again


def test_sweep_config_errors_name_the_key(tiny_model_dir):
    with pytest.raises(ConfigError, match="objective = 'best': input should be 'low_r1', 'mean_r1', 'low_ndcg10', "
                                          "'mean_ndcg10' or 'neg_gap'"):
        load_config(SweepConfig, {"objective": "best"})
    with pytest.raises(ConfigError, match="objective low_r1 is not what the dev set measures: distill.data.dev_beir is "
                                          "scored by nDCG@10, so use objective low_ndcg10"):
        make_tuner(load_config(SweepConfig, {"distill": {"eval_every": 5, "data": {"dev_beir": "s3://bucket/beir"}}}))
    with pytest.raises(ConfigError, match="dev_bitext and dev_beir are two dev sets: set one of them"):
        load_config(SweepConfig, {"distill": {"data": {"dev_beir": "beir", "dev_bitext": {"en": "a", "de": "b"}}}})
    with pytest.raises(ConfigError, match=r"search.sinkhorn_reg = \[1.0, 0.1\]: must be \[\] or \[low, high\]"):
        load_config(SweepConfig, {"search": {"sinkhorn_reg": [1.0, 0.1]}, "distill": {"eval_every": 5}})
    with pytest.raises(ConfigError, match="search.sinkhorn_reg starts at 0.001: below 0.01 Sinkhorn does not converge"):
        make_tuner(load_config(SweepConfig, {"search": {"sinkhorn_reg": [0.001, 0.1]}, "distill": {"eval_every": 5}}))
    with pytest.raises(ConfigError, match="eval_every must be > 0 for ASHA"):
        make_tuner(load_config(SweepConfig, {}))


def test_a_sweep_refuses_to_resume_on_bitext_prepared_again(tmp_path):
    from optical_ray.config import SAMPLE_DIR, SweepConfig
    from optical_ray.prepare import prepare_bitext
    from optical_ray.tune import SWEEP_RECORD, refuse_changed_sweep, sweep_terms

    bitext, captions = str(tmp_path / "bitext"), [str(SAMPLE_DIR / "train_captions.parquet")]
    prepare_bitext(bitext, captions=captions, languages=["de", "qu"])
    cfg = load_config(SweepConfig, {"storage_path": str(tmp_path / "tune"), "name": "s",
                                    "distill": {"data": {"bitext": bitext}}})
    (tmp_path / "tune" / "s").mkdir(parents=True)
    (tmp_path / "tune" / "s" / SWEEP_RECORD).write_text(json.dumps(sweep_terms(cfg)))
    refuse_changed_sweep(cfg)  # the same data: goes on
    prepare_bitext(bitext, captions=captions, languages=["de", "ay"])
    with pytest.raises(ConfigError, match=r"started with other terms: distill.data.bitext_content '[0-9a-f]+' -> '[0-9a-f]+'"):
        refuse_changed_sweep(cfg)


def test_a_trial_that_errored_first_leaves_the_other_trials_dev_metrics_in_the_table():
    from optical_ray.tune import trial_row, trials_table

    failed = trial_row("t0", {"lr": 1e-4}, {}, RuntimeError("out of memory\nat step 3"))
    finished = trial_row("t1", {"lr": 2e-4}, {"step": 200, "objective": 0.5, "dev_r1_de": 0.7}, None)
    table = trials_table([failed, finished]).to_pylist()
    assert table[0]["error"] == "out of memory" and table[0]["objective"] is None
    assert table[1]["objective"] == 0.5 and table[1]["dev_r1_de"] == 0.7 and table[1]["steps"] == 200


def test_a_best_value_in_the_outer_tenth_of_its_log_range_is_named_with_its_end():
    from optical_ray.config import SearchSpace
    from optical_ray.tune import range_edges

    search = SearchSpace(lr=[1e-5, 1e-3], sinkhorn_reg=[0.01, 1.0], temperature=[0.05, 0.05])
    # lr 8e-4: log position 0.95 of [1e-5, 1e-3]; sinkhorn_reg 0.0125: 0.048; temperature: fixed, never an edge
    assert range_edges({"lr": 8e-4, "sinkhorn_reg": 0.0125, "temperature": 0.05}, search) == {"lr": "high", "sinkhorn_reg": "low"}
    assert range_edges({"lr": 1e-4, "sinkhorn_reg": 0.1}, search) == {}  # the middles of both ranges
