"""The PyTorch + transformers side of scripts/gpu/run.sh: the same workload as `recycle gpu-check`
(MiniLM-L6- and roberta-base-shaped classifiers with random weights, AdamW training steps and
eval forwards at the same batch and sequence length, f32 and bf16 autocast), plus a large bf16
matmul as the card's ceiling. One JSON line per measurement on stdout, in gpu-check's schema.

    python3 scripts/gpu/torch_gpu_bench.py --device cuda
    python3 scripts/gpu/torch_gpu_bench.py --device cpu --tiny --batch 4 --seq 16 --steps 2
"""

import argparse
import contextlib
import json
import sys
import time

import torch
import transformers

SHAPES = {
    # name: (model_type, vocab, hidden, layers, heads, intermediate)
    "minilm": ("bert", 30522, 384, 6, 12, 1536),
    "roberta-base": ("roberta", 50265, 768, 12, 12, 3072),
}


def config(name, tiny, attn):
    model_type, vocab, hidden, layers, heads, inter = SHAPES[name]
    if tiny:
        vocab, hidden, layers, heads, inter = 1000, 64, 2, 4, 128
    roberta = model_type == "roberta"
    cls = transformers.RobertaConfig if roberta else transformers.BertConfig
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=514 if roberta else 512,
        type_vocab_size=1 if roberta else 2,
        pad_token_id=1 if roberta else 0,
        num_labels=2,
        attn_implementation=attn,
    )


def forward_flops(cfg, seq):
    h, i, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    dense = l * (4 * h * h + 2 * h * i)
    return seq * (2 * dense + l * 4 * seq * h)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# Rounds of `steps` timed calls; the median round counts (as in recycle's gpu-check).
ROUNDS = 3


def time_it(device, warmup, steps, f):
    for _ in range(warmup):
        f()
    rounds = []
    for _ in range(ROUNDS):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            f()
        sync(device)
        rounds.append((time.perf_counter() - t) / max(steps, 1))
    return sorted(rounds)[len(rounds) // 2]


def emit(**kv):
    print(json.dumps(kv), flush=True)


def bench(name, attn, precision, args, device):
    cfg = config(name, args.tiny, attn)
    torch.manual_seed(0)
    cls = (
        transformers.RobertaForSequenceClassification
        if cfg.model_type == "roberta"
        else transformers.BertForSequenceClassification
    )
    model = cls(cfg).to(device)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    # The step transformers' Trainer takes (max_grad_norm 1.0) and recycle takes: backward, clip
    # by the global gradient norm, AdamW.
    def train_step():
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    train = time_it(device, args.warmup, args.steps, train_step)

    def infer_step():
        with torch.inference_mode(), autocast:
            model(input_ids=ids, attention_mask=mask)

    phases = {"forward_s": 0.0, "backward_s": 0.0, "grad_norm_s": 0.0, "optimizer_s": 0.0}
    for step in range(args.warmup + args.steps):
        laps = []
        t = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        sync(device)
        laps.append(time.perf_counter())
        loss.backward()
        sync(device)
        laps.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sync(device)
        laps.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        laps.append(time.perf_counter())
        if step >= args.warmup:
            for k, (a, b) in zip(phases, zip([t] + laps, laps)):
                phases[k] += (b - a) / args.steps

    model.eval()
    infer = time_it(device, args.warmup, args.steps, infer_step)
    fwd = forward_flops(cfg, args.seq)
    shape = name + ("-tiny" if args.tiny else "")
    for mode, secs, flops in (("train", train, 3 * fwd), ("infer", infer, fwd)):
        eps = args.batch / secs
        emit(kind="bench", impl=f"torch-{attn}", shape=shape, precision=precision, mode=mode,
             batch=args.batch, seq=args.seq, examples_per_s=eps, flops_per_example=flops,
             tflops=eps * flops / 1e12, device=str(device))
        print(f"torch: {shape} {attn} {precision} {mode}: {eps:.1f} examples/s", file=sys.stderr)
    emit(kind="phases", impl=f"torch-{attn}", shape=shape, precision=precision, batch=args.batch,
         seq=args.seq, device=str(device), **phases)
    print(f"torch: {shape} {attn} {precision} phases: "
          + ", ".join(f"{k[:-2]} {1e3 * v:.1f} ms" for k, v in phases.items()), file=sys.stderr)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_ceiling(n, device):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    secs = time_it(device, 2, 10, lambda: a @ b)
    return 2 * n**3 / secs / 1e12


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="minilm,roberta-base")
    p.add_argument("--precisions", default="f32,bf16")
    # eager is the named baseline; sdpa is transformers' default and shown for reference.
    p.add_argument("--attn", default="eager,sdpa")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--matmul", type=int, default=8192)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    # Plain f32 (no TF32), as candle's default cuBLAS f32 gemm.
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device}",
          file=sys.stderr)
    emit(kind="versions", impl="torch", torch=torch.__version__,
         transformers=transformers.__version__, cuda=torch.version.cuda,
         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if args.matmul > 0:
        tf = matmul_ceiling(args.matmul, device)
        emit(kind="matmul", impl="torch", n=args.matmul, dtype="bf16", tflops=tf,
             device=str(device))
        print(f"torch: bf16 matmul {args.matmul}^3: {tf:.1f} TFLOP/s", file=sys.stderr)
    failed = False
    for name in args.shapes.split(","):
        for attn in args.attn.split(","):
            for precision in args.precisions.split(","):
                # One failing configuration must not cost the others of a single GPU run.
                try:
                    bench(name, attn, precision, args, device)
                except Exception as e:  # noqa: BLE001 (reported, and the exit code says so)
                    failed = True
                    emit(kind="error", impl=f"torch-{attn}", stage="bench", shape=name,
                         precision=precision, error=repr(e))
                    print(f"torch: FAILED {name} {attn} {precision}: {e!r}", file=sys.stderr)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
