"""GradCache's cost (train.grad_accum > 1) on the tiny default (configs/tiny.yaml: 2 layers, width 64, joint_moe),
CPU, fp32, one thread: one optimizer step's forward + backward on the same 16 queries (3 hard negatives each,
both tasks) as 1, 2 or 4 chunks.

Prints per grad_accum the step time (minimum over rounds: other load only adds time) and the bytes autograd saves
for the largest graph of the step (one forward with grad: the whole batch at grad_accum 1, one chunk under
GradCache), the activation memory that grad_accum trades for time. The loss and gradients are the same in all
three (tests/test_step.py).

Usage: python benchmarks/bench_gradcache.py [--rounds 6]
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

import tiny_setup  # noqa: E402
import train  # noqa: E402
import config
import unimoer


def saved_bytes(um, chunk: dict) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward with grad."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        um(**chunk)
    return total[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench_gradcache-")
    task = tiny_setup.write_synthetic(os.path.join(root, "synthetic"))
    cfg = config.load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                            [f"--data.dir={task}", "--data.synthetic=false", f"--train.out_dir={root}/run"])
    cfg = train.prepare(cfg, 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    um.train()
    steps = {ga: tiny_setup.step_chunks(um, task, 0, 16, ga) for ga in (1, 2, 4)}
    times = {ga: [] for ga in steps}
    for _ in range(args.rounds):  # interleaved, so slow phases of the machine hit every variant
        for ga, chunks in steps.items():
            t0 = time.perf_counter()
            train.forward_backward(um, um, chunks, cfg, 1 + cfg.data.n_neg)
            times[ga].append(time.perf_counter() - t0)
            um.zero_grad(set_to_none=True)
    base = min(times[1])
    for ga, chunks in steps.items():
        mib = max(saved_bytes(um, c) for c in chunks) / 2**20
        print(f"grad_accum {ga}: {min(times[ga]):.3f} s/step ({min(times[ga]) / base:.2f}x), "
              f"saved activations of the largest graph {mib:.1f} MiB")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
