// A micro-benchmark of recycle's elementwise and row kernels (src/model/kernels/cuda/kernels.cu) on
// a GPU, at roberta-base's shapes in bf16 (batch 128, seq 128 unless --batch says otherwise), with
// candidate rewrites beside them. Every figure is a ratio against a plain 16-byte copy of the same
// bytes timed in the same process: "of copy" is the copy's time over the kernel's for the bytes the
// kernel must move (1.00: at the copy's bandwidth). A candidate is checked against the kernel it
// would replace (largest difference printed) before it is timed.
//
// Built by benches/cuda/run.sh with nvcc (sm_90), run on the device machine; docs/cuda.md, "Kernel
// bandwidth", has the figures.

#include <type_traits>

#include "kernels.cu"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using bf16 = __nv_bfloat16;

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

// ---- candidates -----------------------------------------------------------------------------------

// A 32-bit hash for the dropout mask: two rounds of a 32-bit integer finaliser (multiply-xorshift)
// instead of splitmix64's three 64-bit products.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
__device__ __forceinline__ bool kept32(uint64_t seed, size_t i, uint32_t threshold) {
  uint32_t h = mix32((uint32_t)i ^ (uint32_t)seed);
  h = mix32(h ^ (uint32_t)(seed >> 32) ^ ((uint32_t)(i >> 32) * 0x9E3779B9u));
  return (h >> 8) >= threshold;
}

extern "C" __global__ void copy_bf16(const bf16 *x, bf16 *y, size_t n) {
  map1(x, y, n, [](size_t, float v) { return v; });
}
extern "C" __global__ void dropout32_bf16(const bf16 *x, bf16 *y, size_t n, uint64_t seed,
                                          uint32_t threshold, float scale) {
  map1(x, y, n, [=](size_t i, float v) { return kept32(seed, i, threshold) ? v * scale : 0.f; });
}

// Softmax with dropout, rows of k = 32 * V: lane l holds elements [V l, V l + V) and moves them
// as one load and one store per tensor (V = 4: 8 bytes of bf16).
template <int V, typename H>
__device__ void softmax_drop_vec(const bf16 *s, const bf16 *bias, bf16 *p, bf16 *dropped,
                                 size_t rows, size_t rows_per_batch, float scale, uint64_t seed,
                                 uint32_t threshold, float drop_scale, H hash) {
  static_assert(V == 4 || V == 8, "V");
  using Vec = typename std::conditional<V == 4, uint2, uint4>::type;
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  constexpr int k = 32 * V;
  const int lane = threadIdx.x;
  const size_t base = row * k + V * lane;
  Vec sv = *reinterpret_cast<const Vec *>(s + base);
  Vec bv = *reinterpret_cast<const Vec *>(bias + (row / rows_per_batch) * k + V * lane);
  const bf16 *se = reinterpret_cast<const bf16 *>(&sv);
  const bf16 *be = reinterpret_cast<const bf16 *>(&bv);
  float v[V];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < V; j++) {
    v[j] = to_f(se[j]) * scale + to_f(be[j]);
    m = fmaxf(m, v[j]);
  }
  m = warp_max(m);
  float z = 0.f;
#pragma unroll
  for (int j = 0; j < V; j++) {
    v[j] = expf(v[j] - m);
    z += v[j];
  }
  const float inv = 1.f / warp_sum(z);
  Vec pv, dv;
  bf16 *pe = reinterpret_cast<bf16 *>(&pv);
  bf16 *de = reinterpret_cast<bf16 *>(&dv);
#pragma unroll
  for (int j = 0; j < V; j++) {
    pe[j] = from_f<bf16>(v[j] * inv);
    de[j] = from_f<bf16>(hash(seed, base + j, threshold) ? to_f(pe[j]) * drop_scale : 0.f);
  }
  *reinterpret_cast<Vec *>(p + base) = pv;
  *reinterpret_cast<Vec *>(dropped + base) = dv;
}

struct Hash64 {
  __device__ bool operator()(uint64_t s, size_t i, uint32_t t) const { return kept(s, i, t); }
};
struct Hash32 {
  __device__ bool operator()(uint64_t s, size_t i, uint32_t t) const { return kept32(s, i, t); }
};

