// pybind11 module optical_kernels._cuda: the CUDA backend's resident kernels, driven from
// Python with raw device pointers (torch data_ptr()), sizes, strides and the current stream.
// No torch C++ headers: the module builds against plain CUDA, and cudart is linked statically.
//
// Importing the module never touches the GPU. Every launching call first checks
// cudaGetDeviceCount and raises RuntimeError with a readable message when no device (or no
// driver) is present.
//
// Built with -DOKC_EMULATE (csrc/cuda/emu/emu_module.cpp) the same bindings become the test
// module optical_kernels._cuda_emu, which runs the kernels on the CPU emulator with host
// pointers (slow; for tests only).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>

#include "okc_params.h"

#ifndef OKC_EMULATE
#include <cuda_runtime_api.h>
#endif

#ifndef OKC_MODULE_NAME
#define OKC_MODULE_NAME _cuda
#endif

namespace py = pybind11;
using okc::Params;
using okc::Plan;

namespace {

constexpr int64_t kEmuSmemLimit = 227 * 1024;  // as an H100

int device_count_or_error(std::string* why) {
#ifdef OKC_EMULATE
    (void)why;
    return 1;
#else
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
        cudaGetLastError();  // clear the sticky-free error state
        return 0;
    }
    if (count == 0 && why) *why = "no CUDA device found";
    return count;
#endif
}

void require_device(int device) {
    std::string why;
    int count = device_count_or_error(&why);
    if (count <= 0)
        throw std::runtime_error(
            "optical_kernels._cuda: no usable CUDA device (" + why +
            "); the 'cuda' backend needs an NVIDIA GPU and driver, use backend='torch' or 'cpu'");
    if (device < 0 || device >= count)
        throw std::runtime_error("optical_kernels._cuda: device index " + std::to_string(device) +
                                 " out of range (" + std::to_string(count) + " devices)");
}

// RAII: make `device` current for our (static) runtime, restore the previous one after.
struct DeviceGuard {
    int prev = -1;
    explicit DeviceGuard(int device) {
#ifndef OKC_EMULATE
        if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
        if (prev != device) {
            cudaError_t e = cudaSetDevice(device);
            if (e != cudaSuccess)
                throw std::runtime_error(std::string("optical_kernels._cuda: cudaSetDevice: ") +
                                         cudaGetErrorString(e));
        }
#else
        (void)device;
#endif
    }
    ~DeviceGuard() {
#ifndef OKC_EMULATE
        int cur = -1;
        if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
#endif
    }
};

int64_t smem_limit_of(const Params& p) {
    if (p.smem_limit > 0) return p.smem_limit;
#ifdef OKC_EMULATE
    return kEmuSmemLimit;
#else
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device) != cudaSuccess) {
        cudaGetLastError();
        return 48 * 1024;
    }
    return v;
#endif
}

bool device_has_mma(int device) {
#ifdef OKC_EMULATE
    (void)device;
    return true;
#else
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return major >= 8;
#endif
}

void check_common(const Params& p, bool backward) {
    auto bad = [](const std::string& s) { throw std::invalid_argument("optical_kernels._cuda: " + s); };
    if (p.B < 0 || p.n < 0 || p.m < 0) bad("negative size");
    if (p.n > okc::kMaxSize || p.m > okc::kMaxSize)
        bad("n and m must be <= " + std::to_string(okc::kMaxSize) + " for the resident kernels (got n=" +
            std::to_string(p.n) + ", m=" + std::to_string(p.m) + ")");
    if (p.dtype != okc::kF32 && p.dtype != okc::kF64) bad("dtype must be float32 or float64");
    if (p.in_dtype < okc::kF32 || p.in_dtype > okc::kBF16) bad("unknown input dtype");
    if (p.cost < okc::kGiven || p.cost > okc::kDot) bad("unknown cost");
    if (p.cost == okc::kGiven && p.in_dtype != p.dtype) bad("C must have the compute dtype");
    if (p.dtype == okc::kF64 && p.in_dtype != okc::kF64) bad("float64 solve needs float64 inputs");
    if (!(p.eps > 0)) bad("eps must be > 0");
    if (p.max_iter < 1) bad("max_iter must be >= 1");
    if (p.check_every < 1) bad("check_every must be >= 1");
    if (!(p.tol >= 0)) bad("tol must be >= 0");
    if (p.has_sched && p.sched_t_eps < 1) bad("sched_t_eps must be >= 1");
    if (p.B == 0) return;
    if (!p.a || !p.b) bad("null weight pointer");
    if (p.cost == okc::kGiven && !p.C && p.n > 0 && p.m > 0) bad("null C pointer");
    if (p.cost != okc::kGiven && (!p.x || !p.y) && p.n > 0 && p.m > 0) bad("null x / y pointer");
    if (p.cost != okc::kGiven && p.d < 1) bad("d must be >= 1");
    if (!p.f || !p.g || !p.n_iters) bad("null f / g / n_iters pointer");
    if (!backward && (!p.value || !p.value_linear || !p.err)) bad("null output pointer");
    if (backward) {
        if (p.mode < okc::kEnvelope || p.mode > okc::kUnrolled) bad("unknown gradient mode");
        if (p.mode == okc::kImplicit && (p.cg_max_iter < 1 || !(p.cg_tol > 0)))
            bad("implicit mode needs cg_max_iter >= 1 and cg_tol > 0 (SolverConfig.cg_limits)");
        if (!p.grad_value || !p.grad_value_linear) bad("null incoming gradient pointer");
        if ((p.hist_f != 0) != (p.hist_g != 0)) bad("hist_f and hist_g must be given together");
        if (p.cost == okc::kGiven && !p.G) bad("null G pointer");
        if (p.cost != okc::kGiven && (!p.dx || (p.need_dy && !p.dy))) bad("null dx / dy pointer");
    }
}

