"""Train UniMoER: one frozen decoder + LoRA experts for dense retrieval (embedding) and reranking.

    python train.py configs/tiny.yaml                                   # CPU, built-in synthetic task, minutes
    python train.py configs/tiny.yaml --train.lr=5e-4 --train.steps=50  # overrides: --section.key=value (YAML)
    python train.py configs/tiny.yaml --resume                          # continue from <out_dir>'s latest checkpoint
    python train.py configs/tiny.yaml --overwrite                       # delete the run in <out_dir>, start afresh
    python train.py configs/tiny.yaml --debug                           # a bad input's traceback (else: one line)
    torchrun --nproc_per_node=8 train.py configs/joint_moe.yaml         # DDP (nccl on GPU, gloo on CPU)

Reading order: config dataclasses -> UniMoER (base + experts + the two task heads, and the encoder interface
evaluate.py uses) -> losses (each one visible function) -> checkpoints -> the training loop: one step
(forward_backward, GradCache for grad_accum > 1; optimizer_step, holding untrained experts) and main.

A checkpoint directory <out_dir> holds config.yaml (the resolved config), metrics.jsonl (one line per dev
evaluation), train_log.jsonl (one line per step), base/ (only for the built-in tiny random base) and
checkpoint-NNNNNN/ directories (adapters.safetensors: experts and routers; head.safetensors: the optional
linear reranking head; trainer_state.pt: optimizer, RNG and step; config.yaml) named by the text file `latest`.
Each checkpoint is written to a temporary directory and renamed, so a kill at any moment leaves the previous
one whole. Also: run.lock (flock'ed by the running process), last_good (the newest good checkpoint, never pruned)
and resumes.jsonl (what each --resume changed; see open_run_dir and RESUMABLE_KEYS).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import fnmatch
import json
import math
import os
import random
import re
import shutil
import socket
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
from model import UsageError, run_cli
from router import AUX_LOSSES, LearnedRouter, RetrieverRouter, RouterConfig, finalize_over_layers

TASKS = ["embed", "rerank"]  # task ids index this list (router.tasks must equal it)
MODES = ("emb_only", "rank_only", "joint_single", "joint_moe", "hard_switch", "hard_switch_shared", "no_shared")


# ------------------------------------------------------------------------------------------------ config
# Each section checks its own values (validate(where), `where` = the config file), Config.validate the rules
# across sections; load_config runs them all before anything is built or written.
def _check(where: str, key: str, value, ok: bool, expected: str) -> None:
    """One config rule: unless ok, raise ConfigError '<where>: <key> must be <expected> (got <value>)'."""
    if not ok:
        raise ConfigError(f"{where}: {key} must be {expected} (got {value!r})")


def _check_min(where: str, section, key: str, names: Sequence[str], lo: int) -> None:
    """Each named integer field of the section object is >= lo."""
    for name in names:
        v = getattr(section, name)
        _check(where, f"{key}.{name}", v, v >= lo, f">= {lo}")


def _check_text(where: str, key: str, value: Optional[str], optional: bool = False) -> None:
    """A path or name: a non-empty string (None where the field is optional)."""
    _check(where, key, value, (optional and value is None) or (isinstance(value, str) and bool(value.strip())),
           "a non-empty string" + (" or null" if optional else ""))


SEED_MAX = 2**32 - 1  # numpy's seeds (np.random.seed, default_rng([seed, ...])) are in [0, 2**32)


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

    def validate(self, where: str, key: str = "model.tiny") -> None:
        _check_min(where, self, key, ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                      "intermediate_size"), 1)
        _check(where, f"{key}.seed", self.seed, 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}]")
        _check(where, f"{key}.head_dim", self.head_dim, self.head_dim >= 2 and self.head_dim % 2 == 0,
               "even and >= 2 (rotary embedding pairs)")
        _check(where, f"{key}.num_key_value_heads", self.num_key_value_heads,
               self.num_attention_heads % self.num_key_value_heads == 0,
               f"a divisor of num_attention_heads {self.num_attention_heads} (grouped-query attention)")
        _check(where, f"{key}.init_std", self.init_std, self.init_std > 0, "> 0")


@dataclass
class ModelSection:
    path: Optional[str] = None  # HF checkpoint directory; null = the tiny random base (written to <out_dir>/base)
    tokenizer: Optional[str] = None  # directory or tokenizer.json; default model.path, or data.dir for the tiny base
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the frozen base; adapters are always fp32
    tiny: TinyBase = field(default_factory=TinyBase)
    bidirectional: bool = False  # non-causal attention (GritLM-style ablation)
    grad_checkpointing: bool = False

    def validate(self, where: str, key: str = "model") -> None:
        _check_text(where, f"{key}.path", self.path, optional=True)
        _check_text(where, f"{key}.tokenizer", self.tokenizer, optional=True)
        self.tiny.validate(where, f"{key}.tiny")


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

    def validate(self, where: str, key: str = "data") -> None:
        """Ranges here; max_pair_len and max_query_len against the templates need the tokenizer (check_lengths)."""
        _check_text(where, f"{key}.dir", self.dir)
        _check_text(where, f"{key}.train_file", self.train_file, optional=True)
        _check_text(where, f"{key}.dev_split", self.dev_split)
        _check_min(where, self, key, ("synthetic_seed", "dev_queries", "dev_corpus", "n_neg"), 0)
        least = 2 if self.append_eos else 1  # with append_eos the EOS takes the last of the max_*_len tokens
        for name in ("max_query_len", "max_doc_len", "max_pair_len"):
            v = getattr(self, name)
            _check(where, f"{key}.{name}", v, v >= least, f">= {least}" + (" (one text token + EOS with "
                                                                             "data.append_eos)" if least == 2 else ""))


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

    def validate(self, where: str, key: str = "adapters") -> None:
        _check_min(where, self, key, ("r", "shared_r"), 1)
        for name in ("alpha", "shared_alpha"):
            _check(where, f"{key}.{name}", getattr(self, name), getattr(self, name) > 0, "> 0")
        short = [t[:-len("_proj")] for t in moe_lora.TARGETS]
        ok = bool(self.targets) and len(set(self.targets)) == len(self.targets) and \
            all(t in short or t in moe_lora.TARGETS for t in self.targets)
        _check(where, f"{key}.targets", self.targets, ok, f"a non-empty list of distinct names among "
               f"{', '.join(short)} (or {', '.join(moe_lora.TARGETS)})")
        if self.layers is not None:
            ok = bool(self.layers) and len(set(self.layers)) == len(self.layers) and min(self.layers) >= 0
            _check(where, f"{key}.layers", self.layers, ok, "null (every layer) or a non-empty list of distinct "
                   "layer indices >= 0")
        _check(where, f"{key}.dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")


@dataclass
class Stage:
    steps: int
    lr: Optional[float] = None  # default train.lr
    tasks: Literal["both", "embed", "rerank"] = "both"
    freeze_experts: list[str] = field(default_factory=list)

    def validate(self, where: str, key: str) -> None:
        _check(where, f"{key}.steps", self.steps, self.steps >= 1, ">= 1")
        _check(where, f"{key}.lr", self.lr, self.lr is None or self.lr > 0, "> 0 or null (train.lr)")


@dataclass
class TrainSection:
    mode: Literal[MODES] = "joint_moe"
    out_dir: str = "ckpt/run"
    seed: int = 0
    steps: int = 1000  # ignored when stages are given (their steps add up)
    stages: list[Stage] = field(default_factory=list)
    batch_size: int = 32  # global: queries per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1  # > 1: the step's batch in this many chunks, losses and gradients by GradCache (exact)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    clip: float = 1.0
    schedule: Literal["mixed", "alternate"] = "mixed"  # both losses every step, or one task per step in turn
    emb_weight: float = 1.0  # alpha
    rank_weight: float = 1.0  # beta
    aux_weights: dict[str, float] = field(default_factory=lambda: {"load_balance": 0.01})  # lambda per aux loss
    # Units each router aux loss is taken over (aux_losses): "global" all the optimizer step's sequences/tokens,
    # both tasks, all ranks (= "step" on one process) | "step" this rank's | "call" each single-task call alone
    aux_scope: Literal["global", "step", "call"] = "global"
    temperature: float = 0.05  # InfoNCE
    cross_device_negatives: bool = True
    rerank_loss: Literal["bce", "group"] = "bce"  # pointwise BCE, or group-wise softmax CE (localized contrastive)
    rerank_head: Literal["yesno", "linear"] = "yesno"  # logit("yes") - logit("no"), or a linear head (ablation)
    pooling: Literal["last", "first"] = "last"  # first-token pooling needs model.bidirectional
    freeze_experts: list[str] = field(default_factory=list)  # experts kept at their current values
    eval_every: int = 100
    save_every: int = 100
    rerank_topk: int = 100  # dev reranking depth
    max_bad_steps: int = 5  # this many bad steps in a row (non-finite, or an update above max_update_rms) stop the run
    # An update whose RMS over all trainable elements, sqrt(sum (p' - p)^2 / N), exceeds this is undone and counts as
    # a bad step (Adam moves each element by about lr, so RMS ~ lr; 1.0 in one step is an explosion). null: off
    max_update_rms: Optional[float] = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16_autocast: bool = True  # on CUDA only

    def validate(self, where: str, key: str = "train") -> None:
        _check_text(where, f"{key}.out_dir", self.out_dir)
        _check(where, f"{key}.seed", self.seed, 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}]")
        _check_min(where, self, key, ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "rerank_topk",
                                      "max_bad_steps"), 1)
        _check_min(where, self, key, ("warmup_steps",), 0)
        _check(where, f"{key}.batch_size", self.batch_size, self.batch_size % self.grad_accum == 0,
               f"a multiple of train.grad_accum {self.grad_accum}")
        for name in ("lr", "temperature", "clip"):
            _check(where, f"{key}.{name}", getattr(self, name), getattr(self, name) > 0, "> 0")
        for name in ("weight_decay", "emb_weight", "rank_weight"):
            _check(where, f"{key}.{name}", getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _check(where, f"{key}.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        for name, w in self.aux_weights.items():
            _check(where, f"{key}.aux_weights.{name}", name, name in AUX_LOSSES,
                   f"an aux loss among {', '.join(AUX_LOSSES)}")
            _check(where, f"{key}.aux_weights.{name}", w, w >= 0, ">= 0")
        if self.max_update_rms is not None:
            _check(where, f"{key}.max_update_rms", self.max_update_rms, self.max_update_rms > 0, "> 0 or null")
        for i, st in enumerate(self.stages):
            st.validate(where, f"{key}.stages[{i}]")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapters: AdapterSection = field(default_factory=AdapterSection)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self, where: str) -> None:
        """Every section's own ranges, then the rules across sections (experts of the mode, layers, tasks)."""
        for section in (self.model, self.data, self.adapters, self.train):
            section.validate(where)
        t = self.train
        if t.pooling == "first" and not self.model.bidirectional:
            raise ConfigError(f"{where}: train.pooling 'first' sees only the first token under causal attention; "
                              "set model.bidirectional: true or use 'last'")
        if self.router.tasks != TASKS:
            raise ConfigError(f"{where}: router.tasks must be {TASKS} (got {self.router.tasks})")
        try:
            experts = [e.name for e in adapter_config(self).experts]
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        tasks = mode_tasks(t.mode)
        for key, names in [("train.freeze_experts", t.freeze_experts)] + \
                [(f"train.stages[{i}].freeze_experts", st.freeze_experts) for i, st in enumerate(t.stages)]:
            for name in names:
                _check(where, key, name, name in experts, f"an expert of mode {t.mode} ({', '.join(experts)})")
        for i, st in enumerate(t.stages):
            _check(where, f"train.stages[{i}].tasks", st.tasks, st.tasks in ["both"] + tasks,
                   f"'both' or a task mode {t.mode} trains ({', '.join(tasks)})")
        weights = [getattr(t, {"embed": "emb_weight", "rerank": "rank_weight"}[x]) for x in tasks]
        _check(where, "train.emb_weight/rank_weight", weights, any(w > 0 for w in weights),
               f"> 0 for at least one task mode {t.mode} trains")
        layers = self.adapters.layers
        if layers is not None and self.model.path is None:  # the tiny base's depth is known now; a model
            n = self.model.tiny.num_hidden_layers            # directory's is checked by check_inputs
            _check(where, "adapters.layers", layers, max(layers) < n, f"layer indices < model.tiny.num_hidden_layers "
                   f"{n}")


