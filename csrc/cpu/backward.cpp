// Fused CPU backward: ∂(gv·value + gl·value_linear)/∂C for the three gradient modes.
//
//   envelope   dC = (gv + gl) P
//   implicit   dC = gv P + gl P∘(1 + (u ⊕ v − C)/ε), with
//                H [u; v] = [(P∘C)1; (P∘C)ᵀ1],  H = [[κ diag(P1), P], [Pᵀ, κ diag(Pᵀ1)]]
//              κ = 1 (balanced; null space (1, −1) removed by a rank-one term) or
//              κ = 1 + ε/ρ (unbalanced fixed point, non-singular). Solved exactly through the
//              Schur complement on the smaller side in float64 (Cholesky) when min(n, m) is at
//              most `direct_max`, else by Jacobi-preconditioned CG as the reference does.
//   unrolled   reverse pass over the stored potentials of every iteration, recomputing the
//              softmax weights of each half-step (memory O(T·(n+m)) per problem).
#include "common.h"

namespace okc {

template <class T>
struct Backward {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int L = S::L;

  const BwdArgs& A;
  Problem<T> P;
  Buf<T> Pm, D, Q, al, be, vt, wt, ones, fbar, gbar, gnew, fh, gh, zg, K, KT, Mb, fba, gba, alp,
      bet, tcv, ssv, rvv, wwv, zzv, lam_a, lam_b;
  Buf<double> dv, Y, Yt, Sm;

