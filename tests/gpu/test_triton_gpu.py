"""Triton resident kernels on CUDA at real sizes, against the torch reference on the same GPU.

Marked ``gpu``; skipped without a CUDA device. ``OK_GPU_DRYRUN=1`` runs the same code on CPU
under ``TRITON_INTERPRET=1`` with tiny sizes (checks the tests themselves, not the GPU).

Covers docs/design.md §7 shapes S2 (B=256, n=m=64, d=768, fp32 and bf16) and S3 (B=128, ragged
lengths in [4, 128]), both iteration forms, every gradient mode, fp64 gradcheck through the public
API, no host synchronisation in the backend calls, and ``torch.compile`` over the custom ops.
Tolerances as tests/test_triton.py: forward 1e-5, gradients 1e-4 (normwise relative).
"""

from __future__ import annotations

import os

import pytest
import torch

DRYRUN = os.environ.get("OK_GPU_DRYRUN") == "1"
if DRYRUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (OK_GPU_DRYRUN=1: interpreter dry run)",
                allow_module_level=True)

pytest.importorskip("triton")

import optical_kernels as ok  # noqa: E402
import optical_kernels.backends.triton as T  # noqa: E402
from optical_kernels.backends import torch as R  # noqa: E402
from optical_kernels.backends.triton import launch  # noqa: E402
from optical_kernels.config import SolverConfig  # noqa: E402
from optical_kernels.costs import cost_matrix, cost_vjp  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
]
DEV = "cpu" if DRYRUN else "cuda"


def size(real: int, tiny: int) -> int:
    return tiny if DRYRUN else real


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float, what: str,
          floor: float = 1e-6) -> None:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), floor)
    assert err <= rtol * scale, f"{what}: {err:.3e} > {rtol:.0e} * {scale:.3e}"


