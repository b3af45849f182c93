import numpy as np
import ot as pot
import pytest
import torch

from optical_ray.ot import cosine_cost, solve_plans, transport_cost, uniform_marginals


def random_batch(dtype=torch.float64, seed=0, lengths_x=(7, 3, 5, 1, 6), lengths_y=(9, 2, 4, 6, 9), dim=16):
    g = torch.Generator().manual_seed(seed)
    n, m = max(lengths_x), max(lengths_y)
    x = torch.randn(len(lengths_x), n, dim, generator=g, dtype=dtype)
    y = torch.randn(len(lengths_y), m, dim, generator=g, dtype=dtype)
    x_mask = torch.arange(n)[None] < torch.tensor(lengths_x)[:, None]
    y_mask = torch.arange(m)[None] < torch.tensor(lengths_y)[:, None]
    return x, x_mask, y, y_mask


@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_batched_plans_equal_per_item_pot_sinkhorn(reg):
    x, xm, y, ym = random_batch()
    cost = cosine_cost(x, y)
    plans = solve_plans(cost, uniform_marginals(xm, torch.float64), uniform_marginals(ym, torch.float64), reg,
                        max_iter=5000, tol=1e-13)
    for i in range(len(x)):
        n, m = int(xm[i].sum()), int(ym[i].sum())
        ref = pot.sinkhorn(np.full(n, 1 / n), np.full(m, 1 / m), cost[i, :n, :m].numpy(), reg,
                           method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
        np.testing.assert_allclose(plans[i, :n, :m].numpy(), ref, atol=1e-6)
        assert plans[i, n:].abs().sum() == 0 and plans[i, :, m:].abs().sum() == 0  # no mass on padding


def test_small_reg_float32_is_finite_with_correct_marginals():
    x, xm, y, ym = random_batch(dtype=torch.float32)
    value, plan = transport_cost(x, xm, y, ym, reg=1e-3, max_iter=2000)
    assert torch.isfinite(value).all() and torch.isfinite(plan).all()
    rows = plan.sum(2)[xm]
    np.testing.assert_allclose(rows.numpy(), uniform_marginals(xm)[xm].numpy(), atol=1e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_inputs_are_solved_in_float32(device):
    x, xm, y, ym = random_batch(dtype=torch.float32)
    value32, _ = transport_cost(x.to(device), xm.to(device), y.to(device), ym.to(device), reg=0.05)
    value16, plan16 = transport_cost(x.to(device, torch.bfloat16), xm.to(device), y.to(device, torch.bfloat16),
                                     ym.to(device), reg=0.05)
    assert plan16.dtype == torch.float32 and value16.dtype == torch.float32
    torch.testing.assert_close(value16, value32, atol=2e-2, rtol=0)


def test_gradient_is_the_envelope_gradient_of_the_regularized_cost():
    """dLoss/dy with the plan held constant equals autograd through every Sinkhorn iteration of
    the regularized OT value min_T <T, C> - reg * H(T) (the envelope theorem)."""
    x, xm, y, ym = random_batch(lengths_x=(5, 5, 5), lengths_y=(4, 4, 4))
    y1 = y.clone().requires_grad_(True)
    value, _ = transport_cost(x, xm, y1, ym, reg=0.1, max_iter=3000, tol=1e-14)
    value.sum().backward()

    from ot.batch import solve_batch

    y2 = y.clone().requires_grad_(True)
    ref = solve_batch(cosine_cost(x, y2), 0.1, a=uniform_marginals(xm, torch.float64),
                      b=uniform_marginals(ym, torch.float64), max_iter=3000, tol=1e-14, method="log_sinkhorn",
                      grad="autodiff")
    ref.value.sum().backward()
    torch.testing.assert_close(y1.grad, y2.grad, atol=1e-7, rtol=1e-5)


def test_sentence_without_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="no real tokens"):
        uniform_marginals(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="must be > 0"):
        solve_plans(torch.zeros(1, 2, 2), torch.full((1, 2), 0.5), torch.full((1, 2), 0.5), reg=0)


def test_default_iterations_converge_at_the_smallest_swept_reg():
    """Sweeps draw ε down to MIN_REG; there the defaults must give a plan whose marginals are off by
    less than 1e-3 (L1 per sentence), or the loss is not the OT cost it claims to be."""
    from optical_ray.ot import MIN_REG

    x, xm, y, ym = random_batch(dtype=torch.float32, lengths_x=(20, 12, 31, 8), lengths_y=(24, 30, 9, 17), dim=64)
    _, plan = transport_cost(x, xm, y, ym, reg=MIN_REG)
    a, b = uniform_marginals(xm), uniform_marginals(ym)
    assert float((plan.sum(2) - a).abs().sum(1).max()) < 1e-3
    assert float((plan.sum(1) - b).abs().sum(1).max()) < 1e-3
