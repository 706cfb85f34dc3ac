"""Bad inputs raise ``ValueError``/``TypeError`` naming the argument (docs/design.md §4).

Everything runs on the ``torch`` backend, CPU, with tiny problems.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import optical_kernels as ok
from optical_kernels import cost_matrix, sinkhorn_loss, solve, solve_sample

F64 = torch.float64


def pts(B: int | None = 2, n: int = 5, m: int = 4, d: int = 3, dtype: torch.dtype = F64):
    shape_x = (n, d) if B is None else (B, n, d)
    shape_y = (m, d) if B is None else (B, m, d)
    return torch.randn(shape_x, dtype=dtype), torch.randn(shape_y, dtype=dtype)


def cost(B: int | None = 2, n: int = 5, m: int = 4, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.rand((n, m) if B is None else (B, n, m), dtype=dtype)


def _kw(kw: dict) -> dict:
    return {"backend": "torch", "max_iter": 3, **kw}


def call_sample(**kw):
    x, y = pts()
    return solve_sample(x, y, **_kw(kw))


def call_loss(**kw):
    x, y = pts()
    return sinkhorn_loss(x, y, **_kw(kw))


def call_solve(**kw):
    return solve(cost(), **_kw(kw))


ENTRY_POINTS = [call_sample, call_loss, call_solve]


def _value(out):
    """The value of a solve (OTResult) or of a loss (tensor)."""
    return out if isinstance(out, torch.Tensor) else out.value


# ----------------------------------------------------------------------------- points
@pytest.mark.parametrize(
    "x_shape, y_shape, match",
    [
        ((5, 3), (2, 4, 3), "x and y"),  # unbatched x, batched y
        ((2, 5, 3), (4, 3), "x and y"),
        ((5,), (4,), "x and y"),  # 1-D
        ((1, 2, 5, 3), (1, 2, 4, 3), "x and y"),  # 4-D
        ((2, 5, 3), (2, 4, 6), "feature dimension"),
        ((5, 3), (4, 6), "feature dimension"),
        ((2, 5, 3), (3, 4, 3), "batch size"),
    ],
)
@pytest.mark.parametrize("fn", [solve_sample, sinkhorn_loss])
def test_point_shapes(fn, x_shape, y_shape, match):
    x, y = torch.randn(x_shape, dtype=F64), torch.randn(y_shape, dtype=F64)
    with pytest.raises(ValueError, match=match):
        fn(x, y, backend="torch")


def test_cost_matrix_shapes_and_cost():
    x, y = pts()
    with pytest.raises(ValueError, match="cost"):
        cost_matrix(x, y, cost="euclidean")


@pytest.mark.parametrize("fn", [solve_sample, sinkhorn_loss])
def test_dtype_mismatch_promotes(fn):
    """Different floating dtypes are promoted (torch.result_type), as torch losses do."""
    x, y = pts()
    out = fn(x, y.float(), backend="torch", max_iter=3)
    ref = fn(x, y.float().double(), backend="torch", max_iter=3)
    assert _value(out).dtype == F64
    torch.testing.assert_close(_value(out), _value(ref))


@pytest.mark.parametrize("which", ["x", "y"])
def test_points_must_be_float_tensors(which):
    x, y = pts()
    bad_int = (x * 10).long() if which == "x" else (y * 10).long()
    args = (bad_int, y) if which == "x" else (x, bad_int)
    with pytest.raises(TypeError, match=rf"^{which} must be a floating"):
        solve_sample(*args, backend="torch")
    bad_list = x.tolist() if which == "x" else y.tolist()
    args = (bad_list, y) if which == "x" else (x, bad_list)
    with pytest.raises(TypeError, match=rf"^{which} must be a torch.Tensor"):
        solve_sample(*args, backend="torch")


@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_points(which, bad):
    x, y = pts()
    (x if which == "x" else y)[1, 2, 0] = bad
    with pytest.raises(ValueError, match=rf"^{which} contains NaN or Inf"):
        solve_sample(x, y, backend="torch")
    with pytest.raises(ValueError, match=rf"^{which} contains NaN or Inf"):
        sinkhorn_loss(x, y, backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_points_and_weights():
    x, y = pts()
    with pytest.raises(ValueError, match="device"):
        solve_sample(x.cuda(), y, backend="torch")
    with pytest.raises(ValueError, match=r"^a is on"):
        solve_sample(x.cuda(), y.cuda(), a=torch.ones(2, 5, dtype=F64), backend="torch")
    with pytest.raises(ValueError, match=r"^b is on"):
        solve(cost().cuda(), b=torch.ones(2, 4, dtype=F64), backend="torch")


# ----------------------------------------------------------------------------- cost C
@pytest.mark.parametrize("shape", [(4,), (1, 2, 4, 3)])
def test_cost_shape(shape):
    with pytest.raises(ValueError, match=r"^C must be"):
        solve(torch.rand(shape, dtype=F64), backend="torch")


def test_cost_dtype_and_type():
    with pytest.raises(TypeError, match=r"^C must be a floating"):
        solve(torch.ones(2, 3, 4, dtype=torch.int64), backend="torch")
    with pytest.raises(TypeError, match=r"^C must be a torch.Tensor"):
        solve([[0.0, 1.0], [1.0, 0.0]], backend="torch")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_cost(bad):
    C = cost()
    C[0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"^C contains NaN or Inf"):
        solve(C, backend="torch")


def test_divergence_rejected_on_cost():
    with pytest.raises(ValueError, match="objective"):
        solve(cost(), objective="divergence", backend="torch")


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", ["x_mask", "y_mask"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_mask_shape(fn, name):
    bad = torch.ones(2, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        fn(**{name: bad})
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        fn(**{name: torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["x_mask", "y_mask"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_mask_dtype(fn, name):
    """bool, integer and 0/1 float masks are accepted (nonzero = valid); other values and
    complex or non-tensor masks raise, naming the argument."""
    k = 5 if name == "x_mask" else 4

    def run(**kw):
        torch.manual_seed(0)  # the same points every call
        return _value(fn(**kw))

    mask = torch.ones(2, k, dtype=torch.bool)
    mask[1, -1] = False
    ref = run(**{name: mask})
    assert not torch.equal(ref, run())  # the mask matters
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.float32, torch.float16):
        torch.testing.assert_close(run(**{name: mask.to(dtype)}), ref)
    for bad in (2.0, 0.5, -1.0, math.nan):
        m = torch.ones(2, k)
        m[1, 1] = bad
        with pytest.raises(ValueError, match=rf"^{name} must hold only 0/1"):
            fn(**{name: m})
    m = torch.ones(2, k, dtype=torch.int64)
    m[0, 0] = 3
    with pytest.raises(ValueError, match=rf"^{name} must hold only 0/1.*found 3"):
        fn(**{name: m})
    with pytest.raises(TypeError, match=rf"^{name} must be a bool, integer or 0/1 float"):
        fn(**{name: torch.ones(2, k, dtype=torch.complex64)})
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor"):
        fn(**{name: [[True] * k] * 2})


@pytest.mark.parametrize("name", ["x_mask", "y_mask"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_mask_device(fn, name):
    k = 5 if name == "x_mask" else 4
    bad = torch.ones(2, k, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=rf"^{name} is on meta"):
        fn(**{name: bad})


def test_unbatched_mask_shape():
    x, y = pts(B=None)
    with pytest.raises(ValueError, match=r"x_mask must be \[5\] for unbatched inputs"):
        solve_sample(x, y, x_mask=torch.ones(1, 5, dtype=torch.bool), backend="torch")
    # correct unbatched masks are accepted
    res = solve_sample(x, y, x_mask=torch.ones(5, dtype=torch.bool),
                       y_mask=torch.ones(4, dtype=torch.bool), backend="torch", max_iter=2)
    assert res.value.shape == ()


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_negative_weights(fn, name):
    k = 5 if name == "a" else 4
    w = torch.rand(2, k, dtype=F64) + 0.1
    w[1, 2] = -0.5
    with pytest.raises(ValueError, match=rf"^{name} must be non-negative"):
        fn(**{name: w})


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_weight_shape(fn, name):
    for shape in [(2, 7), (5,), (2, 1), (1, 2, 5)]:
        with pytest.raises(ValueError, match=rf"^{name} must have shape"):
            fn(**{name: torch.rand(shape, dtype=F64)})


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_non_finite_weights(fn, name, bad):
    k = 5 if name == "a" else 4
    w = torch.rand(2, k, dtype=F64)
    w[0, 0] = bad
    with pytest.raises(ValueError, match=rf"^{name} contains NaN or Inf"):
        fn(**{name: w})


@pytest.mark.parametrize("name", ["a", "b"])
def test_weight_dtype(name):
    k = 5 if name == "a" else 4
    with pytest.raises(TypeError, match=rf"^{name} must be a floating"):
        call_sample(**{name: torch.ones(2, k, dtype=torch.int64)})
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor"):
        call_sample(**{name: [[1.0] * k] * 2})


# ----------------------------------------------------------------------------- scalars
@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("eps", [0.0, -0.1, math.nan, math.inf, -math.inf])
def test_bad_eps_value(fn, eps):
    with pytest.raises(ValueError, match=r"^eps must be"):
        fn(eps=eps)


@pytest.mark.parametrize("eps", ["0.1", None, True, torch.tensor(0.1)])
def test_bad_eps_type(eps):
    with pytest.raises(TypeError, match=r"^eps must be a real number"):
        call_sample(eps=eps)


def test_numpy_scalars_accepted():
    res = call_sample(eps=np.float32(0.5), tol=np.float64(0.0), max_iter=np.int64(4),
                      check_every=np.int32(2), rho=None)
    assert res.n_iters.tolist() == [4, 4]


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("tol", [-1e-6, -1.0, math.nan, math.inf])
def test_bad_tol(fn, tol):
    with pytest.raises(ValueError, match=r"^tol must be"):
        fn(tol=tol)


def test_tol_zero_is_allowed():
    res = call_sample(tol=0.0, max_iter=4)
    assert res.n_iters.tolist() == [4, 4]


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("name", ["max_iter", "check_every"])
@pytest.mark.parametrize("value", [0, -3])
def test_bad_int_value(fn, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be >= 1"):
        fn(**{name: value})


@pytest.mark.parametrize("name", ["max_iter", "check_every"])
@pytest.mark.parametrize("value", [2.5, 10.0, "10", True, None])
def test_bad_int_type(name, value):
    with pytest.raises(TypeError, match=rf"^{name} must be an int"):
        call_sample(**{name: value})


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("rho", [0.0, -1.0, math.nan, math.inf])
def test_bad_rho(fn, rho):
    with pytest.raises(ValueError, match=r"^rho must be"):
        fn(rho=rho, grad="envelope")


# ----------------------------------------------------------------------------- choices
@pytest.mark.parametrize(
    "name, value",
    [
        ("objective", "quadratic"),
        ("objective", "Linear"),
        ("grad", "autograd"),
        ("grad", None),
        ("backend", "numpy"),
        ("backend", "GPU"),
    ],
)
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_unknown_choice(fn, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be one of"):
        fn(**{name: value})


@pytest.mark.parametrize("value", ["euclidean", "Cosine", None, 3])
@pytest.mark.parametrize("fn", [call_sample, call_loss])
def test_unknown_cost(fn, value):
    with pytest.raises(ValueError, match=r"^cost must be one of"):
        fn(cost=value)


@pytest.mark.parametrize("value", ["avg", "batchmean", None])
def test_unknown_reduction(value):
    with pytest.raises(ValueError, match=r"^reduction must be one of"):
        call_loss(reduction=value)


def test_cost_keyword_not_accepted_by_solve():
    with pytest.raises(TypeError):
        solve(cost(), cost="cosine", backend="torch")


# ----------------------------------------------------------------------------- eps_schedule
@pytest.mark.parametrize(
    "schedule, match",
    [
        ((1.0, 1.0), r"eps_schedule\[1\] \(factor\)"),
        ((1.0, 2.0), r"eps_schedule\[1\] \(factor\)"),
        ((1.0, 0.0), r"eps_schedule\[1\] \(factor\)"),
        ((1.0, -0.5), r"eps_schedule\[1\] \(factor\)"),
        ((1.0, math.nan), r"eps_schedule\[1\] \(factor\)"),
        ((0.0, 0.5), r"eps_schedule\[0\] \(start\)"),
        ((-1.0, 0.5), r"eps_schedule\[0\] \(start\)"),
        ((math.inf, 0.5), r"eps_schedule\[0\] \(start\)"),
        ((1.0,), r"^eps_schedule must be a \(start, factor\) pair"),
        ((1.0, 0.5, 0.1), r"^eps_schedule must be a \(start, factor\) pair"),
        ("1.0, 0.5", r"^eps_schedule must be a \(start, factor\) pair"),
        (0.5, r"^eps_schedule must be a \(start, factor\) pair"),
    ],
)
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_bad_eps_schedule(fn, schedule, match):
    with pytest.raises(ValueError, match=match):
        fn(eps_schedule=schedule)


def test_good_eps_schedule_runs():
    res = call_sample(eps_schedule=[2.0, 0.5], eps=0.1, max_iter=8, tol=0.0)
    assert res.n_iters.tolist() == [8, 8]
    assert torch.isfinite(res.value).all()


# ----------------------------------------------------------------------------- backends
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the backend may be usable")
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_unavailable_backend_names_what_to_install(fn):
    with pytest.raises(ValueError, match=r"backend='cuda'") as info:
        fn(backend="cuda")
    msg = str(info.value)
    assert "install" in msg.lower() or "nvcc" in msg or "build" in msg.lower(), msg


def test_unavailable_backend_listed_in_backends():
    info = ok.backends()
    if not info["cuda"]["available"]:
        assert info["cuda"]["reason"], "an unavailable backend must say why"


# ----------------------------------------------------------------------------- rho + implicit
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_implicit_with_rho_is_supported(fn):
    """Unbalanced problems have an implicit gradient too (damped system, see reference)."""
    out = fn(grad="implicit", rho=1.0)
    assert out is not None


# ----------------------------------------------------------------------------- SinkhornLoss
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"eps": 0.0}, ValueError, "^eps"),
        ({"eps": "big"}, TypeError, "^eps"),
        ({"tol": -1.0}, ValueError, "^tol"),
        ({"max_iter": 0}, ValueError, "^max_iter"),
        ({"max_iter": 1.5}, TypeError, "^max_iter"),
        ({"check_every": 0}, ValueError, "^check_every"),
        ({"cost": "l1"}, ValueError, "^cost"),
        ({"objective": "w2"}, ValueError, "^objective"),
        ({"grad": "exact"}, ValueError, "^grad"),
        ({"backend": "jax"}, ValueError, "^backend"),
        ({"reduction": "avg"}, ValueError, "^reduction"),
        ({"rho": -1.0}, ValueError, "^rho"),
        ({"eps_schedule": (1.0, 1.5)}, ValueError, "eps_schedule"),
    ],
)
def test_sinkhorn_loss_module_validates_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ok.SinkhornLoss(**kwargs)


def test_sinkhorn_loss_module_rejects_unknown_or_positional_keywords():
    with pytest.raises(TypeError):
        ok.SinkhornLoss(epsilon=0.1)
    with pytest.raises(TypeError):
        ok.SinkhornLoss(0.1)  # keyword-only


def test_sinkhorn_loss_module_validates_inputs_at_call():
    loss = ok.SinkhornLoss(backend="torch", max_iter=2)
    x, y = pts()
    with pytest.raises(ValueError, match="feature dimension"):
        loss(x, y[..., :2])
