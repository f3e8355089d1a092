"""Evaluation: IR metrics, TREC run files, faiss dense search and the retrieve -> rerank pipeline.

Reading order: ranking rule (rank_documents) -> per-query metrics -> evaluate_run -> self-hits -> TREC run
files -> faiss index / search / dense_run -> encoder interface and pipeline (encode_corpus, retrieve, rerank,
two_stage).

Everything in this module's top part is model-independent: numpy, faiss and tqdm only. The model enters only
through the encoder interface below.

Metrics (trec_eval conventions, as BEIR computes them through pytrec_eval)
---------------------------------------------------------------------------
* Ranking. A query's documents are ranked by score descending; equal scores are broken by doc id descending
  (byte-wise string order, i.e. "d9" before "d10" before "D9"). This is trec_eval's rule (comp_sim_docno in
  form_res_rels.c: sim descending, then strcmp(docno) descending) and was checked against pytrec_eval in
  tests/test_metrics.py. The rank column and the order of lines in a run file are ignored, as in trec_eval,
  so results never depend on the order in which a run was produced. Scores compare as Python floats
  (float64): 1.0 and 1.0 + 1e-12 do not tie.
* Relevance. A document is relevant when its qrels grade is > 0 (trec_eval relevance_level 1 for integer
  grades). Unjudged documents are non-relevant.
* ndcg@k    = trec_eval ndcg_cut_k: DCG = sum over ranks r <= k of gain / log2(r + 1) with the linear gain
              gain = max(grade, 0) (no 2^grade - 1); the ideal DCG sorts the query's judged grades descending
              (all judged documents, retrieved or not) and cuts at k.
* mrr@k     = trec_eval recip_rank on the run cut to its top k (under the ranking rule above): 1 / rank of
              the first relevant document within the top k, else 0.
* recall@k  = trec_eval recall_k: relevant documents in the top k / relevant judged documents.
* map@k     = trec_eval map_cut_k: sum over relevant documents at rank r <= k of precision@r, divided by the
              number of relevant judged documents (not by the number retrieved).

Which queries are averaged (evaluate_run's `missing` argument)
---------------------------------------------------------------
The judged queries are the qrels queries with at least one relevant (grade > 0) document; only they are
scored. missing="zero" (default, the MS MARCO convention: MRR@10 divides by all judged dev queries) scores a
judged query absent from the run as 0 on every metric, so the mean divides by the number of judged queries.
missing="skip" averages over the judged queries present in the run only, which is what pytrec_eval (and
therefore BEIR's EvaluateRetrieval.evaluate) does; the two agree whenever the run answers every judged
query. One more BEIR difference: pytrec_eval also scores a query whose qrels hold only non-relevant (grade
<= 0) judgments, as 0, and BEIR counts it in its mean; here such a query is not judged and is left out.

Self-hits
---------
In BEIR datasets whose queries are themselves corpus documents (ArguAna, Quora, CQADupStack, ...) a query
trivially retrieves itself. BEIR's dense search retrieves k + 1 documents, drops a hit whose doc id equals the
query id and keeps the top k; dense_run does the same (drop_self=True) and drop_self_hits(run) does the
dropping on any run. evaluate_run itself never drops anything.

Encoder interface (duck-typed; the model class implements it, nothing here depends on the model)
------------------------------------------------------------------------------------------------
    encode_queries(texts: list[str], batch_size: int) -> np.ndarray   # (n, d) float32, rows L2-normalised
    encode_documents(texts: list[str], batch_size: int) -> np.ndarray # (n, d) float32, rows L2-normalised
    score_pairs(queries: list[str], docs: list[str], batch_size: int) -> np.ndarray  # (n,) relevance scores
The encoder applies its own query instruction / document template; the pipeline passes raw texts (a BEIR
document's title and body are joined by the data loader before they get here). Retrieval scores are inner
products, i.e. cosine similarities for normalised rows.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Iterable, Mapping, Optional, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

Qrels = Mapping[str, Mapping[str, int]]  # qid -> {docid: grade}
Run = Mapping[str, Mapping[str, float]]  # qid -> {docid: score}


class EvalError(ValueError):
    """Malformed evaluation input: a run file line, a score, an id, a metric argument."""


# --------------------------------------------------------------------------------------------- ranking
def rank_documents(doc_scores: Mapping[str, float]) -> list:
    """Doc ids of one query ranked as trec_eval ranks them: score descending, then doc id descending."""
    for doc_id, score in doc_scores.items():
        if math.isnan(score):
            raise EvalError(f"score of document {doc_id!r} is NaN")
    # One sort on the key (score, doc id), reversed: score descending and, among equal scores, doc id descending.
    ranked = sorted(doc_scores.items(), key=lambda item: (float(item[1]), item[0]), reverse=True)
    return [doc_id for doc_id, _ in ranked]


def truncate_run(run: Run, k: int) -> dict:
    """Each query's top k documents under the ranking rule (what a top-k retriever would return)."""
    return {qid: {d: float(docs[d]) for d in rank_documents(docs)[:k]} for qid, docs in run.items()}


