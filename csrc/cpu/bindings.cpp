// pybind11 module optical_kernels._cpu_<isa>: one Params struct per call (okc_cpu_params.h; raw
// data pointers from tensor.data_ptr(), sizes, element strides), results written into
// caller-allocated buffers. The struct is checked once here (check_params), then converted to
// the typed FwdArgs / BwdArgs of common.h. No torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>

#include "common.h"
#include "okc_cpu_params.h"

namespace okc {
template <class T>
void forward_impl(const FwdArgs& A);
template <class T>
void backward_impl(const BwdArgs& A);
bool cost_forward_run(const CostParams& p);
void cost_backward_run(const CostParams& p);
bool cost_gemm_selftest(int64_t gemm, int dtype);
}  // namespace okc

namespace py = pybind11;
using okc::CostParams;
using okc::CpuParams;

namespace {

template <class P>
P* ptr(int64_t p) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(p));
}

// Every precondition of the kernels, checked once at the boundary (the kernels assume them).
void check_params(const CpuParams& p, bool backward) {
  auto bad = [&](const std::string& s) {
    throw std::invalid_argument(std::string("optical_kernels._cpu.") +
                                (backward ? "backward" : "forward") + ": " + s);
  };
  if (p.dtype != okc::kF32 && p.dtype != okc::kF64) bad("dtype must be DType.F32 or DType.F64");
  if (p.B < 0 || p.n < 0 || p.m < 0) bad("negative size");
  if (!(p.eps > 0)) bad("eps must be > 0");
  if (p.eps_len < 0 || (p.eps_len > 0 && !p.eps_t)) bad("eps_t must hold eps_len >= 0 entries");
  if (p.num_threads < 1) bad("num_threads must be >= 1");
  if (p.par_min < 1) bad("par_min must be >= 1 (backends/cpu.py PAR_MIN)");
  if ((p.hist_f != 0) != (p.hist_g != 0)) bad("hist_f and hist_g must be given together");
  if (p.hist_T < 0) bad("hist_T must be >= 0");
  const bool work = p.B > 0 && p.n > 0 && p.m > 0;
  if (work && (!p.C || !p.a || !p.b)) bad("null C / a / b pointer");
  if (work && (!p.f || !p.g || !p.n_iters)) bad("null f / g / n_iters pointer");
  if (!backward) {
    if (p.max_iter < 1) bad("max_iter must be >= 1");
    if (p.check_every < 1) bad("check_every must be >= 1");
    if (!(p.tol >= 0)) bad("tol must be >= 0");
    if (work && (!p.value || !p.value_linear || !p.err)) bad("null value / value_linear / err");
    if (p.hist_f && p.hist_T < p.max_iter) bad("hist_T must be >= max_iter");
    return;
  }
  if (p.mode < okc::kEnvelope || p.mode > okc::kUnrolled) bad("unknown gradient mode");
  if (p.cg_max_iter < 1) bad("cg_max_iter must be >= 1 (resolved by SolverConfig.cg_limits)");
  if (!(p.cg_tol > 0)) bad("cg_tol must be > 0 (resolved by SolverConfig.cg_limits)");
  if (p.direct_max < 0) bad("direct_max must be >= 0 (backends/cpu.py DIRECT_MAX)");
  if (work && (!p.grad_value || !p.grad_value_linear || !p.dC)) bad("null gradient pointer");
}

void forward(const CpuParams& p) {
  check_params(p, false);
  okc::FwdArgs A;
  A.B = p.B, A.n = p.n, A.m = p.m;
  A.C = ptr<const void>(p.C), A.sCb = p.sC[0], A.sCn = p.sC[1], A.sCm = p.sC[2];
  A.a = ptr<const void>(p.a), A.sab = p.sa[0], A.san = p.sa[1];
  A.b = ptr<const void>(p.b), A.sbb = p.sb[0], A.sbm = p.sb[1];
  A.eps = p.eps, A.rho = p.rho, A.eps_t = ptr<const double>(p.eps_t), A.eps_len = p.eps_len;
  A.max_iter = p.max_iter, A.tol = p.tol, A.check_every = p.check_every;
  A.f = ptr<void>(p.f), A.g = ptr<void>(p.g), A.value = ptr<void>(p.value);
  A.value_linear = ptr<void>(p.value_linear), A.n_iters = ptr<int32_t>(p.n_iters);
  A.err = ptr<void>(p.err), A.hist_f = p.hist_f ? ptr<void>(p.hist_f) : nullptr;
  A.hist_g = p.hist_g ? ptr<void>(p.hist_g) : nullptr;
  A.num_threads = p.num_threads, A.tau = p.tau, A.log_only = p.log_only, A.par_min = p.par_min;
  A.fixed_point_exit = p.fixed_point_exit;
  A.iters_run = p.iters_run ? ptr<int32_t>(p.iters_run) : nullptr;
  if (p.B == 0 || p.n == 0 || p.m == 0) return;
  py::gil_scoped_release release;
  if (p.dtype == okc::kF32)
    okc::forward_impl<float>(A);
  else
    okc::forward_impl<double>(A);
}

