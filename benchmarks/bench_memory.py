"""Memory table (Exp 7): one frozen base + LoRA experts vs two separate models, per precision, against a 4 GB budget.

For Qwen3-0.6B, Qwen3-4B and Mistral-7B-v0.3 the model is built on the meta device from its published config.json
fields (CONFIGS below; no weights are read) and each tensor's bytes are counted, numel x element size:

  base      the CausalLM's parameters and buffers at the precision: fp32 | bf16 | int8 | int4 (group 128). For int8
            and int4 the decoder's q/k/v/o/gate/up/down projections are quant.QuantLinear (int8 codes + fp32 scale
            per row; int4 codes two a byte + fp32 scale + uint8 zero point per group of 128) and the embeddings,
            norms and LM head stay bf16 (model.dtype of configs/qwen3_base.yaml)
  experts   the LoRA experts and routers of configs/joint_moe.yaml (embed r16, rerank r16, shared r32 on all seven
            projections of every layer, fp32; the learned routers' tensors): moe_lora.attach on the meta model
  kv        the KV cache of generation at batch B, length T: 2 * L * B * T * n_kv * d_head * b
            (b = 4 bytes for fp32, 2 for the others: activations are bf16 there)
  act       the peak live activations of one block of an inference forward (no autograd), the larger phase:
              attention  B*T*(2H + 2*n_h*d_head + 2*n_kv*d_head)*b + B*n_h*T^2*b   (residual, normed input, q, k, v,
                         output; the T x T scores of SDPA's math kernel, an upper bound: flash kernels keep none)
              MLP        B*T*(2H + 3I)*b          (residual, input, gate, up, product)
            + for int8/int4, the dequantisation scratch: the largest quantised weight in the activation dtype
            (out*in*b; quant.py dequantises in fp32 blocks of 16 MB into it)
  total     base + experts + kv + act.
Two models = an embedding model and a reranker, each a full base at that precision (no experts), run one after the
other: 2 * base + kv + act. The ratio is unified / two models (totals). Budget: 4 GiB = 4 * 2^30 bytes.

Measured column: the same counting on a small real model (Qwen3 layout, hidden 256, 4 layers, vocab 4096) built on
the CPU with real tensors, quantised for real (quant.quantize_model) and given its experts (moe_lora.attach): the
bytes actually allocated, the sum of the distinct storages' nbytes (Tensor.untyped_storage().nbytes(), deduplicated
by data pointer), are printed next to the meta-device count of the same model; they must agree (a view into a larger
tensor, a kept float copy, would show up as a difference).

CONFIGS fields from the published config.json files (huggingface.co: Qwen/Qwen3-0.6B, Qwen/Qwen3-4B,
mistralai/Mistral-7B-v0.3), checked with the search tool against mirrored copies of those files
(TensorStack/TextEncoder Qwen-3-06B/config.json, MultiRL/qwen3_4b_instruct_sft/config.json,
unsloth/mistral-7b-v0.3/config.json with _name_or_path mistralai/Mistral-7B-v0.3).

Usage: python benchmarks/bench_memory.py [--batch 8] [--length 512]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import moe_lora  # noqa: E402
import quant  # noqa: E402
from config import adapter_config, load_config  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402

CONFIGS = {
    "Qwen3-0.6B": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "tie_word_embeddings": True, "attention_bias": False, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000, "max_position_embeddings": 40960, "hidden_act": "silu"},
    "Qwen3-4B": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "tie_word_embeddings": True, "attention_bias": False, "rms_norm_eps": 1e-6,
                 "rope_theta": 1000000, "max_position_embeddings": 40960, "hidden_act": "silu"},
    "Mistral-7B-v0.3": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                        "sliding_window": None, "max_position_embeddings": 32768, "hidden_act": "silu"},
}
SMALL = {"model_type": "qwen3", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "tie_word_embeddings": True, "hidden_act": "silu"}
PRECISIONS = ("fp32", "bf16", "int8", "int4")
GROUP = 128
BUDGET = 4 * 2**30
EXPERTS_YAML = os.path.join(REPO, "configs", "joint_moe.yaml")


def module_tensors(module: nn.Module) -> list:
    return list(module.parameters()) + list(module.buffers())  # each tensor once (tied ones too)


def tensor_bytes(tensors) -> int:
    """sum numel * element_size over distinct tensors (works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def allocated_bytes(tensors) -> int:
    """Bytes of the distinct storages behind real tensors (deduplicated by data pointer)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def build(hf: dict, precision: str, device: str = "meta") -> CausalLM:
    """The base at a precision on `device`; int8/int4: bf16 model, decoder projections quantised."""
    with torch.device(device):
        model = CausalLM(ModelConfig.from_hf_dict(hf))
    model = model.to(torch.float32 if precision == "fp32" else torch.bfloat16).requires_grad_(False)
    if precision in ("int8", "int4"):
        quant.quantize_model(model, precision, GROUP)
    return model


def expert_bytes(model: CausalLM, experts_cfg) -> int:
    """Bytes of what moe_lora.attach adds (experts + routers), attached to a copy of the model."""
    m = copy.deepcopy(model)
    moe_lora.attach(m, copy.deepcopy(experts_cfg))
    return tensor_bytes(moe_lora.adapter_state_dict(m).values())


def kv_bytes(c: ModelConfig, B: int, T: int, b: int) -> int:
    return 2 * c.num_hidden_layers * B * T * c.num_key_value_heads * c.head_dim * b


def act_bytes(c: ModelConfig, B: int, T: int, b: int) -> int:
    H, I, nh, nkv, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn = B * T * (2 * H + 2 * nh * d + 2 * nkv * d) * b + B * nh * T * T * b
    mlp = B * T * (2 * H + 3 * I) * b
    return max(attn, mlp)


def scratch_bytes(model: CausalLM, b: int) -> int:
    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, quant.QuantLinear)]
    return max(sizes, default=0) * b


def gib(n: int) -> str:
    return f"{n / 2**30:7.2f}"


def memory_rows(name: str, hf: dict, experts_cfg, B: int, T: int) -> list:
    c = ModelConfig.from_hf_dict(hf)
    rows = []
    for p in PRECISIONS:
        model = build(hf, p)
        b = 4 if p == "fp32" else 2
        base, exp = tensor_bytes(module_tensors(model)), expert_bytes(model, experts_cfg)
        kv, act = kv_bytes(c, B, T, b), act_bytes(c, B, T, b) + scratch_bytes(model, b)
        unified, two = base + exp + kv + act, 2 * base + kv + act
        rows.append((name, p, base, exp, kv, act, unified, two))
    return rows


def print_table(rows: list, B: int, T: int) -> None:
    print(f"memory, GiB (2^30 bytes); batch {B} x {T} tokens; budget {BUDGET / 2**30:.0f} GiB; "
          "unified = one base + experts, two = two full bases (embedding + reranker)")
    print(f"{'model':16s} {'prec':5s} {'base':>7s} {'experts':>7s} {'kv':>7s} {'act':>7s} | {'unified':>7s} "
          f"{'fits':>4s} | {'two':>7s} {'fits':>4s} | {'unified/two':>11s}")
    for name, p, base, exp, kv, act, unified, two in rows:
        print(f"{name:16s} {p:5s} {gib(base)} {gib(exp)} {gib(kv)} {gib(act)} | {gib(unified)} "
              f"{'yes' if unified <= BUDGET else 'no':>4s} | {gib(two)} {'yes' if two <= BUDGET else 'no':>4s} | "
              f"{unified / two:11.3f}")


def measured_rows(experts_cfg) -> None:
    """The small model on the CPU with real tensors: allocated storage bytes vs the meta-device count."""
    print(f"\nmeasured: small Qwen3 layout (hidden {SMALL['hidden_size']}, {SMALL['num_hidden_layers']} layers, "
          f"vocab {SMALL['vocab_size']}), bytes of the distinct allocated storages vs the meta-device count")
    print(f"{'prec':5s} {'base meta':>12s} {'base alloc':>12s} {'experts meta':>13s} {'experts alloc':>14s}  agree")
    for p in PRECISIONS:
        torch.manual_seed(0)
        real = build(SMALL, p, device="cpu")
        meta = build(SMALL, p)
        m_exp = expert_bytes(meta, experts_cfg)
        a_base, m_base = allocated_bytes(module_tensors(real)), tensor_bytes(module_tensors(meta))
        moe_lora.attach(real, copy.deepcopy(experts_cfg))
        a_exp = allocated_bytes(moe_lora.adapter_state_dict(real).values())
        print(f"{p:5s} {m_base:12d} {a_base:12d} {m_exp:13d} {a_exp:14d}  "
              f"{'yes' if (m_base, m_exp) == (a_base, a_exp) else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    a = ap.parse_args()
    experts_cfg = adapter_config(load_config(EXPERTS_YAML))
    print("experts (configs/joint_moe.yaml): " + ", ".join(f"{e.name} r{e.r}" for e in experts_cfg.experts)
          + f" on {', '.join(experts_cfg.targets)}; int4 group {GROUP}")
    rows = [r for name, hf in CONFIGS.items() for r in memory_rows(name, hf, experts_cfg, a.batch, a.length)]
    print_table(rows, a.batch, a.length)
    measured_rows(experts_cfg)


if __name__ == "__main__":
    main()
