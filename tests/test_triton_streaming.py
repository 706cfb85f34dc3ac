"""Streaming Triton kernels (backends/triton/streaming.py) against the torch reference.

Runs on CPU under ``TRITON_INTERPRET=1`` (set here before triton is imported) or on a CUDA
device. Tiles are forced small (16) so that every pass streams several row blocks and
column tiles, with ragged problems, zero weights inside a problem and empty problems in the
same batch. Tolerances (fp32): 1e-5 relative for forward outputs, 1e-4 for gradients.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from optical_kernels import costs  # noqa: E402
from optical_kernels.backends import torch as ref  # noqa: E402
from optical_kernels.backends.triton import streaming as st  # noqa: E402
from optical_kernels.backends.triton import streaming_passes as sp  # noqa: E402  (the launchers)
from optical_kernels.config import SolverConfig  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

SMALL = st.Tiles(block_r=16, block_c=16, block_d=16)  # many tiles per pass
MEDIUM = st.Tiles(block_r=32, block_c=32, block_d=16)
COSTS = ("cosine", "sqeuclidean", "dot")
FWD_TOL = 1e-5
GRAD_TOL = 1e-4


# ----------------------------------------------------------------------------- helpers
def make_batch(
    n: int, m: int, d: int = 5, *, seed: int = 0, ragged: bool = True, empty: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Problem 0: full, with a zero weight inside; 1: ragged (padded rows are 0);
    2: empty (no valid row). Weights sum to 1 per non-empty problem."""
    g = torch.Generator().manual_seed(seed)
    B = 1 + int(ragged) + int(empty)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64) + 0.3
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    if n > 3:
        a[0, n // 2] = 0.0
    if m > 3:
        b[0, 1] = 0.0
    if ragged:
        nk, mk = max(1, (2 * n) // 3), max(1, m // 2)
        a[1, nk:] = 0.0
        b[1, mk:] = 0.0
        x[1, nk:] = 0.0
        y[1, mk:] = 0.0
    if empty:
        a[-1] = 0.0
        x[-1] = 0.0
    a = a / a.sum(1, keepdim=True).clamp_min(1e-30)
    b = b / b.sum(1, keepdim=True).clamp_min(1e-30)
    return tuple(t.to(dtype).to(DEV) for t in (x, y, a, b))  # type: ignore[return-value]


def prepared(x, y, a, b, cost):  # noqa: ANN001, ANN201
    """Centre sqeuclidean points on their common valid mean, as the API does (contract)."""
    if cost == "sqeuclidean":
        x, y = costs.centre(x, y, a > 0, b > 0)
        x = torch.where(a[..., None] > 0, x, 0.0)  # padded rows stay 0
        y = torch.where(b[..., None] > 0, y, 0.0)
    return x, y


def close(
    got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "", floor: float = 1e-3
) -> None:
    """max |got − want| ≤ rel · max(max |want|, floor)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(float(want.abs().max()) if want.numel() else 0.0, floor)
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    assert diff <= rel * scale, f"{what}: max diff {diff:.3e} > {rel:.0e} × {scale:.3e}"


def check_out(o1, o0, rel: float = FWD_TOL) -> None:  # noqa: ANN001
    for name in ("f", "g", "value", "value_linear"):
        close(getattr(o1, name), getattr(o0, name), rel, name)
    # err = Σ|r_i − a_i| cancels: compare on the scale of the transported mass (1)
    close(o1.err, o0.err, rel, "err", floor=1.0)
    assert torch.equal(o1.n_iters.cpu().int(), o0.n_iters.cpu().int()), (o1.n_iters, o0.n_iters)


def grads_for(B: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gv = torch.randn(B, generator=g).to(DEV)
    gl = torch.randn(B, generator=g).to(DEV)
    return gv, gl


def ref_point_grads(x, y, a, b, cost, cfg, gv, gl):  # noqa: ANN001, ANN201
    C = costs.cost_matrix(x, y, cost)
    o0 = ref.forward(C, a, b, cfg)
    dC = ref.backward(C, a, b, o0, gv, gl, cfg)
    return o0, costs.cost_vjp(dC, x, y, cost, need_dy=True)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("cost", COSTS)
def test_forward_sample_matches_reference(cost: str) -> None:
    x, y, a, b = make_batch(33, 20)
    x, y = prepared(x, y, a, b, cost)
    cfg = SolverConfig(eps=0.1, max_iter=10, tol=0.0)
    o1 = st.forward_sample(x, y, a, b, cost, cfg, tiles=SMALL)
    o0 = ref.forward(costs.cost_matrix(x, y, cost), a, b, cfg)
    check_out(o1, o0)
    # empty problem: all zero, no iteration
    assert float(o1.value[-1]) == 0.0 and float(o1.value_linear[-1]) == 0.0
    assert int(o1.n_iters[-1]) == 0 and float(o1.f[-1].abs().sum()) == 0.0


def test_forward_given_cost_unbalanced_schedule_strided() -> None:
    """Given C read tile-wise through strides (a transposed view), ρ and ε-scaling, tol > 0."""
    x, y, a, b = make_batch(20, 33, seed=3)
    Ct = costs.cost_matrix(y, x, "sqeuclidean").contiguous()  # [B, m, n]
    C = Ct.transpose(1, 2)  # [B, n, m], non-contiguous
    cfg = SolverConfig(eps=0.05, rho=0.7, max_iter=12, tol=1e-3, check_every=2,
                       eps_schedule=(2.0, 0.5))
    check_out(st.forward(C, a, b, cfg, tiles=SMALL), ref.forward(C.contiguous(), a, b, cfg))


def test_tol_early_stopping_matches_reference() -> None:
    """Problems stop at different checks; n_iters and the frozen potentials must match."""
    x, y, a, b = make_batch(40, 24, seed=5, empty=False)  # reference: n_iters = [9, 18]
    cfg = SolverConfig(eps=0.2, max_iter=24, tol=1e-4, check_every=3)
    o1 = st.forward_sample(x, y, a, b, "cosine", cfg, tiles=MEDIUM)
    o0 = ref.forward(costs.cost_matrix(x, y, "cosine"), a, b, cfg)
    check_out(o1, o0)
    assert int(o1.n_iters.max()) < cfg.max_iter
    assert len(set(o1.n_iters.tolist())) == 2  # the two problems stopped at different checks


def test_forward_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The iteration loop (tol > 0, checks included) never reads a device value on the host."""
    x, y, a, b = make_batch(20, 12, seed=7)
    cfg = SolverConfig(eps=0.2, max_iter=4, tol=1e-3, check_every=2)

    def boom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("host sync in the forward loop")

    solve = st._solve

    def guarded(prob, cfg):  # noqa: ANN001, ANN202
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "item", boom)
            mp.setattr(torch.Tensor, "__bool__", boom)
            mp.setattr(torch.Tensor, "tolist", boom)
            return solve(prob, cfg)

    monkeypatch.setattr(st, "_solve", guarded)
    if INTERPRET:  # the interpreter itself reads launch arguments on the host
        monkeypatch.setattr(sp, "_lse_kernel", _NoRun())
    st.forward_sample(x, y, a, b, "cosine", cfg, tiles=SMALL)


class _NoRun:
    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *args, **kw: None


@pytest.mark.parametrize(("n", "m"), [(1, 1), (1, 7), (7, 33), (150, 7), (33, 150)])
def test_shapes(n: int, m: int) -> None:
    """Degenerate and multi-tile sizes (150 streams 3 row blocks / column tiles of 64)."""
    x, y, a, b = make_batch(n, m, seed=n + m)
    cfg = SolverConfig(eps=0.1, max_iter=6, tol=0.0)
    # 150: the automatic tiles (fp32: 64×64, d-chunks of 16) or forced 64-blocks
    tiles = None if n == 150 else st.Tiles(64, 64, 16) if max(n, m) > 64 else SMALL
    o1 = st.forward_sample(x, y, a, b, "cosine", cfg, tiles=tiles)
    gv, gl = grads_for(a.shape[0])
    o0, (dx0, dy0) = ref_point_grads(x, y, a, b, "cosine", cfg, gv, gl)
    check_out(o1, o0)
    dx, dy = st.backward_sample(x, y, a, b, "cosine", o1, gv, gl,
                                SolverConfig(eps=0.1, max_iter=6, tol=0.0), True, tiles=tiles)
    close(dx, dx0, GRAD_TOL, "dx")
    close(dy, dy0, GRAD_TOL, "dy")


def test_empty_shapes_and_batches() -> None:
    cfg = SolverConfig(eps=0.1, max_iter=5, grad="unrolled")
    for n, m in ((0, 5), (4, 0)):
        x, y = torch.zeros(2, n, 3, device=DEV), torch.zeros(2, m, 3, device=DEV)
        a, b = torch.zeros(2, n, device=DEV), torch.zeros(2, m, device=DEV)
        out = st.forward_sample(x, y, a, b, "cosine", cfg)
        assert out.value.shape == (2,) and float(out.value.abs().sum()) == 0.0
        dx, dy = st.backward_sample(x, y, a, b, "cosine", out, a.new_ones(2), a.new_ones(2),
                                    cfg, True)
        assert dx.shape == x.shape and dy.shape == y.shape
    # a batch whose problems are all empty (weights 0): zeros, no NaN
    x, y = torch.randn(2, 9, 3, device=DEV), torch.randn(2, 5, 3, device=DEV)
    a, b = torch.zeros(2, 9, device=DEV), torch.full((2, 5), 0.2, device=DEV)
    out = st.forward_sample(x, y, a, b, "dot", cfg, tiles=SMALL)
    for t in (out.f, out.g, out.value, out.value_linear, out.err):
        assert torch.isfinite(t).all() and float(t.abs().sum()) == 0.0
    assert int(out.n_iters.abs().sum()) == 0
    dx, dy = st.backward_sample(x, y, a, b, "dot", out, a.new_ones(2), a.new_ones(2), cfg,
                                True, tiles=SMALL)
    assert float(dx.abs().sum()) == 0.0 and float(dy.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- backward
GRAD_CFGS = {
    "envelope": SolverConfig(eps=0.1, max_iter=10, tol=0.0, grad="envelope"),
    "implicit": SolverConfig(eps=0.2, max_iter=20, tol=1e-5, check_every=5, grad="implicit"),
    "unrolled": SolverConfig(eps=0.2, max_iter=6, tol=1e-3, check_every=2,
                             eps_schedule=(1.0, 0.5), grad="unrolled"),
}


@pytest.mark.parametrize("grad", tuple(GRAD_CFGS))
@pytest.mark.parametrize("cost", COSTS)
def test_backward_sample_matches_reference(cost: str, grad: str) -> None:
    x, y, a, b = make_batch(24, 18, seed=11)
    x, y = prepared(x, y, a, b, cost)
    cfg = GRAD_CFGS[grad]
    # CG takes 20-50 streamed steps: many-tile coverage for one cost, cheaper tiles otherwise
    tiles = MEDIUM if grad == "implicit" and cost != "cosine" else SMALL
    gv, gl = grads_for(a.shape[0])
    o1 = st.forward_sample(x, y, a, b, cost, cfg, tiles=tiles)
    o0, (dx0, dy0) = ref_point_grads(x, y, a, b, cost, cfg, gv, gl)
    check_out(o1, o0)
    dx, dy = st.backward_sample(x, y, a, b, cost, o1, gv, gl, cfg, True, tiles=tiles)
    close(dx, dx0, GRAD_TOL, "dx")
    close(dy, dy0, GRAD_TOL, "dy")
    assert float(dx[-1].abs().sum()) == 0.0  # empty problem
    if grad == "envelope" or (grad == "unrolled" and cost == "cosine"):
        dx_only, none = st.backward_sample(x, y, a, b, cost, o1, gv, gl, cfg, False,
                                           tiles=tiles)
        assert none is None
        close(dx_only, dx, 1e-6, "dx without dy")


@pytest.mark.parametrize(
    ("grad", "rho"), [("envelope", None), ("implicit", None), ("unrolled", None),
                      ("envelope", 0.5), ("implicit", 0.5), ("unrolled", 0.5)])
def test_backward_given_cost_matches_reference(grad: str, rho: float | None) -> None:
    x, y, a, b = make_batch(20, 33, seed=13)
    C = costs.cost_matrix(x, y, "cosine")
    base = GRAD_CFGS[grad]
    cfg = SolverConfig(eps=base.eps, rho=rho, max_iter=base.max_iter, tol=base.tol,
                       check_every=base.check_every, eps_schedule=base.eps_schedule, grad=grad)
    gv, gl = grads_for(a.shape[0], seed=2)
    tiles = MEDIUM if grad == "implicit" else SMALL
    o1 = st.forward(C, a, b, cfg, tiles=tiles)
    o0 = ref.forward(C, a, b, cfg)
    check_out(o1, o0)
    dC = st.backward(C, a, b, o1, gv, gl, cfg, tiles=tiles)
    close(dC, ref.backward(C, a, b, o0, gv, gl, cfg), GRAD_TOL, "dC")


def test_feature_chunks_and_bf16() -> None:
    """d larger than the feature block (several tl.dot chunks, a d-chunk grid axis) and bf16."""
    x, y, a, b = make_batch(20, 17, d=40, seed=17)
    x, y = prepared(0.3 * x, 0.3 * y, a, b, "sqeuclidean")  # keeps C/ε ≈ 100, as elsewhere
    cfg = SolverConfig(eps=0.1, max_iter=6, tol=0.0, grad="envelope")
    chunked = st.Tiles(16, 16, 16)  # d = 40 -> 3 chunks of 16
    gv, gl = grads_for(a.shape[0])
    o1 = st.forward_sample(x, y, a, b, "sqeuclidean", cfg, tiles=chunked)
    o0, (dx0, dy0) = ref_point_grads(x, y, a, b, "sqeuclidean", cfg, gv, gl)
    check_out(o1, o0)
    dx, dy = st.backward_sample(x, y, a, b, "sqeuclidean", o1, gv, gl, cfg, True, tiles=chunked)
    close(dx, dx0, GRAD_TOL, "dx")
    close(dy, dy0, GRAD_TOL, "dy")
    # bf16 points: products are exact in fp32, so the solve matches the fp32 reference on the
    # rounded points; the gradient is returned in bf16
    xb, yb = x.to(torch.bfloat16), y.to(torch.bfloat16)
    o1 = st.forward_sample(xb, yb, a, b, "cosine", cfg, tiles=MEDIUM)
    o0 = ref.forward(costs.cost_matrix(xb.float(), yb.float(), "cosine"), a, b, cfg)
    check_out(o1, o0, rel=1e-4)
    assert o1.f.dtype == torch.float32
    dx, _ = st.backward_sample(xb, yb, a, b, "cosine", o1, gv, gl, cfg, False, tiles=MEDIUM)
    assert dx.dtype == torch.bfloat16 and torch.isfinite(dx.float()).all()


def test_float64_tight() -> None:
    """fp64 in, fp64 accumulation: agreement with the reference to ~1e-10."""
    x, y, a, b = make_batch(18, 21, seed=19, dtype=torch.float64)
    cfg = SolverConfig(eps=0.1, rho=0.8, max_iter=8, tol=0.0, grad="unrolled")
    gv, gl = (t.double() for t in grads_for(a.shape[0]))
    o1 = st.forward_sample(x, y, a, b, "dot", cfg, tiles=SMALL)
    assert o1.f.dtype == torch.float64
    o0, (dx0, dy0) = ref_point_grads(x, y, a, b, "dot", cfg, gv, gl)
    check_out(o1, o0, rel=1e-10)
    dx, dy = st.backward_sample(x, y, a, b, "dot", o1, gv, gl, cfg, True, tiles=SMALL)
    close(dx, dx0, 1e-9, "dx")
    close(dy, dy0, 1e-9, "dy")


# ----------------------------------------------------------------------------- GPU compile
_COMPILE_SCRIPT = r'''
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from optical_kernels.config import SolverConfig
from optical_kernels.backends.triton import streaming as st
from optical_kernels.backends.triton import streaming_passes as sp

TY = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.int32: "i32"}
seen = {}

class Record:  # stands in for a kernel: records signature + constexprs, runs nothing
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=2, **kw):
            sig = {}
            for name, v in zip(self.fn.arg_names, args):
                if isinstance(v, torch.Tensor):
                    sig[name] = "*" + TY[v.dtype]
                elif isinstance(v, int):
                    sig[name] = "i32"
                else:
                    sig[name] = "fp32"
            sig.update({k: "constexpr" for k in kw})
            key = (self.fn.__name__, repr(sorted(sig.items())), repr(sorted(kw.items())))
            seen[key] = (self.fn, sig, kw, num_warps, num_stages)
        return launch

sp._lse_kernel, sp._plan_kernel = Record(sp._lse_kernel), Record(sp._plan_kernel)
B, n, m = 2, 300, 200
a, b = torch.full((B, n), 1 / n), torch.full((B, m), 1 / m)
for dt, d, prec in ((torch.float32, 64, "ieee"), (torch.bfloat16, 64, "ieee")):
    x, y = torch.randn(B, n, d).to(dt), torch.randn(B, m, d).to(dt)
    for grad, rho in (("implicit", None), ("unrolled", 0.5)):
        cfg = SolverConfig(eps=0.1, rho=rho, max_iter=2, tol=1e-3, check_every=1, grad=grad,
                           cg_max_iter=1)
        out = st.forward_sample(x, y, a, b, "sqeuclidean", cfg)
        st.backward_sample(x, y, a, b, "sqeuclidean", out, a[:, 0], a[:, 0], cfg, True)
C = torch.rand(B, n, m)
cfg = SolverConfig(eps=0.1, max_iter=2, tol=1e-3, check_every=1, grad="unrolled")
st.backward(C, a, b, st.forward(C, a, b, cfg), a[:, 0], a[:, 0], cfg)
for fn, sig, kw, nw, ns in seen.values():
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kw),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
print("compiled", len(seen))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path) -> None:  # noqa: ANN001
    """Every kernel variant of the sample (fp32, bf16) and given-C paths compiles to a
    cubin for sm_90 with the installed Triton — no GPU needed (~15 s cold)."""
    import subprocess
    import sys

    script = tmp_path / "compile_streaming.py"
    script.write_text(_COMPILE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("compiled")[-1]) >= 20, proc.stdout
