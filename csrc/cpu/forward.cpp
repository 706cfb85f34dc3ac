// Fused CPU Sinkhorn forward: the iteration map of optical_kernels/config.py, per problem.
//
// Each problem is compacted to its valid rows/columns (a_i > 0, b_j > 0), then solved with
// the stabilised scaling form (Schmitzer 2019) of the log-domain map. With
//
//   K̃_ij = exp((f̄_i + ḡ_j − C_ij)/ε),  ũ = a∘exp((f − f̄)/ε),  ṽ = b∘exp((g − ḡ)/ε)
//   f-step:  s = K̃ ṽ,   ũ = a / s                          (balanced)
//                        ũ = exp(log a − (1−λ) f̄/ε − λ log s)  (unbalanced, λ = ρ/(ρ+ε))
//   g-step:  t = K̃ᵀ ũ,  ṽ = b / t  (resp. the damped form)
//
// this is exactly f_i ← −λε LSE_j[log b_j + (g_j − C_ij)/ε] in exact arithmetic, but every
// half-step is an FMA-only matrix-vector product (K̃ and K̃ᵀ are both stored so that both are
// register-blocked column sums) plus one vector division. Exponentials are spent only when
// the potentials are absorbed into K̃ (|log u| or |log v| above τ), when ε changes
// (ε-scaling: those half-steps run in the log domain), and as a fallback when a sum leaves
// the safe floating-point range (that half-step is redone in the log domain). The first K̃ is
// anchored at f̄_i = min_j C_ij, ḡ = 0 (each row's largest entry is exactly 1), so no
// initial log-domain step is needed. The row-marginal error of the stopping rule is fused
// into the next f-step: r_i = ũ_i s_i.
#include "common.h"

namespace okc {

// Unbalanced stopping error relative to the mass (config.py): e / max(Σ r, Σ target).
static inline double rel_err(double e, double sr, double st) {
  const double d = std::max(sr, st);
  return d > 0 ? e / d : 0.0;
}

template <class T>
struct Forward {
  using S = Simd<T>;
  using V = typename S::V;
  using I = typename S::I;
  static constexpr int L = S::L;

  const FwdArgs& A;
  Problem<T> P;
  Buf<T> K, KT;
  Buf<T> f, g, fb, gb, ua, ub, va, vb, s, t, w, al, be, kua, kvb, vn, vm, alo, ahi, blo, bhi,
      tmp, hb, cacc;
  Buf<double> racc;

  explicit Forward(const FwdArgs& args) : A(args) {}

