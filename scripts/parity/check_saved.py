#!/usr/bin/env python3
"""Loads checkpoints that recycle saved with transformers and checks them against recycle's logits.

Usage (from the repository root):
  RECYCLE_KEEP_SAVED=/tmp/saved cargo test --test it models::save_then_load
  /work/venv-ref/bin/python scripts/parity/check_saved.py /tmp/saved
Each /tmp/saved/<case> is loaded with AutoModelForSequenceClassification; the script fails on any
missing or unexpected key, and prints the max difference of its eval logits on the fixture batch
from recycle's (saved by the test as recycle_logits.safetensors).
"""

import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "parity")


def main(root):
    ok = True
    for case in sorted(os.listdir(root)):
        d = os.path.join(root, case)
        model, info = AutoModelForSequenceClassification.from_pretrained(d, output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        exp = load_file(os.path.join(FIX, case, "expected.safetensors"))
        kwargs = dict(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"])
        if case.startswith("bert") or case.startswith("deberta"):
            kwargs["token_type_ids"] = exp["token_type_ids"]
        with torch.no_grad():
            logits = model(**kwargs).logits
        ours = load_file(os.path.join(d, "recycle_logits.safetensors"))["logits"]
        diff = (logits - ours).abs().max().item()
        print(f"{case}: {type(model).__name__} problem_type={model.config.problem_type} "
              f"id2label={model.config.id2label} loading issues={bad or 'none'} max|logits diff|={diff:.2e}")
        ok = ok and not bad and diff < 1e-4
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])
