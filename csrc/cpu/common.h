// Shared pieces of the fused CPU backend: argument structs, aligned buffers, the per-problem
// gather (compaction of valid rows/columns), and the vectorised streaming kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/okc_constants.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace okc {

inline int round_up(int x, int L) { return (x + L - 1) / L * L; }

// Arguments of the forward solve (pointers are raw data pointers from torch tensors).
// The scaling form rounds (f̄ + ḡ − C)/ε to about u·max|C|/ε (u: unit roundoff of T): when
// that is not small (ε < 48 u max|C|, far outside the accuracy promise ε ≥ 1e-4 × range) the
// plain log-domain iterations and reverse pass are used instead; they are self-normalising
// like the reference (issue 9: fp32 sqeuclidean at scale 1e4, ε = 0.05 returned Inf).
template <class T>
inline bool scaling_safe(const T* C, int n, int m, int ld, double eps) {
  // max |C| over the valid block; the padding columns up to ld are 0 (gather), so whole
  // vectors can be read.
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  V vmx = S::set1(T(0));
  T cmax = T(0);
  for (int i = 0; i < n; ++i) {
    const T* x = C + (int64_t)i * ld;
    int j = 0;
    if (ld % L == 0)
      for (; j < m; j += L) {
        const V c = S::load(x + j);
        vmx = S::vmax(vmx, S::vmax(c, -c));
      }
    for (; j < m; ++j) cmax = std::max(cmax, std::fabs(x[j]));
  }
  cmax = std::max(cmax, S::hmax(vmx));
  return 48.0 * (double)std::numeric_limits<T>::epsilon() * (double)cmax <= eps;
}

// Balanced plans satisfy P_ij ≤ b_j ≤ 1 exactly (the column marginal after a g-update). When
// ε is far below the rounding of the potentials (|f| ~ 1e9 in fp32 with ε = 0.05) the final
// potentials are not consistent to within ε and exp((f + g − C)/ε) can overflow; the bound
// keeps the plan finite there (issue 9) and never binds otherwise.
template <class T>
inline void clamp_plan(T* P, size_t count) {
  for (size_t q = 0; q < count; ++q) P[q] = std::min(P[q], T(1));
}

// ε at iteration t (1-based) from the schedule table of the args (issue 9: the table holds
// only the iterations before ε_t reaches eps, not max_iter entries).
template <class Args>
inline double eps_at(const Args& A, int t) {
  return t <= A.eps_len ? A.eps_t[t - 1] : A.eps;
}

struct FwdArgs {
  int B = 0, n = 0, m = 0;
  const void* C = nullptr;
  int64_t sCb = 0, sCn = 0, sCm = 0;
  const void* a = nullptr;
  int64_t sab = 0, san = 0;
  const void* b = nullptr;
  int64_t sbb = 0, sbm = 0;
  double eps = 0.05, rho = -1.0;   // rho <= 0: balanced
  const double* eps_t = nullptr;   // [eps_len] ε_t (computed by Python: cfg.eps_at)
  int eps_len = 0;                 // ε_t = eps for t > eps_len (constant ε: 0, no table)
  int max_iter = 100;
  double tol = 0.0;
  int check_every = 10;
  void* f = nullptr;               // [B, n] contiguous, zero-filled by the caller
  void* g = nullptr;               // [B, m] contiguous, zero-filled by the caller
  void* value = nullptr;           // [B]
  void* value_linear = nullptr;    // [B]
  int32_t* n_iters = nullptr;      // [B]
  void* err = nullptr;             // [B]
  void* hist_f = nullptr;          // [max_iter, B, n] zero-filled, or null (unrolled history)
  void* hist_g = nullptr;          // [max_iter, B, m]
  int num_threads = 1;
  double tau = 0.0;                // absorption threshold on |log u|; 0: dtype default
  int log_only = 0;                // 1: plain log-domain iterations (no scaling form)
  int fixed_point_exit = 1;        // 1: end the loop at an exact fixed point (forward.cpp)
  int32_t* iters_run = nullptr;    // optional [B]: iterations computed (diagnostics, tests)
  int64_t par_min = 0;             // problems with n·m >= this run with inner parallelism
};

