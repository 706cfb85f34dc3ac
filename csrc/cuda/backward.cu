// Resident backward kernel (docs/design.md §3, §5): one block per problem. Rebuilds the cost tile and
// P from (f, g), forms G = dL/dC on chip in the work tile W according to the gradient mode
//   envelope : G = (gv + gl) P
//   implicit : G = gv P + gl P (1 + (u_i + v_j - C_ij)/eps),  H [u; v] = [(P∘C)1; (P∘C)^T 1]
//              H = [[diag(r) k, P], [P^T, diag(c) k]], k = 1 + eps/rho (1 when balanced),
//              solved by Jacobi-preconditioned CG restricted to the valid entries
//   unrolled : reverse replay of the stored per-iteration potentials
// (gv, gl: incoming gradients of value and value_linear), then writes G (matrix input) or the
// chain rule dx = dC/dx^T G, dy (points input) with block GEMMs.
#include <algorithm>

#include "okc_solver.cuh"

namespace okc {

// Elementwise W_ij = scale * P_ij on the valid rows (W zero elsewhere already).
template <class T>
OKC_DEV void write_scaled_plan(T* W, int wp, const T* tile, int pitch, const Vecs<T>& V, T s, T scale,
                               int n_eff, int m_eff) {
    for (int idx = OKC_TID; idx < n_eff * m_eff; idx += NT) {
        const int i = idx / m_eff, j = idx - (idx / m_eff) * m_eff;
        if (V.la[i] > Lim<T>::ninf())
            W[(int64_t)i * wp + j] = scale * plan_entry(V, i, j, tile[(int64_t)i * pitch + j], s);
    }
}

// Implicit gradient of value_linear (plus gv P): W holds the result on exit.
template <class T>
OKC_DEV void implicit_grad(const Params& p, T* W, int wp, const T* tile, int pitch, const Vecs<T>& V,
                           const ProblemInfo<T>& P, T gv, T gl) {
    const int n_eff = P.n_eff, m_eff = P.m_eff;
    const T s = (T)(LOG2E / p.eps);
    const T inv = (T)(1.0 / p.eps);
    const T kappa = p.rho > 0 ? (T)(1.0 + p.eps / p.rho) : (T)1;
    const T ninf = Lim<T>::ninf();
    // vectors over [u (n_eff) | v (m_eff)], offset of v: vo
    const int vo = n_eff;
    T* x = V.v0;
    T* r = V.v1;
    T* z = V.v2;
    T* pv = V.v3;
    T* q = V.v4;
    T* dinv = V.v5;
    const int len = n_eff + m_eff;

    // 1. P into W, row sums and row rhs
    for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
        const bool ok = in_range && V.la[i] > ninf;
        T rsum = 0, rhs = 0;
        if (ok) {
            T* wrow = W + (int64_t)i * wp;
            const T* crow = tile + (int64_t)i * pitch;
#pragma unroll
            for (int q2 = 0; q2 < kMaxPerLane; ++q2) {
                const int j = j0 + gs * q2;
                if (j < m_eff) {
                    const T c = crow[j];
                    const T pp = plan_entry(V, i, j, c, s);
                    wrow[j] = pp;
                    rsum += pp;
                    rhs += pp * c;
                }
            }
        }
        rsum = group_sum(rsum, gs);
        rhs = group_sum(rhs, gs);
        if (in_range && j0 == 0) {
            V.rs[i] = ok ? rsum * kappa : (T)0;
            r[i] = ok ? rhs : (T)0;
        }
    });
    okc_sync();
    // 2. column sums and column rhs (W now holds P)
    for_cols(n_eff, m_eff, [&](int j, int i0, int i1, int slot) {
        T csum = 0, rhs = 0;
        for (int i = i0; i < i1; ++i) {
            if (!(V.la[i] > ninf)) continue;
            const T pp = W[(int64_t)i * wp + j];
            csum += pp;
            rhs += pp * tile[(int64_t)i * pitch + j];
        }
        V.redM[slot] = csum;
        V.redS[slot] = rhs;
    });
    okc_sync();
    {
        const ColSplit cs = col_split(n_eff, m_eff);
        const int Wd = cs.nstrips * 32;
        for (int j = OKC_TID; j < m_eff; j += NT) {
            T csum = 0, rhs = 0;
            for (int pp = 0; pp < cs.nsplit; ++pp) {
                csum += V.redM[pp * Wd + j];
                rhs += V.redS[pp * Wd + j];
            }
            const bool ok = V.lb[j] > ninf;
            V.cs[j] = ok ? csum * kappa : (T)0;
            r[vo + j] = ok ? rhs : (T)0;
        }
    }
    okc_sync();
    // 3. CG setup: x = 0, z = M^-1 r, p = z
    T rz = 0, bb = 0;
    for (int idx = OKC_TID; idx < len; idx += NT) {
        const T dg = idx < vo ? V.rs[idx] : V.cs[idx - vo];
        const T di = dg > 0 ? (T)1 / dg : (T)0;
        dinv[idx] = di;
        x[idx] = 0;
        q[idx] = 0;
        const T ri = r[idx];
        z[idx] = di * ri;
        pv[idx] = di * ri;
        rz += ri * di * ri;
        bb += ri * ri;
    }
    block_sum2(rz, bb, V.scal);
    // cap and relative residual resolved by the host (SolverConfig.cg_limits; checked >= 1, > 0)
    const int maxit = p.cg_max_iter;
    const double tol = p.cg_tol;
    const T stop = (T)(tol * tol) * bb;
    if (bb > 0 && rz > 0) {
        for (int it = 0; it < maxit; ++it) {
            // q = H p (rows then columns)
            for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
                const bool ok = in_range && V.la[i] > ninf;
                T acc = 0;
                if (ok) {
                    const T* wrow = W + (int64_t)i * wp;
#pragma unroll
                    for (int q2 = 0; q2 < kMaxPerLane; ++q2) {
                        const int j = j0 + gs * q2;
                        if (j < m_eff) acc += wrow[j] * pv[vo + j];
                    }
                }
                acc = group_sum(acc, gs);
                if (in_range && j0 == 0) q[i] = ok ? V.rs[i] * pv[i] + acc : (T)0;
            });
            cols_sum<T>(
                n_eff, m_eff, V.redS, [&](int i) { return V.la[i] > ninf; },
                [&](int i, int j) { return W[(int64_t)i * wp + j] * pv[i]; },
                [&](int j, T acc) {
                    q[vo + j] = V.lb[j] > ninf ? acc + V.cs[j] * pv[vo + j] : (T)0;
                });
            T pq = 0;
            for (int idx = OKC_TID; idx < len; idx += NT) pq += pv[idx] * q[idx];
            pq = block_sum(pq, V.scal);
            if (!(pq > 0)) break;
            const T alpha = rz / pq;
            T rr = 0, rz_new = 0;
            for (int idx = OKC_TID; idx < len; idx += NT) {
                x[idx] += alpha * pv[idx];
                const T ri = r[idx] - alpha * q[idx];
                r[idx] = ri;
                const T zi = dinv[idx] * ri;
                z[idx] = zi;
                rr += ri * ri;
                rz_new += ri * zi;
            }
            block_sum2(rr, rz_new, V.scal);
            if (rr <= stop || !(rz_new > 0)) break;
            const T beta = rz_new / rz;
            rz = rz_new;
            for (int idx = OKC_TID; idx < len; idx += NT) pv[idx] = z[idx] + beta * pv[idx];
            okc_sync();
        }
    }
    okc_sync();
    // 4. G = P (gv + gl (1 + (u_i + v_j - C_ij)/eps))
    for (int idx = OKC_TID; idx < n_eff * m_eff; idx += NT) {
        const int i = idx / m_eff, j = idx - (idx / m_eff) * m_eff;
        if (!(V.la[i] > ninf)) continue;
        T* wp_ = W + (int64_t)i * wp + j;
        const T c = tile[(int64_t)i * pitch + j];
        *wp_ = *wp_ * (gv + gl * ((T)1 + (x[i] + x[vo + j] - c) * inv));
    }
    okc_sync();
}

