"""Distillation-core benchmarks (issue: distillation core). Run by hand:

    .venv/bin/python bench/bench_distill.py [--batch 64] [--repeats 5]

1. The OT part of the loss: batched log-domain Sinkhorn (POT ``solve_batch``, torch) vs a per-pair
   loop of ``ot.sinkhorn(method="sinkhorn_log")`` (numpy), same 64 real caption pairs, same
   iterations (tolerance 0, so both run every iteration).
2. The OT part's share of a full OT + contrastive train step.
3. A full OT + contrastive step vs an MSE-only step on the same batch with the real mE5-small student.
All timings are medians of interleaved repeats in one run, so load on the shared machine hits both
sides alike; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ot as pot
import torch

from optical_ray.batching import batches
from optical_ray.config import DistillConfig, load_config
from optical_ray.distill import Distiller, load_bitext, load_models
from optical_ray.ot import cosine_cost, solve_plans, transport_cost, uniform_marginals


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = load_config(DistillConfig, {"batch_size": args.batch})
    english, translation = next(batches(load_bitext(cfg), args.batch, seed=0))
    student, teacher = load_models(cfg, torch.device("cpu"))
    with torch.no_grad():
        t_out = teacher(teacher.tokenize(english, "passage"))
        s_out = student(student.tokenize(translation, "query"))
    x, xm, y, ym = t_out.token_states, t_out.content_mask, s_out.token_states, s_out.content_mask
    lengths = xm.sum(1).float()
    print(f"batch {args.batch}: English tokens mean {lengths.mean():.1f}, max {int(lengths.max())}; "
          f"translation tokens mean {ym.sum(1).float().mean():.1f}, max {int(ym.sum(1).max())}; "
          f"torch threads {torch.get_num_threads()}")

    cost = cosine_cost(x, y)
    a, b = uniform_marginals(xm), uniform_marginals(ym)
    per_pair = [(cost[i, xm[i]][:, ym[i]].double().numpy(), a[i, xm[i]].double().numpy(), b[i, ym[i]].double().numpy())
                for i in range(len(x))]

    def batched():
        transport_cost(x, xm, y, ym, reg=0.05, max_iter=args.iters, tol=0.0)

    def looped():
        for c, ai, bi in per_pair:
            pot.sinkhorn(ai, bi, c, 0.05, method="sinkhorn_log", numItermax=args.iters, stopThr=0.0)

    # Interleave the two so that machine noise hits both.
    t_batch, t_loop = [], []
    for _ in range(args.repeats):
        t_batch.append(timed(batched, 1))
        t_loop.append(timed(looped, 1))
    t_batch, t_loop = statistics.median(t_batch), statistics.median(t_loop)
    plans = solve_plans(cost, a, b, 0.05, max_iter=args.iters, tol=0.0)
    ref = pot.sinkhorn(*per_pair[0][1:], per_pair[0][0], 0.05, method="sinkhorn_log", numItermax=args.iters, stopThr=0.0)
    err = np.abs(plans[0][xm[0]][:, ym[0]].double().numpy() - ref).max()
    print(f"[1] OT loss part, {args.iters} iterations: batched {t_batch * 1e3:.1f} ms, per-pair loop "
          f"{t_loop * 1e3:.1f} ms -> {t_loop / t_batch:.1f}x (max plan difference {err:.1e})")

    # For reference: the exp-domain solvers (faster, but they underflow at small ε; the loss uses log).
    from ot.batch import solve_batch

    def batched_exp():
        solve_batch(cost, 0.05, a=a, b=b, max_iter=args.iters, tol=0.0, method="sinkhorn", grad="detach")

    def looped_exp():
        for c, ai, bi in per_pair:
            pot.sinkhorn(ai, bi, c, 0.05, method="sinkhorn", numItermax=args.iters, stopThr=0.0)

    t_bexp = statistics.median([timed(batched_exp, 1) for _ in range(args.repeats)])
    t_lexp = statistics.median([timed(looped_exp, 1) for _ in range(args.repeats)])
    t_solve = statistics.median([timed(lambda: solve_plans(cost, a, b, 0.05, max_iter=args.iters, tol=0.0), 1)
                                 for _ in range(args.repeats)])
    print(f"[1b] solve only, log domain: batched {t_solve * 1e3:.1f} ms -> {t_loop / t_solve:.1f}x the log loop; "
          f"exp domain: batched {t_bexp * 1e3:.1f} ms vs loop {t_lexp * 1e3:.1f} ms -> {t_lexp / t_bexp:.1f}x")

    def step_with(weights):
        c = load_config(DistillConfig, {"batch_size": args.batch, "loss": weights})
        d = Distiller(c, student, teacher)
        return lambda: d.step(english, translation)

    ot_step = step_with({"ot_weight": 1.0, "contrastive_weight": 1.0, "mse_weight": 0.0})
    mse_step = step_with({"ot_weight": 0.0, "contrastive_weight": 0.0, "mse_weight": 1.0})
    ot_step(), mse_step()  # warm-up
    t_ot, t_mse = [], []
    for _ in range(args.repeats):
        t_ot.append(timed(ot_step, 1))
        t_mse.append(timed(mse_step, 1))
    t_ot, t_mse = statistics.median(t_ot), statistics.median(t_mse)
    print(f"[2] OT part's share of an OT + contrastive step: {t_batch * 1e3:.0f} ms of {t_ot * 1e3:.0f} ms "
          f"= {100 * t_batch / t_ot:.1f}%")
    print(f"[3] step, batch {args.batch}, frozen word embeddings: OT + contrastive {t_ot:.2f} s, MSE only "
          f"{t_mse:.2f} s -> ratio {t_ot / t_mse:.2f}x (MSE also encodes the English side with the student)")


if __name__ == "__main__":
    main()
