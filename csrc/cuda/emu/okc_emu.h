// CPU emulator of the small CUDA subset the optical_kernels kernels use (test tool only).
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another. __syncthreads is a real block barrier, warp shuffles are real 32-lane exchanges
// (two warp barriers each), so missing or divergent synchronisation deadlocks, and the
// emulator reports it instead of hanging. The fiber order at every barrier is configurable
// (OKC_EMU_SCHEDULE=forward|reverse|random:<seed>) so that missing __syncthreads between a
// write and a read of shared memory shows up as wrong results under some order. Dynamic shared
// memory is filled with 0xFF bytes (NaN) before every block, so reads of uninitialised shared
// memory surface as NaN. wmma fragments are emulated per lane as whole tiles.
//
// Not thread-safe: one launch at a time (the Python GIL serialises calls).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Fiber switch. x86-64: save the callee-saved registers on the current stack, swap stack
// pointers, restore, return (no signal-mask syscall, ~100x faster than swapcontext).
// Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(OKC_EMU_UCONTEXT)
#define OKC_EMU_ASM_SWITCH 1
extern "C" void okc_emu_switch(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".globl okc_emu_switch\n"
    ".type okc_emu_switch,@function\n"
    "okc_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size okc_emu_switch, .-okc_emu_switch\n");
#endif

namespace okc_emu {

struct Barrier {
    int count = 0;
    int expected = 0;
    unsigned gen = 0;
};

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;
    char* stack = nullptr;
    int started = 0;
    int done = 0;
    Barrier* wait = nullptr;  // barrier this fiber is blocked on (nullptr: runnable)
    unsigned wait_gen = 0;
};

struct BlockState {
    int nthreads = 0;
    int bid = 0;
    int cur = 0;
    char* smem = nullptr;
    std::vector<Fiber> fibers;
    Barrier block_bar;
    std::vector<Barrier> warp_bar;
    std::vector<uint64_t> warp_buf;
    ucontext_t sched;
    void* sched_sp = nullptr;
    uint64_t events = 0;
    std::function<void()> body;
};

inline BlockState*& state() {
    static BlockState* s = nullptr;
    return s;
}

inline int tid() { return state()->cur; }
inline int bid() { return state()->bid; }
inline char* dyn_smem() { return state()->smem; }

inline void yield_to_scheduler() {
    BlockState* s = state();
#ifdef OKC_EMU_ASM_SWITCH
    okc_emu_switch(&s->fibers[s->cur].sp, s->sched_sp);
#else
    swapcontext(&s->fibers[s->cur].ctx, &s->sched);
#endif
}

inline void wait_on(Barrier& b) {
    BlockState* s = state();
    unsigned g = b.gen;
    s->events++;
    if (++b.count == b.expected) {
        b.count = 0;
        b.gen++;
        return;
    }
    Fiber& f = s->fibers[s->cur];
    f.wait = &b;
    f.wait_gen = g;
    while (b.gen == g) yield_to_scheduler();
    f.wait = nullptr;
}

inline void syncthreads() { wait_on(state()->block_bar); }

// Warp-collective point (__syncwarp): used around the emulated wmma loads / stores so that
// all 32 lanes read (or write) memory at the same logical time, as the hardware does.
inline void syncwarp() {
    BlockState* s = state();
    wait_on(s->warp_bar[s->cur / 32]);
}

template <class T>
inline T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    BlockState* s = state();
    int t = s->cur, w = t / 32, l = t % 32;
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    s->warp_buf[w * 32 + l] = raw;
    wait_on(s->warp_bar[w]);
    uint64_t other = s->warp_buf[w * 32 + (l ^ mask)];
    wait_on(s->warp_bar[w]);
    T r;
    std::memcpy(&r, &other, sizeof(T));
    return r;
}

inline void fiber_entry() {
    BlockState* s = state();
    s->body();
    s->fibers[s->cur].done = 1;
    s->events++;
    yield_to_scheduler();  // never resumed
    std::abort();
}

// Prepare fiber f to start in fiber_entry on its own stack.
inline void fiber_init(Fiber& f, size_t stack_bytes) {
#ifdef OKC_EMU_ASM_SWITCH
    uintptr_t top = ((uintptr_t)(f.stack + stack_bytes)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                      // fake return address of fiber_entry (never used)
    *--sp = (void*)&fiber_entry;          // popped by `ret` (slot address is 16-aligned)
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_entry, 0);
#endif
}

inline void fiber_resume(BlockState& st, Fiber& f) {
#ifdef OKC_EMU_ASM_SWITCH
    okc_emu_switch(&st.sched_sp, f.sp);
#else
    swapcontext(&st.sched, &f.ctx);
#endif
}

// Schedule order from OKC_EMU_SCHEDULE.
struct Order {
    int kind = 0;  // 0 forward, 1 reverse, 2 random
    std::mt19937 rng;
    Order() {
        const char* e = std::getenv("OKC_EMU_SCHEDULE");
        if (e && std::strcmp(e, "reverse") == 0) kind = 1;
        if (e && std::strncmp(e, "random", 6) == 0) {
            kind = 2;
            unsigned seed = 0;
            if (e[6] == ':') seed = (unsigned)std::strtoul(e + 7, nullptr, 10);
            rng.seed(seed);
        }
    }
};