void backward(const CpuParams& p) {
  check_params(p, true);
  okc::BwdArgs A;
  A.B = p.B, A.n = p.n, A.m = p.m;
  A.C = ptr<const void>(p.C), A.sCb = p.sC[0], A.sCn = p.sC[1], A.sCm = p.sC[2];
  A.a = ptr<const void>(p.a), A.sab = p.sa[0], A.san = p.sa[1];
  A.b = ptr<const void>(p.b), A.sbb = p.sb[0], A.sbm = p.sb[1];
  A.f = ptr<const void>(p.f), A.g = ptr<const void>(p.g);
  A.n_iters = ptr<const int32_t>(p.n_iters);
  A.hist_f = p.hist_f ? ptr<const void>(p.hist_f) : nullptr;
  A.hist_g = p.hist_g ? ptr<const void>(p.hist_g) : nullptr;
  A.hist_T = p.hist_f ? p.hist_T : 0;
  A.eps = p.eps, A.rho = p.rho, A.eps_t = ptr<const double>(p.eps_t), A.eps_len = p.eps_len;
  A.gv = ptr<const void>(p.grad_value), A.gl = ptr<const void>(p.grad_value_linear);
  A.dC = ptr<void>(p.dC);
  A.mode = p.mode, A.cg_max_iter = p.cg_max_iter, A.cg_tol = p.cg_tol;
  A.direct_max = p.direct_max;
  A.num_threads = p.num_threads, A.par_min = p.par_min, A.log_only = p.log_only;
  if (p.B == 0 || p.n == 0 || p.m == 0) return;
  py::gil_scoped_release release;
  if (p.dtype == okc::kF32)
    okc::backward_impl<float>(A);
  else
    okc::backward_impl<double>(A);
}

void check_cost_params(const CostParams& p, bool backward) {
  auto bad = [&](const std::string& s) {
    throw std::invalid_argument(std::string("optical_kernels._cpu.cost_") +
                                (backward ? "backward" : "forward") + ": " + s);
  };
  if (p.dtype != okc::kF32 && p.dtype != okc::kF64) bad("dtype must be DType.F32 or DType.F64");
  if (p.cost != okc::kCosine && p.cost != okc::kDot) bad("cost must be Cost.COSINE or Cost.DOT");
  if (p.B < 0 || p.n < 0 || p.m < 0 || p.d < 0) bad("negative size");
  if (p.num_threads < 1) bad("num_threads must be >= 1");
  if (!(p.norm_floor >= 0)) bad("norm_floor must be >= 0");
  if (p.B == 0 || p.n == 0 || p.m == 0) return;
  if ((p.d > 0 && (!p.x || !p.y)) || !p.C) bad("null x / y / C pointer");
  if (p.cost == okc::kCosine && (!p.x_scale || !p.y_scale)) bad("cosine needs x_scale, y_scale");
  if (backward && !p.G) bad("null G pointer");
}

// C [B, n, m] (and the inverse norms) into the caller's buffers; False when C had a
// non-finite entry before masking (the caller names the argument).
bool cost_forward(const CostParams& p) {
  check_cost_params(p, false);
  if (p.B == 0 || p.n == 0 || p.m == 0) return true;
  py::gil_scoped_release release;
  return okc::cost_forward_run(p);
}

void cost_backward(const CostParams& p) {
  check_cost_params(p, true);
  if (p.B == 0 || p.n == 0 || p.m == 0 || (!p.dx && !p.dy)) return;
  py::gil_scoped_release release;
  okc::cost_backward_run(p);
}

template <size_t N>
py::tuple to_tuple(const int64_t (&a)[N]) {
  py::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = a[i];
  return t;
}

