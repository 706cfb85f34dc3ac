// pybind11 module optical_kernels._cpu: raw data pointers (tensor.data_ptr()), sizes and
// element strides in, results written into caller-allocated buffers. No torch headers.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace okc {
template <class T>
void forward_impl(const FwdArgs& A);
template <class T>
void backward_impl(const BwdArgs& A);
}  // namespace okc

namespace py = pybind11;

namespace {

template <class P>
P* ptr(int64_t p) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(p));
}

void check_dtype(const std::string& dtype) {
  if (dtype != "float32" && dtype != "float64")
    throw std::invalid_argument("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

void forward(const std::string& dtype, int B, int n, int m, int64_t C, int64_t sCb, int64_t sCn,
             int64_t sCm, int64_t a, int64_t sab, int64_t san, int64_t b, int64_t sbb,
             int64_t sbm, double eps, double rho, int64_t eps_t, int eps_len, int max_iter, double tol,
             int check_every, int64_t f, int64_t g, int64_t value, int64_t value_linear,
             int64_t n_iters, int64_t err, int64_t hist_f, int64_t hist_g, int num_threads, double tau,
             int log_only, int64_t par_min) {
  check_dtype(dtype);
  if (B < 0 || n < 0 || m < 0 || max_iter < 1 || check_every < 1 || !(eps > 0))
    throw std::invalid_argument("_cpu.forward: bad sizes or options");
  okc::FwdArgs A;
  A.B = B, A.n = n, A.m = m;
  A.C = ptr<const void>(C), A.sCb = sCb, A.sCn = sCn, A.sCm = sCm;
  A.a = ptr<const void>(a), A.sab = sab, A.san = san;
  A.b = ptr<const void>(b), A.sbb = sbb, A.sbm = sbm;
  A.eps = eps, A.rho = rho, A.eps_t = ptr<const double>(eps_t), A.eps_len = eps_len;
  A.max_iter = max_iter, A.tol = tol, A.check_every = check_every;
  A.f = ptr<void>(f), A.g = ptr<void>(g), A.value = ptr<void>(value);
  A.value_linear = ptr<void>(value_linear), A.n_iters = ptr<int32_t>(n_iters);
  A.err = ptr<void>(err), A.hist_f = hist_f ? ptr<void>(hist_f) : nullptr;
  A.hist_g = hist_g ? ptr<void>(hist_g) : nullptr;
  A.num_threads = num_threads, A.tau = tau, A.log_only = log_only, A.par_min = par_min;
  if (B == 0) return;
  py::gil_scoped_release release;
  if (dtype == "float32")
    okc::forward_impl<float>(A);
  else
    okc::forward_impl<double>(A);
}

void backward(const std::string& dtype, int mode, int B, int n, int m, int64_t C, int64_t sCb,
              int64_t sCn, int64_t sCm, int64_t a, int64_t sab, int64_t san, int64_t b,
              int64_t sbb, int64_t sbm, int64_t f, int64_t g, int64_t n_iters, int64_t hist_f,
              int64_t hist_g, int hist_T, double eps, double rho, int64_t eps_t, int eps_len, int64_t gv, int64_t gl,
              int64_t dC, int cg_max_iter, double cg_tol, int direct_max, int num_threads,
              int64_t par_min, int log_only) {
  check_dtype(dtype);
  if (mode < 0 || mode > 2) throw std::invalid_argument("_cpu.backward: mode must be 0, 1 or 2");
  if (B < 0 || n < 0 || m < 0 || !(eps > 0))
    throw std::invalid_argument("_cpu.backward: bad sizes or options");
  okc::BwdArgs A;
  A.B = B, A.n = n, A.m = m;
  A.C = ptr<const void>(C), A.sCb = sCb, A.sCn = sCn, A.sCm = sCm;
  A.a = ptr<const void>(a), A.sab = sab, A.san = san;
  A.b = ptr<const void>(b), A.sbb = sbb, A.sbm = sbm;
  A.f = ptr<const void>(f), A.g = ptr<const void>(g), A.n_iters = ptr<const int32_t>(n_iters);
  A.hist_f = hist_f ? ptr<const void>(hist_f) : nullptr;
  A.hist_g = hist_g ? ptr<const void>(hist_g) : nullptr, A.hist_T = hist_T;
  A.eps = eps, A.rho = rho, A.eps_t = ptr<const double>(eps_t), A.eps_len = eps_len;
  A.gv = ptr<const void>(gv), A.gl = ptr<const void>(gl), A.dC = ptr<void>(dC);
  A.mode = mode, A.cg_max_iter = cg_max_iter, A.cg_tol = cg_tol, A.direct_max = direct_max;
  A.num_threads = num_threads, A.par_min = par_min, A.log_only = log_only;
  if (B == 0) return;
  py::gil_scoped_release release;
  if (dtype == "float32")
    okc::backward_impl<float>(A);
  else
    okc::backward_impl<double>(A);
}

std::string build_info() {
  std::string s = std::string("variant=") + OKC_ISA + " ";
#ifdef _OPENMP
  s += "openmp=" + std::to_string(_OPENMP);
#else
  s += "openmp=off";
#endif
#if defined(__AVX512F__)
  s += " simd=avx512";
#elif defined(__AVX2__)
  s += " simd=avx2";
#elif defined(__SSE2__)
  s += " simd=sse2";
#elif defined(__ARM_NEON)
  s += " simd=neon";
#else
  s += " simd=generic";
#endif
  s += " max_threads=" + std::to_string(okc::max_threads());
  return s;
}

}  // namespace

// setup.py builds these sources once per ISA variant (optical_kernels._cpu_base, _cpu_avx2,
// _cpu_avx512, ...): OKC_MODULE names the module, OKC_ISA the variant.
#ifndef OKC_MODULE
#define OKC_MODULE _cpu
#endif
#ifndef OKC_ISA
#define OKC_ISA "unnamed"
#endif

PYBIND11_MODULE(OKC_MODULE, mod) {
  mod.doc() = "optical_kernels fused CPU Sinkhorn kernels (raw pointers; see optical_kernels/backends/cpu.py)";
  mod.def("forward", &forward,
          "Batched Sinkhorn forward (scaling form with absorption) into caller buffers.",
          py::arg("dtype"), py::arg("B"), py::arg("n"), py::arg("m"), py::arg("C"),
          py::arg("sCb"), py::arg("sCn"), py::arg("sCm"), py::arg("a"), py::arg("sab"),
          py::arg("san"), py::arg("b"), py::arg("sbb"), py::arg("sbm"), py::arg("eps"),
          py::arg("rho"), py::arg("eps_t"), py::arg("eps_len"), py::arg("max_iter"), py::arg("tol"),
          py::arg("check_every"), py::arg("f"), py::arg("g"), py::arg("value"),
          py::arg("value_linear"), py::arg("n_iters"), py::arg("err"), py::arg("hist_f"), py::arg("hist_g"),
          py::arg("num_threads"), py::arg("tau") = 0.0, py::arg("log_only") = 0,
          py::arg("par_min") = 1 << 18);
  mod.def("backward", &backward, "Batched Sinkhorn backward (dC) into a caller buffer.",
          py::arg("dtype"), py::arg("mode"), py::arg("B"), py::arg("n"), py::arg("m"),
          py::arg("C"), py::arg("sCb"), py::arg("sCn"), py::arg("sCm"), py::arg("a"),
          py::arg("sab"), py::arg("san"), py::arg("b"), py::arg("sbb"), py::arg("sbm"),
          py::arg("f"), py::arg("g"), py::arg("n_iters"), py::arg("hist_f"), py::arg("hist_g"), py::arg("hist_T"),
          py::arg("eps"), py::arg("rho"), py::arg("eps_t"), py::arg("eps_len"), py::arg("gv"), py::arg("gl"),
          py::arg("dC"), py::arg("cg_max_iter") = 0, py::arg("cg_tol") = 0.0,
          py::arg("direct_max") = 384, py::arg("num_threads") = 1,
          py::arg("par_min") = 1 << 18, py::arg("log_only") = 0);
  mod.def("build_info", &build_info, "Compiler options the module was built with.");
  mod.attr("ISA") = OKC_ISA;
  mod.attr("SIMD_BYTES") = okc::kVecBytes;
}
