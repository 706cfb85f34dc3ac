"""The ``cpu`` backend: fused C++ Sinkhorn kernels (``optical_kernels._cpu_<isa>``, csrc/cpu).

Runtime ISA dispatch: setup.py compiles csrc/cpu once per instruction set (``base``,
``avx2`` = x86-64-v3, ``avx512`` = x86-64-v4, optionally ``native``); at import the best
variant the CPU supports is loaded (:func:`supported_isas`), or the one named by
``OPTICAL_KERNELS_CPU_ISA`` (e.g. ``avx2`` to measure the AVX2 kernels on an AVX-512 host).
:data:`ISA` names the variant in use; ``backends()["cpu"]["reason"]`` reports it.

Implements the backend contract of :mod:`optical_kernels.backends.contract` (``forward``,
``backward``, ``is_available``) for CPU tensors in float32 and float64 (float16/bfloat16 are
upcast to float32), and ``PointCostBackend`` (``point_cost_forward`` / ``_backward``: the
cosine and dot cost matrices from points, csrc/cpu/cost.cpp; see the section at the end).
The C++ module receives raw data pointers, sizes and element strides;
this wrapper checks the inputs, allocates every output with torch and calls into C++ with the
GIL released.

How it computes the same map as the reference (docs/design.md §2, §5):

* OpenMP over problems (one problem per thread); a problem with ``n·m ≥ PAR_MIN`` valid
  entries runs alone with its matrix-vector products split over all threads.
* Each problem is compacted to its valid rows/columns, then iterated in the *stabilised
  scaling form*: ``K̃ = exp((f̄ ⊕ ḡ − C)/ε)``, ``u ← 1/(K̃ (b∘v))``, ``v ← 1/(K̃ᵀ(a∘u))``
  (damped for unbalanced problems) — FMA-only matrix-vector products, with the potentials
  absorbed into ``K̃`` (exponentials) only when ``|log u|`` or ``|log v|`` exceed τ, when ε
  changes (ε-scaling half-steps run in the log domain) or when a sum leaves the safe
  floating-point range (that half-step is then redone in the log domain). The stopping error
  ``Σ_i |a_i u_i (K̃ b∘v)_i − a_i|`` is fused into the next f-step.
* ``backward``: ``envelope`` → ``(gv + gl) P``; ``implicit`` → the docs/design.md §3 system solved
  exactly through its Schur complement on the smaller side (float64 Cholesky, null space
  removed by a rank-one term; extra null directions of a plan whose support splits into
  blocks at tiny ε are dropped) for ``min(n, m) ≤ DIRECT_MAX``, else Jacobi-PCG as the
  reference; it also supports unbalanced problems (``κ = 1 + ε/ρ`` on the diagonal, see
  :func:`backward`). ``unrolled`` → reverse pass over the stored potentials
  (``out.history = (hist_f [T, B, n], hist_g [T, B, m])``) in the same scaling form: the
  softmax weights of each half-step are ``K̃ diag(α) / (K̃ᵀα)`` with ``K̃`` anchored at stored
  potentials, and ``dC`` accumulates as ``K̃ ∘ Σ_t (rank-one terms)``.

Measured (S1, B=64, n=m=32, 100 iterations, 1 thread): the scaling form is ~9× faster than
plain log-domain iterations (``LOG_DOMAIN = True``), ~5× in the unrolled reverse pass.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from ..config import SolverConfig, SolverOut
from ..constants import Cost, DType, grad_code
from ..costs import NORM_FLOOR
from . import contract

#: ISA variants of the compiled module, best first (setup.py builds ``_cpu_<isa>`` for each).
ISA_VARIANTS = ("native", "avx512", "avx2", "base")
#: Environment variable forcing one variant (e.g. ``avx2`` on an AVX-512 host, to measure it).
ISA_ENV = "OPTICAL_KERNELS_CPU_ISA"
# x86 feature flags (as /proc/cpuinfo names them) each variant's compiler target needs:
# x86-64-v3 and x86-64-v4 of the x86-64 psABI.
_X86_NEEDS = {
    "avx2": ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"),
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags the OS reports (Linux ``/proc/cpuinfo``), or ``None``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def supported_isas() -> tuple[str, ...]:
    """Variants this CPU can run, best first (``base`` always; ``native`` is not probed).

    Linux: the flags of ``/proc/cpuinfo`` (the kernel clears AVX/AVX-512 flags it does not
    enable, so they also mean OS support). Elsewhere: torch's own probe,
    ``torch.backends.cpu.get_cpu_capability()``.
    """
    flags = _cpu_flags()
    if flags is not None:
        ok = [isa for isa in ("avx512", "avx2") if all(f in flags for f in _X86_NEEDS[isa])]
    else:
        cap = torch.backends.cpu.get_cpu_capability()
        ok = {"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}.get(cap, [])
    return (*ok, "base")


def _load_default() -> tuple[object | None, str, str]:
    """The variant chosen at import: ``(module or None, isa, why this one / import error)``."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced and forced not in ISA_VARIANTS:
        return None, "", f"{ISA_ENV}={forced!r}: expected one of {ISA_VARIANTS}"
    usable = supported_isas()
    if forced and forced != "native" and forced not in usable:
        return None, "", (
            f"{ISA_ENV}={forced}, but this CPU supports only {', '.join(usable)} "
            "(its instructions would fault)"
        )
    order = [forced] if forced else [v for v in ISA_VARIANTS if v == "native" or v in usable]
    errors = []
    for isa in order:
        try:
            mod = importlib.import_module(f"optical_kernels._cpu_{isa}")
        except ImportError as exc:
            errors.append(f"_cpu_{isa}: {exc}")
            continue
        if forced:
            why = f"forced by {ISA_ENV}={forced}; this CPU supports {', '.join(usable)}"
        else:
            why = f"best built variant for this CPU (supports {', '.join(usable)})"
        return mod, isa, why
    return None, "", "; ".join(errors) or "no variant selected"


