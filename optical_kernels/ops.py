"""``torch.library`` custom ops and autograd wiring shared by every backend.

Two solver ops, each with a fake (meta) implementation so ``torch.compile`` traces through them,

* ``optical_kernels::sinkhorn`` — solve on a given cost ``C`` [B, n, m]; differentiable in C.
* ``optical_kernels::sinkhorn_sample`` — solve with the cost fused from points x [B, n, d],
  y [B, m, d] (backends that provide ``forward_sample``); differentiable in x and y.

and, for a dense backend that computes the cost matrix itself
(:class:`~optical_kernels.backends.contract.PointCostBackend`, the ``cpu`` one):

* ``optical_kernels::point_cost`` — ``C`` [B, n, m] from points (cosine, dot) by that backend;
  differentiable in x and y (see :func:`point_cost`).

The solver ops return ``(f, g, value, value_linear, n_iters, err, hist_f, hist_g)``;
``hist_*`` are [max_iter, B, ·] for ``grad="unrolled"`` and [0, B, ·] otherwise. The backend
is passed by name and looked up in :mod:`optical_kernels.backends`; a route
``"primary>fallback"`` is resolved here, on the concrete sizes the op runs with
(:func:`optical_kernels.backends.route`), so the traced graph does not depend on n and m. A
fallback without fused-cost entry points runs the sample op on the cost materialised inside
the op (:func:`_sample_impl`).

The backward ops have an autograd formula that raises: double backward (differentiating a
gradient taken with ``create_graph=True``) is not supported.
"""

from types import ModuleType

import torch
from torch import Tensor

from . import backends
from .backends import contract
from .config import SolverConfig, SolverOut
from .costs import cost_matrix, cost_vjp