  explicit Backward(const BwdArgs& args) : A(args) {}
  void run(int k, bool par, int nt);
  void implicit_solve(int n, int m, int ld, double kappa, bool balanced, double* uo, double* vo,
                      bool par, int nt);
  void cg_solve(int n, int m, int ld, double kappa, const double* r, const double* c,
                const double* hu, const double* hv, double* uo, double* vo, bool par, int nt);
  void unrolled(int k, T gvk, T glk);
};

// Solve the implicit system on the compacted plan Pm [n, ld] with cost P.C.
template <class T>
void Backward<T>::implicit_solve(int n, int m, int ld, double kappa, bool balanced, double* uo,
                                 double* vo, bool par, int nt) {
  const T* Pp = Pm.p;
  const T* Cc = P.C.p;
  double* base = dv.get((size_t)6 * (n + m) + 32);
  double* r = base;
  double* hu = r + n;
  double* c = hu + n;
  double* hv = c + m;
  {  // r = P1, hu = (P∘C)1, c = Pᵀ1, hv = (P∘C)ᵀ1 (vectorised in T)
    T* cs = vt.get(ld + L);
    T* hs = wt.get(ld + L);
    for (int j = 0; j < ld; ++j) cs[j] = hs[j] = T(0);
    for (int i = 0; i < n; ++i) {
      const T* p = Pp + (int64_t)i * ld;
      const T* x = Cc + (int64_t)i * ld;
      V ar = S::set1(T(0)), ah = S::set1(T(0));
      for (int j = 0; j < ld; j += L) {
        const V pv = S::load(p + j);
        const V pc = pv * S::load(x + j);
        ar += pv;
        ah += pc;
        S::store(cs + j, S::load(cs + j) + pv);
        S::store(hs + j, S::load(hs + j) + pc);
      }
      r[i] = S::hsum(ar);
      hu[i] = S::hsum(ah);
    }
    for (int j = 0; j < m; ++j) {
      c[j] = cs[j];
      hv[j] = hs[j];
    }
  }
  const int M = std::min(n, m);
  if (M > A.direct_max) {
    cg_solve(n, m, ld, kappa, r, c, hu, hv, uo, vo, par, nt);
    return;
  }
  const bool trans = m > n;  // eliminate the larger side, solve on the smaller one
  const int N = trans ? m : n;
  const double* rb = trans ? c : r;
  const double* hb = trans ? hv : hu;
  const double* rs = trans ? r : c;
  const double* hs = trans ? hu : hv;
  double* xb = trans ? vo : uo;
  double* xs = trans ? uo : vo;
  const double tiny = 1e-300;
  const int ldM = round_up(M, 8);
  double* Yp = Y.get((size_t)N * ldM + 8);
  double* Sp = Sm.get((size_t)M * ldM + 8);
  double* rhs = base + 2 * (n + m);  // scratch after r..hv (M + N <= 2(n + m))
  double* isq = rhs + ldM;
  // Y = diag(rb)^(-1/2) A with A = P (or Pᵀ): [N, ldM], zero padded.
  for (int p = 0; p < N; ++p) isq[p] = rb[p] > tiny ? 1.0 / std::sqrt(rb[p]) : 0.0;
  if (!trans) {
    for (int p = 0; p < N; ++p) {
      const T* src = Pp + (int64_t)p * ld;
      double* y = Yp + (size_t)p * ldM;
      const double sc = isq[p];
      for (int q = 0; q < M; ++q) y[q] = (double)src[q] * sc;
      for (int q = M; q < ldM; ++q) y[q] = 0.0;
    }
  } else {
    for (int p = 0; p < N; ++p)
      for (int q = M; q < ldM; ++q) Yp[(size_t)p * ldM + q] = 0.0;
    for (int q = 0; q < M; ++q) {
      const T* src = Pp + (int64_t)q * ld;
      for (int p = 0; p < N; ++p) Yp[(size_t)p * ldM + q] = (double)src[p] * isq[p];
    }
  }
  // Lower triangle of S = κ diag(rs) − YᵀY/κ, and rhs = hs − Yᵀ(hb ∘ isq)/κ. Row q of YᵀY is
  // Σ_p Y_pq Y_p,: — a register-blocked column sum over the rows of Y with the weights
  // Y_:,q (column q of Y, read with stride ldM), over the columns [0, q] rounded up to a vector
  // (the rest of the row is never read): the accumulators stay in registers, where
  // rank-one updates of S would load and store S once per row of Y.
  const double ik = 1.0 / kappa;
  constexpr int LD = Simd<double>::L;
  double* YT = Yt.get((size_t)N + ldM + 8);  // coef [N], yc [ldM]
  for (int q = 0; q < M; ++q) {
    double* srow = Sp + (size_t)q * ldM;
    const int c1 = std::min(ldM, round_up(q + 1, LD));
    colsum(Yp, ldM, N, Yp + q, srow, 0, c1, /*ws=*/ldM);  // weights: column q of Y
    for (int l = 0; l < c1; ++l) srow[l] *= -ik;
    for (int l = c1; l < ldM; ++l) srow[l] = 0.0;
  }
  {
    double* coef = YT;
    double* yc = coef + N;
    for (int p = 0; p < N; ++p) coef[p] = hb[p] * isq[p] * ik;
    colsum(Yp, ldM, N, coef, yc, 0, ldM);
    for (int q = 0; q < M; ++q) rhs[q] = hs[q] - yc[q];
  }
  double rs_sum = 0.0;
  int live = 0;
  for (int q = 0; q < M; ++q) {
    Sp[(size_t)q * ldM + q] += kappa * rs[q];
    if (rs[q] > tiny) {
      rs_sum += rs[q];
      ++live;
    }
  }
  if (balanced && live > 0) {  // null space (1, −1) of H: add α 11ᵀ on the live block
    const double alpha = rs_sum / ((double)live * live);
    double* am = isq + N;  // α on the live columns, 0 on the dead ones (free scratch of base)
    for (int l = 0; l < M; ++l) am[l] = rs[l] > tiny ? alpha : 0.0;
    for (int q = 0; q < M; ++q) {
      if (!(rs[q] > tiny)) continue;
      double* srow = Sp + (size_t)q * ldM;
      for (int l = 0; l <= q; ++l) srow[l] += am[l];
    }
  }
  for (int q = 0; q < M; ++q) {
    if (rs[q] > tiny) continue;  // dead column of the plan: decouple
    for (int l = 0; l < q; ++l) Sp[(size_t)q * ldM + l] = 0.0;
    for (int l = q + 1; l < M; ++l) Sp[(size_t)l * ldM + q] = 0.0;
    Sp[(size_t)q * ldM + q] = 1.0;
    rhs[q] = 0.0;
  }
  // Cholesky S = L Lᵀ (lower triangle, in place), right-looking: after column k is scaled,
  // the trailing rows get a contiguous rank-one update (vectorised). S is positive
  // semi-definite: when the plan's support graph splits into several components (tiny ε,
  // underflowed entries) every component adds a null direction beyond the one removed by the
  // rank-one term. A pivot below `tol_piv` marks such a direction: its column is dropped and
  // the component of x set to 0 (any solution serves: dC only sees u_i + v_j where P_ij > 0,
  // and the right-hand side is orthogonal to those null directions).
  // Unbalanced S is positive definite on the live columns: there a pivot is compared with its
  // own diagonal entry only (scale-free). The column masses of a plan that transports little
  // mass span many orders of magnitude, and a threshold relative to the largest diagonal
  // entry dropped most live columns (issue 9: fp32 gradient 68% off).
  double dmax = 0.0;
  for (int q = 0; q < M; ++q) dmax = std::max(dmax, Sp[(size_t)q * ldM + q]);
  const double tol_piv = 1e-13 * (dmax > 0 ? dmax : 1.0);
  double* col = isq + N;  // scratch [ldM]
  unsigned char* dead = reinterpret_cast<unsigned char*>(col + ldM);  // [M] bytes
  double* tolv = col + ldM + (M + 7) / 8 + 1;                          // scratch [M]
  for (int q = 0; q < M; ++q) tolv[q] = balanced ? tol_piv : 1e-13 * Sp[(size_t)q * ldM + q];
  for (int k = 0; k < M; ++k) {
    double* sk = Sp + (size_t)k * ldM;
    const double piv = sk[k];
    dead[k] = !(piv > tolv[k]);
    if (dead[k]) {
      sk[k] = 1.0;
      for (int i = k + 1; i < M; ++i) Sp[(size_t)i * ldM + k] = 0.0;
      continue;
    }
    const double d = std::sqrt(piv);
    sk[k] = d;
    const double id = 1.0 / d;
    // col = L[k+1:, k], 0 at and before k: the update of row i then runs over whole vectors
    // from the one holding column k+1 (its entries j <= k, final values of L, get −lik·0 and
    // keep their bits) to the one holding column i (the entries past i are the upper
    // triangle, never read).
    const int j0 = (k + 1) / LD * LD;
    for (int j = j0; j <= k; ++j) col[j] = 0.0;
    for (int i = k + 1; i < M; ++i) {
      double& lik = Sp[(size_t)i * ldM + k];
      lik *= id;
      col[i] = lik;
    }
    for (int j = M; j < ldM; ++j) col[j] = 0.0;
    using SD = Simd<double>;
    for (int i = k + 1; i < M; ++i) {
      double* si = Sp + (size_t)i * ldM;
      const SD::V lik = SD::set1(col[i]);
      const int j1 = (i + LD) / LD * LD;  // round_up(i + 1, LD), LD a power of two
      for (int j = j0; j < j1; j += LD)
        SD::store(si + j, SD::load(si + j) - lik * SD::load(col + j));
    }
  }
  for (int q = 0; q < M; ++q) {  // L z = rhs
    const double* sq = Sp + (size_t)q * ldM;
    double acc = 0.0;
    for (int z = 0; z < q; ++z) acc += sq[z] * xs[z];
    xs[q] = dead[q] ? 0.0 : (rhs[q] - acc) / sq[q];
  }
  for (int q = M - 1; q >= 0; --q) {  // Lᵀ x = z
    const double xq = dead[q] ? 0.0 : xs[q] / Sp[(size_t)q * ldM + q];
    xs[q] = xq;
    const double* sq = Sp + (size_t)q * ldM;
#pragma omp simd
    for (int z = 0; z < q; ++z) xs[z] -= sq[z] * xq;
  }
  // xb = (hb − A xs) / (κ rb),  (A xs)_p = sqrt(rb_p) Σ_q Y_pq xs_q
  for (int p = 0; p < N; ++p) {
    if (!(rb[p] > tiny)) {
      xb[p] = 0.0;
      continue;
    }
    const double* y = Yp + (size_t)p * ldM;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int q = 0; q < M; ++q) acc += y[q] * xs[q];
    xb[p] = (hb[p] - acc * std::sqrt(rb[p])) / (kappa * rb[p]);
  }
}

