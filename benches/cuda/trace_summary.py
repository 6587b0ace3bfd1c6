#!/usr/bin/env python3
"""Summarises a kernel trace of benches/cuda/trace.cpp (standard library only: it runs on the GPU
machine). The GPU's work falls into bursts separated by idle stretches longer than --gap (the host
draining the device between rounds of timed steps); the bursts with at least --min-kernels kernels
are the workload's (training steps), and for them it reports:

- the wall time of the bursts against the time some kernel, copy or set ran (busy), and the idle
  remainder split by gap length, with the share of idle time the GPU spent waiting for the host: a
  gap after which the next kernel's launch call had not yet returned when the GPU went idle;
- host synchronisations and copies inside the bursts;
- the kernels by total time (count, total, mean, share of busy time);
- the host's driver calls inside the bursts by total time, and the longest single calls (a
  memory pool growing again after a synchronisation shows as long `cuMemAllocAsync` calls).

Usage: trace_summary.py TRACE [--gap-us 300] [--min-kernels N (0: within 10% of the largest burst)]
                        [--steps N (steps a burst, for per-step figures)]
"""
import argparse
import collections
import sys


def parse(path):
    kernels, api, syncs, copies, sets = [], {}, [], [], []
    dropped = 0
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("# dropped"):
                dropped = max(dropped, int(line.split()[2]))
                continue
            parts = line.rstrip("\n").split(" ", 4)
            kind = parts[0]
            if kind == "K" and len(parts) == 5:
                kernels.append((int(parts[1]), int(parts[2]), int(parts[3]), parts[4]))
            elif kind == "A" and len(parts) >= 5:
                api[int(parts[3])] = (int(parts[1]), int(parts[2]), int(parts[4]))
            elif kind == "S" and len(parts) >= 4:
                syncs.append((int(parts[1]), int(parts[2]), int(parts[3])))
            elif kind == "M" and len(parts) >= 5:
                copies.append((int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4])))
            elif kind == "Z" and len(parts) >= 4:
                sets.append((int(parts[1]), int(parts[2]), int(parts[3])))
    return kernels, api, syncs, copies, sets, dropped


# CUPTI's driver-API callback ids (cupti_driver_cbid.h, CUDA 13) of the calls a training step makes.
DRIVER_CALLS = {
    17: "cuCtxSynchronize", 118: "cuEventCreate", 119: "cuEventRecord",
    121: "cuEventSynchronize", 126: "cuStreamSynchronize", 216: "cuMemsetD8Async",
    220: "cuMemsetD32Async", 243: "cuMemAlloc_v2", 245: "cuMemFree_v2", 276: "cuMemcpyHtoD_v2",
    277: "cuMemcpyHtoDAsync_v2", 278: "cuMemcpyDtoH_v2", 279: "cuMemcpyDtoHAsync_v2",
    281: "cuMemcpyDtoDAsync_v2", 295: "cuStreamWaitEvent", 307: "cuLaunchKernel",
    325: "cuEventDestroy_v2", 442: "cuLaunchKernel_ptsz", 598: "cuMemAllocAsync",
    599: "cuMemAllocAsync_ptsz", 600: "cuMemFreeAsync", 601: "cuMemFreeAsync_ptsz",
    602: "cuMemPoolTrimTo", 652: "cuLaunchKernelEx",
}


def call_name(cbid):
    return DRIVER_CALLS.get(cbid, f"driver call {cbid}")