Plan plan_for(const Params& p, bool backward) {
    Params q = p;
    if (q.use_mma && !device_has_mma(q.device)) q.use_mma = 0;
    return okc::make_plan(q, backward, smem_limit_of(q));
}

void run(const Params& p, bool backward) {
    check_common(p, backward);
#ifndef OKC_EMULATE
    require_device(p.device);
#endif
    if (p.B == 0 || p.n == 0 || p.m == 0) {
        if (p.B > 0)
            throw std::invalid_argument(
                "optical_kernels._cuda: n == 0 or m == 0 must be handled by the caller");
        return;
    }
    DeviceGuard guard(p.device);
    Params q = p;
    if (q.use_mma && !device_has_mma(q.device)) q.use_mma = 0;
    const Plan pl = okc::make_plan(q, backward, smem_limit_of(q));
    if (pl.smem_bytes < 0)
        throw std::runtime_error("optical_kernels._cuda: problem of n=" + std::to_string(p.n) +
                                 ", m=" + std::to_string(p.m) + " does not fit this device's shared memory");
    if (pl.ws_bytes > 0 && (!q.workspace || q.workspace_bytes < pl.ws_bytes))
        throw std::invalid_argument("optical_kernels._cuda: workspace of " + std::to_string(pl.ws_bytes) +
                                    " bytes required (got " + std::to_string(q.workspace_bytes) + ")");
    const char* err = backward ? okc::launch_backward(q, pl) : okc::launch_forward(q, pl);
    if (err && err[0]) throw std::runtime_error(std::string("optical_kernels._cuda: launch failed: ") + err);
}

py::dict plan_dict(const Params& p, bool backward) {
    const Plan pl = plan_for(p, backward);
    py::dict d;
    d["smem_bytes"] = pl.smem_bytes;
    d["workspace_bytes"] = pl.ws_bytes;
    d["c_smem"] = (bool)pl.c_smem;
    d["w_smem"] = (bool)pl.w_smem;
    d["w_is_G"] = (bool)pl.w_is_G;
    d["mma"] = (bool)pl.mma;
    d["NP"] = pl.NP;
    d["MP"] = pl.MP;
    d["pitch"] = pl.pitch;
    return d;
}

template <size_t N>
py::tuple to_tuple(const int64_t (&a)[N]) {
    py::tuple t(N);
    for (size_t i = 0; i < N; ++i) t[i] = a[i];
    return t;
}

}  // namespace

