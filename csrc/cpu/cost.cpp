// Fused point costs of the CPU backend: C [B, n, m] from points x [B, n, d], y [B, m, d], and
// its chain rule, one pass over each problem's points while they sit in cache
// (docs/design.md §2 for the costs, §5 for this layout).
//
//   cosine  C_ij = 1 − (x_i·y_j) σ_i τ_j,  σ_i = 1/‖x_i‖ (0 where ‖x_i‖ < floor), τ likewise
//   dot     C_ij = −x_i·y_j
//
// Forward, per problem: the GEMM x·yᵀ written straight into C (it streams the points in), the
// inverse norms σ, τ (cosine; the points reread from cache), then one epilogue over the small
// [n, m] block: the cost, the finiteness flag (taken before masking, as the torch path checks
// C) and 0 at padded entries (x_valid, y_valid).
// Backward, from G = ∂L/∂C (its padded entries are ignored):
//
//   cosine  ∂L/∂x_i = c_i x_i + Σ_j W_ij y_j,  W_ij = −G_ij σ_i τ_j,  c_i = σ_i² Σ_j G_ij S_ij
//           (S = 1 − C, the cosine similarities); ∂L/∂y_j = e_j y_j + Σ_i W_ij x_i,
//           e_j = τ_j² Σ_i G_ij S_ij
//   dot     W = −G, c = e = 0
//
// so each gradient is one GEMM and one pass adding the radial part. The GEMMs go to the BLAS
// ?gemm_ that torch itself links (its address comes from Python, backends/cpu.py), called per
// problem inside the OpenMP loop over problems (one thread each), or, for a batch smaller than
// the thread count, once per problem on BLAS's own threads with the passes split over rows.
// Without that address a built-in register-blocked GEMM runs.
#include "common.h"
#include "okc_cpu_params.h"

#include <atomic>

namespace okc {

template <class T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const T*, const T*, const int*, const T*, const int*, const T*, T*,
                          const int*);

template <class T>
struct CostArgs {
  int B = 0, n = 0, m = 0, d = 0, cost = kCosine;
  const T* x = nullptr;
  const T* y = nullptr;
  const uint8_t* xv = nullptr;  // [B, n] or null (all valid)
  const uint8_t* yv = nullptr;  // [B, m] or null
  T* C = nullptr;               // forward out / backward in (the masked cost)
  T* xs = nullptr;              // [B, n] σ (cosine): forward out, backward in
  T* ys = nullptr;              // [B, m] τ
  const T* G = nullptr;         // backward: [B, n, m]
  T* dx = nullptr;              // backward: [B, n, d] or null
  T* dy = nullptr;              // backward: [B, m, d] or null
  BlasGemm<T> gemm = nullptr;
  T floor = T(1e-8);
  int num_threads = 1;
};

// ------------------------------------------------------------------------------- GEMMs
// Row-major wrappers of the column-major BLAS call; built-in kernels where there is none.

// C[n, m] (ld m) = X[n, d] · Y[m, d]ᵀ.
template <class T>
static void gemm_nt(const CostArgs<T>& A, const T* X, const T* Y, int n, int m, int d, T* C) {
  if (d == 0) {  // an empty sum (BLAS needs leading dimensions >= 1)
    std::fill(C, C + (int64_t)n * m, T(0));
    return;
  }
  if (A.gemm) {
    const T one = T(1), zero = T(0);
    A.gemm("T", "N", &m, &n, &d, &one, Y, &d, X, &d, &zero, C, &m);
    return;
  }
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  // 4 × 4 dot products at a time, vectors along d, one horizontal sum per entry at the end
  auto block = [&](int i0, int ni, int j0, int nj) {
    V acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = S::set1(T(0));
    int k = 0;
    for (; k + L <= d; k += L)
      for (int r = 0; r < ni; ++r) {
        const V xv = S::load(X + (int64_t)(i0 + r) * d + k);
        for (int q = 0; q < nj; ++q) acc[r][q] += xv * S::load(Y + (int64_t)(j0 + q) * d + k);
      }
    for (int r = 0; r < ni; ++r)
      for (int q = 0; q < nj; ++q) {
        T s = S::hsum(acc[r][q]);
        for (int kk = k; kk < d; ++kk) s += X[(int64_t)(i0 + r) * d + kk] * Y[(int64_t)(j0 + q) * d + kk];
        C[(int64_t)(i0 + r) * m + j0 + q] = s;
      }
  };
  for (int i = 0; i < n; i += 4)
    for (int j = 0; j < m; j += 4) block(i, std::min(4, n - i), j, std::min(4, m - j));
}

