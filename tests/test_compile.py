"""``torch.compile`` and ``torch.library`` checks of the custom ops (CPU, ``torch`` backend).

* a training step (tiny linear student, ``sinkhorn_loss``, backward) compiled with the
  ``eager`` / ``aot_eager`` backends matches eager mode (``inductor``: set
  ``OPTICAL_KERNELS_TEST_INDUCTOR=1``; it compiles C++ and is slow on a shared machine);
* ``torch.library.opcheck`` of ``optical_kernels::sinkhorn`` (every gradient mode, unbalanced,
  ε-scaling), of its backward op, and of ``optical_kernels::sinkhorn_sample`` (with a test
  double backend that has fused-cost entry points);
* the fake (meta) implementations give the right shapes and dtypes under ``FakeTensorMode``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import optical_kernels as ok
import optical_kernels.ops  # noqa: F401  (registers the custom ops)
from tests.helpers import random_problem, use_fused_reference

F64 = torch.float64
OPS = torch.ops.optical_kernels


def _dense_args(grad: str, rho: float | None = None, schedule: tuple | None = None, B: int = 2,
                n: int = 4, m: int = 3):
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(B, n, m, dtype=F64, generator=gen, requires_grad=True)
    a = torch.full((B, n), 1.0 / n, dtype=F64)
    b = torch.full((B, m), 1.0 / m, dtype=F64)
    start, factor = schedule if schedule is not None else (None, None)
    return (C, a, b, "torch", 0.2, rho, 12, 1e-6, 3, start, factor, grad)


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize(
    "grad, rho, schedule",
    [
        ("envelope", None, None),
        ("implicit", None, None),
        ("unrolled", None, None),
        ("envelope", 0.5, None),
        ("unrolled", 0.5, (2.0, 0.5)),
    ],
)
def test_opcheck_sinkhorn(grad, rho, schedule):
    torch.library.opcheck(OPS.sinkhorn.default, _dense_args(grad, rho, schedule))


def test_opcheck_sinkhorn_with_empty_problem():
    args = list(_dense_args("implicit"))
    a = args[1].clone()
    a[1] = 0.0  # problem 1 is empty
    args[1] = a
    torch.library.opcheck(OPS.sinkhorn.default, tuple(args))


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
def test_opcheck_sinkhorn_backward(grad):
    C, a, b, *scalars = _dense_args(grad)
    C = C.detach()
    outs = OPS.sinkhorn(C, a, b, *scalars)
    gv = torch.ones(C.shape[0], dtype=F64)
    gvl = torch.full((C.shape[0],), 0.5, dtype=F64)
    args = (C, a, b, *outs, gv, gvl, *scalars)
    # the backward op is itself not differentiable (no double backward)
    torch.library.opcheck(
        OPS.sinkhorn_backward.default, args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize(
    "cost, grad", [("cosine", "implicit"), ("sqeuclidean", "unrolled"), ("dot", "envelope")]
)
def test_opcheck_sinkhorn_sample(monkeypatch, cost, grad):
    backend = use_fused_reference(monkeypatch)
    x, y, _, _ = random_problem(2, 4, 3, 5, seed=1, ragged=False, requires_grad=True)
    a = torch.full((2, 4), 0.25, dtype=F64)
    b = torch.full((2, 3), 1.0 / 3, dtype=F64)
    args = (x, y, a, b, cost, backend, 0.2, None, 12, 1e-6, 3, None, None, grad)
    torch.library.opcheck(OPS.sinkhorn_sample.default, args)


# ----------------------------------------------------------------------------- fake tensors
@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
def test_fake_shapes_dense(grad):
    B, n, m, max_iter = 3, 5, 4, 7
    with FakeTensorMode():
        C = torch.empty(B, n, m, dtype=torch.float32)
        a, b = torch.empty(B, n), torch.empty(B, m)
        f, g, value, value_linear, n_iters, err, hf, hg = OPS.sinkhorn(
            C, a, b, "torch", 0.1, None, max_iter, 1e-4, 2, None, None, grad
        )
        T = max_iter if grad == "unrolled" else 0
        assert f.shape == (B, n) and g.shape == (B, m)
        assert value.shape == value_linear.shape == err.shape == n_iters.shape == (B,)
        assert n_iters.dtype == torch.int32 and value.dtype == torch.float32
        assert hf.shape == (T, B, n) and hg.shape == (T, B, m)
        dC = OPS.sinkhorn_backward(
            C, a, b, f, g, value, value_linear, n_iters, err, hf, hg, value, value,
            "torch", 0.1, None, max_iter, 1e-4, 2, None, None, grad,
        )
        assert dC.shape == C.shape and dC.dtype == C.dtype


def test_fake_shapes_matches_real():
    args = _dense_args("unrolled")
    real = OPS.sinkhorn(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args)
        fake = OPS.sinkhorn(*fake_args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device


@pytest.mark.parametrize("need_dy", [True, False])
def test_fake_shapes_sample_backward(need_dy):
    B, n, m, d = 2, 5, 4, 3
    with FakeTensorMode():
        x, y = torch.empty(B, n, d), torch.empty(B, m, d)
        a, b = torch.empty(B, n), torch.empty(B, m)
        outs = OPS.sinkhorn_sample(x, y, a, b, "cosine", "torch", 0.1, None, 5, 0.0, 1, None,
                                   None, "envelope")
        assert outs[0].shape == (B, n) and outs[1].shape == (B, m)
        dx, dy = OPS.sinkhorn_sample_backward(
            x, y, a, b, *outs, outs[2], outs[3], need_dy, "cosine", "torch", 0.1, None, 5, 0.0,
            1, None, None, "envelope",
        )
        assert dx.shape == x.shape
        assert dy.shape == (y.shape if need_dy else (0,))


# ----------------------------------------------------------------------------- torch.compile
def _training_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).double()
    x_in, y, xm, ym = random_problem(3, 6, 5, 8, seed=2)
    return model, x_in, y, xm, ym


def _step(model, x_in, y, xm, ym, **kw):
    x = model(x_in)
    loss = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, backend="torch", max_iter=20, **kw)
    loss.backward()
    return loss.detach()


COMPILE_CASES = [
    ("eager", {}),
    ("aot_eager", {}),
    ("aot_eager", {"grad": "unrolled", "cost": "sqeuclidean"}),
    ("aot_eager", {"objective": "divergence", "cost": "dot", "reduction": "sum"}),
]
if os.environ.get("OPTICAL_KERNELS_TEST_INDUCTOR") == "1":
    COMPILE_CASES.append(("inductor", {}))


@pytest.mark.parametrize("compile_backend, kw", COMPILE_CASES)
def test_compiled_training_step_matches_eager(compile_backend, kw):
    model, x_in, y, xm, ym = _training_problem()
    loss_e = _step(model, x_in, y, xm, ym, **kw)
    grads_e = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    step = torch.compile(_step, backend=compile_backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph-break notices from the input checks
        loss_c = step(model, x_in, y, xm, ym, **kw)
        grads_c = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss_c2 = step(model, x_in, y, xm, ym, **kw)  # a second call reuses the compiled code
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_c2, loss_e, rtol=1e-10, atol=1e-12)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-9, atol=1e-12)


def test_compiled_op_fullgraph():
    """The custom op itself traces into a single graph (no breaks) with its fake impl."""

    def f(C, a, b):
        outs = OPS.sinkhorn(C, a, b, "torch", 0.2, None, 15, 0.0, 5, None, None, "implicit")
        return outs[3].sum()

    C, a, b, *_ = _dense_args("implicit")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = compiled(C, a, b)
    (g_c,) = torch.autograd.grad(out_c, C)
    out_e = f(C, a, b)
    (g_e,) = torch.autograd.grad(out_e, C)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(g_c, g_e)


def _loss(model, x_in, y, xm, ym):
    return ok.sinkhorn_loss(model(x_in), y, x_mask=xm, y_mask=ym, backend="torch", max_iter=20)


def test_compiled_loss_fullgraph():
    """The whole forward (checks, weights, cost, solve) captures as one graph; backward through
    the compiled graph matches eager (Tensor.backward itself is outside any dynamo graph)."""
    model, x_in, y, xm, ym = _training_problem()
    torch._dynamo.reset()
    compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
    loss_c = compiled(model, x_in, y, xm, ym)
    (g_c,) = torch.autograd.grad(loss_c, model.weight)
    loss_e = _loss(model, x_in, y, xm, ym)
    (g_e,) = torch.autograd.grad(loss_e, model.weight)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)


# ----------------------------------------------------------------------------- eager path
def _op_only(monkeypatch):
    """Force every call through the custom ops (as under tracing)."""
    monkeypatch.setattr(optical_kernels.ops, "_eager", lambda *ts: False)


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
@pytest.mark.parametrize("fused, cost", [(False, "cosine"), (False, "sqeuclidean"),
                                         (True, "cosine")])  # fmt: skip
def test_eager_path_matches_custom_op(monkeypatch, grad, fused, cost):
    """Eager calls on plain tensors skip the custom op's Python wrapper (ops._eager): values,
    gradients of x and y, and the outputs are those of the op path, bit for bit."""
    backend = use_fused_reference(monkeypatch) if fused else "cpu"
    x, y, xm, ym = random_problem(3, 7, 5, 4, seed=11, requires_grad=True)
    w = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(2))

    def run():
        res = ok.solve_sample(x, y, x_mask=xm, y_mask=ym, eps=0.1, max_iter=30, tol=0.0,
                              grad=grad, backend=backend, cost=cost)  # fmt: skip
        loss = (res.value * w).sum() + res.value_linear.sum()
        return res, torch.autograd.grad(loss, (x, y))

    calls = []
    name = "_EagerSample" if fused else "_EagerDense"
    real = getattr(optical_kernels.ops, name).apply

    class Spy(getattr(optical_kernels.ops, name)):
        @classmethod
        def apply(cls, *args):
            calls.append(1)
            return real(*args)

    monkeypatch.setattr(optical_kernels.ops, name, Spy)
    r1, g1 = run()
    assert calls, "the eager path was not taken"
    _op_only(monkeypatch)
    calls.clear()
    r2, g2 = run()
    assert not calls
    for t1, t2 in [(r1.value, r2.value), (r1.value_linear, r2.value_linear), *zip(g1, g2),
                   *zip(r1.potentials, r2.potentials), (r1.n_iters, r2.n_iters)]:  # fmt: skip
        assert torch.equal(t1, t2)


def test_eager_path_refuses_double_backward():
    x, y, xm, ym = random_problem(2, 4, 3, 3, seed=1, requires_grad=True)
    loss = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, eps=0.2, backend="cpu")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(gx.sum(), x)


def test_eager_path_not_taken_for_fake_tensors_or_functorch():
    assert optical_kernels.ops._eager(torch.zeros(2))
    assert optical_kernels.ops._eager(torch.nn.Parameter(torch.zeros(2)))
    with FakeTensorMode():
        assert not optical_kernels.ops._eager(torch.empty(2))
    seen = []
    torch.func.grad(lambda t: seen.append(optical_kernels.ops._eager(t)) or t.sum())(torch.ones(2))
    assert seen == [False]
