"""One small resident forward + backward (every gradient mode) for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 9 python tests/gpu/sanitize_one.py

Ragged masks and n, m, d that are not multiples of the tiles exercise every masked load and
store. Exits 0 when the results are finite (the sanitizer reports memory errors itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import optical_kernels.backends.triton as T  # noqa: E402
from optical_kernels.config import SolverConfig  # noqa: E402


def main() -> int:
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    B, n, m, d = 6, 45, 37, 100
    x = torch.randn(B, n, d, generator=gen).to(dev)
    y = torch.randn(B, m, d, generator=gen).to(dev)
    lx = torch.tensor([45, 1, 20, 0, 45, 33])
    ly = torch.tensor([37, 37, 5, 10, 0, 36])
    a = (torch.arange(n)[None] < lx[:, None]).float()
    b = (torch.arange(m)[None] < ly[:, None]).float()
    a = (a / a.sum(1, keepdim=True).clamp_min(1)).to(dev)
    b = (b / b.sum(1, keepdim=True).clamp_min(1)).to(dev)
    x, y = x * (a > 0)[..., None], y * (b > 0)[..., None]
    ok = True
    for grad in ("envelope", "implicit", "unrolled"):
        cfg = SolverConfig(eps=0.05, max_iter=30, tol=1e-4, check_every=5, grad=grad)
        out = T.forward_sample(x, y, a, b, "cosine", cfg)
        gv = torch.ones(B, device=dev)
        dx, dy = T.backward_sample(x, y, a, b, "cosine", out, gv, gv, cfg, need_dy=True)
        C = torch.rand(B, n, m, generator=gen).to(dev)
        G = T.backward(C, a, b, T.forward(C, a, b, cfg), gv, gv, cfg)
        torch.cuda.synchronize()
        finite = all(bool(torch.isfinite(t).all()) for t in (out.f, out.g, out.value, dx, dy, G))
        print(f"{grad}: finite={finite}")
        ok &= finite
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
