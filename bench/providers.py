"""Benchmark providers: one function per solver, one signature, one registry.

A provider computes, for a padded batch of problems, the per-problem OT loss::

    provider(x, y, x_mask, y_mask, *, eps, n_iter, cost) -> loss [B]

* ``x`` [B, n, d], ``y`` [B, m, d] point sets (any float dtype, any device);
* ``x_mask`` [B, n], ``y_mask`` [B, m] bool validity masks, or ``None`` (all valid);
* uniform weights over the valid points, cost ``cosine`` (``1 − x̂·ŷ``), ``sqeuclidean``
  (``‖x − y‖²``) or ``dot`` (``−x·y``) as in docs/design.md §2;
* exactly ``n_iter`` Sinkhorn iterations with ε = ``eps`` (no early stopping);
* the returned loss is differentiable w.r.t. ``x`` (and ``y``); for providers with
  ``objective="linear"`` it is ``<P, C>``, the OPTICAL loss; a problem with no valid point on a
  side has loss 0.

Providers are registered in :data:`PROVIDERS` with what they need; :meth:`Provider.available`
says whether one can run here (package installed, backend built, right device) and why not,
so benchmarks and tests can ``pytest.skip(reason)``. Adding a provider is one decorated
function::

    @register("name", description="...", requires=("some_module",), devices=("cuda",))
    def _name(x, y, x_mask, y_mask, *, eps, n_iter, cost):
        ...
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

COSTS = ("cosine", "sqeuclidean", "dot")


class ProviderFn(Protocol):
    """Signature every provider implements (see the module docstring)."""

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | None,
        y_mask: torch.Tensor | None,
        *,
        eps: float,
        n_iter: int,
        cost: str,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Provider:
    """A registered provider and what it needs to run.

    Attributes:
        name: registry key (test ids, tables).
        fn: the provider function.
        description: one line for tables and skip reasons.
        requires: modules that must be importable.
        devices: device types it runs on (``cpu``, ``cuda``).
        costs: costs it supports.
        objective: what it returns: ``linear`` (``<P, C>``) or ``entropic`` (``OT_ε``; peers
            that only expose their dual objective: compare timings, not values).
        check: extra availability test ``(device) -> (ok, reason)``, e.g. a backend built.
        forward_differs: ``False`` when the forward pass is identical to another provider's
            (a gradient-mode variant): benchmarks then time only forward+backward.
    """

    name: str
    fn: ProviderFn
    description: str
    requires: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")
    costs: tuple[str, ...] = COSTS
    objective: str = "linear"
    check: Callable[[torch.device], tuple[bool, str]] | None = None
    forward_differs: bool = True

    def available(
        self, device: str | torch.device = "cpu", cost: str | None = None
    ) -> tuple[bool, str]:
        """Whether this provider can run on ``device`` with ``cost``, and if not, why."""
        device = torch.device(device)
        if device.type not in self.devices:
            return False, f"{self.name}: runs on {'/'.join(self.devices)} only"
        if device.type == "cuda" and not torch.cuda.is_available():
            return False, f"{self.name}: no CUDA device"
        if cost is not None and cost not in self.costs:
            return False, f"{self.name}: cost {cost!r} not supported"
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return False, f"{self.name}: module {mod!r} not installed"
        if self.check is not None:
            ok, why = self.check(device)
            if not ok:
                return False, f"{self.name}: {why}"
        return True, ""

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | None = None,
        y_mask: torch.Tensor | None = None,
        *,
        eps: float,
        n_iter: int,
        cost: str = "cosine",
    ) -> torch.Tensor:
        """Run the provider: per-problem loss [B]."""
        return self.fn(x, y, x_mask, y_mask, eps=eps, n_iter=n_iter, cost=cost)


PROVIDERS: dict[str, Provider] = {}


class PeerError(RuntimeError):
    """A peer library failed on a case it supports (the bench skips that case, with why)."""


def register(
    name: str,
    *,
    description: str,
    requires: tuple[str, ...] = (),
    devices: tuple[str, ...] = ("cpu", "cuda"),
    costs: tuple[str, ...] = COSTS,
    objective: str = "linear",
    check: Callable[[torch.device], tuple[bool, str]] | None = None,
    forward_differs: bool = True,
) -> Callable[[ProviderFn], ProviderFn]:
    """Decorator adding a provider function to :data:`PROVIDERS` under ``name``."""
    if objective not in ("linear", "entropic"):
        raise ValueError(f"objective must be 'linear' or 'entropic', got {objective!r}")

    def deco(fn: ProviderFn) -> ProviderFn:
        if name in PROVIDERS:
            raise ValueError(f"provider {name!r} registered twice")
        PROVIDERS[name] = Provider(
            name, fn, description, requires, devices, costs, objective, check, forward_differs
        )
        return fn

    return deco


def get_provider(name: str) -> Provider:
    """The provider registered as ``name`` (``KeyError`` naming the known ones otherwise)."""
    try:
        return PROVIDERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None


def available_providers(device: str | torch.device = "cpu", cost: str | None = None) -> list[str]:
    """Names of the providers that can run here."""
    return [name for name, p in PROVIDERS.items() if p.available(device, cost)[0]]


# ----------------------------------------------------------------------------------------------
# helpers shared by the peer providers (independent of optical_kernels on purpose)
# ----------------------------------------------------------------------------------------------


def full_masks(
    x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor | None, y_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks [B, n], [B, m]; ``None`` means every position is valid."""
    xm = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if x_mask is None else x_mask
    ym = torch.ones(y.shape[:-1], dtype=torch.bool, device=y.device) if y_mask is None else y_mask
    return xm.to(device=x.device, dtype=torch.bool), ym.to(device=y.device, dtype=torch.bool)


