// recycle's CUDA kernels (src/model/kernels/cuda/kernels.cu), compiled as C++ against the CPU
// stand-in in include/cuda_bf16.h and checked against double-precision references written here:
// forward values directly, backward passes by central differences of the forward reference. Each
// kernel runs with the launch geometry src/model/kernels/cuda.rs gives it, and also with fewer
// blocks where the kernel strides over its rows or elements. Prints one PASS/FAIL line per check
// and exits non-zero when one fails. Built and run by tests/it/cuda_emu.rs.

#include "kernels.cu"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>

using bf16 = __nv_bfloat16;
using Vec = std::vector<double>;

static int passed = 0, failed = 0;

static void check(const std::string &name, double err, double tol) {
  const bool ok = std::isfinite(err) && err <= tol;
  std::printf("%s %-64s err %.2e (tol %.1e)\n", ok ? "PASS" : "FAIL", name.c_str(), err, tol);
  (ok ? passed : failed)++;
}

// The largest |a - b| over the largest |b| (or 1 when b is all small): a relative error of the
// whole tensor, as the GPU parity checks measure it.
static double rel_err(const std::vector<float> &a, const Vec &b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); i++) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / std::max(den, 1.0);
}

static Vec randn(size_t n, std::mt19937 &rng, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  Vec v(n);
  for (auto &x : v) x = d(rng);
  return v;
}

template <typename T> std::vector<T> to_dev(const Vec &v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = from_f<T>(float(v[i]));
  return out;
}
template <typename T> std::vector<float> to_host(const std::vector<T> &v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = to_f(v[i]);
  return out;
}
// `v` as the kernel sees it after rounding to T (the reference then starts from the same inputs).
template <typename T> Vec rounded(const Vec &v) {
  Vec out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = to_f(from_f<T>(float(v[i])));
  return out;
}

// d/dx of sum(dy * f(x)) by central differences, for a reference `f` in double.
static Vec numeric_grad(const std::function<Vec(const Vec &)> &f, Vec x, const Vec &dy) {
  const double h = 1e-5;
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); i++) {
    const double keep = x[i];
    x[i] = keep + h;
    const Vec up = f(x);
    x[i] = keep - h;
    const Vec down = f(x);
    x[i] = keep;
    double s = 0;
    for (size_t j = 0; j < dy.size(); j++) s += dy[j] * (up[j] - down[j]);
    g[i] = s / (2 * h);
  }
  return g;
}

// The launch geometry of src/model/kernels/cuda.rs.
static unsigned row_threads(size_t n) {
  return unsigned(std::clamp<size_t>((((n + 3) / 4) + 31) / 32 * 32, 32, 1024));
}
static dim3 elementwise_blocks(size_t n) {
  return dim3(unsigned(std::clamp<size_t>((n + 255) / 256, 1, 65535 * 8)));
}

template <typename T> const char *tname();
template <> const char *tname<float>() { return "f32"; }
template <> const char *tname<bf16>() { return "bf16"; }
// Tolerances: f32 kernels against a double reference; bf16 ones round inputs and outputs to 8
// significant bits.
template <typename T> double tol();
template <> double tol<float>() { return 2e-5; }
template <> double tol<bf16>() { return 1.0 / 64; }

// ---- dropout masks (the reference) -------------------------------------------------------------
// Element i is kept when two rounds of a 32-bit multiply-xorshift finaliser over (the low words
// of i and the seed, then their high words), top 24 bits, reach the threshold: written out here,
// apart from the kernels' `kept`.
static uint32_t ref_mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x7feb352du;
  x = (x ^ (x >> 15)) * 0x846ca68bu;
  return x ^ (x >> 16);
}
static bool ref_kept(uint64_t seed, size_t i, uint32_t threshold) {
  const uint64_t i64 = i;
  uint32_t h = ref_mix32(uint32_t(i64) ^ uint32_t(seed));
  h = ref_mix32(h ^ uint32_t(seed >> 32) ^ (uint32_t(i64 >> 32) * 0x9E3779B9u));
  return (h >> 8) >= threshold;
}

// ---- layer norm ----------------------------------------------------------------------------
// Each row's mean and 1/sqrt(var + eps) of x [rows, n], as [rows, 2].
static Vec ln_ref_stats(const Vec &x, size_t rows, size_t n, double eps) {
  Vec st(2 * rows);
  for (size_t r = 0; r < rows; r++) {
    double m = 0, v = 0;
    for (size_t i = 0; i < n; i++) m += x[r * n + i];
    m /= n;
    for (size_t i = 0; i < n; i++) v += (x[r * n + i] - m) * (x[r * n + i] - m);
    st[2 * r] = m;
    st[2 * r + 1] = 1 / std::sqrt(v / n + eps);
  }
  return st;
}

static Vec ln_ref(const Vec &x, const Vec &w, const Vec &b, size_t rows, size_t n, double eps) {
  const Vec st = ln_ref_stats(x, rows, n, eps);
  Vec y(x.size());
  for (size_t r = 0; r < rows; r++)
    for (size_t i = 0; i < n; i++)
      y[r * n + i] = (x[r * n + i] - st[2 * r]) * st[2 * r + 1] * w[i] + b[i];
  return y;
}

// A dropout mask's parameters, as the kernels take them.
struct Mask {
  uint64_t seed;
  uint32_t threshold;
  float scale;
};

// A layer norm backward's dh (where given: dx through `mask`) and its dw and db (`sums`: dw, then
// db) against the references, as `what`; `ok`: the launches ran.
template <typename T>
static void ln_check_grads(const std::string &what, bool ok, const std::vector<T> *dh, const Vec &gx,
                           Mask mask, const std::vector<float> &sums, const Vec &gw, const Vec &gb) {
  if (dh) {
    Vec want(gx.size());
    for (size_t i = 0; i < want.size(); i++)
      want[i] = ref_kept(mask.seed, i, mask.threshold) ? gx[i] * mask.scale : 0.0;
    check(what + ": dh", ok ? rel_err(to_host(*dh), want) : INFINITY, 4 * tol<T>());
  }
  const size_t n = gw.size();
  const std::vector<float> dw(sums.begin(), sums.begin() + n), db(sums.begin() + n, sums.end());
  check(what + ": dw", ok ? rel_err(dw, gw) : INFINITY, 4 * tol<T>());
  check(what + ": db", ok ? rel_err(db, gb) : INFINITY, 4 * tol<T>());
}

