"""Train UniMoER: one frozen decoder + LoRA experts for dense retrieval (embedding) and reranking.

    python train.py configs/tiny.yaml                                   # CPU, built-in synthetic task, minutes
    python train.py configs/tiny.yaml --train.lr=5e-4 --train.steps=50  # overrides: --section.key=value (YAML)
    python train.py configs/tiny.yaml --resume                          # continue from <out_dir>'s latest checkpoint
    torchrun --nproc_per_node=8 train.py configs/joint_moe.yaml         # DDP (nccl on GPU, gloo on CPU)

Reading order: config dataclasses -> UniMoER (base + experts + the two task heads, and the encoder interface
evaluate.py uses) -> losses (each one visible function) -> checkpoints -> the training loop (main).

A checkpoint directory <out_dir> holds config.yaml (the resolved config), metrics.jsonl (one line per dev
evaluation), train_log.jsonl (one line per step), base/ (only for the built-in tiny random base) and
checkpoint-NNNNNN/ directories (adapters.safetensors: experts and routers; head.safetensors: the optional
linear reranking head; trainer_state.pt: optimizer, RNG and step; config.yaml) named by the text file `latest`.
Each checkpoint is written to a temporary directory and renamed, so a kill at any moment leaves the previous
one whole.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

import data
import evaluate
import moe_lora
from model import CausalLM, ModelConfig, last_token_positions, load_pretrained, load_tokenizer
from router import LearnedRouter, RouterConfig

TASKS = ["embed", "rerank"]  # task ids index this list (router.tasks must equal it)
MODES = ("emb_only", "rank_only", "joint_single", "joint_moe", "hard_switch", "hard_switch_shared", "no_shared")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class TinyBase:
    """The built-in random base used when model.path is null (vocabulary from the data's tokenizer)."""
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    init_std: float = 0.1
    seed: int = 0
    # Self-supervised causal-LM pretraining of the base on the corpus documents alone (pretrain_tiny_base); 0 = keep
    # the random base. The result is cached next to the data (tiny_base_cache_dir) and frozen like any base.
    pretrain_steps: int = 0
    pretrain_lr: float = 3.0e-3
    pretrain_batch: int = 32
    pretrain_docs: int = 2  # documents per pretraining sequence before the recurrence of the first one


@dataclass
class ModelSection:
    path: Optional[str] = None  # HF checkpoint directory; null = the tiny random base (written to <out_dir>/base)
    tokenizer: Optional[str] = None  # directory or tokenizer.json; default model.path, or data.dir for the tiny base
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the frozen base; adapters are always fp32
    tiny: TinyBase = field(default_factory=TinyBase)
    bidirectional: bool = False  # non-causal attention (GritLM-style ablation)
    grad_checkpointing: bool = False


@dataclass
class DataSection:
    dir: str = "data/synthetic"  # BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv
    synthetic: bool = False  # write the built-in synthetic task into dir first if dir does not exist
    synthetic_seed: int = 0
    synthetic_args: dict = field(default_factory=dict)  # other data.make_synthetic arguments (n_docs, random_negs, ...)
    train_file: Optional[str] = None  # JSONL {"query","pos","neg"} or MS MARCO triples .tsv; default <dir>/train.jsonl
    dev_split: str = "dev"
    dev_queries: int = 200  # first N dev queries (sorted ids) at each dev evaluation; 0 = all
    dev_corpus: int = 0  # 0 = the whole corpus; N = judged dev docs + the first N others (cheap dev runs)
    n_neg: int = 7  # hard negatives per query in training
    max_query_len: int = 64
    max_doc_len: int = 128
    max_pair_len: int = 256  # reranker input, template included
    padding_side: Literal["left", "right"] = "left"
    # Append the tokenizer's EOS to queries and documents and pool there (Qwen3-Embedding). false pools at the
    # last text token: for base models whose EOS is a sink or untrained token (SmolLM2: cos ~0.99 between texts)
    append_eos: bool = True
    embed_instruction: str = data.EMBED_INSTRUCTION
    rerank_instruction: str = data.RERANK_INSTRUCTION
    # "qwen3": Qwen3-Reranker's system/user/assistant prompt around the pair (RERANK_PREFIX ... RERANK_SUFFIX);
    # "bare": the pair alone, then EOS, scored there (the tiny default: see README, "The tiny default")
    rerank_prompt: Literal["qwen3", "bare"] = "qwen3"


@dataclass
class AdapterSection:
    """Expert shapes; which experts exist and how they are routed follows from train.mode."""
    r: int = 8  # rank of the task experts (embed, rerank, joint)
    alpha: float = 16.0
    shared_r: int = 16
    shared_alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    layers: Optional[list[int]] = None  # None = every layer
    rslora: bool = False
    dropout: float = 0.0
    shared: Literal["always", "routed"] = "always"  # joint_moe's shared expert: outside the router, or routed


@dataclass
class Stage:
    steps: int
    lr: Optional[float] = None  # default train.lr
    tasks: Literal["both", "embed", "rerank"] = "both"
    freeze_experts: list[str] = field(default_factory=list)


@dataclass
class TrainSection:
    mode: Literal[MODES] = "joint_moe"
    out_dir: str = "ckpt/run"
    seed: int = 0
    steps: int = 1000  # ignored when stages are given (their steps add up)
    stages: list[Stage] = field(default_factory=list)
    batch_size: int = 32  # global: queries per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    clip: float = 1.0
    schedule: Literal["mixed", "alternate"] = "mixed"  # both losses every step, or one task per step in turn
    emb_weight: float = 1.0  # alpha
    rank_weight: float = 1.0  # beta
    aux_weights: dict[str, float] = field(default_factory=lambda: {"load_balance": 0.01})  # lambda per aux loss
    temperature: float = 0.05  # InfoNCE
    cross_device_negatives: bool = True
    rerank_loss: Literal["bce", "group"] = "bce"  # pointwise BCE, or group-wise softmax CE (localized contrastive)
    rerank_head: Literal["yesno", "linear"] = "yesno"  # logit("yes") - logit("no"), or a linear head (ablation)
    pooling: Literal["last", "first"] = "last"  # first-token pooling needs model.bidirectional
    freeze_experts: list[str] = field(default_factory=list)  # experts kept at their current values
    eval_every: int = 100
    save_every: int = 100
    rerank_topk: int = 100  # dev reranking depth
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16_autocast: bool = True  # on CUDA only


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapters: AdapterSection = field(default_factory=AdapterSection)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self, where: str) -> None:
        t = self.train
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "rerank_topk", "max_bad_steps"):
            if getattr(t, name) < 1:
                raise ConfigError(f"{where}: train.{name} must be >= 1 (got {getattr(t, name)})")
        if t.pooling == "first" and not self.model.bidirectional:
            raise ConfigError(f"{where}: train.pooling 'first' sees only the first token under causal attention; "
                              "set model.bidirectional: true or use 'last'")
        if self.router.tasks != TASKS:
            raise ConfigError(f"{where}: router.tasks must be {TASKS} (got {self.router.tasks})")
        unknown = [k for k in t.aux_weights if k not in ("load_balance", "z_loss", "entropy")]
        if unknown:
            raise ConfigError(f"{where}: train.aux_weights: unknown aux loss {unknown}")
        for st in t.stages:
            if st.steps < 1:
                raise ConfigError(f"{where}: train.stages: steps must be >= 1")
        try:
            adapter_config(self)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


