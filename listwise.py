"""Jina-Reranker-v3's listwise cross-encoder, train.rerank_head jina_v3 ("last but not late" interaction: Wang, Li,
Xiao 2025, arXiv 2509.25085; official code huggingface.co/jinaai/jina-reranker-v3 modeling.py,
format_docs_prompts_func and JinaForRanking).

One causal sequence holds the query and a list of k documents (format_docs_prompts_func's layout):

    [system prompt + chat user turn]  I will provide you with {k} passages, each indicated by a numerical
    identifier. Rank the passages based on their relevance to query: {query}\\n
    <passage id="0">\\n{doc_0}<DOC>\\n</passage>\\n ... <passage id="k-1">\\n{doc_k-1}<DOC>\\n</passage>\\n
    <query>\\n{query}<QRY>\\n</query>  [<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n]

so the query comes first AND again after the documents (as the official code; jina.ai's model page: "placing query
at both beginning and end"; a causal reader's last query state has seen every document). Each document's state is
the final hidden state at its <DOC> marker (the token right after its text), the query's at <QRY>; both go through
one projector MLP (hidden -> hidden/2 -> train.jina_proj_dim, ReLU, no biases: JinaForRanking.projector; the
paper's 1024 -> 512 -> 256, the released code's last width 512) and the score is
s_i = cos(P(h_DOC_i), P(h_QRY)) / train.jina_temperature (τ = 0.05, the paper's InfoNCE temperature), trained by
softmax CE of the positive against the list's negatives (train.rerank_loss group, losses.group_ce_loss).

Markers: the released model adds two tokens <|embed_token|> (doc) and <|rerank_token|> (query) in Qwen3's unused
embedding rows; our tokenizers have no such tokens (the tiny one has no spare rows at all), so the markers are two
existing single tokens named by data.jina_doc_marker / data.jina_query_marker (default <|endoftext|> and
<|im_end|>, present in the tiny, Qwen3 and SmolLM2 vocabularies). Their positions are recorded while the sequence is
assembled from token ids (never searched for by id, so a marker that is also the pad or EOS token is still found
exactly), and, as the official sanitize_input does, marker strings are removed from the texts first. The chat
frame and system prompt follow data.rerank_prompt: qwen3 = the official frame, bare = the user prompt alone.

Order: in training the list (positive + data.n_neg negatives) is shuffled per group (unimoer.prf_order, seeded),
since our groups put the positive first and a fixed place would leak its label; the scores are put back in group
order for the loss. At inference the candidates keep the order given (first-stage rank), as the official rerank()
does, in blocks of train.jina_block_size documents (official 125): each block is one sequence, and the final
score is the cosine of each document against the blocks' query vectors averaged with weights max_i (1 + s_i) / 2
of the block (JinaForRanking.rerank); one block gives the plain cosine.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import RERANK_SUFFIX, Config, check_rule

JINA_SYSTEM = ("You are a search relevance expert who can determine a ranking of the passages based on how relevant "
               "they are to the query. If the query is a question, how relevant a passage is depends on how well it "
               "answers the question. If not, try to analyze the intent of the query and assess how well each "
               "passage satisfies the intent. If an instruction is provided, you should follow the instruction when "
               "determining the ranking.")
JINA_PREFIX = f"<|im_start|>system\n{JINA_SYSTEM}<|im_end|>\n<|im_start|>user\n"  # format_docs_prompts_func prefix
JINA_SUFFIX = RERANK_SUFFIX  # "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n" (no_thinking=True)


def list_head(k: int) -> str:
    """The prompt's opening before the first copy of the query (format_docs_prompts_func)."""
    return (f"I will provide you with {k} passages, each indicated by a numerical identifier. "
            "Rank the passages based on their relevance to query: ")


