"""Evaluation of a run, checkpoint or plain model directory (CLI, Python API, torchrun sharding, costs) and
training's dev evaluation.

Usage
-----
    python evaluate.py ckpt/tiny                                   # the run's dev set, exactly as training scores it
    python evaluate.py ckpt/tiny --data data/synthetic --split test    # a whole BEIR split
    python evaluate.py CKPT --data beir/scifact                        # -> CKPT/eval/scifact/
    python evaluate.py CKPT --data DIR --candidates bm25.trec          # + rerank a given run (e.g. BM25)
    python evaluate.py /models/Qwen3-0.6B --data DIR                   # baseline: a plain HF model directory
    python evaluate.py /tmp/smollm2 --data DIR --data.append_eos=false # + config overrides (model dirs only)
    python evaluate.py ckpt/tiny --model.quant=int8                    # a run over an int8 base (deployment keys only)
    python evaluate.py /models/Qwen3-Embedding-0.6B --data DIR --reranker /models/Qwen3-Reranker-0.6B \\
        --out runs/qwen3_two_models                                     # baseline: two separate models
    torchrun --nproc_per_node=2 evaluate.py CKPT --data DIR             # encoding and reranking sharded
    python evaluate.py CKPT --data DIR --index hnsw --k-rerank 20 --max-queries 100 --max-doc-len 128
    python evaluate.py CKPT --data DIR --drop-self off                 # keep a document whose id is the query's
    python evaluate.py CKPT --data DIR --no-e2rank                     # skip the E2Rank baseline stages
    python evaluate.py CKPT --dim 32                                   # Matryoshka: embeddings cut to 32 dims
    python evaluate.py CKPT --dims 8 16 32                             # + retrieval per dim in "matryoshka"

Writes <out>/metrics.json, per_query.json and run.<stage>.trec (retrieval, two_stage, rerank, e2rank_two_stage,
e2rank; default out: <CKPT>/eval/<dataset>, <dataset>-<split> for a split other than test) and prints one JSON summary line on
stdout; logs and progress bars go to stderr. A missing file or malformed input stops with one error naming the
file and exit code 2. Python: evaluate_checkpoint(ckpt, data_dir, split, ...) returns the same dict (+ "per_query").

Reading order: costs (param_costs, peak_memory) -> data (load_split, load_candidates) -> evaluate_checkpoint in
its steps (check_eval_args, choose_eval_set, run_stages, eval_costs, eval_provenance, write_eval) -> training's
dev evaluation (load_dev, dev_candidates, dev_evaluate, dev_routing_texts) -> CLI. The metrics and
run files are ir.py's, dense search and the retrieve -> rerank pipeline retrieval.py's, the model unimoer.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Mapping, NamedTuple, Optional, Sequence

import faiss
import torch
import torch.distributed as dist

import data
import extend
import moe_lora
import quant
from config import Config
from ir import (DROP_SELF, EvalError, drop_self_hits, evaluate_run, judged_queries, read_trec_run, resolve_drop_self,
                write_text_atomic, write_trec_run)
from model import ArgumentParser, UsageError, run_cli
from retrieval import (bm25_run, build_index, dense_run, e2rank_rerank, encode_corpus, encode_queries, rerank,
                       two_stage)
from unimoer import (UniMoER, autocast_for, load_model, model_settings, prefix_embeddings, set_embed_dim,
                     setup_distributed, sha256_file)

STAGES = ("retrieval", "two_stage", "rerank", "e2rank_two_stage", "e2rank")  # "candidates" (the input run of --candidates) is scored, not written
METRIC_KEYS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


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
    """Parameter bytes (numel x element size; a quantised base's integer codes, scales and zero points, which are
    buffers, included) of the unified model against two separate single-task models.

    unified    = base + every expert + routers + linear reranking head (if any): what UniMoER serves.
    two_models = 2 x base + the embedding model's experts + the reranking model's experts (+ head): the same
                 base held twice, each copy with only its own task's adapters (task_experts) and no router.
    saving     = 1 - unified / two_models. The bare base (no adapters) gives exactly 0.5.
    """
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    moe_cfg = getattr(um.base, "moe_lora_config", None)
    adapters = moe_lora.adapter_state_dict(um.base) if moe_cfg is not None else {}
    adapter_ids = {id(t) for t in adapters.values()}
    base = sum(nbytes(p) for p in um.base.parameters() if id(p) not in adapter_ids)  # tied weights counted once
    base += sum(nbytes(b) for b in quant.code_tensors(um.base))  # a quantised base's codes, scales, zeros
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


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda", "auto"):
        raise EvalError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device 'cuda': CUDA is not available")


def git_commit() -> tuple:
    """(commit, dirty) of the repository holding this file, or (None, None)."""
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
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------- evaluate a checkpoint
def evaluate_checkpoint(ckpt, data_dir=None, split=None, *, k_retrieve=None, k_rerank=None, candidates=None,
                        index="flat", batch_size=64, max_queries=None, max_doc_len=None, device="cpu",
                        reranker=None, out_dir=None, write=True, progress=None, overrides=(),
                        drop_self="auto", e2rank=True, e2rank_prf_k=None, dim=None, dims=None) -> Optional[dict]:
    """Evaluate a run / checkpoint / plain model directory; returns the metrics.json dict plus "per_query".

    Data (choose_eval_set): the run's own dev set exactly as training evaluates it when data_dir and split are
    None, so the figures equal the last line of the run's metrics.jsonl; else the whole `split` of data_dir.
    Stages (run_stages): "retrieval" (dense, faiss `index`), "two_stage" (its top k_rerank reranked by the same
    model, or by `reranker`: a second run / checkpoint / model directory, the two-separate-models baseline), and
    with `candidates` (a TREC run, e.g. BM25) "rerank" (its top k_rerank reranked) and "candidates" (its own
    metrics). Self-hits are dropped as `drop_self` "auto" | "on" | "off" says (resolve_drop_self).
    Matryoshka: `dim` cuts every query and document embedding to its first dim dims, renormalised
    (unimoer.set_embed_dim; provenance "embed_dim"); "matryoshka" holds the retrieval metrics per dim of
    `dims`, default the run's train.matryoshka_dims, plus the evaluated width (matryoshka_dims_of), from the one
    encoding pass (None without either).

    overrides: `--section.key=value` config settings for a model directory without adapters (load_model).

    e2rank (default on): the E2Rank baseline of the model's embedding path (retrieval.e2rank_rerank: PRF query
    from the top e2rank_prf_k, default the run's train.e2rank_prf_k, 20 for a model directory) as stages
    "e2rank_two_stage" (the dense run's top k_rerank) and, with candidates, "e2rank" (the candidates').

    Under torchrun (WORLD_SIZE > 1) every rank loads the model and data; corpus and query encoding and the
    reranking are split over the ranks in contiguous runs of the very batches one process would use, rank 0
    gathers them, searches, evaluates and writes; the figures equal one process's. Other ranks return None.

    Written to out_dir (default <ckpt>/eval/<basename of data dir>[-<split> unless test]) when `write`:
    metrics.json, per_query.json and run.<stage>.trec, each atomically.
    """
    t_start = time.time()
    check_eval_args(index, drop_self, batch_size, k_retrieve=k_retrieve, k_rerank=k_rerank, max_queries=max_queries,
                    e2rank_prf_k=e2rank_prf_k, dim=dim, **{f"dims[{i}]": m for i, m in enumerate(dims or [])})
    ckpt = os.fspath(ckpt)
    check_device(device)
    rank, world, dev, created = setup_distributed(device)
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        um, info = load_model(ckpt, dev, max_doc_len, overrides)
        rr, rr_info = (um, None) if reranker is None else load_model(os.fspath(reranker), dev, max_doc_len,
                                                                      overrides)
        set_embed_dim(um, dim)
        table_dims = matryoshka_dims_of(um, dims)
        es = choose_eval_set(um, info, ckpt, data_dir, split, max_queries, k_retrieve, k_rerank, drop_self,
                             candidates)
        _log(f"{ckpt} ({info['mode']}) on {es.dataset}: {len(es.queries)} queries, {len(es.corpus)} documents, "
             f"k_retrieve {es.k_retrieve}, k_rerank {es.k_rerank}, self-hits {'dropped' if es.drop else 'kept'} "
             f"(--drop-self {drop_self}), {world} process(es), {dev}")
        prf_k = None if not e2rank else e2rank_prf_k or um.cfg.train.e2rank_prf_k
        runs, times, table = run_stages(um, rr, es, index, batch_size, progress, rank, world, dev, prf_k, table_dims)
        if rank != 0:
            return None
        results = {stage: evaluate_run(es.qrels, run) for stage, run in
                   {**runs, **({"candidates": es.cands} if es.cands is not None else {})}.items()}
        costs = eval_costs(um, rr, es, runs, times, dev, world, batch_size)
        provenance = eval_provenance(info, rr, rr_info, um, es, dev, world, max_queries, index, drop_self,
                                     candidates)
        metrics = {"checkpoint": info["path"], "dataset": es.dataset, "split": es.split,
                   "num_queries": len(es.queries), "provenance": provenance,
                   **{stage: {k: r[k] for k in METRIC_KEYS} for stage, r in results.items()},
                   "matryoshka": table, "costs": costs,
                   **({"nli": added_task(um)} if um.nli_head is not None else {}),
                   "runs": {stage: f"run.{stage}.trec" for stage in runs} if write else {}}
        per_query = {stage: r["per_query"] for stage, r in results.items()}
        provenance["wall_s"] = time.time() - t_start
        if write:
            write_eval(out_dir or os.path.join(ckpt, "eval", es.dataset), runs, metrics, per_query)
        return {**metrics, "per_query": per_query}
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def added_task(um) -> dict:
    """An extension's task on its own dev file (extend.data_dir/dev.jsonl, all of it): {"accuracy", "majority"
    (always the training set's most frequent label), "num_examples"}."""
    m = extend.dev_nli(um, extend.load_nli_dev(um.cfg, cut=False))
    return {"accuracy": m["nli_accuracy"], "majority": m["nli_majority"], "num_examples": m["nli_dev_examples"]}


def check_eval_args(index: str, drop_self: str, batch_size: int, **positive) -> None:
    """evaluate_checkpoint's arguments, before anything is loaded: one EvalError naming the first bad one."""
    if index not in ("flat", "hnsw", "ivfpq"):
        raise EvalError(f"index must be 'flat', 'hnsw' or 'ivfpq', got {index!r}")
    if drop_self not in DROP_SELF:
        raise EvalError(f"drop_self must be one of {', '.join(DROP_SELF)}, got {drop_self!r}")
    for name, value in positive.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvalError(f"{name} must be a positive integer, got {value!r}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")


class EvalSet(NamedTuple):
    """What one evaluation scores: texts and judgments, where they come from, the depths and the candidates."""
    corpus: dict
    queries: dict
    qrels: dict
    data_dir: str
    split: str
    dataset: str  # the output name: basename of data_dir, + -<split> unless test
    dev_cuts: Optional[dict]  # the run's data.dev_queries / dev_corpus when it is the run's own dev set
    k_retrieve: int
    k_rerank: int
    drop: bool  # self-hits dropped (resolve_drop_self)
    cands: Optional[dict]  # the --candidates run, restricted to the queries (self-hits dropped with drop)


def choose_eval_set(um, info: dict, ckpt: str, data_dir, split, max_queries, k_retrieve, k_rerank, drop_self,
                    candidates) -> EvalSet:
    """data_dir None and split None: the run's own dev set exactly as training evaluates it (load_dev: the
    data.dev_queries / data.dev_corpus cuts; k_rerank = train.rerank_topk). Otherwise the whole `split` (default
    "test") of data_dir (default the run's data.dir): every judged query, the whole corpus, k_rerank 100.
    k_retrieve = max(100, k_rerank) unless given; max_queries keeps the first N judged query ids (sorted); the
    candidates lose their self-hits with the retrieval's."""
    dev_cuts = None
    if data_dir is None and split is None:
        if info["kind"] != "checkpoint":
            raise EvalError(f"{ckpt}: a model directory has no dev set; pass --data BEIR_DIR")
        cfg = um.cfg
        if not os.path.isdir(cfg.data.dir):
            raise FileNotFoundError(f"{cfg.data.dir}: the run's data.dir (config.yaml) not found from "
                                    f"{os.getcwd()}; pass --data")
        data_dir, split = cfg.data.dir, cfg.data.dev_split
        corpus, queries, qrels = load_dev(cfg)
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
    drop = resolve_drop_self(drop_self, queries, corpus)
    cands = load_candidates(candidates, queries, corpus) if candidates is not None else None
    if cands is not None and drop:
        cands = drop_self_hits(cands)
    dataset = os.path.basename(os.path.normpath(data_dir)) + ("" if split == "test" else f"-{split}")
    return EvalSet(corpus, queries, qrels, data_dir, split, dataset, dev_cuts, k_retrieve or max(100, k_rerank),
                   k_rerank, drop, cands)


def stage_timer(um, dev) -> tuple:
    """(timed, times): timed(name, fn) runs fn under inference_mode and the model's autocast, CUDA synchronised on
    both sides, records its seconds in times[name] and returns fn's result (evaluate.py's and rag.py's stages)."""
    autocast = autocast_for(dev, um.cfg.train.bf16_autocast)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times = {}

    def timed(name, fn):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast():
            out = fn()
        sync()
        times[name] = time.perf_counter() - t0
        return out

    return timed, times


def run_stages(um, rr, es: EvalSet, index: str, batch_size: int, progress, rank: int, world: int, dev,
               e2rank_prf_k: Optional[int] = None, dims: Sequence[int] = ()) -> tuple:
    """Encode, search, rerank (sharded over the ranks when world > 1; rank 0 searches and broadcasts the dense
    run) -> (runs {stage: run}, times {name: seconds}, the Matryoshka table of `dims` (matryoshka_table; None
    without dims, and on ranks > 0)), each stage timed on every rank. Encoding batches are batch_size texts,
    reranking batches batch_size // 2 pairs (64 / 32, as training's dev evaluation).
    e2rank_prf_k (None: off): also the E2Rank baseline of `um`'s embedding path (retrieval.e2rank_rerank, PRF
    from the top e2rank_prf_k) on the dense run ("e2rank_two_stage") and on the candidates ("e2rank")."""
    shard = world > 1
    timed, times = stage_timer(um, dev)
    runs, table = {}, None

    corpus, queries = es.corpus, es.queries
    doc_ids, qids = list(corpus), list(queries)
    doc_emb = timed("corpus_encode_s", lambda: encode_corpus(um, doc_ids, [corpus[d] for d in doc_ids],
                                                             batch_size, progress, shard))
    query_emb = timed("query_encode_s", lambda: encode_queries(um, [queries[q] for q in qids], batch_size,
                                                               progress, shard))
    if rank == 0:
        faiss_index = timed("index_build_s", lambda: build_index(doc_emb, index))
        runs["retrieval"] = timed("search_s", lambda: dense_run(qids, query_emb, doc_ids, faiss_index,
                                                                es.k_retrieve, drop_self=es.drop))
        if dims:
            table = timed("matryoshka_s", lambda: matryoshka_table(qids, query_emb, doc_ids, doc_emb, es.qrels, dims,
                                                                   es.k_retrieve, es.drop, index))
        del faiss_index, doc_emb
    if shard:
        box = [runs.get("retrieval")]
        dist.broadcast_object_list(box, src=0)
        runs["retrieval"] = box[0]
    rerank_bs = max(1, batch_size // 2)
    runs["two_stage"] = timed("two_stage_rerank_s", lambda: rerank(rr, queries, corpus, runs["retrieval"],
                                                                   es.k_rerank, rerank_bs, progress, shard))
    if es.cands is not None:
        runs["rerank"] = timed("rerank_s", lambda: rerank(rr, queries, corpus, es.cands, es.k_rerank, rerank_bs,
                                                          progress, shard))
    if e2rank_prf_k is not None:
        e2 = lambda run: e2rank_rerank(um, queries, corpus, run, es.k_rerank, e2rank_prf_k, batch_size,  # noqa: E731
                                       progress=progress, shard=shard)
        runs["e2rank_two_stage"] = timed("e2rank_two_stage_s", lambda: e2(runs["retrieval"]))
        if es.cands is not None:
            runs["e2rank"] = timed("e2rank_s", lambda: e2(es.cands))
    return runs, times, table


def matryoshka_dims_of(um, dims: Optional[Sequence[int]]) -> list:
    """The dims of the Matryoshka table: `dims` if given (each <= the evaluated width W: --dim, else the hidden
    size), else the run's train.matryoshka_dims that are <= W; plus W itself. [] when neither names any."""
    w = um.embed_dim or um.base.config.hidden_size
    if dims:
        bad = [m for m in dims if m > w]
        if bad:
            raise EvalError(f"dims {bad}: each must be <= {w}, the evaluated embedding width (--dim or the hidden "
                            "size)")
        return sorted(set(dims) | {w})
    own = um.cfg.train.matryoshka_dims
    return sorted({m for m in own if m <= w} | {w}) if own else []


def matryoshka_table(qids: Sequence[str], query_emb, doc_ids: Sequence[str], doc_emb, qrels: dict,
                     dims: Sequence[int], k: int, drop: bool, index: str = "flat") -> dict:
    """Dense retrieval at each Matryoshka dim from one encoding: per m, the first m dims of the query and document
    embeddings (n, W), renormalised (unimoer.prefix_embeddings), searched as the retrieval stage is (index kind,
    depth k, self-hits) -> {"m": {metric: value}}; the entry at the full width W is the retrieval stage itself."""
    cut = lambda x, m: prefix_embeddings(torch.from_numpy(x), m).numpy()  # noqa: E731
    table = {}
    for m in dims:
        run = dense_run(qids, cut(query_emb, m), doc_ids, build_index(cut(doc_emb, m), index), k, drop_self=drop)
        r = evaluate_run(qrels, run)
        table[str(m)] = {key: r[key] for key in METRIC_KEYS}
    return table


def eval_costs(um, rr, es: EvalSet, runs: dict, times: dict, dev, world: int, batch_size: int) -> dict:
    """metrics.json's "costs": parameter bytes (param_costs, per model), peak memory and per-query latencies."""
    n_q, k_rerank = len(es.queries), es.k_rerank
    pairs = lambda run: sum(min(k_rerank, len(docs)) for docs in run.values()) / n_q  # noqa: E731
    latency = {"corpus_docs": len(es.corpus), "corpus_encode_s": times["corpus_encode_s"],
               "corpus_docs_per_s": len(es.corpus) / max(times["corpus_encode_s"], 1e-12),
               "index_build_s": times["index_build_s"], "query_encode_s": times["query_encode_s"],
               "search_s": times["search_s"],
               "retrieval_s_per_query": (times["query_encode_s"] + times["search_s"]) / n_q,
               "two_stage_rerank_pairs_per_query": pairs(runs["retrieval"]),
               "two_stage_rerank_s_per_query": times["two_stage_rerank_s"] / n_q}
    latency["two_stage_s_per_query"] = latency["retrieval_s_per_query"] + latency["two_stage_rerank_s_per_query"]
    if "matryoshka_s" in times:  # every per-dim index build and search of the Matryoshka table
        latency["matryoshka_table_s"] = times["matryoshka_s"]
    if es.cands is not None:
        latency.update(rerank_pairs_per_query=pairs(es.cands), rerank_s_per_query=times["rerank_s"] / n_q)
    for stage in ("e2rank_two_stage", "e2rank"):  # E2Rank reranking time per query (PRF query + documents)
        if f"{stage}_s" in times:
            latency[f"{stage}_rerank_s_per_query"] = times[f"{stage}_s"] / n_q
    costs = {"params": param_costs(um), **peak_memory(dev), "latency": latency, "device": str(dev),
             "world_size": world, "batch_size": batch_size, "rerank_batch_size": max(1, batch_size // 2),
             "torch_threads": torch.get_num_threads()}
    if rr is not um:
        costs["params_reranker"] = param_costs(rr)
    costs["evaluated_param_bytes"] = costs["params"]["unified_bytes"] + (
        costs["params_reranker"]["unified_bytes"] if rr is not um else 0)
    return costs


def eval_provenance(info: dict, rr, rr_info, um, es: EvalSet, dev, world: int, max_queries, index: str,
                    drop_self: str, candidates) -> dict:
    """metrics.json's "provenance": which model, read how, on which data, with which code (wall_s set last)."""
    commit, dirty = git_commit()
    return {
        "checkpoint": info["path"], "checkpoint_dir": info["checkpoint_dir"], "mode": info["mode"],
        "adapters_sha256": info["adapters_sha256"], "base_model": info["base_model"],
        "reranker": None if rr_info is None else {**rr_info, **model_settings(rr)},
        **model_settings(um), "autocast": "bfloat16" if dev.type == "cuda" and um.cfg.train.bf16_autocast else None,
        "device": str(dev), "world_size": world, "data_dir": os.path.abspath(es.data_dir), "split": es.split,
        "dev_cuts": es.dev_cuts, "max_queries": max_queries, "corpus_size": len(es.corpus),
        "k_retrieve": es.k_retrieve, "k_rerank": es.k_rerank, "index": index,
        "drop_self": drop_self, "self_hits_dropped": es.drop,
        "candidates": os.path.abspath(candidates) if candidates is not None else None,
        "candidates_sha256": sha256_file(candidates) if candidates is not None else None,
        "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__, "faiss": faiss.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": None}


def write_eval(out_dir: str, runs: dict, metrics: dict, per_query: dict) -> None:
    """run.<stage>.trec, per_query.json, then metrics.json (last: its presence means complete), each atomically;
    an older metrics.json and run files of stages not run this time are removed first."""
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
    _write_json(os.path.join(out_dir, "metrics.json"), metrics)
    _log(f"wrote {out_dir}")


# ----------------------------------------------------------------------------------------- training's dev evaluation
def load_dev(cfg: Config) -> tuple:
    """(corpus texts, queries, qrels) of the dev split (load_split), cut as data.dev_queries / data.dev_corpus say:
    the first N judged queries, and the judged dev documents + the first N others."""
    d = cfg.data
    corpus, queries, qrels = load_split(d.dir, d.dev_split, d.dev_queries)
    if d.dev_corpus:
        judged = {doc for q in queries for doc in qrels[q]}
        keep = judged | set([k for k in corpus if k not in judged][:d.dev_corpus])  # one set, not one per doc
        corpus = {k: corpus[k] for k in corpus if k in keep}
    return corpus, queries, qrels


DEV_CANDIDATES = "dev_candidates.trec"  # in <out_dir>: the fixed list every dev evaluation of the run reranks


def dev_candidates(um: UniMoER, dev: tuple, cfg: Config) -> dict:
    """The run's fixed dev candidates: subword BM25 (retrieval.bm25_run over the model tokenizer's token ids of
    the query and document texts), top train.rerank_topk per dev query; also written to <out_dir>/dev_candidates.trec.

    Model-free on purpose: a pure function of the dev texts and the tokenizer, so every dev evaluation of a run
    (and every mode and seed on the same data) reranks the same list. On the synthetic task whole-word BM25 is ~0
    by design (the target shares no word with its query) while subword BM25 matches the shared stems, so the list
    holds the target for almost every query (its recall is reported next to it)."""
    corpus, queries, _ = dev
    toks = lambda texts: um.tok.encode_ids(list(texts), 10**9, add_special_tokens=False)  # noqa: E731
    doc_ids, qids = list(corpus), list(queries)
    run = bm25_run(dict(zip(qids, toks(queries[q] for q in qids))),
                   dict(zip(doc_ids, toks(corpus[d] for d in doc_ids))), k=cfg.train.rerank_topk)
    write_trec_run(os.path.join(cfg.train.out_dir, DEV_CANDIDATES), run, tag="subword-bm25")
    return run


def dev_evaluate(um: UniMoER, dev: tuple, cfg: Config) -> dict:
    """Each task by itself, and the two together (nDCG@10 on the dev split):
      emb_*        retrieval over the dev corpus (the embedding path alone);
      fixed_*      reranking of the fixed candidates (dev_candidates) by the reranking path alone, next to
      cand_*       the candidates' own order (cand_recall@k: how often the list holds a relevant document);
      rerank_*     two-stage: the model's own retrieval, its top train.rerank_topk reranked by the model;
      e2rank_fixed_ndcg@10  (train.dev_e2rank) the E2Rank baseline from the embedding path on the same fixed
                   candidates (retrieval.e2rank_rerank, PRF from their top train.e2rank_prf_k).
    With train.rerank_head e2rank the reranking path is E2Rank itself, so fixed_* and rerank_* are its figures;
    with jina_v3 they are the listwise cross-encoder's (UniMoER.score_list: the list in blocks, in the given order).
    Self-hits are dropped as evaluate.py's default --drop-self auto decides (ir.resolve_drop_self)."""
    corpus, queries, qrels = dev
    k = cfg.train.rerank_topk
    first, second = two_stage(um, queries, corpus, k_retrieve=max(100, k), k_rerank=k, progress=False,
                              drop_self=resolve_drop_self("auto", queries, corpus))
    emb, rr = evaluate_run(qrels, first), evaluate_run(qrels, second)
    cands = dev_candidates(um, dev, cfg)
    cand = evaluate_run(qrels, cands, k_recall=(k,))
    fixed = evaluate_run(qrels, rerank(um, queries, corpus, cands, k=k, progress=False))
    out = {"emb_ndcg@10": emb["ndcg@10"], "emb_recall@100": emb["recall@100"],
           "fixed_ndcg@10": fixed["ndcg@10"], "cand_ndcg@10": cand["ndcg@10"], f"cand_recall@{k}": cand[f"recall@{k}"],
           "rerank_ndcg@10": rr["ndcg@10"], "rerank_mrr@10": rr["mrr@10"]}
    if cfg.train.dev_e2rank:  # an e2rank head's fixed_* is E2Rank already (retrieval.rerank's listwise branch)
        e2 = fixed if cfg.train.rerank_head == "e2rank" else evaluate_run(qrels, e2rank_rerank(um, queries, corpus, cands, k=k,
                                                                         k_prf=cfg.train.e2rank_prf_k, progress=False))
        out["e2rank_fixed_ndcg@10"] = e2["ndcg@10"]
    if cfg.train.matryoshka_dims:
        out.update(dev_matryoshka(um, dev, cfg))
    return out


def dev_matryoshka(um: UniMoER, dev: tuple, cfg: Config) -> dict:
    """emb@<m>_ndcg@10: dev retrieval at each of train.matryoshka_dims and the full width (matryoshka_table, as
    emb_*: depth max(100, rerank_topk), self-hits as --drop-self auto). One more encoding of the dev set."""
    corpus, queries, qrels = dev
    doc_ids, qids = list(corpus), list(queries)
    doc_emb = encode_corpus(um, doc_ids, [corpus[d] for d in doc_ids], progress=False)
    query_emb = encode_queries(um, [queries[q] for q in qids], progress=False)
    table = matryoshka_table(qids, query_emb, doc_ids, doc_emb, qrels, matryoshka_dims_of(um, None),
                             max(100, cfg.train.rerank_topk), resolve_drop_self("auto", queries, corpus))
    return {f"emb@{m}_ndcg@10": r["ndcg@10"] for m, r in table.items()}


def dev_routing_texts(dev: tuple, n: int = 32) -> tuple:
    """A fixed sample for routing_snapshot: the first n dev queries, each with its first judged relevant document."""
    corpus, queries, qrels = dev
    qids = sorted(queries)[:n]
    pairs = [(queries[q], corpus[min(d for d, g in qrels[q].items() if g > 0 and d in corpus)]) for q in qids
             if any(g > 0 and d in corpus for d, g in qrels[q].items())]
    return [q for q, _ in pairs], [d for _, d in pairs], pairs


# --------------------------------------------------------------------------------------------- CLI
def summary(result: dict) -> dict:
    """The one line printed on stdout: where, what, and each stage's metrics."""
    return {"checkpoint": result["checkpoint"], "dataset": result["dataset"], "split": result["split"],
            "num_queries": result["num_queries"],
            **{s: result[s] for s in ("retrieval", "two_stage", "candidates", "rerank", "e2rank_two_stage", "e2rank",
                                      "nli") if s in result},
            **({"matryoshka_ndcg@10": {m: r["ndcg@10"] for m, r in result["matryoshka"].items()}}
               if result.get("matryoshka") else {})}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; an input error raises (cli() turns it into one line and exit code 2)."""
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
    p.add_argument("--no-e2rank", action="store_true", help="skip the E2Rank baseline stages (e2rank_two_stage, "
                   "e2rank): listwise reranking by the embedding path, a PRF query per query")
    p.add_argument("--e2rank-prf-k", type=int, help="E2Rank: candidates in the PRF query (default the run's "
                   "train.e2rank_prf_k, 20)")
    p.add_argument("--dim", type=int, help="Matryoshka: cut query and document embeddings to their first N dims, "
                   "renormalised, in every stage (default: all)")
    p.add_argument("--dims", type=int, nargs="+", help="dims of the per-dim retrieval table in metrics.json "
                   "\"matryoshka\" (default: the run's train.matryoshka_dims; the evaluated width is always added)")
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
                                 drop_self=args.drop_self, e2rank=not args.no_e2rank,
                                 e2rank_prf_k=args.e2rank_prf_k, dim=args.dim, dims=args.dims)
    if result is not None:
        print(json.dumps(summary(result)), flush=True)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python evaluate.py ...` through the CLIs' one error path (model.run_cli): a missing file or malformed
    input is one line naming the file (and line), exit code 2; `--debug` shows its traceback."""
    return run_cli("evaluate.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

