"""Dense search and the retrieve -> rerank pipeline over any encoder: faiss index / search / dense_run, the encoder
interface and pipeline (encode_corpus, retrieve, rerank, two_stage; batches sharded over torch.distributed ranks),
and subword BM25 (bm25_run). The model enters only through the encoder interface below.

Encoder interface (duck-typed; the model class implements it, nothing here depends on the model)
------------------------------------------------------------------------------------------------
    encode_queries(texts: list[str], batch_size: int) -> np.ndarray   # (n, d) float32, rows L2-normalised
    encode_documents(texts: list[str], batch_size: int) -> np.ndarray # (n, d) float32, rows L2-normalised
    score_pairs(queries: list[str], docs: list[str], batch_size: int) -> np.ndarray  # (n,) relevance scores
Optional: listwise (bool) + score_list(query, docs) -> (len(docs),) scores: a reranker that needs the whole
list (rerank calls it per query); encode_prf(queries, doc_lists, batch_size) -> (n, d): E2Rank's PRF queries
(e2rank_rerank; without it the prompt text goes through encode_documents).
The encoder applies its own query instruction / document template; the pipeline passes raw texts (a BEIR
document's title and body are joined by the data loader before they get here). Retrieval scores are inner
products, i.e. cosine similarities for normalised rows.
"""
from __future__ import annotations

import math
import os
import sys
from collections import Counter
from typing import Mapping, Optional, Sequence

import faiss
import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from config import format_prf_query
from ir import EvalError, Run, rank_documents