class ConfigError(ValueError):
    """A config file or override that does not map onto the dataclasses above."""


def _check_value(value, hint, where: str):
    """Check one YAML value against its field type and return it (an int is accepted for a float)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        return _check_value(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        allowed = args[0] if len(args) == 1 and isinstance(args[0], tuple) else args
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _check_value(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else value
    if is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, d, where: str):
    """Build dataclass `cls` from a mapping, 1:1: an unknown key or a value of the wrong type is an error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    hints, known = get_type_hints(cls), [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(known)})")
    try:
        return cls(**{k: _check_value(v, hints[k], f"{where}.{k}") for k, v in d.items()})
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str) -> dict:
    """Read a YAML config; a top-level `base: other.yaml` (relative to this file) is read first, then overridden."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = d.pop("base", None)
    if base is not None:
        d = _merge(read_yaml(os.path.join(os.path.dirname(path), base)), d)
    return d


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """YAML file + `--section.key=value` overrides (each value parsed as YAML) -> validated Config."""
    where = path + (" (with overrides)" if overrides else "")
    return config_from_dict(apply_overrides(read_yaml(path), overrides), where)


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """Set each `--section.key=value` (value parsed as YAML) in the config mapping d, in place; returns d."""
    for o in overrides:
        if not o.startswith("--") or "=" not in o:
            raise ConfigError(f"override {o!r}: expected --section.key=value")
        keys, value = o[2:].split("=", 1)
        *parents, last = keys.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {o!r}: {p!r} is not a section")
        node[last] = yaml.safe_load(value)
    return d


def config_from_dict(d: dict, where: str) -> Config:
    cfg = from_dict(Config, d, where)
    cfg.validate(where)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    evaluate.write_text_atomic(path, yaml.safe_dump(asdict(cfg), sort_keys=False))


def adapter_config(cfg: Config) -> moe_lora.MoELoRAConfig:
    """train.mode -> which experts exist, whether a shared expert is always on, and how they are routed."""
    a, mode = cfg.adapters, cfg.train.mode
    task = lambda name: moe_lora.ExpertSpec(name, a.r, a.alpha)  # noqa: E731
    shared = moe_lora.ExpertSpec("shared", a.shared_r, a.shared_alpha)
    single = {"emb_only": "embed", "rank_only": "rerank", "joint_single": "joint"}
    router = RouterConfig(**asdict(cfg.router))
    if mode in single:  # one LoRA, always on: a fixed router that gives every task that expert
        experts, shared_mode = [task(single[mode])], None
        router.kind, router.task_experts = "task", {t: [single[mode]] for t in TASKS}
    elif mode in ("hard_switch", "hard_switch_shared"):  # jina-v3 style: each task its own expert
        experts = [task("embed"), task("rerank")] + ([shared] if mode == "hard_switch_shared" else [])
        shared_mode = "always" if mode == "hard_switch_shared" else None
        router.kind, router.task_experts = "task", {"embed": ["embed"], "rerank": ["rerank"]}
    else:  # joint_moe, no_shared: a learned router
        experts = [task("embed"), task("rerank")] + ([shared] if mode == "joint_moe" else [])
        shared_mode = a.shared if mode == "joint_moe" else None
        router.kind = "learned"
    return moe_lora.MoELoRAConfig(experts=experts, targets=list(a.targets), layers=a.layers, rslora=a.rslora,
                                  dropout=a.dropout, shared=shared_mode, router=router)


def mode_tasks(mode: str) -> list:
    return {"emb_only": ["embed"], "rank_only": ["rerank"]}.get(mode, list(TASKS))


# ------------------------------------------------------------------------------------------------ the model
class UniMoER(nn.Module):
    """Base + experts + both task heads. Also the encoder interface of evaluate.py (encode_queries,
    encode_documents, score_pairs).

    Embedding: queries `Instruct: {instruction}\\nQuery:{query}` + EOS, documents bare + EOS (none with
    data.append_eos false); the hidden state of the last real token (found from the mask) or, bidirectional
    only, the first; L2-normalised.
    Reranking: RERANK_PREFIX + `<Instruct>: ...\\n<Query>: ...\\n<Document>: ...` (truncated) + RERANK_SUFFIX;
    score = logit("yes") - logit("no") at the last position from those two LM-head rows only (the log-odds of
    Qwen3-Reranker's p(yes)), or a linear head on the last hidden state (ablation).
    """

    def __init__(self, base: CausalLM, tok, cfg: Config):
        super().__init__()
        self.base, self.tok, self.cfg = base, tok, cfg
        self.register_buffer("yes_no", torch.tensor([tok.token_id("yes"), tok.token_id("no")]), persistent=False)
        self.head = nn.Linear(base.config.hidden_size, 1) if cfg.train.rerank_head == "linear" else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        ids = lambda s: tok.encode_ids([s], 10**9, add_special_tokens=False)[0]  # noqa: E731
        self.prefix_ids, self.suffix_ids = ids(data.RERANK_PREFIX), ids(data.RERANK_SUFFIX)
        if cfg.data.rerank_prompt == "bare":
            self.prefix_ids, self.suffix_ids = [], [tok.eos_id]

    # ---- text -> tensors
    def _device(self):
        return self.base.model.embed_tokens.weight.device

    def tokens_queries(self, queries: Sequence[str]) -> dict:
        d = self.cfg.data
        texts = [data.format_query(q, d.embed_instruction) for q in queries]
        return self.tok(texts, d.max_query_len, d.padding_side, add_eos=d.append_eos)

    def tokens_documents(self, docs: Sequence[str]) -> dict:
        d = self.cfg.data
        return self.tok(list(docs), d.max_doc_len, d.padding_side, add_eos=d.append_eos)

    def tokens_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> dict:
        d = self.cfg.data
        room = d.max_pair_len - len(self.prefix_ids) - len(self.suffix_ids)
        if room < 1:
            raise ConfigError(f"data.max_pair_len {d.max_pair_len} leaves no room after the reranker template")
        middle = self.tok.encode_ids([data.format_rerank_pair(q, doc, d.rerank_instruction)
                                      for q, doc in zip(queries, docs)], room, add_special_tokens=False)
        return self.tok.pad([self.prefix_ids + m + self.suffix_ids for m in middle], d.padding_side)

    # ---- heads
    def embed(self, batch: dict) -> tuple:
        """-> (B, H) fp32 L2-normalised embeddings, aux-loss stats {name: [router.AuxStat per layer]}."""
        ids, mask = batch["input_ids"].to(self._device()), batch["attention_mask"].to(self._device())
        task = torch.full((ids.shape[0],), TASKS.index("embed"), device=ids.device)
        out = self.base(ids, mask, causal=not self.cfg.model.bidirectional, task_ids=task)
        if self.cfg.train.pooling == "last":
            pos = last_token_positions(mask)
        else:
            pos = mask.long().argmax(dim=1)  # first real token, either padding side
        pooled = out.hidden[torch.arange(ids.shape[0], device=ids.device), pos]  # (B, H)
        return F.normalize(pooled.float(), dim=-1), out.aux_stats

    def rerank_scores(self, batch: dict) -> tuple:
        """-> (B,) fp32 relevance logits, aux-loss stats {name: [router.AuxStat per layer]}."""
        ids, mask = batch["input_ids"].to(self._device()), batch["attention_mask"].to(self._device())
        task = torch.full((ids.shape[0],), TASKS.index("rerank"), device=ids.device)
        out = self.base(ids, mask, task_ids=task)  # the reranker reads causally, like an LM answering yes/no
        last = last_token_positions(mask)
        if self.head is None:
            yes_no = self.base.lm_logits(out.hidden, positions=last, token_ids=self.yes_no).float()  # (B, 2)
            return yes_no[:, 0] - yes_no[:, 1], out.aux_stats
        h = out.hidden[torch.arange(ids.shape[0], device=ids.device), last].float()  # (B, H)
        return self.head(h).squeeze(-1), out.aux_stats

    def forward(self, queries=None, docs=None, pairs=None) -> dict:
        """One call per step, so DDP sees one forward per backward. Each argument is a token batch or None."""
        out, aux = {}, []
        if queries is not None:
            out["q"], a = self.embed(queries)
            aux.append(a)
            out["d"], a = self.embed(docs)
            aux.append(a)
        if pairs is not None:
            out["scores"], a = self.rerank_scores(pairs)
            aux.append(a)
        # Each aux loss over the union of the calls' units (queries, documents and pairs together), per layer: the
        # balance Switch asks of the whole batch, not of each single-task call. out["aux_stats"] keeps the sums.
        names = sorted({k for a in aux for k in a})  # a fixed order: a set's follows PYTHONHASHSEED (per process)
        out["aux_stats"] = {k: [sum(layer[1:], layer[0]) for layer in zip(*[a[k] for a in aux if k in a])]
                            for k in names}
        out["aux"] = {k: torch.stack([st.finalize() for st in v]).mean() for k, v in out["aux_stats"].items()}
        moe_lora.clear_routing(self.base)
        return out

    # ---- evaluate.py's encoder interface (inference: no grad, eval mode)
    @torch.no_grad()
    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self._batched(lambda b: self.embed(self.tokens_queries(b))[0], texts, batch_size)

    @torch.no_grad()
    def encode_documents(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self._batched(lambda b: self.embed(self.tokens_documents(b))[0], texts, batch_size)

    @torch.no_grad()
    def score_pairs(self, queries: Sequence[str], docs: Sequence[str], batch_size: int = 32) -> np.ndarray:
        pairs = list(zip(queries, docs))
        return self._batched(lambda b: self.rerank_scores(self.tokens_pairs(*zip(*b)))[0], pairs, batch_size)

    def _batched(self, fn, items, batch_size) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            outs = [fn(list(items[i:i + batch_size])).float().cpu() for i in range(0, len(items), batch_size)]
        finally:
            self.train(was_training)
            moe_lora.clear_routing(self.base)
        return torch.cat(outs).numpy() if outs else np.zeros((0,), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ losses
def _gather_keep_local(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks; only the local slice carries gradient (the others are detached copies)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def loss_world(cross_device: bool) -> int:
    """The factor info_nce_loss multiplies by (world size under DDP with cross-device negatives, else 1)."""
    return dist.get_world_size() if cross_device and dist.is_available() and dist.is_initialized() else 1


def info_nce_loss(q: torch.Tensor, d: torch.Tensor, temperature: float, cross_device: bool) -> torch.Tensor:
    """InfoNCE over in-batch and hard negatives: q (b, H), d (b * g, H) with query i's positive at row i * g.

    cross_device (under DDP): queries and documents of all ranks are gathered, every rank computes the loss of the
    whole global batch with gradients through its own slice only, and the loss is multiplied by world_size because
    DDP averages gradients over ranks. This is the one place the scaling is done; the result equals one process on
    the concatenated batch (tests/test_ddp.py). The returned value is the global mean times loss_world(...).
    """
    g = d.shape[0] // q.shape[0]
    world = loss_world(cross_device)
    if world > 1:
        q, d = _gather_keep_local(q), _gather_keep_local(d)
    scores = q @ d.t() / temperature  # (N, N * g)
    labels = torch.arange(q.shape[0], device=q.device) * g
    return F.cross_entropy(scores, labels) * world


def bce_loss(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Pointwise BCE on the relevance logits: (b * group,) with each group's first entry the positive."""
    labels = torch.zeros_like(scores).view(-1, group)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels.view(-1))


