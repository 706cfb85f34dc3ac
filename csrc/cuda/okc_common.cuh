// Shared device helpers of the resident kernels: block layout, reductions, and the two
// traversal patterns every pass uses over the n x m tile held on chip:
//
//  * row pass   : a group of GS lanes per row i (GS = 1..32, a power of two), each lane holds
//                 at most 8 columns j = lane_in_group + GS*q in registers; reductions over j
//                 are xor shuffles inside the group. Every lane of a warp runs the same number
//                 of row slots, so the full-mask shuffles are always converged.
//  * column pass: one thread per column j (32 consecutive columns per warp, so tile reads are
//                 contiguous), the rows split between warps; per-thread partials are combined
//                 through shared memory.
//
// Tiles are row-major with a padded pitch; a tile pointer is either shared memory or global
// memory (the workspace fallback of the 256-size problems), the code is the same.
#pragma once

#include "okc_params.h"
#include "okc_portable.cuh"

namespace okc {

constexpr int NT = 256;      // threads per block
constexpr int NW = NT / 32;  // warps per block
constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;

OKC_HD int round_up(int v, int q) { return (v + q - 1) / q * q; }
OKC_HD int64_t align_up(int64_t v, int64_t q) { return (v + q - 1) / q * q; }

// ------------------------------------------------------------------------------------------
// Vector arena of shared memory: every per-row / per-column array of a launch. The same
// function sizes it on the host and carves it on the device.
// ------------------------------------------------------------------------------------------
struct VecLayout {
    // offsets in elements of T from the start of the arena
    int la, lb, f, g, hr, hc, nx, ny, redM, redS, scal;
    int fb, gb, rs, cs, v0, v1, v2, v3, v4, v5;  // backward only (v*: CG / replay vectors)
    int total;
};

OKC_HD VecLayout vec_layout(int NP, int MP, bool backward) {
    VecLayout L{};
    int o = 0;
    auto take = [&](int len) {
        int r = o;
        o += round_up(len, 32);
        return r;
    };
    L.la = take(NP);
    L.lb = take(MP);
    L.f = take(NP);
    L.g = take(MP);
    L.hr = take(NP);
    L.hc = take(MP);
    L.nx = take(NP);
    L.ny = take(MP);
    L.redM = take(NT);
    L.redS = take(NT);
    L.scal = take(64);
    if (backward) {
        L.fb = take(NP);
        L.gb = take(MP);
        L.rs = take(NP);
        L.cs = take(MP);
        L.v0 = take(NP + MP);
        L.v1 = take(NP + MP);
        L.v2 = take(NP + MP);
        L.v3 = take(NP + MP);
        L.v4 = take(NP + MP);
        L.v5 = take(NP + MP);
    }
    L.total = o;
    return L;
}

// ------------------------------------------------------------------------------------------
// Reductions
// ------------------------------------------------------------------------------------------
template <class T>
OKC_DEV T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += okc_shfl_xor(v, o);
    return v;
}

// Sum inside aligned groups of `gs` lanes (gs a power of two <= 32); all 32 lanes call it.
template <class T>
OKC_DEV T group_sum(T v, int gs) {
    for (int o = gs >> 1; o > 0; o >>= 1) v += okc_shfl_xor(v, o);
    return v;
}
template <class T>
OKC_DEV T group_max(T v, int gs) {
    for (int o = gs >> 1; o > 0; o >>= 1) v = okc_max(v, okc_shfl_xor(v, o));
    return v;
}

// Block-wide sum, returned to every thread. Deterministic order. `scal` needs NW entries.
template <class T>
OKC_DEV T block_sum(T v, T* scal) {
    v = warp_sum(v);
    okc_sync();  // previous readers of scal are done
    if ((OKC_TID & 31) == 0) scal[OKC_TID >> 5] = v;
    okc_sync();
    T s = 0;
#pragma unroll
    for (int w = 0; w < NW; ++w) s += scal[w];
    return s;
}

// Two block-wide sums at once (scal needs 2*NW entries).
template <class T>
OKC_DEV void block_sum2(T& a, T& b, T* scal) {
    a = warp_sum(a);
    b = warp_sum(b);
    okc_sync();
    if ((OKC_TID & 31) == 0) {
        scal[OKC_TID >> 5] = a;
        scal[NW + (OKC_TID >> 5)] = b;
    }
    okc_sync();
    T sa = 0, sb = 0;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
        sa += scal[w];
        sb += scal[NW + w];
    }
    a = sa;
    b = sb;
}

template <class T>
OKC_DEV T block_max(T v, T* scal) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = okc_max(v, okc_shfl_xor(v, o));
    okc_sync();
    if ((OKC_TID & 31) == 0) scal[OKC_TID >> 5] = v;
    okc_sync();
    T s = scal[0];
