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

#include <cublasLt.h>
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

extern "C" __global__ void copy_bf16(const bf16 *x, bf16 *y, size_t n) {
  map1(x, y, n, [](size_t, float v) { return v; });
}

// Column sums in chunks of rows, for [rows, n] bf16 (n a multiple of 8): thread (x, y) of a
// (32, 8) block sums the 8 columns of pack blockIdx.x * 32 + x over rows y, y + 8, ... of chunk
// blockIdx.y, the pack of each row given by `row(r, c)` (which may write something of its own);
// the block's 8 row groups are added in shared memory into partial[blockIdx.y, :] (f32), and
// colsum_finish adds the chunks in order.
template <typename F>
__device__ void colsum_chunk(float *partial, size_t rows, int n, int chunk, F row) {
  __shared__ float sh[8][32 * 8 + 1];
  const int packs = n / 8;
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const size_t r0 = (size_t)blockIdx.y * chunk;
  const size_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  if (c < packs) {
    for (size_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const Pack<bf16> v = row(r * packs + c);
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

extern "C" __global__ void colsum_partial_bf16(const bf16 *g, float *partial, size_t rows, int n,
                                               int chunk) {
  const Pack<bf16> *gp = reinterpret_cast<const Pack<bf16> *>(g);
  colsum_chunk(partial, rows, n, chunk, [=](size_t i) { return gp[i]; });
}
extern "C" __global__ void colsum_finish_bf16(const float *partial, bf16 *out, int chunks, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int j = 0; j < chunks; j++) s += partial[(size_t)j * n + c];
  out[c] = from_f<bf16>(s);
}

// GELU's backward and the bias gradient (the column sums of du) in one pass: du as gelu_bwd
// writes it, and each chunk's column sums of the rounded du into partial (as colsum_partial).
extern "C" __global__ void gelu_bwd_colsum_bf16(const bf16 *x, const bf16 *dy, bf16 *dx,
                                                float *partial, size_t rows, int n, int chunk) {
  const Pack<bf16> *xp = reinterpret_cast<const Pack<bf16> *>(x);
  const Pack<bf16> *gp = reinterpret_cast<const Pack<bf16> *>(dy);
  Pack<bf16> *op = reinterpret_cast<Pack<bf16> *>(dx);
  colsum_chunk(partial, rows, n, chunk, [=](size_t i) {
    const Pack<bf16> a = xp[i], b = gp[i];
    Pack<bf16> o;
#pragma unroll
    for (int k = 0; k < 8; k++) o.v[k] = from_f<bf16>(gelu_grad_f(to_f(a.v[k]), to_f(b.v[k])));
    op[i] = o;
    return o;
  });
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

// ---- dense products -------------------------------------------------------------------------------
// C (m x n, column-major) = op(A) op(B) over bf16 with f32 accumulation, three ways: as candle 0.11
// calls cuBLAS for a 2-D matmul (cublasGemmStridedBatchedEx, a batch of one, the default tensor-op
// algorithm), as cublasGemmEx, and through cublasLt with its heuristic's first choice and the best
// of its first eight (each timed).
struct Gemm {
  const char *name;
  cublasOperation_t ta, tb;
  int m, n, k, lda, ldb;
};

static cublasLtHandle_t lt;
static void *lt_ws;
static const size_t LT_WS = 32u << 20;

// cublasLt's first choice and the best of its first eight for one product, with an epilogue (its
// vector at `vec`): {ms of #0, ms of the best, the best's index, candidates}; NaN where none ran.
struct LtTimes {
  double first, best;
  int best_i, found;
};

static LtTimes lt_times(const Gemm &g, cublasLtEpilogue_t epi, const bf16 *a, const bf16 *b, bf16 *c,
                        bf16 *vec, bf16 *aux = nullptr) {
  const float one = 1.f, zero = 0.f;
  cublasLtMatmulDesc_t desc;
  cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &g.ta, sizeof(g.ta));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &g.tb, sizeof(g.tb));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
  if (epi == CUBLASLT_EPILOGUE_DGELU) {
    // GELU's input, laid out as C (m x n, leading dimension m), in C's type.
    const int64_t ld = g.m;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof(ld));
  } else if (epi != CUBLASLT_EPILOGUE_DEFAULT) {
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vec, sizeof(vec));
  }
  cublasLtMatrixLayout_t la, lb, lc;
  const bool at = g.ta == CUBLAS_OP_T, bt = g.tb == CUBLAS_OP_T;
  cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, at ? g.k : g.m, at ? g.m : g.k, g.lda);
  cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, bt ? g.n : g.k, bt ? g.k : g.n, g.ldb);
  cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, g.m, g.n, g.m);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &LT_WS,
                                       sizeof(LT_WS));
  cublasLtMatmulHeuristicResult_t res[8];
  int found = 0;
  cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 8, res, &found);
  LtTimes t{NAN, NAN, -1, found};
  for (int i = 0; i < found; i++) {
    const double ms = time_ms([&] {
      cublasLtMatmul(lt, desc, &one, a, la, b, lb, &zero, c, lc, c, lc, &res[i].algo, lt_ws, LT_WS, 0);
    });
    if (i == 0) t.first = ms;
    if (!(ms >= t.best)) t.best = ms, t.best_i = i;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  return t;
}

