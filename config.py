"""The YAML surface: one dataclass per section (model, data, adapters, router, train, stages; extend for a new
expert on a trained run, whose other sections come from that run: extension_config), loading with
`base:` and `--section.key=value` overrides, and the mode table (which experts and routing each train.mode means).

    cfg = load_config("configs/tiny.yaml", ["--train.lr=5e-4"])   # validated Config, or one ConfigError

Each section checks its own values (validate(where), `where` = the config file), Config.validate the rules across
sections; load_config runs them all before anything is built or written. A YAML mapping is filled 1:1 into the
dataclasses: an unknown key, a value of the wrong type or out of range is ONE ConfigError naming the file and key.
The `router:` section is router.RouterConfig itself (router.py owns its fields and checks).

Reading order: prompt templates (the data section's defaults) -> value checks -> sections -> Config -> YAML
reading and overrides -> the mode table (MODE_TABLE, resolve_mode, adapter_config).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

import moe_lora
from model import ConfigError
from aux_stats import AUX_LOSSES
from router import RouterConfig

TASKS = ["embed", "rerank"]  # task ids index this list (router.tasks must equal it)
# The task an extension (the `extend:` section, extend.py) adds to a trained run: NLI pair classification. Its task
# id is len(TASKS); the routers never see it under extend.router freeze (its calls take a fixed routing).
EXTEND_TASK = "nli"
NLI_LABELS = ("entailment", "neutral", "contradiction")  # class index = position (SNLI / MultiNLI gold_label)
MODES = ("emb_only", "rank_only", "joint_single", "joint_moe", "hard_switch", "hard_switch_shared", "no_shared")


# --------------------------------------------------------------------------------------------- prompt templates
# Qwen3-Embedding: the query gets an instruction, documents are embedded as bare text.
EMBED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen3-Reranker: the model reads prefix + pair + suffix and answers "yes" or "no" at the last position.
RERANK_INSTRUCTION = EMBED_INSTRUCTION
RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
                 "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                 "<|im_start|>user\n")
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_query(query: str, instruction: str = EMBED_INSTRUCTION) -> str:
    """The embedding-side query text (Qwen3-Embedding's get_detailed_instruct; no space after "Query:")."""
    return f"Instruct: {instruction}\nQuery:{query}"


# E2Rank (Liu et al. 2025, arXiv 2510.22733; Alibaba-NLP/E2Rank src/eval.py EvalModel): the listwise prompt that
# serves as a pseudo-relevance-feedback (PRF) query, its instruction the BEIR/MS MARCO one of src/eval.py
E2RANK_INSTRUCTION = ("Given a web search query and some relevant documents, rerank the documents that answer the "
                      "query")


def format_prf_query(query: str, docs: Sequence[str], instruction: str = E2RANK_INSTRUCTION) -> str:
    """E2Rank's listwise prompt (src/eval.py EvalModel.listwise_prompt_template), the PRF query text:
    `{instruction}:\nDocuments:\n[1] {d_1}\n[2] {d_2}...\nSearch Query: {query}`. The caller truncates the
    documents and the query, and wraps the text in the chat frame (UniMoER.tokens_prf)."""
    listed = "\n".join(f"[{i}] {doc}" for i, doc in enumerate(docs, start=1))
    return f"{instruction}:\nDocuments:\n{listed}\nSearch Query: {query}"


def format_nli_pair(premise: str, hypothesis: str) -> str:
    """The added NLI task's input (extend.py; UniMoER.tokens_nli cuts the premise first and appends EOS)."""
    return f"Premise: {premise}\nHypothesis: {hypothesis}"


def format_rerank_pair(query: str, doc: str, instruction: str = RERANK_INSTRUCTION) -> str:
    """The reranker's middle part. The caller truncates its token ids and puts the ids of RERANK_PREFIX before
    and of RERANK_SUFFIX after, as Qwen3-Reranker does, so truncation never cuts the template."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


# --------------------------------------------------------------------------------------------- value checks
# Each section checks its own values (validate(where), `where` = the config file), Config.validate the rules
# across sections; load_config runs them all before anything is built or written.
def check_rule(where: str, key: str, value, ok: bool, expected: str) -> None:
    """One config rule: unless ok, raise ConfigError '<where>: <key> must be <expected> (got <value>)'."""
    if not ok:
        raise ConfigError(f"{where}: {key} must be {expected} (got {value!r})")


def _check_min(where: str, section, key: str, names: Sequence[str], lo: int) -> None:
    """Each named integer field of the section object is >= lo."""
    for name in names:
        v = getattr(section, name)
        check_rule(where, f"{key}.{name}", v, v >= lo, f">= {lo}")


def _check_text(where: str, key: str, value: Optional[str], optional: bool = False) -> None:
    """A path or name: a non-empty string (None where the field is optional)."""
    check_rule(where, key, value, (optional and value is None) or (isinstance(value, str) and bool(value.strip())),
           "a non-empty string" + (" or null" if optional else ""))


SEED_MAX = 2**32 - 1  # numpy's seeds (np.random.seed, default_rng([seed, ...])) are in [0, 2**32)

# --------------------------------------------------------------------------------------------- sections
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
        check_rule(where, f"{key}.seed", self.seed, 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}]")
        check_rule(where, f"{key}.head_dim", self.head_dim, self.head_dim >= 2 and self.head_dim % 2 == 0,
               "even and >= 2 (rotary embedding pairs)")
        check_rule(where, f"{key}.num_key_value_heads", self.num_key_value_heads,
               self.num_attention_heads % self.num_key_value_heads == 0,
               f"a divisor of num_attention_heads {self.num_attention_heads} (grouped-query attention)")
        check_rule(where, f"{key}.init_std", self.init_std, self.init_std > 0, "> 0")


@dataclass
class ModelSection:
    path: Optional[str] = None  # HF checkpoint directory; null = the tiny random base (written to <out_dir>/base)
    tokenizer: Optional[str] = None  # directory or tokenizer.json; default model.path, or data.dir for the tiny base
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the frozen base; adapters are always fp32
    tiny: TinyBase = field(default_factory=TinyBase)
    bidirectional: bool = False  # non-causal attention (GritLM-style ablation)
    grad_checkpointing: bool = False
    # Weight-only quantisation of the decoder's q/k/v/o/gate/up/down projections (quant.py), dequantised on the fly:
    # int8 per output channel (LLM.int8() absmax), int4 group-wise (GPTQ's asymmetric min/max, round to nearest)
    quant: Literal["none", "int8", "int4"] = "none"
    quant_group: int = 128  # int4: input columns per scale/zero point; must divide every quantised in_features

    def validate(self, where: str, key: str = "model") -> None:
        _check_text(where, f"{key}.path", self.path, optional=True)
        _check_text(where, f"{key}.tokenizer", self.tokenizer, optional=True)
        check_rule(where, f"{key}.quant_group", self.quant_group, self.quant_group >= 1, ">= 1")
        self.tiny.validate(where, f"{key}.tiny")
        if self.path is None and self.quant == "int4":  # the tiny base's input sizes are known now; a model
            t = self.tiny                               # directory's are checked when it is quantised
            sizes = {"hidden_size": t.hidden_size, "num_attention_heads * head_dim": t.num_attention_heads * t.head_dim,
                     "intermediate_size": t.intermediate_size}
            for name, n in sizes.items():
                check_rule(where, f"{key}.quant_group", self.quant_group, n % self.quant_group == 0,
                           f"a divisor of every quantised linear's input size (model.tiny {name} = {n})")


@dataclass
class DataSection:
    dir: str = "data/synthetic"  # BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv
    synthetic: bool = False  # write the built-in synthetic task into dir first if dir does not exist
    synthetic_seed: int = 0
    synthetic_args: dict = field(default_factory=dict)  # other synthetic.make_synthetic arguments (n_docs, ...)
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
    embed_instruction: str = EMBED_INSTRUCTION
    rerank_instruction: str = RERANK_INSTRUCTION
    # "qwen3": Qwen3-Reranker's system/user/assistant prompt around the pair (RERANK_PREFIX ... RERANK_SUFFIX);
    # "bare": the pair alone, then EOS, scored there (the tiny default: see README, "The tiny default")
    rerank_prompt: Literal["qwen3", "bare"] = "qwen3"
    # train.rerank_head e2rank: the instruction of the PRF query (format_prf_query); it is read in the same frame
    # as the reranker (rerank_prompt: qwen3 = the chat turn E2Rank uses, bare = the text + EOS)
    prf_instruction: str = E2RANK_INSTRUCTION
    # train.rerank_head jina_v3: the single tokens whose final states are a document's and the query's vectors
    # (stand-ins for the released model's added <|embed_token|> / <|rerank_token|>; listwise.py)
    jina_doc_marker: str = "<|endoftext|>"
    jina_query_marker: str = "<|im_end|>"

    def validate(self, where: str, key: str = "data") -> None:
        """Ranges here; max_pair_len and max_query_len against the templates need the tokenizer (check_lengths)."""
        _check_text(where, f"{key}.dir", self.dir)
        _check_text(where, f"{key}.train_file", self.train_file, optional=True)
        _check_text(where, f"{key}.dev_split", self.dev_split)
        _check_text(where, f"{key}.jina_doc_marker", self.jina_doc_marker)
        _check_text(where, f"{key}.jina_query_marker", self.jina_query_marker)
        _check_min(where, self, key, ("synthetic_seed", "dev_queries", "dev_corpus", "n_neg"), 0)
        least = 2 if self.append_eos else 1  # with append_eos the EOS takes the last of the max_*_len tokens
        for name in ("max_query_len", "max_doc_len", "max_pair_len"):
            v = getattr(self, name)
            check_rule(where, f"{key}.{name}", v, v >= least, f">= {least}" + (" (one text token + EOS with "
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
            check_rule(where, f"{key}.{name}", getattr(self, name), getattr(self, name) > 0, "> 0")
        short = [t[:-len("_proj")] for t in moe_lora.TARGETS]
        ok = bool(self.targets) and len(set(self.targets)) == len(self.targets) and \
            all(t in short or t in moe_lora.TARGETS for t in self.targets)
        check_rule(where, f"{key}.targets", self.targets, ok, f"a non-empty list of distinct names among "
               f"{', '.join(short)} (or {', '.join(moe_lora.TARGETS)})")
        if self.layers is not None:
            ok = bool(self.layers) and len(set(self.layers)) == len(self.layers) and min(self.layers) >= 0
            check_rule(where, f"{key}.layers", self.layers, ok, "null (every layer) or a non-empty list of distinct "
                   "layer indices >= 0")
        check_rule(where, f"{key}.dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")


@dataclass
class Stage:
    steps: int
    lr: Optional[float] = None  # default train.lr
    tasks: Literal["both", "embed", "rerank"] = "both"
    freeze_experts: list[str] = field(default_factory=list)

    def validate(self, where: str, key: str) -> None:
        check_rule(where, f"{key}.steps", self.steps, self.steps >= 1, ">= 1")
        check_rule(where, f"{key}.lr", self.lr, self.lr is None or self.lr > 0, "> 0 or null (train.lr)")


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
    # pointwise BCE, group-wise softmax CE (localized contrastive), or RankNet over each group (losses.ranknet_loss)
    rerank_loss: Literal["bce", "group", "ranknet"] = "bce"
    # logit("yes") - logit("no"), a linear head (ablation), E2Rank: cos(embed(PRF query), embed(doc)) /
    # e2rank_temperature, or Jina-Reranker-v3's listwise cross-encoder (listwise.py):
    # cos(P(h_doc_marker), P(h_query_marker)) / jina_temperature
    rerank_head: Literal["yesno", "linear", "e2rank", "jina_v3"] = "yesno"
    e2rank_temperature: float = 0.1  # E2Rank's RankNet logits cos / t (official ranknet_scale_factor 10.0)
    e2rank_prf_k: int = 20  # E2Rank at evaluation: the PRF query holds the candidate list's top k (official 20)
    dev_e2rank: bool = True  # each dev evaluation also reranks the fixed list with E2Rank (e2rank_fixed_ndcg@10)
    jina_temperature: float = 0.05  # jina_v3: the list's softmax logits cos / t (the paper's InfoNCE tau 0.05)
    jina_proj_dim: int = 256  # jina_v3: the projector's output width (paper 256; the released code 512)
    jina_block_size: int = 125  # jina_v3 at inference: documents per sequence (official rerank() block_size)
    # Matryoshka (MRL, Kusupati et al. 2022): L_emb = sum_m c_m InfoNCE on the first m dims, renormalised, over these
    # dims plus the full width (losses.matryoshka_loss); [] = off. Weights c_m per listed dim; [] = all 1 (the paper)
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)
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
    # Multi-task gradient method over the two task losses (mtl.py): none (the weighted sum) | pcgrad (Yu et al. 2020)
    # | gradnorm (Chen et al. 2018) | famo (Liu et al. 2023)
    mtl: Literal["none", "pcgrad", "gradnorm", "famo"] = "none"
    gradnorm_alpha: float = 1.5  # GradNorm's asymmetry alpha (the paper's NYUv2 value)
    gradnorm_lr: Optional[float] = None  # Adam lr of GradNorm's weights w_i; null: train.lr (LibMTL: one optimizer)
    famo_lr: float = 0.025  # Adam lr of FAMO's task logits xi (official w_lr)
    famo_gamma: float = 0.01  # FAMO's decay gamma on xi (official default; Adam weight_decay)
    # where FAMO's L(theta_{t+1}) comes from: same_batch (a no-grad forward on the step's batch after the update:
    # the official trainers) | next_step (the next step's losses on its own batch: no extra forward)
    famo_delta: Literal["same_batch", "next_step"] = "same_batch"

    def validate(self, where: str, key: str = "train") -> None:
        _check_text(where, f"{key}.out_dir", self.out_dir)
        check_rule(where, f"{key}.seed", self.seed, 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}]")
        _check_min(where, self, key, ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "rerank_topk",
                                      "max_bad_steps", "e2rank_prf_k", "jina_proj_dim",
                                      "jina_block_size"), 1)
        _check_min(where, self, key, ("warmup_steps",), 0)
        check_rule(where, f"{key}.batch_size", self.batch_size, self.batch_size % self.grad_accum == 0,
               f"a multiple of train.grad_accum {self.grad_accum}")
        for name in ("lr", "temperature", "clip", "e2rank_temperature", "jina_temperature"):
            check_rule(where, f"{key}.{name}", getattr(self, name), getattr(self, name) > 0, "> 0")
        for name in ("weight_decay", "emb_weight", "rank_weight"):
            check_rule(where, f"{key}.{name}", getattr(self, name), getattr(self, name) >= 0, ">= 0")
        check_rule(where, f"{key}.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        for name, w in self.aux_weights.items():
            check_rule(where, f"{key}.aux_weights.{name}", name, name in AUX_LOSSES,
                   f"an aux loss among {', '.join(AUX_LOSSES)}")
            check_rule(where, f"{key}.aux_weights.{name}", w, w >= 0, ">= 0")
        check_rule(where, f"{key}.gradnorm_alpha", self.gradnorm_alpha, self.gradnorm_alpha >= 0, ">= 0")
        check_rule(where, f"{key}.famo_gamma", self.famo_gamma, self.famo_gamma >= 0, ">= 0")
        check_rule(where, f"{key}.famo_lr", self.famo_lr, self.famo_lr > 0, "> 0")
        if self.gradnorm_lr is not None:
            check_rule(where, f"{key}.gradnorm_lr", self.gradnorm_lr, self.gradnorm_lr > 0, "> 0 or null (train.lr)")
        self.validate_matryoshka(where, key)
        if self.max_update_rms is not None:
            check_rule(where, f"{key}.max_update_rms", self.max_update_rms, self.max_update_rms > 0, "> 0 or null")
        for i, st in enumerate(self.stages):
            st.validate(where, f"{key}.stages[{i}]")

    def validate_matryoshka(self, where: str, key: str) -> None:
        """matryoshka_dims: distinct integers >= 1 (<= the hidden size: Config.validate for the tiny base,
        train.check_inputs for a model directory); matryoshka_weights: [] or one c_m >= 0 per dim."""
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        for i, m in enumerate(dims):
            check_rule(where, f"{key}.matryoshka_dims[{i}]", m, m >= 1, ">= 1")
        check_rule(where, f"{key}.matryoshka_dims", dims, len(set(dims)) == len(dims), "distinct")
        if weights:
            check_rule(where, f"{key}.matryoshka_weights", weights, len(weights) == len(dims),
                       f"[] (all 1) or one weight per entry of {key}.matryoshka_dims {dims}")
        for i, c in enumerate(weights):
            check_rule(where, f"{key}.matryoshka_weights[{i}]", c, c >= 0, ">= 0")


@dataclass
class AddedExpertSection:
    """The expert an extension adds (extend.expert): its rank, alpha and the projections it adapts."""
    name: str = "nli"
    r: int = 8
    alpha: float = 16.0
    targets: Optional[list[str]] = None  # null = the run's adapters.targets; else a subset of them

    def validate(self, where: str, key: str) -> None:
        _check_text(where, f"{key}.name", self.name)
        check_rule(where, f"{key}.r", self.r, self.r >= 1, ">= 1")
        check_rule(where, f"{key}.alpha", self.alpha, self.alpha > 0, "> 0")


@dataclass
class ExtendSection:
    """A new expert and task on a trained run (Experiment 8, extend.py). The run's model, data, adapters, router and
    train.mode come from <from_run>/config.yaml (load_config merges them); its experts, routers and heads are loaded
    strictly and never change. router: "freeze" = the old routers are not touched and the new task's calls take a
    fixed routing (the new expert at 1, an always-on shared expert at 1, the old routed experts at 0); "grow" = the
    learned router gets one more output column, its old columns held, so every task is routed over old + new."""
    from_run: str
    expert: AddedExpertSection = field(default_factory=AddedExpertSection)
    router: Literal["freeze", "grow"] = "freeze"
    data_dir: str = "data/nli-tiny"  # NLI JSONL: train.jsonl, dev.jsonl ({"premise", "hypothesis", "label"})
    synthetic: bool = False  # write the built-in synthetic NLI set (nli.make_synthetic_nli) into data_dir first
    synthetic_seed: int = 0
    synthetic_args: dict = field(default_factory=dict)  # other nli.make_synthetic_nli arguments
    max_len: int = 64  # tokens of `Premise: ...\nHypothesis: ...` + EOS (the premise is cut first)
    dev_examples: int = 0  # first N dev examples at each dev evaluation; 0 = all

    def validate(self, where: str, key: str = "extend") -> None:
        _check_text(where, f"{key}.from_run", self.from_run)
        _check_text(where, f"{key}.data_dir", self.data_dir)
        self.expert.validate(where, f"{key}.expert")
        check_rule(where, f"{key}.max_len", self.max_len, self.max_len >= 8, ">= 8")
        _check_min(where, self, key, ("synthetic_seed", "dev_examples"), 0)


# train keys an extension may set (the optimisation of the new expert); the rest is the run's (extension_config)
EXTEND_TRAIN_KEYS = ("out_dir", "seed", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio",
                     "clip", "aux_weights", "eval_every", "save_every", "max_bad_steps", "max_update_rms", "device",
                     "bf16_autocast")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapters: AdapterSection = field(default_factory=AdapterSection)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainSection = field(default_factory=TrainSection)
    extend: Optional[ExtendSection] = None  # a new expert on a trained run (extend.py); null = a plain run

    def validate(self, where: str) -> None:
        """Every section's own ranges, then the rules across sections (experts of the mode, layers, tasks)."""
        for section in (self.model, self.data, self.adapters, self.train):
            section.validate(where)
        t = self.train
        if t.pooling == "first" and not self.model.bidirectional:
            raise ConfigError(f"{where}: train.pooling 'first' sees only the first token under causal attention; "
                              "set model.bidirectional: true or use 'last'")
        if t.rerank_head == "e2rank":
            check_rule(where, "train.rerank_loss", t.rerank_loss, t.rerank_loss == "ranknet",
                       "'ranknet' with train.rerank_head 'e2rank' (E2Rank trains its listwise scores with RankNet)")
            check_rule(where, "model.bidirectional", self.model.bidirectional, not self.model.bidirectional,
                       "false with train.rerank_head 'e2rank' (the PRF query is read causally and pooled at its last "
                       "token, as E2Rank's decoder embedding)")
        if t.rerank_head == "jina_v3":
            check_rule(where, "train.rerank_loss", t.rerank_loss, t.rerank_loss == "group",
                       "'group' with train.rerank_head 'jina_v3' (softmax CE of the positive against its list's "
                       "negatives, the paper's listwise InfoNCE)")
            d = self.data
            check_rule(where, "data.jina_query_marker", d.jina_query_marker, d.jina_query_marker != d.jina_doc_marker,
                       f"a token other than data.jina_doc_marker {d.jina_doc_marker!r} (two markers, as the "
                       "released model's <|embed_token|> and <|rerank_token|>)")
        if self.router.tasks != TASKS:
            raise ConfigError(f"{where}: router.tasks must be {TASKS} (got {self.router.tasks})")
        try:
            experts = [e.name for e in adapter_config(self, with_added=False).experts]
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        tasks = mode_tasks(t.mode)
        for key, names in [("train.freeze_experts", t.freeze_experts)] + \
                [(f"train.stages[{i}].freeze_experts", st.freeze_experts) for i, st in enumerate(t.stages)]:
            for name in names:
                check_rule(where, key, name, name in experts, f"an expert of mode {t.mode} ({', '.join(experts)})")
        for i, st in enumerate(t.stages):
            check_rule(where, f"train.stages[{i}].tasks", st.tasks, st.tasks in ["both"] + tasks,
                   f"'both' or a task mode {t.mode} trains ({', '.join(tasks)})")
        weights = [getattr(t, {"embed": "emb_weight", "rerank": "rank_weight"}[x]) for x in tasks]
        check_rule(where, "train.emb_weight/rank_weight", weights, any(w > 0 for w in weights),
               f"> 0 for at least one task mode {t.mode} trains")
        check_mtl(t, where)
        if t.matryoshka_dims:
            check_rule(where, "train.matryoshka_dims", t.matryoshka_dims, "embed" in tasks,
                       f"[] with train.mode {t.mode}, which trains no embedding")
            if self.model.path is None:  # a model directory's width is checked by train.check_inputs
                h = self.model.tiny.hidden_size
                check_rule(where, "train.matryoshka_dims", t.matryoshka_dims, max(t.matryoshka_dims) <= h,
                           f"dims <= model.tiny.hidden_size {h}")
        layers = self.adapters.layers
        if layers is not None and self.model.path is None:  # the tiny base's depth is known now; a model
            n = self.model.tiny.num_hidden_layers            # directory's is checked by check_inputs
            check_rule(where, "adapters.layers", layers, max(layers) < n, f"layer indices < model.tiny.num_hidden_layers "
                   f"{n}")
        if self.extend is not None:
            check_extension(self, where)


def check_extension(cfg: Config, where: str) -> None:
    """The extend section against the run it extends: a new expert name, targets among the run's, grow only on a
    learned router that can take a column (no task embedding, which has no row for the new task; no loss-free
    bias, which would move the old columns' selection), and a plain optimisation (one chunk, no stages or mtl)."""
    e, t, r = cfg.extend, cfg.train, cfg.router
    cfg.extend.validate(where)
    names = [x.name for x in adapter_config(cfg, with_added=False).experts]
    check_rule(where, "extend.expert.name", e.expert.name, e.expert.name not in names,
               f"a new expert name (the run has {', '.join(names)})")
    run_targets = [x if x.endswith("_proj") else f"{x}_proj" for x in cfg.adapters.targets]
    if e.expert.targets is not None:
        full = [x if x.endswith("_proj") else f"{x}_proj" for x in e.expert.targets]
        ok = bool(full) and len(set(full)) == len(full) and all(x in run_targets for x in full)
        check_rule(where, "extend.expert.targets", e.expert.targets, ok, "null or a non-empty list of distinct "
                   f"projections among the run's adapters.targets ({', '.join(cfg.adapters.targets)})")
    if e.router == "grow":
        check_rule(where, "extend.router", e.router, r.kind == "learned", f"'freeze' with router.kind {r.kind!r} "
                   "(grow adds a column to a learned router)")
        check_rule(where, "extend.router", e.router, r.task_embed_dim == 0, "'freeze' with router.task_embed_dim > 0 "
                   "(the task embedding has no row for the new task)")
        check_rule(where, "extend.router", e.router, not r.loss_free_balance, "'freeze' with "
                   "router.loss_free_balance (its bias would move the old columns' selection)")
    check_rule(where, "train.grad_accum", t.grad_accum, t.grad_accum == 1, "1 in an extension")
    check_rule(where, "train.mtl", t.mtl, t.mtl == "none", "'none' in an extension (one task is trained)")
    check_rule(where, "train.stages", t.stages, not t.stages, "[] in an extension")
    try:
        adapter_config(cfg)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


# --------------------------------------------------------------------------------------------- YAML
def check_mtl(t: TrainSection, where: str) -> None:
    """train.mtl against the rest: the methods act on a step with both tasks, on one forward (PCGrad and GradNorm
    take per-task gradients, which GradCache's cached representations do not keep apart), and GradNorm / FAMO learn
    the task weights themselves."""
    if t.mtl == "none":
        return
    if len(MODE_TABLE[t.mode].tasks) < 2:
        raise ConfigError(f"{where}: train.mtl {t.mtl!r} balances two task losses; train.mode {t.mode!r} trains one")
    if t.schedule == "alternate":
        raise ConfigError(f"{where}: train.mtl {t.mtl!r} needs both losses in a step; train.schedule 'alternate' "
                          "gives each step one task (use schedule: mixed)")
    if t.mtl in ("pcgrad", "gradnorm") and t.grad_accum > 1:
        raise ConfigError(f"{where}: train.mtl {t.mtl!r} with train.grad_accum {t.grad_accum}: per-task gradients "
                          "are not kept apart by GradCache's chunked backward (use grad_accum: 1, or mtl: famo)")
    if t.mtl in ("pcgrad", "gradnorm") and t.mode == "hard_switch":
        raise ConfigError(f"{where}: train.mtl {t.mtl!r} acts on the parameters both tasks reach; train.mode "
                          "'hard_switch' has none (each task its own expert)")
    if t.mtl in ("gradnorm", "famo") and (t.emb_weight, t.rank_weight) != (1.0, 1.0):
        raise ConfigError(f"{where}: train.mtl {t.mtl!r} learns the task weights; train.emb_weight/rank_weight "
                          f"must stay 1.0 (got {t.emb_weight}, {t.rank_weight})")


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
    d = apply_overrides(read_yaml(path), overrides)
    if d.get("extend") is not None:
        d = extension_config(d, where)
    return config_from_dict(d, where)


def extension_config(d: dict, where: str) -> dict:
    """An extension's YAML (`extend:` + optional `train:` keys of EXTEND_TRAIN_KEYS) -> the whole config mapping:
    model, data, adapters, router and the rest of train from <extend.from_run>/config.yaml (a run or checkpoint
    directory), the extension's train keys over them, its extend section added. The run's own stages and frozen
    experts are dropped (they described its training). A run's tiny base (model.path <out_dir>/base) becomes
    model.path null: train.py copies it into the new run (prepare), so the new run stands alone."""
    ext = d["extend"]
    if not isinstance(ext, dict):
        raise ConfigError(f"{where}: extend: expected a mapping, got {ext!r}")
    from_run = ext.get("from_run")
    _check_text(where, "extend.from_run", from_run)
    for section in d:
        if section not in ("extend", "train"):
            raise ConfigError(f"{where}: {section}: an extension takes model, data, adapters and router from "
                              f"extend.from_run's config.yaml ({from_run}); drop the {section} section")
    train = d.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{where}: train: expected a mapping, got {train!r}")
    for k in train:
        if k not in EXTEND_TRAIN_KEYS:
            raise ConfigError(f"{where}: train.{k}: comes from extend.from_run's config.yaml in an extension "
                              f"(an extension sets {', '.join(EXTEND_TRAIN_KEYS)})")
    run_yaml = os.path.join(from_run, "config.yaml")
    if not os.path.isfile(run_yaml):
        raise ConfigError(f"{where}: extend.from_run {from_run!r}: not a run or checkpoint directory (no config.yaml)")
    run = read_yaml(run_yaml)
    if run.get("extend") is not None:
        raise ConfigError(f"{where}: extend.from_run {from_run!r} is itself an extension; extend the run it "
                          f"extends ({run['extend'].get('from_run')}) instead")
    _drop_legacy_router(run)
    run_train = dict(run.get("train") or {})
    model = dict(run.get("model") or {})
    if model.get("path") is not None and model["path"] == os.path.join(run_train.get("out_dir", ""), "base"):
        model["path"] = model["tokenizer"] = None
    run_train.update(stages=[], freeze_experts=[], **train)
    return {**run, "model": model, "train": run_train, "extend": ext}


# What a trained run may be deployed with (evaluate.py / rag.py RUN --model.quant=int4): how the frozen base is
# stored, never what the experts were trained on (base weights, templates, lengths, routing).
DEPLOY_KEYS = ("model.dtype", "model.quant", "model.quant_group")


def load_run_config(path: str, deploy: Sequence[str] = ()) -> Config:
    """A run's saved config.yaml -> Config, with `deploy` overrides (`--model.quant=int8`, only DEPLOY_KEYS).
    Runs saved before the mode table hold `router.kind: learned` and the
    default `router.task_experts` in the task-routed modes (emb_only, rank_only, joint_single, hard_switch*): values
    the code of that time never used, since the mode replaced them when it built the model. They are dropped here,
    so such runs load, resume and evaluate as they trained; any other contradiction is the usual error."""
    d = read_yaml(path)
    for o in deploy:
        key = o[2:].split("=", 1)[0] if o.startswith("--") else o
        if key not in DEPLOY_KEYS:
            raise ConfigError(f"{path}: override {o!r}: a trained run takes only the deployment settings "
                              f"{', '.join('--' + k for k in DEPLOY_KEYS)} (its other settings are what it trained on)")
    apply_overrides(d, deploy)
    _drop_legacy_router(d)
    return config_from_dict(d, path)


def _drop_legacy_router(d: dict) -> None:
    """load_run_config's rule for runs saved before the mode table, in place."""
    mode, router = MODE_TABLE.get((d.get("train") or {}).get("mode")), d.get("router")
    if mode is not None and mode.router_kinds == ("task",) and isinstance(router, dict) \
            and router.get("kind") == "learned":
        router.pop("kind")
        router.pop("task_experts", None)


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
    """A config mapping -> Config with the mode's routing filled in (resolve_mode), validated."""
    cfg = from_dict(Config, d, where)
    resolve_mode(cfg, d.get("router") or {}, where)
    cfg.validate(where)
    return cfg


# --------------------------------------------------------------------------------------------- the mode table
@dataclass(frozen=True)
class Mode:
    """What one train.mode means. experts: the task experts (rank adapters.r), in order; shared: the shared expert
    (rank adapters.shared_r) is absent (None), "always" on, or as adapters.shared says ("adapters"); router_kinds:
    the router.kind values it allows (the first when the YAML names none); task_experts: the fixed table of a
    task-routed mode (router.task_experts), None where the YAML's own table is used (kind "retriever"'s pilots)."""
    tasks: tuple
    experts: tuple
    shared: Optional[str]
    router_kinds: tuple
    task_experts: Optional[dict] = None


def _single(expert: str, tasks: tuple) -> Mode:
    """One LoRA, always on: a fixed router that gives every task that expert."""
    return Mode(tasks, (expert,), None, ("task",), {t: [expert] for t in TASKS})


_PER_TASK = {"embed": ["embed"], "rerank": ["rerank"]}  # jina-v3 style: each task its own expert
MODE_TABLE = {
    "emb_only": _single("embed", ("embed",)),
    "rank_only": _single("rerank", ("rerank",)),
    "joint_single": _single("joint", tuple(TASKS)),
    "hard_switch": Mode(tuple(TASKS), ("embed", "rerank"), None, ("task",), _PER_TASK),
    "hard_switch_shared": Mode(tuple(TASKS), ("embed", "rerank"), "always", ("task",), _PER_TASK),
    # a learned router, or RouterRetriever's untrained one (router.kind "retriever")
    "joint_moe": Mode(tuple(TASKS), ("embed", "rerank"), "adapters", ("learned", "retriever")),
    "no_shared": Mode(tuple(TASKS), ("embed", "rerank"), None, ("learned", "retriever")),
}


def resolve_mode(cfg: Config, router_yaml: dict, where: str) -> None:
    """Fill router.kind and router.task_experts from train.mode's row of MODE_TABLE, in place, so the config says
    what is built. A key the YAML gives (router_yaml: the raw `router:` mapping) that contradicts the mode is one
    ConfigError naming it; a value equal to what the mode implies is accepted. router.aux_losses is not a knob:
    every aux loss is computed and logged where it applies and train.aux_weights weighs them (the one place)."""
    mode, r = MODE_TABLE[cfg.train.mode], cfg.router
    if "kind" in router_yaml and r.kind not in mode.router_kinds:
        raise ConfigError(f"{where}: router.kind {r.kind!r} contradicts train.mode {cfg.train.mode!r}, which routes "
                          f"with {' or '.join(map(repr, mode.router_kinds))}; drop router.kind or change the mode")
    if "kind" not in router_yaml:
        r.kind = mode.router_kinds[0]
    if mode.task_experts is not None:
        if "task_experts" in router_yaml and r.task_experts != mode.task_experts:
            raise ConfigError(f"{where}: router.task_experts {r.task_experts} contradicts train.mode "
                              f"{cfg.train.mode!r}, which gives {mode.task_experts}; drop router.task_experts")
        r.task_experts = {t: list(v) for t, v in mode.task_experts.items()}
    if r.aux_losses != list(AUX_LOSSES):
        raise ConfigError(f"{where}: router.aux_losses {r.aux_losses} is not a setting: every aux loss is computed "
                          "and logged where it applies; weigh them with train.aux_weights (unlisted: weight 0)")
    try:
        r.validate()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def adapter_config(cfg: Config, with_added: bool = True) -> moe_lora.MoELoRAConfig:
    """train.mode (MODE_TABLE) -> which experts exist and whether a shared expert is always on; the routing is the
    (resolved) router section; an extension's expert (extend.expert) as `added` unless with_added is False (the
    spec of the run it extends)."""
    a, mode = cfg.adapters, MODE_TABLE[cfg.train.mode]
    added = None
    if cfg.extend is not None and with_added:
        x = cfg.extend.expert
        added = moe_lora.AddedExpert(x.name, x.r, x.alpha, list(x.targets if x.targets is not None else a.targets),
                                     task=len(TASKS), routing=cfg.extend.router)
    experts = [moe_lora.ExpertSpec(name, a.r, a.alpha) for name in mode.experts]
    shared = a.shared if mode.shared == "adapters" else mode.shared
    if shared is not None:
        experts.append(moe_lora.ExpertSpec("shared", a.shared_r, a.shared_alpha))
    return moe_lora.MoELoRAConfig(experts=experts, targets=list(a.targets), layers=a.layers, rslora=a.rslora,
                                  dropout=a.dropout, shared=shared, router=RouterConfig(**asdict(cfg.router)),
                                  added=added)


def mode_tasks(mode: str) -> list:
    """The tasks train.mode trains."""
    return list(MODE_TABLE[mode].tasks)
