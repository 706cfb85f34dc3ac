"""Drop-in use inside real training code (Hugging Face / sentence-transformers loops).

The public API driven exactly as such a loop drives it: int64 ``attention_mask`` tensors from a
tokenizer, a bf16 student head under ``torch.autocast`` against an fp32 (cached) teacher,
``torch.compile(fullgraph=True)`` over ragged sequence lengths, ``backward``. Also: the
non-convergence warning, POT-shaped argument order (weights positional, masks keyword-only),
the POT / GeomLoss conversions stated in the README, the double-backward error and the
``optical-kernels bench`` argument pass-through.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import optical_kernels as ok
from optical_kernels import convergence
from tests.helpers import fused_reference_module, random_problem

registry = importlib.import_module("optical_kernels.backends")  # ok.backends is a function
F64 = torch.float64
VOCAB, HIDDEN, DIM = 40, 12, 8


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    """Each test starts with no call site warned and loud warnings."""
    monkeypatch.setattr(convergence, "_seen", set())
    monkeypatch.delenv("OPTICAL_KERNELS_QUIET", raising=False)


# ----------------------------------------------------------------------------- HF-style loop
class Student(torch.nn.Module):
    """A stand-in for a transformer: token embedding + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids))


def hf_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L] int64)`` right-padded, as a tokenizer gives."""
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), L), generator=gen)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def hf_step(student, teacher_tokens, ids, attn, t_attn, **kw):
    """Student forward under bf16 autocast, OT loss against the fp32 teacher tokens."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = student(ids)  # bf16
    return ok.sinkhorn_loss(x, teacher_tokens, x_mask=attn, y_mask=t_attn, max_iter=30, **kw)


def _problem(n_lengths, m_lengths, seed):
    ids, attn = hf_batch(n_lengths, seed)
    _, t_attn = hf_batch(m_lengths, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    teacher = torch.randn(len(m_lengths), max(m_lengths), DIM, generator=gen)  # fp32, cached
    return ids, attn, teacher, t_attn


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_hf_loop_eager_int_masks_bf16_autocast():
    torch.manual_seed(0)
    student = Student()
    ids, attn, teacher, t_attn = _problem([5, 3, 4], [6, 2, 6], seed=1)
    assert attn.dtype == torch.int64
    loss = hf_step(student, teacher, ids, attn, t_attn)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in _grads(student))
    # the same loss as explicit fp32 points with bool masks outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = student(ids)
    ref = ok.sinkhorn_loss(x.detach().float(), teacher, x_mask=attn.bool(), y_mask=t_attn.bool(),
                           max_iter=30)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dynamic", [None, True])
