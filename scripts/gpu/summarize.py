"""Joins `recycle gpu-check` and scripts/gpu/torch_gpu_bench.py output (JSON lines) into the
report scripts/gpu/run.sh writes: parity verdicts, examples/s side by side, recycle/torch ratios
and MFU against the bf16 matmul ceiling measured in the same run.

    python3 scripts/gpu/summarize.py recycle.jsonl torch.jsonl > gpu-report.txt
"""

import json
import sys


def read(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    except OSError as e:
        print(f"(cannot read {path}: {e})")
    return rows


def main():
    rows = [r for p in sys.argv[1:] for r in read(p)]
    versions = {json.dumps(r, sort_keys=True) for r in rows if r["kind"] == "versions"}
    for v in sorted(versions):
        print("versions: " + ", ".join(f"{k} {x}" for k, x in json.loads(v).items() if k != "kind"))
    errors = [r for r in rows if r["kind"] == "error"]
    if errors:
        print(f"== {len(errors)} FAILED measurement(s)")
        for r in errors:
            where = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("kind", "error"))
            print(f"FAILED {where}: {r['error']}")
        print()
    for r in rows:
        if r["kind"] == "note":
            print(f"NOTE: {r['note']}")
    parity = [r for r in rows if r["kind"] == "parity"]
    print("== parity (device vs CPU f32)")
    if not parity:
        print("no parity rows: the recycle run did not get that far")
    for r in parity:
        verdict = "PASS" if r["pass"] else "FAIL"
        # Parity rows carry a difference; the dropout checks a measured value (kept fraction, 0/1).
        label = "value" if r["case"] == "dropout" else "max|diff|"
        print(f"{verdict} {r['case']:<11} {r['precision']:<5} {r['what']:<46} "
              f"{label} {r['max_abs_diff']:.2e} (tol {r['tol']:.1e})")
    ceilings = {r["impl"]: r["tflops"] for r in rows if r["kind"] == "matmul"}
    print("\n== bf16 matmul ceiling (TFLOP/s)")
    for k, v in ceilings.items():
        print(f"{k:<8} {v:8.1f}")
    peak = max(ceilings.values()) if ceilings else None
    bench = [r for r in rows if r["kind"] == "bench"]
    key = lambda r: (r["shape"], r["precision"], r["mode"], r["batch"])
    # Rows with a "config" time a chosen set of levers (run.sh's last stages), apart from these.
    ours = {key(r): r for r in bench if r["impl"] == "recycle" and "config" not in r}
    chosen = [r for r in bench if r["impl"] == "recycle" and "config" in r]
    theirs = {}
    for r in bench:
        if r["impl"].startswith("torch"):
            theirs.setdefault(key(r), {})[r["impl"]] = r
    print("\n== throughput (examples/s), ratios recycle/torch, MFU = TFLOP/s over the ceiling")
    print(f"{'shape':<18}{'prec':<6}{'mode':<7}{'batch':>6}{'recycle':>10}{'eager':>10}{'sdpa':>10}"
          f"{'r/eager':>9}{'r/sdpa':>8}{'MFU':>7}")
    for k in sorted(set(ours) | set(theirs)):
        o = ours.get(k)
        t = theirs.get(k, {})
        e, s = t.get("torch-eager"), t.get("torch-sdpa")
        f = lambda r: f"{r['examples_per_s']:10.1f}" if r else f"{'-':>10}"
        ratio = lambda r: f"{o['examples_per_s'] / r['examples_per_s']:8.2f}" if o and r else f"{'-':>8}"
        mfu = f"{100 * o['tflops'] / peak:6.1f}%" if o and peak else f"{'-':>7}"
        print(f"{k[0]:<18}{k[1]:<6}{k[2]:<7}{k[3]:>6}{f(o)}{f(e)}{f(s)} {ratio(e)}{ratio(s)}{mfu}")
    phases = [r for r in rows if r["kind"] == "phases"]
    if phases:
        print("\n== training step phases (ms per step, device drained after each phase; host: "
              "until the call returned, before draining)")
        print(f"{'shape':<18}{'prec':<6}{'batch':>6} {'impl':<15}{'forward':>9}{'backward':>9}{'norm':>7}"
              f"{'fwd host':>9}{'bwd host':>9}  optimizer")
        for r in sorted(phases, key=lambda r: (r["shape"], r["precision"], r["batch"], r["impl"])):
            opt = r["optimizer_s"]
            opt = (", ".join(f"{k} {1e3 * v:.1f}" for k, v in opt.items())
                   if isinstance(opt, dict) else f"{1e3 * opt:.1f}")
            norm = f"{1e3 * r['grad_norm_s']:7.1f}" if "grad_norm_s" in r else f"{'-':>7}"
            hosts = "".join(f"{1e3 * r[k]:9.1f}" if k in r else f"{'-':>9}"
                            for k in ("forward_host_s", "backward_host_s"))
            print(f"{r['shape']:<18}{r['precision']:<6}{r['batch']:>6} {r['impl']:<15}"
                  f"{1e3 * r['forward_s']:9.1f}{1e3 * r['backward_s']:9.1f}{norm}{hosts}  {opt}")
    kernels = [r for r in rows if r["kind"] == "kernels"]
    if kernels:
        print("\n== inference forward: fused kernels vs composed ops (ms per batch)")
        print(f"{'shape':<18}{'prec':<6}{'batch':>6}{'fused':>9}{'composed':>10}{'speed-up':>10}")
        for r in sorted(kernels, key=lambda r: (r["shape"], r["precision"], r["batch"])):
            print(f"{r['shape']:<18}{r['precision']:<6}{r['batch']:>6}{1e3 * r['fused_s']:9.1f}"
                  f"{1e3 * r['composed_s']:10.1f}{r['composed_s'] / r['fused_s']:9.2f}x")
    ab = [r for r in rows if r["kind"] == "ab"]
    if ab:
        print("\n== training with a switch on and off, same run (ms per step)")
        print(f"{'switch':<40}{'shape':<18}{'prec':<6}{'batch':>6}{'on':>9}{'off':>9}{'speed-up':>10}")
        for r in sorted(ab, key=lambda r: (r["what"], r["shape"], r["precision"], r["batch"])):
            print(f"{r['what']:<40}{r['shape']:<18}{r['precision']:<6}{r['batch']:>6}"
                  f"{1e3 * r['on_s']:9.1f}{1e3 * r['off_s']:9.1f}{r['off_s'] / r['on_s']:9.2f}x")
        # The switches that training leaves off (measured "on" against the default): what the
        # training figure would be with them on.
        print("-- training with a switch that is off by default turned on")
        for r in sorted(ab, key=lambda r: (r["what"], r["shape"], r["precision"], r["batch"])):
            if not ("split" in r["what"] or "flash" in r["what"]):
                continue
            base = ours.get((r["shape"], r["precision"], "train", r["batch"]))
            if not base:
                continue
            eps = r["batch"] / r["on_s"]
            mfu = (f", MFU {100 * eps * base['flops_per_example'] / 1e12 / peak:.1f}%"
                   if peak else "")
            print(f"{r['what']:<40}{r['shape']:<18}{r['precision']:<6}{r['batch']:>6}"
                  f"  {eps:.1f} examples/s{mfu}")
    # The roberta-base bf16 training batches measured (the main stage's, 128 and 256).
    batches = sorted({k[3] for k in ours if k[:3] == ("roberta-base", "bf16", "train")})
    ops = [r for r in rows if r["kind"] == "op"]
    if ops:
        print("\n== op by op (ms; x = runs per roberta-base step; share of the sum of count x fwd+bwd)")
        groups = sorted({(r["precision"], r["batch"]) for r in ops})
        for prec, batch in groups:
            rs = [r for r in ops if (r["precision"], r["batch"]) == (prec, batch)]
            total = sum(r["count"] * r["forward_backward_s"] for r in rs)
            print(f"-- {prec}, batch {batch}: sum {1e3 * total:.1f} ms")
            for r in sorted(rs, key=lambda r: -r["count"] * r["forward_backward_s"]):
                part = r["count"] * r["forward_backward_s"]
                print(f"{r['name']:<46}{1e3 * r['forward_s']:8.3f}{1e3 * r['forward_backward_s']:8.3f}"
                      f"  x{r['count']:<3}{1e3 * part:8.2f}{100 * part / total if total else 0:6.1f}%")
    gemm = [r for r in rows if r["kind"] == "gemm"]
    if gemm:
        print("\n== dense layers' products alone (TFLOP/s): forward, input gradient, weight gradient"
              " unsplit and split over the rows in 2, 4, 8")
        splits = sorted({r["parts"] for r in gemm if r["product"] == "dy^T.x"})
        head = "".join(f"{'dW/' + str(p):>8}" for p in splits)
        for prec, batch in sorted({(r["precision"], r["batch"]) for r in gemm}):
            print(f"-- {prec}, batch {batch} ({batch * gemm[0]['seq']} rows)")
            print(f"{'layer':<26}{'x.W^T':>8}{'dy.W':>8}{head}")
            rs = [r for r in gemm if (r["precision"], r["batch"]) == (prec, batch)]
            for layer in dict.fromkeys(r["layer"] for r in rs):
                got = {(r["product"], r["parts"]): r["tflops"] for r in rs if r["layer"] == layer}
                cell = lambda k: f"{got[k]:8.1f}" if k in got else f"{'-':>8}"
                print(f"{layer:<26}{cell(('x.W^T', 0))}{cell(('dy.W', 0))}"
                      + "".join(cell(("dy^T.x", p)) for p in splits))
    def verdicts(batch, label):
        """The MFU target at `batch` (whether it is met), and the ratio to torch eager against its
        goal where torch ran at that batch."""
        t = ours.get(("roberta-base", "bf16", "train", batch))
        met = None
        if t and peak:
            mfu = 100 * t["tflops"] / peak
            met = mfu >= 40
            print(f"\n{label}: roberta-base bf16 train MFU {mfu:.1f}% (goal >= 40%): "
                  + ("met" if met else "NOT met"))
        e = theirs.get(("roberta-base", "bf16", "train", batch), {}).get("torch-eager")
        if t and e:
            r = t["examples_per_s"] / e["examples_per_s"]
            print(f"{label}: roberta-base bf16 train vs torch eager {r:.2f}x (goal >= 1): "
                  + ("met" if r >= 1 else "NOT met"))
        return met

    # The targets at every batch measured: the issue names none (only seq 128), the study's
    # protocol trains at 256, and the main stage's batch (the smallest) is the launch-bound end.
    met = {n: verdicts(n, f"batch {n}" + (" (the study's batch)" if n == 256 else ""))
           for n in batches}
    if any(v is not None for v in met.values()):
        says = lambda want: ", ".join(str(n) for n, v in met.items() if v is want) or "none"
        print(f"\nMFU >= 40% at seq 128: met at batch(es) {says(True)}; not at {says(False)}")

    # The levers together as the A/B rows chose them (or LEVERS set them): the same verdicts, and
    # the ratio to the defaults' row at the same batch.
    for r in sorted(chosen, key=lambda r: (r["config"], r["batch"])):
        # (roberta-base-tiny: DEVICE=cpu's check of the control flow.)
        if not r["shape"].startswith("roberta-base") or (r["precision"], r["mode"]) != ("bf16", "train"):
            continue
        base = ours.get(key(r))
        levers = r.get("levers", {})
        flipped = [f"{k}={int(v)}" for k, v in sorted(levers.items())
                   if base and base.get("levers", {}).get(k) != v]
        label = f"batch {r['batch']}, levers '{r['config']}' ({' '.join(flipped) or 'as the defaults'})"
        mfu = f"MFU {100 * r['tflops'] / peak:.1f}% (goal >= 40%): " + (
            "met" if 100 * r["tflops"] / peak >= 40 else "NOT met") if peak else "no ceiling measured"
        print(f"\n{label}: {r['shape']} bf16 train {r['examples_per_s']:.1f} examples/s, {mfu}")
        # Against the step without them, timed in the same process in interleaved rounds.
        pair = next((a for a in ab if a["what"] == "the chosen levers together"
                     and a.get("config") == r["config"] and key(a) == key(r)), None)
        if pair:
            print(f"{label}: against the switches as they were, same process, interleaved: "
                  f"{pair['off_s'] / pair['on_s']:.3f}x ({1e3 * pair['on_s']:.1f} against "
                  f"{1e3 * pair['off_s']:.1f} ms a step)")
        if base:
            print(f"{label}: against the defaults' row of the batch-{r['batch']} stage "
                  f"{r['examples_per_s'] / base['examples_per_s']:.3f}x")
        e = theirs.get(key(r), {}).get("torch-eager")
        if e:
            print(f"{label}: against torch eager {r['examples_per_s'] / e['examples_per_s']:.2f}x")

if __name__ == "__main__":
    main()