def uniform_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform weights over the valid positions of each row of ``mask`` [B, n]; 0 elsewhere.

    A row without valid position gets all-zero weights.
    """
    w = mask.to(dtype)
    return w / w.sum(-1, keepdim=True).clamp_min(1)


def cost_matrix(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """Differentiable cost matrix [B, n, m] of docs/design.md §2, computed with plain torch ops.

    * ``cosine``: ``1 − x̂_i·ŷ_j`` with ``x̂ = x / max(‖x‖, 1e-8)``;
    * ``sqeuclidean``: ``‖x_i − y_j‖²`` (no ½), expanded after centring both sets on a common
      mean (fp32 cancellation) and clamped at 0;
    * ``dot``: ``−x_i·y_j``.
    """
    if cost == "cosine":
        xh = F.normalize(x, dim=-1, eps=1e-8)
        yh = F.normalize(y, dim=-1, eps=1e-8)
        return 1.0 - xh @ yh.transpose(-1, -2)
    if cost == "sqeuclidean":
        mu = torch.cat([x, y], dim=-2).mean(dim=-2, keepdim=True)
        xc, yc = x - mu, y - mu
        sq = (xc * xc).sum(-1)[..., :, None] + (yc * yc).sum(-1)[..., None, :]
        return (sq - 2.0 * xc @ yc.transpose(-1, -2)).clamp_min(0.0)
    if cost == "dot":
        return -(x @ y.transpose(-1, -2))
    raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")


# ----------------------------------------------------------------------------------------------
# ours: optical_kernels.sinkhorn_loss with a given backend
# ----------------------------------------------------------------------------------------------

# Extra keywords of sinkhorn_loss that force one Triton kernel family. The backend's switch is
# the environment variable OPTICAL_KERNELS_TRITON_KERNEL (backends/triton/launch.py),
# read at every forward and backward call, not a keyword: to time one family, run the plain
# `triton` provider under it, e.g. `OPTICAL_KERNELS_TRITON_KERNEL=streaming pytest bench/
# --bench-providers triton`. triton_resident / triton_streaming stay skipped until a keyword
# exists (a per-provider override would have to hold through the harness's backward call).
TRITON_KERNEL_KWARGS: dict[str, dict[str, object] | None] = {
    "resident": None,
    "streaming": None,
}


def _backend_check(backend: str) -> Callable[[torch.device], tuple[bool, str]]:
    """Availability from ``optical_kernels.backends()`` (``{name: {available, reason}}``)."""

    def check(device: torch.device) -> tuple[bool, str]:
        try:
            ok = importlib.import_module("optical_kernels")
            info = ok.backends()[backend]
        except Exception as e:
            return False, f"optical_kernels not usable ({type(e).__name__}: {e})"
        return bool(info["available"]), str(info.get("reason", ""))

    return check


def _ok_provider(backend: str, extra: Callable[[], dict[str, object] | None] | None = None):
    def fn(x, y, x_mask, y_mask, *, eps, n_iter, cost):
        import optical_kernels as ok

        kwargs = {} if extra is None else dict(extra() or {})
        return ok.sinkhorn_loss(
            x,
            y,
            x_mask=x_mask, y_mask=y_mask,
            cost=cost,
            eps=eps,
            max_iter=n_iter,
            tol=0.0,
            reduction="none",
            backend=backend,
            **kwargs,
        )

    return fn


def _triton_kernel_check(kind: str) -> Callable[[torch.device], tuple[bool, str]]:
    base = _backend_check("triton")

    def check(device: torch.device) -> tuple[bool, str]:
        if TRITON_KERNEL_KWARGS[kind] is None:
            return False, (
                f"no keyword forcing the {kind} kernel: run the `triton` provider under "
                f"OPTICAL_KERNELS_TRITON_KERNEL={kind} (bench/providers.py)"
            )
        return base(device)

    return check


register(
    "torch",
    description="ours, backend='torch' (pure-PyTorch reference, implicit gradient)",
    requires=("optical_kernels",),
    check=_backend_check("torch"),
)(_ok_provider("torch"))

register(
    "cpu",
    description="ours, backend='cpu' (fused C++ extension)",
    requires=("optical_kernels",),
    devices=("cpu",),
    check=_backend_check("cpu"),
)(_ok_provider("cpu"))



def _cpu_every_iter(x, y, x_mask, y_mask, *, eps, n_iter, cost):  # noqa: ANN001, ANN202
    from optical_kernels.backends import cpu

    saved, cpu.FIXED_POINT_EXIT = cpu.FIXED_POINT_EXIT, False
    try:
        return _ok_provider("cpu")(x, y, x_mask, y_mask, eps=eps, n_iter=n_iter, cost=cost)
    finally:
        cpu.FIXED_POINT_EXIT = saved


register(
    "cpu_every_iter",
    description="ours, backend='cpu' with the exact fixed-point exit off "
    "(backends.cpu.FIXED_POINT_EXIT = False): all n_iter iterations computed, same result",
    requires=("optical_kernels",),
    devices=("cpu",),
    check=_backend_check("cpu"),
)(_cpu_every_iter)

register(
    "triton",
    description="ours, backend='triton' (kernel family chosen by the backend)",
    requires=("optical_kernels", "triton"),
    devices=("cuda",),
    check=_backend_check("triton"),
)(_ok_provider("triton"))

register(
    "triton_resident",
    description="ours, backend='triton', resident (one program per problem) kernel forced",
    requires=("optical_kernels", "triton"),
    devices=("cuda",),
    check=_triton_kernel_check("resident"),
)(_ok_provider("triton", lambda: TRITON_KERNEL_KWARGS["resident"]))

register(
    "triton_streaming",
    description="ours, backend='triton', streaming (flash-style) kernel forced",
    requires=("optical_kernels", "triton"),
    devices=("cuda",),
    check=_triton_kernel_check("streaming"),
)(_ok_provider("triton", lambda: TRITON_KERNEL_KWARGS["streaming"]))

register(
    "cuda",
    description="ours, backend='cuda' (CUDA C++ extension)",
    requires=("optical_kernels",),
    devices=("cuda",),
    check=_backend_check("cuda"),
)(_ok_provider("cuda"))


# ----------------------------------------------------------------------------------------------
# POT 0.9.7
# ----------------------------------------------------------------------------------------------


def _pot_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
    grad: str,
) -> torch.Tensor:
    """``ot.batch.solve_batch(method="log_sinkhorn", reg_type="kl")`` on the torch backend.

    POT's batched log-domain Sinkhorn runs ``u ← log a − LSE_j(−C/ε + v)``,
    ``v ← log b − LSE_i(−C/ε + u)`` from ``u = v = 0``: with ``u = log a + f/ε`` and
    ``v = log b + g/ε`` this is the map of docs/design.md §2 (same plan after every
    iteration). It has no masks: padded entries get weight 0 and a cost ``max C + 200 ε`` so
    that they carry no mass even in the first half-step (where ``v = 0``, not ``log 0``).
    ``tol = 0`` never stops early (POT tests ``err < tol``). Returns ``value_linear = <P, C>``.
    """
    import ot

    xm, ym = full_masks(x, y, x_mask, y_mask)
    C = cost_matrix(x, y, cost)
    dtype = C.dtype
    a = uniform_weights(xm, dtype)
    b = uniform_weights(ym, dtype)
    empty = ~(xm.any(-1) & ym.any(-1))
    if x_mask is not None or y_mask is not None:
        valid = xm[:, :, None] & ym[:, None, :]
        pad = C.detach().amax() + 200.0 * eps
        C = torch.where(valid, C, pad)
    if bool(empty.any()):  # solve a dummy uniform problem there, report 0
        a = torch.where(empty[:, None], torch.full_like(a, 1.0 / a.shape[-1]), a)
        b = torch.where(empty[:, None], torch.full_like(b, 1.0 / b.shape[-1]), b)
    res = ot.batch.solve_batch(
        C,
        reg=eps,
        a=a,
        b=b,
        max_iter=n_iter,
        tol=0.0,
        method="log_sinkhorn",
        reg_type="kl",
        grad=grad,
    )
    return torch.where(empty, torch.zeros_like(res.value_linear), res.value_linear)


@register(
    "pot_batch",
    description="POT ot.batch.solve_batch log_sinkhorn, torch backend, grad='autodiff'",
    requires=("ot",),
)
def pot_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """POT's batched solver; gradient by autodiff through the iterations (exact for the
    iterations run, docs/design.md §3 ``unrolled``): POT documents ``grad='envelope'`` as giving
    gradients of ``value`` only, not of ``value_linear``."""
    return _pot_batch(x, y, x_mask, y_mask, eps=eps, n_iter=n_iter, cost=cost, grad="autodiff")


@register(
    "pot_batch_envelope",
    description="POT ot.batch.solve_batch log_sinkhorn, grad='envelope' (POT default; "
    "dL/dC = P, approximate for <P,C>)",
    requires=("ot",),
    forward_differs=False,
)
def pot_batch_envelope(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """POT's batched solver with its default, cheaper envelope gradient (``∂L/∂C = P``)."""
    return _pot_batch(x, y, x_mask, y_mask, eps=eps, n_iter=n_iter, cost=cost, grad="envelope")


