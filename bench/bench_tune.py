"""ASHA vs FIFO on the same search space and seeds (issue: sweeps). Run by hand:

    .venv/bin/python bench/bench_tune.py [--samples 6] [--steps 40] [--eval-every 10]

Both sweeps draw the same (ε, τ) trials (same searcher seed) for the shipped student on the bundled
sample bitext; the objective is dev R@1 over ay, gn, qu on the bundled 300 val images. Reports the
training steps each scheduler spent over all trials and the best objective it found among trials that
ran to the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray

from optical_ray.config import SweepConfig, load_config
from optical_ray.tune import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="bench-tune-")
    found = {}
    for scheduler in ("asha", "fifo"):
        cfg = load_config(SweepConfig, {
            "scheduler": scheduler, "num_samples": args.samples, "max_concurrent_trials": 2, "cpus_per_trial": 1,
            "storage_path": storage, "name": scheduler, "seed": 0, "grace_period": 1, "reduction_factor": 2,
            "distill": {"steps": args.steps, "eval_every": args.eval_every, "batch_size": 16,
                        "data": {"languages": ["de", "ay", "gn", "qu"], "dev_languages": ["de", "ay", "gn", "qu"]}},
        })
        result = run_sweep(cfg)
        finished = [r for r in result.trials.to_pylist() if r["steps"] == args.steps]
        best = max(r["objective"] for r in finished)
        found[scheduler] = (result.trial_steps, best)
        print(f"{scheduler}: {result.trial_steps} trial-steps over {result.trials.num_rows} trials, "
              f"{len(finished)} ran to the end, best dev low-resource R@1 {best:.3f}", flush=True)
    (asha_steps, asha_best), (fifo_steps, fifo_best) = found["asha"], found["fifo"]
    print(f"ASHA / FIFO trial-steps: {asha_steps / fifo_steps:.2f}x; best objective {asha_best:.3f} vs {fifo_best:.3f}")


if __name__ == "__main__":
    main()
