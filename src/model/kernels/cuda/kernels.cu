// recycle's CUDA kernels (built into PTX by build.rs when the `cuda` feature is on; called from
// src/model/kernels/cuda.rs). Each replaces a chain of candle ops that the op-by-op profile of
// `recycle gpu-check` found slow on a GPU: layer norm and its backward, the scaled masked softmax and
// its backward, exact GELU and its derivative, a bias add (whose backward is a cuBLAS product),
// dropout from a counter-based hash (so the backward redraws the forward's mask instead of storing
// it), an embedding gather with an atomic scatter-add backward, the swap of attention's head and
// sequence dimensions (a copy in units of up to 16 bytes), and the optimizer's fused AdamW halves
// and gradient sums of squares.
//
// The templated kernels read and write contiguous row-major buffers of `float` or `__nv_bfloat16`
// and compute in f32; their names end in _f32 or _bf16. The optimizer's are f32 only.

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Elementwise kernels move 16 bytes per access (8 bf16 or 4 f32) where every pointer they touch is
// 16-byte aligned (a fresh allocation is; a view at an odd offset may not be), and one element per
// access otherwise and for the tail. f(i, ...) computes element i in f32; the index is the
// element's, whichever path runs, so results do not depend on alignment.
template <typename T> struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

__device__ __forceinline__ bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// V consecutive elements moved as one access (V * sizeof(T) of 4, 8 or 16 bytes): the row kernels'
// unit where a lane holds a run of its row rather than every 32nd element.
template <typename T, int V> struct alignas(V * sizeof(T)) Chunk {
  T v[V];
};

// Whether every pointer is aligned to `bytes`, a power of two (null ones are). A mask, not `%`: a
// 64-bit remainder by a value the compiler cannot see is a long division per pointer, which run 3
// of session 12 measured doubling the softmax kernels' time (rows of 128 are little work a lane).
template <typename... P> __device__ __forceinline__ bool all_aligned(int bytes, const P *...p) {
  return ((((uintptr_t)p) | ...) & (uintptr_t)(bytes - 1)) == 0;
}

// y[i] = f(i, x[i]) for i < n.
template <typename T, typename F>
__device__ void map1(const T *x, T *y, size_t n, F f) {
  constexpr int P = 16 / sizeof(T);
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  size_t done = 0;
  if (aligned16(x) && aligned16(y)) {
    const Pack<T> *xp = reinterpret_cast<const Pack<T> *>(x);
    Pack<T> *yp = reinterpret_cast<Pack<T> *>(y);
    done = n / P * P;
    for (size_t q = first; q < n / P; q += stride) {
      const Pack<T> a = xp[q];
      Pack<T> r;
#pragma unroll
      for (int k = 0; k < P; k++) r.v[k] = from_f<T>(f(q * P + k, to_f(a.v[k])));
      yp[q] = r;
    }
  }
  for (size_t i = done + first; i < n; i += stride) y[i] = from_f<T>(f(i, to_f(x[i])));
}

// z[i] = f(i, x[i], y[i]) for i < n.
template <typename T, typename F>
__device__ void map2(const T *x, const T *y, T *z, size_t n, F f) {
  constexpr int P = 16 / sizeof(T);
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  size_t done = 0;
  if (aligned16(x) && aligned16(y) && aligned16(z)) {
    const Pack<T> *xp = reinterpret_cast<const Pack<T> *>(x);
    const Pack<T> *yp = reinterpret_cast<const Pack<T> *>(y);
    Pack<T> *zp = reinterpret_cast<Pack<T> *>(z);
    done = n / P * P;
    for (size_t q = first; q < n / P; q += stride) {
      const Pack<T> a = xp[q], b = yp[q];
      Pack<T> r;
#pragma unroll
      for (int k = 0; k < P; k++) r.v[k] = from_f<T>(f(q * P + k, to_f(a.v[k]), to_f(b.v[k])));
      zp[q] = r;
    }
  }
  for (size_t i = done + first; i < n; i += stride) z[i] = from_f<T>(f(i, to_f(x[i]), to_f(y[i])));
}

// The sum of `v` over a one-dimensional block (blockDim.x a multiple of 32, at most 1024), returned
// to every thread. `sh` holds 32 floats.
__device__ float block_sum(float v, float *sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  float t = lane < warps ? sh[lane] : 0.f;
  t = warp_sum(t);
  return t;
}

// ---- dropout masks ---------------------------------------------------------------------------
// Element i is kept when the top 24 bits of a hash of (seed, i) reach threshold (= ceil(p * 2^24));
// kept elements are scaled by 1 / (1 - p). The mask is a pure function of (seed, i), so a backward
// applies it again from the seed instead of storing it. The hash is two rounds of a 32-bit
// multiply-xorshift finaliser (constants from Wellons' "lowbias32"): the low words of i and the
// seed, then their high words. Session 12 measured it on an H200 against splitmix64 (three 64-bit
// products): dropout over [rows, 4h] went from 0.68 to 0.73 of a plain copy's bandwidth, the
// softmax backward that draws it from 0.81 to 0.90 (benches/cuda/kernel_bench.cu).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Whether dropout with this seed and threshold keeps element i.
__device__ __forceinline__ bool kept(uint64_t seed, size_t i, uint32_t threshold) {
  uint32_t h = mix32((uint32_t)i ^ (uint32_t)seed);
  h = mix32(h ^ (uint32_t)(seed >> 32) ^ ((uint32_t)((uint64_t)i >> 32) * 0x9E3779B9u));
  return (h >> 8) >= threshold;
}

// ---- layer norm -----------------------------------------------------------------------------
// The mean and 1/sqrt(var + eps) of one row, over a one-dimensional block: the mean, then the
// centred variance (two passes, as the composed ops and transformers compute it). The forward and
// the dx kernel compute them per row (cheaper than storing them: a row is in cache by the second
// pass); the dw/db kernel reads them from layer_norm_stats.
template <typename T>
__device__ void row_stats(const T *xr, int n, float eps, float *sh, float *mean, float *rstd) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += to_f(xr[i]);
  const float m = block_sum(s, sh) / n;
  float v = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = to_f(xr[i]) - m;
    v += d * d;
  }
  *mean = m;
  *rstd = rsqrtf(block_sum(v, sh) / n + eps);
}

// One block per row: y = (x - mean) * rstd * w + b.
template <typename T>
__device__ void layer_norm_fwd(const T *x, const T *w, const T *b, T *y, int n, float eps) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T *xr = x + row * n;
  T *yr = y + row * n;
  float mean, rstd;
  row_stats(xr, n, eps, sh, &mean, &rstd);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    yr[i] = from_f<T>((to_f(xr[i]) - mean) * rstd * to_f(w[i]) + to_f(b[i]));
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; one block per row.
template <typename T, bool DROP>
__device__ void layer_norm_bwd_dx(const T *x, const T *w, const T *dy, T *dx, int n, float eps,
                                  T *dh, uint64_t seed, uint32_t threshold, float drop_scale) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T *xr = x + row * n;
  const T *gr = dy + row * n;
  T *dxr = dx + row * n;
  float mean, rstd;
  row_stats(xr, n, eps, sh, &mean, &rstd);
  float a = 0.f, c = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float gw = to_f(gr[i]) * to_f(w[i]);
    a += gw;
    c += gw * (to_f(xr[i]) - mean) * rstd;
  }
  a = block_sum(a, sh) / n;
  c = block_sum(c, sh) / n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float xh = (to_f(xr[i]) - mean) * rstd;
    const T d = from_f<T>(rstd * (to_f(gr[i]) * to_f(w[i]) - a - xh * c));
    dxr[i] = d;
    // With DROP, also dx through the dropout before the residual add (element row * n + i of
    // the whole tensor): the gradient of the dropped-out branch, in the same pass.
    if constexpr (DROP)
      dh[row * n + i] = from_f<T>(kept(seed, row * n + i, threshold) ? to_f(d) * drop_scale : 0.f);
  }
}
// ---- layer norm, one warp per row (rows of at most LN_WARP_MAX_N) -------------------------------
// The same arithmetic as the block-per-row kernels above, for the rows of encoders (384 to 1024):
// a warp holds its row in registers (element k * 32 + lane in slot k), reads it from memory once
// and reduces with shuffles, without a block-wide barrier. blockDim (32, k), a row per warp.
// Each kernel body is instantiated for 8, 16, 24 and 32 slots per lane, and a launch runs the
// fewest that hold its rows.
constexpr int LN_WARP_MAX_N = 1024;

// Loads row xr into v (zeros past n) and returns its mean and rstd.
template <int LN_WARP_SLOTS, typename T>
__device__ __forceinline__ void warp_row_stats(const T *xr, int n, float eps,
                                               float (&v)[LN_WARP_SLOTS], float *mean,
                                               float *rstd) {
  const int lane = threadIdx.x;
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < LN_WARP_SLOTS; k++) {
    const int i = k * 32 + lane;
    v[k] = i < n ? to_f(xr[i]) : 0.f;
    s += v[k];
  }
  const float m = warp_sum(s) / n;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < LN_WARP_SLOTS; k++) {
    const float d = k * 32 + lane < n ? v[k] - m : 0.f;
    q += d * d;
  }
  *mean = m;
  *rstd = rsqrtf(warp_sum(q) / n + eps);
}

template <int LN_WARP_SLOTS, typename T>
__device__ void layer_norm_fwd_warp_n(const T *x, const T *w, const T *b, T *y, size_t rows, int n,
                                      float eps) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  float v[LN_WARP_SLOTS], mean, rstd;
  warp_row_stats(x + row * n, n, eps, v, &mean, &rstd);
  T *yr = y + row * n;
#pragma unroll
  for (int k = 0; k < LN_WARP_SLOTS; k++) {
    const int i = k * 32 + threadIdx.x;
    if (i < n) yr[i] = from_f<T>((v[k] - mean) * rstd * to_f(w[i]) + to_f(b[i]));
  }
}

// Rows of n = 32 * P * SL (P = 16 / sizeof(T), the elements of a 16-byte pack), one warp a row:
// lane l holds packs l, l + 32, ... and moves each with one access (the per-element kernels above
// move 2 or 4 bytes an access, which session 12 measured at 0.32 of a copy's bandwidth on an H200
// for [16384, 768] bf16, against 0.85 to 0.9 with packs: benches/cuda/kernel_bench.cu). The same
// statistics in another order of summation.
// The row's mean and 1/sqrt(var + eps) from the values a lane holds (as ln_vec_load leaves them).
template <int SL, int P>
__device__ __forceinline__ void ln_vec_stats(const float (&v)[SL][P], int n, float eps, float *mean,
                                             float *rstd) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < SL; k++)
#pragma unroll
    for (int j = 0; j < P; j++) s += v[k][j];
  const float m = warp_sum(s) / n;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < SL; k++)
#pragma unroll
    for (int j = 0; j < P; j++) {
      const float d = v[k][j] - m;
      q += d * d;
    }
  *mean = m;
  *rstd = rsqrtf(warp_sum(q) / n + eps);
}

template <int SL, typename T>
__device__ __forceinline__ void ln_vec_load(const T *xr, int n, float eps, float (&v)[SL][16 / sizeof(T)],
                                            float *mean, float *rstd) {
  constexpr int P = 16 / sizeof(T);
  const Pack<T> *xp = reinterpret_cast<const Pack<T> *>(xr);
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const Pack<T> a = xp[k * 32 + threadIdx.x];
#pragma unroll
    for (int j = 0; j < P; j++) v[k][j] = to_f(a.v[j]);
  }
  ln_vec_stats<SL, P>(v, n, eps, mean, rstd);
}

