// Plain C++ description of one call of the CPU backend, bound with pybind11 as
// optical_kernels._cpu_<isa>.Params (the counterpart of csrc/cuda/okc_params.h). Pointers are raw
// host addresses (int64, from torch's data_ptr()); strides are in elements. backends/cpu.py
// fills one per call; bindings.cpp checks it once (check_params) and hands the kernels the
// typed FwdArgs / BwdArgs of common.h.
#pragma once

#include <cstdint>

#include "../common/okc_constants.h"

namespace okc {

struct CpuParams {
  // ---- problem ------------------------------------------------------------------------
  int B = 0, n = 0, m = 0;
  int dtype = kF32;                    // kF32 or kF64: C, a, b and every output
  int64_t C = 0;                       // [B, n, m], strides sC
  int64_t sC[3] = {0, 0, 0};
  int64_t a = 0;                       // [B, n], strides sa
  int64_t sa[2] = {0, 0};
  int64_t b = 0;                       // [B, m], strides sb
  int64_t sb[2] = {0, 0};

  // ---- solver configuration (SolverConfig, resolved by Python) -------------------------
  double eps = 0.05;
  double rho = -1.0;                   // <= 0: balanced
  int max_iter = 100;
  double tol = 0.0;
  int check_every = 10;
  int64_t eps_t = 0;                   // [eps_len] float64 ε_t for t = 1..eps_len, or 0
  int eps_len = 0;                     // ε_t = eps for t > eps_len
  int cg_max_iter = 0;                 // backward, implicit: CG cap (>= 1, resolved)
  double cg_tol = 0.0;                 // backward, implicit: CG relative residual (> 0)

  // ---- forward outputs / backward inputs (contiguous) ----------------------------------
  int64_t f = 0, g = 0;                // [B, n], [B, m]
  int64_t value = 0, value_linear = 0; // [B] (forward)
  int64_t n_iters = 0;                 // [B] int32
  int64_t err = 0;                     // [B] (forward)
  int64_t hist_f = 0, hist_g = 0;      // [hist_T, B, n], [hist_T, B, m] (unrolled) or 0
  int hist_T = 0;                      // forward: max_iter rows when hist_f is set

  // ---- backward ------------------------------------------------------------------------
  int mode = kEnvelope;
  int64_t grad_value = 0, grad_value_linear = 0;  // [B]
  int64_t dC = 0;                      // [B, n, m] output, zero-filled by the caller

  // ---- execution -----------------------------------------------------------------------
  int num_threads = 1;
  double tau = 0.0;                    // absorption threshold on |log u|; 0: dtype default
  int log_only = 0;                    // 1: plain log-domain iterations / reverse pass
  int fixed_point_exit = 1;            // forward: end the loop at an exact fixed point
  int64_t iters_run = 0;               // forward, optional [B] int32: iterations computed
  int64_t par_min = 0;                 // >= 1: problems with n·m >= this use inner parallelism
  int direct_max = -1;                 // >= 0: implicit, dense Schur solve when min(n, m) <= this
                                       // (both set by backends/cpu.py: PAR_MIN, DIRECT_MAX)
};

}  // namespace okc

namespace okc {

// One call of the fused point cost (cost.cpp), forward or backward, bound as
// optical_kernels._cpu_<isa>.CostParams and filled by backends/cpu_cost.py. Every tensor is
// contiguous in `dtype` (masks: bool); pointers are raw host addresses, 0 = absent.
struct CostParams {
  int B = 0, n = 0, m = 0, d = 0;
  int dtype = kF32;                    // kF32 or kF64
  int cost = kCosine;                  // kCosine or kDot
  int64_t x = 0, y = 0;                // [B, n, d], [B, m, d]
  int64_t x_valid = 0, y_valid = 0;    // [B, n], [B, m] bool, or 0: every point valid
  int64_t C = 0;                       // [B, n, m]: forward output, backward input
  int64_t x_scale = 0, y_scale = 0;    // cosine: [B, n], [B, m] inverse norms (fwd out, bwd in)
  int64_t G = 0;                       // backward: [B, n, m] ∂L/∂C
  int64_t dx = 0, dy = 0;              // backward out [B, n, d], [B, m, d]; 0: not wanted
  int64_t gemm = 0;                    // address of BLAS sgemm_/dgemm_ for dtype; 0: built-in
  double norm_floor = 1e-8;            // cosine: ‖p‖ below this has no direction (costs.py)
  int num_threads = 1;
};

}  // namespace okc
