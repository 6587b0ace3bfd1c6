// A CPU stand-in for the one tensor-core instruction kernels.cu uses, `mma.sync.aligned.m16n8k16
// .row.col.f32.bf16.bf16.f32` (kernels.cu issues it as inline PTX under nvcc and includes this file
// otherwise), for tests/cuda_emu/check.cpp only.
//
// The instruction is a warp's: each lane hands in its registers of A (16 x 16), B (16 x 8) and the
// accumulator, and gets back its part of D = A B + C. The stand-in does the same: every lane
// writes its registers to the block's exchange area, the warp meets at its barrier, each lane
// rebuilds the whole A and B from all 32 lanes' registers by the layout the PTX ISA documents
// (the fragments of mma.m16n8k16 for .bf16), multiplies in f32, and keeps its own four results.
// So a kernel that puts an element in the wrong register, or the wrong half of one, computes a
// wrong product here as it would on a GPU. Lanes must arrive together: each lane numbers its
// calls, and a lane that finds another lane of its warp at a different call (one that exited, or
// skipped this product) traps the launch, as a diverged warp is undefined on a GPU.
#pragma once

#include "cuda_bf16.h"

namespace emu {
inline thread_local uint64_t mma_calls = 0;

inline float bf16_lo(uint32_t r) { return __bfloat162float(__nv_bfloat16{uint16_t(r & 0xffffu)}); }
inline float bf16_hi(uint32_t r) { return __bfloat162float(__nv_bfloat16{uint16_t(r >> 16)}); }
}  // namespace emu

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Block &blk = *emu::block;
  const unsigned w = emu::tid >> 5, lane = emu::tid & 31;
  const uint64_t call = ++emu::mma_calls;
  uint32_t *mine = &blk.regs[size_t(emu::tid) * 6];
  for (int e = 0; e < 4; e++) mine[e] = a[e];
  mine[4] = b0;
  mine[5] = b1;
  blk.stamps[emu::tid] = call;
  blk.warps[w]->arrive_and_wait();
  bool together = true;
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; l++) {
    const unsigned other = (w << 5) | l;
    if (other >= blk.stamps.size() || blk.stamps[other] != call) {
      together = false;
      break;
    }
    const uint32_t *r = &blk.regs[size_t(other) * 6];
    const int g = int(l >> 2), t = int(l & 3);
    // a[0]: row g, columns 2t, 2t+1; a[1]: row g+8; a[2]: row g, columns 2t+8, 2t+9; a[3]: row g+8.
    for (int e = 0; e < 4; e++) {
      const int row = g + 8 * (e & 1), col = 2 * t + 8 * (e >> 1);
      A[row][col] = emu::bf16_lo(r[e]);
      A[row][col + 1] = emu::bf16_hi(r[e]);
    }
    // b0: rows 2t, 2t+1 of column g; b1: rows 2t+8, 2t+9.
    for (int e = 0; e < 2; e++) {
      B[2 * t + 8 * e][g] = emu::bf16_lo(r[4 + e]);
      B[2 * t + 8 * e + 1][g] = emu::bf16_hi(r[4 + e]);
    }
  }
  blk.warps[w]->arrive_and_wait();  // every lane has read the exchange area
  if (!together) __trap();
  const int g = int(lane >> 2), t = int(lane & 3);
  // d[0], d[1]: row g, columns 2t, 2t+1; d[2], d[3]: row g+8.
  for (int e = 0; e < 4; e++) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
    d[e] = acc;
  }
}
