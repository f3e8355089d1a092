"""MoE-LoRA overhead on the backbone benchmark's model (Qwen3-0.6B widths, 4 layers, random weights), CPU, fp32.

Prints, from one run, the ratios the issue sets targets for:
  eval forward, MoE-LoRA vs base                                 target <= 1.10
  train step (forward + backward), MoE-LoRA vs our single LoRA r=32   target <= 1.15
  train step, MoE-LoRA vs PEFT LoRA r=32 on transformers          target <= 1.00 (skipped without peft)

MoE-LoRA: 3 experts r 8/8/16 (the shared one routed, so the router weighs all 3) on all seven projections of every
layer, a per-layer softmax router on the mean-pooled block input, its aux losses in the loss. Batch 8 x 256, no
padding. Variants are timed in interleaved rounds (order alternating); each figure is the minimum over the rounds,
since other load on the machine only adds time (the load average is printed, and the median of per-round ratios).

Usage: python benchmarks/bench_moe_lora.py [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import CausalLM, ModelConfig  # noqa: E402
import moe_lora  # noqa: E402
from moe_lora import ExpertSpec, MoELoRAConfig  # noqa: E402
from router import RouterConfig  # noqa: E402

HF_CONFIG = {  # Qwen3-0.6B widths, 4 layers
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_bias": False,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 8, 256


def base_model() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(HF_CONFIG))
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2:  # RMSNorm weights stay 1
            torch.nn.init.normal_(p, std=0.02)
    return model.requires_grad_(False).eval()


def moe_config() -> MoELoRAConfig:
    return MoELoRAConfig(experts=[ExpertSpec("embed", 8, 16.0), ExpertSpec("rerank", 8, 16.0),
                                  ExpertSpec("shared", 16, 32.0)],
                         targets=TARGETS, shared="routed", router=RouterConfig(kind="learned", fn="softmax"))


def single_lora_config() -> MoELoRAConfig:
    # One always-on expert and no routed ones: no router at all, i.e. a plain LoRA of rank 32.
    return MoELoRAConfig(experts=[ExpertSpec("lora", 32, 64.0)], targets=TARGETS, shared="always",
                         shared_expert="lora")


def peft_model(ours: CausalLM):
    """transformers Qwen3Model with our weights and PEFT LoRA r=32 on the same projections, or None."""
    try:
        import peft
        import transformers
    except ImportError:
        return None
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices via peft
    cfg = transformers.Qwen3Config(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"})
    with torch.device("meta"):
        hf = transformers.Qwen3Model(cfg)
    state = {k[len("model."):]: v for k, v in ours.state_dict().items() if k.startswith("model.")}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.rotary_emb = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(cfg)  # non-persistent buffers
    hf.config._attn_implementation = "sdpa"
    lcfg = peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    return peft.get_peft_model(hf, lcfg)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; one timed call per variant each")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = base_model()
    moe = moe_lora.attach(copy.deepcopy(base), moe_config())
    lora = moe_lora.attach(copy.deepcopy(base), single_lora_config())
    hf = peft_model(base)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    task_ids = torch.randint(0, 2, (BATCH,), generator=g)

    def eval_fwd(model):
        model.eval()
        with torch.no_grad():
            model(ids, mask, task_ids=task_ids)

    def train_step(model):
        model.train()
        out = model(ids, mask, task_ids=task_ids)
        loss = out.hidden.square().mean() + 0.01 * sum(out.aux.values(), torch.zeros(()))
        loss.backward()
        for p in moe_lora.adapter_parameters(model):
            p.grad = None

    def hf_train_step():
        hf.train()
        out = hf(input_ids=ids, attention_mask=mask)
        out.last_hidden_state.square().mean().backward()
        for p in hf.parameters():
            p.grad = None

    evals = {"base": lambda: eval_fwd(base), "moe": lambda: eval_fwd(moe)}
    trains = {"lora32": lambda: train_step(lora), "moe": lambda: train_step(moe)}
    if hf is not None:
        trains["peft32"] = hf_train_step
    for fn in list(evals.values()) + list(trains.values()):  # warm-up
        fn()

    # Rounds alternate the order of the variants; a figure is the minimum over rounds (the least disturbed call, as
    # other load on the machine only ever adds time), and each ratio is also given per round (back-to-back pairs).
    res = {f"eval_{k}": [] for k in evals} | {f"train_{k}": [] for k in trains}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        order = lambda d: list(d.items())[::-1] if r % 2 else list(d.items())  # noqa: E731
        for k, fn in order(evals):
            res[f"eval_{k}"].append(timed(fn))
        for k, fn in order(trains):
            res[f"train_{k}"].append(timed(fn))
    best = {k: min(v) for k, v in res.items()}

    print(f"bench_moe_lora: Qwen3-0.6B widths, {HF_CONFIG['num_hidden_layers']} layers, batch {BATCH} x {SEQ}, fp32, "
          f"CPU {torch.get_num_threads()} threads; MoE-LoRA 3 experts r 8/8/16 on {len(TARGETS)} projections, "
          f"per-layer router; {args.rounds} rounds; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for k, v in res.items():
        print(f"  {k:<14s} min {best[k] * 1000:9.1f} ms   median {statistics.median(v) * 1000:9.1f} ms")

    def report(label, num, den, target):
        r = best[num] / best[den]
        pairs = statistics.median(a / b for a, b in zip(res[num], res[den]))
        print(f"{label} = {r:.3f}  (target <= {target:.2f}) {'OK' if r <= target else 'MISSED'}"
              f"   [median of per-round ratios {pairs:.3f}]")

    report("eval forward  MoE-LoRA / base          ", "eval_moe", "eval_base", 1.10)
    report("train step    MoE-LoRA / our LoRA r=32 ", "train_moe", "train_lora32", 1.15)
    if hf is None:
        print("train step    MoE-LoRA / PEFT LoRA r=32 = skipped: peft (and transformers) not installed")
    else:
        report("train step    MoE-LoRA / PEFT LoRA r=32", "train_moe", "train_peft32", 1.00)


if __name__ == "__main__":
    main()
