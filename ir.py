"""IR bookkeeping, model-free: the ranking rule, per-query metrics, evaluate_run, self-hits, TREC run files (and
the atomic text writer every output file of the project goes through).

Reading order: ranking rule (rank_documents) -> per-query metrics -> evaluate_run -> self-hits -> TREC run files
-> QA answers (EM / F1, answer recall).

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
"""
from __future__ import annotations

import math
import os
import re
import string
import tempfile
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

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
    os.replace. Used for every output file of the project (runs, evaluations, analyses, data files)."""
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


# --------------------------------------------------------------------------------------------- QA answers
# SQuAD v1.1's rules (Rajpurkar et al. 2016; the official evaluate-v1.1.py: normalize_answer, exact_match_score,
# f1_score, metric_max_over_ground_truths), the metrics of NQ-open / TriviaQA open-domain QA. Scores are in [0, 1]
# here (the script prints 100 x the mean).
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)  # ASCII only, as the script: an en dash or a curly quote stays


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation characters, replace the whole words a / an / the by a space, collapse
    whitespace (in that order: "The-End" -> "theend", the hyphen goes first and leaves no article)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 iff the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """F1 over the normalised whitespace tokens as multisets: c = |pred & gold| (Counter intersection),
    P = c / |pred|, R = c / |gold|, F1 = 2PR / (P + R); 0 when c = 0 (so also when either side is empty, even
    both: v1.1's rule; v2.0 gives 1 for two empty answers)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, answers: Sequence[str]) -> dict:
    """{"em", "f1"} of one prediction: each the max over the gold answers (metric_max_over_ground_truths)."""
    if isinstance(answers, str) or not answers:
        raise EvalError(f"a QA example needs a non-empty list of gold answers, got {answers!r}")
    return {"em": max(exact_match(prediction, a) for a in answers),
            "f1": max(token_f1(prediction, a) for a in answers)}


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """Answer recall's test (DPR, Karpukhin et al. 2020, dpr/data/qa_validation.py has_answer, "string" match;
    SQuAD's normalisation here instead of DPR's SimpleTokenizer, so both sides read alike): some gold
    answer's normalised tokens occur as a contiguous run of the normalised tokens of `text`."""
    tokens = normalize_answer(text).split()
    for answer in answers:
        a = normalize_answer(answer).split()
        if a and any(tokens[i:i + len(a)] == a for i in range(len(tokens) - len(a) + 1)):
            return True
    return False
