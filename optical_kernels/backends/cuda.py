"""The ``cuda`` backend: resident CUDA C++ kernels (``optical_kernels._cuda``, csrc/cuda).

Implements the backend contract (:mod:`optical_kernels.backends.contract`) for CUDA tensors with
``n, m ≤ 256`` (:data:`MAX_SIZE`): ``forward``, ``backward``, ``forward_sample``,
``backward_sample`` and ``is_available``. Larger problems raise ``ValueError``; the API routes
them to another backend.

One thread block per problem (docs/design.md §5, resident kernel):

* the cost tile ``C`` [n, m] lives in shared memory for the whole solve (copied from ``C``, or
  computed as ``x yᵀ`` on tensor cores — 3xTF32 for float32 points, native MMA for
  float16/bfloat16 points with float32 accumulation, a shared-memory tiled FMA product for
  float64); when it does not fit (e.g. 256 x 256 float32) it stays in a global workspace
  (L2-resident);
* every iteration runs on chip: ``f_i ← −λε LSE_j[log b_j + (g_j − C_ij)/ε]`` with a group of
  lanes per row (warp-shuffle max and sum), ``g_j`` with one thread per column and an online
  single-exponential LSE; all exponentials are shifted by their running maximum, computed as
  ``exp2`` with ``log2(e)/ε`` folded in;
* per-problem convergence every ``check_every`` iterations (``err < tol`` with the L1
  row-marginal error), ε-scaling and unbalanced damping exactly as :mod:`optical_kernels.config`;
* backward: ``envelope`` ``(gv + gl) P``; ``implicit`` Jacobi-preconditioned CG on the
  docs/design.md §3 system on chip (restricted to valid entries; unbalanced problems use
  ``κ = 1 + ε/ρ`` on the diagonal, as the ``cpu`` backend); ``unrolled`` replays the stored
  potentials ``history = (hist_f [T, B, n], hist_g [T, B, m])`` in reverse; ``*_sample``
  finish with the chain rule ``dx``, ``dy`` (tensor-core products ``G ŷ``, ``Gᵀ x̂``).

The kernels are launched on ``torch.cuda.current_stream()`` without host synchronisation. The
functions here are plain Python over the compiled module: ``torch.compile`` traces them through
the custom ops of :mod:`optical_kernels.ops` (the one custom-op layer), never directly.

Environment: ``OPTICAL_KERNELS_CUDA_MMA=0`` disables the tensor-core products (FMA fallback).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from ..config import SolverConfig, SolverOut
from ..constants import CUDA_MAX_SIZE, TORCH_DTYPES, Cost, cost_code, grad_code
from . import contract

try:  # the compiled extension is optional (built by setup.py only where nvcc exists)
    from .. import _cuda  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _cuda = None
    _IMPORT_ERROR = str(exc)

#: Largest n and m the resident kernels accept.
MAX_SIZE = CUDA_MAX_SIZE
_DTYPES = {dt: int(code) for dt, code in TORCH_DTYPES.items()}

# Module that launches the kernels: optical_kernels._cuda, or (tests only) the CPU emulator
# build optical_kernels._cuda_emu installed by _use_module(), which takes host pointers.
_impl: ModuleType | None = _cuda
_emulated = False
# Test hook: plan for this much shared memory per block instead of the device's (forces the
# global-workspace fallback of the cost / work tiles when small). None: the device's.
_SMEM_LIMIT: int | None = None


def _use_module(mod: ModuleType | None) -> None:
    """Test hook: launch through ``mod`` (e.g. the CPU emulator build); ``None`` restores
    ``optical_kernels._cuda``. The emulator accepts CPU tensors."""
    global _impl, _emulated
    _impl = _cuda if mod is None else mod
    _emulated = bool(getattr(mod, "EMULATED", False)) if mod is not None else False


def is_available() -> tuple[bool, str]:
    """``(True, info)`` when ``optical_kernels._cuda`` is built and a CUDA device is usable."""
    if _emulated:
        return True, "CPU emulator build of the CUDA kernels (tests only)"
    if _cuda is None:
        return False, (
            f"optical_kernels._cuda is not built ({_IMPORT_ERROR}); build it with nvcc present "
            "(`pip install -e .`), on a machine with the CUDA toolkit"
        )
    if not torch.cuda.is_available():
        return False, "torch reports no usable CUDA device (torch.cuda.is_available() is False)"
    if _cuda.device_count() == 0:
        return False, f"optical_kernels._cuda sees no CUDA device ({_cuda.device_error()})"
    return True, f"CUDA C++ resident kernels, one block per problem (n, m <= {MAX_SIZE})"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors of a floating dtype (problem sizes are checked at call time)."""
    on_device = torch.device(device).type == "cuda" or _emulated
    return on_device and dtype in _DTYPES


