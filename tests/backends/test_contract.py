"""Backend contract suite: every backend available in the run computes the oracle's function.

The oracle is ``backend="torch"`` (:mod:`optical_kernels.backends.torch`). Each test takes the
``backend`` fixture, parametrised over

* ``torch``  the oracle itself (property and edge-case tests only: comparing it with itself
  could not fail);
* ``cpu``    the C++ extension (skipped, with the reason, when it is not built);
* ``triton`` the Triton kernels, under ``TRITON_INTERPRET=1`` on CPU (``make test`` and
  tests/conftest.py set it), compiled on a GPU;
* ``cuda``   the CUDA kernel sources run through the CPU fiber emulator (built and loaded by
  ``tests/test_cuda.py::_emu_build``, reused here), and on the real device when one exists.

What is compared, always through the public API (masks keyword-only, random weights with
garbage at masked positions, padded points holding finite garbage, padding interleaved):
``value``, ``value_linear``, the potentials (``f − c``, ``g + c`` for balanced problems, the
gauge ``c`` fixed by the valid mean of ``f``; as they are for unbalanced ones; 0 at padding),
``n_iters`` (exactly), ``err`` and the gradients w.r.t. ``x`` and ``y`` of ``Σ_k w_k L_k`` for a
random upstream ``w``. Every assertion reads its tolerance from :data:`TOL`.

The Triton interpreter is slow: the full cost × objective × grad × rho grid runs on ``cpu``,
``cuda`` (emulated or real) and on ``triton`` with a GPU; under the interpreter ``triton``
runs a covering subset (every pair of factor values occurs, :func:`_covering`) and reduced
edge-case grids (:func:`_slow`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import cuda as ok_cuda
from optical_kernels.costs import cost_matrix
from tests.helpers import random_problem, random_weights

# --------------------------------------------------------------------------- tolerances
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
F32_EPS = torch.finfo(torch.float32).eps
#: One table for every assertion: ``(dtype, quantity) -> (rtol, atol)``, normwise:
#: ``max|got − want| ≤ atol + rtol · max|want|`` (see :func:`close`).
#:
#: * float64: converged solves (``tol`` 1e-10) agree to rounding amplified by the solver.
#: * float32: the same solves in single precision (the oracle also runs in float32).
#: * bfloat16: backend and oracle get the *same* bf16-rounded points and both accumulate in
#:   float32, but a backend may do elementwise work on the points in bf16 (the fused path
#:   centres sqeuclidean points in the input dtype) and gradients come back rounded to bf16:
#:   one bf16 ulp (relative) for values and potentials, a few for gradients.
#: * ``limit``: a closed-form limit (ε → 0: the assignment; ε → ∞: ``Σ a_i b_j C_ij``), an
#:   O(ε) / O(1/ε) approximation error, not rounding.
TOL: dict[tuple[torch.dtype, str], tuple[float, float]] = {
    (torch.float64, "value"): (1e-9, 1e-11),
    (torch.float64, "potential"): (1e-8, 1e-10),
    (torch.float64, "err"): (1e-6, 1e-12),
    (torch.float64, "grad"): (1e-7, 1e-10),
    (torch.float64, "limit"): (0.0, 2e-2),
    (torch.float32, "value"): (1e-4, 1e-6),
    (torch.float32, "potential"): (1e-4, 1e-5),
    (torch.float32, "err"): (0.0, 1e-4),
    (torch.float32, "grad"): (1e-3, 1e-5),
    (torch.float32, "limit"): (0.0, 2e-2),
    (torch.bfloat16, "value"): (BF16_EPS, BF16_EPS * 1e-2),
    (torch.bfloat16, "potential"): (BF16_EPS, BF16_EPS * 1e-2),
    (torch.bfloat16, "err"): (0.0, BF16_EPS * 1e-2),
    (torch.bfloat16, "grad"): (4 * BF16_EPS, 4 * BF16_EPS * 1e-2),
    (torch.bfloat16, "limit"): (0.0, 2e-2),
}
#: solver tolerance per dtype (the solves compared are converged)
SOLVE_TOL = {torch.float64: 1e-9, torch.float32: 1e-6, torch.bfloat16: 1e-6}


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


# --------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """A backend under test: the ``backend=`` name and the device of its tensors."""

    name: str
    device: str


_EMU: list[object] = []


def _emulator() -> object:
    """The CPU-emulator build of csrc/cuda, built by tests/test_cuda.py's helper (cached on
    disk by source hash; loaded once per process)."""
    if not _EMU:
        from tests.test_cuda import _emu_build

        _EMU.append(_emu_build())
    return _EMU[0]


def _gpu() -> bool:
    return torch.cuda.is_available()


_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda-emu", id="cuda-emu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend of the run; unavailable ones are skipped with their reason."""
    name = request.param
    if name == "cuda-emu":
        if _gpu():
            pytest.skip("a GPU is present: the cuda backend runs on it (param 'cuda')")
        ok_cuda._use_module(_emulator())
        try:
            yield Backend("cuda", "cpu")
        finally:
            ok_cuda._use_module(None)
            ok_cuda._SMEM_LIMIT = None
        return
    if name == "triton" and not _gpu() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
    info = ok.backends()[name]
    if not info["available"]:
        pytest.skip(f"backend {name!r} unavailable: {info['reason']}")
    yield Backend(name, "cuda" if name in ("triton", "cuda") and _gpu() else "cpu")


