"""The non-convergence warning: :class:`ConvergenceWarning` and :func:`warn_if_unconverged`.

A solve that stops at ``max_iter`` with an L1 marginal error still ``>= tol`` is far from the
fixed point (its value and gradient are those of the iterations run, not of OT_ε). POT warns;
so do we, without flooding a training loop and without a host sync on CUDA:

* **once per call site**: the first frame outside ``optical_kernels`` and ``torch`` (the line of
  user code that called the loss) is remembered and never warned again;
* **silence it** with ``OPTICAL_KERNELS_QUIET=1`` or
  ``warnings.filterwarnings("ignore", category=optical_kernels.ConvergenceWarning)``;
  ``tol=0`` (a fixed number of iterations) never warns;
* **CPU tensors** are checked at once (one reduction over ``err`` [B], no device to wait for);
* **CUDA tensors** are checked *lazily*: the count of unconverged problems and the worst
  error are copied to pinned host memory with ``non_blocking=True`` and a CUDA event is
  recorded; a later call (or :func:`flush`) reads them once the event has completed, so the
  hot path never waits for the GPU. At most :data:`PENDING` checks are in flight; while all
  slots are busy, further calls are not checked (the check is rate-limited, not queued);
* **under** ``torch.compile`` (and during CUDA graph capture) nothing is checked (a traced
  graph cannot warn); read ``OTResult.converged`` / ``OTResult.err``, which are always
  returned.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import SolverConfig

#: Lazy CUDA checks in flight at most (pinned host slots).
PENDING = 4

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_seen: set[tuple[str, int]] = set()
_Context = tuple[int, SolverConfig, "str | None"]
_pending: list[tuple[object, torch.Tensor, _Context, tuple[str, int, str]]] = []
_slots: dict[torch.device, list[torch.Tensor]] = {}


class ConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before its marginal error fell below ``tol``.

    Filter it with ``warnings.filterwarnings("ignore", category=ConvergenceWarning)`` or set
    ``OPTICAL_KERNELS_QUIET=1``.
    """


def _call_site() -> tuple[str, int, str]:
    """``(filename, lineno, module)`` of the first frame outside this package and torch."""
    frame = sys._getframe(1)
    last = frame
    while frame is not None:
        path = frame.f_code.co_filename
        if not (path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)):
            break
        last, frame = frame, frame.f_back
    frame = frame or last
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "?")


def _message(n_bad: int, n_total: int, worst: float, cfg: SolverConfig, cost: str | None) -> str:
    on = "" if cost is None else f", cost={cost!r}"
    return (
        f"Sinkhorn did not converge for {n_bad} of {n_total} problem(s): worst L1 marginal "
        f"error {worst:.3g} >= tol={cfg.tol:g} after max_iter={cfg.max_iter} at "
        f"eps={cfg.eps:g}{on}; value and gradient are those of the iterations run. Increase "
        f"max_iter, increase eps (absolute, in cost units: compare it with the cost's scale, "
        f"or normalise raw embeddings), or pass eps_schedule=(start, 0.5); tol=0 runs a fixed "
        f"number of iterations. Per problem: OTResult.converged / .err. Shown once per call "
        f"site; silence: OPTICAL_KERNELS_QUIET=1 or a warnings filter on "
        f"optical_kernels.ConvergenceWarning."
    )


def _emit(message: str, site: tuple[str, int, str]) -> None:
    _seen.add(site[:2])
    warnings.warn_explicit(message, ConvergenceWarning, site[0], site[1], module=site[2])


def _slot(device: torch.device) -> torch.Tensor | None:
    """A pinned host buffer [2] float64 not used by a pending check, or ``None``."""
    busy = {id(buf) for _, buf, _, _ in _pending}
    slots = _slots.setdefault(device, [])
    for buf in slots:
        if id(buf) not in busy:
            return buf
    if len(slots) >= PENDING:
        return None
    buf = torch.empty(2, dtype=torch.float64, pin_memory=True)
    slots.append(buf)
    return buf


def flush(wait: bool = False) -> None:
    """Emit the warnings of completed lazy (CUDA) checks; ``wait=True`` first waits for every
    pending check (a host sync: for tests and the end of a run, not the training loop)."""
    keep = []
    for event, buf, context, site in _pending:
        if wait:
            event.synchronize()  # type: ignore[attr-defined]
        if not event.query():  # type: ignore[attr-defined]
            keep.append((event, buf, context, site))
            continue
        n_bad, worst = int(buf[0]), float(buf[1])
        if n_bad and site[:2] not in _seen:
            n_total, cfg, cost = context
            _emit(_message(n_bad, n_total, worst, cfg, cost), site)
    _pending[:] = keep


def warn_if_unconverged(
    errs: Sequence[torch.Tensor], cfg: SolverConfig, cost: str | None
) -> None:
    """Warn (once per call site) if any ``err`` [B] of the solves of one call is ``>= tol``.

    ``errs`` are the final L1 marginal errors (several for ``objective="divergence"``; empty
    problems report 0). See the module docstring for when and how the check runs.
    """
    if cfg.tol <= 0 or torch.compiler.is_compiling() or os.environ.get("OPTICAL_KERNELS_QUIET"):
        return
    if _pending:
        flush()
    if not errs or errs[0].numel() == 0:
        return
    site = _call_site()
    if site[:2] in _seen:
        return
    with torch.no_grad():
        err = torch.stack([e.detach().reshape(-1) for e in errs]).amax(0)
        bad = err >= cfg.tol
        if err.device.type != "cuda":
            n_bad = int(bad.sum())
            if n_bad:
                _emit(_message(n_bad, err.numel(), float(err.max()), cfg, cost), site)
            return
        if torch.cuda.is_current_stream_capturing():  # inside a CUDA graph: no copies/events
            return
        buf = _slot(err.device)
        if buf is None:  # every slot in flight: rate-limited, skip this call's check
            return
        stats = torch.stack([bad.sum().to(torch.float64), err.max().to(torch.float64)])
        buf.copy_(stats, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(err.device))  # the stream the copy went on
    _pending.append((event, buf, (err.numel(), cfg, cost), site))
