// A kernel tracer for a process on a GPU machine (no profiler there): a CUPTI injection library.
// With CUDA_INJECTION64_PATH=libtrace.so and RECYCLE_TRACE=<file>, the CUDA driver loads it at
// initialisation; it records every kernel, memcpy and memset on the GPU, every driver-API call on
// the host (cuLaunchKernel and the rest) and every host synchronisation, and writes them as text
// at exit, one line each (times in ns, one clock for host and GPU):
//   K start end correlation name          a kernel
//   A start end correlation cbid           a driver-API call (cbid: CUPTI's callback id)
//   S start end type                       a host synchronisation (cuStreamSynchronize, ...)
//   M start end bytes kind                 a memcpy (kind: CUPTI's, 1 HtoD, 2 DtoH, 8 DtoD)
//   Z start end bytes                      a memset
// benches/cuda/trace_summary.py reads the file. Built by benches/cuda/run.sh against the CUPTI of
// the CUDA 13.0 wheels (scripts/cuda/install-toolkit.sh).

#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace {

FILE *out = nullptr;
std::mutex lock;
constexpr size_t BUF = 8u << 20;

void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = static_cast<uint8_t *>(aligned_alloc(8, BUF));
  *size = BUF;
  *max_records = 0;
}

void CUPTIAPI completed(CUcontext, uint32_t, uint8_t *buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> g(lock);
  CUpti_Activity *r = nullptr;
  while (out && cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    switch (r->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
      auto *k = reinterpret_cast<CUpti_ActivityKernel10 *>(r);
      fprintf(out, "K %llu %llu %u %s\n", (unsigned long long)k->start,
              (unsigned long long)k->end, k->correlationId, k->name ? k->name : "?");
      break;
    }
    case CUPTI_ACTIVITY_KIND_DRIVER:
    case CUPTI_ACTIVITY_KIND_RUNTIME: {
      auto *a = reinterpret_cast<CUpti_ActivityAPI *>(r);
      fprintf(out, "A %llu %llu %u %u\n", (unsigned long long)a->start,
              (unsigned long long)a->end, a->correlationId, a->cbid);
      break;
    }
    case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
      auto *s = reinterpret_cast<CUpti_ActivitySynchronization2 *>(r);
      fprintf(out, "S %llu %llu %d\n", (unsigned long long)s->start, (unsigned long long)s->end,
              (int)s->type);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      auto *m = reinterpret_cast<CUpti_ActivityMemcpy6 *>(r);
      fprintf(out, "M %llu %llu %llu %d\n", (unsigned long long)m->start,
              (unsigned long long)m->end, (unsigned long long)m->bytes, (int)m->copyKind);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      auto *m = reinterpret_cast<CUpti_ActivityMemset4 *>(r);
      fprintf(out, "Z %llu %llu %llu\n", (unsigned long long)m->start,
              (unsigned long long)m->end, (unsigned long long)m->bytes);
      break;
    }
    default:
      break;
    }
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
  if (dropped && out) fprintf(out, "# dropped %zu records\n", dropped);
  free(buffer);
}

void finish() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> g(lock);
  if (out) {
    fclose(out);
    out = nullptr;
  }
}

bool enable(CUpti_ActivityKind kind, const char *what) {
  const CUptiResult r = cuptiActivityEnable(kind);
  if (r != CUPTI_SUCCESS) {
    const char *msg = nullptr;
    cuptiGetResultString(r, &msg);
    fprintf(stderr, "trace: cannot record %s: %s\n", what, msg ? msg : "?");
    return false;
  }
  return true;
}

}  // namespace

extern "C" int InitializeInjection(void) {
  const char *path = getenv("RECYCLE_TRACE");
  if (!path) return 1;
  out = fopen(path, "w");
  if (!out) {
    fprintf(stderr, "trace: cannot write %s\n", path);
    return 1;
  }
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) {
    fprintf(stderr, "trace: CUPTI refused the buffer callbacks\n");
    return 1;
  }
  bool ok = enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, "kernels");
  enable(CUPTI_ACTIVITY_KIND_DRIVER, "driver calls");
  enable(CUPTI_ACTIVITY_KIND_SYNCHRONIZATION, "synchronisations");
  enable(CUPTI_ACTIVITY_KIND_MEMCPY, "copies");
  enable(CUPTI_ACTIVITY_KIND_MEMSET, "memsets");
  atexit(finish);
  fprintf(stderr, "trace: recording into %s%s\n", path, ok ? "" : " (no kernels)");
  return 1;
}