// Unrolled gradient: exact derivative of the iterations run (history of potentials).
template <class T>
OKC_DEV void unrolled_grad(const Params& p, int k, T* W, int wp, const T* tile, int pitch,
                           const Vecs<T>& V, const ProblemInfo<T>& P, const T* A, const T* Bw, T gv,
                           T gl) {
    const int n_eff = P.n_eff, m_eff = P.m_eff;
    const int n = p.n, m = p.m;
    const T ninf = Lim<T>::ninf();
    const T s = (T)(LOG2E / p.eps);
    const T inv = (T)(1.0 / p.eps);
    const T rho = (T)p.rho;
    const bool unb = p.rho > 0;
    T* lr = V.v0;  // log(r_i / a_i)
    T* lc = V.v1;  // log(c_j / b_j)

    // ---- 0. marginals of the final plan (unbalanced value only)
    for (int i = OKC_TID; i < n_eff; i += NT) lr[i] = 0;
    for (int j = OKC_TID; j < m_eff; j += NT) lc[j] = 0;
    okc_sync();
    if (unb && gv != (T)0) {
        for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
            const bool ok = in_range && V.la[i] > ninf;
            T acc = 0;
            if (ok) {
                const T* crow = tile + (int64_t)i * pitch;
#pragma unroll
                for (int q2 = 0; q2 < kMaxPerLane; ++q2) {
                    const int j = j0 + gs * q2;
                    if (j < m_eff) acc += plan_entry(V, i, j, crow[j], s);
                }
            }
            acc = group_sum(acc, gs);
            if (ok && j0 == 0) lr[i] = acc > 0 ? okc_log(acc / A[i]) : (T)0;
        });
        cols_sum<T>(
            n_eff, m_eff, V.redS, [&](int i) { return V.la[i] > ninf; },
            [&](int i, int j) { return plan_entry(V, i, j, tile[(int64_t)i * pitch + j], s); },
            [&](int j, T c) {
                if (V.lb[j] > ninf) lc[j] = c > 0 ? okc_log(c / Bw[j]) : (T)0;
            });
    }
    // ---- 1. adjoints of the final (f, g, C): Q_ij = P_ij dL/dP_ij
    //   dvalue/dP_ij = f_i + g_j + rho (lr_i + lc_j),  dvalue_linear/dP_ij = C_ij
    //   W = (gv + gl) P - Q/eps, fb_i = sum_j Q_ij/eps, gb_j = sum_i Q_ij/eps
    auto qterm = [&](int i, int j, T c, T pp) {
        T dv = V.f[i] + V.g[j];
        if (unb) dv += rho * (lr[i] + lc[j]);
        return pp * (gv * dv + gl * c);
    };
    for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
        const bool ok = in_range && V.la[i] > ninf;
        T acc = 0;
        if (ok) {
            const T* crow = tile + (int64_t)i * pitch;
            T* wrow = W + (int64_t)i * wp;
#pragma unroll
            for (int q2 = 0; q2 < kMaxPerLane; ++q2) {
                const int j = j0 + gs * q2;
                if (j < m_eff && V.lb[j] > ninf) {
                    const T c = crow[j];
                    const T pp = exp2_capped(log2_plan(V, i, j, c, s));
                    const T Q = qterm(i, j, c, pp);
                    wrow[j] = (gv + gl) * pp - Q * inv;
                    acc += Q * inv;
                }
            }
        }
        acc = group_sum(acc, gs);
        if (in_range && j0 == 0) V.fb[i] = ok ? acc : (T)0;
    });
    cols_sum<T>(
        n_eff, m_eff, V.redS, [&](int i) { return V.la[i] > ninf; },
        [&](int i, int j) {
            if (!(V.lb[j] > ninf)) return (T)0;
            const T c = tile[(int64_t)i * pitch + j];
            const T pp = exp2_capped(log2_plan(V, i, j, c, s));
            return qterm(i, j, c, pp) * inv;
        },
        [&](int j, T acc) { V.gb[j] = V.lb[j] > ninf ? acc : (T)0; });

    // ---- 2. reverse replay, t = T .. 1 (none without a history: direct partials only)
    okc_sync();
    if (!p.hist_f || !p.hist_g) return;
    int T_iters = reinterpret_cast<const int*>(p.n_iters)[k];
    if (T_iters > p.hist_T) T_iters = p.hist_T;
    const T* hfk = reinterpret_cast<const T*>(p.hist_f) + (int64_t)k * n;
    const T* hgk = reinterpret_cast<const T*>(p.hist_g) + (int64_t)k * m;
    const int64_t sf = (int64_t)p.B * n, sg = (int64_t)p.B * m;  // stride of one iteration
    T* ft = V.v2;  // f^t
    T* gp = V.v4;  // g^{t-1}
    for (int t = T_iters; t >= 1; --t) {
        const double eps_t = eps_at(p, t);
        const double lamd = damping(p, eps_t);
        const T lam = (T)lamd;
        const T st = (T)(LOG2E / eps_t);
        for (int i = OKC_TID; i < n_eff; i += NT) ft[i] = hfk[(int64_t)(t - 1) * sf + i];
        for (int j = OKC_TID; j < m_eff; j += NT) gp[j] = t >= 2 ? hgk[(int64_t)(t - 2) * sg + j] : (T)0;
        okc_sync();
        // alpha_ij = exp(log a_i + (f^t_i - C_ij)/eps_t - L_j), L_j = LSE_i[...] recomputed here
        // (not -g^t_j/(lam eps_t)): the adjoints are large and cancel, the column sums of alpha
        // must be 1 to rounding, as the reference's softmax: alpha = exp2(z - M_j) / S_j with
        // hc[j] = M_j, cs[j] = 1 / S_j (cs is free in this mode).
        cols_lse2(tile, pitch, V.la, ft, st, n_eff, m_eff, V.redM, V.redS, [&](int j, T M, T S) {
            V.hc[j] = M;
            V.cs[j] = S > 0 ? (T)1 / S : (T)0;
        });
        // fb_i -= lam sum_j gb_j alpha_ij ;  W_ij += lam gb_j alpha_ij
        for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
            const bool ok = in_range && V.la[i] > ninf;
            T acc = 0;
            if (ok) {
                const T* crow = tile + (int64_t)i * pitch;
                T* wrow = W + (int64_t)i * wp;
                const T fi = ft[i], lai = V.la[i];
#pragma unroll
                for (int q2 = 0; q2 < kMaxPerLane; ++q2) {
                    const int j = j0 + gs * q2;
                    if (j < m_eff && V.lb[j] > ninf) {
                        const T al = exp2_capped((fi - crow[j]) * st + lai - V.hc[j]) * V.cs[j];
                        const T w = V.gb[j] * al;
                        acc += w;
                        wrow[j] += lam * w;
                    }
                }
            }
            acc = group_sum(acc, gs);
            if (ok && j0 == 0) V.fb[i] -= lam * acc;
        });
        okc_sync();
        // beta_ij = exp(log b_j + (g^{t-1}_j - C_ij)/eps_t - L_i) = exp2(z - M_i) / S_i:
        // hr[i] = M_i, rs[i] = 1 / S_i (rs is free in this mode)
        rows_lse2(tile, pitch, V.la, V.lb, gp, st, n_eff, m_eff, [&](int i, T M, T S) {
            V.hr[i] = M;
            V.rs[i] = (T)1 / S;
        });
        okc_sync();
        // gb_j = -lam sum_i fb_i beta_ij ;  W_ij += lam fb_i beta_ij
        cols_sum<T>(
            n_eff, m_eff, V.redS, [&](int i) { return V.la[i] > ninf; },
            [&](int i, int j) {
                if (!(V.lb[j] > ninf)) return (T)0;
                T* wq = W + (int64_t)i * wp + j;
                const T be =
                    exp2_capped((gp[j] - tile[(int64_t)i * pitch + j]) * st + V.lb[j] - V.hr[i]) * V.rs[i];
                const T w = V.fb[i] * be;
                *wq += lam * w;
                return w;
            },
            [&](int j, T acc) { V.gb[j] = V.lb[j] > ninf ? -lam * acc : (T)0; });
        for (int i = OKC_TID; i < n_eff; i += NT) V.fb[i] = 0;
        okc_sync();
    }
}

