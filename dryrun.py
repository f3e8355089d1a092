"""`python train.py CONFIG --dry-run [--gpus=N] [--section.key=value ...]`: the model a config would train, built on
the meta device from model.path's config.json alone (no weights, tokenizer or data read; nothing written), its
parameter counts and an estimate of the memory per GPU for the configured batch.

    python train.py configs/qwen3_4b.yaml --dry-run --gpus=8 --model.path=/models/Qwen3-4B-Base

Reading order: meta_model (the base and the mode's experts on meta) -> parameter_counts -> step_tokens (the
sequences and tokens of one GPU's micro-step) -> activation_bytes_per_token (the per-layer formula) ->
memory_estimate (the parts) -> report / main.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn

import moe_lora
from config import Config, ConfigError, adapter_config, load_config, mode_tasks
from model import CausalLM, ModelConfig, UsageError
from listwise import Projector
from unimoer import DTYPES

USAGE = "usage: python train.py CONFIG.yaml --dry-run [--gpus=N] [--section.key=value ...]"
BYTES = {"float32": 4, "bfloat16": 2}
ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, fp32, one each per trainable element


# --------------------------------------------------------------------------------------------- the model on meta
def meta_model(cfg: Config) -> tuple:
    """-> (CausalLM on the meta device with the mode's experts and routers attached, rerank head or None).

    The same construction as unimoer.build_model (CausalLM from config.json, moe_lora.attach(adapter_config(cfg)),
    a linear head under train.rerank_head 'linear'), with no tensor allocated: meta tensors have shapes only."""
    if cfg.model.path is None:
        raise ConfigError("--dry-run needs model.path, a model directory with config.json (the tiny base, "
                          "model.path null, has none before a run writes it)")
    mcfg = ModelConfig.from_json(os.path.join(cfg.model.path, "config.json"))  # one-line error if missing
    with torch.device("meta"):
        base = CausalLM(mcfg).to(DTYPES[cfg.model.dtype])
    base.requires_grad_(False)
    moe_lora.attach(base, adapter_config(cfg))  # on the base's device (meta); its small index tables start on CPU
    head = nn.Linear(mcfg.hidden_size, 1, device="meta") if cfg.train.rerank_head == "linear" else None
    if cfg.train.rerank_head == "jina_v3":
        with torch.device("meta"):
            head = Projector(mcfg.hidden_size, cfg.train.jina_proj_dim)
    return base, head


def parameter_counts(base: CausalLM, head) -> dict:
    """Element counts. base: the frozen decoder (a tied lm_head counted once, as in the checkpoint's unique
    tensors); embedding: embed_tokens (+ an untied lm_head), so non_embedding = base - embedding (the model cards'
    "Non-Embedding" figure); experts: the LoRA A/B of every MoE linear; routers: the routers' tensors; head: the
    linear rerank head (0 for yes/no); trainable = experts + routers + head."""
    adapters = moe_lora.adapter_state_dict(base)
    trainable_ids = {id(p) for p in adapters.values() if isinstance(p, nn.Parameter)}
    experts = sum(p.numel() for k, p in adapters.items() if k.endswith((".lora_A", ".lora_B")))
    routers = sum(p.numel() for k, p in adapters.items()
                  if isinstance(p, nn.Parameter) and not k.endswith((".lora_A", ".lora_B")))
    frozen = sum(p.numel() for p in base.parameters() if id(p) not in trainable_ids)
    embedding = base.model.embed_tokens.weight.numel() + (base.lm_head.weight.numel() if base.lm_head is not None
                                                          else 0)
    n_head = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return {"base": frozen, "embedding": embedding, "non_embedding": frozen - embedding, "experts": experts,
            "routers": routers, "head": n_head, "trainable": experts + routers + n_head}


# --------------------------------------------------------------------------------------------- one micro-step
def step_tokens(cfg: Config, gpus: int) -> dict:
    """The sequences one GPU runs with grad in one micro-step (one GradCache chunk when grad_accum > 1), each padded
    to its length limit (the worst case): b = batch_size / (gpus * grad_accum) queries; embedding: b queries of
    max_query_len and b * (1 + n_neg) documents of max_doc_len; reranking: b * (1 + n_neg) pairs of max_pair_len.
    Both tasks of a mixed step are held until one backward; an alternating schedule runs one task per step (the
    larger counts). -> {"queries_per_gpu", "tokens", "sequences"}."""
    t, d = cfg.train, cfg.data
    if t.batch_size % (gpus * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} must divide by gpus * grad_accum = {gpus} * "
                          f"{t.grad_accum}")
    b = t.batch_size // (gpus * t.grad_accum)
    group = b * (1 + d.n_neg)
    per_task = {"embed": (b * d.max_query_len + group * d.max_doc_len, b + group),
                "rerank": (group * d.max_pair_len, group)}
    tasks = mode_tasks(t.mode)
    if t.schedule == "alternate" and len(tasks) > 1:
        tokens, seqs = max(per_task[x] for x in tasks)
    else:
        tokens, seqs = (sum(per_task[x][i] for x in tasks) for i in (0, 1))
    return {"queries_per_gpu": b, "tokens": tokens, "sequences": seqs}


def activation_bytes_per_token(mcfg: ModelConfig, cfg: Config) -> int:
    """Bytes autograd keeps per token for ONE decoder layer during a forward with grad (frozen base, LoRA experts on
    adapters.targets; a = bytes of model.dtype; q = heads * head_dim, kv = kv_heads * head_dim, H hidden, I mlp):

        a * (2H + q + 2(q + kv) + 4q + 4I)      base-dtype tensors: the two RMSNorm outputs (inputs of q/k/v and
                                               gate/up), o_proj's input, RoPE's q and k, attention's q, k, v, out
                                               (k and v expanded to all q heads: model.py repeats them under a
                                               padding mask on GPU), and the MLP's gate, silu, up and down input
      + 4 * 2H                                 fp32: the two RMSNorms' fp32 inputs (what their backward reads)
      + 4 * (q + kv)          [qk_norm]        fp32: the same for the q/k RMSNorms (Qwen3)
      + 4 * sum(in_features of each target)    fp32: each MoE linear's input cast for its LoRA term (not when a = 4,
                                               where the cast is the tensor itself)
      + 4 * 2 * R * len(targets)               fp32: each MoE linear's A x and gated A x (R = sum of expert ranks)

    An estimate (attention's log-sum-exp, the masks and per-layer router tensors, and allocator slack are left
    out); without grad checkpointing the activations are L times this per token. With model.grad_checkpointing the
    blocks keep only their inputs (a * H per token per layer) and one block's activations are rebuilt at a time:
    a * H * L + this."""
    a = BYTES[cfg.model.dtype]
    H, I = mcfg.hidden_size, mcfg.intermediate_size
    q, kv = mcfg.num_attention_heads * mcfg.head_dim, mcfg.num_key_value_heads * mcfg.head_dim
    in_features = {"q_proj": H, "k_proj": H, "v_proj": H, "o_proj": q, "gate_proj": H, "up_proj": H, "down_proj": I}
    spec = adapter_config(cfg)
    targets = spec.targets
    R = sum(e.r for e in spec.experts)
    base = a * (2 * H + q + 2 * (q + kv) + 4 * q + 4 * I)
    norms = 4 * 2 * H + (4 * (q + kv) if mcfg.qk_norm else 0)
    lora_in = 4 * sum(in_features[t] for t in targets) if a != 4 else 0
    lora_mid = 4 * 2 * R * len(targets)
    return base + norms + lora_in + lora_mid


# --------------------------------------------------------------------------------------------- the estimate
def activation_bytes(cfg: Config, mcfg: ModelConfig, gpus: int, checkpointing: bool) -> int:
    """N * (L * act) without, N * (a * H * L + act) with grad checkpointing (N: step_tokens' tokens, act:
    activation_bytes_per_token)."""
    a, L = BYTES[cfg.model.dtype], mcfg.num_hidden_layers
    act = activation_bytes_per_token(mcfg, cfg)
    return step_tokens(cfg, gpus)["tokens"] * ((a * mcfg.hidden_size * L + act) if checkpointing else L * act)


def memory_estimate(cfg: Config, mcfg: ModelConfig, counts: dict, gpus: int) -> dict:
    """Bytes per GPU, by part (their sum is "total"):

        weights      = base * a                         the frozen decoder in model.dtype
        trainable    = 4 * trainable                    experts, routers, head in fp32
        gradients    = 4 * trainable
        adamw        = 4 * 2 * trainable                exp_avg, exp_avg_sq
        update_copy  = 4 * 3 * trainable                train.optimizer_step's snapshot (parameters + AdamW state)
                                                        kept to undo a bad update
        ddp_buckets  = 4 * trainable if gpus > 1        DDP's gradient buckets
        activations  = N * (L * act | a * H * L + act)  without | with grad checkpointing; N = step_tokens' tokens,
                                                        act = activation_bytes_per_token
    Sequences are taken at their full length limits (the worst case)."""
    tr = counts["trainable"]
    parts = {"weights": counts["base"] * BYTES[cfg.model.dtype], "trainable": 4 * tr, "gradients": 4 * tr,
             "adamw": 4 * ADAM_STATES * tr, "update_copy": 4 * (1 + ADAM_STATES) * tr,
             "ddp_buckets": 4 * tr if gpus > 1 else 0,
             "activations": activation_bytes(cfg, mcfg, gpus, cfg.model.grad_checkpointing)}
    parts["total"] = sum(parts.values())
    return parts


def dry_run(cfg: Config, gpus: int = 1) -> dict:
    """-> {"model": ModelConfig, "counts": parameter_counts, "step": step_tokens, "memory": memory_estimate,
    "gpus", "activations_other": the activations with model.grad_checkpointing the other way}."""
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1 (got {gpus})")
    base, head = meta_model(cfg)
    counts = parameter_counts(base, head)
    other = activation_bytes(cfg, base.config, gpus, not cfg.model.grad_checkpointing)
    return {"model": base.config, "counts": counts, "step": step_tokens(cfg, gpus),
            "memory": memory_estimate(cfg, base.config, counts, gpus), "gpus": gpus,
            "activations_other": other}


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


def report(cfg: Config, res: dict) -> str:
    """The printed dry-run: the model, the parameter counts, one GPU's micro-step and the memory parts."""
    m, c, s, mem = res["model"], res["counts"], res["step"], res["memory"]
    t, gc = cfg.train, "on" if cfg.model.grad_checkpointing else "off"
    lines = [
        f"model: {cfg.model.path} ({m.model_type}, {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
        f"mlp {m.intermediate_size}, heads {m.num_attention_heads}/{m.num_key_value_heads}, vocab {m.vocab_size}, "
        f"tied {m.tie_word_embeddings}), dtype {cfg.model.dtype}, train.mode {t.mode}",
        f"parameters: base {c['base']:,} ({c['base'] / 1e9:.3f} B; non-embedding {c['non_embedding']:,} = "
        f"{c['non_embedding'] / 1e9:.3f} B)",
        f"trainable: {c['trainable']:,} ({100 * c['trainable'] / c['base']:.2f}% of base) = experts "
        f"{c['experts']:,} + routers {c['routers']:,} + head {c['head']:,}",
        f"per GPU ({res['gpus']} GPUs, grad_accum {t.grad_accum}): {s['queries_per_gpu']} queries, "
        f"{s['sequences']} sequences, {s['tokens']:,} tokens per micro-step; grad checkpointing {gc}",
        "memory per GPU (estimate): " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items() if k != "total"),
        f"memory per GPU total: {_gib(mem['total'])} (activations with grad checkpointing "
        f"{'off' if cfg.model.grad_checkpointing else 'on'} instead: {_gib(res['activations_other'])})",
    ]
    return "\n".join(lines)


def parse_gpus(argv: Sequence[str]) -> tuple:
    """-> (gpus, argv without --gpus=N); default the WORLD_SIZE environment variable, else 1."""
    gpus, rest = int(os.environ.get("WORLD_SIZE", "1")), []
    for a in argv:
        if a.startswith("--gpus="):
            try:
                gpus = int(a.split("=", 1)[1])
            except ValueError:
                raise UsageError(f"--gpus: expected an integer, got {a.split('=', 1)[1]!r}") from None
        else:
            rest.append(a)
    return gpus, rest


def main(argv: Sequence[str]) -> int:
    """train.py's --dry-run (argv without it): load the config, print the report, write nothing."""
    gpus, args = parse_gpus(argv)
    if not args or args[0].startswith("--"):
        raise UsageError(USAGE)
    bad = [a for a in args[1:] if a in ("--resume", "--overwrite")]
    if bad:
        raise UsageError(f"--dry-run writes nothing; {bad[0]} does not go with it")
    cfg = load_config(args[0], args[1:])
    print(report(cfg, dry_run(cfg, gpus)), flush=True)
    return 0
