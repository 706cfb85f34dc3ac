// Codes shared by the Python layer and every kernel: the one C++ mirror of
// optical_kernels/constants.py (docs/design.md §5, "Solver constants"). Included by csrc/cpu and
// csrc/cuda (host and device code); tests/test_constants.py parses the enums below and checks
// them against the Python IntEnums and against the CONSTANTS dict each compiled module exports
// (built from okc_for_each_constant). No other file defines these values.
#pragma once

namespace okc {

// Ground cost (Python: constants.Cost). kGiven: C is a materialised [B, n, m] matrix; the
// others are fused from points x, y.
enum Cost : int { kGiven = 0, kCosine = 1, kSqEuclidean = 2, kDot = 3 };

// Gradient mode of the backward (Python: constants.GradMode).
enum GradMode : int { kEnvelope = 0, kImplicit = 1, kUnrolled = 2 };

// Element types of the CUDA launch description (Python: constants.DType).
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// Largest n and m of the CUDA resident kernels (Python: constants.CUDA_MAX_SIZE).
constexpr int kCudaMaxSize = 256;

// Calls f("Enum.MEMBER" or "NAME", value) for every constant above (the modules' CONSTANTS).
template <class F>
inline void okc_for_each_constant(F&& f) {
  f("Cost.GIVEN", kGiven);
  f("Cost.COSINE", kCosine);
  f("Cost.SQEUCLIDEAN", kSqEuclidean);
  f("Cost.DOT", kDot);
  f("GradMode.ENVELOPE", kEnvelope);
  f("GradMode.IMPLICIT", kImplicit);
  f("GradMode.UNROLLED", kUnrolled);
  f("DType.F32", kF32);
  f("DType.F64", kF64);
  f("DType.F16", kF16);
  f("DType.BF16", kBF16);
  f("CUDA_MAX_SIZE", kCudaMaxSize);
}

}  // namespace okc
