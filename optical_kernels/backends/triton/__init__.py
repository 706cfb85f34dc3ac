"""The ``triton`` backend: GPU kernels, also runnable on CPU under ``TRITON_INTERPRET=1``.

Implements the backend contract (:mod:`optical_kernels.backends.contract`: ``forward``,
``backward``, ``forward_sample``, ``backward_sample``, ``is_available``, ``supports``) and picks
the kernel family by size (:mod:`optical_kernels.backends.triton.launch`):

* padded ``n, m ≤ 128``: the resident kernel (:mod:`.resident`, :mod:`.backward`), one
  program per problem, the whole batch in one launch;
* larger: the streaming kernel (:mod:`.streaming`, imported lazily); if it is missing, a
  :class:`NotImplementedError` says so.

Dtypes: ``C`` float32/float64; points float16/bfloat16/float32/float64 (x and y of the same
dtype). Potentials, values and ``∂L/∂C`` are fp32 (fp64 for fp64 inputs; 16-bit points are
read as such and accumulated in fp32); ``dx``/``dy`` have the points' dtype. All dots
accumulate in fp32 (fp64 for fp64 inputs); fp32 dots are exact ``ieee`` by default (see
``OPTICAL_KERNELS_TRITON_DOT`` in :mod:`.launch`).

The functions here are plain Python over the kernel launchers (:func:`.resident.launch_forward`,
:func:`.backward.launch_backward`, :mod:`.streaming`); ``torch.compile`` traces them through the
custom ops of :mod:`optical_kernels.ops` (the one custom-op layer).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from ...config import SolverConfig, SolverOut
from ...constants import POINT_COSTS
from .. import contract

# The kernel modules are imported here, before ``def backward`` below: importing the submodule
# ``backward`` binds the package attribute ``backward`` to it, and the contract function must
# win. Without triton the import fails and is_available() reports why.
_IMPORT_ERROR: Exception | None = None
try:
    from . import backward as _bwd
    from . import resident as _res
except Exception as _exc:  # triton missing or broken: reported by is_available()
    _IMPORT_ERROR = _exc
    _bwd = _res = None  # type: ignore[assignment]

_SAMPLE_DTYPES = contract.POINT_DTYPES
_COST_DTYPES = (torch.float32, torch.float64)
_COSTS = POINT_COSTS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> tuple[bool, str]:
    """``(True, why)`` when triton imports and CUDA is available or TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # broken install
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if _IMPORT_ERROR is not None:
        err = f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
        return False, f"triton kernels cannot be imported ({err})"
    if _interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors of any float dtype; CPU tensors only under the interpreter."""
    return dtype in _SAMPLE_DTYPES and (device.type == "cuda" or _interpreting())


# ----------------------------------------------------------------------------- routing
def _kernels(n: int, m: int) -> str:
    from . import launch

    choice = launch.kernel_choice()
    if choice == "streaming":
        return "streaming"
    if launch.fits_resident(n, m):
        return "resident"
    if choice == "resident":
        raise ValueError(
            f"OPTICAL_KERNELS_TRITON_KERNEL=resident, but n={n}, m={m} exceed the resident "
            f"limit {launch.RESIDENT_MAX}"
        )
    return "streaming"


def _streaming(name: str, n: int, m: int) -> object:
    try:
        mod: ModuleType = importlib.import_module(".streaming", __name__)
    except ImportError as exc:
        raise NotImplementedError(
            f"triton backend: n={n}, m={m} exceed the resident-kernel limit and the streaming "
            f"kernel (optical_kernels/backends/triton/streaming.py) is not available ({exc})"
        ) from exc
    fn = getattr(mod, name, None)
    if fn is None:
        raise NotImplementedError(
            f"triton backend: n={n}, m={m} exceed the resident-kernel limit and "
            f"optical_kernels.backends.triton.streaming has no {name}()"
        )
    return fn


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"triton backend needs CUDA tensors, got a tensor on {t.device} "
                "(set TRITON_INTERPRET=1 before importing triton to run on CPU)"
            )


def _sched(cfg: SolverConfig) -> tuple[float | None, float | None]:
    if cfg.eps_schedule is None:
        return None, None
    return float(cfg.eps_schedule[0]), float(cfg.eps_schedule[1])


def _form() -> bool:
    from . import launch

    return launch.form() == "scaling"


def _check_sample(x: torch.Tensor, y: torch.Tensor, cost: str) -> None:
    contract.check_points(x, y)
    if x.dtype not in _SAMPLE_DTYPES:
        raise TypeError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    contract.check_cost(cost)


def _history(out: SolverOut, cfg: SolverConfig, B: int, n: int, m: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored potentials for the launcher ([0, B, ·] when there are none)."""
    hist = contract.history(out, cfg, B, n, m, dtype)
    if hist is None:
        return out.f.new_zeros(0, B, n), out.g.new_zeros(0, B, m)
    return hist