// D[r, d] = W[r, s] · P[s, d], W of leading dimension ldw (trans_w: W is stored [s, r] and
// used transposed).
template <class T>
static void gemm_wp(const CostArgs<T>& A, bool trans_w, const T* W, int ldw, const T* P, int r,
                    int s, int d, T* D) {
  if (d == 0) return;
  if (s == 0) {
    std::fill(D, D + (int64_t)r * d, T(0));
    return;
  }
  if (A.gemm) {
    const T one = T(1), zero = T(0);
    A.gemm("N", trans_w ? "T" : "N", &d, &r, &s, &one, P, &d, W, &ldw, &zero, D, &d);
    return;
  }
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  for (int i = 0; i < r; ++i) {
    T* out = D + (int64_t)i * d;
    int k = 0;
    for (; k + 4 * L <= d; k += 4 * L) {
      V a0 = S::set1(T(0)), a1 = a0, a2 = a0, a3 = a0;
      for (int j = 0; j < s; ++j) {
        const V w = S::set1(trans_w ? W[(int64_t)j * ldw + i] : W[(int64_t)i * ldw + j]);
        const T* p = P + (int64_t)j * d + k;
        a0 += w * S::load(p), a1 += w * S::load(p + L), a2 += w * S::load(p + 2 * L),
            a3 += w * S::load(p + 3 * L);
      }
      S::store(out + k, a0), S::store(out + k + L, a1), S::store(out + k + 2 * L, a2),
          S::store(out + k + 3 * L, a3);
    }
    for (; k < d; ++k) {
      T sum = T(0);
      for (int j = 0; j < s; ++j)
        sum += (trans_w ? W[(int64_t)j * ldw + i] : W[(int64_t)i * ldw + j]) * P[(int64_t)j * d + k];
      out[k] = sum;
    }
  }
}

// D[i, :] += c_i P[i, :] for rows i < r of P, D [r, d].
template <class T>
static inline void add_radial(T* D, const T* P, const T* c, int r, int d) {
  for (int i = 0; i < r; ++i) {
    const T ci = c[i];
    T* o = D + (int64_t)i * d;
    const T* p = P + (int64_t)i * d;
    for (int q = 0; q < d; ++q) o[q] += ci * p[q];
  }
}

// -------------------------------------------------------------------------- per problem
// out[i] = 1/‖P_i‖ for rows i < rows of P [rows, d], 0 where ‖P_i‖ < floor (NaN stays NaN:
// the finiteness flag catches it).
template <class T>
static void inv_norms(const T* P, int rows, int d, T floor, T* out) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L;
  for (int i = 0; i < rows; ++i) {
    const T* p = P + (int64_t)i * d;
    V a0 = S::set1(T(0)), a1 = S::set1(T(0));
    int k = 0;
    for (; k + 2 * L <= d; k += 2 * L) {
      const V u = S::load(p + k), v = S::load(p + k + L);
      a0 += u * u, a1 += v * v;
    }
    for (; k + L <= d; k += L) {
      const V u = S::load(p + k);
      a0 += u * u;
    }
    T s = S::hsum(a0 + a1);
    for (; k < d; ++k) s += p[k] * p[k];
    const T norm = std::sqrt(s);
    out[i] = norm < floor ? T(0) : T(1) / norm;
  }
}