@register(
    "pot_loop",
    description="POT ot.sinkhorn2(method='sinkhorn_log') per problem, torch tensors, autodiff",
    requires=("ot",),
)
def pot_loop(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """A Python loop over the problems calling ``ot.sinkhorn2(a, b, M, eps,
    method="sinkhorn_log", numItermax=n_iter, stopThr=0)`` on the valid points (how most code
    bases call POT). POT uses the entropy convention; with uniform weights it has the same plan
    as the KL convention. ``sinkhorn2`` returns ``<P, M>``; gradients by autodiff through the
    iterations."""
    import ot

    xm, ym = full_masks(x, y, x_mask, y_mask)
    out = []
    for k in range(x.shape[0]):
        xk = x[k] if x_mask is None else x[k][xm[k]]
        yk = y[k] if y_mask is None else y[k][ym[k]]
        if xk.shape[0] == 0 or yk.shape[0] == 0:
            out.append(x.new_zeros(()))
            continue
        M = cost_matrix(xk[None], yk[None], cost)[0]
        a = torch.full((xk.shape[0],), 1.0 / xk.shape[0], dtype=M.dtype, device=M.device)
        b = torch.full((yk.shape[0],), 1.0 / yk.shape[0], dtype=M.dtype, device=M.device)
        out.append(
            ot.sinkhorn2(a, b, M, eps, method="sinkhorn_log", numItermax=n_iter, stopThr=0.0)
        )
    return torch.stack(out)


@register(
    "gemm_floor",
    description="the unavoidable cost GEMMs alone (docs/design.md §7): forward C = x·yᵀ, "
    "backward G·y; not a solver (its 'loss' is a fixed linear function of C)",
)
def gemm_floor(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """``Σ_ij C_ij / (n m)`` with ``C = x yᵀ`` [B, n, m]: one batched GEMM forward and one
    (``∂L/∂x = G y``) backward, the floor that any solver of these problems pays."""
    C = torch.bmm(x, y.transpose(1, 2))
    return C.mean((1, 2))


# ----------------------------------------------------------------------------------------------
# GPU peers (docs/design.md §7): entropic objective only, compare timings not values
# ----------------------------------------------------------------------------------------------


def _as_half_sqeuclidean(x: torch.Tensor, y: torch.Tensor, cost: str):
    """Map the points so that ``½‖x' − y'‖²`` is our cost (GeomLoss / FlashSinkhorn p=2 cost).

    cosine: ``x' = x̂`` (``½‖x̂ − ŷ‖² = 1 − x̂·ŷ``); sqeuclidean: ``x' = √2 x``.
    """
    if cost == "cosine":
        return F.normalize(x, dim=-1, eps=1e-8), F.normalize(y, dim=-1, eps=1e-8)
    if cost == "sqeuclidean":
        return math.sqrt(2.0) * x, math.sqrt(2.0) * y
    raise ValueError(f"cost {cost!r} cannot be written as a half squared distance")


def _diameter(xp: torch.Tensor, yp: torch.Tensor, cost: str) -> float:
    if cost == "cosine":
        return 2.0
    pts = torch.cat([xp.detach().reshape(-1, xp.shape[-1]), yp.detach().reshape(-1, yp.shape[-1])])
    return float((pts.amax(0) - pts.amin(0)).norm()) + 1e-6


def geomloss_scaling(diameter: float, blur: float, n_iter: int, p: int = 2) -> float:
    """GeomLoss ``scaling`` giving an ε-annealing schedule of ``n_iter`` steps.

    GeomLoss anneals ε from ``diameter^p`` to ``blur^p``; its schedule has
    ``2 + ceil(log(diameter/blur) / −log(scaling))`` entries, one Sinkhorn step each.
    """
    import numpy as np

    steps = max(n_iter - 2, 1)
    s = math.exp(-math.log(diameter / blur) / steps)
    # nudge so that len(arange(...)) == steps exactly despite rounding
    for _ in range(8):
        cnt = len(np.arange(p * math.log(diameter), p * math.log(blur), p * math.log(s)))
        if cnt == steps:
            break
        s = s ** (cnt / steps) if cnt else s
    return min(max(s, 1e-3), 0.9999)


@register(
    "geomloss",
    description="GeomLoss SamplesLoss('sinkhorn', tensorized, debias=False), ε-annealing "
    "schedule of ~n_iter steps; returns OT_ε",
    requires=("geomloss",),
    costs=("cosine", "sqeuclidean"),
    objective="entropic",
)
def geomloss_provider(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """GeomLoss's tensorized batched solver. It anneals ε (no fixed-ε iteration count): the
    schedule is chosen to have ``n_iter`` steps ending at ε. Its cost is ``½‖x − y‖²``, so the
    points are mapped (:func:`_as_half_sqeuclidean`) to give exactly our cost."""
    from geomloss import SamplesLoss

    xm, ym = full_masks(x, y, x_mask, y_mask)
    xp, yp = _as_half_sqeuclidean(x, y, cost)
    a = uniform_weights(xm, xp.dtype)
    b = uniform_weights(ym, yp.dtype)
    diameter = _diameter(xp, yp, cost)
    blur = math.sqrt(eps)
    loss = SamplesLoss(
        "sinkhorn",
        p=2,
        blur=blur,
        diameter=diameter,
        scaling=geomloss_scaling(diameter, blur, n_iter),
        debias=False,
        backend="tensorized",
    )
    return loss(a, xp, b, yp)


@register(
    "flash_sinkhorn",
    description="FlashSinkhorn SamplesLoss (fixed ε, n_iter iterations, debias=False), loop "
    "over problems; returns OT_ε",
    requires=("flash_sinkhorn",),
    devices=("cuda",),
    costs=("cosine", "sqeuclidean"),
    objective="entropic",
)
def flash_sinkhorn_provider(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """FlashSinkhorn 0.4.1, one call per problem on the valid points, fixed ε
    (``use_epsilon_scaling=False``), ``n_iters=n_iter``, no early stop, ``half_cost=True`` so
    that its cost is ``½‖x' − y'‖²`` = ours after :func:`_as_half_sqeuclidean`."""
    from flash_sinkhorn import SamplesLoss

    xm, ym = full_masks(x, y, x_mask, y_mask)
    xp, yp = _as_half_sqeuclidean(x, y, cost)
    loss = SamplesLoss(
        "sinkhorn",
        p=2,
        blur=math.sqrt(eps),
        eps=eps,
        n_iters=n_iter,
        use_epsilon_scaling=False,
        half_cost=True,
        debias=False,
    )
    out = []
    for k in range(x.shape[0]):
        xk = xp[k] if x_mask is None else xp[k][xm[k]]
        yk = yp[k] if y_mask is None else yp[k][ym[k]]
        if xk.shape[0] == 0 or yk.shape[0] == 0:
            out.append(x.new_zeros(()))
            continue
        out.append(loss(xk, yk).reshape(()))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# OTT-JAX 0.6 on the CPU (optional `ott` extra): jit + vmap, implicit differentiation
# ----------------------------------------------------------------------------------------------

_OTT_FNS: dict[tuple, tuple[Callable, Callable]] = {}


def _ott_functions(eps: float, n_iter: int, cost: str) -> tuple[Callable, Callable]:
    """Jitted ``(loss(x, y, a, b) -> [B], loss_and_grad(x, y, a, b) -> ([B], dx))`` for OTT.

    One problem is ``ott.solvers.linear.sinkhorn.Sinkhorn`` (log domain, exactly ``n_iter``
    iterations: ``min_iterations = max_iterations = n_iter``, default implicit
    differentiation) on a ``PointCloud`` with OTT's own ``Cosine`` (``1 − x̂·ŷ``) or
    ``SqEuclidean`` (``‖x − y‖²``) cost; the loss is ``out.primal_cost`` = ``<P, C>``, its
    gradient OTT's implicit differentiation (lineax NormalCG, ``ridge_kernel=1``: the balanced
    system's null direction removed, as our ``implicit`` mode does; ``rtol = atol = 1e-3``).
    ``jax.vmap`` batches the problems, ``jax.jit`` compiles once per (shape, ε, n_iter, cost).
    Problems are independent, so the gradient of the summed loss is every problem's own.
    """
    key = (eps, n_iter, cost)
    if key in _OTT_FNS:
        return _OTT_FNS[key]
    import jax
    from ott.geometry import costs, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import implicit_differentiation, sinkhorn

    cost_fn = costs.Cosine() if cost == "cosine" else costs.SqEuclidean()
    # The balanced implicit system is singular along (1, −1): OTT's own remedy is its
    # `ridge_kernel` term. lineax's default tolerance (1e-6) is below what its NormalCG reaches
    # in float32 on ~10% of the S1 problems (it then raises "non-finite output"), 1e-4 still
    # fails on some runs; 1e-3 gives the same gradients as 1e-4 (S1: within 0.2% of ours,
    # d = 384 and 768). With XLA_FLAGS=--xla_cpu_max_isa=AVX2, S1 d=384 still fails
    # (reproducibly, also with ridge_identity or symmetric=True): reported as PeerError.
    implicit = implicit_differentiation.ImplicitDiff(
        solver_kwargs={"ridge_kernel": 1.0, "rtol": 1e-3, "atol": 1e-3}
    )
    solver = sinkhorn.Sinkhorn(
        min_iterations=n_iter, max_iterations=n_iter, threshold=0.0, implicit_diff=implicit
    )

    def one(x, y, a, b):  # noqa: ANN001, ANN202
        geom = pointcloud.PointCloud(x, y, cost_fn=cost_fn, epsilon=eps)
        return solver(linear_problem.LinearProblem(geom, a, b)).primal_cost

    batched = jax.vmap(one)

    def summed(x, y, a, b):  # noqa: ANN001, ANN202
        v = batched(x, y, a, b)
        return v.sum(), v

    fns = (jax.jit(batched), jax.jit(jax.value_and_grad(summed, has_aux=True)))
    _OTT_FNS[key] = fns
    return fns


class _OttLoss(torch.autograd.Function):
    """Torch ↔ JAX bridge: the forward runs OTT (with its gradient when x needs one), the
    backward scales the stored per-problem gradients by the incoming ``∂L/∂loss_k``."""

    @staticmethod
    def forward(ctx, x, y, a, b, eps, n_iter, cost):  # noqa: ANN001, ANN205
        import jax.numpy as jnp
        import numpy as np

        loss_fn, grad_fn = _ott_functions(eps, n_iter, cost)
        args = [jnp.asarray(t.detach().cpu().numpy()) for t in (x, y, a, b)]
        if ctx.needs_input_grad[0]:
            try:
                (_, v), dx = grad_fn(*args)
            except Exception as exc:  # jax.errors.JaxRuntimeError from lineax's checks
                raise PeerError(
                    "OTT-JAX's implicit differentiation failed: lineax returned non-finite "
                    f"output for this batch ({type(exc).__name__})"
                ) from exc
            ctx.save_for_backward(torch.from_numpy(np.array(dx)).to(x.device))
        else:
            v = loss_fn(*args)
        return torch.from_numpy(np.array(v)).to(x.device)

    @staticmethod
    def backward(ctx, gl):  # noqa: ANN001, ANN205
        (dx,) = ctx.saved_tensors
        return dx * gl.to(dx.dtype)[:, None, None], None, None, None, None, None, None


def _ott_check(device: torch.device) -> tuple[bool, str]:
    del device
    if importlib.util.find_spec("jax") is None:
        return False, "module 'jax' not installed (pip install 'optical-kernels[ott]')"
    return True, ""


@register(
    "ott_jax",
    description="OTT-JAX Sinkhorn (CPU, jit + vmap, implicit differentiation, fixed n_iter "
    "iterations); returns <P, C>",
    requires=("ott",),
    devices=("cpu",),
    costs=("cosine", "sqeuclidean"),
    check=_ott_check,
)
def ott_jax(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None,
    y_mask: torch.Tensor | None,
    *,
    eps: float,
    n_iter: int,
    cost: str,
) -> torch.Tensor:
    """OTT-JAX on the same problems: uniform weights over the valid points (0 on padding, which
    OTT's log-domain updates ignore), float32, JAX on the CPU (``JAX_PLATFORMS=cpu``)."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    xm, ym = full_masks(x, y, x_mask, y_mask)
    a = uniform_weights(xm, torch.float32)
    b = uniform_weights(ym, torch.float32)
    empty = ~(xm.any(-1) & ym.any(-1))
    if bool(empty.any()):  # a dummy uniform problem there, reported as 0
        a = torch.where(empty[:, None], torch.full_like(a, 1.0 / a.shape[-1]), a)
        b = torch.where(empty[:, None], torch.full_like(b, 1.0 / b.shape[-1]), b)
    # padded points: OTT's own padding value (ones), so that their zero norm never reaches
    # the cosine's ‖x‖ (its gradient at 0 is NaN); they carry no weight
    xp = torch.where(xm[..., None], x.float(), 1.0)
    yp = torch.where(ym[..., None], y.float(), 1.0)
    loss = _OttLoss.apply(xp, yp, a, b, float(eps), int(n_iter), cost)
    return torch.where(empty, torch.zeros_like(loss), loss).to(x.dtype)