class Projector(nn.Sequential):
    """JinaForRanking.projector: Linear(H, H/2, no bias) -> ReLU -> Linear(H/2, train.jina_proj_dim, no bias)."""

    def __init__(self, hidden: int, out: int):
        super().__init__(nn.Linear(hidden, hidden // 2, bias=False), nn.ReLU(), nn.Linear(hidden // 2, out, bias=False))


class ListTokens:
    """Assembles the listwise sequences from token ids and records the marker positions."""

    def __init__(self, tok, cfg: Config):
        d = cfg.data
        self.tok, self.cfg = tok, cfg
        for key, name in (("data.jina_doc_marker", d.jina_doc_marker), ("data.jina_query_marker", d.jina_query_marker)):
            ids = tok.encode_ids([name], 10**9, add_special_tokens=False)[0]
            check_rule(f"tokenizer {tok.source}", key, name, len(ids) == 1,
                       "one token of the vocabulary (the marker whose final state is read)")
        self.doc_id = tok.encode_ids([d.jina_doc_marker], 10**9, add_special_tokens=False)[0][0]
        self.query_id = tok.encode_ids([d.jina_query_marker], 10**9, add_special_tokens=False)[0][0]
        self.markers = (d.jina_doc_marker, d.jina_query_marker)
        qwen3 = d.rerank_prompt == "qwen3"
        self.prefix, self.suffix = (self.ids(JINA_PREFIX), self.ids(JINA_SUFFIX)) if qwen3 else ([], [])
        self.newline, self.passage_end = self.ids("\n"), self.ids("\n</passage>\n")
        self.query_open, self.query_close = self.ids("<query>\n"), self.ids("\n</query>")

    def ids(self, text: str) -> list:
        return self.tok.encode_ids([text], 10**9, add_special_tokens=False)[0]

    def clean(self, texts: Sequence[str]) -> list:
        """Marker strings removed (official sanitize_input), so only the inserted markers are markers."""
        out = []
        for t in texts:
            for m in self.markers:
                t = t.replace(m, "")
            out.append(t)
        return out

    def sequence(self, query: str, docs: Sequence[str]) -> tuple:
        """-> (ids, doc marker positions, query marker position) of one list; each document cut to data.max_doc_len
        tokens and the query to data.max_query_len (the official _truncate_texts, in tokens)."""
        d = self.cfg.data
        q = self.tok.encode_ids(self.clean([query]), d.max_query_len, add_special_tokens=False)[0]
        texts = self.tok.encode_ids(self.clean(docs), d.max_doc_len, add_special_tokens=False) if docs else []
        ids = self.prefix + self.ids(list_head(len(docs))) + q + self.newline
        doc_pos = []
        for i, x in enumerate(texts):
            ids = ids + self.ids(f'<passage id="{i}">\n') + x
            doc_pos.append(len(ids))
            ids = ids + [self.doc_id] + self.passage_end
        ids = ids + self.query_open + q
        query_pos = len(ids)
        return ids + [self.query_id] + self.query_close + self.suffix, doc_pos, query_pos

    def __call__(self, queries: Sequence[str], doc_lists: Sequence[Sequence[str]]) -> dict:
        """A batch of lists (any lengths, any number of documents) -> {"input_ids", "attention_mask" (B, T),
        "doc_rows", "doc_cols" (N,) the N = sum k_i doc markers in list order, "query_cols" (B,)}, padded on
        data.padding_side with the positions shifted to match."""
        seqs = [self.sequence(q, docs) for q, docs in zip(queries, doc_lists)]
        batch = self.tok.pad([s[0] for s in seqs], self.cfg.data.padding_side)
        T = batch["input_ids"].shape[1]
        shift = [T - len(s[0]) if self.cfg.data.padding_side == "left" else 0 for s in seqs]
        batch["doc_rows"] = torch.tensor([i for i, s in enumerate(seqs) for _ in s[1]], dtype=torch.long)
        batch["doc_cols"] = torch.tensor([p + shift[i] for i, s in enumerate(seqs) for p in s[1]], dtype=torch.long)
        batch["query_cols"] = torch.tensor([s[2] + shift[i] for i, s in enumerate(seqs)], dtype=torch.long)
        return batch


def projected(hidden: torch.Tensor, batch: dict, projector: nn.Module) -> tuple:
    """hidden (B, T, H) of a ListTokens batch -> (query vectors (B, P), document vectors (N, P)), fp32."""
    dev = hidden.device
    rows, cols = batch["doc_rows"].to(dev), batch["doc_cols"].to(dev)
    q = projector(hidden[torch.arange(hidden.shape[0], device=dev), batch["query_cols"].to(dev)].float())
    return q, projector(hidden[rows, cols].float())


def list_cosines(q: torch.Tensor, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N,) cos(d_n, q_{rows[n]}): each document against its own list's query (F.cosine_similarity, as official)."""
    return F.cosine_similarity(d, q[rows.to(q.device)], dim=-1)


def blocks(n: int, size: int) -> list:
    """Consecutive index blocks of at most `size` documents, in the order given."""
    return [list(range(a, min(a + size, n))) for a in range(0, n, size)]


def merge_blocks(q: torch.Tensor, d: torch.Tensor, block_of: torch.Tensor) -> torch.Tensor:
    """JinaForRanking.rerank over blocks: q (n_blocks, P) each block's query vector, d (N, P) the documents,
    block_of (N,) each document's block. Block weight w_b = max over its documents of (1 + cos) / 2; the query is
    sum_b w_b q_b / sum_b w_b and the score cos(d_n, that query). -> (N,)."""
    cos = list_cosines(q, d, block_of)
    w = torch.stack([((1 + cos[block_of == b]) / 2).max() for b in range(q.shape[0])])
    merged = (w[:, None] * q).sum(0) / w.sum()
    return F.cosine_similarity(d, merged[None, :], dim=-1)


# --------------------------------------------------------------------------------------------- with the model
def shuffled_lists(tokens: ListTokens, queries: Sequence[str], groups: Sequence[Sequence[str]],
                   orders: Sequence[Sequence[int]]) -> dict:
    """Training lists: group i (positive first) read in the order orders[i] (a permutation; unimoer.prf_order),
    plus "unshuffle" (b * g,): the flat index of each group-order document in the shuffled output, so
    scores[unshuffle] is in group order (positive first) for the loss."""
    batch = tokens(queries, [[g[j] for j in o] for g, o in zip(groups, orders)])
    flat = []
    for i, o in enumerate(orders):
        place = {m: j for j, m in enumerate(o)}
        flat += [i * len(o) + place[m] for m in range(len(o))]
    batch["unshuffle"] = torch.tensor(flat, dtype=torch.long)
    return batch


def list_scores(um, batch: dict) -> tuple:
    """The base on a ListTokens batch under the rerank task's routing -> ((N,) fp32 logits cos / jina_temperature
    in list order (in group order when the batch has "unshuffle"), aux stats)."""
    out, _ = um.run_base("rerank", batch)
    q, d = projected(out.hidden, batch, um.head)
    s = list_cosines(q, d, batch["doc_rows"]) / um.cfg.train.jina_temperature
    if "unshuffle" in batch:
        s = s[batch["unshuffle"].to(s.device)]
    return s, out.aux_stats


@torch.no_grad()
def score_list(um, query: str, docs: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """(n,) cosine scores of one query's candidates, in the order given, in blocks of train.jina_block_size
    documents (batch_size blocks per forward) merged by merge_blocks (the official rerank())."""
    parts = blocks(len(docs), um.cfg.train.jina_block_size)
    if not parts:
        return torch.zeros(0)
    qs, ds = [], []
    for a in range(0, len(parts), batch_size):
        chunk = parts[a:a + batch_size]
        batch = um.list_tokens([query] * len(chunk), [[docs[j] for j in p] for p in chunk])
        out, _ = um.run_base("rerank", batch)
        q, d = projected(out.hidden, batch, um.head)
        qs.append(q)
        ds.append(d)
    block_of = torch.tensor([b for b, p in enumerate(parts) for _ in p], dtype=torch.long)
    q, d = torch.cat(qs), torch.cat(ds)
    return merge_blocks(q, d, block_of.to(q.device))