template <typename T>
static void layer_norm(size_t rows, size_t n, unsigned dwdb_blocks, std::mt19937 &rng) {
  const float eps = 1e-5f;
  const Vec x = rounded<T>(randn(rows * n, rng, 2.0)), w = rounded<T>(randn(n, rng)),
            b = rounded<T>(randn(n, rng)), dy = rounded<T>(randn(rows * n, rng));
  const auto xd = to_dev<T>(x), wd = to_dev<T>(w), bd = to_dev<T>(b), dyd = to_dev<T>(dy);
  std::vector<T> y(rows * n), dx(rows * n);
  std::vector<float> dwdb(2 * n, 0.f);
  const std::string at = std::string(tname<T>()) + " " + std::to_string(rows) + "x" +
                         std::to_string(n);
  emu::launch(dim3(rows), dim3(row_threads(n)), [&] {
    if constexpr (std::is_same_v<T, float>)
      layer_norm_fwd_f32(xd.data(), wd.data(), bd.data(), y.data(), int(n), eps);
    else
      layer_norm_fwd_bf16(xd.data(), wd.data(), bd.data(), y.data(), int(n), eps);
  });
  check("layer_norm_fwd " + at, rel_err(to_host(y), ln_ref(x, w, b, rows, n, eps)), tol<T>());

  emu::launch(dim3(rows), dim3(row_threads(n)), [&] {
    if constexpr (std::is_same_v<T, float>)
      layer_norm_bwd_dx_f32(xd.data(), wd.data(), dyd.data(), dx.data(), int(n), eps);
    else
      layer_norm_bwd_dx_bf16(xd.data(), wd.data(), dyd.data(), dx.data(), int(n), eps);
  });
  const Vec gx = numeric_grad([&](const Vec &v) { return ln_ref(v, w, b, rows, n, eps); }, x, dy);
  check("layer_norm_bwd_dx " + at, rel_err(to_host(dx), gx), 4 * tol<T>());
  {
    // With the branch's dropout in the same pass: the same dx, and dh = dx through the
    // reference mask.
    const uint64_t seed = 21;
    const float p_drop = 0.3f, drop_scale = 1 / (1 - p_drop);
    const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
    std::vector<T> dx2(rows * n), dh(rows * n);
    emu::launch(dim3(rows), dim3(row_threads(n)), [&] {
      if constexpr (std::is_same_v<T, float>)
        layer_norm_bwd_dx_drop_f32(xd.data(), wd.data(), dyd.data(), dx2.data(), dh.data(), int(n),
                                   eps, seed, threshold, drop_scale);
      else
        layer_norm_bwd_dx_drop_bf16(xd.data(), wd.data(), dyd.data(), dx2.data(), dh.data(),
                                    int(n), eps, seed, threshold, drop_scale);
    });
    Vec want(rows * n);
    for (size_t i = 0; i < want.size(); i++)
      want[i] = ref_kept(seed, i, threshold) ? gx[i] * drop_scale : 0.0;
    check("layer_norm_bwd_dx_drop dx " + at, rel_err(to_host(dx2), gx), 4 * tol<T>());
    check("layer_norm_bwd_dx_drop dh, p 0.3 " + at, rel_err(to_host(dh), want), 4 * tol<T>());
  }

  std::vector<T> dxw(rows * n);  // the warp kernel's dx, which the one-pass kernel's must equal
  if (n <= size_t(LN_WARP_MAX_N)) {
    // The warp-per-row kernels (rows of up to LN_WARP_MAX_N): the same references; fewer rows
    // than the block's eight warps leave some idle.
    const dim3 grid(unsigned((rows + 7) / 8)), warps(32, 8);
    std::vector<T> yw(rows * n), dx2w(rows * n), dhw(rows * n);
    emu::launch(grid, warps, [&] {
      if constexpr (std::is_same_v<T, float>)
        layer_norm_fwd_warp_f32(xd.data(), wd.data(), bd.data(), yw.data(), rows, int(n), eps);
      else
        layer_norm_fwd_warp_bf16(xd.data(), wd.data(), bd.data(), yw.data(), rows, int(n), eps);
    });
    check("layer_norm_fwd_warp " + at, rel_err(to_host(yw), ln_ref(x, w, b, rows, n, eps)), tol<T>());
    emu::launch(grid, warps, [&] {
      if constexpr (std::is_same_v<T, float>)
        layer_norm_bwd_dx_warp_f32(xd.data(), wd.data(), dyd.data(), dxw.data(), rows, int(n), eps);
      else
        layer_norm_bwd_dx_warp_bf16(xd.data(), wd.data(), dyd.data(), dxw.data(), rows, int(n), eps);
    });
    check("layer_norm_bwd_dx_warp " + at, rel_err(to_host(dxw), gx), 4 * tol<T>());
    const uint64_t seed = 23;
    const float p_drop = 0.2f, drop_scale = 1 / (1 - p_drop);
    const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
    emu::launch(grid, warps, [&] {
      if constexpr (std::is_same_v<T, float>)
        layer_norm_bwd_dx_drop_warp_f32(xd.data(), wd.data(), dyd.data(), dx2w.data(), dhw.data(), rows,
                                        int(n), eps, seed, threshold, drop_scale);
      else
        layer_norm_bwd_dx_drop_warp_bf16(xd.data(), wd.data(), dyd.data(), dx2w.data(), dhw.data(), rows,
                                         int(n), eps, seed, threshold, drop_scale);
    });
    Vec want(rows * n);
    for (size_t i = 0; i < want.size(); i++)
      want[i] = ref_kept(seed, i, threshold) ? gx[i] * drop_scale : 0.0;
    check("layer_norm_bwd_dx_drop_warp dx " + at, rel_err(to_host(dx2w), gx), 4 * tol<T>());
    check("layer_norm_bwd_dx_drop_warp dh, p 0.2 " + at, rel_err(to_host(dhw), want), 4 * tol<T>());
  }

  std::vector<float> stats(2 * rows);
  emu::launch(dim3(unsigned((rows + 7) / 8)), dim3(32, 8), [&] {
    if constexpr (std::is_same_v<T, float>)
      layer_norm_stats_f32(xd.data(), stats.data(), rows, int(n), eps);
    else
      layer_norm_stats_bf16(xd.data(), stats.data(), rows, int(n), eps);
  });
  check("layer_norm_stats " + at, rel_err(stats, ln_ref_stats(x, rows, n, eps)), 2e-5);
  const unsigned threads = unsigned(std::clamp<size_t>((((n + 15) / 16) + 31) / 32 * 32, 128, 1024));
  emu::launch(dim3(dwdb_blocks), dim3(threads), [&] {
    if constexpr (std::is_same_v<T, float>)
      layer_norm_bwd_dwdb_f32(xd.data(), dyd.data(), stats.data(), dwdb.data(), rows, int(n));
    else
      layer_norm_bwd_dwdb_bf16(xd.data(), dyd.data(), stats.data(), dwdb.data(), rows, int(n));
  });
  const Vec gw = numeric_grad([&](const Vec &v) { return ln_ref(x, v, b, rows, n, eps); }, w, dy);
  const Vec gb = numeric_grad([&](const Vec &v) { return ln_ref(x, w, v, rows, n, eps); }, b, dy);
  const std::vector<float> dw(dwdb.begin(), dwdb.begin() + n), db(dwdb.begin() + n, dwdb.end());
  const std::string blocks = " over " + std::to_string(dwdb_blocks) + " blocks";
  check("layer_norm_bwd_dwdb dw " + at + blocks, rel_err(dw, gw), 4 * tol<T>());
  check("layer_norm_bwd_dwdb db " + at + blocks, rel_err(db, gb), 4 * tol<T>());

  if (n <= size_t(LN_FUSED_MAX_N)) {
    // The whole backward in one pass, then the blocks' sums added: one block (every warp taking
    // several rows where there are more than eight) and the grid cuda.rs gives (a block per 16
    // rows); with and without the dropout output.
    std::vector<unsigned> grids{1u};
    if (rows > 16) grids.push_back(unsigned((rows + 15) / 16));
    for (const unsigned grid : grids) {
      for (const bool drop : {true, false}) {
        const uint64_t seed = 29;
        const float p_drop = drop ? 0.25f : 0.f, drop_scale = 1 / (1 - p_drop);
        const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
        std::vector<T> dxf(rows * n), dhf(rows * n);
        std::vector<float> partial(size_t(grid) * 2 * n, NAN), sums(2 * n, NAN);
        T *dh_arg = drop ? dhf.data() : nullptr;
        bool ok = emu::launch(dim3(grid), dim3(32, LN_FUSED_WARPS), [&] {
          if constexpr (std::is_same_v<T, float>)
            layer_norm_bwd_fused_f32(xd.data(), wd.data(), dyd.data(), dxf.data(), dh_arg,
                                     partial.data(), rows, int(n), eps, seed, threshold, drop_scale);
          else
            layer_norm_bwd_fused_bf16(xd.data(), wd.data(), dyd.data(), dxf.data(), dh_arg,
                                      partial.data(), rows, int(n), eps, seed, threshold, drop_scale);
        });
        ok &= emu::launch(dim3(unsigned((2 * n + 31) / 32)), dim3(32, 8), [&] {
          layer_norm_dwdb_sum(partial.data(), sums.data(), int(grid), int(2 * n));
        });
        const std::string what = "layer_norm_bwd_fused + layer_norm_dwdb_sum " + at + " over " +
                                 std::to_string(grid) + (grid == 1 ? " block" : " blocks") +
                                 (drop ? ", dropout 0.25" : "");
        check(what + ": dx", ok ? rel_err(to_host(dxf), gx) : INFINITY, 4 * tol<T>());
        // The warp kernel's dx, bit for bit (the same arithmetic in the same order).
        double same = 0;
        for (size_t i = 0; i < dxf.size(); i++)
          same = std::max(same, double(std::fabs(to_f(dxf[i]) - to_f(dxw[i]))));
        check(what + ": dx as layer_norm_bwd_dx_warp's", ok ? same : INFINITY, 0.0);
        ln_check_grads<T>(what, ok, drop ? &dhf : nullptr, gx, {seed, threshold, drop_scale}, sums, gw, gb);
      }
    }
  }
}

// The packed kernels (rows that ln_vec_slots takes): layer_norm_fwd_vec; layer_norm_bwd_vec
// writes dx, dh and each row's statistics, layer_norm_dwdb_cols sums a chunk of rows a block,
// layer_norm_dwdb_sum adds the chunks; with and without dropout, in chunks that divide the rows or
// not.
template <typename T>
static void layer_norm_vec(size_t rows, size_t n, std::mt19937 &rng) {
  const float eps = 1e-5f;
  const Vec x = rounded<T>(randn(rows * n, rng, 2.0)), w = rounded<T>(randn(n, rng)),
            b = rounded<T>(randn(n, rng)), dy = rounded<T>(randn(rows * n, rng));
  const auto xd = to_dev<T>(x), wd = to_dev<T>(w), dyd = to_dev<T>(dy);
  // The gradients in closed form (layer_norm<T> checks the kernels above against central
  // differences of ln_ref; at these row lengths those would cost seconds under the sanitizers):
  // dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w, dw = sum dy xhat, db = sum dy.
  const Vec want_stats = ln_ref_stats(x, rows, n, eps);
  Vec gx(rows * n), gw(n, 0.0), gb(n, 0.0);
  for (size_t r = 0; r < rows; r++) {
    const double m = want_stats[2 * r], rstd = want_stats[2 * r + 1];
    double a = 0, c = 0;
    for (size_t i = 0; i < n; i++) {
      const double xh = (x[r * n + i] - m) * rstd, g = dy[r * n + i] * w[i];
      a += g / n;
      c += g * xh / n;
      gw[i] += dy[r * n + i] * xh;
      gb[i] += dy[r * n + i];
    }
    for (size_t i = 0; i < n; i++) {
      const double xh = (x[r * n + i] - m) * rstd;
      gx[r * n + i] = rstd * (dy[r * n + i] * w[i] - a - xh * c);
    }
  }
  constexpr size_t P = 16 / sizeof(T);
  {
    // The packed forward (its own kernel), against the reference.
    const auto bd = to_dev<T>(b);
    std::vector<T> y(rows * n);
    const bool ok = emu::launch(dim3(unsigned((rows + 7) / 8)), dim3(32, 8), [&] {
      if constexpr (std::is_same_v<T, float>)
        layer_norm_fwd_vec_f32(xd.data(), wd.data(), bd.data(), y.data(), rows, int(n), eps);
      else
        layer_norm_fwd_vec_bf16(xd.data(), wd.data(), bd.data(), y.data(), rows, int(n), eps);
    });
    check("layer_norm_fwd_vec " + std::string(tname<T>()) + " " + std::to_string(rows) + "x" +
              std::to_string(n),
          ok ? rel_err(to_host(y), ln_ref(x, w, b, rows, n, eps)) : INFINITY, tol<T>());
  }
  // With dropout in chunks of 3 rows (a last chunk short), without in chunks of 8.
  for (const bool drop : {true, false}) {
    {
      const int chunk = drop ? 3 : 8;
      const uint64_t seed = 31;
      const float p_drop = drop ? 0.25f : 0.f, drop_scale = 1 / (1 - p_drop);
      const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
      std::vector<T> dxv(rows * n), dhv(rows * n);
      std::vector<float> st(2 * rows, NAN);
      T *dh_arg = drop ? dhv.data() : nullptr;
      bool ok = emu::launch(dim3(unsigned((rows + 7) / 8)), dim3(32, 8), [&] {
        if constexpr (std::is_same_v<T, float>)
          layer_norm_bwd_vec_f32(xd.data(), wd.data(), dyd.data(), dxv.data(), dh_arg, st.data(),
                                 rows, int(n), eps, seed, threshold, drop_scale);
        else
          layer_norm_bwd_vec_bf16(xd.data(), wd.data(), dyd.data(), dxv.data(), dh_arg, st.data(),
                                  rows, int(n), eps, seed, threshold, drop_scale);
      });
      const size_t chunks = (rows + chunk - 1) / chunk;
      std::vector<float> partial(chunks * 2 * n, NAN), sums(2 * n, NAN);
      ok &= emu::launch(dim3(unsigned((n / P + 31) / 32), unsigned(chunks)), dim3(32, 8), [&] {
        if constexpr (std::is_same_v<T, float>)
          layer_norm_dwdb_cols_f32(xd.data(), dyd.data(), st.data(), partial.data(), rows, int(n), chunk);
        else
          layer_norm_dwdb_cols_bf16(xd.data(), dyd.data(), st.data(), partial.data(), rows, int(n), chunk);
      });
      ok &= emu::launch(dim3(unsigned((2 * n + 31) / 32)), dim3(32, 8), [&] {
        layer_norm_dwdb_sum(partial.data(), sums.data(), int(chunks), int(2 * n));
      });
      const std::string what = "layer_norm_bwd_vec + layer_norm_dwdb_cols " + std::string(tname<T>()) +
                               " " + std::to_string(rows) + "x" + std::to_string(n) + ", chunks of " +
                               std::to_string(chunk) + (drop ? ", dropout 0.25" : "");
      check(what + ": dx", ok ? rel_err(to_host(dxv), gx) : INFINITY, 4 * tol<T>());
      check(what + ": row statistics", ok ? rel_err(st, want_stats) : INFINITY, 2e-5);
      ln_check_grads<T>(what, ok, drop ? &dhv : nullptr, gx, {seed, threshold, drop_scale}, sums, gw, gb);
    }
  }
}

