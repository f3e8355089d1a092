"""The cost of auxiliary-loss-free load balancing (router.loss_free_balance) on the tiny Exp-2 top-k default
(configs/tiny_exp2_topk.yaml: 2 layers, width 64, joint_moe with three routed experts, top-2), CPU, fp32, one thread.

One whole optimizer step as train.train_step runs it (forward + backward, the guarded AdamW update, then
moe_lora.update_balance_bias) on the same 16 queries (3 hard negatives each, both tasks), with the bias on and
off, both without aux losses (the paper's setting), in interleaved rounds. Prints the minimum step time of each
(other load only adds time) and their ratio. The extra work is one top-k over E = 3 per router call for the
counts and an (L, E) sign update per step, so the ratio should be ~1.

Usage: python benchmarks/bench_loss_free_balance.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import config  # noqa: E402
import moe_lora  # noqa: E402
import tiny_setup  # noqa: E402
import train  # noqa: E402
import unimoer  # noqa: E402


def build(task: str, root: str, lfb: bool):
    over = [f"--data.dir={task}", "--data.synthetic=false", f"--train.out_dir={root}/run",
            "--model.tiny.pretrain_steps=0", "--train.aux_weights={}", f"--router.loss_free_balance={lfb}"]
    cfg = train.prepare(config.load_config(os.path.join(ROOT, "configs", "tiny_exp2_topk.yaml"), over), 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    um.train()
    params = unimoer.trainable_parameters(um)
    return cfg, um, params, torch.optim.AdamW(params, lr=cfg.train.lr)


def step(cfg, um, params, opt, chunks) -> None:
    finite, _ = train.forward_backward(um, um, chunks, cfg, 1 + cfg.data.n_neg)
    ok = train.optimizer_step(opt, params, [], finite, cfg.train.clip, 1, cfg.train.max_update_rms)
    moe_lora.update_balance_bias(um.base, 1, apply=ok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench_lfb-")
    task = tiny_setup.write_synthetic(os.path.join(root, "synthetic"))
    runs = {name: build(task, os.path.join(root, name), lfb) for name, lfb in (("plain", False), ("lfb", True))}
    chunks = tiny_setup.step_chunks(runs["plain"][1], task, 0, 16, 1)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved, so slow phases of the machine hit both
        for name, run in runs.items():
            t0 = time.perf_counter()
            step(*run, chunks)
            times[name].append(time.perf_counter() - t0)
    base = min(times["plain"])
    for name in runs:
        print(f"{name}: {min(times[name]):.3f} s/step ({min(times[name]) / base:.3f}x plain top-k)")
    bias = max(float(r.balance_bias.abs().max()) for r in moe_lora.balance_routers(runs["lfb"][1].base))
    print(f"after {args.rounds} steps max |b| = {bias:.4f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