extern "C" __global__ void softmax_drop_vec64(const bf16 *s, const bf16 *bias, bf16 *p,
                                              bf16 *dropped, size_t rows, size_t rpb, float scale,
                                              uint64_t seed, uint32_t threshold, float ds) {
  softmax_drop_vec<4>(s, bias, p, dropped, rows, rpb, scale, seed, threshold, ds, Hash64());
}
extern "C" __global__ void softmax_drop_vec32(const bf16 *s, const bf16 *bias, bf16 *p,
                                              bf16 *dropped, size_t rows, size_t rpb, float scale,
                                              uint64_t seed, uint32_t threshold, float ds) {
  softmax_drop_vec<4>(s, bias, p, dropped, rows, rpb, scale, seed, threshold, ds, Hash32());
}

// The softmax backward for rows of 32 * V, vectorised as above, the mask drawn once per element.
template <int V, typename H>
__device__ void softmax_bwd_vec(const bf16 *p, const bf16 *dp, bf16 *ds, size_t rows, float scale,
                                uint64_t seed, uint32_t threshold, float drop_scale, H hash) {
  using Vec = typename std::conditional<V == 4, uint2, uint4>::type;
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  constexpr int k = 32 * V;
  const size_t base = row * k + V * threadIdx.x;
  Vec pv = *reinterpret_cast<const Vec *>(p + base);
  Vec gv = *reinterpret_cast<const Vec *>(dp + base);
  const bf16 *pe = reinterpret_cast<const bf16 *>(&pv);
  const bf16 *ge = reinterpret_cast<const bf16 *>(&gv);
  float g[V], pf[V];
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < V; j++) {
    pf[j] = to_f(pe[j]);
    g[j] = hash(seed, base + j, threshold) ? to_f(ge[j]) * drop_scale : 0.f;
    dot += pf[j] * g[j];
  }
  dot = warp_sum(dot);
  Vec ov;
  bf16 *oe = reinterpret_cast<bf16 *>(&ov);
#pragma unroll
  for (int j = 0; j < V; j++) oe[j] = from_f<bf16>(scale * pf[j] * (g[j] - dot));
  *reinterpret_cast<Vec *>(ds + base) = ov;
}
extern "C" __global__ void softmax_bwd_vec64(const bf16 *p, const bf16 *dp, bf16 *ds, size_t rows,
                                             float scale, uint64_t seed, uint32_t threshold,
                                             float drop_scale) {
  softmax_bwd_vec<4>(p, dp, ds, rows, scale, seed, threshold, drop_scale, Hash64());
}
extern "C" __global__ void softmax_bwd_vec32(const bf16 *p, const bf16 *dp, bf16 *ds, size_t rows,
                                             float scale, uint64_t seed, uint32_t threshold,
                                             float drop_scale) {
  softmax_bwd_vec<4>(p, dp, ds, rows, scale, seed, threshold, drop_scale, Hash32());
}