#pragma unroll
    for (int w = 1; w < NW; ++w) s = okc_max(s, scal[w]);
    return s;
}

// 4 consecutive elements of a 16-byte aligned shared-memory vector in one (or two) loads.
template <class T>
struct Quad {
    T v[4];
};
OKC_DEV Quad<float> load_quad(const float* p) {
    const okc_float4 a = *reinterpret_cast<const okc_float4*>(p);
    return Quad<float>{{a.x, a.y, a.z, a.w}};
}
OKC_DEV Quad<double> load_quad(const double* p) {
    const okc_double2 a = reinterpret_cast<const okc_double2*>(p)[0];
    const okc_double2 b = reinterpret_cast<const okc_double2*>(p)[1];
    return Quad<double>{{a.x, a.y, b.x, b.y}};
}

// ------------------------------------------------------------------------------------------
// Row-pass geometry
// ------------------------------------------------------------------------------------------
constexpr int kMaxPerLane = 8;  // columns per lane in a row pass: GS * 8 >= m_eff

OKC_DEV int pow2_ceil(int v) {
    int p = 1;
    while (p < v) p <<= 1;
    return p;
}

// Lanes per row: enough that GS*8 >= m_eff, and (for short problems) enough rows per block
// step that all warps have work.
OKC_DEV int row_group_size(int n_eff, int m_eff) {
    int gs = pow2_ceil((m_eff + kMaxPerLane - 1) / kMaxPerLane);
    int gs_n = pow2_ceil((NT + n_eff - 1) / (n_eff > 0 ? n_eff : 1));
    gs = okc_max(gs, gs_n);
    return okc_min(okc_max(gs, 1), 32);
}

// Row pass driver. For each row slot of this lane: body(i, row_ok, j0, gs) where the lane's
// columns are j = j0 + gs*q (q < kMaxPerLane, j < m_eff); body must call the group reductions
// unconditionally (row_ok false for padded / invalid rows).
template <class F>
OKC_DEV void for_rows(int n_eff, int m_eff, F body) {
    const int gs = row_group_size(n_eff, m_eff);
    const int lane = OKC_TID & 31, warp = OKC_TID >> 5;
    const int groups = 32 / gs;
    const int group = lane / gs;
    const int j0 = lane % gs;
    for (int base = warp * groups; base < n_eff; base += NW * groups) {
        const int i = base + group;
        body(i, i < n_eff, j0, gs);
    }
}

// Column pass geometry: strips of 32 columns, rows split among NW / strips warps.
struct ColSplit {
    int nstrips, nsplit, chunk;
};
OKC_DEV ColSplit col_split(int n_eff, int m_eff) {
    ColSplit c;
    c.nstrips = (m_eff + 31) / 32;
    if (c.nstrips < 1) c.nstrips = 1;
    c.nsplit = NW / c.nstrips;
    if (c.nsplit < 1) c.nsplit = 1;
    c.chunk = round_up((n_eff + c.nsplit - 1) / c.nsplit, 4);  // 4-row vector loads
    return c;
}

// Column pass driver: body(j, i0, i1, slot) for this thread's column j < m_eff and row range
// [i0, i1); `slot` in [0, NT) indexes per-thread partials (slot = part * nstrips*32 + j).
// Returns nothing; callers combine partials over parts p < nsplit at slot p*nstrips*32 + j.
template <class F>
OKC_DEV void for_cols(int n_eff, int m_eff, F body) {
    const ColSplit cs = col_split(n_eff, m_eff);
    const int lane = OKC_TID & 31, warp = OKC_TID >> 5;
    if (warp < cs.nstrips * cs.nsplit) {
        const int strip = warp % cs.nstrips, part = warp / cs.nstrips;
        const int j = strip * 32 + lane;
        const int i0 = part * cs.chunk;
        const int i1 = okc_min(i0 + cs.chunk, n_eff);
        if (j < m_eff) body(j, i0, i1, part * cs.nstrips * 32 + j);
    }
}

// ------------------------------------------------------------------------------------------
// LSE passes in base 2 (z in log2 units; the caller folds log2(e)/eps into its terms)
// ------------------------------------------------------------------------------------------