def group_ce_loss(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Group-wise softmax cross-entropy (localized contrastive): the positive against its own negatives."""
    s = scores.view(-1, group)
    return F.cross_entropy(s, torch.zeros(s.shape[0], dtype=torch.long, device=s.device))


def total_loss(out: dict, cfg: Config, group: int) -> tuple:
    """alpha * L_emb + beta * L_rank + sum_n lambda_n * L_aux_n -> (loss, {name: value} for the log)."""
    t, parts, terms = cfg.train, {}, []
    if "q" in out:
        parts["emb"] = info_nce_loss(out["q"], out["d"], t.temperature, t.cross_device_negatives)
        terms.append(t.emb_weight * parts["emb"])
    if "scores" in out:
        fn = bce_loss if t.rerank_loss == "bce" else group_ce_loss
        parts["rank"] = fn(out["scores"], group)
        terms.append(t.rank_weight * parts["rank"])
    for name, value in out["aux"].items():
        parts[name] = value
        terms.append(t.aux_weights.get(name, 0.0) * value)
    loss = sum(terms)
    logged = {k: float(v.detach()) for k, v in parts.items()}
    if "emb" in logged:
        logged["emb"] /= loss_world(t.cross_device_negatives)  # log the global mean, not its DDP gradient scaling
    return loss, logged


# ------------------------------------------------------------------------------------------------ building
def write_tiny_base(cfg: Config, out: str) -> None:
    """Write the built-in tiny base as an HF directory `out` (config.json, model.safetensors, tokenizer files):
    random weights N(0, init_std^2) from tiny.seed, then, if tiny.pretrain_steps > 0, pretrain_tiny_base on the
    documents of <data.dir>/corpus.jsonl (the only data file read). Written to a temporary sibling, then renamed."""
    from safetensors.torch import save_file

    tiny, tok_src = cfg.model.tiny, cfg.model.tokenizer or cfg.data.dir
    tok = load_tokenizer(tok_src)
    hf = {"model_type": "qwen3", "vocab_size": tok.vocab_size, "hidden_size": tiny.hidden_size,
          "intermediate_size": tiny.intermediate_size, "num_hidden_layers": tiny.num_hidden_layers,
          "num_attention_heads": tiny.num_attention_heads, "num_key_value_heads": tiny.num_key_value_heads,
          "head_dim": tiny.head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
          "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False}
    gen = torch.Generator().manual_seed(tiny.seed)
    model = CausalLM(ModelConfig.from_hf_dict(hf))
    state = {k: (torch.randn(v.shape, generator=gen) * tiny.init_std if not k.endswith("norm.weight") else v)
             for k, v in model.state_dict().items()}
    if tiny.pretrain_steps > 0:
        model.load_state_dict(state)
        texts = [data.doc_text(d) for d in data.load_corpus(cfg.data.dir).values()]
        docs = tok.encode_ids(texts, cfg.data.max_doc_len, add_special_tokens=False)
        pretrain_tiny_base(model, docs, tok.eos_id, tiny)
        state = {k: v.detach() for k, v in model.state_dict().items()}
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".tmp-base-")
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    src_dir = tok_src if os.path.isdir(tok_src) else os.path.dirname(tok_src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), os.path.join(tmp, name))
    os.rename(tmp, out)


def pretrain_sequences(docs: Sequence[list], eos: int, n_docs: int, batch: int, seed: int, step: int) -> list:
    """The token-id sequences of pretraining step `step`, a pure function of (seed, step).

    Each sequence is n_docs random documents and then the first of them again, EOS after each:
    d_1 EOS d_2 EOS ... d_n EOS d_1 EOS. The recurrence is predictable only by finding d_1's tokens earlier in
    the context, which is what grows the token-matching (induction) attention a pretrained LM has; nothing else
    relates the documents of a sequence (no queries, labels or train.jsonl are involved).
    """
    rng = np.random.default_rng([seed, step])
    out = []
    for _ in range(batch):
        picked = rng.choice(len(docs), size=n_docs, replace=False)
        seq = []
        for j in list(picked) + [picked[0]]:
            seq += list(docs[j]) + [eos]
        out.append(seq)
    return out


def pretrain_tiny_base(model: CausalLM, docs: Sequence[list], eos: int, tiny: TinyBase) -> list:
    """Train every weight of `model` as a causal LM on pretrain_sequences (AdamW, linear warmup over the first
    10% of steps, then constant; clip 1.0), in place, deterministic given tiny.seed. -> the loss per step."""
    gen_state = torch.get_rng_state()
    torch.manual_seed(tiny.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.0)
    warm = max(1, tiny.pretrain_steps // 10)
    losses = []
    model.train()
    for step in range(tiny.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = tiny.pretrain_lr * min(1.0, (step + 1) / warm)
        seqs = pretrain_sequences(docs, eos, tiny.pretrain_docs, tiny.pretrain_batch, tiny.seed, step)
        T = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), T), eos, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
        hidden = model(ids, mask).hidden  # (B, T, H)
        logits = model.lm_logits(hidden[:, :-1])  # (B, T-1, V): position t predicts token t+1
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    torch.set_rng_state(gen_state)
    return losses


def tiny_base_cache_dir(cfg: Config) -> str:
    """Where the pretrained tiny base of this data and tiny config is cached: a sibling of data.dir named
    <data.dir>.tiny-base-<hash>, the hash over model.tiny, data.max_doc_len and the bytes of the files it reads."""
    import hashlib

    h = hashlib.sha256(json.dumps([asdict(cfg.model.tiny), cfg.data.max_doc_len], sort_keys=True).encode())
    tok_src = cfg.model.tokenizer or cfg.data.dir
    tok_file = os.path.join(tok_src, "tokenizer.json") if os.path.isdir(tok_src) else tok_src
    for path in (os.path.join(cfg.data.dir, "corpus.jsonl"), tok_file):
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return f"{os.path.normpath(cfg.data.dir)}.tiny-base-{h.hexdigest()[:12]}"


def copy_dir_atomically(src: str, dst: str) -> None:
    """Copy directory src to dst via a temporary sibling and a rename, so dst is whole or absent."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".tmp-copy-")
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    os.rename(tmp, dst)


def build_model(cfg: Config, device: torch.device) -> UniMoER:
    """Frozen base from model.path (+ tokenizer) with the mode's experts and routers attached."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    base = load_pretrained(cfg.model.path, dtype=dtype, device=device)
    base.gradient_checkpointing = cfg.model.grad_checkpointing
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    torch.manual_seed(cfg.train.seed)  # expert init (A Kaiming) and router init
    moe_lora.attach(base, adapter_config(cfg))
    return UniMoER(base, tok, cfg).to(device)


def trainable_parameters(um: UniMoER) -> list:
    return moe_lora.adapter_parameters(um.base) + (list(um.head.parameters()) if um.head is not None else [])


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(path: str) -> str:
    """A run directory (-> its latest checkpoint) or a checkpoint directory itself."""
    if os.path.isfile(os.path.join(path, "adapters.safetensors")):
        return path
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{path}: no checkpoint here (neither adapters.safetensors nor a 'latest' file)")
    with open(latest) as f:
        ckpt = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(ckpt, "adapters.safetensors")):
        raise FileNotFoundError(f"{ckpt}: adapters.safetensors missing (named by {latest})")
    return ckpt


def save_checkpoint(um: UniMoER, opt, cfg: Config, step: int, bad_steps: int, keep: int = 2) -> str:
    """Write <out_dir>/checkpoint-<step> atomically (temporary directory, then rename), then point `latest` at it."""
    from safetensors.torch import save_file

    out = cfg.train.out_dir
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-")
    moe_lora.save_adapters(um.base, os.path.join(tmp, "adapters.safetensors"))
    if um.head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in um.head.state_dict().items()},
                  os.path.join(tmp, "head.safetensors"))
    rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
           "numpy_pos": np.random.get_state()[2], "python": repr(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"step": step, "bad_steps": bad_steps, "optimizer": opt.state_dict(), "rng": rng},
               os.path.join(tmp, "trainer_state.pt"))
    save_config(cfg, os.path.join(tmp, "config.yaml"))
    name = f"checkpoint-{step:06d}"
    final = os.path.join(out, name)
    if os.path.isdir(final):  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    evaluate.write_text_atomic(os.path.join(out, "latest"), name + "\n")
    old = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def load_trainer_state(ckpt: str, um: UniMoER, opt) -> tuple:
    """Restore adapters, head, optimizer and RNG from a checkpoint directory -> (step, bad_steps)."""
    from safetensors.torch import load_file

    moe_lora.load_adapters(um.base, os.path.join(ckpt, "adapters.safetensors"))
    if um.head is not None:
        um.head.load_state_dict(load_file(os.path.join(ckpt, "head.safetensors")))
    path = os.path.join(ckpt, "trainer_state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: trainer state missing; cannot resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(rng["numpy_pos"]), 0, 0.0))
    import ast
    random.setstate(ast.literal_eval(rng["python"]))
    return state["step"], state["bad_steps"]


def load_run(path: str, device: Union[str, torch.device] = "cpu") -> UniMoER:
    """Rebuild base + experts (+ head) from a run or checkpoint directory alone, for evaluation."""
    from safetensors.torch import load_file

    ckpt = checkpoint_dir(path)
    cfg_path = os.path.join(ckpt, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: config.yaml missing from the checkpoint")
    cfg = load_config(cfg_path)
    run_base = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "base")
    if not os.path.isdir(cfg.model.path) and os.path.isdir(run_base):
        cfg.model.path = run_base  # the tiny base travels with its run directory (model.path was relative)
    um = build_model(cfg, torch.device(device))
    moe_lora.detach(um.base)  # the file's own spec rebuilds the experts exactly
    moe_lora.load_adapters(um.base, os.path.join(ckpt, "adapters.safetensors"))
    if um.head is not None:
        head = os.path.join(ckpt, "head.safetensors")
        if not os.path.isfile(head):
            raise FileNotFoundError(f"{head}: missing (train.rerank_head is 'linear')")
        um.head.load_state_dict(load_file(head))
    return um.eval()


def _truncate_jsonl(path: str, step: int) -> None:
    """Drop lines logged after `step` (by a run killed after its last checkpoint), so a resume does not repeat."""
    if os.path.isfile(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        evaluate.write_text_atomic(path, "".join(lines))


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------ dev evaluation
def load_dev(cfg: Config) -> tuple:
    """(corpus texts, queries, qrels) of the dev split, cut as data.dev_queries / data.dev_corpus say."""
    d = cfg.data
    qrels = data.load_qrels(d.dir, d.dev_split)
    queries = data.load_queries(d.dir)
    qids = sorted(q for q in qrels if q in queries and any(v > 0 for v in qrels[q].values()))
    if d.dev_queries:
        qids = qids[:d.dev_queries]
    corpus = {k: data.doc_text(v) for k, v in data.load_corpus(d.dir).items()}
    if d.dev_corpus:
        judged = {doc for q in qids for doc in qrels[q]}
        keep = judged | set([k for k in corpus if k not in judged][:d.dev_corpus])  # one set, not one per doc
        corpus = {k: corpus[k] for k in corpus if k in keep}
    return corpus, {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}


DEV_CANDIDATES = "dev_candidates.trec"  # in <out_dir>: the fixed list every dev evaluation of the run reranks


def dev_candidates(um: UniMoER, dev: tuple, cfg: Config) -> dict:
    """The run's fixed dev candidates: subword BM25 (evaluate.bm25_run over the model tokenizer's token ids of
    the query and document texts), top train.rerank_topk per dev query; also written to <out_dir>/dev_candidates.trec.

    Model-free on purpose: a pure function of the dev texts and the tokenizer, so every dev evaluation of a run
    (and every mode and seed on the same data) reranks the same list. On the synthetic task whole-word BM25 is ~0
    by design (the target shares no word with its query) while subword BM25 matches the shared stems, so the list
    holds the target for almost every query (its recall is reported next to it)."""
    corpus, queries, _ = dev
    toks = lambda texts: um.tok.encode_ids(list(texts), 10**9, add_special_tokens=False)  # noqa: E731
    doc_ids, qids = list(corpus), list(queries)
    run = evaluate.bm25_run(dict(zip(qids, toks(queries[q] for q in qids))),
                            dict(zip(doc_ids, toks(corpus[d] for d in doc_ids))), k=cfg.train.rerank_topk)
    evaluate.write_trec_run(os.path.join(cfg.train.out_dir, DEV_CANDIDATES), run, tag="subword-bm25")
    return run


def dev_evaluate(um: UniMoER, dev: tuple, cfg: Config) -> dict:
    """Each task by itself, and the two together (nDCG@10 on the dev split):
      emb_*        retrieval over the dev corpus (the embedding path alone);
      fixed_*      reranking of the fixed candidates (dev_candidates) by the reranking path alone, next to
      cand_*       the candidates' own order (cand_recall@k: how often the list holds a relevant document);
      rerank_*     two-stage: the model's own retrieval, its top train.rerank_topk reranked by the model."""
    corpus, queries, qrels = dev
    k = cfg.train.rerank_topk
    first, second = evaluate.two_stage(um, queries, corpus, k_retrieve=max(100, k), k_rerank=k, progress=False)
    emb, rr = evaluate.evaluate_run(qrels, first), evaluate.evaluate_run(qrels, second)
    cands = dev_candidates(um, dev, cfg)
    cand = evaluate.evaluate_run(qrels, cands, k_recall=(k,))
    fixed = evaluate.evaluate_run(qrels, evaluate.rerank(um, queries, corpus, cands, k=k, progress=False))
    return {"emb_ndcg@10": emb["ndcg@10"], "emb_recall@100": emb["recall@100"],
            "fixed_ndcg@10": fixed["ndcg@10"], "cand_ndcg@10": cand["ndcg@10"], f"cand_recall@{k}": cand[f"recall@{k}"],
            "rerank_ndcg@10": rr["ndcg@10"], "rerank_mrr@10": rr["mrr@10"]}


