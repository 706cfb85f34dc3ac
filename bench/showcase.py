"""Short showcase of optical_kernels (``make demo``): solve, check against POT, time against POT.

1. A batch of ragged problems (random lengths, masks, one empty problem) is solved with
   ``optical_kernels.solve_sample`` to convergence, in float64.
2. The per-problem loss ``<P, C>`` and its gradient w.r.t. the student embeddings ``x`` are
   compared with POT (``ot.sinkhorn2(method="sinkhorn_log")`` per problem, autodiff through
   the converged iterations).
3. The OPTICAL training step of docs/design.md §7 S1 (B=64, n=m=32, d=384, fp32, cosine, ε=0.05,
   100 iterations, forward+backward) is timed against POT's batched solver and POT's loop.

Run from the repository root: ``python -m bench.showcase`` (``--quick`` for a smaller timing).
Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    from bench.providers import get_provider
    from bench.shapes import make_problem
except ImportError:  # run as a script: python bench/showcase.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.providers import get_provider
    from bench.shapes import make_problem

import optical_kernels as ok


def _backend_in_use(device: str = "cpu") -> str:
    info = ok.backends()
    if device == "cpu":
        if info["cpu"]["available"]:
            return "cpu (fused C++ extension)"
        return f"torch (pure PyTorch; the C++ extension is not built: {info['cpu']['reason']})"
    return "triton" if info["triton"]["available"] else "cuda/torch"


def check_against_pot(
    B: int = 12, lo: int = 3, hi: int = 40, d: int = 64, eps: float = 0.1, seed: int = 0
) -> bool:
    """Solve a ragged fp64 batch to convergence; compare loss and gradient with POT.

    ε = 0.1 (rather than the training value 0.05) so that every problem converges to 1e-10
    in a few hundred iterations, where POT's autodiff gradient equals the implicit one.
    """
    import ot

    x, y, x_mask, y_mask = make_problem(
        B, hi, hi, d, dtype=torch.float64, ragged=(lo, hi), seed=seed
    )
    y_mask[B - 1] = False  # an empty problem: loss 0, gradient 0, flagged
    y = y * y_mask[..., None]
    kw = dict(cost="cosine", eps=eps, max_iter=2000, tol=1e-10, check_every=10)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 'auto' falling back to 'torch'
        res = ok.solve_sample(x, y, x_mask=x_mask, y_mask=y_mask, **kw)
        xg = x.clone().requires_grad_(True)
        loss = ok.sinkhorn_loss(xg, y, x_mask=x_mask, y_mask=y_mask, reduction="sum", **kw)
        (gx,) = torch.autograd.grad(loss, xg)

    n = x_mask.sum(1).tolist()
    m = y_mask.sum(1).tolist()
    print(f"  {B} problems, n in [{min(n)}, {max(n)}], m in [{min(m)}, {max(m)}], d={d}, fp64")
    print(
        f"  iterations: {res.n_iters.min().item()}–{res.n_iters.max().item()}, "
        f"max marginal error {res.err.max().item():.1e}, "
        f"converged {int(res.converged.sum())}/{B}, empty {res.empty.nonzero().flatten().tolist()}"
    )

    vals = []
    xp = x.clone().requires_grad_(True)
    for k in range(B):
        if n[k] == 0 or m[k] == 0:
            vals.append(torch.zeros((), dtype=x.dtype))
            continue
        xk = xp[k][x_mask[k]]
        yk = y[k][y_mask[k]]
        M = (
            1.0
            - torch.nn.functional.normalize(xk, dim=-1)
            @ torch.nn.functional.normalize(yk, dim=-1).T
        )
        a = torch.full((n[k],), 1.0 / n[k], dtype=x.dtype)
        b = torch.full((m[k],), 1.0 / m[k], dtype=x.dtype)
        vals.append(
            ot.sinkhorn2(a, b, M, eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
        )
    v_pot = torch.stack(vals)
    (g_pot,) = torch.autograd.grad(v_pot.sum(), xp)

    v_err = (res.value.detach() - v_pot.detach()).abs() / v_pot.detach().abs().clamp_min(1e-12)
    g_err = (gx - g_pot).abs().max() / g_pot.abs().max()
    empty_ok = bool(res.value[B - 1] == 0) and bool(gx[B - 1].abs().max() == 0)
    finite = bool(torch.isfinite(res.value).all()) and bool(torch.isfinite(gx).all())
    ok_val = bool(v_err.max() < 1e-6)
    ok_grad = bool(g_err < 1e-5)
    print(
        f"  loss     vs POT: max relative difference {v_err.max().item():.1e}"
        f"  [{'ok' if ok_val else 'FAIL'}]"
    )
    print(
        f"  gradient vs POT: max difference / max |grad| {g_err.item():.1e}"
        f"  [{'ok' if ok_grad else 'FAIL'}]"
    )
    print(
        f"  empty problem: loss 0 and gradient 0  [{'ok' if empty_ok else 'FAIL'}];"
        f" all finite  [{'ok' if finite else 'FAIL'}]"
    )
    return ok_val and ok_grad and empty_ok and finite


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_against_pot(B: int = 64, n: int = 32, d: int = 384, repeats: int = 3) -> None:
    """Forward+backward of the S1 training step: ours (backend='auto') vs POT."""
    eps, n_iter = 0.05, 100
    x, y, _, _ = make_problem(B, n, n, d, dtype=torch.float32, seed=1)
    x.requires_grad_(True)
    print(
        f"  B={B}, n=m={n}, d={d}, fp32, cosine, eps={eps}, {n_iter} iterations (tol=0), "
        f"forward+backward, {torch.get_num_threads()} threads"
    )

    def ours():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            loss = ok.sinkhorn_loss(x, y, cost="cosine", eps=eps, max_iter=n_iter, tol=0.0)
        torch.autograd.grad(loss, x)

    def peer(name):
        prov = get_provider(name)

        def fn():
            loss = prov(x, y, None, None, eps=eps, n_iter=n_iter, cost="cosine").mean()
            torch.autograd.grad(loss, x)

        return fn

    rows = []
    for label, fn, reps in [
        ("optical_kernels (auto)", ours, repeats),
        ("POT solve_batch", peer("pot_batch"), repeats),
        ("POT sinkhorn2 loop", peer("pot_loop"), 1),
    ]:
        fn()  # warm-up
        rows.append((label, _time(fn, reps)))
    base = rows[0][1]
    for label, t in rows:
        speed = f"ours is {t / base:.1f}× faster" if label != rows[0][0] else ""
        print(f"  {label:<24} {t * 1e3:9.1f} ms   {speed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="optical_kernels showcase")
    ap.add_argument("--quick", action="store_true", help="smaller timing problem")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"optical_kernels {ok.__version__}, torch {torch.__version__}")
    print(f"CPU backend in use: {_backend_in_use()}")
    print("\n1-2. ragged batch solved and checked against POT")
    passed = check_against_pot()
    print("\n3. timing against POT (docs/design.md §7, S1)")
    if args.quick:
        time_against_pot(B=16, repeats=2)
    else:
        time_against_pot()
    print("\nall checks passed" if passed else "\nSOME CHECKS FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
