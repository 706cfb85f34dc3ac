"""Shared pieces of the backend contract suite (tests/backends/test_contract_*.py).

* :data:`TOL`, :func:`close`: the one tolerance table (same-dtype rule, see there);
* :data:`SKIPS`, :func:`require`, :func:`thin`: the one capability/budget table: nothing in
  the suite is skipped except through it (or because a backend is unavailable);
* :class:`Problem`, :func:`make_problem`, :func:`solve`, :func:`compare`: ragged, masked,
  weighted float64 batches (padding interleaved, finite garbage at padded positions), one case
  run through the public API, every output compared with the oracle's.

The oracle is ``backend="torch"`` (:mod:`optical_kernels.backends.torch`); the ``backend``
fixture (tests/backends/conftest.py) yields a :class:`Backend`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import optical_kernels as ok
from tests.helpers import random_problem, random_weights

# --------------------------------------------------------------------------- tolerances
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
F16_EPS = torch.finfo(torch.float16).eps  # 2**-10
#: One table for every assertion: ``(dtype, quantity) -> (rtol, atol)``, normwise:
#: ``max|got − want| ≤ atol + rtol · max|want|`` (see :func:`close`).
#:
#: **Same-dtype rule**: a backend is compared with the oracle run on the *same* inputs in the
#: *same* dtype (bf16/fp16 points are rounded once, both sides see the rounded values), never
#: with a float64 solve of unrounded data; the tolerance of a dtype is then the rounding the
#: two implementations may legitimately do differently:
#:
#: * float64: converged solves (``tol`` 1e-9) agree to rounding amplified by the solver.
#: * float32: the same solves in single precision (the oracle also runs in float32). Measured
#:   (cpu, triton interpreter, cuda emulator; 3xTF32 products on the cuda path): values
#:   ≤ 1.7e-6, potentials ≤ 4.8e-7, gradients ≤ 3.1e-6 relative; the table allows 10-60x
#:   that, so that a 0.1% error in a gradient fails.
#: * bfloat16 / float16: both sides accumulate in float32, but a backend may do elementwise
#:   work on the points in the input dtype (the fused path centres sqeuclidean points in it)
#:   and gradients come back rounded to the input dtype: one ulp of that dtype (relative) for
#:   values and potentials, four for gradients (measured: bf16 values ≤ 2.5e-3 and gradients
#:   ≤ 7.1e-3, fp16 values ≤ 8.6e-5 and gradients ≤ 5e-4 relative).
#: * ``limit``: a closed-form limit (ε → 0: the assignment; ε → ∞: ``Σ a_i b_j C_ij``), an
#:   O(ε) / O(1/ε) approximation error, not rounding.
#: * ``fd``: a gradient against central finite differences of the backend's own value
#:   (step 1e-6 in float64, converged to 1e-13): truncation + cancellation error.
#: * ``property``: an invariance of one backend with itself (permuted / padded / transposed /
#:   shifted / split batch) in float64: two solves that differ only in the order of sums.
TOL: dict[tuple[torch.dtype, str], tuple[float, float]] = {
    (torch.float64, "value"): (1e-9, 1e-11),
    (torch.float64, "potential"): (1e-8, 1e-10),
    (torch.float64, "err"): (1e-6, 1e-12),
    (torch.float64, "grad"): (1e-7, 1e-10),
    (torch.float64, "limit"): (0.0, 2e-2),
    (torch.float64, "fd"): (1e-5, 1e-8),
    (torch.float64, "property"): (1e-8, 1e-10),
    (torch.float32, "value"): (2e-5, 1e-7),
    (torch.float32, "potential"): (2e-5, 1e-6),
    (torch.float32, "err"): (0.0, 1e-4),
    (torch.float32, "grad"): (2e-4, 1e-7),
    (torch.float32, "limit"): (0.0, 2e-2),
    (torch.bfloat16, "value"): (BF16_EPS, BF16_EPS * 1e-2),
    (torch.bfloat16, "potential"): (BF16_EPS, BF16_EPS * 1e-2),
    (torch.bfloat16, "err"): (0.0, BF16_EPS * 1e-2),
    (torch.bfloat16, "grad"): (4 * BF16_EPS, 4 * BF16_EPS * 1e-2),
    (torch.bfloat16, "limit"): (0.0, 2e-2),
    (torch.float16, "value"): (F16_EPS, F16_EPS * 1e-2),
    (torch.float16, "potential"): (F16_EPS, F16_EPS * 1e-2),
    (torch.float16, "err"): (0.0, F16_EPS * 1e-1),
    (torch.float16, "grad"): (4 * F16_EPS, 4 * F16_EPS * 1e-2),
}
#: solver tolerance per dtype (the solves compared are converged)
SOLVE_TOL = {torch.float64: 1e-9, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, quantity: str,
          what: str) -> None:
    """Normwise ``max|got − want| ≤ atol + rtol · max|want|`` with ``TOL[dtype, quantity]``;
    ``got`` must be finite and of ``want``'s shape."""
    rtol, atol = TOL[(dtype, quantity)]
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries {got}"
    if not got.numel():
        return
    err = (got - want).abs().max().item()
    bound = atol + rtol * want.abs().max().item()
    assert err <= bound, f"{what}: max|got - want| = {err:.3e} > {bound:.3e} ({dtype}, {quantity})"