// Column sums of g [rows, n] (n a multiple of 8): thread (x, y) of a block sums the 8 columns of
// pack blockIdx.x * 32 + x over rows y, y + 8, ... of the block's chunk of rows; the block's 8 row
// groups are added in shared memory into partial[blockIdx.y, :] (f32), and a second kernel adds the
// chunks in order.
extern "C" __global__ void colsum_partial_bf16(const bf16 *g, float *partial, size_t rows, int n,
                                               int chunk) {
  __shared__ float sh[8][32 * 8 + 1];
  const int packs = n / 8;
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const size_t r0 = (size_t)blockIdx.y * chunk;
  const size_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  if (c < packs) {
    const Pack<bf16> *gp = reinterpret_cast<const Pack<bf16> *>(g);
    for (size_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const Pack<bf16> v = gp[r * packs + c];
#pragma unroll
      for (int k = 0; k < 8; k++) acc[k] += to_f(v.v[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < 8; k++) sh[threadIdx.y][threadIdx.x * 8 + k] = acc[k];
  __syncthreads();
  const int t = threadIdx.y * 32 + threadIdx.x;  // 256 columns, one a thread
  const int col = blockIdx.x * 256 + t;
  if (col < n) {
    float s = 0.f;
    for (int j = 0; j < 8; j++) s += sh[j][t];
    partial[(size_t)blockIdx.y * n + col] = s;
  }
}
extern "C" __global__ void colsum_finish_bf16(const float *partial, bf16 *out, int chunks, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int j = 0; j < chunks; j++) s += partial[(size_t)j * n + c];
  out[c] = from_f<bf16>(s);
}

// GELU's backward and the bias gradient (the column sums of du) in one pass: du as gelu_bwd
// writes it, and each block's column sums of the rounded du into partial (as colsum_partial).
extern "C" __global__ void gelu_bwd_colsum_bf16(const bf16 *x, const bf16 *dy, bf16 *dx,
                                                float *partial, size_t rows, int n, int chunk) {
  __shared__ float sh[8][32 * 8 + 1];
  const int packs = n / 8;
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const size_t r0 = (size_t)blockIdx.y * chunk;
  const size_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  if (c < packs) {
    const Pack<bf16> *xp = reinterpret_cast<const Pack<bf16> *>(x);
    const Pack<bf16> *gp = reinterpret_cast<const Pack<bf16> *>(dy);
    Pack<bf16> *op = reinterpret_cast<Pack<bf16> *>(dx);
    for (size_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const Pack<bf16> a = xp[r * packs + c], b = gp[r * packs + c];
      Pack<bf16> o;
#pragma unroll
      for (int k = 0; k < 8; k++) {
        const float v = to_f(a.v[k]), g = to_f(b.v[k]);
        const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        o.v[k] = from_f<bf16>(g * (cdf + v * pdf));
        acc[k] += to_f(o.v[k]);
      }
      op[r * packs + c] = o;
    }
  }
#pragma unroll
  for (int k = 0; k < 8; k++) sh[threadIdx.y][threadIdx.x * 8 + k] = acc[k];
  __syncthreads();
  const int t = threadIdx.y * 32 + threadIdx.x;
  const int col = blockIdx.x * 256 + t;
  if (col < n) {
    float s = 0.f;
    for (int j = 0; j < 8; j++) s += sh[j][t];
    partial[(size_t)blockIdx.y * n + col] = s;
  }
}

// Bias + GELU with the tanh-free erf of Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7) and the
// fast exponential, for comparison with erff.
__device__ __forceinline__ float erf_as(float x) {
  const float ax = fabsf(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  const float y =
      1.f - (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t - 0.284496736f) * t +
             0.254829592f) *
                t * __expf(-ax * ax);
  return copysignf(y, x);
}
extern "C" __global__ void gelu_fwd_as_bf16(const bf16 *x, bf16 *y, size_t n) {
  map1(x, y, n, [](size_t, float v) { return 0.5f * v * (1.f + erf_as(v * 0.70710678118654752f)); });
}

// Layer norm's backward dx + branch dropout as layer_norm_bwd_dx_drop_warp, but with 16-byte
// loads (a lane holds 8 consecutive columns per slot: n = 768 is 3 slots of 8), the 32-bit hash,
// and no weight/bias sums (those as a separate column-sum pass).
template <int SL, typename H>
__device__ void ln_bwd_vec(const bf16 *x, const bf16 *w, const bf16 *dy, bf16 *dx, bf16 *dh,
                           size_t rows, int n, float eps, uint64_t seed, uint32_t threshold,
                           float drop_scale, H hash) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const Pack<bf16> *xp = reinterpret_cast<const Pack<bf16> *>(x + row * n);
  const Pack<bf16> *gp = reinterpret_cast<const Pack<bf16> *>(dy + row * n);
  const Pack<bf16> *wp = reinterpret_cast<const Pack<bf16> *>(w);
  float v[SL][8], g[SL][8];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const Pack<bf16> a = xp[k * 32 + lane];
#pragma unroll
    for (int j = 0; j < 8; j++) {
      v[k][j] = to_f(a.v[j]);
      s += v[k][j];
    }
  }
  const float mean = warp_sum(s) / n;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < SL; k++)
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const float d = v[k][j] - mean;
      q += d * d;
    }
  const float rstd = rsqrtf(warp_sum(q) / n + eps);
  float a = 0.f, c = 0.f;
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const Pack<bf16> gy = gp[k * 32 + lane], ww = wp[k * 32 + lane];
#pragma unroll
    for (int j = 0; j < 8; j++) {
      g[k][j] = to_f(gy.v[j]) * to_f(ww.v[j]);
      v[k][j] = (v[k][j] - mean) * rstd;
      a += g[k][j];
      c += g[k][j] * v[k][j];
    }
  }
  a = warp_sum(a) / n;
  c = warp_sum(c) / n;
  Pack<bf16> *dxp = reinterpret_cast<Pack<bf16> *>(dx + row * n);
  Pack<bf16> *dhp = reinterpret_cast<Pack<bf16> *>(dh + row * n);
