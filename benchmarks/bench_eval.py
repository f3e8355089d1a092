"""Benchmark the evaluation side: faiss index kinds and corpus-encoding throughput.

Part 1, dense search (retrieval.build_index / retrieval.search): n_docs vectors of dimension dim, n_queries
queries, top-k. For flat (exact), HNSW and IVF-PQ it prints build time, search time, queries/s and recall@k
against the flat index, with ratios vs flat. --data lowrank (default) draws documents and queries near a
random 64-dimensional subspace plus noise, which is closer to real embeddings than i.i.d. Gaussian vectors;
--data gaussian gives the i.i.d. worst case for approximate search (neighbours are barely nearer than anyone).

Part 2, encoding (retrieval.encode_corpus): docs/s for each --encoder on a synthetic corpus (Zipfian words,
10-300 words per document), through the pipeline (length-sorted batches) and as one direct call in corpus
order, with ratios vs the first encoder. Encoders (make_encoder):
  bow         numpy random-projection bag-of-words, the no-model baseline;
  tiny        a UniMoER at the widths of configs/tiny.yaml (random base, 2 layers of width 64, joint_moe experts);
  qwen3-0.6b  a UniMoER at Qwen3-0.6B's widths (hidden 1024, 16 / 8 heads of 128, MLP 3072, joint_moe experts
              r 8 / 8 / 16 on all seven projections) with only --enc-layers layers (of 28) and a small vocabulary;
              it encodes the first --enc-docs-large documents only (on CPU it manages a few docs/s);
  DIR         a run, checkpoint or plain HF model directory (unimoer.load_model).
The random bases are written to a temporary directory (the synthetic task's tokenizer; nothing downloaded).
Model encoders truncate documents at --max-doc-len tokens. The machine's load average is printed: on shared
cores the figures move with it.

    python benchmarks/bench_eval.py                      # 5-12 minutes on 2 shared cores (HNSW / IVF-PQ builds)
    python benchmarks/bench_eval.py --n-docs 20000 --dim 256 --enc-docs 2000 --encoder bow,tiny   # seconds
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import zlib

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import retrieval  # noqa: E402
import runs  # noqa: E402
import synthetic  # noqa: E402
import unimoer  # noqa: E402

# Widths of the random bases (config.TinyBase fields): configs/tiny.yaml's, and Qwen3-0.6B's (its config.json:
# 28 layers; here the layer count comes from --enc-layers).
TINY_WIDTHS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=192, init_std=0.1)
QWEN3_06B_WIDTHS = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                        intermediate_size=3072, init_std=0.02)


# --------------------------------------------------------------------------------------------- encoders
class RandomProjectionBowEncoder:
    """Baseline encoder: words hashed into n_buckets, each bucket a fixed random Gaussian vector; a text is the
    L2-normalised sum of its words' vectors (a random projection of its bag of words). score_pairs is the
    cosine of the two vectors. Implements the interface documented in evaluate.py."""

    def __init__(self, dim: int = 1024, n_buckets: int = 1 << 14, seed: int = 0):
        self.projection = np.random.default_rng(seed).standard_normal((n_buckets, dim), dtype=np.float32)
        self.n_buckets = n_buckets

    def _encode(self, texts):
        ids = [[zlib.crc32(w.encode()) % self.n_buckets for w in re.findall(r"\w+", t.lower())] or [0] for t in texts]
        offsets = np.cumsum([0] + [len(i) for i in ids[:-1]])
        emb = np.add.reduceat(self.projection[np.concatenate(ids)], offsets, axis=0)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def encode_queries(self, texts, batch_size):
        return self._encode(texts)

    def encode_documents(self, texts, batch_size):
        return self._encode(texts)

    def score_pairs(self, queries, docs, batch_size):
        return np.sum(self._encode(queries) * self._encode(docs), axis=1)


def random_unimoer(widths: dict, tmp: str, max_doc_len: int):
    """A UniMoER (joint_moe experts, learned router) over a random base of the given widths, built in `tmp`
    the way train.py builds the tiny default: the synthetic task's tokenizer, write_tiny_base, build_model."""
    task = os.path.join(tmp, "task")
    if not os.path.isdir(task):
        synthetic.make_synthetic(task, n_docs=300, n_train=200, n_dev=16, n_test=16)  # only its tokenizer is used
    cfg = config.Config()
    cfg.data.dir, cfg.data.max_doc_len = task, max_doc_len
    cfg.model.tiny = config.TinyBase(**widths)
    base = os.path.join(tmp, f"base-{widths['hidden_size']}x{widths['num_hidden_layers']}")
    runs.write_tiny_base(cfg, base)
    cfg.model.path = base
    return unimoer.build_model(cfg, torch.device("cpu")).eval()


def make_encoder(name: str, args, tmp: str):
    """Encoder by name (see the module docstring); every one implements evaluate.py's encoder interface."""
    if name == "bow":
        return RandomProjectionBowEncoder(dim=args.dim)
    if name == "tiny":
        return random_unimoer(TINY_WIDTHS, tmp, args.max_doc_len)
    if name == "qwen3-0.6b":
        return random_unimoer({**QWEN3_06B_WIDTHS, "num_hidden_layers": args.enc_layers}, tmp, args.max_doc_len)
    if os.path.isdir(name):
        return unimoer.load_model(name, "cpu", args.max_doc_len)[0]
    raise SystemExit(f"unknown encoder {name!r} (bow, tiny, qwen3-0.6b or a run / checkpoint / model directory)")

