"""Evaluation: IR metrics, TREC run files, faiss dense search, the retrieve -> rerank pipeline, and the
evaluation of a checkpoint (CLI, Python API, torchrun sharding, costs, an MTEB encoder).

Usage
-----
    python evaluate.py ckpt/tiny                                   # the run's dev set, exactly as training scores it
    python evaluate.py ckpt/tiny --data data/synthetic --split test    # a whole BEIR split
    python evaluate.py CKPT --data beir/scifact                        # -> CKPT/eval/scifact/
    python evaluate.py CKPT --data DIR --candidates bm25.trec          # + rerank a given run (e.g. BM25)
    python evaluate.py /models/Qwen3-0.6B --data DIR                   # baseline: a plain HF model directory
    python evaluate.py /tmp/smollm2 --data DIR --data.append_eos=false # + config overrides (model dirs only)
    python evaluate.py /models/Qwen3-Embedding-0.6B --data DIR --reranker /models/Qwen3-Reranker-0.6B \\
        --out runs/qwen3_two_models                                     # baseline: two separate models
    torchrun --nproc_per_node=2 evaluate.py CKPT --data DIR             # encoding and reranking sharded
    python evaluate.py CKPT --data DIR --index hnsw --k-rerank 20 --max-queries 100 --max-doc-len 128
    python evaluate.py CKPT --data DIR --drop-self off                 # keep a document whose id is the query's

Writes <out>/metrics.json, per_query.json and run.{retrieval,two_stage,rerank}.trec (default out:
<CKPT>/eval/<dataset>, <dataset>-<split> for a split other than test) and prints one JSON summary line on
stdout; logs and progress bars go to stderr. A missing file or malformed input stops with one error naming the
file and exit code 2. Python: evaluate_checkpoint(ckpt, data_dir, split, ...) returns the same dict (+ "per_query").

Reading order: ranking rule (rank_documents) -> per-query metrics -> evaluate_run -> self-hits -> TREC run
files -> faiss index / search / dense_run -> encoder interface and pipeline (encode_corpus, retrieve, rerank,
two_stage; sharded batches) -> checkpoints (load_model, costs, evaluate_checkpoint) -> MTEBEncoder -> CLI.

Everything down to the pipeline is model-independent: numpy, faiss and tqdm only. The model enters only
through the encoder interface below; the checkpoint part imports torch and train.py inside its functions.

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
BEIR drops self-hits on every dataset, which on collections whose query and document ids are both plain
numbers that mean different things (Cranfield, MS MARCO, SciFact) silently removes a real document. The CLI,
evaluate_checkpoint and training's dev evaluation therefore take drop_self = "on" | "off" | "auto" (default),
resolved by resolve_drop_self: auto = on iff the queries are corpus documents, i.e. at least one query id is
also a doc id whose document text equals the query text, or starts or ends with it (whitespace collapsed):
Quora's questions, ArguAna's arguments (title + text ends with the query), CQADupStack's titles. Numeric ids
alone decide nothing: Quora's are numbers too. The choice and its outcome are recorded in metrics.json.

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

import contextlib
import math
import os
import sys
import tempfile
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


DROP_SELF = ("auto", "on", "off")


def resolve_drop_self(mode: str, queries: Mapping[str, str], corpus_texts: Mapping[str, str]) -> bool:
    """Whether self-hits are dropped: "on" -> True, "off" -> False, "auto" -> True iff the queries are corpus
    documents: some query id is also a doc id whose text equals the query text, or starts or ends with it (both
    whitespace-collapsed; an empty query matches nothing). See "Self-hits" in the module docstring."""
    if mode not in DROP_SELF:
        raise EvalError(f"drop_self must be one of {', '.join(DROP_SELF)}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    for qid, text in queries.items():
        if qid in corpus_texts:
            q, doc = " ".join(text.split()), " ".join(corpus_texts[qid].split())
            if q and (doc.startswith(q) or doc.endswith(q)):
                return True
    return False


# --------------------------------------------------------------------------------------------- TREC run files
def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise EvalError(f"{what} {value!r} cannot be written to a TREC run file (empty or contains whitespace)")


def write_text_atomic(path: str, text: str) -> None:
    """Write a file so a reader never sees it half-written: a temporary file in the same directory, fsync, then
    os.replace. Used for every output file of train.py, evaluate.py and analysis.py."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    write_text_atomic(path, "".join(lines))


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