PYBIND11_MODULE(OKC_MODULE_NAME, m) {
    m.doc() = "optical_kernels CUDA backend: resident Sinkhorn kernels (one block per problem)";
#ifdef OKC_EMULATE
    m.attr("EMULATED") = true;
#else
    m.attr("EMULATED") = false;
#endif
    m.attr("MAX_SIZE") = okc::kMaxSize;
    py::dict constants;  // csrc/common/okc_constants.h, checked against optical_kernels.constants
    okc::okc_for_each_constant([&](const char* name, int v) { constants[name] = v; });
    m.attr("CONSTANTS") = constants;

    py::class_<Params>(m, "Params", py::module_local(),
                       "Launch description: raw pointers (int), sizes, strides, config.")
        .def(py::init<>())
        .def_readwrite("B", &Params::B)
        .def_readwrite("n", &Params::n)
        .def_readwrite("m", &Params::m)
        .def_readwrite("d", &Params::d)
        .def_readwrite("dtype", &Params::dtype)
        .def_readwrite("in_dtype", &Params::in_dtype)
        .def_readwrite("cost", &Params::cost)
        .def_readwrite("C", &Params::C)
        .def_readwrite("x", &Params::x)
        .def_readwrite("y", &Params::y)
        .def_property(
            "sC", [](const Params& p) { return to_tuple(p.sC); },
            [](Params& p, std::array<int64_t, 3> s) { for (int i = 0; i < 3; ++i) p.sC[i] = s[i]; })
        .def_property(
            "sx", [](const Params& p) { return to_tuple(p.sx); },
            [](Params& p, std::array<int64_t, 3> s) { for (int i = 0; i < 3; ++i) p.sx[i] = s[i]; })
        .def_property(
            "sy", [](const Params& p) { return to_tuple(p.sy); },
            [](Params& p, std::array<int64_t, 3> s) { for (int i = 0; i < 3; ++i) p.sy[i] = s[i]; })
        .def_readwrite("a", &Params::a)
        .def_readwrite("b", &Params::b)
        .def_readwrite("eps", &Params::eps)
        .def_readwrite("rho", &Params::rho)
        .def_readwrite("max_iter", &Params::max_iter)
        .def_readwrite("tol", &Params::tol)
        .def_readwrite("check_every", &Params::check_every)
        .def_readwrite("has_sched", &Params::has_sched)
        .def_readwrite("sched_start", &Params::sched_start)
        .def_readwrite("sched_factor", &Params::sched_factor)
        .def_readwrite("sched_t_eps", &Params::sched_t_eps)
        .def_readwrite("f", &Params::f)
        .def_readwrite("g", &Params::g)
        .def_readwrite("value", &Params::value)
        .def_readwrite("value_linear", &Params::value_linear)
        .def_readwrite("n_iters", &Params::n_iters)
        .def_readwrite("err", &Params::err)
        .def_readwrite("hist_f", &Params::hist_f)
        .def_readwrite("hist_g", &Params::hist_g)
        .def_readwrite("hist_T", &Params::hist_T)
        .def_readwrite("mode", &Params::mode)
        .def_readwrite("grad_value", &Params::grad_value)
        .def_readwrite("grad_value_linear", &Params::grad_value_linear)
        .def_readwrite("cg_max_iter", &Params::cg_max_iter)
        .def_readwrite("cg_tol", &Params::cg_tol)
        .def_readwrite("G", &Params::G)
        .def_readwrite("dx", &Params::dx)
        .def_readwrite("dy", &Params::dy)
        .def_readwrite("need_dy", &Params::need_dy)
        .def_readwrite("use_mma", &Params::use_mma)
        .def_readwrite("workspace", &Params::workspace)
        .def_readwrite("workspace_bytes", &Params::workspace_bytes)
        .def_readwrite("stream", &Params::stream)
        .def_readwrite("device", &Params::device)
        .def_readwrite("smem_limit", &Params::smem_limit);

    m.def(
        "device_count",
        []() { return device_count_or_error(nullptr); },
        "Number of CUDA devices visible to this module's runtime (0 when none / no driver).");
    m.def(
        "device_error",
        []() {
            std::string why;
            return device_count_or_error(&why) > 0 ? std::string() : why;
        },
        "Why no device is usable ('' when one is).");
    m.def(
        "plan", [](const Params& p, bool backward) { return plan_dict(p, backward); },
        py::arg("params"), py::arg("backward") = false,
        "Shared-memory / workspace plan of a launch (queries the device unless params.smem_limit > 0).");
    m.def(
        "workspace_bytes", [](const Params& p, bool backward) { return plan_for(p, backward).ws_bytes; },
        py::arg("params"), py::arg("backward") = false,
        "Bytes of device scratch the launch needs in params.workspace (0: none).");
    m.def(
        "forward", [](const Params& p) { run(p, false); }, py::arg("params"),
        "Launch the forward solve on params.stream (asynchronous).");
    m.def(
        "backward", [](const Params& p) { run(p, true); }, py::arg("params"),
        "Launch the backward (dL/dC or dx, dy) on params.stream (asynchronous).");
}
