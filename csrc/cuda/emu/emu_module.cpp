// Test build of the CUDA backend on the CPU emulator: module optical_kernels._cuda_emu, same
// API as optical_kernels._cuda, host pointers instead of device pointers. Built by
// tests/test_cuda.py (g++ -std=c++17 -O1 -shared -fPIC -DOKC_EMULATE ...); never by setup.py
// (setup.py globs only csrc/cuda/*.cu and csrc/cuda/*.cpp, not this subfolder).
#ifndef OKC_EMULATE
#define OKC_EMULATE 1
#endif
#define OKC_MODULE_NAME _cuda_emu

#include "../forward.cu"
#include "../backward.cu"
#include "../bindings.cpp"