# --------------------------------------------------------------------------------------------- metrics
# Per-query functions: `qrel` is one query's {docid: grade}, `ranking` its ranked doc ids (rank_documents).
def _num_relevant(qrel: Mapping[str, int]) -> int:
    return sum(1 for grade in qrel.values() if grade > 0)


def ndcg_at_k(qrel: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """trec_eval ndcg_cut_k: linear gain max(grade, 0), discount log2(rank + 1), ideal from the judged grades."""
    dcg = 0.0
    for i, doc_id in enumerate(ranking[:k]):
        gain = qrel.get(doc_id, 0)
        if gain > 0:
            dcg += gain / math.log2(i + 2)
    ideal_gains = sorted((g for g in qrel.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal_gains))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(qrel: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top k (0 if none)."""
    for i, doc_id in enumerate(ranking[:k]):
        if qrel.get(doc_id, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(qrel: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """trec_eval recall_k: relevant documents in the top k / relevant judged documents."""
    num_rel = _num_relevant(qrel)
    if num_rel == 0:
        return 0.0
    return sum(1 for doc_id in ranking[:k] if qrel.get(doc_id, 0) > 0) / num_rel


def map_at_k(qrel: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """trec_eval map_cut_k: sum of precision@r over relevant ranks r <= k, / relevant judged documents."""
    num_rel = _num_relevant(qrel)
    if num_rel == 0:
        return 0.0
    hits, total = 0, 0.0
    for i, doc_id in enumerate(ranking[:k]):
        if qrel.get(doc_id, 0) > 0:
            hits += 1
            total += hits / (i + 1)
    return total / num_rel


METRICS = {"ndcg": ndcg_at_k, "mrr": mrr_at_k, "recall": recall_at_k, "map": map_at_k}


def _cutoffs(ks, name: str) -> tuple:
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise EvalError(f"{name}: cutoffs must be positive integers, got {k!r}")
    return ks


def judged_queries(qrels: Qrels) -> list:
    """The qrels queries with at least one relevant (grade > 0) document: the ones evaluate_run scores."""
    return [qid for qid, qrel in qrels.items() if _num_relevant(qrel) > 0]


def evaluate_run(qrels: Qrels, run: Run, k_ndcg: Iterable[int] | int = (10,), k_mrr: Iterable[int] | int = (10,),
                 k_recall: Iterable[int] | int = (100,), k_map: Iterable[int] | int = (100,),
                 missing: str = "zero") -> dict:
    """Mean metrics over the judged queries, plus the per-query values.

    Returns {"ndcg@10": mean, "mrr@10": mean, "recall@100": mean, "map@100": mean, ..., "num_queries": n,
    "per_query": {qid: {"ndcg@10": value, ...}}}, one key per requested cutoff. missing="zero" scores judged
    queries absent from the run as 0 (denominator = all judged queries, MS MARCO); missing="skip" leaves them
    out (pytrec_eval / BEIR). Run queries without relevant judgments are ignored. See the module docstring.
    """
    if missing not in ("zero", "skip"):
        raise EvalError(f"missing must be 'zero' or 'skip', got {missing!r}")
    names = []  # (metric name, function, k)
    for metric, ks in (("ndcg", k_ndcg), ("mrr", k_mrr), ("recall", k_recall), ("map", k_map)):
        names += [(f"{metric}@{k}", METRICS[metric], k) for k in _cutoffs(ks, f"k_{metric}")]

    per_query = {}
    for qid in judged_queries(qrels):
        if qid not in run:
            if missing == "zero":
                per_query[qid] = {name: 0.0 for name, _, _ in names}
            continue
        ranking = rank_documents(run[qid])
        per_query[qid] = {name: fn(qrels[qid], ranking, k) for name, fn, k in names}
    if not per_query:
        raise EvalError("no judged query to evaluate (no qrels query with a relevant document"
                        + (" appears in the run)" if missing == "skip" else ")"))

    out = {name: float(np.mean([values[name] for values in per_query.values()])) for name, _, _ in names}
    out["num_queries"] = len(per_query)
    out["per_query"] = per_query
    return out


def drop_self_hits(run: Run) -> dict:
    """The run without documents whose id equals their query's id (BEIR's self-hit rule)."""
    return {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}


# --------------------------------------------------------------------------------------------- TREC run files
def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise EvalError(f"{what} {value!r} cannot be written to a TREC run file (empty or contains whitespace)")


def write_trec_run(path: str, run: Run, tag: str = "unimoer") -> None:
    """Write `qid Q0 docid rank score tag` lines, atomically (temporary file + os.replace).

    Queries are written in sorted id order and each query's documents in the ranking rule's order, with ranks
    1..n. Scores are written as repr(float), the shortest string that reads back to the same float64, so ties
    (and therefore metrics) survive the round trip exactly; "%.9g" would not.
    """
    _check_id(tag, "tag")
    lines = []
    for qid in sorted(run):
        _check_id(qid, "query id")
        docs = run[qid]
        for rank, doc_id in enumerate(rank_documents(docs), start=1):
            _check_id(doc_id, f"doc id (query {qid!r})")
            lines.append(f"{qid} Q0 {doc_id} {rank} {float(docs[doc_id])!r} {tag}\n")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_trec_run(path: str) -> dict:
    """Read a TREC run file into {qid: {docid: score}}. Errors name file:line.

    Like trec_eval: six whitespace-separated fields per line, the Q0 and rank columns are not used (ranking
    comes from the scores, see rank_documents), blank lines are skipped. A NaN score or a document listed
    twice for the same query is an error.
    """
    run: dict = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 6:
                raise EvalError(f"{where}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}: "
                                f"{line.rstrip()!r}")
            qid, _, doc_id, _, score_text, _ = fields
            try:
                score = float(score_text)
            except ValueError:
                raise EvalError(f"{where}: score {score_text!r} is not a number") from None
            if math.isnan(score):
                raise EvalError(f"{where}: score is NaN")
            docs = run.setdefault(qid, {})
            if doc_id in docs:
                raise EvalError(f"{where}: document {doc_id!r} appears twice for query {qid!r}")
            docs[doc_id] = score
    return run


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


def _encode_length_sorted(encode, texts: Sequence[str], batch_size: int, desc: str,
                          progress: Optional[bool]) -> np.ndarray:
    """Call encode(batch_texts, batch_size) on batches of similar character length (longest first, so an
    out-of-memory shows up at once and padding is small); the rows come back in the original order."""
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    out = None
    with tqdm(total=len(texts), desc=desc, unit="text", disable=_progress_disabled(progress)) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            emb = np.asarray(encode([texts[i] for i in idx], batch_size), dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != len(idx):
                raise EvalError(f"{desc}: encoder returned shape {emb.shape} for a batch of {len(idx)} texts")
            if not np.isfinite(emb).all():
                raise EvalError(f"{desc}: encoder returned NaN or inf")
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            bar.update(len(idx))
    if out is None:
        raise EvalError(f"{desc}: nothing to encode")
    return out


def encode_corpus(encoder, doc_ids: Sequence[str], doc_texts: Sequence[str], batch_size: int = 64,
                  progress: Optional[bool] = None) -> np.ndarray:
    """(n, d) float32 document embeddings, row i for doc_ids[i] / doc_texts[i] (length-sorted batches)."""
    if len(doc_ids) != len(doc_texts):
        raise EvalError(f"{len(doc_ids)} doc ids but {len(doc_texts)} doc texts")
    if len(set(doc_ids)) != len(doc_ids):
        raise EvalError("doc ids are not unique")
    return _encode_length_sorted(encoder.encode_documents, doc_texts, batch_size, "encode corpus", progress)


def encode_queries(encoder, query_texts: Sequence[str], batch_size: int = 64,
                   progress: Optional[bool] = None) -> np.ndarray:
    """(n, d) float32 query embeddings in the order of query_texts (length-sorted batches)."""
    return _encode_length_sorted(encoder.encode_queries, query_texts, batch_size, "encode queries", progress)


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
           batch_size: int = 32, progress: Optional[bool] = None) -> dict:
    """Rescore each query's top k candidates (ranking rule order) with encoder.score_pairs.

    The top k get the cross-encoder scores. Candidates below k keep their first-stage order and are placed
    below all reranked ones: the j-th of them (0-based) gets score min(reranked scores) - 1 - j. Their original
    scores are not kept, because first-stage and reranker scores are on different scales; only the order is.
    Pairs from all queries are scored together in batches of similar length.
    """
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
    pairs = [(qid, d) for qid in heads for d in heads[qid]]
    scores = np.empty(len(pairs), dtype=np.float64)
    if pairs:
        # Sort pairs by combined length (longest first) for padding; scores go back to their pair.
        order = sorted(range(len(pairs)), key=lambda i: len(queries[pairs[i][0]]) + len(corpus_texts[pairs[i][1]]),
                       reverse=True)
        with tqdm(total=len(pairs), desc="rerank", unit="pair", disable=_progress_disabled(progress)) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                out = np.asarray(encoder.score_pairs([queries[pairs[i][0]] for i in idx],
                                                     [corpus_texts[pairs[i][1]] for i in idx], batch_size),
                                 dtype=np.float64).reshape(-1)
                if out.shape[0] != len(idx):
                    raise EvalError(f"rerank: score_pairs returned {out.shape[0]} scores for {len(idx)} pairs")
                if not np.isfinite(out).all():
                    raise EvalError("rerank: score_pairs returned NaN or inf")
                scores[idx] = out
                bar.update(len(idx))

    new_run, pos = {}, 0
    for qid in heads:
        head = heads[qid]
        docs = {d: float(s) for d, s in zip(head, scores[pos:pos + len(head)])}
        pos += len(head)
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
