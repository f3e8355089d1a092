"""Generation speed: generate.py with the KV cache against its no-cache path (full recompute each step) and
against transformers' generate (its own cache) on the same weights (CPU, fp32, greedy).

Qwen3-0.6B widths (hidden 1024, 16 query heads, 8 kv heads, head_dim 128, intermediate 3072) with few layers and
a small vocabulary (as bench_model.py). The batch is left-padded: row i has prompt - i * prompt / (2 * batch) real
tokens. No stop token, so every run makes exactly --new tokens per row.

The three runs are timed interleaved (rotating which goes first) after one warmup each, so drift on a shared
machine hits all alike; tokens/s = batch * new / time, medians over the repeats.

    python benchmarks/bench_generate.py                         # 2 layers, batch 4, prompt 64, 32 new tokens
    python benchmarks/bench_generate.py --threads 1 --new 64

The last line printed is `cache/no-cache = X.XX`, the median per-round speed-up of the cache (tokens/s with the
cache over tokens/s without); `ours/hf` above it is the median per-round time ratio against transformers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import generate  # noqa: E402
from model import load_pretrained  # noqa: E402

QWEN3_0_6B_WIDTHS = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         intermediate_size=3072, rms_norm_eps=1e-6, vocab_size=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64, help="prompt length of the longest row")
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs all three)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    transformers.utils.logging.disable_progress_bar()
    cfg = dict(QWEN3_0_6B_WIDTHS, num_hidden_layers=args.layers)
    hf = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation="sdpa")).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d)

    B, T, N = args.batch, args.prompt, args.new
    ids = torch.randint(1, cfg["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        mask[i, : i * T // (2 * B)] = 0
    ids = ids.masked_fill(mask == 0, 0)

    runs = {
        "cache": lambda: generate(ours, ids, mask, N, use_cache=True),
        "no-cache": lambda: generate(ours, ids, mask, N, use_cache=False),
        "hf": lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[:, T:],
    }
    times = {name: [] for name in runs}
    outs = {}
    with torch.no_grad():
        for name, fn in runs.items():
            outs[name] = fn()  # warmup, and the tokens to compare
        names = list(runs)
        for r in range(args.repeats):
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order
                times[name].append(timed(runs[name])[0])

    tps = {name: B * N / statistics.median(t) for name, t in times.items()}
    speedup = statistics.median(nc / c for c, nc in zip(times["cache"], times["no-cache"]))
    vs_hf = statistics.median(c / h for c, h in zip(times["cache"], times["hf"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible; "
          f"{args.layers} layers at Qwen3-0.6B widths, batch {B} left-padded, prompt <= {T}, {N} new tokens, fp32")
    print(f"same tokens: cache vs no-cache {torch.equal(outs['cache'], outs['no-cache'])}, "
          f"cache vs hf {torch.equal(outs['cache'], outs['hf'])}")
    for name in runs:
        print(f"{name:9s} median {statistics.median(times[name]):7.2f} s  {tps[name]:8.1f} tokens/s  "
              f"(rounds: {' '.join(f'{t:.2f}' for t in times[name])})")
    print(f"ours/hf = {vs_hf:.2f} (time, with cache)")
    print(f"cache/no-cache = {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