# --------------------------------------------------------------------------- capabilities
#: Backend kinds: ``torch``, ``cpu``, ``triton-interp`` (interpreter on CPU), ``triton`` (GPU),
#: ``cuda-emu`` (CPU fiber emulator of csrc/cuda), ``cuda`` (GPU).
KINDS = ("torch", "cpu", "online", "triton-interp", "triton", "cuda-emu", "cuda")
#:
#: ``feature -> {kind: reason}``: the one place that says which backend does not run what.
#: Capabilities (the backend cannot) and budgets (the backend could, but the run would be too
#: slow for CI; the reduced grids still cover every value of every factor) are both here.
SKIPS: dict[str, dict[str, str]] = {
    # capabilities
    "vs-oracle": {"torch": "the oracle compared with itself (cannot fail)"},
    "n>256": {
        "cuda-emu": "cuda backend: resident kernels only, n, m <= 256 (MAX_SIZE)",
        "cuda": "cuda backend: resident kernels only, n, m <= 256 (MAX_SIZE)",
    },
    # budgets (the Triton interpreter runs ~50x slower than the CUDA emulator)
    "reduced-grid": {
        "triton-interp": "Triton interpreter budget: every other case of this grid runs (each "
        "factor value still occurs); the full grid runs on a GPU",
    },
    "thirds-grid": {
        "triton-interp": "Triton interpreter budget: a third of this grid runs (each factor "
        "value still occurs); the full grid runs on a GPU",
    },
}


#: Discrepancies found by the suite and not fixed yet: ``(kind, case key) -> description``.
#: Such a case is marked ``xfail(strict=True)``: it fails loudly once the bug is fixed (then
#: delete the entry). Never a place for tolerances or capabilities. Only what was observed is
#: listed (the real-GPU ``cuda``/``triton`` kinds were not run for this table).
KNOWN_BUGS: dict[tuple[str, str], str] = {
    ("cuda-emu", "extreme-dot-divergence-envelope"): (
        "cuda kernels, float32, dot cost, eps=1e-3 with points of scale 1e3 (C/eps ~ 1e9): "
        "the self term OT(y, y) of the divergence returns value -inf (the torch/cpu backends "
        "stay finite; triton returns a finite but absurd -4.6e31, err 5.6e25)"
    ),
}


def known_bug(bk: Backend, key: str, request: pytest.FixtureRequest) -> None:
    """Mark the running test ``xfail(strict=True)`` when :data:`KNOWN_BUGS` lists it for
    ``bk``."""
    reason = KNOWN_BUGS.get((bk.kind, key))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"known bug: {reason}"))


@dataclass(frozen=True)
class Backend:
    """A backend under test: the ``backend=`` name, the device of its tensors, its kind (the
    key of :data:`SKIPS`)."""

    name: str
    device: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def require(bk: Backend, feature: str) -> None:
    """Skip, with the reason from :data:`SKIPS`, when ``bk`` lacks ``feature``."""
    reason = SKIPS[feature].get(bk.kind)
    if reason is not None:
        pytest.skip(f"{bk.kind}: {reason}")


def reduced(bk: Backend, feature: str) -> bool:
    """Whether ``bk`` runs the reduced grid named ``feature`` (a budget entry of :data:`SKIPS`)."""
    return bk.kind in SKIPS[feature]


def thin(bk: Backend, feature: str, keep: bool) -> None:
    """Budget reduction: on the kinds listed under ``feature`` skip the cases with ``keep``
    false (reason from :data:`SKIPS`); every other kind runs every case."""
    if not keep:
        require(bk, feature)


#: The interpreter evaluates both sides of tl.where with numpy: 0/0 and log(0) in discarded
#: lanes warn there (on the GPU they are silent and never selected). Each contract file sets
#: ``pytestmark = INTERPRETER_WARNINGS``.
INTERPRETER_WARNINGS = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
]