# --------------------------------------------------------------------------------------------- data
def vectors(n: int, dim: int, kind: str, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    if kind == "gaussian":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        x = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        x += 0.1 * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(dim) * noise  # noise norm ~ 10% of signal
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_corpus(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(30000)]
    lengths = rng.integers(10, 301, size=n)
    words = rng.zipf(1.2, size=int(lengths.sum())) % len(vocab)
    texts, pos = [], 0
    for length in lengths:
        texts.append(" ".join(vocab[w] for w in words[pos:pos + length]))
        pos += length
    return texts


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------- benchmarks
def bench_search(args) -> None:
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, args.dim), dtype=np.float32)
    docs = vectors(args.n_docs, args.dim, args.data, rng, basis)
    queries = vectors(args.n_queries, args.dim, args.data, rng, basis)
    print(f"== dense search: {args.n_docs} docs x dim {args.dim} ({args.data}), {args.n_queries} queries, "
          f"top-{args.k}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    kinds = {
        "flat": {},
        "hnsw": dict(M=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search),
        "ivfpq": dict(nlist=args.nlist, m=args.pq_m, nbits=8, nprobe=args.nprobe),
    }
    rows, exact = [], None
    for kind in args.kinds.split(","):
        index, build = timed(lambda: retrieval.build_index(docs, kind, **kinds[kind]))
        (_, indices), search_s = timed(lambda: retrieval.search(index, queries, args.k))
        if kind == "flat":
            exact = indices
        recall = (np.mean([len(set(a) & set(e)) / args.k for a, e in zip(indices, exact)])
                  if exact is not None else float("nan"))
        params = ",".join(f"{k}={v}" for k, v in kinds[kind].items()) or "exact"
        rows.append((kind, params, build, search_s, recall))
        del index
    base = rows[0]
    print(f"{'index':<6} {'params':<40} {'build s':>8} {'search s':>9} {'q/s':>9} {'recall@' + str(args.k):>10}"
          f"   vs {base[0]}: {'build':>6} {'search speedup':>14}")
    for kind, params, build, search_s, recall in rows:
        print(f"{kind:<6} {params:<40} {build:8.2f} {search_s:9.3f} {args.n_queries / search_s:9.0f} {recall:10.3f}"
              f"       {build / base[2]:6.1f}x {base[3] / search_s:13.1f}x")


def bench_encode(args) -> None:

    all_texts = synthetic_corpus(args.enc_docs)
    print(f"== corpus encoding: synthetic docs (10-300 words, mean {np.mean([len(t) for t in all_texts]):.0f} chars), "
          f"batch size {args.batch_size}, model encoders truncate at {args.max_doc_len} tokens, "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.encoder.split(","):
            encoder = make_encoder(name, args, tmp)
            texts = all_texts[:args.enc_docs_large] if name == "qwen3-0.6b" else all_texts
            doc_ids = [f"d{i}" for i in range(len(texts))]
            with torch.inference_mode():
                encoder.encode_documents(texts[:args.batch_size], args.batch_size)  # warm-up
                _, pipeline = timed(lambda: retrieval.encode_corpus(encoder, doc_ids, texts, args.batch_size,
                                                             progress=False))
                _, direct = timed(lambda: [encoder.encode_documents(texts[i:i + args.batch_size], args.batch_size)
                                           for i in range(0, len(texts), args.batch_size)])
            label = f"{name} ({args.enc_layers} layers)" if name == "qwen3-0.6b" else name
            rows.append((label, len(texts), len(texts) / pipeline, len(texts) / direct))
            del encoder
    print(f"{'encoder':<24} {'docs':>6} {'encode_corpus docs/s':>21} {'direct docs/s':>14} {'pipeline/direct':>16} "
          f"{'vs ' + rows[0][0]:>10}")
    for label, n, pipeline, direct in rows:
        print(f"{label:<24} {n:6d} {pipeline:21.1f} {direct:14.1f} {pipeline / direct:15.2f}x "
              f"{pipeline / rows[0][2]:9.4f}x")
    for label, _, pipeline, _ in rows:
        if label.startswith("qwen3-0.6b"):
            print(f"qwen3-0.6b at all 28 layers: about {pipeline * args.enc_layers / 28:.2f} docs/s "
                  f"(x {args.enc_layers}/28: the layers dominate, not the embedding lookup or the tokenizer)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-docs", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=("lowrank", "gaussian"), default="lowrank")
    p.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated, flat first (the reference)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers (must divide --dim)")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    p.add_argument("--encoder", default="bow,tiny,qwen3-0.6b",
                   help="comma-separated encoder names (see make_encoder); the first is the baseline of the ratios")
    p.add_argument("--enc-docs", type=int, default=5000)
    p.add_argument("--enc-docs-large", type=int, default=128, help="documents for the qwen3-0.6b encoder")
    p.add_argument("--enc-layers", type=int, default=2, help="layers of the qwen3-0.6b encoder (of 28)")
    p.add_argument("--max-doc-len", type=int, default=128, help="document tokens of the model encoders")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--skip-encode", action="store_true")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if not args.kinds.startswith("flat"):
        raise SystemExit("--kinds must start with flat (recall and ratios are relative to it)")
    if not args.skip_search:
        bench_search(args)
    if not args.skip_encode:
        bench_encode(args)


if __name__ == "__main__":
    main()
