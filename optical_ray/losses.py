"""Distillation losses. Each is a small ``nn.Module`` taking the teacher's and the student's
:class:`~optical_ray.encoder.EncoderOutput` for a batch of (English, translation) pairs.

* :class:`OTDistillationLoss` -- token alignment by optimal transport (OPTICAL).
* :class:`ContrastiveLoss` -- symmetric InfoNCE between sentence embeddings.
* :class:`MSEDistillationLoss` -- the embedding-regression baseline (Reimers & Gurevych 2020).
* :class:`DistillationObjective` -- their weighted sum; every arm of an experiment is this one
  objective with different weights.
* :class:`TeacherSpace` -- a learned map of the student's outputs into a teacher of another width.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .encoder import Encoder, EncoderOutput
from .ot import MAX_ITER, transport_cost


class OTDistillationLoss(nn.Module):
    r"""Optimal-transport token distillation (OPTICAL: Huang, Yu & Allan, WSDM 2023, arXiv 2301.12566).

    The frozen teacher's token states of the English sentence and the student's token states of its
    translation are compared with the cost :math:`C_{ij} = 1 - \cos(t_i, s_j)`; the entropic
    Sinkhorn plan :math:`T^\star` (regularization ``reg`` = ε) aligns them, and the loss is the
    Frobenius product :math:`\langle T^\star, C\rangle_F`, averaged over the batch. Special tokens,
    prompt tokens and padding have zero marginal weight. Teacher and student may use different
    tokenizers: the plan is rectangular.

    Gradient: the plan is held constant in the backward pass, so the gradient with respect to C is
    :math:`T^\star`. By the envelope theorem that is exactly the gradient of the *regularized* OT
    cost :math:`\min_T \langle T, C\rangle - \varepsilon H(T)`, whose value differs from the loss by
    :math:`\varepsilon H(T^\star)`; it needs no backpropagation through the Sinkhorn iterations.
    """

    def __init__(self, reg: float = 0.05, max_iter: int = MAX_ITER, tol: float = 1e-6):
        super().__init__()
        self.reg, self.max_iter, self.tol = reg, max_iter, tol

    def forward(self, teacher: EncoderOutput, student: EncoderOutput) -> torch.Tensor:
        cost, _ = transport_cost(teacher.token_states.detach(), teacher.content_mask, student.token_states,
                                 student.content_mask, self.reg, self.max_iter, self.tol)
        return cost.mean()


class ContrastiveLoss(nn.Module):
    r"""Symmetric InfoNCE with in-batch negatives (van den Oord et al. 2018; CLIP's form, Radford et
    al. 2021) between student embeddings of the translations and teacher embeddings of the English.

    With logits :math:`s_i \cdot t_j / \tau`, the loss is the mean of the cross-entropy picking
    :math:`t_i` for :math:`s_i` and picking :math:`s_i` for :math:`t_i`.

    Under ``torch.distributed`` the negatives come from every worker: embeddings are gathered with a
    differentiable all-gather, each worker scores its own rows against the global batch, and after
    DDP averages the gradients they equal the single-process gradient on the union batch (a point
    where other libraries have had bugs; ``tests/test_losses.py`` checks it). Local batches must have
    equal sizes on every worker.
    """

    def __init__(self, temperature: float = 0.05, gather: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.gather = temperature, gather

    def forward(self, teacher: EncoderOutput, student: EncoderOutput) -> torch.Tensor:
        return info_nce(student.embedding, teacher.embedding.detach(), self.temperature, self.gather)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE where row i of ``queries`` and row i of ``keys`` are the positive pair."""
    offset = 0
    all_queries, all_keys = queries, keys
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # Deprecated in favour of _functional_collectives, whose backward needs reduce_scatter,
            # which gloo (CPU workers) lacks; this one falls back to all_to_all there.
            warnings.simplefilter("ignore", FutureWarning)
            all_queries = torch.cat(all_gather(queries))
            all_keys = torch.cat(all_gather(keys))
        offset = dist.get_rank() * queries.shape[0]
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    # float32 logits even under autocast: at τ = 0.01 bf16's 8-bit mantissa would blur them by ~1.
    with torch.autocast(queries.device.type, enabled=False):
        q_to_k = queries.float() @ all_keys.float().T / temperature
        k_to_q = keys.float() @ all_queries.float().T / temperature
        return (F.cross_entropy(q_to_k, labels) + F.cross_entropy(k_to_q, labels)) / 2


