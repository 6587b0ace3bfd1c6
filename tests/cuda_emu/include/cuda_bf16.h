// A CPU stand-in for the CUDA toolkit, for `tests/cuda_emu/check.cpp` only: kernels.cu includes
// <cuda_bf16.h>, and with `-I tests/cuda_emu/include` it gets this file instead, which supplies
// what those kernels use of CUDA so that the same source compiles as C++ and runs on the CPU.
//
// How a launch runs: the blocks of the grid one after another, and the threads of a block as OS
// threads, concurrently, so that __syncthreads (a barrier per block), warp shuffles (an exchange
// slot per thread and a barrier per warp) and __shared__ (static storage: one block runs at a time)
// behave as on a GPU. A thread that returns leaves its barriers, as an exited CUDA thread no longer
// takes part in them. Atomics take a lock. __trap ends the calling thread and marks the launch.
// __nv_bfloat16 is 16 bits with round-to-nearest-even conversion, as the device's.
//
// What this cannot show: speed, memory coalescing, races between blocks of one launch (they run
// one at a time), and anything the GPU's compiler does differently from the host's. the tensor
// cores' one instruction kernels.cu uses is in include/tensor_core.h.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> slots;
  // The tensor-core stand-in's exchange area (tensor_core.h): six registers and a call number a
  // thread.
  std::vector<uint32_t> regs;
  std::vector<uint64_t> stamps;
};
inline thread_local Block *block = nullptr;
inline thread_local unsigned tid = 0;
inline std::mutex atomics;
struct Trap {};
inline bool trapped = false;
}  // namespace emu

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { emu::block->all->arrive_and_wait(); }

// The warp's barrier: every lane of the warp arrives before any goes on.
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warps[emu::tid >> 5]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned w = emu::tid >> 5, lane = emu::tid & 31;
  emu::block->slots[emu::tid] = v;
  emu::block->warps[w]->arrive_and_wait();
  const float r = emu::block->slots[(w << 5) | (lane ^ unsigned(lane_mask))];
  emu::block->warps[w]->arrive_and_wait();
  return r;
}

inline float atomicAdd(float *a, float v) {
  std::lock_guard<std::mutex> g(emu::atomics);
  const float old = *a;
  *a = old + v;
  return old;
}

[[noreturn]] inline void __trap() { throw emu::Trap{}; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}

namespace emu {
// Runs `kernel()` as a launch of `grid` blocks of `threads` threads. Returns false when a thread
// trapped.
template <typename F>
bool launch(dim3 grid, dim3 threads, F kernel) {
  const unsigned n = threads.x * threads.y * threads.z;
  bool any_trap = false;
  std::mutex trap_lock;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        Block b;
        b.all = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w * 32 < n; w++)
          b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
        b.slots.assign(n, 0.f);
        b.regs.assign(size_t(n) * 6, 0u);
        b.stamps.assign(n, 0u);
        std::vector<std::thread> ts;
        ts.reserve(n);
        for (unsigned t = 0; t < n; t++)
          ts.emplace_back([&, t] {
            block = &b;
            tid = t;
            threadIdx = {};
            threadIdx.x = t % threads.x;
            threadIdx.y = (t / threads.x) % threads.y;
            threadIdx.z = t / (threads.x * threads.y);
            blockIdx = {};
            blockIdx.x = bx;
            blockIdx.y = by;
            blockIdx.z = bz;
            blockDim = threads;
            gridDim = grid;
            try {
              kernel();
            } catch (const Trap &) {
              std::lock_guard<std::mutex> g(trap_lock);
              any_trap = true;
            }
            b.all->arrive_and_drop();
            b.warps[t >> 5]->arrive_and_drop();
          });
        for (auto &t : ts) t.join();
      }
  return !any_trap;
}
}  // namespace emu