template <size_t N>
void from_array(int64_t (&dst)[N], const std::array<int64_t, N>& src) {
  for (size_t i = 0; i < N; ++i) dst[i] = src[i];
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
  py::class_<CpuParams>(mod, "Params", py::module_local(),
                        "One call: raw pointers (int), sizes, strides, resolved solver config.")
      .def(py::init<>())
      .def_readwrite("B", &CpuParams::B)
      .def_readwrite("n", &CpuParams::n)
      .def_readwrite("m", &CpuParams::m)
      .def_readwrite("dtype", &CpuParams::dtype)
      .def_readwrite("C", &CpuParams::C)
      .def_property(
          "sC", [](const CpuParams& p) { return to_tuple(p.sC); },
          [](CpuParams& p, std::array<int64_t, 3> s) { from_array(p.sC, s); })
      .def_readwrite("a", &CpuParams::a)
      .def_property(
          "sa", [](const CpuParams& p) { return to_tuple(p.sa); },
          [](CpuParams& p, std::array<int64_t, 2> s) { from_array(p.sa, s); })
      .def_readwrite("b", &CpuParams::b)
      .def_property(
          "sb", [](const CpuParams& p) { return to_tuple(p.sb); },
          [](CpuParams& p, std::array<int64_t, 2> s) { from_array(p.sb, s); })
      .def_readwrite("eps", &CpuParams::eps)
      .def_readwrite("rho", &CpuParams::rho)
      .def_readwrite("max_iter", &CpuParams::max_iter)
      .def_readwrite("tol", &CpuParams::tol)
      .def_readwrite("check_every", &CpuParams::check_every)
      .def_readwrite("eps_t", &CpuParams::eps_t)
      .def_readwrite("eps_len", &CpuParams::eps_len)
      .def_readwrite("cg_max_iter", &CpuParams::cg_max_iter)
      .def_readwrite("cg_tol", &CpuParams::cg_tol)
      .def_readwrite("f", &CpuParams::f)
      .def_readwrite("g", &CpuParams::g)
      .def_readwrite("value", &CpuParams::value)
      .def_readwrite("value_linear", &CpuParams::value_linear)
      .def_readwrite("n_iters", &CpuParams::n_iters)
      .def_readwrite("err", &CpuParams::err)
      .def_readwrite("hist_f", &CpuParams::hist_f)
      .def_readwrite("hist_g", &CpuParams::hist_g)
      .def_readwrite("hist_T", &CpuParams::hist_T)
      .def_readwrite("mode", &CpuParams::mode)
      .def_readwrite("grad_value", &CpuParams::grad_value)
      .def_readwrite("grad_value_linear", &CpuParams::grad_value_linear)
      .def_readwrite("dC", &CpuParams::dC)
      .def_readwrite("num_threads", &CpuParams::num_threads)
      .def_readwrite("tau", &CpuParams::tau)
      .def_readwrite("log_only", &CpuParams::log_only)
      .def_readwrite("fixed_point_exit", &CpuParams::fixed_point_exit)
      .def_readwrite("iters_run", &CpuParams::iters_run)
      .def_readwrite("par_min", &CpuParams::par_min)
      .def_readwrite("direct_max", &CpuParams::direct_max);
  mod.def("forward", &forward, py::arg("params"),
          "Batched Sinkhorn forward (scaling form with absorption) into the caller's buffers.");
  mod.def("backward", &backward, py::arg("params"),
          "Batched Sinkhorn backward (dC) into the caller's buffer.");
  py::class_<CostParams>(mod, "CostParams", py::module_local(),
                         "One point-cost call (cost.cpp, forward or backward): raw pointers (int), sizes.")
      .def(py::init<>())
      .def_readwrite("B", &CostParams::B)
      .def_readwrite("n", &CostParams::n)
      .def_readwrite("m", &CostParams::m)
      .def_readwrite("d", &CostParams::d)
      .def_readwrite("dtype", &CostParams::dtype)
      .def_readwrite("cost", &CostParams::cost)
      .def_readwrite("x", &CostParams::x)
      .def_readwrite("y", &CostParams::y)
      .def_readwrite("x_valid", &CostParams::x_valid)
      .def_readwrite("y_valid", &CostParams::y_valid)
      .def_readwrite("C", &CostParams::C)
      .def_readwrite("x_scale", &CostParams::x_scale)
      .def_readwrite("y_scale", &CostParams::y_scale)
      .def_readwrite("G", &CostParams::G)
      .def_readwrite("dx", &CostParams::dx)
      .def_readwrite("dy", &CostParams::dy)
      .def_readwrite("gemm", &CostParams::gemm)
      .def_readwrite("norm_floor", &CostParams::norm_floor)
      .def_readwrite("num_threads", &CostParams::num_threads);
  mod.def("cost_forward", &cost_forward, py::arg("params"),
          "Point cost C [B, n, m] (cosine or dot) into the caller's buffers; False if C had a "
          "non-finite entry.");
  mod.def("cost_backward", &cost_backward, py::arg("params"),
          "Chain rule of cost_forward: dx, dy from G = dL/dC into the caller's buffers.");
  mod.def("cost_gemm_selftest", &okc::cost_gemm_selftest, py::arg("gemm"), py::arg("dtype"),
          "Whether the BLAS ?gemm_ at this address agrees with the built-in GEMM.");
  mod.def("build_info", &build_info, "Compiler options the module was built with.");
  mod.attr("ISA") = OKC_ISA;
  mod.attr("SIMD_BYTES") = okc::kVecBytes;
  py::dict constants;  // csrc/common/okc_constants.h, checked against optical_kernels.constants
  okc::okc_for_each_constant([&](const char* name, int v) { constants[name] = v; });
  mod.attr("CONSTANTS") = constants;
}