def summary_line(metrics_path: str, out_dir: str, seconds: float) -> str:
    """One line at the end of a run: where it is, and the first and last dev evaluation (nDCG@10)."""
    with open(metrics_path) as f:
        rows = [json.loads(x) for x in f if x.strip()]

    def figures(m: dict) -> str:
        recall = next((f"{k} {v:.3f}" for k, v in m.items() if k.startswith("cand_recall@")), "")
        return (f"retrieval {m['emb_ndcg@10']:.3f}, rerank fixed {m['fixed_ndcg@10']:.3f} (candidates "
                f"{m['cand_ndcg@10']:.3f}, {recall}), two-stage {m['rerank_ndcg@10']:.3f}")

    return (f"done: {out_dir} in {seconds:.0f} s | dev nDCG@10 step {rows[0]['step']}: {figures(rows[0])} | "
            f"step {rows[-1]['step']}: {figures(rows[-1])}")


def has_learned_router(um: UniMoER) -> bool:
    return any(isinstance(h.router, LearnedRouter) for h in _hooks(um))


def _hooks(um: UniMoER) -> list:
    return [m for m in um.base.modules() if isinstance(m, moe_lora.MoEHook)]


@torch.no_grad()
def routing_snapshot(um: UniMoER, queries: Sequence[str], docs: Sequence[str], pairs: Sequence[tuple]) -> dict:
    """Mean routing weight per expert and mean routing entropy, per task and adapted layer, on the given texts.

    embed: over query and document sequences; rerank: over (query, document) pairs. Weights are in the config's
    expert order; an always-on expert shows 1. Entropy H = -sum_i p_i log p_i of the routed experts' weights
    renormalised to sum 1 (nats), per sequence (per token for token-level routing), then averaged.
    -> {"experts": [names], "embed": {"layers", "weights", "entropy"}, "rerank": {...}}
    """
    spec = moe_lora.get_config(um.base)
    routed = [i for i, e in enumerate(spec.experts) if e.name in spec.routed_experts]
    was_training = um.training
    um.eval()
    out = {"experts": [e.name for e in spec.experts]}
    batches = {"embed": [um.tokens_queries(list(queries)), um.tokens_documents(list(docs))],
               "rerank": [um.tokens_pairs([q for q, _ in pairs], [d for _, d in pairs])]}
    try:
        for task, toks in batches.items():
            per_layer = {}
            for b in toks:
                ids, mask = b["input_ids"].to(um._device()), b["attention_mask"].to(um._device())
                task_ids = torch.full((ids.shape[0],), TASKS.index(task), device=ids.device)
                res = um.base(ids, mask, causal=task == "rerank" or not um.cfg.model.bidirectional,
                              task_ids=task_ids, capture_routing=True)
                for layer, w in res.routing:
                    w = w.float()
                    if w.dim() == 3:  # per token: keep real tokens only
                        w = w[mask.to(w.device).bool()]
                    per_layer.setdefault(layer, []).append(w)  # (N, E)
            layers = sorted(per_layer)
            weights, entropy = [], []
            for layer in layers:
                w = torch.cat(per_layer[layer])
                weights.append([round(float(x), 6) for x in w.mean(0)])
                if routed:
                    p = w[:, routed].clamp_min(0)
                    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
                    entropy.append(round(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()), 6))
                else:
                    entropy.append(0.0)
            out[task] = {"layers": layers, "weights": weights, "entropy": entropy}
    finally:
        um.train(was_training)
        moe_lora.clear_routing(um.base)
    return out