# --------------------------------------------------------------------------- problems
COSTS = ("cosine", "sqeuclidean", "dot", "matrix")  # "matrix": a given C through ok.solve
OBJECTIVES = ("linear", "entropic", "divergence")
GRADS = ("envelope", "implicit", "unrolled")
RHOS = (None, 1.0)
#: eps and point scale per cost, so that C is O(1) and the solves converge in < 100 iterations
EPS = {"cosine": 0.2, "sqeuclidean": 0.3, "dot": 0.3, "matrix": 0.3}
SCALE = {"cosine": 1.0, "sqeuclidean": 0.5, "dot": 0.5, "matrix": 0.5}
#: divergence: ε × 3 (the self-transport terms OT_ε(x, x) converge far slower than OT_ε(x, y))
DIVERGENCE_EPS_FACTOR = 3.0
MAX_ITER = 300


def grid() -> list[tuple[str, str, str, float | None]]:
    return [
        (c, o, g, r)
        for c, o, g, r in itertools.product(COSTS, OBJECTIVES, GRADS, RHOS)
        if not (c == "matrix" and o == "divergence")  # divergence needs points
    ]


def covering() -> list[tuple[str, str, str, float | None]]:
    """A third of :func:`grid` in which every pair of (cost, objective, grad, rho) values
    still occurs: ``(i + j + k + r) % 3 == 0`` (for any two fixed factors the free ones can
    reach every residue)."""
    idx = lambda v, seq: seq.index(v)  # noqa: E731
    return [
        case
        for case in grid()
        if (idx(case[0], COSTS) + idx(case[1], OBJECTIVES) + idx(case[2], GRADS)
            + idx(case[3], RHOS)) % 3 == 0
    ]


def case_id(case: tuple) -> str:
    c, o, g, r = case
    return f"{c}-{o}-{g}-{'bal' if r is None else f'rho{r:g}'}"


@dataclass
class Problem:
    """A padded batch: points (leaves), masks, weights, upstream gradient."""

    x: torch.Tensor
    y: torch.Tensor
    x_mask: torch.Tensor
    y_mask: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor

    def to(self, device: str, dtype: torch.dtype | None = None) -> Problem:
        """A copy on ``device``; points cast to ``dtype`` (weights stay float64)."""
        pt = lambda t: t.detach().to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        mv = lambda t: t.to(device)  # noqa: E731
        return Problem(pt(self.x), pt(self.y), mv(self.x_mask), mv(self.y_mask), mv(self.a),
                       mv(self.b), mv(self.w))  # fmt: skip


def make_problem(
    B: int = 3, n: int = 7, m: int = 5, d: int = 4, *, seed: int = 0, scale: float = 1.0,
    ragged: bool = True, empty_rows: tuple[int, ...] = (), full_first: bool = False,
) -> Problem:
    """Ragged float64 batch (padding interleaved, finite garbage there), random weights;
    ``full_first``: problem 0 has every point valid (its padded size is its size)."""
    x, y, xm, ym = random_problem(B, n, m, d, torch.float64, seed, ragged, empty_rows,
                                  scale=scale, scatter=True)  # fmt: skip
    if full_first:
        x1, y1, _, _ = random_problem(1, n, m, d, torch.float64, seed + 1, False, scale=scale)
        x[0], y[0], xm[0], ym[0] = x1[0], y1[0], True, True
    a = random_weights(xm, seed + 101)
    b = random_weights(ym, seed + 102)
    w = torch.randn(B, generator=torch.Generator().manual_seed(seed + 103), dtype=torch.float64)
    return Problem(x, y, xm, ym, a, b, w)