// Jacobi-preconditioned CG on the full (n+m) system (large problems), as the reference.
template <class T>
void Backward<T>::cg_solve(int n, int m, int ld, double kappa, const double* r, const double* c,
                           const double* hu, const double* hv, double* uo, double* vo, bool par,
                           int nt) {
  const T* Pp = Pm.p;
  const int ldn = round_up(n, L);
  const int nm = n + m;
  std::vector<double> du(nm), ru(nm), zu(nm), pu(nm), hp(nm), x(nm, 0.0), rhs(nm);
  T* pt_u = vt.get(ldn + L);
  T* pt_v = wt.get(ld + L);
  T* out_u = Q.get((size_t)ldn + ld + 2 * L);
  T* out_v = out_u + ldn + L;
  const double tiny = (double)std::numeric_limits<T>::min();
  for (int i = 0; i < n; ++i) {
    du[i] = r[i] > tiny ? kappa * r[i] : 1.0;
    rhs[i] = hu[i];
  }
  for (int j = 0; j < m; ++j) {
    du[n + j] = c[j] > tiny ? kappa * c[j] : 1.0;
    rhs[n + j] = hv[j];
  }
  auto matvec = [&](const std::vector<double>& in, std::vector<double>& out) {
    for (int i = 0; i < ldn; ++i) pt_u[i] = i < n ? (T)in[i] : T(0);
    for (int j = 0; j < ld; ++j) pt_v[j] = j < m ? (T)in[n + j] : T(0);
    pfor(par, nt, n, 64, [&](int r0, int r1) { rowdot(Pp, ld, pt_v, out_u, r0, r1); });
    pfor(par, nt, ld, col_grain(ld, nt, L), [&](int c0, int c1) { colsum(Pp, ld, n, pt_u, out_v, c0, c1); });
    for (int i = 0; i < n; ++i) out[i] = kappa * r[i] * in[i] + (double)out_u[i];
    for (int j = 0; j < m; ++j) out[n + j] = kappa * c[j] * in[n + j] + (double)out_v[j];
  };
  auto dot = [&](const std::vector<double>& p, const std::vector<double>& q) {
    double s = 0.0;
    for (int z = 0; z < nm; ++z) s += p[z] * q[z];
    return s;
  };
  const int max_it = A.cg_max_iter;  // resolved by Python (SolverConfig.cg_limits), >= 1
  const double tol = A.cg_tol;
  ru = rhs;
  for (int z = 0; z < nm; ++z) zu[z] = ru[z] / du[z];
  pu = zu;
  double rz = dot(ru, zu);
  const double bnorm = std::sqrt(dot(rhs, rhs));
  if (bnorm > 0) {
    for (int it = 0; it < max_it; ++it) {
      matvec(pu, hp);
      const double php = dot(pu, hp);
      if (!(php > 0)) break;
      const double alpha = rz / php;
      for (int z = 0; z < nm; ++z) {
        x[z] += alpha * pu[z];
        ru[z] -= alpha * hp[z];
      }
      if (std::sqrt(dot(ru, ru)) <= tol * bnorm) break;
      for (int z = 0; z < nm; ++z) zu[z] = ru[z] / du[z];
      const double rz_new = dot(ru, zu);
      const double beta = rz != 0 ? rz_new / rz : 0.0;
      for (int z = 0; z < nm; ++z) pu[z] = zu[z] + beta * pu[z];
      rz = rz_new;
    }
  }
  for (int i = 0; i < n; ++i) uo[i] = x[i];
  for (int j = 0; j < m; ++j) vo[j] = x[n + j];
}