// Chain rule of the fused cost: dx (for_y = false) or dy (for_y = true), [rows, d], from the
// work tile W = dL/dC (zero outside the valid entries, padded to 16 with zeros).
template <class T, class In>
OKC_DEV void chain_rule(const Params& p, const Plan& pl, int k, const T* W, int wp, char* aux,
                        const Vecs<T>& V, int n_eff, int m_eff, bool for_y) {
    const int d = p.d;
    const int DC = pl.DC;
    const int ldb = DC + 4;
    const int NPe = round_up(n_eff, 16), MPe = round_up(m_eff, 16);
    const int rows = for_y ? p.m : p.n;       // output rows
    const int R = for_y ? MPe : NPe;          // computed rows
    const int K = for_y ? NPe : MPe;          // reduction length
    const int kvalid = for_y ? n_eff : m_eff;
    const In* own = reinterpret_cast<const In*>(for_y ? p.y : p.x) + (int64_t)k * (for_y ? p.sy[0] : p.sx[0]);
    const int64_t own_r = for_y ? p.sy[1] : p.sx[1], own_c = for_y ? p.sy[2] : p.sx[2];
    const In* oth = reinterpret_cast<const In*>(for_y ? p.x : p.y) + (int64_t)k * (for_y ? p.sx[0] : p.sy[0]);
    const int64_t oth_r = for_y ? p.sx[1] : p.sy[1], oth_c = for_y ? p.sx[2] : p.sy[2];
    const T* own_norm = for_y ? V.ny : V.nx;
    const T* oth_norm = for_y ? V.nx : V.ny;
    const T* marg = for_y ? V.cs : V.rs;  // row / column sums of W
    T* rowdot = for_y ? V.v5 : V.fb;      // per-row x.W of the cosine rule (NP+MP / NP entries)
    T* out = reinterpret_cast<T*>(for_y ? p.dy : p.dx) + (int64_t)k * rows * d;
    T* Bs = reinterpret_cast<T*>(aux);
    T* Wc = reinterpret_cast<T*>(aux + align_up((int64_t)(pl.NP > pl.MP ? pl.NP : pl.MP) * ldb * (int64_t)sizeof(T), 128));
    const bool cosine = p.cost == kCosine;

    for (int r = OKC_TID; r < rows; r += NT) rowdot[r] = 0;
    for (int c0 = 0; c0 < d; c0 += DC) {
        // stage the other side's chunk (scaled to unit norm for cosine), zero the output chunk
        for (int idx = OKC_TID; idx < K * DC; idx += NT) {
            const int kk = idx / DC, c = idx - (idx / DC) * DC;
            T v = 0;
            if (kk < kvalid && c0 + c < d) {
                v = load_as<T>(oth, (int64_t)kk * oth_r + (int64_t)(c0 + c) * oth_c);
                if (cosine) v = oth_norm[kk] < (T)1e-8 ? (T)0 : v / oth_norm[kk];  // x̂ = 0
            }
            Bs[kk * ldb + c] = v;
        }
        for (int idx = OKC_TID; idx < R * ldb; idx += NT) Wc[idx] = 0;
        okc_sync();
#if OKC_MMA_AVAILABLE
        if constexpr (sizeof(T) == 4) {
            if (pl.mma) {
                if (for_y)
                    mma_tf32x3_acc<false, true>(reinterpret_cast<float*>(Wc), ldb,
                                                reinterpret_cast<const float*>(W), wp,
                                                reinterpret_cast<const float*>(Bs), ldb, R, DC, K);
                else
                    mma_tf32x3_acc<true, true>(reinterpret_cast<float*>(Wc), ldb,
                                               reinterpret_cast<const float*>(W), wp,
                                               reinterpret_cast<const float*>(Bs), ldb, R, DC, K);
            }
        }
        if (sizeof(T) != 4 || !pl.mma)
#endif
        {
            if (for_y)
                simt_gemm_acc<T>(Wc, ldb, W, 1, wp, Bs, ldb, 1, R, DC, K);
            else
                simt_gemm_acc<T>(Wc, ldb, W, wp, 1, Bs, ldb, 1, R, DC, K);
        }
        okc_sync();
        // epilogue over (r < rows, c < DC): group of DC lanes per row; uniform trip count
        for (int base = 0; base < rows * DC; base += NT) {
            const int idx = base + OKC_TID;
            const int r = idx / DC, c = idx - (idx / DC) * DC;
            const bool in = r < rows && c0 + c < d;
            const T w = (in && r < R) ? Wc[r * ldb + c] : (T)0;
            const T xv = in ? load_as<T>(own, (int64_t)r * own_r + (int64_t)(c0 + c) * own_c) : (T)0;
            T o = 0;
            if (p.cost == kDot) {
                o = -w;
            } else if (p.cost == kSqEuclidean) {
                o = (T)2 * (marg[r < rows ? r : 0] * xv - w);
            } else {
                o = w;  // W = G yhat, finished below
            }
            if (cosine) {
                const T part = group_sum(xv * w, DC);
                if (in && c == 0) rowdot[r] += part;
            }
            if (in) out[(int64_t)r * d + c0 + c] = o;
        }
        okc_sync();
    }
    if (cosine) {
        // dx_i = -(1/|x_i|) (W_i - xhat_i (xhat_i . W_i)) = -W_i/|x_i| + x_i (x_i . W_i)/|x_i|^3
        for (int idx = OKC_TID; idx < rows * d; idx += NT) {
            const int r = idx / d, c = idx - (idx / d) * d;
            const T w = out[idx];
            const T nr = own_norm[r];
            T o;
            if (!(nr < (T)1e-8)) {  // cost_vjp: |x| < 1e-8 has no direction, gradient 0
                const T xv = load_as<T>(own, (int64_t)r * own_r + (int64_t)c * own_c);
                o = -w / nr + xv * (rowdot[r] / (nr * nr * nr));
            } else {
                o = 0;
            }
            out[idx] = o;
        }
        okc_sync();
    }
}