def problem(B: int, n: int, d: int, dtype: torch.dtype, ragged: tuple[int, int] | None,
            seed: int = 0) -> tuple[torch.Tensor, ...]:
    """OPTICAL-like batch (as bench/shapes.py): x, y [B, n, d], a, b [B, n] (0 = padded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen)
    y = 0.6 * x + 0.8 * torch.randn(B, n, d, generator=gen)
    if ragged is None:
        lx = ly = torch.full((B,), n)
    else:
        lx = torch.randint(ragged[0], min(ragged[1], n) + 1, (B,), generator=gen)
        ly = torch.randint(ragged[0], min(ragged[1], n) + 1, (B,), generator=gen)
    xm = torch.arange(n)[None, :] < lx[:, None]
    ym = torch.arange(n)[None, :] < ly[:, None]
    a = xm / xm.sum(1, keepdim=True)
    b = ym / ym.sum(1, keepdim=True)
    x, y = x * xm[..., None], y * ym[..., None]
    return (x.to(DEV, dtype), y.to(DEV, dtype), a.float().to(DEV), b.float().to(DEV))


def reference(x, y, a, b, cost, cfg, gv, gl):  # noqa: ANN001, ANN201
    xf, yf = x.float(), y.float()
    C = cost_matrix(xf, yf, cost)
    C = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :], C, 0.0)
    out = R.forward(C, a, b, cfg)
    G = R.backward(C, a, b, out, gv, gl, cfg)
    dx, dy = cost_vjp(G, xf, yf, cost, True)
    return out, dx, dy


CASES = [
    # (name, B, n, d, dtype, ragged, grad, form)
    ("S2-fp32-implicit", 256, 64, 768, torch.float32, None, "implicit", "log"),
    ("S2-fp32-scaling", 256, 64, 768, torch.float32, None, "implicit", "scaling"),
    ("S2-bf16-implicit", 256, 64, 768, torch.bfloat16, None, "implicit", "log"),
    ("S3-ragged-implicit", 128, 128, 768, torch.float32, (4, 128), "implicit", "log"),
    ("S3-ragged-unrolled", 128, 128, 256, torch.float32, (4, 128), "unrolled", "log"),
    ("S3-ragged-envelope-scaling", 128, 128, 256, torch.float32, (4, 128), "envelope",
     "scaling"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_resident_matches_reference(case) -> None:  # noqa: ANN001
    name, B, n, d, dtype, ragged, grad, form = case
    B, n, d = size(B, 3), size(n, 9), size(d, 40)
    x, y, a, b = problem(B, n, d, dtype, ragged if not DRYRUN else (2, 9))
    cfg = SolverConfig(eps=0.05, max_iter=size(100, 20), tol=1e-4, check_every=10, grad=grad)
    gv = torch.rand(B, device=DEV) + 0.5
    gl = torch.rand(B, device=DEV) + 0.5
    with launch.override(form=form):
        out = T.forward_sample(x, y, a, b, "cosine", cfg)
        dx, dy = T.backward_sample(x, y, a, b, "cosine", out, gv, gl, cfg, need_dy=True)
    ref, dx_ref, dy_ref = reference(x, y, a, b, "cosine", cfg, gv, gl)
    for k in ("f", "g", "value", "value_linear"):
        close(getattr(out, k), getattr(ref, k), 1e-5, k)
    close(out.err, ref.err, 1e-4, "err", floor=1.0)
    assert torch.equal(out.n_iters.cpu(), ref.n_iters.cpu())
    grad_tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    close(dx, dx_ref, grad_tol, "dx")
    close(dy, dy_ref, grad_tol, "dy")


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
def test_other_costs_and_unbalanced(cost: str) -> None:
    B, n, d = size(64, 3), size(96, 9), size(128, 24)
    x, y, a, b = problem(B, n, d, torch.float32, (8, 96) if not DRYRUN else (2, 9), seed=1)
    if cost == "sqeuclidean":
        x, y = x * 0.2, y * 0.2
    cfg = SolverConfig(eps=0.5, rho=1.0, max_iter=size(60, 15), tol=0.0, grad="unrolled")
    gv = torch.rand(B, device=DEV) + 0.5
    gl = torch.rand(B, device=DEV) + 0.5
    out = T.forward_sample(x, y, a, b, cost, cfg)
    dx, dy = T.backward_sample(x, y, a, b, cost, out, gv, gl, cfg, need_dy=True)
    ref, dx_ref, dy_ref = reference(x, y, a, b, cost, cfg, gv, gl)
    for k in ("f", "g", "value", "value_linear"):
        close(getattr(out, k), getattr(ref, k), 1e-5, k)
    close(dx, dx_ref, 1e-4, "dx")
    close(dy, dy_ref, 1e-4, "dy")


def test_given_cost_128() -> None:
    B, n = size(32, 2), size(128, 17)
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(B, n, n, generator=gen).to(DEV)
    a = torch.full((B, n), 1.0 / n, device=DEV)
    cfg = SolverConfig(eps=0.02, max_iter=size(200, 20), tol=1e-5, grad="implicit")
    out, ref = T.forward(C, a, a, cfg), R.forward(C, a, a, cfg)
    close(out.f, ref.f, 1e-5, "f")
    close(out.value, ref.value, 1e-5, "value")
    gv, gl = torch.ones(B, device=DEV), torch.ones(B, device=DEV)
    close(T.backward(C, a, a, out, gv, gl, cfg), R.backward(C, a, a, ref, gv, gl, cfg), 1e-4,
          "G")


def test_float64_gradcheck_through_api() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64).to(DEV).requires_grad_(True)
    y = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64).to(DEV)

    def fn(x_: torch.Tensor) -> torch.Tensor:
        return ok.sinkhorn_loss(x_, y, eps=0.1, max_iter=15, tol=0.0, grad="unrolled",
                                reduction="sum", backend="triton")

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(DRYRUN, reason="CUDA sync debug mode")
def test_no_host_sync_in_backend_calls() -> None:
    x, y, a, b = problem(64, 64, 256, torch.float32, (4, 64))
    cfg = SolverConfig(eps=0.05, max_iter=50, tol=1e-4, grad="implicit")
    gv = torch.ones(64, device=DEV)
    T.forward_sample(x, y, a, b, "cosine", cfg)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = T.forward_sample(x, y, a, b, "cosine", cfg)
        T.backward_sample(x, y, a, b, "cosine", out, gv, gv, cfg, need_dy=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(DRYRUN, reason="torch.compile of triton kernels needs CUDA")
def test_torch_compile_traces_custom_ops() -> None:
    x, y, a, b = problem(16, 32, 64, torch.float32, None)

    from optical_kernels import ops  # the one custom-op layer; the backend is plain Python

    def solve(x_: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        outs = ops.sinkhorn_sample_op(x_, y_, a, b, "cosine", "triton", 0.05, None, 30, 0.0, 10,
                                      None, None, "envelope")
        return outs[3].sum()

    eager = solve(x, y)
    compiled = torch.compile(solve, fullgraph=True)(x, y)
    close(compiled, eager, 1e-6, "compiled value")