def matrix_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The given cost of the ``matrix`` case: a differentiable function of x, y that is none
    of the built-in costs (a scaled L1 distance plus a linear term)."""
    return 0.5 * (x[:, :, None, :] - y[:, None, :, :]).abs().sum(-1) + 0.1 * x.sum(-1)[..., None]


def solve(bk: Backend, P: Problem, cost: str, objective: str, grad: str, rho: float | None,
          *, dtype: torch.dtype | None = None, eps: float | None = None,
          max_iter: int = MAX_ITER, tol: float | None = None, api: str = "solve",
          need: str = "xy", uniform: bool = False, **kw: object) -> dict[str, torch.Tensor]:
    """Run one case on ``bk`` and return values, potentials, n_iters, err and ``dx``/``dy``
    of ``Σ_k w_k value_k``. ``api="loss"`` goes through ``sinkhorn_loss(reduction="none")``
    (values and gradients only); ``need``: which of x, y require grad (the other's gradient
    is returned as ``None``); ``uniform``: no weights passed (the default uniform ones)."""
    P = P.to(bk.device, dtype)
    dtype = P.x.dtype
    x = P.x.clone().requires_grad_("x" in need)
    y = P.y.clone().requires_grad_("y" in need)
    a, b = (None, None) if uniform else (P.a, P.b)
    if eps is None:
        eps = EPS[cost] * (DIVERGENCE_EPS_FACTOR if objective == "divergence" else 1.0)
    args = dict(x_mask=P.x_mask, y_mask=P.y_mask, eps=eps,
                objective=objective, grad=grad, rho=rho, max_iter=max_iter,
                tol=SOLVE_TOL[dtype] if tol is None else tol, backend=bk.name, **kw)
    out: dict[str, torch.Tensor] = {}
    if cost == "matrix":
        res = ok.solve(matrix_cost(x, y), a, b, **args)
        value = res.value
    elif api == "loss":
        value = ok.sinkhorn_loss(x, y, a, b, cost=cost, reduction="none", **args)
        res = None
    else:
        res = ok.solve_sample(x, y, a, b, cost=cost, **args)
        value = res.value
    out["value"] = value
    if res is not None:
        out.update(value_linear=res.value_linear, f=res.potentials[0], g=res.potentials[1],
                   n_iters=res.n_iters, err=res.err, empty=res.empty)  # fmt: skip
    leaves = [t for t in (x, y) if t.requires_grad]
    got: list[torch.Tensor | None] = [None] * len(leaves)
    if value.requires_grad:
        got = list(torch.autograd.grad((value * P.w.to(value)).sum(), leaves,
                                       allow_unused=True))  # fmt: skip
    # no graph (e.g. every problem empty) or an unused input: the gradient is 0
    grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got))
    out["dx"] = next(grads) if x.requires_grad else None
    out["dy"] = next(grads) if y.requires_grad else None
    return {k: v.detach().cpu() for k, v in out.items() if v is not None}


ORACLE = Backend("torch", "cpu", "torch")


def compare(got: dict, want: dict, P: Problem, dtype: torch.dtype, rho: float | None,
            what: str) -> None:
    """Every output of :func:`solve` against the oracle's, with :data:`TOL`."""
    close(got["value"], want["value"], dtype, "value", f"{what}: value")
    for key in ("dx", "dy"):
        assert (key in got) == (key in want), f"{what}: {key} present on one side only"
        if key in want:
            close(got[key], want[key], dtype, "grad", f"{what}: {key}")
    if "f" not in want:
        return
    close(got["value_linear"], want["value_linear"], dtype, "value", f"{what}: value_linear")
    assert torch.equal(got["n_iters"].long(), want["n_iters"].long()), (
        f"{what}: n_iters {got['n_iters'].tolist()} != {want['n_iters'].tolist()}"
    )
    close(got["err"], want["err"], dtype, "err", f"{what}: err")
    xv, yv = P.a > 0, P.b > 0
    xv, yv = xv & P.x_mask, yv & P.y_mask
    for key, valid in (("f", xv), ("g", yv)):
        pad = got[key][~valid]
        assert (pad == 0).all(), f"{what}: {key} is not 0 at padding: {pad}"

    def gauge(res: dict) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = res["f"].double(), res["g"].double()
        if rho is not None:
            return f, g
        cnt = xv.sum(1, keepdim=True).clamp(min=1)
        c = torch.where(xv, f, 0.0).sum(1, keepdim=True) / cnt
        return torch.where(xv, f - c, 0.0), torch.where(yv, g + c, 0.0)

    (fg, gg), (fw, gw) = gauge(got), gauge(want)
    close(fg, fw, dtype, "potential", f"{what}: f")
    close(gg, gw, dtype, "potential", f"{what}: g")


def solve_dense(bk: Backend, C: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
                w: torch.Tensor | None = None, **kw: object) -> dict[str, torch.Tensor]:
    """``ok.solve`` of a given cost on ``bk``: the :func:`solve` outputs plus ``dC`` (of
    ``Σ_k w_k value_k``, ``w`` = 1 by default) and the plan ``P``."""
    dev = bk.device
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    Cl = C.detach().to(dev).requires_grad_(True)
    res = ok.solve(Cl, mv(a), mv(b), x_mask=mv(x_mask), y_mask=mv(y_mask), backend=bk.name, **kw)
    wv = torch.ones_like(res.value) if w is None else w.to(res.value)
    if res.value.requires_grad:
        (dC,) = torch.autograd.grad((res.value * wv).sum(), (Cl,))
    else:
        dC = torch.zeros_like(Cl)
    out = dict(value=res.value, value_linear=res.value_linear, f=res.potentials[0],
               g=res.potentials[1], n_iters=res.n_iters, err=res.err, empty=res.empty,
               converged=res.converged, dC=dC, P=res.plan())  # fmt: skip
    return {k: v.detach().cpu() for k, v in out.items()}
