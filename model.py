"""Qwen3-family decoder (qwen3, qwen2, llama, mistral) from scratch, HF checkpoint loading, tokenizer.

Reading order: ModelConfig (from config.json) -> RMSNorm -> rotary embedding -> KVCache -> Attention -> MLP -> Block ->
Decoder (HF's "model.") -> CausalLM (adds the LM head) -> load_pretrained -> Tokenizer / load_tokenizer.

Parameter names are Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...), so a checkpoint loads with
no renaming table. The forward returns the final-norm hidden states (B, T, H); LM-head logits are computed only
where asked (chosen positions, chosen vocabulary rows), e.g. the reranker's "yes"/"no" rows at the last token.

Positions come from the attention mask (cumsum - 1), so a sequence gives the same outputs whatever its padding
side and whatever else is in its batch. A KVCache keeps every layer's keys and values for incremental decoding
(generate.py): a call with a cache runs only the new tokens, its attention_mask covering the cached ones too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer
from torch.utils.checkpoint import checkpoint

from aux_stats import finalize_over_layers

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")


class ConfigError(ValueError):
    """A config.json (or project config) value the code does not implement."""


class CheckpointError(RuntimeError):
    """A checkpoint directory or file that cannot be loaded as asked."""


# --------------------------------------------------------------------------------------------- the CLIs' error path
class UsageError(ValueError):
    """A command line that does not parse: an unknown option, a missing or malformed argument."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a parse error raises UsageError (one line through run_cli, exit code 2) instead of
    printing the usage block; `--debug` (handled by run_cli) is listed in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


# What a user can cause and fix: every project error (ConfigError, DataError, EvalError, UsageError, ... are
# ValueErrors), a missing or unreadable file (OSError) and a checkpoint that does not load.
INPUT_ERRORS = (ValueError, OSError, CheckpointError)