// y = gamma * xhat + beta from the lane's values and the row's statistics, into row yr.
template <int SL, typename T>
__device__ __forceinline__ void ln_vec_store(const float (&v)[SL][16 / sizeof(T)], float mean,
                                             float rstd, const T *w, const T *b, T *yr) {
  constexpr int P = 16 / sizeof(T);
  const Pack<T> *wp = reinterpret_cast<const Pack<T> *>(w);
  const Pack<T> *bp = reinterpret_cast<const Pack<T> *>(b);
  Pack<T> *yp = reinterpret_cast<Pack<T> *>(yr);
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const int c = k * 32 + threadIdx.x;
    const Pack<T> wv = wp[c], bv = bp[c];
    Pack<T> o;
#pragma unroll
    for (int j = 0; j < P; j++)
      o.v[j] = from_f<T>((v[k][j] - mean) * rstd * to_f(wv.v[j]) + to_f(bv.v[j]));
    yp[c] = o;
  }
}

template <int SL, typename T>
__device__ void layer_norm_fwd_vec_n(const T *x, const T *w, const T *b, T *y, size_t rows, int n,
                                     float eps) {
  constexpr int P = 16 / sizeof(T);
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  float v[SL][P], mean, rstd;
  ln_vec_load<SL>(x + row * n, n, eps, v, &mean, &rstd);
  ln_vec_store<SL>(v, mean, rstd, w, b, y + row * n);
}

// A block's tail in one pass: s = drop(h) + r (dropout_add, element i of the flat [rows, n] kept
// by the same hash) and y = LN(s) from s as rounded to T (layer_norm_fwd_vec's statistics in its
// order), both written: the same bits as the two kernels, one read of s fewer.
template <int SL, typename T>
__device__ void dropout_add_ln_fwd_vec_n(const T *h, const T *r, const T *w, const T *b, T *s, T *y,
                                         size_t rows, int n, float eps, uint64_t seed,
                                         uint32_t threshold, float scale) {
  constexpr int P = 16 / sizeof(T);
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const Pack<T> *hp = reinterpret_cast<const Pack<T> *>(h + row * n);
  const Pack<T> *rp = reinterpret_cast<const Pack<T> *>(r + row * n);
  Pack<T> *sp = reinterpret_cast<Pack<T> *>(s + row * n);
  float v[SL][P], mean, rstd;
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const int c = k * 32 + threadIdx.x;
    const Pack<T> hv = hp[c], rv = rp[c];
    Pack<T> o;
#pragma unroll
    for (int j = 0; j < P; j++) {
      const size_t i = row * n + (size_t)c * P + j;
      o.v[j] = from_f<T>((kept(seed, i, threshold) ? to_f(hv.v[j]) * scale : 0.f) + to_f(rv.v[j]));
      v[k][j] = to_f(o.v[j]);
    }
    sp[c] = o;
  }
  ln_vec_stats<SL, P>(v, n, eps, &mean, &rstd);
  ln_vec_store<SL>(v, mean, rstd, w, b, y + row * n);
}

// Packs a lane holds in the 16-byte row kernels for rows of n (0: the row does not fit them): n a
// multiple of 32 packs, at most 32 elements a lane (the registers of the per-element kernels).
template <typename T> __device__ __forceinline__ int ln_vec_slots(int n) {
  constexpr int P = 16 / sizeof(T);
  return n % (32 * P) == 0 && n / 32 <= 32 ? n / (32 * P) : 0;
}

#define LN_VEC_DISPATCH(T, n, CALL)                                                              \
  switch (ln_vec_slots<T>(n)) {                                                                  \
  case 1: CALL(1); return;                                                                       \
  case 2: CALL(2); return;                                                                       \
  case 3: CALL(3); return;                                                                       \
  case 4: CALL(4); return;                                                                       \
  case 6: if constexpr (sizeof(T) == 4) { CALL(6); return; } break;                              \
  case 8: if constexpr (sizeof(T) == 4) { CALL(8); return; } break;                              \
  default: break;                                                                                \
  }

// The packed forward, a kernel of its own (inside layer_norm_fwd_warp it would get that kernel's
// registers: 82 a thread, a quarter of an SM's threads); the host launches it for rows that
// ln_vec_slots takes with every pointer 16-byte aligned.
template <typename T>
__device__ void layer_norm_fwd_vec(const T *x, const T *w, const T *b, T *y, size_t rows, int n,
                                   float eps) {
#define LN_FWD_VEC(SL) layer_norm_fwd_vec_n<SL>(x, w, b, y, rows, n, eps)
  LN_VEC_DISPATCH(T, n, LN_FWD_VEC)
#undef LN_FWD_VEC
  __trap();
}

// The host launches it where layer_norm_fwd_vec would take the rows (ln_vec_slots, every pointer
// 16-byte aligned); no dropout is threshold 0 and scale 1.
template <typename T>
__device__ void dropout_add_ln_fwd_vec(const T *h, const T *r, const T *w, const T *b, T *s, T *y,
                                       size_t rows, int n, float eps, uint64_t seed,
                                       uint32_t threshold, float scale) {
#define ADD_LN_VEC(SL) dropout_add_ln_fwd_vec_n<SL>(h, r, w, b, s, y, rows, n, eps, seed, threshold, scale)
  LN_VEC_DISPATCH(T, n, ADD_LN_VEC)
#undef ADD_LN_VEC
  __trap();
}

template <typename T>
__device__ void layer_norm_fwd_warp(const T *x, const T *w, const T *b, T *y, size_t rows, int n,
                                    float eps) {
  if (n <= 256) layer_norm_fwd_warp_n<8>(x, w, b, y, rows, n, eps);
  else if (n <= 512) layer_norm_fwd_warp_n<16>(x, w, b, y, rows, n, eps);
  else if (n <= 768) layer_norm_fwd_warp_n<24>(x, w, b, y, rows, n, eps);
  else layer_norm_fwd_warp_n<32>(x, w, b, y, rows, n, eps);
}

// Writes row `row` of dx = rstd (g - a - xhat c) from this lane's slots (xhat in v, g(k) the
// slot's dy * w; a and c the row's means of g and g * xhat), and with DROP dh = dx through the
// dropout mask, for the warp-per-row kernels.
template <int SLOTS, bool DROP, typename T, typename G>
__device__ __forceinline__ void ln_dx_row_out(const float (&v)[SLOTS], G g, float a, float c,
                                              float rstd, T *dx, T *dh, size_t row, int n,
                                              uint64_t seed, uint32_t threshold,
                                              float drop_scale) {
  T *dxr = dx + row * n;
#pragma unroll
  for (int k = 0; k < SLOTS; k++) {
    const int i = k * 32 + threadIdx.x;
    if (i < n) {
      const T d = from_f<T>(rstd * (g(k) - a - v[k] * c));
      dxr[i] = d;
      if constexpr (DROP)
        dh[row * n + i] =
            from_f<T>(kept(seed, row * n + i, threshold) ? to_f(d) * drop_scale : 0.f);
    }
  }
}

// layer_norm_bwd_dx (with DROP, also dh) for one row per warp.
template <int LN_WARP_SLOTS, bool DROP, typename T>
__device__ void layer_norm_bwd_dx_warp_n(const T *x, const T *w, const T *dy, T *dx, size_t rows,
                                         int n, float eps, T *dh, uint64_t seed,
                                         uint32_t threshold, float drop_scale) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  float v[LN_WARP_SLOTS], g[LN_WARP_SLOTS], mean, rstd;
  warp_row_stats(x + row * n, n, eps, v, &mean, &rstd);
  const T *gr = dy + row * n;
  float a = 0.f, c = 0.f;
#pragma unroll
  for (int k = 0; k < LN_WARP_SLOTS; k++) {
    const int i = k * 32 + lane;
    g[k] = i < n ? to_f(gr[i]) * to_f(w[i]) : 0.f;
    v[k] = (v[k] - mean) * rstd;  // now xhat
    a += g[k];
    c += g[k] * v[k];
  }
  a = warp_sum(a) / n;
  c = warp_sum(c) / n;
  ln_dx_row_out<LN_WARP_SLOTS, DROP>(v, [&](int k) { return g[k]; }, a, c, rstd, dx, dh, row, n,
                                     seed, threshold, drop_scale);
}

// The mean and 1/sqrt(var + eps) of each row of x [rows, n], one warp per row (blockDim (32, k)),
// into stats [rows, 2] (f32): what the weight and bias gradients need of each row, computed once
// instead of by a whole block per row inside their kernel.
template <typename T>
__device__ void layer_norm_stats(const T *x, float *stats, size_t rows, int n, float eps) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const T *xr = x + row * n;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += 32) s += to_f(xr[i]);
  const float m = warp_sum(s) / n;
  float v = 0.f;
  for (int i = threadIdx.x; i < n; i += 32) {
    const float d = to_f(xr[i]) - m;
    v += d * d;
  }
  v = warp_sum(v) / n;
  if (threadIdx.x == 0) {
    stats[2 * row] = m;
    stats[2 * row + 1] = rsqrtf(v + eps);
  }
}

// Columns one thread keeps partial sums for: n <= LN_MAX_PER_THREAD * blockDim.x.
#define LN_MAX_PER_THREAD 16

// dw = sum over rows of dy * xhat and db = sum over rows of dy, into dwdb ([2, n], f32, zeroed by
// the caller), with each row's mean and rstd from stats (layer_norm_stats). Each block walks rows
// blockIdx.x, blockIdx.x + gridDim.x, ... keeping its columns' partial sums in registers, and adds
// them in once at the end.
template <typename T>
__device__ void layer_norm_bwd_dwdb(const T *x, const T *dy, const float *stats, float *dwdb,
                                    size_t rows, int n) {
  float dw[LN_MAX_PER_THREAD], db[LN_MAX_PER_THREAD];
#pragma unroll
  for (int k = 0; k < LN_MAX_PER_THREAD; k++) dw[k] = db[k] = 0.f;
  for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T *xr = x + row * n;
    const T *gr = dy + row * n;
    const float mean = stats[2 * row], rstd = stats[2 * row + 1];
#pragma unroll
    for (int k = 0; k < LN_MAX_PER_THREAD; k++) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < n) {
        const float g = to_f(gr[i]);
        dw[k] += g * (to_f(xr[i]) - mean) * rstd;
        db[k] += g;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < LN_MAX_PER_THREAD; k++) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n) {
      atomicAdd(dwdb + i, dw[k]);
      atomicAdd(dwdb + n + i, db[k]);
    }
  }
}

template <typename T, bool DROP>
__device__ void layer_norm_bwd_dx_warp(const T *x, const T *w, const T *dy, T *dx, size_t rows,
                                       int n, float eps, T *dh, uint64_t seed, uint32_t threshold,
                                       float drop_scale) {
  if (n <= 256)
    layer_norm_bwd_dx_warp_n<8, DROP>(x, w, dy, dx, rows, n, eps, dh, seed, threshold, drop_scale);
  else if (n <= 512)
    layer_norm_bwd_dx_warp_n<16, DROP>(x, w, dy, dx, rows, n, eps, dh, seed, threshold, drop_scale);
  else if (n <= 768)
    layer_norm_bwd_dx_warp_n<24, DROP>(x, w, dy, dx, rows, n, eps, dh, seed, threshold, drop_scale);
  else
    layer_norm_bwd_dx_warp_n<32, DROP>(x, w, dy, dx, rows, n, eps, dh, seed, threshold, drop_scale);
}

// ---- layer norm's backward in one pass ---------------------------------------------------------
// dx (and, given dh, the branch's gradient through dropout, as layer_norm_bwd_dx_warp writes
// them, bit for bit) and the weight and bias gradients from one read of x and dy, for rows of up
// to LN_FUSED_MAX_N. Warp w of the grid (blockDim (32, LN_FUSED_WARPS)) takes rows w, w + warps,
// ... and sums dy * xhat and dy over them in registers (a lane's slots are the same columns in
// every row); the block's warps are added in a fixed order into partial[blockIdx.x] ([2, n] f32:
// dw, then db), and layer_norm_dwdb_sum adds the blocks in a fixed order. Against the three-kernel
// path (row statistics, dx, dw/db with an atomic per column and block) this reads x once instead
// of three times and dy once instead of twice, and the same inputs give the same sums every run.
constexpr int LN_FUSED_WARPS = 8;
// The longest row it takes: 24 slots a lane for x and 48 for the sums fit the 128 registers of
// two blocks an SM (ptxas, sm_90); 32 slots would spill. Longer rows take the three kernels.
constexpr int LN_FUSED_MAX_N = 768;