// layer_norm_dwdb_sum alone, with more blocks' partial sums than its eight warps (each adds
// several) and columns past a whole number of its 32.
static void dwdb_sum_check(int blocks, int n2, std::mt19937 &rng) {
  const Vec partial = randn(size_t(blocks) * n2, rng);
  std::vector<float> pd(partial.begin(), partial.end()), out(n2, NAN);
  Vec want(n2, 0.0);
  for (int b = 0; b < blocks; b++)
    for (int c = 0; c < n2; c++) want[c] += double(pd[size_t(b) * n2 + c]);
  const bool ok = emu::launch(dim3(unsigned((n2 + 31) / 32)), dim3(32, 8), [&] {
    layer_norm_dwdb_sum(pd.data(), out.data(), blocks, n2);
  });
  check("layer_norm_dwdb_sum: " + std::to_string(blocks) + " blocks of " + std::to_string(n2),
        ok ? rel_err(out, want) : INFINITY, 1e-6);
}

// ---- scaled masked softmax -------------------------------------------------------------------
static Vec softmax_ref(const Vec &s, const Vec &bias, size_t rows, size_t k, size_t per_batch,
                       double scale) {
  Vec p(s.size());
  for (size_t r = 0; r < rows; r++) {
    const double *br = bias.data() + (r / per_batch) * k;
    double m = -INFINITY, z = 0;
    for (size_t i = 0; i < k; i++) m = std::max(m, s[r * k + i] * scale + br[i]);
    for (size_t i = 0; i < k; i++) z += std::exp(s[r * k + i] * scale + br[i] - m);
    for (size_t i = 0; i < k; i++) p[r * k + i] = std::exp(s[r * k + i] * scale + br[i] - m) / z;
  }
  return p;
}

template <typename T> static void softmax(size_t batch, size_t per_batch, size_t k, std::mt19937 &rng) {
  const size_t rows = batch * per_batch;
  const float scale = 0.125f;
  const Vec s = rounded<T>(randn(rows * k, rng, 8.0)), dp = rounded<T>(randn(rows * k, rng));
  Vec bias(batch * k, 0.0);  // the last `i` keys of batch element i are padding
  for (size_t b = 0; b < batch; b++)
    for (size_t i = k - std::min(k - 1, b); i < k; i++) bias[b * k + i] = -1e9;
  const auto sd = to_dev<T>(s), bd = to_dev<T>(bias), dpd = to_dev<T>(dp);
  std::vector<T> p(rows * k), ds(rows * k);
  const dim3 grid(unsigned((rows + 7) / 8)), block(32, 8);
  emu::launch(grid, block, [&] {
    if constexpr (std::is_same_v<T, float>)
      softmax_fwd_f32(sd.data(), bd.data(), p.data(), rows, int(k), per_batch, scale);
    else
      softmax_fwd_bf16(sd.data(), bd.data(), p.data(), rows, int(k), per_batch, scale);
  });
  const std::string at = std::string(tname<T>()) + " " + std::to_string(rows) + "x" +
                         std::to_string(k);
  const Vec pref = softmax_ref(s, bias, rows, k, per_batch, scale);
  check("softmax_fwd " + at, rel_err(to_host(p), pref), tol<T>());
  {
    // With the dropout written alongside: the same probabilities, and the dropped-out copy is
    // them through the reference mask.
    const uint64_t seed = 9;
    const float p_drop = 0.25f, drop_scale = 1 / (1 - p_drop);
    const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
    std::vector<T> p2(rows * k), dropped(rows * k);
    emu::launch(grid, block, [&] {
      if constexpr (std::is_same_v<T, float>)
        softmax_drop_fwd_f32(sd.data(), bd.data(), p2.data(), dropped.data(), rows, int(k),
                             per_batch, scale, seed, threshold, drop_scale);
      else
        softmax_drop_fwd_bf16(sd.data(), bd.data(), p2.data(), dropped.data(), rows, int(k),
                              per_batch, scale, seed, threshold, drop_scale);
    });
    Vec want(rows * k);
    const auto got = to_host(p2);
    for (size_t i = 0; i < want.size(); i++)
      want[i] = ref_kept(seed, i, threshold) ? double(got[i]) * drop_scale : 0.0;
    check("softmax_drop_fwd " + at + ": probabilities", rel_err(got, pref), tol<T>());
    check("softmax_drop_fwd " + at + ": dropped out, p 0.25", rel_err(to_host(dropped), want),
          tol<T>());
  }
  if (k % 32 == 0 && (k / 32 == 2 || k / 32 == 4 || k / 32 == 8) && k / 32 * sizeof(T) <= 16) {
    // The kernels of the chunked rows (the host launches them where k fits): the same references.
    const uint64_t seed = 9;
    const float p_drop = 0.25f, drop_scale = 1 / (1 - p_drop);
    const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
    std::vector<T> pv(rows * k), p2(rows * k), dropped(rows * k);
    bool ok = emu::launch(grid, block, [&] {
      if constexpr (std::is_same_v<T, float>)
        softmax_fwd_vec_f32(sd.data(), bd.data(), pv.data(), rows, int(k), per_batch, scale);
      else
        softmax_fwd_vec_bf16(sd.data(), bd.data(), pv.data(), rows, int(k), per_batch, scale);
    });
    check("softmax_fwd_vec " + at, ok ? rel_err(to_host(pv), pref) : INFINITY, tol<T>());
    ok = emu::launch(grid, block, [&] {
      if constexpr (std::is_same_v<T, float>)
        softmax_drop_fwd_vec_f32(sd.data(), bd.data(), p2.data(), dropped.data(), rows, int(k),
                                 per_batch, scale, seed, threshold, drop_scale);
      else
        softmax_drop_fwd_vec_bf16(sd.data(), bd.data(), p2.data(), dropped.data(), rows, int(k),
                                  per_batch, scale, seed, threshold, drop_scale);
    });
    const auto got = to_host(p2);
    Vec want(rows * k);
    for (size_t i = 0; i < want.size(); i++)
      want[i] = ref_kept(seed, i, threshold) ? double(got[i]) * drop_scale : 0.0;
    check("softmax_drop_fwd_vec " + at + ": probabilities", ok ? rel_err(got, pref) : INFINITY, tol<T>());
    check("softmax_drop_fwd_vec " + at + ": dropped out, p 0.25",
          ok ? rel_err(to_host(dropped), want) : INFINITY, tol<T>());
  }
  // The backward takes the forward's output; give it the reference's, rounded as the kernel's is.
  const auto pd = to_dev<T>(pref);
  // Without dropout (threshold 0 keeps everything), then with the probabilities' dropout read
  // through the mask: the gradient of the softmax where dp is that of the dropped-out output.
  for (const float p_drop : {0.f, 0.25f}) {
    const uint64_t seed = 5;
    const uint32_t threshold = uint32_t(std::ceil(double(p_drop) * (1 << 24)));
    const float drop_scale = 1 / (1 - p_drop);
    emu::launch(grid, block, [&] {
      if constexpr (std::is_same_v<T, float>)
        softmax_bwd_f32(pd.data(), dpd.data(), ds.data(), rows, int(k), scale, seed, threshold,
                        drop_scale);
      else
        softmax_bwd_bf16(pd.data(), dpd.data(), ds.data(), rows, int(k), scale, seed, threshold,
                         drop_scale);
    });
    Vec dropped_dp(dp.size());
    for (size_t i = 0; i < dp.size(); i++)
      dropped_dp[i] = ref_kept(seed, i, threshold) ? dp[i] * double(drop_scale) : 0.0;
    const Vec gs = numeric_grad(
        [&](const Vec &v) { return softmax_ref(v, bias, rows, k, per_batch, scale); }, s,
        dropped_dp);
    const std::string what = p_drop > 0 ? ", through dropout p 0.25" : "";
    check("softmax_bwd " + at + what, rel_err(to_host(ds), gs), 4 * tol<T>());
  }
}

// ---- GELU, bias add ----------------------------------------------------------------------------
static Vec gelu_ref(const Vec &x) {
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); i++) y[i] = 0.5 * x[i] * (1 + std::erf(x[i] / std::sqrt(2.0)));
  return y;
}

// `offset` elements into each buffer: 0 keeps the pointers 16-byte aligned (the packed path),
// 1 does not (the one-element path); an n that is no multiple of a pack exercises the tail.
template <typename T> static void gelu(size_t n, dim3 blocks, size_t offset, std::mt19937 &rng) {
  const Vec x = rounded<T>(randn(n, rng, 3.0)), dy = rounded<T>(randn(n, rng));
  auto xd = to_dev<T>(x), dyd = to_dev<T>(dy);
  xd.insert(xd.begin(), offset, from_f<T>(0.f));
  dyd.insert(dyd.begin(), offset, from_f<T>(0.f));
  std::vector<T> y(n + offset), dx(n + offset);
  emu::launch(blocks, dim3(256), [&] {
    const T *xs = xd.data() + offset, *gs = dyd.data() + offset;
    if constexpr (std::is_same_v<T, float>) {
      gelu_fwd_f32(xs, y.data() + offset, n);
      gelu_bwd_f32(xs, gs, dx.data() + offset, n);
    } else {
      gelu_fwd_bf16(xs, y.data() + offset, n);
      gelu_bwd_bf16(xs, gs, dx.data() + offset, n);
    }
  });
  y.erase(y.begin(), y.begin() + offset);
  dx.erase(dx.begin(), dx.begin() + offset);
  const std::string at = std::string(tname<T>()) + " n=" + std::to_string(n) + " over " +
                         std::to_string(blocks.x) + " blocks" + (offset ? ", unaligned" : "");
  check("gelu_fwd " + at, rel_err(to_host(y), gelu_ref(x)), tol<T>());
  check("gelu_bwd " + at, rel_err(to_host(dx), numeric_grad(gelu_ref, x, dy)), 2 * tol<T>());
}