def _slow(bk: Backend) -> bool:
    """The Triton interpreter gets the reduced grids (the CUDA emulator is fast enough for
    the full ones: ~8 s for this whole file)."""
    return bk.device == "cpu" and bk.name == "triton"


def _not_oracle(bk: Backend) -> None:
    if bk.name == "torch":
        pytest.skip("the oracle compared with itself")


# The interpreter evaluates both sides of tl.where with numpy: 0/0 and log(0) in discarded
# lanes warn there (on the GPU they are silent and never selected).
pytestmark = [
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


def _grid() -> list[tuple[str, str, str, float | None]]:
    return [
        (c, o, g, r)
        for c, o, g, r in itertools.product(COSTS, OBJECTIVES, GRADS, RHOS)
        if not (c == "matrix" and o == "divergence")  # divergence needs points
    ]


def _covering() -> list[tuple[str, str, str, float | None]]:
    """A third of :func:`_grid` in which every pair of (cost, objective, grad, rho) values
    still occurs: ``(i + j + k + r) % 3 == 0`` (for any two fixed factors the free ones can
    reach every residue)."""
    idx = lambda v, seq: seq.index(v)  # noqa: E731
    return [
        case
        for case in _grid()
        if (idx(case[0], COSTS) + idx(case[1], OBJECTIVES) + idx(case[2], GRADS)
            + idx(case[3], RHOS)) % 3 == 0
    ]


def _case_id(case: tuple) -> str:
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


def _matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The given cost of the ``matrix`` case: a differentiable function of x, y that is none
    of the built-in costs (a scaled L1 distance plus a linear term)."""
    return 0.5 * (x[:, :, None, :] - y[:, None, :, :]).abs().sum(-1) + 0.1 * x.sum(-1)[..., None]


def solve(bk: Backend, P: Problem, cost: str, objective: str, grad: str, rho: float | None,
          *, dtype: torch.dtype | None = None, eps: float | None = None,
          max_iter: int = MAX_ITER, tol: float | None = None, api: str = "solve",
          **kw: object) -> dict[str, torch.Tensor]:
    """Run one case on ``bk`` and return values, potentials, n_iters, err and ``dx``/``dy``
    of ``Σ_k w_k value_k``. ``api="loss"`` goes through ``sinkhorn_loss(reduction="none")``
    (values and gradients only)."""
    P = P.to(bk.device, dtype)
    dtype = P.x.dtype
    x = P.x.clone().requires_grad_(True)
    y = P.y.clone().requires_grad_(True)
    if eps is None:
        eps = EPS[cost] * (DIVERGENCE_EPS_FACTOR if objective == "divergence" else 1.0)
    args = dict(x_mask=P.x_mask, y_mask=P.y_mask, eps=eps,
                objective=objective, grad=grad, rho=rho, max_iter=max_iter,
                tol=SOLVE_TOL[dtype] if tol is None else tol, backend=bk.name, **kw)
    out: dict[str, torch.Tensor] = {}
    if cost == "matrix":
        res = ok.solve(_matrix(x, y), P.a, P.b, **args)
        value = res.value
    elif api == "loss":
        value = ok.sinkhorn_loss(x, y, P.a, P.b, cost=cost, reduction="none", **args)
        res = None
    else:
        res = ok.solve_sample(x, y, P.a, P.b, cost=cost, **args)
        value = res.value
    out["value"] = value
    if res is not None:
        out.update(value_linear=res.value_linear, f=res.potentials[0], g=res.potentials[1],
                   n_iters=res.n_iters, err=res.err, empty=res.empty)  # fmt: skip
    if value.requires_grad:
        out["dx"], out["dy"] = torch.autograd.grad((value * P.w.to(value)).sum(), (x, y),
                                                   allow_unused=True)  # fmt: skip
        out["dx"] = torch.zeros_like(x) if out["dx"] is None else out["dx"]
        out["dy"] = torch.zeros_like(y) if out["dy"] is None else out["dy"]
    else:  # e.g. every problem empty: no graph, the gradient is 0
        out["dx"], out["dy"] = torch.zeros_like(x), torch.zeros_like(y)
    return {k: v.detach().cpu() for k, v in out.items()}


ORACLE = Backend("torch", "cpu")


def compare(got: dict, want: dict, P: Problem, dtype: torch.dtype, rho: float | None,
            what: str) -> None:
    """Every output of :func:`solve` against the oracle's, with :data:`TOL`."""
    close(got["value"], want["value"], dtype, "value", f"{what}: value")
    close(got["dx"], want["dx"], dtype, "grad", f"{what}: dx")
    close(got["dy"], want["dy"], dtype, "grad", f"{what}: dy")
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


# --------------------------------------------------------------------------- values + grads
@pytest.mark.parametrize("case", _grid(), ids=_case_id)
def test_matches_oracle_float64(backend: Backend, case: tuple) -> None:
    """Values, potentials, n_iters, err and gradients (random upstream) equal the oracle's on a
    ragged, masked, weighted batch, for every cost × objective × grad × rho (a covering subset
    under the Triton interpreter)."""
    _not_oracle(backend)
    if _slow(backend) and case not in _covering():
        pytest.skip("outside the covering subset run under the Triton interpreter")
    cost, objective, grad, rho = case
    P = make_problem(seed=sum(map(ord, _case_id(case))), scale=SCALE[cost])
    got = solve(backend, P, cost, objective, grad, rho)
    want = solve(ORACLE, P, cost, objective, grad, rho)
    assert (want["n_iters"] < MAX_ITER).all(), "oracle did not converge: the case is too hard"
    compare(got, want, P, torch.float64, rho, f"{backend.name} {_case_id(case)}")


_DTYPE_CASES = [
    ("cosine", "linear", "implicit", None),
    ("sqeuclidean", "entropic", "unrolled", None),
    ("dot", "divergence", "envelope", None),
    ("cosine", "linear", "implicit", 1.0),
    ("sqeuclidean", "divergence", "unrolled", 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _DTYPE_CASES, ids=_case_id)
def test_matches_oracle_low_precision(backend: Backend, case: tuple, dtype: torch.dtype) -> None:
    """float32 and bfloat16 points, through ``sinkhorn_loss(reduction="none")``: the oracle
    runs on the same (bf16-rounded) inputs, tolerances from :data:`TOL` for that dtype."""
    _not_oracle(backend)
    if _slow(backend) and (_DTYPE_CASES.index(case) + (dtype == torch.bfloat16)) % 2:
        pytest.skip("reduced grid under the Triton interpreter")
    cost, objective, grad, rho = case
    P = make_problem(seed=7 + len(_case_id(case)), scale=SCALE[cost])
    got = solve(backend, P, cost, objective, grad, rho, dtype=dtype, api="loss")
    want = solve(ORACLE, P, cost, objective, grad, rho, dtype=dtype, api="loss")
    assert got["dx"].dtype == dtype and got["dy"].dtype == dtype
    compare(got, want, P, dtype, rho, f"{backend.name} {_case_id(case)} {dtype}")


@pytest.mark.parametrize(
    "n, m, cost, grad",
    [
        (1, 1, "cosine", "implicit"),
        (1, 7, "sqeuclidean", "unrolled"),
        (7, 1, "dot", "envelope"),
        (33, 7, "cosine", "unrolled"),
        (7, 127, "sqeuclidean", "implicit"),
        (127, 33, "matrix", "envelope"),
    ],
)
def test_sizes(backend: Backend, n: int, m: int, cost: str, grad: str) -> None:
    """n or m = 1 and odd sizes 1/7/33/127, all points valid in problem 0 (the padded size is
    the size), ragged in problem 1."""
    _not_oracle(backend)
    P = make_problem(B=2, n=n, m=m, seed=n * 131 + m, scale=SCALE[cost], full_first=True)
    got = solve(backend, P, cost, "linear", grad, None)
    want = solve(ORACLE, P, cost, "linear", grad, None)
    compare(got, want, P, torch.float64, None, f"{backend.name} n={n} m={m} {cost} {grad}")


def test_converged_stopping(backend: Backend) -> None:
    """With a loose ``tol`` the problems of a batch stop at different checks: ``n_iters`` (a
    multiple of ``check_every``) and ``err`` equal the oracle's, balanced and unbalanced."""
    _not_oracle(backend)
    for rho in RHOS:
        P = make_problem(B=3, n=9, m=6, seed=5, scale=0.5)
        got = solve(backend, P, "sqeuclidean", "entropic", "envelope", rho, tol=1e-4)
        want = solve(ORACLE, P, "sqeuclidean", "entropic", "envelope", rho, tol=1e-4)
        assert (want["n_iters"] % 10 == 0).all()
        compare(got, want, P, torch.float64, rho, f"{backend.name} tol=1e-4 rho={rho}")


# --------------------------------------------------------------------------- properties
def _permuted(P: Problem, seed: int) -> tuple[Problem, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pi = torch.randperm(P.x.shape[1], generator=gen)
    sigma = torch.randperm(P.y.shape[1], generator=gen)
    Q = Problem(P.x[:, pi], P.y[:, sigma], P.x_mask[:, pi], P.y_mask[:, sigma], P.a[:, pi],
                P.b[:, sigma], P.w)  # fmt: skip
    return Q, pi, sigma


@pytest.mark.parametrize(
    "cost, objective, grad, rho",
    [("cosine", "linear", "implicit", None), ("sqeuclidean", "divergence", "unrolled", 1.0)],
)
def test_permutation_invariance(backend: Backend, cost: str, objective: str, grad: str,
                                rho: float | None) -> None:
    """Permuting the points of x and of y (with their masks and weights) permutes the
    potentials and gradients and leaves the values unchanged."""
    P = make_problem(B=2, n=8, m=6, seed=11, scale=SCALE[cost])
    Q, pi, sigma = _permuted(P, seed=12)
    r = solve(backend, P, cost, objective, grad, rho)
    s = solve(backend, Q, cost, objective, grad, rho)
    dt = torch.float64
    close(s["value"], r["value"], dt, "value", "value")
    close(s["value_linear"], r["value_linear"], dt, "value", "value_linear")
    close(s["dx"], r["dx"][:, pi], dt, "grad", "dx")
    close(s["dy"], r["dy"][:, sigma], dt, "grad", "dy")
    close(s["f"], r["f"][:, pi], dt, "potential", "f")
    close(s["g"], r["g"][:, sigma], dt, "potential", "g")


def test_divergence_symmetry(backend: Backend) -> None:
    """``D(x, y) = D(y, x)`` and ``D(x, x) = 0`` (balanced)."""
    P = make_problem(B=2, n=7, m=5, seed=21, scale=0.5)
    swapped = Problem(P.y, P.x, P.y_mask, P.x_mask, P.b, P.a, P.w)
    same = Problem(P.x, P.x, P.x_mask, P.x_mask, P.a, P.a, P.w)
    r = solve(backend, P, "sqeuclidean", "divergence", "envelope", None)
    s = solve(backend, swapped, "sqeuclidean", "divergence", "envelope", None)
    z = solve(backend, same, "sqeuclidean", "divergence", "envelope", None)
    dt = torch.float64
    close(s["value"], r["value"], dt, "value", "D(y, x) vs D(x, y)")
    close(s["dx"], r["dy"], dt, "grad", "dD(y, x)/dy vs dD(x, y)/dx")
    assert (r["value"].abs() > 1e-3).all(), "the problems are degenerate"
    close(z["value"], torch.zeros_like(z["value"]), dt, "value", "D(x, x)")


def _assignment(C: torch.Tensor) -> float:
    """Exact OT between uniform measures of equal size n: min over permutations (n ≤ 6)."""
    n = C.shape[0]
    return min(sum(C[i, p[i]].item() for i in range(n)) for p in
               itertools.permutations(range(n))) / n  # fmt: skip


def test_small_eps_limit(backend: Backend) -> None:
    """ε → 0: ``<P, C>`` tends to the exact (assignment) OT cost; reached through ε-scaling."""
    P = make_problem(B=2, n=5, m=5, d=3, seed=31, ragged=False)
    P.a.fill_(1.0)
    P.b.fill_(1.0)
    eps = 1e-3
    r = solve(backend, P, "cosine", "linear", "envelope", None, eps=eps, tol=1e-6,
              eps_schedule=(1.0, 0.7))  # fmt: skip
    C = cost_matrix(P.x, P.y, "cosine", P.x_mask, P.y_mask)
    exact = torch.tensor([_assignment(C[k]) for k in range(C.shape[0])], dtype=torch.float64)
    close(r["value_linear"], exact, torch.float64, "limit", "<P, C> vs assignment")
    assert (r["value_linear"] >= exact - 1e-9).all(), "below the exact OT cost"


def test_large_eps_limit(backend: Backend) -> None:
    """ε → ∞: ``P → a⊗b``, so ``<P, C> → Σ a_i b_j C_ij`` (error O(1/ε))."""
    P = make_problem(B=2, n=6, m=4, seed=41)
    r = solve(backend, P, "cosine", "linear", "envelope", None, eps=1e3, max_iter=20)
    va, vb = P.x_mask, P.y_mask
    a = torch.where(va, P.a, 0.0)
    b = torch.where(vb, P.b, 0.0)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    C = cost_matrix(P.x, P.y, "cosine", va, vb)
    C = torch.where(va[:, :, None] & vb[:, None, :], C, 0.0)
    indep = torch.einsum("bi,bj,bij->b", a, b, C)
    close(r["value_linear"], indep, torch.float64, "limit", "<P, C> vs <a⊗b, C>")


# --------------------------------------------------------------------------- edge cases
def _assert_zero(res: dict, what: str) -> None:
    for key in ("value", "dx", "dy"):
        assert torch.isfinite(res[key].double()).all(), f"{what}: {key} has NaN/Inf"
        assert (res[key] == 0).all(), f"{what}: {key} is not 0: {res[key]}"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("grad", GRADS)
def test_fully_masked_batch(backend: Backend, grad: str, objective: str) -> None:
    """Every problem of the batch fully masked (both sides, or x only): value 0, gradient 0,
    no NaN."""
    if _slow(backend) and (GRADS.index(grad) + OBJECTIVES.index(objective)) % 3:
        pytest.skip("reduced grid under the Triton interpreter")
    P = make_problem(B=2, n=5, m=4, seed=51)
    P.x_mask[:] = False
    P.y_mask[0] = False  # problem 0: neither side has a point; problem 1: no x point
    res = solve(backend, P, "cosine", objective, grad, None)
    _assert_zero(res, f"{backend.name} all masked")
    assert res["empty"].all() and (res["n_iters"] == 0).all() and (res["err"] == 0).all()


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("grad", GRADS)
def test_empty_problem_in_batch(backend: Backend, grad: str, rho: float | None) -> None:
    """Problems with no valid x point, no valid y point or neither, next to normal ones: those
    give 0 and a zero gradient, the others the oracle's results."""
    if _slow(backend) and (GRADS.index(grad) + RHOS.index(rho)) % 2:
        pytest.skip("reduced grid under the Triton interpreter")
    P = make_problem(B=4, n=6, m=5, seed=61, empty_rows=(0, 1, 2), scale=0.5)
    got = solve(backend, P, "dot", "entropic", grad, rho)
    want = solve(ORACLE, P, "dot", "entropic", grad, rho)
    empty = torch.tensor([True, True, True, False])
    assert torch.equal(got["empty"], empty)
    assert (got["value"][empty] == 0).all() and (got["dx"][empty] == 0).all()
    assert (got["dy"][empty] == 0).all()
    compare(got, want, P, torch.float64, rho, f"{backend.name} empty rows {grad} rho={rho}")


@pytest.mark.parametrize("sizes", [(0, 4), (4, 0), (0, 0)])
def test_zero_size(backend: Backend, sizes: tuple[int, int]) -> None:
    """n = 0 or m = 0 (no points at all): value 0, gradients of the right (empty) shape."""
    n, m = sizes
    P = make_problem(B=2, n=n, m=m, seed=71)
    combos = [("linear", "implicit"), ("divergence", "unrolled")]
    if _slow(backend):
        combos = combos[sum(sizes) % 2:][:1]
    for objective, grad in combos:
        res = solve(backend, P, "sqeuclidean", objective, grad, None, max_iter=20, tol=0.0)
        _assert_zero(res, f"{backend.name} n={n} m={m} {objective}")
        assert res["dx"].shape == P.x.shape and res["dy"].shape == P.y.shape
        assert res["value"].shape == (2,)



def test_batch_of_zero_problems(backend: Backend) -> None:
    """B = 0: values of shape [0], gradients of the inputs' (empty) shapes."""
    z = lambda *shape, dt=torch.float64: torch.zeros(shape, dtype=dt)  # noqa: E731
    P = Problem(z(0, 4, 5), z(0, 3, 5), z(0, 4, dt=torch.bool), z(0, 3, dt=torch.bool),
                z(0, 4), z(0, 3), z(0))  # fmt: skip
    for cost in ("cosine", "matrix"):
        res = solve(backend, P, cost, "linear", "implicit", None, max_iter=20, tol=0.0)
        assert res["value"].shape == (0,) and res["f"].shape == (0, 4) and res["g"].shape == (0, 3)
        assert res["dx"].shape == P.x.shape and res["dy"].shape == P.y.shape