// Arguments of the backward pass.
struct BwdArgs {
  int B = 0, n = 0, m = 0;
  const void* C = nullptr;
  int64_t sCb = 0, sCn = 0, sCm = 0;
  const void* a = nullptr;
  int64_t sab = 0, san = 0;
  const void* b = nullptr;
  int64_t sbb = 0, sbm = 0;
  const void* f = nullptr;         // [B, n] contiguous
  const void* g = nullptr;         // [B, m] contiguous
  const int32_t* n_iters = nullptr;
  const void* hist_f = nullptr;    // [hist_T, B, n] contiguous, or null
  const void* hist_g = nullptr;    // [hist_T, B, m] contiguous
  int hist_T = 0;
  double eps = 0.05, rho = -1.0;
  const double* eps_t = nullptr;   // [eps_len] ε_t; ε_t = eps for t > eps_len
  int eps_len = 0;
  const void* gv = nullptr;        // [B] grad of value
  const void* gl = nullptr;        // [B] grad of value_linear
  void* dC = nullptr;              // [B, n, m] contiguous, zero-filled by the caller
  int mode = kEnvelope;            // GradMode (csrc/common/okc_constants.h)
  int cg_max_iter = 0;             // CG cap, resolved by Python (SolverConfig.cg_limits)
  double cg_tol = 0.0;             // CG relative residual, resolved likewise
  int direct_max = 0;              // implicit: dense Schur solve when min(n, m) <= this, else CG
  int log_only = 0;                // unrolled: 1 = log-domain reverse pass (no scaling form)
  int num_threads = 1;
  int64_t par_min = 0;             // FwdArgs / BwdArgs are filled from CpuParams (bindings.cpp)
};

// 64-byte aligned growable buffer.
template <class T>
struct Buf {
  T* p = nullptr;
  size_t cap = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  T* get(size_t n) {
    if (n > cap) {
      std::free(p);
      size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      cap = n;
    }
    return p;
  }
};

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Run fn(lo, hi) over [0, total) in chunks of `grain`, in parallel when `par`.
template <class F>
inline void pfor(bool par, int nt, int total, int grain, F&& fn) {
  if (!par || total <= grain || nt <= 1) {
    fn(0, total);
    return;
  }
  const int nch = (total + grain - 1) / grain;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int q = 0; q < nch; ++q) fn(q * grain, std::min(total, (q + 1) * grain));
}

// Grain (multiple of L) splitting `total` columns into ~4 chunks per thread.
inline int col_grain(int total, int nt, int L) {
  int g = (total + 4 * nt - 1) / (4 * nt);
  g = round_up(std::max(g, 4 * L), L);
  return g;
}

// ----------------------------------------------------------------------------- kernels
// All matrices are row-major with a leading dimension `ld` that is a multiple of L; column
// ranges [c0, c1) handed to the column kernels are multiples of L (c1 may be ld).

// out[c] = Σ_{r<R} w[r·ws] X[r, c]  (register-blocked axpy over rows; no horizontal sums;
// the weights may be strided: ws = 1 for a vector, the row length for a column of a matrix).
template <class T, int NB, int U>
inline void colsum_block(const T* X, int ld, int R, const T* w, int64_t ws, T* out, int c) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  V acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int q = 0; q < NB; ++q) acc[u][q] = S::set1(T(0));
  // One running row pointer: no index arithmetic per row in the hot loop.
  const T* x = X + c;
  const int64_t step = (int64_t)U * ld;
  int r = 0;
  for (; r + U <= R; r += U, x += step) {
    for (int u = 0; u < U; ++u) {
      const V wr = S::set1(w[(r + u) * ws]);
      for (int q = 0; q < NB; ++q) acc[u][q] += wr * S::load(x + (int64_t)u * ld + q * L);
    }
  }
  for (; r < R; ++r, x += ld) {
    const V wr = S::set1(w[r * ws]);
    for (int q = 0; q < NB; ++q) acc[0][q] += wr * S::load(x + q * L);
  }
  for (int q = 0; q < NB; ++q) {
    V s = acc[0][q];
    for (int u = 1; u < U; ++u) s += acc[u][q];
    S::store(out + c + q * L, s);
  }
}