// `offset` elements into each buffer; the launch takes packs of columns when the host would
// (geometry::bias_packs: n a whole number of 16-byte packs, the pointers aligned).
template <typename T>
static void bias_add(size_t rows, size_t n, unsigned row_blocks, size_t offset, std::mt19937 &rng) {
  const Vec x = rounded<T>(randn(rows * n, rng)), b = rounded<T>(randn(n, rng));
  Vec want(rows * n);
  for (size_t r = 0; r < rows; r++)
    for (size_t c = 0; c < n; c++) want[r * n + c] = x[r * n + c] + b[c];
  auto xd = to_dev<T>(x), bd = to_dev<T>(b);
  xd.insert(xd.begin(), offset, from_f<T>(0.f));
  bd.insert(bd.begin(), offset, from_f<T>(0.f));
  std::vector<T> y(rows * n + offset);
  constexpr size_t P = 16 / sizeof(T);
  const bool packed = n % P == 0 && offset * sizeof(T) % 16 == 0;
  const size_t columns = packed ? n / P : n;
  emu::launch(dim3(unsigned((columns + 255) / 256), row_blocks), dim3(256), [&] {
    const T *xs = xd.data() + offset, *bs = bd.data() + offset;
    if constexpr (std::is_same_v<T, float>)
      bias_add_f32(xs, bs, y.data() + offset, rows, int(n), packed);
    else
      bias_add_bf16(xs, bs, y.data() + offset, rows, int(n), packed);
  });
  y.erase(y.begin(), y.begin() + offset);
  const std::string at = std::string(tname<T>()) + " " + std::to_string(rows) + "x" +
                         std::to_string(n) + " over " + std::to_string(row_blocks) +
                         " row blocks" + (packed ? ", packed" : ", by element");
  check("bias_add " + at, rel_err(to_host(y), want), tol<T>());

  // With GELU in the same pass: the same sum, and GELU of it as stored.
  std::vector<T> u(rows * n + offset), g(rows * n + offset);
  emu::launch(dim3(unsigned((columns + 255) / 256), row_blocks), dim3(256), [&] {
    const T *xs = xd.data() + offset, *bs = bd.data() + offset;
    if constexpr (std::is_same_v<T, float>)
      bias_gelu_f32(xs, bs, u.data() + offset, g.data() + offset, rows, int(n), packed);
    else
      bias_gelu_bf16(xs, bs, u.data() + offset, g.data() + offset, rows, int(n), packed);
  });
  u.erase(u.begin(), u.begin() + offset);
  g.erase(g.begin(), g.begin() + offset);
  check("bias_gelu sum " + at, rel_err(to_host(u), want), tol<T>());
  check("bias_gelu gelu " + at, rel_err(to_host(g), gelu_ref(rounded<T>(want))), tol<T>());
}

// ---- dropout -------------------------------------------------------------------------------------
static void dropout_checks(std::mt19937 &rng) {
  const size_t n = 20000;
  const float p = 0.1f, scale = 1 / (1 - p);
  const uint32_t threshold = uint32_t(std::ceil(double(p) * (1 << 24)));
  const Vec x = randn(n, rng);
  Vec ones(n, 1.0);
  const auto xd = to_dev<float>(x), od = to_dev<float>(ones);
  // `shift` elements into the buffers: 1 takes the one-element path instead of 16-byte packs.
  auto run = [&](std::vector<float> in, uint64_t seed, dim3 blocks, size_t shift = 0) {
    in.insert(in.begin(), shift, 0.f);
    std::vector<float> out(n + shift);
    emu::launch(blocks, dim3(256), [&] {
      dropout_f32(in.data() + shift, out.data() + shift, n, seed, threshold, scale);
    });
    out.erase(out.begin(), out.begin() + shift);
    return out;
  };
  const auto y = run(xd, 7, elementwise_blocks(n / 4));
  const auto mask = run(od, 7, dim3(3), 1);  // the same seed, another grid, unaligned
  const auto other = run(od, 8, elementwise_blocks(n));
  size_t kept = 0, differs = 0;
  double scaled_err = 0, mask_err = 0;
  for (size_t i = 0; i < n; i++) {
    const bool k = mask[i] != 0.f;
    kept += k;
    differs += (other[i] != 0.f) != k;
    scaled_err = std::max(scaled_err, std::fabs(y[i] - (k ? x[i] * double(scale) : 0.0)));
    mask_err = std::max(mask_err, std::fabs(double(k) - double(ref_kept(7, i, threshold))));
  }
  check("dropout f32: kept fraction within 0.01 of 1 - p", std::fabs(double(kept) / n - (1 - p)), 0.01);
  check("dropout f32: kept elements scaled by 1/(1-p), the rest 0", scaled_err, 1e-6);
  check("dropout f32: the same seed, the same mask (other grid, unaligned)", mask_err, 0);
  check("dropout f32: another seed, about p(1-p)*2 of the mask differs",
        std::fabs(double(differs) / n - 2 * p * (1 - p)), 0.02);
}

// A residual branch's dropout and the residual add in one pass, packed (shift 0) and by element
// (shift 1, the buffers off 16-byte alignment), in n elements (no multiple of a pack: a tail).
// A block's tail in one pass (dropout_add_layer_norm_fwd_vec: s = drop(h) + r, y = LN(s)) against
// the two kernels it replaces, dropout_add then layer_norm_fwd_vec, bit for bit (s and y), and y
// against layer norm in double of s as rounded; with dropout and without (threshold 0, scale 1:
// the plain add).
template <typename T> static void dropout_add_ln_check(size_t rows, size_t n, bool drop, std::mt19937 &rng) {
  const uint64_t seed = 77;
  const float p = drop ? 0.1f : 0.f, scale = 1 / (1 - p);
  const uint32_t threshold = uint32_t(std::ceil(double(p) * (1 << 24)));
  const float eps = 1e-5f;
  const Vec h = rounded<T>(randn(rows * n, rng)), r = rounded<T>(randn(rows * n, rng)),
            w = rounded<T>(randn(n, rng)), b = rounded<T>(randn(n, rng));
  const auto hd = to_dev<T>(h), rd = to_dev<T>(r), wd = to_dev<T>(w), bd = to_dev<T>(b);
  std::vector<T> s1(rows * n), y1(rows * n), s2(rows * n), y2(rows * n);
  bool ok = emu::launch(elementwise_blocks(rows * n / 8), dim3(256), [&] {
    if constexpr (std::is_same_v<T, float>)
      dropout_add_f32(hd.data(), rd.data(), s1.data(), rows * n, seed, threshold, scale);
    else
      dropout_add_bf16(hd.data(), rd.data(), s1.data(), rows * n, seed, threshold, scale);
  });
  ok &= emu::launch(dim3(unsigned((rows + 7) / 8)), dim3(32, 8), [&] {
    if constexpr (std::is_same_v<T, float>)
      layer_norm_fwd_vec_f32(s1.data(), wd.data(), bd.data(), y1.data(), rows, int(n), eps);
    else
      layer_norm_fwd_vec_bf16(s1.data(), wd.data(), bd.data(), y1.data(), rows, int(n), eps);
  });
  const bool fused_ok = emu::launch(dim3(unsigned((rows + 7) / 8)), dim3(32, 8), [&] {
    if constexpr (std::is_same_v<T, float>)
      dropout_add_layer_norm_fwd_vec_f32(hd.data(), rd.data(), wd.data(), bd.data(), s2.data(),
                                         y2.data(), rows, int(n), eps, seed, threshold, scale);
    else
      dropout_add_layer_norm_fwd_vec_bf16(hd.data(), rd.data(), wd.data(), bd.data(), s2.data(),
                                          y2.data(), rows, int(n), eps, seed, threshold, scale);
  });
  double diff = 0;
  for (size_t i = 0; i < rows * n; i++)
    diff = std::max({diff, double(std::fabs(to_f(s1[i]) - to_f(s2[i]))),
                     double(std::fabs(to_f(y1[i]) - to_f(y2[i])))});
  const std::string name = "dropout_add_layer_norm_fwd_vec " + std::string(tname<T>()) + " " +
                           std::to_string(rows) + "x" + std::to_string(n) +
                           (drop ? ", dropout 0.1" : ", no dropout");
  check(name + ": s and y the bits of dropout_add then layer_norm_fwd_vec",
        ok && fused_ok ? diff : INFINITY, 0.0);
  Vec s_rounded(rows * n);
  for (size_t i = 0; i < rows * n; i++) s_rounded[i] = to_f(s2[i]);
  check(name + ": y against layer norm in double", fused_ok ? rel_err(to_host(y2), ln_ref(s_rounded, w, b, rows, n, eps)) : INFINITY,
        tol<T>());
}

template <typename T> static void dropout_add_check(size_t n, size_t shift, std::mt19937 &rng) {
  const uint64_t seed = 13;
  const float p = 0.2f, scale = 1 / (1 - p);
  const uint32_t threshold = uint32_t(std::ceil(double(p) * (1 << 24)));
  const Vec x = rounded<T>(randn(n, rng)), r = rounded<T>(randn(n, rng));
  auto xd = to_dev<T>(x), rd = to_dev<T>(r);
  xd.insert(xd.begin(), shift, from_f<T>(0.f));
  rd.insert(rd.begin(), shift, from_f<T>(0.f));
  std::vector<T> sd(n + shift);
  emu::launch(elementwise_blocks(n / 3), dim3(256), [&] {
    if constexpr (std::is_same_v<T, float>)
      dropout_add_f32(xd.data() + shift, rd.data() + shift, sd.data() + shift, n, seed, threshold,
                      scale);
    else
      dropout_add_bf16(xd.data() + shift, rd.data() + shift, sd.data() + shift, n, seed,
                       threshold, scale);
  });
  sd.erase(sd.begin(), sd.begin() + shift);
  Vec want(n);
  for (size_t i = 0; i < n; i++) want[i] = (ref_kept(seed, i, threshold) ? x[i] * scale : 0.0) + r[i];
  check("dropout_add " + std::string(tname<T>()) + " " + std::to_string(n) +
            (shift ? ", by element" : ", packed"),
        rel_err(to_host(sd), want), tol<T>());
  // The plain add, on the same operands: x + r rounded once, as candle's add gives it.
  std::vector<T> zd(n + shift);
  emu::launch(elementwise_blocks(n / 3), dim3(256), [&] {
    if constexpr (std::is_same_v<T, float>)
      add_f32(xd.data() + shift, rd.data() + shift, zd.data() + shift, n);
    else
      add_bf16(xd.data() + shift, rd.data() + shift, zd.data() + shift, n);
  });
  double same = 0;
  for (size_t i = 0; i < n; i++)
    same = std::max(same, double(std::fabs(to_f(zd[shift + i]) - to_f(from_f<T>(float(x[i] + r[i]))))));
  check("add " + std::string(tname<T>()) + " " + std::to_string(n) +
            (shift ? ", by element" : ", packed") + ": x + y rounded once",
        same, 0.0);
}