def run_cli(prog: str, main, argv=None, known: tuple = ()) -> int:
    """The one error path of train.py, evaluate.py, analysis.py and data.py: call main(argv) and return its exit
    code (None -> 0). An input error (INPUT_ERRORS + `known`) becomes ONE line on stderr, `<prog>: error: <message>`,
    and exit code 2; the messages name the file, key, line or value and what was expected. Anything else is a bug
    and keeps its traceback. `--debug` anywhere in argv is removed and lets input errors raise with theirs too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except INPUT_ERRORS + tuple(known) as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2
    return code or 0


# --------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: always; llama/qwen3: attention_bias
    o_bias: bool = False  # llama/qwen3: attention_bias
    mlp_bias: bool = False  # llama only
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k, before RoPE
    sliding_window: Optional[int] = None  # set only when the window is active in some layer

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from the dict of an HF config.json (transformers 4.x or 5.x layout)."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"{source}: required key {key!r} is missing")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")

        # RoPE: 4.x files carry rope_theta (+ rope_scaling) at the top level, 5.x files a rope_parameters dict.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        for key, spec in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if spec and spec.get("rope_type", spec.get("type", "default")) != "default":
                raise ConfigError(f"{source}: {key} type {spec.get('rope_type', spec.get('type'))!r} is not supported "
                                  "(only the default RoPE)")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))

        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        attention_bias = bool(d.get("attention_bias", False))

        # Sliding-window attention: qwen2/qwen3 only with use_sliding_window, mistral whenever sliding_window is set.
        window = d.get("sliding_window")
        if mt in ("qwen2", "qwen3"):
            window = window if d.get("use_sliding_window", False) else None
        elif mt == "llama":
            window = None
        if "sliding_attention" in (d.get("layer_types") or []) and window is None:
            raise ConfigError(f"{source}: layer_types asks for sliding_attention but no sliding_window is set")

        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else (attention_bias if mt in ("llama", "qwen3") else False),
            o_bias=attention_bias if mt in ("llama", "qwen3") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=(mt == "qwen3"),
            sliding_window=window,
        )

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: config.json not found")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=path)


# --------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, 1, T, D), computed in fp32 like HF, then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim))
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, D): rotate pairs (i, i + D/2), the HF "rotate_half" convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class KVCache:
    """Keys and values of the tokens run so far, one (B, n_kv, S, D) tensor each per layer, after RoPE (and after
    the adapters' q/k/v deltas: the experts' routing must stay fixed while a cache is in use). Empty until the
    first call (the prompt) fills it; every later call appends its T new tokens."""
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Append this call's k, v (B, n_kv, T, D) to layer's past -> (B, n_kv, S + T, D) each."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), dim=2)
            self.values[layer] = torch.cat((self.values[layer], v), dim=2)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # its slot in a KVCache
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, is_causal, cache: Optional[KVCache] = None):
        """x (B, T, H); with a cache, k and v are appended to its past and the queries attend to all of it
        (mask (B, 1, T, S + T) or None)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S + T, D)
        # GQA: each kv head serves n_heads / n_kv query heads. SDPA's enable_gqa reads the shared kv heads in place,
        # with no repeated copy of k and v (faster on CPU, masked or not). CUDA kernels take enable_gqa only without
        # a mask (with one SDPA would fall back to its math kernel), so there a masked call repeats k and v instead.
        gqa = self.n_kv != self.n_heads
        if gqa and mask is not None and q.device.type != "cpu":
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)  # (B, nh, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

        # Set by moe_lora.attach: called at block entry, it computes this layer's routing weights from the block
        # input and hands them to the block's MoE-LoRA linears; its clear() takes them back when the block is done
        # (also on an error), so no routing state outlives one call. None for the plain backbone. Its
        # `routing_is_fixed` says whether its gate ignores the input (what a KV cache needs, see generate.py).
        self.adapter_hook: Optional[nn.Module] = None

    def forward(self, x, cos, sin, mask, is_causal, ctx: "ForwardContext"):
        if self.adapter_hook is None:
            return self._layers(x, cos, sin, mask, is_causal, ctx.cache)
        self.adapter_hook(x, ctx)
        try:
            return self._layers(x, cos, sin, mask, is_causal, ctx.cache)
        finally:
            self.adapter_hook.clear()

    def _layers(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's "model." module: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ForwardContext:
    """What one forward call hands to the blocks and their adapter hooks; lives for that call only (no global
    state)."""
    attention_mask: torch.Tensor  # (B, T) 1 = real token, this call's tokens only
    task_ids: Optional[torch.Tensor] = None  # (B,) task of each sequence, for task-explicit routers
    capture: bool = False  # record routing weights for analysis
    aux: dict = field(default_factory=dict)  # name -> list of per-layer aux_stats.AuxStat
    routing: list = field(default_factory=list)  # captured (layer, weights) when capture is on
    done: bool = False  # set when the forward returns: a checkpoint recompute in backward adds nothing more
    shared: dict = field(default_factory=dict)  # scratch for hooks, e.g. weights computed once for all layers
    adapters: bool = True  # False: the hooks switch the experts off (the plain base's output)
    cache: Optional[KVCache] = None  # past keys and values, extended by this call

    def add_aux(self, name: str, value) -> None:
        if not self.done:
            self.aux.setdefault(name, []).append(value)


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (B, T, H) after the final norm
    layer_hidden: Optional[list] = None  # [embeddings, block 1, ..., block L] (B, T, H) each, before the final norm
    aux: dict = field(default_factory=dict)  # this call's router aux losses, each over layers (finalize_over_layers)
    routing: Optional[list] = None  # [(layer, weights (B, E) or (B, T, E))] when capture_routing=True
    aux_stats: dict = field(default_factory=dict)  # name -> [aux_stats.AuxStat per layer], to finalise over many calls


def attention_mask_4d(attention_mask: torch.Tensor, causal: bool, n_queries: Optional[int] = None) -> torch.Tensor:
    """(B, S) 1/0 padding mask -> (B, 1, T, S) bool, True = may attend; the queries are the last T = n_queries
    positions (default S: no cache), query i sitting at position S - T + i.

    Keys at pad positions are hidden. Each position may always attend to itself, so a pad query row is never
    empty (an empty row would give NaN in SDPA); pad positions' outputs are meaningless and never used.
    """
    B, S = attention_mask.shape
    T = S if n_queries is None else n_queries
    dev = attention_mask.device
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    query_pos = torch.arange(S - T, S, device=dev)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=dev)[None, :]  # (1, S)
    allowed = keys | (key_pos == query_pos)
    if causal:
        allowed = allowed & (key_pos <= query_pos)
    return allowed


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last real token, for left or right padding.

    Found from the mask, never by comparing ids with the pad id: in Qwen3 the appended EOS is the pad token.
    """
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(dim=1)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        # Tied checkpoints carry no lm_head.weight: the logits use model.embed_tokens.weight.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # Set by moe_lora.attach for a router that reads the whole input first (RouterRetriever):
        # prepass(model, input_ids, attention_mask, causal, ctx), called before the blocks. None otherwise.
        self.adapter_prepass = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, causal: bool = True,
                output_hidden_states: bool = False, task_ids: Optional[torch.Tensor] = None,
                capture_routing: bool = False, adapters: bool = True,
                cache: Optional[KVCache] = None) -> ModelOutput:
        """input_ids, attention_mask (B, T) -> ModelOutput with hidden (B, T, H).

        causal=False gives bidirectional attention over the non-pad tokens (GritLM-style embedding ablation).
        task_ids (B,) and capture_routing are read only by attached experts' routers (moe_lora.py); adapters=False
        runs the plain base with the experts switched off.
        With a cache (causal only) the call runs the T new tokens after its S cached ones and appends theirs;
        attention_mask is then (B, S + T), the cached tokens' mask followed by the new ones' (HF's convention).
        """
        B, T = input_ids.shape
        cfg = self.config
        past = 0 if cache is None else cache.length
        if cfg.sliding_window is not None and past + T > cfg.sliding_window:
            raise ConfigError(f"sequence length {past + T} exceeds the config's active sliding_window "
                              f"{cfg.sliding_window}; sliding-window attention is not implemented")
        if cache is not None and not causal:
            raise ValueError("a KV cache needs causal attention (causal=False sees later tokens)")
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                             f"({past} cached + {T} new tokens)")
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        if causal and bool(attention_mask.all()) and (past == 0 or T == 1):
            # no padding: SDPA's own causal path (flash / efficient kernels); one new token sees every key
            mask, is_causal = None, past == 0
        else:
            mask, is_causal = attention_mask_4d(attention_mask, causal, T), False
        ctx = ForwardContext(attention_mask[:, past:], task_ids, capture_routing, adapters=adapters, cache=cache)
        if adapters and self.adapter_prepass is not None:
            self.adapter_prepass(self, input_ids, ctx.attention_mask, causal, ctx)
        layer_hidden = [x] if output_hidden_states else None
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, cos, sin, mask, is_causal, ctx, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, ctx)
            if output_hidden_states:
                layer_hidden.append(x)
        ctx.done = True
        aux = {name: finalize_over_layers(stats) for name, stats in ctx.aux.items()}
        return ModelOutput(self.model.norm(x), layer_hidden, aux, ctx.routing if capture_routing else None,
                           dict(ctx.aux))

    def lm_logits(self, hidden: torch.Tensor, positions: Optional[torch.Tensor] = None,
                  token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LM-head logits only where asked.

        hidden (B, T, H); positions (B,) -> (B, V') or (B, K) -> (B, K, V'); None = every position (B, T, V').
        token_ids (V',) selects vocabulary rows (e.g. the ids of "yes" and "no"); None = the whole vocabulary.
        """
        if positions is not None:
            idx = positions if positions.dim() == 2 else positions[:, None]  # (B, K)
            hidden = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, K, H)
            if positions.dim() == 1:
                hidden = hidden[:, 0]  # (B, H)
        w = self.lm_head_weight
        if token_ids is not None:
            w = w[token_ids]  # (V', H)
        return hidden @ w.t()


