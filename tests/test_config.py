import pytest
from conftest import REPO

from optical_ray.config import ConfigError, DistillConfig, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nloss:\n  sinkhorn_reg: 1e-3\n  temperature: 0.1\ndata:\n  languages: de,qu\n")
    cfg = load_config(DistillConfig, path, {"optim.lr": 1e-4})
    assert cfg.steps == 7 and cfg.loss.sinkhorn_reg == 1e-3 and cfg.loss.temperature == 0.1
    assert cfg.data.languages == ["de", "qu"] and cfg.optim.lr == 1e-4 and cfg.batch_size == 32
    save_config(cfg, tmp_path / "round.yaml")
    assert load_config(DistillConfig, tmp_path / "round.yaml") == cfg


@pytest.mark.parametrize("text, message", [
    ("stepz: 3\n", r"c.yaml: unknown key stepz \(known: batch_size, bf16, "),
    ("loss:\n  epsilon: 0.1\n", r"unknown key loss.epsilon in 'loss' \(known: contrastive_weight, "),
    ("steps: many\n", r"c.yaml: steps = 'many': input should be a valid integer"),
    ("steps: 2.5\n", r"steps = 2.5: input should be a valid integer"),
    ("freeze_word_embeddings: 1\n", r"freeze_word_embeddings = 1: input should be a valid boolean"),
    ("loss: 3\n", r"loss = 3: input should be a valid dictionary"),
    ("data:\n  train: [1, 2]\n", r"data.train\[0\] = 1: input should be a valid string; data.train\[1\] = 2"),
    ("- a\n- b\n", r"expected a mapping at the top level"),
    ("steps: [\n", r"not valid YAML"),
    # ranges: what would otherwise fail deep inside torch, or train nothing
    ("loss:\n  sinkhorn_reg: 0\n", r"loss.sinkhorn_reg = 0: input should be greater than 0"),
    ("loss:\n  temperature: -0.1\n", r"loss.temperature = -0.1: input should be greater than 0"),
    ("batch_size: 0\n", r"batch_size = 0: input should be greater than 0"),
    ("loss:\n  ot_weight: -1\n", r"loss.ot_weight = -1: input should be greater than or equal to 0"),
    ("loss:\n  ot_weight: 0\n  contrastive_weight: 0\n", r"loss: ot_weight, contrastive_weight and mse_weight are all 0"),
    ("output_dir: s3:/bucket/out\n", r"output_dir = 's3:/bucket/out': not a well-formed s3:// URI"),
    ("data:\n  bitext: gs://bucket/x\n", r"data.bitext = 'gs://bucket/x': only local paths and s3:// URIs"),
    ("ray:\n  max_failures: -2\n", r"ray.max_failures = -2: input should be greater than or equal to -1"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(DistillConfig, tmp_path / "absent.yaml")


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    from optical_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    cfg = load_config(DistillConfig, {"student": "model", "teacher": "minilm-en", "output_dir": "out",
                                      "data": {"train": ["a.parquet", "s3://bucket/c.parquet"], "bitext": "shards"},
                                      "ray": {"storage_path": "s3://bucket/runs"}})
    fixed = with_absolute_paths(cfg)
    assert fixed.data.train == [str(tmp_path / "a.parquet"), "s3://bucket/c.parquet"]
    assert fixed.data.bitext == str(tmp_path / "shards") and fixed.output_dir == str(tmp_path / "out")
    assert fixed.student == str(tmp_path / "model") and fixed.teacher == "minilm-en"
    assert fixed.ray.storage_path == "s3://bucket/runs" and cfg.output_dir == "out"  # the original is unchanged


def test_gpu_experiment_is_the_cpu_experiment_at_ten_times_the_pairs():
    from optical_ray.config import ExperimentConfig

    cpu = load_config(ExperimentConfig, str(REPO / "configs" / "experiment.yaml"))
    gpu = load_config(ExperimentConfig, str(REPO / "configs" / "experiment-gpu.yaml"))
    assert gpu.test_sets == cpu.test_sets and gpu.arms == cpu.arms and gpu.seeds == cpu.seeds
    assert gpu.held_out_languages == cpu.held_out_languages == ["gn"]
    assert gpu.distill.steps * gpu.distill.batch_size >= 10 * cpu.distill.steps * cpu.distill.batch_size
    assert gpu.distill.ray.use_gpu and gpu.distill.bf16 and gpu.sweep.gpus_per_trial == 1
    assert gpu.sweep.search.sinkhorn_reg == cpu.sweep.search.sinkhorn_reg  # merged from the base, key by key
    assert gpu.results_dir != cpu.results_dir
    # The same teachers and curve arms; the teacher trains on the same data, on a GPU in bf16.
    assert gpu.teachers == cpu.teachers and gpu.curve.arms == cpu.curve.arms
    assert gpu.curve.steps * gpu.distill.batch_size >= 10 * cpu.curve.steps * cpu.distill.batch_size
    t_gpu, t_cpu = gpu.teacher_training, cpu.teacher_training
    assert t_gpu.data == t_cpu.data and t_gpu.test_sets == t_cpu.test_sets
    assert t_gpu.ray.use_gpu and t_gpu.bf16 and t_gpu.steps * t_gpu.batch_size >= 8 * t_cpu.steps * t_cpu.batch_size


def test_a_config_base_is_merged_and_errors_still_name_the_key(tmp_path):
    from optical_ray.config import DistillConfig

    (tmp_path / "base.yaml").write_text("steps: 10\nloss: {temperature: 0.1, sinkhorn_reg: 0.2}\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nloss: {temperature: 0.3}\n")
    cfg = load_config(DistillConfig, str(tmp_path / "top.yaml"))
    assert (cfg.steps, cfg.loss.temperature, cfg.loss.sinkhorn_reg) == (10, 0.3, 0.2)
    (tmp_path / "typo.yaml").write_text("base: base.yaml\nlos: {temperature: 0.3}\n")
    with pytest.raises(ConfigError, match="unknown key los"):
        load_config(DistillConfig, str(tmp_path / "typo.yaml"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(DistillConfig, str(tmp_path / "loop.yaml"))


def test_data_root_places_every_table_and_is_not_part_of_the_config(tmp_path):
    from optical_ray.config import SAMPLE_DIR, training_fields

    path = tmp_path / "c.yaml"
    path.write_text("data_root: /data/f30k\ndata:\n  train: ['${data_root}/train.parquet']\n"
                    "  dev: ['${sample_data}/val_captions.parquet']\n")
    local = load_config(DistillConfig, path)
    assert local.data.train == ["/data/f30k/train.parquet"] and local.data.dev == [str(SAMPLE_DIR / "val_captions.parquet")]
    remote = load_config(DistillConfig, path, {"data_root": "s3://bucket/f30k/"})
    assert remote.data.train == ["s3://bucket/f30k/train.parquet"]
    path.write_text("data:\n  train: ['${data_root}/train.parquet']\n")
    with pytest.raises(ConfigError, match=r"c.yaml: data.train uses \$\{data_root\} but no data_root is set"):
        load_config(DistillConfig, path)
    assert "data_root" not in training_fields(local) and "checkpoint_every" not in training_fields(local)
    # What keys a run names the bundled tables as installed anywhere: another checkout, the same key.
    assert training_fields(local)["data"]["dev"] == ["${sample_data}/val_captions.parquet"]
    assert training_fields(local)["data"]["train"] == ["/data/f30k/train.parquet"]


def test_sweep_and_experiment_ranges(tmp_path):
    from optical_ray.config import ExperimentConfig, SweepConfig

    with pytest.raises(ConfigError, match=r"search.temperature = \[0.5, 0.1\]: must be \[\] or \[low, high\] with 0 < low <= high"):
        load_config(SweepConfig, {"search": {"temperature": [0.5, 0.1]}})
    with pytest.raises(ConfigError, match=r"objective = 'recall': input should be 'low_r1', 'mean_r1', 'low_ndcg10', 'mean_ndcg10' or 'neg_gap'"):
        load_config(SweepConfig, {"objective": "recall"})
    with pytest.raises(ConfigError, match=r"test_sets\[0\]: gaps.low must name two of the groups \(high\), got \['high', 'low'\]"):
        load_config(ExperimentConfig, {"test_sets": [{"groups": {"high": ["de"]}}]})
    with pytest.raises(ConfigError, match=r"curve.test_sets names test_2019, not among the test_sets \(test_2018\)"):
        load_config(ExperimentConfig, {"curve": {"test_sets": ["test_2018", "test_2019"]}})
    # Records, models and checkpoints are read back from disk: an S3 prefix would be a local "s3:" folder.
    with pytest.raises(ConfigError, match=r"out_dir = 's3://bucket/exp': must be a folder on this machine"):
        load_config(ExperimentConfig, {"out_dir": "s3://bucket/exp"})


def test_derive_validates_overrides_like_a_file():
    from optical_ray.config import derive

    base = load_config(DistillConfig)
    assert derive(base, {"loss.temperature": 0.1}).loss.temperature == 0.1 and base.loss.temperature == 0.05
    with pytest.raises(ConfigError, match=r"<config>: loss.temperature = 0: input should be greater than 0"):
        derive(base, {"loss.temperature": 0})


def test_a_retired_key_is_dropped_with_a_warning_not_refused(caplog):
    """Sweeps and configs written before a key was retired still load (a restored Tune sweep replays
    its stored config in every trial)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="optical_ray"):
        cfg = load_config(DistillConfig, {"ray": {"shuffle_buffer": 2048, "num_workers": 2}})
    assert cfg.ray.num_workers == 2 and "ray.shuffle_buffer is ignored" in caplog.text


def test_a_missing_data_root_is_named_with_the_way_out(caplog):
    load_config(DistillConfig, {"data_root": "../nowhere/f30k", "data": {"dev": ["${data_root}/val.parquet"]}})
    assert "data_root ../nowhere/f30k (used by data.dev) is not a folder here" in caplog.text
    assert "--set data_root=" in caplog.text and "optical-ray data build" in caplog.text
    caplog.clear()
    assert load_config(DistillConfig, {"data_root": "s3://bucket/tables", "data": {"dev": ["${data_root}/v.parquet"]}}
                       ).data.dev == ["s3://bucket/tables/v.parquet"]
    assert "not a folder here" not in caplog.text
