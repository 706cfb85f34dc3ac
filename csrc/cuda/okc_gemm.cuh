// Block-level matrix products of the resident kernels:
//  * the cost tile  D = X Y^T  (n x m from x [n, d], y [m, d]), staged through shared memory
//    in k-chunks of KC, accumulated into the tile (which may live in shared or global memory);
//  * the chain rule  W = G Yhat  (n x DC chunk) and  V = G^T Xhat.
//
// Three engines, all accumulating out += A * B with every output owned by one thread/warp:
//  * simt_gemm_acc   : register-tiled FMA (4x4 outputs per thread), any type (fp64 path);
//  * mma_tf32x3_acc  : wmma m16n16k8 tf32 with the 3xTF32 split (a = hi + lo, products
//                      hi*hi + hi*lo + lo*hi), fp32-level accuracy on tensor cores;
//  * mma_f16_acc     : wmma m16n16k16 on __half / __nv_bfloat16 inputs, fp32 accumulation
//                      (products of 16-bit values are exact in fp32).
// MMA engines need R, Cn multiples of 16, K a multiple of the k-step, leading dimensions
// multiples of 4 (fp32) / 8 (16-bit) elements and 32-byte aligned fragment starts.
#pragma once

#include <type_traits>

#include "okc_common.cuh"