_cpu, ISA, _WHY = _load_default()
_IMPORT_ERROR: str | None = None if _cpu is not None else _WHY


def built_isas() -> tuple[str, ...]:
    """The variants present in this installation (importable ``_cpu_<isa>`` modules)."""
    found = []
    for isa in ISA_VARIANTS:
        if importlib.util.find_spec(f"optical_kernels._cpu_{isa}") is not None:
            found.append(isa)
    return tuple(found)


def set_isa(isa: str | None) -> str:
    """Switch the backend to variant ``isa`` for the rest of the process (``None``: the
    automatic choice again); returns the variant now in use.

    For measurements and tests (e.g. the AVX2 kernels on an AVX-512 host). Raises
    ``ValueError`` for an unknown, unbuilt or unsupported variant.
    """
    global _cpu, ISA, _WHY, _IMPORT_ERROR
    if isa is None:
        mod, name, why = _load_default()
    else:
        if isa not in ISA_VARIANTS:
            raise ValueError(f"isa must be one of {ISA_VARIANTS} or None, got {isa!r}")
        if isa != "native" and isa not in supported_isas():
            raise ValueError(f"isa={isa!r}: this CPU supports only {', '.join(supported_isas())}")
        try:
            mod = importlib.import_module(f"optical_kernels._cpu_{isa}")
        except ImportError as exc:
            msg = f"isa={isa!r}: optical_kernels._cpu_{isa} is not built ({exc})"
            raise ValueError(msg) from exc
        name, why = isa, f"set by optical_kernels.backends.cpu.set_isa({isa!r})"
    if mod is None:
        raise ValueError(why)
    _cpu, ISA, _WHY, _IMPORT_ERROR = mod, name, why, None
    return ISA

