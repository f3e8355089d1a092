"""Controlled runs behind issue 11: why does the tiny default's cross-encoder not learn?

Each run trains the reranking path alone (no embedding loss, its own gradient clipping) on the synthetic task's
train.jsonl and reports the group-CE / BCE trajectory and the held-out group accuracy (the positive scored above
all n_neg negatives of its group; chance = 1 / (1 + n_neg)) on the last --holdout training examples, which the
run never trains on. What can vary, one thing at a time:

    --base DIR          an HF base directory (default: the tiny random base of configs/tiny.yaml, written once)
    --params lora|full  LoRA rerank expert on the frozen base (rank_only) | every base weight trains too
    --head yesno|linear logit("yes") - logit("no") | a linear head on the last hidden state
    --loss group|bce    group softmax CE | pointwise BCE
    --negs hard|random  train.jsonl's negatives (lexical traps first) | random corpus documents
    --lr, --steps, --batch

    OMP_NUM_THREADS=1 python benchmarks/tiny_rerank_diagnosis.py --params full --negs random --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
import unimoer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(args) -> tuple:
    over = ["--train.mode=rank_only", f"--train.rerank_head={args.head}", f"--train.rerank_loss={args.loss}",
            f"--train.out_dir={args.work}", f"--data.dir={args.data}"] + list(args.override)
    if args.base:
        over.append(f"--model.path={args.base}")
    cfg = config.load_config(os.path.join(REPO, args.config), over)
    cfg = train.prepare(cfg, 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    params = unimoer.trainable_parameters(um)
    if args.params == "full":
        base = [p for n, p in um.base.named_parameters() if "lora_" not in n and "router" not in n]
        for p in base:
            p.requires_grad_(True)
        params = params + base
    return cfg, um, params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--base", default=None)
    p.add_argument("--work", default="/tmp/tiny_diag")
    p.add_argument("--params", choices=["lora", "full"], default="lora")
    p.add_argument("--head", choices=["yesno", "linear"], default="yesno")
    p.add_argument("--loss", choices=["group", "bce"], default="group")
    p.add_argument("--negs", choices=["hard", "random", "mixed"], default="hard",
                   help="mixed: the first n_neg - 1 hard negatives and one random document")
    p.add_argument("--template", choices=["full", "none"], default="full",
                   help="none: the pair is `query EOS document EOS` without the Qwen3-Reranker prompt (52 tokens)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--holdout", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args, args.override = p.parse_known_args(argv)  # the rest: --section.key=value config overrides
    torch.manual_seed(args.seed)
    cfg, um, params = build(args)
    n_neg = cfg.data.n_neg
    if args.template == "none":  # diagnosis only: how much does the long constant prompt dilute the signal?
        um.prefix_ids, um.suffix_ids = [], [um.tok.eos_id]
        um.cfg.data.rerank_instruction = ""
    examples = train.train_examples(cfg)
    if args.negs != "hard":
        corpus = [data.doc_text(d) for d in data.load_corpus(cfg.data.dir).values()]
        rng = random.Random(args.seed)
        n_rand = n_neg if args.negs == "random" else 1
        examples = [{**ex, "neg": ex["neg"][:n_neg - n_rand] + [d for d in rng.sample(corpus, n_rand + 1)
                                                               if d not in ex["pos"]][:n_rand]} for ex in examples]
    fit, held = examples[:-args.holdout], examples[-args.holdout:]
    sampler = data.TrainSampler(fit, args.batch, n_neg, args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    loss_fn = losses.group_ce_loss if args.loss == "group" else losses.bce_loss
    group = 1 + n_neg

    def held_accuracy() -> float:
        q = [ex["query"] for ex in held for _ in range(group)]
        d = [x for ex in held for x in ex["pos"][:1] + ex["neg"][:n_neg]]
        s = torch.from_numpy(um.score_pairs(q, d, 64)).view(-1, group)
        return float((s[:, 0] > s[:, 1:].max(1).values).float().mean())

    t0, hist = time.time(), []
    print(json.dumps({"run": vars(args), "chance": 1 / group, "step": 0, "held_acc": held_accuracy()}), flush=True)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        um.train()
        texts = data.gather_texts(fit, sampler.batch(step))
        inputs = unimoer.batch_inputs(um, texts, ["rerank"])
        scores, _ = um.rerank_scores(inputs["pairs"])
        loss = loss_fn(scores, group)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append(float(loss.detach()))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            w = hist[-args.every:]
            print(json.dumps({"step": step + 1, "loss_mean_last": round(sum(w) / len(w), 4),
                              "held_acc": held_accuracy(), "sec": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