template <class T, class In>
OKC_GLOBAL_KERNEL backward_kernel(Params p, Plan pl) {
    const int k = OKC_BID;
    const int n = p.n, m = p.m;
    char* sm = okc_dyn_smem();
    const Vecs<T> V = carve_vecs<T>(sm, pl, true);
    const bool sample = p.cost != kGiven;
    const T* A = reinterpret_cast<const T*>(p.a) + (int64_t)k * n;
    const T* Bw = reinterpret_cast<const T*>(p.b) + (int64_t)k * m;
    T* Gout = sample ? nullptr : reinterpret_cast<T*>(p.G) + (int64_t)k * n * m;

    const ProblemInfo<T> P = load_weights(A, Bw, n, m, pl.NP, pl.MP, V.la, V.lb, V.scal);
    if (P.n_eff == 0) {  // empty problem: zero gradient
        if (sample) {
            T* dx = reinterpret_cast<T*>(p.dx) + (int64_t)k * n * p.d;
            for (int64_t idx = OKC_TID; idx < (int64_t)n * p.d; idx += NT) dx[idx] = 0;
            if (p.need_dy) {
                T* dy = reinterpret_cast<T*>(p.dy) + (int64_t)k * m * p.d;
                for (int64_t idx = OKC_TID; idx < (int64_t)m * p.d; idx += NT) dy[idx] = 0;
            }
        } else {
            for (int64_t idx = OKC_TID; idx < (int64_t)n * m; idx += NT) Gout[idx] = 0;
        }
        return;
    }
    const int n_eff = P.n_eff, m_eff = P.m_eff;
    char* aux = sm + pl.off_aux;
    const T* tile = build_cost_tile<T, In>(p, pl, k, sm, aux, V, n_eff, m_eff);
    const int pitch = pl.pitch;

    T* W;
    int wp;
    if (pl.w_smem) {
        W = reinterpret_cast<T*>(sm + pl.off_w);
        wp = pitch;
    } else if (pl.w_is_G) {
        W = Gout;
        wp = m;
    } else {
        W = reinterpret_cast<T*>(reinterpret_cast<char*>(p.workspace) + (int64_t)k * pl.ws_stride +
                                 pl.ws_off_w);
        wp = pitch;
    }
    // zero the work region (and the whole output when W is the output)
    {
        const int zr = pl.w_is_G ? n : (sample ? round_up(n_eff, 16) : n_eff);
        const int zc = pl.w_is_G ? m : (sample ? round_up(m_eff, 16) : m_eff);
        for (int idx = OKC_TID; idx < zr * zc; idx += NT) {
            const int i = idx / zc, j = idx - (idx / zc) * zc;
            W[(int64_t)i * wp + j] = 0;
        }
    }
    const T* fin = reinterpret_cast<const T*>(p.f) + (int64_t)k * n;
    const T* gin = reinterpret_cast<const T*>(p.g) + (int64_t)k * m;
    for (int i = OKC_TID; i < pl.NP; i += NT) {
        V.f[i] = (i < n_eff && V.la[i] > Lim<T>::ninf()) ? fin[i] : (T)0;
        V.fb[i] = 0;
        V.rs[i] = 0;
    }
    for (int j = OKC_TID; j < pl.MP; j += NT) {
        V.g[j] = (j < m_eff && V.lb[j] > Lim<T>::ninf()) ? gin[j] : (T)0;
        V.gb[j] = 0;
        V.cs[j] = 0;
    }
    okc_sync();
    const T gv = reinterpret_cast<const T*>(p.grad_value)[k];
    const T gl = reinterpret_cast<const T*>(p.grad_value_linear)[k];
    const T s = (T)(LOG2E / p.eps);

    if (p.mode == kImplicit && gl != (T)0) {
        implicit_grad(p, W, wp, tile, pitch, V, P, gv, gl);
    } else if (p.mode == kUnrolled) {
        unrolled_grad(p, k, W, wp, tile, pitch, V, P, A, Bw, gv, gl);
    } else {
        const T scale = p.mode == kImplicit ? gv : gv + gl;
        write_scaled_plan(W, wp, tile, pitch, V, s, scale, n_eff, m_eff);
    }
    okc_sync();

    if (!sample) {
        if (!pl.w_is_G) {
            for (int64_t idx = OKC_TID; idx < (int64_t)n * m; idx += NT) {
                const int i = (int)(idx / m), j = (int)(idx - (idx / m) * m);
                Gout[idx] = (i < n_eff && j < m_eff) ? W[(int64_t)i * wp + j] : (T)0;
            }
        }
        return;
    }
    // row / column sums of G (sqeuclidean chain rule)
    if (p.cost == kSqEuclidean) {
        for_rows(n_eff, m_eff, [&](int i, bool in_range, int j0, int gs) {
            T acc = 0;
            if (in_range) {
#pragma unroll
                for (int q2 = 0; q2 < kMaxPerLane; ++q2) {
                    const int j = j0 + gs * q2;
                    if (j < m_eff) acc += W[(int64_t)i * wp + j];
                }
            }
            acc = group_sum(acc, gs);
            if (in_range && j0 == 0) V.rs[i] = acc;
        });
        cols_sum<T>(
            n_eff, m_eff, V.redS, [&](int) { return true; },
            [&](int i, int j) { return W[(int64_t)i * wp + j]; }, [&](int j, T acc) { V.cs[j] = acc; });
    }
    okc_sync();
    chain_rule<T, In>(p, pl, k, W, wp, aux, V, n_eff, m_eff, false);
    if (p.need_dy) chain_rule<T, In>(p, pl, k, W, wp, aux, V, n_eff, m_eff, true);
}

static ResidentKernel pick_backward(const Params& p) {
    if (p.dtype == kF64) return backward_kernel<double, double>;
    if (p.cost == kGiven) return backward_kernel<float, float>;
    switch (p.in_dtype) {
        case kF32:
            return backward_kernel<float, float>;
        case kF16:
            return backward_kernel<float, okc_half>;
        case kBF16:
            return backward_kernel<float, okc_bf16>;
        default:
            return nullptr;
    }
}

const char* launch_backward(const Params& p, const Plan& pl) {
    return launch_resident(pick_backward(p), p, pl);
}

}  // namespace okc
