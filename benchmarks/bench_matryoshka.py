"""Matryoshka's cost (train.matryoshka_dims) on the tiny default (configs/tiny.yaml: 2 layers, width 64, joint_moe),
CPU, fp32, one thread: one optimizer step's forward + backward on the same 16 queries (3 hard negatives each, both
tasks), plain InfoNCE against configs/tiny_matryoshka.yaml's dims [16, 32, 64], in one chunk and under GradCache
(grad_accum 2); and the embedding loss alone (losses.info_nce_loss against losses.matryoshka_loss) on the step's
cached vectors.

Prints each variant's time (minimum over rounds: other load only adds time) and its ratio to the plain step of the
same run. The extra work is one InfoNCE per dim on (b, m) prefixes, tiny next to the model's forward and backward.

Usage: python benchmarks/bench_matryoshka.py [--rounds 6]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import config  # noqa: E402
import losses  # noqa: E402
import tiny_setup  # noqa: E402
import train  # noqa: E402
import unimoer  # noqa: E402

DIMS = [16, 32, 64]


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench_matryoshka-")
    task = tiny_setup.write_synthetic(os.path.join(root, "synthetic"))
    plain = config.load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                               [f"--data.dir={task}", "--data.synthetic=false", f"--train.out_dir={root}/run"])
    plain = train.prepare(plain, 0)
    mrl = copy.deepcopy(plain)
    mrl.train.matryoshka_dims = list(DIMS)
    um = unimoer.build_model(plain, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    um.train()
    group = 1 + plain.data.n_neg
    variants = {(name, ga): (cfg, tiny_setup.step_chunks(um, task, 0, 16, ga))
                for ga in (1, 2) for name, cfg in (("plain", plain), ("matryoshka", mrl))}
    times = {k: [] for k in variants}
    for _ in range(args.rounds):  # interleaved, so slow phases of the machine hit every variant
        for k, (cfg, chunks) in variants.items():
            t0 = time.perf_counter()
            train.forward_backward(um, um, chunks, cfg, group)
            times[k].append(time.perf_counter() - t0)
            um.zero_grad(set_to_none=True)
    for ga in (1, 2):
        base = min(times[("plain", ga)])
        for name in ("plain", "matryoshka"):
            t = min(times[(name, ga)])
            print(f"grad_accum {ga} {name:10s}: {t:.3f} s/step ({t / base:.3f}x the plain step)")

    with torch.no_grad():
        out = um(**variants[("plain", 1)][1][0])
    q, d = out["q"].detach().requires_grad_(), out["d"].detach().requires_grad_()
    t_plain = best(lambda: losses.info_nce_loss(q, d, 0.05, False).backward(), args.rounds * 20)
    t_mrl = best(lambda: losses.matryoshka_loss(q, d, DIMS, [], 0.05, False)[0].backward(), args.rounds * 20)
    print(f"embedding loss + backward alone, q {tuple(q.shape)}, d {tuple(d.shape)}: InfoNCE {t_plain * 1e3:.3f} ms, "
          f"Matryoshka {DIMS} {t_mrl * 1e3:.3f} ms ({t_mrl / t_plain:.2f}x)")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