# --------------------------------------------------------------------------------------------- loading
def _checkpoint_files(path: str) -> list:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model directory not found")
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for fn in files:
            if not os.path.isfile(fn):
                raise CheckpointError(f"{fn}: shard listed in {index} is missing")
        return files
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


def load_pretrained(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """Load an HF checkpoint directory (config.json + safetensors, single file or sharded).

    The model is built on the meta device and each tensor is read once, cast and assigned: no second full copy.
    Keys are checked strictly; a bare-backbone checkpoint (keys without "model.", e.g. an embedding model saved as
    Qwen3Model) is read with that prefix added. A tied lm_head.weight in the file is redundant and skipped.
    """
    files = _checkpoint_files(path)
    cfg = ModelConfig.from_json(os.path.join(path, "config.json"))
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: p.shape for k, p in model.state_dict().items()}

    state, where = {}, {}
    for fn in files:
        with safe_open(fn, framework="pt", device=str(device)) as f:
            keys = list(f.keys())
            bare = bool(keys) and not any(k.startswith("model.") for k in keys)
            for k in keys:
                name = k if not bare or k == "lm_head.weight" else "model." + k
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if name in expected and f.get_slice(k).get_shape() != list(expected[name]):
                    raise CheckpointError(f"{fn}: tensor {k!r} has shape {f.get_slice(k).get_shape()}, "
                                          f"the config expects {list(expected[name])}")
                if name in expected:
                    state[name] = f.get_tensor(k).to(dtype)
                where[name] = fn
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint keys do not match the {cfg.model_type} model built from config.json; "
                              f"missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                              f"unexpected: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)  # the base is frozen; moe_lora adds the trainable tensors
    return model.eval()