# --------------------------------------------------------------------------- helpers
def _use_mma() -> bool:
    return os.environ.get("OPTICAL_KERNELS_CUDA_MMA", "1") != "0"


def _require_device(*named: tuple[str, Tensor]) -> None:
    """CUDA tensors on one device and a usable module (the emulator takes CPU tensors)."""
    if _emulated:
        return
    dev = named[0][1].device
    for name, t in named:
        if t.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors; {name} is on {t.device}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {dev}")
    ok, why = is_available()
    if not ok:
        raise RuntimeError(f"backend='cuda' is not available: {why}")


def _check_size(n: int, m: int) -> None:
    if n > MAX_SIZE or m > MAX_SIZE:
        raise ValueError(
            f"backend='cuda' handles n, m <= {MAX_SIZE} (resident kernels); got n={n}, m={m}. "
            "Use backend='triton' or 'torch' for larger problems"
        )


def _stream(t: Tensor) -> int:
    if t.device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _params(B: int, n: int, m: int, dt: torch.dtype, like: Tensor, cfg: SolverConfig) -> object:
    p = _impl.Params()  # type: ignore[union-attr]
    p.B, p.n, p.m = B, n, m
    p.dtype = _DTYPES[dt]
    p.eps = float(cfg.eps)
    p.rho = -1.0 if cfg.rho is None else float(cfg.rho)
    p.max_iter = int(cfg.max_iter)
    p.tol = float(cfg.tol)
    p.check_every = int(cfg.check_every)
    if cfg.eps_schedule is not None:
        p.has_sched = 1
        p.sched_start, p.sched_factor = (float(v) for v in cfg.eps_schedule)
        p.sched_t_eps = cfg.schedule.t_eps
    p.use_mma = 1 if _use_mma() else 0
    p.stream = _stream(like)
    if like.device.type == "cuda":
        p.device = (
            like.device.index if like.device.index is not None else torch.cuda.current_device()
        )
    if _SMEM_LIMIT is not None:
        p.smem_limit = int(_SMEM_LIMIT)
    return p


def _workspace(p: object, backward: bool, like: Tensor) -> Tensor | None:
    nbytes = int(_impl.workspace_bytes(p, backward))  # type: ignore[union-attr]
    if nbytes <= 0:
        return None
    ws = torch.empty(nbytes + 256, dtype=torch.uint8, device=like.device)
    addr = ws.data_ptr()
    p.workspace = addr + (-addr) % 256  # type: ignore[attr-defined]
    p.workspace_bytes = nbytes  # type: ignore[attr-defined]
    return ws


def _launch(p: object, backward: bool, like: Tensor) -> None:
    # the workspace is allocated on the current stream and only used there: the caching
    # allocator may reuse it for later work of that stream once this function returns
    ws = _workspace(p, backward, like)  # noqa: F841 (kept alive across the launch)
    if backward:
        _impl.backward(p)  # type: ignore[union-attr]
    else:
        _impl.forward(p)  # type: ignore[union-attr]


def _set_forward_outputs(p: object, out: SolverOut) -> None:
    p.f, p.g = out.f.data_ptr(), out.g.data_ptr()  # type: ignore[attr-defined]
    p.value, p.value_linear = out.value.data_ptr(), out.value_linear.data_ptr()  # type: ignore[attr-defined]
    p.n_iters, p.err = out.n_iters.data_ptr(), out.err.data_ptr()  # type: ignore[attr-defined]
    if out.history is not None:
        hf, hg = out.history
        p.hist_f, p.hist_g, p.hist_T = hf.data_ptr(), hg.data_ptr(), hf.shape[0]  # type: ignore[attr-defined]


def _new_out(B: int, n: int, m: int, dt: torch.dtype, device: torch.device,
             cfg: SolverConfig) -> SolverOut:
    """Forward outputs for the kernel to write (the history zeroed: rows past n_iters stay 0)."""
    z = dict(dtype=dt, device=device)
    hf, hg = contract.new_history(cfg, B, n, m, dt, device)
    return contract.solver_out(
        torch.empty(B, n, **z), torch.empty(B, m, **z), torch.empty(B, **z),
        torch.empty(B, **z), torch.empty(B, dtype=torch.int32, device=device),
        torch.empty(B, **z), hf, hg, cfg,
    )  # fmt: skip


def _set_points(p: object, x: Tensor, y: Tensor, cost: str) -> None:
    p.cost = cost_code(cost)  # type: ignore[attr-defined]
    p.in_dtype = _DTYPES[x.dtype]  # type: ignore[attr-defined]
    p.d = x.shape[2]  # type: ignore[attr-defined]
    p.x, p.sx = x.data_ptr(), tuple(x.stride())  # type: ignore[attr-defined]
    p.y, p.sy = y.data_ptr(), tuple(y.stride())  # type: ignore[attr-defined]


