// Portability layer of the CUDA kernels.
//
// Built by nvcc (normal case): maps to CUDA intrinsics, nvcuda::wmma, __half, __nv_bfloat16.
// Built with -DOKC_EMULATE by a host C++ compiler: maps to the CPU emulator of
// csrc/cuda/emu/okc_emu.h (one fiber per thread, real barriers and warp exchanges), which is
// how the kernels are tested on machines without a GPU. Kernel code uses only what is
// defined here: OKC_TID, OKC_BID, okc_sync, okc_shfl_xor, okc_dyn_smem, okc_wmma, math below.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef OKC_EMULATE

#include "emu/okc_emu.h"

#define OKC_DEV inline
#define OKC_HD inline
#define OKC_GLOBAL_KERNEL static void
#define OKC_TID (okc_emu::tid())
#define OKC_BID (okc_emu::bid())
#define OKC_MMA_AVAILABLE 1

namespace okc {
inline void okc_sync() { okc_emu::syncthreads(); }
template <class T>
inline T okc_shfl_xor(T v, int mask) {
    return okc_emu::shfl_xor(v, mask);
}
inline char* okc_dyn_smem() { return okc_emu::dyn_smem(); }
namespace okc_wmma = okc_emu::wmma;
using okc_half = okc_emu::half_t;
using okc_bf16 = okc_emu::bf16_t;
inline float to_float(okc_half v) { return okc_emu::half_to_float(v); }
inline float to_float(okc_bf16 v) { return okc_emu::bf16_to_float(v); }
struct alignas(16) okc_float4 {
    float x, y, z, w;
};
struct alignas(16) okc_double2 {
    double x, y;
};
}  // namespace okc

#else  // CUDA

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define OKC_DEV __device__ __forceinline__
#define OKC_HD __host__ __device__ __forceinline__
#define OKC_GLOBAL_KERNEL __global__ void __launch_bounds__(256)
#define OKC_TID ((int)threadIdx.x)
#define OKC_BID ((int)blockIdx.x)
// wmma tf32 / bf16 need sm_80; the host side only selects the MMA path on such devices.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define OKC_MMA_AVAILABLE 1
#else
#define OKC_MMA_AVAILABLE 0
#endif

namespace okc {
OKC_DEV void okc_sync() { __syncthreads(); }
template <class T>
OKC_DEV T okc_shfl_xor(T v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
}
OKC_DEV char* okc_dyn_smem() {
    extern __shared__ __align__(128) char okc_smem_[];
    return okc_smem_;
}
namespace okc_wmma = nvcuda::wmma;
using okc_half = __half;
using okc_bf16 = __nv_bfloat16;
OKC_DEV float to_float(okc_half v) { return __half2float(v); }
OKC_DEV float to_float(okc_bf16 v) { return __bfloat162float(v); }
using okc_float4 = float4;
using okc_double2 = double2;
}  // namespace okc

#endif

namespace okc {

OKC_DEV float to_float(float v) { return v; }
OKC_DEV double to_float(double v) { return v; }

// Convert an input element (float, double, half, bf16) to the compute type T.
template <class T, class In>
OKC_DEV T load_as(const In* p, int64_t idx) {
    return (T)to_float(p[idx]);
}

OKC_DEV float okc_exp2(float x) { return exp2f(x); }
OKC_DEV double okc_exp2(double x) { return exp2(x); }
OKC_DEV float okc_log2(float x) { return log2f(x); }
OKC_DEV double okc_log2(double x) { return log2(x); }
OKC_DEV float okc_log(float x) { return logf(x); }
OKC_DEV double okc_log(double x) { return log(x); }
OKC_DEV float okc_sqrt(float x) { return sqrtf(x); }
OKC_DEV double okc_sqrt(double x) { return sqrt(x); }
OKC_DEV float okc_abs(float x) { return fabsf(x); }
OKC_DEV double okc_abs(double x) { return fabs(x); }

template <class T>
OKC_DEV T okc_max(T a, T b) {
    return a > b ? a : b;
}
template <class T>
OKC_DEV T okc_min(T a, T b) {
    return a < b ? a : b;
}

template <class T>
struct Lim;
template <>
struct Lim<float> {
    OKC_DEV static float ninf() { return -INFINITY; }
    // largest base-2 exponent we ever exponentiate (keeps every exp2 finite)
    OKC_DEV static float max_exp2() { return 120.0f; }
};
template <>
struct Lim<double> {
    OKC_DEV static double ninf() { return -INFINITY; }
    OKC_DEV static double max_exp2() { return 1000.0; }
};

}  // namespace okc
