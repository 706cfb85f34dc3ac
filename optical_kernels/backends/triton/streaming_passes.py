"""Host launchers of the streaming kernels (:mod:`.streaming_kernels`): :class:`Problem`.

A :class:`Problem` is a padded batch — a given ``C`` [B, n, m] or points ``x`` [B, n, d],
``y`` [B, m, d] with weights ``a`` [B, n], ``b`` [B, m] — prepared once (compute dtype,
per-point norms, valid extents, tile sizes from :class:`.launch.Tiles`) with one launcher per
kernel in both orientations: :meth:`Problem.lse` (a Sinkhorn half-step or row LSE statistics)
and :meth:`Problem.plan` (one pass over a plan-like tile: sums, point gradient, dense G). The
column orientation is the same kernel on the transposed problem (x↔y, a↔b, strides of ``C``
swapped). The solve and gradient orchestration over these passes is :mod:`.streaming` and
:mod:`.streaming_backward`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...constants import POINT_COSTS, cost_code
from .. import contract
from .launch import DEFAULT_TILES, Tiles
from .streaming_kernels import LN2, _lse_kernel, _plan_kernel

LOG2E = 1.4426950408889634
NORM_FLOOR = 1e-8
COST_CODES = {c: cost_code(c) for c in POINT_COSTS}  # kernel codes (constants.Cost)


def _valid_len(w: torch.Tensor) -> torch.Tensor:
    """Last index with positive weight, plus one: [B] int32 (0 for no valid entry)."""
    idx = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=torch.int32)
    return torch.where(w > 0, idx, 0).amax(1).to(torch.int32)


def _log2w(w: torch.Tensor) -> torch.Tensor:
    """log2 w at positive weights, NEG elsewhere."""
    return torch.where(w > 0, torch.log2(torch.where(w > 0, w, 1.0)), -1.0e30)


class Side:
    """One side of the batch: weights [B, L], valid extent [B], points [B, L, d], norms [B, L]."""

    def __init__(self, w: torch.Tensor, pts: torch.Tensor | None, nv: torch.Tensor | None):
        self.w = w
        self.len = _valid_len(w)
        self.valid = w > 0
        self.pts = pts
        self.nv = nv
        self.L = w.shape[1]


class Problem:
    """A padded batch (given C or points) with both pass orientations and the launchers."""

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        C: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        cost: str | None = None,
        tiles: Tiles | None = None,
    ) -> None:
        self.tiles = tiles or DEFAULT_TILES
        src = C if C is not None else x
        self.dtype = contract.compute_dtype(src.dtype, a.dtype)
        self.acc = tl.float64 if self.dtype == torch.float64 else tl.float32
        self.device = src.device
        self.a = a.to(self.dtype).contiguous()
        self.b = b.to(self.dtype).contiguous()
        self.B, self.n = self.a.shape
        self.m = self.b.shape[1]
        self.C = C
        if C is not None:
            self.code = 0
            self.d = 1
            nx = ny = None
            xs = ys = None
            pts_dtype = self.dtype
        else:
            contract.check_cost(cost)
            self.code = COST_CODES[cost]
            if x.dtype == torch.float64 or self.dtype == torch.float64:
                x, y = x.to(torch.float64), y.to(torch.float64)
            self.d = x.shape[2]
            xs, ys = x, y
            nx, ny = self._norms(x), self._norms(y)
            pts_dtype = x.dtype
        self.rows = Side(self.a, xs, nx)
        self.cols = Side(self.b, ys, ny)
        self.nonempty = self.rows.valid.any(1) & self.cols.valid.any(1)
        self.ne_i32 = self.nonempty.to(torch.int32)
        self.block_r, self.block_c, bd, self.prec = self.tiles.resolve(
            self.d, None if self.code == 0 else pts_dtype)
        self.block_d = bd
        self.one_d = self.code != 0 and self.d <= bd
        self.n_dchunks = triton.cdiv(self.d, bd) if self.code != 0 else 1
        # the Triton 3.6 interpreter computes 16-bit tl.dot wrongly: upcast tiles there only
        self.dot_f32 = os.environ.get("TRITON_INTERPRET") == "1" and \
            pts_dtype in (torch.float16, torch.bfloat16)
        self._dummy = self.a

    # ----------------------------------------------------------------- helpers
    def _norms(self, p: torch.Tensor) -> torch.Tensor | None:
        """Cosine: 1/‖p‖, 0 where ‖p‖ < 1e-8 (x̂ = 0: C = 1, gradient 0, as costs.py);
        sqeuclidean: ‖p‖²."""
        if self.code == 3:
            return None
        p32 = p.to(self.dtype)
        if self.code == 2:
            return (p32 * p32).sum(-1).contiguous()
        nrm = p32.norm(dim=-1)
        inv = 1.0 / nrm.clamp_min(NORM_FLOOR)
        return torch.where(nrm < NORM_FLOOR, 0.0, inv).contiguous()

    def _src_args(self, rows: bool) -> tuple:
        """Kernel arguments of the cost source for a pass whose rows are ``rows``' side."""
        r, c = (self.rows, self.cols) if rows else (self.cols, self.rows)
        if self.code == 0:
            C = self.C
            sb, sr, sc = C.stride()
            if not rows:
                sr, sc = sc, sr
            dm = self._dummy
            return (C, sb, sr, sc, dm, 0, 0, 0, dm, 0, 0, 0, dm, dm)
        x, y = r.pts, c.pts
        nx = r.nv if r.nv is not None else self._dummy
        ny = c.nv if c.nv is not None else self._dummy
        return (self._dummy, 0, 0, 0, x, *x.stride(), y, *y.stride(), nx, ny)

    def _common(self) -> dict:
        t = self.tiles
        return dict(
            COST=self.code, ACC=self.acc, BLOCK_R=self.block_r, BLOCK_C=self.block_c,
            BLOCK_D=self.block_d, ONE_D=self.one_d, PREC=self.prec, DOT_F32=self.dot_f32,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )

    # ----------------------------------------------------------------- launchers
    def lse(
        self,
        rows: bool,
        h: torch.Tensor,
        out: torch.Tensor,
        eps_t: float,
        lam: float = 1.0,
        act: torch.Tensor | None = None,
        thr: int = 1,
        stats: bool = False,
        cbar: torch.Tensor | None = None,
    ) -> None:
        """Half-step into ``out`` (stats=False) or row LSE [+ softmax-mean cost] (stats=True).

        ``h`` is the other side's potential; ``act`` [B] int32, a problem runs iff act ≥ thr.
        """
        r, c = (self.rows, self.cols) if rows else (self.cols, self.rows)
        act = self.ne_i32 if act is None else act
        grid = (triton.cdiv(r.L, self.block_r), self.B)
        _lse_kernel[grid](
            *self._src_args(rows),
            r.w, c.w, h, act, thr, r.len, c.len, out, cbar if cbar is not None else out,
            LOG2E / eps_t, -lam * eps_t * LN2, r.L, c.L, self.d,
            MODE=1 if stats else 0, WANT_CBAR=cbar is not None, **self._common(),
        )

    def plan(
        self,
        rows: bool,
        p: torch.Tensor,
        q: torch.Tensor,
        K: float,
        *,
        alpha: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        gamma: torch.Tensor | None = None,
        act: torch.Tensor | None = None,
        thr: int = 1,
        sums: bool = False,
        s2: int = 0,
        grad_out: torch.Tensor | None = None,
        g_out: torch.Tensor | None = None,
        accum: bool = False,
        post: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One pass over ``G = 2^{p_i+q_j−K C_ij}(α_i + β_j + γ C_ij)`` in the given orientation.

        ``p``, ``alpha`` index the pass rows, ``q``, ``beta`` its columns. Returns
        ``(s1, s2)`` row sums when ``sums`` (s2 per ``s2``: 1 Σ G·C, 2 Σ E); emits the point
        gradient into ``grad_out`` [B, rows, d] or the dense ``G`` into ``g_out`` (given as
        the [B, n, m] tensor: it is transposed here for the column orientation). ``post``
        [B, rows]: renormalise each row of E to sum 1 and scale it by ``post`` (no α, β, γ);
        then ``s2`` returns the row sums of E.
        """
        if post is not None:
            sums, s2 = True, 2
        r, c = (self.rows, self.cols) if rows else (self.cols, self.rows)
        act = self.ne_i32 if act is None else act
        s1 = torch.zeros(self.B, r.L, dtype=self.dtype, device=self.device) if sums else None
        s2t = torch.zeros_like(s1) if (sums and s2) else None
        dm = self._dummy
        if grad_out is not None:
            go, (s_ob, s_or, s_od) = grad_out, grad_out.stride()
        else:
            go, s_ob, s_or, s_od = dm, 0, 0, 0
        if g_out is not None:
            gb, gr, gc = g_out.stride()
            if not rows:
                gr, gc = gc, gr
            gg = g_out
        else:
            gg, gb, gr, gc = dm, 0, 0, 0
        nd = self.n_dchunks if grad_out is not None else 1
        grid = (triton.cdiv(r.L, self.block_r), self.B, nd)
        _plan_kernel[grid](
            *self._src_args(rows),
            p, q, K,
            alpha if alpha is not None else dm, beta if beta is not None else dm,
            gamma if gamma is not None else dm, post if post is not None else dm,
            act, thr, r.len, c.len,
            s1 if s1 is not None else dm, s2t if s2t is not None else dm,
            go, s_ob, s_or, s_od, gg, gb, gr, gc,
            r.L, c.L, self.d,
            HAS_AL=alpha is not None, HAS_BE=beta is not None, HAS_GA=gamma is not None,
            OUT_SUM=sums, S2=s2 if sums else 0, OUT_GRAD=grad_out is not None,
            OUT_G=g_out is not None, ACCUM=accum, POST=post is not None, **self._common(),
        )
        return s1, s2t

    # ----------------------------------------------------------------- vectors
    def log2a(self) -> torch.Tensor:
        return _log2w(self.a)

    def log2b(self) -> torch.Tensor:
        return _log2w(self.b)

    def masked(self, v: torch.Tensor, rows: bool, fill: float = -1.0e30) -> torch.Tensor:
        """``v`` at valid positions of non-empty problems, ``fill`` elsewhere (contiguous)."""
        valid = (self.rows.valid if rows else self.cols.valid) & self.nonempty[:, None]
        return torch.where(valid, v, fill).contiguous()