def _set_matrix(p: object, C: Tensor) -> None:
    p.in_dtype = p.dtype  # type: ignore[attr-defined]
    p.cost = int(Cost.GIVEN)  # type: ignore[attr-defined]
    p.C, p.sC = C.data_ptr(), tuple(C.stride())  # type: ignore[attr-defined]


def _backward_inputs(
    p: object, out: SolverOut, gv: Tensor | None, gl: Tensor | None, cfg: SolverConfig,
    B: int, n: int, m: int, dt: torch.dtype, device: torch.device,
) -> tuple[Tensor, ...]:
    """Point ``p`` at the backward inputs (cast to ``dt``, contiguous); returns the tensors
    to keep alive across the launch."""
    gv, gl = contract.grad_weights(gv, gl, B, dt, device)
    hist = contract.history(out, cfg, B, n, m, dt)
    f = out.f.detach().to(dt).contiguous()
    g = out.g.detach().to(dt).contiguous()
    n_iters = out.n_iters.detach().to(torch.int32).contiguous()
    p.mode = grad_code(cfg.grad)  # type: ignore[attr-defined]
    p.f, p.g, p.n_iters = f.data_ptr(), g.data_ptr(), n_iters.data_ptr()  # type: ignore[attr-defined]
    if hist is not None and hist[0].numel() > 0 and hist[1].numel() > 0:
        p.hist_f, p.hist_g, p.hist_T = hist[0].data_ptr(), hist[1].data_ptr(), hist[0].shape[0]  # type: ignore[attr-defined]
    p.grad_value, p.grad_value_linear = gv.data_ptr(), gl.data_ptr()  # type: ignore[attr-defined]
    p.cg_max_iter, p.cg_tol = cfg.cg_limits(n, m, dt)  # type: ignore[attr-defined]
    return (f, g, n_iters, gv, gl) + (hist or ())


# --------------------------------------------------------------------------- input checks
def _weights(
    C_shape: tuple[int, int, int], a: Tensor, b: Tensor, dt: torch.dtype
) -> tuple[Tensor, Tensor]:
    contract.check_weights(a, b, *C_shape)
    contract.check_floating("a", a)
    contract.check_floating("b", b)
    return a.detach().to(dt).contiguous(), b.detach().to(dt).contiguous()


