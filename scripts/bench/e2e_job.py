#!/usr/bin/env python3
"""The PyTorch + transformers peer of one recycle job (issue 6's end-to-end target).

Does what `recycle run` does for a (model, target) cell, the way a transformers user would write
it (the shape of transformers' `run_glue_no_trainer.py`): tokenize every split with the model's
tokenizer (padding to `--max-length`, run_glue's default, or dynamic padding per batch with
`--padding dynamic`), fine-tune a fresh classification head with AdamW (no weight decay on biases
and LayerNorm weights), a linear schedule with warm-up, gradient clipping at 1.0 and dropout on,
evaluate dev after every epoch, stop after `--patience` epochs without improvement, restore the best
weights and score the test split. Repeats for every seed. Prints one `RESULT` line per seed and the
total wall time of the process (imports included, as a user would wait for them).

Reads a recycle dataset directory (dataset.json + JSON-lines splits `train`, `validation`, `test`).
Used by scripts/bench/e2e.sh, which runs it alternately with `recycle run` on the same data.
"""

import argparse
import copy
import json
import math
import os
import random
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    get_linear_schedule_with_warmup,
)


def read_split(dataset_dir, card, name):
    split = next(s for s in card["splits"] if s["name"] == name)
    cols = card["columns"]
    texts, pairs, labels = [], [], []
    with open(os.path.join(dataset_dir, split["file"]), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row[cols["text"]])
            if cols.get("text_pair"):
                pairs.append(row[cols["text_pair"]])
            labels.append(int(row[cols["label"]]))
    return texts, (pairs or None), labels


def encode(tok, split, max_length, padding):
    texts, pairs, labels = split
    enc = tok(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        padding="max_length" if padding == "max_length" else False,
    )
    return [
        (enc["input_ids"][i], enc["attention_mask"][i], enc.get("token_type_ids", [None] * len(labels))[i], labels[i])
        for i in range(len(labels))
    ]


def collate(rows, pad_id):
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tt = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, m, t, _) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        mask[i, : len(m)] = torch.tensor(m)
        if t is not None:
            tt[i, : len(t)] = torch.tensor(t)
    labels = torch.tensor([r[3] for r in rows])
    return ids, mask, tt, labels


@torch.inference_mode()
def accuracy(model, rows, batch, pad_id):
    model.eval()
    right = 0
    for i in range(0, len(rows), batch):
        ids, mask, tt, labels = collate(rows[i : i + batch], pad_id)
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        right += (logits.argmax(-1) == labels).sum().item()
    return right / len(rows)


def one_seed(args, card, encoded, pad_id, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    n_labels = len(card["task"]["labels"])
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=n_labels)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    train = encoded["train"]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = get_linear_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * total), total)
    best, best_state, since = None, None, 0
    t = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(train)))
        random.shuffle(order)
        for s in range(steps_per_epoch):
            rows = [train[j] for j in order[s * args.batch_size : (s + 1) * args.batch_size]]
            ids, mask, tt, labels = collate(rows, pad_id)
            loss = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        dev = accuracy(model, encoded["validation"], args.eval_batch_size, pad_id)
        if best is None or dev > best:
            best, best_state, since = dev, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if args.patience and since >= args.patience:
                break
    model.load_state_dict(best_state)
    test = accuracy(model, encoded["test"], args.eval_batch_size, pad_id)
    return best, test, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--dataset", required=True, help="recycle dataset directory")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--patience", type=int, default=1, help="epochs without dev improvement before stopping; 0 never stops")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.006)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--padding", choices=["max_length", "dynamic"], default="max_length")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)

    with open(os.path.join(args.dataset, "dataset.json"), encoding="utf-8") as f:
        card = json.load(f)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"))
    tok.pad_token = tok.pad_token or "[PAD]"
    pad_id = tok.convert_tokens_to_ids(tok.pad_token)
    encoded = {
        name: encode(tok, read_split(args.dataset, card, name), args.max_length, args.padding)
        for name in ("train", "validation", "test")
    }
    for seed in range(args.seeds):
        dev, test, secs = one_seed(args, card, encoded, pad_id, seed)
        print(f"seed {seed}: dev {dev:.4f} test {test:.4f} ({secs:.1f} s)", flush=True)
        print(f"RESULT seed{seed}_test {test:.6f}")
    print(f"RESULT wall_s {time.perf_counter() - T0:.3f}")


if __name__ == "__main__":
    main()