def _shard() -> tuple:
    """(rank, world size) of the initialised torch.distributed process group that shard=True splits work over."""
    import torch.distributed as dist

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
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return [item for part in parts for item in part] if rank == 0 else None


def _encode_length_sorted(encode, texts: Sequence[str], batch_size: int, desc: str,
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
    return _encode_length_sorted(encoder.encode_documents, doc_texts, batch_size, "encode corpus", progress, shard)


def encode_queries(encoder, query_texts: Sequence[str], batch_size: int = 64,
                   progress: Optional[bool] = None, shard: bool = False) -> Optional[np.ndarray]:
    """(n, d) float32 query embeddings in the order of query_texts (length-sorted batches; shard as above)."""
    return _encode_length_sorted(encoder.encode_queries, query_texts, batch_size, "encode queries", progress, shard)


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


def bm25_run(queries: Mapping[str, Sequence], corpus: Mapping[str, Sequence], k: int = 100, k1: float = 0.9,
             b: float = 0.4) -> dict:
    """BM25 (Robertson et al.; Lucene's idf = ln(1 + (N - df + 0.5) / (df + 0.5)), Anserini's k1 0.9, b 0.4) over
    given token sequences, e.g. subword ids: queries {qid: tokens}, corpus {doc_id: tokens} -> run of the top k.
    score(q, d) = sum over distinct t in q of idf(t) * tf(t, d) (k1 + 1) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))."""
    from collections import Counter

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


# ============================================================================================= checkpoints
# Everything below evaluates a model. It imports torch, train and model inside the functions: train.py imports
# this module, and the metrics above stay usable without torch.
STAGES = ("retrieval", "two_stage", "rerank")  # "candidates" (the input run of --candidates) is scored, not written
METRIC_KEYS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_kind(path: str) -> str:
    """'run' (a run or checkpoint directory, for train.load_run) or 'base' (a plain HF model directory)."""
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
    import data

    if n < 1:
        raise EvalError(f"max_doc_len must be >= 1, got {n}")
    d = um.cfg.data
    frame = um.tok.encode_ids([data.format_rerank_pair("", "", d.rerank_instruction)], 10**9,
                              add_special_tokens=False)[0]
    d.max_doc_len = n
    d.max_pair_len = len(um.prefix_ids) + len(um.suffix_ids) + len(frame) + d.max_query_len + n


def load_model(path: str, device="cpu", max_doc_len: Optional[int] = None, overrides: Sequence[str] = ()) -> tuple:
    """A run directory, a checkpoint directory or a plain HF model directory -> (UniMoER in eval mode, info).

    A run or checkpoint is rebuilt by train.load_run (base + its experts and routers). A model directory with
    no adapters (config.json + safetensors + tokenizer) becomes the bare base serving both heads with the
    templates, lengths and yes/no head of train.Config()'s defaults with `overrides` (`--data.append_eos=false`,
    as train.py takes them) applied: the baseline. A run keeps its own config.yaml. info = what provenance
    records: {"path", "kind", "checkpoint_dir", "adapters_sha256", "mode", "base_model"}.
    """
    import torch

    import train
    from model import load_pretrained, load_tokenizer

    device = torch.device(device)
    try:
        if _model_kind(path) == "run":
            ckpt = train.checkpoint_dir(path)
            if overrides:
                raise EvalError(f"{path}: config overrides apply to a model directory without adapters; a run "
                                "is evaluated with its own config.yaml")
            um = train.load_run(path, device)
            info = {"kind": "checkpoint", "checkpoint_dir": os.path.abspath(ckpt), "mode": um.cfg.train.mode,
                    "adapters_sha256": _sha256(os.path.join(ckpt, "adapters.safetensors"))}
        else:
            cfg = train.config_from_dict(train.apply_overrides({}, overrides), "evaluate.py overrides")
            cfg.model.path = path
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
            um = train.UniMoER(load_pretrained(path, dtype=dtype, device=device), load_tokenizer(path), cfg)
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
    import data

    d = um.cfg.data
    return {"embed_instruction": d.embed_instruction, "query_format": data.format_query("{query}", d.embed_instruction),
            "document_format": "{title} {text}", "rerank_instruction": d.rerank_instruction,
            "pair_format": data.RERANK_PREFIX + data.format_rerank_pair("{query}", "{document}", d.rerank_instruction)
            + data.RERANK_SUFFIX, "eos_token": um.tok.eos_token, "append_eos": d.append_eos,
            "max_lengths": {"query": d.max_query_len, "doc": d.max_doc_len, "pair": d.max_pair_len},
            "padding_side": d.padding_side, "pooling": um.cfg.train.pooling, "rerank_head": um.cfg.train.rerank_head,
            "bidirectional": um.cfg.model.bidirectional, "dtype": um.cfg.model.dtype}


# --------------------------------------------------------------------------------------------- costs
def task_experts(moe_cfg, task: str) -> list:
    """The experts a single-task model for `task` would keep: the router table's experts for that task (task
    routers) or the expert named for the task / "joint" (learned routers), plus the shared expert if any."""
    names = [e.name for e in moe_cfg.experts]
    used = set(moe_cfg.router.task_experts.get(task, [])) if moe_cfg.router.kind == "task" else \
        {n for n in names if n in (task, "joint")}
    if moe_cfg.shared is not None:
        used.add(moe_cfg.shared_expert)
    return [n for n in names if n in used]


def param_costs(um) -> dict:
    """Parameter bytes (numel x element size) of the unified model against two separate single-task models.

    unified    = base + every expert + routers + linear reranking head (if any): what UniMoER serves.
    two_models = 2 x base + the embedding model's experts + the reranking model's experts (+ head): the same
                 base held twice, each copy with only its own task's adapters (task_experts) and no router.
    saving     = 1 - unified / two_models. The bare base (no adapters) gives exactly 0.5.
    """
    import moe_lora

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    moe_cfg = getattr(um.base, "moe_lora_config", None)
    adapters = moe_lora.adapter_state_dict(um.base) if moe_cfg is not None else {}
    adapter_ids = {id(t) for t in adapters.values()}
    base = sum(nbytes(p) for p in um.base.parameters() if id(p) not in adapter_ids)  # tied weights counted once
    routers = sum(nbytes(t) for k, t in adapters.items() if not k.endswith((".lora_A", ".lora_B")))
    head = sum(nbytes(p) for p in um.head.parameters()) if um.head is not None else 0
    experts = {e.name: 0 for e in (moe_cfg.experts if moe_cfg is not None else [])}
    for m in um.base.modules():
        if isinstance(m, moe_lora.MoELoRALinear):
            for name in experts:
                sl = m.expert_slice(name)  # rows of A (r, in), columns of B (out, r)
                experts[name] += nbytes(m.lora_A[sl]) + nbytes(m.lora_B[:, sl])
    per_task = {t: task_experts(moe_cfg, t) if moe_cfg is not None else [] for t in ("embed", "rerank")}
    unified = base + sum(experts.values()) + routers + head
    two = 2 * base + sum(experts[n] for names in per_task.values() for n in names) + head
    return {"base_bytes": base, "experts_bytes": experts, "routers_bytes": routers, "head_bytes": head,
            "unified_bytes": unified, "two_models_bytes": two, "two_models_experts": per_task,
            "saving": 1.0 - unified / two}


def peak_memory(device) -> dict:
    """CUDA: torch.cuda.max_memory_allocated (tensor memory on the GPU since the evaluation started). CPU: the
    process's peak resident set size (getrusage ru_maxrss): everything the process ever held, model, data,
    embeddings, faiss index and Python itself, since the process started."""
    import resource

    import torch

    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
            "peak_memory_kind": "cpu process peak RSS (getrusage ru_maxrss)"}