template <int SLOTS, bool DROP, typename T>
__device__ void layer_norm_bwd_fused_n(const T *x, const T *w, const T *dy, T *dx, T *dh,
                                       float *partial, size_t rows, int n, float eps,
                                       uint64_t seed, uint32_t threshold, float drop_scale,
                                       float (*s_part)[LN_FUSED_MAX_N]) {
  const int lane = threadIdx.x, wy = threadIdx.y;
  float dw[SLOTS], db[SLOTS];
#pragma unroll
  for (int k = 0; k < SLOTS; k++) dw[k] = db[k] = 0.f;
  const size_t warps = (size_t)gridDim.x * blockDim.y;
  for (size_t row = (size_t)blockIdx.x * blockDim.y + wy; row < rows; row += warps) {
    float v[SLOTS], mean, rstd;
    warp_row_stats(x + row * n, n, eps, v, &mean, &rstd);
    const T *gr = dy + row * n;
    // dy * w, read again (from cache) where dx needs it rather than held: registers go to the
    // sums.
    auto g = [&](int i) { return i < n ? to_f(gr[i]) * to_f(w[i]) : 0.f; };
    float a = 0.f, c = 0.f;
#pragma unroll
    for (int k = 0; k < SLOTS; k++) {
      const int i = k * 32 + lane;
      const float gy = i < n ? to_f(gr[i]) : 0.f;
      v[k] = (v[k] - mean) * rstd;  // now xhat
      dw[k] += gy * v[k];
      db[k] += gy;
      a += g(i);
      c += g(i) * v[k];
    }
    a = warp_sum(a) / n;
    c = warp_sum(c) / n;
    ln_dx_row_out<SLOTS, DROP>(v, [&](int k) { return g(k * 32 + lane); }, a, c, rstd, dx, dh, row,
                               n, seed, threshold, drop_scale);
  }
  for (int half = 0; half < 2; half++) {
#pragma unroll
    for (int k = 0; k < SLOTS; k++) {
      const int i = k * 32 + lane;
      if (i < n) s_part[wy][i] = half == 0 ? dw[k] : db[k];
    }
    __syncthreads();
    for (int i = wy * 32 + lane; i < n; i += 32 * LN_FUSED_WARPS) {
      float t = 0.f;
      for (int j = 0; j < LN_FUSED_WARPS; j++) t += s_part[j][i];
      partial[((size_t)blockIdx.x * 2 + half) * n + i] = t;
    }
    __syncthreads();
  }
}

// With dh null, no dropout output.
template <typename T>
__device__ void layer_norm_bwd_fused(const T *x, const T *w, const T *dy, T *dx, T *dh,
                                     float *partial, size_t rows, int n, float eps, uint64_t seed,
                                     uint32_t threshold, float drop_scale) {
  __shared__ float s_part[LN_FUSED_WARPS][LN_FUSED_MAX_N];
#define LN_FUSED(SLOTS)                                                                          \
  (dh ? layer_norm_bwd_fused_n<SLOTS, true>(x, w, dy, dx, dh, partial, rows, n, eps, seed,       \
                                            threshold, drop_scale, s_part)                       \
      : layer_norm_bwd_fused_n<SLOTS, false>(x, w, dy, dx, dh, partial, rows, n, eps, seed,      \
                                             threshold, drop_scale, s_part))
  if (n <= 256) LN_FUSED(8);
  else if (n <= 512) LN_FUSED(16);
  else if (n <= LN_FUSED_MAX_N) LN_FUSED(24);
  else __trap();
#undef LN_FUSED
}

// dwdb[c] = the sum over b < blocks, in order, of partial[b, c] for c < n2 (= 2n): the blocks'
// sums of layer_norm_bwd_fused. Block (32, 8) takes 32 columns; warp y adds blocks y, y + 8, ...,
// then the eight are added in order.
extern "C" __global__ void layer_norm_dwdb_sum(const float *partial, float *dwdb, int blocks,
                                               int n2) {
  __shared__ float s[8][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float t = 0.f;
  if (c < n2)
    for (int b = threadIdx.y; b < blocks; b += 8) t += partial[(size_t)b * n2 + c];
  s[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && c < n2) {
    float u = 0.f;
    for (int j = 0; j < 8; j++) u += s[j][threadIdx.x];
    dwdb[c] = u;
  }
}

// ---- layer norm's backward with 16-byte packs --------------------------------------------------
// Two kernels for rows that fit the packed row kernels (ln_vec_slots): layer_norm_bwd_vec, one warp
// a row at full occupancy, writes dx (and dh, through the branch's dropout, as the kernels above)
// and the row's mean and rstd; layer_norm_dwdb_cols then sums dy * xhat and dy down the columns in
// chunks of rows, and layer_norm_dwdb_sum adds the chunks in order. Session 12 measured the one-pass
// kernel (several rows a warp, two blocks an SM, element-wise accesses) at 0.30 of a copy's
// bandwidth on an H200 at [16384, 768] bf16, and the packed dx kernel at 0.85.
template <int SL, bool DROP, typename T>
__device__ void layer_norm_bwd_vec_n(const T *x, const T *w, const T *dy, T *dx, T *dh,
                                     float *stats, size_t rows, int n, float eps, uint64_t seed,
                                     uint32_t threshold, float drop_scale) {
  constexpr int P = 16 / sizeof(T);
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  float v[SL][P], mean, rstd;
  ln_vec_load<SL>(x + row * n, n, eps, v, &mean, &rstd);
  const Pack<T> *gp = reinterpret_cast<const Pack<T> *>(dy + row * n);
  const Pack<T> *wp = reinterpret_cast<const Pack<T> *>(w);
  // g = dy * w is formed twice, from packs read again (from cache) where dx needs it, rather than
  // held: 24 more registers a lane would cost a third of the SM's threads.
  float a = 0.f, c = 0.f;
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const Pack<T> gy = gp[k * 32 + lane], wv = wp[k * 32 + lane];
#pragma unroll
    for (int j = 0; j < P; j++) {
      const float g = to_f(gy.v[j]) * to_f(wv.v[j]);
      v[k][j] = (v[k][j] - mean) * rstd;  // now xhat
      a += g;
      c += g * v[k][j];
    }
  }
  a = warp_sum(a) / n;
  c = warp_sum(c) / n;
  Pack<T> *dxp = reinterpret_cast<Pack<T> *>(dx + row * n);
#pragma unroll
  for (int k = 0; k < SL; k++) {
    const int col = k * 32 + lane;
    const Pack<T> gy = gp[col], wv = wp[col];
    Pack<T> o;
#pragma unroll
    for (int j = 0; j < P; j++)
      o.v[j] = from_f<T>(rstd * (to_f(gy.v[j]) * to_f(wv.v[j]) - a - v[k][j] * c));
    dxp[col] = o;
    if constexpr (DROP) {
      Pack<T> h;
#pragma unroll
      for (int j = 0; j < P; j++) {
        const size_t i = row * n + (size_t)col * P + j;
        h.v[j] = from_f<T>(kept(seed, i, threshold) ? to_f(o.v[j]) * drop_scale : 0.f);
      }
      reinterpret_cast<Pack<T> *>(dh + row * n)[col] = h;
    }
  }
  if (lane == 0) {
    stats[2 * row] = mean;
    stats[2 * row + 1] = rstd;
  }
}

// With dh null, no dropout output. Rows that do not fit the packs stop the kernel (the host checks
// ln_vec_slots' rule first).
template <typename T>
__device__ void layer_norm_bwd_vec(const T *x, const T *w, const T *dy, T *dx, T *dh, float *stats,
                                   size_t rows, int n, float eps, uint64_t seed,
                                   uint32_t threshold, float drop_scale) {
#define LN_BWD_VEC(SL)                                                                           \
  (dh ? layer_norm_bwd_vec_n<SL, true>(x, w, dy, dx, dh, stats, rows, n, eps, seed, threshold,    \
                                       drop_scale)                                               \
      : layer_norm_bwd_vec_n<SL, false>(x, w, dy, dx, dh, stats, rows, n, eps, seed, threshold,   \
                                        drop_scale))
  LN_VEC_DISPATCH(T, n, LN_BWD_VEC)
#undef LN_BWD_VEC
  __trap();
}

