import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from optical_ray.encoder import EncoderOutput
from optical_ray.losses import (
    ContrastiveLoss,
    DistillationObjective,
    LossWeights,
    MSEDistillationLoss,
    OTDistillationLoss,
    info_nce,
)
from optical_ray.ot import transport_cost


def output(states, mask, embedding=None):
    if embedding is None:
        embedding = F.normalize(states.mean(1), dim=-1)
    return EncoderOutput(token_states=states, content_mask=mask, embedding=embedding)


def test_info_nce_by_hand():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    tau = 0.5
    s = (q @ k.T) / tau
    row = -0.5 * (math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[0, 1])))
                  + math.log(math.exp(s[1, 1]) / (math.exp(s[1, 0]) + math.exp(s[1, 1]))))
    col = -0.5 * (math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[1, 0])))
                  + math.log(math.exp(s[1, 1]) / (math.exp(s[0, 1]) + math.exp(s[1, 1]))))
    assert float(info_nce(q, k, tau)) == pytest.approx((row + col) / 2, rel=1e-6)


def test_ot_loss_is_mean_frobenius_product_and_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    t_states = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    s_states = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    t_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    s_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    loss = OTDistillationLoss(reg=0.1)(output(t_states, t_mask), output(s_states, s_mask))
    per_pair, plan = transport_cost(t_states, t_mask, s_states, s_mask, 0.1)
    assert float(loss.detach()) == pytest.approx(float(per_pair.detach().mean()))
    cost = 1 - F.normalize(t_states, dim=-1) @ F.normalize(s_states, dim=-1).transpose(1, 2)
    assert float(loss.detach()) == pytest.approx(float((plan * cost).sum((1, 2)).mean().detach()), rel=1e-5)
    loss.backward()
    assert t_states.grad is None and s_states.grad.abs().sum() > 0


def test_mse_loss_is_reimers_gurevych():
    teacher = output(torch.zeros(2, 1, 3), torch.ones(2, 1, dtype=torch.bool), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    student = output(torch.zeros(2, 1, 3), torch.ones(2, 1, dtype=torch.bool), torch.tensor([[0.0, 1, 0], [0, 1.0, 0]]))
    student_en = output(torch.zeros(2, 1, 3), torch.ones(2, 1, dtype=torch.bool), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    # translation side: squared error 2 over 6 elements; English side: 2 over 6.
    assert float(MSEDistillationLoss()(teacher, student, student_en)) == pytest.approx(2 / 6 + 2 / 6)


def test_objective_sums_weighted_parts_and_skips_zero_weights():
    g = torch.Generator().manual_seed(1)
    t = output(torch.randn(4, 5, 8, generator=g), torch.ones(4, 5, dtype=torch.bool))
    s = output(torch.randn(4, 6, 8, generator=g), torch.ones(4, 6, dtype=torch.bool))
    total, parts = DistillationObjective(LossWeights(ot=2.0, contrastive=0.5, mse=0.0), sinkhorn_reg=0.1, temperature=0.1)(t, s)
    assert set(parts) == {"ot", "contrastive"}
    assert float(total) == pytest.approx(2.0 * parts["ot"] + 0.5 * parts["contrastive"], rel=1e-5)
    with pytest.raises(ValueError, match="needs the student's encoding of the English side"):
        DistillationObjective(LossWeights(ot=0, contrastive=0, mse=1.0))(t, s)
    with pytest.raises(ValueError, match="all loss weights are zero"):
        DistillationObjective(LossWeights(0, 0, 0))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ContrastiveLoss(temperature=0)


def _gathered_worker(rank, world, store_path, queries, keys, tau, out_path):
    # A file store, not tcp://: with TCP, rank 0 hosts the store and its exit could pull it from under
    # rank 1 mid-teardown (CI saw rank 1 abort with "terminate called without an active exception").
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    q = queries.clone().requires_grad_(True)
    k = keys.clone().requires_grad_(True)
    n = len(q) // world
    loss = info_nce(q[rank * n:(rank + 1) * n], k[rank * n:(rank + 1) * n], tau)
    loss.backward()
    # What DDP does with parameter gradients: average them over workers.
    grads = torch.stack([q.grad, k.grad])
    dist.all_reduce(grads)
    grads /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        np.savez(out_path, loss=float(mean_loss) / world, grads=grads.numpy())
    dist.barrier()  # neither tears gloo down while the other still talks to it (SIGABRT otherwise)
    dist.destroy_process_group()


def test_gathered_contrastive_loss_with_two_workers_equals_the_union_batch(tmp_path):
    g = torch.Generator().manual_seed(2)
    queries = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    keys = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    tau = 0.1
    out = tmp_path / "two_workers.npz"
    store = tmp_path / "gloo-store"
    mp.spawn(_gathered_worker, args=(2, str(store), queries, keys, tau, str(out)), nprocs=2, join=True)
    result = np.load(out)

    q, k = queries.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    union = info_nce(q, k, tau)
    union.backward()
    assert result["loss"] == pytest.approx(float(union.detach()), rel=1e-6)
    np.testing.assert_allclose(result["grads"][0], q.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(result["grads"][1], k.grad.numpy(), atol=1e-6)


def test_losses_stay_float32_under_bf16_autocast():
    """Autocast would run the cosine cost, <T, C> and the InfoNCE logits as bf16 matmuls (8-bit
    mantissa: errors ~1e-2); the losses switch it off around them."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 4, 9, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    teacher = output(torch.randn(4, 9, 64, generator=g), mask)
    student = output(torch.randn(4, 9, 64, generator=g), mask)
    student_en = output(torch.randn(4, 9, 64, generator=g), mask)
    objective = DistillationObjective(LossWeights(ot=1.0, contrastive=1.0, mse=1.0), sinkhorn_reg=0.05, temperature=0.02)
    reference, ref_parts = objective(teacher, student, student_en)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16  # autocast is really on
        loss, parts = objective(teacher, student, student_en)
        value, plan = transport_cost(teacher.token_states, mask, student.token_states, mask, reg=0.05)
    assert loss.dtype == torch.float32 and value.dtype == torch.float32 and plan.dtype == torch.float32
    assert float(loss) == pytest.approx(float(reference), abs=1e-4)
    for name, part in ref_parts.items():
        assert parts[name] == pytest.approx(part, abs=1e-4), name