def _check_matrix(C: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    for name, t in (("C", C), ("a", a), ("b", b)):
        contract.check_type(name, t)
    contract.check_floating("C", C)
    contract.check_cost_matrix(C)
    _check_size(C.shape[1], C.shape[2])
    _require_device(("C", C), ("a", a), ("b", b))
    C = contract.upcast(C.detach())
    if C.stride(-1) != 1:
        C = C.contiguous()
    a, b = _weights(tuple(C.shape), a, b, C.dtype)
    return C, a, b


def _check_points(x: Tensor, y: Tensor, a: Tensor, b: Tensor, cost: str) -> tuple[Tensor, ...]:
    for name, t in (("x", x), ("y", y), ("a", a), ("b", b)):
        contract.check_type(name, t)
    contract.check_cost(cost)
    contract.check_points(x, y)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x and y must share a floating dtype, got {x.dtype} and {y.dtype}")
    _check_size(x.shape[1], y.shape[1])
    _require_device(("x", x), ("y", y), ("a", a), ("b", b))
    dt = contract.compute_dtype(x.dtype)
    if a.dtype == torch.float64 and x.dtype != torch.float64:
        x, y = x.to(torch.float64), y.to(torch.float64)
        dt = torch.float64
    x, y = x.detach(), y.detach()
    if x.shape[2] > 0 and x.stride(-1) != 1:
        x = x.contiguous()
    if y.shape[2] > 0 and y.stride(-1) != 1:
        y = y.contiguous()
    a, b = _weights((x.shape[0], x.shape[1], y.shape[1]), a, b, dt)
    return x, y, a, b


# --------------------------------------------------------------------------- contract
def forward(C: Tensor, a: Tensor, b: Tensor, cfg: SolverConfig) -> SolverOut:
    """Solve a padded batch: ``C`` [B, n, m], ``a`` [B, n], ``b`` [B, m] -> :class:`SolverOut`.

    Same map, stopping rule, values and conventions as the oracle's ``forward``
    (0 at padded positions; empty problems give zeros and ``n_iters = 0``). For
    ``cfg.grad == "unrolled"``, ``history = (hist_f [max_iter, B, n], hist_g [max_iter, B, m])``
    (rows past ``n_iters`` are 0 and never read). float16/bfloat16 ``C`` is upcast to float32.
    """
    C, a, b = _check_matrix(C, a, b)
    B, n, m = C.shape
    if B == 0 or n == 0 or m == 0:
        return contract.empty_out(B, n, m, C.dtype, C.device, cfg)
    out = _new_out(B, n, m, C.dtype, C.device, cfg)
    p = _params(B, n, m, C.dtype, C, cfg)
    _set_matrix(p, C)
    p.a, p.b = a.data_ptr(), b.data_ptr()
    _set_forward_outputs(p, out)
    _launch(p, False, C)
    return out


def backward(
    C: Tensor,
    a: Tensor,
    b: Tensor,
    out: SolverOut,
    grad_value: Tensor | None,
    grad_value_linear: Tensor | None,
    cfg: SolverConfig,
) -> Tensor:
    """``∂(Σ_k gv_k value_k + gl_k value_linear_k)/∂C`` [B, n, m] for ``cfg.grad``.

    ``envelope``: ``(gv + gl) P``. ``implicit``: ``gv P + gl ∂<P*, C>/∂C`` (docs/design.md §3, CG on
    chip; for unbalanced problems, which the reference does not implement, the diagonal of H
    carries ``κ = 1 + ε/ρ`` as in the ``cpu`` backend). ``unrolled``: reverse replay of
    ``out.history``; without a history only the direct partials at the final potentials
    (as the reference).
    """
    contract.check_grad(cfg)
    C, a, b = _check_matrix(C, a, b)
    B, n, m = C.shape
    G = torch.empty(B, n, m, dtype=C.dtype, device=C.device)
    if B == 0 or n == 0 or m == 0:
        return G.zero_()
    p = _params(B, n, m, C.dtype, C, cfg)
    _set_matrix(p, C)
    p.a, p.b = a.data_ptr(), b.data_ptr()
    keep = _backward_inputs(p, out, grad_value, grad_value_linear, cfg, B, n, m, C.dtype, C.device)
    p.G = G.data_ptr()
    _launch(p, True, C)
    del keep
    return G


def forward_sample(
    x: Tensor, y: Tensor, a: Tensor, b: Tensor, cost: str, cfg: SolverConfig
) -> SolverOut:
    """Solve with the cost fused from points: ``x`` [B, n, d], ``y`` [B, m, d] (padded rows
    0; centred for ``sqeuclidean``), ``cost`` in ``cosine | sqeuclidean | dot``.

    Outputs have ``a``'s dtype (float32 for float16/bfloat16 points, which are read as is and
    multiplied on tensor cores with float32 accumulation).
    """
    x, y, a, b = _check_points(x, y, a, b, cost)
    B, n, _ = x.shape
    m = y.shape[1]
    if B == 0 or n == 0 or m == 0:
        return contract.empty_out(B, n, m, a.dtype, a.device, cfg)
    out = _new_out(B, n, m, a.dtype, a.device, cfg)
    p = _params(B, n, m, a.dtype, a, cfg)
    _set_points(p, x, y, cost)
    p.a, p.b = a.data_ptr(), b.data_ptr()
    _set_forward_outputs(p, out)
    _launch(p, False, a)
    return out


def backward_sample(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    cost: str,
    out: SolverOut,
    grad_value: Tensor | None,
    grad_value_linear: Tensor | None,
    cfg: SolverConfig,
    need_dy: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] or None)`` in x's dtype: ``G = ∂L/∂C`` as in
    :func:`backward`, then the chain rule of :func:`optical_kernels.costs.cost_vjp`."""
    contract.check_grad(cfg)
    x_dtype = x.dtype
    x, y, a, b = _check_points(x, y, a, b, cost)
    B, n, d = x.shape
    m = y.shape[1]
    dx = torch.empty(B, n, d, dtype=a.dtype, device=a.device)
    dy = torch.empty(B if need_dy else 0, m, d, dtype=a.dtype, device=a.device)
    if B == 0 or n == 0 or m == 0:
        dx.zero_(), dy.zero_()
    else:
        p = _params(B, n, m, a.dtype, a, cfg)
        _set_points(p, x, y, cost)
        p.a, p.b = a.data_ptr(), b.data_ptr()
        keep = _backward_inputs(
            p, out, grad_value, grad_value_linear, cfg, B, n, m, a.dtype, a.device
        )
        p.dx = dx.data_ptr()
        if need_dy:
            p.dy, p.need_dy = dy.data_ptr(), 1
        _launch(p, True, a)
        del keep
    return dx.to(x_dtype), (dy.to(x_dtype) if need_dy else None)