// dw and db of one chunk of rows: thread (x, y) of a (32, 8) block sums the columns of pack
// blockIdx.x * 32 + x over rows y, y + 8, ... of chunk blockIdx.y (with each row's mean and rstd
// from stats); the block's eight row groups are added in order in shared memory, into
// partial[blockIdx.y] ([2, n] f32: dw, then db), which layer_norm_dwdb_sum adds up.
template <typename T>
__device__ void layer_norm_dwdb_cols(const T *x, const T *dy, const float *stats, float *partial,
                                     size_t rows, int n, int chunk) {
  constexpr int P = 16 / sizeof(T);
  __shared__ float sh[2][8][32 * P];
  const int packs = n / P;
  const int c = blockIdx.x * 32 + threadIdx.x;
  float dw[P], db[P];
#pragma unroll
  for (int j = 0; j < P; j++) dw[j] = db[j] = 0.f;
  const size_t r0 = (size_t)blockIdx.y * chunk;
  const size_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  if (c < packs) {
    const Pack<T> *xp = reinterpret_cast<const Pack<T> *>(x);
    const Pack<T> *gp = reinterpret_cast<const Pack<T> *>(dy);
    for (size_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const float mean = stats[2 * r], rstd = stats[2 * r + 1];
      const Pack<T> a = xp[r * packs + c], g = gp[r * packs + c];
#pragma unroll
      for (int j = 0; j < P; j++) {
        const float gy = to_f(g.v[j]);
        dw[j] += gy * ((to_f(a.v[j]) - mean) * rstd);
        db[j] += gy;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < P; j++) {
    sh[0][threadIdx.y][threadIdx.x * P + j] = dw[j];
    sh[1][threadIdx.y][threadIdx.x * P + j] = db[j];
  }
  __syncthreads();
  for (int t = threadIdx.y * 32 + threadIdx.x; t < 2 * 32 * P; t += 256) {
    const int half = t / (32 * P), col = t % (32 * P);
    const int gc = blockIdx.x * 32 * P + col;
    if (gc < n) {
      float sum = 0.f;
      for (int j = 0; j < 8; j++) sum += sh[half][j][col];
      partial[((size_t)blockIdx.y * 2 + half) * n + gc] = sum;
    }
  }
}

// ---- scaled masked softmax ------------------------------------------------------------------
// One warp per row of scores [rows, k]; row r belongs to batch element r / rows_per_batch, whose
// additive mask is bias[batch, :]. p = softmax(scale * s + bias) in f32.
// With DROP, also dropped = p through the dropout mask (see "dropout masks"; element i of the
// whole tensor), written in the same pass instead of a second one over p.
// Rows of up to SOFTMAX_REG_MAX_K scores are held in registers (SLOTS per lane, the fewest that
// hold the row: element j * 32 + lane in slot j), read once and exponentiated once; longer rows are
// read three times.
constexpr int SOFTMAX_REG_MAX_K = 512;

template <typename T, bool DROP, int SLOTS>
__device__ __forceinline__ void softmax_row_regs(const T *sr, const T *br, T *pr, T *dropped,
                                                 size_t row, int k, float scale, uint64_t seed,
                                                 uint32_t threshold, float drop_scale) {
  const int lane = threadIdx.x;
  float v[SLOTS];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < SLOTS; j++) {
    const int i = j * 32 + lane;
    v[j] = i < k ? to_f(sr[i]) * scale + to_f(br[i]) : -INFINITY;
    m = fmaxf(m, v[j]);
  }
  m = warp_max(m);
  float z = 0.f;
#pragma unroll
  for (int j = 0; j < SLOTS; j++) {
    if (j * 32 + lane < k) {
      v[j] = expf(v[j] - m);
      z += v[j];
    }
  }
  const float inv = 1.f / warp_sum(z);
#pragma unroll
  for (int j = 0; j < SLOTS; j++) {
    const int i = j * 32 + lane;
    if (i < k) {
      const T out = from_f<T>(v[j] * inv);
      pr[i] = out;
      if constexpr (DROP)
        dropped[row * k + i] =
            from_f<T>(kept(seed, row * k + i, threshold) ? to_f(out) * drop_scale : 0.f);
    }
  }
}

// Rows of k = 32 * V (V * sizeof(T) of 4, 8 or 16 bytes: k 64, 128, 256 in bf16, 64 and 128 in f32)
// where every pointer is aligned to that: lane l holds elements [V l, V l + V) and moves them with
// one access per tensor, and the mask is drawn once per element. Session 12 measured the
// element-wise kernels at [128 * 12 * 128, 128] bf16 on an H200 at 0.39 (forward with dropout) and
// 0.36 (backward) of a copy's bandwidth, and these at 0.61 and 0.90
// (benches/cuda/kernel_bench.cu).
template <typename T, bool DROP, int V>
__device__ __forceinline__ void softmax_row_vec(const T *sr, const T *br, T *pr, T *dropped,
                                                size_t row, float scale, uint64_t seed,
                                                uint32_t threshold, float drop_scale) {
  using C = Chunk<T, V>;
  constexpr int k = 32 * V;
  const int lane = threadIdx.x;
  const C sv = reinterpret_cast<const C *>(sr)[lane], bv = reinterpret_cast<const C *>(br)[lane];
  float v[V];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < V; j++) {
    v[j] = to_f(sv.v[j]) * scale + to_f(bv.v[j]);
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
  C out;
#pragma unroll
  for (int j = 0; j < V; j++) out.v[j] = from_f<T>(v[j] * inv);
  reinterpret_cast<C *>(pr)[lane] = out;
  if constexpr (DROP) {
    C d;
#pragma unroll
    for (int j = 0; j < V; j++) {
      const size_t i = row * k + (size_t)V * lane + j;
      d.v[j] = from_f<T>(kept(seed, i, threshold) ? to_f(out.v[j]) * drop_scale : 0.f);
    }
    reinterpret_cast<C *>(dropped + row * k)[lane] = d;
  }
}

// The V (elements a lane) of the vectorised softmax rows for k, or 0 where k is none of them.
template <typename T> __device__ __forceinline__ int softmax_vec_width(int k) {
  const int v = k / 32;
  return k % 32 == 0 && (v == 2 || v == 4 || v == 8) && v * (int)sizeof(T) <= 16 ? v : 0;
}

template <typename T, bool DROP>
__device__ void softmax_fwd(const T *s, const T *bias, T *p, T *dropped, size_t rows, int k,
                            size_t rows_per_batch, float scale, uint64_t seed, uint32_t threshold,
                            float drop_scale) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T *sr = s + row * k;
  // The batch element: a 32-bit division where both fit (a 64-bit one is a long software routine).
  const size_t be = (row | rows_per_batch) >> 32 == 0 ? (uint32_t)row / (uint32_t)rows_per_batch
                                                        : row / rows_per_batch;
  const T *br = bias + be * k;
  T *pr = p + row * k;
  // Rows of up to SOFTMAX_REG_MAX_K in registers, as many slots as the row needs.
  if (k <= 32) return softmax_row_regs<T, DROP, 1>(sr, br, pr, dropped, row, k, scale, seed, threshold, drop_scale);
  if (k <= 64) return softmax_row_regs<T, DROP, 2>(sr, br, pr, dropped, row, k, scale, seed, threshold, drop_scale);
  if (k <= 128) return softmax_row_regs<T, DROP, 4>(sr, br, pr, dropped, row, k, scale, seed, threshold, drop_scale);
  if (k <= 256) return softmax_row_regs<T, DROP, 8>(sr, br, pr, dropped, row, k, scale, seed, threshold, drop_scale);
  if (k <= SOFTMAX_REG_MAX_K)
    return softmax_row_regs<T, DROP, 16>(sr, br, pr, dropped, row, k, scale, seed, threshold, drop_scale);
  float m = -INFINITY;
  for (int i = lane; i < k; i += 32) m = fmaxf(m, to_f(sr[i]) * scale + to_f(br[i]));
  m = warp_max(m);
  float z = 0.f;
  for (int i = lane; i < k; i += 32) z += expf(to_f(sr[i]) * scale + to_f(br[i]) - m);
  const float inv = 1.f / warp_sum(z);
  for (int i = lane; i < k; i += 32) {
    const T v = from_f<T>(expf(to_f(sr[i]) * scale + to_f(br[i]) - m) * inv);
    pr[i] = v;
    // From the rounded value, as dropout applied to p afterwards would compute it.
    if constexpr (DROP) dropped[row * k + i] = from_f<T>(kept(seed, row * k + i, threshold) ? to_f(v) * drop_scale : 0.f);
  }
}

// ds = scale * p * (g - sum(g * p)), one warp per row, where g is dp through the dropout that
// followed the softmax in the forward: element i (of the whole tensor) kept as `kept` says and
// scaled by `drop_scale` (threshold 0 and drop_scale 1: no dropout). Reading dp through the mask
// here saves the backward a pass that would apply it first.
// softmax_fwd for the rows softmax_vec_width takes, in kernels of their own: in one kernel with the
// per-element paths (whose longest rows hold 16 registers a lane) the compiler gave it 52
// registers a thread, half an SM's threads; alone it needs about 26 (ptxas, sm_90). The host picks
// it (geometry::softmax_vec_width) where k fits and the pointers are aligned to the chunk.
template <typename T, bool DROP>
__device__ void softmax_fwd_vec(const T *s, const T *bias, T *p, T *dropped, size_t rows, int k,
                                size_t rows_per_batch, float scale, uint64_t seed,
                                uint32_t threshold, float drop_scale) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const size_t be = (row | rows_per_batch) >> 32 == 0 ? (uint32_t)row / (uint32_t)rows_per_batch
                                                        : row / rows_per_batch;
  const T *sr = s + row * k, *br = bias + be * k;
  T *pr = p + row * k;
  switch (softmax_vec_width<T>(k)) {
  case 2: return softmax_row_vec<T, DROP, 2>(sr, br, pr, dropped, row, scale, seed, threshold, drop_scale);
  case 4:
    if constexpr (sizeof(T) <= 4)
      return softmax_row_vec<T, DROP, 4>(sr, br, pr, dropped, row, scale, seed, threshold, drop_scale);
    break;
  case 8:
    if constexpr (sizeof(T) <= 2)
      return softmax_row_vec<T, DROP, 8>(sr, br, pr, dropped, row, scale, seed, threshold, drop_scale);
    break;
  default: break;
  }
  __trap();
}

// softmax_bwd for the rows of softmax_row_vec.
template <typename T, int V>
__device__ __forceinline__ void softmax_bwd_row_vec(const T *pr, const T *gr, T *dr, size_t row,
                                                    float scale, uint64_t seed, uint32_t threshold,
                                                    float drop_scale) {
  using C = Chunk<T, V>;
  constexpr int k = 32 * V;
  const int lane = threadIdx.x;
  const C pv = reinterpret_cast<const C *>(pr)[lane], gv = reinterpret_cast<const C *>(gr)[lane];
  float pf[V], g[V];
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < V; j++) {
    const size_t i = row * k + (size_t)V * lane + j;
    pf[j] = to_f(pv.v[j]);
    g[j] = kept(seed, i, threshold) ? to_f(gv.v[j]) * drop_scale : 0.f;
    dot += pf[j] * g[j];
  }
  dot = warp_sum(dot);
  C out;
#pragma unroll
  for (int j = 0; j < V; j++) out.v[j] = from_f<T>(scale * pf[j] * (g[j] - dot));
  reinterpret_cast<C *>(dr)[lane] = out;
}

template <typename T>
__device__ void softmax_bwd(const T *p, const T *dp, T *ds, size_t rows, int k, float scale,
                            uint64_t seed, uint32_t threshold, float drop_scale) {
  const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const T *pr = p + row * k;
  const T *gr = dp + row * k;
  T *dr = ds + row * k;
  const int vw = softmax_vec_width<T>(k);
  if (vw && all_aligned(vw * (int)sizeof(T), p, dp, ds)) {
    if (vw == 2) return softmax_bwd_row_vec<T, 2>(pr, gr, dr, row, scale, seed, threshold, drop_scale);
    if constexpr (sizeof(T) <= 4)
      if (vw == 4) return softmax_bwd_row_vec<T, 4>(pr, gr, dr, row, scale, seed, threshold, drop_scale);
    if constexpr (sizeof(T) <= 2)
      if (vw == 8) return softmax_bwd_row_vec<T, 8>(pr, gr, dr, row, scale, seed, threshold, drop_scale);
  }
  auto g = [&](int i) {
    return kept(seed, row * k + i, threshold) ? to_f(gr[i]) * drop_scale : 0.f;
  };
  float dot = 0.f;
  for (int i = lane; i < k; i += 32) dot += to_f(pr[i]) * g(i);
  dot = warp_sum(dot);
  for (int i = lane; i < k; i += 32) dr[i] = from_f<T>(scale * to_f(pr[i]) * (g(i) - dot));
}

// ---- exact GELU ------------------------------------------------------------------------------
__device__ __forceinline__ float gelu_f(float v) {
  return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

template <typename T>
__device__ void gelu_fwd(const T *x, T *y, size_t n) {
  map1(x, y, n, [](size_t, float v) { return gelu_f(v); });
}

// dx = dy * (Phi(x) + x * phi(x)).
__device__ __forceinline__ float gelu_grad_f(float v, float g) {
  const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
  return g * (cdf + v * pdf);
}

template <typename T>
__device__ void gelu_bwd(const T *x, const T *dy, T *dx, size_t n) {
  map2(x, dy, dx, n, [](size_t, float v, float g) { return gelu_grad_f(v, g); });
}

// ---- bias add -------------------------------------------------------------------------------
// y[r, c] = x[r, c] + b[c] for x [rows, n]: blockIdx.x and threadIdx.x pick the column (no
// division per element), blockIdx.y strides the rows. With `packed` (the host's choice: n a whole
// number of 16-byte packs, every pointer 16-byte aligned) a thread takes one pack of columns
// instead of one column. With GELU, also g = gelu(y) (from y as stored) in the same pass: the
// feed-forward block's first layer and its activation, both kept for the backward.
template <typename T, bool GELU>
__device__ void bias_add(const T *x, const T *b, T *y, T *g, size_t rows, int n, bool packed) {
  if (packed) {
    constexpr int P = 16 / sizeof(T);
    const int packs = n / P;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= packs) return;
    const Pack<T> bc = reinterpret_cast<const Pack<T> *>(b)[c];
    const Pack<T> *xp = reinterpret_cast<const Pack<T> *>(x);
    Pack<T> *yp = reinterpret_cast<Pack<T> *>(y);
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
      const Pack<T> v = xp[r * packs + c];
      Pack<T> out, act;
#pragma unroll
      for (int k = 0; k < P; k++) {
        out.v[k] = from_f<T>(to_f(v.v[k]) + to_f(bc.v[k]));
        if constexpr (GELU) act.v[k] = from_f<T>(gelu_f(to_f(out.v[k])));
      }
      yp[r * packs + c] = out;
      if constexpr (GELU) reinterpret_cast<Pack<T> *>(g)[r * packs + c] = act;
    }
    return;
  }
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  const float bc = to_f(b[c]);
  for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T v = from_f<T>(to_f(x[r * n + c]) + bc);
    y[r * n + c] = v;
    if constexpr (GELU) g[r * n + c] = from_f<T>(gelu_f(to_f(v)));
  }
}

