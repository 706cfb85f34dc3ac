"""Memory of the gradient modes (docs/design.md §3): ``envelope`` and ``implicit`` keep nothing that
grows with the iteration count; ``unrolled`` keeps ``O(B · iters · (n + m))`` potentials and
never ``(B, n, m)`` per iteration.

Two measurements, both deterministic on CPU:

* bytes saved for backward by the public API (``torch.autograd.graph.saved_tensors_hooks``);
* the peak of live tensor bytes allocated *inside* the reference forward/backward, tracked by a
  ``TorchDispatchMode`` that counts each new storage until its last tensor dies.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from optical_kernels import solve_sample
from optical_kernels.backends import torch as reference
from optical_kernels.config import SolverConfig
from tests.helpers import GRAD_MODES, random_cost, random_problem

F64 = torch.float64
B, N, M, D = 2, 24, 24, 8
SHORT, LONG = 5, 60
DENSE = B * N * M * 8  # bytes of one [B, n, m] fp64 buffer
PER_ITER = B * (N + M) * 8  # bytes of one iteration's potentials


def saved_bytes(grad: str, max_iter: int) -> int:
    """Bytes of the distinct storages autograd saves during one solve_sample forward."""
    x, y, xm, ym = random_problem(B, N, M, D, seed=0, ragged=False, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = solve_sample(x, y, grad=grad, max_iter=max_iter, tol=0.0, backend="torch")
    assert int(res.n_iters.min()) == max_iter
    return sum(storages.values())


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_saved_for_backward(grad):
    short, long = saved_bytes(grad, SHORT), saved_bytes(grad, LONG)
    growth = long - short
    if grad in ("envelope", "implicit"):
        assert growth == 0, (short, long)
    else:
        # the potentials of every iteration: (LONG − SHORT) · B · (n + m) values
        assert (LONG - SHORT) * PER_ITER <= growth <= 1.5 * (LONG - SHORT) * PER_ITER, growth
        assert growth < (LONG - SHORT) * DENSE / 10
    # whatever the mode, what is saved is a few [B, n, m] / [B, n, d] buffers plus history
    assert short < 12 * DENSE, short


class PeakLiveBytes(TorchDispatchMode):
    """Peak of the bytes of live storages created by ops run under this mode.

    Storages that existed before (listed in ``ignore``) are not counted, so views and in-place
    updates of the inputs cost nothing.
    """

    def __init__(self, ignore: object = ()) -> None:
        super().__init__()
        self.ignore = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten(ignore)[0]
            if isinstance(t, torch.Tensor)
        }
        self.live: dict[int, list[int]] = {}  # storage ptr -> [tensor count, nbytes]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in self.ignore:
                continue
            if key in self.live:
                self.live[key][0] += 1
            else:
                self.live[key] = [1, st.nbytes()]
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def _problem():
    C = random_cost(B, N, M, seed=1)
    a = torch.full((B, N), 1.0 / N, dtype=F64)
    b = torch.full((B, M), 1.0 / M, dtype=F64)
    return C, a, b


def forward_peak(grad: str, max_iter: int) -> int:
    C, a, b = _problem()
    cfg = SolverConfig(eps=0.1, max_iter=max_iter, tol=0.0, grad=grad)
    mode = PeakLiveBytes(ignore=(C, a, b))
    with mode:
        out = reference.forward(C, a, b, cfg)
    assert int(out.n_iters.min()) == max_iter
    return mode.peak


def backward_peak(grad: str, max_iter: int) -> int:
    C, a, b = _problem()
    cfg = SolverConfig(eps=0.1, max_iter=max_iter, tol=0.0, grad=grad)
    out = reference.forward(C, a, b, cfg)
    gv = torch.ones(B, dtype=F64)
    mode = PeakLiveBytes(ignore=(C, a, b, out, gv))
    with mode:
        dC = reference.backward(C, a, b, out, gv, gv, cfg)
    assert dC.shape == C.shape
    return mode.peak


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_forward_peak_memory(grad):
    short, long = forward_peak(grad, SHORT), forward_peak(grad, LONG)
    if grad in ("envelope", "implicit"):
        assert long <= short * 1.05 + 1024, (short, long)
    else:  # the history: O(iters · (n + m)), never O(iters · n · m)
        assert long - short <= 2.5 * (LONG - SHORT) * PER_ITER, (short, long)
    assert short < 12 * DENSE, short


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_backward_peak_memory(grad):
    """The reverse pass of every mode works in a constant number of [B, n, m] buffers (the
    unrolled one recomputes the softmax weights of each iteration instead of storing them)."""
    short, long = backward_peak(grad, SHORT), backward_peak(grad, LONG)
    assert long <= short * 1.05 + 1024, (short, long)
    assert long < 12 * DENSE, long