#pragma unroll
  for (int k = 0; k < SL; k++) {
    Pack<bf16> o, h;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      o.v[j] = from_f<bf16>(rstd * (g[k][j] - a - v[k][j] * c));
      const size_t i = row * n + (k * 32 + lane) * 8 + j;
      h.v[j] = from_f<bf16>(hash(seed, i, threshold) ? to_f(o.v[j]) * drop_scale : 0.f);
    }
    dxp[k * 32 + lane] = o;
    dhp[k * 32 + lane] = h;
  }
}
extern "C" __global__ void ln_bwd_vec32(const bf16 *x, const bf16 *w, const bf16 *dy, bf16 *dx,
                                        bf16 *dh, size_t rows, int n, float eps, uint64_t seed,
                                        uint32_t threshold, float drop_scale) {
  ln_bwd_vec<3>(x, w, dy, dx, dh, rows, n, eps, seed, threshold, drop_scale, Hash32());
}
extern "C" __global__ void ln_bwd_vec64(const bf16 *x, const bf16 *w, const bf16 *dy, bf16 *dx,
                                        bf16 *dh, size_t rows, int n, float eps, uint64_t seed,
                                        uint32_t threshold, float drop_scale) {
  ln_bwd_vec<3>(x, w, dy, dx, dh, rows, n, eps, seed, threshold, drop_scale, Hash64());
}

// The q, k, v split with the index of a unit within its run from shifts (d a power of two).
extern "C" __global__ void swap12_pow2_u128(const uint4 *x, uint4 *y, uint32_t a, uint32_t b,
                                            uint32_t c, uint32_t dshift, uint32_t x_row,
                                            uint32_t y_row) {
  const uint32_t ic = blockIdx.x, d = 1u << dshift, slab = b * d;
  for (uint32_t ia = blockIdx.y; ia < a; ia += gridDim.y) {
    const uint4 *xs = x + (size_t)ia * b * x_row + (size_t)ic * d;
    uint4 *ys = y + ((size_t)ia * c + ic) * y_row;
    for (uint32_t j = threadIdx.x; j < slab; j += blockDim.x) {
      const uint32_t ib = j >> dshift;
      ys[j] = xs[(size_t)ib * x_row + (j & (d - 1))];
    }
  }
}

__global__ void fill_bf16(bf16 *x, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float u = (mix32((uint32_t)i * 2654435761u ^ seed) >> 8) * (1.f / 16777216.f);
    x[i] = __float2bfloat16(lo + (hi - lo) * u);
  }
}

// ---- host ----------------------------------------------------------------------------------------

static cudaEvent_t ev0, ev1;
static int warmup = 3, reps = 20;

// Median milliseconds of f() over reps launches.
static double time_ms(const std::function<void()> &f) {
  for (int i = 0; i < warmup; i++) f();
  CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; i++) {
    CK(cudaEventRecord(ev0));
    f();
    CK(cudaEventRecord(ev1));
    CK(cudaEventSynchronize(ev1));
    float ms;
    CK(cudaEventElapsedTime(&ms, ev0, ev1));
    t.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

static bf16 *alloc_bf16(size_t n, uint32_t seed, float lo = -2.f, float hi = 2.f) {
  bf16 *p;
  CK(cudaMalloc(&p, n * sizeof(bf16)));
  fill_bf16<<<1024, 256>>>(p, n, seed, lo, hi);
  return p;
}

static std::vector<float> host(const bf16 *d, size_t n) {
  std::vector<bf16> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; i++) f[i] = __bfloat162float(h[i]);
  return f;
}