#: Problems with at least this many valid entries (n·m) use all threads on their own.
PAR_MIN = 1 << 18
#: Implicit gradient: dense Schur-complement solve when min(n, m) ≤ DIRECT_MAX, else CG.
DIRECT_MAX = 384
#: ``True``: plain log-domain iterations and reverse pass (2·n·m exponentials per iteration)
#: instead of the stabilised scaling form; same results to rounding. For measurement/testing.
LOG_DOMAIN = False
#: ``True``: the forward loop ends at an exact fixed point of the scaling iteration (with
#: ``tol=0`` and constant ε, an iteration that reproduces its state bit for bit makes every
#: later one repeat it; the outputs are those of all ``max_iter`` iterations, bit for bit).
#: ``False`` computes every iteration. For measurement/testing (docs/design.md §5).
FIXED_POINT_EXIT = True


def is_available() -> tuple[bool, str]:
    """``(True, build info)`` when the C++ extension is importable, else ``(False, why)``."""
    if _cpu is None:
        return False, (
            f"optical_kernels._cpu_<isa> is not built ({_IMPORT_ERROR}); run `pip install -e .` "
            "with a C++ compiler (g++ or clang with OpenMP) present"
        )
    return True, (
        f"fused C++ kernels, variant {ISA} ({_WHY}; {_cpu.build_info()}); point-cost GEMM: "
        f"{gemm_info(torch.float32)}"
    )


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU tensors of a floating dtype."""
    return torch.device(device).type == "cpu" and dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    )


def _require() -> None:
    if _cpu is None:
        raise RuntimeError(is_available()[1])


def _check(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Validate ``C`` [B, n, m], ``a`` [B, n], ``b`` [B, m] (CPU, one float dtype)."""
    for name, t in (("C", C), ("a", a), ("b", b)):
        contract.check_type(name, t)
        if t.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; {name} is on {t.device}")
        contract.check_floating(name, t)
    contract.check_cost_matrix(C)
    contract.check_weights(a, b, *C.shape)
    C = contract.upcast(C)
    dtype = C.dtype
    a, b = contract.upcast(a).to(dtype), contract.upcast(b).to(dtype)
    return C.detach(), a.detach().contiguous(), b.detach().contiguous()


@functools.lru_cache(maxsize=64)
def _eps_cached(table: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.float64)


def _eps_schedule(cfg: SolverConfig, T: int) -> torch.Tensor:
    """ε_t for t = 1..L, float64 (``cfg.schedule.table``, resolved once by the config; cached,
    read-only), L ≤ T the first iteration at which ε_t reaches ``eps``; the C++ side uses
    ``eps`` for t > L. Constant ε gives an empty table (issue 9: a ``max_iter`` table took
    seconds and memory for ``max_iter=10**7``)."""
    return _eps_cached(cfg.schedule.table)[: max(T, 1)]


def _params(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig) -> object:
    """The :class:`_cpu.Params` of one call: sizes, input pointers and the resolved
    configuration (``eps_t``: :func:`_eps_schedule`). Returns ``(params, keep-alive)``."""
    p = _cpu.Params()  # type: ignore[union-attr]
    p.B, p.n, p.m = C.shape
    p.dtype = int(DType.F32 if C.dtype == torch.float32 else DType.F64)
    p.C, p.sC = C.data_ptr(), tuple(C.stride())
    p.a, p.sa = a.data_ptr(), tuple(a.stride())
    p.b, p.sb = b.data_ptr(), tuple(b.stride())
    p.eps, p.rho = float(cfg.eps), -1.0 if cfg.rho is None else float(cfg.rho)
    p.max_iter, p.tol, p.check_every = int(cfg.max_iter), float(cfg.tol), int(cfg.check_every)
    eps_t = _eps_schedule(cfg, cfg.max_iter)
    p.eps_t, p.eps_len = eps_t.data_ptr(), eps_t.numel()
    p.num_threads, p.log_only, p.par_min = torch.get_num_threads(), int(LOG_DOMAIN), PAR_MIN
    p.direct_max, p.fixed_point_exit = DIRECT_MAX, int(FIXED_POINT_EXIT)
    return p, eps_t