// One problem's pointers.
template <class T>
struct CostProblem {
  int n, m, d;
  bool cosine;
  const T *X, *Y, *G;
  T *C, *xs, *ys, *dx, *dy;
  const uint8_t *xv, *yv;
  CostProblem(const CostArgs<T>& A, int k) : n(A.n), m(A.m), d(A.d), cosine(A.cost == kCosine) {
    X = A.x + (int64_t)k * n * d;
    Y = A.y + (int64_t)k * m * d;
    C = A.C + (int64_t)k * n * m;
    G = A.G ? A.G + (int64_t)k * n * m : nullptr;
    xs = cosine ? A.xs + (int64_t)k * n : nullptr;
    ys = cosine ? A.ys + (int64_t)k * m : nullptr;
    dx = A.dx ? A.dx + (int64_t)k * n * d : nullptr;
    dy = A.dy ? A.dy + (int64_t)k * m * d : nullptr;
    xv = A.xv ? A.xv + (int64_t)k * n : nullptr;
    yv = A.yv ? A.yv + (int64_t)k * m : nullptr;
  }
};

// Forward epilogue on the rows [i0, i1) of S = x·yᵀ (in C): the cost in place, 0 at padded
// entries; returns whether the unmasked cost was finite there.
template <class T>
static bool cost_rows(const CostProblem<T>& P, int i0, int i1) {
  const int m = P.m;
  bool finite = true;
  for (int i = i0; i < i1; ++i) {
    T* c = P.C + (int64_t)i * m;
    if (P.cosine) {
      const T si = P.xs[i];
      for (int j = 0; j < m; ++j) c[j] = T(1) - c[j] * si * P.ys[j];  // torch: (S σ) τ, 1 − ·
    } else {
      for (int j = 0; j < m; ++j) c[j] = -c[j];
    }
    T probe = T(0);  // NaN/Inf propagate through the sum: probe ≠ 0 iff a term is not finite
    for (int j = 0; j < m; ++j) probe += c[j] * T(0);
    if (probe != T(0)) finite = false;
    if (P.xv && !P.xv[i]) {
      for (int j = 0; j < m; ++j) c[j] = T(0);
    } else if (P.yv) {
      for (int j = 0; j < m; ++j) c[j] = P.yv[j] ? c[j] : T(0);
    }
  }
  return finite;
}

// Backward, rows [i0, i1): the GEMM weights W (ld m) and the radial coefficients cx of x.
template <class T>
static void weight_rows(const CostProblem<T>& P, T* W, T* cx, int i0, int i1) {
  const int m = P.m;
  for (int i = i0; i < i1; ++i) {
    const T* g = P.G + (int64_t)i * m;
    const T* c = P.C + (int64_t)i * m;
    T* w = W + (int64_t)i * m;
    T ci = T(0);
    if (P.xv && !P.xv[i]) {  // a padded row: no gradient
      for (int j = 0; j < m; ++j) w[j] = T(0);
    } else if (P.cosine) {
      const T si = P.xs[i];
      for (int j = 0; j < m; ++j) {
        const T gij = !P.yv || P.yv[j] ? g[j] : T(0);
        ci += gij * (T(1) - c[j]);
        w[j] = gij * -(si * P.ys[j]);
      }
      ci *= si * si;
    } else {
      for (int j = 0; j < m; ++j) w[j] = !P.yv || P.yv[j] ? -g[j] : T(0);
    }
    cx[i] = ci;
  }
}

// Backward, columns [j0, j1): the radial coefficients e_j of y (cosine), from G and C.
template <class T>
static void column_coefs(const CostProblem<T>& P, T* cy, int j0, int j1) {
  const int n = P.n, m = P.m;
  for (int j = j0; j < j1; ++j) cy[j] = T(0);
  if (!P.cosine) return;
  for (int i = 0; i < n; ++i) {
    if (P.xv && !P.xv[i]) continue;
    const T* g = P.G + (int64_t)i * m;
    const T* c = P.C + (int64_t)i * m;
    for (int j = j0; j < j1; ++j) {
      const T gij = !P.yv || P.yv[j] ? g[j] : T(0);
      cy[j] += gij * (T(1) - c[j]);
    }
  }
  for (int j = j0; j < j1; ++j) cy[j] *= P.ys[j] * P.ys[j];
}

