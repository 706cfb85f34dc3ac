"""Distillation losses: token-level OT (OPTICAL) and the sentence-level KD baseline.

Notation for one sentence pair: the student encodes the foreign sentence into token embeddings
``x`` [n, d], the frozen teacher encodes the English sentence into ``y`` [m, d].

* **OT** (Huang et al., WSDM 2023): ``L_OT = <P*, C>`` with ``C_ij = c(x_i, y_j)`` and ``P*``
  the entropic transport plan between the *content* tokens of both sentences (special and
  padding tokens carry no mass), computed by :func:`optical_kernels.sinkhorn_loss`. Every
  solver option is exposed through :class:`OTOptions`.
* **KD** (Reimers & Gurevych, EMNLP 2020): ``L_KD = ‖mean(x) − mean(y)‖² / d``, the mean
  squared error between the student's mean-pooled sentence embedding and the teacher's
  (``torch.nn.functional.mse_loss``: averaged over the batch and the d features).
* **OT+KD**: ``L = L_OT + kd_weight · L_KD``.

Both losses are averaged over the batch (``reduction="mean"``), so that gradient accumulation
and data-parallel training reproduce the gradient of one large batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import optical_kernels
from optical_kernels.distill.models import mean_pool

LOSSES = ("ot", "kd", "ot+kd")


@dataclass(frozen=True)
class OTOptions:
    """Options of the token-level OT loss, passed unchanged to ``sinkhorn_loss``.

    Attributes:
        cost: ``"cosine"`` (default, ``1 − x̂·ŷ``), ``"sqeuclidean"`` or ``"dot"``.
        eps: entropic regularisation ε > 0, in cost units.
        objective: ``"linear"`` (``<P, C>``, the OPTICAL loss), ``"entropic"`` or
            ``"divergence"``.
        grad: ``"auto"``, ``"implicit"``, ``"envelope"`` or ``"unrolled"``.
        rho: KL marginal relaxation ρ > 0 (unbalanced OT), or ``None`` for balanced OT.
        max_iter: maximum number of Sinkhorn iterations.
        tol: stopping threshold on the L1 row-marginal error (0 runs ``max_iter``).
        check_every: test convergence every this many iterations.
        eps_schedule: ``(start, factor)`` ε-scaling, ``ε_t = max(eps, start·factor^(t−1))``,
            or ``None``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
    """

    cost: str = "cosine"
    eps: float = 0.05
    objective: str = "linear"
    grad: str = "auto"
    rho: float | None = None
    max_iter: int = 100
    tol: float = 1e-4
    check_every: int = 10
    eps_schedule: tuple[float, float] | None = None
    backend: str = "auto"

    def kwargs(self) -> dict:
        """The keyword arguments of ``optical_kernels.sinkhorn_loss``."""
        return asdict(self)


def ot_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor,
    y_mask: torch.Tensor,
    options: OTOptions | None = None,
) -> torch.Tensor:
    """Token-level OT distillation loss, averaged over the batch.

    Args:
        x: [B, n, d] student token embeddings of the foreign sentences (requires grad).
        y: [B, m, d] teacher token embeddings of the English sentences (detached here).
        x_mask: [B, n] bool, True for content tokens of ``x``.
        y_mask: [B, m] bool, True for content tokens of ``y``.
        options: solver options; defaults to :class:`OTOptions()`.

    Returns:
        Scalar tensor ``mean_k L_OT(x_k, y_k)``; a pair with no content token on one side
        contributes 0.
    """
    opts = options or OTOptions()
    return optical_kernels.sinkhorn_loss(
        x.float(), y.detach().float(), x_mask=x_mask, y_mask=y_mask, reduction="mean",
        **opts.kwargs(),
    )


def kd_loss(student_sentence: torch.Tensor, teacher_sentence: torch.Tensor) -> torch.Tensor:
    """Sentence-level KD: mean squared error between [B, d] sentence embeddings (scalar)."""
    return F.mse_loss(student_sentence.float(), teacher_sentence.detach().float())


class DistillLoss(nn.Module):
    """``ot``, ``kd`` or ``ot+kd`` distillation loss over one batch of sentence pairs.

    Args:
        loss: one of :data:`LOSSES`.
        ot: options of the OT term.
        kd_weight: weight of the KD term in ``ot+kd``.
    """

    def __init__(self, loss: str = "ot", ot: OTOptions | None = None, kd_weight: float = 1.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not kd_weight >= 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        self.loss = loss
        self.ot = ot or OTOptions()
        self.kd_weight = float(kd_weight)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_attention: torch.Tensor,
        student_content: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_attention: torch.Tensor,
        teacher_content: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss.

        Args:
            student_hidden: [B, n, d] student token embeddings (foreign side).
            student_attention: [B, n] attention mask of the student batch.
            student_content: [B, n] bool content-token mask (``token_mask`` of
                :func:`optical_kernels.distill.models.tokenize`).
            teacher_hidden: [B, m, d] teacher token embeddings (English side).
            teacher_attention: [B, m] attention mask of the teacher batch.
            teacher_content: [B, m] bool content-token mask.

        Returns:
            ``(total, parts)``: the scalar loss to back-propagate and its detached terms
            ``{"ot": ..., "kd": ...}`` (only those that were computed).
        """
        if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
            raise ValueError(
                f"student embeddings have {student_hidden.shape[-1]} features but the teacher's "
                f"have {teacher_hidden.shape[-1]}: give the student a projection "
                "(StudentEncoder(model, out_dim=teacher hidden size))"
            )
        parts: dict[str, torch.Tensor] = {}
        total = student_hidden.new_zeros((), dtype=torch.float32)
        if self.loss in ("ot", "ot+kd"):
            lo = ot_loss(student_hidden, teacher_hidden, student_content, teacher_content, self.ot)
            parts["ot"] = lo.detach()
            total = total + lo
        if self.loss in ("kd", "ot+kd"):
            lk = kd_loss(
                mean_pool(student_hidden, student_attention),
                mean_pool(teacher_hidden, teacher_attention),
            )
            parts["kd"] = lk.detach()
            total = total + (lk if self.loss == "kd" else self.kd_weight * lk)
        return total, parts