// ---- dropout ---------------------------------------------------------------------------------
// y = x through the mask (see "dropout masks"); its backward is the same op on the gradient.
template <typename T>
__device__ void dropout(const T *x, T *y, size_t n, uint64_t seed, uint32_t threshold,
                        float scale) {
  map1(x, y, n, [=](size_t i, float v) { return kept(seed, i, threshold) ? v * scale : 0.f; });
}

// z = x + y, in 16-byte packs: the block nodes' backward adds the residual's gradient to the
// branch's with it (candle's own add moves an element an access: 0.4 of a copy's bandwidth on an
// H200 in run 12d's trace, 73 of them a roberta-base step).
template <typename T>
__device__ void add(const T *x, const T *y, T *z, size_t n) {
  map2(x, y, z, n, [](size_t, float a, float b) { return a + b; });
}

// s = x through the mask, plus r: a residual branch's dropout and the residual add in one pass.
template <typename T>
__device__ void dropout_add(const T *x, const T *r, T *s, size_t n, uint64_t seed,
                            uint32_t threshold, float scale) {
  map2(x, r, s, n, [=](size_t i, float v, float res) {
    return (kept(seed, i, threshold) ? v * scale : 0.f) + res;
  });
}

// ---- swapping the middle dimensions -----------------------------------------------------------
// y [a, c, b, d] from x [a, b, c, d]: attention's split of [batch, seq, heads, head_dim] into
// [batch, heads, seq, head_dim] and the merge back (the same op with b and c exchanged). A pure
// copy, so it moves units U of 2, 4, 8 or 16 bytes: the host picks the widest that divides a run of
// d elements, the row strides and the buffers' offsets, and gives d in those units (a bf16 head of
// 64 is 8 units of 16 bytes). One block per (ic, ia) writes the contiguous slab y[ia, ic, :, :]
// (b * d units) from b runs of d units in x; index maths in 32 bits within a slab.
// Rows may be wider than they are long: x's (ia, ib) rows of c * d units lie x_row units apart
// and y's (ia, ic) slabs y_row apart, so that q, k and v are split from one [batch, seq, 3, heads,
// head_dim] product (x_row = 3 * c * d, x offset to the part) and their gradients merged into one
// (y_row = 3 * b * d). Dense: x_row = c * d, y_row = b * d.
template <typename U>
__device__ void swap12(const U *x, U *y, uint32_t a, uint32_t b, uint32_t c, uint32_t d,
                       uint32_t x_row, uint32_t y_row) {
  const uint32_t ic = blockIdx.x, slab = b * d;
  for (uint32_t ia = blockIdx.y; ia < a; ia += gridDim.y) {
    const U *xs = x + (size_t)ia * b * x_row + (size_t)ic * d;  // x[ia, 0, ic, 0]
    U *ys = y + ((size_t)ia * c + ic) * y_row;                   // y[ia, ic, 0, 0]
    for (uint32_t j = threadIdx.x; j < slab; j += blockDim.x) {
      const uint32_t ib = j / d;
      ys[j] = xs[(size_t)ib * x_row + (j - ib * d)];
    }
  }
}

#define SWAP12(U, S)                                                                            \
  extern "C" __global__ void swap12_##S(const U *x, U *y, uint32_t a, uint32_t b, uint32_t c,   \
                                        uint32_t d, uint32_t x_row, uint32_t y_row) {           \
    swap12<U>(x, y, a, b, c, d, x_row, y_row);                                                  \
  }
SWAP12(uint16_t, u16)
SWAP12(uint32_t, u32)
SWAP12(uint2, u64)
SWAP12(uint4, u128)

// ---- embedding ---------------------------------------------------------------------------------
// out[r, :] = table[ids[r], :] for table [vocab, n]: blocks stride over the rows, threads along
// the row (no division per element). An id past the table stops the kernel (a CUDA error at the
// next synchronisation) rather than read out of bounds. The rows may be written in another type
// than the table's (an f32 master gathered straight into bf16, rounded as a cast rounds; in the
// same type the conversion is exact).
template <typename TI, typename TO>
__device__ void embedding_fwd(const TI *table, const uint32_t *ids, TO *out, size_t rows, int n,
                              uint32_t vocab) {
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint32_t id = ids[r];
    if (id >= vocab) __trap();
    const TI *src = table + (size_t)id * n;
    TO *dst = out + r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = from_f<TO>(to_f(src[i]));
  }
}

// An f32 master's rows gathered into bf16 (the gradient sink's lookup in bf16 training: no f32
// rows written and cast after).
extern "C" __global__ void embedding_fwd_f32_to_bf16(const float *table, const uint32_t *ids,
                                                     __nv_bfloat16 *out, size_t rows, int n,
                                                     uint32_t vocab) {
  embedding_fwd<float, __nv_bfloat16>(table, ids, out, rows, n, vocab);
}

// out[r, :] = t0[i0[r], :] + t1[i1[r], :] (+ t2[i2[r], :] with three tables) in T, from f32
// tables, rounded exactly as separate lookups and adds in T round (each row to T, then each sum,
// in order; in f32 no rounding at all): an encoder's word, position and token-type embeddings in
// one pass, with no rows written per table and no adds of them. An id past its table stops the
// kernel, as the gather does.
template <typename T>
__device__ void embedding_sum_fwd(const float *t0, const float *t1, const float *t2,
                                  const uint32_t *i0, const uint32_t *i1, const uint32_t *i2, T *out,
                                  size_t rows, int n, uint32_t v0, uint32_t v1, uint32_t v2,
                                  uint32_t tables) {
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint32_t a = i0[r], b = i1[r], c = tables > 2 ? i2[r] : 0;
    if (a >= v0 || b >= v1 || (tables > 2 && c >= v2)) __trap();
    const float *s0 = t0 + (size_t)a * n, *s1 = t1 + (size_t)b * n;
    const float *s2 = tables > 2 ? t2 + (size_t)c * n : nullptr;
    T *dst = out + r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      float v = to_f(from_f<T>(to_f(from_f<T>(s0[i])) + to_f(from_f<T>(s1[i]))));
      if (s2 != nullptr) v = to_f(from_f<T>(v + to_f(from_f<T>(s2[i]))));
      dst[i] = from_f<T>(v);
    }
  }
}

// grad[ids[r], :] += g[r, :], grad f32 [vocab, n] zeroed by the caller: one atomic per element,
// spread over the rows of the table, instead of candle's index_add (one thread per column looping
// over every id). Laid out as the forward.
template <typename T>
__device__ void embedding_bwd(const T *g, const uint32_t *ids, float *grad, size_t rows, int n) {
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float *dst = grad + (size_t)ids[r] * n;
    const T *src = g + r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(dst + i, to_f(src[i]));
  }
}

// ---- AdamW (f32 master weights) and the gradient norm ----------------------------------------------
// The two halves of the optimizer's fused step, as on the CPU: the moments [m; v] (2n floats) in
// place from the gradient scaled by s, then the weight in place from the moments.
extern "C" __global__ void adamw_moments(float *state, const float *g, size_t n, float b1, float b2,
                                         float one_b1, float one_b2, float s) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i] * s;
    state[i] = b1 * state[i] + one_b1 * gi;
    state[n + i] = b2 * state[n + i] + one_b2 * (gi * gi);
  }
}

extern "C" __global__ void adamw_weights(float *w, const float *state, size_t n, float decay,
                                         float step, float inv_bc2, float eps) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float denom = sqrtf(state[n + i]) * inv_bc2 + eps;
    w[i] = w[i] * decay - step * (state[i] / denom);
  }
}

// ---- many parameters in one launch ---------------------------------------------------------------
// A table of `count` entries of WORDS 64-bit words each describes the parameters; an entry's last
// word is the first block that works on it: entry p owns blocks [first(p), first(p + 1)), one block
// per MULTI_CHUNK elements. A launch of one block per chunk over every parameter therefore costs
// one launch whatever the number of parameters, where one launch per parameter cost a few
// microseconds of the host each (hundreds per step).
constexpr size_t MULTI_CHUNK = 4096;

// The entry block b works on: the last one whose first block is at most b (entries without
// elements own no blocks and are passed over).
__device__ __forceinline__ uint32_t multi_entry(const uint64_t *table, uint32_t words,
                                                uint32_t count, uint64_t b) {
  uint32_t lo = 0, hi = count;  // first(lo) <= b < first(hi), first(count) = infinity
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (table[(size_t)mid * words + words - 1] <= b) lo = mid;
    else hi = mid;
  }
  return lo;
}

// One AdamW step on every parameter of the table, entries of six words: the weight's address
// (n f32), the moments' ([m; v], 2n f32), the gradient's (n f32), n, the bits of the decay factor
// 1 - lr * wd (an f32), the first block. The arithmetic of adamw_moments and then adamw_weights,
// element by element.
extern "C" __global__ void adamw_multi(const uint64_t *table, uint32_t count, float b1, float b2,
                                       float one_b1, float one_b2, float s, float step,
                                       float inv_bc2, float eps, const double *s_at) {
  // The gradients' scale from the device where clip_scale left it (s_at[0]), else s.
  if (s_at != nullptr) s = (float)s_at[0];
  const uint64_t *e = table + 6 * (size_t)multi_entry(table, 6, count, blockIdx.x);
  float *w = reinterpret_cast<float *>(e[0]);
  float *state = reinterpret_cast<float *>(e[1]);
  const float *g = reinterpret_cast<const float *>(e[2]);
  const size_t n = e[3];
  const float decay = __uint_as_float((uint32_t)e[4]);
  const size_t start = (blockIdx.x - e[5]) * MULTI_CHUNK;
  const size_t end = start + MULTI_CHUNK < n ? start + MULTI_CHUNK : n;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = g[i] * s;
    const float m = b1 * state[i] + one_b1 * gi;
    const float v = b2 * state[n + i] + one_b2 * (gi * gi);
    state[i] = m;
    state[n + i] = v;
    const float denom = sqrtf(v) * inv_bc2 + eps;
    w[i] = w[i] * decay - step * (m / denom);
  }
}

// sums[p] += the sum of squares of gradient p, for every entry of the table (three words: the
// gradient's address (f32), n, the first block): a block-wide sum per chunk, one atomic per block.
extern "C" __global__ void sum_squares_multi(const uint64_t *table, uint32_t count, float *sums) {
  __shared__ float sh[32];
  const uint32_t p = multi_entry(table, 3, count, blockIdx.x);
  const uint64_t *e = table + 3 * (size_t)p;
  const float *g = reinterpret_cast<const float *>(e[0]);
  const size_t n = e[1];
  const size_t start = (blockIdx.x - e[2]) * MULTI_CHUNK;
  const size_t end = start + MULTI_CHUNK < n ? start + MULTI_CHUNK : n;
  float acc = 0.f;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) acc += g[i] * g[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) atomicAdd(sums + p, acc);
}

// The global gradient norm and the clipping coefficient from the per-gradient sums of squares
// that sum_squares_multi left, on the device, so that a training step need not wait for them:
// out[1] = norm = sqrt(sums[0] + sums[1] + ...), added in order in double, and
// out[0] = min(max_norm / (norm + 1e-6), 1) (1 where max_norm <= 0: no clipping), the host's
// formula (optim.rs: global_grad_norm, clip_coefficient) operation for operation, so the two give
// the same bits. One thread: a few hundred additions.
extern "C" __global__ void clip_scale(const float *sums, uint32_t count, double max_norm, double *out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double total = 0.0;
  for (uint32_t i = 0; i < count; i++) total += (double)sums[i];
  const double norm = sqrt(total);
  out[1] = norm;
  out[0] = max_norm > 0.0 ? fmin(max_norm / (norm + 1e-6), 1.0) : 1.0;
}

