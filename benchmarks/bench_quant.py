"""Forward time of a quantised base (dequantise on the fly, quant.py) vs the fp32 base, CPU, one run.

Model: Qwen3 layout, hidden 512, intermediate 1536, 4 layers, 8 heads (4 kv, head_dim 64), vocab 4096, random
weights; the experts of configs/joint_moe.yaml (embed r16, rerank r16, shared r32, learned softmax router) attached
to every variant, as the unified model serves. Variants: fp32 base | int8 | int4 (group 128), activations fp32 in all
three (so only the base weight format differs). Batch 8 x 128 tokens and 1 x 16 (the dequantisation is per call,
the matmul per token: the short call shows its cost), no padding, eval mode, no autograd.
The variants are timed in interleaved rounds (order alternating); each figure is the minimum over the rounds (other
load only adds time); the ratios are quantised / fp32. The int8/int4 forwards dequantise every projection's weight at
every call (no integer kernels), so they are expected to be slower than fp32: this measures that cost.

Usage: python benchmarks/bench_quant.py [--rounds 5] [--reps 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import moe_lora  # noqa: E402
import quant  # noqa: E402
from config import adapter_config, load_config  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402

HF_CONFIG = {"model_type": "qwen3", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
             "tie_word_embeddings": True, "hidden_act": "silu"}
SHAPES = ((8, 128), (1, 16))  # (batch, tokens): an encoding batch, and a short call where dequantising dominates
GROUP = 128


def variants() -> dict:
    torch.manual_seed(0)
    base = CausalLM(ModelConfig.from_hf_dict(HF_CONFIG))
    for _, p in base.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    base.requires_grad_(False).eval()
    experts = adapter_config(load_config(os.path.join(REPO, "configs", "joint_moe.yaml")))
    out = {}
    for name in ("fp32", "int8", "int4"):
        m = copy.deepcopy(base)
        if name != "fp32":
            quant.quantize_model(m, name, GROUP)
        torch.manual_seed(1)
        out[name] = moe_lora.attach(m, copy.deepcopy(experts)).eval()
    return out


@torch.no_grad()
def time_forward(model, ids, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        model(ids)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    models = variants()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU forward, hidden {HF_CONFIG['hidden_size']}, {HF_CONFIG['num_hidden_layers']} layers, joint_moe "
          f"experts attached; torch threads {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}, load average "
          f"{load:.2f} at start; min over {a.rounds} rounds of {a.reps} forwards")
    for batch, seq in SHAPES:
        ids = torch.randint(0, HF_CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
        for m in models.values():  # warm-up
            time_forward(m, ids, 1)
        best = {k: float("inf") for k in models}
        names = list(models)
        for r in range(a.rounds):
            for k in (names if r % 2 == 0 else names[::-1]):
                best[k] = min(best[k], time_forward(models[k], ids, a.reps))
        print(f" batch {batch} x {seq} tokens")
        for k in names:
            print(f"  {k:5s} {best[k] * 1e3:8.1f} ms   ratio to fp32 {best[k] / best['fp32']:.2f}")

if __name__ == "__main__":
    main()
