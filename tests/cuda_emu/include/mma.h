// A CPU stand-in for the part of CUDA's <mma.h> (wmma, the tensor cores' 16x16x16 tiles) that
// kernels.cu uses, for tests/cuda_emu/check.cpp only. Every lane holds the whole tile (a GPU
// spreads it over the warp's registers in an unspecified layout, which the kernels never look at):
// loads read the whole tile in each lane, mma_sync multiplies bf16 operands with f32 accumulation,
// and a store writes each element from one lane (element e from lane e % 32), so a kernel that
// reads a stored tile in other lanes without __syncwarp races here as on a GPU. Pointers and
// leading dimensions are checked as the hardware requires (32-byte alignment; ldm a multiple of
// 8 elements for bf16, 4 for f32): a violation traps the launch.
#pragma once

#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles");
  T v[16][16];
};

template <typename T>
inline void check_operand(const T *p, unsigned ldm) {
  const unsigned multiple = sizeof(T) == 2 ? 8 : 4;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % multiple != 0) __trap();
}

inline float as_f(float x) { return x; }
inline float as_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, typename T>
inline void fill_fragment(fragment<Use, 16, 16, 16, T> &f, float x) {
  for (auto &row : f.v)
    for (auto &e : row) e = x;
}

template <typename Use, typename T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major> &f, const T *p, unsigned ldm) {
  check_operand(p, ldm);
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++) f.v[r][c] = p[size_t(r) * ldm + c];
}

template <typename Use, typename T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major> &f, const T *p, unsigned ldm) {
  check_operand(p, ldm);
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++) f.v[r][c] = p[size_t(c) * ldm + r];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p,
                             unsigned ldm, layout_t layout) {
  check_operand(p, ldm);
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++)
      f.v[r][c] = layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t layout) {
  check_operand(p, ldm);
  for (int e = int(emu::tid & 31); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.v[r][c];
  }
}

template <typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c) {
  float out[16][16];
  for (int r = 0; r < 16; r++)
    for (int col = 0; col < 16; col++) {
      float acc = c.v[r][col];
      for (int k = 0; k < 16; k++) acc += as_f(a.v[r][k]) * as_f(b.v[k][col]);
      out[r][col] = acc;
    }
  for (int r = 0; r < 16; r++)
    for (int col = 0; col < 16; col++) d.v[r][col] = out[r][col];
}
}  // namespace wmma
}  // namespace nvcuda
