"""Launch settings of the Triton kernels, chosen in one place.

Every tuning decision of the Triton backend lives here — which kernel family, which iteration
form, dot precision, the tile shape, warps and stages of the resident kernels
(:func:`resident`) and the block sizes of the streaming kernels (:class:`Tiles`) — so that a
GPU measurement changes one line and not a kernel. Not here: the solver constants the kernels
compute with (CG caps and tolerances, cost and gradient-mode codes), and the host-sync period
of the streaming CG loop (``CG_SYNC_EVERY``, :mod:`.streaming_backward`).

Environment variables override the defaults without code changes (the GPU bench uses them to
compare variants in one run):

* ``OPTICAL_KERNELS_TRITON_KERNEL`` = ``auto`` (default) | ``resident`` | ``streaming``:
  force a kernel family (``resident`` still refuses tiles above :data:`RESIDENT_MAX`).
* ``OPTICAL_KERNELS_TRITON_FORM`` = ``log`` (default) | ``scaling``: iteration form of the
  resident solver (docs/design.md §5). ``log`` is the default until a GPU measurement favours
  ``scaling`` (no GPU was available when this was written: nothing here is measured).
* ``OPTICAL_KERNELS_TRITON_DOT`` = ``ieee`` (default) | ``tf32x3`` | ``tf32``: precision of
  ``tl.dot`` on **fp32** inputs. ``ieee`` is exact fp32 (CUDA cores); ``tf32x3`` is ~fp32
  accurate on tensor cores; ``tf32`` is fast but ~1e-3 relative (fails the 1e-5 contract).
  16-bit inputs always use their native tensor-core dot with fp32 accumulation; fp64 inputs
  use fp64 ``ieee`` dots.
* ``OPTICAL_KERNELS_TRITON_LOWP_BWD`` = ``0`` (default) | ``1``: in the backward of 16-bit
  inputs, round ``G = ∂L/∂C`` to the input dtype for the ``G·y`` tensor-core product
  (faster, bf16-accurate) instead of upcasting ``y`` to fp32.

The context manager :func:`override` sets the same knobs from Python (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: Largest n or m (padded sizes) solved by the resident kernel: a 128×128 fp32 tile is 64 KiB
#: of registers per program (32 registers/thread at 16 warps). Larger problems stream.
RESIDENT_MAX = 128

#: Absorption threshold of the scaling form, in log2 units: a scaling u, v leaving
#: [2^-30, 2^30] is absorbed into the potentials (one exp pass over the tile).
ABSORB_LOG2 = 30.0

_KERNELS = ("auto", "resident", "streaming")
_FORMS = ("log", "scaling")
_DOTS = ("ieee", "tf32x3", "tf32")
_overrides: dict[str, str] = {}


def _knob(name: str, env: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _overrides.get(name, os.environ.get(env, default)).strip().lower()
    if value not in allowed:
        raise ValueError(f"{env} must be one of {allowed}, got {value!r}")
    return value


def kernel_choice() -> str:
    """Forced kernel family: ``auto`` | ``resident`` | ``streaming``."""
    return _knob("kernel", "OPTICAL_KERNELS_TRITON_KERNEL", "auto", _KERNELS)


def form() -> str:
    """Iteration form of the resident solver: ``log`` | ``scaling``."""
    return _knob("form", "OPTICAL_KERNELS_TRITON_FORM", "log", _FORMS)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of ``dtype``."""
    if dtype != torch.float32:
        return "ieee"
    return _knob("dot", "OPTICAL_KERNELS_TRITON_DOT", "ieee", _DOTS)


def lowp_backward() -> bool:
    """Round G to the 16-bit input dtype for the backward tensor-core products."""
    return _knob("lowp_bwd", "OPTICAL_KERNELS_TRITON_LOWP_BWD", "0", ("0", "1")) == "1"


@contextlib.contextmanager
def override(**knobs: str) -> Iterator[None]:
    """Temporarily set knobs: ``kernel=``, ``form=``, ``dot=``, ``lowp_bwd=``.

    Example: ``with launch.override(form="scaling"): ok.sinkhorn_loss(...)``.
    """
    unknown = set(knobs) - {"kernel", "form", "dot", "lowp_bwd"}
    if unknown:
        raise ValueError(f"unknown launch knob(s) {sorted(unknown)}")
    saved = dict(_overrides)
    _overrides.update({k: str(v) for k, v in knobs.items()})
    try:
        kernel_choice(), form(), dot_precision(torch.float32), lowp_backward()  # validate
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def next_pow2(v: int) -> int:
    """Smallest power of two ≥ v (1 for v ≤ 1)."""
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