// ---- swap12, embedding ----------------------------------------------------------------------------
// Elements of type T moved in units U (the kernel swap12_u{8 * sizeof(U)}), d in elements, over
// `grid_y` rows of blocks (the host's choice is min(a, 65535); fewer makes blocks stride over a).
// `x_parts` > 1: x's rows hold that many [c, d] parts side by side and part `x_part` is read (the
// split of q, k, v from one product); `y_parts` likewise for y's slabs (their gradients' merge).
template <typename T, typename U>
static void swap(uint32_t a, uint32_t b, uint32_t c, uint32_t d, unsigned grid_y, std::mt19937 &rng,
                 uint32_t x_parts = 1, uint32_t x_part = 0, uint32_t y_parts = 1,
                 uint32_t y_part = 0) {
  const size_t n = size_t(a) * b * c * d;
  const size_t x_row = size_t(c) * d * x_parts, y_row = size_t(b) * d * y_parts;
  const Vec x = rounded<T>(randn(n * x_parts, rng));
  const auto xd = to_dev<T>(x);
  const T fill = from_f<T>(7.f);  // what the other parts of y hold, and must keep
  std::vector<T> y(n * y_parts, fill);
  const uint32_t du = uint32_t(d * sizeof(T) / sizeof(U));
  const uint32_t units = sizeof(U) / sizeof(T);
  const unsigned threads = std::clamp<unsigned>((b * du + 31) / 32 * 32, 32, 256);
  emu::launch(dim3(c, grid_y), dim3(threads), [&] {
    const U *xs = reinterpret_cast<const U *>(xd.data() + size_t(x_part) * c * d);
    U *ys = reinterpret_cast<U *>(y.data() + size_t(y_part) * b * d);
    const uint32_t xr = uint32_t(x_row / units), yr = uint32_t(y_row / units);
    if constexpr (sizeof(U) == 2) swap12_u16(xs, ys, a, b, c, du, xr, yr);
    else if constexpr (sizeof(U) == 4) swap12_u32(xs, ys, a, b, c, du, xr, yr);
    else if constexpr (sizeof(U) == 8) swap12_u64(xs, ys, a, b, c, du, xr, yr);
    else swap12_u128(xs, ys, a, b, c, du, xr, yr);
  });
  Vec want(n * y_parts, 7.0);
  for (size_t ia = 0; ia < a; ia++)
    for (size_t ib = 0; ib < b; ib++)
      for (size_t ic = 0; ic < c; ic++)
        for (size_t id = 0; id < d; id++)
          want[(ia * c + ic) * y_row + y_part * b * d + ib * d + id] =
              x[(ia * b + ib) * x_row + x_part * c * d + ic * d + id];
  std::string parts;
  if (x_parts > 1) parts += ", part " + std::to_string(x_part) + " of " + std::to_string(x_parts) + " in";
  if (y_parts > 1) parts += ", part " + std::to_string(y_part) + " of " + std::to_string(y_parts) + " out";
  check("swap12_u" + std::to_string(8 * sizeof(U)) + " " + tname<T>() + " [" + std::to_string(a) +
            "," + std::to_string(b) + "," + std::to_string(c) + "," + std::to_string(d) + "] over " +
            std::to_string(c) + "x" + std::to_string(grid_y) + " blocks" + parts,
        rel_err(to_host(y), want), 0);
}

template <typename T> static void embedding(std::mt19937 &rng) {
  const uint32_t vocab = 11;
  const size_t n = 37;
  const std::vector<uint32_t> ids = {3, 0, 10, 3, 3, 7, 0, 9, 2};
  const size_t rows = ids.size();
  const Vec table = rounded<T>(randn(vocab * n, rng)), g = rounded<T>(randn(rows * n, rng));
  const auto td = to_dev<T>(table), gd = to_dev<T>(g);
  std::vector<T> out(rows * n);
  std::vector<float> grad(vocab * n, 0.f);
  const bool ok = emu::launch(dim3(4), dim3(64), [&] {  // 9 rows over 4 blocks
    if constexpr (std::is_same_v<T, float>) {
      embedding_fwd_f32(td.data(), ids.data(), out.data(), rows, int(n), vocab);
      embedding_bwd_f32(gd.data(), ids.data(), grad.data(), rows, int(n));
    } else {
      embedding_fwd_bf16(td.data(), ids.data(), out.data(), rows, int(n), vocab);
      embedding_bwd_bf16(gd.data(), ids.data(), grad.data(), rows, int(n));
    }
  });
  Vec want(rows * n), want_grad(vocab * n, 0.0);
  for (size_t r = 0; r < rows; r++)
    for (size_t c = 0; c < n; c++) {
      want[r * n + c] = table[ids[r] * n + c];
      want_grad[ids[r] * n + c] += g[r * n + c];
    }
  check(std::string("embedding_fwd ") + tname<T>() + " (repeated ids)", ok ? rel_err(to_host(out), want) : INFINITY, 0);
  check(std::string("embedding_bwd ") + tname<T>() + " (repeated ids summed)", rel_err(grad, want_grad), 1e-6);
  const std::vector<uint32_t> bad = {1, vocab};
  std::vector<T> out2(2 * n);
  const bool trapped = !emu::launch(dim3(2), dim3(64), [&] {
    if constexpr (std::is_same_v<T, float>) embedding_fwd_f32(td.data(), bad.data(), out2.data(), 2, int(n), vocab);
    else embedding_fwd_bf16(td.data(), bad.data(), out2.data(), 2, int(n), vocab);
  });
  check(std::string("embedding_fwd ") + tname<T>() + ": an id past the table traps", trapped ? 0 : 1, 0);
}

// Two or three f32 tables' rows summed in order and written in T, each row and each sum rounded to
// T as separate lookups and adds would; a bad id in any table traps.
template <typename T> static void embedding_sum(uint32_t tables, std::mt19937 &rng) {
  const uint32_t v[3] = {17, 9, 2};
  const size_t n = 70, rows = 11;
  Vec t[3];
  std::vector<float> tf[3];
  std::vector<uint32_t> ids[3];
  for (int k = 0; k < 3; k++) {
    t[k] = randn(v[k] * n, rng);
    tf[k].assign(t[k].begin(), t[k].end());
    for (size_t r = 0; r < rows; r++) ids[k].push_back(uint32_t((r * 7 + k * 3 + r / 3) % v[k]));
  }
  ids[0][4] = ids[0][9];  // a repeated word
  std::vector<T> out(rows * n);
  const float *t2 = tables > 2 ? tf[2].data() : nullptr;
  const uint32_t *i2 = tables > 2 ? ids[2].data() : nullptr;
  auto run = [&](const std::vector<uint32_t> &a, std::vector<T> &o, size_t nrows) {
    return emu::launch(dim3(4), dim3(32), [&] {
      if constexpr (std::is_same_v<T, float>)
        embedding_sum_fwd_f32(tf[0].data(), tf[1].data(), t2, a.data(), ids[1].data(), i2, o.data(),
                              nrows, int(n), v[0], v[1], v[2], tables);
      else
        embedding_sum_fwd_bf16(tf[0].data(), tf[1].data(), t2, a.data(), ids[1].data(), i2, o.data(),
                               nrows, int(n), v[0], v[1], v[2], tables);
    });
  };
  const bool ok = run(ids[0], out, rows);
  size_t wrong = 0;
  for (size_t r = 0; r < rows; r++)
    for (size_t c = 0; c < n; c++) {
      // Each row rounded to T, then each sum (as lookups and adds in T would give).
      auto rd = [](float x) { return to_f(from_f<T>(x)); };
      float want = rd(rd(tf[0][ids[0][r] * n + c]) + rd(tf[1][ids[1][r] * n + c]));
      if (tables > 2) want = rd(want + rd(tf[2][ids[2][r] * n + c]));
      wrong += to_f(out[r * n + c]) != want;
    }
  const std::string at = std::string(tname<T>()) + ", " + std::to_string(tables) + " tables";
  check("embedding_sum_fwd " + at + ": the sum in order, rounded as lookups and adds round", ok ? double(wrong) : INFINITY, 0);
  std::vector<uint32_t> bad = ids[0];
  bad[2] = v[0];
  std::vector<T> out2(rows * n);
  check("embedding_sum_fwd " + at + ": an id past its table traps", run(bad, out2, rows) ? 1 : 0, 0);
}

// An f32 table's rows gathered into bf16: each the f32 value rounded as a cast rounds; a bad id
// traps as in the same-type gather.
static void embedding_to_bf16(std::mt19937 &rng) {
  const uint32_t vocab = 13;
  const size_t n = 45;
  const std::vector<uint32_t> ids = {12, 0, 5, 5, 1, 12, 7};
  const size_t rows = ids.size();
  const Vec table = randn(vocab * n, rng);
  const std::vector<float> tf(table.begin(), table.end());
  std::vector<bf16> out(rows * n);
  const bool ok = emu::launch(dim3(3), dim3(32), [&] {
    embedding_fwd_f32_to_bf16(tf.data(), ids.data(), out.data(), rows, int(n), vocab);
  });
  size_t wrong = 0;
  for (size_t r = 0; r < rows; r++)
    for (size_t c = 0; c < n; c++)
      wrong += to_f(out[r * n + c]) != to_f(from_f<bf16>(tf[ids[r] * n + c]));
  check("embedding_fwd_f32_to_bf16: each row the cast of the f32 row, repeated ids",
        ok ? double(wrong) : INFINITY, 0);
  const std::vector<uint32_t> bad = {2, vocab + 3};
  std::vector<bf16> out2(2 * n);
  const bool trapped = !emu::launch(dim3(2), dim3(32), [&] {
    embedding_fwd_f32_to_bf16(tf.data(), bad.data(), out2.data(), 2, int(n), vocab);
  });
  check("embedding_fwd_f32_to_bf16: an id past the table traps", trapped ? 0 : 1, 0);
}

// ---- AdamW, gradient sums of squares ---------------------------------------------------------
static void adamw(std::mt19937 &rng) {
  const size_t n = 1000;
  const double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01, clip = 0.5;
  Vec w = randn(n, rng), m(n, 0), v(n, 0);
  std::vector<float> wf(w.begin(), w.end()), state(2 * n, 0.f);
  for (int t = 1; t <= 3; t++) {
    const Vec g = randn(n, rng);
    const std::vector<float> gf(g.begin(), g.end());
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    emu::launch(dim3(2), dim3(256), [&] {
      adamw_moments(state.data(), gf.data(), n, float(b1), float(b2), float(1 - b1), float(1 - b2), float(clip));
    });
    emu::launch(elementwise_blocks(n), dim3(256), [&] {
      adamw_weights(wf.data(), state.data(), n, float(1 - lr * wd), float(lr / bc1), float(1 / std::sqrt(bc2)), float(eps));
    });
    for (size_t i = 0; i < n; i++) {  // torch.optim.AdamW on the clipped gradient
      const double gi = g[i] * clip;
      m[i] = b1 * m[i] + (1 - b1) * gi;
      v[i] = b2 * v[i] + (1 - b2) * gi * gi;
      w[i] = w[i] * (1 - lr * wd) - lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
    }
  }
  check("adamw_moments + adamw_weights: 3 steps against AdamW", rel_err(wf, w), 1e-6);
  std::vector<float> mf(state.begin(), state.begin() + n), vf(state.begin() + n, state.end());
  check("adamw_moments: first moments after 3 steps", rel_err(mf, m), 1e-6);
  check("adamw_moments: second moments after 3 steps", rel_err(vf, v), 1e-6);
}

