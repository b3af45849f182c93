"""The GPU check's pieces on CPU (bench/gpu_check.py): FLOP counting by hand, bf16 numerics, search
recall; the timed GPU run itself needs CUDA and skips without it."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from transformers import BertConfig

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)

E5_SMALL = BertConfig(hidden_size=384, num_hidden_layers=12, intermediate_size=1536)


def test_flops_per_token_by_hand():
    # Per layer: Q, K, V, O (4 * 384^2) and the FFN (2 * 384 * 1536) weights, 2 FLOPs per weight; the
    # attention scores and weighted sum add 2 * 2 * T * d per layer.
    expected = 2 * 12 * (4 * 384 * 384 + 2 * 384 * 1536) + 4 * 12 * 20 * 384
    assert gpu_check.forward_flops_per_token(E5_SMALL, 20) == expected


def test_step_flops_count_real_tokens_and_who_runs_backward():
    translation = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    english = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])}
    f = gpu_check.forward_flops_per_token

    def seqs(lengths):
        return sum(n * f(E5_SMALL, n) for n in lengths)

    student_only = gpu_check.step_flops(E5_SMALL, translation, english, needs_student_english=False)
    assert student_only == pytest.approx(3 * seqs([3, 2]) + seqs([4, 1]))
    both_sides = gpu_check.step_flops(E5_SMALL, translation, english, needs_student_english=True)
    assert both_sides == pytest.approx(3 * (seqs([3, 2]) + seqs([4, 1])) + seqs([4, 1]))


def test_bf16_numerics_match_float32(tiny_model_dir):
    result = gpu_check.bf16_agreement(tiny_model_dir, torch.device("cpu"))
    assert result["dtype_under_autocast"] == "torch.float32" and result["abs_diff"] < 1e-4


def test_search_recall_against_exact_on_cpu():
    out = gpu_check.measure_search(5000, 32, 50, torch.device("cpu"), nlist=16)
    assert 0.5 < out["ivf_recall_at_10"] <= 1.0 and out["faiss_cpu_flat_queries_per_s"] > 0
    assert "torch_gpu_exact_bf16_queries_per_s" not in out  # no GPU: that part is skipped, not faked
    vectors = gpu_check.clustered_vectors(100, 8, centers=4, seed=0)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_both_supplies_feed_the_timed_steps_on_cpu(tiny_model_dir, tmp_path):
    shards = gpu_check.prepare_shards(tiny_model_dir, tmp_path / "bitext", max_length=32)
    rows = [gpu_check.measure_distill(tiny_model_dir, "mse", 8, torch.device("cpu"), 0.2, prepared, buckets)
            for prepared, buckets in ((shards, 4), (None, 0))]
    assert [r["supply"] for r in rows] == ["prepared", "texts"] and all(r["steps"] >= 3 for r in rows)
    assert all(r["prepare_s_per_step"] > 0 and r["gflops_per_pair"] > 0 for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_distillation_on_the_gpu(tiny_model_dir):
    row = gpu_check.measure_distill(tiny_model_dir, "ot+contrastive", 8, torch.device("cuda"), seconds=0.5)
    assert row["pairs_per_s"] > 0 and 0 < row["ot_share_of_step"] < 1
