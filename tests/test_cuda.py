"""Tests of the ``cuda`` backend (optical_kernels.backends.cuda, csrc/cuda) against the reference.

Three kinds:

* CPU checks (always run): the wrapper imports without a GPU, ``is_available()`` explains
  itself, the compiled binding raises a clear ``RuntimeError`` when no device exists, bad
  arguments raise ``ValueError``/``TypeError``.
* ``target="emu"``: the *same kernel sources* built with ``-DOKC_EMULATE`` by g++ into the
  test module ``_cuda_emu`` (csrc/cuda/emu: one fiber per CUDA thread, real barriers and
  warp exchanges, MMA fragments emulated) and run on CPU tensors. This is how the kernels are
  checked on machines without a GPU; skipped when g++ or pybind11 is missing. The build is
  cached under ``build/okc_emu/<hash of csrc/cuda>/``.
* ``target="gpu"`` (``@pytest.mark.gpu``, ``pytest -m gpu tests/test_cuda.py``): the real
  module on CUDA tensors; skipped without CUDA.

Both targets compare every output of ``forward``/``forward_sample``/``backward``/
``backward_sample`` with :mod:`optical_kernels.backends.torch` on random ragged, masked batches
(padding interleaved, empty problems included), all gradient modes, float32 and float64.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from optical_kernels.backends import cuda as ok_cuda
from optical_kernels.backends import torch as reference
from optical_kernels.config import SolverConfig
from optical_kernels.costs import cost_matrix, cost_vjp
from tests.helpers import random_problem

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cuda"


# --------------------------------------------------------------------------- emulator build
def _emu_build() -> object:
    """Build (once, cached by source hash) and import the CPU-emulator module ``_cuda_emu``."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA-kernel emulator build")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is needed for the CUDA-kernel emulator build")
    srcs = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    srcs += sorted((CSRC.parent / "common").glob("*.h"))  # okc_constants.h
    flags = ["-std=c++17", "-O1", "-shared", "-fPIC", "-DOKC_EMULATE", "-w"]
    digest = hashlib.sha256(" ".join(flags).encode())
    for p in srcs:
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    out_dir = ROOT / "build" / "okc_emu" / digest.hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = out_dir / f"_cuda_emu{suffix}"
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"_cuda_emu.{os.getpid()}.tmp{suffix}"
        cmd = [
            cxx, *flags, f"-I{CSRC}", f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            str(CSRC / "emu" / "emu_module.cpp"), "-o", str(tmp),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            pytest.fail(f"emulator build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(tmp, target)
    spec = importlib.util.spec_from_file_location("_cuda_emu", target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


_EMU: list[object] = []


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def target(request: pytest.FixtureRequest) -> str:
    """Device of the test tensors, with optical_kernels.backends.cuda launching on that target."""
    if request.param == "gpu":
        ok, why = ok_cuda.is_available()
        if not ok:
            pytest.skip(f"cuda backend unavailable: {why}")
        ok_cuda._use_module(None)
        yield "cuda"
        return
    if not _EMU:
        _EMU.append(_emu_build())
    ok_cuda._use_module(_EMU[0])
    try:
        yield "cpu"
    finally:
        ok_cuda._use_module(None)
        ok_cuda._SMEM_LIMIT = None


# --------------------------------------------------------------------------- problems
def _weights(mask: torch.Tensor, seed: int, dtype: torch.dtype, uniform: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = (
        torch.ones(mask.shape, dtype=torch.float64)
        if uniform
        else (0.2 + torch.rand(mask.shape, generator=gen, dtype=torch.float64))
    )
    w = torch.where(mask.cpu(), w, 0.0)
    s = w.sum(1, keepdim=True)
    return torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0).to(dtype)


def _problem(
    B: int,
    n: int,
    m: int,
    d: int,
    dtype: torch.dtype,
    seed: int,
    device: str,
    *,
    cost: str = "cosine",
    empty: tuple[int, ...] = (),
    uniform: bool = False,
    scatter: bool = True,
    scale: float = 1.0,
    rho: float | None = None,
    ragged: bool = True,
) -> dict:
    """Points, weights and the masked cost of a ragged batch (padding rows of x, y are 0)."""
    x, y, xm, ym = random_problem(B, n, m, d, torch.float64, seed, ragged, empty, scatter=scatter,
                                  scale=scale)  # fmt: skip
    a = _weights(xm, seed + 11, torch.float64, uniform)
    b = _weights(ym, seed + 12, torch.float64, uniform)
    if rho is not None:  # unbalanced: unnormalised masses
        a, b = a * 1.3, b * 0.8
    va, vb = a > 0, b > 0
    x = torch.where(va[..., None], x, 0.0)
    y = torch.where(vb[..., None], y, 0.0)
    if cost == "sqeuclidean":  # the API centres the points for the fused backends
        from optical_kernels.costs import centre

        x, y = centre(x, y, va, vb)
        x = torch.where(va[..., None], x, 0.0)
        y = torch.where(vb[..., None], y, 0.0)
    x, y = x.to(dtype), y.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    C = cost_matrix(x.to(work), y.to(work), cost, va, vb)
    C = torch.where(va[:, :, None] & vb[:, None, :], C, 0.0).contiguous()
    return dict(
        x=x.to(device),
        y=y.to(device),
        a=a.to(work).to(device),
        b=b.to(work).to(device),
        C=C.to(device),
    )


def _tols(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, **tol: float) -> None:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite output {got}"
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **tol)


def _compare_out(o: object, r: object, dtype: torch.dtype, exact_iters: bool = True) -> None:
    tol = _tols(dtype)
    for name in ("f", "g", "value", "value_linear"):
        _close(getattr(o, name), getattr(r, name), name, **tol)
    _close(o.err, r.err, "err", rtol=1e-6 if dtype == torch.float64 else 5e-3,
           atol=1e-10 if dtype == torch.float64 else 5e-5)  # fmt: skip
    if exact_iters:
        assert o.n_iters.cpu().tolist() == r.n_iters.cpu().tolist()


def _ref_on(P: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Reference inputs on CPU (the reference runs anywhere; CPU keeps it independent)."""
    return P[key].detach().cpu()


# --------------------------------------------------------------------------- CPU checks
def test_import_and_availability_without_gpu() -> None:
    ok, why = ok_cuda.is_available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok
    assert ok_cuda.MAX_SIZE == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_binding_raises_clear_error_without_gpu() -> None:
    mod = ok_cuda._cuda
    if mod is None:
        pytest.skip(f"optical_kernels._cuda is not built ({ok_cuda._IMPORT_ERROR})")
    assert mod.device_count() == 0
    assert mod.device_error()
    p = mod.Params()
    p.B, p.n, p.m = 1, 2, 2
    p.C = p.a = p.b = p.f = p.g = p.value = p.value_linear = p.n_iters = p.err = 4096
    p.grad_value = p.grad_value_linear = p.G = 4096  # arguments are valid: only the device fails
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.forward(p)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.backward(p)


def test_wrapper_rejects_cpu_tensors_and_bad_arguments() -> None:
    ok_cuda._use_module(None)
    C = torch.rand(2, 3, 4)
    a, b = torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25)
    cfg = SolverConfig(eps=0.1)
    with pytest.raises(ValueError, match="CUDA tensors"):
        ok_cuda.forward(C, a, b, cfg)
    with pytest.raises(ValueError, match="n, m <= 256"):
        ok_cuda.forward(torch.rand(1, 300, 4), torch.rand(1, 300), torch.rand(1, 4), cfg)
    with pytest.raises(ValueError, match="n, m <= 256"):
        ok_cuda.forward_sample(torch.rand(1, 3, 5), torch.rand(1, 257, 5), torch.rand(1, 3),
                               torch.rand(1, 257), "cosine", cfg)  # fmt: skip
    with pytest.raises(ValueError, match="C must have shape"):
        ok_cuda.forward(torch.rand(3, 4), a, b, cfg)
    with pytest.raises(TypeError, match="C must be a floating tensor"):
        ok_cuda.forward(torch.ones(2, 3, 4, dtype=torch.int64), a, b, cfg)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        ok_cuda.forward(C, [1.0, 2.0], b, cfg)
    with pytest.raises(ValueError, match="cost must be one of"):
        ok_cuda.forward_sample(torch.rand(1, 3, 5), torch.rand(1, 4, 5), torch.rand(1, 3),
                               torch.rand(1, 4), "manhattan", cfg)  # fmt: skip
    with pytest.raises(ValueError, match="disagree on B or d"):
        ok_cuda.forward_sample(torch.rand(1, 3, 5), torch.rand(1, 4, 6), torch.rand(1, 3),
                               torch.rand(1, 4), "cosine", cfg)  # fmt: skip
    with pytest.raises(ValueError, match="grad must be one of"):
        ok_cuda.backward(C, a, b, None, None, None, SolverConfig(eps=0.1, grad="autodiff"))


def test_binding_validates_params() -> None:
    mod = ok_cuda._cuda
    if mod is None:
        pytest.skip(f"optical_kernels._cuda is not built ({ok_cuda._IMPORT_ERROR})")
    p = mod.Params()
    p.B, p.n, p.m = 1, 300, 4
    with pytest.raises(ValueError, match="<= 256"):
        mod.forward(p)
    p.n, p.eps = 4, 0.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        mod.forward(p)
    p.eps, p.max_iter = 0.1, 0
    with pytest.raises(ValueError, match="max_iter"):
        mod.forward(p)


# --------------------------------------------------------------------------- emu / gpu
CFG_VARIANTS = {
    "plain": dict(eps=0.1, max_iter=60, tol=1e-7, check_every=5),
    "fixed": dict(eps=0.05, max_iter=40, tol=0.0),
    "sched": dict(eps=0.05, max_iter=60, tol=1e-6, check_every=4, eps_schedule=(1.0, 0.5)),
    "unbalanced": dict(eps=0.1, rho=0.5, max_iter=60, tol=1e-7, check_every=5),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", list(CFG_VARIANTS))
def test_forward_matches_reference(target: str, dtype: torch.dtype, variant: str) -> None:
    kw = CFG_VARIANTS[variant]
    if dtype == torch.float32 and kw.get("tol", 0) > 0:
        kw = {**kw, "tol": 0.0}  # fp32: stopping iteration can legitimately differ
    cfg = SolverConfig(**kw)
    P = _problem(5, 9, 7, 4, dtype, seed=1, device=target, empty=(3,), rho=cfg.rho)
    o = ok_cuda.forward(P["C"], P["a"], P["b"], cfg)
    r = reference.forward(
        _ref_on(P, "C", dtype), _ref_on(P, "a", dtype), _ref_on(P, "b", dtype), cfg
    )
    _compare_out(o, r, dtype)
    assert o.n_iters[3].item() == 0 and o.value[3].item() == 0


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
@pytest.mark.parametrize(
    "dtype,mma",
    [(torch.float64, False), (torch.float32, True), (torch.float32, False),
     (torch.bfloat16, True), (torch.float16, True)],
)  # fmt: skip
def test_forward_sample_matches_reference(
    target: str, cost: str, dtype: torch.dtype, mma: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTICAL_KERNELS_CUDA_MMA", "1" if mma else "0")
    cfg = SolverConfig(eps=0.1, max_iter=30, tol=0.0)
    P = _problem(4, 11, 6, 37, dtype, seed=2, device=target, cost=cost, empty=(1,))
    o = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], cost, cfg)
    r = reference.forward(
        _ref_on(P, "C", dtype), _ref_on(P, "a", dtype), _ref_on(P, "b", dtype), cfg
    )
    _compare_out(o, r, torch.float64 if dtype == torch.float64 else torch.float32)


def _grad_inputs(B: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gv = torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)
    gl = torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)
    return gv, gl


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
@pytest.mark.parametrize("variant", ["plain", "sched", "unbalanced"])
def test_backward_matches_reference(
    target: str, dtype: torch.dtype, grad: str, variant: str
) -> None:
    kw = dict(CFG_VARIANTS[variant])
    if dtype == torch.float32:
        kw["tol"] = 0.0
    cfg = SolverConfig(**kw, grad=grad)
    P = _problem(4, 8, 10, 3, dtype, seed=3, device=target, empty=(2,), rho=cfg.rho)
    Cr, ar, br = (_ref_on(P, k, dtype) for k in ("C", "a", "b"))
    r = reference.forward(Cr, ar, br, cfg)
    o = ok_cuda.forward(P["C"], P["a"], P["b"], cfg)
    _compare_out(o, r, dtype)
    gv, gl = _grad_inputs(4, dtype, 7)
    G = ok_cuda.backward(P["C"], P["a"], P["b"], o, gv.to(target), gl.to(target), cfg)
    if grad == "implicit" and cfg.rho is not None:
        # the reference does not implement it: compare with the cpu backend when built
        cpu = pytest.importorskip("optical_kernels.backends.cpu")
        if not cpu.is_available()[0]:
            pytest.skip("reference has no unbalanced implicit gradient and cpu is not built")
        Gr = cpu.backward(Cr, ar, br, r, gv, gl, cfg)
    else:
        Gr = reference.backward(Cr, ar, br, r, gv, gl, cfg)
    tol = dict(rtol=1e-7, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    _close(G, Gr, f"dC ({grad})", **tol)
    assert G[2].abs().max().item() == 0.0


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_sample_matches_reference(
    target: str, cost: str, grad: str, dtype: torch.dtype
) -> None:
    cfg = SolverConfig(eps=0.1, max_iter=40, tol=0.0 if dtype == torch.float32 else 1e-8,
                       check_every=5, grad=grad)  # fmt: skip
    P = _problem(3, 9, 12, 33, dtype, seed=4, device=target, cost=cost, empty=(1,))
    Cr, ar, br = (_ref_on(P, k, dtype) for k in ("C", "a", "b"))
    r = reference.forward(Cr, ar, br, cfg)
    o = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], cost, cfg)
    _compare_out(o, r, dtype)
    gv, gl = _grad_inputs(3, dtype, 8)
    dx, dy = ok_cuda.backward_sample(P["x"], P["y"], P["a"], P["b"], cost, o, gv.to(target),
                                     gl.to(target), cfg, True)  # fmt: skip
    Gr = reference.backward(Cr, ar, br, r, gv, gl, cfg)
    dxr, dyr = cost_vjp(Gr, P["x"].cpu(), P["y"].cpu(), cost, True)
    # fp32: the unrolled sqeuclidean gradient moves by ~4e-5 of its scale under a 1e-7 relative
    # perturbation of C (fp64 measurement), so compare relative to the scale of the result.
    scale = max(dxr.abs().max().item(), dyr.abs().max().item())
    tol = (
        dict(rtol=1e-7, atol=1e-8) if dtype == torch.float64 else dict(rtol=3e-3, atol=1e-3 * scale)
    )
    _close(dx, dxr, f"dx ({cost}, {grad})", **tol)
    _close(dy, dyr, f"dy ({cost}, {grad})", **tol)
    dx2, dy2 = ok_cuda.backward_sample(P["x"], P["y"], P["a"], P["b"], cost, o, gv.to(target),
                                       gl.to(target), cfg, False)  # fmt: skip
    assert dy2 is None
    _close(dx2, dxr, "dx (need_dy=False)", **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_backward_sample_half_inputs(target: str, dtype: torch.dtype, grad: str) -> None:
    """16-bit points: read as is (MMA on 16-bit, fp32 accumulation), gradients in x's dtype."""
    cfg = SolverConfig(eps=0.1, max_iter=20, tol=0.0, grad=grad)
    P = _problem(2, 10, 13, 24, dtype, seed=12, device=target, cost="cosine")
    Cr, ar, br = (_ref_on(P, k, torch.float32) for k in ("C", "a", "b"))
    r = reference.forward(Cr, ar, br, cfg)
    o = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", cfg)
    _compare_out(o, r, torch.float32)
    gv, gl = _grad_inputs(2, torch.float32, 5)
    dx, dy = ok_cuda.backward_sample(
        P["x"], P["y"], P["a"], P["b"], "cosine", o, gv.to(target), gl.to(target), cfg, True
    )
    assert dx.dtype == dtype and dy.dtype == dtype
    Gr = reference.backward(Cr, ar, br, r, gv, gl, cfg)
    dxr, dyr = cost_vjp(Gr, P["x"].cpu().float(), P["y"].cpu().float(), "cosine", True)
    scale = max(dxr.abs().max().item(), dyr.abs().max().item())
    _close(dx, dxr.to(dtype), "dx (16-bit)", rtol=2e-2, atol=2e-2 * scale)
    _close(dy, dyr.to(dtype), "dy (16-bit)", rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_medium_sizes(target: str, grad: str) -> None:
    """n, m past 64 / 128: several column strips, 16-32 lanes per row, 8 columns per lane."""
    cfg = SolverConfig(eps=0.2, max_iter=4, tol=0.0, grad=grad, cg_max_iter=40)
    P = _problem(2, 70, 140, 24, torch.float64, seed=13, device=target, cost="dot", scale=0.3)
    Cr, ar, br = (_ref_on(P, k, torch.float64) for k in ("C", "a", "b"))
    r = reference.forward(Cr, ar, br, cfg)
    o = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "dot", cfg)
    _compare_out(o, r, torch.float64)
    gv, gl = _grad_inputs(2, torch.float64, 6)
    dx, dy = ok_cuda.backward_sample(
        P["x"], P["y"], P["a"], P["b"], "dot", o, gv.to(target), gl.to(target), cfg, True
    )
    Gr = reference.backward(Cr, ar, br, r, gv, gl, cfg)
    dxr, dyr = cost_vjp(Gr, P["x"].cpu(), P["y"].cpu(), "dot", True)
    _close(dx, dxr, "dx (medium)", rtol=1e-7, atol=1e-10)
    _close(dy, dyr, "dy (medium)", rtol=1e-7, atol=1e-10)


def test_opcheck(target: str) -> None:
    """torch.library.opcheck of the four custom ops (schema, fake, autograd registration) with
    this backend behind them (ops.py is the one custom-op layer; the backend is plain Python)."""
    from optical_kernels import ops

    P = _problem(2, 6, 5, 7, torch.float64, seed=1, device=target)
    scal = (0.1, None, 5, 0.0, 1, None, None, "unrolled")
    args = (P["C"], P["a"], P["b"], "cuda", *scal)
    torch.library.opcheck(ops.sinkhorn_op, args)
    outs = ops.sinkhorn_op(*args)
    gv = torch.ones(2, dtype=torch.float64, device=target)
    bargs = (P["C"], P["a"], P["b"], *outs, gv, gv)
    torch.library.opcheck(ops.sinkhorn_backward_op, (*bargs, "cuda", *scal))
    sscal = (0.1, None, 5, 0.0, 1, None, None, "implicit")
    sargs = (P["x"], P["y"], P["a"], P["b"], "cosine", "cuda", *sscal)
    torch.library.opcheck(ops.sinkhorn_sample_op, sargs)
    so = ops.sinkhorn_sample_op(*sargs)
    bs = (P["x"], P["y"], P["a"], P["b"], *so, gv, gv)
    torch.library.opcheck(ops.sinkhorn_sample_backward_op, (*bs, True, "cosine", "cuda", *sscal))


@pytest.mark.parametrize("limit", [0, 1])
def test_workspace_fallback(target: str, limit: int) -> None:
    """Cost / work tiles in global memory (what 256 x 256 problems use) give the same result."""
    dtype = torch.float64
    cfg = SolverConfig(eps=0.1, max_iter=25, tol=0.0, grad="implicit")
    P = _problem(2, 21, 18, 5, dtype, seed=5, device=target, cost="cosine")
    Cr, ar, br = (_ref_on(P, k, dtype) for k in ("C", "a", "b"))
    r = reference.forward(Cr, ar, br, cfg)
    gv, gl = _grad_inputs(2, dtype, 9)
    Gr = reference.backward(Cr, ar, br, r, gv, gl, cfg)
    dxr, dyr = cost_vjp(Gr, P["x"].cpu(), P["y"].cpu(), "cosine", True)
    # limit 0: both tiles global; 1: cost tile on chip, work tile global
    p = ok_cuda._impl.Params()
    p.B, p.n, p.m, p.d, p.dtype, p.in_dtype, p.cost = 2, 21, 18, 5, 1, 1, 1
    plan = ok_cuda._impl.plan(p, True)
    tile = plan["NP"] * plan["pitch"] * 8
    ok_cuda._SMEM_LIMIT = plan["smem_bytes"] - 2 * tile + (tile if limit else 0)
    try:
        plan2 = ok_cuda._impl.plan(_with_limit(p, ok_cuda._SMEM_LIMIT), True)
        assert not plan2["w_smem"] and plan2["c_smem"] == bool(limit)
        o = ok_cuda.forward(P["C"], P["a"], P["b"], cfg)
        _compare_out(o, r, dtype)
        G = ok_cuda.backward(P["C"], P["a"], P["b"], o, gv.to(target), gl.to(target), cfg)
        _close(G, Gr, "dC (workspace)", rtol=1e-7, atol=1e-8)
        o2 = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", cfg)
        _compare_out(o2, r, dtype)
        dx, dy = ok_cuda.backward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", o2,
                                         gv.to(target), gl.to(target), cfg, True)  # fmt: skip
        _close(dx, dxr, "dx (workspace)", rtol=1e-7, atol=1e-8)
        _close(dy, dyr, "dy (workspace)", rtol=1e-7, atol=1e-8)
    finally:
        ok_cuda._SMEM_LIMIT = None


def _with_limit(p: object, limit: int) -> object:
    p.smem_limit = int(limit)  # type: ignore[attr-defined]
    return p


def test_no_nan_tiny_eps_and_far_costs(target: str) -> None:
    """ε = 1e-4 x cost range and costs ~1e3 away from 0: finite everything (docs/design.md §2)."""
    dtype = torch.float32
    P = _problem(3, 12, 9, 4, dtype, seed=6, device=target, empty=(0,))
    C = (P["C"] * 50.0 + 1000.0) * (P["C"] != 0)
    for grad in ("envelope", "implicit", "unrolled"):
        cfg = SolverConfig(eps=50.0 * 2e-4, max_iter=30, tol=0.0, grad=grad)
        o = ok_cuda.forward(C, P["a"], P["b"], cfg)
        for t in (o.f, o.g, o.value, o.value_linear, o.err):
            assert torch.isfinite(t).all()
        gv, gl = _grad_inputs(3, dtype, 1)
        G = ok_cuda.backward(C, P["a"], P["b"], o, gv.to(target), gl.to(target), cfg)
        assert torch.isfinite(G).all()


def test_custom_op_fake_registrations(target: str) -> None:
    """The ops have fake implementations with the right shapes (what torch.compile uses)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import optical_kernels.ops  # noqa: F401  (registers the custom ops)

    with FakeTensorMode():
        C = torch.empty(3, 5, 4)
        a, b = torch.empty(3, 5), torch.empty(3, 4)
        outs = torch.ops.optical_kernels.sinkhorn(C, a, b, "cuda", 0.1, None, 7, 0.0, 1, None,
                                                  None, "unrolled")  # fmt: skip
        assert [tuple(t.shape) for t in outs] == [(3, 5), (3, 4), (3,), (3,), (3,), (3,),
                                                  (7, 3, 5), (7, 3, 4)]  # fmt: skip
        assert outs[4].dtype == torch.int32
        x, y = (
            torch.empty(3, 5, 8, dtype=torch.bfloat16),
            torch.empty(3, 4, 8, dtype=torch.bfloat16),
        )
        dx, dy = torch.ops.optical_kernels.sinkhorn_sample_backward(
            x, y, a, b, *outs, outs[2], outs[3], False, "cosine", "cuda",
            0.1, None, 7, 0.0, 1, None, None, "unrolled",
        )  # fmt: skip
        # the op returns gradients in the points' dtype (backward_sample casts them back)
        assert tuple(dx.shape) == (3, 5, 8) and dx.dtype == torch.bfloat16 and dy.shape[0] == 0


@pytest.mark.gpu
def test_gpu_large_sizes() -> None:
    """256 x 256 (cost tile in the global workspace), 130 x 256 and 128 x 128, fp32 + 3xTF32."""
    ok, why = ok_cuda.is_available()
    if not ok:
        pytest.skip(why)
    ok_cuda._use_module(None)
    for n, m in ((256, 256), (130, 256), (128, 128)):
        cfg = SolverConfig(eps=0.05, max_iter=50, tol=0.0, grad="implicit")
        P = _problem(3, n, m, 64, torch.float32, seed=n + m, device="cuda", ragged=False)
        o = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", cfg)
        Cr, ar, br = (_ref_on(P, k, torch.float32) for k in ("C", "a", "b"))
        r = reference.forward(Cr, ar, br, cfg)
        _compare_out(o, r, torch.float32)
        gv, gl = _grad_inputs(3, torch.float32, 3)
        dx, dy = ok_cuda.backward_sample(
            P["x"], P["y"], P["a"], P["b"], "cosine", o, gv.cuda(), gl.cuda(), cfg, True
        )
        Gr = reference.backward(Cr, ar, br, r, gv, gl, cfg)
        dxr, dyr = cost_vjp(Gr, P["x"].cpu(), P["y"].cpu(), "cosine", True)
        scale = max(dxr.abs().max().item(), dyr.abs().max().item())
        _close(dx, dxr, f"dx {n}x{m}", rtol=5e-3, atol=2e-3 * scale)
        _close(dy, dyr, f"dy {n}x{m}", rtol=5e-3, atol=2e-3 * scale)


@pytest.mark.gpu
def test_gpu_side_stream_and_graph_capture() -> None:
    """Launches follow torch's current stream (no host sync) and can be captured in a graph."""
    ok, why = ok_cuda.is_available()
    if not ok:
        pytest.skip(why)
    ok_cuda._use_module(None)
    cfg = SolverConfig(eps=0.1, max_iter=30, tol=1e-6, check_every=5, grad="implicit")
    P = _problem(8, 40, 33, 16, torch.float32, seed=21, device="cuda")
    want = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", cfg)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", cfg)
    torch.cuda.current_stream().wait_stream(side)
    _close(got.value_linear, want.value_linear, "side stream", rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = ok_cuda.forward_sample(P["x"], P["y"], P["a"], P["b"], "cosine", cfg)
    graph.replay()
    torch.cuda.synchronize()
    _close(cap.value_linear, want.value_linear, "graph replay", rtol=0, atol=0)
    assert cap.n_iters.tolist() == want.n_iters.tolist()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