// A multi-parameter table (see kernels.cu, "many parameters in one launch") over `entries`, each
// `words - 1` words plus the first block, filled in here; returns the number of blocks.
static unsigned multi_table(std::vector<uint64_t> &table, const std::vector<std::vector<uint64_t>> &entries,
                            const std::vector<size_t> &sizes) {
  uint64_t first = 0;
  for (size_t p = 0; p < entries.size(); p++) {
    table.insert(table.end(), entries[p].begin(), entries[p].end());
    table.push_back(first);
    first += (sizes[p] + MULTI_CHUNK - 1) / MULTI_CHUNK;
  }
  return unsigned(first);
}

static uint64_t addr(const void *p) { return uint64_t(reinterpret_cast<uintptr_t>(p)); }

static void sum_squares(std::mt19937 &rng) {
  // Sizes across chunk boundaries, one without elements (no blocks) between two with.
  const std::vector<size_t> sizes = {3000, 0, 70, 2 * MULTI_CHUNK + 5, MULTI_CHUNK};
  std::vector<std::vector<float>> gs;
  std::vector<std::vector<uint64_t>> entries;
  Vec want;
  for (size_t n : sizes) {
    const Vec g = randn(n, rng);
    gs.emplace_back(g.begin(), g.end());
    double sq = 0;
    for (double x : g) sq += x * x;
    want.push_back(sq);
  }
  for (size_t p = 0; p < sizes.size(); p++) entries.push_back({addr(gs[p].data()), sizes[p]});
  std::vector<uint64_t> table;
  const unsigned blocks = multi_table(table, entries, sizes);
  std::vector<float> sums(sizes.size(), 0.f);
  emu::launch(dim3(blocks), dim3(256), [&] { sum_squares_multi(table.data(), uint32_t(sizes.size()), sums.data()); });
  check("sum_squares_multi: five gradients (one empty) in one launch", rel_err(sums, want), 1e-5);
}

// adamw_multi against adamw_moments + adamw_weights run per parameter: the same floats.
static void adamw_multi_check(std::mt19937 &rng) {
  const std::vector<size_t> sizes = {1000, 0, MULTI_CHUNK + 1, 3, 2 * MULTI_CHUNK};
  const std::vector<float> decays = {0.99f, 1.f, 1.f, 0.97f, 0.995f};
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8, s = 0.7;
  std::vector<std::vector<float>> w, st, w2, st2;
  for (size_t n : sizes) {
    const Vec x = randn(n, rng);
    w.emplace_back(x.begin(), x.end());
    st.emplace_back(2 * n, 0.f);
  }
  w2 = w, st2 = st;
  double worst = 0;
  for (int t = 1; t <= 3; t++) {
    const float step = float(1e-3 / (1 - std::pow(b1, t))), inv_bc2 = float(1 / std::sqrt(1 - std::pow(b2, t)));
    std::vector<std::vector<float>> gs;
    std::vector<std::vector<uint64_t>> entries;
    for (size_t p = 0; p < sizes.size(); p++) {
      const Vec g = randn(sizes[p], rng);
      gs.emplace_back(g.begin(), g.end());
      uint32_t bits;
      std::memcpy(&bits, &decays[p], 4);
      entries.push_back({addr(w[p].data()), addr(st[p].data()), addr(gs[p].data()), sizes[p], bits});
    }
    std::vector<uint64_t> table;
    const unsigned blocks = multi_table(table, entries, sizes);
    emu::launch(dim3(blocks), dim3(256), [&] {
      adamw_multi(table.data(), uint32_t(sizes.size()), float(b1), float(b2), float(1 - b1), float(1 - b2), float(s),
                  step, inv_bc2, float(eps), nullptr);
    });
    for (size_t p = 0; p < sizes.size(); p++) {
      const size_t n = sizes[p];
      emu::launch(dim3(2), dim3(256), [&] {
        adamw_moments(st2[p].data(), gs[p].data(), n, float(b1), float(b2), float(1 - b1), float(1 - b2), float(s));
      });
      emu::launch(dim3(3), dim3(256), [&] {
        adamw_weights(w2[p].data(), st2[p].data(), n, decays[p], step, inv_bc2, float(eps));
      });
      for (size_t i = 0; i < n; i++) worst = std::max(worst, double(std::fabs(w[p][i] - w2[p][i])));
      for (size_t i = 0; i < 2 * n; i++) worst = std::max(worst, double(std::fabs(st[p][i] - st2[p][i])));
    }
  }
  check("adamw_multi: five parameters (one empty), 3 steps, against the per-parameter kernels", worst, 1e-7);
}

// The host's clipping formula (optim.rs: global_grad_norm's sum and sqrt, clip_coefficient), in the
// order it computes: what clip_scale must equal bit for bit.
static void host_clip(const std::vector<float> &sums, double max_norm, double &coef, double &norm) {
  double total = -0.0;
  for (float x : sums) total += double(x);
  norm = std::sqrt(total);
  const double c = max_norm / (norm + 1e-6);
  coef = max_norm > 0.0 ? (std::isnan(c) ? 1.0 : std::min(c, 1.0)) : 1.0;
}

// clip_scale against the host's formula (bit for bit, clipping and not, no clipping asked, a NaN
// gradient), then adamw_multi with the scale read from the device against the same scale given as
// an argument: the same bits.
static void clip_scale_check(std::mt19937 &rng) {
  std::uniform_real_distribution<float> u(0.f, 40.f);
  std::vector<float> sums(213);
  for (float &x : sums) x = u(rng);
  sums[5] = 0.f;
  double worst = 0, worst_coef = 0;
  bool clipped = false, unclipped = false;
  for (double max_norm : {1.0, 1e6, 0.0}) {
    double out[2] = {-1, -1}, coef, norm;
    emu::launch(dim3(1), dim3(32), [&] { clip_scale(sums.data(), uint32_t(sums.size()), max_norm, out); });
    host_clip(sums, max_norm, coef, norm);
    worst = std::max({worst, std::fabs(out[1] - norm), std::fabs(out[0] - coef)});
    if (max_norm > 0) (coef < 1 ? clipped : unclipped) = true;
    if (max_norm == 0.0) worst_coef = std::max(worst_coef, std::fabs(out[0] - 1.0));
  }
  check("clip_scale: norm and coefficient, the host's bits (max 1, 1e6, none)", worst, 0);
  check("clip_scale: clipping happened at max 1 and not at 1e6", clipped && unclipped ? 0 : 1, 0);
  check("clip_scale: no clipping asked gives 1", worst_coef, 0);
  std::vector<float> bad = sums;
  bad[7] = std::nanf("");
  double out[2], coef, norm;
  emu::launch(dim3(1), dim3(32), [&] { clip_scale(bad.data(), uint32_t(bad.size()), 1.0, out); });
  host_clip(bad, 1.0, coef, norm);
  check("clip_scale: a NaN gradient gives a NaN norm and coefficient 1, as on the host",
        std::isnan(out[1]) && std::isnan(norm) && out[0] == coef ? 0 : 1, 0);

  const std::vector<size_t> sizes = {700, MULTI_CHUNK + 9};
  std::vector<std::vector<float>> w, st, g;
  std::vector<std::vector<uint64_t>> entries;
  for (size_t n : sizes) {
    const Vec x = randn(n, rng), y = randn(n, rng);
    w.emplace_back(x.begin(), x.end());
    g.emplace_back(y.begin(), y.end());
    st.emplace_back(2 * n, 0.25f);
  }
  auto w2 = w, st2 = st;
  const double scale = 0.3183098861837907;  // not a float: the cast must round as the host's does
  const float decay = 0.999f;
  uint32_t bits;
  std::memcpy(&bits, &decay, 4);
  auto run = [&](std::vector<std::vector<float>> &ws, std::vector<std::vector<float>> &sts, float s, const double *s_at) {
    std::vector<std::vector<uint64_t>> es;
    for (size_t p = 0; p < sizes.size(); p++)
      es.push_back({addr(ws[p].data()), addr(sts[p].data()), addr(g[p].data()), sizes[p], bits});
    std::vector<uint64_t> table;
    const unsigned blocks = multi_table(table, es, sizes);
    emu::launch(dim3(blocks), dim3(256), [&] {
      adamw_multi(table.data(), uint32_t(sizes.size()), 0.9f, 0.999f, 0.1f, 0.001f, s, 1e-3f, 1.2f, 1e-8f, s_at);
    });
  };
  run(w, st, float(scale), nullptr);
  const double on_device[2] = {scale, 123.0};
  run(w2, st2, 5.f /* ignored: s_at wins */, on_device);
  size_t differ = 0;
  for (size_t p = 0; p < sizes.size(); p++) {
    for (size_t i = 0; i < sizes[p]; i++) differ += w[p][i] != w2[p][i];
    for (size_t i = 0; i < 2 * sizes[p]; i++) differ += st[p][i] != st2[p][i];
  }
  check("adamw_multi: the scale read from the device, the same bits as given", double(differ), 0);
}

// gather: parts of several sizes (one empty, one across chunks) packed at their offsets, same dtype,
// bf16 to f32 and f32 to bf16.
static void gather_check(std::mt19937 &rng) {
  const std::vector<size_t> sizes = {5, 0, MULTI_CHUNK + 3, 700};
  std::vector<Vec> parts;
  size_t total = 0;
  for (size_t n : sizes) parts.push_back(randn(n, rng)), total += n;
  std::vector<std::vector<float>> pf;
  std::vector<std::vector<bf16>> pb;
  for (const Vec &v : parts) pf.emplace_back(v.begin(), v.end()), pb.push_back(to_dev<bf16>(v));
  auto run = [&](auto &srcs, auto *dst, auto kernel) {
    std::vector<std::vector<uint64_t>> entries;
    size_t offset = 0;
    for (size_t p = 0; p < sizes.size(); p++) {
      entries.push_back({addr(srcs[p].data()), sizes[p], offset});
      offset += sizes[p];
    }
    std::vector<uint64_t> table;
    const unsigned blocks = multi_table(table, entries, sizes);
    emu::launch(dim3(blocks), dim3(256), [&] { kernel(table.data(), uint32_t(sizes.size()), dst); });
  };
  Vec want, want_b, want_fb;
  for (const Vec &v : parts) {
    const Vec f = rounded<float>(v);
    want.insert(want.end(), f.begin(), f.end());
    const Vec r = rounded<bf16>(v);
    want_b.insert(want_b.end(), r.begin(), r.end());
    // The f32 values rounded to bf16 (not the doubles: rounding twice may differ).
    const Vec fb = rounded<bf16>(f);
    want_fb.insert(want_fb.end(), fb.begin(), fb.end());
  }
  std::vector<float> out(total, -1.f), out_b32(total, -1.f);
  std::vector<bf16> out_b(total), out_fb(total);
  run(pf, out.data(), gather_f32);
  run(pb, out_b.data(), gather_bf16);
  run(pb, out_b32.data(), gather_bf16_to_f32);
  run(pf, out_fb.data(), gather_f32_to_bf16);
  check("gather_f32: four parts (one empty) at their offsets", rel_err(out, want), 0);
  check("gather_bf16: the same in bf16", rel_err(to_host(out_b), want_b), 0);
  check("gather_bf16_to_f32: bf16 parts into f32", rel_err(out_b32, want_b), 0);
  check("gather_f32_to_bf16: f32 masters into bf16, rounded once", rel_err(to_host(out_fb), want_fb), 0);
}