_Outs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def config_from_args(
    eps: float,
    rho: float | None,
    max_iter: int,
    tol: float,
    check_every: int,
    sched_start: float | None,
    sched_factor: float | None,
    grad: str,
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> SolverConfig:
    """The :class:`SolverConfig` behind the scalar arguments of a custom op (inverse of
    :func:`config_args`)."""
    schedule = None if sched_start is None else (float(sched_start), float(sched_factor or 0.5))
    return SolverConfig(eps, rho, max_iter, tol, check_every, schedule, grad, cg_max_iter, cg_tol)


def config_args(cfg: SolverConfig) -> tuple:
    """Flatten a :class:`SolverConfig` into the scalar arguments of the custom ops."""
    start, factor = cfg.eps_schedule if cfg.eps_schedule is not None else (None, None)
    return (cfg.eps, cfg.rho, cfg.max_iter, cfg.tol, cfg.check_every, start, factor, cfg.grad)


def op_args(cfg: SolverConfig) -> tuple:
    """:func:`config_args` and the user's CG options (``None``: default), the trailing scalar
    arguments of the ops of this module (resolved by the backend's ``cfg.cg_limits``)."""
    return (*config_args(cfg), cfg.cg_max_iter, cfg.cg_tol)


def _pack(out: SolverOut, cfg: SolverConfig, B: int, n: int, m: int, like: Tensor) -> _Outs:
    T = cfg.max_iter if cfg.grad == "unrolled" else 0
    if out.history is None or T == 0:
        hf, hg = like.new_zeros(T, B, n), like.new_zeros(T, B, m)
    else:
        hf, hg = out.history
        if hf.shape[0] < T:  # pad: entries past n_iters are never read
            pad = T - hf.shape[0]
            hf = torch.cat([hf, hf[-1:].expand(pad, B, n)])
            hg = torch.cat([hg, hg[-1:].expand(pad, B, m)])
        hf, hg = hf.contiguous(), hg.contiguous()
    return (
        out.f.contiguous(),
        out.g.contiguous(),
        out.value.contiguous(),
        out.value_linear.contiguous(),
        out.n_iters.to(torch.int32).contiguous(),
        out.err.contiguous(),
        hf,
        hg,
    )


def _unpack(f, g, value, value_linear, n_iters, err, hf, hg) -> SolverOut:  # noqa: ANN001
    history = (hf, hg) if hf.shape[0] > 0 else None
    return SolverOut(f, g, value, value_linear, n_iters, err, history)


def fake_outputs(B: int, n: int, m: int, like: Tensor, cfg_grad: str, max_iter: int) -> _Outs:
    """Meta outputs of a forward op (shared by every backend's ``register_fake``)."""
    T = max_iter if cfg_grad == "unrolled" else 0
    return (
        like.new_empty(B, n),
        like.new_empty(B, m),
        like.new_empty(B),
        like.new_empty(B),
        like.new_empty(B, dtype=torch.int32),
        like.new_empty(B),
        like.new_empty(T, B, n),
        like.new_empty(T, B, m),
    )


def _module(backend: str, n: int, m: int) -> ModuleType:
    """The backend module that runs a problem of padded sizes n, m (concrete here)."""
    return backends.load(backends.route(backend, n, m))  # type: ignore[return-value]


def _sample_impl(backend: str, n: int, m: int):  # noqa: ANN202
    """``(forward_sample, backward_sample)`` of the routed backend; for a backend without
    them (a size fallback to ``torch``), the same contract on the cost materialised here."""
    mod = _module(backend, n, m)
    if hasattr(mod, "forward_sample"):
        return mod.forward_sample, mod.backward_sample

    def forward_sample(x, y, a, b, cost, cfg):  # noqa: ANN001, ANN202
        return mod.forward(_dense_cost(x, y, a, b, cost), a, b, cfg)

    def backward_sample(x, y, a, b, cost, out, gv, gvl, cfg, need_dy):  # noqa: ANN001, ANN202
        xw, yw = x.to(a.dtype), y.to(a.dtype)
        G = mod.backward(_dense_cost(xw, yw, a, b, cost), a, b, out, gv, gvl, cfg)
        dx, dy = cost_vjp(G, xw, yw, cost, need_dy)
        return dx.to(x.dtype), (None if dy is None else dy.to(y.dtype))

    return forward_sample, backward_sample


def _dense_cost(x: Tensor, y: Tensor, a: Tensor, b: Tensor, cost: str) -> Tensor:
    """C [B, n, m] in the weights' dtype, 0 at padded entries (the dense-backend contract)."""
    va, vb = a > 0, b > 0
    C = cost_matrix(x.to(a.dtype), y.to(a.dtype), cost, va, vb)
    return torch.where(va[:, :, None] & vb[:, None, :], C, 0.0).contiguous()


def _no_double_backward(ctx, *grads):  # noqa: ANN001, ANN002, ANN202
    raise RuntimeError(
        "optical_kernels: double backward is not supported: the gradient of a Sinkhorn loss "
        "(taken with create_graph=True, e.g. for a gradient penalty or a Hessian-vector "
        "product) cannot be differentiated again. Take the OT gradient without "
        "create_graph, or detach it before using it in a second backward pass."
    )


def _setup_nothing(ctx, inputs, output) -> None:  # noqa: ANN001
    return None


# ----------------------------------------------------------------- dense (given C)
@torch.library.custom_op("optical_kernels::sinkhorn", mutates_args=())
def sinkhorn_op(
    C: Tensor,
    a: Tensor,
    b: Tensor,
    backend: str,
    eps: float,
    rho: float | None,
    max_iter: int,
    tol: float,
    check_every: int,
    sched_start: float | None,
    sched_factor: float | None,
    grad: str,
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> _Outs:
    """Solve a padded batch on cost C [B, n, m] with the named backend."""
    return _dense_forward(C, a, b, backend, eps, rho, max_iter, tol, check_every, sched_start,
                          sched_factor, grad, cg_max_iter, cg_tol)  # fmt: skip


def _dense_forward(C: Tensor, a: Tensor, b: Tensor, backend: str, *scalars: object) -> _Outs:
    cfg = config_from_args(*scalars)  # type: ignore[arg-type]
    out = _module(backend, C.shape[1], C.shape[2]).forward(C, a, b, cfg)
    return _pack(out, cfg, *C.shape, like=C)


@sinkhorn_op.register_fake
def _(C, a, b, backend, eps, rho, max_iter, tol, check_every, sched_start, sched_factor, grad,  # noqa: ANN001, ANN202
      cg_max_iter=None, cg_tol=None):
    return fake_outputs(*C.shape, like=C, cfg_grad=grad, max_iter=max_iter)


@torch.library.custom_op("optical_kernels::sinkhorn_backward", mutates_args=())
def sinkhorn_backward_op(
    C: Tensor,
    a: Tensor,
    b: Tensor,
    f: Tensor,
    g: Tensor,
    value: Tensor,
    value_linear: Tensor,
    n_iters: Tensor,
    err: Tensor,
    hist_f: Tensor,
    hist_g: Tensor,
    grad_value: Tensor,
    grad_value_linear: Tensor,
    backend: str,
    eps: float,
    rho: float | None,
    max_iter: int,
    tol: float,
    check_every: int,
    sched_start: float | None,
    sched_factor: float | None,
    grad: str,
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> Tensor:
    """∂L/∂C [B, n, m] for the named backend and gradient mode."""
    outs = (f, g, value, value_linear, n_iters, err, hist_f, hist_g)
    scalars = (eps, rho, max_iter, tol, check_every, sched_start, sched_factor, grad, cg_max_iter,
               cg_tol)  # fmt: skip
    return _dense_backward(C, a, b, *outs, grad_value, grad_value_linear, backend, *scalars)


def _dense_backward(C: Tensor, a: Tensor, b: Tensor, *rest: object) -> Tensor:
    outs, (gv, gvl, backend), scalars = rest[:8], rest[8:11], rest[11:]
    cfg = config_from_args(*scalars)  # type: ignore[arg-type]
    out = _unpack(*outs)
    mod = _module(backend, C.shape[1], C.shape[2])  # type: ignore[arg-type]
    return mod.backward(C, a, b, out, gv, gvl, cfg).contiguous()


@sinkhorn_backward_op.register_fake
def _(C, *args):  # noqa: ANN001, ANN002, ANN202
    return torch.empty_like(C)


def _setup_dense(ctx, inputs, output) -> None:  # noqa: ANN001
    C, a, b = inputs[:3]
    ctx.scalars = inputs[3:]
    ctx.save_for_backward(C, a, b, *output)
    ctx.mark_non_differentiable(*(output[i] for i in (0, 1, 4, 5, 6, 7)))


def _grads(ctx, gv: Tensor | None, gvl: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    return contract.grad_weights(gv, gvl, like.shape[0], like.dtype, like.device)


def _dense_vjp(ctx, gv, gvl, backward_fn) -> tuple:  # noqa: ANN001
    """The dense op's autograd formula; ``backward_fn``: the backward op or its eager twin."""
    C, a, b, *outs = ctx.saved_tensors
    gv, gvl = _grads(ctx, gv, gvl, C)
    dC = backward_fn(C, a, b, *outs, gv, gvl, *ctx.scalars)
    return (dC,) + (None,) * (2 + len(ctx.scalars))


def _backward_dense(ctx, df, dg, gv, gvl, *_):  # noqa: ANN001, ANN002, ANN202
    return _dense_vjp(ctx, gv, gvl, sinkhorn_backward_op)


sinkhorn_op.register_autograd(_backward_dense, setup_context=_setup_dense)
sinkhorn_backward_op.register_autograd(_no_double_backward, setup_context=_setup_nothing)


# ----------------------------------------------------------------- sample (fused cost)
@torch.library.custom_op("optical_kernels::sinkhorn_sample", mutates_args=())
def sinkhorn_sample_op(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    cost: str,
    backend: str,
    eps: float,
    rho: float | None,
    max_iter: int,
    tol: float,
    check_every: int,
    sched_start: float | None,
    sched_factor: float | None,
    grad: str,
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> _Outs:
    """Solve with the cost fused from points x [B, n, d], y [B, m, d]."""
    return _sample_forward(x, y, a, b, cost, backend, eps, rho, max_iter, tol, check_every,
                           sched_start, sched_factor, grad, cg_max_iter, cg_tol)  # fmt: skip


def _sample_forward(x: Tensor, y: Tensor, a: Tensor, b: Tensor, cost: str, backend: str,
                    *scalars: object) -> _Outs:  # fmt: skip
    cfg = config_from_args(*scalars)  # type: ignore[arg-type]
    out = _sample_impl(backend, x.shape[1], y.shape[1])[0](x, y, a, b, cost, cfg)
    return _pack(out, cfg, x.shape[0], x.shape[1], y.shape[1], like=a)


@sinkhorn_sample_op.register_fake
def _(
    x, y, a, b, cost, backend, eps, rho, max_iter, tol, check_every, sched_start, sched_factor,
    grad, cg_max_iter=None, cg_tol=None,
):  # noqa: ANN001, ANN202
    return fake_outputs(x.shape[0], x.shape[1], y.shape[1], a, grad, max_iter)


@torch.library.custom_op("optical_kernels::sinkhorn_sample_backward", mutates_args=())
def sinkhorn_sample_backward_op(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    f: Tensor,
    g: Tensor,
    value: Tensor,
    value_linear: Tensor,
    n_iters: Tensor,
    err: Tensor,
    hist_f: Tensor,
    hist_g: Tensor,
    grad_value: Tensor,
    grad_value_linear: Tensor,
    need_dy: bool,
    cost: str,
    backend: str,
    eps: float,
    rho: float | None,
    max_iter: int,
    tol: float,
    check_every: int,
    sched_start: float | None,
    sched_factor: float | None,
    grad: str,
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] or an empty tensor when ``need_dy`` is False)."""
    return _sample_backward(x, y, a, b, f, g, value, value_linear, n_iters, err, hist_f, hist_g,
                            grad_value, grad_value_linear, need_dy, cost, backend, eps, rho,
                            max_iter, tol, check_every, sched_start, sched_factor, grad,
                            cg_max_iter, cg_tol)  # fmt: skip


def _sample_backward(x: Tensor, y: Tensor, a: Tensor, b: Tensor,
                     *rest: object) -> tuple[Tensor, Tensor]:  # fmt: skip
    outs, (gv, gvl, need_dy, cost, backend), scalars = rest[:8], rest[8:13], rest[13:]
    cfg = config_from_args(*scalars)  # type: ignore[arg-type]
    out = _unpack(*outs)
    dx, dy = _sample_impl(backend, x.shape[1], y.shape[1])[1](  # type: ignore[arg-type]
        x, y, a, b, cost, out, gv, gvl, cfg, need_dy
    )
    return dx.contiguous(), (dy.contiguous() if dy is not None else x.new_zeros(0))


@sinkhorn_sample_backward_op.register_fake
def _(x, y, *args):  # noqa: ANN001, ANN002, ANN202
    need_dy = args[12]
    return torch.empty_like(x), (torch.empty_like(y) if need_dy else x.new_empty(0))


def _setup_sample(ctx, inputs, output) -> None:  # noqa: ANN001
    x, y, a, b, cost = inputs[:5]
    ctx.cost = cost
    ctx.scalars = inputs[5:]
    ctx.save_for_backward(x, y, a, b, *output)
    ctx.mark_non_differentiable(*(output[i] for i in (0, 1, 4, 5, 6, 7)))


def _sample_vjp(ctx, gv, gvl, backward_fn) -> tuple:  # noqa: ANN001
    """The sample op's autograd formula; ``backward_fn``: the backward op or its eager twin."""
    x, y, a, b, *outs = ctx.saved_tensors
    gv, gvl = _grads(ctx, gv, gvl, a)
    need_dy = bool(ctx.needs_input_grad[1])
    dx, dy = backward_fn(x, y, a, b, *outs, gv, gvl, need_dy, ctx.cost, *ctx.scalars)
    return (dx, dy if need_dy else None) + (None,) * (3 + len(ctx.scalars))


def _backward_sample(ctx, df, dg, gv, gvl, *_):  # noqa: ANN001, ANN002, ANN202
    return _sample_vjp(ctx, gv, gvl, sinkhorn_sample_backward_op)


sinkhorn_sample_op.register_autograd(_backward_sample, setup_context=_setup_sample)
sinkhorn_sample_backward_op.register_autograd(_no_double_backward, setup_context=_setup_nothing)


# ----------------------------------------------------------------- eager path
# The custom ops above are what torch.compile, torch.export and fake-tensor tracing see. An
# eager call on plain tensors goes through the autograd Functions below instead: the same
# implementations (_dense_forward, ...), the same saved tensors and non-differentiable outputs,
# the same refusal of double backward, without the custom op's Python dispatch and autograd
# wrapper (schema binding, default filling, redispatch). That wrapper cost ~0.3 ms per
# forward + backward on a 2-core CPU: a third of the time of a small problem's whole call.


def _eager(*tensors: Tensor) -> bool:
    """Whether a call may take the eager path: not tracing (Dynamo, or a functorch transform)
    and only plain tensors (no FakeTensor, FunctionalTensor or other subclass)."""
    if contract.tracing():
        return False
    return all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors)


class _EagerDenseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, a, b, *rest):  # noqa: ANN001, ANN002, ANN205
        return _dense_backward(C, a, b, *rest)

    backward = staticmethod(_no_double_backward)


class _EagerDense(torch.autograd.Function):
    """``optical_kernels::sinkhorn`` with its autograd formula, eager plain-tensor calls."""

    @staticmethod
    def forward(ctx, C, a, b, *scalars):  # noqa: ANN001, ANN002, ANN205
        outs = _dense_forward(C, a, b, *scalars)
        _setup_dense(ctx, (C, a, b, *scalars), outs)
        return outs

    @staticmethod
    def backward(ctx, df, dg, gv, gvl, *_):  # noqa: ANN001, ANN002, ANN205
        return _dense_vjp(ctx, gv, gvl, _EagerDenseBackward.apply)


class _EagerSampleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, a, b, *rest):  # noqa: ANN001, ANN002, ANN205
        return _sample_backward(x, y, a, b, *rest)

    backward = staticmethod(_no_double_backward)


class _EagerSample(torch.autograd.Function):
    """``optical_kernels::sinkhorn_sample`` with its autograd formula, eager plain-tensor calls."""

    @staticmethod
    def forward(ctx, x, y, a, b, cost, *scalars):  # noqa: ANN001, ANN002, ANN205
        outs = _sample_forward(x, y, a, b, cost, *scalars)
        _setup_sample(ctx, (x, y, a, b, cost, *scalars), outs)
        return outs

    @staticmethod
    def backward(ctx, df, dg, gv, gvl, *_):  # noqa: ANN001, ANN002, ANN205
        return _sample_vjp(ctx, gv, gvl, _EagerSampleBackward.apply)


def run(
    backend: str,
    cfg: SolverConfig,
    C: Tensor | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    cost: str | None = None,
    *,
    a: Tensor,
    b: Tensor,
) -> SolverOut:
    """Dispatch to the dense op (``C`` given) or the fused sample op (``x``, ``y``, ``cost``)."""
    if C is not None:
        if _eager(C, a, b):
            outs = _EagerDense.apply(C, a, b, backend, *op_args(cfg))
        else:
            outs = sinkhorn_op(C, a, b, backend, *op_args(cfg))
    elif _eager(x, y, a, b):
        outs = _EagerSample.apply(x, y, a, b, cost, backend, *op_args(cfg))
    else:
        outs = sinkhorn_sample_op(x, y, a, b, cost, backend, *op_args(cfg))
    return _unpack(*outs)


# ----------------------------------------------------------------- point cost (backend's own C)
# A dense backend that computes the cost matrix itself (contract.PointCostBackend: the cpu
# backend's fused cosine / dot cost) is wrapped here like the solver: a custom op with its fake
# and autograd formula for traced calls, autograd Functions over the same implementation for
# eager calls on plain tensors (the same bits; tests/test_cpu_cost.py).


@torch.library.custom_op("optical_kernels::point_cost", mutates_args=())
def point_cost_op(
    x: Tensor, y: Tensor, x_valid: Tensor, y_valid: Tensor, cost: str, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(C [B, n, m], saved [B, n], saved [B, m], finite [] bool)`` by backend ``backend``."""
    C, (s1, s2), finite = backends.load(backend).point_cost_forward(x, y, x_valid, y_valid, cost)
    return C, s1, s2, torch.tensor(finite)


@point_cost_op.register_fake
def _(x, y, x_valid, y_valid, cost, backend):  # noqa: ANN001, ANN202
    B, n, m = x.shape[0], x.shape[1], y.shape[1]
    flag = x.new_empty((), dtype=torch.bool)
    return x.new_empty(B, n, m), x.new_empty(B, n), x.new_empty(B, m), flag


def _point_cost_grads(
    G: Tensor, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, C: Tensor, s1: Tensor, s2: Tensor,
    cost: str, backend: str, need_dx: bool, need_dy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    dx, dy = backends.load(backend).point_cost_backward(
        G, x, y, xv, yv, C, (s1, s2), cost, need_dx, need_dy
    )
    return (dx if dx is not None else x.new_empty(0)), (dy if dy is not None else y.new_empty(0))


@torch.library.custom_op("optical_kernels::point_cost_backward", mutates_args=())
def point_cost_backward_op(
    G: Tensor, x: Tensor, y: Tensor, x_valid: Tensor, y_valid: Tensor, C: Tensor, s1: Tensor,
    s2: Tensor, cost: str, backend: str, need_dx: bool, need_dy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(∂L/∂x, ∂L/∂y)``, an empty tensor for a gradient not asked for."""
    return _point_cost_grads(G, x, y, x_valid, y_valid, C, s1, s2, cost, backend, need_dx,
                             need_dy)  # fmt: skip


@point_cost_backward_op.register_fake
def _(G, x, y, *args):  # noqa: ANN001, ANN002, ANN202
    need_dx, need_dy = args[-2:]
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (
        torch.empty_like(y) if need_dy else y.new_empty(0)
    )


def _setup_point_cost(ctx, inputs, output) -> None:  # noqa: ANN001
    x, y, xv, yv, cost, backend = inputs
    C, s1, s2, flag = output
    ctx.cost, ctx.backend = cost, backend
    ctx.save_for_backward(x, y, xv, yv, C, s1, s2)
    ctx.mark_non_differentiable(s1, s2, flag)


def _point_cost_vjp(ctx, G, backward_fn) -> tuple:  # noqa: ANN001
    """The point cost's autograd formula; ``backward_fn``: the backward op or its eager twin."""
    x, y, xv, yv, C, s1, s2 = ctx.saved_tensors
    need_dx, need_dy = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    dx, dy = backward_fn(G, x, y, xv, yv, C, s1, s2, ctx.cost, ctx.backend, need_dx, need_dy)
    return (dx if need_dx else None), (dy if need_dy else None), None, None, None, None


def _backward_point_cost(ctx, G, *_):  # noqa: ANN001, ANN002, ANN202
    return _point_cost_vjp(ctx, G, point_cost_backward_op)


point_cost_op.register_autograd(_backward_point_cost, setup_context=_setup_point_cost)
point_cost_backward_op.register_autograd(_no_double_backward, setup_context=_setup_nothing)


class _EagerPointCostBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):  # noqa: ANN001, ANN002, ANN205
        return _point_cost_grads(*args)

    backward = staticmethod(_no_double_backward)


class _EagerPointCost(torch.autograd.Function):
    """``optical_kernels::point_cost`` for eager plain-tensor calls; returns C only, the
    finiteness flag goes to the list ``finite``."""

    @staticmethod
    def forward(ctx, x, y, xv, yv, cost, backend, finite):  # noqa: ANN001, ANN205
        C, (s1, s2), ok = backends.load(backend).point_cost_forward(x, y, xv, yv, cost)
        finite.append(ok)
        ctx.cost, ctx.backend = cost, backend
        ctx.save_for_backward(x, y, xv, yv, C, s1, s2)
        return C

    @staticmethod
    def backward(ctx, G):  # noqa: ANN001, ANN205
        return (*_point_cost_vjp(ctx, G, _EagerPointCostBackward.apply), None)


def point_cost(
    backend: str, x: Tensor, y: Tensor, cost: str, x_valid: Tensor, y_valid: Tensor
) -> tuple[Tensor, bool | Tensor]:
    """``(C [B, n, m], finite)`` computed by ``backend`` (a
    :class:`~optical_kernels.backends.contract.PointCostBackend`): the cost between x [B, n, d]
    and y [B, m, d], 0 where ``x_valid`` [B, n] / ``y_valid`` [B, m] is False, differentiable
    in x and y. ``finite`` (False: the unmasked cost had a NaN or Inf entry) is a bool for
    eager calls, a 0-dim bool tensor from the custom op otherwise."""
    x, y = x.contiguous(), y.contiguous()
    xv, yv = x_valid.to(torch.bool).contiguous(), y_valid.to(torch.bool).contiguous()
    if _eager(x, y):
        finite: list[bool] = []
        C = _EagerPointCost.apply(x, y, xv, yv, cost, backend, finite)
        return C, finite[0]
    C, _, _, flag = point_cost_op(x, y, xv, yv, cost, backend)
    return C, flag