// Row LSE (base 2): L2_i = log2 sum_j exp2((pot[j] - C_ij) * s + lw[j]) over the columns
// j < m_eff with lw[j] > -inf, for the rows i < n_eff with row_mask[i] > -inf; out(i, M, S) on
// the group's first lane with L2_i = M + log2 S (M the row maximum, S >= 1; softmax weights are
// exp2(z - M) / S, normalised to rounding). The difference pot - C is taken in cost units before scaling by
// s = log2(e)/eps (exact for close values), as the reference's (g - C)/eps.
template <class T, class Out>
OKC_DEV void rows_lse2(const T* tile, int pitch, const T* row_mask, const T* lw, const T* pot, T s,
                       int n_eff, int m_eff, Out out) {
    // a lane's columns are the same for every row it visits: keep (lw, pot) in registers
    const int gs = row_group_size(n_eff, m_eff);
    const int j0 = (OKC_TID & 31) % gs;
    T lwr[kMaxPerLane], potr[kMaxPerLane];
#pragma unroll
    for (int q = 0; q < kMaxPerLane; ++q) {
        const int j = j0 + gs * q;
        const bool ok = j < m_eff && lw[j] > Lim<T>::ninf();
        lwr[q] = ok ? lw[j] : Lim<T>::ninf();
        potr[q] = ok ? pot[j] : (T)0;
    }
    for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0_, int gs_) {
        const bool ok = in_range && row_mask[i] > Lim<T>::ninf();
        T z[kMaxPerLane];
        T mx = Lim<T>::ninf();
        const T* row = tile + (int64_t)(ok ? i : 0) * pitch;
#pragma unroll
        for (int q = 0; q < kMaxPerLane; ++q) {
            T v = Lim<T>::ninf();
            if (ok && lwr[q] > Lim<T>::ninf()) v = (potr[q] - row[j0_ + gs_ * q]) * s + lwr[q];
            z[q] = v;
            mx = okc_max(mx, v);
        }
        mx = group_max(mx, gs_);
        T sum = 0;
        if (ok) {
#pragma unroll
            for (int q = 0; q < kMaxPerLane; ++q) sum += okc_exp2(z[q] - mx);
        }
        sum = group_sum(sum, gs_);
        if (ok && j0_ == 0) out(i, mx, sum);
    });
}

// Column LSE (base 2): L2_j = log2 sum_i exp2((pot[i] - C_ij) * s + lw[i]) over the rows
// i < n_eff with lw[i] > -inf, for columns j < m_eff; out(j, M, S) once per column (after a
// block barrier), L2_j = M + log2 S (M = -inf, S = 0 for a column without rows). Single pass,
// online max, one exp2 per element.
template <class T, class Out>
OKC_DEV void cols_lse2(const T* tile, int pitch, const T* lw, const T* pot, T s, int n_eff,
                       int m_eff, T* redM, T* redS, Out out) {
    for_cols(n_eff, m_eff, [&](int j, int i0, int i1, int slot) {
        T M = Lim<T>::ninf(), S = 0;
        // (lw, pot) of 4 rows per 128-bit (broadcast) load; i0 is a multiple of 4 and the
        // vectors are padded to 16 entries, so reading past i1 stays in bounds (and is unused)
        for (int i4 = i0; i4 < i1; i4 += 4) {
            const Quad<T> w4 = load_quad(lw + i4), p4 = load_quad(pot + i4);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const T h = w4.v[u];
                if (i4 + u >= i1 || !(h > Lim<T>::ninf())) continue;
                const T z = (p4.v[u] - tile[(int64_t)(i4 + u) * pitch + j]) * s + h;
                const T dlt = z - M;
                const T e = okc_exp2(-okc_abs(dlt));
                if (dlt > 0) {
                    S = S * e + (T)1;
                    M = z;
                } else {
                    S += e;
                }
            }
        }
        redM[slot] = M;
        redS[slot] = S;
    });
    okc_sync();
    const ColSplit cs = col_split(n_eff, m_eff);
    const int W = cs.nstrips * 32;
    for (int j = OKC_TID; j < m_eff; j += NT) {
        T M = Lim<T>::ninf();
        for (int p = 0; p < cs.nsplit; ++p)
            if (redS[p * W + j] > 0) M = okc_max(M, redM[p * W + j]);
        T S = 0;
        for (int p = 0; p < cs.nsplit; ++p)
            if (redS[p * W + j] > 0) S += redS[p * W + j] * okc_exp2(redM[p * W + j] - M);
        out(j, M, S);
    }
    okc_sync();
}

// Column sums: out(j, sum_i term(i, j)) for j < m_eff, term called for rows i < n_eff whose
// row_ok(i) is true (same traversal as cols_lse2).
template <class T, class Term, class RowOk, class Out>
OKC_DEV void cols_sum(int n_eff, int m_eff, T* red, RowOk row_ok, Term term, Out out) {
    for_cols(n_eff, m_eff, [&](int j, int i0, int i1, int slot) {
        T acc = 0;
        for (int i = i0; i < i1; ++i)
            if (row_ok(i)) acc += term(i, j);
        red[slot] = acc;
    });
    okc_sync();
    const ColSplit cs = col_split(n_eff, m_eff);
    const int W = cs.nstrips * 32;
    for (int j = OKC_TID; j < m_eff; j += NT) {
        T acc = 0;
        for (int p = 0; p < cs.nsplit; ++p) acc += red[p * W + j];
        out(j, acc);
    }
    okc_sync();
}

