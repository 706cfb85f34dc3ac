// Resident forward kernel (docs/design.md §5): one block of 256 threads per problem, the cost tile
// built once on chip (copied, or x y^T on tensor cores), every Sinkhorn iteration on chip,
// per-problem convergence test, potentials / values / n_iters / err written once.
// Also: make_plan (shared-memory layout of every launch) and the forward launcher.
#include <algorithm>

#include "okc_solver.cuh"

namespace okc {

template <class T, class In>
OKC_GLOBAL_KERNEL forward_kernel(Params p, Plan pl) {
    const int k = OKC_BID;
    const int n = p.n, m = p.m;
    char* sm = okc_dyn_smem();
    const Vecs<T> V = carve_vecs<T>(sm, pl, false);
    const T* A = reinterpret_cast<const T*>(p.a) + (int64_t)k * n;
    const T* Bw = reinterpret_cast<const T*>(p.b) + (int64_t)k * m;
    T* fo = reinterpret_cast<T*>(p.f) + (int64_t)k * n;
    T* go = reinterpret_cast<T*>(p.g) + (int64_t)k * m;
    // history rows t-1 of [hist_T, B, n] / [hist_T, B, m] (unrolled gradient)
    T* hist_f = p.hist_f ? reinterpret_cast<T*>(p.hist_f) + (int64_t)k * n : nullptr;
    T* hist_g = p.hist_g ? reinterpret_cast<T*>(p.hist_g) + (int64_t)k * m : nullptr;

    const ProblemInfo<T> P = load_weights(A, Bw, n, m, pl.NP, pl.MP, V.la, V.lb, V.scal);
    if (P.n_eff == 0) {  // empty problem (block-uniform)
        for (int i = OKC_TID; i < n; i += NT) fo[i] = 0;
        for (int j = OKC_TID; j < m; j += NT) go[j] = 0;
        if (OKC_TID == 0) {
            reinterpret_cast<T*>(p.value)[k] = 0;
            reinterpret_cast<T*>(p.value_linear)[k] = 0;
            reinterpret_cast<int*>(p.n_iters)[k] = 0;
            reinterpret_cast<T*>(p.err)[k] = 0;
        }
        return;
    }
    const int n_eff = P.n_eff, m_eff = P.m_eff;
    char* aux = sm + pl.off_aux;
    const T* tile = build_cost_tile<T, In>(p, pl, k, sm, aux, V, n_eff, m_eff);
    const int pitch = pl.pitch;

    for (int i = OKC_TID; i < pl.NP; i += NT) V.f[i] = 0;
    for (int j = OKC_TID; j < pl.MP; j += NT) V.g[j] = 0;
    okc_sync();

    const T ninf = Lim<T>::ninf();
    const int check_every = p.check_every > 0 ? p.check_every : 1;
    const bool checking = p.tol > 0;
    int t_done = 0, err_at = -1;
    T err = 0;
    for (int t = 1; t <= p.max_iter; ++t) {
        const double eps_t = eps_at(p, t);
        const double lam = damping(p, eps_t);
        const T s = (T)(LOG2E / eps_t);
        const T coef = (T)(-lam * eps_t * LN2);  // f = -lam eps LSE = coef * LSE2
        // f_i <- -lam eps LSE_j [log b_j + (g_j - C_ij)/eps]
        rows_lse2(tile, pitch, V.la, V.lb, V.g, s, n_eff, m_eff,
                  [&](int i, T M, T S) { V.f[i] = coef * (M + okc_log2(S)); });
        okc_sync();
        // g_j <- -lam eps LSE_i [log a_i + (f_i - C_ij)/eps]
        cols_lse2(tile, pitch, V.la, V.f, s, n_eff, m_eff, V.redM, V.redS, [&](int j, T M, T S) {
            if (V.lb[j] > ninf) V.g[j] = coef * (M + okc_log2(S));
        });
        t_done = t;
        if (hist_f && t <= p.hist_T) {
            T* hf = hist_f + (int64_t)(t - 1) * p.B * n;
            T* hg = hist_g + (int64_t)(t - 1) * p.B * m;
            for (int i = OKC_TID; i < n; i += NT) hf[i] = V.f[i];
            for (int j = OKC_TID; j < m; j += NT) hg[j] = V.g[j];
            okc_sync();  // the next f-update overwrites V.f
        }
        if (checking && t % check_every == 0 && eps_t == p.eps) {
            err = row_error(p, A, tile, pitch, V, n_eff, m_eff);
            err_at = t;
            if (err < (T)p.tol) break;
        }
    }
    if (err_at != t_done) err = row_error(p, A, tile, pitch, V, n_eff, m_eff);

    T value = 0, value_linear = 0;
    plan_values(p, A, Bw, tile, pitch, V, P, value, value_linear);

    for (int i = OKC_TID; i < n; i += NT) fo[i] = V.f[i];
    for (int j = OKC_TID; j < m; j += NT) go[j] = V.g[j];
    if (OKC_TID == 0) {
        reinterpret_cast<T*>(p.value)[k] = value;
        reinterpret_cast<T*>(p.value_linear)[k] = value_linear;
        reinterpret_cast<int*>(p.n_iters)[k] = t_done;
        reinterpret_cast<T*>(p.err)[k] = err;
    }
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------
Plan make_plan(const Params& p, bool backward, int64_t smem_limit) {
    Plan pl;
    pl.NP = round_up(std::max(p.n, 1), 16);
    pl.MP = round_up(std::max(p.m, 1), 16);
    pl.pitch = pl.MP + 4;
    const int ts = p.dtype == kF64 ? 8 : 4;
    const bool sample = p.cost != kGiven;
    const bool in16 = p.in_dtype == kF16 || p.in_dtype == kBF16;
    pl.mma = (p.use_mma && p.dtype == kF32 && sample) ? 1 : 0;
    if (backward && p.use_mma && p.dtype == kF32 && sample) pl.mma = 1;
    const int engine = pl.mma ? (in16 ? kMma16 : kTf32x3) : kSimt;
    pl.KC = ts == 8 ? 16 : 32;
    pl.DC = ts == 8 ? 16 : 32;

    const VecLayout L = vec_layout(pl.NP, pl.MP, backward);
    const int64_t vec = align_up((int64_t)L.total * ts, 128);
    int64_t aux = 0;
    if (sample) {
        aux = cost_stage_bytes(engine, ts, pl.NP, pl.MP, pl.KC);
        if (backward) aux = std::max(aux, chain_stage_bytes(ts, pl.NP, pl.MP, pl.DC));
    }
    const int64_t tile = align_up((int64_t)pl.NP * pl.pitch * ts, 128);
    pl.off_vec = 0;
    pl.off_aux = vec;
    pl.off_c = vec + aux;
    const int64_t base = vec + aux;
    pl.c_smem = base + tile <= smem_limit;
    pl.w_smem = backward && pl.c_smem && base + 2 * tile <= smem_limit;
    pl.w_is_G = (backward && !sample && !pl.w_smem) ? 1 : 0;
    pl.off_w = pl.off_c + (pl.c_smem ? tile : 0);
    pl.smem_bytes = base + (pl.c_smem ? tile : 0) + (pl.w_smem ? tile : 0);
    if (pl.smem_bytes < 1) pl.smem_bytes = 1;
    int64_t ws = 0;
    if (!pl.c_smem) {
        pl.ws_off_c = ws;
        ws += tile;
    }
    if (backward && !pl.w_smem && !pl.w_is_G) {
        pl.ws_off_w = ws;
        ws += tile;
    }
    pl.ws_stride = align_up(ws, 256);
    pl.ws_bytes = pl.ws_stride * (int64_t)p.B;
    if (base > smem_limit) pl.smem_bytes = -1;  // cannot run: reported by the launcher
    return pl;
}

static ResidentKernel pick_forward(const Params& p) {
    if (p.dtype == kF64) return forward_kernel<double, double>;
    if (p.cost == kGiven) return forward_kernel<float, float>;
    switch (p.in_dtype) {
        case kF32:
            return forward_kernel<float, float>;
        case kF16:
            return forward_kernel<float, okc_half>;
        case kBF16:
            return forward_kernel<float, okc_bf16>;
        default:
            return nullptr;
    }
}

const char* launch_forward(const Params& p, const Plan& pl) {
    return launch_resident(pick_forward(p), p, pl);
}

}  // namespace okc
