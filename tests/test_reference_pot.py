"""The ``torch`` reference against POT in float64 on random ragged masked batches."""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok

ot = pytest.importorskip("ot")

TIGHT = dict(max_iter=20000, tol=1e-14, check_every=1, backend="torch")


def ragged_batch(seed: int, B: int = 5, n: int = 9, m: int = 7, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64)
    nx = torch.randint(1, n + 1, (B,), generator=gen)
    ny = torch.randint(1, m + 1, (B,), generator=gen)
    nx[0], ny[0] = n, m  # one full problem
    xm = torch.arange(n)[None] < nx[:, None]
    ym = torch.arange(m)[None] < ny[:, None]
    # non-uniform weights, zero on padding
    a = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.2
    return x, y, xm, ym, a, b


def _valid(k, x, y, xm, ym, a, b, cost):
    xk, yk = x[k][xm[k]], y[k][ym[k]]
    ak, bk = a[k][xm[k]], b[k][ym[k]]
    M = ok.cost_matrix(xk, yk, cost)
    return M, ak / ak.sum(), bk / bk.sum()


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_balanced_matches_pot_solve(cost, eps):
    x, y, xm, ym, a, b = ragged_batch(seed=hash((cost, eps)) % 1000)
    if cost != "cosine":
        eps = eps * 4  # larger cost range
    res = ok.solve_sample(x, y, a, b, x_mask=xm, y_mask=ym, cost=cost, eps=eps,
                          objective="entropic", **TIGHT)
    P = res.plan()
    f, g = res.potentials
    assert bool(res.converged.all())
    for k in range(x.shape[0]):
        M, ak, bk = _valid(k, x, y, xm, ym, a, b, cost)
        sol = ot.solve(M, ak, bk, reg=eps, reg_type="KL", max_iter=20000, tol=1e-14)
        Pk = P[k][xm[k]][:, ym[k]]
        torch.testing.assert_close(Pk, sol.plan, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(res.value[k], sol.value, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(res.value_linear[k], sol.value_linear, rtol=1e-8, atol=1e-12)
        # POT's log-scalings: P = exp(u_i + v_j − M_ij/ε) -> f = ε(u − log a) up to a constant
        u, v = sol.potentials
        fk = eps * (u - ak.log())
        gk = eps * (v - bk.log())
        shift = (f[k][xm[k]] - fk).mean()
        torch.testing.assert_close(f[k][xm[k]], fk + shift, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(g[k][ym[k]], gk - shift, rtol=1e-8, atol=1e-9)
        # marginals
        torch.testing.assert_close(Pk.sum(1), ak, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(Pk.sum(0), bk, rtol=1e-10, atol=1e-13)
        # padded entries carry nothing
        assert float(P[k][~xm[k]].abs().sum() + P[k][:, ~ym[k]].abs().sum()) == 0.0
        assert float(f[k][~xm[k]].abs().sum() + g[k][~ym[k]].abs().sum()) == 0.0


def test_linear_loss_matches_pot_sinkhorn2():
    x, y, xm, ym, _, _ = ragged_batch(seed=3, B=4)
    eps = 0.2
    loss = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, eps=eps, reduction="none", **TIGHT)
    for k in range(x.shape[0]):
        M, ak, bk = _valid(
            k,
            x,
            y,
            xm,
            ym,
            torch.ones_like(xm, dtype=x.dtype),
            torch.ones_like(ym, dtype=x.dtype),
            "cosine",
        )
        ref = ot.sinkhorn2(
            ak, bk, M, reg=eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-14
        )
        torch.testing.assert_close(loss[k], ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("rho", [0.5, 5.0])
def test_unbalanced_matches_pot(rho):
    x, y, xm, ym, a, b = ragged_batch(seed=11, B=4)
    eps = 0.2
    res = ok.solve_sample(
        x, y, a, b, x_mask=xm, y_mask=ym, eps=eps, rho=rho, objective="entropic",
        cost="sqeuclidean", **TIGHT
    )
    P = res.plan()
    for k in range(x.shape[0]):
        xk, yk = x[k][xm[k]], y[k][ym[k]]
        ak, bk = a[k][xm[k]], b[k][ym[k]]  # unbalanced: weights used as given
        M = ok.cost_matrix(xk, yk, "sqeuclidean")
        sol = ot.solve(
            M,
            ak,
            bk,
            reg=eps,
            unbalanced=rho,
            unbalanced_type="KL",
            reg_type="KL",
            max_iter=200000,
            tol=1e-15,
        )
        Pk = P[k][xm[k]][:, ym[k]]
        torch.testing.assert_close(Pk, sol.plan, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(res.value_linear[k], sol.value_linear, rtol=1e-8, atol=1e-12)

        # value with the generalised KL (POT's total_cost omits the mass terms)
        def kl(p, q):
            return (p * (p / q).log() - p + q).sum()

        Q = ak[:, None] * bk[None, :]
        expected = (Pk * M).sum() + eps * kl(Pk, Q) + rho * (kl(Pk.sum(1), ak) + kl(Pk.sum(0), bk))
        torch.testing.assert_close(res.value[k], expected, rtol=1e-8, atol=1e-12)


def test_batched_equals_pot_batch_solver():
    """Same numbers as POT's own batched solver (ot.batch.solve_batch, log_sinkhorn)."""
    from ot.batch import solve_batch

    gen = torch.Generator().manual_seed(5)
    B, n, m, d, eps = 3, 8, 6, 5, 0.3
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64)
    C = ok.cost_matrix(x, y, "cosine")
    res = ok.solve(C, eps=eps, **TIGHT)
    a = torch.full((B, n), 1.0 / n, dtype=torch.float64)
    b = torch.full((B, m), 1.0 / m, dtype=torch.float64)
    sol = solve_batch(
        M=C, reg=eps, a=a, b=b, max_iter=20000, tol=1e-14, method="log_sinkhorn", reg_type="kl"
    )
    torch.testing.assert_close(res.value_linear, sol.value_linear, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(res.plan(), sol.plan, rtol=1e-8, atol=1e-12)