// Reverse pass through the iterations actually run (exact derivative of the map).
template <class T>
void Backward<T>::unrolled(int k, T gvk, T glk) {
  const int n = P.n, m = P.m, ldn = P.ldn, ld = P.ldm;
  const T* Cc = P.C.p;
  const T* la = P.la.p;
  const T* lb = P.lb.p;
  const T* Pp = Pm.p;
  T* Dp = D.p;
  const bool unb = A.rho > 0;
  const double rho = A.rho, eps = A.eps;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int lv = std::max(ldn, ld) + L;
  T* FB = fbar.get(lv);
  T* GB = gbar.get(lv);
  T* GN = gnew.get(lv);
  T* AL = al.get(lv);
  T* BE = be.get(lv);
  T* ON = ones.get(lv);
  T* CS = vt.get(lv);
  T* SC = wt.get(lv);
  const T* F = fh.p;  // final potentials were stored in fh / gh rows 0 by run()
  const T* G = gh.p;
  for (int z = 0; z < lv; ++z) FB[z] = GB[z] = GN[z] = T(0), ON[z] = T(1);
  // Terminal partials of gv·value + gl·value_linear with respect to (f, g, C) at ε:
  //   W_ij = f_i + g_j [+ ρ log(r_i/a_i) + ρ log(c_j/b_j)],  Z = gl·C + gv·W
  //   f̄_i = Σ_j P_ij Z_ij/ε,  ḡ_j = Σ_i P_ij Z_ij/ε,  dC = (gv + gl) P − P∘Z/ε
  std::vector<double> lr(n, 0.0), lc(m, 0.0), gacc(m, 0.0);
  if (unb) {
    std::vector<double> rr(n, 0.0), cc(m, 0.0);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < m; ++j) {
        rr[i] += Pp[(int64_t)i * ld + j];
        cc[j] += Pp[(int64_t)i * ld + j];
      }
    for (int i = 0; i < n; ++i) lr[i] = rr[i] > 0 ? rho * (std::log(rr[i]) - la[i]) : 0.0;
    for (int j = 0; j < m; ++j) lc[j] = cc[j] > 0 ? rho * (std::log(cc[j]) - lb[j]) : 0.0;
  }
  const double ie = 1.0 / eps;
  for (int i = 0; i < n; ++i) {
    const T* p = Pp + (int64_t)i * ld;
    const T* x = Cc + (int64_t)i * ld;
    T* d = Dp + (int64_t)i * ld;
    double fs = 0.0;
    for (int j = 0; j < m; ++j) {
      const double z = (double)glk * x[j] + (double)gvk * ((double)F[i] + G[j] + lr[i] + lc[j]);
      const double pz = (double)p[j] * z * ie;
      fs += pz;
      gacc[j] += pz;
      d[j] = (T)((double)(gvk + glk) * p[j] - pz);
    }
    FB[i] = (T)fs;
  }
  for (int j = 0; j < m; ++j) GB[j] = (T)gacc[j];

  const int Tk = std::min(A.n_iters[k], A.hist_f ? A.hist_T : 0);
  T* Qp = Q.get((size_t)n * ld);
  const T* Fh = fh.p + lv;  // rows 1..Tk of the history (row 0 holds the final f)
  const T* Gh = gh.p + lv;
  T* ZG = zg.get(lv);  // g^0 = 0
  for (int z = 0; z < lv; ++z) ZG[z] = T(0);
  auto g_prev = [&](int t) -> const T* { return t >= 2 ? Gh + (int64_t)(t - 2) * lv : ZG; };

  // One reverse iteration in the log domain (exact softmax weights from exponentials).
  auto log_iter = [&](int t) {
    const double et = eps_at(A, t);
    const double lam = unb ? rho / (rho + et) : 1.0;
    const T tie = (T)(1.0 / et), tl = (T)lam;
    const T* ft = Fh + (int64_t)(t - 1) * lv;
    const T* gp = g_prev(t);
    // g-half: g_t = −λε LSE_i[la_i + (f_t,i − C_ij)/ε]; weights softmax over i, shifted by
    // the stored g_t/(λε) = −LSE (so the exponentials are ≈ the weights: no overflow), then
    // normalised by their actual column sums (exact softmax).
    const T til = (T)(1.0 / (lam * et));
    const T* gt = Gh + (int64_t)(t - 1) * lv;
    for (int i = 0; i < n; ++i) AL[i] = la[i] + ft[i] * tie;
    for (int j = 0; j < ld; ++j) BE[j] = j < m ? gt[j] * til : ninf;
    build_exp(Cc, ld, AL, BE, tie, Qp, 0, n);
    colsum(Qp, ld, n, ON, CS, 0, ld);
    for (int j = 0; j < ld; ++j) SC[j] = j < m && CS[j] > T(0) ? tl * GB[j] / CS[j] : T(0);
    for (int i = 0; i < n; ++i) {
      const T* q = Qp + (int64_t)i * ld;
      T* d = Dp + (int64_t)i * ld;
      V acc = S::set1(T(0));
      for (int j = 0; j < ld; j += L) {
        const V qs = S::load(q + j) * S::load(SC + j);
        acc += qs;
        S::store(d + j, S::load(d + j) + qs);
      }
      FB[i] -= S::hsum(acc);
    }
    // f-half: f_t = −λε LSE_j[lb_j + (g_{t−1},j − C_ij)/ε]; weights softmax over j.
    for (int j = 0; j < ld; ++j) {
      BE[j] = j < m ? lb[j] + gp[j] * tie : ninf;
      GN[j] = T(0);
    }
    for (int i = 0; i < n; ++i) AL[i] = ft[i] * til;  // shift: f_t/(λε) = −LSE_j
    build_exp(Cc, ld, AL, BE, tie, Qp, 0, n);
    for (int i = 0; i < n; ++i) {
      T* q = Qp + (int64_t)i * ld;
      T* d = Dp + (int64_t)i * ld;
      V acc = S::set1(T(0));
      for (int j = 0; j < ld; j += L) acc += S::load(q + j);
      const T rs = S::hsum(acc);
      const T coef = rs > T(0) ? tl * FB[i] / rs : T(0);
      const V vc = S::set1(coef);
      for (int j = 0; j < ld; j += L) {
        const V qs = S::load(q + j) * vc;
        S::store(d + j, S::load(d + j) + qs);
        S::store(GN + j, S::load(GN + j) - qs);
      }
      FB[i] = T(0);
    }
    for (int j = 0; j < ld; ++j) GB[j] = GN[j];
  };

  if (A.log_only || !scaling_safe(Cc, n, m, ld, A.eps)) {
    for (int t = Tk; t >= 1; --t) log_iter(t);
    return;
  }
  // Scaling form of the same reverse pass. With K̃ = exp((f̄ ⊕ ḡ − C)/ε) anchored at stored
  // potentials (f̄, ḡ), α_i = a_i e^{(f_t,i − f̄_i)/ε}, β_j = b_j e^{(g_{t−1},j − ḡ_j)/ε}:
  //   g-half weights  Q^g = K̃ diag… : Q^g_ij = K̃_ij α_i / (K̃ᵀα)_j      (softmax over i)
  //   f-half weights  Q^f_ij = K̃_ij β_j / (K̃ β)_i                       (softmax over j)
  // so every product is a matrix-vector product with K̃ or K̃ᵀ, and the dC contributions are
  // rank-one: dC += K̃ ∘ M with M = Σ_t λ (α ⊗ w + z ⊗ β), flushed when K̃ is re-anchored
  // (ε changes or a factor leaves e^{±τ}). A sum out of range falls back to log_iter.
  P.gather_transpose();
  const T* CT = P.CT.p;
  T* Km = K.get((size_t)n * ld);
  T* KTm = KT.get((size_t)m * ldn);
  T* Mm = Mb.get((size_t)n * ld);
  T* FBA = fba.get(lv);
  T* GBA = gba.get(lv);
  T* ALP = alp.get(lv);
  T* BET = bet.get(lv);
  T* TCv = tcv.get(lv);
  T* SSv = ssv.get(lv);
  T* RV = rvv.get(lv);
  T* WW = wwv.get(lv);
  T* ZZ = zzv.get(lv);
  for (int z = 0; z < lv; ++z) ALP[z] = BET[z] = WW[z] = ZZ[z] = T(0);
  T* LAm = lam_a.get(lv);  // log weights, −inf on padding
  T* LBm = lam_b.get(lv);
  for (int z = 0; z < lv; ++z) {
    LAm[z] = z < n ? la[z] : ninf;
    LBm[z] = z < m ? lb[z] : ninf;
  }
  const double tau = sizeof(T) == 4 ? 23.0 : 230.0;
  const T hard_lo = sizeof(T) == 4 ? T(1e-30) : T(1e-290);
  const T hard_hi = T(1) / hard_lo;
  bool have = false;
  double K_eps = 0.0;
  auto flush = [&]() {
    if (!have) return;
    for (int i = 0; i < n; ++i) {
      const T* kk = Km + (int64_t)i * ld;
      T* mm = Mm + (int64_t)i * ld;
      T* d = Dp + (int64_t)i * ld;
      for (int j = 0; j < ld; j += L) {
        S::store(d + j, S::load(d + j) + S::load(kk + j) * S::load(mm + j));
        S::store(mm + j, S::set1(T(0)));
      }
    }
  };
  for (int t = Tk; t >= 1; --t) {
    const double et = eps_at(A, t);
    const double lam = unb ? rho / (rho + et) : 1.0;
    const T tie = (T)(1.0 / et), tl = (T)lam;
    const T* ft = Fh + (int64_t)(t - 1) * lv;
    const T* gp = g_prev(t);
    bool need = !have || K_eps != et;
    if (!need) {
      T dmax = T(0);
      for (int i = 0; i < n; ++i) dmax = std::max(dmax, std::fabs(ft[i] - FBA[i]));
      for (int j = 0; j < m; ++j) dmax = std::max(dmax, std::fabs(gp[j] - GBA[j]));
      need = !((double)dmax * (1.0 / et) <= tau);
    }
    if (need) {
      flush();
      for (int i = 0; i < lv; ++i) {
        FBA[i] = i < n ? ft[i] : T(0);
        AL[i] = i < n ? ft[i] * tie : ninf;
      }
      for (int j = 0; j < lv; ++j) {
        GBA[j] = j < m ? gp[j] : T(0);
        BE[j] = j < m ? gp[j] * tie : ninf;
      }
      build_exp(Cc, ld, AL, BE, tie, Km, 0, n);
      build_exp(CT, ldn, BE, AL, tie, KTm, 0, m);
      if (!have)
        for (int z = 0; z < n * ld; ++z) Mm[z] = T(0);
      have = true;
      K_eps = et;
    }
    {  // α = exp(la + (f_t − f̄)/ε), β = exp(lb + (g_{t−1} − ḡ)/ε); 0 on padding
      const V vt = S::set1(tie);
      for (int i = 0; i < ldn; i += L)
        S::store(ALP + i, S::exp(S::load(LAm + i) + (S::load(ft + i) - S::load(FBA + i)) * vt));
      for (int j = 0; j < ld; j += L)
        S::store(BET + j, S::exp(S::load(LBm + j) + (S::load(gp + j) - S::load(GBA + j)) * vt));
    }
    colsum(Km, ld, n, ALP, TCv, 0, ld);    // (K̃ᵀα)_j
    colsum(KTm, ldn, m, BET, SSv, 0, ldn);  // (K̃β)_i
    bool ok = true;
    for (int j = 0; j < m; ++j) ok &= (TCv[j] >= hard_lo) & (TCv[j] <= hard_hi);
    for (int i = 0; i < n; ++i) ok &= (SSv[i] >= hard_lo) & (SSv[i] <= hard_hi);
    if (!ok) {
      log_iter(t);
      continue;
    }
    // g-half
    for (int j = 0; j < m; ++j) WW[j] = GB[j] / TCv[j];
    colsum(KTm, ldn, m, WW, RV, 0, ldn);  // (K̃ w)_i
    for (int i = 0; i < n; ++i) FB[i] -= tl * ALP[i] * RV[i];
    // f-half
    for (int i = 0; i < n; ++i) ZZ[i] = FB[i] / SSv[i];
    colsum(Km, ld, n, ZZ, GN, 0, ld);  // (K̃ᵀ z)_j
    for (int j = 0; j < ld; ++j) GB[j] = j < m ? -tl * BET[j] * GN[j] : T(0);
    for (int i = 0; i < n; ++i) {
      const V ca = S::set1(tl * ALP[i]), cz = S::set1(tl * ZZ[i]);
      T* mm = Mm + (int64_t)i * ld;
      for (int j = 0; j < ld; j += L)
        S::store(mm + j, S::load(mm + j) + ca * S::load(WW + j) + cz * S::load(BET + j));
      FB[i] = T(0);
    }
  }
  flush();
}