def forward(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cfg: SolverConfig,
    *,
    iters_run: torch.Tensor | None = None,
) -> SolverOut:
    """Solve a padded batch: ``C`` [B, n, m], ``a`` [B, n], ``b`` [B, m] -> :class:`SolverOut`.

    ``iters_run`` (diagnostics, optional): a contiguous int32 [B] tensor that receives the
    number of iterations actually computed per problem (below ``n_iters`` where the exact
    fixed-point exit, :data:`FIXED_POINT_EXIT`, ended the loop).

    Same map, stopping rule, values and conventions as the oracle's ``forward``
    (0 at padded positions; empty problems give zeros and ``n_iters = 0``). For
    ``cfg.grad == "unrolled"`` the potentials after every iteration are returned in
    ``history = (hist_f [max_iter, B, n], hist_g [max_iter, B, m])`` (rows past ``n_iters``
    are 0 and never read).
    """
    _require()
    C, a, b = _check(C, a, b)
    B, n, m = C.shape
    dt = C.dtype
    out = contract.empty_out(B, n, m, dt, C.device, cfg)  # the C++ side writes into it
    f, g, value, value_linear, n_iters, err, _ = out
    unrolled = out.history is not None
    hist_f, hist_g = out.history if unrolled else (None, None)
    T = cfg.max_iter
    if B > 0 and n > 0 and m > 0:
        p, keep = _params(C, a, b, cfg)
        p.f, p.g, p.value, p.value_linear = (t.data_ptr() for t in (f, g, value, value_linear))
        p.n_iters, p.err = n_iters.data_ptr(), err.data_ptr()
        if unrolled:
            p.hist_f, p.hist_g, p.hist_T = hist_f.data_ptr(), hist_g.data_ptr(), T
        if iters_run is not None:
            ok_buf = (iters_run.dtype == torch.int32 and iters_run.shape == (B,)
                      and iters_run.is_contiguous() and iters_run.device.type == "cpu")  # fmt: skip
            if not ok_buf:
                raise ValueError(f"iters_run must be a contiguous CPU int32 tensor of shape ({B},)")
            p.iters_run = iters_run.data_ptr()
        _cpu.forward(p)
        del keep
    return out


def backward(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: SolverOut,
    grad_value: torch.Tensor | None,
    grad_value_linear: torch.Tensor | None,
    cfg: SolverConfig,
) -> torch.Tensor:
    """``∂(Σ_k gv_k value_k + gl_k value_linear_k)/∂C`` [B, n, m] for ``cfg.grad``.

    ``implicit`` for unbalanced problems (which the reference does not implement) uses the
    unbalanced fixed point: ``H = [[κ diag(P1), P], [Pᵀ, κ diag(Pᵀ1)]]``, ``κ = 1 + ε/ρ``,
    with the same right-hand side and ``∂L/∂C_ij = P_ij (1 + (u_i + v_j − C_ij)/ε)``.
    ``unrolled`` needs ``out.history`` from :func:`forward` with ``grad="unrolled"``; without
    it only the direct partials at the final potentials are returned (as the reference).
    The CG cap and tolerance (used when ``min(n, m) > DIRECT_MAX``) are
    ``cfg.cg_limits(n, m, dtype)``.
    """
    _require()
    contract.check_grad(cfg)
    mode = grad_code(cfg.grad)
    C, a, b = _check(C, a, b)
    B, n, m = C.shape
    dt = C.dtype
    f = out.f.detach().to(dt).contiguous()
    g = out.g.detach().to(dt).contiguous()
    n_iters = out.n_iters.detach().to(torch.int32).contiguous()
    gv, gl = contract.grad_weights(grad_value, grad_value_linear, B, dt, C.device)
    dC = torch.zeros(B, n, m, dtype=dt)
    hist = contract.history(out, cfg, B, n, m, dt)
    hist_f, hist_g = hist if hist is not None else (None, None)
    if B > 0 and n > 0 and m > 0:
        p, keep = _params(C, a, b, cfg)
        p.mode = mode
        p.f, p.g, p.n_iters = f.data_ptr(), g.data_ptr(), n_iters.data_ptr()
        if hist_f is not None and hist_f.shape[0] > 0:
            p.hist_f, p.hist_g, p.hist_T = hist_f.data_ptr(), hist_g.data_ptr(), hist_f.shape[0]
        p.grad_value, p.grad_value_linear, p.dC = gv.data_ptr(), gl.data_ptr(), dC.data_ptr()
        p.cg_max_iter, p.cg_tol = cfg.cg_limits(n, m, dt)
        _cpu.backward(p)
        del keep
    return dC


