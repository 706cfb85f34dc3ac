"""The fused C++ ``cpu`` backend against the ``torch`` reference (the oracle).

Random ragged batches with arbitrary (non-prefix) masks, empty and fully masked problems,
odd sizes, float32 and float64, balanced and unbalanced, ε-scaling, early stopping (``n_iters``
must match exactly) and every gradient mode. Skipped when ``optical_kernels._cpu`` is not built.
"""

from __future__ import annotations

import pytest
import torch

from optical_kernels.backends import cpu
from optical_kernels.backends import torch as ref
from optical_kernels.config import SolverConfig

pytestmark = pytest.mark.skipif(not cpu.is_available()[0], reason=cpu.is_available()[1])

# Tolerances, relative to max(1, max |reference|). Float64 is compared with the float64
# reference directly. Float32 is compared with the float64 reference run on the same
# (float32-rounded) data, i.e. with the exact answer: P carries a relative error of about
# ulp(C)/ε ≈ 1e-6 in any float32 implementation (the float32 reference included), so values
# and the marginal error cannot agree better than that; the float32 reference is then checked
# too, at twice those tolerances. ``n_iters`` must match exactly.
FWD_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
VAL_TOL = {torch.float32: 2e-6, torch.float64: 1e-10}
ERR_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-9}