def short(name, width=72):
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gap-us", type=float, default=300.0)
    ap.add_argument("--min-kernels", type=int, default=200)
    ap.add_argument("--steps", type=int, default=0, help="steps per burst, for per-step figures")
    a = ap.parse_args()
    kernels, api, syncs, copies, sets, dropped = parse(a.trace)
    if not kernels:
        print("trace summary: no kernels in the trace")
        return 1
    # GPU work in start order: (start, end, kind, payload)
    work = [(s, e, "K", (c, n)) for s, e, c, n in kernels]
    work += [(s, e, "M", (b, k)) for s, e, b, k in copies]
    work += [(s, e, "Z", (b,)) for s, e, b in sets]
    work.sort()
    gap = a.gap_us * 1e3
    bursts, cur, cur_end = [], [], 0
    for w in work:
        if cur and w[0] - cur_end > gap:
            bursts.append(cur)
            cur = []
        if not cur:
            cur_end = w[1]
        cur.append(w)
        cur_end = max(cur_end, w[1])
    if cur:
        bursts.append(cur)
    counts = [sum(1 for w in b if w[2] == "K") for b in bursts]
    # --min-kernels 0: the bursts within a tenth of the largest's kernel count (the timed rounds,
    # not the warm-up).
    least = a.min_kernels if a.min_kernels > 0 else 0.9 * max(counts)
    chosen = [b for b, c in zip(bursts, counts) if c >= least]
    print(f"trace summary: {len(kernels)} kernels, {len(copies)} copies, {len(sets)} sets, "
          f"{len(syncs)} host synchronisations; {len(bursts)} bursts, {len(chosen)} with at least "
          f"{least:.0f} kernels" + (f"; CUPTI dropped {dropped} records" if dropped else ""))
    if not chosen:
        return 1
    wall = busy = 0
    idle = collections.Counter()
    idle_n = collections.Counter()
    host_wait = 0
    per_name = collections.defaultdict(lambda: [0, 0])
    n_kernels = 0
    other = collections.defaultdict(lambda: [0, 0])  # memsets and copies on the GPU
    buckets = [(5e3, "< 5 us"), (20e3, "5-20 us"), (100e3, "20-100 us"), (float("inf"), ">= 100 us")]
    for b in chosen:
        start, end = b[0][0], max(w[1] for w in b)
        wall += end - start
        reach = start
        for w in b:
            if w[0] > reach:
                g = w[0] - reach
                label = next(lbl for lim, lbl in buckets if g < lim)
                idle[label] += g
                idle_n[label] += 1
                # The GPU waited for the host where this kernel's launch call returned after
                # the GPU had gone idle.
                if w[2] == "K":
                    call = api.get(w[3][0])
                    if call and call[1] > reach:
                        host_wait += min(g, call[1] - reach)
            busy += max(0, w[1] - max(w[0], reach))
            reach = max(reach, w[1])
            if w[2] == "K":
                n_kernels += 1
                per_name[w[3][1]][0] += 1
                per_name[w[3][1]][1] += w[1] - w[0]
            else:
                label = "memset" if w[2] == "Z" else f"memcpy kind {w[3][1]}"
                other[label][0] += 1
                other[label][1] += w[1] - w[0]
    steps = a.steps * len(chosen) if a.steps else 0
    per = (lambda ns: f"{ns / 1e6 / steps:8.3f} ms/step") if steps else (lambda ns: "")
    print(f"\nbursts chosen: {len(chosen)}, {n_kernels} kernels"
          + (f", {n_kernels / steps:.0f} a step" if steps else ""))
    print(f"wall {wall / 1e6:10.2f} ms {per(wall)}")
    print(f"busy {busy / 1e6:10.2f} ms {per(busy)}  ({100 * busy / wall:.1f}% of wall)")
    tot_idle = wall - busy
    print(f"idle {tot_idle / 1e6:10.2f} ms {per(tot_idle)}  ({100 * tot_idle / wall:.1f}%), of which "
          f"waiting for a launch call {host_wait / 1e6:.2f} ms ({100 * host_wait / max(tot_idle, 1):.0f}%)")
    for _, label in buckets:
        print(f"  gaps {label:>10}: {idle_n[label]:7d} gaps, {idle[label] / 1e6:8.2f} ms")
    lo, hi = chosen[0][0][0], max(w[1] for w in chosen[-1])
    inside = [s for s in syncs if lo <= s[0] <= hi]
    sync_time = sum(e - s for s, e, _ in inside)
    print(f"host synchronisations inside the bursts' span: {len(inside)} ({sync_time / 1e6:.2f} ms "
          f"of host time)")
    cps = [c for c in copies if lo <= c[0] <= hi]
    kinds = collections.Counter(c[3] for c in cps)
    print(f"copies inside: {len(cps)} ({dict(kinds)}; kind 1 HtoD, 2 DtoH, 8 DtoD), "
          f"{sum(c[1] - c[0] for c in cps) / 1e6:.2f} ms on the GPU")
    for label, (count, total) in sorted(other.items()):
        print(f"{label} on the GPU inside the bursts: {count} ({count / steps:.0f} a step), "
              f"{total / 1e6:.2f} ms" if steps else f"{label}: {count}, {total / 1e6:.2f} ms")
    calls = collections.defaultdict(lambda: [0, 0])
    longest = []
    for start, end, cbid in api.values():
        if lo <= start <= hi:
            calls[cbid][0] += 1
            calls[cbid][1] += end - start
            longest.append((end - start, start - lo, cbid))
    if calls:
        print(f"\n{'driver call (host)':32s} {'count':>7s} {'total ms':>9s} {'mean us':>8s}"
              + (f" {'ms/step':>8s}" if steps else ""))
        for cbid, (count, total) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"{call_name(cbid):32s} {count:7d} {total / 1e6:9.2f} {total / count / 1e3:8.1f}"
                  + (f" {total / 1e6 / steps:8.3f}" if steps else ""))
        print("longest single calls: " + ", ".join(
            f"{call_name(c)} {d / 1e3:.0f} us at +{at / 1e6:.1f} ms"
            for d, at, c in sorted(longest, reverse=True)[:6]))
    print(f"\n{'kernel':72s} {'count':>7s} {'total ms':>9s} {'mean us':>8s} {'busy %':>6s}")
    for name, (count, total) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"{short(name):72s} {count:7d} {total / 1e6:9.2f} {total / count / 1e3:8.1f} "
              f"{100 * total / busy:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
