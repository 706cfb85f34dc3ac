"""Triton backend (resident kernels) against the torch reference, under TRITON_INTERPRET=1.

Without CUDA the Triton interpreter executes the kernels on CPU torch tensors (this module
sets ``TRITON_INTERPRET=1`` when it is the first to import triton; CI sets it globally). With
CUDA (and the variable unset) the same tests run the compiled kernels on the GPU. Shapes are
small to keep the interpreter fast; real sizes run on CUDA in ``tests/gpu/``.

Tolerances (normwise: ``max|got − ref| ≤ rtol · max|ref|``): forward 1e-5 and gradients 1e-4
in fp32, 1e-9 in fp64, bf16 inputs: forward 1e-5 against the reference on the same
(upcast) values, gradients 2e-2 (dx is rounded to bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # CPU CI: run the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import optical_kernels.backends.triton as T  # noqa: E402
from optical_kernels.backends import torch as R  # noqa: E402
from optical_kernels.backends.triton import launch  # noqa: E402
from optical_kernels.config import SolverConfig  # noqa: E402
from optical_kernels.costs import centre, cost_matrix, cost_vjp  # noqa: E402

_RES = sys.modules["optical_kernels.backends.triton.resident"]


if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (or a GPU)", allow_module_level=True)
if not T.is_available()[0]:
    pytest.skip(f"triton backend unavailable: {T.is_available()[1]}", allow_module_level=True)

# The interpreter evaluates both sides of tl.where with numpy: 0/0 and log2(0) in discarded
# lanes warn there (on the GPU they are silent and never selected).
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
]

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def close(got: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "",
          floor: float = 1e-6) -> None:
    """Normwise relative check ``max|got − ref| ≤ rtol · max(max|ref|, floor)``."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, floor)
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e}"


def weights(B: int, n: int, lengths: list[int] | None, dtype: torch.dtype, gen: torch.Generator,
            uniform: bool = False, normalise: bool = True) -> torch.Tensor:
    """Random positive weights [B, n], 0 past each problem's length, rows summing to 1."""
    w = torch.ones(B, n, dtype=torch.float64) if uniform else \
        torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.1
    if lengths is not None:
        w = w * (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None])
    if normalise:
        w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
    return w.to(dtype).to(DEV)