class ConfigError(ValueError):
    """A config file or override that does not map onto the dataclasses above, or a value out of its range."""


def _check_value(value, hint, where: str, key: str):
    """Check one YAML value (at `key` of the config file `where`) against its field type and return it (an int is
    accepted for a float; a float must be finite)."""
    at = f"{where}: {key}"
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        return _check_value(value, next(a for a in args if a is not type(None)), where, key)
    if origin is Literal:
        allowed = args[0] if len(args) == 1 and isinstance(args[0], tuple) else args
        if value not in allowed:
            raise ConfigError(f"{at}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{at}: expected a list, got {value!r}")
        return [_check_value(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {value!r}")
        return {k: _check_value(v, args[1], where, f"{key}.{k}") for k, v in value.items()} if args else value
    if is_dataclass(hint):
        return from_dict(hint, value, where, key)
    if hint is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{at}: expected a finite number, got {value!r}")
        return float(value)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        raise ConfigError(f"{at}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, d, where: str, key: str = ""):
    """Build dataclass `cls` (at `key` of the config file `where`) from a mapping, 1:1: an unknown key, a missing
    required key or a value of the wrong type is a ConfigError naming the file and the key."""
    at = f"{where}: {key}" if key else where
    if not isinstance(d, dict):
        raise ConfigError(f"{at}: expected a mapping, got {d!r}")
    hints, known = get_type_hints(cls), [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ConfigError(f"{at}: unknown key {unknown[0]!r} (known keys: {', '.join(known)})")
    values = {k: _check_value(v, hints[k], where, f"{key}.{k}" if key else k) for k, v in d.items()}
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{at}: {e}") from None
    except ValueError as e:  # a dataclass that validates itself (RouterConfig: "router.fn: must be one of ...")
        raise ConfigError(f"{where}: {e}") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    """A YAML parse error (syntax, or a tag safe_load refuses such as !!python/object) as one line with its place."""
    mark = getattr(e, "problem_mark", None)
    place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = getattr(e, "problem", None) or str(e)
    return ConfigError(f"{place}: not valid YAML ({' '.join(str(problem).split())})")


def read_yaml(path: str, _chain: tuple = ()) -> dict:
    """Read a YAML config; a top-level `base: other.yaml` (relative to this file) is read first, then overridden.
    An empty file, a top level that is not a mapping and a `base:` cycle are ConfigErrors."""
    chain = _chain + (path,)
    if os.path.realpath(path) in [os.path.realpath(p) for p in _chain]:
        raise ConfigError(f"{_chain[-1]}: base: {path} closes a cycle {' -> '.join(chain)}")
    if not os.path.isfile(path):
        via = f" (base: of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"{path}: config file not found{via}")
    with open(path, "rb") as f:  # bytes: yaml reports an undecodable file as a YAMLError with its position
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise _yaml_error(path, e) from None
    if d is None:
        raise ConfigError(f"{path}: the config file is empty (expected a mapping of sections: "
                          f"{', '.join(f.name for f in fields(Config))})")
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(d).__name__}")
    base = d.pop("base", None)
    if base is not None:
        _check_text(path, "base", base)
        d = _merge(read_yaml(os.path.join(os.path.dirname(path), base), chain), d)
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
        if not all(parents + [last]):
            raise ConfigError(f"override {o!r}: empty key in {keys!r} (expected --section.key=value)")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {o!r}: {p!r} is not a section")
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise _yaml_error(f"override {o!r}", e) from None
    return d


def config_from_dict(d: dict, where: str) -> Config:
    cfg = from_dict(Config, d, where)
    cfg.validate(where)
    return cfg


def check_lengths(cfg: Config, tok, where: str) -> None:
    """The length limits against the templates, with the tokenizer that will read them: data.max_query_len must
    hold the query instruction frame `Instruct: ...\\nQuery:` (+ EOS) and at least one query token; data.max_pair_len
    the reranker's prefix, suffix and `<Instruct>: ...\\n<Query>: \\n<Document>: ` and at least one text token."""
    d = cfg.data
    frame = len(tok.encode_ids([data.format_query("", d.embed_instruction)], 10**9, add_eos=d.append_eos)[0])
    _check(where, "data.max_query_len", d.max_query_len, d.max_query_len > frame,
           f"> {frame}, the tokens of the query template with data.embed_instruction"
           + (" and the EOS" if d.append_eos else ""))
    ids = lambda text: tok.encode_ids([text], 10**9, add_special_tokens=False)[0]  # noqa: E731
    frame = len(ids(data.RERANK_PREFIX)) + len(ids(data.RERANK_SUFFIX)) + \
        len(ids(data.format_rerank_pair("", "", d.rerank_instruction)))
    _check(where, "data.max_pair_len", d.max_pair_len, d.max_pair_len > frame,
           f"> {frame}, the tokens of the reranker template with data.rerank_instruction")


def check_inputs(cfg: Config, where: str) -> None:
    """What the run reads, checked before anything is written: the model and tokenizer directories, the data
    files (unless data.synthetic will write them), adapters.layers against the model's depth, and the lengths
    against the templates (check_lengths) when the tokenizer is already there."""
    m, d = cfg.model, cfg.data
    if m.path is not None:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"{where}: model.path {m.path!r}: not a model directory (no config.json)")
        if cfg.adapters.layers is not None:
            try:
                with open(os.path.join(m.path, "config.json")) as f:
                    n = json.load(f).get("num_hidden_layers")
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{where}: model.path {m.path!r}: config.json is not a JSON object") from None
            _check(where, "adapters.layers", cfg.adapters.layers, n is None or max(cfg.adapters.layers) < n,
                   f"layer indices < {n}, the depth of {m.path}")
    if m.tokenizer is not None and not os.path.exists(m.tokenizer):
        raise ConfigError(f"{where}: model.tokenizer {m.tokenizer!r}: not found")
    if not (d.synthetic and not os.path.isdir(d.dir)):
        if not os.path.isdir(d.dir):
            raise ConfigError(f"{where}: data.dir {d.dir!r}: directory not found (data.synthetic: true writes the "
                              "built-in task there)")
        train_file = d.train_file or os.path.join(d.dir, "train.jsonl")
        for key, path in (("data.dir", os.path.join(d.dir, "corpus.jsonl")),
                          ("data.dir", os.path.join(d.dir, "queries.jsonl")),
                          ("data.dev_split", os.path.join(d.dir, "qrels", f"{d.dev_split}.tsv")),
                          ("data.train_file", train_file)):
            if not os.path.isfile(path):
                raise ConfigError(f"{where}: {key}: {path} not found")
    tok_source = m.tokenizer or m.path or d.dir
    if os.path.isfile(tok_source) or os.path.isfile(os.path.join(tok_source, "tokenizer.json")):
        check_lengths(cfg, load_tokenizer(tok_source), where)


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
    else:  # joint_moe, no_shared: a learned router, or RouterRetriever's untrained one (router.kind "retriever")
        experts = [task("embed"), task("rerank")] + ([shared] if mode == "joint_moe" else [])
        shared_mode = a.shared if mode == "joint_moe" else None
        router.kind = "retriever" if cfg.router.kind == "retriever" else "learned"
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
        check_lengths(cfg, tok, f"tokenizer {tok.source}")

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
        """One call per step (or GradCache chunk), so DDP sees one forward per backward. Each argument is a token
        batch or None. -> "q" (b, H), "d" (b * g, H) (embedding), "scores" (b * g,) (reranking), and "aux_calls":
        the routers' aux statistics [{name: [router.AuxStat per layer]}] of each base call (queries, documents,
        pairs), which aux_losses finalises over the units train.aux_scope names."""
        out, calls = {}, []
        if queries is not None:
            out["q"], a = self.embed(queries)
            calls.append(a)
            out["d"], a = self.embed(docs)
            calls.append(a)
        if pairs is not None:
            out["scores"], a = self.rerank_scores(pairs)
            calls.append(a)
        out["aux_calls"] = calls
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


def aux_losses(calls: Sequence[dict], scope: str) -> dict:
    """The routers' aux losses of one optimizer step from their statistics -> {name: scalar}, each the mean over
    the adapted layers of the loss over `scope`'s units (sequences, or non-pad tokens for token routing).

    calls: [{name: [router.AuxStat per layer]}] of every base call of the step on this rank (queries, documents
    and pairs of every GradCache chunk; UniMoER.forward's "aux_calls"). Load balance is N * sum_i f_i P_i with
    f_i (Switch: dispatch fraction, no grad; DynMoLE: mean routed weight, with grad; LD-MoLE: share of all expert
    activations) and P_i (mean router probability) over the units (Switch, Fedus et al. 2022, eq. 4-6); z_loss and
    entropy are means over the units. DynMoLE's load balance is one loss over layers x units, not a mean over layers
    (router.finalize_over_layers).
      "call":   each call on its own units, then the mean over calls. Every call holds one task, so load balance
                then asks for balance within each task (the per-forward variant, kept for the ablation).
      "step":   the union of all the step's calls on this rank, both tasks together (Switch's batch). Under DDP
                each rank's own loss, averaged by DDP (per-device balancing).
      "global": "step" with the statistics summed over DDP ranks (global-batch balancing, Qiu et al. 2025,
                arXiv 2501.11873): the loss of the whole global batch, as one process on the concatenated batch
                computes it. Like info_nce_loss, the value is multiplied by loss_world(True) and carries gradient
                through this rank's units only, so DDP's gradient average is the global loss's gradient
                (tests/test_ddp.py). Equal to "step" on one process.
    """
    names = sorted({k for c in calls for k in c})  # a fixed order: a set's follows PYTHONHASHSEED (per process)
    per_call = {k: [c[k] for c in calls if k in c] for k in names}  # name -> [[AuxStat per layer] per call]
    if scope == "call":
        return {k: torch.stack([finalize_over_layers(layers) for layers in v]).mean() for k, v in per_call.items()}
    union = {k: [sum(layer[1:], layer[0]) for layer in zip(*v)] for k, v in per_call.items()}  # per layer
    world = loss_world(scope == "global")
    if world > 1:
        summed = iter(_sum_over_ranks([st for k in names for st in union[k]]))
        union = {k: [next(summed) for _ in union[k]] for k in names}
    return {k: finalize_over_layers(v) * world for k, v in union.items()}


def _sum_over_ranks(stats: list) -> list:
    """router.AuxStats summed over the DDP ranks in one all_reduce. Counts carry no gradient; a total's (and a
    dispatch sum's, which carries gradient for DynMoLE's f) value becomes the global sum with gradient through this
    rank's own tensor only (the others are constants, as in _gather_keep_local)."""
    parts = [[st.total.detach().reshape(-1), st.count.reshape(1).to(st.total.dtype)]
             + ([st.dispatch.detach().reshape(-1).to(st.total.dtype)] if st.dispatch is not None else [])
             for st in stats]
    flat = torch.cat([x for p in parts for x in p])
    dist.all_reduce(flat)
    out, i = [], 0
    for st in stats:
        n = st.total.numel()
        total = flat[i:i + n].view_as(st.total) + (st.total - st.total.detach())  # value: global; grad: local
        count, i = flat[i + n], i + n + 1
        dispatch = None
        if st.dispatch is not None:
            dispatch = flat[i:i + n].view_as(st.dispatch) + (st.dispatch - st.dispatch.detach())
            i += n
        out.append(dataclasses.replace(st, total=total, count=count, dispatch=dispatch))
    return out


def total_loss(out: dict, cfg: Config, group: int) -> tuple:
    """alpha * L_emb + beta * L_rank + sum_n lambda_n * L_aux_n -> (loss, {name: value} for the log).

    out: "q"/"d" (embedding), "scores" (reranking), "aux" {name: loss} (aux_losses), each over the whole step."""
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
    for name in out["aux"]:
        logged[name] /= loss_world(t.aux_scope == "global")  # likewise
    return loss, logged


# ------------------------------------------------------------------------------------------------ building
def write_tiny_base(cfg: Config, out: str) -> None:
    """Write the built-in tiny base as an HF directory `out` (config.json, model.safetensors, tokenizer files):
    random weights N(0, init_std^2) from tiny.seed, then, if tiny.pretrain_steps > 0, pretrain_tiny_base on the
    documents of <data.dir>/corpus.jsonl (the only data file read). Written atomically (data.build_dir_atomically):
    an existing `out` is kept, a killed write leaves only a temporary, never read."""
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
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
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        src_dir = tok_src if os.path.isdir(tok_src) else os.path.dirname(tok_src)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy(os.path.join(src_dir, name), os.path.join(tmp, name))

    data.build_dir_atomically(out, write)


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
    """Copy directory src to dst so that dst is whole or absent (data.build_dir_atomically)."""
    data.build_dir_atomically(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


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
    """Write <out_dir>/checkpoint-<step> atomically (temporary directory, then rename), then point `latest` at it.

    A good checkpoint (checkpoint_is_good) is also named by `last_good`. Pruning keeps the `keep` newest and the
    one `last_good` names. A failed write (disk full, read-only) removes its temporary directory and raises one
    RunDirError naming it; the previous checkpoint is untouched.
    """
    from safetensors.torch import save_file

    out = cfg.train.out_dir
    name = f"checkpoint-{step:06d}"
    tmp = None
    try:
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
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = os.path.join(out, "latest")
        prev = open(prev).read().strip() if os.path.isfile(prev) else "none"
        raise RunDirError(f"{tmp or out}: writing {name} failed ({e}); the previous checkpoint ({prev}) is "
                          "intact") from e
    final = os.path.join(out, name)
    if os.path.isdir(final):  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    evaluate.write_text_atomic(os.path.join(out, "latest"), name + "\n")
    if checkpoint_is_good(um, out, step, bad_steps):
        evaluate.write_text_atomic(os.path.join(out, "last_good"), name + "\n")
    protected = {name, _read_name(os.path.join(out, "last_good"))}
    old = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        if d not in protected:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def checkpoint_is_good(um: UniMoER, out_dir: str, step: int, bad_steps: int) -> bool:
    """Good = saved outside a bad-step streak, every trainable tensor finite, and, if the dev set was evaluated at
    this step (metrics.jsonl's last line), every metric finite."""
    if bad_steps or not all(bool(torch.isfinite(p).all()) for p in trainable_parameters(um)):
        return False
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
        last = json.loads(lines[-1]) if lines else {}
        if last.get("step") == step and not all(math.isfinite(v) for v in last.values() if isinstance(v, float)):
            return False
    return True


def _read_name(path: str) -> Optional[str]:
    """The checkpoint name a pointer file (`latest`, `last_good`) holds, or None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def last_good_checkpoint(out_dir: str) -> str:
    """The path of the newest good checkpoint (named by `last_good`), for messages."""
    name = _read_name(os.path.join(out_dir, "last_good"))
    return os.path.join(out_dir, name) if name else f"none (no good checkpoint was saved in {out_dir})"


def check_adapters_match(cfg: Config, adapters_path: str, config_path: str) -> None:
    """The expert spec stored in an adapter file must be the one cfg builds (experts and ranks, targets, layers,
    routing = train.mode); a mismatch is one ValueError naming each differing field."""
    from safetensors import safe_open

    if not os.path.isfile(adapters_path):
        raise FileNotFoundError(f"{adapters_path}: adapter file not found")
    with safe_open(adapters_path, framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get(moe_lora.METADATA_KEY)
    if meta is None:
        raise ValueError(f"{adapters_path}: not a MoE-LoRA adapter file (no {moe_lora.METADATA_KEY!r} metadata)")
    try:
        stored = moe_lora.MoELoRAConfig.from_dict(json.loads(meta)).to_dict()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{adapters_path}: invalid MoE-LoRA spec in metadata: {e}") from None
    want = adapter_config(cfg).to_dict()
    show = lambda k, v: (", ".join(f"{e['name']} r={e['r']}" for e in v) if k == "experts"  # noqa: E731
                         else json.dumps(v, sort_keys=True))
    diffs = [f"{k}: {show(k, stored.get(k))} in the file, {show(k, want.get(k))} in the config"
             for k in want if stored.get(k) != want.get(k)]
    if diffs:
        raise ValueError(f"{adapters_path}: the adapters do not match {config_path} (train.mode "
                         f"{cfg.train.mode!r}): " + "; ".join(diffs))


def load_trainer_state(ckpt: str, um: UniMoER, opt) -> tuple:
    """Restore adapters, head, optimizer and RNG from a checkpoint directory -> (step, bad_steps)."""
    from safetensors.torch import load_file

    check_adapters_match(um.cfg, os.path.join(ckpt, "adapters.safetensors"), "the resumed config")
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
    check_adapters_match(cfg, os.path.join(ckpt, "adapters.safetensors"), cfg_path)
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
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # name the file (a full disk's write error carries no path)
        raise OSError(e.errno, e.strerror, path) from None


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
      rerank_*     two-stage: the model's own retrieval, its top train.rerank_topk reranked by the model.
    Self-hits are dropped as evaluate.py's default --drop-self auto decides (evaluate.resolve_drop_self)."""
    corpus, queries, qrels = dev
    k = cfg.train.rerank_topk
    first, second = evaluate.two_stage(um, queries, corpus, k_retrieve=max(100, k), k_rerank=k, progress=False,
                                       drop_self=evaluate.resolve_drop_self("auto", queries, corpus))
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
    """A router whose weights depend on the input (learned, or RouterRetriever's): worth a routing snapshot."""
    return any(isinstance(h.router, (LearnedRouter, RetrieverRouter)) for h in _hooks(um))


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


def pilot_inputs(um: UniMoER, examples: Sequence[dict]) -> dict:
    """RouterRetriever's data per routed expert -> {expert: [(input_ids, attention_mask, causal)]}, for
    moe_lora.set_pilot_embeddings. From the first router.pilot_examples training examples: the embed task's inputs
    are the formatted queries and their positive documents, the rerank task's the reranker pairs (query, positive)
    and (query, first negative; the positive again when there is none), 2 inputs per example either way. An expert
    gets the inputs of every task whose router.task_experts lists it (a routed shared expert: both tasks, i.e. its
    pilot is the centroid of all inputs)."""
    rc, spec = um.cfg.router, moe_lora.get_config(um.base)
    ex = list(examples[:rc.pilot_examples])
    q, pos = [e["query"] for e in ex], [e["pos"][0] for e in ex]
    other = [e["neg"][0] if e["neg"] else e["pos"][0] for e in ex]
    dev = um._device()
    as_input = lambda b, causal: (b["input_ids"].to(dev), b["attention_mask"].to(dev), causal)  # noqa: E731
    emb_causal = not um.cfg.model.bidirectional
    task_inputs = {"embed": [as_input(um.tokens_queries(q), emb_causal),
                             as_input(um.tokens_documents(pos), emb_causal)],
                   "rerank": [as_input(um.tokens_pairs(q + q, pos + other), True)]}
    out = {}
    for task, names in rc.task_experts.items():
        for name in names:
            if name in spec.routed_experts and task in task_inputs:
                out.setdefault(name, []).extend(task_inputs[task])
    return out  # every routed expert is listed by some task (MoELoRAConfig.validate)


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


# ------------------------------------------------------------------------------------------------ the run directory
LOCK_FILE = "run.lock"  # flock'ed by the run's rank 0 for its whole life; holds {"pid", "host", "started", "argv"}
RUN_ENTRIES = ("latest", "last_good", "train_log.jsonl", "metrics.jsonl", "routing.jsonl", "resumes.jsonl")
# Keys a --resume may change (fnmatch patterns, list indices as [*]): how long, how often to evaluate and save,
# where, on what device, and the bad-step guards. Everything else (seed, data, batch, lr, model, adapters, ...)
# would make the directory describe a run that was not trained.
RESUMABLE_KEYS = ("train.steps", "train.stages[*].steps", "train.eval_every", "train.save_every", "train.device",
                  "train.max_bad_steps", "train.max_update_rms", "train.rerank_topk", "train.out_dir",
                  "data.dev_queries", "data.dev_corpus", "model.grad_checkpointing")


class RunDirError(OSError):
    """A run directory that cannot be used as asked: locked by another run, or a checkpoint that cannot be written."""


class RunLock:
    """An exclusive fcntl.flock on <out_dir>/run.lock. The OS drops it when the file is closed or the process dies
    (so a killed run never blocks its resume); the file itself stays, naming the last holder."""

    def __init__(self, out_dir: str, argv: Sequence[str] = ()):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(self.fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet written its name"
            raise RunDirError(f"{out_dir}: in use by another run ({who}; lock file {self.path}); wait for it to "
                              "end or choose another train.out_dir") from None
        self.argv = list(argv)

    def claim(self) -> None:
        """Write this process's name into the lock file: only once the run is accepted, so a refused run leaves
        the directory byte-identical."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": self.argv}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_leftovers(out_dir: str) -> list:
    """Remove the .tmp-* entries of interrupted writes (checkpoints, the tiny base, text files). Only safe under the
    run lock: no other process writes into out_dir then."""
    gone = sorted(e for e in os.listdir(out_dir) if e.startswith(".tmp-"))
    for e in gone:
        path = os.path.join(out_dir, e)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return gone


def clear_for_fresh_run(cfg: Config, overwrite: bool) -> None:
    """A fresh run needs a directory without checkpoints or logs: refuse one that has them (with or without
    `latest`), or with --overwrite delete them. Also drops what a run that never saved could leave (config.yaml,
    the tiny base, rebuilt from this config)."""
    out = cfg.train.out_dir
    found = sorted(e for e in os.listdir(out) if e in RUN_ENTRIES or e.startswith("checkpoint-"))
    if found and not overwrite:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --overwrite to delete it, "
                              f"or choose another train.out_dir (nothing was changed; found: {', '.join(found[:4])}"
                              f"{', ...' if len(found) > 4 else ''})")
    stale = found + ["config.yaml"] + (["base"] if cfg.model.path is None else [])
    for e in stale:
        path = os.path.join(out, e)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    if found:
        print(f"--overwrite: removed {len(found)} entries of the previous run in {out}", flush=True)


def _flat(x, prefix: str = "") -> dict:
    """{"train.stages[0].steps": 6, "train.stages[#]": 2, ...}: a config mapping as dotted keys, lists of mappings
    by index plus their length under [#]."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(x, list) and all(isinstance(v, dict) for v in x):
        out = {f"{prefix}[#]": len(x)}
        for i, v in enumerate(x):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: x}


def _comparable(cfg: Config) -> dict:
    """cfg as dotted keys, with the tiny base's model.path (<out_dir>/base, set by prepare) as null again; for the
    tiny base model.tokenizer only said where to copy the tokenizer from when base/ was written, so it is left out."""
    d = asdict(cfg)
    if d["model"]["path"] in (None, os.path.join(d["train"]["out_dir"], "base")):
        d["model"]["path"] = d["model"]["tokenizer"] = None
    return _flat(d)


def check_resume_config(cfg: Config) -> dict:
    """Compare the resolved config with the run's own config.yaml -> {key: (old, new)} of allowed changes
    (RESUMABLE_KEYS); any other difference is one ConfigError listing the keys."""
    path = os.path.join(cfg.train.out_dir, "config.yaml")
    old, new = _comparable(load_config(path)), _comparable(cfg)
    missing = object()
    changed = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
               if old.get(k, missing) != new.get(k, missing)}
    show = lambda v: "(none)" if v is missing else (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")  # noqa
    frozen = [k for k in changed if not any(fnmatch.fnmatchcase(re.sub(r"\[\d+\]", "[*]", k), pat)
                                           for pat in RESUMABLE_KEYS)]
    if frozen:
        raise ConfigError(f"--resume: the config differs from {path} in keys a resume may not change: "
                          + ", ".join(f"{k} ({show(changed[k][0])} -> {show(changed[k][1])})" for k in frozen)
                          + "; start a fresh run in another train.out_dir to change them")
    return {k: (None if a is missing else a, None if b is missing else b) for k, (a, b) in changed.items()}


def record_resume(cfg: Config, changes: dict) -> None:
    """Log each allowed change, append the resume to <out_dir>/resumes.jsonl ({"step", "time", "changes": {key:
    [old, new]}}) and rewrite config.yaml with the new values, so the directory says what is being trained."""
    out = cfg.train.out_dir
    step = int(_read_name(os.path.join(out, "latest")).rsplit("-", 1)[1])
    for k, (a, b) in changes.items():
        print(f"--resume: {k}: {a!r} -> {b!r}", flush=True)
    _append_jsonl(os.path.join(out, "resumes.jsonl"), {
        "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "changes": {k: list(v) for k, v in changes.items()}})
    if changes:
        resolved = copy.deepcopy(cfg)
        if resolved.model.path is None:  # as prepare resolves it
            resolved.model.path, resolved.model.tokenizer = os.path.join(out, "base"), None
        save_config(resolved, os.path.join(out, "config.yaml"))


def _open_run_dir(cfg: Config, resume: bool, overwrite: bool, argv: Sequence[str]) -> RunLock:
    out = cfg.train.out_dir
    if resume and not os.path.isfile(os.path.join(out, "latest")):
        raise FileNotFoundError(f"--resume: {out} has no checkpoint ('latest' file)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{out}: cannot create the run directory ({e.strerror})") from None
    lock = RunLock(out, argv)
    try:  # the checks first: a refused run changes nothing in the directory
        changes = check_resume_config(cfg) if resume else None
        if not resume:
            clear_for_fresh_run(cfg, overwrite)
        lock.claim()
        gone = remove_leftovers(out)
        if gone:
            print(f"removed {len(gone)} leftovers of interrupted writes in {out}: {', '.join(gone)}", flush=True)
        if resume:
            record_resume(cfg, changes)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def open_run_dir(cfg: Config, resume: bool, overwrite: bool, rank: int, argv: Sequence[str] = ()):
    """Hold train.out_dir for the run: rank 0 takes the lock (RunLock), removes leftovers, and checks the directory
    (fresh: clear_for_fresh_run; --resume: check_resume_config + record_resume). Under DDP rank 0's error is
    broadcast, so every rank raises it instead of waiting at a barrier. The lock is released on leaving."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = _open_run_dir(cfg, resume, overwrite, argv)
        except Exception as e:  # noqa: BLE001  (re-raised below, after the other ranks were told)
            error = e
    if dist.is_initialized():
        msg = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(msg, src=0)
        if rank != 0 and msg[0] is not None:
            raise RunDirError(f"rank 0 could not open {cfg.train.out_dir}: {msg[0]}")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------------ the loop
def snapshot_update(params: Sequence[torch.Tensor], opt) -> tuple:
    """(parameter copies, optimizer state copy) taken before opt.step(), for undo_update."""
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def update_is_sane(params: Sequence[torch.Tensor], before: tuple, max_update_rms: Optional[float]) -> bool:
    """The step left every parameter finite and its update RMS = sqrt(sum_i (p_i - p0_i)^2 / N) over all N
    trainable elements (float64, so a huge update does not overflow) is at most max_update_rms (None: no bound)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return False
    if max_update_rms is None:
        return True
    sq = sum(float((p.detach().double() - p0.double()).pow(2).sum()) for p, p0 in zip(params, before[0]))
    n = sum(p.numel() for p in params)
    return math.isfinite(sq) and math.sqrt(sq / max(1, n)) <= max_update_rms


def undo_update(params: Sequence[torch.Tensor], opt, before: tuple) -> None:
    with torch.no_grad():
        for p, p0 in zip(params, before[0]):
            p.copy_(p0)
    opt.load_state_dict(before[1])


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


def untrained_experts(um: UniMoER, tasks: Sequence[str], frozen: Sequence[str]) -> list:
    """Names of the experts a step with these tasks does not train: the frozen ones, and those none of its tasks
    can reach. Reach follows from the structure, not from gradient values: a task router (task-routed modes)
    gives each task its router.task_experts, an always-on shared expert serves every task, and a learned router
    reaches every routed expert."""
    spec = moe_lora.get_config(um.base)
    unknown = [n for n in frozen if n not in [e.name for e in spec.experts]]
    if unknown:
        raise ConfigError(f"freeze_experts: no expert {unknown[0]!r} (experts: {[e.name for e in spec.experts]})")
    reached = {e.name for e in spec.experts if e.name not in spec.routed_experts}  # always on
    if spec.router.kind == "learned":
        reached |= set(spec.routed_experts)
    else:
        reached |= {name for task in tasks for name in spec.router.task_experts[task]}
    return [e.name for e in spec.experts if e.name in frozen or e.name not in reached]


def masked_step(opt: torch.optim.Optimizer, held: Sequence[tuple]) -> None:
    """opt.step() that leaves the slices `held` [(tensor, index)] (rows of A, columns of B of the experts the step
    does not train) bit-identical, their optimizer state included.

    The experts of a linear share one lora_A / lora_B, so an untrained expert's zero gradient would still move
    it: AdamW decays its moments (m <- beta1 m, v <- beta2 v), steps by m_hat / (sqrt(v_hat) + eps) from the
    old moments, and applies the decoupled weight decay. So the slices of the parameter and of each per-element
    state tensor (exp_avg, exp_avg_sq; max_exp_avg_sq under amsgrad) are saved before the step and written back
    after it (a state tensor this step created starts at zero there). AdamW's step counter t is one per tensor,
    so it also counts the steps an expert was held: its bias corrections 1 - beta^t use the tensor's t, not its
    own number of updates (a difference that fades as beta^t -> 0, within ~1/(1 - beta2) steps).
    """
    saved = []
    for tensor, idx in held:
        state = opt.state.get(tensor, {})
        moments = {k: v[idx].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == tensor.shape}
        saved.append((tensor, idx, tensor.detach()[idx].clone(), moments))
    opt.step()
    with torch.no_grad():
        for tensor, idx, value, moments in saved:
            tensor[idx] = value
            for k, v in opt.state.get(tensor, {}).items():
                if torch.is_tensor(v) and v.shape == tensor.shape:
                    v[idx] = moments[k] if k in moments else 0


def optimizer_step(opt: torch.optim.Optimizer, params: list, held: Sequence[tuple], finite: bool, clip: float,
                   world: int, max_update_rms: Optional[float] = None) -> bool:
    """Clip and apply the step's gradients, the held slices excluded from the norm and the update (masked_step).
    A non-finite loss or gradient on any rank skips the update on all; an update that leaves a parameter
    non-finite or moves them by more than max_update_rms (update_is_sane) is undone, parameters and optimizer
    state -> whether the update was applied (a skipped or undone step is a bad step)."""
    for tensor, idx in held:
        if tensor.grad is not None:
            tensor.grad[idx] = 0
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    ok = torch.tensor(float(finite and bool(torch.isfinite(grad_norm))), device=params[0].device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() > 0:
        before = snapshot_update(params, opt)
        masked_step(opt, held)
        if not update_is_sane(params, before, max_update_rms):  # the same on every rank: the same update
            undo_update(params, opt, before)
            ok.zero_()
    opt.zero_grad(set_to_none=True)
    return ok.item() > 0


# ---- one step's loss and gradient
def step_loss(outs: Sequence[dict], cfg: Config, group: int) -> tuple:
    """The loss of one optimizer step from its chunks' forward outputs -> total_loss's (loss, log).

    The chunks' embeddings and scores are concatenated (query i's documents stay at rows i * g...), so InfoNCE
    sees every chunk's documents as negatives and the rerank loss is the mean over the whole step; the aux losses
    are finalised over train.aux_scope's units (aux_losses)."""
    out = {k: torch.cat([o[k] for o in outs]) for k in ("q", "d", "scores") if k in outs[0]}
    out["aux"] = aux_losses([c for o in outs for c in o["aux_calls"]], cfg.train.aux_scope)
    return total_loss(out, cfg, group)


def forward_backward(model: nn.Module, um: UniMoER, chunks: Sequence[dict], cfg: Config, group: int,
                     autocast=contextlib.nullcontext) -> tuple:
    """The step's loss over all its chunks (UniMoER.forward inputs) and its gradient, accumulated into the
    parameters' .grad -> (finite, {name: value} for the log). model is um or its DDP wrapper; autocast a
    context-manager factory for the forwards. One chunk: forward, backward. More: gradcache_backward."""
    if len(chunks) > 1:
        return gradcache_backward(model, um, chunks, cfg, group, autocast)
    with autocast():
        out = model(**chunks[0])
    loss, logs = step_loss([out], cfg, group)
    loss.backward()
    return bool(torch.isfinite(loss)), logs


def gradcache_backward(model: nn.Module, um: UniMoER, chunks: Sequence[dict], cfg: Config, group: int,
                       autocast=contextlib.nullcontext) -> tuple:
    """GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
    the exact gradient of the loss over all chunks together, with one chunk's activations in memory at a time.

    1. Representation pass without grad: each chunk's outputs r_k (embeddings q, d, rerank scores, and the
       routers' aux-statistic totals; counts and dispatch sums are constants), keeping the RNG state before it.
    2. L = step_loss(r_1..r_K) on the whole step and G_k = dL/dr_k, by autograd with the r_k as leaves.
    3. Per chunk: re-forward with grad from the kept RNG state (GradCache's RandContext: the same adapter
       dropout and router jitter), then backward of sum <r_k, G_k>; by the chain rule the parameter gradients add
       up to dL/dtheta. Under DDP only the last chunk's backward all-reduces (no_sync before it).
    Cost: one more forward per chunk (without grad, ~1/3 of a forward + backward); memory: one chunk's
    activations plus the step's r_k. The global RNG ends where pass 1 left it.
    """
    devices = [um._device()] if um._device().type == "cuda" else []
    states, raw = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(devices))
            with autocast():
                raw.append(um(**chunk))
    cached = [_as_leaves(out) for out in raw]
    loss, logs = step_loss(cached, cfg, group)
    loss.backward()
    with torch.random.fork_rng(devices=devices):
        for k, (chunk, state, leaves) in enumerate(zip(chunks, states, cached)):
            _set_rng_state(state, devices)
            last = k == len(chunks) - 1
            with contextlib.nullcontext() if model is um or last else model.no_sync():
                with autocast():
                    out = model(**chunk)
                _cached_grad_dot(out, leaves).backward()
    return bool(torch.isfinite(loss)), logs


def _as_leaves(out: dict) -> dict:
    """A no-grad forward output as leaf tensors that require grad (GradCache's cached representations)."""
    leaves = {k: out[k].detach().requires_grad_() for k in ("q", "d", "scores") if k in out}
    leaves["aux_calls"] = [{name: [dataclasses.replace(st, total=st.total.detach().requires_grad_(),
                                                       dispatch=_dispatch_leaf(st, name))
                                   for st in layers] for name, layers in call.items()} for call in out["aux_calls"]]
    return leaves


def _dispatch_leaf(st, name: str):
    """A dispatch sum as GradCache caches it: a constant (Switch's f), or a leaf requiring grad where f is
    differentiable (AuxStat.dispatch_grad: DynMoLE's f = mean routed weight)."""
    if st.dispatch is None or not st.dispatch_grad:
        return st.dispatch
    return st.dispatch.detach().requires_grad_()


def _cached_grad_dot(out: dict, leaves: dict) -> torch.Tensor:
    """sum over a chunk's outputs r of <r, dL/dr> (dL/dr = the cached leaf's .grad; unused outputs skipped)."""
    pairs = [(out[k], leaves[k]) for k in ("q", "d", "scores") if k in leaves]
    for call, cached in zip(out["aux_calls"], leaves["aux_calls"]):
        pairs += [(st.total, c.total) for name in cached for st, c in zip(call[name], cached[name])]
        pairs += [(st.dispatch, c.dispatch) for name in cached for st, c in zip(call[name], cached[name])
                  if c.dispatch is not None and c.dispatch.requires_grad]
    return sum(((r * leaf.grad).sum() for r, leaf in pairs if leaf.grad is not None), torch.zeros(()))


def _rng_state(devices: list) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


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
        if d.synthetic and not (os.path.isdir(d.dir) and os.listdir(d.dir)):  # atomic: present means complete
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
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    if not args or args[0].startswith("--"):
        raise UsageError("usage: python train.py CONFIG.yaml [--section.key=value ...] [--resume | --overwrite] "
                         "[--debug]")
    cfg = load_config(args[0], args[1:])
    check_inputs(cfg, args[0] + (" (with overrides)" if args[1:] else ""))
    resume, overwrite = "--resume" in argv, "--overwrite" in argv
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir, --overwrite deletes it: pass one of them")
    t = cfg.train
    rank, world, device = setup_distributed(cfg)
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} must divide by world_size * grad_accum = "
                          f"{world} * {t.grad_accum}")
    with open_run_dir(cfg, resume, overwrite, rank, argv):  # the lock on out_dir, held until the run ends
        train_run(cfg, resume, rank, world, device)


def train_run(cfg: Config, resume: bool, rank: int, world: int, device: torch.device) -> None:
    """The run itself, inside open_run_dir: setup (prepare), step-0 dev evaluation, the loop, checkpoints."""
    t_start = time.time()  # the summary line's wall time: setup (data, tiny base) included
    t = cfg.train
    cfg = prepare(cfg, rank)
    random.seed(t.seed)
    np.random.seed(t.seed)
    um = build_model(cfg, device)
    model = nn.parallel.DistributedDataParallel(um, find_unused_parameters=True) if world > 1 else um
    params = trainable_parameters(um)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    examples = train_examples(cfg)
    if cfg.router.kind == "retriever" and cfg.train.mode in ("joint_moe", "no_shared"):  # RouterRetriever's pilots
        moe_lora.set_pilot_embeddings(um.base, pilot_inputs(um, examples))  # frozen base: the same on resume
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
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and t.bf16_autocast \
        else contextlib.nullcontext
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    while step < total_steps:
        t0 = time.time()
        lr, si = lr_at(step, cfg)
        stage = (t.stages or [Stage(steps=t.steps)])[si]
        for gr in opt.param_groups:
            gr["lr"] = lr
        tasks = tasks_at(step, stage, cfg)
        held = frozen_slices(um, untrained_experts(um, tasks, list(t.freeze_experts) + list(stage.freeze_experts)))
        um.train()
        chunks = [batch_inputs(um, data.gather_texts(examples, sampler.batch(step * t.grad_accum + micro)), tasks)
                  for micro in range(t.grad_accum)]  # the step's batch; grad_accum > 1: GradCache chunks
        finite, logs = forward_backward(model, um, chunks, cfg, group, autocast)
        ok = optimizer_step(opt, params, held, finite, t.clip, world, t.max_update_rms)
        if ok:
            bad_steps = 0
        else:
            bad_steps += 1
            if bad_steps >= t.max_bad_steps:
                raise NonFiniteError(f"{bad_steps} bad steps in a row (non-finite loss or gradient, or an update "
                                     f"that was non-finite or above train.max_update_rms; last: step {step + 1}); "
                                     f"stopping. The last good checkpoint is {last_good_checkpoint(t.out_dir)}")
        step += 1
        if rank == 0:
            record = {"step": step, "lr": lr, "tasks": tasks, "skipped": not ok, **logs}
            _append_jsonl(log_path, record)
            bar.update(1)
            bar.write(f"step {step}/{total_steps} | loss " + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                      + f" | lr {lr:.2e} | {time.time() - t0:.2f}s" + (" | SKIPPED (bad)" if not ok else ""))
            if step % t.eval_every == 0 or step == total_steps:
                m = {"step": step, **dev_evaluate(um, dev, cfg)}
                _append_jsonl(metrics_path, m)
                if routing_texts:
                    _append_jsonl(routing_path, {"step": step, **routing_snapshot(um, *routing_texts)})
                bar.write(f"step {step} dev: {json.dumps(m)}")
        if (step % t.save_every == 0 or step == total_steps) and bad_steps == 0:  # never save inside a bad streak
            if rank == 0:
                save_checkpoint(um, opt, cfg, step, bad_steps)
            if world > 1:
                dist.barrier()
    bar.close()
    if rank == 0:
        print(summary_line(metrics_path, t.out_dir, time.time() - t_start), flush=True)
    if world > 1:
        dist.destroy_process_group()


class NonFiniteError(RuntimeError):
    """max_bad_steps bad steps in a row: the run stops (the last good checkpoint is named)."""


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python train.py ...` through the CLIs' one error path (model.run_cli): an input error (a bad config or
    data file, a locked or occupied run directory, a full or read-only disk) is one line naming the file, key or
    value, exit code 2; a diverged run (NonFiniteError) one line and exit code 1; `--debug` shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli("train.py", main, argv)
    except NonFiniteError as e:
        if "--debug" in argv:
            raise
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