// ------------------------------------------------------------------------------------------
// Per-problem setup shared by forward and backward
// ------------------------------------------------------------------------------------------
template <class T>
struct ProblemInfo {
    int n_eff, m_eff;  // last valid index + 1 (0: empty)
    int n_valid, m_valid;
    T sum_a, sum_b;
};

// la[i] = log2 a_i (-inf where a_i <= 0 or i >= n), same for lb; returns extents and sums.
template <class T>
OKC_DEV ProblemInfo<T> load_weights(const T* a, const T* b, int n, int m, int NP, int MP, T* la,
                                    T* lb, T* scal) {
    int last_i = 0, last_j = 0, cnt_i = 0, cnt_j = 0;
    T sa = 0, sb = 0;
    for (int i = OKC_TID; i < NP; i += NT) {
        const T v = i < n ? a[i] : (T)0;
        const bool ok = v > 0;
        la[i] = ok ? okc_log2(v) : Lim<T>::ninf();
        if (ok) {
            last_i = i + 1;
            cnt_i++;
            sa += v;
        }
    }
    for (int j = OKC_TID; j < MP; j += NT) {
        const T v = j < m ? b[j] : (T)0;
        const bool ok = v > 0;
        lb[j] = ok ? okc_log2(v) : Lim<T>::ninf();
        if (ok) {
            last_j = j + 1;
            cnt_j++;
            sb += v;
        }
    }
    ProblemInfo<T> P;
    P.n_eff = (int)block_max((T)last_i, scal);
    P.m_eff = (int)block_max((T)last_j, scal);
    T ci = (T)cnt_i, cj = (T)cnt_j;
    block_sum2(ci, cj, scal);
    P.n_valid = (int)ci;
    P.m_valid = (int)cj;
    T s1 = sa, s2 = sb;
    block_sum2(s1, s2, scal);
    P.sum_a = s1;
    P.sum_b = s2;
    if (P.n_eff == 0 || P.m_eff == 0) {
        P.n_eff = 0;
        P.m_eff = 0;
    }
    okc_sync();
    return P;
}

// eps at iteration t (1-based), double precision as in SolverConfig.eps_at: eps from the
// host-resolved t_eps on (SolverConfig.schedule), so device pow rounding cannot delay it.
OKC_HD double eps_at(const Params& p, int t) {
    if (!p.has_sched || t >= p.sched_t_eps) return p.eps;
    double e = p.sched_start * pow(p.sched_factor, (double)(t - 1));
    return e > p.eps ? e : p.eps;
}
OKC_HD double damping(const Params& p, double eps_t) {
    return p.rho > 0 ? p.rho / (p.rho + eps_t) : 1.0;
}

#ifndef OKC_EMULATE
// Opt a kernel into `bytes` of dynamic shared memory on `device` (> 48 KB needs it). Cached per
// (kernel, device): after the first launch of a size, launches make no other runtime call, so
// they can be captured in CUDA graphs. Host only; callers hold the GIL (no concurrent calls).
inline const char* ensure_dynamic_smem(const void* kernel, int device, int64_t bytes) {
    struct Entry {
        const void* kernel;
        int device;
        int64_t bytes;
    };
    static Entry cache[64];
    static int used = 0;
    for (int i = 0; i < used; ++i)
        if (cache[i].kernel == kernel && cache[i].device == device && cache[i].bytes >= bytes)
            return nullptr;
    cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    for (int i = 0; i < used; ++i)
        if (cache[i].kernel == kernel && cache[i].device == device) {
            cache[i].bytes = bytes;
            return nullptr;
        }
    if (used < 64) cache[used++] = Entry{kernel, device, bytes};
    return nullptr;
}
#endif

// Launch a resident kernel (one NT-thread block per problem) on the caller's stream, or run it
// in the CPU emulator. Shared by the forward and backward launchers; "" means success.
typedef void (*ResidentKernel)(Params, Plan);
inline const char* launch_resident(ResidentKernel kern, const Params& p, const Plan& pl) {
    if (pl.smem_bytes < 0) return "problem too large for the shared memory of this device";
    if (!kern) return "unsupported dtype combination";
    if (p.B == 0) return "";
#ifdef OKC_EMULATE
    okc_emu::run_grid(p.B, NT, (size_t)pl.smem_bytes, [&]() { kern(p, pl); });
    return "";
#else
    if (pl.smem_bytes > 48 * 1024) {
        const char* e = ensure_dynamic_smem((const void*)kern, p.device, pl.smem_bytes);
        if (e) return e;
    }
    kern<<<p.B, NT, (size_t)pl.smem_bytes, reinterpret_cast<cudaStream_t>(p.stream)>>>(p, pl);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? "" : cudaGetErrorString(e);
#endif
}

}  // namespace okc