def points(B: int, n: int, m: int, d: int, a: torch.Tensor, b: torch.Tensor, cost: str,
           dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated random points (padded rows 0; centred for sqeuclidean, as the API does)."""
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64)
    k = min(n, m)
    y[:, :k] = 0.6 * x[:, :k] + 0.8 * y[:, :k]
    xv, yv = (a > 0).cpu(), (b > 0).cpu()
    if cost == "sqeuclidean":
        x = x * 0.3 + 2.0  # off-centre: the API centres both sets before the backend
        y = y * 0.3 + 2.0
        x, y = centre(x, y, xv, yv)
    x = torch.where(xv[..., None], x, 0.0)
    y = torch.where(yv[..., None], y, 0.0)
    return x.to(dtype).to(DEV), y.to(dtype).to(DEV)


def masked_cost(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                cost: str) -> torch.Tensor:
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = cost_matrix(x.to(work), y.to(work), cost)
    return torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0).contiguous()


def cfg_of(**kw: object) -> SolverConfig:
    base = dict(eps=0.1, max_iter=20, tol=1e-4, check_every=5)
    base.update(kw)
    return SolverConfig(**base)  # type: ignore[arg-type]


def check_forward(out, ref, rtol: float, mass: float = 1.0) -> None:  # noqa: ANN001
    """Compare every output; ``err`` (a difference of marginals) relative to the mass."""
    for name in ("f", "g", "value", "value_linear"):
        close(getattr(out, name), getattr(ref, name), rtol, name)
    # err = Σ|r − a| cancels: its absolute error is ~ulp·(max C/ε)·mass, hence 10·rtol·mass
    close(out.err, ref.err, 10 * rtol, "err", floor=mass)
    assert out.n_iters.dtype == torch.int32
    assert out.n_iters.tolist() == ref.n_iters.tolist(), (out.n_iters, ref.n_iters)


GRADS = [torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.7, 1.0, 0.0])]


def grad_weights(B: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    gv = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    gl = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    return gv.to(dtype).to(DEV), gl.to(dtype).to(DEV)


# --------------------------------------------------------------------------- given C
@pytest.mark.parametrize("rho", [None, 0.5])
@pytest.mark.parametrize(
    "n,m,lengths_a,lengths_b",
    [(1, 1, None, None), (7, 5, [7, 3, 6], [5, 5, 2]), (33, 17, [33, 1, 20], [17, 9, 17])],
)
def test_forward_given_cost(rho, n, m, lengths_a, lengths_b) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(n * 100 + m)
    B = 3
    a = weights(B, n, lengths_a, torch.float32, gen, normalise=rho is None)
    b = weights(B, m, lengths_b, torch.float32, gen, normalise=rho is None)
    C = torch.rand(B, n, m, generator=gen).to(DEV)
    C = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0)
    cfg = cfg_of(rho=rho, eps=0.05)
    check_forward(T.forward(C, a, b, cfg), R.forward(C, a, b, cfg), 1e-5)


@pytest.mark.parametrize("form", ["log", "scaling"])
@pytest.mark.parametrize("rho", [None, 1.0])
def test_forward_eps_schedule_and_forms(form: str, rho: float | None) -> None:
    gen = torch.Generator().manual_seed(3)
    B, n, m = 3, 12, 9
    a = weights(B, n, [12, 5, 9], torch.float32, gen, normalise=rho is None)
    b = weights(B, m, [9, 9, 4], torch.float32, gen, normalise=rho is None)
    C = torch.rand(B, n, m, generator=gen).to(DEV) * 2.0
    C = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0)
    cfg = cfg_of(rho=rho, eps=0.02, eps_schedule=(1.0, 0.5), max_iter=30, tol=1e-3,
                 check_every=3)
    with launch.override(form=form):
        out = T.forward(C, a, b, cfg)
    check_forward(out, R.forward(C, a, b, cfg), 1e-5)


def test_scaling_form_absorbs_without_nan() -> None:
    """Small ε relative to the cost range: exp(−C/ε) underflows; absorption keeps it exact."""
    gen = torch.Generator().manual_seed(5)
    B, n, m = 2, 16, 16
    a = weights(B, n, None, torch.float32, gen)
    b = weights(B, m, None, torch.float32, gen)
    C = torch.rand(B, n, m, generator=gen).to(DEV) * 10.0
    cfg = cfg_of(eps=0.01, max_iter=40, tol=0.0)
    with launch.override(form="scaling"):
        out = T.forward(C, a, b, cfg)
    check_forward(out, R.forward(C, a, b, cfg), 1e-5)


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
@pytest.mark.parametrize("rho", [None, 0.5])
def test_backward_given_cost(grad: str, rho: float | None) -> None:
    gen = torch.Generator().manual_seed(11)
    B, n, m = 3, 9, 6
    a = weights(B, n, [9, 4, 7], torch.float32, gen, normalise=rho is None)
    b = weights(B, m, [6, 6, 3], torch.float32, gen, normalise=rho is None)
    C = torch.rand(B, n, m, generator=gen).to(DEV)
    C = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0)
    sched = (0.4, 0.5) if grad == "unrolled" else None
    cfg = cfg_of(rho=rho, grad=grad, eps_schedule=sched, tol=1e-3 if grad == "unrolled" else 1e-5,
                 max_iter=25)
    out, ref = T.forward(C, a, b, cfg), R.forward(C, a, b, cfg)
    check_forward(out, ref, 1e-5)
    if grad == "unrolled":
        assert out.history is not None and out.history[0].shape == (cfg.max_iter, B, n)
    gv, gl = grad_weights(B, torch.float32, gen)
    G = T.backward(C, a, b, out, gv, gl, cfg)
    close(G, R.backward(C, a, b, ref, gv, gl, cfg), 1e-4, "G")


def test_unrolled_without_history_gives_direct_partials() -> None:
    gen = torch.Generator().manual_seed(12)
    B, n, m = 3, 5, 4
    a, b = weights(B, n, None, torch.float32, gen), weights(B, m, None, torch.float32, gen)
    C = torch.rand(B, n, m, generator=gen).to(DEV)
    cfg = cfg_of(grad="unrolled")
    ref = R.forward(C, a, b, cfg)._replace(history=None)
    gv, gl = grad_weights(B, torch.float32, gen)
    close(T.backward(C, a, b, ref, gv, gl, cfg), R.backward(C, a, b, ref, gv, gl, cfg), 1e-4)


# --------------------------------------------------------------------------- fused cost
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
def test_sample_forward_backward(cost: str, grad: str) -> None:
    gen = torch.Generator().manual_seed(len(cost) * 31 + len(grad))
    B, n, m, d = 3, 7, 10, 40  # d > BD: exercises the d-loop and its tail
    a = weights(B, n, [7, 2, 5], torch.float32, gen)
    b = weights(B, m, [10, 10, 1], torch.float32, gen)
    x, y = points(B, n, m, d, a, b, cost, torch.float32, gen)
    eps = {"cosine": 0.05, "sqeuclidean": 0.5, "dot": 0.5}[cost]
    cfg = cfg_of(eps=eps, grad=grad, max_iter=20)
    C = masked_cost(x, y, a, b, cost)
    out, ref = T.forward_sample(x, y, a, b, cost, cfg), R.forward(C, a, b, cfg)
    check_forward(out, ref, 1e-5)
    gv, gl = grad_weights(B, torch.float32, gen)
    dx, dy = T.backward_sample(x, y, a, b, cost, out, gv, gl, cfg, need_dy=True)
    G = R.backward(C, a, b, ref, gv, gl, cfg)
    dx_ref, dy_ref = cost_vjp(G, x, y, cost, True)
    close(dx, dx_ref, 1e-4, "dx")
    close(dy, dy_ref, 1e-4, "dy")
    dx2, dy2 = T.backward_sample(x, y, a, b, cost, out, gv, gl, cfg, need_dy=False)
    assert dy2 is None
    close(dx2, dx_ref, 1e-4, "dx (no dy)")


def test_sample_cosine_zero_vector_and_unbalanced() -> None:
    gen = torch.Generator().manual_seed(21)
    B, n, m, d = 2, 6, 5, 16
    a = weights(B, n, None, torch.float32, gen, normalise=False)
    b = weights(B, m, None, torch.float32, gen, normalise=False)
    x, y = points(B, n, m, d, a, b, "cosine", torch.float32, gen)
    x[0, 2] = 0.0  # a valid zero vector: ‖x‖ < 1e-8 is clamped, no projection
    cfg = cfg_of(eps=0.05, rho=0.3, grad="unrolled")
    C = masked_cost(x, y, a, b, "cosine")
    out, ref = T.forward_sample(x, y, a, b, "cosine", cfg), R.forward(C, a, b, cfg)
    check_forward(out, ref, 1e-5)
    gv, gl = grad_weights(B, torch.float32, gen)
    dx, dy = T.backward_sample(x, y, a, b, "cosine", out, gv, gl, cfg, need_dy=True)
    dx_ref, dy_ref = cost_vjp(R.backward(C, a, b, ref, gv, gl, cfg), x, y, "cosine", True)
    close(dx, dx_ref, 1e-4, "dx")
    close(dy, dy_ref, 1e-4, "dy")


def test_mask_holes_and_strided_inputs() -> None:
    """Zero weights inside a problem (not only trailing) and non-contiguous x, y, C, a."""
    gen = torch.Generator().manual_seed(33)
    B, n, m, d = 2, 9, 7, 20
    a = weights(B, n, None, torch.float32, gen)
    b = weights(B, m, None, torch.float32, gen)
    a[0, 3] = a[1, 0] = b[0, 6] = b[1, 2] = 0.0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    x, y = points(B, n, m, 2 * d, a, b, "dot", torch.float32, gen)
    x, y = x[:, :, ::2], y[:, :, 1::2]  # d-stride 2
    a_s = torch.stack([a, a]).transpose(0, 1)[:, 0]  # non-unit batch stride
    cfg = cfg_of(eps=0.5, grad="implicit")
    C = masked_cost(x, y, a, b, "dot")
    out, ref = T.forward_sample(x, y, a_s, b, "dot", cfg), R.forward(C, a, b, cfg)
    check_forward(out, ref, 1e-5)
    gv, gl = grad_weights(B, torch.float32, gen)
    dx, dy = T.backward_sample(x, y, a_s, b, "dot", out, gv, gl, cfg, need_dy=True)
    dx_ref, dy_ref = cost_vjp(R.backward(C, a, b, ref, gv, gl, cfg), x, y, "dot", True)
    close(dx, dx_ref, 1e-4, "dx")
    close(dy, dy_ref, 1e-4, "dy")
    Ct = C.transpose(1, 2).contiguous().transpose(1, 2)  # column-major C
    out2 = T.forward(Ct, a, b, cfg)
    check_forward(out2, ref, 1e-5)
    close(T.backward(Ct, a, b, out2, gv, gl, cfg), R.backward(C, a, b, ref, gv, gl, cfg), 1e-4,
          "G")


def test_size_127_resident_tile() -> None:
    gen = torch.Generator().manual_seed(127)
    B, n, m, d = 2, 127, 127, 24
    a = weights(B, n, [127, 60], torch.float32, gen)
    b = weights(B, m, [127, 127], torch.float32, gen)
    x, y = points(B, n, m, d, a, b, "cosine", torch.float32, gen)
    cfg = cfg_of(eps=0.05, grad="implicit", max_iter=10, tol=0.0, cg_max_iter=30)
    C = masked_cost(x, y, a, b, "cosine")
    out, ref = T.forward_sample(x, y, a, b, "cosine", cfg), R.forward(C, a, b, cfg)
    check_forward(out, ref, 1e-5)
    gv, gl = grad_weights(B, torch.float32, gen)
    dx, _ = T.backward_sample(x, y, a, b, "cosine", out, gv, gl, cfg, need_dy=False)
    dx_ref, _ = cost_vjp(R.backward(C, a, b, ref, gv, gl, cfg), x, y, "cosine", False)
    close(dx, dx_ref, 1e-4, "dx")


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_float64(grad: str) -> None:
    gen = torch.Generator().manual_seed(64)
    B, n, m, d = 3, 6, 5, 20
    a = weights(B, n, [6, 3, 6], torch.float64, gen)
    b = weights(B, m, [5, 5, 2], torch.float64, gen)
    x, y = points(B, n, m, d, a, b, "sqeuclidean", torch.float64, gen)
    cfg = cfg_of(eps=0.3, grad=grad, eps_schedule=(2.0, 0.7), tol=1e-7, max_iter=40)
    C = masked_cost(x, y, a, b, "sqeuclidean")
    out, ref = T.forward_sample(x, y, a, b, "sqeuclidean", cfg), R.forward(C, a, b, cfg)
    assert out.f.dtype == torch.float64
    check_forward(out, ref, 1e-9)
    gv, gl = grad_weights(B, torch.float64, gen)
    dx, dy = T.backward_sample(x, y, a, b, "sqeuclidean", out, gv, gl, cfg, need_dy=True)
    assert dx.dtype == torch.float64
    dx_ref, dy_ref = cost_vjp(R.backward(C, a, b, ref, gv, gl, cfg), x, y, "sqeuclidean", True)
    close(dx, dx_ref, 1e-8, "dx")
    close(dy, dy_ref, 1e-8, "dy")
    G = T.backward(C, a, b, T.forward(C, a, b, cfg), gv, gl, cfg)
    close(G, R.backward(C, a, b, ref, gv, gl, cfg), 1e-8, "G")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(16)
    B, n, m, d = 2, 8, 6, 48
    a = weights(B, n, [8, 5], torch.float32, gen)
    b = weights(B, m, [6, 4], torch.float32, gen)
    x, y = points(B, n, m, d, a, b, "cosine", dtype, gen)
    cfg = cfg_of(eps=0.05, grad="implicit")
    xf, yf = x.float(), y.float()  # the same values, upcast: the kernel must agree with them
    C = masked_cost(xf, yf, a, b, "cosine")
    out, ref = T.forward_sample(x, y, a, b, "cosine", cfg), R.forward(C, a, b, cfg)
    assert out.f.dtype == torch.float32
    check_forward(out, ref, 1e-5)
    gv, gl = grad_weights(B, torch.float32, gen)
    dx, dy = T.backward_sample(x, y, a, b, "cosine", out, gv, gl, cfg, need_dy=True)
    assert dx.dtype == dtype and dy.dtype == dtype
    dx_ref, dy_ref = cost_vjp(R.backward(C, a, b, ref, gv, gl, cfg), xf, yf, "cosine", True)
    close(dx, dx_ref, 2e-2, "dx")
    close(dy, dy_ref, 2e-2, "dy")


def test_dtype_rules() -> None:
    gen = torch.Generator().manual_seed(1)
    a = weights(1, 4, None, torch.float32, gen)
    b = weights(1, 3, None, torch.float32, gen)
    x = torch.randn(1, 4, 8).to(DEV)
    cfg = cfg_of()
    with pytest.raises(TypeError, match="same dtype"):
        T.forward_sample(x, torch.randn(1, 3, 8).to(DEV).bfloat16(), a, b, "cosine", cfg)
    with pytest.raises(TypeError, match="float32 or float64"):
        T.forward(torch.rand(1, 4, 3).to(DEV).half(), a, b, cfg)
    with pytest.raises(ValueError, match="cost"):
        T.forward_sample(x, torch.randn(1, 3, 8).to(DEV), a, b, "l1", cfg)


# --------------------------------------------------------------------------- edge cases
def test_empty_and_nan_problems_are_isolated() -> None:
    gen = torch.Generator().manual_seed(7)
    B, n, m, d = 4, 5, 4, 8
    a = weights(B, n, [5, 0, 5, 5], torch.float32, gen)
    b = weights(B, m, [4, 4, 0, 4], torch.float32, gen)
    x, y = points(B, n, m, d, a, b, "cosine", torch.float32, gen)
    x[3, 1, 0] = float("nan")  # garbage in problem 3 only
    cfg = cfg_of(eps=0.05, grad="implicit")
    out = T.forward_sample(x, y, a, b, "cosine", cfg)
    for k in (1, 2):  # empty problems
        assert out.n_iters[k].item() == 0
        for t in (out.value[k], out.value_linear[k], out.err[k]):
            assert t.item() == 0.0
        assert (out.f[k] == 0).all() and (out.g[k] == 0).all()
    C = masked_cost(x[:1], y[:1], a[:1], b[:1], "cosine")
    ref = R.forward(C, a[:1], b[:1], cfg)
    close(out.f[:1], ref.f, 1e-5, "f of the healthy problem")
    gv, gl = grad_weights(B, torch.float32, gen)
    dx, dy = T.backward_sample(x, y, a, b, "cosine", out, gv, gl, cfg, need_dy=True)
    assert torch.isfinite(dx[:3]).all() and torch.isfinite(dy[:3]).all()
    assert (dx[1:3] == 0).all() and (dy[1:3] == 0).all()
    # padded positions hold 0 gradient and 0 potentials
    assert (dx[0][a[0] == 0] == 0).all()


def test_garbage_in_padded_entries_does_not_leak() -> None:
    gen = torch.Generator().manual_seed(8)
    B, n, m = 2, 6, 5
    a = weights(B, n, [4, 6], torch.float32, gen)
    b = weights(B, m, [5, 3], torch.float32, gen)
    C = torch.rand(B, n, m, generator=gen).to(DEV)
    C_clean = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0)
    C_dirty = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, float("inf"))
    cfg = cfg_of(grad="implicit")
    out, ref = T.forward(C_dirty, a, b, cfg), R.forward(C_clean, a, b, cfg)
    check_forward(out, ref, 1e-5)


def test_schedule_args_match_config() -> None:
    for eps, start, factor, max_iter in [(0.05, 1.0, 0.5, 100), (0.1, 0.1, 0.5, 10),
                                         (0.01, 2.0, 0.9, 20), (0.3, 1.0, 0.75, 100)]:
        cfg = SolverConfig(eps=eps, eps_schedule=(start, factor), max_iter=max_iter)
        t_eps, _, _ = _RES.schedule_args(eps, max_iter, start, factor)
        expect = next((t for t in range(1, max_iter + 1) if cfg.eps_at(t) == eps), max_iter + 1)
        assert t_eps == expect


def test_routing_beyond_resident_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optical_kernels.backends.triton.streaming", None)
    n = launch.RESIDENT_MAX + 1
    C = torch.zeros(1, n, 2).to(DEV)
    with pytest.raises(NotImplementedError, match="streaming"):
        T.forward(C, torch.ones(1, n).to(DEV) / n, torch.ones(1, 2).to(DEV) / 2, cfg_of())
    with launch.override(kernel="resident"), pytest.raises(ValueError, match="resident"):
        T.forward(C, torch.ones(1, n).to(DEV) / n, torch.ones(1, 2).to(DEV) / 2, cfg_of())


def test_is_available_and_supports() -> None:
    ok, why = T.is_available()
    assert ok, why
    assert T.supports(torch.device(DEV), torch.bfloat16)
    assert not T.supports(torch.device(DEV), torch.int32)


# --------------------------------------------------------------------------- custom ops
def test_custom_ops_opcheck() -> None:
    """opcheck of the custom ops (ops.py, the one custom-op layer) with the triton backend
    behind them: the backend itself is plain Python over its kernels."""
    from optical_kernels import ops

    gen = torch.Generator().manual_seed(9)
    B, n, m, d = 2, 4, 3, 8
    a = weights(B, n, None, torch.float32, gen)
    b = weights(B, m, None, torch.float32, gen)
    x, y = points(B, n, m, d, a, b, "cosine", torch.float32, gen)
    scal = (0.1, None, 5, 0.0, 5, None, None, "unrolled")
    fwd_args = (x, y, a, b, "cosine", "triton", *scal)
    torch.library.opcheck(ops.sinkhorn_sample_op, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    outs = ops.sinkhorn_sample_op(*fwd_args)
    gv, gl = torch.ones(B), torch.ones(B)
    bwd_args = (x, y, a, b, *outs, gv, gl, True, "cosine", "triton", *scal)
    torch.library.opcheck(ops.sinkhorn_sample_backward_op, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_ops() -> None:
    """Dynamo + AOTAutograd trace the custom ops through their fake implementations
    (``aot_eager``: no inductor codegen, so it is cheap on CPU)."""
    from optical_kernels import ops

    gen = torch.Generator().manual_seed(13)
    B, n, m, d = 2, 5, 4, 8
    a = weights(B, n, None, torch.float32, gen)
    b = weights(B, m, None, torch.float32, gen)
    x, y = points(B, n, m, d, a, b, "cosine", torch.float32, gen)
    cfg = cfg_of(grad="implicit", max_iter=10)
    scal = ops.config_args(cfg)

    def loss(x_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = ops.sinkhorn_sample_op(x_, y, a, b, "cosine", "triton", *scal)
        gv = torch.ones_like(outs[2])
        dx, _ = ops.sinkhorn_sample_backward_op(x_, y, a, b, *outs, gv, gv, False, "cosine",
                                                "triton", *scal)
        return outs[3], dx

    torch._dynamo.reset()
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(x)
    want = loss(x)
    close(got[0], want[0], 1e-6, "value_linear")
    close(got[1], want[1], 1e-6, "dx")


# --------------------------------------------------------------------------- compiled mode
def test_kernels_compile_for_sm90() -> None:
    """Compile real (non-interpreted) kernels for sm_90 with triton's ptxas; no GPU needed."""
    script = ROOT / "tests" / "gpu" / "aot_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("ptxas unavailable")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