def dev_routing_texts(dev: tuple, n: int = 32) -> tuple:
    """A fixed sample for routing_snapshot: the first n dev queries, each with its first judged relevant document."""
    corpus, queries, qrels = dev
    qids = sorted(queries)[:n]
    pairs = [(queries[q], corpus[min(d for d, g in qrels[q].items() if g > 0 and d in corpus)]) for q in qids
             if any(g > 0 and d in corpus for d, g in qrels[q].items())]
    return [q for q, _ in pairs], [d for _, d in pairs], pairs


def train_examples(cfg: Config) -> list:
    """data.train_file (default <data.dir>/train.jsonl): training JSONL, or MS MARCO triples if it ends in .tsv."""
    path = cfg.data.train_file or os.path.join(cfg.data.dir, "train.jsonl")
    return data.read_triples_tsv(path) if path.endswith(".tsv") else data.read_train_jsonl(path)


def batch_inputs(um: UniMoER, texts: dict, tasks: Sequence[str]) -> dict:
    """A sampler batch's texts -> UniMoER.forward's token batches: queries + docs (embed), pairs (rerank).
    Documents are grouped per query, positive first, then its data.n_neg hard negatives; pairs follow them."""
    n_neg = um.cfg.data.n_neg
    docs = [x for i, p in enumerate(texts["pos"]) for x in [p] + texts["neg"][i * n_neg:(i + 1) * n_neg]]
    inputs = {}
    if "embed" in tasks:
        inputs["queries"], inputs["docs"] = um.tokens_queries(texts["query"]), um.tokens_documents(docs)
    if "rerank" in tasks:
        inputs["pairs"] = um.tokens_pairs([q for q in texts["query"] for _ in range(1 + n_neg)], docs)
    return inputs