# ------------------------------------------------------------------------- point costs
# The cost matrix from points (csrc/cpu/cost.cpp; docs/design.md §5, PointCostBackend in
# contract.py): per problem, while its points sit in cache, the GEMM x·yᵀ written straight into
# C, the inverse norms, C = 1 − S σ τᵀ (cosine) or −S (dot), the finiteness flag of the unmasked
# cost and 0 at padded entries, where the torch cost (costs.cost_matrix) spends two norm
# reductions over the points, four elementwise passes over C and a masking ``where``. Backward,
# from G = ∂L/∂C: one GEMM per side, dx = W·y, dy = Wᵀ·x with W = −G∘στᵀ, then a pass adding
# the radial parts c∘x, e∘y (c_i = σ_i² Σ_j G_ij S_ij). The GEMMs call the BLAS
# sgemm_ / dgemm_ that torch's CPU library exports (MKL on x86 wheels), found once with ctypes
# and checked against cost.cpp's built-in GEMM before first use (a wrong calling convention
# gives wrong numbers there, not in training); without them, or with
# OPTICAL_KERNELS_CPU_BLAS=0, the built-in register-blocked GEMM runs (:func:`gemm_info`).
# Measured at S1 (B = 64, n = m = 32, d = 384, AVX-512): this beat torch's batched GEMM
# followed by a C++ epilogue, whose extra norm pass rereads the points from memory.
# sqeuclidean stays on the torch cost (its centring needs a second copy of the points).

#: Costs :func:`point_cost_forward` computes (the others go through optical_kernels.costs).
POINT_COSTS = ("cosine", "dot")
#: ``0`` forces the built-in GEMM of cost.cpp (measurement and tests).
BLAS_ENV = "OPTICAL_KERNELS_CPU_BLAS"
_CODES = {torch.float32: int(DType.F32), torch.float64: int(DType.F64)}
_BLAS_SYMBOLS = {torch.float32: "sgemm_", torch.float64: "dgemm_"}


def _torch_cpu_library() -> Path | None:
    """The shared library of torch's CPU kernels (where its BLAS symbols live)."""
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}
    lib = Path(torch.__file__).parent / "lib" / names.get(sys.platform, "libtorch_cpu.so")
    return lib if lib.exists() else None


@functools.cache
def _blas(dtype: torch.dtype, isa_module: object) -> tuple[int, str]:
    """``(address of the BLAS ?gemm_ for dtype, or 0; what runs)``, resolved and checked once
    per dtype and ISA variant."""
    if os.environ.get(BLAS_ENV, "1").strip() == "0":
        return 0, f"built-in GEMM ({BLAS_ENV}=0)"
    path = _torch_cpu_library()
    if path is None:
        return 0, "built-in GEMM (torch's CPU library not found)"
    sym = _BLAS_SYMBOLS[dtype]
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(str(path)), sym), ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0, f"built-in GEMM ({path.name} exports no {sym})"
    if not isa_module.cost_gemm_selftest(addr, _CODES[dtype]):  # type: ignore[attr-defined]
        warnings.warn(
            f"optical_kernels: {sym} of {path.name} disagrees with the built-in GEMM on a small "
            "product; the cpu backend's point costs use the built-in GEMM (slower)",
            RuntimeWarning,
            stacklevel=4,
        )
        return 0, f"built-in GEMM ({sym} of {path.name} failed the self-test)"
    return addr, f"{sym} of {path.name}"


