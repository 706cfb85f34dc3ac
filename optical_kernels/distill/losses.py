"""OT options of the distillation losses (one dataclass, also the CLI's ``OT`` arguments).

The losses themselves are sentence-transformers loss modules in
:mod:`optical_kernels.integrations.sentence_transformers`:

* **OT** (Huang et al., WSDM 2023): ``OPTICALLoss``, ``L_OT = <P*, C>`` between the content
  tokens of the student's foreign sentence and the teacher's English sentence (special and
  padding tokens carry no mass), :func:`optical_kernels.sinkhorn_loss` with :class:`OTOptions`;
* **KD** (Reimers & Gurevych, EMNLP 2020): ``TeacherKDLoss`` — sentence-transformers' MSE,
  cosine and in-batch contrastive (MultipleNegativesRankingLoss) distances between the
  student's foreign and the teacher's English sentence embeddings;
* **OT+KD**: ``OPTICALLoss(kd_weight=w)``, ``L_OT + w · MSE``.

All are batch means, so gradient accumulation and data parallelism reproduce one large batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class OTOptions:
    """Options of the token-level OT loss, passed unchanged to ``sinkhorn_loss``."""

    cost: Literal["cosine", "sqeuclidean", "dot"] = _h(
        "token cost: cosine 1 - x.y/(|x||y|), sqeuclidean |x-y|^2, dot -x.y", default="cosine")
    eps: float = _h("entropic regularisation eps > 0, in cost units", default=0.05)
    objective: Literal["linear", "entropic", "divergence"] = _h(
        "linear: <P,C> (the OPTICAL loss); entropic: <P,C> + eps KL; divergence: Sinkhorn "
        "divergence", default="linear")
    grad: Literal["auto", "envelope", "implicit", "unrolled"] = _h(
        "gradient mode (auto: implicit for linear)", default="auto")
    rho: float | None = _h("KL marginal relaxation rho > 0 (unbalanced OT); default balanced",
                           default=None)
    max_iter: int = _h("Sinkhorn iteration cap", default=100)
    tol: float = _h("stopping threshold on the L1 marginal error (0 runs max_iter)",
                    default=1e-4)
    check_every: int = _h("convergence test period (iterations)", default=10)
    eps_schedule: list[float] | None = _h(
        "eps-scaling START FACTOR: at iteration t = 1, 2, ... eps_t = max(eps, "
        "START * FACTOR^(t-1))", default=None)
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] = _h("solver backend",
                                                                  default="auto")

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.rho is not None and not self.rho > 0:
            raise ValueError(f"rho must be > 0 or None, got {self.rho}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not (isinstance(self.check_every, int) and self.check_every >= 1):
            raise ValueError(f"check_every must be an integer >= 1, got {self.check_every!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.eps_schedule is not None:
            sched = tuple(float(v) for v in self.eps_schedule)
            if len(sched) != 2 or not all(v > 0 for v in sched):
                raise ValueError("eps_schedule must be two numbers START FACTOR > 0, got "
                                 f"{list(self.eps_schedule)}")
            self.eps_schedule = sched

    def kwargs(self) -> dict:
        """The keyword arguments of ``optical_kernels.sinkhorn_loss``."""
        return asdict(self)