# ------------------------------------------------------------------------------------------------ the loop
def lr_at(step: int, cfg: Config) -> tuple:
    """-> (lr, stage index) for optimizer step `step` (0-based): per stage, linear warmup then cosine decay."""
    t = cfg.train
    stages = t.stages or [Stage(steps=t.steps)]
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps or i == len(stages) - 1:
            s, n, peak = step - start, st.steps, st.lr if st.lr is not None else t.lr
            if s < t.warmup_steps:
                return peak * (s + 1) / t.warmup_steps, i
            progress = (s - t.warmup_steps) / max(1, n - t.warmup_steps)
            return peak * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))), i
        start += st.steps


def tasks_at(step: int, stage: Stage, cfg: Config) -> list:
    allowed = [x for x in mode_tasks(cfg.train.mode) if stage.tasks in ("both", x)]
    if cfg.train.schedule == "alternate" and len(allowed) > 1:
        return [allowed[step % len(allowed)]]
    return allowed


def frozen_slices(um: UniMoER, names: Sequence[str]) -> list:
    """[(tensor, index)] of the rank slots of the named experts in every MoE linear (rows of A, columns of B)."""
    out = []
    for m in um.base.modules():
        if isinstance(m, moe_lora.MoELoRALinear):
            for n in names:
                if n not in m.expert_names:
                    raise ConfigError(f"freeze_experts: no expert {n!r} (experts: {m.expert_names})")
                sl = m.expert_slice(n)
                out += [(m.lora_A, (sl, slice(None))), (m.lora_B, (slice(None), sl))]
    return out


