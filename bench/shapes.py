"""Benchmark shapes of docs/design.md §7 and the random problems the benchmarks solve.

Every shape uses the OPTICAL setting unless it says otherwise: cosine cost, ε = 0.05,
``max_iter = 100`` and ``tol = 0`` so that every solver runs exactly 100 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """One benchmark shape (a family of cases, one per feature dimension ``d``).

    Attributes:
        name: short id used in test ids, groups and tables (``S1`` ...).
        B: number of problems in the batch.
        n: padded number of points on the ``x`` side.
        m: padded number of points on the ``y`` side.
        ds: feature dimensions to run.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: input dtype.
        cost: ``cosine``, ``sqeuclidean`` or ``dot``.
        eps: entropic regularisation (absolute, cost units).
        n_iter: Sinkhorn iterations every provider runs (no early stop).
        ragged: ``(lo, hi)``: valid lengths uniform in ``[lo, hi]`` (masks); ``None``: full.
    """

    name: str
    B: int
    n: int
    m: int
    ds: tuple[int, ...]
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    cost: str = "cosine"
    eps: float = 0.05
    n_iter: int = 100
    ragged: tuple[int, int] | None = None

    def describe(self, d: int) -> str:
        """Human-readable one-liner, e.g. ``B=64 n=m=32 d=384 fp32 cosine eps=0.05 it=100``."""
        nm = f"n=m={self.n}" if self.n == self.m else f"n={self.n} m={self.m}"
        rag = f" ragged[{self.ragged[0]},{self.ragged[1]}]" if self.ragged else ""
        dt = str(self.dtype).removeprefix("torch.").replace("float", "fp")
        return (
            f"B={self.B} {nm}{rag} d={d} {dt} {self.cost} eps={self.eps:g} it={self.n_iter}"
            f" {self.device}"
        )


SHAPES: dict[str, Shape] = {
    # S1 OPTICAL/CPU
    "S1": Shape("S1", B=64, n=32, m=32, ds=(384, 768), device="cpu"),
    # S2 OPTICAL/GPU (fp32; bf16 to be added once every provider accepts it)
    "S2": Shape("S2", B=256, n=64, m=64, ds=(768,), device="cuda"),
    # S3 ragged: lengths uniform in [4, 128]
    "S3": Shape("S3", B=128, n=128, m=128, ds=(768,), device="cpu", ragged=(4, 128)),
}


def make_problem(
    B: int,
    n: int,
    m: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    ragged: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Random batch of token-embedding pairs, like a distillation batch.

    The first ``min(n, m)`` tokens of ``y`` (teacher side) are noisy copies of those of ``x``
    (correlation 0.6), so that the costs look like aligned sentence pairs rather than noise.

    Returns:
        x [B, n, d], y [B, m, d], x_mask [B, n] bool or None, y_mask [B, m] bool or None
        (``None`` when ``ragged`` is None: every position is valid). Padded rows are zero.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64)
    k = min(n, m)
    y[:, :k] = 0.6 * x[:, :k] + 0.8 * y[:, :k]
    x_mask = y_mask = None
    if ragged is not None:
        lo, hi = ragged
        if not 1 <= lo <= hi:
            raise ValueError(f"ragged must be (lo, hi) with 1 <= lo <= hi, got {ragged!r}")
        nx_ = torch.randint(lo, min(hi, n) + 1, (B,), generator=gen)
        ny_ = torch.randint(lo, min(hi, m) + 1, (B,), generator=gen)
        x_mask = torch.arange(n)[None, :] < nx_[:, None]
        y_mask = torch.arange(m)[None, :] < ny_[:, None]
        x = x * x_mask[..., None]
        y = y * y_mask[..., None]
        x_mask = x_mask.to(device)
        y_mask = y_mask.to(device)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), x_mask, y_mask