def make_batch(
    B: int,
    n: int,
    m: int,
    dtype: torch.dtype,
    seed: int = 0,
    ragged: bool = True,
    balanced: bool = True,
    scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C [B, n, m] (0 at padded entries), weights a [B, n], b [B, m] (0 = masked)."""
    gen = torch.Generator().manual_seed(seed)
    C = torch.rand(B, n, m, generator=gen, dtype=torch.float64) * scale
    a = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.1
    if ragged:
        keep_a = torch.rand(B, n, generator=gen) < 0.8
        keep_b = torch.rand(B, m, generator=gen) < 0.8
        keep_a[:, 0] |= ~keep_a.any(1)  # mostly non-empty; explicit empties are added below
        keep_b[:, -1] |= ~keep_b.any(1)
        if B >= 3:
            keep_a[1] = False  # empty (no valid row)
            keep_b[2] = False  # empty (no valid column)
        a = torch.where(keep_a, a, 0.0)
        b = torch.where(keep_b, b, 0.0)
    if balanced:
        a = a / a.sum(1, keepdim=True).clamp_min(1e-300)
        b = b / b.sum(1, keepdim=True).clamp_min(1e-300)
    C = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0)
    return C.to(dtype), a.to(dtype), b.to(dtype)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max()) / max(1.0, float(y.abs().max())) if y.numel() else 0.0


def check_forward(C, a, b, cfg: SolverConfig, widen: float = 1.0):  # noqa: ANN001, ANN201
    """Run both backends, compare as described at the top; returns (cpu out, reference out).

    ``widen`` scales the float32 tolerances (float32 P has relative error ≈ ulp(C)/ε).
    """
    dtype = C.dtype
    out, want = cpu.forward(C, a, b, cfg), ref.forward(C, a, b, cfg)
    assert torch.equal(out.n_iters, want.n_iters.to(torch.int32))
    for t in (out.f, out.g, out.value, out.value_linear, out.err):
        assert torch.isfinite(t).all()
    exact = want
    if dtype == torch.float32:
        exact = ref.forward(C.double(), a.double(), b.double(), cfg)
        assert torch.equal(exact.n_iters, want.n_iters) or cfg.tol > 0
    w = 1.0 if dtype == torch.float64 else widen
    scale = 1.0 if dtype == torch.float64 else 2.0
    for ref_out, k in ((exact, w), (want, w * scale)):
        if cfg.tol > 0 and not torch.equal(ref_out.n_iters, out.n_iters):
            continue  # float64 may stop at another iteration than float32 does
        assert rel(out.f, ref_out.f) <= k * FWD_TOL[dtype]
        assert rel(out.g, ref_out.g) <= k * FWD_TOL[dtype]
        assert rel(out.value, ref_out.value) <= k * VAL_TOL[dtype]
        assert rel(out.value_linear, ref_out.value_linear) <= k * VAL_TOL[dtype]
        assert rel(out.err, ref_out.err) <= k * ERR_TOL[dtype]
    return out, want


SIZES = [(1, 1), (1, 7), (7, 7), (33, 20), (9, 127), (127, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("rho", [None, 0.5])
def test_forward_matches_reference(dtype: torch.dtype, n: int, m: int, rho: float | None) -> None:
    C, a, b = make_batch(5, n, m, dtype, seed=n * 131 + m, balanced=rho is None)
    check_forward(C, a, b, SolverConfig(eps=0.05, rho=rho, max_iter=60, tol=0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rho", [None, 1.0])
def test_early_stopping_and_eps_schedule(dtype: torch.dtype, rho: float | None) -> None:
    C, a, b = make_batch(8, 24, 17, dtype, seed=3, balanced=rho is None)
    # float32 marginal errors carry ~1e-6 of rounding: keep tol well above it there
    # (the summation order of the vector width and a stop one check apart at the boundary
    # move the float32 stop; 3e-4 stays clear of both)
    small = 1e-6 if dtype == torch.float64 else 3e-4
    for sched, tol, every in [(None, 1e-3, 5), ((2.0, 0.7), 1e-4, 3), ((1.0, 0.5), small, 1)]:
        cfg = SolverConfig(eps=0.05, rho=rho, max_iter=200, tol=tol, check_every=every,
                           eps_schedule=sched)  # fmt: skip
        out, _ = check_forward(C, a, b, cfg)
        nonempty = (a > 0).any(1) & (b > 0).any(1)
        assert (out.n_iters[nonempty] < 200).all()  # stopped early, at the same iteration


def test_small_eps_large_costs_no_nan() -> None:
    """Cost range ≫ ε: the scaling form must fall back / absorb without overflow."""
    for dtype in (torch.float32, torch.float64):
        C, a, b = make_batch(4, 19, 23, dtype, seed=5, scale=50.0)
        # costs up to 50 at ε = 0.05: float32 log P carries ulp(50)/ε ≈ 8e-5 of rounding
        check_forward(C, a, b, SolverConfig(eps=0.05, max_iter=50, tol=0.0), widen=20.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_eps_gradients_finite(dtype: torch.dtype) -> None:
    """ε = 1e-4 × cost range (docs/design.md §2 limit): the plan's support graph splits into blocks
    (more null directions in the implicit system); every output stays finite and the
    gradients match the reference evaluated at the same potentials."""
    C, a, b = make_batch(6, 40, 30, dtype, seed=1, scale=1.0)
    gv, gl = torch.ones(6, dtype=dtype), torch.ones(6, dtype=dtype)
    for grad in ("implicit", "unrolled", "envelope"):
        cfg = SolverConfig(eps=1e-4, max_iter=100, tol=0.0, grad=grad)
        out = cpu.forward(C, a, b, cfg)
        for t in (out.f, out.g, out.value, out.value_linear, out.err):
            assert torch.isfinite(t).all()
        dC = cpu.backward(C, a, b, out, gv, gl, cfg)
        assert torch.isfinite(dC).all()
        if grad != "unrolled":  # same potentials in both backends
            want = ref.backward(C, a, b, out, gv, gl, cfg)
            assert rel(dC, want) <= (1e-9 if dtype == torch.float64 else 2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
@pytest.mark.parametrize("rho", [None, 0.5])
@pytest.mark.parametrize("sched", [None, (1.0, 0.5)])
def test_backward_matches_reference(
    dtype: torch.dtype, grad: str, rho: float | None, sched: tuple | None
) -> None:
    C, a, b = make_batch(6, 13, 21, dtype, seed=11, balanced=rho is None)
    tol = 1e-6 if sched else 0.0
    cfg = SolverConfig(eps=0.1, rho=rho, max_iter=40, tol=tol, check_every=4, eps_schedule=sched,
                       grad=grad)  # fmt: skip
    out, want = cpu.forward(C, a, b, cfg), ref.forward(C, a, b, cfg)
    assert torch.equal(out.n_iters, want.n_iters)
    gen = torch.Generator().manual_seed(1)
    gv = torch.randn(6, generator=gen, dtype=torch.float64).to(dtype)
    gl = torch.randn(6, generator=gen, dtype=torch.float64).to(dtype)
    dC = cpu.backward(C, a, b, out, gv, gl, cfg)
    dC_ref = ref.backward(C, a, b, want, gv, gl, cfg)
    assert torch.isfinite(dC).all()
    assert rel(dC, dC_ref) <= GRAD_TOL[dtype]
    pad = ~((a > 0)[:, :, None] & (b > 0)[:, None, :])
    assert (dC[pad] == 0).all()


def test_implicit_unbalanced_finite_differences() -> None:
    """Unbalanced implicit gradient (not in the reference): check ∂<P*, C>/∂C by FD."""
    C, a, b = make_batch(1, 5, 4, torch.float64, seed=2, ragged=False, balanced=False)
    cfg = SolverConfig(eps=0.2, rho=0.7, max_iter=5000, tol=1e-14, check_every=1,
                       grad="implicit")  # fmt: skip
    out = cpu.forward(C, a, b, cfg)
    dC = cpu.backward(C, a, b, out, torch.zeros(1, dtype=torch.float64),
                      torch.ones(1, dtype=torch.float64), cfg)  # fmt: skip
    h = 1e-6
    fd = torch.zeros_like(C)
    for i in range(5):
        for j in range(4):
            Cp, Cm = C.clone(), C.clone()
            Cp[0, i, j] += h
            Cm[0, i, j] -= h
            vp = cpu.forward(Cp, a, b, cfg).value_linear
            vm = cpu.forward(Cm, a, b, cfg).value_linear
            fd[0, i, j] = float((vp - vm) / (2 * h))
    assert rel(dC, fd) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_implicit_cg_path(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the CG solve (used for min(n, m) > DIRECT_MAX) and compare to the reference."""
    monkeypatch.setattr(cpu, "DIRECT_MAX", 0)
    C, a, b = make_batch(4, 11, 14, dtype, seed=4)
    cfg = SolverConfig(eps=0.1, max_iter=50, tol=0.0, grad="implicit")
    out, want = cpu.forward(C, a, b, cfg), ref.forward(C, a, b, cfg)
    ones = torch.ones(4, dtype=dtype)
    dC = cpu.backward(C, a, b, out, ones, ones, cfg)
    assert rel(dC, ref.backward(C, a, b, want, ones, ones, cfg)) <= 10 * GRAD_TOL[dtype]


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_inner_parallel_path(grad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Problems above PAR_MIN split their products over the threads: same results."""
    monkeypatch.setattr(cpu, "PAR_MIN", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        C, a, b = make_batch(3, 70, 90, torch.float64, seed=9)
        cfg = SolverConfig(eps=0.05, max_iter=30, tol=1e-8, check_every=5, grad=grad)
        out, want = check_forward(C, a, b, cfg)
        ones = torch.ones(3, dtype=torch.float64)
        dC = cpu.backward(C, a, b, out, ones, ones, cfg)
        assert rel(dC, ref.backward(C, a, b, want, ones, ones, cfg)) <= GRAD_TOL[torch.float64]
    finally:
        torch.set_num_threads(threads)


def test_strided_cost() -> None:
    """Non-contiguous C is read through its strides."""
    C, a, b = make_batch(4, 12, 12, torch.float64, seed=6)
    Ct = C.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    cfg = SolverConfig(eps=0.05, max_iter=40, tol=0.0)
    o1, o2 = cpu.forward(C, a, b, cfg), cpu.forward(Ct, a, b, cfg)
    assert torch.equal(o1.f, o2.f) and torch.equal(o1.value, o2.value)


@pytest.mark.parametrize("rho", [None, 0.5])
def test_log_domain_switch_agrees(rho: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain log-domain iterations / reverse pass give the scaling form's results."""
    C, a, b = make_batch(5, 17, 26, torch.float64, seed=12, balanced=rho is None)
    cfg = SolverConfig(eps=0.05, rho=rho, max_iter=50, tol=1e-7, check_every=5,
                       eps_schedule=(1.0, 0.6), grad="unrolled")  # fmt: skip
    gv, gl = torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    o1 = cpu.forward(C, a, b, cfg)
    d1 = cpu.backward(C, a, b, o1, gv, gl, cfg)
    monkeypatch.setattr(cpu, "LOG_DOMAIN", True)
    o2 = cpu.forward(C, a, b, cfg)
    d2 = cpu.backward(C, a, b, o2, gv, gl, cfg)
    assert torch.equal(o1.n_iters, o2.n_iters)
    assert rel(o1.f, o2.f) <= 1e-12 and rel(o1.value, o2.value) <= 1e-12
    assert rel(d1, d2) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rho", [None, 0.5])
@pytest.mark.parametrize("n,m", [(1, 7), (7, 33), (33, 127), (32, 32)])
@pytest.mark.parametrize("schedule", [None, (1.0, 0.5)])
def test_fixed_point_exit_is_exact(
    dtype: torch.dtype,
    rho: float | None,
    n: int,
    m: int,
    schedule: tuple[float, float] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ending the loop at an exact fixed point changes no bit of any output or gradient, and
    it does end the loop early on these well-conditioned problems (docs/design.md §5)."""
    B, T = 6, 400
    C, a, b = make_batch(B, n, m, dtype, seed=n * 131 + m, balanced=rho is None, scale=0.5)
    gv = torch.randn(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    gl = torch.randn(B, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    runs = {}
    for exit_on in (True, False):
        monkeypatch.setattr(cpu, "FIXED_POINT_EXIT", exit_on)
        for grad in ("implicit", "envelope"):
            cfg = SolverConfig(eps=0.1, rho=rho, max_iter=T, tol=0.0, eps_schedule=schedule,
                               grad=grad)  # fmt: skip
            ran = torch.zeros(B, dtype=torch.int32)
            out = cpu.forward(C, a, b, cfg, iters_run=ran)
            dC = cpu.backward(C, a, b, out, gv, gl, cfg)
            runs[exit_on, grad] = (out, dC, ran)
    for grad in ("implicit", "envelope"):
        (o1, d1, r1), (o2, d2, r2) = runs[True, grad], runs[False, grad]
        for name in ("f", "g", "value", "value_linear", "n_iters", "err"):
            assert torch.equal(getattr(o1, name), getattr(o2, name)), (grad, name)
        assert torch.equal(d1, d2), grad
        live = o2.n_iters > 0
        assert torch.equal(r2[live], torch.full_like(r2[live], T))  # exit off: every iteration
        assert bool((r1[live] < T).any()), r1  # exit on: these problems reach a fixed point
        assert bool((r1[~live] == 0).all())


def test_fixed_point_exit_not_with_tol_or_history() -> None:
    """A stopping test (tol > 0) or the unrolled history computes iterations as before."""
    B, T = 4, 300
    C, a, b = make_batch(B, 9, 11, torch.float64, seed=5, ragged=False, scale=0.5)
    ran = torch.zeros(B, dtype=torch.int32)
    out = cpu.forward(C, a, b, SolverConfig(eps=0.1, max_iter=T, tol=0.0, grad="unrolled"),
                      iters_run=ran)  # fmt: skip
    assert torch.equal(ran, torch.full_like(ran, T)) and torch.equal(out.n_iters, ran)
    out = cpu.forward(C, a, b, SolverConfig(eps=0.1, max_iter=T, tol=1e-300, check_every=7),
                      iters_run=ran)  # fmt: skip
    assert torch.equal(ran, out.n_iters) and torch.equal(ran, torch.full_like(ran, T))
    with pytest.raises(ValueError, match="iters_run"):
        cpu.forward(C, a, b, SolverConfig(eps=0.1), iters_run=torch.zeros(B))


def test_history_layout() -> None:
    C, a, b = make_batch(3, 6, 5, torch.float32, seed=7)
    cfg = SolverConfig(eps=0.1, max_iter=12, tol=0.0, grad="unrolled")
    out = cpu.forward(C, a, b, cfg)
    hf, hg = out.history
    assert hf.shape == (12, 3, 6) and hg.shape == (12, 3, 5)
    for k in range(3):
        T = int(out.n_iters[k])
        if T:
            assert torch.allclose(hf[T - 1, k], out.f[k]) and torch.allclose(hg[T - 1, k], out.g[k])
    assert cpu.forward(C, a, b, SolverConfig(eps=0.1, max_iter=12)).history is None


def test_bad_inputs() -> None:
    C, a, b = make_batch(2, 3, 4, torch.float32)
    cfg = SolverConfig(eps=0.1)
    with pytest.raises(ValueError, match="a must have shape"):
        cpu.forward(C, a[:, :2], b, cfg)
    with pytest.raises(ValueError, match="C must have shape"):
        cpu.forward(C[0], a, b, cfg)
    with pytest.raises(TypeError, match="floating"):
        cpu.forward(C.to(torch.int32), a, b, cfg)
    with pytest.raises(ValueError, match="grad must be"):
        out = cpu.forward(C, a, b, cfg)
        cpu.backward(C, a, b, out, None, None, SolverConfig(eps=0.1, grad="nope"))


def test_half_inputs_are_upcast() -> None:
    C, a, b = make_batch(2, 8, 8, torch.float32, seed=8)
    cfg = SolverConfig(eps=0.1, max_iter=20, tol=0.0)
    out = cpu.forward(C.half(), a.half(), b.half(), cfg)
    assert out.f.dtype == torch.float32 and torch.isfinite(out.value).all()