@dataclass(frozen=True)
class Tiles:
    """Launch parameters of the streaming kernels (0 = automatic).

    Attributes:
        block_r: rows per program (power of two ≥ 16).
        block_c: columns per inner-loop tile; 0: 64 for FMA dots (fp32 ``ieee``, fp64, a given
            C), 32 for tensor-core dots (``tf32x3``/``tf32``, bf16/fp16).
        block_d: feature chunk of ``tl.dot``; 0: 16 for FMA dots (several chunks per tile),
            ``next_pow2(d)`` up to 64 (tf32) / 128 (16-bit) for tensor-core dots, else 32 / 64.
            When d fits one chunk the x tile is loaded once per program.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
        dot_precision: ``tl.dot`` input precision for fp32 points: ``"ieee"`` (exact fp32 FMA,
            default: matches the reference to 1e-5), ``"tf32x3"`` (3×TF32 on tensor cores,
            ~fp32 accuracy, expected much faster for d ≥ 32) or ``"tf32"`` (~1e-3 relative
            cost error). 16-bit points always use their native tensor-core dot.

    The automatic choices are spill-free for sm_90 with Triton 3.6 (ptxas, d = 64 and 128);
    they are not yet timed on a GPU.
    """

    block_r: int = 64
    block_c: int = 0
    block_d: int = 0
    num_warps: int = 4
    num_stages: int = 2
    dot_precision: str = "ieee"

    def __post_init__(self) -> None:
        for name in ("block_r", "block_c", "block_d"):
            v = getattr(self, name)
            if (v or name == "block_r") and (v < 16 or v & (v - 1)):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {v}")
        if self.dot_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(
                f"Tiles.dot_precision must be ieee, tf32x3 or tf32, got {self.dot_precision!r}")

    def resolve(self, d: int, pts_dtype: torch.dtype | None) -> tuple[int, int, int, str]:
        """(block_r, block_c, block_d, precision) for feature size d and point dtype
        (``None``: a given cost matrix)."""
        if pts_dtype is None:
            return self.block_r, self.block_c or 64, 16, "ieee"
        half = pts_dtype in (torch.float16, torch.bfloat16)
        prec = self.dot_precision if pts_dtype == torch.float32 else "ieee"
        tensor_core = half or prec != "ieee"
        bc = self.block_c or (32 if tensor_core else 64)
        if self.block_d:
            bd = self.block_d
        elif not tensor_core:
            bd = 16
        else:
            cap = 128 if half else 64
            p2 = max(16, next_pow2(d))
            bd = p2 if p2 <= cap else cap // 2
        return self.block_r, bc, bd, prec


DEFAULT_TILES = Tiles()


def fits_resident(n: int, m: int) -> bool:
    """Whether padded sizes n, m are solved on chip by the resident kernel."""
    return n <= RESIDENT_MAX and m <= RESIDENT_MAX


@dataclass(frozen=True)
class ResidentLaunch:
    """Compile-time tile shape and launch options of one resident-kernel call.

    Attributes:
        BN, BM: tile rows / columns (powers of two ≥ 16: ``tl.dot`` minimum).
        BD: feature-dimension chunk of the fused cost / chain-rule products.
        num_warps: warps per program (≈ 32 tile elements per thread).
        num_stages: software-pipelining depth of the d-loop.
        prec: ``tl.dot`` input precision.
        upcast_dot: feed 16-bit operands to ``tl.dot`` as fp32 (only under the interpreter,
            whose 16-bit dot is wrong in triton 3.6; on the GPU they stay 16-bit).
    """

    BN: int
    BM: int
    BD: int
    num_warps: int
    num_stages: int
    prec: str
    upcast_dot: bool = False


def resident(
    n: int, m: int, d: int, dtype: torch.dtype, form: str = "log", kernel: str = "forward"
) -> ResidentLaunch:
    """Launch settings for padded sizes n, m, feature dim d, input dtype, iteration form and
    kernel (``forward`` | ``backward``).

    Warps are sized so that each thread holds ≈32 elements of a tile (≈16 for the scaling
    form and the backward, which keep two or three tiles live): with fewer, the kernels spill
    (register counts from ``tests/gpu/aot_compile.py``: ptxas for sm_90; not timed on a GPU).
    """
    BN, BM = max(16, next_pow2(n)), max(16, next_pow2(m))
    itemsize = torch.empty((), dtype=dtype).element_size()
    bd_cap = {2: 64, 4: 32, 8: 16}.get(itemsize, 32)
    if kernel == "backward":
        bd_cap = min(bd_cap, 32)
    BD = max(16, min(bd_cap, next_pow2(max(d, 1))))
    per_thread = 16 if (form == "scaling" or kernel == "backward") else 32
    num_warps = min(16, max(4, next_pow2(BN * BM // (32 * per_thread))))
    upcast = itemsize == 2 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return ResidentLaunch(BN, BM, BD, num_warps, 2, dot_precision(dtype), upcast)