def gemm_info(dtype: torch.dtype = torch.float32) -> str:
    """Which GEMM the point costs use for ``dtype`` (float32 or float64)."""
    _require()
    return _blas(dtype, _cpu)[1]


def supports_point_cost(cost: str, *tensors: torch.Tensor) -> bool:
    """Whether :func:`point_cost_forward` takes these points: a cost of :data:`POINT_COSTS`,
    the C++ module built, CPU float32/float64 tensors, no Dynamo tracing or functorch
    transform (those take the torch cost of optical_kernels.costs: same values to rounding)."""
    if cost not in POINT_COSTS or _cpu is None or contract.tracing():
        return False
    return all(t.device.type == "cpu" and t.dtype in _CODES for t in tensors)


def _cost_params(x: torch.Tensor, y: torch.Tensor, cost: str, xv: torch.Tensor, yv: torch.Tensor,
                 C: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> object:  # fmt: skip
    p = _cpu.CostParams()  # type: ignore[union-attr]
    p.B, p.n, p.d = x.shape
    p.m = y.shape[1]
    p.dtype = _CODES[x.dtype]
    p.cost = int(Cost.COSINE if cost == "cosine" else Cost.DOT)
    p.x, p.y, p.x_valid, p.y_valid = x.data_ptr(), y.data_ptr(), xv.data_ptr(), yv.data_ptr()
    p.C, p.x_scale, p.y_scale = C.data_ptr(), xs.data_ptr(), ys.data_ptr()
    p.gemm = _blas(x.dtype, _cpu)[0]
    p.norm_floor = NORM_FLOOR
    p.num_threads = torch.get_num_threads()
    return p


def point_cost_forward(
    x: torch.Tensor, y: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor, cost: str
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], bool]:
    """``(C [B, n, m], (σ [B, n], τ [B, m]), finite)`` from contiguous x [B, n, d],
    y [B, m, d] of one float dtype and contiguous bool masks: the cost, 0 at padded entries,
    the inverse norms its backward needs (cosine; unused for dot), and whether the unmasked
    cost was finite."""
    _require()
    B, n, _ = x.shape
    m = y.shape[1]
    C = x.new_empty(B, n, m)
    xs, ys = x.new_empty(B, n), x.new_empty(B, m)
    p = _cost_params(x, y, cost, x_valid, y_valid, C, xs, ys)
    finite = bool(_cpu.cost_forward(p))  # type: ignore[union-attr]
    return C, (xs, ys), finite


def point_cost_backward(
    G: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    C: torch.Tensor,
    saved: tuple[torch.Tensor, torch.Tensor],
    cost: str,
    need_dx: bool,
    need_dy: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂x or None, ∂L/∂y or None)`` from ``G = ∂L/∂C`` [B, n, m] and what
    :func:`point_cost_forward` returned (``C``, ``saved``)."""
    _require()
    xs, ys = saved
    G = G.to(C.dtype).contiguous()
    dx = torch.empty_like(x) if need_dx else None
    dy = torch.empty_like(y) if need_dy else None
    p = _cost_params(x, y, cost, x_valid, y_valid, C, xs, ys)
    p.G = G.data_ptr()
    p.dx = dx.data_ptr() if dx is not None else 0
    p.dy = dy.data_ptr() if dy is not None else 0
    _cpu.cost_backward(p)  # type: ignore[union-attr]
    return dx, dy