// split_sum: the partial products of a split weight gradient added in f32, then rounded once; with
// the launch cuda.rs gives it and with fewer blocks than elements need (the grid strides).
template <typename T> static void split_sum_check(size_t n, uint32_t parts, dim3 blocks, std::mt19937 &rng) {
  const Vec x = rounded<T>(randn(parts * n, rng));
  Vec want(n, 0.0);
  for (uint32_t k = 0; k < parts; k++)
    for (size_t i = 0; i < n; i++) want[i] += x[k * n + i];
  const Vec want_t = rounded<T>(want);
  std::vector<T> xd = to_dev<T>(x), out(n, from_f<T>(-7.f));
  emu::launch(blocks, dim3(256), [&] {
    if constexpr (std::is_same_v<T, float>) split_sum_f32(xd.data(), out.data(), n, parts);
    else split_sum_bf16(xd.data(), out.data(), n, parts);
  });
  // f32: the order of the additions differs from the reference's double sum; bf16: one rounding.
  const double tol = std::is_same_v<T, float> ? 1e-6 : 0.0;
  check("split_sum_" + std::string(std::is_same_v<T, float> ? "f32" : "bf16") + ": " +
            std::to_string(parts) + " parts of " + std::to_string(n) + ", " +
            std::to_string(blocks.x) + " blocks",
        rel_err(to_host(out), std::is_same_v<T, float> ? want : want_t), tol);
}

// A buffer whose data starts on a 32-byte boundary (the one-pass kernels need 16 for their staged
// loads; a vector's may not have it).
template <typename T> struct Aligned {
  std::vector<T> store;
  T *p;
  explicit Aligned(size_t n) : store(n + 32 / sizeof(T)) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(store.data());
    p = store.data() + ((32 - a % 32) % 32) / sizeof(T);
  }
};

// flash_fwd_bf16 / flash_bwd_bf16 against attention written out in double here: softmax(scale *
// Q K^T + bias), the dropout mask of kernels.cu's `kept` over the [b, h, s, s] element index, the
// context, the log-sum-exp, and the gradients of q, k and v; the reference's gradient is itself
// checked by central differences of the reference's forward at a few elements.
struct FlashCase {
  int b, heads, s;
  double p;  // dropout probability (0: none)
};

static void flash_check(FlashCase fc, std::mt19937 &rng) {
  const int B = fc.b, H = fc.heads, S = fc.s, D = 64, hidden = H * D, ld = 3 * hidden;
  const double scale = 0.125;
  const uint64_t seed = 0x5EEDull + S;
  const uint32_t threshold = uint32_t(std::ceil(fc.p * double(1u << 24)));
  const float drop_scale = float(1.0 / (1.0 - fc.p));
  const Vec qkv = rounded<bf16>(randn(size_t(B) * S * ld, rng, 0.8));
  Vec bias(size_t(B) * S, 0.0);
  for (int j = S - 5; j < S; j++) bias[size_t(B - 1) * S + j] = to_f(from_f<bf16>(-1e9f));  // padding
  const Vec dout = rounded<bf16>(randn(size_t(B) * S * hidden, rng));
  auto at = [&](const Vec &t, int b, int i, int part, int h, int c) {
    return t[(size_t(b) * S + i) * ld + part * hidden + h * D + c];
  };
  auto keep = [&](int b, int h, int i, int j) {
    return kept(seed, ((size_t(b) * H + h) * S + i) * S + j, threshold) ? double(drop_scale) : 0.0;
  };
  // The forward in double from any qkv: context, log-sum-exp, probabilities.
  auto forward = [&](const Vec &x, Vec &ctx, Vec &lse, Vec &probs) {
    ctx.assign(size_t(B) * S * hidden, 0.0);
    lse.assign(size_t(B) * H * S, 0.0);
    probs.assign(size_t(B) * H * S * S, 0.0);
    for (int b = 0; b < B; b++)
      for (int h = 0; h < H; h++)
        for (int i = 0; i < S; i++) {
          Vec sc(S);
          double m = -INFINITY;
          for (int j = 0; j < S; j++) {
            double dot = 0;
            for (int c = 0; c < D; c++) dot += at(x, b, i, 0, h, c) * at(x, b, j, 1, h, c);
            sc[j] = scale * dot + bias[size_t(b) * S + j];
            m = std::max(m, sc[j]);
          }
          double l = 0;
          for (int j = 0; j < S; j++) l += std::exp(sc[j] - m);
          lse[(size_t(b) * H + h) * S + i] = m + std::log(l);
          for (int j = 0; j < S; j++) {
            const double pr = std::exp(sc[j] - m) / l;
            probs[((size_t(b) * H + h) * S + i) * S + j] = pr;
            for (int c = 0; c < D; c++)
              ctx[(size_t(b) * S + i) * hidden + h * D + c] += pr * keep(b, h, i, j) * at(x, b, j, 2, h, c);
          }
        }
  };
  Vec ctx, lse, probs;
  forward(qkv, ctx, lse, probs);
  // The gradient of sum(dout * ctx) with respect to qkv.
  Vec grad(qkv.size(), 0.0);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < S; i++) {
        Vec g(S);
        double dot = 0;
        for (int j = 0; j < S; j++) {
          double dp = 0;
          for (int c = 0; c < D; c++) dp += dout[(size_t(b) * S + i) * hidden + h * D + c] * at(qkv, b, j, 2, h, c);
          g[j] = dp * keep(b, h, i, j);
          dot += g[j] * probs[((size_t(b) * H + h) * S + i) * S + j];
        }
        for (int j = 0; j < S; j++) {
          const double pr = probs[((size_t(b) * H + h) * S + i) * S + j];
          const double ds = scale * pr * (g[j] - dot);
          for (int c = 0; c < D; c++) {
            grad[(size_t(b) * S + i) * ld + h * D + c] += ds * at(qkv, b, j, 1, h, c);
            grad[(size_t(b) * S + j) * ld + hidden + h * D + c] += ds * at(qkv, b, i, 0, h, c);
            grad[(size_t(b) * S + j) * ld + 2 * hidden + h * D + c] +=
                pr * keep(b, h, i, j) * dout[(size_t(b) * S + i) * hidden + h * D + c];
          }
        }
      }
  // The reference's gradient by central differences at a q, a k and a v element.
  double numeric_err = 0;
  for (size_t e : {size_t(3), size_t(hidden + 70), size_t(ld) * (S - 2) + 2 * hidden + 5}) {
    Vec x = qkv, c1, c2, l1, p1;
    const double h = 1e-5;
    x[e] += h;
    forward(x, c1, l1, p1);
    x[e] -= 2 * h;
    forward(x, c2, l1, p1);
    double num = 0;
    for (size_t i = 0; i < c1.size(); i++) num += dout[i] * (c1[i] - c2[i]) / (2 * h);
    numeric_err = std::max(numeric_err, std::fabs(num - grad[e]) / std::max(1.0, std::fabs(num)));
  }
  const std::string name = "flash (b " + std::to_string(B) + ", " + std::to_string(H) + " heads, s " +
                           std::to_string(S) + ", dropout " + std::to_string(fc.p).substr(0, 3) + ")";
  check("flash reference: its gradient by central differences, " + name, numeric_err, 1e-6);

  Aligned<bf16> x(qkv.size()), bs(bias.size()), out(ctx.size()), dout_d(dout.size()), dx(qkv.size());
  Aligned<float> lse_d(lse.size());
  for (size_t i = 0; i < qkv.size(); i++) x.p[i] = from_f<bf16>(float(qkv[i]));
  for (size_t i = 0; i < bias.size(); i++) bs.p[i] = from_f<bf16>(float(bias[i]));
  for (size_t i = 0; i < dout.size(); i++) dout_d.p[i] = from_f<bf16>(float(dout[i]));
  for (size_t i = 0; i < qkv.size(); i++) dx.p[i] = from_f<bf16>(-7.f);  // every element written
  const bool fwd_ok = emu::launch(dim3((S + 63) / 64, H, B), dim3(32 * FA_FWD_WARPS), [&] {
    flash_fwd_bf16(x.p, bs.p, out.p, lse_d.p, S, H, float(scale), seed, threshold, drop_scale);
  });
  std::vector<float> got_ctx(ctx.size()), got_lse(lse.begin(), lse.end());
  for (size_t i = 0; i < ctx.size(); i++) got_ctx[i] = to_f(out.p[i]);
  for (size_t i = 0; i < lse.size(); i++) got_lse[i] = lse_d.p[i];
  check("flash_fwd_bf16: context, " + name, fwd_ok ? rel_err(got_ctx, ctx) : INFINITY, 1e-2);
  check("flash_fwd_bf16: log-sum-exp, " + name, fwd_ok ? rel_err(got_lse, lse) : INFINITY, 1e-5);
  // As cuda.rs launches it: blocks of up to FA_BWD_KEYS keys; with more than one, dQ is summed in
  // f32 and written by flash_dq_bf16.
  const int chunks = (S + FA_BWD_KEYS - 1) / FA_BWD_KEYS;
  const int warps = (S < FA_BWD_KEYS ? S : FA_BWD_KEYS) / 16;
  std::vector<float> dq_acc(size_t(B) * S * hidden, 0.f);
  float *acc = chunks > 1 ? dq_acc.data() : nullptr;
  bool bwd_ok = emu::launch(dim3(H, B, chunks), dim3(32 * warps), [&] {
    flash_bwd_bf16(x.p, bs.p, out.p, dout_d.p, lse_d.p, dx.p, acc, S, H, float(scale), seed, threshold,
                   drop_scale);
  });
  if (chunks > 1)
    bwd_ok &= emu::launch(dim3(7), dim3(64), [&] { flash_dq_bf16(dq_acc.data(), dx.p, size_t(B) * S, hidden); });
  const char *parts[] = {"q", "k", "v"};
  for (int part = 0; part < 3; part++) {
    std::vector<float> got;
    Vec want;
    for (int b = 0; b < B; b++)
      for (int i = 0; i < S; i++)
        for (int c = 0; c < hidden; c++) {
          const size_t e = (size_t(b) * S + i) * ld + part * hidden + c;
          got.push_back(to_f(dx.p[e]));
          want.push_back(grad[e]);
        }
    check(std::string(chunks > 1 && part == 0 ? "flash_bwd_bf16 + flash_dq_bf16" : "flash_bwd_bf16") +
              ": gradient of " + parts[part] + ", " + name,
          bwd_ok ? rel_err(got, want) : INFINITY, 2e-2);
  }
}