def setup_distributed(cfg: Config) -> tuple:
    """DDP from torchrun's environment variables -> (rank, world_size, device)."""
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        return rank, world, torch.device(f"cuda:{local}" if want_cuda else "cpu")
    return 0, 1, torch.device("cuda" if want_cuda else "cpu")


def prepare(cfg: Config, rank: int) -> Config:
    """Rank 0 writes what the run needs before building (synthetic data, the tiny base); returns the resolved
    config (model.path filled in)."""
    d, out = cfg.data, cfg.train.out_dir
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if d.synthetic and not os.path.isdir(d.dir):
            try:
                data.make_synthetic(d.dir, seed=d.synthetic_seed, **d.synthetic_args)
            except TypeError as e:
                raise ConfigError(f"data.synthetic_args: {e}") from None
        if cfg.model.path is None and not os.path.isdir(os.path.join(out, "base")):
            if cfg.model.tiny.pretrain_steps > 0:  # pretrained once per (data, tiny config), then copied
                cache = tiny_base_cache_dir(cfg)
                if not os.path.isdir(cache):
                    write_tiny_base(cfg, cache)
                copy_dir_atomically(cache, os.path.join(out, "base"))
            else:
                write_tiny_base(cfg, os.path.join(out, "base"))
    if dist.is_initialized():
        dist.barrier()
    if cfg.model.path is None:
        cfg.model.path = os.path.join(out, "base")
        cfg.model.tokenizer = None
    return cfg