// dst[offset(p) + i] = parts[p][i] (cast from S to D) for every entry of the table, four words: the
// part's address, its n, its offset into dst (elements), the first block. Packs a block node's
// weights into its flat vector (from their f32 masters in mixed precision), or casts its gradients
// to f32, in one launch.
template <typename S, typename D>
__device__ void gather(const uint64_t *table, uint32_t count, D *dst) {
  const uint64_t *e = table + 4 * (size_t)multi_entry(table, 4, count, blockIdx.x);
  const S *src = reinterpret_cast<const S *>(e[0]);
  const size_t n = e[1];
  D *out = dst + e[2];
  const size_t start = (blockIdx.x - e[3]) * MULTI_CHUNK;
  const size_t end = start + MULTI_CHUNK < n ? start + MULTI_CHUNK : n;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) out[i] = from_f<D>(to_f(src[i]));
}

extern "C" __global__ void gather_f32(const uint64_t *table, uint32_t count, float *dst) {
  gather<float, float>(table, count, dst);
}
extern "C" __global__ void gather_bf16(const uint64_t *table, uint32_t count, __nv_bfloat16 *dst) {
  gather<__nv_bfloat16, __nv_bfloat16>(table, count, dst);
}
extern "C" __global__ void gather_bf16_to_f32(const uint64_t *table, uint32_t count, float *dst) {
  gather<__nv_bfloat16, float>(table, count, dst);
}
// A block node's f32 master weights packed into its bf16 flat vector, cast on the way.
extern "C" __global__ void gather_f32_to_bf16(const uint64_t *table, uint32_t count, __nv_bfloat16 *dst) {
  gather<float, __nv_bfloat16>(table, count, dst);
}

// out[i] = the sum over k < parts of x[k * n + i], accumulated in f32: the partial products of a
// weight gradient split over its rows (split-K, `kernels::weight_grad`) added into one.
template <typename T>
__device__ void split_sum(const T *x, T *out, size_t n, uint32_t parts) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc = 0.f;
    for (uint32_t k = 0; k < parts; k++) acc += to_f(x[k * n + i]);
    out[i] = from_f<T>(acc);
  }
}

// ---- pointer arrays of attention's batched products ------------------------------------------------
// A batched product over every (batch b, head h), index i = b * heads + h, reads its A, B and C at
// base + b * per_b + h * per_h (bytes; src/model/kernels/colmajor.rs, head_gemm): q, k and v where
// the fused [batch, seq, 3 * hidden] product holds them, the context in [batch, seq, hidden]. One
// launch writes the arrays of up to three products (A, B, C each): array a holds out[a * count + i].
#define BATCH_ARRAYS 9
struct PointerPlan {
  uint64_t base[BATCH_ARRAYS], per_b[BATCH_ARRAYS], per_h[BATCH_ARRAYS];
};

extern "C" __global__ void batch_pointers(uint64_t *out, uint32_t count, uint32_t heads,
                                          uint32_t arrays, PointerPlan plan) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const uint64_t bi = i / heads, hi = i % heads;
    for (uint32_t a = 0; a < arrays && a < BATCH_ARRAYS; a++)
      out[a * (size_t)count + i] = plan.base[a] + bi * plan.per_b[a] + hi * plan.per_h[a];
  }
}

// ---- attention in one pass ("flash") -----------------------------------------------------------
// softmax(scale * Q K^T + bias) V per (batch, head) with dropout on the probabilities, bf16 only,
// on the tensor cores (mma.sync m16n8k16: bf16 operands, f32 accumulators), reading q, k and v
// straight out of the attention block's one product qkv [b, s, 3 * heads * 64] (row stride
// 3 * hidden) and writing the context straight into [b, s, hidden]: no head split, no merge, no
// [b, h, s, s] tensor. The forward keeps the log-sum-exp of each row, from which the backward
// recomputes the probabilities; the dropout mask is the same function of (seed, element index of
// [b, h, s, s]) as everywhere else ("dropout masks"), so both agree with the unfused path's masks.
// Head size 64; s a multiple of 16 (at most FA_BWD_MAX_S for the backward); bias [b, s] additive
// (finite).
//
// Session 14 rewrote both kernels (the wmma ones of sessions 9 and 10 lost to the unfused path,
// 0.88x at batch 128, run 12a): k and v (forward) and q, dO and k (backward) are staged in shared
// memory once per block with 16-byte loads instead of each warp reading them through L1, and the
// fragments are explicit (the instruction's documented lane layout), so the scores, probabilities
// and gradients stay in registers: the softmax runs on the accumulators, and a tile of
// probabilities becomes the next product's operand without a trip through shared memory.
constexpr int FA_D = 64;
constexpr int FA_FWD_WARPS = 4;   // 16 query rows each: 64 a block
constexpr int FA_FWD_KEYS = 64;   // keys a forward block stages at a time
constexpr int FA_BWD_KEYS = 128;  // keys a backward block takes, one warp for each 16
constexpr int FA_BWD_MAX_S = 512; // the longest sequence the backward takes
constexpr int FA_BWD_QT = 32;     // queries a backward step stages
// Shared tiles of 64-wide bf16 rows are padded to 72 elements (36 words): the fragment reads of a
// warp (8 rows x 4 words, or 2 x 4 rows x 8 half-words) then fall into 32 different banks, where
// rows of 32 words would put 8 lanes on one bank.
constexpr int FA_LD = FA_D + 8;
// The backward's dS tile, query-major, rows of its block's keys plus the same padding.
constexpr int FA_DS_LD = FA_BWD_KEYS + 8;

// The m16n8k16 product d += a * b of one warp. Lane l holds, with g = l / 4 and t = l % 4 (two
// bf16 to a 32-bit register, the lower column in the low half): a[0] = A[g][2t, 2t+1],
// a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9] of A (16 x 16);
// b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g] of B (16 x 8); d[0], d[1] = D[g][2t, 2t+1] and d[2],
// d[3] = D[g+8][2t, 2t+1] of D (16 x 8, f32). The emulator's stand-in (tests/cuda_emu/include/
// tensor_core.h) gathers the warp's registers by this layout and multiplies the whole tiles.
#ifdef __CUDACC__
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#else
#include "tensor_core.h"
#endif

__device__ __forceinline__ uint32_t bf16_bits(__nv_bfloat16 x) {
  return *reinterpret_cast<const unsigned short *>(&x);
}
// Two floats as a register of two bf16, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return bf16_bits(from_f<__nv_bfloat16>(lo)) | (bf16_bits(from_f<__nv_bfloat16>(hi)) << 16);
}
// Two adjacent bf16 (p 4-byte aligned) as one register.
__device__ __forceinline__ uint32_t ld_pair(const __nv_bfloat16 *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}
// Two bf16 from two places as one register (a column pair of a row-major tile).
__device__ __forceinline__ uint32_t ld_pair(const __nv_bfloat16 *lo, const __nv_bfloat16 *hi) {
  return bf16_bits(*lo) | (bf16_bits(*hi) << 16);
}
// Element (row, col) of a padded shared tile.
__device__ __forceinline__ int fa_at(int row, int col) { return row * FA_LD + col; }

// rows x 64 bf16 from global rows `src + r * ld` into the padded shared tile `dst` (zeros from row
// `n` on), 16 bytes a thread a step where every row start is 16-byte aligned (`vec`), else an
// element at a time.
__device__ __forceinline__ void fa_stage(__nv_bfloat16 *dst, const __nv_bfloat16 *src, size_t ld,
                                         int rows, int n, bool vec) {
  if (vec) {
    for (int c = threadIdx.x; c < rows * (FA_D / 8); c += blockDim.x) {
      const int r = c / (FA_D / 8), part = (c % (FA_D / 8)) * 8;
      uint4 v = {0u, 0u, 0u, 0u};
      if (r < n) v = *reinterpret_cast<const uint4 *>(src + r * ld + part);
      *reinterpret_cast<uint4 *>(dst + fa_at(r, part)) = v;
    }
  } else {
    for (int c = threadIdx.x; c < rows * FA_D; c += blockDim.x) {
      const int r = c / FA_D, col = c % FA_D;
      dst[fa_at(r, col)] = r < n ? src[r * ld + col] : from_f<__nv_bfloat16>(0.f);
    }
  }
}

