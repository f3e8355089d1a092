"""Forward speed of model.py's backbone against transformers' Qwen3Model on the same weights (CPU, fp32).

Qwen3-0.6B widths (hidden 1024, 16 query heads, 8 kv heads, head_dim 128, intermediate 3072) with few layers.
The vocabulary is small (1024 instead of 151936): only the backbone is timed (embedding lookup, blocks, final
norm; no LM head on either side), and a lookup costs the same whatever the table size.

Both models run under torch.no_grad() in eval mode, timed interleaved (A/B, then B/A, ...) after warmup, so
thermal or background drift hits both alike. HF is called with use_cache=False and our mask-derived positions.
MFU is measured against the GEMM peak of this machine, timed in the same run (a large fp32 matmul).

    python benchmarks/bench_model.py                       # 4 layers, batch 8 x 256, all threads
    python benchmarks/bench_model.py --padded --threads 2  # left-pad half the batch: the masked path

The last line printed is `ours/hf = X.XX`, the median over the interleaved pairs of t_ours / t_hf (< 1 means
model.py is faster). On a shared machine look at the per-pair ratios printed above it, not only at the times.
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
from model import load_pretrained  # noqa: E402

QWEN3_0_6B_WIDTHS = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         intermediate_size=3072, rms_norm_eps=1e-6, vocab_size=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)


def forward_flops(cfg: dict, layers: int, batch: int, seq: int) -> float:
    """Analytic forward FLOPs of the backbone (a multiply-add = 2 FLOPs; norms, RoPE, softmax, SiLU ignored).

        per layer, per token, the projections:  2 * (H*nh*D [q] + 2*H*nkv*D [k, v] + nh*D*H [o] + 3*H*I [mlp])
        per layer, attention:                   4 * B * T^2 * nh * D   (Q K^T and P V, 2*T*T*D each per head)
        total = layers * (2 * P_layer * B * T + 4 * B * T^2 * nh * D)

    Every position counts, pads included (both implementations compute them), and the attention term counts the
    full T x T square (no causal halving), the usual convention for MFU.
    """
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p_layer = H * nh * D + 2 * H * nkv * D + nh * D * H + 3 * H * I
    return layers * (2 * p_layer * batch * seq + 4 * batch * seq * seq * nh * D)


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` fp32 n x n x n matmuls (2*n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warmup
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=6, help="timed forwards per implementation (interleaved pairs)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    ap.add_argument("--padded", action="store_true", help="left-pad half the batch (exercise the masked path)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    transformers.utils.logging.disable_progress_bar()  # keep the output to the result lines

    cfg = dict(QWEN3_0_6B_WIDTHS, num_hidden_layers=args.layers)
    hf_full = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation="sdpa")).eval()
    with tempfile.TemporaryDirectory() as d:
        hf_full.save_pretrained(d)
        ours = load_pretrained(d)
    hf = hf_full.model  # the backbone only: same scope as ours(...)

    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if args.padded:
        half = B // 2
        for i in range(half):  # left-pad half the rows, by T/(2*half), 2T/(2*half), ... up to T/2 pads
            mask[i, : T * (i + 1) // (2 * half)] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def run_ours():
        return ours(ids, mask).hidden

    def run_hf():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    with torch.no_grad():
        real = mask.bool()
        diff = (run_ours()[real] - run_hf()[real]).abs().max().item()  # same weights: same numbers
        for _ in range(args.warmup):
            run_ours(), run_hf()
        t_ours, t_hf, peaks = [], [], []
        for r in range(args.repeats):  # interleaved pairs, alternating which goes first
            if r % 2 == 0:
                t_ours.append(timed(run_ours)), t_hf.append(timed(run_hf))
            else:
                t_hf.append(timed(run_hf)), t_ours.append(timed(run_ours))
            peaks.append(gemm_peak(repeats=2))  # sampled through the run: the machine's capacity drifts too

    # On a shared machine the load drifts between repeats; a pair's two runs are adjacent, so the median of the
    # per-pair ratios is the robust comparison (the ratio of the medians is printed too).
    ratio = statistics.median(o / h for o, h in zip(t_ours, t_hf))
    peak = max(peaks)
    flops = forward_flops(cfg, args.layers, B, T)
    mo, mh = statistics.median(t_ours), statistics.median(t_hf)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layers, batch {B} x {T} "
          f"tokens, fp32, {'half the batch left-padded' if args.padded else 'no padding'}; "
          f"max |ours - hf| = {diff:.2e}")
    print(f"forward FLOPs {flops / 1e9:.1f} G; GEMM peak (best 2048^3 fp32 matmul) {peak / 1e9:.1f} GFLOP/s "
          f"(samples {min(peaks) / 1e9:.1f} .. {peak / 1e9:.1f})")
    print(f"ours: median {mo * 1e3:8.1f} ms (min {min(t_ours) * 1e3:.1f})  {flops / mo / 1e9:6.1f} GFLOP/s  "
          f"MFU {flops / mo / peak:6.1%}")
    print(f"hf:   median {mh * 1e3:8.1f} ms (min {min(t_hf) * 1e3:.1f})  {flops / mh / 1e9:6.1f} GFLOP/s  "
          f"MFU {flops / mh / peak:6.1%}")
    print(f"per-pair ratios: {' '.join(f'{o / h:.2f}' for o, h in zip(t_ours, t_hf))}; "
          f"ratio of medians {mo / mh:.2f}, of minima {min(t_ours) / min(t_hf):.2f}")
    print(f"ours/hf = {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