// fn(r0, r1) over [0, total): in ~4 chunks per thread when `inner` (the problem has all nt
// threads) and there is enough work (`work` per item), else in one piece.
template <class F>
static inline void over_rows(bool inner, int nt, int total, int64_t work, F&& fn) {
  const int64_t by_work = (int64_t)total * std::max<int64_t>(work, 1) / 32768 + 1;
  const int nch = inner ? (int)std::max<int64_t>(1, std::min<int64_t>({4LL * nt, by_work, total}))
                        : 1;
  if (nch <= 1) {
    fn(0, total);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int q = 0; q < nch; ++q)
    fn((int)((int64_t)total * q / nch), (int)((int64_t)total * (q + 1) / nch));
}

// One problem. `inner`: it has all nt threads to itself (a batch smaller than the thread
// count): a BLAS GEMM runs on BLAS's threads, the built-in GEMM and the passes split over rows.
template <class T>
static bool cost_problem(const CostArgs<T>& A, int k, bool inner, int nt) {
  const CostProblem<T> P(A, k);
  const int n = P.n, m = P.m, d = P.d;
  // the GEMM first: it streams the points in, the norms then reread them from cache
  if (A.gemm || !inner) {
    gemm_nt(A, P.X, P.Y, n, m, d, P.C);
  } else {
    over_rows(inner, nt, n, (int64_t)m * d, [&](int i0, int i1) {
      gemm_nt(A, P.X + (int64_t)i0 * d, P.Y, i1 - i0, m, d, P.C + (int64_t)i0 * m);
    });
  }
  if (P.cosine) {
    over_rows(inner, nt, n, d, [&](int i0, int i1) {
      inv_norms(P.X + (int64_t)i0 * d, i1 - i0, d, A.floor, P.xs + i0);
    });
    over_rows(inner, nt, m, d, [&](int j0, int j1) {
      inv_norms(P.Y + (int64_t)j0 * d, j1 - j0, d, A.floor, P.ys + j0);
    });
  }
  std::atomic<bool> finite{true};
  over_rows(inner, nt, n, m, [&](int i0, int i1) {
    if (!cost_rows(P, i0, i1)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// Backward of one problem; W: workspace of n·m + n + m entries.
template <class T>
static void cost_vjp_problem(const CostArgs<T>& A, int k, T* W, bool inner, int nt) {
  const CostProblem<T> P(A, k);
  const int n = P.n, m = P.m, d = P.d;
  T* cx = W + (int64_t)n * m;  // radial coefficients of x [n] and y [m]
  T* cy = cx + n;
  over_rows(inner, nt, n, m, [&](int i0, int i1) { weight_rows(P, W, cx, i0, i1); });
  if (P.dy) over_rows(inner, nt, m, n, [&](int j0, int j1) { column_coefs(P, cy, j0, j1); });
  // One side: out [r, d] = W·Q (trans: Wᵀ·Q), Q the other side's points, then the radial
  // part c ∘ R, R this side's points (prefetching R during the GEMM measured slower: it
  // competes with the GEMM's own stream of Q).
  auto side = [&](T* out, const T* R, const T* Q, const T* c, bool trans, int r, int s) {
    if (A.gemm || !inner) {
      gemm_wp(A, trans, W, m, Q, r, s, d, out);
    } else {
      over_rows(inner, nt, r, (int64_t)s * d, [&](int i0, int i1) {
        const T* w = trans ? W + i0 : W + (int64_t)i0 * m;
        gemm_wp(A, trans, w, m, Q, i1 - i0, s, d, out + (int64_t)i0 * d);
      });
    }
    if (P.cosine)
      over_rows(inner, nt, r, d, [&](int i0, int i1) {
        add_radial(out + (int64_t)i0 * d, R + (int64_t)i0 * d, c + i0, i1 - i0, d);
      });
  };
  if (P.dx) side(P.dx, P.X, P.Y, cx, false, n, m);
  if (P.dy) side(P.dy, P.Y, P.X, cy, true, m, n);
}

// One problem per thread when the batch fills the threads; otherwise problems one after
// another, each with all threads (cost_problem's `inner`).
template <class T>
static bool cost_forward_impl(const CostArgs<T>& A) {
  const int nt = std::max(1, A.num_threads);
  bool finite = true;
  if (A.B >= nt && nt > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(&& : finite)
    for (int k = 0; k < A.B; ++k) finite = cost_problem(A, k, false, 1) && finite;
  } else {
    for (int k = 0; k < A.B; ++k) finite = cost_problem(A, k, nt > 1, nt) && finite;
  }
  return finite;
}

template <class T>
static void cost_backward_impl(const CostArgs<T>& A) {
  const int nt = std::max(1, A.num_threads);
  const size_t ws = (size_t)A.n * A.m + A.n + A.m;
  if (A.B >= nt && nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      Buf<T> W;
      T* w = W.get(ws);
#pragma omp for schedule(dynamic, 1)
      for (int k = 0; k < A.B; ++k) cost_vjp_problem(A, k, w, false, 1);
    }
  } else {
    Buf<T> W;
    T* w = W.get(ws);
    for (int k = 0; k < A.B; ++k) cost_vjp_problem(A, k, w, nt > 1, nt);
  }
}

template <class T>
static CostArgs<T> cost_args(const CostParams& p) {
  CostArgs<T> A;
  A.B = p.B, A.n = p.n, A.m = p.m, A.d = p.d, A.cost = p.cost;
  A.x = reinterpret_cast<const T*>(static_cast<uintptr_t>(p.x));
  A.y = reinterpret_cast<const T*>(static_cast<uintptr_t>(p.y));
  A.xv = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(p.x_valid));
  A.yv = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(p.y_valid));
  A.C = reinterpret_cast<T*>(static_cast<uintptr_t>(p.C));
  A.xs = reinterpret_cast<T*>(static_cast<uintptr_t>(p.x_scale));
  A.ys = reinterpret_cast<T*>(static_cast<uintptr_t>(p.y_scale));
  A.G = reinterpret_cast<const T*>(static_cast<uintptr_t>(p.G));
  A.dx = reinterpret_cast<T*>(static_cast<uintptr_t>(p.dx));
  A.dy = reinterpret_cast<T*>(static_cast<uintptr_t>(p.dy));
  A.gemm = reinterpret_cast<BlasGemm<T>>(static_cast<uintptr_t>(p.gemm));
  A.floor = (T)p.norm_floor;
  A.num_threads = p.num_threads;
  return A;
}

bool cost_forward_run(const CostParams& p) {
  if (p.dtype == kF32) return cost_forward_impl(cost_args<float>(p));
  return cost_forward_impl(cost_args<double>(p));
}

void cost_backward_run(const CostParams& p) {
  if (p.dtype == kF32)
    cost_backward_impl(cost_args<float>(p));
  else
    cost_backward_impl(cost_args<double>(p));
}

// A 2 × 3 × 5 product through the given BLAS address against the built-in GEMM: Python
// checks the address once before using it (a wrong calling convention gives wrong numbers
// here, not in a training run).
bool cost_gemm_selftest(int64_t gemm, int dtype) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    CostArgs<T> A, B0;
    A.gemm = reinterpret_cast<BlasGemm<T>>(static_cast<uintptr_t>(gemm));
    const int n = 2, m = 3, d = 5;
    T X[n * d], Y[m * d], C1[n * m], C2[n * m], D1[n * d], D2[n * d];
    for (int q = 0; q < n * d; ++q) X[q] = T(q % 7) - T(2.5);
    for (int q = 0; q < m * d; ++q) Y[q] = T(q % 5) * T(0.5) - T(1);
    gemm_nt(A, X, Y, n, m, d, C1);
    gemm_nt(B0, X, Y, n, m, d, C2);
    gemm_wp(A, false, C1, m, Y, n, m, d, D1);
    gemm_wp(B0, false, C2, m, Y, n, m, d, D2);
    T E1[m * d], E2[m * d];
    gemm_wp(A, true, C1, m, X, m, n, d, E1);
    gemm_wp(B0, true, C2, m, X, m, n, d, E2);
    auto close = [](const T* u, const T* v, int len) {
      for (int q = 0; q < len; ++q)
        if (!(std::fabs(u[q] - v[q]) <= T(1e-4) * (T(1) + std::fabs(v[q])))) return false;
      return true;
    };
    return close(C1, C2, n * m) && close(D1, D2, n * d) && close(E1, E2, m * d);
  };
  return dtype == kF32 ? run(float{}) : run(double{});
}

}  // namespace okc