# ----------------------------------------------------------------------------- contract
def forward(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig) -> SolverOut:
    """Solve on a given cost C [B, n, m] (float32/float64) -> :class:`SolverOut`."""
    contract.check_cost_matrix(C)
    if C.dtype not in _COST_DTYPES:
        raise TypeError(f"C must be float32 or float64, got {C.dtype}")
    _check_device(C, a, b)
    B, n, m = C.shape
    contract.check_weights(a, b, B, n, m)
    if _kernels(n, m) == "streaming":
        return _streaming("forward", n, m)(C, a, b, cfg)  # type: ignore[operator]
    s0, s1 = _sched(cfg)
    outs = _res.launch_forward(
        C, None, None, a, b, "given", cfg.eps, cfg.rho, cfg.max_iter, cfg.tol, cfg.check_every,
        s0, s1, cfg.grad == "unrolled", _form(),
    )
    return contract.solver_out(*outs, cfg)


def backward(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
) -> torch.Tensor:
    """``∂(Σ gv·value + gl·value_linear)/∂C`` [B, n, m] for ``cfg.grad``."""
    B, n, m = C.shape
    if _kernels(n, m) == "streaming":
        return _streaming("backward", n, m)(  # type: ignore[operator]
            C, a, b, out, grad_value, grad_value_linear, cfg
        )
    acc = contract.compute_dtype(C.dtype)
    gv, gl = contract.grad_weights(grad_value, grad_value_linear, B, acc, C.device)
    hf, hg = _history(out, cfg, B, n, m, acc)
    s0, s1 = _sched(cfg)
    G, _, _ = _bwd.launch_backward(
        C, None, None, a, b, out.f, out.g, out.n_iters, hf, hg, gv, gl, "given", False,
        cfg.grad, cfg.eps, cfg.rho, cfg.max_iter, s0, s1, *cfg.cg_limits(n, m, C.dtype),
    )
    return G


def forward_sample(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: str,
    cfg: SolverConfig,
) -> SolverOut:
    """Solve with the cost fused from x [B, n, d], y [B, m, d] -> :class:`SolverOut`."""
    _check_sample(x, y, cost)
    _check_device(x, y, a, b)
    B, n, _ = x.shape
    m = y.shape[1]
    contract.check_weights(a, b, B, n, m)
    if _kernels(n, m) == "streaming":
        return _streaming("forward_sample", n, m)(x, y, a, b, cost, cfg)  # type: ignore[operator]
    s0, s1 = _sched(cfg)
    outs = _res.launch_forward(
        None, x, y, a, b, cost, cfg.eps, cfg.rho, cfg.max_iter, cfg.tol, cfg.check_every,
        s0, s1, cfg.grad == "unrolled", _form(),
    )
    return contract.solver_out(*outs, cfg)


def backward_sample(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cost: str,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
    need_dy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] or None)`` in the points' dtype."""
    _check_sample(x, y, cost)
    B, n, _ = x.shape
    m = y.shape[1]
    if _kernels(n, m) == "streaming":
        return _streaming("backward_sample", n, m)(  # type: ignore[operator]
            x, y, a, b, cost, out, grad_value, grad_value_linear, cfg, need_dy
        )
    acc = contract.compute_dtype(x.dtype)
    gv, gl = contract.grad_weights(grad_value, grad_value_linear, B, acc, a.device)
    hf, hg = _history(out, cfg, B, n, m, acc)
    s0, s1 = _sched(cfg)
    _, dx, dy = _bwd.launch_backward(
        None, x, y, a, b, out.f, out.g, out.n_iters, hf, hg, gv, gl, cost, bool(need_dy),
        cfg.grad, cfg.eps, cfg.rho, cfg.max_iter, s0, s1, *cfg.cg_limits(n, m, x.dtype),
    )
    return dx, (dy if need_dy else None)