template <class T>
inline void colsum(const T* X, int ld, int R, const T* w, T* out, int c0, int c1,
                   int64_t ws = 1) {
  constexpr int L = Simd<T>::L;
  int c = c0;
  for (; c + 4 * L <= c1; c += 4 * L) colsum_block<T, 4, 2>(X, ld, R, w, ws, out, c);
  for (; c + 2 * L <= c1; c += 2 * L) colsum_block<T, 2, 4>(X, ld, R, w, ws, out, c);
  for (; c + L <= c1; c += L) colsum_block<T, 1, 8>(X, ld, R, w, ws, out, c);
}

// out[r] = Σ_c X[r, c] w[c] for rows [r0, r1) (w zero-padded to ld).
template <class T>
inline void rowdot(const T* X, int ld, const T* w, T* out, int r0, int r1) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  for (int r = r0; r < r1; ++r) {
    const T* x = X + (int64_t)r * ld;
    V a0 = S::set1(T(0)), a1 = S::set1(T(0));
    int c = 0;
    for (; c + 2 * L <= ld; c += 2 * L) {
      a0 += S::load(x + c) * S::load(w + c);
      a1 += S::load(x + c + L) * S::load(w + c + L);
    }
    for (; c < ld; c += L) a0 += S::load(x + c) * S::load(w + c);
    out[r] = S::hsum(a0 + a1);
  }
}

// lse[c] = log Σ_{r<R} exp(alpha[r] − X[r, c]·ie)  (two passes: max, then sum of exp).
template <class T>
inline void col_lse(const T* X, int ld, int R, const T* alpha, T ie, T* lse, int c0, int c1) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  const V vie = S::set1(ie);
  const V ninf = S::set1(-std::numeric_limits<T>::infinity());
  int c = c0;
  for (; c + 2 * L <= c1; c += 2 * L) {
    V m0 = ninf, m1 = ninf;
    for (int r = 0; r < R; ++r) {
      const T* x = X + (int64_t)r * ld + c;
      const V al = S::set1(alpha[r]);
      m0 = S::vmax(m0, al - S::load(x) * vie);
      m1 = S::vmax(m1, al - S::load(x + L) * vie);
    }
    V s0 = S::set1(T(0)), s1 = S::set1(T(0));
    for (int r = 0; r < R; ++r) {
      const T* x = X + (int64_t)r * ld + c;
      const V al = S::set1(alpha[r]);
      s0 += S::exp(al - S::load(x) * vie - m0);
      s1 += S::exp(al - S::load(x + L) * vie - m1);
    }
    S::store(lse + c, m0 + S::log(s0));
    S::store(lse + c + L, m1 + S::log(s1));
  }
  for (; c + L <= c1; c += L) {
    V m0 = ninf;
    for (int r = 0; r < R; ++r) {
      const V al = S::set1(alpha[r]);
      m0 = S::vmax(m0, al - S::load(X + (int64_t)r * ld + c) * vie);
    }
    V s0 = S::set1(T(0));
    for (int r = 0; r < R; ++r) {
      const V al = S::set1(alpha[r]);
      s0 += S::exp(al - S::load(X + (int64_t)r * ld + c) * vie - m0);
    }
    S::store(lse + c, m0 + S::log(s0));
  }
}

