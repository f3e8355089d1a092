"""UniMoER: one frozen base + LoRA experts + both task heads, built from a config or loaded from a run or a plain
model directory; the encoder interface evaluate.py and analysis.py use, and an MTEB encoder on the same path.

Per-task rules live in one place, UniMoER's tokens_queries / tokens_documents / tokens_pairs (which template and
length a text gets, whether EOS is appended), causal and run_base (the causal flag, the task id the routers read)
and pool_positions (the pooled position); every caller that runs the base for a task goes through them.
Embedding: queries `Instruct: {instruction}\\nQuery:{query}` + EOS, documents bare + EOS (no EOS with
data.append_eos false); pooled at the last real token (or, bidirectional only, the first); L2-normalised.
Reranking: RERANK_PREFIX + `<Instruct>: ...\\n<Query>: ...\\n<Document>: ...` (truncated) + RERANK_SUFFIX, read
causally; score = logit("yes") - logit("no") at the last position (or a linear head, train.rerank_head).

Reading order: devices and dtypes (setup_distributed, autocast_for) -> check_lengths -> UniMoER (tokens ->
run_base -> heads -> forward -> encoder interface) -> routing_snapshot, pilot_inputs, batch_inputs -> build_model ->
checkpoint_dir / check_adapters_match -> load_run / load_model -> MTEBEncoder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import listwise
import moe_lora
import quant
from config import (EXTEND_TASK, NLI_LABELS, RERANK_PREFIX, RERANK_SUFFIX, TASKS, Config, ConfigError,
                    adapter_config, apply_overrides, check_rule, config_from_dict, format_nli_pair, format_prf_query,
                    format_query, format_rerank_pair, load_run_config)
from data import doc_text
from ir import EvalError
from model import CausalLM, last_token_positions, load_pretrained, load_tokenizer
from retrieval import encode_length_sorted
from router import LearnedRouter, RetrieverRouter


# --------------------------------------------------------------------------------------------- devices and dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # model.dtype -> the frozen base's dtype


def setup_distributed(device: str) -> tuple:
    """device "cpu" | "cuda" | "auto" -> (rank, world size, torch.device, whether this call created the process
    group). Under torchrun (WORLD_SIZE > 1) a process group is joined: nccl on CUDA, gloo on CPU."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu"), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"), created


def autocast_for(device: torch.device, bf16_autocast: bool):
    """A context-manager factory for the forwards: bfloat16 autocast on CUDA when train.bf16_autocast, else none."""
    if device.type == "cuda" and bf16_autocast:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# --------------------------------------------------------------------------------------------- the model
def check_lengths(cfg: Config, tok, where: str) -> None:
    """The length limits against the templates, with the tokenizer that will read them: data.max_query_len must
    hold the query instruction frame `Instruct: ...\\nQuery:` (+ EOS) and at least one query token; data.max_pair_len
    the reranker's prefix, suffix and `<Instruct>: ...\\n<Query>: \\n<Document>: ` and at least one text token."""
    d = cfg.data
    frame = len(tok.encode_ids([format_query("", d.embed_instruction)], 10**9, add_eos=d.append_eos)[0])
    check_rule(where, "data.max_query_len", d.max_query_len, d.max_query_len > frame,
           f"> {frame}, the tokens of the query template with data.embed_instruction"
           + (" and the EOS" if d.append_eos else ""))
    ids = lambda text: tok.encode_ids([text], 10**9, add_special_tokens=False)[0]  # noqa: E731
    frame = len(ids(RERANK_PREFIX)) + len(ids(RERANK_SUFFIX)) + \
        len(ids(format_rerank_pair("", "", d.rerank_instruction)))
    check_rule(where, "data.max_pair_len", d.max_pair_len, d.max_pair_len > frame,
           f"> {frame}, the tokens of the reranker template with data.rerank_instruction")