// Run kernel body `fn` (already bound to its arguments) on `grid` blocks of `block` threads.
inline void run_grid(int grid, int block, size_t smem_bytes, const std::function<void()>& fn) {
    if (block % 32 != 0) throw std::runtime_error("emu: block size must be a multiple of 32");
    const size_t stack_bytes = 256 * 1024;
    Order order;
    std::vector<char> smem(smem_bytes + 256);
    char* smem_base = smem.data();
    while (((uintptr_t)smem_base) % 128) ++smem_base;
    BlockState st;
    st.nthreads = block;
    st.smem = smem_base;
    st.body = fn;
    st.fibers.resize(block);
    st.warp_bar.resize(block / 32);
    st.warp_buf.resize(block);
    for (auto& f : st.fibers) f.stack = (char*)std::malloc(stack_bytes);
    BlockState* prev = state();
    state() = &st;
    std::vector<int> perm(block);
    std::string error;
    for (int bi = 0; bi < grid && error.empty(); ++bi) {
        st.bid = bi;
        std::memset(smem_base, 0xFF, smem_bytes);
        st.block_bar = Barrier{0, block, 0};
        for (auto& w : st.warp_bar) w = Barrier{0, 32, 0};
        for (int t = 0; t < block; ++t) {
            Fiber& f = st.fibers[t];
            f.started = 0;
            f.done = 0;
            f.wait = nullptr;
            fiber_init(f, stack_bytes);
        }
        int remaining = block;
        while (remaining > 0) {
            for (int t = 0; t < block; ++t) perm[t] = t;
            if (order.kind == 1) std::reverse(perm.begin(), perm.end());
            if (order.kind == 2) std::shuffle(perm.begin(), perm.end(), order.rng);
            uint64_t before = st.events;
            bool any_waiting = false;
            for (int t : perm) {
                Fiber& f = st.fibers[t];
                if (f.done) continue;
                if (f.wait && f.wait->gen == f.wait_gen) {  // still blocked: do not switch
                    any_waiting = true;
                    continue;
                }
                st.cur = t;
                f.started = 1;
                fiber_resume(st, f);
                if (f.done)
                    --remaining;
                else
                    any_waiting = true;
            }
            if (remaining > 0 && any_waiting && st.events == before) {
                int exited = 0;
                for (auto& f : st.fibers) exited += f.done;
                error = "emu: deadlock in block " + std::to_string(bi) + " (" +
                        std::to_string(exited) +
                        " threads exited, the others wait at a barrier or shuffle that not every "
                        "thread reaches)";
                break;
            }
        }
    }
    for (auto& f : st.fibers) std::free(f.stack);
    state() = prev;
    if (!error.empty()) throw std::runtime_error(error);
}

// ---- 16-bit float types (bit containers with conversions) ---------------------------------
struct half_t {
    uint16_t bits;
};
struct bf16_t {
    uint16_t bits;
};

inline float bf16_to_float(bf16_t v) {
    uint32_t u = ((uint32_t)v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float half_to_float(half_t v) {
    uint32_t h = v.bits;
    uint32_t sign = (h & 0x8000u) << 16;
    int exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            mant &= 0x3ffu;
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((uint32_t)(exp - 15 + 127) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float elem_to_float(float v) { return v; }
inline float elem_to_float(half_t v) { return half_to_float(v); }
inline float elem_to_float(bf16_t v) { return bf16_to_float(v); }

// ---- wmma (the subset used by the kernels) -------------------------------------------------
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int R = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int C = std::is_same<Use, matrix_a>::value ? K : N;
    enum { num_elements = R * C };
    float x[R * C];
};

// Round to tf32 (10 explicit mantissa bits), nearest, ties away from zero (cvt.rna.tf32.f32).
inline float __float_to_tf32(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) {
        u += 0x1000u;
        u &= 0xffffe000u;
    }
    float r;
    std::memcpy(&r, &u, 4);
    return r;
}

template <class Use, int M, int N, int K, class T, class Layout, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
    using F = fragment<Use, M, N, K, T, Layout>;
    constexpr bool row = std::is_same<Layout, row_major>::value;
    syncwarp();
    for (int r = 0; r < F::R; ++r)
        for (int c = 0; c < F::C; ++c)
            f.x[r * F::C + c] = elem_to_float(row ? ptr[(size_t)r * ldm + c] : ptr[(size_t)c * ldm + r]);
    syncwarp();
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float, void>& f, const float* ptr,
                             unsigned ldm, layout_t layout) {
    syncwarp();
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            f.x[r * N + c] = layout == mem_row_major ? ptr[(size_t)r * ldm + c] : ptr[(size_t)c * ldm + r];
    syncwarp();
}

template <int M, int N, int K>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float, void>& f,
                              unsigned ldm, layout_t layout) {
    syncwarp();
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) {
            float v = f.x[r * N + c];
            if (layout == mem_row_major)
                ptr[(size_t)r * ldm + c] = v;
            else
                ptr[(size_t)c * ldm + r] = v;
        }
    syncwarp();
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
    for (int t = 0; t < fragment<Use, M, N, K, T, Layout>::num_elements; ++t) f.x[t] = v;
}

template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float, void>& c) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.x[i * N + j];
            for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
            out[i * N + j] = s;
        }
    std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma

}  // namespace okc_emu
