"""Time per optimizer step of training methods against the plain step, on the tiny default (configs/tiny.yaml).

Each method is a named set of config overrides (METHODS, one line each). For each, the tiny default's model is built
in-process (its data and pretrained base must exist: run `python train.py configs/tiny.yaml` once, or copy data/),
and train.train_step runs the same batches (the sampler's steps 0, 1, ...). Methods are timed in interleaved rounds
(order reversed every other round) after one warm-up step each; a figure is the minimum over rounds of the mean
ms/step of that round's steps (other load only adds time), next to the ratio to `plain` and the median of the
per-round ratios. Also counted per step, from tensor hooks (they fire once per backward pass, .backward() or
torch.autograd.grad, that computes that tensor's gradient) and a forward pre-hook on the base:
  bwd to layer 0    backward passes that reach the first adapted linear's lora_A (a full backward; each task's
                    own pass covers only its own forward, the aux terms' pass both)
  bwd at last lin.  passes that reach the last adapted linear's lora_A (also GradNorm's short passes to W; the aux
                    terms do not reach it: no router reads the last layer's output)
  forwards          base forward calls (3 per plain step: queries, documents, pairs)

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_methods.py [--steps 4] [--rounds 3] [--threads 1] [--methods NAME..]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data  # noqa: E402
import moe_lora  # noqa: E402
import mtl  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from unimoer import build_model, trainable_parameters  # noqa: E402

CONFIG = "configs/tiny.yaml"
METHODS = [  # (name, overrides): add a method with one line
    ("plain", []),
    ("pcgrad", ["--train.mtl=pcgrad"]),
    ("gradnorm", ["--train.mtl=gradnorm"]),
    ("famo", ["--train.mtl=famo"]),
    ("famo_next_step", ["--train.mtl=famo", "--train.famo_delta=next_step"]),
    ("jina_v3", ["--train.rerank_head=jina_v3", "--train.rerank_loss=group"]),  # listwise head (listwise.py)
    ("e2rank", ["--train.mode=joint_single", "--train.rerank_head=e2rank", "--train.rerank_loss=ranknet",
                "--train.rank_weight=2.0"]),  # configs/tiny_e2rank.yaml: one LoRA, PRF queries through the embedder
    ("matryoshka", ["--train.matryoshka_dims=[16,32,64]"]),  # configs/tiny_matryoshka.yaml
]


class Counter:
    """Per step: gradients computed for the first / last adapted layer's lora_A, and base forward calls."""

    def __init__(self, um):
        lins = [m for m in um.base.modules() if isinstance(m, moe_lora.MoELoRALinear)]
        self.first = self.last = self.forwards = 0
        lins[0].lora_A.register_hook(lambda g: self._bump("first"))
        lins[-1].lora_A.register_hook(lambda g: self._bump("last"))
        um.base.register_forward_pre_hook(lambda mod, args: self._bump("forwards"))

    def _bump(self, name: str):
        setattr(self, name, getattr(self, name) + 1)

    def reset(self):
        self.first = self.last = self.forwards = 0


def make_run(overrides: list, out_dir: str) -> tuple:
    """A RunState of the tiny default with `overrides`, as train.setup_run builds it (no dev set, no checkpoint)."""
    cfg = load_config(CONFIG, overrides + [f"--train.out_dir={out_dir}"])
    cfg = train.prepare(cfg, 0)
    t = cfg.train
    um = build_model(cfg, torch.device("cpu"))
    params = trainable_parameters(um)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    examples = train.train_examples(cfg)
    sampler = data.TrainSampler(examples, t.batch_size // t.grad_accum, cfg.data.n_neg, t.seed, 0, 1)
    run = train.RunState(cfg, um, um, params, opt, examples, sampler, 10 ** 6, None, None, 0, 1,
                         mtl=mtl.build_method(cfg, torch.device("cpu")))
    return run, Counter(um)


def time_steps(run, counter, n: int) -> tuple:
    """n train steps -> (ms per step, backward passes per step to the last / first layer, forwards per step)."""
    counter.reset()
    t0 = time.perf_counter()
    for _ in range(n):
        train.train_step(run, contextlib.nullcontext)
    ms = (time.perf_counter() - t0) * 1000 / n
    return ms, counter.last / n, counter.first / n, counter.forwards / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", metavar="NAME", help="time only these entries of METHODS (plain is "
                    "always timed: the ratios are to it)")
    args = ap.parse_args()
    methods = [(n, o) for n, o in METHODS if n == "plain" or args.methods is None or n in args.methods]
    unknown = sorted(set(args.methods or ()) - {n for n, _ in METHODS})
    if unknown:
        ap.error(f"--methods: unknown {unknown} (known: {[n for n, _ in METHODS]})")
    os.chdir(REPO)  # the config's data.dir is relative to the repository
    torch.set_num_threads(args.threads)
    print(f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {CONFIG}, {args.steps} steps x {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: make_run(over, os.path.join(tmp, name)) for name, over in methods}
        for run, counter in runs.values():
            time_steps(run, counter, 1)  # warm-up
        rounds = {name: [] for name, _ in methods}
        for r in range(args.rounds):
            order = [name for name, _ in methods][::(-1 if r % 2 else 1)]
            for name in order:
                rounds[name].append(time_steps(*runs[name], args.steps))
    plain = [x[0] for x in rounds["plain"]]
    print(f"{'method':<16} {'ms/step':>9} {'x plain':>8} {'median x':>9} {'bwd to layer 0':>15} "
          f"{'bwd at last lin.':>17} {'forwards':>9}   (per step)")
    for name, _ in methods:
        ms = [x[0] for x in rounds[name]]
        _, last, first, fwd = rounds[name][-1]
        print(f"{name:<16} {min(ms):>9.1f} {min(ms) / min(plain):>8.2f} "
              f"{statistics.median(a / b for a, b in zip(ms, plain)):>9.2f} {first:>15.1f} {last:>17.1f} {fwd:>9.1f}")


if __name__ == "__main__":
    main()