// The largest |a - b| over the largest |b|.
static double rel_diff(const bf16 *a, const bf16 *b, size_t n) {
  auto x = host(a, n), y = host(b, n);
  double d = 0, m = 0;
  for (size_t i = 0; i < n; i++) {
    d = std::max(d, (double)std::fabs(x[i] - y[i]));
    m = std::max(m, (double)std::fabs(y[i]));
  }
  return m > 0 ? d / m : d;
}

static double copy_gbs = 0;

// One row of the table: name, ms, bytes the kernel must move, and a note.
static void row(const char *name, double ms, double bytes, const std::string &note = "") {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  printf("%-46s %9.4f %9.0f %8.2f  %s\n", name, ms, gbs, copy_gbs > 0 ? gbs / copy_gbs : 1.0,
         note.c_str());
  fflush(stdout);
}

static std::string diff_note(double d) {
  char b[64];
  snprintf(b, sizeof b, "max rel diff %.2e", d);
  return b;
}

int main(int argc, char **argv) {
  int batch = 128;
  for (int i = 1; i + 1 < argc; i++) {
    if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
    if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
  }
  const int seq = 128, hid = 768, heads = 12, hd = 64, ffn = 3072;
  const size_t rows = (size_t)batch * seq;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("kernel bench: %s, batch %d, seq %d, bf16, median of %d\n", prop.name, batch, seq, reps);
  printf("%-46s %9s %9s %8s\n", "kernel", "ms", "GB/s", "of copy");
  CK(cudaEventCreate(&ev0));
  CK(cudaEventCreate(&ev1));
  const uint64_t seed = 0x1234567890abcdefull;
  const uint32_t threshold = (uint32_t)std::ceil(0.1 * 16777216.0);
  const float dscale = 1.f / 0.9f;
  auto grid1 = [](size_t packs) { return (unsigned)std::min<size_t>((packs + 255) / 256, 65535 * 8); };

  // The wide activation [rows, 4h]: copy, dropout, GELU.
  const size_t nw = rows * ffn;
  bf16 *xw = alloc_bf16(nw, 1), *yw = alloc_bf16(nw, 2), *zw = alloc_bf16(nw, 3), *ww = alloc_bf16(nw, 4);
  CK(cudaDeviceSynchronize());
  const double wbytes2 = 2.0 * nw * sizeof(bf16), wbytes3 = 3.0 * nw * sizeof(bf16);
  double ms = time_ms([&] { copy_bf16<<<grid1(nw / 8), 256>>>(xw, yw, nw); });
  copy_gbs = wbytes2 / (ms * 1e-3) / 1e9;
  row("copy [rows, 4h] (the baseline)", ms, wbytes2);
  ms = time_ms([&] { dropout_bf16<<<grid1(nw / 8), 256>>>(xw, yw, nw, seed, threshold, dscale); });
  row("dropout, splitmix64 mask (now)", ms, wbytes2);
  ms = time_ms([&] { dropout32_bf16<<<grid1(nw / 8), 256>>>(xw, zw, nw, seed, threshold, dscale); });
  {
    // The kept fraction of the 32-bit mask, from the output's zeros (inputs are never exactly 0
    // in bulk: fill draws from a continuum rounded to bf16).
    auto h = host(zw, std::min<size_t>(nw, 1 << 24));
    size_t zeros = 0;
    for (float v : h) zeros += v == 0.f;
    char b[96];
    snprintf(b, sizeof b, "kept fraction %.4f", 1.0 - (double)zeros / h.size());
    row("dropout, 32-bit mask (candidate)", ms, wbytes2, b);
  }
  ms = time_ms([&] { gelu_fwd_bf16<<<grid1(nw / 8), 256>>>(xw, yw, nw); });
  row("gelu forward, erff (now)", ms, wbytes2);
  ms = time_ms([&] { gelu_fwd_as_bf16<<<grid1(nw / 8), 256>>>(xw, zw, nw); });
  row("gelu forward, A&S erf (candidate)", ms, wbytes2, diff_note(rel_diff(zw, yw, nw)));
  bf16 *bw = alloc_bf16(ffn, 5);
  {
    dim3 g((ffn / 8 + 255) / 256, (unsigned)std::min<size_t>(rows, 65535));
    ms = time_ms([&] { bias_add_bf16<<<g, 256>>>(xw, bw, yw, rows, ffn, true); });
    row("bias add [rows, 4h] (now)", ms, wbytes2);
    ms = time_ms([&] { bias_gelu_bf16<<<g, 256>>>(xw, bw, yw, zw, rows, ffn, true); });
    row("bias + gelu, u and g kept (now)", ms, wbytes3);
  }
  ms = time_ms([&] { gelu_bwd_bf16<<<grid1(nw / 8), 256>>>(xw, yw, zw, nw); });
  row("gelu backward (now)", ms, wbytes3);

  // Column sums (bias gradients) of [rows, 4h].
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "cublasCreate failed\n");
    return 1;
  }
  bf16 *ones = alloc_bf16(rows, 6, 1.f, 1.f), *cs1 = alloc_bf16(ffn, 7), *cs2 = alloc_bf16(ffn, 8);
  const float one = 1.f, zero = 0.f;
  auto cublas_colsum = [&](const bf16 *g, bf16 *out, int n) {
    // out (n x 1) = g^T (n x rows, column-major view of row-major g) times ones (rows x 1).
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, 1, (int)rows, &one, g, CUDA_R_16BF, n, ones,
                 CUDA_R_16BF, (int)rows, &zero, out, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                 CUBLAS_GEMM_DEFAULT);
  };
  const double cbytes = 1.0 * nw * sizeof(bf16);
  ms = time_ms([&] { cublas_colsum(zw, cs1, ffn); });
  row("column sum [rows, 4h], cuBLAS with ones (now)", ms, cbytes);
  const int chunk = 256, chunks = (int)((rows + chunk - 1) / chunk);
  float *partial;
  CK(cudaMalloc(&partial, (size_t)chunks * ffn * sizeof(float)));
  auto own_colsum = [&](const bf16 *g, bf16 *out, int n) {
    colsum_partial_bf16<<<dim3((n / 8 + 31) / 32, chunks), dim3(32, 8)>>>(g, partial, rows, n, chunk);
    colsum_finish_bf16<<<(n + 255) / 256, 256>>>(partial, out, chunks, n);
  };
  ms = time_ms([&] { own_colsum(zw, cs2, ffn); });
  CK(cudaDeviceSynchronize());
  row("column sum [rows, 4h], own kernel (candidate)", ms, cbytes, diff_note(rel_diff(cs2, cs1, ffn)));
  ms = time_ms([&] {
    gelu_bwd_bf16<<<grid1(nw / 8), 256>>>(xw, yw, zw, nw);
    cublas_colsum(zw, cs1, ffn);
  });
  row("gelu backward + cuBLAS column sum (now)", ms, wbytes3 + cbytes);
  ms = time_ms([&] {
    gelu_bwd_colsum_bf16<<<dim3((ffn / 8 + 31) / 32, chunks), dim3(32, 8)>>>(xw, yw, ww, partial, rows, ffn, chunk);
    colsum_finish_bf16<<<(ffn + 255) / 256, 256>>>(partial, cs2, chunks, ffn);
  });
  CK(cudaDeviceSynchronize());
  {
    std::string n = diff_note(rel_diff(ww, zw, nw)) + ", sums " + diff_note(rel_diff(cs2, cs1, ffn));
    row("gelu backward + column sum, one pass (cand.)", ms, wbytes3, n);
  }

  // Rows of hidden [rows, h]: dropout + residual, layer norm and its backward.
  const size_t nh = rows * hid;
  bf16 *xh = alloc_bf16(nh, 11), *yh = alloc_bf16(nh, 12), *zh = alloc_bf16(nh, 13),
       *dh1 = alloc_bf16(nh, 14), *dh2 = alloc_bf16(nh, 15), *dx2 = alloc_bf16(nh, 16),
       *lw = alloc_bf16(hid, 17, 0.5f, 1.5f), *lb = alloc_bf16(hid, 18);
  CK(cudaDeviceSynchronize());
  const double hb = 1.0 * nh * sizeof(bf16);
  ms = time_ms([&] { dropout_add_bf16<<<grid1(nh / 8), 256>>>(xh, yh, zh, nh, seed, threshold, dscale); });
  row("dropout + residual add [rows, h] (now)", ms, 3 * hb);
  ms = time_ms([&] { layer_norm_fwd_warp_bf16<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(xh, lw, lb, zh, rows, hid, 1e-5f); });
  row("layer norm forward (now)", ms, 2 * hb);
  const unsigned lnb = (unsigned)std::min<size_t>((rows + 15) / 16, 512);
  float *lpart, *dwdb;
  CK(cudaMalloc(&lpart, (size_t)lnb * 2 * hid * sizeof(float)));
  CK(cudaMalloc(&dwdb, 2 * hid * sizeof(float)));
  auto ln_fused = [&](bf16 *dh) {
    layer_norm_bwd_fused_bf16<<<lnb, dim3(32, 8)>>>(xh, lw, yh, zh, dh, lpart, rows, hid, 1e-5f, seed, threshold, dscale);
    layer_norm_dwdb_sum<<<(2 * hid + 31) / 32, dim3(32, 8)>>>(lpart, dwdb, (int)lnb, 2 * hid);
  };
  ms = time_ms([&] { ln_fused(dh1); });
  row("layer norm backward + branch dropout (now)", ms, 5 * hb);
  ms = time_ms([&] { ln_fused(nullptr); });
  row("layer norm backward, no dropout (now)", ms, 4 * hb);
  ms = time_ms([&] { ln_bwd_vec64<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(xh, lw, yh, dx2, dh2, rows, hid, 1e-5f, seed, threshold, dscale); });
  CK(cudaDeviceSynchronize());
  row("ln backward dx+dh, 16-byte, splitmix64 (cand.)", ms, 5 * hb,
      diff_note(rel_diff(dx2, zh, nh)) + ", dh " + diff_note(rel_diff(dh2, dh1, nh)));
  ms = time_ms([&] { ln_bwd_vec32<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(xh, lw, yh, dx2, dh2, rows, hid, 1e-5f, seed, threshold, dscale); });
  row("ln backward dx+dh, 16-byte, 32-bit (cand.)", ms, 5 * hb);
  {
    bf16 *csh = alloc_bf16(hid, 19);
    float *p2;
    CK(cudaMalloc(&p2, (size_t)chunks * hid * sizeof(float)));
    ms = time_ms([&] {
      colsum_partial_bf16<<<dim3((hid / 8 + 31) / 32, chunks), dim3(32, 8)>>>(yh, p2, rows, hid, chunk);
      colsum_finish_bf16<<<(hid + 255) / 256, 256>>>(p2, csh, chunks, hid);
    });
    row("column sum [rows, h], own kernel (candidate)", ms, hb);
    ms = time_ms([&] { cublas_colsum(yh, csh, hid); });
    row("column sum [rows, h], cuBLAS with ones (now)", ms, hb);
  }

  // Attention probabilities [batch, heads, seq, seq].
  const size_t sr = (size_t)batch * heads * seq, ns = sr * seq;
  bf16 *sc = alloc_bf16(ns, 21, -4.f, 4.f), *pa = alloc_bf16(ns, 22), *da = alloc_bf16(ns, 23),
       *pb = alloc_bf16(ns, 24), *db = alloc_bf16(ns, 25), *mask = alloc_bf16((size_t)batch * seq, 26, 0.f, 0.f);
  CK(cudaDeviceSynchronize());
  const double sb = 1.0 * ns * sizeof(bf16);
  const unsigned wr = (unsigned)((sr + 7) / 8);
  const size_t rpb = (size_t)heads * seq;
  ms = time_ms([&] { softmax_fwd_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, sr, seq, rpb, 0.125f); });
  row("softmax, no dropout (now)", ms, 2 * sb);
  ms = time_ms([&] { softmax_drop_fwd_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, da, sr, seq, rpb, 0.125f, seed, threshold, dscale); });
  row("softmax + dropout (now)", ms, 3 * sb);
  ms = time_ms([&] { softmax_drop_vec64<<<wr, dim3(32, 8)>>>(sc, mask, pb, db, sr, rpb, 0.125f, seed, threshold, dscale); });
  CK(cudaDeviceSynchronize());
  row("softmax + dropout, 8-byte, splitmix64 (cand.)", ms, 3 * sb,
      diff_note(rel_diff(pb, pa, ns)) + ", dropped " + diff_note(rel_diff(db, da, ns)));
  ms = time_ms([&] { softmax_drop_vec32<<<wr, dim3(32, 8)>>>(sc, mask, pb, db, sr, rpb, 0.125f, seed, threshold, dscale); });
  row("softmax + dropout, 8-byte, 32-bit (cand.)", ms, 3 * sb);
  ms = time_ms([&] { softmax_bwd_bf16<<<wr, dim3(32, 8)>>>(pa, da, pb, sr, seq, 0.125f, seed, threshold, dscale); });
  row("softmax backward through dropout (now)", ms, 3 * sb);
  ms = time_ms([&] { softmax_bwd_vec64<<<wr, dim3(32, 8)>>>(pa, da, db, sr, 0.125f, seed, threshold, dscale); });
  CK(cudaDeviceSynchronize());
  row("softmax backward, 8-byte, splitmix64 (cand.)", ms, 3 * sb, diff_note(rel_diff(db, pb, ns)));
  ms = time_ms([&] { softmax_bwd_vec32<<<wr, dim3(32, 8)>>>(pa, da, db, sr, 0.125f, seed, threshold, dscale); });
  row("softmax backward, 8-byte, 32-bit (cand.)", ms, 3 * sb);

  // q, k, v split from [b, s, 3, heads, d] into three [b, heads, s, d], and the merge back.
  const size_t nq = rows * 3 * hid;
  bf16 *qkv = alloc_bf16(nq, 31), *q3 = alloc_bf16(nq, 32), *m3 = alloc_bf16(nq, 33);
  CK(cudaDeviceSynchronize());
  const uint32_t du = hd * 2 / 16;  // head in 16-byte units
  const uint32_t xrow = 3 * heads * du, part = heads * du;
  auto split = [&](bool pow2) {
    for (int p = 0; p < 3; p++) {
      const uint4 *x = reinterpret_cast<const uint4 *>(qkv) + p * part;
      uint4 *y = reinterpret_cast<uint4 *>(q3) + (size_t)p * rows * hid * 2 / 16;
      if (pow2)
        swap12_pow2_u128<<<dim3(heads, batch), 256>>>(x, y, batch, seq, heads, 3, xrow, seq * du);
      else
        swap12_u128<<<dim3(heads, batch), 256>>>(x, y, batch, seq, heads, du, xrow, seq * du);
    }
  };
  ms = time_ms([&] { split(false); });
  row("q,k,v split x3 (now)", ms, 2.0 * nq * sizeof(bf16));
  ms = time_ms([&] { split(true); });
  row("q,k,v split x3, shifts (candidate)", ms, 2.0 * nq * sizeof(bf16));
  ms = time_ms([&] {
    for (int p = 0; p < 3; p++) {
      const uint4 *x = reinterpret_cast<const uint4 *>(q3) + (size_t)p * rows * hid * 2 / 16;
      uint4 *y = reinterpret_cast<uint4 *>(m3) + p * part;
      swap12_u128<<<dim3(seq, batch), 256>>>(x, y, batch, heads, seq, du, seq * du, xrow);
    }
  });
  row("q,k,v merge x3 (now)", ms, 2.0 * nq * sizeof(bf16));
  CK(cudaDeviceSynchronize());
  printf("kernel bench: done\n");
  return 0;
}