// The one-pass kernels read their shared tiles as the tensor cores' fragments (kernels.cu,
// mma_m16n8k16_bf16): a row of 32 words would put the 8 lanes that read one column of 8 rows on
// one bank, so the tiles' rows are padded (FA_LD, FA_DS_LD). The emulator cannot time a conflict,
// so this counts them: at each step of a walk, the most distinct 4-byte words one bank is asked
// for by the warp's 32 lanes (1: none; lanes reading one word share it). word(lane, step) is the
// word a lane touches.
template <typename F> static int bank_ways(int steps, F word) {
  int worst = 0;
  for (int step = 0; step < steps; step++) {
    std::map<long, std::set<long>> banks;
    for (int lane = 0; lane < 32; lane++) {
      const long w = word(lane, step);
      banks[w % 32].insert(w);
    }
    for (const auto &bank : banks) worst = std::max(worst, int(bank.second.size()));
  }
  return worst;
}

static void flash_bank_checks() {
  auto g = [](int lane) { return lane >> 2; };
  auto t = [](int lane) { return lane & 3; };
  // A register of a B fragment read as one word: row 8 nt + g, columns 16 kk + 2t (+ 8): k in the
  // forward, q and dO in the backward.
  check("flash kernels: bank conflicts (ways) reading B fragments as words",
        bank_ways(8 * 4 * 2, [&](int lane, int step) {
          const int nt = step / 8, kk = (step / 2) % 4, hi = step % 2;
          return long(fa_at(nt * 8 + g(lane), kk * 16 + 2 * t(lane) + 8 * hi)) / 2;
        }),
        1);
  // A column pair from two rows: rows 16 j + 2t + {0, 1, 8, 9}, column 8 dt + g (v in the
  // forward; dO, q and k in the backward).
  check("flash kernels: bank conflicts (ways) reading B fragments as column pairs",
        bank_ways(4 * 8 * 4, [&](int lane, int step) {
          const int j = step / 32, dt = (step / 4) % 8, o = step % 4;
          const int row = j * 16 + 2 * t(lane) + (o & 1) + 8 * (o >> 1);
          return long(fa_at(row, dt * 8 + g(lane))) / 2;
        }),
        1);
  // The backward's dS tile: written a half-word at a time (query 16 j + 8 (e / 2) + 2t (+ 1), key
  // 16 w + g + 8 (e % 2)), read as A fragments (query 16 mi + g + 8 (e % 2), keys 16 kt + 2t +
  // 8 (e / 2)).
  check("flash_bwd_bf16: bank conflicts (ways) writing dS",
        bank_ways(2 * 4 * 2 * 8, [&](int lane, int step) {
          const int j = step / 64, e = (step / 16) % 4, second = (step / 8) % 2, w = step % 8;
          const int q = j * 16 + (e >> 1) * 8 + 2 * t(lane) + second, key = w * 16 + g(lane) + 8 * (e & 1);
          return long(q * FA_DS_LD + key) / 2;
        }),
        1);
  check("flash_bwd_bf16: bank conflicts (ways) reading dS as A fragments",
        bank_ways(2 * 8 * 4, [&](int lane, int step) {
          const int mi = step / 32, kt = (step / 4) % 8, e = step % 4;
          return long((mi * 16 + g(lane) + 8 * (e & 1)) * FA_DS_LD + kt * 16 + 2 * t(lane) + 8 * (e >> 1)) / 2;
        }),
        1);
}

// batch_pointers: each index's addresses, base + b * per_b + h * per_h, for one product's three
// arrays and for three products' nine, over a count the block covers in one pass and one that it
// strides over; the words past the arrays asked for stay untouched.
static void batch_pointers_check() {
  for (auto [count, heads, blocks, threads, arrays] :
       {std::tuple{24u, 12u, 1u, 64u, 3u}, {1536u, 12u, 2u, 256u, 9u}, {35u, 5u, 1u, 8u, 6u}}) {
    std::vector<uint64_t> out(9 * (size_t)count + 1, 7);
    PointerPlan plan{};
    for (uint32_t k = 0; k < BATCH_ARRAYS; k++) {
      plan.base[k] = 0x10000ull * (k + 1) + (k % 2 ? 0x7f0000000000ull : 0);
      plan.per_b[k] = 98304ull * (k + 1);
      plan.per_h[k] = 128ull << (k % 3);
    }
    emu::launch(dim3(blocks), dim3(threads), [&] { batch_pointers(out.data(), count, heads, arrays, plan); });
    size_t wrong = 0;
    for (uint32_t i = 0; i < count; i++)
      for (uint32_t k = 0; k < BATCH_ARRAYS; k++) {
        const uint64_t want = k < arrays ? plan.base[k] + (i / heads) * plan.per_b[k] + (i % heads) * plan.per_h[k] : 7;
        wrong += out[k * (size_t)count + i] != want;
      }
    wrong += out.back() != 7;
    char name[112];
    std::snprintf(name, sizeof name, "batch_pointers %u arrays of %u indices (%u heads), %u x %u threads",
                  arrays, count, heads, blocks, threads);
    check(name, double(wrong), 0);
  }
}

int main() {
  std::mt19937 rng(20261126);
  for (auto [rows, n, blocks] : {std::tuple{5, 48, 5u}, {37, 96, 2u}, {7, 200, 3u}, {3, 1100, 1u}, {11, 1024, 2u}, {4, 400, 1u}, {5, 520, 1u}, {6, 700, 2u}}) {
    layer_norm<float>(rows, n, blocks, rng);
    layer_norm<bf16>(rows, n, blocks, rng);
  }
  // Rows the packed kernels take (16-byte packs, a lane holding 1 to 4 of bf16, up to 8 of f32),
  // through the per-element kernels too.
  for (auto [rows, n] : {std::pair{3, 768}, {2, 256}}) {
    layer_norm<float>(rows, n, 2u, rng);
    layer_norm<bf16>(rows, n, 2u, rng);
  }
  for (auto [rows, n] : {std::pair{19, 768}, {10, 256}, {11, 1024}, {5, 384}, {6, 512}}) {
    layer_norm_vec<float>(rows, n, rng);  // 384: three packs a lane in f32
    if (n % 256 == 0) layer_norm_vec<bf16>(rows, n, rng);
  }
  dwdb_sum_check(21, 70, rng);
  dwdb_sum_check(3, 1536, rng);
  softmax<float>(3, 5, 40, rng);  // 15 rows: the last block of 8 warps has idle warps
  softmax<bf16>(3, 5, 40, rng);
  softmax<float>(2, 3, 7, rng);  // a row shorter than a warp
  softmax<bf16>(2, 3, 128, rng);   // 4 and 8 registers per lane; bf16 128: 8-byte chunks
  softmax<bf16>(3, 3, 64, rng);    // the chunked rows: 4, 8 and 16 bytes a lane
  softmax<bf16>(2, 5, 256, rng);
  softmax<float>(2, 3, 64, rng);
  softmax<float>(3, 3, 128, rng);
  softmax<float>(2, 2, 200, rng);
  softmax<float>(1, 3, 280, rng);
  softmax<float>(2, 2, 512, rng);  // the longest row held in registers
  softmax<bf16>(2, 2, 600, rng);   // longer rows: read three times
  gelu<float>(3000, elementwise_blocks(3000 / 4), 0, rng);
  gelu<float>(3001, dim3(2), 0, rng);
  gelu<float>(3001, dim3(2), 1, rng);
  gelu<bf16>(3003, dim3(3), 0, rng);
  gelu<bf16>(3003, dim3(3), 1, rng);
  bias_add<float>(9, 300, 9, 0, rng);  // packed
  bias_add<float>(9, 300, 4, 0, rng);
  bias_add<float>(9, 300, 4, 1, rng);  // unaligned: by element
  bias_add<float>(5, 301, 3, 0, rng);  // no whole packs: by element
  bias_add<bf16>(9, 304, 2, 0, rng);   // packed
  bias_add<bf16>(9, 300, 2, 0, rng);   // 300 is no multiple of 8: by element
  dropout_checks(rng);
  for (const size_t shift : {0, 1}) {
    dropout_add_check<float>(1003, shift, rng);
    dropout_add_check<bf16>(1003, shift, rng);
  }
  // Rows of 768 (bf16: 3 packs a lane; f32: 6) and 256, 11 rows: a last block of warps short.
  for (const bool drop : {true, false}) {
    dropout_add_ln_check<bf16>(11, 768, drop, rng);
    dropout_add_ln_check<float>(11, 768, drop, rng);
    dropout_add_ln_check<bf16>(11, 256, drop, rng);
  }
  swap<bf16, uint16_t>(2, 5, 3, 3, 2, rng);  // odd bf16 runs: element by element
  swap<float, uint32_t>(3, 7, 4, 5, 3, rng);
  swap<bf16, uint2>(2, 6, 3, 4, 2, rng);
  swap<bf16, uint4>(3, 40, 2, 16, 3, rng);  // slabs of 80 units: threads stride
  swap<float, uint4>(5, 3, 4, 8, 2, rng);   // a = 5 over 2 rows of blocks
  swap<float, uint4>(2, 12, 9, 64, 2, rng);  // a merge of 12 heads of 64
  // q, k, v split from one [batch, seq, 3 * heads * head_dim] product, and merged back into one.
  swap<bf16, uint4>(2, 5, 4, 16, 2, rng, 3, 1, 1, 0);
  swap<bf16, uint4>(2, 5, 4, 16, 1, rng, 3, 2, 1, 0);
  swap<float, uint2>(3, 4, 5, 6, 2, rng, 1, 0, 3, 0);
  swap<bf16, uint4>(2, 4, 5, 8, 2, rng, 1, 0, 3, 2);
  swap<bf16, uint16_t>(2, 3, 4, 3, 2, rng, 3, 1, 3, 1);  // odd runs, element by element
  embedding<float>(rng);
  embedding<bf16>(rng);
  embedding_to_bf16(rng);
  for (uint32_t tables : {2u, 3u}) {
    embedding_sum<float>(tables, rng);
    embedding_sum<bf16>(tables, rng);
  }
  adamw(rng);
  sum_squares(rng);
  adamw_multi_check(rng);
  clip_scale_check(rng);
  gather_check(rng);
  split_sum_check<float>(3001, 4, elementwise_blocks(3001), rng);
  split_sum_check<float>(3001, 3, dim3(2), rng);
  split_sum_check<bf16>(2050, 8, elementwise_blocks(2050), rng);
  split_sum_check<bf16>(2050, 2, dim3(3), rng);
  flash_check({2, 2, 48, 0.1}, rng);   // partial tiles: keys 48 of 64, queries 48 of 64 and 16 of 32
  flash_check({1, 2, 128, 0.0}, rng);  // two key tiles, four backward steps, no dropout
  flash_check({1, 1, 16, 0.3}, rng);   // one tile of each
  flash_check({1, 2, 160, 0.1}, rng);  // two blocks of keys (128 + 32: warps past the end idle),
                                       // dQ summed in f32 and written by flash_dq_bf16
  flash_bank_checks();
  batch_pointers_check();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
