#!/usr/bin/env python3
"""The PyTorch + transformers peer of benches/train_step.rs and benches/inference.rs.

Same work as the Rust benches: a MiniLM-L6-shaped BertForSequenceClassification with random weights
(normal std 0.02), 2 labels, dropout 0.1; batches of 32 random-token sequences ([CLS] ... [SEP]) of
exactly 128 and 64 tokens; a training step is forward + cross-entropy + backward + grad-norm clip at
1.0 + AdamW (lr 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01); inference is eval mode under
torch.inference_mode(). The first step/batch warms up and is not timed. Threads: 2 (intra-op and
inter-op), as on the benchmark machine.

Prints lines `RESULT <name> <value>` that scripts/bench/compare.sh reads; the names match those the
Rust benches print.

usage: torch_bench.py [train|infer|all] [--reps N] [--threads N]
"""

import argparse
import resource
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POS = 30522, 384, 6, 12, 1536, 512


def model():
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=MAX_POS,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        num_labels=2,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg)


def batch(gen, seq):
    ids = torch.randint(1000, VOCAB, (32, seq), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(32, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(32, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (32,), generator=gen),
    }


def peak_rss_mb():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(reps):
    m = model()
    m.train()
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
    groups = [
        {"params": [p for n, p in m.named_parameters() if not no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in m.named_parameters() if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    for seq in (128, 64):
        secs = []
        for _ in range(reps + 1):
            b = batch(gen, seq)
            start = time.perf_counter()
            out = m(**b)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            secs.append(time.perf_counter() - start)
        timed = secs[1:]
        rate = 32 * len(timed) / sum(timed)
        print(f"train  batch 32  seq {seq:>3}: {rate:.1f} examples/s ({32 / rate:.3f}s/step)")
        print(f"RESULT train_seq{seq} {rate:.3f}")
    print(f"RESULT train_peak_rss_mb {peak_rss_mb():.0f}")


def infer(reps):
    m = model()
    m.eval()
    gen = torch.Generator().manual_seed(1)
    for seq in (128, 64):
        batches = [batch(gen, seq) for _ in range(reps + 1)]
        for b in batches:
            b.pop("labels")
        with torch.inference_mode():
            m(**batches[0])
            start = time.perf_counter()
            for b in batches[1:]:
                m(**b).logits.tolist()
            rate = 32 * reps / (time.perf_counter() - start)
        print(f"infer  batch 32  seq {seq:>3}: {rate:.1f} examples/s")
        print(f"RESULT infer_seq{seq} {rate:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["train", "infer", "all"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.what in ("train", "all"):
        train(args.reps)
    if args.what in ("infer", "all"):
        infer(args.reps)


if __name__ == "__main__":
    main()