template <class T>
void Backward<T>::run(int k, bool par, int nt) {
  const T* Cp = static_cast<const T*>(A.C) + k * A.sCb;
  const T* ap = static_cast<const T*>(A.a) + k * A.sab;
  const T* bp = static_cast<const T*>(A.b) + k * A.sbb;
  const T gvk = static_cast<const T*>(A.gv)[k];
  const T glk = static_cast<const T*>(A.gl)[k];
  T* dC = static_cast<T*>(A.dC) + (int64_t)k * A.n * A.m;
  if (gvk == T(0) && glk == T(0)) return;
  if (!P.select(ap, A.san, A.n, bp, A.sbm, A.m)) return;
  const int n = P.n, m = P.m, ldn = P.ldn, ld = P.ldm;
  P.gather(Cp, A.sCn, A.sCm, false, par, nt);
  const T* Cc = P.C.p;
  const T* fin = static_cast<const T*>(A.f) + (int64_t)k * A.n;
  const T* gin = static_cast<const T*>(A.g) + (int64_t)k * A.m;
  const int lv = std::max(ldn, ld) + L;
  const bool unrolled_mode = A.mode == kUnrolled;
  const int Tk = unrolled_mode && A.hist_f ? std::min(A.n_iters[k], A.hist_T) : 0;
  T* F = fh.get((size_t)lv * (Tk + 1));
  T* G = gh.get((size_t)lv * (Tk + 1));
  for (int z = 0; z < lv; ++z) F[z] = G[z] = T(0);
  for (int i = 0; i < n; ++i) F[i] = fin[P.ri[i]];
  for (int j = 0; j < m; ++j) G[j] = gin[P.ci[j]];
  if (Tk > 0) {
    const T* hf = static_cast<const T*>(A.hist_f) + (int64_t)k * A.n;
    const T* hg = static_cast<const T*>(A.hist_g) + (int64_t)k * A.m;
    for (int t = 0; t < Tk; ++t) {
      T* ft = F + (int64_t)(t + 1) * lv;
      T* gt = G + (int64_t)(t + 1) * lv;
      const T* hft = hf + (int64_t)t * A.B * A.n;
      const T* hgt = hg + (int64_t)t * A.B * A.m;
      for (int z = 0; z < lv; ++z) ft[z] = gt[z] = T(0);
      for (int i = 0; i < n; ++i) ft[i] = hft[P.ri[i]];
      for (int j = 0; j < m; ++j) gt[j] = hgt[P.ci[j]];
    }
  }
  // Plan at ε from the final potentials.
  const T ie = (T)(1.0 / A.eps);
  const T ninf = -std::numeric_limits<T>::infinity();
  T* BE = be.get(lv);
  for (int j = 0; j < ld; ++j) BE[j] = j < m ? P.lb.p[j] : ninf;
  T* Pp = Pm.get((size_t)n * ld);
  pfor(par, nt, n, 16,
       [&](int r0, int r1) { build_plan(Cc, ld, F, G, P.la.p, BE, ie, Pp, r0, r1); });
  if (!(A.rho > 0)) clamp_plan(Pp, (size_t)n * ld);
  T* Dp = D.get((size_t)n * ld);

  if (A.mode == kEnvelope || (A.mode == kImplicit && glk == T(0))) {
    const T s = gvk + glk;
    pfor(par, nt, n, 16, [&](int r0, int r1) {
      for (int i = r0; i < r1; ++i)
        for (int j = 0; j < m; ++j) Dp[(int64_t)i * ld + j] = s * Pp[(int64_t)i * ld + j];
    });
  } else if (A.mode == kImplicit) {
    const bool balanced = !(A.rho > 0);
    const double kappa = balanced ? 1.0 : 1.0 + A.eps / A.rho;
    std::vector<double> uo(n), vo(m);
    implicit_solve(n, m, ld, kappa, balanced, uo.data(), vo.data(), par, nt);
    // dC = P∘((gv + gl) + gl (u ⊕ v − C)/ε)
    T* vv = be.get(lv);
    for (int j = 0; j < ld; ++j) vv[j] = j < m ? (T)vo[j] : T(0);
    const V vs = S::set1(gvk + glk), vg = S::set1(glk), vie = S::set1(ie);
    pfor(par, nt, n, 16, [&](int r0, int r1) {
      for (int i = r0; i < r1; ++i) {
        const T* p = Pp + (int64_t)i * ld;
        const T* x = Cc + (int64_t)i * ld;
        T* d = Dp + (int64_t)i * ld;
        const V ui = S::set1((T)uo[i]);
        for (int j = 0; j < ld; j += L)
          S::store(d + j, S::load(p + j) * (vs + vg * ((ui + S::load(vv + j)) - S::load(x + j)) * vie));
      }
    });
  } else {
    unrolled(k, gvk, glk);
  }
  // Scatter into the padded output.
  for (int i = 0; i < n; ++i) {
    T* dst = dC + (int64_t)P.ri[i] * A.m;
    const T* src = Dp + (int64_t)i * ld;
    if (P.ci_identity) {
      std::memcpy(dst, src, sizeof(T) * m);
    } else {
      for (int j = 0; j < m; ++j) dst[P.ci[j]] = src[j];
    }
  }
}

template <class T>
void backward_impl(const BwdArgs& A) {
  const int nt = std::max(1, A.num_threads);
  run_batch<T>(A, nt, A.mode != kUnrolled, [&A]() {
    return [solver = Backward<T>(A)](int k, bool inner, int threads) mutable {
      solver.run(k, inner, threads);
    };
  });
}

template void backward_impl<float>(const BwdArgs&);
template void backward_impl<double>(const BwdArgs&);

}  // namespace okc
