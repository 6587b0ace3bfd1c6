#!/usr/bin/env python3
"""Generates the parity fixtures in tests/fixtures/parity/<case>/ with transformers as the reference.

Each case directory holds a tiny random checkpoint saved with save_pretrained(safe_serialization=True)
(config.json, model.safetensors) and:
  expected.safetensors  the padded batch (input_ids, attention_mask, token_type_ids, labels) and the
                        reference outputs: logits (eval mode), loss, grad.<param name> for a few named
                        parameters, logits_after_adamw (eval logits after 5 AdamW steps).
  optimizer.json        the exact optimizer settings of those 5 steps, the learning rate of each step,
                        and which parameter names got weight decay.

Run:  /work/venv-ref/bin/python scripts/parity/make_fixtures.py   (from the repository root)
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    DebertaV2Config,
    DistilBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "parity")
SEQ = 12
VOCAB = 40
HIDDEN = 16
HEADS = 4
INTER = 24
LAYERS = 2
NUM_LABELS = 3
STEPS = 5
LR = 1e-3
WD = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8
WARMUP = 1
MAX_NORM = 1.0


def bert_config(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=INTER, max_position_embeddings=SEQ + 4, type_vocab_size=2, pad_token_id=0, **kw)


def roberta_like(cls, **kw):
    return cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTER, max_position_embeddings=SEQ + 2 + 2, type_vocab_size=1, pad_token_id=1,
               bos_token_id=0, eos_token_id=2, **kw)


def distilbert_config(**kw):
    return DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
                            max_position_embeddings=SEQ + 4, pad_token_id=0, **kw)


def deberta_v3_config(**kw):
    """v3-style: shared attention keys, log-bucketed positions (seq 12 > buckets / 2), normalised
    relative embeddings, no absolute positions, no token types."""
    return DebertaV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=INTER, max_position_embeddings=SEQ + 4, type_vocab_size=0,
                           relative_attention=True, position_buckets=8, max_relative_positions=-1,
                           pos_att_type="p2c|c2p", share_att_key=True, position_biased_input=False,
                           norm_rel_ebd="layer_norm", pad_token_id=0, **kw)


def deberta_v2_config(**kw):
    """v2-xlarge-style: separate position projections, clamped (unbucketed) relative positions, the
    first-layer convolution, absolute positions, token types, and a factorised embedding (embed_proj)."""
    return DebertaV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=INTER, max_position_embeddings=SEQ + 4, type_vocab_size=2,
                           relative_attention=True, position_buckets=-1, max_relative_positions=8,
                           pos_att_type=["c2p", "p2c"], share_att_key=False, position_biased_input=True,
                           conv_kernel_size=3, conv_act="gelu", embedding_size=12, pad_token_id=0, **kw)


def batch(style, gen):
    """Four right-padded rows: two single texts, two pairs; special tokens as the tokenizer would place them."""
    if style == "bert":
        cls_, sep, pad = 2, 3, 0
    else:
        cls_, sep, pad = 0, 2, 1
    shapes = [(7, None), (10, None), (3, 4), (4, 4)]
    ids, mask, types = [], [], []
    for a, b in shapes:
        ta = torch.randint(5, VOCAB, (a,), generator=gen).tolist()
        row, tt = [cls_] + ta + [sep], [0] * (a + 2)
        if b is not None:
            tb = torch.randint(5, VOCAB, (b,), generator=gen).tolist()
            extra = ([sep] if style == "roberta" else []) + tb + [sep]
            row += extra
            tt += [1] * len(extra)
        m = [1] * len(row)
        row += [pad] * (SEQ - len(row))
        tt += [0] * (SEQ - len(tt))
        m += [0] * (SEQ - len(m))
        ids.append(row)
        mask.append(m)
        types.append(tt)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(types)


def randomise(model, gen):
    """Weights far from the near-zero default initialisation, so every term of the forward matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                    continue
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def no_decay(model):
    names = set()
    for mod_name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if pname == "bias" or isinstance(mod, torch.nn.LayerNorm):
                names.add(full)
    return names


def lr_at(step):
    """transformers' get_linear_schedule_with_warmup(WARMUP, STEPS) factor at `step` (0-based)."""
    if step < WARMUP:
        return step / max(1, WARMUP)
    return max(0.0, (STEPS - step) / max(1, STEPS - WARMUP))