namespace okc {

// out[r*ldo + c] += sum_{k<K} A[r*a_rs + k*a_ks] * B[k*b_ks + c*b_cs], r < R, c < Cn.
template <class T>
OKC_DEV void simt_gemm_acc(T* out, int ldo, const T* A, int a_rs, int a_ks, const T* B, int b_ks,
                           int b_cs, int R, int Cn, int K) {
    const int tx = OKC_TID & 15, ty = OKC_TID >> 4;
    for (int rb = 0; rb < R; rb += 64) {
        for (int cb = 0; cb < Cn; cb += 64) {
            T acc[4][4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[u][v] = 0;
            int ro[4], co[4];
            bool rv[4], cv[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int r = rb + ty + 16 * u;
                rv[u] = r < R;
                ro[u] = (rv[u] ? r : 0) * a_rs;
            }
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int c = cb + tx + 16 * v;
                cv[v] = c < Cn;
                co[v] = (cv[v] ? c : 0) * b_cs;
            }
            for (int k = 0; k < K; ++k) {
                T av[4], bv[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) av[u] = rv[u] ? A[ro[u] + k * a_ks] : (T)0;
#pragma unroll
                for (int v = 0; v < 4; ++v) bv[v] = cv[v] ? B[k * b_ks + co[v]] : (T)0;
#pragma unroll
                for (int u = 0; u < 4; ++u)
#pragma unroll
                    for (int v = 0; v < 4; ++v) acc[u][v] += av[u] * bv[v];
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int v = 0; v < 4; ++v)
                    if (rv[u] && cv[v])
                        out[(int64_t)(rb + ty + 16 * u) * ldo + cb + tx + 16 * v] += acc[u][v];
        }
    }
}

#if OKC_MMA_AVAILABLE
// out (R x Cn, row-major, ldo) += A (R x K) * B (K x Cn); A row-major: A[r*lda + k], else
// col-major: A[k*lda + r]; B row-major: B[k*ldb + c], else col-major: B[c*ldb + k].
template <bool A_ROW, bool B_ROW>
OKC_DEV void mma_tf32x3_acc(float* out, int ldo, const float* A, int lda, const float* B, int ldb,
                            int R, int Cn, int K) {
    namespace w = okc_wmma;
    using LA = typename std::conditional<A_ROW, w::row_major, w::col_major>::type;
    using LB = typename std::conditional<B_ROW, w::row_major, w::col_major>::type;
    const int warp = OKC_TID >> 5;
    const int tr = R / 16, tc = Cn / 16;
    for (int t = warp; t < tr * tc; t += NW) {
        const int r0 = (t / tc) * 16, c0 = (t % tc) * 16;
        w::fragment<w::accumulator, 16, 16, 8, float> acc;
        w::load_matrix_sync(acc, out + (int64_t)r0 * ldo + c0, ldo, w::mem_row_major);
        for (int k0 = 0; k0 < K; k0 += 8) {
            w::fragment<w::matrix_a, 16, 16, 8, w::precision::tf32, LA> a_hi, a_lo;
            w::fragment<w::matrix_b, 16, 16, 8, w::precision::tf32, LB> b_hi, b_lo;
            const float* pa = A_ROW ? A + (int64_t)r0 * lda + k0 : A + (int64_t)k0 * lda + r0;
            const float* pb = B_ROW ? B + (int64_t)k0 * ldb + c0 : B + (int64_t)c0 * ldb + k0;
            w::load_matrix_sync(a_hi, pa, lda);
            w::load_matrix_sync(b_hi, pb, ldb);
#pragma unroll
            for (int e = 0; e < a_hi.num_elements; ++e) {
                const float v = a_hi.x[e];
                const float h = w::__float_to_tf32(v);
                a_hi.x[e] = h;
                a_lo.x[e] = w::__float_to_tf32(v - h);
            }
#pragma unroll
            for (int e = 0; e < b_hi.num_elements; ++e) {
                const float v = b_hi.x[e];
                const float h = w::__float_to_tf32(v);
                b_hi.x[e] = h;
                b_lo.x[e] = w::__float_to_tf32(v - h);
            }
            w::mma_sync(acc, a_lo, b_hi, acc);
            w::mma_sync(acc, a_hi, b_lo, acc);
            w::mma_sync(acc, a_hi, b_hi, acc);
        }
        w::store_matrix_sync(out + (int64_t)r0 * ldo + c0, acc, ldo, w::mem_row_major);
    }
}

// Same for 16-bit inputs (In = half or bf16), k-step 16, fp32 accumulation.
template <class In, bool A_ROW, bool B_ROW>
OKC_DEV void mma_f16_acc(float* out, int ldo, const In* A, int lda, const In* B, int ldb, int R,
                         int Cn, int K) {
    namespace w = okc_wmma;
    using LA = typename std::conditional<A_ROW, w::row_major, w::col_major>::type;
    using LB = typename std::conditional<B_ROW, w::row_major, w::col_major>::type;
    const int warp = OKC_TID >> 5;
    const int tr = R / 16, tc = Cn / 16;
    for (int t = warp; t < tr * tc; t += NW) {
        const int r0 = (t / tc) * 16, c0 = (t % tc) * 16;
        w::fragment<w::accumulator, 16, 16, 16, float> acc;
        w::load_matrix_sync(acc, out + (int64_t)r0 * ldo + c0, ldo, w::mem_row_major);
        for (int k0 = 0; k0 < K; k0 += 16) {
            w::fragment<w::matrix_a, 16, 16, 16, In, LA> fa;
            w::fragment<w::matrix_b, 16, 16, 16, In, LB> fb;
            const In* pa = A_ROW ? A + (int64_t)r0 * lda + k0 : A + (int64_t)k0 * lda + r0;
            const In* pb = B_ROW ? B + (int64_t)k0 * ldb + c0 : B + (int64_t)c0 * ldb + k0;
            w::load_matrix_sync(fa, pa, lda);
            w::load_matrix_sync(fb, pb, ldb);
            w::mma_sync(acc, fa, fb, acc);
        }
        w::store_matrix_sync(out + (int64_t)r0 * ldo + c0, acc, ldo, w::mem_row_major);
    }
}
#endif

// ------------------------------------------------------------------------------------------
// Staging geometry of the cost GEMM (shared by make_plan and the kernels)
// ------------------------------------------------------------------------------------------
enum Engine : int { kSimt = 0, kTf32x3 = 1, kMma16 = 2 };

OKC_HD int stage_pad(int engine) { return engine == kSimt ? 1 : (engine == kTf32x3 ? 4 : 8); }
OKC_HD int stage_elem(int engine, int tsize) {
    return engine == kSimt ? tsize : (engine == kTf32x3 ? 4 : 2);
}
// bytes of the cost-GEMM staging area (X chunk then Y chunk, each 128-aligned)
OKC_HD int64_t cost_stage_bytes(int engine, int tsize, int NP, int MP, int KC) {
    const int ld = KC + stage_pad(engine);
    const int el = stage_elem(engine, tsize);
    return align_up((int64_t)NP * ld * el, 128) + align_up((int64_t)MP * ld * el, 128);
}
// bytes of the chain-rule staging area (B chunk [K][DC+4] then W chunk [R][DC+4], T elements)
OKC_HD int64_t chain_stage_bytes(int tsize, int NP, int MP, int DC) {
    const int K = NP > MP ? NP : MP;
    return 2 * align_up((int64_t)K * (DC + 4) * tsize, 128);
}

// ------------------------------------------------------------------------------------------
// Cost tile from points
// ------------------------------------------------------------------------------------------
// Fills tile[i*pitch + j] (i < NPe, j < MPe) with C_ij for valid (i, j) and 0 elsewhere, and
// nx[i], ny[j] with the raw norms (cosine) or squared norms (sqeuclidean) of the rows.
template <class T, class In>
OKC_DEV void cost_tile_from_points(const Params& p, const Plan& pl, int k, T* tile, char* aux,
                                   const T* la, const T* lb, T* nx, T* ny, int n_eff, int m_eff) {
    const In* X = reinterpret_cast<const In*>(p.x) + (int64_t)k * p.sx[0];
    const In* Y = reinterpret_cast<const In*>(p.y) + (int64_t)k * p.sy[0];
    const int d = p.d;
    const int NPe = round_up(n_eff, 16), MPe = round_up(m_eff, 16);
    const int pitch = pl.pitch;
    const int lane = OKC_TID & 31, warp = OKC_TID >> 5;

    // norms (one warp per row)
    if (p.cost != kDot) {
        for (int r = warp; r < n_eff + m_eff; r += NW) {
            const bool isx = r < n_eff;
            const int i = isx ? r : r - n_eff;
            const In* row = isx ? X + (int64_t)i * p.sx[1] : Y + (int64_t)i * p.sy[1];
            const int64_t st = isx ? p.sx[2] : p.sy[2];
            T s = 0;
            for (int c = lane; c < d; c += 32) {
                const T v = load_as<T>(row, c * st);
                s += v * v;
            }
            s = warp_sum(s);
            if (lane == 0) {
                const T val = p.cost == kCosine ? okc_sqrt(s) : s;
                if (isx)
                    nx[i] = val;
                else
                    ny[i] = val;
            }
        }
    }
    // rows past the last valid one have norm 0 (read by the chain rule of the backward)
    for (int i = n_eff + OKC_TID; i < pl.NP; i += NT) nx[i] = 0;
    for (int j = m_eff + OKC_TID; j < pl.MP; j += NT) ny[j] = 0;
    if (p.cost == kDot) {
        for (int i = OKC_TID; i < n_eff; i += NT) nx[i] = 0;
        for (int j = OKC_TID; j < m_eff; j += NT) ny[j] = 0;
    }
    // zero the accumulation region
    for (int idx = OKC_TID; idx < NPe * MPe; idx += NT) {
        const int i = idx / MPe, j = idx - (idx / MPe) * MPe;
        tile[(int64_t)i * pitch + j] = 0;
    }
    okc_sync();

    const int engine = pl.mma ? (sizeof(In) == 2 ? kMma16 : kTf32x3) : kSimt;
    const int KC = pl.KC;
    const int ld = KC + stage_pad(engine);
    const int el = stage_elem(engine, (int)sizeof(T));
    char* xs_raw = aux;
    char* ys_raw = aux + align_up((int64_t)NPe * ld * el, 128);
    (void)el;
    for (int k0 = 0; k0 < d; k0 += KC) {
        const int kc = okc_min(KC, d - k0);
        if (engine == kMma16) {
            uint16_t* xs = reinterpret_cast<uint16_t*>(xs_raw);
            uint16_t* ys = reinterpret_cast<uint16_t*>(ys_raw);
            const uint16_t* Xb = reinterpret_cast<const uint16_t*>(X);
            const uint16_t* Yb = reinterpret_cast<const uint16_t*>(Y);
            for (int idx = OKC_TID; idx < (NPe + MPe) * KC; idx += NT) {
                const int r = idx / KC, c = idx - (idx / KC) * KC;
                uint16_t v = 0;
                if (r < NPe) {
                    if (r < n_eff && c < kc) v = Xb[(int64_t)r * p.sx[1] + (int64_t)(k0 + c) * p.sx[2]];
                    xs[r * ld + c] = v;
                } else {
                    const int j = r - NPe;
                    if (j < m_eff && c < kc) v = Yb[(int64_t)j * p.sy[1] + (int64_t)(k0 + c) * p.sy[2]];
                    ys[j * ld + c] = v;
                }
            }
        } else {
            typedef typename std::conditional<sizeof(T) == 8, double, float>::type S;
            S* xs = reinterpret_cast<S*>(xs_raw);
            S* ys = reinterpret_cast<S*>(ys_raw);
            for (int idx = OKC_TID; idx < (NPe + MPe) * KC; idx += NT) {
                const int r = idx / KC, c = idx - (idx / KC) * KC;
                S v = 0;
                if (r < NPe) {
                    if (r < n_eff && c < kc) v = (S)load_as<T>(X, (int64_t)r * p.sx[1] + (int64_t)(k0 + c) * p.sx[2]);
                    xs[r * ld + c] = v;
                } else {
                    const int j = r - NPe;
                    if (j < m_eff && c < kc) v = (S)load_as<T>(Y, (int64_t)j * p.sy[1] + (int64_t)(k0 + c) * p.sy[2]);
                    ys[j * ld + c] = v;
                }
            }
        }
        okc_sync();
#if OKC_MMA_AVAILABLE
        if (engine == kTf32x3) {
            mma_tf32x3_acc<true, false>(reinterpret_cast<float*>(tile), pitch,
                                        reinterpret_cast<const float*>(xs_raw), ld,
                                        reinterpret_cast<const float*>(ys_raw), ld, NPe, MPe, KC);
        } else if (engine == kMma16) {
            if constexpr (sizeof(In) == 2) {
                mma_f16_acc<In, true, false>(reinterpret_cast<float*>(tile), pitch,
                                             reinterpret_cast<const In*>(xs_raw), ld,
                                             reinterpret_cast<const In*>(ys_raw), ld, NPe, MPe,
                                             KC);
            }
        } else
#endif
        {
            // A(r,k) = xs[r*ld + k]; B(k,c) = ys[c*ld + k]
            simt_gemm_acc<T>(tile, pitch, reinterpret_cast<const T*>(xs_raw), ld, 1,
                             reinterpret_cast<const T*>(ys_raw), 1, ld, NPe, MPe, kc);
        }
        okc_sync();
    }

    // transform the dot products into costs; 0 outside the valid entries
    for (int idx = OKC_TID; idx < NPe * MPe; idx += NT) {
        const int i = idx / MPe, j = idx - (idx / MPe) * MPe;
        T* cp = tile + (int64_t)i * pitch + j;
        const bool ok = la[i] > Lim<T>::ninf() && lb[j] > Lim<T>::ninf();
        T c = 0;
        if (ok) {
            const T D = *cp;
            if (p.cost == kCosine) {
                // |x| < 1e-8: no direction, x̂ = 0 and C = 1 (costs.py)
                c = (nx[i] < (T)1e-8 || ny[j] < (T)1e-8) ? (T)1 : (T)1 - D / (nx[i] * ny[j]);
            } else if (p.cost == kSqEuclidean) {
                c = okc_max(nx[i] + ny[j] - (T)2 * D, (T)0);
            } else {
                c = -D;
            }
        }
        *cp = c;
    }
    okc_sync();
}

}  // namespace okc