def test_hf_loop_compiled_fullgraph_over_ragged_lengths(dynamic):
    """Several sequence lengths, fullgraph: one static compile and one dynamic compile at most
    (``dynamic=True``: a single one), then no recompile per new length; loss and gradients
    match eager mode."""
    torch.manual_seed(0)
    student = Student()
    cnt = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(hf_step, backend=cnt, fullgraph=True, dynamic=dynamic)
    shapes = [([5, 3], [6, 4]), ([7, 2], [3, 9]), ([11, 6], [5, 5]), ([4, 4], [8, 2])]
    counts = []
    for k, (ns, ms) in enumerate(shapes):
        ids, attn, teacher, t_attn = _problem(ns, ms, seed=10 + k)
        student.zero_grad()
        loss_e = hf_step(student, teacher, ids, attn, t_attn)
        loss_e.backward()
        grads_e = _grads(student)
        student.zero_grad()
        loss_c = step(student, teacher, ids, attn, t_attn)
        loss_c.backward()
        counts.append(cnt.frame_count)
        torch.testing.assert_close(loss_c.detach(), loss_e.detach(), rtol=1e-5, atol=1e-6)
        for gc, ge in zip(_grads(student), grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    # automatic dynamic: a static compile, one dynamic recompile at the second length, then
    # none (dynamo may restart the first analysis once to specialise Python floats)
    settled = 0 if dynamic else 1
    assert counts[-1] <= 3 and counts[settled:] == [counts[settled]] * (4 - settled), (
        f"compiles after each length: {counts}"
    )


def test_size_routing_happens_inside_the_op(monkeypatch):
    """An ``auto`` backend with a MAX_SIZE is a route ``"cpu>torch"`` chosen once; each call's
    concrete sizes pick the primary or the ``torch`` fallback inside the custom op, so a
    compiled graph crosses the size limit without a recompile or a graph break."""
    mod = fused_reference_module("_ok_test_fused_max6")
    mod.MAX_SIZE = 6
    calls = []
    inner = mod.forward_sample
    mod.forward_sample = lambda x, *a: calls.append(x.shape[1]) or inner(x, *a)
    monkeypatch.setitem(__import__("sys").modules, mod.__name__, mod)
    monkeypatch.setitem(registry._MODULES, "cpu", mod.__name__)
    monkeypatch.setattr(registry, "_warned", set())
    assert registry.resolve_name("auto", "cpu", F64) == "cpu>torch"
    assert registry.route("cpu>torch", 6, 3) == "cpu"

    def loss_fn(x, y, xm, ym):
        return ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, max_iter=40, reduction="sum")

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=cnt, fullgraph=True, dynamic=True)
    counts = []
    for n, fits in ((4, True), (9, False), (5, True)):
        x, y, xm, ym = random_problem(2, n, 5, 3, seed=n, requires_grad=True)
        calls.clear()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            loss = compiled(x, y, xm.long(), ym.long())
        counts.append(cnt.frame_count)
        (dx,) = torch.autograd.grad(loss, x)
        assert calls == ([n] if fits else [])
        if not fits:
            assert any("handles n, m <= 6" in str(w.message) for w in rec)
        ref = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, max_iter=40, reduction="sum",
                               backend="torch")
        (dx_ref,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-7, atol=1e-10)
    assert counts == [counts[0]] * 3, f"compiles after each size: {counts}"


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_opcheck_sample_op_on_a_size_fallback(monkeypatch, grad):
    """The fused-cost op routed to a backend without fused entry points (the cost is built
    inside the op) passes torch.library.opcheck, autograd included."""
    mod = fused_reference_module("_ok_test_fused_max3")
    mod.MAX_SIZE = 3
    monkeypatch.setitem(__import__("sys").modules, mod.__name__, mod)
    monkeypatch.setitem(registry._MODULES, "cpu", mod.__name__)
    x, y, _, _ = random_problem(2, 4, 3, 5, seed=12, ragged=False, requires_grad=True)
    a = torch.full((2, 4), 0.25, dtype=F64)
    b = torch.full((2, 3), 1.0 / 3, dtype=F64)
    args = (x, y, a, b, "cosine", "cpu>torch", 0.2, None, 12, 1e-6, 3, None, None, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time size-fallback notice
        torch.library.opcheck(torch.ops.optical_kernels.sinkhorn_sample.default, args)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mixed_dtypes_promote_and_grads_keep_input_dtype(backend):
    x, y, xm, ym = random_problem(2, 6, 5, 4, dtype=torch.float32, seed=3)
    xb = x.bfloat16().requires_grad_(True)
    y32 = y.clone().requires_grad_(True)
    loss = ok.sinkhorn_loss(xb, y32, x_mask=xm, y_mask=ym, backend=backend, max_iter=30)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and y32.grad.dtype == torch.float32
    assert torch.isfinite(xb.grad.float()).all() and torch.isfinite(y32.grad).all()
    ref = ok.sinkhorn_loss(xb.detach().float(), y, x_mask=xm, y_mask=ym, backend=backend,
                           max_iter=30)
    torch.testing.assert_close(loss.detach(), ref)


def test_autocast_does_not_lower_the_solver_precision():
    """Under bf16 autocast, fp32 points give the fp32 loss: the cost matmul is not run in
    bf16 behind the user's back."""
    x, y, xm, ym = random_problem(2, 6, 5, 16, dtype=torch.float32, seed=4)
    kw = dict(x_mask=xm, y_mask=ym, backend="torch", cost="dot", max_iter=30, eps=0.5)
    ref = ok.sinkhorn_loss(x, y, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ok.sinkhorn_loss(x, y, **kw)
    torch.testing.assert_close(inside, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- call convention
def test_masks_are_keyword_only_with_a_clear_error():
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=5)
    with pytest.raises(TypeError, match=r"^a must be a floating weight tensor.*pass x_mask="):
        ok.sinkhorn_loss(x, y, xm, ym, backend="torch")
    with pytest.raises(TypeError, match=r"^a must be a floating weight tensor.*pass x_mask="):
        ok.solve_sample(x, y, xm.long(), backend="torch")
    with pytest.raises(TypeError, match=r"^b must be a floating weight tensor.*pass y_mask="):
        ok.solve(torch.rand(2, 5, 4, dtype=F64), None, ym, backend="torch")
    with pytest.raises(TypeError, match="positional"):
        ok.solve(torch.rand(2, 5, 4, dtype=F64), None, None, xm, backend="torch")


def test_weights_come_before_masks_everywhere():
    """``solve(C, a, b, ...)``, ``solve_sample(x, y, a, b, ...)`` and ``sinkhorn_loss(x, y, a,
    b, ...)`` take the weights in the same positions (POT's order)."""
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=6)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 5, generator=gen, dtype=F64), torch.rand(2, 4, generator=gen, dtype=F64)
    kw = dict(x_mask=xm, y_mask=ym, backend="torch", tol=1e-9, max_iter=500, eps=0.2)
    r_sample = ok.solve_sample(x, y, a, b, **kw)
    r_dense = ok.solve(ok.cost_matrix(x, y, "cosine"), a, b, **kw)
    loss = ok.sinkhorn_loss(x, y, a, b, reduction="none", **kw)
    module = ok.SinkhornLoss(reduction="none", backend="torch", tol=1e-9, max_iter=500, eps=0.2)
    torch.testing.assert_close(r_sample.value, r_dense.value)
    torch.testing.assert_close(loss, r_sample.value)
    torch.testing.assert_close(module(x, y, a, b, x_mask=xm, y_mask=ym), loss)
    uniform = ok.solve_sample(x, y, **kw)
    assert not torch.allclose(uniform.value, r_sample.value)  # the weights were used