// GELU backward's time over [rows, 4h] (the row table's "gelu backward"), for the DGELU column.
static double gelu_bwd_ms = NAN;

// One product's row; `epi` (BIAS on a forward, BGRADB on a weight gradient, DGELU on the input
// gradient that feeds GELU's backward, as recycle's cuda_lt runs them) adds the best of eight
// with it, and the epilogue-free pair it replaces: the product then the bias add, the product
// then a column sum (a product with ones), or the product then the GELU backward kernel (whose
// time the row kernels measured: the DGELU column says what the pair costs and what is saved).
static void gemm_rows(cublasHandle_t h, const Gemm &g, const bf16 *a, const bf16 *b, bf16 *c,
                      cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT, bf16 *vec = nullptr,
                      bf16 *aux = nullptr) {
  const float one = 1.f, zero = 0.f;
  const double flop = 2.0 * g.m * g.n * g.k;
  auto tf = [&](double ms) { return flop / (ms * 1e-3) / 1e12; };
  const double candle = time_ms([&] {
    cublasGemmStridedBatchedEx(h, g.ta, g.tb, g.m, g.n, g.k, &one, a, CUDA_R_16BF, g.lda,
                               (long long)g.m * g.k, b, CUDA_R_16BF, g.ldb, (long long)g.n * g.k,
                               &zero, c, CUDA_R_16BF, g.m, (long long)g.m * g.n, 1,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP);
  });
  const double ex = time_ms([&] {
    cublasGemmEx(h, g.ta, g.tb, g.m, g.n, g.k, &one, a, CUDA_R_16BF, g.lda, b, CUDA_R_16BF, g.ldb,
                 &zero, c, CUDA_R_16BF, g.m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP);
  });
  const LtTimes plain = lt_times(g, CUBLASLT_EPILOGUE_DEFAULT, a, b, c, vec);
  printf("%-34s %5d %5d %5d %8.1f %8.1f %8.1f %8.1f  (#%d of %d)", g.name, g.m, g.n, g.k,
         tf(candle), tf(ex), tf(plain.first), tf(plain.best), plain.best_i, plain.found);
  if (epi == CUBLASLT_EPILOGUE_DGELU) {
    const LtTimes with = lt_times(g, epi, a, b, c, vec, aux);
    const double pair = plain.best + gelu_bwd_ms;
    printf("  DGELU best %.1f (#%d of %d): %.4f ms against Lt best + gelu backward %.4f ms (saves %.4f)",
           tf(with.best), with.best_i, with.found, with.best, pair, pair - with.best);
  } else if (epi != CUBLASLT_EPILOGUE_DEFAULT) {
    const LtTimes with = lt_times(g, epi, a, b, c, vec);
    printf("  %s best %.1f (#%d of %d): %.4f ms against candle %.4f ms + its %s",
           epi == CUBLASLT_EPILOGUE_BIAS ? "BIAS" : "BGRADB", tf(with.best), with.best_i,
           with.found, with.best, candle, epi == CUBLASLT_EPILOGUE_BIAS ? "bias add" : "column sum");
  }
  printf("\n");
  fflush(stdout);
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
  ms = time_ms([&] { dropout_bf16<<<grid1(nw / 8), 256>>>(xw, zw, nw, seed, threshold, dscale); });
  {
    // The kept fraction, from the output's zeros (fill draws from a continuum: no zeros in bulk).
    auto hv = host(zw, std::min<size_t>(nw, 1 << 24));
    size_t zeros = 0;
    for (float v : hv) zeros += v == 0.f;
    char b[96];
    snprintf(b, sizeof b, "kept fraction %.4f", 1.0 - (double)zeros / hv.size());
    row("dropout", ms, wbytes2, b);
  }
  ms = time_ms([&] { gelu_fwd_bf16<<<grid1(nw / 8), 256>>>(xw, yw, nw); });
  row("gelu forward", ms, wbytes2);
  bf16 *bw = alloc_bf16(ffn, 5);
  {
    dim3 g((ffn / 8 + 255) / 256, (unsigned)std::min<size_t>(rows, 65535));
    ms = time_ms([&] { bias_add_bf16<<<g, 256>>>(xw, bw, yw, rows, ffn, true); });
    row("bias add [rows, 4h]", ms, wbytes2);
    ms = time_ms([&] { bias_gelu_bf16<<<g, 256>>>(xw, bw, yw, zw, rows, ffn, true); });
    row("bias + gelu, u and g kept", ms, wbytes3);
  }
  ms = time_ms([&] { gelu_bwd_bf16<<<grid1(nw / 8), 256>>>(xw, yw, zw, nw); });
  row("gelu backward", ms, wbytes3);
  gelu_bwd_ms = ms;

  // Column sums (bias gradients) of [rows, 4h].
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS || cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "cuBLAS: no handle\n");
    return 1;
  }
  CK(cudaMalloc(&lt_ws, LT_WS));
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
  row("dropout + residual add [rows, h]", ms, 3 * hb);
  ms = time_ms([&] { add_bf16<<<grid1(nh / 8), 256>>>(xh, yh, zh, nh); });
  row("add [rows, h] (a block backward's dx + ds)", ms, 3 * hb);
  ms = time_ms([&] { layer_norm_fwd_warp_bf16<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(xh, lw, lb, zh, rows, hid, 1e-5f); });
  row("layer norm forward, per element", ms, 2 * hb);
  ms = time_ms([&] { layer_norm_fwd_vec_bf16<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(xh, lw, lb, zh, rows, hid, 1e-5f); });
  row("layer norm forward, 16-byte packs", ms, 2 * hb);
  {
    // The block tail: dropout + residual add, then the packed layer norm (two kernels, as the
    // block nodes ran it), against both in one pass (session 14), with the bytes one pass moves.
    const double two = time_ms([&] {
      dropout_add_bf16<<<grid1(nh / 8), 256>>>(xh, yh, zh, nh, seed, threshold, dscale);
      layer_norm_fwd_vec_bf16<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(zh, lw, lb, dh1, rows, hid, 1e-5f);
    });
    row("dropout + add, then layer norm (2 kernels)", two, 4 * hb);
    ms = time_ms([&] {
      dropout_add_layer_norm_fwd_vec_bf16<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(
          xh, yh, lw, lb, dx2, dh2, rows, hid, 1e-5f, seed, threshold, dscale);
    });
    CK(cudaDeviceSynchronize());
    const std::string n = "s " + diff_note(rel_diff(dx2, zh, nh)) + ", y " + diff_note(rel_diff(dh2, dh1, nh));
    row("dropout + add + layer norm, one pass (s. 14)", ms, 4 * hb, n);
  }
  const unsigned lnb = (unsigned)std::min<size_t>((rows + 15) / 16, 512);
  float *lpart, *dwdb1, *dwdb2, *stats;
  const size_t lchunk = std::max<size_t>(32, ((rows + 255) / 256 + 7) / 8 * 8);
  const unsigned lchunks = (unsigned)((rows + lchunk - 1) / lchunk);
  CK(cudaMalloc(&lpart, (size_t)std::max<size_t>(lnb, lchunks) * 2 * hid * sizeof(float)));
  CK(cudaMalloc(&dwdb1, 2 * hid * sizeof(float)));
  CK(cudaMalloc(&dwdb2, 2 * hid * sizeof(float)));
  CK(cudaMalloc(&stats, 2 * rows * sizeof(float)));
  auto ln_fused = [&](bf16 *dh) {
    layer_norm_bwd_fused_bf16<<<lnb, dim3(32, 8)>>>(xh, lw, yh, zh, dh, lpart, rows, hid, 1e-5f, seed, threshold, dscale);
    layer_norm_dwdb_sum<<<(2 * hid + 31) / 32, dim3(32, 8)>>>(lpart, dwdb1, (int)lnb, 2 * hid);
  };
  auto ln_packed = [&](bf16 *dh) {
    layer_norm_bwd_vec_bf16<<<(unsigned)((rows + 7) / 8), dim3(32, 8)>>>(xh, lw, yh, dx2, dh, stats, rows, hid, 1e-5f, seed, threshold, dscale);
    layer_norm_dwdb_cols_bf16<<<dim3((hid / 8 + 31) / 32, lchunks), dim3(32, 8)>>>(xh, yh, stats, lpart, rows, hid, (int)lchunk);
    layer_norm_dwdb_sum<<<(2 * hid + 31) / 32, dim3(32, 8)>>>(lpart, dwdb2, (int)lchunks, 2 * hid);
  };
  ms = time_ms([&] { ln_fused(dh1); });
  row("layer norm backward + dropout, one pass (s. 10)", ms, 5 * hb);
  ms = time_ms([&] { ln_packed(dh2); });
  CK(cudaDeviceSynchronize());
  {
    std::vector<float> a(2 * hid), b(2 * hid);
    CK(cudaMemcpy(a.data(), dwdb2, 2 * hid * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), dwdb1, 2 * hid * sizeof(float), cudaMemcpyDeviceToHost));
    double d = 0, m = 0;
    for (int i = 0; i < 2 * hid; i++) d = std::max(d, (double)std::fabs(a[i] - b[i])), m = std::max(m, (double)std::fabs(b[i]));
    row("layer norm backward + dropout, packed (s. 12)", ms, 5 * hb,
        diff_note(rel_diff(dx2, zh, nh)) + ", dh " + diff_note(rel_diff(dh2, dh1, nh)) + ", dw db " + diff_note(d / m));
  }
  ms = time_ms([&] { ln_packed(nullptr); });
  row("layer norm backward, no dropout, packed", ms, 4 * hb);
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
       *pb = alloc_bf16(ns, 24), *mask = alloc_bf16((size_t)batch * seq, 26, 0.f, 0.f);
  CK(cudaDeviceSynchronize());
  const double sb = 1.0 * ns * sizeof(bf16);
  const unsigned wr = (unsigned)((sr + 7) / 8);
  const size_t rpb = (size_t)heads * seq;
  ms = time_ms([&] { softmax_fwd_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, sr, seq, rpb, 0.125f); });
  row("softmax, no dropout, per element", ms, 2 * sb);
  ms = time_ms([&] { softmax_fwd_vec_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, sr, seq, rpb, 0.125f); });
  row("softmax, no dropout, chunked", ms, 2 * sb);
  ms = time_ms([&] { softmax_drop_fwd_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, da, sr, seq, rpb, 0.125f, seed, threshold, dscale); });
  row("softmax + dropout, per element", ms, 3 * sb);
  ms = time_ms([&] { softmax_drop_fwd_vec_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, da, sr, seq, rpb, 0.125f, seed, threshold, dscale); });
  row("softmax + dropout, chunked", ms, 3 * sb);
  ms = time_ms([&] { softmax_bwd_bf16<<<wr, dim3(32, 8)>>>(pa, da, pb, sr, seq, 0.125f, seed, threshold, dscale); });
  row("softmax backward through dropout", ms, 3 * sb);

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
  row("q,k,v split x3", ms, 2.0 * nq * sizeof(bf16));
  ms = time_ms([&] { split(true); });
  row("q,k,v split x3, shifts (candidate)", ms, 2.0 * nq * sizeof(bf16));
  ms = time_ms([&] {
    for (int p = 0; p < 3; p++) {
      const uint4 *x = reinterpret_cast<const uint4 *>(q3) + (size_t)p * rows * hid * 2 / 16;
      uint4 *y = reinterpret_cast<uint4 *>(m3) + p * part;
      swap12_u128<<<dim3(seq, batch), 256>>>(x, y, batch, heads, seq, du, seq * du, xrow);
    }
  });
  row("q,k,v merge x3", ms, 2.0 * nq * sizeof(bf16));

  // The dense layers' products at this batch: y = x W^T (forward), dx = dy W, dW = dy^T x, in
  // TFLOP/s, as candle calls cuBLAS and through cublasLt.
  printf("\n%-34s %5s %5s %5s %8s %8s %8s %8s\n", "product (column-major m n k)", "m", "n", "k",
         "candle", "GemmEx", "Lt #0", "Lt best");
  {
    const int M = (int)rows;
    const size_t big = std::max<size_t>((size_t)M * ffn, (size_t)8192 * 8192);
    bf16 *A = alloc_bf16(big, 41, -1.f, 1.f), *B = alloc_bf16(big, 42, -1.f, 1.f), *C = alloc_bf16(big, 43);
    bf16 *V = alloc_bf16(8192, 44, -1.f, 1.f);  // the epilogues' bias (or its gradient)
    bf16 *U = alloc_bf16((size_t)M * ffn, 45, -3.f, 3.f);  // DGELU's GELU input, [M, 4h]
    const struct { const char *layer; int in, out; } layers[] = {
        {"h->h", hid, hid}, {"h->3h", hid, 3 * hid}, {"h->4h", hid, ffn}, {"4h->h", ffn, hid}};
    for (const auto &L : layers) {
      char n1[64], n2[64], n3[64];
      snprintf(n1, sizeof n1, "%s x.W^T", L.layer);
      snprintf(n2, sizeof n2, "%s dy.W", L.layer);
      snprintf(n3, sizeof n3, "%s dW = dy^T.x", L.layer);
      // candle's gemm_config: x [M, in] . W^T (W [out, in]): TN, m' = out, n' = M, k = in.
      gemm_rows(h, {n1, CUBLAS_OP_T, CUBLAS_OP_N, L.out, M, L.in, L.in, L.in}, A, B, C,
                CUBLASLT_EPILOGUE_BIAS, V);
      // dy [M, out] . W [out, in]: NN, m' = in, n' = M, k = out. The feed-forward block's second
      // layer (4h -> h) feeds GELU's backward: with DGELU there.
      if (L.in == ffn)
        gemm_rows(h, {n2, CUBLAS_OP_N, CUBLAS_OP_N, L.in, M, L.out, L.in, L.out}, A, B, C,
                  CUBLASLT_EPILOGUE_DGELU, nullptr, U);
      else
        gemm_rows(h, {n2, CUBLAS_OP_N, CUBLAS_OP_N, L.in, M, L.out, L.in, L.out}, A, B, C);
      // dy^T [out, M] . x [M, in]: NT, m' = in, n' = out, k = M.
      gemm_rows(h, {n3, CUBLAS_OP_N, CUBLAS_OP_T, L.in, L.out, M, L.in, L.out}, A, B, C,
                CUBLASLT_EPILOGUE_BGRADB, V);
    }
    gemm_rows(h, {"ceiling 8192^3", CUBLAS_OP_T, CUBLAS_OP_N, 8192, 8192, 8192, 8192, 8192}, A, B, C);
  }
  // Last, since a fault in them would end the process: attention's core in one pass
  // (flash_fwd_bf16 / flash_bwd_bf16, dropout 0.1; off in training unless chosen) against the
  // unfused core it would replace, timed here too: the per-head products as strided batched
  // cuBLAS calls over split heads (QK^T, PV; backward dO V^T, P^T dO, dS K, dS^T Q) with the
  // chunked softmax forward and the softmax backward between them. The heads' split and merge
  // are not counted (training keeps the heads in place). TFLOP/s counts each side's own products:
  // 4 b h s^2 d forward, 8 unfused backward, 10 in one pass (the scores are recomputed).
  printf("\n%-46s %9s %9s\n", "attention core (batch, 12 heads, seq 128, d 64)", "ms", "TFLOP/s");
  {
    const int count = batch * heads, s = seq, d = hd;
    const double fl = 2.0 * count * (double)s * s * d;  // one product's FLOPs
    float *lse;
    CK(cudaMalloc(&lse, sr * sizeof(float)));
    bf16 *ctx = alloc_bf16(rows * hid, 51), *dctx = alloc_bf16(rows * hid, 52, -0.1f, 0.1f);
    bf16 *dqkv = alloc_bf16(nq, 53);
    const int chunks = (s + FA_BWD_KEYS - 1) / FA_BWD_KEYS;
    float *dq_acc = nullptr;
    if (chunks > 1) CK(cudaMalloc(&dq_acc, rows * hid * sizeof(float)));
    CK(cudaDeviceSynchronize());
    auto attn_row = [](const char *name, double ms, double flops) {
      printf("%-46s %9.4f %9.1f\n", name, ms, flops / (ms * 1e-3) / 1e12);
      fflush(stdout);
    };
    auto fwd = [&] {
      flash_fwd_bf16<<<dim3((s + 63) / 64, heads, batch), 32 * FA_FWD_WARPS>>>(
          qkv, mask, ctx, lse, s, heads, 0.125f, seed, threshold, dscale);
    };
    ms = time_ms(fwd);
    attn_row("one pass: forward (flash_fwd_bf16)", ms, 2 * fl);
    const double flash_fwd_ms = ms;
    ms = time_ms([&] {
      if (dq_acc) CK(cudaMemsetAsync(dq_acc, 0, rows * hid * sizeof(float)));
      flash_bwd_bf16<<<dim3(heads, batch, chunks), 32 * (std::min(s, FA_BWD_KEYS) / 16)>>>(
          qkv, mask, ctx, dctx, lse, dqkv, dq_acc, s, heads, 0.125f, seed, threshold, dscale);
      if (dq_acc) flash_dq_bf16<<<1024, 256>>>(dq_acc, dqkv, rows, hid);
    });
    attn_row("one pass: backward (flash_bwd_bf16)", ms, 5 * fl);
    const double flash_ms = flash_fwd_ms + ms;
    // Unfused, over [count, s, d] heads (q3: q, k, v; m3: the context and its gradient) and
    // [count, s, s] scores (sc, pa, da, pb). Column-major: a row-major X [r, c] is X^T [c, r].
    const size_t hs = (size_t)s * d, ss = (size_t)s * s;
    bf16 *Q = q3, *K = q3 + (size_t)count * hs, *V = q3 + 2 * (size_t)count * hs;
    bf16 *O = m3, *dO = m3 + (size_t)count * hs, *dQ = dqkv, *dK = dqkv + (size_t)count * hs,
         *dV = dqkv + 2 * (size_t)count * hs;
    const float one = 1.f, zero = 0.f;
    auto bgemm = [&](cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const bf16 *A,
                     int lda, size_t sa, const bf16 *B, int ldb, size_t sb_, bf16 *C, int ldc,
                     size_t sc_) {
      if (cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &one, A, CUDA_R_16BF, lda, (long long)sa, B,
                                     CUDA_R_16BF, ldb, (long long)sb_, &zero, C, CUDA_R_16BF, ldc,
                                     (long long)sc_, count, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT_TENSOR_OP) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "kernel bench: batched product failed\n");
        exit(1);
      }
    };
    ms = time_ms([&] {
      // S = Q K^T (S^T = K Q^T), P = softmax with dropout, O = P V (O^T = V^T P^T).
      bgemm(CUBLAS_OP_T, CUBLAS_OP_N, s, s, d, K, d, hs, Q, d, hs, sc, s, ss);
      softmax_drop_fwd_vec_bf16<<<wr, dim3(32, 8)>>>(sc, mask, pa, da, sr, seq, rpb, 0.125f, seed,
                                                     threshold, dscale);
      bgemm(CUBLAS_OP_N, CUBLAS_OP_N, d, s, s, V, d, hs, da, s, ss, O, d, hs);
    });
    attn_row("unfused: forward (2 products + softmax)", ms, 2 * fl);
    const double unfused_fwd_ms = ms;
    ms = time_ms([&] {
      // dP = dO V^T, dV = drop(P)^T dO, dS = softmax backward, dQ = dS K, dK = dS^T Q.
      bgemm(CUBLAS_OP_T, CUBLAS_OP_N, s, s, d, V, d, hs, dO, d, hs, pb, s, ss);
      bgemm(CUBLAS_OP_N, CUBLAS_OP_T, d, s, s, dO, d, hs, da, s, ss, dV, d, hs);
      softmax_bwd_bf16<<<wr, dim3(32, 8)>>>(pa, pb, sc, sr, seq, 0.125f, seed, threshold, dscale);
      bgemm(CUBLAS_OP_N, CUBLAS_OP_N, d, s, s, K, d, hs, sc, s, ss, dQ, d, hs);
      bgemm(CUBLAS_OP_N, CUBLAS_OP_T, d, s, s, Q, d, hs, sc, s, ss, dK, d, hs);
    });
    attn_row("unfused: backward (4 products + softmax)", ms, 4 * fl);
    const double unfused_ms = unfused_fwd_ms + ms;
    printf("%-46s %9.2f\n", "one pass over unfused (forward + backward, x)", unfused_ms / flash_ms);
    CK(cudaFree(lse));
    if (dq_acc) CK(cudaFree(dq_acc));
  }

  CK(cudaDeviceSynchronize());
  printf("kernel bench: done\n");
  return 0;
}