# --------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """A `tokenizers.Tokenizer` with batch encoding to padded tensors.

    The end token appended for embedding/reranking (`eos`) is `<|endoftext|>` when the vocabulary has it (what
    Qwen3-Embedding appends; it is also Qwen3's pad token), else tokenizer_config.json's eos_token.
    """

    def __init__(self, tok, eos_token: str, pad_token: Optional[str] = None, source: str = "tokenizer.json"):
        self.tok = tok
        self.source = source
        self.eos_token = eos_token
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(pad_token) if pad_token else self.eos_id

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_ids(self, texts: list, max_length: int, add_eos: bool = False,
                   add_special_tokens: bool = True) -> list:
        """Token id lists, truncated to max_length; with add_eos the EOS is kept as the last token."""
        out = []
        for enc in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens):
            ids = list(enc.ids)
            if add_eos:
                if ids and ids[-1] == self.eos_id:
                    ids = ids[:-1]  # a post-processor already appended it: keep exactly one
                ids = ids[: max_length - 1] + [self.eos_id]
            else:
                ids = ids[:max_length]
            out.append(ids)
        return out

    def pad(self, id_lists: list, padding_side: str = "right") -> dict:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        T = max(1, max(len(x) for x in id_lists))
        ids = torch.full((len(id_lists), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(id_lists), T), dtype=torch.long)
        for i, x in enumerate(id_lists):
            if not x:
                continue
            sl = slice(0, len(x)) if padding_side == "right" else slice(T - len(x), T)
            ids[i, sl] = torch.tensor(x, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, texts: list, max_length: int = 512, padding_side: str = "right", add_eos: bool = False,
                 add_special_tokens: bool = True) -> dict:
        """Batch encode -> {"input_ids": (B, T), "attention_mask": (B, T)} (long tensors)."""
        return self.pad(self.encode_ids(texts, max_length, add_eos, add_special_tokens), padding_side)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str, eos_token: Optional[str] = None) -> Tokenizer:
    """Load `<path>/tokenizer.json` (path may be the directory or the file itself)."""
    fn = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(fn):
        raise CheckpointError(f"{fn}: tokenizer.json not found")
    tok = HFTokenizer.from_file(fn)
    tok.no_padding()
    tok.no_truncation()
    special = {}
    cfg_fn = os.path.join(os.path.dirname(fn), "tokenizer_config.json")
    if os.path.isfile(cfg_fn):
        with open(cfg_fn) as f:
            special = json.load(f)

    def _tok(v):  # tokenizer_config values are strings or {"content": ...} dicts
        return v.get("content") if isinstance(v, dict) else v

    if eos_token is None:
        eos_token = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else _tok(special.get("eos_token"))
    if eos_token is None:
        raise CheckpointError(f"{fn}: no <|endoftext|> token and no eos_token in tokenizer_config.json; pass eos_token")
    return Tokenizer(tok, eos_token, _tok(special.get("pad_token")), source=fn)