# ----------------------------------------------------------------------------- POT / GeomLoss
def test_pot_translations_in_the_readme():
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 3, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen,
                                                                     dtype=F64)
    a = torch.rand(6, generator=gen, dtype=F64) + 0.1
    b = torch.rand(5, generator=gen, dtype=F64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    reg = 0.5
    tight = dict(tol=1e-12, max_iter=5000, backend="torch")
    M = ot.dist(x.numpy(), y.numpy())  # sqeuclidean, no 1/2
    Ct = torch.from_numpy(M)
    # ot.sinkhorn2(a, b, M, reg) is <P, M>: objective="linear"
    s2 = ot.sinkhorn2(a.numpy(), b.numpy(), M, reg, numItermax=20000, stopThr=1e-14)
    ours_lin = ok.solve(Ct, a, b, eps=reg, objective="linear", **tight)
    torch.testing.assert_close(ours_lin.value, torch.tensor(float(s2), dtype=F64), rtol=1e-7,
                               atol=1e-9)
    # ot.solve(M, a, b, reg=reg) (reg_type="KL" by default) is OT_ε: objective="entropic"
    sol = ot.solve(M, a.numpy(), b.numpy(), reg=reg, max_iter=20000, tol=1e-14)
    ours = ok.solve(Ct, a, b, eps=reg, objective="entropic", **tight)
    torch.testing.assert_close(ours.value, torch.tensor(float(sol.value), dtype=F64), rtol=1e-7,
                               atol=1e-9)
    torch.testing.assert_close(ours.value_linear,
                               torch.tensor(float(sol.value_linear), dtype=F64), rtol=1e-7,
                               atol=1e-9)
    P = ot.sinkhorn(a.numpy(), b.numpy(), M, reg, numItermax=20000, stopThr=1e-14)
    torch.testing.assert_close(ours.plan(), torch.from_numpy(P), rtol=1e-6, atol=1e-10)
    # reg_type="entropy": the same plan, values differ by ε (H(a) + H(b))
    sol_h = ot.solve(M, a.numpy(), b.numpy(), reg=reg, reg_type="entropy", max_iter=20000,
                     tol=1e-14)
    entropy = -(a * a.log()).sum() - (b * b.log()).sum()
    torch.testing.assert_close(ours.value, float(sol_h.value) + reg * entropy, rtol=1e-7,
                               atol=1e-9)
    torch.testing.assert_close(ok.cost_matrix(x, y, "sqeuclidean"), Ct)
    # ot.solve_sample(X_a, X_b, a, b, reg=reg) (metric="sqeuclidean") = cost="sqeuclidean"
    sol_s = ot.solve_sample(x.numpy(), y.numpy(), a.numpy(), b.numpy(), reg=reg,
                            max_iter=20000, tol=1e-14)
    ours_s = ok.solve_sample(x, y, a, b, cost="sqeuclidean", eps=reg, objective="entropic",
                             **tight)
    torch.testing.assert_close(ours_s.value, torch.tensor(float(sol_s.value), dtype=F64),
                               rtol=1e-7, atol=1e-9)


def test_geomloss_blur_conversion():
    """GeomLoss ``p=2`` uses C = ½‖x−y‖² and ε = blur²; ours has no ½: with ε_ours = 2·blur²
    our value is exactly twice GeomLoss's (the same plan on the doubled cost)."""
    x, y, xm, ym = random_problem(2, 6, 5, 3, seed=8)
    blur = 0.3
    tight = dict(x_mask=xm, y_mask=ym, tol=1e-12, max_iter=5000, backend="torch")
    half = 0.5 * ok.cost_matrix(x, y, "sqeuclidean")  # GeomLoss's cost
    geom = ok.solve(half, eps=blur**2, objective="entropic", **tight)
    ours = ok.solve_sample(x, y, cost="sqeuclidean", eps=2 * blur**2, objective="entropic",
                           **tight)
    torch.testing.assert_close(ours.value, 2 * geom.value, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ours.plan(), geom.plan(), rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------- convergence
def _unconverged(**kw):
    gen = torch.Generator().manual_seed(9)
    x = 3 * torch.randn(2, 8, 64, generator=gen, dtype=F64)
    y = 3 * torch.randn(2, 7, 64, generator=gen, dtype=F64)
    return x, y, dict(cost="sqeuclidean", eps=0.05, max_iter=5, backend="torch", **kw)


def test_unconverged_solve_warns_once_per_call_site():
    x, y, kw = _unconverged()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):  # a training loop: one call site
            res = ok.solve_sample(x, y, **kw)
        ok.sinkhorn_loss(x, y, **kw)  # another call site
    got = [w for w in rec if issubclass(w.category, ok.ConvergenceWarning)]
    assert len(got) == 2, [str(w.message) for w in got]
    msg = str(got[0].message)
    worst = float(res.err.max())
    assert "eps=0.05" in msg and "max_iter=5" in msg and f"{worst:.3g}" in msg
    assert "Increase max_iter" in msg and "eps_schedule" in msg
    assert got[0].filename == __file__  # attributed to the user's line, not to the library
    assert not bool(res.converged.any())  # OTResult keeps reporting it


def test_unconverged_warning_through_module_and_silencing(monkeypatch):
    x, y, kw = _unconverged()
    loss_fn = ok.SinkhornLoss(**kw)
    with pytest.warns(ok.ConvergenceWarning) as rec:
        loss_fn(x, y)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok.solve_sample(x, y, **{**kw, "tol": 0.0})  # fixed iteration count: no warning
        ok.solve_sample(x, y, **{**kw, "max_iter": 2000, "eps": 50.0})  # converged
        warnings.filterwarnings("ignore", category=ok.ConvergenceWarning)
        ok.solve_sample(x, y, **kw)
    monkeypatch.setenv("OPTICAL_KERNELS_QUIET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok.sinkhorn_loss(x, y, **kw)


def test_no_convergence_check_inside_a_compiled_graph():
    x, y, kw = _unconverged()
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: ok.sinkhorn_loss(x, y, **kw), backend="aot_eager",
                      fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ok.ConvergenceWarning)
        assert torch.isfinite(f(x, y))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_convergence_check_is_lazy():
    x, y, kw = _unconverged()
    x, y = x.cuda(), y.cuda()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ok.solve_sample(x, y, **kw)
        convergence.flush(wait=True)
    assert any(issubclass(w.category, ok.ConvergenceWarning) for w in rec)


# ----------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("fused_path", [False, True])
def test_double_backward_raises_clearly(monkeypatch, backend, fused_path):
    if fused_path:
        mod = fused_reference_module("_ok_test_fused_db")
        monkeypatch.setitem(__import__("sys").modules, mod.__name__, mod)
        monkeypatch.setitem(registry._MODULES, "cpu", mod.__name__)
        backend = "cpu"
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=10, requires_grad=True)
    loss = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, backend=backend, max_iter=20, tol=0.0)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


# ----------------------------------------------------------------------------- CLI bench
def test_cli_bench_passes_pytest_args_from_any_directory(monkeypatch, tmp_path):
    from optical_kernels.distill import cli

    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: seen.update(cmd=cmd, **kw) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "-k", "S1", "--benchmark-disable"]) == 0
    assert seen["cmd"][-4:] == ["bench/", "-k", "S1", "--benchmark-disable"]
    root = seen["cwd"]
    assert (root / "bench" / "conftest.py").is_file()
    assert os.path.samefile(root, os.path.dirname(os.path.dirname(ok.__file__)))
