"""Compile the resident Triton kernels ahead of time for sm_90 (H100), without a GPU.

Triton's own compiler and ``ptxas`` (shipped in the triton wheel) turn each kernel variant
into a cubin; ``cuobjdump`` then reports registers and spill stack per thread. This catches
compile-mode-only errors (the interpreter is more lenient) and register spills, on any
machine. Run with the interpreter *off*::

    python tests/gpu/aot_compile.py [--quick] [--json out.json]

Prints one line per variant and exits non-zero if a variant fails to compile.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_compile.py needs TRITON_INTERPRET unset (it compiles real kernels)")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import optical_kernels.backends.triton  # noqa: E402,F401  (registers the submodules)
from optical_kernels.backends.triton import launch  # noqa: E402
from optical_kernels.backends.triton import resident as RES  # noqa: E402
from optical_kernels.constants import cost_code, grad_code  # noqa: E402

# the package attribute `backward` is the contract function; the module lives in sys.modules
BW = sys.modules["optical_kernels.backends.triton.backward"]

_FLOATS = {"eps_hi", "eps_lo", "rho_hi", "rho_lo", "st_hi", "st_lo", "lf_hi", "lf_lo",
           "tol_hi", "tol_lo", "absorb2", "cg_tol"}
_DT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
       torch.float16: "fp16"}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _signature(kernel, ptrs: dict[str, str], consts: dict) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _usage(cubin: bytes, tag: str) -> dict[str, int]:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ok_aot_{os.getpid()}_{tag}.cubin"
    path.write_bytes(cubin)
    try:
        txt = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=False).stdout
    finally:
        path.unlink(missing_ok=True)
    m = re.search(r"REG:(\d+) STACK:(\d+)", txt)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def compile_variant(kind: str, cost: str, dtype: torch.dtype, n: int, form: str = "log",
                    mode: str = "envelope", balanced: bool = True, hist: bool = False,
                    need_dy: bool = False, d: int = 768) -> dict:
    """Compile one variant for sm_90; returns its launch settings, time, regs and stack."""
    acc = RES.acc_dtype(dtype)
    in_dt = "fp32" if cost == "given" else _DT[dtype]
    a_dt = _DT[acc]
    ls = launch.resident(n, n, d, dtype, form=form, kernel=kind)
    ptrs = {"x_ptr": "*" + in_dt, "y_ptr": "*" + in_dt, "nit_ptr": "*i32",
            "C_ptr": "*" + a_dt, "dx_ptr": "*" + in_dt, "dy_ptr": "*" + in_dt}
    for p in ("a_ptr", "b_ptr", "f_ptr", "g_ptr", "val_ptr", "vlin_ptr", "err_ptr", "hf_ptr",
              "hg_ptr", "gv_ptr", "gl_ptr", "G_ptr"):
        ptrs[p] = "*" + a_dt
    common = dict(COST=cost_code(cost), BALANCED=balanced, ACC=RES._TL[acc], BN=ls.BN,
                  BM=ls.BM, BD=ls.BD, PREC=ls.prec, UPCAST=False)
    if kind == "forward":
        kernel = RES.resident_forward_kernel
        consts = dict(common, SCALING=form == "scaling", STORE_HIST=hist, CHECK=True)
    else:
        kernel = BW.resident_backward_kernel
        consts = dict(common, MODE=grad_code(mode), NEED_DY=need_dy,
                      TINY=torch.finfo(acc).tiny, LOWP=False)
    src = ASTSource(fn=kernel, signature=_signature(kernel, ptrs, consts), constexprs=consts)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": ls.num_warps, "num_stages": ls.num_stages})
    tag = f"{kind}_{cost}_{_DT[dtype]}_{n}_{form}_{mode}"
    return {"variant": tag, "num_warps": ls.num_warps, "BN": ls.BN, "BD": ls.BD,
            "compile_s": round(time.time() - t0, 2), **_usage(ck.asm["cubin"], tag)}


QUICK = [
    dict(kind="forward", cost="cosine", dtype=torch.float32, n=64),
    dict(kind="backward", cost="cosine", dtype=torch.float32, n=64, mode="implicit"),
]
FULL = QUICK + [
    dict(kind="forward", cost="cosine", dtype=torch.bfloat16, n=64),
    dict(kind="forward", cost="cosine", dtype=torch.float32, n=64, form="scaling"),
    dict(kind="forward", cost="given", dtype=torch.float32, n=128),
    dict(kind="forward", cost="sqeuclidean", dtype=torch.float32, n=128, form="scaling"),
    dict(kind="forward", cost="dot", dtype=torch.float64, n=32, balanced=False, hist=True),
    dict(kind="forward", cost="cosine", dtype=torch.float32, n=128, balanced=False,
         hist=True),
    dict(kind="backward", cost="cosine", dtype=torch.bfloat16, n=64, mode="implicit"),
    dict(kind="backward", cost="cosine", dtype=torch.float32, n=128, mode="envelope"),
    dict(kind="backward", cost="sqeuclidean", dtype=torch.float32, n=64, mode="unrolled",
         need_dy=True),
    dict(kind="backward", cost="given", dtype=torch.float64, n=32, mode="implicit",
         balanced=False),
    dict(kind="backward", cost="cosine", dtype=torch.float32, n=128, mode="implicit",
         need_dy=True),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two variants only")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    results, failed = [], 0
    for spec in QUICK if args.quick else FULL:
        try:
            res = compile_variant(**spec)
        except Exception as exc:  # report and continue
            failed += 1
            res = {"variant": str(spec), "error": f"{type(exc).__name__}: {exc}"[:2000]}
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
