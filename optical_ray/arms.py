"""The experiment's arms: which loss terms each trains and which knobs its sweep tunes.

One table, read by the experiment (what to train) and by its reports (what to call each arm).
"""

from __future__ import annotations

from dataclasses import dataclass

from .losses import LossWeights


@dataclass(frozen=True)
class Arm:
    label: str
    weights: LossWeights | None  # None: the undistilled student
    knobs: tuple[str, ...] = ()  # what its sweep tunes (optical_ray.tune.KNOBS)


# The arms, in report order. A new arm is one line here.
ARMS = {
    "none": Arm("(0) none", None),
    "mse": Arm("(1) MSE", LossWeights(ot=0.0, contrastive=0.0, mse=1.0), ("lr",)),
    "ot": Arm("(2) OT", LossWeights(ot=1.0, contrastive=0.0, mse=0.0), ("lr", "sinkhorn_reg")),
    "ot+contrastive": Arm("(3) OT + contrastive", LossWeights(ot=1.0, contrastive=1.0, mse=0.0),
                          ("lr", "sinkhorn_reg", "temperature", "ot_weight")),
    "contrastive": Arm("(4) contrastive", LossWeights(ot=0.0, contrastive=1.0, mse=0.0), ("lr", "temperature")),
    "mse+contrastive": Arm("(5) MSE + contrastive", LossWeights(ot=0.0, contrastive=1.0, mse=1.0),
                           ("lr", "temperature")),
}


def check_arms(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    return names
