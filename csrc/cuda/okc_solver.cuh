// Device building blocks of the forward solve (docs/design.md §2, config.py iteration map), shared by
// the forward and backward kernels: cost-tile loading, the error and value passes.
#pragma once

#include "okc_common.cuh"
#include "okc_gemm.cuh"

namespace okc {

// Pointers into the vector arena of one block.
template <class T>
struct Vecs {
    T *la, *lb, *f, *g, *hr, *hc, *nx, *ny, *redM, *redS, *scal;
    T *fb, *gb, *rs, *cs, *v0, *v1, *v2, *v3, *v4, *v5;
};

template <class T>
OKC_DEV Vecs<T> carve_vecs(char* sm, const Plan& pl, bool backward) {
    const VecLayout L = vec_layout(pl.NP, pl.MP, backward);
    T* base = reinterpret_cast<T*>(sm + pl.off_vec);
    Vecs<T> V;
    V.la = base + L.la;
    V.lb = base + L.lb;
    V.f = base + L.f;
    V.g = base + L.g;
    V.hr = base + L.hr;
    V.hc = base + L.hc;
    V.nx = base + L.nx;
    V.ny = base + L.ny;
    V.redM = base + L.redM;
    V.redS = base + L.redS;
    V.scal = base + L.scal;
    V.fb = backward ? base + L.fb : nullptr;
    V.gb = backward ? base + L.gb : nullptr;
    V.rs = backward ? base + L.rs : nullptr;
    V.cs = backward ? base + L.cs : nullptr;
    V.v0 = backward ? base + L.v0 : nullptr;
    V.v1 = backward ? base + L.v1 : nullptr;
    V.v2 = backward ? base + L.v2 : nullptr;
    V.v3 = backward ? base + L.v3 : nullptr;
    V.v4 = backward ? base + L.v4 : nullptr;
    V.v5 = backward ? base + L.v5 : nullptr;
    return V;
}

// The cost tile of problem k: shared memory or the workspace. Fills it (C copied, or computed
// from x, y) for the valid entries, 0 elsewhere in [0, n_eff) x [0, m_eff) (matrix) or
// [0, NPe) x [0, MPe) (points). Ends with a barrier.
template <class T, class In>
OKC_DEV T* build_cost_tile(const Params& p, const Plan& pl, int k, char* sm, char* aux,
                           const Vecs<T>& V, int n_eff, int m_eff) {
    T* tile = pl.c_smem ? reinterpret_cast<T*>(sm + pl.off_c)
                        : reinterpret_cast<T*>(reinterpret_cast<char*>(p.workspace) +
                                               (int64_t)k * pl.ws_stride + pl.ws_off_c);
    if (p.cost == kGiven) {
        const T* C = reinterpret_cast<const T*>(p.C) + (int64_t)k * p.sC[0];
        for (int idx = OKC_TID; idx < n_eff * m_eff; idx += NT) {
            const int i = idx / m_eff, j = idx - (idx / m_eff) * m_eff;
            const bool ok = V.la[i] > Lim<T>::ninf() && V.lb[j] > Lim<T>::ninf();
            tile[(int64_t)i * pl.pitch + j] = ok ? C[(int64_t)i * p.sC[1] + (int64_t)j * p.sC[2]] : (T)0;
        }
        okc_sync();
    } else {
        cost_tile_from_points<T, In>(p, pl, k, tile, aux, V.la, V.lb, V.nx, V.ny, n_eff, m_eff);
    }
    return tile;
}

template <class T>
OKC_DEV T exp2_capped(T z) {
    return okc_exp2(okc_min(z, Lim<T>::max_exp2()));
}

// log2 P_ij = (f_i + g_j - C_ij) * s + log2 a_i + log2 b_j, s = log2(e)/eps, the sum of the
// potentials and the cost taken in cost units first (as the reference's log_plan).
template <class T>
OKC_DEV T log2_plan(const Vecs<T>& V, int i, int j, T c, T s) {
    return (V.f[i] + V.g[j] - c) * s + (V.la[i] + V.lb[j]);
}
// P_ij for a valid row i (0 for an invalid column j).
template <class T>
OKC_DEV T plan_entry(const Vecs<T>& V, int i, int j, T c, T s) {
    return V.lb[j] > Lim<T>::ninf() ? exp2_capped(log2_plan(V, i, j, c, s)) : (T)0;
}

// L1 row-marginal error of (f, g) at eps (config.py): sum_i |sum_j P_ij - a_i exp(-f_i/rho)|,
// for unbalanced problems divided by max(sum_i r_i, sum_i target_i) (relative to the mass).
// Returns the block-uniform value.
template <class T>
OKC_DEV T row_error(const Params& p, const T* A, const T* tile, int pitch, const Vecs<T>& V,
                    int n_eff, int m_eff) {
    const T s = (T)(LOG2E / p.eps);
    T acc = 0, rsum = 0, tsum = 0;
    // log2 r_i = log2 a_i + f_i s + LSE2_j[(g_j - C_ij) s + log2 b_j]
    rows_lse2(tile, pitch, V.la, V.lb, V.g, s, n_eff, m_eff, [&](int i, T M, T S) {
        const T r = exp2_capped(V.la[i] + V.f[i] * s + M + okc_log2(S));
        T target = A[i];
        if (p.rho > 0) target *= (T)exp(-(double)V.f[i] / p.rho);
        acc += okc_abs(r - target);
        rsum += r;
        tsum += target;
    });
    const T e = block_sum(acc, V.scal);
    if (!(p.rho > 0)) return e;
    block_sum2(rsum, tsum, V.scal);
    const T d = okc_max(rsum, tsum);
    return d > (T)0 ? e / d : (T)0;
}

// value_linear = sum P C and value = value_linear + eps KL(P|a b) [+ rho KL(P1|a) + rho KL(P^T 1|b)]
template <class T>
OKC_DEV void plan_values(const Params& p, const T* A, const T* Bw, const T* tile, int pitch,
                         const Vecs<T>& V, const ProblemInfo<T>& P, T& value, T& value_linear) {
    const int n_eff = P.n_eff, m_eff = P.m_eff;
    const T s = (T)(LOG2E / p.eps);
    const T inv = (T)(1.0 / p.eps);
    T lin = 0, kl = 0, mass = 0, rkl = 0;
    for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
        const bool ok = in_range && V.la[i] > Lim<T>::ninf();
        T rsum = 0;
        if (ok) {
            const T* row = tile + (int64_t)i * pitch;
            const T fi = V.f[i], lai = V.la[i];
#pragma unroll
            for (int q = 0; q < kMaxPerLane; ++q) {
                const int j = j0 + gs * q;
                if (j < m_eff && V.lb[j] > Lim<T>::ninf()) {
                    const T c = row[j];
                    const T w = fi + V.g[j] - c;
                    const T pp = exp2_capped(w * s + (lai + V.lb[j]));
                    lin += pp * c;
                    kl += pp * (w * inv);
                    rsum += pp;
                }
            }
        }
        rsum = group_sum(rsum, gs);
        if (ok && j0 == 0) {
            mass += rsum;
            if (p.rho > 0) {
                const T ai = A[i];
                rkl += (rsum > 0 ? rsum * okc_log(rsum / ai) : (T)0) - rsum + ai;
            }
        }
    });
    block_sum2(lin, kl, V.scal);
    block_sum2(mass, rkl, V.scal);
    T ckl = 0;
    if (p.rho > 0) {
        T part = 0;
        cols_sum<T>(
            n_eff, m_eff, V.redS, [&](int i) { return V.la[i] > Lim<T>::ninf(); },
            [&](int i, int j) { return plan_entry(V, i, j, tile[(int64_t)i * pitch + j], s); },
            [&](int j, T c) {
                if (V.lb[j] > Lim<T>::ninf()) {
                    const T bj = Bw[j];
                    part += (c > 0 ? c * okc_log(c / bj) : (T)0) - c + bj;
                }
            });
        ckl = block_sum(part, V.scal);
    }
    value_linear = lin;
    const T eps = (T)p.eps;
    value = lin + eps * (kl - mass + P.sum_a * P.sum_b);
    if (p.rho > 0) value += (T)p.rho * (rkl + ckl);
}

}  // namespace okc
