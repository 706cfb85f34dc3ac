// Plain C++ description of one launch of the CUDA backend (shared by bindings.cpp and the .cu
// launchers). Pointers are raw device addresses (int64, from torch's data_ptr()); strides are in
// elements. No CUDA or torch headers here: the pybind11 side fills this struct.
#pragma once

#include <cstdint>

#include "../common/okc_constants.h"  // Cost, GradMode, DType codes (one source)

namespace okc {

// Hard size limit of the resident kernels (one block per problem, rows held by warps).
constexpr int kMaxSize = kCudaMaxSize;

struct Params {
    // ---- problem -----------------------------------------------------------------------
    int B = 0, n = 0, m = 0, d = 0;
    int dtype = kF32;     // compute dtype of a, b and of every output: kF32 or kF64
    int in_dtype = kF32;  // element dtype of C (== dtype) or of x, y (any)
    int cost = kGiven;    // kGiven: C given; else fused cost from x, y

    // ---- inputs ------------------------------------------------------------------------
    int64_t C = 0;  // [B, n, m], strides sC
    int64_t sC[3] = {0, 0, 0};
    int64_t x = 0;  // [B, n, d], strides sx
    int64_t sx[3] = {0, 0, 0};
    int64_t y = 0;  // [B, m, d], strides sy
    int64_t sy[3] = {0, 0, 0};
    int64_t a = 0, b = 0;  // [B, n], [B, m] contiguous, dtype

    // ---- solver configuration (SolverConfig) -------------------------------------------
    double eps = 0.05;
    double rho = 0.0;  // <= 0: balanced
    int max_iter = 100;
    double tol = 1e-4;
    int check_every = 10;
    int has_sched = 0;
    double sched_start = 0.0, sched_factor = 1.0;
    int sched_t_eps = 1;  // ε_t = eps for t >= this (SolverConfig.schedule.t_eps)

    // ---- forward outputs (contiguous) / backward inputs --------------------------------
    int64_t f = 0, g = 0;                 // [B, n], [B, m]
    int64_t value = 0, value_linear = 0;  // [B] (forward only)
    int64_t n_iters = 0;                  // [B] int32
    int64_t err = 0;                      // [B] (forward only)
    int64_t hist_f = 0, hist_g = 0;       // [hist_T, B, n], [hist_T, B, m] (unrolled) or 0
    int hist_T = 0;                       // rows of the history (>= n_iters)

    // ---- backward ----------------------------------------------------------------------
    int mode = kEnvelope;
    int64_t grad_value = 0, grad_value_linear = 0;  // [B], dtype
    int cg_max_iter = 0;                            // >= 1, SolverConfig.cg_limits
    double cg_tol = 0.0;                            // > 0, SolverConfig.cg_limits
    int64_t G = 0;                                  // [B, n, m] output (matrix backward)
    int64_t dx = 0, dy = 0;                         // [B, n, d], [B, m, d] outputs (dtype)
    int need_dy = 0;

    // ---- launch ------------------------------------------------------------------------
    int use_mma = 1;  // tensor-core products where the device and dtype allow them
    int64_t workspace = 0;        // device scratch of workspace_bytes(...) bytes, or 0
    int64_t workspace_bytes = 0;  // its size (checked)
    int64_t stream = 0;           // cudaStream_t as an integer
    int device = 0;
    int64_t smem_limit = -1;      // shared memory per block to plan for; -1: the device's
};

// Shared-memory / workspace layout of one launch. Computed on the host (make_plan) and
// passed to the kernel by value, so host and device agree by construction.
struct Plan {
    int NP = 0, MP = 0;  // n, m rounded up to 16
    int pitch = 0;       // row pitch (elements) of the n x m tiles
    int c_smem = 1;      // cost tile in shared memory (else global workspace)
    int w_smem = 1;      // backward work tile in shared memory (else workspace / G output)
    int w_is_G = 0;      // backward work tile is the G output itself (matrix backward)
    int KC = 32;         // k-chunk of the staged cost GEMM
    int DC = 32;         // column chunk of the chain-rule GEMM (backward of x, y)
    int mma = 0;         // tensor-core path selected
    int64_t off_vec = 0, off_c = 0, off_w = 0, off_aux = 0;  // shared-memory offsets
    int64_t smem_bytes = 0;
    int64_t ws_stride = 0;  // workspace bytes per problem
    int64_t ws_off_c = 0, ws_off_w = 0;
    int64_t ws_bytes = 0;  // total workspace bytes (B * ws_stride)
};

// Host-side entry points (implemented in the .cu files; return "" on success, else a message).
Plan make_plan(const Params& p, bool backward, int64_t smem_limit);
const char* launch_forward(const Params& p, const Plan& plan);
const char* launch_backward(const Params& p, const Plan& plan);

}  // namespace okc