# --------------------------------------------------------------------------------------------- dense search
def build_index(doc_emb: np.ndarray, kind: str = "flat", **params) -> faiss.Index:
    """A faiss inner-product index over the (n, d) float32 document embeddings (row i = document i).

    kind="flat":  IndexFlatIP, exact (the default and the reference).
    kind="hnsw":  IndexHNSWFlat with METRIC_INNER_PRODUCT; params M=32, ef_construction=200, ef_search=128.
                  Approximate neighbours, exact scores; no training; memory ~ n * (4d + 8M) bytes.
    kind="ivfpq": IndexIVFPQ over an IndexFlatIP coarse quantizer with METRIC_INNER_PRODUCT; params
                  nlist=clip(4 * sqrt(n), 1, n // 39), m=d // 16 (sub-quantizers; must divide d), nbits=8,
                  nprobe=16. Trained on the given vectors (faiss samples at most 256 per centroid). Approximate
                  neighbours and approximate (PQ-decoded) scores; memory ~ n * (m * nbits / 8 + 8) bytes.
    """
    x = np.ascontiguousarray(doc_emb, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise EvalError(f"doc_emb must be a non-empty (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise EvalError("doc_emb contains NaN or inf")
    n, d = x.shape

    def take(name, default):
        return params.pop(name, default)

    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(take("M", 32)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(take("ef_construction", 200))
        index.hnsw.efSearch = int(take("ef_search", 128))
    elif kind == "ivfpq":
        nlist = int(take("nlist", max(1, min(int(4 * math.sqrt(n)), n // 39))))
        m = int(take("m", max(1, d // 16)))
        nbits = int(take("nbits", 8))
        nprobe = int(take("nprobe", 16))
        if d % m:
            raise EvalError(f"ivfpq: m={m} must divide the dimension {d}")
        if n < max(nlist, 2 ** nbits):
            raise EvalError(f"ivfpq: training needs at least max(nlist={nlist}, 2**nbits={2 ** nbits}) vectors, "
                            f"got {n}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    else:
        raise EvalError(f"index kind must be 'flat', 'hnsw' or 'ivfpq', got {kind!r}")
    if params:
        raise EvalError(f"unknown parameters for index kind {kind!r}: {sorted(params)}")
    index.add(x)
    return index


def search(index: faiss.Index, query_emb: np.ndarray, k: int, batch_size: int = 1024) -> tuple:
    """Top-k inner-product search in query batches: (scores (n, k) float32, indices (n, k) int64).

    A row has index -1 (and a meaningless score) where fewer than k neighbours were found (k > index size, or
    an approximate index that ran out of candidates).
    """
    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise EvalError(f"query_emb must be (n, {index.d}), got shape {q.shape}")
    if not np.isfinite(q).all():
        raise EvalError("query_emb contains NaN or inf")
    if k < 1:
        raise EvalError(f"k must be >= 1, got {k}")
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    indices = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], batch_size):
        stop = start + batch_size
        scores[start:stop], indices[start:stop] = index.search(q[start:stop], k)
    return scores, indices


def dense_run(query_ids: Sequence[str], query_emb: np.ndarray, doc_ids: Sequence[str], index: faiss.Index, k: int,
              drop_self: bool = True, batch_size: int = 1024) -> dict:
    """Search the index and return the run {qid: {docid: score}} with at most k documents per query.

    doc_ids[i] is the id of the index's row i. With drop_self (BEIR), k + 1 neighbours are retrieved, a hit
    whose doc id equals the query id is dropped, and the top k of the rest are kept. Which of several tied
    documents at the k boundary is returned is faiss's choice.
    """
    if len(query_ids) != len(query_emb):
        raise EvalError(f"{len(query_ids)} query ids but {len(query_emb)} query embeddings")
    if len(doc_ids) != index.ntotal:
        raise EvalError(f"{len(doc_ids)} doc ids but the index holds {index.ntotal} vectors")
    if len(set(query_ids)) != len(query_ids):
        raise EvalError("query ids are not unique")
    scores, indices = search(index, query_emb, k + 1 if drop_self else k, batch_size)
    run = {}
    for qid, row_scores, row_indices in zip(query_ids, scores, indices):
        docs = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_indices) if i >= 0}
        if drop_self:
            docs.pop(qid, None)
        run[qid] = {d: docs[d] for d in rank_documents(docs)[:k]}
    return run


# --------------------------------------------------------------------------------------------- pipeline
def _progress_disabled(progress: Optional[bool]) -> bool:
    """progress=None: show a bar only on rank 0 (env RANK, as torchrun sets it) and when stderr is a terminal."""
    if progress is not None:
        return not progress
    return os.environ.get("RANK", "0") != "0" or not sys.stderr.isatty()


def _shard() -> tuple:
    """(rank, world size) of the initialised torch.distributed process group that shard=True splits work over."""
    if not (dist.is_available() and dist.is_initialized()):
        raise EvalError("shard=True needs an initialised torch.distributed process group (run under torchrun)")
    return dist.get_rank(), dist.get_world_size()


def _map_batches(fn, order: Sequence[int], sizes: Sequence[int], batch_size: int, desc: str, unit: str,
                 progress: Optional[bool], shard: bool = False) -> Optional[list]:
    """[(batch, fn(batch))] over the consecutive batches of `order` (item indices), in batch order.

    shard=True (an initialised torch.distributed group): the batches are exactly those of one process; rank r
    takes a contiguous run of them holding about 1/world of the padded cost (sum over batches of batch length x
    longest item, from `sizes`), and rank 0 gathers every rank's results (gather_object); other ranks get None.
    Same batches -> same padding -> same float rounding, so rank 0 ends with what one process computes, bit for
    bit (same hardware and thread count).
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    batches = [list(order[s:s + batch_size]) for s in range(0, len(order), batch_size)]
    rank, world = _shard() if shard else (0, 1)
    lo, hi = 0, len(batches)
    if world > 1 and batches:
        cost = np.array([len(b) * max(sizes[i] for i in b) for b in batches], dtype=np.float64)
        before = np.cumsum(cost) - cost  # cost of the batches before each batch (before[0] = 0)
        # rank r starts at the first batch with at least r / world of the total cost before it
        bounds = [int(np.searchsorted(before, cost.sum() * r / world, side="left")) for r in range(world)]
        lo, hi = (bounds + [len(batches)])[rank:rank + 2]
    mine = []
    with tqdm(total=sum(len(b) for b in batches[lo:hi]), desc=desc, unit=unit,
              disable=_progress_disabled(progress)) as bar:
        for batch in batches[lo:hi]:
            mine.append((batch, fn(batch)))
            bar.update(len(batch))
    if world == 1:
        return mine
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return [item for part in parts for item in part] if rank == 0 else None


def encode_length_sorted(encode, texts: Sequence[str], batch_size: int, desc: str,
                          progress: Optional[bool], shard: bool = False) -> Optional[np.ndarray]:
    """Call encode(batch_texts, batch_size) on batches of similar character length (longest first, so an
    out-of-memory shows up at once and padding is small); the rows come back in the original order.
    shard=True: the batches are split over the ranks and rank 0 gets the whole matrix (others None)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)

    def encode_batch(idx):
        emb = np.asarray(encode([texts[i] for i in idx], batch_size), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(idx):
            raise EvalError(f"{desc}: encoder returned shape {emb.shape} for a batch of {len(idx)} texts")
        if not np.isfinite(emb).all():
            raise EvalError(f"{desc}: encoder returned NaN or inf")
        return emb

    batches = _map_batches(encode_batch, order, [len(t) for t in texts], batch_size, desc, "text", progress, shard)
    if batches is None:
        return None
    if not batches:
        raise EvalError(f"{desc}: nothing to encode")
    out = np.empty((len(texts), batches[0][1].shape[1]), dtype=np.float32)
    for idx, emb in batches:
        if emb.shape[1] != out.shape[1]:
            raise EvalError(f"{desc}: encoder returned {emb.shape[1]} dimensions after {out.shape[1]}")
        out[idx] = emb
    return out


def encode_corpus(encoder, doc_ids: Sequence[str], doc_texts: Sequence[str], batch_size: int = 64,
                  progress: Optional[bool] = None, shard: bool = False) -> Optional[np.ndarray]:
    """(n, d) float32 document embeddings, row i for doc_ids[i] / doc_texts[i] (length-sorted batches).
    shard=True: encoded over the torch.distributed ranks; rank 0 gets the matrix, the other ranks None."""
    if len(doc_ids) != len(doc_texts):
        raise EvalError(f"{len(doc_ids)} doc ids but {len(doc_texts)} doc texts")
    if len(set(doc_ids)) != len(doc_ids):
        raise EvalError("doc ids are not unique")
    return encode_length_sorted(encoder.encode_documents, doc_texts, batch_size, "encode corpus", progress, shard)


def encode_queries(encoder, query_texts: Sequence[str], batch_size: int = 64,
                   progress: Optional[bool] = None, shard: bool = False) -> Optional[np.ndarray]:
    """(n, d) float32 query embeddings in the order of query_texts (length-sorted batches; shard as above)."""
    return encode_length_sorted(encoder.encode_queries, query_texts, batch_size, "encode queries", progress, shard)


def retrieve(encoder, queries: Mapping[str, str], corpus_texts: Mapping[str, str], k: int = 100,
             index_kind: str = "flat", index_params: Optional[dict] = None, batch_size: int = 64,
             drop_self: bool = True, progress: Optional[bool] = None) -> dict:
    """Dense retrieval: encode corpus and queries, build a faiss index, return the top-k run.

    The whole corpus is encoded in memory (n * d * 4 bytes). drop_self: BEIR self-hit rule (see dense_run).
    """
    doc_ids = list(corpus_texts)
    doc_emb = encode_corpus(encoder, doc_ids, [corpus_texts[d] for d in doc_ids], batch_size, progress)
    index = build_index(doc_emb, index_kind, **(index_params or {}))
    query_ids = list(queries)
    query_emb = encode_queries(encoder, [queries[q] for q in query_ids], batch_size, progress)
    return dense_run(query_ids, query_emb, doc_ids, index, k, drop_self=drop_self)


def rerank(encoder, queries: Mapping[str, str], corpus_texts: Mapping[str, str], run: Run, k: int = 100,
           batch_size: int = 32, progress: Optional[bool] = None, shard: bool = False) -> Optional[dict]:
    """Rescore each query's top k candidates (ranking rule order) with encoder.score_pairs.

    The top k get the cross-encoder scores. Candidates below k keep their first-stage order and are placed
    below all reranked ones: the j-th of them (0-based) gets score min(reranked scores) - 1 - j. Their original
    scores are not kept, because first-stage and reranker scores are on different scales; only the order is.
    Pairs from all queries are scored together in batches of similar length. shard=True: the batches are split
    over the torch.distributed ranks (every rank must pass the same run); rank 0 returns the run, others None.
    """
    heads, tails = _heads_tails(queries, corpus_texts, run, k)
    if getattr(encoder, "listwise", False):  # a listwise reranker scores each query's list at once
        return _below_reranked(heads, tails, _score_lists(encoder, queries, corpus_texts, heads, progress, shard))
    pairs = [(qid, d) for qid in heads for d in heads[qid]]

    def score_batch(idx):
        out = np.asarray(encoder.score_pairs([queries[pairs[i][0]] for i in idx],
                                             [corpus_texts[pairs[i][1]] for i in idx], batch_size),
                         dtype=np.float64).reshape(-1)
        if out.shape[0] != len(idx):
            raise EvalError(f"rerank: score_pairs returned {out.shape[0]} scores for {len(idx)} pairs")
        if not np.isfinite(out).all():
            raise EvalError("rerank: score_pairs returned NaN or inf")
        return out

    # Pairs sorted by combined length (longest first) for padding; scores go back to their pair.
    sizes = [len(queries[q]) + len(corpus_texts[d]) for q, d in pairs]
    order = sorted(range(len(pairs)), key=lambda i: sizes[i], reverse=True)
    batches = _map_batches(score_batch, order, sizes, batch_size, "rerank", "pair", progress, shard)
    if batches is None:
        return None
    scores = np.empty(len(pairs), dtype=np.float64)
    for idx, out in batches:
        scores[idx] = out
    starts = np.cumsum([0] + [len(heads[q]) for q in heads])
    return _below_reranked(heads, tails, {q: scores[a:b] for q, a, b in zip(heads, starts[:-1], starts[1:])})


def _heads_tails(queries, corpus_texts, run: Run, k: int) -> tuple:
    """({qid: its top k in ranking-rule order}, {qid: the rest}); every query and head document must have a text."""
    if k < 1:
        raise EvalError(f"k must be >= 1, got {k}")
    heads, tails = {}, {}
    for qid, docs in run.items():
        if qid not in queries:
            raise EvalError(f"run query {qid!r} has no query text")
        ranking = rank_documents(docs)
        heads[qid], tails[qid] = ranking[:k], ranking[k:]
        for d in heads[qid]:
            if d not in corpus_texts:
                raise EvalError(f"run document {d!r} (query {qid!r}) is not in the corpus")
    return heads, tails


def e2rank_rerank(encoder, queries: Mapping[str, str], corpus_texts: Mapping[str, str], run: Run, k: int = 100,
                  k_prf: int = 20, batch_size: int = 64, prf_batch_size: int = 8, progress: Optional[bool] = None,
                  shard: bool = False) -> Optional[dict]:
    """E2Rank (Liu et al. 2025, arXiv 2510.22733; Alibaba-NLP/E2Rank src/eval.py EvalModel) from any embedding
    encoder: rerank each query's top k candidates (ranking-rule order) by s(q^, d) = <e_q^, e_d>, the cosine for
    normalised rows, where q^ is the pseudo-relevance-feedback query built from the query and the first k_prf of
    those same candidates and e_d the document's own embedding (encoder.encode_documents).

    e_q^ = encoder.encode_prf(queries, doc_lists, batch_size) where the encoder has it (UniMoER: its template,
    truncation and routing, tokens_prf), else encoder.encode_documents of config.format_prf_query(query, docs):
    the raw prompt with no query instruction, as E2Rank embeds it. Candidates below k are placed under the
    reranked ones as in rerank. shard=True: encoding split over the torch.distributed ranks; rank 0 returns the
    run, other ranks None.
    """
    if k_prf < 1:
        raise EvalError(f"k_prf must be >= 1, got {k_prf}")
    heads, tails = _heads_tails(queries, corpus_texts, run, k)
    qids = [q for q in heads if heads[q]]
    items = [(queries[q], [corpus_texts[d] for d in heads[q][:k_prf]]) for q in qids]
    encode_prf = getattr(encoder, "encode_prf", None) or (lambda qs, ds, bs: encoder.encode_documents(  # noqa: E731
        [format_prf_query(q, d) for q, d in zip(qs, ds)], bs))
    sizes = [len(q) + sum(map(len, ds)) for q, ds in items]
    order = sorted(range(len(items)), key=lambda i: sizes[i], reverse=True)
    prf = _map_batches(lambda idx: np.asarray(encode_prf([items[i][0] for i in idx], [items[i][1] for i in idx],
                                                          prf_batch_size), dtype=np.float32),
                       order, sizes, prf_batch_size, "e2rank prf queries", "query", progress, shard)
    doc_ids = sorted({d for q in qids for d in heads[q]})
    doc_emb = encode_length_sorted(encoder.encode_documents, [corpus_texts[d] for d in doc_ids], batch_size,
                                   "e2rank documents", progress, shard) if doc_ids else np.zeros((0, 1))
    if prf is None or doc_emb is None:
        return None
    row = {d: i for i, d in enumerate(doc_ids)}
    scores = {q: np.zeros(0) for q in heads}
    for idx, emb in prf:
        for i, e in zip(idx, emb):
            q = qids[i]
            scores[q] = doc_emb[[row[d] for d in heads[q]]].astype(np.float64) @ e.astype(np.float64)
    for q in qids:
        if not np.isfinite(scores[q]).all():
            raise EvalError(f"e2rank: non-finite score for query {q!r}")
    return _below_reranked(heads, tails, scores)


def _score_lists(encoder, queries, corpus_texts, heads: dict, progress, shard) -> Optional[dict]:
    """{qid: scores of heads[qid]} from a listwise encoder's score_list(query, docs), one query per batch
    (sharded over the ranks with shard=True; other ranks get None)."""
    qids = list(heads)

    def score_query(idx):
        q = qids[idx[0]]
        out = np.asarray(encoder.score_list(queries[q], [corpus_texts[d] for d in heads[q]]),
                         dtype=np.float64).reshape(-1)
        if out.shape[0] != len(heads[q]) or not np.isfinite(out).all():
            raise EvalError(f"rerank: score_list returned {out.shape[0]} scores (finite: "
                            f"{bool(np.isfinite(out).all())}) for the {len(heads[q])} documents of query {q!r}")
        return out

    sizes = [sum(len(corpus_texts[d]) for d in heads[q]) for q in qids]
    batches = _map_batches(score_query, range(len(qids)), sizes, 1, "rerank", "query", progress, shard)
    return None if batches is None else {qids[idx[0]]: out for idx, out in batches}


def _below_reranked(heads: dict, tails: dict, scores: Optional[dict]) -> Optional[dict]:
    """The reranked run: heads[qid] with scores[qid], then tails[qid] below them in first-stage order (the j-th
    gets min(reranked scores) - 1 - j)."""
    if scores is None:
        return None
    new_run = {}
    for qid in heads:
        docs = {d: float(s) for d, s in zip(heads[qid], scores[qid])}
        if tails[qid]:
            floor = min(docs.values()) if docs else 0.0
            below = floor - (1.0 + np.arange(len(tails[qid]), dtype=np.float64))
            if not (below[0] < floor and (len(below) == 1 or np.all(np.diff(below) < 0))):
                raise EvalError(f"rerank: reranker score {floor!r} is too large in magnitude to rank "
                                f"{len(below)} documents below it in float64")
            docs.update({d: float(s) for d, s in zip(tails[qid], below)})
        new_run[qid] = docs
    return new_run


def two_stage(encoder, queries: Mapping[str, str], corpus_texts: Mapping[str, str], k_retrieve: int = 100,
              k_rerank: int = 100, index_kind: str = "flat", index_params: Optional[dict] = None,
              batch_size: int = 64, rerank_batch_size: int = 32, drop_self: bool = True, reranker=None,
              progress: Optional[bool] = None) -> tuple:
    """Retrieve the top k_retrieve with `encoder`, rerank their top k_rerank with `reranker` (default: the same
    model, as in UniMoER). Returns (dense run, reranked run) so both stages can be evaluated."""
    first = retrieve(encoder, queries, corpus_texts, k_retrieve, index_kind, index_params, batch_size, drop_self,
                     progress)
    second = rerank(reranker if reranker is not None else encoder, queries, corpus_texts, first, k_rerank,
                    rerank_batch_size, progress)
    return first, second


def bm25_run(queries: Mapping[str, Sequence], corpus: Mapping[str, Sequence], k: int = 100, k1: float = 0.9,
             b: float = 0.4) -> dict:
    """BM25 (Robertson et al.; Lucene's idf = ln(1 + (N - df + 0.5) / (df + 0.5)), Anserini's k1 0.9, b 0.4) over
    given token sequences, e.g. subword ids: queries {qid: tokens}, corpus {doc_id: tokens} -> run of the top k.
    score(q, d) = sum over distinct t in q of idf(t) * tf(t, d) (k1 + 1) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))."""
    doc_ids = list(corpus)
    tfs = [Counter(corpus[d]) for d in doc_ids]
    lens = np.array([len(corpus[d]) for d in doc_ids], dtype=np.float64)
    norm = k1 * (1 - b + b * lens / max(lens.mean(), 1e-9))  # (N,)
    postings = {}
    for j, tf in enumerate(tfs):
        for t, c in tf.items():
            postings.setdefault(t, []).append((j, c))
    n = len(doc_ids)
    run = {}
    for qid, q in queries.items():
        scores = np.zeros(n)
        for t in set(q):
            plist = postings.get(t, [])
            if not plist:
                continue
            idf = math.log(1 + (n - len(plist) + 0.5) / (len(plist) + 0.5))
            js, cs = np.array([p[0] for p in plist]), np.array([p[1] for p in plist], dtype=np.float64)
            scores[js] += idf * cs * (k1 + 1) / (cs + norm[js])
        top = np.argsort(-scores, kind="stable")[:k]
        run[qid] = {doc_ids[j]: float(scores[j]) for j in top}
    return run