// K[r, c] = exp((alpha[r] + beta[c]) − X[r, c]·ie) for rows [r0, r1), all ld columns.
// beta is −inf on padded columns, which gives exactly 0 there.
template <class T>
inline void build_exp(const T* X, int ld, const T* alpha, const T* beta, T ie, T* K, int r0,
                      int r1) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  const V vie = S::set1(ie);
  for (int r = r0; r < r1; ++r) {
    const T* x = X + (int64_t)r * ld;
    T* k = K + (int64_t)r * ld;
    const V al = S::set1(alpha[r]);
    for (int c = 0; c < ld; c += L) S::store(k + c, S::exp((al + S::load(beta + c)) - S::load(x + c) * vie));
  }
}

// Plan rows P[r, c] = exp(((F[r] + G[c]) − X[r, c])·ie + (la[r] + lb[c])) for rows [r0, r1).
// The potentials are combined before the division by ε (as the reference does): for small ε,
// f/ε and g/ε are large and their float32 rounding would otherwise dominate log P.
// lb is −inf on padded columns (exact 0 there).
template <class T>
inline void build_plan(const T* X, int ld, const T* F, const T* G, const T* la, const T* lb,
                       T ie, T* Pout, int r0, int r1) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  const V vie = S::set1(ie);
  for (int r = r0; r < r1; ++r) {
    const T* x = X + (int64_t)r * ld;
    T* p = Pout + (int64_t)r * ld;
    const V f = S::set1(F[r]), a = S::set1(la[r]);
    for (int c = 0; c < ld; c += L)
      S::store(p + c, S::exp(((f + S::load(G + c)) - S::load(x + c)) * vie + (a + S::load(lb + c))));
  }
}

// Per-thread workspace of one problem: compacted cost (and its transpose), weights.
template <class T>
struct Problem {
  static constexpr int L = Simd<T>::L;
  int n = 0, m = 0, ldn = 0, ldm = 0;
  std::vector<int> ri, ci;
  bool ci_identity = false;
  Buf<T> C, CT, a, b, la, lb;

  // Collect valid rows (a > 0) and columns (b > 0) of problem k. Returns false if empty.
  bool select(const T* ap, int64_t san, int n_all, const T* bp, int64_t sbm, int m_all) {
    ri.clear();
    ci.clear();
    for (int i = 0; i < n_all; ++i)
      if (ap[i * san] > T(0)) ri.push_back(i);
    for (int j = 0; j < m_all; ++j)
      if (bp[j * sbm] > T(0)) ci.push_back(j);
    n = (int)ri.size();
    m = (int)ci.size();
    ci_identity = m == m_all;  // every column valid: ci[j] == j
    if (n == 0 || m == 0) return false;
    ldn = round_up(n, L);
    ldm = round_up(m, L);
    const int lv = std::max(ldn, ldm) + L;
    T* A = a.get(lv);
    T* Bw = b.get(lv);
    T* LA = la.get(lv);
    T* LB = lb.get(lv);
    for (int i = 0; i < lv; ++i) A[i] = Bw[i] = LA[i] = LB[i] = T(0);
    // log a, log b: one libm call per distinct run of equal weights (uniform weights, the
    // common case, need one), the same value bit for bit
    T prev = T(-1), lg = T(0);
    for (int i = 0; i < n; ++i) {
      A[i] = ap[ri[i] * san];
      if (A[i] != prev) lg = std::log(prev = A[i]);
      LA[i] = lg;
    }
    prev = T(-1);
    for (int j = 0; j < m; ++j) {
      Bw[j] = bp[ci[j] * sbm];
      if (Bw[j] != prev) lg = std::log(prev = Bw[j]);
      LB[j] = lg;
    }
    return true;
  }