def make_case(case, model, style, grad_names, regression=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randomise(model, gen)
    d = os.path.join(OUT, case)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    ids, mask, types = batch(style, gen)
    if regression:
        labels = torch.randn(ids.shape[0], generator=gen)
    else:
        labels = torch.tensor([0, 2, 1, 2])
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if style == "bert" and not case.startswith("distilbert"):
        kwargs["token_type_ids"] = types
    model.eval()  # dropout off for every reference output
    out = model(**kwargs, labels=labels)
    out.loss.backward()
    params = dict(model.named_parameters())
    tensors = {
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "token_type_ids": types.to(torch.int64),
        "labels": labels,
        "logits": out.logits.detach(),
        "loss": out.loss.detach().reshape(1),
    }
    for n in grad_names:
        tensors[f"grad.{n}"] = params[n].grad.detach().clone()
    model.zero_grad()

    skip = no_decay(model)
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in skip], "weight_decay": WD},
        {"params": [p for n, p in model.named_parameters() if n in skip], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    lrs = []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        loss = model(**kwargs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        tensors["logits_after_adamw"] = model(**kwargs).logits
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "expected.safetensors"))
    settings = {
        "optimizer": "torch.optim.AdamW",
        "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
        "no_weight_decay": "biases and nn.LayerNorm parameters",
        "no_decay_params": sorted(skip),
        "schedule": f"linear warm-up {WARMUP} step, then linear decay to 0 at step {STEPS}",
        "steps": STEPS, "lr_per_step": lrs,
        "grad_clip_max_norm": MAX_NORM, "grad_clip": "torch.nn.utils.clip_grad_norm_ over all parameters",
        "dropout": "model.eval(): no dropout",
        "loss": "MSE" if regression else "cross-entropy (mean over the batch)",
        "torch": torch.__version__,
    }
    with open(os.path.join(d, "optimizer.json"), "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")


def make_bare_bert():
    """A sentence-transformers-style encoder: BertModel saved without the `bert.` prefix, no head."""
    gen = torch.Generator().manual_seed(7)
    model = BertModel(bert_config(), add_pooling_layer=False)
    randomise(model, gen)
    d = os.path.join(OUT, "bert_bare")
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    ids, mask, types = batch("bert", gen)
    model.eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    save_file({"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
               "last_hidden_state": hidden.contiguous()}, os.path.join(d, "expected.safetensors"))


def make_buckets():
    """transformers' make_log_bucket_position at DeBERTa-v3's settings (256 buckets, 512 positions)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
    rel = torch.arange(-600, 601)
    buckets = make_log_bucket_position(rel, 256, 512).to(torch.long)
    with open(os.path.join(OUT, "deberta_buckets.json"), "w") as f:
        json.dump({"bucket_size": 256, "max_position": 512, "relative": rel.tolist(), "bucket": buckets.tolist()}, f)
        f.write("\n")


def main():
    torch.manual_seed(0)
    bert_grads = ["bert.embeddings.word_embeddings.weight",
                  "bert.encoder.layer.0.attention.self.query.weight",
                  "bert.encoder.layer.1.output.LayerNorm.weight",
                  "classifier.weight"]
    rob_grads = ["roberta.embeddings.word_embeddings.weight",
                 "roberta.encoder.layer.0.attention.self.query.weight",
                 "roberta.encoder.layer.1.output.LayerNorm.weight",
                 "classifier.out_proj.weight"]
    distil_grads = ["distilbert.embeddings.word_embeddings.weight",
                    "distilbert.transformer.layer.0.attention.q_lin.weight",
                    "distilbert.transformer.layer.1.output_layer_norm.weight",
                    "classifier.weight"]
    deb_grads = ["deberta.embeddings.word_embeddings.weight",
                 "deberta.encoder.layer.0.attention.self.query_proj.weight",
                 "deberta.encoder.layer.1.output.LayerNorm.weight",
                 "deberta.encoder.rel_embeddings.weight",
                 "classifier.weight"]
    cases = [
        ("bert", lambda: bert_config(num_labels=NUM_LABELS), "bert", bert_grads, False),
        ("bert_regression", lambda: bert_config(num_labels=1, problem_type="regression"), "bert", bert_grads, True),
        ("roberta", lambda: roberta_like(RobertaConfig, num_labels=NUM_LABELS), "roberta", rob_grads, False),
        ("xlm-roberta", lambda: roberta_like(XLMRobertaConfig, num_labels=NUM_LABELS), "roberta", rob_grads, False),
        ("distilbert", lambda: distilbert_config(num_labels=NUM_LABELS), "bert", distil_grads, False),
        ("deberta-v3", lambda: deberta_v3_config(num_labels=NUM_LABELS), "bert", deb_grads, False),
        ("deberta-v2", lambda: deberta_v2_config(num_labels=NUM_LABELS),  "bert",
         deb_grads + ["deberta.encoder.conv.conv.weight", "deberta.encoder.layer.0.attention.self.pos_key_proj.weight"],
         False),
    ]
    only = set(sys.argv[1:])
    for i, (case, cfg, style, grads, regression) in enumerate(cases):
        if only and case not in only:
            continue
        torch.manual_seed(i)
        model = AutoModelForSequenceClassification.from_config(cfg())
        make_case(case, model, style, grads, regression=regression, seed=100 + i)
        print("wrote", case)
    if not only or "buckets" in only:
        make_buckets()
        print("wrote deberta_buckets.json")
    if not only or "bert_bare" in only:
        make_bare_bert()
        print("wrote bert_bare")


if __name__ == "__main__":
    main()