class UniMoER(nn.Module):
    """Base + experts + both task heads. Also the encoder interface of evaluate.py (encode_queries,
    encode_documents, score_pairs).

    The per-task rules are written once: tokens_queries / tokens_documents / tokens_pairs (template, length, EOS),
    causal (attention), run_base (device, task ids, causal flag) and pool_positions (pooled token). Everything
    that runs the base for a task (the heads, routing_snapshot, pilot_inputs, analysis.hidden_by_layer, the MTEB
    encoder) goes through them. The reranking score is logit("yes") - logit("no") at the last position from those
    two LM-head rows only (the log-odds of Qwen3-Reranker's p(yes)), or a linear head on the last hidden state.
    """

    def __init__(self, base: CausalLM, tok, cfg: Config):
        super().__init__()
        self.base, self.tok, self.cfg = base, tok, cfg
        self.register_buffer("yes_no", torch.tensor([tok.token_id("yes"), tok.token_id("no")]), persistent=False)
        self.head = nn.Linear(base.config.hidden_size, 1) if cfg.train.rerank_head == "linear" else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        # an extension's task (config.extend): NLI classes from the pooled state, zero at init like the head above
        self.nli_head = nn.Linear(base.config.hidden_size, len(NLI_LABELS)) if cfg.extend is not None else None
        if self.nli_head is not None:
            nn.init.zeros_(self.nli_head.weight)
            nn.init.zeros_(self.nli_head.bias)
        if cfg.train.rerank_head == "jina_v3":  # the head is Jina's projector; torch's default init (seeded)
            self.head = listwise.Projector(base.config.hidden_size, cfg.train.jina_proj_dim)
        self.list_tokens = listwise.ListTokens(tok, cfg) if cfg.train.rerank_head == "jina_v3" else None
        ids = lambda s: tok.encode_ids([s], 10**9, add_special_tokens=False)[0]  # noqa: E731
        self.prefix_ids, self.suffix_ids = ids(RERANK_PREFIX), ids(RERANK_SUFFIX)
        self.chat_user_ids = ids("<|im_start|>user\n")  # the user turn's opening: E2Rank's PRF query frame
        if cfg.data.rerank_prompt == "bare":
            self.prefix_ids, self.suffix_ids = [], [tok.eos_id]
        check_lengths(cfg, tok, f"tokenizer {tok.source}")
        self.embed_dim: Optional[int] = None  # the encoder interface's width (set_embed_dim); None = hidden size

    # ---- text -> tensors
    def _device(self):
        return self.base.model.embed_tokens.weight.device

    def tokens_queries(self, queries: Sequence[str], instruction: Optional[str] = None) -> dict:
        """Queries in the query template (data.embed_instruction unless `instruction` is given), + EOS."""
        d = self.cfg.data
        texts = [format_query(q, d.embed_instruction if instruction is None else instruction) for q in queries]
        return self.tok(texts, d.max_query_len, d.padding_side, add_eos=d.append_eos)

    def tokens_documents(self, docs: Sequence[str]) -> dict:
        d = self.cfg.data
        return self.tok(list(docs), d.max_doc_len, d.padding_side, add_eos=d.append_eos)

    def tokens_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> dict:
        d = self.cfg.data
        room = d.max_pair_len - len(self.prefix_ids) - len(self.suffix_ids)
        if room < 1:
            raise ConfigError(f"data.max_pair_len {d.max_pair_len} leaves no room after the reranker template")
        middle = self.tok.encode_ids([format_rerank_pair(q, doc, d.rerank_instruction)
                                      for q, doc in zip(queries, docs)], room, add_special_tokens=False)
        return self.tok.pad([self.prefix_ids + m + self.suffix_ids for m in middle], d.padding_side)

    def tokens_nli(self, premises: Sequence[str], hypotheses: Sequence[str]) -> dict:
        """The added task's pairs (config.format_nli_pair) + EOS, at most extend.max_len tokens: the hypothesis
        part keeps up to half of them, the premise is cut to the rest, so the hypothesis (last) is never lost."""
        n, eos = self.cfg.extend.max_len, [self.tok.eos_id]
        ids = lambda texts, k: self.tok.encode_ids(list(texts), k, add_special_tokens=False)  # noqa: E731
        pre, hyp = format_nli_pair("", "").split("\n", 1)
        tails = ids(["\n" + hyp + h for h in hypotheses], n // 2)
        heads = [ids([pre + p], n - len(t) - 1)[0] for p, t in zip(premises, tails)]
        return self.tok.pad([h + t + eos for h, t in zip(heads, tails)], self.cfg.data.padding_side)

    def tokens_prf(self, queries: Sequence[str], doc_lists: Sequence[Sequence[str]]) -> dict:
        """E2Rank's PRF queries (train.rerank_head e2rank): config.format_prf_query(query, docs,
        data.prf_instruction), each document cut to its first data.max_doc_len tokens and the query to
        data.max_query_len (so the query, which comes last, is never cut off), in the reranker's frame:
        rerank_prompt "qwen3" = the chat turn `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
        <think>\n\n</think>\n\n` (Qwen3's template with enable_thinking=False, as E2Rank's src/eval.py, no EOS),
        "bare" = the prompt + EOS (none with data.append_eos false, like the other embeddings). Pooled at the last
        token."""
        d = self.cfg.data
        cut = lambda texts, n: [self.tok.decode(x) for x in  # noqa: E731
                                self.tok.encode_ids(list(texts), n, add_special_tokens=False)]
        prompts = [format_prf_query(cut([q], d.max_query_len)[0], cut(docs, d.max_doc_len), d.prf_instruction)
                   for q, docs in zip(queries, doc_lists)]
        middle = self.tok.encode_ids(prompts, 10**9, add_special_tokens=False)
        if d.rerank_prompt == "qwen3":
            head, tail = self.chat_user_ids, self.suffix_ids
        else:  # bare: an embedding like the queries and documents, so EOS as data.append_eos says
            head, tail = [], [self.tok.eos_id] if d.append_eos else []
        return self.tok.pad([head + m + tail for m in middle], d.padding_side)

    # ---- the base, as each task runs it
    def causal(self, task: str) -> bool:
        """Embedding attends causally unless model.bidirectional; the reranker always reads causally, like an LM
        answering yes/no."""
        return task == "rerank" or not self.cfg.model.bidirectional

    def run_base(self, task: str, batch: dict, **kwargs) -> tuple:
        """The base on a token batch of `task` (its task id for the routers, its causal flag) -> (ModelOutput,
        attention mask on the model's device). kwargs go to CausalLM.forward (capture_routing, ...)."""
        ids, mask = batch["input_ids"].to(self._device()), batch["attention_mask"].to(self._device())
        task_id = len(TASKS) if task == EXTEND_TASK else TASKS.index(task)  # the added task: the next id
        task_ids = torch.full((ids.shape[0],), task_id, device=ids.device)
        return self.base(ids, mask, causal=self.causal(task), task_ids=task_ids, **kwargs), mask

    def pool_positions(self, task: str, mask: torch.Tensor) -> torch.Tensor:
        """(B,) the position each sequence is read at: the last real token (found from the mask), or for
        embedding with train.pooling "first" the first real token (either padding side)."""
        if task == "embed" and self.cfg.train.pooling == "first":
            return mask.long().argmax(dim=1)
        return last_token_positions(mask)

    # ---- heads
    def embed(self, batch: dict) -> tuple:
        """-> (B, H) fp32 L2-normalised embeddings, aux-loss stats {name: [aux_stats.AuxStat per layer]}."""
        out, mask = self.run_base("embed", batch)
        pos = self.pool_positions("embed", mask)
        pooled = out.hidden[torch.arange(mask.shape[0], device=mask.device), pos]  # (B, H)
        return F.normalize(pooled.float(), dim=-1), out.aux_stats

    def rerank_scores(self, batch: dict) -> tuple:
        """-> (B,) fp32 relevance logits, aux-loss stats {name: [aux_stats.AuxStat per layer]}."""
        out, mask = self.run_base("rerank", batch)
        last = self.pool_positions("rerank", mask)
        if self.head is None:
            yes_no = self.base.lm_logits(out.hidden, positions=last, token_ids=self.yes_no).float()  # (B, 2)
            return yes_no[:, 0] - yes_no[:, 1], out.aux_stats
        h = out.hidden[torch.arange(mask.shape[0], device=mask.device), last].float()  # (B, H)
        return self.head(h).squeeze(-1), out.aux_stats

    def nli_logits(self, batch: dict) -> tuple:
        """The added task: (B, 3) fp32 class logits (config.NLI_LABELS order) of nli_head on the final-norm hidden
        state at the last real token (the embedding path's pooled position, before its L2 norm), aux stats."""
        out, mask = self.run_base(EXTEND_TASK, batch)
        pos = self.pool_positions(EXTEND_TASK, mask)
        h = out.hidden[torch.arange(mask.shape[0], device=mask.device), pos].float()  # (B, H)
        return self.nli_head(h), out.aux_stats

    def embed_prf(self, batch: dict) -> tuple:
        """E2Rank's PRF queries (tokens_prf) -> (B, H) fp32 L2-normalised embeddings, aux stats. Run under the
        rerank task's routing (task id, experts), read causally and pooled at the last token like an embedding:
        in a single-LoRA mode (joint_single) this is exactly E2Rank's one model; hard_switch / joint_moe give the
        PRF query the reranking experts and the documents the embedding ones."""
        out, mask = self.run_base("rerank", batch)
        pos = self.pool_positions("rerank", mask)
        pooled = out.hidden[torch.arange(mask.shape[0], device=mask.device), pos]  # (B, H)
        return F.normalize(pooled.float(), dim=-1), out.aux_stats

    def e2rank_scores(self, prf: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """E2Rank's score s(q^, d_ij) = cos(e_q^_i, e_d_ij) / train.e2rank_temperature: prf (b, H), d (b * g, H)
        (both normalised; query i's documents are rows i*g ... i*g + g - 1) -> (b * g,), each group's own."""
        g = d.shape[0] // prf.shape[0]
        cos = (d.view(prf.shape[0], g, -1) * prf[:, None, :]).sum(-1)  # (b, g)
        return (cos / self.cfg.train.e2rank_temperature).reshape(-1)

    def forward(self, queries=None, docs=None, pairs=None, prf=None, lists=None, nli=None, nli_labels=None) -> dict:
        """One call per step (or GradCache chunk), so DDP sees one forward per backward. Each argument is a token
        batch or None. -> "q" (b, H), "d" (b * g, H) (embedding), "scores" (b * g,) (reranking), and "aux_calls":
        the routers' aux statistics [{name: [aux_stats.AuxStat per layer]}] of each base call (queries, documents,
        pairs or PRF queries), which losses.aux_losses finalises over the units train.aux_scope names.
        prf (rerank_head e2rank): the scores are e2rank_scores of the PRF queries against the chunk's own
        documents `docs` (embedded under the embed routing, also in a rerank-only step, which has no queries).
        lists (rerank_head jina_v3): listwise.ListTokens sequences; the scores are listwise.list_scores.
        nli (an extension): "nli_logits" (b, 3), with nli_labels (b,) passed through as "nli_labels" for the loss."""
        out, calls = {}, []
        if queries is not None:
            out["q"], a = self.embed(queries)
            calls.append(a)
        if docs is not None:
            out["d"], a = self.embed(docs)
            calls.append(a)
        if pairs is not None:
            out["scores"], a = self.rerank_scores(pairs)
            calls.append(a)
        if prf is not None:
            e, a = self.embed_prf(prf)
            calls.append(a)
            out["scores"] = self.e2rank_scores(e, out["d"])
        if nli is not None:
            out["nli_logits"], a = self.nli_logits(nli)
            out["nli_labels"] = nli_labels.to(out["nli_logits"].device)
            calls.append(a)
        if lists is not None:
            out["scores"], a = listwise.list_scores(self, lists)
            calls.append(a)
        out["aux_calls"] = calls
        return out

    # ---- evaluate.py's encoder interface (inference: no grad, eval mode)
    # Embeddings are the first self.embed_dim dims, renormalised (prefix_embeddings; evaluate.py --dim).
    @torch.no_grad()
    def encode_queries(self, texts: Sequence[str], batch_size: int = 64, instruction: Optional[str] = None
                       ) -> np.ndarray:
        return self._batched(lambda b: prefix_embeddings(self.embed(self.tokens_queries(b, instruction))[0],
                                                         self.embed_dim), texts, batch_size)

    @torch.no_grad()
    def encode_documents(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self._batched(lambda b: prefix_embeddings(self.embed(self.tokens_documents(b))[0], self.embed_dim),
                             texts, batch_size)

    @property
    def listwise(self) -> bool:
        """The reranker scores a query's whole list at once (rerank_head e2rank, jina_v3): retrieval.rerank calls
        score_list per query instead of score_pairs."""
        return self.cfg.train.rerank_head in ("e2rank", "jina_v3")

    @torch.no_grad()
    def encode_prf(self, queries: Sequence[str], doc_lists: Sequence[Sequence[str]], batch_size: int = 16
                   ) -> np.ndarray:
        """E2Rank's PRF query embeddings (tokens_prf, embed_prf): (n, embed_dim) float32, rows L2-normalised."""
        items = list(zip(queries, doc_lists))
        return self._batched(lambda b: prefix_embeddings(self.embed_prf(self.tokens_prf(*zip(*b)))[0],
                                                         self.embed_dim), items, batch_size)

    @torch.no_grad()
    def score_list(self, query: str, docs: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """rerank_head e2rank: (n,) cos(e_q^, e_d) of each document against the PRF query built from the query
        and the list's first train.e2rank_prf_k documents (the E2Rank score; its temperature does not change the
        order). jina_v3: listwise.score_list (the query and the documents in one sequence, in blocks)."""
        if self.list_tokens is not None:
            was_training = self.training
            self.eval()
            try:
                return listwise.score_list(self, query, docs).float().cpu().numpy()
            finally:
                self.train(was_training)
        prf = self.encode_prf([query], [list(docs[:self.cfg.train.e2rank_prf_k])])  # (1, H)
        return self.encode_documents(list(docs), batch_size) @ prf[0]

    @torch.no_grad()
    def score_pairs(self, queries: Sequence[str], docs: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if self.listwise:
            raise EvalError(f"train.rerank_head {self.cfg.train.rerank_head!r} scores a query's whole candidate "
                            "list: use score_list(query, docs), as retrieval.rerank does")
        pairs = list(zip(queries, docs))
        return self._batched(lambda b: self.rerank_scores(self.tokens_pairs(*zip(*b)))[0], pairs, batch_size)

    def _batched(self, fn, items, batch_size) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            outs = [fn(list(items[i:i + batch_size])).float().cpu() for i in range(0, len(items), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(outs).numpy() if outs else np.zeros((0,), dtype=np.float32)


def prefix_embeddings(x: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Matryoshka truncation (Kusupati et al. 2022): x (n, H) -> x[:, :dim] / ||x[:, :dim]|| (n, dim); x itself
    when dim is None or H (the rows are already unit vectors)."""
    if dim is None or dim == x.shape[-1]:
        return x
    return F.normalize(x[..., :dim], dim=-1)


def set_embed_dim(um: UniMoER, n: Optional[int]) -> None:
    """The encoder interface returns the first n dims of each embedding, renormalised (None: all of them);
    n must be in [1, hidden size]."""
    h = um.base.config.hidden_size
    if n is not None and not (isinstance(n, int) and 1 <= n <= h):
        raise EvalError(f"dim must be an integer in [1, {h}] (the embedding width of the model), got {n!r}")
    um.embed_dim = n


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
    names = [e.name for e in spec.experts]
    if spec.added is not None:  # an added expert: the last column (moe_lora.MoEHook._capture); routed if grown
        routed += [len(names)] if spec.added.routing == "grow" else []
        names.append(spec.added.name)
    was_training = um.training
    um.eval()
    out = {"experts": names}
    batches = {"embed": [um.tokens_queries(list(queries)), um.tokens_documents(list(docs))],
               "rerank": [um.tokens_pairs([q for q, _ in pairs], [d for _, d in pairs])]}
    try:
        for task, toks in batches.items():
            per_layer = {}
            for b in toks:
                res, mask = um.run_base(task, b, capture_routing=True)
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
    return out


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
    task_inputs = {"embed": [as_input(um.tokens_queries(q), um.causal("embed")),
                             as_input(um.tokens_documents(pos), um.causal("embed"))],
                   "rerank": [as_input(um.tokens_pairs(q + q, pos + other), um.causal("rerank"))]}
    out = {}
    for task, names in rc.task_experts.items():
        for name in names:
            if name in spec.routed_experts and task in task_inputs:
                out.setdefault(name, []).extend(task_inputs[task])
    return out  # every routed expert is listed by some task (MoELoRAConfig.validate)


def prf_order(seed: int, group: Sequence[str]) -> list:
    """The order of a training group's documents (query, positive, negatives) in its E2Rank PRF query: a
    permutation drawn with np.random.default_rng([seed, crc32 of the group's texts]), so the positive's place
    (first in the group) does not tell the model which document is relevant, and the order is a pure function
    of train.seed and the texts (the same after a resume, under DDP and in GradCache's re-forward)."""
    key = zlib.crc32("\x00".join(group).encode("utf-8"))
    return np.random.default_rng([seed, key]).permutation(len(group) - 1).tolist()


def batch_inputs(um: UniMoER, texts: dict, tasks: Sequence[str]) -> dict:
    """A sampler batch's texts -> UniMoER.forward's token batches: queries + docs (embed), pairs (rerank).
    Documents are grouped per query, positive first, then its data.n_neg hard negatives; pairs follow them.
    rerank_head e2rank: the rerank task gives docs (also without embed) and each query's PRF query over its
    group in prf_order, instead of pairs; jina_v3: "lists", each group in prf_order in one sequence."""
    n_neg = um.cfg.data.n_neg
    docs = [x for i, p in enumerate(texts["pos"]) for x in [p] + texts["neg"][i * n_neg:(i + 1) * n_neg]]
    inputs = {}
    if "embed" in tasks:
        inputs["queries"], inputs["docs"] = um.tokens_queries(texts["query"]), um.tokens_documents(docs)
    if "rerank" in tasks and um.list_tokens is not None:
        groups = [docs[i * (1 + n_neg):(i + 1) * (1 + n_neg)] for i in range(len(texts["query"]))]
        orders = [prf_order(um.cfg.train.seed, [q] + g) for q, g in zip(texts["query"], groups)]
        inputs["lists"] = listwise.shuffled_lists(um.list_tokens, texts["query"], groups, orders)
    elif "rerank" in tasks and um.listwise:
        groups = [docs[i * (1 + n_neg):(i + 1) * (1 + n_neg)] for i in range(len(texts["query"]))]
        orders = [prf_order(um.cfg.train.seed, [q] + g) for q, g in zip(texts["query"], groups)]
        if "docs" not in inputs:  # a rerank-only step still embeds its documents
            inputs["docs"] = um.tokens_documents(docs)
        inputs["prf"] = um.tokens_prf(texts["query"], [[g[j] for j in o] for g, o in zip(groups, orders)])
    elif "rerank" in tasks:
        inputs["pairs"] = um.tokens_pairs([q for q in texts["query"] for _ in range(1 + n_neg)], docs)
    return inputs


def load_base(cfg: Config, device: torch.device) -> CausalLM:
    """The frozen base of model.path in model.dtype, quantised as model.quant says: a full-precision directory is
    quantised here (round to nearest, deterministic: the same codes at every load); a quantised directory
    (quant.save_quantized) is loaded as stored and must match model.quant / model.quant_group."""
    m = cfg.model
    if quant.check_setting(m.path, m.quant, m.quant_group, where="the config") is not None:
        return quant.load_quantized(m.path, dtype=DTYPES[m.dtype], device=device)
    base = load_pretrained(m.path, dtype=DTYPES[m.dtype], device=device)
    return base if m.quant == "none" else quant.quantize_model(base, m.quant, m.quant_group)


def build_model(cfg: Config, device: torch.device) -> UniMoER:
    """Frozen base from model.path (+ tokenizer; quantised per model.quant) with the mode's experts and routers."""
    base = load_base(cfg, device)
    base.gradient_checkpointing = cfg.model.grad_checkpointing
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    torch.manual_seed(cfg.train.seed)  # expert init (A Kaiming) and router init
    moe_lora.attach(base, adapter_config(cfg))
    return UniMoER(base, tok, cfg).to(device)


def trainable_parameters(um: UniMoER) -> list:
    """Every tensor a run may train (an extension trains a subset of them: extend.trainable_parameters)."""
    heads = [h for h in (um.head, um.nli_head) if h is not None]
    return moe_lora.adapter_parameters(um.base) + [p for h in heads for p in h.parameters()]


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


def check_adapters_match(cfg: Config, adapters_path: str, config_path: str) -> None:
    """The expert spec stored in an adapter file must be the one cfg builds (experts and ranks, targets, layers,
    routing = train.mode); a mismatch is one ValueError naming each differing field."""
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


NLI_HEAD_FILE = "nli_head.safetensors"  # an extension's classification head, next to adapters.safetensors


def load_run(path: str, device: Union[str, torch.device] = "cpu", deploy: Sequence[str] = ()) -> UniMoER:
    """Rebuild base + experts (+ head) from a run or checkpoint directory alone, for evaluation; `deploy`:
    config.DEPLOY_KEYS overrides (the base held in bf16, or quantised to int8 / int4 at load, under the fp32 experts)."""
    ckpt = checkpoint_dir(path)
    cfg_path = os.path.join(ckpt, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: config.yaml missing from the checkpoint")
    cfg = load_run_config(cfg_path, deploy)
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
            raise FileNotFoundError(f"{head}: missing (train.rerank_head is {cfg.train.rerank_head!r})")
        um.head.load_state_dict(load_file(head))
    if um.nli_head is not None:
        head = os.path.join(ckpt, NLI_HEAD_FILE)
        if not os.path.isfile(head):
            raise FileNotFoundError(f"{head}: missing (the run is an extension: config.yaml has extend)")
        um.nli_head.load_state_dict(load_file(head))
    return um.eval()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_kind(path: str) -> str:
    """'run' (a run or checkpoint directory, for load_run) or 'base' (a plain HF model directory)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a run, checkpoint or model directory)")
    if any(os.path.exists(os.path.join(path, n)) for n in ("adapters.safetensors", "latest", "config.yaml")):
        return "run"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "base"
    raise FileNotFoundError(f"{path}: neither a run directory (no 'latest'), a checkpoint directory (no "
                            "adapters.safetensors, config.yaml) nor a model directory (no config.json)")


def set_max_doc_len(um, n: int) -> None:
    """Documents get n tokens in both stages: data.max_doc_len = n, and data.max_pair_len = the reranker
    template + instruction + max_query_len + n (so a reranked document also gets about n tokens)."""
    if n < 1:
        raise EvalError(f"max_doc_len must be >= 1, got {n}")
    d = um.cfg.data
    frame = um.tok.encode_ids([format_rerank_pair("", "", d.rerank_instruction)], 10**9,
                              add_special_tokens=False)[0]
    d.max_doc_len = n
    d.max_pair_len = len(um.prefix_ids) + len(um.suffix_ids) + len(frame) + d.max_query_len + n


def load_model(path: str, device="cpu", max_doc_len: Optional[int] = None, overrides: Sequence[str] = ()) -> tuple:
    """A run directory, a checkpoint directory or a plain HF model directory -> (UniMoER in eval mode, info).

    A run or checkpoint is rebuilt by load_run (base + its experts and routers). A model directory with
    no adapters (config.json + safetensors + tokenizer) becomes the bare base serving both heads with the
    templates, lengths and yes/no head of config.Config()'s defaults with `overrides` (`--data.append_eos=false`,
    as train.py takes them) applied: the baseline. A run keeps its own config.yaml; its overrides may only be
    config.DEPLOY_KEYS (`--model.quant=int4`: the trained experts over a quantised base). info = what provenance
    records: {"path", "kind", "checkpoint_dir", "adapters_sha256", "mode", "base_model"}.
    """
    device = torch.device(device)
    try:
        if _model_kind(path) == "run":
            ckpt = checkpoint_dir(path)
            um = load_run(path, device, overrides)  # a run takes only config.DEPLOY_KEYS
            info = {"kind": "checkpoint", "checkpoint_dir": os.path.abspath(ckpt), "mode": um.cfg.train.mode,
                    "adapters_sha256": sha256_file(os.path.join(ckpt, "adapters.safetensors"))}
        else:
            cfg = config_from_dict(apply_overrides({}, overrides), "evaluate.py overrides")
            cfg.model.path = path
            um = UniMoER(load_base(cfg, device), load_tokenizer(path), cfg)
            um = um.to(device).eval()
            info = {"kind": "base", "checkpoint_dir": None, "adapters_sha256": None, "mode": "base (no adapters)"}
    except KeyError as e:  # the tokenizer lacks a token the heads need ("yes", "no", the end token)
        raise EvalError(f"{path}: {e.args[0] if e.args else e}") from None
    if max_doc_len is not None:
        set_max_doc_len(um, max_doc_len)
    info = {"path": os.path.abspath(path), **info, "base_model": os.path.abspath(um.cfg.model.path)}
    return um, info


def model_settings(um) -> dict:
    """What the model reads texts with: instructions, formats, lengths, dtype (for provenance)."""
    d = um.cfg.data
    return {"embed_instruction": d.embed_instruction, "query_format": format_query("{query}", d.embed_instruction),
            "document_format": "{title} {text}", "rerank_instruction": d.rerank_instruction,
            "pair_format": RERANK_PREFIX + format_rerank_pair("{query}", "{document}", d.rerank_instruction)
            + RERANK_SUFFIX, "eos_token": um.tok.eos_token, "append_eos": d.append_eos,
            "max_lengths": {"query": d.max_query_len, "doc": d.max_doc_len, "pair": d.max_pair_len},
            "padding_side": d.padding_side, "pooling": um.cfg.train.pooling, "rerank_head": um.cfg.train.rerank_head,
            "bidirectional": um.cfg.model.bidirectional, "dtype": um.cfg.model.dtype,
            "quant": um.cfg.model.quant,
            "quant_group": um.cfg.model.quant_group if um.cfg.model.quant == "int4" else None,
            "embed_dim": um.embed_dim or um.base.config.hidden_size, "hidden_size": um.base.config.hidden_size}


class MTEBEncoder:
    """A checkpoint as an mteb encoder (mteb's classic `encode(sentences, *, task_name, prompt_type, **kwargs)`
    protocol; mteb itself is not a dependency):

        import mteb                     # pip install mteb (not needed by this repository)
        from unimoer import MTEBEncoder
        model = MTEBEncoder("ckpt/tiny", query_instruction="Given a scientific claim, retrieve documents that "
                            "support or refute the claim")
        mteb.MTEB(tasks=mteb.get_tasks(tasks=["SciFact"])).run(model, output_folder="mteb_results")

    prompt_type "query" (a string or mteb's PromptType) -> the query format `Instruct: {instruction}\\nQuery:{text}`
    (task_instructions[task_name] if given, else query_instruction, else the model's data.embed_instruction),
    max_query_len tokens; "document", "passage" or None -> the bare text, max_doc_len tokens. A {"title", "text"}
    dict is joined like a BEIR document. Returns (n, hidden) float32 rows, L2-normalised (cosine = dot product).
    """

    def __init__(self, model, query_instruction: Optional[str] = None, task_instructions: Optional[dict] = None,
                 device="cpu", progress: Optional[bool] = False):
        if isinstance(model, (str, os.PathLike)):
            model, _ = load_model(os.fspath(model), device)
        self.model = model
        self.query_instruction = model.cfg.data.embed_instruction if query_instruction is None else query_instruction
        self.task_instructions = dict(task_instructions or {})
        self.progress = progress

    def encode(self, sentences, *, task_name: Optional[str] = None, prompt_type=None, batch_size: int = 32,
               **kwargs) -> np.ndarray:
        kind = getattr(prompt_type, "value", prompt_type)  # mteb's PromptType enum or a plain string
        texts = [doc_text(s) if isinstance(s, dict) else str(s) for s in sentences]
        if kind == "query":
            instruction = self.task_instructions.get(task_name, self.query_instruction)
            encode = lambda b, bs: self.model.encode_queries(b, bs, instruction)  # noqa: E731
        elif kind in (None, "document", "passage"):
            encode = self.model.encode_documents
        else:
            raise EvalError(f"prompt_type must be 'query', 'document', 'passage' or None, got {prompt_type!r}")
        if not texts:
            return np.zeros((0, self.model.base.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            return encode_length_sorted(encode, texts, batch_size, f"mteb {kind or 'document'}", self.progress)