  // XT[j, i] = X[i, j] for the columns [j0, j1) (rows padded with 0 up to ldn), in 8 × 8
  // tiles: the compiler keeps a tile in registers, where the plain strided loop spent ~6
  // instructions per entry on index arithmetic.
  void transpose_cols(const T* X, T* XT, int j0, int j1) const {
    constexpr int TB = 8;
    int j = j0;
    for (; j + TB <= j1; j += TB) {
      int i = 0;
      for (; i + TB <= n; i += TB)
        for (int jj = 0; jj < TB; ++jj)
          for (int ii = 0; ii < TB; ++ii)
            XT[(int64_t)(j + jj) * ldn + i + ii] = X[(int64_t)(i + ii) * ldm + j + jj];
      for (int jj = 0; jj < TB; ++jj) {
        T* dst = XT + (int64_t)(j + jj) * ldn;
        for (int r = i; r < n; ++r) dst[r] = X[(int64_t)r * ldm + j + jj];
        for (int r = n; r < ldn; ++r) dst[r] = T(0);
      }
    }
    for (; j < j1; ++j) {
      T* dst = XT + (int64_t)j * ldn;
      for (int i = 0; i < n; ++i) dst[i] = X[(int64_t)i * ldm + j];
      for (int i = n; i < ldn; ++i) dst[i] = T(0);
    }
  }

  // Transpose [m, ldn] of the gathered cost.
  void gather_transpose() { transpose_cols(C.p, CT.get((size_t)m * ldn), 0, m); }

  // Gather the compacted cost [n, ldm] (zero padded) and, if wanted, its transpose [m, ldn].
  void gather(const T* Cp, int64_t sn, int64_t sm, bool transpose, bool par, int nt) {
    T* X = C.get((size_t)n * ldm);
    pfor(par, nt, n, 64, [&](int r0, int r1) {
      for (int i = r0; i < r1; ++i) {
        const T* src = Cp + ri[i] * sn;
        T* dst = X + (int64_t)i * ldm;
        if (sm == 1 && ci_identity) {
          std::memcpy(dst, src, sizeof(T) * m);
        } else if (sm == 1) {
          for (int j = 0; j < m; ++j) dst[j] = src[ci[j]];
        } else {
          for (int j = 0; j < m; ++j) dst[j] = src[ci[j] * sm];
        }
        for (int j = m; j < ldm; ++j) dst[j] = T(0);
      }
    });
    if (!transpose) return;
    T* XT = CT.get((size_t)m * ldn);
    pfor(par, nt, m, 64, [&](int c0, int c1) { transpose_cols(X, XT, c0, c1); });
  }
};

// Run every problem of a batch: problems whose valid n·m reaches A.par_min (and `allow_inner`)
// run one after another with inner parallelism over `nt` threads; the others run in parallel,
// one problem per thread. `make()` builds a worker (one per thread) called as
// `worker(k, inner, threads)`. Shared by the forward and backward entry points.
template <class T, class Args, class MakeWorker>
void run_batch(const Args& A, int nt, bool allow_inner, MakeWorker make) {
  std::vector<int> small, large;
  const T* ap = static_cast<const T*>(A.a);
  const T* bp = static_cast<const T*>(A.b);
  for (int k = 0; k < A.B; ++k) {
    int64_t nv = 0, mv = 0;
    for (int i = 0; i < A.n; ++i) nv += ap[k * A.sab + i * A.san] > T(0);
    for (int j = 0; j < A.m; ++j) mv += bp[k * A.sbb + j * A.sbm] > T(0);
    (nt > 1 && allow_inner && nv * mv >= A.par_min ? large : small).push_back(k);
  }
  if (!small.empty()) {
    const int ns = (int)small.size();
    const int nts = std::min(nt, ns);
#pragma omp parallel num_threads(nts)
    {
      auto worker = make();
#pragma omp for schedule(dynamic, 1)
      for (int q = 0; q < ns; ++q) worker(small[q], false, 1);
    }
  }
  if (!large.empty()) {
    auto worker = make();
    for (int k : large) worker(k, true, nt);
  }
}

}  // namespace okc