class MSEDistillationLoss(nn.Module):
    """Multilingual knowledge distillation (Reimers & Gurevych, EMNLP 2020, arXiv 2004.09813): the
    student's embeddings of the English sentence and of its translation both regress onto the
    teacher's embedding of the English sentence (mean squared error, summed over the two sides)."""

    def forward(self, teacher: EncoderOutput, student: EncoderOutput, student_english: EncoderOutput) -> torch.Tensor:
        with torch.autocast(student.embedding.device.type, enabled=False):
            target = teacher.embedding.detach().float()
            return F.mse_loss(student_english.embedding.float(), target) + F.mse_loss(student.embedding.float(), target)


class TeacherSpace(nn.Module):
    """Student outputs mapped into the space of a teacher of another width: one learned linear map for
    token states (the OT cost compares them with the teacher's) and one for sentence embeddings (the
    MSE target and the contrastive keys), as Reimers & Gurevych add a Dense layer when the teacher's
    dimension differs. Trained with the student and dropped when it is saved: the student retrieves in
    its own space (queries and documents alike); the map only served to compare it with the teacher."""

    def __init__(self, student: Encoder, teacher: Encoder):
        super().__init__()
        s_hidden, t_hidden = student.model.config.hidden_size, teacher.model.config.hidden_size
        self.states = nn.Linear(s_hidden, t_hidden) if s_hidden != t_hidden else nn.Identity()
        self.embedding = nn.Linear(student.dim, teacher.dim) if student.dim != teacher.dim else nn.Identity()
        self.normalize = teacher.normalize

    def forward(self, out: EncoderOutput) -> EncoderOutput:
        embedding = self.embedding(out.embedding)
        if self.normalize and not isinstance(self.embedding, nn.Identity):
            embedding = F.normalize(embedding, dim=-1)
        return EncoderOutput(self.states(out.token_states), out.content_mask, embedding)

    @staticmethod
    def needed(student: Encoder, teacher: Encoder) -> bool:
        return student.model.config.hidden_size != teacher.model.config.hidden_size or student.dim != teacher.dim


@dataclass
class LossWeights:
    ot: float = 1.0
    contrastive: float = 1.0
    mse: float = 0.0


class DistillationObjective(nn.Module):
    """Weighted sum of the three losses; a zero weight skips that loss's computation entirely."""

    def __init__(self, weights: LossWeights, sinkhorn_reg: float = 0.05, temperature: float = 0.05,
                 sinkhorn_iters: int = MAX_ITER):
        super().__init__()
        if not any((weights.ot, weights.contrastive, weights.mse)):
            raise ValueError("all loss weights are zero: nothing to train")
        self.weights = weights
        self.ot = OTDistillationLoss(sinkhorn_reg, sinkhorn_iters)
        self.contrastive = ContrastiveLoss(temperature)
        self.mse = MSEDistillationLoss()

    @property
    def needs_student_english(self) -> bool:
        return bool(self.weights.mse)

    def forward(self, teacher: EncoderOutput, student: EncoderOutput,
                student_english: EncoderOutput | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, torch.Tensor] = {}
        if self.weights.ot:
            parts["ot"] = self.ot(teacher, student)
        if self.weights.contrastive:
            parts["contrastive"] = self.contrastive(teacher, student)
        if self.weights.mse:
            if student_english is None:
                raise ValueError("the MSE loss needs the student's encoding of the English side")
            parts["mse"] = self.mse(teacher, student, student_english)
        total = sum(getattr(self.weights, name) * value for name, value in parts.items())
        return total, {name: float(value.detach()) for name, value in parts.items()}