  void solve(int k, bool par, int nt);
};

// One half-step of the scaling form over `ldo` outputs (vectorised, no horizontal work):
//   s = X·w (computed by the caller), new = wt / s (balanced) or exp(kw − λ log s),
// with the hard range test on s and new (returns false: redo in the log domain), the soft
// absorption test new ∉ wt·[e^−τ, e^τ], and, when asked, Σ_i |old_i s_i − wt_i| (balanced
// row-marginal error of the state before the step).
template <class T>
static inline bool scaling_update(const T* Sv, const T* old, T* out, const T* wt, const T* kw,
                                  const T* valid, const T* lo_w, const T* hi_w, int ldo, bool unb,
                                  T lam, T hard_lo, T hard_hi, bool want_err, double& err,
                                  bool& absorb, bool& same) {
  using S = Simd<T>;
  using V = typename S::V;
  using I = typename S::I;
  constexpr int L = S::L;
  const V lo = S::set1(hard_lo), hi = S::set1(hard_hi), one = S::set1(T(1)), zero = S::set1(T(0));
  const V vinf = S::set1(std::numeric_limits<T>::infinity());
  const V vl = S::set1(lam);
  I bad = (I)(zero < zero), soft = (I)(zero < zero), diff = (I)(zero < zero);
  V e = zero;
  for (int i = 0; i < ldo; i += L) {
    const V sv = S::load(Sv + i);
    const I ok_lane = S::load(valid + i) > zero;
    bad |= ok_lane & ~((sv >= lo) & (sv <= hi));
    const V s1 = S::sel(ok_lane, sv, one);
    const V w = S::load(wt + i);
    if (want_err) {
      const V d = S::load(old + i) * sv - w;
      e += S::sel(ok_lane, S::sel(d < zero, -d, d), zero);
    }
    V nu;
    if (!unb) {
      nu = w / s1;
    } else {
      nu = S::exp(S::load(kw + i) - vl * S::log(s1));
    }
    bad |= ok_lane & ~((nu > zero) & (nu < vinf));
    soft |= (nu < S::load(lo_w + i)) | (nu > S::load(hi_w + i));
    diff |= (I)nu ^ (I)S::load(old + i);  // bitwise: is the new state the old one?
    S::store(out + i, nu);
  }
  if (want_err) err = (double)S::hsum(e);
  absorb = S::any(soft);
  same = !S::any(diff);
  return !S::any(bad);
}

template <class T>
void Forward<T>::solve(int k, bool par, int nt) {
  const T* Cp = static_cast<const T*>(A.C) + k * A.sCb;
  const T* ap = static_cast<const T*>(A.a) + k * A.sab;
  const T* bp = static_cast<const T*>(A.b) + k * A.sbb;
  T* f_out = static_cast<T*>(A.f) + (int64_t)k * A.n;
  T* g_out = static_cast<T*>(A.g) + (int64_t)k * A.m;
  T* value_out = static_cast<T*>(A.value) + k;
  T* vl_out = static_cast<T*>(A.value_linear) + k;
  T* err_out = static_cast<T*>(A.err) + k;
  int32_t* it_out = A.n_iters + k;
  int32_t* run_out = A.iters_run ? A.iters_run + k : nullptr;
  T* hist_f = A.hist_f ? static_cast<T*>(A.hist_f) + (int64_t)k * A.n : nullptr;
  T* hist_g = A.hist_g ? static_cast<T*>(A.hist_g) + (int64_t)k * A.m : nullptr;

  if (!P.select(ap, A.san, A.n, bp, A.sbm, A.m)) {
    *value_out = *vl_out = *err_out = T(0);
    *it_out = 0;
    if (run_out) *run_out = 0;
    return;
  }
  const int n = P.n, m = P.m, ldn = P.ldn, ldm = P.ldm;
  P.gather(Cp, A.sCn, A.sCm, /*transpose=*/true, par, nt);
  const T* Cc = P.C.p;
  const bool use_scaling = !A.log_only && scaling_safe(Cc, n, m, ldm, A.eps);
  const T* CT = P.CT.p;
  const T* a = P.a.p;
  const T* b = P.b.p;
  const T* la = P.la.p;
  const T* lb = P.lb.p;

  const bool unb = A.rho > 0;
  const double rho = A.rho;
  const double eps = A.eps;
  const double tau = A.tau > 0 ? A.tau : (sizeof(T) == 4 ? 23.0 : 230.0);
  const T etau = (T)std::exp(-tau), Etau = (T)std::exp(tau);
  const T hard_lo = sizeof(T) == 4 ? T(1e-30) : T(1e-290);
  const T hard_hi = T(1) / hard_lo;
  const T ninf = -std::numeric_limits<T>::infinity();
  const bool check_tol = A.tol > 0;
  const int gn = col_grain(ldn, nt, L), gm = col_grain(ldm, nt, L);

  const int lv = std::max(ldn, ldm) + L;
  T* F = f.get(lv);
  T* G = g.get(lv);
  T* FB = fb.get(lv);
  T* GB = gb.get(lv);
  T* UA = ua.get(lv);  // ũ = a∘u (current), UB: scratch for the next one
  T* UB = ub.get(lv);
  T* VA = va.get(lv);  // ṽ = b∘v
  T* VB = vb.get(lv);
  T* Sv = s.get(lv);
  T* Tv = t.get(lv);
  T* Wv = w.get(lv);
  T* AL = al.get(lv);
  T* BE = be.get(lv);
  T* KUA = kua.get(lv);
  T* KVB = kvb.get(lv);
  T* VN = vn.get(lv);
  T* VM = vm.get(lv);
  T* ALO = alo.get(lv);
  T* AHI = ahi.get(lv);
  T* BLO = blo.get(lv);
  T* BHI = bhi.get(lv);
  T* TMP = tmp.get(lv);
  for (int i = 0; i < lv; ++i) {
    F[i] = G[i] = FB[i] = GB[i] = Wv[i] = Sv[i] = Tv[i] = T(0);
    UA[i] = UB[i] = VA[i] = VB[i] = T(0);
    KUA[i] = KVB[i] = ninf;
    VN[i] = i < n ? T(1) : T(0);
    VM[i] = i < m ? T(1) : T(0);
    ALO[i] = a[i] * etau;
    AHI[i] = a[i] * Etau;
    BLO[i] = b[i] * etau;
    BHI[i] = b[i] * Etau;
  }

  T* Km = nullptr;
  T* KTm = nullptr;
  bool haveK = false, scaled = false, anchored = false;
  double K_eps = 0.0, fresh_eps = -1.0;
  int rebuilds = 0;
  // Exact fixed point: with no stopping test left to run and ε constant from here on, an
  // iteration of the scaling form that maps (ũ, ṽ, K̃) onto itself bit for bit (no absorption,
  // no rebuild) makes every later iteration repeat it, so the loop ends there with the state
  // (and the output) it would have after max_iter iterations; n_iters still counts them.
  // Not with the unrolled history, which records every iteration.
  const bool may_skip = A.fixed_point_exit && !check_tol && !hist_f;

  // True potentials f = f̄ + ε (log ũ − log a), g = ḡ + ε (log ṽ − log b), 0 on padding.
  auto potentials = [&](T* Fo, T* Go) {
    const V ve = S::set1((T)K_eps), one = S::set1(T(1)), zero = S::set1(T(0));
    for (int i = 0; i < ldn; i += L) {
      const I ok = S::load(VN + i) > zero;
      const V x = S::sel(ok, S::load(UA + i), one);
      S::store(Fo + i, S::sel(ok, S::load(FB + i) + ve * (S::log(x) - S::load(la + i)), zero));
    }
    for (int j = 0; j < ldm; j += L) {
      const I ok = S::load(VM + j) > zero;
      const V x = S::sel(ok, S::load(VA + j), one);
      S::store(Go + j, S::sel(ok, S::load(GB + j) + ve * (S::log(x) - S::load(lb + j)), zero));
    }
  };
  auto materialise = [&]() {
    if (scaled && !anchored) potentials(F, G);  // anchored: F = G = 0 are still the state
    scaled = anchored = false;
    haveK = false;
  };
  // Absorb: K̃ = exp((f̄ ⊕ ḡ − C)/ε) with (f̄, ḡ) = (f, g), or, for the very first step,
  // f̄_i = min_j C_ij and ḡ = 0 (every row of K̃ then has a maximum of exactly 1).
  auto rebuild = [&](double et, bool anchor) {
    if (!Km) {
      Km = K.get((size_t)n * ldm);
      KTm = KT.get((size_t)m * ldn);
    }
    const T ie = (T)(1.0 / et);
    for (int i = 0; i < ldn; ++i) {
      T fb0 = F[i];
      if (anchor && i < n) {
        const T* x = Cc + (int64_t)i * ldm;
        fb0 = x[0];
        int j = 1;
        if (m >= L) {  // whole vectors inside the valid columns, then the scalar tail
          V mn = S::load(x);
          for (j = L; j + L <= m; j += L) mn = S::vmin(mn, S::load(x + j));
          for (int q = 0; q < L; ++q) fb0 = std::min(fb0, mn[q]);
        }
        for (; j < m; ++j) fb0 = std::min(fb0, x[j]);
      }
      FB[i] = i < n ? fb0 : T(0);
      AL[i] = i < n ? fb0 * ie : ninf;
      UA[i] = a[i];
    }
    for (int j = 0; j < ldm; ++j) {
      GB[j] = j < m ? G[j] : T(0);
      BE[j] = j < m ? G[j] * ie : ninf;
      VA[j] = b[j];
    }
    pfor(par, nt, n, 16, [&](int r0, int r1) { build_exp(Cc, ldm, AL, BE, ie, Km, r0, r1); });
    pfor(par, nt, m, 16, [&](int r0, int r1) { build_exp(CT, ldn, BE, AL, ie, KTm, r0, r1); });
    if (unb) {
      const T c = (T)(1.0 - rho / (rho + et));
      for (int i = 0; i < n; ++i) KUA[i] = la[i] - c * AL[i];
      for (int j = 0; j < m; ++j) KVB[j] = lb[j] - c * BE[j];
    }
    haveK = scaled = true;
    anchored = anchor;
    K_eps = et;
    ++rebuilds;
  };
  // Explicit row-marginal error at ε (rare fallback: a check due while ε_t ≠ ε).
  auto row_err_explicit = [&](const T* Fo, const T* Go) -> double {
    const T ie = (T)(1.0 / eps);
    for (int j = 0; j < ldm; ++j) BE[j] = j < m ? lb[j] : ninf;
    double e = 0.0, sr = 0.0, st = 0.0;
    T* row = cacc.get(ldm);
    for (int i = 0; i < n; ++i) {
      build_plan(Cc + (int64_t)i * ldm, ldm, Fo + i, Go, la + i, BE, ie, row, 0, 1);
      double r = 0.0;
      for (int j = 0; j < m; ++j) r += row[j];
      const double target = unb ? a[i] * std::exp(-(double)Fo[i] / rho) : a[i];
      e += std::fabs(r - target);
      sr += r;
      st += target;
    }
    return unb ? rel_err(e, sr, st) : e;
  };
  // Unbalanced row-marginal error of the scaled state from s = K̃ ṽ: r_i = ũ_i s_i.
  auto unb_err = [&]() -> double {
    double e = 0.0, sr = 0.0, st = 0.0;
    for (int i = 0; i < n; ++i) {
      const double fi = (double)FB[i] + K_eps * (std::log((double)UA[i]) - (double)la[i]);
      const double r = (double)UA[i] * Sv[i], target = (double)a[i] * std::exp(-fi / rho);
      e += std::fabs(r - target);
      sr += r;
      st += target;
    }
    return rel_err(e, sr, st);
  };

  int it_done = 0;
  if (run_out) *run_out = -1;  // set below: where the loop ends
  for (int it = 1; it <= A.max_iter; ++it) {
    const double et = eps_at(A, it);
    const double lam = unb ? rho / (rho + et) : 1.0;
    const bool check = check_tol && it >= 2 && ((it - 1) % A.check_every == 0) &&
                       eps_at(A, it - 1) == eps;
    bool stop = false;
    bool absorb = false;
    bool f_same = false, g_same = false;
    const bool was_anchored = anchored;
    const int rebuilds0 = rebuilds;
    // ------------------------------------------------------------------ f-step
    if (use_scaling && it == 1 && (A.max_iter == 1 || eps_at(A, 2) == et)) rebuild(et, true);
    if (use_scaling && (!haveK || K_eps != et) && fresh_eps == et) rebuild(et, false);
    bool done = false;
    if (haveK && K_eps == et) {
      pfor(par, nt, ldn, gn, [&](int c0, int c1) { colsum(KTm, ldn, m, VA, Sv, c0, c1); });
      double e = 0.0;
      const bool ok = scaling_update(Sv, UA, UB, a, KUA, VN, ALO, AHI, ldn, unb, (T)lam, hard_lo,
                                     hard_hi, check && !unb, e, absorb, f_same);
      if (ok) {
        if (check) {
          if (unb) e = unb_err();
          if (e < A.tol) stop = true;
        }
        if (!stop) {
          std::swap(UA, UB);
          anchored = false;
        }
        done = true;
      } else {
        absorb = false;
        materialise();
      }
    }
    if (!done) {
      materialise();
      const T ie = (T)(1.0 / et);
      for (int j = 0; j < m; ++j) Wv[j] = lb[j] + G[j] * ie;
      pfor(par, nt, ldn, gn, [&](int c0, int c1) { col_lse(CT, ldn, m, Wv, ie, Sv, c0, c1); });
      if (check) {
        double e = 0.0;
        if (et == eps) {
          double sr = 0.0, st = 0.0;
          for (int i = 0; i < n; ++i) {
            const double r = (double)a[i] * std::exp((double)F[i] / eps + (double)Sv[i]);
            double target = a[i];
            if (unb) target *= std::exp(-(double)F[i] / rho);
            e += std::fabs(r - target);
            sr += r;
            st += target;
          }
          if (unb) e = rel_err(e, sr, st);
        } else {
          e = row_err_explicit(F, G);
        }
        if (e < A.tol) stop = true;
      }
      if (!stop) {
        const T c = (T)(-lam * et);
        for (int i = 0; i < n; ++i) F[i] = c * Sv[i];
        fresh_eps = et;
      }
    }
    if (stop) break;
    if (absorb) {
      materialise();
      rebuild(et, false);
    }
    // ------------------------------------------------------------------ g-step
    absorb = false;
    if (use_scaling && (!haveK || K_eps != et) && fresh_eps == et) rebuild(et, false);
    done = false;
    if (haveK && K_eps == et) {
      pfor(par, nt, ldm, gm, [&](int c0, int c1) { colsum(Km, ldm, n, UA, Tv, c0, c1); });
      double e = 0.0;
      const bool ok = scaling_update(Tv, VA, VB, b, KVB, VM, BLO, BHI, ldm, unb, (T)lam, hard_lo,
                                     hard_hi, false, e, absorb, g_same);
      if (ok) {
        std::swap(VA, VB);
        done = true;
        g_same = g_same && f_same && !absorb;
      } else {
        absorb = false;
        materialise();
      }
    }
    if (!done) {
      materialise();
      const T ie = (T)(1.0 / et);
      for (int i = 0; i < n; ++i) Wv[i] = la[i] + F[i] * ie;
      pfor(par, nt, ldm, gm, [&](int c0, int c1) { col_lse(Cc, ldm, n, Wv, ie, Tv, c0, c1); });
      const T c = (T)(-lam * et);
      for (int j = 0; j < m; ++j) G[j] = c * Tv[j];
      fresh_eps = et;
    }
    if (absorb) {
      materialise();
      rebuild(et, false);
    }
    it_done = it;
    if (may_skip && g_same && !was_anchored && rebuilds == rebuilds0 && et == eps &&
        it >= A.eps_len) {
      if (run_out) *run_out = it;
      it_done = A.max_iter;
      break;
    }
    if (hist_f) {
      const T* Fo = F;
      const T* Go = G;
      if (scaled) {
        T* FO = hb.get(2 * lv);
        potentials(FO, FO + lv);
        Fo = FO;
        Go = FO + lv;
      }
      T* hf = hist_f + (int64_t)(it - 1) * A.B * A.n;
      T* hg = hist_g + (int64_t)(it - 1) * A.B * A.m;
      for (int i = 0; i < n; ++i) hf[P.ri[i]] = Fo[i];
      for (int j = 0; j < m; ++j) hg[P.ci[j]] = Go[j];
    }
  }
  materialise();
  if (run_out && *run_out < 0) *run_out = it_done;

  // ---------------------------------------------------------------- final pass at ε
  // P_ij = exp(la_i + f_i/ε + lb_j + g_j/ε − C_ij/ε); row/column masses, <P, C>.
  const T ie = (T)(1.0 / eps);
  for (int j = 0; j < ldm; ++j) BE[j] = j < m ? lb[j] : ninf;  // log b, −inf on padding
  const int rg = par ? std::max(16, (n + 4 * nt - 1) / (4 * nt)) : n;
  const int nch = (n + rg - 1) / rg;
  T* ca = cacc.get((size_t)nch * ldm);
  double* rv = racc.get((size_t)2 * n + 2);
  pfor(par, nt, nch, 1, [&](int q0, int q1) {
    for (int q = q0; q < q1; ++q) {
      T* cq = ca + (size_t)q * ldm;
      for (int j = 0; j < ldm; ++j) cq[j] = T(0);
      const int i0 = q * rg, i1 = std::min(n, (q + 1) * rg);
      const V vie = S::set1(ie), vone = S::set1(T(1));
      for (int i = i0; i < i1; ++i) {
        const T* x = Cc + (int64_t)i * ldm;
        const V f_i = S::set1(F[i]), la_i = S::set1(la[i]);
        V racc_v = S::set1(T(0)), vl_v = S::set1(T(0));
        for (int j = 0; j < ldm; j += L) {
          const V c = S::load(x + j);
          V p = S::exp(((f_i + S::load(G + j)) - c) * vie + (la_i + S::load(BE + j)));
          if (!unb) p = S::vmin(p, vone);  // P_ij ≤ b_j ≤ 1: see clamp_plan (common.h)
          racc_v += p;
          vl_v += p * c;
          S::store(cq + j, S::load(cq + j) + p);
        }
        rv[i] = S::hsum(racc_v);
        rv[n + i] = S::hsum(vl_v);
      }
    }
  });
  T* cs = TMP;
  for (int j = 0; j < m; ++j) {
    T sacc = T(0);
    for (int q = 0; q < nch; ++q) sacc += ca[(size_t)q * ldm + j];
    cs[j] = sacc;
  }
  double vl = 0.0, fr = 0.0, gc = 0.0, mass = 0.0, sa = 0.0, sb = 0.0, err = 0.0, st = 0.0;
  double kla = 0.0, klb = 0.0;
  for (int i = 0; i < n; ++i) {
    const double r = rv[i];
    vl += rv[n + i];
    fr += (double)F[i] * r;
    mass += r;
    sa += a[i];
    const double target = unb ? (double)a[i] * std::exp(-(double)F[i] / rho) : (double)a[i];
    err += std::fabs(r - target);
    st += target;
    if (unb) kla += (r > 0 ? r * (std::log(r) - (double)la[i]) : 0.0) - r + a[i];
  }
  for (int j = 0; j < m; ++j) {
    const double c = cs[j];
    gc += (double)G[j] * c;
    sb += b[j];
    if (unb) klb += (c > 0 ? c * (std::log(c) - (double)lb[j]) : 0.0) - c + b[j];
  }
  if (unb) err = rel_err(err, mass, st);
  double value = fr + gc - eps * mass + eps * sa * sb;
  if (unb) value += rho * (kla + klb);
  *value_out = (T)value;
  *vl_out = (T)vl;
  *err_out = (T)err;
  *it_out = it_done;
  for (int i = 0; i < n; ++i) f_out[P.ri[i]] = F[i];
  for (int j = 0; j < m; ++j) g_out[P.ci[j]] = G[j];
}

template <class T>
void forward_impl(const FwdArgs& A) {
  const int nt = std::max(1, A.num_threads);
  run_batch<T>(A, nt, true, [&A]() {
    return [solver = Forward<T>(A)](int k, bool inner, int threads) mutable {
      solver.solve(k, inner, threads);
    };
  });
}

template void forward_impl<float>(const FwdArgs&);
template void forward_impl<double>(const FwdArgs&);

}  // namespace okc