# --------------------------------------------------------------------------------------------- data and setup
def load_split(data_dir: str, split: str, max_queries: Optional[int] = None) -> tuple:
    """(corpus texts, queries, qrels) of a whole BEIR split: the judged queries of qrels/<split>.tsv (at least
    one relevant document) in sorted id order, the first max_queries of them if given, and the whole corpus."""
    import data

    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data directory not found")
    qrels = data.load_qrels(data_dir, split)
    queries = data.load_queries(data_dir)
    qids = sorted(judged_queries(qrels))
    missing = [q for q in qids if q not in queries]
    if missing:
        _log(f"warning: {len(missing)} judged queries of qrels/{split}.tsv have no text in queries.jsonl "
             f"(e.g. {missing[0]!r}); left out")
        qids = [q for q in qids if q in queries]
    if max_queries:
        qids = qids[:max_queries]
    corpus = {k: data.doc_text(v) for k, v in data.load_corpus(data_dir).items()}
    return corpus, {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}


def load_candidates(path: str, queries: Mapping[str, str], corpus: Mapping[str, str]) -> dict:
    """A TREC run restricted to the evaluated queries; every document must be in the corpus."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: candidate run file not found")
    run = {q: docs for q, docs in read_trec_run(path).items() if q in queries}
    if not run:
        raise EvalError(f"{path}: no query of the run is among the {len(queries)} evaluated queries")
    for qid, docs in run.items():
        for d in docs:
            if d not in corpus:
                raise EvalError(f"{path}: document {d!r} (query {qid!r}) is not in the corpus")
    return run


def _setup_distributed(device: str) -> tuple:
    """-> (rank, world size, torch.device, whether this call created the process group). Under torchrun
    (WORLD_SIZE > 1) a process group is joined: nccl on CUDA, gloo on CPU."""
    import torch
    import torch.distributed as dist

    if device not in ("cpu", "cuda", "auto"):
        raise EvalError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device 'cuda': CUDA is not available")
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


def _git_commit() -> tuple:
    """(commit, dirty) of the repository holding this file, or (None, None)."""
    import subprocess

    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None, None
        status = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _write_json(path: str, obj, indent: Optional[int] = 2) -> None:
    import json

    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------- evaluate a checkpoint
def evaluate_checkpoint(ckpt, data_dir=None, split=None, *, k_retrieve=None, k_rerank=None, candidates=None,
                        index="flat", batch_size=64, max_queries=None, max_doc_len=None, device="cpu",
                        reranker=None, out_dir=None, write=True, progress=None, overrides=(),
                        drop_self="auto") -> Optional[dict]:
    """Evaluate a run / checkpoint / plain model directory; returns the metrics.json dict plus "per_query".

    Data. data_dir None and split None: the run's own dev set exactly as training evaluates it
    (train.load_dev: data.dev_queries / data.dev_corpus cuts; k_rerank = train.rerank_topk), so the figures equal
    the last line of the run's metrics.jsonl. Otherwise the whole `split` (default "test") of data_dir (default
    the run's data.dir): every judged query, the whole corpus, k_rerank 100. k_retrieve = max(100, k_rerank)
    unless given. max_queries keeps the first N judged query ids (sorted).

    Stages. "retrieval": dense top-k_retrieve (faiss `index`; self-hits dropped as `drop_self` "auto" | "on" |
    "off" says, resolve_drop_self; also from the candidates). "two_stage": its top
    k_rerank reranked by the same model, or by `reranker` (a second run / checkpoint / model directory: the
    two-separate-models baseline). With `candidates` (a TREC run, e.g. BM25): "rerank" = its top k_rerank
    reranked, and "candidates" = the input run's own metrics. Encoding batches are batch_size texts; reranking
    batches batch_size // 2 pairs (64 / 32, as training's dev evaluation).

    overrides: `--section.key=value` config settings for a model directory without adapters (load_model).

    Under torchrun (WORLD_SIZE > 1) every rank loads the model and data; corpus and query encoding and the
    reranking are split over the ranks in contiguous runs of the very batches one process would use, rank 0
    gathers them, searches, evaluates and writes; the figures equal one process's. Other ranks return None.

    Written to out_dir (default <ckpt>/eval/<basename of data dir>[-<split> unless test]) when `write`:
    metrics.json, per_query.json and run.<stage>.trec, each atomically.
    """
    import time

    import torch
    import torch.distributed as dist

    import train

    t_start = time.time()
    if index not in ("flat", "hnsw", "ivfpq"):
        raise EvalError(f"index must be 'flat', 'hnsw' or 'ivfpq', got {index!r}")
    if drop_self not in DROP_SELF:
        raise EvalError(f"drop_self must be one of {', '.join(DROP_SELF)}, got {drop_self!r}")
    for name, value in (("k_retrieve", k_retrieve), ("k_rerank", k_rerank), ("max_queries", max_queries)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvalError(f"{name} must be a positive integer, got {value!r}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    ckpt = os.fspath(ckpt)
    rank, world, dev, created = _setup_distributed(device)
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        um, info = load_model(ckpt, dev, max_doc_len, overrides)
        rr, rr_info = (um, None) if reranker is None else load_model(os.fspath(reranker), dev, max_doc_len,
                                                                      overrides)

        # ---- data: the run's dev set as training cuts it, or a whole split
        dev_cuts = None
        if data_dir is None and split is None:
            if info["kind"] != "checkpoint":
                raise EvalError(f"{ckpt}: a model directory has no dev set; pass --data BEIR_DIR")
            cfg = um.cfg
            if not os.path.isdir(cfg.data.dir):
                raise FileNotFoundError(f"{cfg.data.dir}: the run's data.dir (config.yaml) not found from "
                                        f"{os.getcwd()}; pass --data")
            data_dir, split = cfg.data.dir, cfg.data.dev_split
            corpus, queries, qrels = train.load_dev(cfg)
            if max_queries:
                queries = {q: queries[q] for q in list(queries)[:max_queries]}
                qrels = {q: qrels[q] for q in queries}
            k_rerank = k_rerank or cfg.train.rerank_topk
            dev_cuts = {"dev_queries": cfg.data.dev_queries, "dev_corpus": cfg.data.dev_corpus}
        else:
            if data_dir is None:
                if info["kind"] != "checkpoint":
                    raise EvalError(f"{ckpt}: a model directory has no data.dir; pass --data BEIR_DIR")
                data_dir = um.cfg.data.dir
            split = split or "test"
            corpus, queries, qrels = load_split(data_dir, split, max_queries)
            k_rerank = k_rerank or 100
        if not queries:
            raise EvalError(f"{data_dir}: no judged query in the {split} split")
        k_retrieve = k_retrieve or max(100, k_rerank)
        drop = resolve_drop_self(drop_self, queries, corpus)
        cands = load_candidates(candidates, queries, corpus) if candidates is not None else None
        if cands is not None and drop:
            cands = drop_self_hits(cands)
        dataset = os.path.basename(os.path.normpath(data_dir)) + ("" if split == "test" else f"-{split}")
        _log(f"{ckpt} ({info['mode']}) on {dataset}: {len(queries)} queries, {len(corpus)} documents, "
             f"k_retrieve {k_retrieve}, k_rerank {k_rerank}, self-hits {'dropped' if drop else 'kept'} "
             f"(--drop-self {drop_self}), {world} process(es), {dev}")

        # ---- stages (timed on every rank; rank 0's times are reported)
        shard = world > 1
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and um.cfg.train.bf16_autocast \
            else contextlib.nullcontext()
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        times, runs = {}, {}

        def timed(name, fn):
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast:
                out = fn()
            sync()
            times[name] = time.perf_counter() - t0
            return out

        doc_ids, qids = list(corpus), list(queries)
        doc_emb = timed("corpus_encode_s", lambda: encode_corpus(um, doc_ids, [corpus[d] for d in doc_ids],
                                                                 batch_size, progress, shard))
        query_emb = timed("query_encode_s", lambda: encode_queries(um, [queries[q] for q in qids], batch_size,
                                                                   progress, shard))
        if rank == 0:
            faiss_index = timed("index_build_s", lambda: build_index(doc_emb, index))
            runs["retrieval"] = timed("search_s", lambda: dense_run(qids, query_emb, doc_ids, faiss_index,
                                                                    k_retrieve, drop_self=drop))
            del faiss_index, doc_emb
        if shard:
            box = [runs.get("retrieval")]
            dist.broadcast_object_list(box, src=0)
            runs["retrieval"] = box[0]
        rerank_bs = max(1, batch_size // 2)
        runs["two_stage"] = timed("two_stage_rerank_s", lambda: rerank(rr, queries, corpus, runs["retrieval"],
                                                                       k_rerank, rerank_bs, progress, shard))
        if cands is not None:
            runs["rerank"] = timed("rerank_s", lambda: rerank(rr, queries, corpus, cands, k_rerank, rerank_bs,
                                                              progress, shard))
        if rank != 0:
            return None

        # ---- metrics (rank 0)
        scored = dict(runs)
        if cands is not None:
            scored["candidates"] = cands
        results = {stage: evaluate_run(qrels, run) for stage, run in scored.items()}
        n_q = len(queries)
        pairs = lambda run: sum(min(k_rerank, len(docs)) for docs in run.values()) / n_q  # noqa: E731
        latency = {"corpus_docs": len(doc_ids), "corpus_encode_s": times["corpus_encode_s"],
                   "corpus_docs_per_s": len(doc_ids) / max(times["corpus_encode_s"], 1e-12),
                   "index_build_s": times["index_build_s"], "query_encode_s": times["query_encode_s"],
                   "search_s": times["search_s"],
                   "retrieval_s_per_query": (times["query_encode_s"] + times["search_s"]) / n_q,
                   "two_stage_rerank_pairs_per_query": pairs(runs["retrieval"]),
                   "two_stage_rerank_s_per_query": times["two_stage_rerank_s"] / n_q}
        latency["two_stage_s_per_query"] = latency["retrieval_s_per_query"] + latency["two_stage_rerank_s_per_query"]
        if cands is not None:
            latency.update(rerank_pairs_per_query=pairs(cands), rerank_s_per_query=times["rerank_s"] / n_q)
        costs = {"params": param_costs(um), **peak_memory(dev), "latency": latency, "device": str(dev),
                 "world_size": world, "batch_size": batch_size, "rerank_batch_size": rerank_bs,
                 "torch_threads": torch.get_num_threads()}
        if rr is not um:
            costs["params_reranker"] = param_costs(rr)
        costs["evaluated_param_bytes"] = costs["params"]["unified_bytes"] + (
            costs["params_reranker"]["unified_bytes"] if rr is not um else 0)
        commit, dirty = _git_commit()
        provenance = {
            "checkpoint": info["path"], "checkpoint_dir": info["checkpoint_dir"], "mode": info["mode"],
            "adapters_sha256": info["adapters_sha256"], "base_model": info["base_model"],
            "reranker": None if rr_info is None else {**rr_info, **model_settings(rr)},
            **model_settings(um), "autocast": "bfloat16" if dev.type == "cuda" and um.cfg.train.bf16_autocast else None,
            "device": str(dev), "world_size": world, "data_dir": os.path.abspath(data_dir), "split": split,
            "dev_cuts": dev_cuts, "max_queries": max_queries, "corpus_size": len(doc_ids),
            "k_retrieve": k_retrieve, "k_rerank": k_rerank, "index": index,
            "drop_self": drop_self, "self_hits_dropped": drop,
            "candidates": os.path.abspath(candidates) if candidates is not None else None,
            "candidates_sha256": _sha256(candidates) if candidates is not None else None,
            "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__, "faiss": faiss.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": None}
        if out_dir is None:
            out_dir = os.path.join(ckpt, "eval", dataset)
        metrics = {"checkpoint": info["path"], "dataset": dataset, "split": split, "num_queries": n_q,
                   "provenance": provenance,
                   **{stage: {k: r[k] for k in METRIC_KEYS} for stage, r in results.items()},
                   "costs": costs, "runs": {stage: f"run.{stage}.trec" for stage in runs} if write else {}}
        per_query = {stage: r["per_query"] for stage, r in results.items()}
        provenance["wall_s"] = time.time() - t_start
        if write:
            os.makedirs(out_dir, exist_ok=True)
            if os.path.exists(os.path.join(out_dir, "metrics.json")):  # an older one must not describe new files
                os.remove(os.path.join(out_dir, "metrics.json"))
            for stage in STAGES:
                path = os.path.join(out_dir, f"run.{stage}.trec")
                if stage in runs:
                    write_trec_run(path, runs[stage])
                elif os.path.exists(path):  # left by an earlier evaluation with other stages
                    os.remove(path)
            _write_json(os.path.join(out_dir, "per_query.json"), per_query, indent=None)
            _write_json(os.path.join(out_dir, "metrics.json"), metrics)  # last: its presence means complete
            _log(f"wrote {out_dir}")
        return {**metrics, "per_query": per_query}
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- MTEB
class MTEBEncoder:
    """A checkpoint as an mteb encoder (mteb's classic `encode(sentences, *, task_name, prompt_type, **kwargs)`
    protocol; mteb itself is not a dependency):

        import mteb                     # pip install mteb (not needed by this repository)
        from evaluate import MTEBEncoder
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

    def _encode_queries(self, texts: list, instruction: str, batch_size: int) -> np.ndarray:
        import data

        um, d = self.model, self.model.cfg.data
        tokens = lambda b: um.tok([data.format_query(q, instruction) for q in b], d.max_query_len,  # noqa: E731
                                  d.padding_side, add_eos=True)
        return um._batched(lambda b: um.embed(tokens(b))[0], texts, batch_size)

    def encode(self, sentences, *, task_name: Optional[str] = None, prompt_type=None, batch_size: int = 32,
               **kwargs) -> np.ndarray:
        import torch

        import data

        kind = getattr(prompt_type, "value", prompt_type)  # mteb's PromptType enum or a plain string
        texts = [data.doc_text(s) if isinstance(s, dict) else str(s) for s in sentences]
        if kind == "query":
            instruction = self.task_instructions.get(task_name, self.query_instruction)
            encode = lambda b, bs: self._encode_queries(b, instruction, bs)  # noqa: E731
        elif kind in (None, "document", "passage"):
            encode = self.model.encode_documents
        else:
            raise EvalError(f"prompt_type must be 'query', 'document', 'passage' or None, got {prompt_type!r}")
        if not texts:
            return np.zeros((0, self.model.base.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            return _encode_length_sorted(encode, texts, batch_size, f"mteb {kind or 'document'}", self.progress)


# --------------------------------------------------------------------------------------------- CLI
def summary(result: dict) -> dict:
    """The one line printed on stdout: where, what, and each stage's metrics."""
    return {"checkpoint": result["checkpoint"], "dataset": result["dataset"], "split": result["split"],
            "num_queries": result["num_queries"],
            **{s: result[s] for s in ("retrieval", "two_stage", "candidates", "rerank") if s in result}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; an input error raises (cli() turns it into one line and exit code 2)."""
    import argparse
    import json

    from model import ArgumentParser, UsageError

    p = ArgumentParser(prog="evaluate.py", description="Evaluate a UniMoER run, checkpoint or plain "
                       "model directory: dense retrieval, retrieve -> rerank, rerank of a candidate run.",
                       epilog=__doc__.split("Usage\n-----\n", 1)[1].split("\n\n", 1)[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="run directory, checkpoint directory or plain HF model directory (baseline)")
    p.add_argument("--data", help="BEIR folder (default: the run's own dev set, cut as in training)")
    p.add_argument("--split", help="qrels split (default test with --data; the run's dev split without)")
    p.add_argument("--k-retrieve", type=int, help="documents retrieved per query (default max(100, k-rerank))")
    p.add_argument("--k-rerank", type=int, help="top documents reranked (default 100; the run's "
                   "train.rerank_topk on its dev set)")
    p.add_argument("--index", choices=("flat", "hnsw", "ivfpq"), default="flat")
    p.add_argument("--candidates", help="TREC run file to rerank (e.g. BM25): adds the 'rerank' stage")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch; reranking uses half")
    p.add_argument("--max-queries", type=int, help="evaluate the first N judged queries (sorted ids)")
    p.add_argument("--max-doc-len", type=int, help="document tokens in both stages (default: the run's "
                   "data.max_doc_len / max_pair_len)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--reranker", help="a second run / checkpoint / model directory for the second stage")
    p.add_argument("--drop-self", choices=DROP_SELF, default="auto", help="drop a retrieved document whose id "
                   "equals the query id (BEIR); auto: only where the queries are corpus documents (ArguAna, "
                   "Quora), see resolve_drop_self")
    p.add_argument("--out", help="output directory (default <ckpt>/eval/<dataset>[-<split>])")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a]
    if len(overrides) != len(rest):
        raise UsageError(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)} "
                         "(config overrides are --section.key=value)")
    result = evaluate_checkpoint(args.ckpt, args.data, args.split, k_retrieve=args.k_retrieve,
                                 k_rerank=args.k_rerank, candidates=args.candidates, index=args.index,
                                 batch_size=args.batch_size, max_queries=args.max_queries,
                                 max_doc_len=args.max_doc_len, device=args.device, reranker=args.reranker,
                                 out_dir=args.out, write=not args.no_write, overrides=overrides,
                                 drop_self=args.drop_self)
    if result is not None:
        print(json.dumps(summary(result)), flush=True)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python evaluate.py ...` through the CLIs' one error path (model.run_cli): a missing file or malformed
    input is one line naming the file (and line), exit code 2; `--debug` shows its traceback."""
    from model import run_cli

    return run_cli("evaluate.py", main, argv)


if __name__ == "__main__":
    import evaluate as _module  # one module object: train.py imports `evaluate`, so its classes must be the same

    sys.exit(_module.cli(sys.argv[1:]))