def main(argv: Sequence[str]) -> None:
    args = [a for a in argv if a != "--resume"]
    if not args or args[0].startswith("--"):
        sys.exit("usage: python train.py CONFIG.yaml [--section.key=value ...] [--resume]")
    t_start = time.time()
    cfg = load_config(args[0], args[1:])
    resume = "--resume" in argv
    t = cfg.train
    rank, world, device = setup_distributed(cfg)
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} must divide by world_size * grad_accum = "
                          f"{world} * {t.grad_accum}")
    if resume and not os.path.isfile(os.path.join(t.out_dir, "latest")):
        raise FileNotFoundError(f"--resume: {t.out_dir} has no checkpoint ('latest' file)")
    if not resume and os.path.isfile(os.path.join(t.out_dir, "latest")):
        raise FileExistsError(f"{t.out_dir} already holds a run; pass --resume to continue it or choose another "
                              "train.out_dir (nothing was overwritten)")
    cfg = prepare(cfg, rank)
    random.seed(t.seed)
    np.random.seed(t.seed)
    um = build_model(cfg, device)
    model = nn.parallel.DistributedDataParallel(um, find_unused_parameters=True) if world > 1 else um
    params = trainable_parameters(um)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    examples = train_examples(cfg)
    per_micro = t.batch_size // t.grad_accum  # the sampler's global batch is one micro-step over all ranks
    sampler = data.TrainSampler(examples, per_micro, cfg.data.n_neg, t.seed, rank, world)
    group = 1 + cfg.data.n_neg
    total_steps = sum(st.steps for st in t.stages) if t.stages else t.steps
    dev = load_dev(cfg) if rank == 0 else None
    metrics_path, log_path = os.path.join(t.out_dir, "metrics.jsonl"), os.path.join(t.out_dir, "train_log.jsonl")
    routing_path = os.path.join(t.out_dir, "routing.jsonl")  # written only when a learned router exists
    routing_texts = dev_routing_texts(dev) if rank == 0 and has_learned_router(um) else None

    step, bad_steps = 0, 0
    if resume:
        step, bad_steps = load_trainer_state(checkpoint_dir(t.out_dir), um, opt)
        if rank == 0:
            for p in (metrics_path, log_path, routing_path):
                _truncate_jsonl(p, step)
    elif rank == 0:
        save_config(cfg, os.path.join(t.out_dir, "config.yaml"))
        for p in (metrics_path, log_path, routing_path):
            if os.path.exists(p):
                os.remove(p)
        _append_jsonl(metrics_path, {"step": 0, **dev_evaluate(um, dev, cfg)})
        if routing_texts:
            _append_jsonl(routing_path, {"step": 0, **routing_snapshot(um, *routing_texts)})
        print(f"step 0 dev: {json.dumps(json.loads(open(metrics_path).readlines()[-1]))}", flush=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and t.bf16_autocast \
        else contextlib.nullcontext()
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    while step < total_steps:
        t0 = time.time()
        lr, si = lr_at(step, cfg)
        stage = (t.stages or [Stage(steps=t.steps)])[si]
        for gr in opt.param_groups:
            gr["lr"] = lr
        tasks = tasks_at(step, stage, cfg)
        frozen = frozen_slices(um, list(t.freeze_experts) + list(stage.freeze_experts))
        um.train()
        logs, finite = {}, True
        for micro in range(t.grad_accum):
            inputs = batch_inputs(um, data.gather_texts(examples, sampler.batch(step * t.grad_accum + micro)), tasks)
            sync = contextlib.nullcontext() if world == 1 or micro == t.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast:
                    out = model(**inputs)
                loss, parts = total_loss(out, cfg, group)
                finite &= bool(torch.isfinite(loss))
                (loss / t.grad_accum).backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / t.grad_accum
        for tensor, idx in frozen:
            if tensor.grad is not None:
                tensor.grad[idx] = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip)
        ok = torch.tensor(float(finite and bool(torch.isfinite(grad_norm))), device=device)
        if world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() > 0:
            saved = [(tensor, idx, tensor.detach()[idx].clone()) for tensor, idx in frozen]
            opt.step()
            with torch.no_grad():
                for tensor, idx, value in saved:  # AdamW's momentum and decay must not move frozen experts
                    tensor[idx] = value
            bad_steps = 0
        else:
            bad_steps += 1
            if bad_steps >= t.max_bad_steps:
                raise RuntimeError(f"non-finite loss or gradient in {bad_steps} consecutive steps (last: step "
                                   f"{step + 1}); stopping. The last good checkpoint is in {t.out_dir}")
        opt.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            record = {"step": step, "lr": lr, "tasks": tasks, "skipped": ok.item() == 0, **logs}
            _append_jsonl(log_path, record)
            bar.update(1)
            bar.write(f"step {step}/{total_steps} | loss " + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                      + f" | lr {lr:.2e} | {time.time() - t0:.2f}s" + (" | SKIPPED (non-finite)" if not ok.item() else ""))
            if step % t.eval_every == 0 or step == total_steps:
                m = {"step": step, **dev_evaluate(um, dev, cfg)}
                _append_jsonl(metrics_path, m)
                if routing_texts:
                    _append_jsonl(routing_path, {"step": step, **routing_snapshot(um, *routing_texts)})
                bar.write(f"step {step} dev: {json.dumps(m)}")
        if step % t.save_every == 0 or step == total_steps:
            if rank == 0:
                save_checkpoint(um, opt, cfg, step, bad_steps)
            if world > 1:
                dist.barrier()
    bar.close()
    if rank == 0:
        print(summary_line(metrics_path, t.out_dir, time.time() - t_start), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