// Grid (ceil(s / 64), heads, batch), FA_FWD_WARPS warps; warp w takes query rows
// 64 * blockIdx.x + 16 * w and up (q in registers as the products' A), the block stages 64 keys of
// k and v at a time; per tile, S = Q K^T (eight 16 x 8 accumulators a warp), the running max and
// sum of each row (a row's 16 columns a lane, four lanes a row), the dropped probabilities packed
// into A fragments, and O += P V (eight more accumulators). A lane ends with rows g and g + 8.
extern "C" __global__ void __launch_bounds__(32 * FA_FWD_WARPS) flash_fwd_bf16(
    const __nv_bfloat16 *qkv, const __nv_bfloat16 *bias, __nv_bfloat16 *out, float *lse, int s,
    int heads, float scale, uint64_t seed, uint32_t threshold, float drop_scale) {
  __shared__ __align__(16) __nv_bfloat16 s_k[FA_FWD_KEYS * FA_LD];
  __shared__ __align__(16) __nv_bfloat16 s_v[FA_FWD_KEYS * FA_LD];
  __shared__ float s_bias[FA_FWD_KEYS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int q0 = blockIdx.x * (16 * FA_FWD_WARPS) + warp * 16;
  const bool active = q0 < s;  // s is a multiple of 16: a warp has all its rows or none
  const int hidden = heads * FA_D;
  const size_t ld = 3 * (size_t)hidden;
  const __nv_bfloat16 *qb = qkv + (size_t)b * s * ld + h * FA_D;  // q of row i at qb + i * ld
  const __nv_bfloat16 *kb = qb + hidden, *vb = qb + 2 * hidden;
  const bool vec = all_aligned(16, qkv) && (ld % 8) == 0;
  uint32_t qa[FA_D / 16][4];
#pragma unroll
  for (int kk = 0; kk < FA_D / 16; kk++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      qa[kk][e] = active ? ld_pair(qb + (size_t)(q0 + g + 8 * (e & 1)) * ld + kk * 16 + 2 * t + 8 * (e >> 1)) : 0u;
  float o[FA_D / 8][4];
#pragma unroll
  for (int dt = 0; dt < FA_D / 8; dt++)
#pragma unroll
    for (int e = 0; e < 4; e++) o[dt][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  // Element (b, h, row, 0) of the [b, h, s, s] probabilities for this lane's rows g and g + 8.
  const size_t row_at[2] = {(((size_t)b * heads + h) * s + q0 + g) * s,
                            (((size_t)b * heads + h) * s + q0 + g + 8) * s};
  for (int k0 = 0; k0 < s; k0 += FA_FWD_KEYS) {
    const int n = s - k0 < FA_FWD_KEYS ? s - k0 : FA_FWD_KEYS;
    __syncthreads();  // the previous tile's readers are done
    fa_stage(s_k, kb + (size_t)k0 * ld, ld, FA_FWD_KEYS, n, vec);
    fa_stage(s_v, vb + (size_t)k0 * ld, ld, FA_FWD_KEYS, n, vec);
    for (int c = threadIdx.x; c < FA_FWD_KEYS; c += blockDim.x)
      s_bias[c] = c < n ? to_f(bias[(size_t)b * s + k0 + c]) : -INFINITY;
    __syncthreads();
    if (!active) continue;
    // S = Q K^T: column tile nt holds keys 8 nt .. 8 nt + 7 (B = K^T: K's rows read as columns).
    float sc[FA_FWD_KEYS / 8][4];
#pragma unroll
    for (int nt = 0; nt < FA_FWD_KEYS / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) sc[nt][e] = 0.f;
      if (nt * 8 < n) {
#pragma unroll
        for (int kk = 0; kk < FA_D / 16; kk++)
          mma_m16n8k16_bf16(sc[nt], qa[kk], ld_pair(s_k + fa_at(nt * 8 + g, kk * 16 + 2 * t)),
                            ld_pair(s_k + fa_at(nt * 8 + g, kk * 16 + 2 * t + 8)));
      }
    }
    // Scaled and biased (-inf past the last key); each row's max over its four lanes.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < FA_FWD_KEYS / 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float x = sc[nt][e] * scale + s_bias[nt * 8 + 2 * t + (e & 1)];
        sc[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      alpha[r] = expf(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int dt = 0; dt < FA_D / 8; dt++)
#pragma unroll
      for (int e = 0; e < 4; e++) o[dt][e] *= alpha[e >> 1];
    // The probabilities (this lane's share of each row's sum), dropped and packed as the A
    // fragments of P V: key step j is column tiles 2j (registers 0, 1) and 2j + 1 (2, 3).
    uint32_t pa[FA_FWD_KEYS / 16][4];
#pragma unroll
    for (int nt = 0; nt < FA_FWD_KEYS / 8; nt++) {
      float d[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int col = nt * 8 + 2 * t + (e & 1);
        const float p = expf(sc[nt][e] - m[e >> 1]);
        l[e >> 1] += p;
        d[e] = col < n && kept(seed, row_at[e >> 1] + k0 + col, threshold) ? p * drop_scale : 0.f;
      }
      pa[nt / 2][(nt & 1) * 2] = pack_bf16(d[0], d[1]);
      pa[nt / 2][(nt & 1) * 2 + 1] = pack_bf16(d[2], d[3]);
    }
    // O += P V: B = V (keys down, head dimensions across), a column pair from two rows.
#pragma unroll
    for (int j = 0; j < FA_FWD_KEYS / 16; j++) {
      if (j * 16 >= n) break;
#pragma unroll
      for (int dt = 0; dt < FA_D / 8; dt++) {
        const int c = dt * 8 + g, r = j * 16 + 2 * t;
        mma_m16n8k16_bf16(o[dt], pa[j], ld_pair(s_v + fa_at(r, c), s_v + fa_at(r + 1, c)),
                          ld_pair(s_v + fa_at(r + 8, c), s_v + fa_at(r + 9, c)));
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (t == 0) lse[((size_t)b * heads + h) * s + q0 + g + 8 * r] = m[r] + logf(l[r]);
  }
  const float inv[2] = {1.f / l[0], 1.f / l[1]};
  __nv_bfloat16 *orow = out + ((size_t)b * s + q0 + g) * hidden + h * FA_D + 2 * t;
#pragma unroll
  for (int dt = 0; dt < FA_D / 8; dt++)
#pragma unroll
    for (int r = 0; r < 2; r++)
      *reinterpret_cast<uint32_t *>(orow + (size_t)8 * r * hidden + dt * 8) =
          pack_bf16(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
}

// The gradients of q, k and v into dqkv (the layout of qkv) given dout, the gradient of the
// context. Grid (heads, batch, ceil(s / FA_BWD_KEYS)), min(s, FA_BWD_KEYS) / 16 warps: warp w of
// block z owns keys FA_BWD_KEYS z + 16 w and up (a warp past s takes no keys, only a share of the
// staging and of dQ), holds their k and v as A fragments and accumulates their dK and dV in
// registers over steps of FA_BWD_QT queries. A step stages the queries' q and dO in shared memory;
// each warp recomputes its P^T from S^T = K Q^T and the saved log-sum-exp, adds
// drop(P)^T dO to dV, forms dP^T = V dO^T and dS^T = scale * P^T (drop(dP^T) - D) with
// D = rowsum(dO * O), adds dS^T Q to dK, and leaves dS (query-major) in shared memory; then the
// step's dQ = dS K over the block's keys (k staged once) is cut into 16 x 8 tiles, a warp each
// (no atomics between warps). With one block of keys (dq_acc null) dQ is written out in bf16;
// with more, it is added into dq_acc (f32 [b, s, hidden], zeroed) with atomics, and flash_dq_bf16
// writes it.
extern "C" __global__ void __launch_bounds__(FA_BWD_KEYS / 16 * 32, 2) flash_bwd_bf16(
    const __nv_bfloat16 *qkv, const __nv_bfloat16 *bias, const __nv_bfloat16 *out,
    const __nv_bfloat16 *dout, const float *lse, __nv_bfloat16 *dqkv, float *dq_acc, int s,
    int heads, float scale, uint64_t seed, uint32_t threshold, float drop_scale) {
  constexpr int QT = FA_BWD_QT;
  __shared__ float s_dot[FA_BWD_MAX_S], s_lse[FA_BWD_MAX_S];
  __shared__ __align__(16) __nv_bfloat16 s_k[FA_BWD_KEYS * FA_LD];
  __shared__ __align__(16) __nv_bfloat16 s_q[QT * FA_LD];
  __shared__ __align__(16) __nv_bfloat16 s_g[QT * FA_LD];
  __shared__ __align__(16) __nv_bfloat16 s_ds[QT * FA_DS_LD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.x, b = blockIdx.y;
  const int hidden = heads * FA_D;
  const size_t ld = 3 * (size_t)hidden;
  const int kbase = blockIdx.z * FA_BWD_KEYS;  // the block's first key
  const int nk = s - kbase < FA_BWD_KEYS ? s - kbase : FA_BWD_KEYS;
  const int key_tiles = nk / 16;
  const int k0 = kbase + warp * 16;
  const bool active = warp < key_tiles;
  const __nv_bfloat16 *qb = qkv + (size_t)b * s * ld + h * FA_D;  // row i at qb + i * ld
  const __nv_bfloat16 *kb = qb + hidden, *vb = qb + 2 * hidden;
  const __nv_bfloat16 *ob = out + (size_t)b * s * hidden + h * FA_D;  // row i at ob + i * hidden
  const __nv_bfloat16 *gb = dout + (size_t)b * s * hidden + h * FA_D;
  __nv_bfloat16 *dqb = dqkv + (size_t)b * s * ld + h * FA_D;
  __nv_bfloat16 *dkb = dqb + hidden, *dvb = dqb + 2 * hidden;
  const bool vec_q = all_aligned(16, qkv) && (ld % 8) == 0;
  const bool vec_g = all_aligned(16, dout) && (hidden % 8) == 0;
  // D, a warp a row (lanes along it).
  for (int i = warp; i < s; i += warps) {
    const size_t at = (size_t)i * hidden + lane;
    const float v = warp_sum(to_f(ob[at]) * to_f(gb[at]) + to_f(ob[at + 32]) * to_f(gb[at + 32]));
    if (lane == 0) s_dot[i] = v;
  }
  for (int i = threadIdx.x; i < s; i += blockDim.x) s_lse[i] = lse[((size_t)b * heads + h) * s + i];
  fa_stage(s_k, kb + (size_t)kbase * ld, ld, FA_BWD_KEYS, nk, vec_q);
  float dk[FA_D / 8][4], dv[FA_D / 8][4];
#pragma unroll
  for (int dt = 0; dt < FA_D / 8; dt++)
#pragma unroll
    for (int e = 0; e < 4; e++) dk[dt][e] = dv[dt][e] = 0.f;
  // This lane's keys g and g + 8: their bias, and element (b, h, 0, key) of the [b, h, s, s]
  // probabilities (query i adds i * s).
  const float bias_k[2] = {active ? to_f(bias[(size_t)b * s + k0 + g]) : 0.f,
                           active ? to_f(bias[(size_t)b * s + k0 + g + 8]) : 0.f};
  const size_t col_at[2] = {((size_t)b * heads + h) * s * s + k0 + g,
                            ((size_t)b * heads + h) * s * s + k0 + g + 8};
  for (int q0 = 0; q0 < s; q0 += QT) {
    const int n = s - q0 < QT ? s - q0 : QT;
    fa_stage(s_q, qb + (size_t)q0 * ld, ld, QT, n, vec_q);
    fa_stage(s_g, gb + (size_t)q0 * hidden, hidden, QT, n, vec_g);
    __syncthreads();  // s_q, s_g (and at the first step s_k, s_dot, s_lse) are in place
    if (active) {
      // S^T = K Q^T and dP^T = V dO^T: column tile nt holds queries q0 + 8 nt and up. This
      // warp's k (from s_k) and v (from global memory, through L1) are the A fragments, read a
      // 16-column slice at a time rather than held across steps (32 registers fewer: two blocks
      // an SM).
      float p[QT / 8][4], dp[QT / 8][4];
#pragma unroll
      for (int nt = 0; nt < QT / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) p[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < FA_D / 16; kk++) {
        uint32_t ka[4], va[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int row = warp * 16 + g + 8 * (e & 1), col = kk * 16 + 2 * t + 8 * (e >> 1);
          ka[e] = ld_pair(s_k + fa_at(row, col));
          va[e] = ld_pair(vb + (size_t)(kbase + row) * ld + col);
        }
#pragma unroll
        for (int nt = 0; nt < QT / 8; nt++) {
          if (nt * 8 >= n) break;
          mma_m16n8k16_bf16(p[nt], ka, ld_pair(s_q + fa_at(nt * 8 + g, kk * 16 + 2 * t)),
                            ld_pair(s_q + fa_at(nt * 8 + g, kk * 16 + 2 * t + 8)));
          mma_m16n8k16_bf16(dp[nt], va, ld_pair(s_g + fa_at(nt * 8 + g, kk * 16 + 2 * t)),
                            ld_pair(s_g + fa_at(nt * 8 + g, kk * 16 + 2 * t + 8)));
        }
      }
      // P^T from S^T, and which elements the dropout keeps (bit 4 nt + e).
      uint32_t keep = 0;
#pragma unroll
      for (int nt = 0; nt < QT / 8; nt++) {
        if (nt * 8 >= n) break;
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int i = q0 + nt * 8 + 2 * t + (e & 1);
          p[nt][e] = expf(p[nt][e] * scale + bias_k[e >> 1] - s_lse[i]);
          if (kept(seed, col_at[e >> 1] + (size_t)i * s, threshold)) keep |= 1u << (4 * nt + e);
        }
      }
      // dV += drop(P)^T dO and dK += dS^T Q, the A fragments packed from the accumulators (query
      // step j: column tiles 2j and 2j + 1), B a column pair of the staged rows.
      uint32_t pa[QT / 16][4], da[QT / 16][4];
#pragma unroll
      for (int nt = 0; nt < QT / 8; nt++) {
        float dr[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int col = nt * 8 + 2 * t + (e & 1);
          const bool kp = (keep >> (4 * nt + e)) & 1u;
          dr[e] = kp ? p[nt][e] * drop_scale : 0.f;
          const float gd = kp ? dp[nt][e] * drop_scale : 0.f;
          ds[e] = col < n ? scale * p[nt][e] * (gd - s_dot[q0 + col]) : 0.f;
        }
        pa[nt / 2][(nt & 1) * 2] = pack_bf16(dr[0], dr[1]);
        pa[nt / 2][(nt & 1) * 2 + 1] = pack_bf16(dr[2], dr[3]);
        da[nt / 2][(nt & 1) * 2] = pack_bf16(ds[0], ds[1]);
        da[nt / 2][(nt & 1) * 2 + 1] = pack_bf16(ds[2], ds[3]);
      }
#pragma unroll
      for (int j = 0; j < QT / 16; j++) {
        if (j * 16 >= n) break;
#pragma unroll
        for (int dt = 0; dt < FA_D / 8; dt++) {
          const int c = dt * 8 + g, r = j * 16 + 2 * t;
          mma_m16n8k16_bf16(dv[dt], pa[j], ld_pair(s_g + fa_at(r, c), s_g + fa_at(r + 1, c)),
                            ld_pair(s_g + fa_at(r + 8, c), s_g + fa_at(r + 9, c)));
          mma_m16n8k16_bf16(dk[dt], da[j], ld_pair(s_q + fa_at(r, c), s_q + fa_at(r + 1, c)),
                            ld_pair(s_q + fa_at(r + 8, c), s_q + fa_at(r + 9, c)));
        }
      }
      // dS, query-major, for dQ: the same bf16 values as da's.
      unsigned short *dsw = reinterpret_cast<unsigned short *>(s_ds);
#pragma unroll
      for (int j = 0; j < QT / 16; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          // Register e of step j: column tile 2j + e / 2, key row g + 8 (e & 1).
          const uint32_t pair = da[j][e];
          const int q = j * 16 + (e >> 1) * 8 + 2 * t, key = warp * 16 + g + 8 * (e & 1);
          dsw[q * FA_DS_LD + key] = (unsigned short)(pair & 0xffffu);
          dsw[(q + 1) * FA_DS_LD + key] = (unsigned short)(pair >> 16);
        }
    }
    __syncthreads();  // every warp's dS is in s_ds; s_q and s_g are free
    // dQ tile (query rows 16 mi.., head columns 8 dt..) = dS K over the block's key tiles.
    for (int tile = warp; tile < (n / 16) * (FA_D / 8); tile += warps) {
      const int mi = tile / (FA_D / 8), dt = tile % (FA_D / 8);
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int kt = 0; kt < key_tiles; kt++) {
        uint32_t a[4];
#pragma unroll
        for (int e = 0; e < 4; e++)
          a[e] = ld_pair(s_ds + (mi * 16 + g + 8 * (e & 1)) * FA_DS_LD + kt * 16 + 2 * t + 8 * (e >> 1));
        const int c = dt * 8 + g, r = kt * 16 + 2 * t;
        mma_m16n8k16_bf16(acc, a, ld_pair(s_k + fa_at(r, c), s_k + fa_at(r + 1, c)),
                          ld_pair(s_k + fa_at(r + 8, c), s_k + fa_at(r + 9, c)));
      }
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = q0 + mi * 16 + g + 8 * (e >> 1), c = dt * 8 + 2 * t + (e & 1);
        if (dq_acc)
          atomicAdd(&dq_acc[((size_t)b * s + i) * hidden + h * FA_D + c], acc[e]);
        else
          dqb[(size_t)i * ld + c] = from_f<__nv_bfloat16>(acc[e]);
      }
    }
    __syncthreads();  // the next step stages s_q and s_g, and then writes s_ds
  }
  if (!active) return;
#pragma unroll
  for (int dt = 0; dt < FA_D / 8; dt++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      const size_t at = (size_t)(k0 + g + 8 * r) * ld + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t *>(dkb + at) = pack_bf16(dk[dt][2 * r], dk[dt][2 * r + 1]);
      *reinterpret_cast<uint32_t *>(dvb + at) = pack_bf16(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
}

// dqkv[row, 0:hidden] = dq (f32 [rows, hidden]): the q part of flash_bwd_bf16's output where
// several blocks of keys added into dq.
extern "C" __global__ void flash_dq_bf16(const float *dq, __nv_bfloat16 *dqkv, size_t rows,
                                         int hidden) {
  const size_t n = rows * hidden, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride)
    dqkv[(e / hidden) * 3 * hidden + e % hidden] = from_f<__nv_bfloat16>(dq[e]);
}

#define FOR_TYPES(M) M(float, f32) M(__nv_bfloat16, bf16)

#define KERNELS(T, S)                                                                           \
  extern "C" __global__ void layer_norm_fwd_##S(const T *x, const T *w, const T *b, T *y, int n, \
                                                float eps) {                                     \
    layer_norm_fwd<T>(x, w, b, y, n, eps);                                                       \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dx_##S(const T *x, const T *w, const T *dy, T *dx,   \
                                                   int n, float eps) {                           \
    layer_norm_bwd_dx<T, false>(x, w, dy, dx, n, eps, nullptr, 0, 0, 1.f);                      \
  }                                                                                              \
  extern "C" __global__ void layer_norm_fwd_warp_##S(const T *x, const T *w, const T *b, T *y,   \
                                                     size_t rows, int n, float eps) {            \
    layer_norm_fwd_warp<T>(x, w, b, y, rows, n, eps);                                            \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 4) layer_norm_fwd_vec_##S(const T *x, const T *w, const T *b, T *y,    \
                                                    size_t rows, int n, float eps) {             \
    layer_norm_fwd_vec<T>(x, w, b, y, rows, n, eps);                                             \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 4) dropout_add_layer_norm_fwd_vec_##S(         \
      const T *h, const T *r, const T *w, const T *b, T *s, T *y, size_t rows, int n, float eps,  \
      uint64_t seed, uint32_t threshold, float scale) {                                          \
    dropout_add_ln_fwd_vec<T>(h, r, w, b, s, y, rows, n, eps, seed, threshold, scale);           \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dx_warp_##S(const T *x, const T *w, const T *dy,     \
                                                        T *dx, size_t rows, int n, float eps) {  \
    layer_norm_bwd_dx_warp<T, false>(x, w, dy, dx, rows, n, eps, nullptr, 0, 0, 1.f);            \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dx_drop_warp_##S(                                    \
      const T *x, const T *w, const T *dy, T *dx, T *dh, size_t rows, int n, float eps,          \
      uint64_t seed, uint32_t threshold, float drop_scale) {                                     \
    layer_norm_bwd_dx_warp<T, true>(x, w, dy, dx, rows, n, eps, dh, seed, threshold, drop_scale); \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dx_drop_##S(const T *x, const T *w, const T *dy,     \
                                                        T *dx, T *dh, int n, float eps,          \
                                                        uint64_t seed, uint32_t threshold,       \
                                                        float drop_scale) {                      \
    layer_norm_bwd_dx<T, true>(x, w, dy, dx, n, eps, dh, seed, threshold, drop_scale);           \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(32 * LN_FUSED_WARPS, 2) layer_norm_bwd_fused_##S( \
      const T *x, const T *w, const T *dy, T *dx, T *dh, float *partial, size_t rows, int n,      \
      float eps, uint64_t seed, uint32_t threshold, float drop_scale) {                          \
    layer_norm_bwd_fused<T>(x, w, dy, dx, dh, partial, rows, n, eps, seed, threshold,            \
                            drop_scale);                                                         \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 4) layer_norm_bwd_vec_##S(                   \
      const T *x, const T *w, const T *dy, T *dx, T *dh, float *stats, size_t rows, int n,       \
      float eps, uint64_t seed, uint32_t threshold, float drop_scale) {                          \
    layer_norm_bwd_vec<T>(x, w, dy, dx, dh, stats, rows, n, eps, seed, threshold, drop_scale);  \
  }                                                                                              \
  extern "C" __global__ void layer_norm_dwdb_cols_##S(const T *x, const T *dy, const float *stats, \
                                                      float *partial, size_t rows, int n,        \
                                                      int chunk) {                               \
    layer_norm_dwdb_cols<T>(x, dy, stats, partial, rows, n, chunk);                              \
  }                                                                                              \
  extern "C" __global__ void layer_norm_stats_##S(const T *x, float *stats, size_t rows, int n,   \
                                                  float eps) {                                   \
    layer_norm_stats<T>(x, stats, rows, n, eps);                                                 \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dwdb_##S(const T *x, const T *dy, const float *stats, \
                                                     float *dwdb, size_t rows, int n) {          \
    layer_norm_bwd_dwdb<T>(x, dy, stats, dwdb, rows, n);                                         \
  }                                                                                              \
  extern "C" __global__ void softmax_fwd_##S(const T *s, const T *bias, T *p, size_t rows, int k, \
                                             size_t rows_per_batch, float scale) {               \
    softmax_fwd<T, false>(s, bias, p, nullptr, rows, k, rows_per_batch, scale, 0, 0, 1.f);       \
  }                                                                                              \
  extern "C" __global__ void softmax_drop_fwd_##S(const T *s, const T *bias, T *p, T *dropped,   \
                                                  size_t rows, int k, size_t rows_per_batch,     \
                                                  float scale, uint64_t seed,                    \
                                                  uint32_t threshold, float drop_scale) {        \
    softmax_fwd<T, true>(s, bias, p, dropped, rows, k, rows_per_batch, scale, seed, threshold,  \
                         drop_scale);                                                            \
  }                                                                                              \
  extern "C" __global__ void softmax_fwd_vec_##S(const T *s, const T *bias, T *p, size_t rows,     \
                                                 int k, size_t rows_per_batch, float scale) {     \
    softmax_fwd_vec<T, false>(s, bias, p, nullptr, rows, k, rows_per_batch, scale, 0, 0, 1.f);   \
  }                                                                                              \
  extern "C" __global__ void softmax_drop_fwd_vec_##S(                                           \
      const T *s, const T *bias, T *p, T *dropped, size_t rows, int k, size_t rows_per_batch,    \
      float scale, uint64_t seed, uint32_t threshold, float drop_scale) {                        \
    softmax_fwd_vec<T, true>(s, bias, p, dropped, rows, k, rows_per_batch, scale, seed,          \
                             threshold, drop_scale);                                             \
  }                                                                                              \
  extern "C" __global__ void softmax_bwd_##S(const T *p, const T *dp, T *ds, size_t rows, int k, \
                                             float scale, uint64_t seed, uint32_t threshold,     \
                                             float drop_scale) {                                 \
    softmax_bwd<T>(p, dp, ds, rows, k, scale, seed, threshold, drop_scale);                      \
  }                                                                                              \
  extern "C" __global__ void gelu_fwd_##S(const T *x, T *y, size_t n) { gelu_fwd<T>(x, y, n); }  \
  extern "C" __global__ void gelu_bwd_##S(const T *x, const T *dy, T *dx, size_t n) {            \
    gelu_bwd<T>(x, dy, dx, n);                                                                   \
  }                                                                                              \
  extern "C" __global__ void bias_add_##S(const T *x, const T *b, T *y, size_t rows, int n,     \
                                          bool packed) {                                         \
    bias_add<T, false>(x, b, y, nullptr, rows, n, packed);                                       \
  }                                                                                              \
  extern "C" __global__ void bias_gelu_##S(const T *x, const T *b, T *y, T *g, size_t rows,      \
                                           int n, bool packed) {                                 \
    bias_add<T, true>(x, b, y, g, rows, n, packed);                                              \
  }                                                                                              \
  extern "C" __global__ void add_##S(const T *x, const T *y, T *z, size_t n) {                  \
    add<T>(x, y, z, n);                                                                          \
  }                                                                                              \
  extern "C" __global__ void dropout_add_##S(const T *x, const T *r, T *s, size_t n,             \
                                             uint64_t seed, uint32_t threshold, float scale) {   \
    dropout_add<T>(x, r, s, n, seed, threshold, scale);                                          \
  }                                                                                              \
  extern "C" __global__ void dropout_##S(const T *x, T *y, size_t n, uint64_t seed,             \
                                         uint32_t threshold, float scale) {                      \
    dropout<T>(x, y, n, seed, threshold, scale);                                                 \
  }                                                                                              \
  extern "C" __global__ void embedding_fwd_##S(const T *table, const uint32_t *ids, T *out,      \
                                               size_t rows, int n, uint32_t vocab) {             \
    embedding_fwd<T, T>(table, ids, out, rows, n, vocab);                                        \
  }                                                                                              \
  extern "C" __global__ void embedding_sum_fwd_##S(                                              \
      const float *t0, const float *t1, const float *t2, const uint32_t *i0, const uint32_t *i1,   \
      const uint32_t *i2, T *out, size_t rows, int n, uint32_t v0, uint32_t v1, uint32_t v2,       \
      uint32_t tables) {                                                                         \
    embedding_sum_fwd<T>(t0, t1, t2, i0, i1, i2, out, rows, n, v0, v1, v2, tables);              \
  }                                                                                              \
  extern "C" __global__ void embedding_bwd_##S(const T *g, const uint32_t *ids, float *grad,     \
                                               size_t rows, int n) {                             \
    embedding_bwd<T>(g, ids, grad, rows, n);                                                     \
  }                                                                                              \
  extern "C" __global__ void split_sum_##S(const T *x, T *out, size_t n, uint32_t parts) {       \
    split_sum<T>(x, out, n, parts);                                                              \
  }

FOR_TYPES(KERNELS)
